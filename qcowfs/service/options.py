"""Mount options: what `-o a,b,c` (and mount(8), fstab, systemd) may say,
parsed into one MountOptions for the CLI and the daemon."""
from __future__ import annotations

import grp
import os
import pwd
import re
from dataclasses import dataclass, field

from ..engine import DEFAULT_L2_CACHE_BYTES
from ..errors import UsageError


# Options mount(8) and systemd pass along that mean nothing to us.
GENERIC_OPTIONS = {"rw", "ro", "dev", "suid", "atime", "auto", "nofail", "_netdev",
                   "defaults", "relatime", "strictatime", "lazytime", "user", "users", "owner",
                   "diratime", "async", "sync"}
DEFAULT_READ_AROUND = 256 << 10
# What a force-shared mount says once at mount time (stderr and the log).
FORCE_SHARE_WARNING = ("force_share: the image is opened whatever holds it; while another program "
                       "writes it, what the mount shows may change or be inconsistent")


# -o workers= at most (more processes than CPUs only wake each other up).
MAX_WORKERS = 64


def default_workers() -> int:
    """Processes serving a read-only mount unless -o workers= says: one per CPU
    this process may run on (docs/speed.md: the O_DIRECT and compressed rows
    scale with them; more than the CPUs only adds wake-ups)."""
    return min(len(os.sched_getaffinity(0)), MAX_WORKERS)


# What a root daemon logs to when there is no syslog (no /dev/log) and no -o log_file=.
ROOT_LOG_FILE = "/var/log/qcowfs.log"


@dataclass(frozen=True)
class OptionDoc:
    """One mount option as the help, the man page and shell completion show it."""

    name: str
    value: str | None  # the value's placeholder (NAME=VALUE), None for a flag
    help: str


# Every option MountOptions.apply accepts (besides the generic ones), in the
# order the help lists them: one table for `qcowfs mount --help`, qcowfs(1)
# and the bash completion (tests/test_manpage.py checks each one applies).
MOUNT_OPTIONS = (
    OptionDoc("ro", None, "read-only: the image is never written (as --read-only)"),
    OptionDoc("rw", None, "read-write (the default)"),
    OptionDoc("allow_other", None, "let other users in (the file modes decide; needs user_allow_other "
                                   "in /etc/fuse.conf for a user's mount)"),
    OptionDoc("uid", "USER", "owner of the files (a name or a number; default: the mounting user)"),
    OptionDoc("gid", "GROUP", "group of the files (a name or a number)"),
    OptionDoc("umask", "OCTAL", "mode bits taken away from the files (default 022)"),
    OptionDoc("l2_cache_size", "SIZE", "memory for cached L2 tables (default 32M)"),
    OptionDoc("read_around", "SIZE", "window pushed into the page cache around small reads of files "
                                     "that cannot change (default 256K, 0 = off)"),
    OptionDoc("page_cache", None, "let the kernel cache a writable disk.raw (needed for shared mmap)"),
    OptionDoc("log_file", "PATH", f"the daemon's log (default: syslog, else {ROOT_LOG_FILE} for root, "
                                  "~/.local/state/qcowfs/qcowfs.log for others)"),
    OptionDoc("key_file", "PATH", "file holding the passphrase of an encrypted image (again for a "
              "backing file with another key: each is tried in order)"),
    OptionDoc("key_credential", "NAME", "systemd credential holding the passphrase (LoadCredential=; "
              "may be repeated, as key_file)"),
    OptionDoc("debug", None, "log every FUSE request (as --debug)"),
    OptionDoc("scratch", None, "throwaway writes: the image is opened read-only, every file takes "
                               "writes kept in a temporary overlay, gone at unmount"),
    OptionDoc("scratch_dir", "DIR", "where the scratch overlay lives (default $TMPDIR, else /tmp)"),
    OptionDoc("scratch_size", "SIZE", "most space the scratch overlay may use"),
    OptionDoc("force_share", None, "read-only mounts: open an image another program holds or writes "
                                   "(QEMU's -U)"),
    OptionDoc("workers", "N", "processes serving a read-only mount together (default: one per CPU; "
                              "writable mounts have one)"),
    OptionDoc("exec", None, "allow running programs from the mount"),
    OptionDoc("noexec", None, "do not allow running programs from the mount"),
)


# Size suffixes as qemu-img reads them (qemu_strtosz): powers of 1024.
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}
_SIZE = re.compile(r"\+?(\d+(?:\.\d*)?)([kmgtpe]?)(?:i?b)?")


def parse_size(text: str, zero: bool = False) -> int:
    """A size as qemu-img reads one, for every size a command or a mount
    option takes: a number, fractional or not, with an optional suffix k,
    M, G, T, P or E (case does not matter; a fraction needs a suffix; "B",
    "KiB" and "KB" are read too, as mount options always took them).
    ZERO: 0 is a size (a resize by +0, -S 0), else it is refused."""
    m = _SIZE.fullmatch(text.strip().lower())
    if m is None or ("." in m.group(1) and not m.group(2)):  # (no fraction of a byte, as qemu-img)
        raise UsageError(f"invalid size '{text}' (a number with an optional suffix k, M, G, T, P or E)")
    number, unit = m.group(1), _SIZE_UNITS[m.group(2)]
    value = int(float(number) * unit) if "." in number else int(number) * unit
    if value == 0 and not zero:
        raise UsageError(f"invalid size '{text}' (it must be more than 0)")
    return value


