"""Bitmap management (QEMU's `qemu-img bitmap`, block-dirty-bitmap-*), live or offline.

Each operation computes the bitmap list as it will be, stores what must be
stored (new tables after the end of the file), writes a new directory and
switches the header's bitmaps extension to it, all in one refcount
Transaction: a crash leaves the old directory or the new one, never a mix.
A bitmap that tracks writes (auto, image open for writing) is held in
memory and flagged in_use on disk, as at mount time; its bits are stored
when it stops tracking (disable, unmount).
"""
from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .bitmaps import Bitmap, broken, find, mark_bits, read_bitmap, table_entry_problem, usable
from ..errors import RequestError
from ..format import (AUTOCLEAR_BITMAPS, BME_AUTO, BME_IN_USE, BME_MAX_GRANULARITY_BITS, BME_TABLE_ALL_ONES,
                     BME_MAX_NAME_SIZE, BME_MIN_GRANULARITY_BITS, BME_TABLE_OFFSET_MASK,
                     BME_TYPE_DIRTY_TRACKING, EXT_BITMAPS, BitmapDirEntry, BitmapsExtension, Header,
                     with_extension)
from .metadata import Metadata
from .overlap import Kind
from .refcount import Transaction
from .snapshots import check_new_name as check_name

# QEMU's QCOW2_MAX_BITMAPS.
MAX_BITMAPS = 65535


def default_granularity(cluster_size: int) -> int:
    """QEMU's default: the cluster size, clamped to 4 KiB..64 KiB."""
    return min(max(cluster_size, 4096), 65536)


def check_granularity(granularity: int) -> int:
    if granularity <= 0 or granularity & (granularity - 1) or \
            not BME_MIN_GRANULARITY_BITS <= granularity.bit_length() - 1 <= BME_MAX_GRANULARITY_BITS:
        raise RequestError(f"granularity {granularity} is not a power of two from "
                          f"{1 << BME_MIN_GRANULARITY_BITS} to {1 << BME_MAX_GRANULARITY_BITS}")
    return granularity


def check_new_name(bitmaps: list[Bitmap], name: str) -> None:
    check_name("bitmap", name, [b.name for b in bitmaps], BME_MAX_NAME_SIZE, MAX_BITMAPS)


async def current_bits(meta: Metadata, bm: Bitmap) -> bytearray:
    """The bitmap's bits as of now (live ones from memory)."""
    if bm.bits is not None:
        return bytearray(bm.bits)
    return bytearray(await read_bitmap(usable(bm), meta.file, 0, bm.size))


# ---- one change of the directory ---------------------------------------------------------

@dataclass
class Plan:
    """A bitmap as the new directory will hold it."""

    bitmap: Bitmap
    flags: int
    # Bits to store now as its table (None: its table stays as it is).
    store: bytearray | None = None
    # Bits it tracks in memory after the commit (None: it does not track).
    tracked: bytearray | None = None


