"""A one-file pyfuse3 filesystem for testing our pyfuse3 patch on its own.

    python tinyfs.py MOUNTPOINT plain     fallocate and lseek not defined (ENOSYS defaults)
    python tinyfs.py MOUNTPOINT sparse    a 1 MiB file "f" with data in [64K, 128K) only
    python tinyfs.py MOUNTPOINT shared N  "plain", served by N processes (share_session)

With `sparse`, fallocate(PUNCH_HOLE|KEEP_SIZE) and fallocate(0) are recorded
in the xattr user.calls of "f" (as "mode,offset,length" lines), other modes
give EOPNOTSUPP; lseek answers from the one data extent. The xattr
user.pid of "f" is the pid of the process that answered. Runs in the
foreground until unmounted (with `shared`, the first process waits for the
others to end and prints their pids first).
"""
from __future__ import annotations

import ctypes
import errno
import os
import signal
import stat
import sys

import pyfuse3
import trio

FILE_INODE = pyfuse3.ROOT_INODE + 1
SIZE = 1 << 20
DATA = (64 << 10, 128 << 10)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


class PlainFs(pyfuse3.Operations):
    """Root directory with one file, "f"; no fallocate, no lseek."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode, a.st_size = stat.S_IFDIR | 0o755, 0
        elif inode == FILE_INODE:
            a.st_mode, a.st_size = stat.S_IFREG | 0o644, SIZE
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return a

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE or name != b"f":
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.getattr(FILE_INODE)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        lo, hi = max(off, DATA[0]), min(off + size, DATA[1], SIZE)
        out = bytearray(max(0, min(size, SIZE - off)))
        if lo < hi:
            out[lo - off : hi - off] = b"\x5a" * (hi - lo)
        return bytes(out)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if name == b"user.pid":
            return str(os.getpid()).encode()
        if name != b"user.calls":
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return "\n".join(self.calls).encode()


class SparseFs(PlainFs):
    """PlainFs with fallocate and lseek."""

    async def fallocate(self, fh: int, mode: int, off: int, length: int) -> None:
        if mode not in (0, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        self.calls.append(f"{mode},{off},{length}")

    async def lseek(self, fh: int, off: int, whence: int) -> int:
        if off >= SIZE:
            raise pyfuse3.FUSEError(errno.ENXIO)
        inside = DATA[0] <= off < DATA[1]
        if whence == os.SEEK_DATA:
            if off >= DATA[1]:
                raise pyfuse3.FUSEError(errno.ENXIO)
            return max(off, DATA[0])
        return DATA[1] if inside else off


PR_SET_PDEATHSIG = 1


def main() -> None:
    mountpoint, kind = sys.argv[1], sys.argv[2]
    fs = SparseFs() if kind == "sparse" else PlainFs()
    pyfuse3.init(fs, mountpoint, {"fsname=tinyfs"})
    others = []
    if kind == "shared":
        pyfuse3.share_session()
        for _ in range(int(sys.argv[3]) - 1):
            pid = os.fork()
            if pid == 0:
                ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
                trio.run(pyfuse3.main)
                os._exit(0)
            others.append(pid)
        print(" ".join(map(str, others)), flush=True)
    try:
        trio.run(pyfuse3.main)
    finally:
        for pid in others:
            os.waitpid(pid, 0)
        pyfuse3.close()


if __name__ == "__main__":
    main()