@dataclass
class MountOptions:
    """The options of one mount, parsed and checked (-o and the flags)."""

    read_only: bool = False
    allow_other: bool = False
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    umask: int = 0o022
    l2_cache_bytes: int = DEFAULT_L2_CACHE_BYTES
    read_around: int = DEFAULT_READ_AROUND
    page_cache: bool = False
    noexec: bool = False
    debug: bool = False
    log_file: str | None = None
    # An encrypted image's passphrases: files, then systemd credentials, each
    # tried in order on every encrypted layer (see secret.py).
    key_files: list[str] = field(default_factory=list)
    key_credentials: list[str] = field(default_factory=list)
    # -o scratch: image read-only, every file takes throwaway writes (scratch.py)
    scratch: bool = False
    scratch_dir: str | None = None
    scratch_size: int | None = None
    # -o force_share: QEMU's -U, read-only mounts only
    force_share: bool = False
    # -o workers=N: processes serving a read-only mount (None: the default, see serving_processes)
    workers: int | None = None

    def apply(self, opts: str) -> None:
        for opt in filter(None, opts.split(",")):
            key, _, value = opt.partition("=")
            if key == "ro":
                self.read_only = True
            elif key == "rw":
                self.read_only = False
            elif key == "allow_other":
                self.allow_other = True
            elif key in ("default_permissions", "fsname", "subtype"):
                pass
            elif key in ("uid", "gid"):
                setattr(self, key, _owner_id(key, value))
            elif key == "umask":
                try:
                    self.umask = int(value, 8)
                except ValueError:
                    raise UsageError(f"invalid value for option umask: '{value}'") from None
            elif key in ("log_file", "log-file"):
                if not value:
                    raise UsageError("option log_file needs a path: -o log_file=PATH")
                self.log_file = os.path.abspath(value)
            elif key in ("key_file", "key-file"):
                if not value:
                    raise UsageError("option key_file needs a path: -o key_file=PATH")
                self.key_files.append(os.path.abspath(value))
            elif key in ("key_credential", "key-credential"):
                if not value:
                    raise UsageError("option key_credential needs a name: -o key_credential=NAME")
                self.key_credentials.append(value)
            elif key in ("l2_cache_size", "l2-cache-size"):
                self.l2_cache_bytes = parse_size(value)
            elif key == "read_around":
                self.read_around = 0 if value.strip() in ("0", "off") else parse_size(value)
                if self.read_around & (self.read_around - 1) or self.read_around % 4096:
                    raise UsageError("read_around must be 0 or a power of two of at least 4K")
            elif key in ("exec", "noexec"):
                self.noexec = key == "noexec"
            elif key == "page_cache":
                self.page_cache = True
            elif key == "debug":
                self.debug = True
            elif key == "scratch":
                self.scratch = True
            elif key == "scratch_dir":
                if not value:
                    raise UsageError("option scratch_dir needs a directory: -o scratch_dir=DIR")
                self.scratch_dir = os.path.abspath(value)
            elif key == "scratch_size":
                try:
                    self.scratch_size = parse_size(value)
                except UsageError:
                    raise UsageError(f"invalid value for option scratch_size: '{value}' "
                                     "(a size such as 512M or 2G)") from None
            elif key in ("force_share", "force-share"):
                self.force_share = True
            elif key == "workers":
                if not re.fullmatch(r"\d+", value) or not 1 <= int(value) <= MAX_WORKERS:
                    raise UsageError(f"invalid value for option workers: '{value}' (a number of "
                                     f"processes, 1 to {MAX_WORKERS})")
                self.workers = int(value)
            elif (key in GENERIC_OPTIONS or key.startswith("no") and key[2:] in GENERIC_OPTIONS
                  or key.startswith("x-systemd.") or key.startswith("x-") or key == "noatime"):
                pass
            else:
                raise UsageError(f"unknown mount option '{opt}'")

    @property
    def image_read_only(self) -> bool:
        """The image is opened read-only: ro, or scratch (whose writes stay
        outside it)."""
        return self.read_only or self.scratch

    @property
    def serving_processes(self) -> int:
        """How many processes serve the mount: -o workers=N, else one per CPU
        on a read-only mount and one on any other (a writable image has one
        owner; a force-shared image changes under the mount, and processes
        would each see it at other moments)."""
        if self.workers is not None:
            return self.workers
        return default_workers() if self.read_only and not self.force_share else 1

    def check(self) -> None:
        """Combinations that make no sense, once every option is in (one line each)."""
        if self.scratch and self.read_only:
            raise UsageError("-o scratch makes the files writable (writes are thrown away, the image "
                             "is opened read-only anyway): it cannot be combined with ro/--read-only")
        if (self.scratch_dir is not None or self.scratch_size is not None) and not self.scratch:
            raise UsageError("scratch_dir= and scratch_size= need -o scratch")
        if (self.workers or 1) > 1 and (not self.read_only or self.force_share):
            raise UsageError("-o workers=N (more than one) needs a read-only mount without force_share: "
                             "a writable image has one owner, and a force-shared one changes under the "
                             "mount (add -o ro, or leave workers= out)")
        if self.force_share and not self.image_read_only:
            raise UsageError("-o force_share needs a read-only mount: add -o ro (or -o scratch for "
                             "throwaway writes)")


def _owner_id(key: str, value: str) -> int:
    """uid=/gid= as a number or a user/group name."""
    if re.fullmatch(r"\d+", value):
        return int(value)
    try:
        return pwd.getpwnam(value).pw_uid if key == "uid" else grp.getgrnam(value).gr_gid
    except KeyError:
        what = "user" if key == "uid" else "group"
        raise UsageError(f"invalid value for option {key}: no {what} named '{value}'") from None
