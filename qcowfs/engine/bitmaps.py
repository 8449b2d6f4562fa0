"""Persistent dirty bitmaps: directory, tables, live tracking, store at close.

Bitmap data is cluster_size * 8 bits per data cluster, bit k of byte n
covering guest bytes [(8n+k)g, (8n+k+1)g). A bitmap we track while the
disk is written is held in memory whole (it is as large as its file), with
in_use set in the image until a clean close stores it.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import CorruptionError, InvalidImageError, NotFoundError, RequestError
from ..format import (BME_TABLE_RESERVED_MASK, AUTOCLEAR_BITMAPS, BITMAP_FLAG_NAMES, BME_AUTO, BME_EXTRA_DATA_COMPATIBLE,
                     BME_IN_USE, BME_MAX_GRANULARITY_BITS, BME_MIN_GRANULARITY_BITS,
                     BME_RESERVED_FLAGS, BME_TABLE_ALL_ONES, BME_TABLE_OFFSET_MASK,
                     BME_TYPE_DIRTY_TRACKING, EXT_BITMAPS, BitmapDirEntry, BitmapsExtension,
                     Header)
from ..host.hostfile import HostFile
from .overlap import Kind

if TYPE_CHECKING:
    from .metadata import Metadata
    from .refcount import Allocator

MAX_DIRECTORY_BYTES = 64 << 20


@dataclass
class Bitmap:
    """A persistent bitmap of an open image: its directory entry, its table,
    and (while tracked) its bits in memory."""

    entry: BitmapDirEntry
    virtual_size: int
    cluster_size: int
    table: list[int] = field(default_factory=list)
    # Why the bitmap cannot be used (None: consistent).
    problem: str | None = None
    # The whole bitmap in memory while it is tracked (read-write mounts).
    bits: bytearray | None = None
    # Its directory entry breaks a constraint QEMU checks at open (QEMU then
    # refuses the image: "doesn't satisfy the constraints"); in use is not that.
    damaged: bool = False

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def granularity(self) -> int:
        return self.entry.granularity

    @property
    def flag_names(self) -> list[str]:
        return self.entry.flag_names

    @property
    def nbits(self) -> int:
        return -(-self.virtual_size // self.granularity)

    @property
    def size(self) -> int:
        """Bytes in the bitmap file: ceil(ceil(virtual_size / g) / 8)."""
        return -(-self.nbits // 8)

    @property
    def tracked(self) -> bool:
        return self.bits is not None

    def xattrs(self) -> dict[str, bytes]:
        return {
            "user.qcow2.granularity": str(self.granularity).encode(),
            "user.qcow2.flags": ",".join(BITMAP_FLAG_NAMES[b] for b in BITMAP_FLAG_NAMES
                                         if self.entry.flags & b).encode(),
            "user.qcow2.type": b"dirty-tracking" if self.entry.type == BME_TYPE_DIRTY_TRACKING
            else str(self.entry.type).encode(),
        }

    def mark(self, offset: int, length: int) -> None:
        """Set the bits covering guest bytes [offset, offset + length)."""
        assert self.bits is not None
        mark_bits(self.bits, self.granularity, self.nbits, offset, length)


def mark_bits(bits: bytearray, granularity: int, nbits: int, offset: int, length: int) -> None:
    """Set the bits of BITS (NBITS bits of GRANULARITY bytes each) that cover
    guest bytes [offset, offset + length)."""
    g = granularity
    first, last = offset // g, min((offset + length - 1) // g, nbits - 1)
    if last < first:
        return
    b0, b1 = first >> 3, last >> 3
    if b0 == b1:
        bits[b0] |= ((0xFF << (first & 7)) & (0xFF >> (7 - (last & 7)))) & 0xFF
        return
    bits[b0] |= (0xFF << (first & 7)) & 0xFF
    bits[b0 + 1 : b1] = b"\xff" * (b1 - b0 - 1)
    bits[b1] |= 0xFF >> (7 - (last & 7))


def _validate(bm: Bitmap, cluster_size: int, file_size: int) -> str | None:
    """What makes BM unusable, or None: first what QEMU refuses the image for
    (see Bitmap.damaged), then being in use."""
    e = bm.entry
    why = broken(bm, cluster_size, file_size)
    if why is not None:
        return why
    if e.flags & BME_IN_USE:
        return "in use (not saved cleanly: QEMU does not trust it either)"
    return None


def broken(bm: Bitmap, cluster_size: int, file_size: int) -> str | None:
    """A constraint of the directory entry broken (QEMU refuses the image), or None."""
    e = bm.entry
    if e.type != BME_TYPE_DIRTY_TRACKING:
        return f"unknown bitmap type {e.type}"
    if not BME_MIN_GRANULARITY_BITS <= e.granularity_bits <= BME_MAX_GRANULARITY_BITS:
        return f"invalid granularity 2^{e.granularity_bits}"
    if e.flags & BME_RESERVED_FLAGS:
        return "unknown flags"
    if e.flags & BME_EXTRA_DATA_COMPATIBLE:
        # (QEMU knows only in-use and auto, and refuses the image otherwise.)
        return "the extra-data-compatible flag, which QEMU refuses"
    if e.extra and not e.flags & BME_EXTRA_DATA_COMPATIBLE:
        return "extra data qcowfs does not understand"
    need = -(-bm.size // cluster_size)
    if e.bitmap_table_size != need:
        return f"bitmap table has {e.bitmap_table_size} entries, expected {need}"
    if e.bitmap_table_offset % cluster_size or e.bitmap_table_offset + e.bitmap_table_size * 8 > file_size:
        return "bitmap table offset is invalid"
    return None


def table_entry_problem(entry: int, cluster_size: int) -> str | None:
    """What QEMU's check_table_entry refuses in a bitmap table entry, or None."""
    if entry & BME_TABLE_RESERVED_MASK:
        return "reserved bits set"
    offset = entry & BME_TABLE_OFFSET_MASK
    if offset and entry & BME_TABLE_ALL_ONES:
        return "a data cluster and the all-ones flag"
    if offset % cluster_size:
        return "a misaligned data cluster"
    return None


