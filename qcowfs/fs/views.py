"""The files a mount shows: what each one is, its size and rights, and where
its byte ranges go. The FUSE layer sees only this interface.

The mount is a client of the public API: disk.raw and snapshots/NAME.raw are
`qcowfs.aio.Disk` objects, bitmaps and maps come from `qcowfs.aio.Image`.
"""
from __future__ import annotations

import datetime as dt
import functools
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from ..aio import Disk, Image, Span
from ..engine.extents import map_text
from ..engine.snapshots import usable_name
from ..errors import ReadOnlyError
from ..records import Bitmap, Snapshot


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

    def around(self, offset: int, lo: int, hi: int) -> Span | None:
        """The part of [LO, HI) around OFFSET worth pushing into the page
        cache after a small read at OFFSET (None: nothing). Views of a qcow2
        disk say which part is cheap to read; by default all of it."""
        return Span(lo, hi, False)

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
    """A directory of the mount's tree."""

    name: str
    children: dict[str, "DirNode | FileNode"] = field(default_factory=dict)
    mtime_ns: int = 0
    # Children that follow something changing (partition tables): the FUSE
    # layer asks for them afresh (given the current ones) when the
    # directory is listed or looked up in.
    refresh: Callable[[dict[str, "DirNode | FileNode"]], Awaitable[dict[str, "DirNode | FileNode"]]] | None = None


@dataclass
class FileNode:
    """A file of the mount's tree: a name and the view that serves its bytes."""

    name: str
    view: FileView


class DiskFileView(FileView):
    """A file whose bytes are a virtual disk (qcowfs.aio.Disk): reads, data and holes."""

    disk: Disk

    @property
    def size(self) -> int:
        return self.disk.size

    @property
    def allocated(self) -> int:
        return self.disk.allocated

    def around(self, offset: int, lo: int, hi: int) -> Span | None:
        return self.disk.cheap_span(offset, lo, hi)

    def read_cached(self, offset: int, length: int) -> bytes | bytearray | None:
        return self.disk.read_nowait(offset, length)

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        return await self.disk.read(offset, length)

    async def seek(self, offset: int, data: bool) -> int:
        return await self.disk.find(offset, data)


class DiskView(DiskFileView):
    """disk.raw: the active virtual disk."""

    def __init__(self, image: Image, page_cache: bool = False) -> None:
        self.disk: Disk = image.disk
        self.writable = self.disk.writable
        self.unchanging = not self.writable
        # Writable: no kernel page cache unless asked for (shared mmap needs
        # it). Buffered FUSE writes cost a second round trip each (the kernel
        # asks for security.capability before every write, as pyfuse3 cannot
        # negotiate HANDLE_KILLPRIV_V2) and a copy; direct writes come
        # straight to us (make bench: +50% random writes, faster through a
        # loop device too), and written bytes are never cached twice.
        self.direct_io = self.writable and not page_cache
        self.mtime_ns = os.stat(image.path).st_mtime_ns
        _uncached_if_shared(self, image)

    # Changes go to the Disk, whose one guard refuses them on a read-only
    # image (ReadOnlyError: EROFS).
    async def write(self, offset: int, data: bytes) -> int:
        return await self.disk.write(offset, data)

    async def truncate(self, size: int) -> None:
        await self.disk.truncate(size)

    async def fsync(self) -> None:
        await self.disk.flush()

    async def zero(self, offset: int, length: int, unmap: bool) -> None:
        await self.disk.zero(offset, length, unmap)

    async def allocate(self, offset: int, length: int, keep_size: bool) -> None:
        """Inside the disk every cluster can already be written, so there is
        nothing to reserve: success, no change (QEMU's FUSE export answers
        EOPNOTSUPP instead); past the end the disk grows as truncate does."""
        grown = offset + length if not keep_size else 0
        await self.disk.truncate(max(self.size, grown))  # (the guard: EROFS on a read-only image)



class SnapshotView(DiskFileView):
    """snapshots/NAME.raw: a snapshot's disk through its own L1 table, read-only.

    Copy-on-write of the write path keeps it unchanged, so the kernel may cache it."""

    def __init__(self, image: Image, disk: Disk) -> None:
        self.disk = disk
        snapshot = disk.snapshot
        assert snapshot is not None
        self.snapshot: Snapshot = snapshot
        self.unchanging = True
        self.mtime_ns = snapshot.date_sec * 10**9 + snapshot.date_nsec
        _uncached_if_shared(self, image)

    def xattrs(self) -> dict[str, bytes]:
        return snapshot_xattrs(self.snapshot, self.size)


