"""Image locks that QEMU understands: OFD byte-range locks on the image file.

QEMU's file driver holds a shared lock on byte 100+i for each permission i
it holds and on byte 200+i for each permission it will not share, and tests
for the opposite bytes before taking them (block/file-posix.c). Doing the
same makes QEMU and qemu-img refuse to write an image mounted read-write
here, and makes us refuse an image QEMU is writing.
"""
from __future__ import annotations

import errno
import fcntl
import os
import struct

from .errors import ImageLockedError

PERM_CONSISTENT_READ = 0
PERM_WRITE = 1
PERM_WRITE_UNCHANGED = 2
PERM_RESIZE = 3
ALL_PERMS = (PERM_CONSISTENT_READ, PERM_WRITE, PERM_WRITE_UNCHANGED, PERM_RESIZE)
PERM_NAMES = {0: "consistent read", 1: "write", 2: "write unchanged", 3: "resize"}
LOCK_BASE_PERM = 100
LOCK_BASE_SHARED = 200

# struct flock on Linux x86-64/aarch64: short type, short whence, off_t start, off_t len, pid_t pid.
_FLOCK = struct.Struct("hhxxxxqqixxxx")


def _flock(fd: int, cmd: int, ltype: int, offset: int) -> int:
    res = fcntl.fcntl(fd, cmd, _FLOCK.pack(ltype, os.SEEK_SET, offset, 1, 0))
    return _FLOCK.unpack(res)[0]


def _locked_by_other(fd: int, offset: int) -> bool:
    return _flock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, offset) != fcntl.F_UNLCK


def lock_image(fd: int, path: str, writer: bool) -> None:
    """Take QEMU-style locks as a writer (all permissions, sharing only reads
    and unchanged writes) or as a reader (consistent read, not sharing writes)."""
    held = ALL_PERMS if writer else (PERM_CONSISTENT_READ,)
    unshared = (PERM_WRITE, PERM_RESIZE) if writer else (PERM_WRITE,)
    try:
        for p in held:
            if _locked_by_other(fd, LOCK_BASE_SHARED + p):
                raise ImageLockedError(f"{path} is in use: another process (QEMU?) does not "
                                       f"share the {PERM_NAMES[p]} permission")
        for p in unshared:
            if _locked_by_other(fd, LOCK_BASE_PERM + p):
                raise ImageLockedError(f"{path} is in use: another process (QEMU?) holds the "
                                       f"{PERM_NAMES[p]} permission")
        for p in held:
            _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, LOCK_BASE_PERM + p)
        for p in unshared:
            _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, LOCK_BASE_SHARED + p)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise ImageLockedError(f"{path} is locked by another process") from None
        if e.errno not in (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP):
            raise
        # A filesystem without OFD locks: QEMU carries on too.