def data_clusters(bm: Bitmap) -> list[int]:
    """Host offsets of BM's data clusters (as its table says)."""
    return [t & BME_TABLE_OFFSET_MASK for t in bm.table if t & BME_TABLE_OFFSET_MASK]


def load_bitmaps(header: Header, file: HostFile) -> list[Bitmap]:
    """Parse the bitmaps extension (blocking: done at open time)."""
    data = header.extension(EXT_BITMAPS)
    if data is None:
        return []
    ext = BitmapsExtension.parse(data)
    cs = header.cluster_size
    if ext.directory_size > MAX_DIRECTORY_BYTES or ext.directory_offset % cs:
        raise InvalidImageError("bitmap directory is invalid")
    if ext.directory_offset + ext.directory_size > file.known_size:
        raise InvalidImageError("bitmap directory lies past the end of the image file")
    raw = file.read_sync(ext.directory_offset, ext.directory_size)
    entries = BitmapDirEntry.parse_directory(raw, ext.nb_bitmaps)
    consistent_ext = bool(header.autoclear_features & AUTOCLEAR_BITMAPS)
    bitmaps = []
    for e in entries:
        bm = Bitmap(e, header.size, cs)
        bm.problem = (None if consistent_ext else "the bitmaps extension is inconsistent "
                      "(autoclear bit clear: the image was written by a program that ignores bitmaps)")
        if bm.problem is None:
            bm.problem = _validate(bm, cs, file.known_size)
            bm.damaged = broken(bm, cs, file.known_size) is not None
        if bm.problem is None:
            rawt = file.read_sync(e.bitmap_table_offset, e.bitmap_table_size * 8)
            bm.table = list(struct.unpack(f">{e.bitmap_table_size}Q", rawt))
            bad = next((i for i, t in enumerate(bm.table) if table_entry_problem(t, cs)), None)
            if bad is not None:
                bm.problem = f"bitmap table entry {bad} is invalid ({table_entry_problem(bm.table[bad], cs)})"
                bm.damaged = True
        bitmaps.append(bm)
    return bitmaps


def find(bitmaps: list[Bitmap], name: str) -> Bitmap:
    for b in bitmaps:
        if b.name == name:
            return b
    raise NotFoundError(f"no bitmap '{name}'")


def usable(bm: Bitmap) -> Bitmap:
    """BM, if its contents can be trusted (changing an inconsistent one would hide that)."""
    if bm.problem is not None and not bm.tracked:
        raise RequestError(f"bitmap '{bm.name}' cannot be used: {bm.problem} "
                          "(remove it, or `qcowfs check --repair`)")
    return bm


async def read_bitmap(bm: Bitmap, file: HostFile, offset: int, length: int) -> bytes:
    """Bytes [offset, offset+length) of the bitmap file."""
    if bm.problem is not None and bm.bits is None:
        raise CorruptionError(f"bitmap '{bm.name}' is inconsistent: {bm.problem}")
    n = max(0, min(length, bm.size - offset))
    if n <= 0:
        return b""
    if bm.bits is not None:
        return bytes(bm.bits[offset : offset + n])
    cs = bm.cluster_size
    out = bytearray(n)
    pos = offset
    while pos < offset + n:
        i = pos // cs
        chunk_end = min(offset + n, (i + 1) * cs)
        entry = bm.table[i]
        host = entry & BME_TABLE_OFFSET_MASK
        dst = memoryview(out)[pos - offset : chunk_end - offset]
        if host:
            if host % cs or host + cs > file.known_size:
                raise CorruptionError(f"bitmap '{bm.name}' has an invalid data cluster offset {host:#x}")
            got = await file.read_into(dst, host + pos - i * cs)
            if got < len(dst):
                raise CorruptionError(f"bitmap '{bm.name}' data runs past the end of the file")
        elif entry & BME_TABLE_ALL_ONES:
            dst[:] = b"\xff" * len(dst)
        pos = chunk_end
    _clear_tail(bm, out, offset)
    return bytes(out)


