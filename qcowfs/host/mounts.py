"""The mount table, the run directory and pid files, and what holds a mount.

One module for what cli (umount, the already-mounted check), daemon (pid
file, a busy mount at a signal), the tests and the benchmark all need to
know about mounts, so that there is one parser of /proc/self/mountinfo and
one idea of where a daemon's pid is written. No pyfuse3 and no qcow2 here:
importing it is cheap and cycle-free.
"""
from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"
FSTYPE = "fuse.qcowfs"
_OCTAL = re.compile(rb"\\([0-7]{3})")


# ---- the mount table -------------------------------------------------------------

def unescape(field: bytes) -> str:
    """A field of /proc/self/mountinfo as a path string.

    The kernel writes space, tab, newline, backslash (and `#` in sources) as
    octal escapes `\\NNN` and every other byte as it is, which for a path is
    whatever bytes its name has (UTF-8 or not). So: undo the escapes on
    bytes, then decode as the os module does (surrogateescape), which gives
    the same str that os.fsdecode / os.path give for that path."""
    return os.fsdecode(_OCTAL.sub(lambda m: bytes([int(m.group(1), 8) & 0xFF]), field))


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo."""

    mount_id: int
    dev: str  # "major:minor" of the mounted filesystem
    root: str
    mountpoint: str
    options: str
    fstype: str
    source: str
    super_options: str


def mounts(path: str = MOUNTINFO) -> list[Mount]:
    """Every mount of this process's mount namespace, in mount order."""
    out = []
    with open(path, "rb") as f:
        for line in f:
            left, _, right = line.rstrip(b"\n").partition(b" - ")
            a, b = left.split(b" "), right.split(b" ")
            b += [b""] * (3 - len(b))
            out.append(Mount(int(a[0]), a[2].decode(), unescape(a[3]), unescape(a[4]),
                             a[5].decode(), b[0].decode(), unescape(b[1]), b[2].decode()))
    return out


def canonical(path: str | os.PathLike[str]) -> str:
    """The path as the mount table shows it: absolute, symlinks in its parent
    directories resolved. The last component is left alone: looking at it
    would ask the filesystem mounted there, which may be dead or busy
    stopping (and a mount point is a directory, not a symlink)."""
    full = os.path.abspath(os.fspath(path))
    head, tail = os.path.split(full)
    return os.path.join(os.path.realpath(head), tail) if tail else full


def find(mountpoint: str | os.PathLike[str], fstype: str | None = None) -> Mount | None:
    """The topmost mount on MOUNTPOINT (of type FSTYPE if given), or None."""
    target = canonical(mountpoint)
    found = None
    for m in mounts():
        if m.mountpoint == target and (fstype is None or m.fstype == fstype):
            found = m
    return found


def fuse_owner(m: Mount) -> int | None:
    """The user who made the FUSE mount M (its user_id= option), if shown."""
    for opt in m.super_options.split(","):
        if opt.startswith("user_id=") and opt[8:].isdigit():
            return int(opt[8:])
    return None


def is_mounted(path: str | os.PathLike[str]) -> bool:
    """True if something is mounted on PATH, live or dead (a FUSE mount whose
    daemon is gone still is in the table, and mountpoint(1) fails on it)."""
    return find(path) is not None


# ---- the FUSE source name -------------------------------------------------------

def fsname(image_path: str) -> str:
    """The mount's source (what `mount`, `df` and findmnt show) for IMAGE_PATH.

    pyfuse3 hands mount options to libfuse as ASCII, so a path with other
    bytes cannot be the source as it is: each byte outside ASCII, and `%`
    itself (so that the name can be decoded back), is written `%XX`, as in
    URLs. `/srv/ä b.qcow2` is shown as `/srv/%C3%A4 b.qcow2`; an ASCII path
    without `%` is shown unchanged."""
    return "".join(f"%{b:02X}" if b >= 0x80 or b == 0x25 else chr(b)
                   for b in os.fsencode(image_path))


def fsname_decode(name: str) -> str:
    """The image path back from fsname()."""
    return os.fsdecode(re.sub(rb"%([0-9A-Fa-f]{2})", lambda m: bytes([int(m.group(1), 16)]),
                              os.fsencode(name)))


# ---- run directory and pid files ---------------------------------------------------

def _private_dir(path: str) -> bool:
    """PATH is a directory of ours that nobody else can write into (a pid file
    read from a directory another user controls could name any process)."""
    return _unusable(path) is None


def _unusable(path: str) -> str | None:
    """Why PATH cannot be our run directory (created if missing), or None."""
    try:
        os.makedirs(path, mode=0o755, exist_ok=True)
        st = os.lstat(path)
    except OSError as e:
        return f"{path}: {e.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if st.st_uid != os.geteuid():
        return f"{path} belongs to {user_name(st.st_uid)}, not to {user_name(os.geteuid())}"
    if st.st_mode & 0o022:
        return f"{path} can be written by others (mode {stat.S_IMODE(st.st_mode):o})"
    if not os.access(path, os.W_OK):
        return f"{path} is not writable"
    return None


def user_name(uid: int) -> str:
    """A user as messages name one: NAME (uid N), or uid N without a name."""
    import pwd

    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def run_dir_problem() -> str | None:
    """Why this user has no run directory (each candidate's reason), or None
    when run_dir() finds one. A mount refuses to start without one: its
    daemon could write no pid file nor control socket, and umount, snapshot,
    bitmap... of the mount point would not find it."""
    if run_dir() is not None:
        return None
    reasons = [_unusable(d) or d for d in run_dirs() if os.geteuid() == 0 or d != "/run/qcowfs"]
    return "; ".join(reasons)