def snapshot_xattrs(snapshot: Snapshot, disk_size: int) -> dict[str, bytes]:
    """user.qcow2.* of a snapshot's file."""
    date = dt.datetime.fromtimestamp(snapshot.date_sec + snapshot.date_nsec / 1e9, dt.timezone.utc)
    return {
        "user.qcow2.id": snapshot.id.encode(),
        "user.qcow2.name": snapshot.name.encode(),
        "user.qcow2.date": date.isoformat().encode(),
        "user.qcow2.vm_clock_ns": str(snapshot.vm_clock_sec * 10**9 + snapshot.vm_clock_nsec).encode(),
        "user.qcow2.vm_state_size": str(snapshot.vm_state_size).encode(),
        "user.qcow2.disk_size": str(disk_size).encode(),
    }


# The longest name a Linux filesystem passes (NAME_MAX, bytes); a longer one
# is listed but cannot be opened (ENAMETOOLONG). The longest suffix a view
# puts after a snapshot's or bitmap's name: maps/*/NAME.json.
NAME_MAX = 255
LONGEST_SUFFIX = len(".json")


def _file_names(names: list[str], fallbacks: list[str], suffix: str) -> list[str]:
    """NAME+SUFFIX for each name that is unique and can be a file's name
    (here and with LONGEST_SUFFIX: within NAME_MAX bytes), else its FALLBACK
    (also when NAME+SUFFIX would take another one's fallback)."""
    counts = Counter(names)
    taken = set(fallbacks)
    return [n + suffix if counts[n] == 1 and usable_name(n) and len(n.encode()) + LONGEST_SUFFIX <= NAME_MAX
            and (n + suffix not in taken or n + suffix == f) else f
            for n, f in zip(names, fallbacks)]


def snapshot_file_names(snapshots: list[Snapshot]) -> list[str]:
    """NAME.raw, else id-ID.raw (see _file_names)."""
    return _file_names([s.name for s in snapshots], [f"id-{s.id}.raw" for s in snapshots], ".raw")


def _uncached_if_shared(view: FileView, image: Image) -> None:
    """A force-shared image changes under us: its files get no kernel page
    cache (every read reaches us) and no read-around."""
    if image.force_share:
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
        """Bytes in the bitmap file: ceil(ceil(virtual_size / g) / 8)."""
        return -(-(-(-self.image.virtual_size // self.bitmap.granularity)) // 8)

    def xattrs(self) -> dict[str, bytes]:
        return {"user.qcow2.granularity": str(self.bitmap.granularity).encode(),
                "user.qcow2.flags": ",".join(self.bitmap.flags).encode(),
                "user.qcow2.type": b"dirty-tracking"}

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        return await self.image.bitmap_bits(self.bitmap.name, offset, length)


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
    return map_text(entries).encode()


def _bitmap_file_names(bitmaps: list[Bitmap]) -> list[str]:
    """NAME, else bitmap-INDEX (see _file_names)."""
    return _file_names([b.name for b in bitmaps], [f"bitmap-{i}" for i in range(len(bitmaps))], "")


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
    maps.children["disk.json"] = FileNode("disk.json", MapView(image, image.map))
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


def _snapshot_key(snapshot: Snapshot) -> object:
    return (snapshot.id, snapshot.name, snapshot.date_sec, snapshot.date_nsec)


def _snapshots(image: Image) -> list[tuple[str, Disk, Snapshot]]:
    """(file name, disk, record) of every snapshot."""
    disks = image.snapshot_disks()
    records = [d.snapshot for d in disks]
    return [(name, d, s) for name, d, s in zip(snapshot_file_names(records), disks, records)]  # type: ignore


def snapshot_nodes(image: Image, old: Nodes) -> Nodes:
    """The files of snapshots/ for the image's snapshot list now."""
    return _files(old, [(name, _snapshot_key(s), functools.partial(SnapshotView, image, d))
                        for name, d, s in _snapshots(image)])


def bitmap_nodes(image: Image, old: Nodes) -> Nodes:
    """The files of bitmaps/ for the image's bitmaps now."""
    return _files(old, [(name, bm, functools.partial(BitmapView, image, bm))
                        for name, bm in zip(_bitmap_file_names(image.bitmaps), image.bitmaps)])


def snapshot_map_nodes(image: Image, old: Nodes) -> Nodes:
    """maps/snapshots/NAME.json for each snapshots/NAME.raw."""
    return _files(old, [(name[: -len(".raw")] + ".json", _snapshot_key(s),
                         functools.partial(MapView, image, functools.partial(image.map, d)))
                        for name, d, s in _snapshots(image)])


def bitmap_map_nodes(image: Image, old: Nodes) -> Nodes:
    """maps/bitmaps/NAME.json: the dirty extents of each bitmaps/NAME."""
    return _files(old, [(name + ".json", bm,
                         functools.partial(MapView, image, functools.partial(image.dirty_extents, bm.name)))
                        for name, bm in zip(_bitmap_file_names(image.bitmaps), image.bitmaps)])
