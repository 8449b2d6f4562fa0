"""The files a mount shows: what each one is, its size and rights, and where
its byte ranges go. The FUSE layer sees only this interface."""
from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from ..engine import extents
from ..engine.bitmaps import Bitmap, read_bitmap
from ..errors import CorruptionError, ReadOnlyError
from ..format import SnapshotEntry
from ..engine.image import Image
from ..engine.mapper import L1Table
from ..engine.snapshots import (snapshot_disk_size, snapshot_file_names, snapshot_problem, snapshot_xattrs,
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
    # What the file is of (a snapshot, a bitmap): a directory rebuilt after a
    # change keeps the node of a file whose name and key stay.
    key: object = None

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

    def around(self, offset: int, lo: int, hi: int) -> tuple[int, int] | None:
        """The part of [LO, HI) around OFFSET worth pushing into the page
        cache after a small read at OFFSET (None: nothing). Views of a qcow2
        disk say which part is cheap to read; by default all of it."""
        return lo, hi

    async def write(self, offset: int, data: bytes) -> int:
        raise ReadOnlyError("file is read-only")

    async def truncate(self, size: int) -> None:
        raise ReadOnlyError("file is read-only")

    async def fsync(self) -> None:
        pass

    async def open(self) -> "FileView":
        """The view one open file handle reads (most files: this one)."""
        return self

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
    # Children that follow something changing (partition tables): the FUSE
    # layer asks for them afresh (given the current ones) when the
    # directory is listed or looked up in.
    refresh: Callable[[dict[str, "DirNode | FileNode"]], Awaitable[dict[str, "DirNode | FileNode"]]] | None = None


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
        _uncached_if_shared(self, image)

    @property
    def size(self) -> int:
        return self.image.size

    @property
    def allocated(self) -> int:
        return min(self.size, self.image.host_usage())

    def around(self, offset: int, lo: int, hi: int) -> tuple[int, int] | None:
        return self.image.mapper.data_span(self.image.active_l1, offset, lo, min(hi, self.size))

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
        self._epoch = image.tables_epoch
        _uncached_if_shared(self, image)

    @property
    def size(self) -> int:
        return self._size

    @property
    def allocated(self) -> int:
        return min(self._size, self.image.host_usage())

    def xattrs(self) -> dict[str, bytes]:
        return snapshot_xattrs(self.entry, self._size)

    def _fresh_l1(self) -> None:
        """Drop this snapshot's L1 entries when the image dropped its tables
        (force_share: see Image.revalidate)."""
        if self._epoch != self.image.tables_epoch:
            self._epoch = self.image.tables_epoch
            self.l1.forget()

    def around(self, offset: int, lo: int, hi: int) -> tuple[int, int] | None:
        self._fresh_l1()
        return self.image.mapper.data_span(self.l1, offset, lo, min(hi, self._size))

    def read_cached(self, offset: int, length: int) -> bytes | bytearray | None:
        self._fresh_l1()
        n = self.clip(offset, length)
        return self.image.mapper.read_cached(self.l1, offset, n) if n > 0 else b""

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        self._fresh_l1()
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


def _uncached_if_shared(view: FileView, image: Image) -> None:
    """A force-shared image changes under us: its files get no kernel page
    cache (every read reaches us) and no read-around."""
    if image.options.force_share:
        view.keep_cache, view.direct_io, view.unchanging = False, True, False


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


class Contents(FileView):
    """Bytes fixed when the file was opened (one open's copy of a map)."""

    keep_cache = False
    direct_io = True

    def __init__(self, data: bytes, mtime_ns: int) -> None:
        self.data = data
        self.mtime_ns = mtime_ns

    @property
    def size(self) -> int:
        return len(self.data)

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        return self.data[offset : offset + length]


class MapView(FileView):
    """maps/...json: an extent map made when the file is opened, so that it
    says how the disk or bitmap is at that instant. Its size is unknown until
    then (0 in stat); reads go straight to us (direct I/O), to the end."""

    keep_cache = False
    direct_io = True

    def __init__(self, image: Image, make: Callable[[], Awaitable[list[dict[str, Any]]]]) -> None:
        self.image = image
        self.make = make
        self.mtime_ns = os.stat(image.path).st_mtime_ns

    @property
    def size(self) -> int:
        return 0

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        return b""

    async def open(self) -> FileView:
        return Contents(map_json(await self.make()), time.time_ns())


def map_json(entries: list[dict[str, Any]]) -> bytes:
    """A JSON array with one extent per line, as qemu-img map and nbdinfo print it."""
    return ("[" + ",\n".join(json.dumps(e) for e in entries) + "]\n").encode()


def _bitmap_file_names(bitmaps: list[Bitmap]) -> list[str]:
    return [b.name if usable_name(b.name) else f"bitmap-{i}" for i, b in enumerate(bitmaps)]


def build_tree(image: Image, page_cache: bool = False) -> DirNode:
    """The directory tree of a mount of IMAGE."""
    mtime = os.stat(image.path).st_mtime_ns
    root = DirNode("", mtime_ns=mtime)
    root.children["disk.raw"] = FileNode("disk.raw", DiskView(image, page_cache))
    snaps = root.children["snapshots"] = DirNode("snapshots", mtime_ns=mtime)
    snaps.children = snapshot_nodes(image, {})
    bitmaps = root.children["bitmaps"] = DirNode("bitmaps", mtime_ns=mtime)
    bitmaps.children = bitmap_nodes(image, {})
    maps = root.children["maps"] = DirNode("maps", mtime_ns=mtime)
    maps.children["disk.json"] = FileNode("disk.json", MapView(image, lambda: extents.disk_map(image)))
    maps.children["snapshots"] = DirNode("snapshots", snapshot_map_nodes(image, {}), mtime)
    maps.children["bitmaps"] = DirNode("bitmaps", bitmap_map_nodes(image, {}), mtime)
    return root


Nodes = dict[str, "DirNode | FileNode"]


def _files(old: Nodes, wanted: list[tuple[str, object, Callable[[], FileView]]]) -> Nodes:
    """A directory's files as WANTED lists them (name, what the file is of,
    how to make its view). A file that keeps its name and what it is of
    keeps its node (open files, the inode the kernel caches)."""
    kept = {k: n for k, n in old.items() if isinstance(n, FileNode)}
    out: Nodes = {}
    for name, key, make in wanted:
        node = kept.get(name)
        out[name] = node if isinstance(node, FileNode) and node.view.key == key else FileNode(name, _keyed(make(), key))
    return out


def _keyed(view: FileView, key: object) -> FileView:
    view.key = key
    return view


def _snapshot_key(entry: SnapshotEntry) -> object:
    return (entry.id_str, entry.l1_table_offset)


def snapshot_nodes(image: Image, old: Nodes) -> Nodes:
    """The files of snapshots/ for the image's snapshot list now."""
    return _files(old, [(name, _snapshot_key(e), functools.partial(SnapshotView, image, e))
                        for name, e in zip(snapshot_file_names(image.snapshots), image.snapshots)])


def bitmap_nodes(image: Image, old: Nodes) -> Nodes:
    """The files of bitmaps/ for the image's bitmaps now."""
    return _files(old, [(name, id(bm), functools.partial(BitmapView, image, bm))
                        for name, bm in zip(_bitmap_file_names(image.bitmaps), image.bitmaps)])


def snapshot_map_nodes(image: Image, old: Nodes) -> Nodes:
    """maps/snapshots/NAME.json for each snapshots/NAME.raw."""
    return _files(old, [(name[: -len(".raw")] + ".json", _snapshot_key(e),
                         functools.partial(MapView, image, functools.partial(extents.disk_map, image, e)))
                        for name, e in zip(snapshot_file_names(image.snapshots), image.snapshots)])


def bitmap_map_nodes(image: Image, old: Nodes) -> Nodes:
    """maps/bitmaps/NAME.json: the dirty extents of each bitmaps/NAME."""
    return _files(old, [(name + ".json", id(bm),
                         functools.partial(MapView, image, functools.partial(extents.dirty_map, image.file, bm)))
                        for name, bm in zip(_bitmap_file_names(image.bitmaps), image.bitmaps)])