def run_dirs() -> list[str]:
    """Where pid files may be, most likely first: root's /run/qcowfs, then this
    user's $XDG_RUNTIME_DIR/qcowfs and /tmp/qcowfs-UID."""
    dirs = ["/run/qcowfs"]
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if os.geteuid() != 0:
        if xdg:
            dirs.append(os.path.join(xdg, "qcowfs"))
        dirs.append(f"/tmp/qcowfs-{os.geteuid()}")
    return dirs


def run_dir() -> str | None:
    """The first usable run directory for this user (created if missing), or
    None: then no pid file is written and `qcowfs umount` cannot wait."""
    for d in run_dirs():
        if (os.geteuid() == 0 or d != "/run/qcowfs") and _private_dir(d):
            return d
    return None


def _pidfile_name(dev: str) -> str:
    return dev.replace(":", "_") + ".pid"


def control_socket(dev: str) -> str | None:
    """Where the daemon serving DEV listens for commands (None: no run directory)."""
    d = run_dir()
    return os.path.join(d, dev.replace(":", "_") + ".sock") if d else None


def find_control_socket(dev: str) -> str | None:
    """The control socket of a live daemon serving DEV, if there is one."""
    if read_pid(dev) is None:
        return None
    for d in run_dirs():
        path = os.path.join(d, dev.replace(":", "_") + ".sock")
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                return path
        except OSError:
            continue
    return None


def dev_of(st_dev: int) -> str:
    """st_dev as the mount table's "major:minor"."""
    return f"{os.major(st_dev)}:{os.minor(st_dev)}"


FUSECTL = "/sys/fs/fuse/connections"


def abort_connection(dev: str) -> bool:
    """Abort the FUSE connection of the mount whose device is DEV (fusectl's
    abort file; its number is the device's minor): every request waiting for
    an answer ends with an error. False where fusectl is not mounted (or the
    connection is gone)."""
    try:
        with open(os.path.join(FUSECTL, dev.split(":")[1], "abort"), "w") as f:
            f.write("1")
        return True
    except OSError:
        return False


def write_pidfile(dev: str, pid: int | None = None) -> str | None:
    """Record the daemon serving the mount whose device is DEV; the path, or
    None when there is no run directory."""
    d = run_dir()
    if d is None:
        return None
    path = os.path.join(d, _pidfile_name(dev))
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{pid or os.getpid()}\n")
    os.replace(tmp, path)
    return path


def read_pid(dev: str) -> int | None:
    """The live daemon recorded for DEV, if any. Device numbers of FUSE mounts
    are reused: a pid file left by a daemon that died is ignored unless the
    process it names still holds /dev/fuse open."""
    for d in run_dirs():
        try:
            with open(os.path.join(d, _pidfile_name(dev))) as f:
                pid = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if alive(pid) and _holds_fuse_device(pid) is not False:
            return pid
    return None


def _holds_fuse_device(pid: int) -> bool | None:
    """True/False whether PID has /dev/fuse open; None if we may not look."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except PermissionError:
        return None
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse":
                return True
        except OSError:
            continue
    return False


def alive(pid: int) -> bool:
    """PID exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def comm(pid: int) -> str:
    """The process name of PID ("?" if gone)."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


# ---- what keeps a mount busy -------------------------------------------------------

def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _rel(path: str, root: str) -> str:
    return os.path.relpath(path, root) if path != root else "."


def holders(mountpoint: str, exclude: tuple[int, ...] = ()) -> list[str]:
    """What holds MOUNTPOINT busy, as short phrases for one log line: loop
    devices over a file in it, mounts inside it, processes with a file, a
    mapping, a working or root directory in it. Only what this process may
    see (all of it as root); an empty list does not prove the mount is free,
    umount(2) is the one judge of that."""
    root = canonical(mountpoint)
    found: list[str] = []
    try:
        loops = sorted(os.listdir("/sys/block"))
    except OSError:
        loops = []
    for name in loops:
        if not name.startswith("loop"):
            continue
        try:
            with open(f"/sys/block/{name}/loop/backing_file") as f:
                backing = f.read().rstrip("\n")
        except OSError:
            continue
        if _inside(backing, root):
            found.append(f"/dev/{name} over {_rel(backing, root)}")
    for m in mounts():
        if m.mountpoint != root and _inside(m.mountpoint, root):
            found.append(f"a mount on {_rel(m.mountpoint, root)}")
    me = (os.getpid(), *exclude)
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in me:
            continue
        pid = int(entry)
        what: set[str] = set()
        for link in ("cwd", "root"):
            try:
                if _inside(os.readlink(f"/proc/{pid}/{link}"), root):
                    what.add(f"{link} in it")
            except OSError:
                pass
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            fds = []
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if _inside(target, root):
                what.add(_rel(target, root))
        try:
            with open(f"/proc/{pid}/maps", "rb") as f:
                for line in f:
                    parts = line.split(None, 5)
                    if len(parts) == 6:
                        target = os.fsdecode(parts[5].rstrip(b"\n"))
                        if _inside(target, root):
                            what.add(f"{_rel(target, root)} mapped")
        except OSError:
            pass
        if what:
            found.append(f"pid {pid} ({comm(pid)}): {', '.join(sorted(what))}")
    return found
