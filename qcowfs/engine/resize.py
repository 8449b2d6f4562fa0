"""Resizing the virtual disk (QEMU's qcow2_co_truncate), grow and shrink.

The whole change is one refcount Transaction (see refcount/transaction.py):
a new active L1 table when its size changes or entries past the new end
are dropped, copies of the L2 tables that straddle the new end with the
entries past it cleared, every persistent bitmap rewritten at the new size
(bits past the end dropped, new ones clear, as QEMU's in-memory bitmaps are
truncated and stored), and the header switches to all of it and the new
size in one write. A crash leaves the old disk or the new one.

Refusals follow qemu-img 7.2 (asked in tests/test_lifecycle.py): a size
that is not a whole number of sectors, not positive, or beyond the largest
L1 table; a version 2 image with internal snapshots; an inconsistent
(in-use) bitmap. Shrinking itself needs the caller's consent (--shrink).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from ..errors import ResizeError
from ..format import (L1E_OFFSET_MASK, MAX_L1_BYTES, OFLAG_COPIED, OFLAG_ZERO, SC_ALL, Table,
                      encode_table, zero_table)
from ..format.bulk import l2_rows
from .bitmap_ops import Plan, current_bits, stage as stage_bitmaps
from .bitmaps import Bitmap
from .cache import TableCache
from .metadata import Metadata
from .overlap import Kind
from .references import L2Refs
from .refcount import Transaction

SECTOR = 512


def check_resize(meta: Metadata, bitmaps: list[Bitmap], new_size: int, backing_size: int,
                 version: int | None = None) -> None:
    """What qemu-img refuses, before anything is touched (BACKING_SIZE: the
    backing file's size, 0 without one; VERSION: the image's version by the
    time it is resized, where an amend upgrades it first)."""
    h, geo = meta.header, meta.geo
    version = h.version if version is None else version
    if version < 3 and new_size > h.size and backing_size > h.size:
        raise ResizeError("a version 2 image cannot grow over a larger backing file: it has no zero "
                          "clusters to hide the backing file's data in the new area (as in QEMU)")
    if new_size <= 0:
        raise ResizeError("the new size must be positive")
    if new_size % SECTOR:
        raise ResizeError("the new size must be a multiple of 512")
    if meta.snapshots and version < 3:
        raise ResizeError("a version 2 image with internal snapshots cannot be resized (as in QEMU)")
    for bm in bitmaps:
        if bm.problem is not None and not bm.tracked:
            raise ResizeError(f"bitmap '{bm.name}' is inconsistent and cannot be used ({bm.problem}): "
                              "remove it first (as QEMU asks)")
    if max(h.l1_size if new_size >= h.size else 0, geo.l1_entries_needed(new_size)) * 8 > MAX_L1_BYTES:
        raise ResizeError(f"virtual size {new_size} is too large (its L1 table would pass 32 MiB)")


def _words(rows: np.ndarray) -> np.ndarray:
    """The first word of each entry of l2_rows."""
    return rows[:, 0] if rows.ndim == 2 else rows


async def stage_resize(meta: Metadata, l2_cache: TableCache[Table], txn: Transaction,
                       bitmaps: list[Bitmap], new_size: int, backing_size: int,
                       adopt: Callable[[list[Bitmap]], None]) -> None:
    """The resize as part of TXN; once it commits, ADOPT gets the resized bitmaps.
    A grow over a backing file larger than the old disk marks the whole
    clusters of the new area that it would show through as zero clusters
    in the same commit (the partial cluster at the old end is the caller's,
    written before: it lies past the end until the commit)."""
    h, geo = meta.header, meta.geo
    cs, cb = geo.cluster_size, geo.cluster_bits
    external = h.external_data
    shrink = new_size < h.size
    l1_size = geo.l1_entries_needed(new_size) if shrink else max(h.l1_size, geo.l1_entries_needed(new_size))
    l1 = await meta.active_l1.entries() if h.l1_size else np.zeros(0, np.uint64)
    new_l1 = np.zeros(l1_size, np.uint64)
    new_l1[: min(l1_size, h.l1_size)] = l1[: min(l1_size, h.l1_size)]
    replaced: dict[int, int] = {}
    new_tables: dict[int, Table] = {}
    dropped: list[int] = []
    if shrink:
        keep_clusters = -(-new_size // cs)       # guest clusters that stay (the last one may be partial)
        per_table = geo.l2_entries
        for i in np.flatnonzero(l1 & np.uint64(L1E_OFFSET_MASK)).tolist():
            first = i * per_table
            if first + per_table <= keep_clusters:
                continue
            off = int(l1[i]) & L1E_OFFSET_MASK
            table = await l2_cache.get(off)
            cut = max(0, keep_clusters - first)
            gone_words = _words(l2_rows(table, geo.extended_l2)[cut:])
            # The active disk's path through this table goes: the table and
            # the data of the entries past the end lose the reference.
            txn.change(off, cs, -1)
            txn.change_clusters(L2Refs(off, gone_words, None, 1, True).clusters(cb, external), -1)
            if cut == 0:
                dropped.append(off)
                continue
            copy = table[:]
            l2_rows(copy, geo.extended_l2)[cut:] = 0
            at = await txn.allocate(cs)
            meta.write(at, encode_table(copy), "L2 table copy")
            new_l1[i] = np.uint64(at | OFLAG_COPIED)
            replaced[off], new_tables[at] = at, copy
    if not shrink and h.version >= 3:
        first = -(-h.size // cs)                                   # whole new clusters only
        last = -(-min(new_size, backing_size) // cs)
        per_table = geo.l2_entries
        for i in range(first // per_table, -(-last // per_table)):
            if first >= last:
                break
            k0, k1 = max(first, i * per_table) - i * per_table, min(last, (i + 1) * per_table) - i * per_table
            off = int(new_l1[i]) & L1E_OFFSET_MASK
            if off:
                table = await l2_cache.get(off)
                copy = table[:]
                txn.change(off, cs, -1)
                words = _words(l2_rows(table, geo.extended_l2)[k0:k1])
                txn.change_clusters(L2Refs(off, words, None, 1, True).clusters(cb, external), -1)
            else:
                copy = zero_table(cs // 8)
            rows = l2_rows(copy, geo.extended_l2)
            if geo.extended_l2:
                rows[k0:k1, 0] = 0
                rows[k0:k1, 1] = np.uint64(SC_ALL << 32)
            else:
                rows[k0:k1] = np.uint64(OFLAG_ZERO)
            at = await txn.allocate(cs)
            meta.write(at, encode_table(copy), "L2 table of zero clusters")
            new_l1[i] = np.uint64(at | OFLAG_COPIED)
            if off:
                replaced[off] = at
            new_tables[at] = copy
    new_l1_at = h.l1_table_offset
    if l1_size != h.l1_size or replaced or dropped or new_tables:
        new_l1_at = await txn.allocate(max(1, l1_size * 8)) if l1_size else 0
        if l1_size:
            meta.write(new_l1_at, new_l1.astype(">u8").tobytes(), "new L1 table")
        if h.l1_size:
            txn.change(h.l1_table_offset, h.l1_size * 8, -1)
    txn.set(size=new_size, l1_table_offset=new_l1_at, l1_size=l1_size)
    if bitmaps:
        plans = []
        for bm in bitmaps:
            bits = await current_bits(meta, bm)
            # (Its entry stays the old one until the commit: the old table is given back
            # by it; the new table's size comes from the bits stored.)
            nb = dataclasses.replace(bm, virtual_size=new_size, bits=None)
            new_bits = bytearray(nb.size)
            new_bits[: min(len(bits), nb.size)] = bits[: nb.size]
            if nb.nbits % 8:  # bits past the end of the disk are zero
                new_bits[-1] &= (1 << (nb.nbits % 8)) - 1
            plans.append(Plan(nb, bm.entry.flags, store=new_bits,
                              tracked=bytearray(new_bits) if bm.tracked else None))
        await stage_bitmaps(meta, txn, plans, [], adopt)

    def follow() -> None:
        if new_l1_at != h.l1_table_offset or l1_size != h.l1_size:
            if h.l1_size:
                meta.drop_structure(Kind.ACTIVE_L1, h.l1_table_offset, h.l1_size * 8)
            if l1_size:
                meta.add_structure(Kind.ACTIVE_L1, new_l1_at, l1_size * 8)
        freed = set((txn.freed * cs).tolist())
        for off in dropped + list(replaced):
            meta.drop_structure(Kind.ACTIVE_L2, off, cs)
            if off in freed:
                l2_cache.discard(off)
        for at, table in new_tables.items():
            meta.add_structure(Kind.ACTIVE_L2, at, cs)
            l2_cache.put_new(at, table, dirty=False)
    txn.then(follow)
