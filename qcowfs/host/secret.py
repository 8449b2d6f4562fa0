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

import os
import sys
from typing import Callable, Iterable, Iterator

from ..errors import PassphraseError, UsageError
from .logs import log


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


def secret_object(spec: str) -> tuple[str, bytes]:
    """qemu-img's `--object secret,id=ID,data=TEXT` or `...,file=PATH` (with
    format=raw, the default, or base64): (ID, the passphrase's bytes), so a
    qemu-img command line that names its passphrase so runs as it is (the
    file read as --key-file reads one). Other object types are refused, as
    qemu-img refuses what it has no use for."""
    import base64
    import binascii

    kind, _, rest = spec.partition(",")
    fields: dict[str, str] = {}
    for part in filter(None, rest.split(",")):
        name, eq, value = part.partition("=")
        if not eq:
            raise UsageError(f"--object {spec}: '{part}' is not NAME=VALUE")
        fields[name] = value
    if kind.removeprefix("qom-type=") != "secret":
        raise UsageError(f"--object: invalid object type '{kind}' (qcowfs takes secret objects: "
                         "secret,id=ID,data=PASSPHRASE or secret,id=ID,file=PATH)")
    unknown = set(fields) - {"id", "data", "file", "format"}
    if unknown:
        raise UsageError(f"--object {spec}: unknown property '{sorted(unknown)[0]}' (id, data, file, format)")
    if not fields.get("id"):
        raise UsageError(f"--object {spec}: a secret needs an id")
    if ("data" in fields) == ("file" in fields):
        raise UsageError(f"--object {spec}: give the secret's data= or its file=, one of them")
    raw = fields["data"].encode() if "data" in fields else read_key_file(fields["file"])
    fmt = fields.get("format", "raw")
    if fmt == "base64":
        try:
            raw = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise UsageError(f"--object secret id={fields['id']}: its data is not base64") from None
    elif fmt != "raw":
        raise UsageError(f"--object secret id={fields['id']}: format must be raw or base64, not '{fmt}'")
    return fields["id"], raw


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


def prompt_new(image: str) -> bytes:
    """Ask for a new passphrase of IMAGE twice on the terminal, without echo
    (a key slot amend adds: a typo would lock the data out)."""
    import getpass

    try:
        first = getpass.getpass(f"New passphrase for {image}: ")
        again = getpass.getpass("The same again: ")
    except (EOFError, KeyboardInterrupt):
        raise PassphraseError("no passphrase given") from None
    if again != first:
        raise PassphraseError("the two passphrases differ")
    return first.encode("utf-8", "surrogateescape")


# How a mount is given a passphrase (the commands say "--key-file FILE").
MOUNT_KEY_OPTIONS = "-o key_file=PATH or -o key_credential=NAME"


class Keyring:
    """The passphrases a program, a command or a mount was given, tried in
    order on each encrypted image it opens: the image and every encrypted
    layer of its backing chain, each of which may have its own key (QEMU
    gives each layer its own secret). PASSPHRASES, then the files KEY_FILES,
    then the systemd credentials CREDENTIALS, then what an earlier prompt
    was told (one answer serves a chain with one key), then ASK(image) (a
    prompt naming the image; commands ask only when given nothing, as
    cryptsetup does). Taken one at a time: a file is read and ASK is
    asked only once the ones before did not open the image. LUKS tests a
    passphrase with PBKDF2 (about 2 s per key slot at QEMU's default
    iter-time), so a wrong one costs that much: give the top image's first.

    Called with an image's path, it yields the passphrases to try on it
    (`engine.opening.Passphrases`). With nothing given and no ASK, it raises
    PassphraseError(MISSING, with {image} replaced)."""

    def __init__(self, passphrases: Iterable[bytes] = (), key_files: Iterable[str] = (),
                 credentials: Iterable[str] = (), ask: Callable[[str], bytes] | None = None,
                 missing: str = "{image} is encrypted and no passphrase was given") -> None:
        self._given = list(passphrases)
        self._files = list(key_files)
        self._credentials = list(credentials)
        self._ask = ask
        self._missing = missing
        self._typed: list[bytes] = []

    @property
    def sources(self) -> int:
        """How many passphrases were given (the prompt not counted)."""
        return len(self._given) + len(self._files) + len(self._credentials)

    def __call__(self, image: str) -> Iterator[bytes]:
        yield from self._given
        for path in self._files:
            yield read_key_file(path)
        for name in self._credentials:
            yield read_key_file(credential_path(name))
        yield from list(self._typed)
        if self._ask is None:
            if not self.sources:
                raise PassphraseError(self._missing.format(image=image))
            return
        typed = self._ask(image)
        self._typed.append(typed)
        yield typed


def passphrase_source(key_files: Iterable[str] = (), key_credentials: Iterable[str] = (),
                      interactive: bool | None = None, options: str = MOUNT_KEY_OPTIONS) -> Keyring:
    """The passphrases of a command or a mount: its key files and systemd
    credentials (several for a chain whose layers have different keys), else
    a prompt naming each image that an earlier answer does not open, when
    stdin is a terminal (INTERACTIVE says otherwise); without one, the error
    names OPTIONS, the command's way of giving the passphrase. Nothing is
    read, and nobody asked, before an encrypted image is opened."""
    key_files, key_credentials = list(key_files), list(key_credentials)
    if interactive is None:
        interactive = sys.stdin is not None and sys.stdin.isatty()
    interactive = interactive and not key_files and not key_credentials
    return Keyring(key_files=key_files, credentials=key_credentials, ask=prompt if interactive else None,
                   missing=f"{{image}} is encrypted: give its passphrase with {options}, or run "
                           "from a terminal to be asked")


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
    import ctypes  # (here: only a daemon that locks its memory needs it)

    # (the process's own symbols, libc's among them: find_library would
    # import subprocess and run ldconfig to name the same library)
    libc = ctypes.CDLL(None, use_errno=True)
    for flags in (MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT, MCL_CURRENT | MCL_FUTURE):
        if libc.mlockall(flags) == 0:
            log.debug("memory locked (mlockall flags %d)", flags)
            return True
    log.debug("memory not locked: mlockall failed: %s", os.strerror(ctypes.get_errno()))
    return False