def new_bitmap(meta: Metadata, name: str, granularity: int) -> Bitmap:
    geo, size = meta.geo, meta.header.size
    entry = BitmapDirEntry(0, 0, 0, BME_TYPE_DIRTY_TRACKING, granularity.bit_length() - 1, name)
    bm = Bitmap(entry, size, geo.cluster_size)
    entry.bitmap_table_size = -(-bm.size // geo.cluster_size)
    return bm


def keep(bm: Bitmap) -> Plan:
    """BM as it is (tracking on if it tracks)."""
    return Plan(bm, bm.entry.flags, tracked=bm.bits)


async def stage(meta: Metadata, txn: Transaction, plans: list[Plan], removed: list[Bitmap],
          adopt: Callable[[list[Bitmap]], None]) -> None:
    """Write the tables PLANS store and the new directory as part of TXN; the
    tables of REMOVED bitmaps and replaced tables lose their reference. Once
    committed, every Bitmap follows and ADOPT gets the new list."""
    if meta.header.version < 3 and plans:
        raise RequestError("persistent bitmaps need a version 3 image (compat=1.1), as in QEMU")
    cs = meta.geo.cluster_size
    new_tables: dict[int, tuple[list[int], int]] = {}
    for p in plans:
        if p.store is not None:
            new_tables[id(p.bitmap)] = await _write_table(meta, txn, p.bitmap, p.store)
    for bm in removed + [p.bitmap for p in plans if id(p.bitmap) in new_tables]:
        if bm.entry.bitmap_table_offset:
            _give_back(txn, bm, cs)
    entries = []
    for p in plans:
        e = dataclasses.replace(p.bitmap.entry, flags=p.flags)
        if id(p.bitmap) in new_tables:
            e.bitmap_table_offset = new_tables[id(p.bitmap)][1]
            e.bitmap_table_size = len(new_tables[id(p.bitmap)][0])
        entries.append(e)
    h = meta.header
    old = BitmapsExtension.parse(h.extension(EXT_BITMAPS) or b"") if h.extension(EXT_BITMAPS) else None
    if old is not None and old.directory_size:
        txn.change(old.directory_offset, old.directory_size, -1)
    directory = b"".join(e.pack() for e in entries)
    ext: BitmapsExtension | None = None
    if entries:
        at = await txn.allocate(len(directory))
        meta.write(at, directory, "new bitmap directory")
        ext = BitmapsExtension(len(entries), len(directory), at)
    txn.set(**_directory_fields(h, ext, entries))

    def follow() -> None:
        _follow_directory(meta, old, ext)
        for bm in removed:
            _drop_table(meta, bm)
        for p, e in zip(plans, entries):
            bm = p.bitmap
            if id(bm) in new_tables:
                _drop_table(meta, bm)
                bm.table = new_tables[id(bm)][0]
                meta.add_structure(Kind.BITMAP_TABLE, e.bitmap_table_offset, e.bitmap_table_size * 8)
                bm.problem = None
            bm.entry = e
            bm.bits = p.tracked
        adopt([p.bitmap for p in plans])
    txn.then(follow)


async def _write_table(meta: Metadata, txn: Transaction, bm: Bitmap, bits: bytearray) -> tuple[list[int], int]:
    """BITS as data clusters (all-zero ones left out) and a table, after the end of the file.
    (As many entries as BITS needs: a resize stores bits of another length than the
    entry's old table, which it still gives back.)"""
    cs = meta.geo.cluster_size
    table = []
    for i in range(-(-len(bits) // cs)):
        chunk = bytes(bits[i * cs : (i + 1) * cs])
        if not chunk.strip(b"\0"):
            table.append(0)
            continue
        at = await txn.allocate(cs)
        meta.write(at, chunk.ljust(cs, b"\0"), f"bitmap '{bm.name}' data")
        table.append(at)
    raw = struct.pack(f">{len(table)}Q", *table)
    at = await txn.allocate(max(1, len(raw)))
    meta.write(at, raw.ljust(-(-max(1, len(raw)) // cs) * cs, b"\0"), f"bitmap '{bm.name}' table")
    return table, at


# ---- check --repair ----------------------------------------------------------------------

async def mend(meta: Metadata, bitmaps: list[Bitmap]) -> tuple[list[Bitmap], list[str]]:
    """`check --repair`, before the refcounts are rebuilt: the bitmaps as an
    image must hold them for QEMU to open it, and what was done, one line each.

    - An extension a program without bitmap support left (autoclear bit
      clear) is dropped, as QEMU drops it at its first write; its clusters
      are leaks the rebuild frees.
    - A bitmap whose directory entry QEMU refuses (type, granularity, flags,
      table size or place) is removed: what it tracked cannot be read.
    - A table entry QEMU refuses (reserved bits, a misaligned cluster), or
      whose data cluster lies past the end of the file or on metadata,
      becomes "all ones": that part of the bitmap reads dirty, so a backup
      driven by it copies too much, never too little. (qemu-img check -r all
      leaves such entries; its rebuild may then place new refcount blocks
      where they point.)

    No refcount changes: the rebuild counts what the mended tables name."""
    h, cs, end = meta.header, meta.geo.cluster_size, meta.file.known_size
    if not bitmaps:
        return bitmaps, []
    if not h.autoclear_features & AUTOCLEAR_BITMAPS:
        done = [f"Dropped the bitmaps extension ({len(bitmaps)} bitmaps): a program without "
                "bitmap support wrote the image since they were stored"]
        await _switch_directory(meta, bitmaps, [])
        return [], done
    kept: list[Bitmap] = []
    done = []
    for bm in bitmaps:
        why = broken(bm, cs, end)
        if why is not None:
            done.append(f"Removed bitmap '{bm.name}': {why}")
            continue
        e = bm.entry
        table = bm.table or list(struct.unpack(f">{e.bitmap_table_size}Q",
                                               meta.file.read_sync(e.bitmap_table_offset, e.bitmap_table_size * 8)))
        for i, t in enumerate(table):
            off = t & BME_TABLE_OFFSET_MASK
            why = table_entry_problem(t, cs) or (
                "its data cluster lies past the end of the file" if off and off + cs > end else
                "its data cluster is on metadata" if off and meta.overlap.kinds_at(off, cs) else None)
            if why is not None:
                meta.write(e.bitmap_table_offset + 8 * i, struct.pack(">Q", BME_TABLE_ALL_ONES),
                           "bitmap table entry", ignore=Kind.BITMAP_TABLE)
                table[i] = BME_TABLE_ALL_ONES
                done.append(f"Repaired bitmap '{bm.name}': table entry {i} ({why}) now marks its "
                            "range all dirty")
        if bm.table:
            bm.table = table
        if bm.damaged:  # (its table entries were all it had wrong: broken() said nothing)
            bm.damaged, bm.problem = False, None
        kept.append(bm)
    if done:
        await meta.file.sync()
    if len(kept) < len(bitmaps):
        await _switch_directory(meta, bitmaps, kept)
    return kept, done


def _directory_fields(h: Header, ext: BitmapsExtension | None, entries: list[BitmapDirEntry]) -> dict[str, Any]:
    """The header fields that name the bitmap directory EXT (None: none) of ENTRIES."""
    return dict(extensions=with_extension(list(h.extensions), EXT_BITMAPS, ext.pack() if ext else None),
                autoclear_features=(h.autoclear_features | AUTOCLEAR_BITMAPS) if entries
                else h.autoclear_features & ~AUTOCLEAR_BITMAPS,
                bitmap_directory=entries)


def _follow_directory(meta: Metadata, old: BitmapsExtension | None, ext: BitmapsExtension | None) -> None:
    """The overlap map after the header switched from directory OLD to EXT."""
    if old is not None and old.directory_size:
        meta.drop_structure(Kind.BITMAP_DIRECTORY, old.directory_offset, old.directory_size)
    if ext is not None:
        meta.add_structure(Kind.BITMAP_DIRECTORY, ext.directory_offset, ext.directory_size)


async def _switch_directory(meta: Metadata, old: list[Bitmap], kept: list[Bitmap]) -> None:
    """A new bitmap directory of KEPT, after the end of the file, and the
    header switched to it (none: the extension dropped), without refcount
    changes (a repair's rebuild follows)."""
    h, cs = meta.header, meta.geo.cluster_size
    for bm in old:
        if all(bm is not k for k in kept):
            # (First: a removed table may lie past the end of the file, where
            # the new directory goes. A crash before the switch leaves the old
            # directory naming that table as broken as it was, no worse.)
            _drop_table(meta, bm)
    directory = b"".join(bm.entry.pack() for bm in kept)
    ext: BitmapsExtension | None = None
    if kept:
        at = -(-meta.file.known_size // cs) * cs
        meta.write(at, directory, "new bitmap directory")
        await meta.file.sync()
        ext = BitmapsExtension(len(kept), len(directory), at)
    raw = h.extension(EXT_BITMAPS)
    before = BitmapsExtension.parse(raw) if raw else None
    await meta.update(**_directory_fields(h, ext, [bm.entry for bm in kept]))
    _follow_directory(meta, before, ext)


def _give_back(txn: Transaction, bm: Bitmap, cs: int) -> None:
    for entry in bm.table:
        if entry & BME_TABLE_OFFSET_MASK:
            txn.change(entry & BME_TABLE_OFFSET_MASK, cs, -1)
    txn.change(bm.entry.bitmap_table_offset, max(1, bm.entry.bitmap_table_size * 8), -1)


def _drop_table(meta: Metadata, bm: Bitmap) -> None:
    if bm.entry.bitmap_table_offset:
        meta.drop_structure(Kind.BITMAP_TABLE, bm.entry.bitmap_table_offset, bm.entry.bitmap_table_size * 8)


# ---- the operations -------------------------------------------------------------------------

def _added(meta: Metadata, taken: list[Bitmap], name: str, granularity: int, enabled: bool,
           bits: Callable[[Bitmap], bytearray]) -> Plan:
    """A new bitmap NAME (not among TAKEN) holding BITS(it); ENABLED, it
    tracks writes from the commit on (its bits are stored at close)."""
    check_new_name(taken, name)
    bm = new_bitmap(meta, name, check_granularity(granularity))
    if enabled:
        return Plan(bm, BME_AUTO | BME_IN_USE, store=bytearray(bm.size), tracked=bits(bm))
    return Plan(bm, 0, store=bits(bm))


async def plan_add(meta: Metadata, bitmaps: list[Bitmap], name: str, granularity: int | None,
                   enabled: bool) -> list[Plan]:
    g = granularity or default_granularity(meta.geo.cluster_size)
    return [keep(b) for b in bitmaps] + [_added(meta, bitmaps, name, g, enabled, lambda bm: bytearray(bm.size))]


def plan_copies(meta: Metadata, bitmaps: list[Bitmap], copies: Sequence[tuple[Bitmap, bytes]]) -> list[Plan]:
    """The bitmaps after copying, for each (SOURCE, BITS) of COPIES, bitmap
    SOURCE of another image (its bits BITS) into this one: same name,
    granularity and enabled state, the same granules dirty (qemu-img convert
    --bitmaps: block-dirty-bitmap-add, then a merge of the source's bits)."""
    plans = [keep(b) for b in bitmaps]
    for src, src_bits in copies:
        def bits(bm: Bitmap, src: Bitmap = src, src_bits: bytes = src_bits) -> bytearray:
            out = bytearray(bm.size)
            _merge_into(out, bm, bytearray(src_bits), src)
            return out
        plans.append(_added(meta, [p.bitmap for p in plans], src.name, src.granularity,
                            bool(src.entry.flags & BME_AUTO), bits))
    return plans


async def plan_change(meta: Metadata, bitmaps: list[Bitmap], name: str, action: str,
                      sources: Sequence[str] = (),
                      external: Sequence[tuple[Bitmap, bytes]] = ()) -> tuple[list[Plan], list[Bitmap]]:
    """Plans for remove, clear, enable, disable and merge of bitmap NAME (the
    SOURCES of this image; EXTERNAL: bitmaps of another image, with their bits)."""
    target = find(bitmaps, name)
    plans = [keep(b) for b in bitmaps if b is not target]
    index = bitmaps.index(target)
    if action == "remove":
        return plans, [target]
    usable(target)
    if action == "clear":
        p = (Plan(target, target.entry.flags, tracked=bytearray(target.size)) if target.tracked
             else Plan(target, target.entry.flags, store=bytearray(target.size)))
    elif action == "enable":
        p = (keep(target) if target.tracked
             else Plan(target, target.entry.flags | BME_AUTO | BME_IN_USE, tracked=await current_bits(meta, target)))
    elif action == "disable":
        p = (Plan(target, target.entry.flags & ~(BME_AUTO | BME_IN_USE), store=bytearray(target.bits))
             if target.bits is not None else Plan(target, target.entry.flags & ~BME_AUTO))
    elif action == "merge":
        if not sources and not external:
            raise RequestError("merge needs at least one source bitmap")
        bits = await current_bits(meta, target)
        for s in sources:
            src = usable(find(bitmaps, s))
            _merge_into(bits, target, await current_bits(meta, src), src)
        for src, src_bits in external:
            if src.virtual_size != target.virtual_size:
                raise RequestError(f"bitmaps of disks of different sizes cannot be merged ('{target.name}' "
                                   f"covers {target.virtual_size} bytes, '{src.name}' {src.virtual_size})")
            _merge_into(bits, target, bytearray(src_bits), src)
        p = (Plan(target, target.entry.flags, tracked=bits) if target.tracked
             else Plan(target, target.entry.flags, store=bits))
    else:
        raise RequestError(f"unknown bitmap action '{action}'")
    plans.insert(index, p)
    return plans, []


def _merge_into(bits: bytearray, target: Bitmap, src_bits: bytearray, src: Bitmap) -> None:
    """Set in BITS every granule of TARGET that a set bit of SRC covers (granularities may differ)."""
    on = np.unpackbits(np.frombuffer(bytes(src_bits), np.uint8), bitorder="little")[: src.nbits]
    edges = np.diff(np.concatenate(([0], on.astype(np.int8), [0])))
    g = src.granularity
    for start, end in zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()):
        mark_bits(bits, target.granularity, target.nbits, start * g, (end - start) * g)


def plan_checkpoint(meta: Metadata, bitmaps: list[Bitmap], name: str) -> list[Plan]:
    """The bitmaps after checkpoint NAME: every tracked bitmap B gains a frozen
    copy B@NAME of its bits now, and a new tracked bitmap NAME starts empty
    (with the granularity of the first tracked bitmap, else the default)."""
    tracked = [b for b in bitmaps if b.tracked and b.entry.flags & BME_AUTO]
    names = [f"{b.name}@{name}" for b in tracked] + [name]
    taken = list(bitmaps)
    for n in names:
        check_new_name(taken, n)
        taken.append(new_bitmap(meta, n, 512))
    plans = [keep(b) for b in bitmaps]
    for b, n in zip(tracked, names):
        assert b.bits is not None
        plans.append(Plan(new_bitmap(meta, n, b.granularity), 0, store=bytearray(b.bits)))
    g = tracked[0].granularity if tracked else default_granularity(meta.geo.cluster_size)
    new = new_bitmap(meta, name, g)
    plans.append(Plan(new, BME_AUTO | BME_IN_USE, store=bytearray(new.size), tracked=bytearray(new.size)))
    return plans
