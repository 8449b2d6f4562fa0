"""Where the passphrase of an encrypted image comes from, and keeping key
material out of swap.

Never from the command line in clear: a key file (`-o key_file=PATH`, read
as QEMU's `--object secret,file=PATH` reads it: every byte, a trailing
newline included), a systemd credential (`-o key_credential=NAME`, the file
$CREDENTIALS_DIRECTORY/NAME that `LoadCredential=` provides), or a prompt
without echo when stdin is a terminal (the typed line, without its newline,
as cryptsetup takes it). The passphrase is read only when an encrypted image
is opened; nothing here logs it.
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys
from typing import Callable

from ..errors import PassphraseError

log = logging.getLogger("qcowfs")

# A passphrase file larger than this is a mistake (a disk image named by accident).
MAX_KEY_FILE = 1 << 20
MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
CAP_IPC_LOCK = 14


def read_key_file(path: str) -> bytes:
    """The raw bytes of PATH (QEMU's secret file= semantics: nothing stripped)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE + 1)
    except OSError as e:
        raise PassphraseError(f"cannot read the key file {path}: {e.strerror}") from None
    if len(data) > MAX_KEY_FILE:
        raise PassphraseError(f"the key file {path} is larger than {MAX_KEY_FILE} bytes")
    return data


def credential_path(name: str) -> str:
    """$CREDENTIALS_DIRECTORY/NAME, as systemd's LoadCredential=NAME:... provides it."""
    if not name or "/" in name or name in (".", ".."):
        raise PassphraseError(f"invalid credential name '{name}'")
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise PassphraseError(f"key_credential={name}: $CREDENTIALS_DIRECTORY is not set "
                              "(run under systemd with LoadCredential=)")
    return os.path.join(directory, name)


def prompt(image: str) -> bytes:
    """Ask on the terminal, without echo."""
    import getpass  # (with termios: only where a prompt is needed)

    try:
        text = getpass.getpass(f"Passphrase for {image}: ")
    except (EOFError, KeyboardInterrupt):
        raise PassphraseError("no passphrase given") from None
    return text.encode("utf-8", "surrogateescape")


# How a mount is given a passphrase (the commands say "--key-file FILE").
MOUNT_KEY_OPTIONS = "-o key_file=PATH or -o key_credential=NAME"


def passphrase_source(image: str, key_file: str | None, key_credential: str | None = None,
                      interactive: bool | None = None, options: str = MOUNT_KEY_OPTIONS
                      ) -> Callable[[], bytes]:
    """What Image calls when it opens an encrypted image (not before: a plain
    image never prompts): the key file, the systemd credential, else a prompt
    naming IMAGE. INTERACTIVE defaults to "stdin is a terminal"; without one,
    the error names OPTIONS, the command's way of giving the passphrase."""
    def get() -> bytes:
        if key_file is not None:
            return read_key_file(key_file)
        if key_credential is not None:
            return read_key_file(credential_path(key_credential))
        if interactive if interactive is not None else sys.stdin is not None and sys.stdin.isatty():
            return prompt(image)
        raise PassphraseError(f"{image} is encrypted: give its passphrase with {options}, or run "
                              "from a terminal to be asked")
    return get


def _can_lock_everything() -> bool:
    """mlockall(MCL_FUTURE) under a finite RLIMIT_MEMLOCK would make later
    allocations fail once the limit is reached: only with CAP_IPC_LOCK or an
    unlimited limit."""
    import resource  # (only an encrypted image locks memory)

    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY:
        return True
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_IPC_LOCK & 1)
    except (OSError, ValueError):
        pass
    return False


def lock_memory() -> bool:
    """Keep the daemon's memory, which holds the master key (in OpenSSL's
    contexts too, where no single buffer can be locked), out of swap:
    mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT), so pages are locked as
    they are touched (thread stacks are not filled at once). Where that is
    not allowed the mount goes on unlocked, with a debug line."""
    if not _can_lock_everything():
        log.debug("memory not locked: RLIMIT_MEMLOCK is limited and CAP_IPC_LOCK is missing")
        return False
    # (the process's own symbols, libc's among them: find_library would
    # import subprocess and run ldconfig to name the same library)
    libc = ctypes.CDLL(None, use_errno=True)
    for flags in (MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT, MCL_CURRENT | MCL_FUTURE):
        if libc.mlockall(flags) == 0:
            log.debug("memory locked (mlockall flags %d)", flags)
            return True
    log.debug("memory not locked: mlockall failed: %s", os.strerror(ctypes.get_errno()))
    return False