def _clear_tail(bm: Bitmap, buf: bytearray, offset: int) -> None:
    """Bits past the end of the disk are zero."""
    last = bm.size - 1
    if offset <= last < offset + len(buf) and bm.nbits % 8:
        buf[last - offset] &= (1 << (bm.nbits % 8)) - 1


async def start_tracking(meta: "Metadata", bitmaps: list[Bitmap]) -> None:
    """Load every usable auto bitmap into memory and mark it in_use in the image."""
    tracked = [bm for bm in bitmaps if bm.problem is None and bm.entry.flags & BME_AUTO]
    if not tracked:
        return
    for bm in tracked:
        bm.bits = bytearray(await read_bitmap(bm, meta.file, 0, bm.size))
    await _write_flags(meta, bitmaps, tracked, set_in_use=True)


async def _write_flags(meta: "Metadata", everyone: list[Bitmap], bitmaps: list[Bitmap],
                       set_in_use: bool) -> None:
    """Flip in_use of BITMAPS in the directory, in place (one 4-byte write each)."""
    ext = BitmapsExtension.parse(meta.header.extension(EXT_BITMAPS) or b"")
    positions = dict(zip((id(b) for b in everyone), flag_positions(everyone)))
    for bm in bitmaps:
        bm.entry.flags = bm.entry.flags | BME_IN_USE if set_in_use else bm.entry.flags & ~BME_IN_USE
        meta.write(ext.directory_offset + positions[id(bm)], struct.pack(">I", bm.entry.flags),
                   "bitmap directory entry", ignore=Kind.BITMAP_DIRECTORY)
    await meta.file.sync()


async def store_bitmaps(meta: "Metadata", alloc: "Allocator", bitmaps: list[Bitmap], changed: bool) -> None:
    """Write tracked bitmaps back and clear in_use: new clusters, then the header,
    then the old clusters are released (the caller's flush applies that)."""
    tracked = [bm for bm in bitmaps if bm.tracked]
    if not tracked:
        return
    if not changed:
        await _write_flags(meta, bitmaps, tracked, set_in_use=False)
        for bm in tracked:
            bm.bits = None
        return
    cs = meta.geo.cluster_size
    zero = bytes(cs)
    for bm in tracked:
        assert bm.bits is not None
        old_table, old_table_at = bm.table, bm.entry.bitmap_table_offset
        table = []
        for i in range(bm.entry.bitmap_table_size):
            chunk = bytes(bm.bits[i * cs : (i + 1) * cs])
            chunk += bytes(cs - len(chunk))
            if chunk == zero:
                table.append(0)
                continue
            off = await alloc.allocate(1)
            meta.write(off, chunk, f"bitmap '{bm.name}' data")
            table.append(off)
        raw_table = struct.pack(f">{len(table)}Q", *table)
        table_at = await alloc.allocate(-(-len(raw_table) // cs))
        meta.write(table_at, raw_table, f"bitmap '{bm.name}' table")
        meta.add_structure(Kind.BITMAP_TABLE, table_at, len(raw_table))
        meta.drop_structure(Kind.BITMAP_TABLE, old_table_at, len(old_table) * 8)
        for entry in old_table:
            if entry & BME_TABLE_OFFSET_MASK:
                alloc.release_later(entry & BME_TABLE_OFFSET_MASK, cs)
        alloc.release_later(old_table_at, len(old_table) * 8)
        bm.table, bm.entry.bitmap_table_offset = table, table_at
        bm.entry.flags &= ~BME_IN_USE
        bm.bits = None
    old = BitmapsExtension.parse(meta.header.extension(EXT_BITMAPS) or b"")
    directory = directory_bytes(bitmaps)
    dir_at = await alloc.allocate(-(-len(directory) // cs))
    meta.write(dir_at, directory, "bitmap directory")
    # New tables, data and directory (and their refcounts) before the header.
    await alloc.flush()
    await meta.file.sync()
    ext = BitmapsExtension(len(bitmaps), len(directory), dir_at)
    await meta.set_extension(EXT_BITMAPS, ext.pack())
    meta.drop_structure(Kind.BITMAP_DIRECTORY, old.directory_offset, old.directory_size)
    meta.add_structure(Kind.BITMAP_DIRECTORY, dir_at, len(directory))
    alloc.release_later(old.directory_offset, old.directory_size)


def directory_bytes(bitmaps: list[Bitmap]) -> bytes:
    return b"".join(bm.entry.pack() for bm in bitmaps)


def flag_positions(bitmaps: list[Bitmap]) -> list[int]:
    """Byte offset of each entry's flags field within the directory."""
    pos, out = 0, []
    for bm in bitmaps:
        out.append(pos + 12)
        pos += len(bm.entry.pack())
    return out
