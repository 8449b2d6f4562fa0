#!/usr/bin/env python3
"""Bare pyfuse3 passthrough: the ceiling for a Python FUSE filesystem.

    passthrough.py RAWFILE MOUNTPOINT [--name disk.raw] [--writable] [--workers N]

Exposes RAWFILE as MOUNTPOINT/NAME. Every read is one os.pread on the
raw file, straight on the trio loop (no thread), and `open` returns
keep_cache=True, so this measures what pyfuse3 + libfuse + the kernel
cost with nothing else in the way. Runs in the foreground until
unmounted (fusermount3 -u MOUNTPOINT) or SIGTERM/SIGINT.

--workers N (read-only, needs our pyfuse3 patch): N processes serve the
mount, forked after `share_session()` as a read-only qcowfs mount forks its
workers (qcowfs/service/workers.py): the ceiling of a Python FUSE
filesystem served by N processes.
"""

import argparse
import errno
import os
import signal
import stat
import sys

import pyfuse3
import trio

FILE_INODE = pyfuse3.ROOT_INODE + 1


class Passthrough(pyfuse3.Operations):
    def __init__(self, path, name, writable):
        super().__init__()
        self.writable = writable
        self.fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size
        self.name = name.encode()

    def _attr(self, inode):
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.attr_timeout = 300
        a.entry_timeout = 300
        a.st_uid = os.getuid()
        a.st_gid = os.getgid()
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
            a.st_size = 0
        else:
            a.st_mode = stat.S_IFREG | (0o644 if self.writable else 0o444)
            a.st_nlink = 1
            a.st_size = self.size
            a.st_blksize = 4096
            a.st_blocks = (self.size + 511) // 512
        return a

    async def getattr(self, inode, ctx=None):
        if inode not in (pyfuse3.ROOT_INODE, FILE_INODE):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode == pyfuse3.ROOT_INODE and name == self.name:
            return self._attr(FILE_INODE)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, self.name, self._attr(FILE_INODE), 1)

    async def open(self, inode, flags, ctx):
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if not self.writable and (flags & os.O_ACCMODE) != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh, off, size):
        return os.pread(self.fd, size, off)

    async def write(self, fh, off, buf):
        if not self.writable:
            raise pyfuse3.FUSEError(errno.EROFS)
        if off + len(buf) > self.size:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        return os.pwrite(self.fd, buf, off)

    async def fsync(self, fh, datasync):
        if self.writable:
            os.fdatasync(self.fd)

    async def flush(self, fh):
        pass

    async def release(self, fh):
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("raw")
    ap.add_argument("mountpoint")
    ap.add_argument("--name", default="disk.raw")
    ap.add_argument("--writable", action="store_true")
    ap.add_argument("--max-tasks", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    if args.workers > 1 and args.writable:
        ap.error("--workers is for read-only mounts")

    ops = Passthrough(args.raw, args.name, args.writable)
    opts = set(pyfuse3.default_options)
    opts.add("fsname=bench-passthrough")
    if not args.writable:
        opts.add("ro")
    pyfuse3.init(ops, args.mountpoint, opts)

    def stop(signum, frame):
        pyfuse3.terminate()

    children = []
    if args.workers > 1:
        pyfuse3.share_session()
        for _ in range(args.workers - 1):
            pid = os.fork()
            if pid == 0:  # a worker: serve until the connection ends (the unmount)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                try:
                    trio.run(pyfuse3.main, 1, args.max_tasks)
                finally:
                    os._exit(0)
            children.append(pid)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        trio.run(pyfuse3.main, 1, args.max_tasks)
    finally:
        pyfuse3.close(unmount=True)
        os.close(ops.fd)
        for pid in children:
            os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
