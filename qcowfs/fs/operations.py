"""pyfuse3 operations over a tree of DirNode/FileNode: files and byte ranges only.

Every error leaves here as one errno: a QcowError carries its own, anything
unexpected becomes EIO with one log line, and the daemon keeps serving.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass
from functools import wraps
from typing import Any, Awaitable, Callable, NoReturn, TypeVar

import pyfuse3
import trio

from ..aio import Span
from ..errors import QcowError
from ..host.hostfile import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE
from ..host.logs import logger
from .readaround import ReadAround
from .views import DirNode, FileNode, FileView

log = logger()
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
ATTR_TIMEOUT = 300.0
# Read-around: a small read that had to reach us (a random access) may make
# us push the aligned window around it into the kernel's page cache, as the
# kernel itself does for mmap faults (readaround.py decides when it pays).
# Only for files that cannot change.
READ_AROUND_TRIGGER = 16 << 10
XATTR_PREFIX = b"user.qcow2."
READ_AROUND_QUEUE = 32
# Bytes the queued pushes may hold, read before the reply (Span.held): 32
# clusters of 64 KiB; past it a push reads its span when its turn comes.
READ_AROUND_HELD = 2 << 20
_PUSH_THREADS = trio.CapacityLimiter(2)


# What a mount says once when pyfuse3 is the stock build (a plain `pip install`):
# it registers neither FUSE_FALLOCATE nor FUSE_LSEEK, so the kernel never asks us.
STOCK_PYFUSE3_WARNING = (
    "pyfuse3 is the stock build, without qcowfs's patch: discard (fstrim, blkdiscard), "
    "fallocate and SEEK_HOLE/SEEK_DATA do not reach mounts, and one process serves each "
    "mount (`make install` builds the patched pyfuse3; see docs/install.md)")


def pyfuse3_patched() -> bool:
    """The running pyfuse3 has patches/pyfuse3-fallocate-lseek.patch: its
    compiled handlers for both requests and share_session exist (what
    scripts/build-patched.sh --check looks at, the version label aside)."""
    return (hasattr(pyfuse3, "fuse_fallocate_async") and hasattr(pyfuse3, "fuse_lseek_async")
            and hasattr(pyfuse3, "share_session"))


@dataclass
class Access:
    """Ownership and mode bits the mount reports (uid=, gid=, umask=)."""

    uid: int
    gid: int
    umask: int = 0o022


def fuse_errors(func: F) -> F:
    """Map every exception of a handler to one errno at the FUSE boundary."""

    @wraps(func)
    async def wrapper(*args: Any, **kw: Any) -> Any:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s%r", func.__name__, args[1:])
        try:
            return await func(*args, **kw)
        except pyfuse3.FUSEError:
            raise
        except QcowError as e:
            log.error("%s: %s", func.__name__, e)
            raise pyfuse3.FUSEError(e.errno) from None
        except OSError as e:
            log.error("%s: %s", func.__name__, e)
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception as e:  # noqa: BLE001 - the daemon must keep serving
            log.error("%s: internal error: %s: %s", func.__name__, type(e).__name__, e)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


class Operations(pyfuse3.Operations):
    """A read-mostly filesystem of fixed files whose contents come from views."""

    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, root: DirNode, access: Access, debug: bool = False,
                 read_around: int = 0, space_of: str | None = None,
                 space: Callable[[], tuple[int, int]] | None = None) -> None:
        super().__init__()
        self.space_of = space_of  # statfs reports the space of the filesystem holding this
        self.space = space  # or (total, free) bytes from this (a scratch mount's overlay)
        self.around = ReadAround(read_around) if read_around else None
        self.pushing = 0  # read-around pushes inside the kernel right now
        self._held = 0  # bytes the queued pushes hold (READ_AROUND_HELD)
        # (inode, view, window start, the span of it to push, its bytes if read already)
        self._push_send, self._push_recv = trio.open_memory_channel[
            tuple[int, FileView, int, Span, bytes | bytearray | None]](READ_AROUND_QUEUE)
        self.ownership = access
        self.debug = debug
        self._nodes: dict[int, DirNode | FileNode] = {}
        self._parents: dict[int, int] = {}
        self._inodes: dict[int, int] = {}  # id(node) -> inode
        self._next_inode = self._add(root, pyfuse3.ROOT_INODE, pyfuse3.ROOT_INODE)
        self._read_only = not any(isinstance(n, FileNode) and n.view.writable
                                  for n in self._nodes.values())
        # fh -> (view, inode, the read-around policy if pushed pages could be used)
        self._open: dict[int, tuple[FileView, int, ReadAround | None]] = {}
        self._next_fh = 1
        # Other processes serve the same connection (share()): the tree is
        # fixed and a file handle says what was opened.
        self._shared = False
        self._unlisted: dict[int, int] = {}  # id(directory) -> errno of its listing at share()
        self.reads = 0  # read requests this process answered

    @fuse_errors
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        """access(2): the mode bits decide (the kernel checks them itself with
        default_permissions; without it only the mounting user gets here)."""
        node = self._node(inode)
        if mode & os.W_OK and isinstance(node, FileNode) and not node.view.writable:
            return False
        return True

    def _add(self, node: DirNode | FileNode, inode: int, parent: int) -> int:
        self._nodes[inode] = node
        self._parents[inode] = parent
        self._inodes[id(node)] = inode
        nxt = inode + 1
        if isinstance(node, DirNode):
            for child in node.children.values():
                nxt = self._add(child, nxt, inode)
        return nxt

    # ---- the tree changing under the mount (snapshots and bitmaps made or dropped) ----

    def is_open(self, node: FileNode) -> bool:
        """Some handle is open on NODE's file."""
        inode = self._inodes.get(id(node))
        return any(entry[1] == inode for entry in self._open.values())

    async def drop_cached(self, node: FileNode) -> None:
        """Forget every cached byte and attribute of NODE's file (its content
        changed under it: a snapshot was applied): the kernel's page cache
        and attributes, and what read-around remembers. In a thread, as
        pyfuse3 asks: the kernel may wait for requests this loop answers."""
        inode = self._inodes.get(id(node))
        if inode is None:
            return
        if self.around is not None:
            self.around.forget(inode)
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode)
        except OSError as e:  # (ENOENT: the kernel never looked it up)
            log.debug("invalidating inode %d: %s", inode, e)

    def set_children(self, directory: DirNode, children: dict[str, DirNode | FileNode]) -> None:
        """DIRECTORY's entries are now CHILDREN. Nodes that stay keep their
        inodes; new ones get numbers never used before (the kernel may still
        know the old ones); names that went away, or now name another file,
        are dropped from the kernel's cache."""
        parent = self._inodes[id(directory)]
        gone = [name for name, node in directory.children.items() if children.get(name) is not node]
        for name in gone:
            self._forget(directory.children[name])
        for node in children.values():
            if id(node) not in self._inodes:
                self._next_inode = self._add(node, self._next_inode, parent)
        directory.children = children
        for name in gone:
            pyfuse3.invalidate_entry_async(parent, os.fsencode(name), ignore_enoent=True)

    async def share(self) -> None:
        """Get ready for other processes to serve the same FUSE connection
        (service/workers.py), forked after this. The tree becomes fixed: every
        directory that follows a changing source (the partition directories)
        is listed now, once, so that every process numbers every file alike.
        A file handle says what was opened (inode, O_DIRECT) instead of being
        an entry of one process's table, so that any process can serve any
        handle. Only for trees that cannot change (a read-only mount). A
        directory whose listing fails (a damaged table under a partition
        table) answers that error from then on, in every process."""
        assert self._read_only

        async def fill(node: DirNode) -> None:
            try:
                await self._refresh(node)
            except (QcowError, OSError) as e:
                log.warning("%s: cannot list it: %s", node.name, e)
                self._unlisted[id(node)] = e.errno or errno.EIO
                return
            for child in list(node.children.values()):
                if isinstance(child, DirNode):
                    await fill(child)

        root = self._nodes[pyfuse3.ROOT_INODE]
        assert isinstance(root, DirNode)
        await fill(root)
        self._shared = True

    def _forget(self, node: DirNode | FileNode) -> None:
        inode = self._inodes.pop(id(node))
        self._nodes.pop(inode, None)
        self._parents.pop(inode, None)
        if self.around is not None:
            self.around.forget(inode)
        if isinstance(node, DirNode):
            for child in node.children.values():
                self._forget(child)

    def _node(self, inode: int) -> DirNode | FileNode:
        node = self._nodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_uid, a.st_gid = self.ownership.uid, self.ownership.gid
        a.entry_timeout = a.attr_timeout = ATTR_TIMEOUT
        a.st_blksize = 4096
        if isinstance(node, DirNode):
            a.st_mode = stat.S_IFDIR | (0o777 & ~self.ownership.umask & 0o755)
            a.st_nlink = 2 + sum(isinstance(c, DirNode) for c in node.children.values())
            a.st_size = 0
            mtime = node.mtime_ns
        else:
            view = node.view
            perm = 0o666 if view.writable else 0o444
            a.st_mode = stat.S_IFREG | (perm & ~self.ownership.umask)
            a.st_nlink = 1
            a.st_size = view.size
            a.st_blocks = (view.allocated + 511) // 512
            mtime = view.mtime_ns
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = mtime
        return a

    # ---- lookup and attributes -----------------------------------------------

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(parent_inode)
        if not isinstance(node, DirNode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == b".":
            return self._attr(parent_inode)
        if name == b"..":
            return self._attr(self._parents[parent_inode])
        await self._refresh(node)
        child = node.children.get(os.fsdecode(name))
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(self._inodes[id(child)])

    @fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    @fuse_errors
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        if (fields.update_mtime or fields.update_atime) and not (
                isinstance(node, FileNode) and node.view.writable):
            self._no_changes()
        if fields.update_size:
            if not isinstance(node, FileNode):
                raise pyfuse3.FUSEError(errno.EISDIR)
            if attr.st_size != node.view.size:
                await node.view.truncate(attr.st_size)
        return self._attr(inode)

    def _no_changes(self) -> NoReturn:
        """The tree is fixed and read-only files stay so: EROFS on a read-only
        mount, EACCES otherwise."""
        raise pyfuse3.FUSEError(errno.EROFS if self._read_only else errno.EACCES)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> Any:
        self._no_changes()

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> Any:
        self._no_changes()

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> Any:
        self._no_changes()

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._no_changes()

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._no_changes()

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        self._no_changes()

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> Any:
        self._no_changes()

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> Any:
        self._no_changes()

    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        """df on the mount: the size and free space of the host filesystem that
        holds the image, which is the room the image can still grow into
        (without an image path: the files' total size, nothing free)."""
        s = pyfuse3.StatvfsData()
        s.f_files = len(self._nodes)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        if self.space is not None:
            total, free = self.space()
            s.f_bsize = s.f_frsize = 4096
            s.f_blocks, s.f_bfree = total // 4096, free // 4096
            s.f_bavail = s.f_bfree
            return s
        if self.space_of is not None:
            host = await trio.to_thread.run_sync(os.statvfs, self.space_of)
            s.f_bsize, s.f_frsize = host.f_bsize, host.f_frsize
            s.f_blocks, s.f_bfree, s.f_bavail = host.f_blocks, host.f_bfree, host.f_bavail
            return s
        total = sum(n.view.size for n in self._nodes.values() if isinstance(n, FileNode))
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = total // 4096
        s.f_bfree = s.f_bavail = 0
        return s

    # ---- directories ---------------------------------------------------------

    @fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._node(inode)
        if not isinstance(node, DirNode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        await self._refresh(node)
        return inode

    async def _refresh(self, node: DirNode) -> None:
        """A directory whose entries follow a changing source gets them afresh
        (not in a fixed tree: see share())."""
        if self._shared:
            if id(node) in self._unlisted:
                raise pyfuse3.FUSEError(self._unlisted[id(node)])
        elif node.refresh is not None:
            self.set_children(node, await node.refresh(node.children))

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        node = self._node(fh)
        assert isinstance(node, DirNode)
        children = list(node.children.values())
        for i in range(start_id, len(children)):
            child = children[i]
            if not pyfuse3.readdir_reply(token, os.fsencode(child.name),
                                         self._attr(self._inodes[id(child)]), i + 1):
                return

    async def releasedir(self, fh: int) -> None:
        return None

    # ---- extended attributes -------------------------------------------------

    def _xattrs(self, inode: int) -> dict[str, bytes]:
        node = self._node(inode)
        return node.view.xattrs() if isinstance(node, FileNode) else {}

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        # The kernel asks for security.capability before every write: answer
        # that without any work (our attributes are all user.qcow2.*).
        if not name.startswith(XATTR_PREFIX):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return await self._getxattr(inode, name)

    @fuse_errors
    async def _getxattr(self, inode: int, name: bytes) -> bytes:
        value = self._xattrs(inode).get(os.fsdecode(name))
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [os.fsencode(k) for k in self._xattrs(inode)]

    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EPERM)

    # ---- files ---------------------------------------------------------------

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if not isinstance(node, FileNode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & (os.O_WRONLY | os.O_RDWR) and not node.view.writable:
            self._no_changes()
        direct = bool(flags & os.O_DIRECT)
        if self._shared:
            fh = inode << 1 | direct
        else:
            fh = self._next_fh
            self._next_fh += 1
        entry = self._open[fh] = await self._handle(node, inode, direct)
        view = entry[0]
        return pyfuse3.FileInfo(fh=fh, keep_cache=view.keep_cache, direct_io=view.direct_io)

    async def _handle(self, node: FileNode, inode: int, direct: bool) -> tuple[FileView, int, ReadAround | None]:
        """What a handle of NODE's file reads: its view (a map's contents are
        made now), its inode, and the read-around policy if read-around can
        pay for it (None: never)."""
        view = await node.view.open()
        # O_DIRECT: the kernel keeps nothing of this handle's reads, so pages
        # pushed around them would be wasted work (and evict others).
        return view, inode, self.around if view.unchanging and not direct else None

    async def _entry(self, fh: int) -> tuple[FileView, int, ReadAround | None]:
        """The open handle FH. With other processes serving the connection it
        may have been opened (or released) by another: then it is opened here
        again, from what it says (the tree and the image cannot change, so
        this open reads the same bytes)."""
        entry = self._open.get(fh)
        if entry is None:
            node = self._nodes.get(fh >> 1)
            if not self._shared or not isinstance(node, FileNode):
                raise pyfuse3.FUSEError(errno.EBADF)
            entry = self._open[fh] = await self._handle(node, fh >> 1, bool(fh & 1))
        return entry

    async def _view(self, fh: int) -> FileView:
        return (await self._entry(fh))[0]

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray:  # type: ignore[override]
        self.reads += 1
        entry = self._open.get(fh)
        if entry is None:
            entry = await self._entry(fh)
        view = entry[0]
        data = view.read_cached(off, size)
        if data is None:
            data = await view.read(off, size)
        around = entry[2]
        if around is not None and size <= READ_AROUND_TRIGGER and not self.reads % around.ask_every:
            self._read_around(around, entry[1], view, off)
        return data

    def _read_around(self, around: ReadAround, inode: int, view: FileView, off: int) -> None:
        """Maybe push the window around a small read at OFF: the part of it
        that is cheap to read (the view says), when the policy AROUND says it pays."""
        start = around.miss(inode, off, view.size)  # (first: cheaper than the view's mapping)
        if start is None:
            return
        span = view.around(off, start, start + around.window)
        if span is None:
            around.cancel(inode, start)
            return
        # A decompressed cluster is copied now, while it is kept: other reads'
        # inflates before the push could evict it (inflating it again cost
        # random reads of a zlib image with 4 jobs 30%, with a 1 MiB cache).
        data = None
        if span.held and self._held + span.hi - span.lo <= READ_AROUND_HELD:
            data = view.read_cached(span.lo, span.hi - span.lo)
        try:
            self._push_send.send_nowait((inode, view, start, span, data))
        except trio.WouldBlock:  # busy: this window can be pushed another time
            around.cancel(inode, start)
        else:
            self._held += len(data or b"")

    def _push(self, inode: int, start: int, data: bytes | bytearray) -> None:
        self.pushing += 1  # (the GIL makes these updates atomic)
        try:
            # (the stub says bytes; it takes any buffer, as PyObject_GetBuffer does)
            pyfuse3.notify_store(inode, start, data)  # type: ignore[arg-type]
        finally:
            self.pushing -= 1

    async def push_worker(self) -> None:
        """Push read-around windows into the kernel's page cache. notify_store
        waits for page locks that in-flight reads hold until we reply to them,
        so it runs in a thread, never on the loop."""
        assert self.around is not None
        async for inode, view, start, (lo, hi, _), data in self._push_recv:
            self._held -= len(data or b"")
            try:
                if data is None:
                    data = view.read_cached(lo, hi - lo)
                if data is None:
                    data = await view.read(lo, hi - lo)
                if data:  # (a buffer of its own: pushed as it is, no copy)
                    await trio.to_thread.run_sync(self._push, inode, lo, data,
                                                  limiter=_PUSH_THREADS, abandon_on_cancel=True)
            except Exception as e:  # noqa: BLE001 - a push is only an optimisation
                log.debug("read-around at %d failed: %s", start, e)
            finally:
                self.around.done(inode, start)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        view = await self._view(fh)
        n = view.clip(off, len(buf))
        if n <= 0:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        return await view.write(off, buf[:n] if n < len(buf) else buf)

    @fuse_errors
    async def fallocate(self, fh: int, mode: int, off: int, length: int) -> None:
        """fallocate(2) (a loop device's discard and write-zeroes arrive so):
        PUNCH_HOLE|KEEP_SIZE and ZERO_RANGE make the range read as zeros,
        mode 0 allocates; ZERO_RANGE and mode 0 past the end grow the file
        unless KEEP_SIZE. Nothing else is supported."""
        view = await self._view(fh)
        keep = bool(mode & FALLOC_FL_KEEP_SIZE)
        what = mode & ~FALLOC_FL_KEEP_SIZE
        if what == FALLOC_FL_PUNCH_HOLE and keep:
            await view.zero(off, length, unmap=True)
        elif what == FALLOC_FL_ZERO_RANGE:
            await view.allocate(off, length, keep)
            await view.zero(off, length, unmap=False)
        elif what == 0:
            await view.allocate(off, length, keep)
        else:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)

    @fuse_errors
    async def lseek(self, fh: int, off: int, whence: int) -> int:
        """SEEK_DATA / SEEK_HOLE, from the view (the kernel does the rest)."""
        view = await self._view(fh)
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise pyfuse3.FUSEError(errno.EINVAL)
        size = view.size
        if off >= size:
            raise pyfuse3.FUSEError(errno.ENXIO)
        found = min(await view.seek(off, whence == os.SEEK_DATA), size)
        if found >= size and whence == os.SEEK_DATA:
            raise pyfuse3.FUSEError(errno.ENXIO)
        return found

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        await (await self._view(fh)).fsync()

    @fuse_errors
    async def flush(self, fh: int) -> None:
        return None

    async def release(self, fh: int) -> None:
        self._open.pop(fh, None)

