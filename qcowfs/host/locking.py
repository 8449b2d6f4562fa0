"""Image locks that QEMU understands: OFD byte-range locks on the image file.

QEMU's file driver holds a shared lock on byte 100+i for each permission i
it holds and on byte 200+i for each permission it will not share, and tests
for the opposite bytes before taking them (block/file-posix.c). Doing the
same makes QEMU and qemu-img refuse to write an image mounted read-write
here, and makes us refuse an image QEMU is writing.

A refusal names the holder. F_OFD_GETLK cannot (l_pid is -1 for OFD locks,
and so is the pid column of /proc/locks), but /proc/PID/fdinfo/FD lists the
locks held through that open file: the processes with the image open are
found under /proc, and the one whose fdinfo shows a lock on the byte is the
holder.
"""
from __future__ import annotations

import errno
import fcntl
import os
import struct

from ..errors import ImageLockedError

PERM_CONSISTENT_READ = 0
PERM_WRITE = 1
PERM_WRITE_UNCHANGED = 2
PERM_RESIZE = 3
ALL_PERMS = (PERM_CONSISTENT_READ, PERM_WRITE, PERM_WRITE_UNCHANGED, PERM_RESIZE)
PERM_NAMES = {0: "consistent read", 1: "write", 2: "write unchanged", 3: "resize"}
LOCK_BASE_PERM = 100
LOCK_BASE_SHARED = 200
FORCE_SHARE_HINT = ("a read-only mount with `-o force_share`, `qcowfs info -U` and `qcowfs check -U` "
                    "can still read it")

# struct flock on Linux x86-64/aarch64: short type, short whence, off_t start, off_t len, pid_t pid.
_FLOCK = struct.Struct("hhxxxxqqixxxx")


def _flock(fd: int, cmd: int, ltype: int, offset: int) -> int:
    res = fcntl.fcntl(fd, cmd, _FLOCK.pack(ltype, os.SEEK_SET, offset, 1, 0))
    return _FLOCK.unpack(res)[0]


def _locked_by_other(fd: int, offset: int) -> bool:
    return _flock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, offset) != fcntl.F_UNLCK


def _lock_covers(line: str, dev: str, ino: int, offset: int) -> bool:
    """A /proc lock line ("lock:\\t1: OFDLCK ADVISORY  READ -1 fe:00:123 100 101")
    on inode DEV:INO covering OFFSET."""
    f = line.split()
    try:
        i = next(k for k, w in enumerate(f) if w.count(":") == 2 and k > 3)
        maj, mnr, lino = f[i].split(":")
        start, end = int(f[i + 1]), f[i + 2]
    except (StopIteration, ValueError, IndexError):
        return False
    if f"{int(maj, 16)}:{int(mnr, 16)}" != dev or int(lino) != ino:
        return False
    return start <= offset and (end == "EOF" or offset <= int(end))


def lock_holders(fd: int, offset: int) -> list[int]:
    """Pids holding a lock on byte OFFSET of the file open as FD (as far as
    /proc lets us look: all of them as root)."""
    st = os.fstat(fd)
    dev, ino = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}", st.st_ino
    me = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for n in fds:
            if pid == me and int(n) == fd:
                continue
            try:
                s = os.stat(f"/proc/{pid}/fd/{n}")
                if (s.st_dev, s.st_ino) != (st.st_dev, st.st_ino):
                    continue
                with open(f"/proc/{pid}/fdinfo/{n}") as f:
                    info = f.read().splitlines()
            except OSError:
                continue
            if any(line.startswith("lock:") and _lock_covers(line, dev, ino, offset) for line in info):
                pids.append(pid)
                break
    return pids


def describe_holder(pid: int, path: str) -> str:
    """"qcowfs (pid 123, mounted on /mnt/x)", "qemu-system-x86 (pid 456)"."""
    from .mounts import FSTYPE, comm, fsname, mounts

    name = comm(pid)
    if pid == os.getpid():
        return f"this process (pid {pid})"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [os.fsdecode(a) for a in f.read().split(b"\0")]
    except OSError:
        argv = []
    if name == "qcowfs" or any(os.path.basename(a) == "qcowfs" for a in argv[:2]):
        source = fsname(os.path.realpath(path))
        where = [m.mountpoint for m in mounts() if m.fstype == FSTYPE and m.source == source
                 and m.mountpoint in argv]
        return f"qcowfs (pid {pid}{', mounted on ' + where[0] if where else ''})"
    return f"{name} (pid {pid})"


def _holder_text(fd: int, path: str, offset: int) -> str:
    try:
        pids = lock_holders(fd, offset)
    except OSError:
        pids = []
    if not pids:
        return "another process"
    return " and ".join(describe_holder(p, path) for p in pids)


def lock_image(fd: int, path: str, writer: bool, *, force_share: bool = False) -> None:
    """Take QEMU-style locks as a writer (all permissions, sharing only reads
    and unchanged writes) or as a reader (consistent read, not sharing writes).

    FORCE_SHARE (qemu-img's -U) takes and tests no lock at all: the image is
    read whatever holds it, and may be inconsistent if a writer is active.
    It is only for readers."""
    if force_share:
        if writer:
            raise ValueError("force_share is only for read-only opens")
        return
    held = ALL_PERMS if writer else (PERM_CONSISTENT_READ,)
    unshared = (PERM_WRITE, PERM_RESIZE) if writer else (PERM_WRITE,)
    try:
        for p in held:
            if _locked_by_other(fd, LOCK_BASE_SHARED + p):
                raise ImageLockedError(
                    f"{path} is in use: {_holder_text(fd, path, LOCK_BASE_SHARED + p)} does not "
                    f"share the {PERM_NAMES[p]} permission ({FORCE_SHARE_HINT})")
        for p in unshared:
            if _locked_by_other(fd, LOCK_BASE_PERM + p):
                raise ImageLockedError(
                    f"{path} is in use: {_holder_text(fd, path, LOCK_BASE_PERM + p)} holds the "
                    f"{PERM_NAMES[p]} permission ({FORCE_SHARE_HINT})")
        for p in held:
            _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, LOCK_BASE_PERM + p)
        for p in unshared:
            _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, LOCK_BASE_SHARED + p)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise ImageLockedError(f"{path} is locked by another process ({FORCE_SHARE_HINT})") from None
        if e.errno not in (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP):
            raise
        # A filesystem without OFD locks: QEMU carries on too.
