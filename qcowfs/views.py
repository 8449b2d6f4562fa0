"""The files a mount shows: what each one is, its size and rights, and where
its byte ranges go. The FUSE layer sees only this interface."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from .bitmaps import Bitmap, read_bitmap
from .errors import CorruptionError, ReadOnlyError
from .format import SnapshotEntry
from .image import Image
from .mapper import L1Table
from .snapshots import (snapshot_disk_size, snapshot_file_names, snapshot_problem, snapshot_xattrs,
                        usable_name)


class FileView:
    """One file of the mount: a byte range source, maybe writable."""

    writable: bool = False
    # True when nothing but this mount changes the file, so the kernel may
    # keep its page cache across opens.
    keep_cache: bool = True
    # True when every read and write must reach us: contents that change
    # under the kernel (live bitmaps), or a writable disk (see DiskView).
    direct_io: bool = False
    # True when the bytes can never change while mounted (read-only files):
    # then pushing them into the kernel's cache ahead of reads is safe.
    unchanging: bool = False
    mtime_ns: int = 0

    @property
    def size(self) -> int:
        raise NotImplementedError

    def xattrs(self) -> dict[str, bytes]:
        return {}

    @property
    def allocated(self) -> int:
        """Bytes the file occupies (st_blocks * 512): all of it by default."""
        return self.size

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        raise NotImplementedError

    def read_cached(self, offset: int, length: int) -> bytes | bytearray | None:
        """Serve a read without awaiting, when possible (None: use read())."""
        return None

    async def write(self, offset: int, data: bytes) -> int:
        raise ReadOnlyError("file is read-only")

    async def truncate(self, size: int) -> None:
        raise ReadOnlyError("file is read-only")

    async def fsync(self) -> None:
        pass

    async def zero(self, offset: int, length: int, unmap: bool) -> None:
        """Make a range read as zeros (fallocate PUNCH_HOLE: UNMAP, ZERO_RANGE)."""
        raise ReadOnlyError("file is read-only")

    async def allocate(self, offset: int, length: int, keep_size: bool) -> None:
        """fallocate mode 0 / KEEP_SIZE: grow to OFFSET+LENGTH unless KEEP_SIZE."""
        raise ReadOnlyError("file is read-only")

    async def seek(self, offset: int, data: bool) -> int:
        """The first data (DATA) or hole at or after OFFSET, SIZE if none
        (OFFSET < SIZE). By default the whole file is data."""
        return offset if data else self.size

    def clip(self, offset: int, length: int) -> int:
        """How many of LENGTH bytes at OFFSET lie inside the file."""
        return max(0, min(length, self.size - offset))


@dataclass
class DirNode:
    name: str
    children: dict[str, "DirNode | FileNode"] = field(default_factory=dict)
    mtime_ns: int = 0


@dataclass
class FileNode:
    name: str
    view: FileView


class DiskView(FileView):
    """disk.raw: the active virtual disk."""

    def __init__(self, image: Image, page_cache: bool = False) -> None:
        self.image = image
        self.writable = not image.read_only
        self.unchanging = image.read_only
        # Writable: no kernel page cache unless asked for (shared mmap needs
        # it). Buffered FUSE writes cost a second round trip each (the kernel
        # asks for security.capability before every write, as pyfuse3 cannot
        # negotiate HANDLE_KILLPRIV_V2) and a copy; direct writes come
        # straight to us (make bench: +50% random writes, faster through a
        # loop device too), and written bytes are never cached twice.
        self.direct_io = self.writable and not page_cache
        self.mtime_ns = os.stat(image.path).st_mtime_ns

    @property
    def size(self) -> int:
        return self.image.size

    @property
    def allocated(self) -> int:
        return min(self.size, self.image.host_usage())

    def read_cached(self, offset: int, length: int) -> bytes | bytearray | None:
        # clip() inlined: this runs once per FUSE read.
        image = self.image
        size = image.header.size & ~511
        n = length if offset + length <= size else size - offset
        try:
            return image.mapper.read_cached(image.active_l1, offset, n) if n > 0 else b""
        except CorruptionError:
            return None  # read() meets it again, and reports it

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        n = self.clip(offset, length)
        if n <= 0:
            return b""
        return await self.image.read(self.image.active_l1, offset, n)

    async def write(self, offset: int, data: bytes) -> int:
        if not self.writable:
            raise ReadOnlyError("the image is mounted read-only")
        return await self.image.write(offset, data)

    async def truncate(self, size: int) -> None:
        if not self.writable:
            raise ReadOnlyError("the image is mounted read-only")
        await self.image.resize(size)

    async def fsync(self) -> None:
        if self.writable:
            await self.image.flush()

    async def zero(self, offset: int, length: int, unmap: bool) -> None:
        if not self.writable:
            raise ReadOnlyError("the image is mounted read-only")
        await self.image.zero(offset, length, unmap)

    async def allocate(self, offset: int, length: int, keep_size: bool) -> None:
        """Inside the disk every cluster can already be written, so there is
        nothing to reserve: success, no change (QEMU's FUSE export answers
        EOPNOTSUPP instead); past the end the disk grows as truncate does."""
        if not self.writable:
            raise ReadOnlyError("the image is mounted read-only")
        if not keep_size and offset + length > self.size:
            await self.image.resize(offset + length)

    async def seek(self, offset: int, data: bool) -> int:
        return await self.image.find(self.image.active_l1, offset, self.size, data)


class SnapshotView(FileView):
    """snapshots/NAME.raw: a snapshot's disk through its own L1 table, read-only.

    Copy-on-write of the write path keeps it unchanged, so the kernel may cache it."""

    def __init__(self, image: Image, entry: SnapshotEntry) -> None:
        self.image = image
        self.entry = entry
        self._size = snapshot_disk_size(entry, image.size)
        self.l1 = L1Table(image.file, entry.l1_table_offset, entry.l1_size)
        self.problem = snapshot_problem(entry, image.header.version, image.geo.cluster_size,
                                        image.file.known_size)
        self.unchanging = True
        self.mtime_ns = entry.date_sec * 10**9 + entry.date_nsec

    @property
    def size(self) -> int:
        return self._size

    @property
    def allocated(self) -> int:
        return min(self._size, self.image.host_usage())

    def xattrs(self) -> dict[str, bytes]:
        return snapshot_xattrs(self.entry, self._size)

    def read_cached(self, offset: int, length: int) -> bytes | bytearray | None:
        n = self.clip(offset, length)
        return self.image.mapper.read_cached(self.l1, offset, n) if n > 0 else b""

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        n = self.clip(offset, length)
        if n <= 0:
            return b""
        if self.problem is not None and not self.problem[1]:
            raise CorruptionError(self.problem[0])
        return await self.image.read(self.l1, offset, n)

    async def seek(self, offset: int, data: bool) -> int:
        if self.problem is not None and not self.problem[1]:
            raise CorruptionError(self.problem[0])
        return await self.image.find(self.l1, offset, self._size, data)


class BitmapView(FileView):
    """bitmaps/NAME: the bitmap's bits; live (not cached by the kernel) while tracked."""

    def __init__(self, image: Image, bitmap: Bitmap) -> None:
        self.image = image
        self.bitmap = bitmap
        self.keep_cache = False
        self.direct_io = True
        self.mtime_ns = os.stat(image.path).st_mtime_ns

    @property
    def size(self) -> int:
        return self.bitmap.size

    def xattrs(self) -> dict[str, bytes]:
        return self.bitmap.xattrs()

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        return await read_bitmap(self.bitmap, self.image.file, offset, length)


def _bitmap_file_names(bitmaps: list[Bitmap]) -> list[str]:
    return [b.name if usable_name(b.name) else f"bitmap-{i}" for i, b in enumerate(bitmaps)]


def build_tree(image: Image, page_cache: bool = False) -> DirNode:
    """The directory tree of a mount of IMAGE."""
    mtime = os.stat(image.path).st_mtime_ns
    root = DirNode("", mtime_ns=mtime)
    root.children["disk.raw"] = FileNode("disk.raw", DiskView(image, page_cache))
    snaps = root.children["snapshots"] = DirNode("snapshots", mtime_ns=mtime)
    for name, entry in zip(snapshot_file_names(image.snapshots), image.snapshots):
        snaps.children[name] = FileNode(name, SnapshotView(image, entry))
    bitmaps = root.children["bitmaps"] = DirNode("bitmaps", mtime_ns=mtime)
    for name, bm in zip(_bitmap_file_names(image.bitmaps), image.bitmaps):
        bitmaps.children[name] = FileNode(name, BitmapView(image, bm))
    return root
