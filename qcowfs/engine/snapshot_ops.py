"""Creating and deleting internal snapshots (QEMU's qcow2-snapshot.c), live or offline.

QEMU's way shares the active L2 tables with the new snapshot and clears
their COPIED flags in place, and on delete sets them again: between those
writes and the refcount writes, `qemu-img check` on a crashed image finds
COPIED errors. Here every change goes through one refcount Transaction:

- create: the current active L1 table and its L2 tables become the
  snapshot's, unchanged (the spec trusts COPIED only in tables reachable
  from the active L1). The active disk gets copies of every L2 table with
  COPIED cleared, in a new L1 table; every data cluster gains a reference.
- delete: the snapshot's L1, L2 tables and data lose a reference; active
  L2 tables whose clusters drop to one reference are copied with COPIED
  set (and the L1 table with them).

New structures go after the end of the file; the header switches to the
new L1 table, snapshot table and refcount structure in one write.
Callers hold the image exclusively (Image.exclusive): writes drained and
stopped, every cache flushed.
"""
from __future__ import annotations

import struct
import time
from dataclasses import dataclass, replace

import numpy as np

from .cache import TableCache
from ..errors import CorruptionError, RequestError, UnsupportedFeatureError
from ..format import (NO_ICOUNT, L1E_OFFSET_MASK, MAX_L1_BYTES, MAX_SNAPSHOTS, OFLAG_COMPRESSED,
                     OFLAG_COPIED, L2E_OFFSET_MASK, SnapshotEntry, Table, encode_table)
from ..format.bulk import l2_words
from .metadata import Metadata
from .overlap import Kind
from .references import L2Refs, read_entries
from .refcount import Allocator, Transaction
from .snapshots import check_new_name as check_name, counted_table_length, snapshot_disk_size, snapshot_problem

# QEMU's limit on a snapshot's id and name strings (uint16 lengths in the entry).
MAX_NAME_BYTES = 1024
# Extra data as QEMU writes it: vm_state_size_large, disk_size, icount.
_EXTRA = struct.Struct(">QQQ")
# The icount `qemu-img snapshot -c` records (its entry starts zeroed; a VM's
# savevm writes -1, "none", without record/replay): `qemu-img info` lists
# "icount": 0 for our snapshots as for its own.
QEMU_IMG_ICOUNT = 0


@dataclass
class _Tables:
    """What a snapshot operation did to the active tables."""

    l1: np.ndarray               # the new active L1 entries
    replaced: dict[int, int]     # old L2 offset -> new L2 offset
    new_tables: dict[int, Table]


def check_new_name(meta: Metadata, name: str) -> None:
    """A name a new snapshot may take: usable as a file name, not in use."""
    check_name("snapshot", name, [s.name for s in meta.snapshots], MAX_NAME_BYTES, MAX_SNAPSHOTS)
    if meta.header.external_data:
        raise UnsupportedFeatureError("an image with an external data file cannot have internal "
                                      "snapshots (as in QEMU)")


def _new_id(entries: list[SnapshotEntry]) -> str:
    """One more than the largest numeric id (QEMU's find_new_snapshot_id)."""
    ids = [int(s.id_str) for s in entries if s.id_str.isdigit()]
    return str(max(ids, default=0) + 1)


def _encode(l1: np.ndarray) -> bytes:
    """An L1 table (L1Table.entries) as it is stored."""
    return l1.astype(">u8").tobytes()


def _table_bytes(entries: list[SnapshotEntry]) -> bytes:
    return b"".join(e.pack() for e in entries)


async def _l2_refs(meta: Metadata, l2_cache: TableCache[Table], offset: int) -> tuple[Table, np.ndarray]:
    """An L2 table and the clusters of the image file it references (none of
    an external data file's: they are not refcounted). A table or a data
    cluster that is not where a cluster of the file can be is corruption, as
    QEMU's qcow2_update_snapshot_refcount finds it: a count staged for such
    a reference reached far past the file (hostile seed 600029: an L1 entry
    into the middle of a cluster made a snapshot size a refcount table for
    2**58 bytes, 8 GiB of memory)."""
    cs, end = meta.geo.cluster_size, meta.file.known_size
    if offset % cs or offset < cs or offset >= end:
        raise CorruptionError(f"L1 entry points to an invalid L2 table offset {offset:#x}")
    table = await l2_cache.get(offset)
    refs = L2Refs(offset, l2_words(table, meta.geo.extended_l2), None, 1, True)
    if (refs.data_clusters(meta.header.external_data) % np.uint64(cs)).any():
        raise CorruptionError(f"the L2 table at {offset:#x} points to an unaligned data cluster")
    clusters = refs.clusters(meta.geo.cluster_bits, meta.header.external_data)
    if len(clusters) and int(clusters.max()) >= -(-end // cs):
        raise CorruptionError(f"the L2 table at {offset:#x} points to a cluster past the end of the image file")
    return table, clusters


async def _write_snapshot_table(meta: Metadata, txn: Transaction, entries: list[SnapshotEntry]) -> int:
    """The new snapshot table after the end of the file (0 for none); the old loses its reference."""
    h = meta.header
    if h.nb_snapshots:
        txn.change(h.snapshots_offset, len(_table_bytes(meta.snapshots)), -1)
    if not entries:
        return 0
    raw = _table_bytes(entries)
    at = await txn.allocate(len(raw))
    meta.write(at, raw, "new snapshot table")
    return at


async def create(meta: Metadata, alloc: Allocator, l2_cache: TableCache[Table], name: str) -> SnapshotEntry:
    """Make internal snapshot NAME of the active disk as it is now."""
    async with Transaction(alloc) as txn:
        entry = await stage_create(meta, l2_cache, txn, name)
        await txn.commit()
    return entry


async def delete(meta: Metadata, alloc: Allocator, l2_cache: TableCache[Table], index: int) -> None:
    """Drop snapshot INDEX and free what only it held."""
    async with Transaction(alloc) as txn:
        await stage_delete(meta, l2_cache, txn, index)
        await txn.commit()


async def stage_create(meta: Metadata, l2_cache: TableCache[Table], txn: Transaction,
                       name: str, vm_clock_nsec: int = 0) -> SnapshotEntry:
    """The snapshot NAME as part of TXN (written when it commits)."""
    check_new_name(meta, name)
    if txn.alloc.max_refcount < 2:
        raise RequestError(f"refcount_bits={1 << txn.alloc.order} cannot count the second "
                            "reference a snapshot takes to each cluster")
    h, geo = meta.header, meta.geo
    cs = geo.cluster_size
    l1 = await meta.active_l1.entries() if h.l1_size else np.zeros(0, np.uint64)
    new_l1 = l1.copy()
    new_tables: dict[int, Table] = {}
    replaced: dict[int, int] = {}
    for i in np.flatnonzero(l1 & np.uint64(L1E_OFFSET_MASK)).tolist():
        old = int(l1[i]) & L1E_OFFSET_MASK
        table, clusters = await _l2_refs(meta, l2_cache, old)
        txn.change_clusters(clusters, 1)
        copy = table[:]
        w = l2_words(copy, geo.extended_l2)
        w &= np.uint64(~OFLAG_COPIED & (1 << 64) - 1)
        at = await txn.allocate(cs)
        meta.write(at, encode_table(copy), "L2 table copy")
        new_l1[i] = np.uint64(at | OFLAG_COPIED)
        new_tables[at], replaced[old] = copy, at
    l1_at = h.l1_table_offset
    if h.l1_size:
        l1_at = await txn.allocate(h.l1_size * 8)
        meta.write(l1_at, _encode(new_l1), "new L1 table")
    now = time.time_ns()
    entry = SnapshotEntry(h.l1_table_offset, h.l1_size, _new_id(meta.snapshots), name,
                          now // 10**9, now % 10**9, vm_clock_nsec, 0,
                          _EXTRA.pack(0, h.size, QEMU_IMG_ICOUNT), 0, h.size, QEMU_IMG_ICOUNT)
    entries = meta.snapshots + [entry]
    table_at = await _write_snapshot_table(meta, txn, entries)
    old_table = (h.snapshots_offset, len(_table_bytes(meta.snapshots)))
    txn.set(l1_table_offset=l1_at, snapshots_offset=table_at, nb_snapshots=len(entries),
            snapshots=entries)

    def follow() -> None:
        # The overlap map follows: the old active tables are the snapshot's now.
        if h.l1_size:
            meta.drop_structure(Kind.ACTIVE_L1, h.l1_table_offset, h.l1_size * 8)
            meta.add_structure(Kind.INACTIVE_L1, h.l1_table_offset, h.l1_size * 8)
            meta.add_structure(Kind.ACTIVE_L1, l1_at, h.l1_size * 8)
        _swap_tables(meta, l2_cache, replaced, new_tables, old_kind=Kind.INACTIVE_L2)
        _swap_snapshot_table(meta, old_table, table_at, entries)
    txn.then(follow)
    return entry


async def stage_delete(meta: Metadata, l2_cache: TableCache[Table], txn: Transaction,
                       index: int) -> None:
    """Dropping snapshot INDEX as part of TXN."""
    h, geo = meta.header, meta.geo
    cs = geo.cluster_size
    snap = meta.snapshots[index]
    snap_l2: list[int] = []
    if snap.l1_size:
        txn.change(snap.l1_table_offset, snap.l1_size * 8, -1)
        entries = read_entries(meta.file, snap.l1_table_offset, snap.l1_size) & np.uint64(L1E_OFFSET_MASK)
        for off in entries[entries != 0].tolist():
            snap_l2.append(off)
            txn.change(off, cs, -1)
            _, clusters = await _l2_refs(meta, l2_cache, off)
            txn.change_clusters(clusters, -1)
    rest = meta.snapshots[:index] + meta.snapshots[index + 1 :]
    table_at = await _write_snapshot_table(meta, txn, rest)
    old_table = (h.snapshots_offset, len(_table_bytes(meta.snapshots)))
    fixed = await _fix_copied(meta, l2_cache, txn)
    l1_at = h.l1_table_offset
    if h.l1_size and not np.array_equal(fixed.l1, await meta.active_l1.entries()):
        # New L2 tables or only new L1 COPIED flags: a new L1 table either
        # way, so that the header switches to it with everything else.
        l1_at = await txn.allocate(h.l1_size * 8)
        meta.write(l1_at, _encode(fixed.l1), "new L1 table")
        txn.change(h.l1_table_offset, h.l1_size * 8, -1)
    txn.set(snapshots_offset=table_at, nb_snapshots=len(rest), snapshots=rest, l1_table_offset=l1_at)

    def follow() -> None:
        if snap.l1_size:
            meta.drop_structure(Kind.INACTIVE_L1, snap.l1_table_offset, snap.l1_size * 8)
        for off in snap_l2:
            meta.drop_structure(Kind.INACTIVE_L2, off, cs)
        if l1_at != h.l1_table_offset:
            meta.drop_structure(Kind.ACTIVE_L1, h.l1_table_offset, h.l1_size * 8)
            meta.add_structure(Kind.ACTIVE_L1, l1_at, h.l1_size * 8)
        _swap_tables(meta, l2_cache, fixed.replaced, fixed.new_tables, old_kind=None)
        _swap_snapshot_table(meta, old_table, table_at, rest)
        freed = set((txn.freed * cs).tolist())
        for off in snap_l2 + list(fixed.replaced):
            if off in freed:
                l2_cache.discard(off)
    txn.then(follow)


async def _fix_copied(meta: Metadata, l2_cache: TableCache[Table], txn: Transaction) -> _Tables:
    """Active tables whose COPIED flags the refcounts after TXN contradict,
    as copies (each replaced table loses its reference, its copy gains one;
    the data they point to keeps its count)."""
    h, cs = meta.header, meta.geo.cluster_size
    l1 = await meta.active_l1.entries() if h.l1_size else np.zeros(0, np.uint64)
    l1 = l1.copy()
    out = _Tables(l1, {}, {})
    idx = np.flatnonzero(l1 & np.uint64(L1E_OFFSET_MASK))
    if not len(idx):
        return out
    l2_offs = (l1[idx] & np.uint64(L1E_OFFSET_MASK)).astype(np.int64)
    l2_rc = await txn.new_refcounts(l2_offs // cs)
    changed = txn.changed_clusters()
    copies: list[tuple[int, int, Table]] = []
    for i, off, rc in zip(idx.tolist(), l2_offs.tolist(), l2_rc.tolist()):
        table = await l2_cache.get(off)
        w = l2_words(table, meta.geo.extended_l2)
        std = (w & np.uint64(OFLAG_COMPRESSED)) == 0
        host = (w & np.uint64(L2E_OFFSET_MASK)).astype(np.int64)
        ks = np.flatnonzero(std & (host != 0) & np.isin(host // cs, changed))
        new_w = w.copy()
        if len(ks):
            rcs = await txn.new_refcounts(host[ks] // cs)
            copied = np.where(rcs == 1, np.uint64(OFLAG_COPIED), np.uint64(0))
            new_w[ks] = (w[ks] & np.uint64(~OFLAG_COPIED & (1 << 64) - 1)) | copied
        if np.array_equal(new_w, w):
            want = off | (OFLAG_COPIED if rc == 1 else 0)
            l1[i] = np.uint64(want | (int(l1[i]) & ~(L1E_OFFSET_MASK | OFLAG_COPIED)))
            continue
        copy = table[:]
        l2_words(copy, meta.geo.extended_l2)[:] = new_w
        copies.append((i, off, copy))
    # (The copies change refcounts only now: the flags above come from the
    # snapshot's own changes, which these do not touch.)
    for i, off, copy in copies:
        txn.change(off, cs, -1)
        at = await txn.allocate(cs)
        meta.write(at, encode_table(copy), "L2 table copy")
        l1[i] = np.uint64(at | OFLAG_COPIED)
        out.replaced[off], out.new_tables[at] = at, copy
    return out


def _swap_tables(meta: Metadata, l2_cache: TableCache[Table], replaced: dict[int, int],
                 new_tables: dict[int, Table], old_kind: Kind | None) -> None:
    """Replaced active L2 tables leave the active set (to OLD_KIND); their
    copies join it, and the cache holds them as written."""
    cs = meta.geo.cluster_size
    for old, new in replaced.items():
        meta.drop_structure(Kind.ACTIVE_L2, old, cs)
        if old_kind is not None:
            meta.add_structure(old_kind, old, cs)
        meta.add_structure(Kind.ACTIVE_L2, new, cs)
        l2_cache.put_new(new, new_tables[new], dirty=False)


def _swap_snapshot_table(meta: Metadata, old: tuple[int, int], new_at: int,
                         entries: list[SnapshotEntry]) -> None:
    if old[1]:
        meta.drop_structure(Kind.SNAPSHOT_TABLE, *old)
    if entries:
        meta.add_structure(Kind.SNAPSHOT_TABLE, new_at, len(_table_bytes(entries)))


async def apply(meta: Metadata, alloc: Allocator, l2_cache: TableCache[Table], index: int) -> None:
    """Make the active disk snapshot INDEX's content (qemu-img snapshot -a)."""
    async with Transaction(alloc) as txn:
        await stage_apply(meta, l2_cache, txn, index)
        await txn.commit()


def with_full_extra(s: SnapshotEntry, disk_size: int) -> SnapshotEntry:
    """S with the extra data every version 3 entry has (QEMU's
    QCowSnapshotExtraData: the 64-bit VM state size, the disk size, the
    icount), as QEMU writes it: where S has no disk size, the image's
    DISK_SIZE (what QEMU takes for it when reading); no icount, none. What
    else S's extra data held is dropped (a repair: too much of it)."""
    size = s.disk_size if s.disk_size is not None else disk_size
    icount = s.icount if s.icount is not None else NO_ICOUNT
    return replace(s, extra=_EXTRA.pack(s.state_size, size, icount),
                   vm_state_size_large=s.state_size, disk_size=size, icount=icount)


async def stage_full_extra(meta: Metadata, txn: Transaction) -> None:
    """Version 3 (an upgrade, qemu-img amend -o compat=1.1): the snapshot
    table rewritten, as part of TXN, where an entry lacks the extra data a
    version 3 entry must have (QEMU's qcow2_upgrade)."""
    h = meta.header
    if all(s.disk_size is not None for s in meta.snapshots):
        return
    entries = [s if s.disk_size is not None else with_full_extra(s, h.size) for s in meta.snapshots]
    table_at = await _write_snapshot_table(meta, txn, entries)
    old_table = (h.snapshots_offset, len(_table_bytes(meta.snapshots)))
    txn.set(snapshots_offset=table_at, snapshots=entries)
    txn.then(lambda: _swap_snapshot_table(meta, old_table, table_at, entries))


def _forget_l1(meta: Metadata, s: SnapshotEntry) -> None:
    """Drop the overlap entries of snapshot S's L1 table as build_overlap_map
    made them: the part inside the file, and the part past its end (one
    entry from the later of its start and the end of the file, whatever
    its length: a damaged size can name gigabytes)."""
    end, length = meta.file.known_size, s.l1_size * 8
    if not length:
        return
    if s.l1_table_offset < end:
        meta.drop_structure(Kind.INACTIVE_L1, s.l1_table_offset, min(length, end - s.l1_table_offset))
    if s.l1_table_offset + length > end:
        meta.drop_structure(Kind.INACTIVE_L1, max(s.l1_table_offset, end), 1)


async def mend_table(meta: Metadata) -> list[str]:
    """`check --repair`, before the refcounts are rebuilt: the snapshot table
    without the entries whose L1 table cannot be read (their disks are lost
    either way; QEMU's repair deletes them too) and with the extra data a
    version 3 entry must have where one has too little. Written after the
    end of the file and switched to in one header update; no refcount
    changes (the rebuild counts what the new table names). What was done,
    one line each."""
    h, cs = meta.header, meta.geo.cluster_size
    kept: list[SnapshotEntry] = []
    done: list[str] = []
    for s in meta.snapshots:
        problem = snapshot_problem(s, h.version, cs, meta.file.known_size)
        if problem is None:
            kept.append(s)
        elif not problem[1]:
            done.append(f"Deleted snapshot {s.id_str} ({s.name}): {problem[0]}")
            _forget_l1(meta, s)
        else:
            kept.append(with_full_extra(s, h.size))
            done.append(f"Repaired snapshot {s.id_str} ({s.name}): {problem[0]}")
    lost = h.nb_snapshots - len(meta.snapshots)  # (opening.read_snapshot_table, for a repair)
    if lost:
        done.append(f"Deleted {lost} snapshot{'s' if lost > 1 else ''} whose entries cannot be read "
                    "(the snapshot table's offset or size is invalid)")
    if not done:
        return done
    at = 0
    if kept:
        at = -(-meta.file.known_size // cs) * cs
        meta.write(at, _table_bytes(kept), "new snapshot table")
        await meta.file.sync()
    old_table = (h.snapshots_offset, counted_table_length(meta.snapshots, h.nb_snapshots))
    await meta.update(snapshots_offset=at, nb_snapshots=len(kept), snapshots=kept)
    _swap_snapshot_table(meta, old_table, at, kept)
    return done


async def drop_active(meta: Metadata, l2_cache: TableCache[Table], txn: Transaction) -> list[int]:
    """The active L1 table, its L2 tables and their data each lose the
    reference the active disk holds (as a snapshot delete drops its own);
    the offsets of those L2 tables."""
    h, cs = meta.header, meta.geo.cluster_size
    tables: list[int] = []
    if not h.l1_size:
        return tables
    txn.change(h.l1_table_offset, h.l1_size * 8, -1)
    l1 = await meta.active_l1.entries() & np.uint64(L1E_OFFSET_MASK)
    for off in l1[l1 != 0].tolist():
        tables.append(off)
        txn.change(off, cs, -1)
        _, clusters = await _l2_refs(meta, l2_cache, off)
        txn.change_clusters(clusters, -1)
    return tables


async def stage_apply(meta: Metadata, l2_cache: TableCache[Table], txn: Transaction,
                      index: int) -> None:
    """Reverting the active disk to snapshot INDEX as part of TXN.

    QEMU (qcow2_snapshot_goto) overwrites the active L1 table in place with
    the snapshot's and shares its L2 tables, fixing COPIED flags afterwards
    in place; a crash between those writes leaves COPIED errors or a mix of
    both disks. Here, as for create, the active disk gets its own copies of
    the snapshot's L2 tables (COPIED computed from the refcounts after the
    commit) in a new L1 table sized for the snapshot's disk, and the header
    switches to it, the snapshot's disk size and the new refcounts at once:
    a crash leaves the old disk or the new, never a mix. The old active
    tables and data lose the active disk's reference."""
    h, geo = meta.header, meta.geo
    cs = geo.cluster_size
    snap = meta.snapshots[index]
    problem = snapshot_problem(snap, h.version, cs, meta.file.known_size)
    if problem is not None and not problem[1]:
        raise CorruptionError(f"{problem[0]}: it cannot be applied")
    size = snapshot_disk_size(snap, h.size)
    new_l1_size = max(snap.l1_size, geo.l1_entries_needed(size))
    if new_l1_size * 8 > MAX_L1_BYTES:
        raise RequestError(f"snapshot {snap.id_str}'s L1 table is too large")
    snap_l1 = np.zeros(new_l1_size, np.uint64)
    if snap.l1_size:
        snap_l1[: snap.l1_size] = read_entries(meta.file, snap.l1_table_offset, snap.l1_size)
    old_tables = await drop_active(meta, l2_cache, txn)
    sources: list[tuple[int, Table]] = []
    for i in np.flatnonzero(snap_l1 & np.uint64(L1E_OFFSET_MASK)).tolist():
        off = int(snap_l1[i]) & L1E_OFFSET_MASK
        table, clusters = await _l2_refs(meta, l2_cache, off)
        txn.change_clusters(clusters, 1)
        sources.append((i, table))
    new_l1 = np.zeros(new_l1_size, np.uint64)
    new_tables: dict[int, Table] = {}
    for i, table in sources:
        copy = table[:]
        w = l2_words(copy, meta.geo.extended_l2)
        std = (w & np.uint64(OFLAG_COMPRESSED)) == 0
        host = (w & np.uint64(L2E_OFFSET_MASK)).astype(np.int64)
        ks = np.flatnonzero(std & (host != 0))
        w &= np.uint64(~OFLAG_COPIED & (1 << 64) - 1)
        if len(ks):
            rcs = await txn.new_refcounts(host[ks] // cs)
            w[ks[rcs == 1]] |= np.uint64(OFLAG_COPIED)
        at = await txn.allocate(cs)
        meta.write(at, encode_table(copy), "L2 table copy")
        new_l1[i] = np.uint64(at | OFLAG_COPIED)
        new_tables[at] = copy
    l1_at = await txn.allocate(new_l1_size * 8) if new_l1_size else 0
    if new_l1_size:
        meta.write(l1_at, _encode(new_l1), "new L1 table")
    old_l1 = (h.l1_table_offset, h.l1_size * 8)
    txn.set(l1_table_offset=l1_at, l1_size=new_l1_size, size=size)

    def follow() -> None:
        if old_l1[1]:
            meta.drop_structure(Kind.ACTIVE_L1, *old_l1)
        if new_l1_size:
            meta.add_structure(Kind.ACTIVE_L1, l1_at, new_l1_size * 8)
        for off in old_tables:
            meta.drop_structure(Kind.ACTIVE_L2, off, cs)
        for at, table in new_tables.items():
            meta.add_structure(Kind.ACTIVE_L2, at, cs)
            l2_cache.put_new(at, table, dirty=False)
        freed = set((txn.freed * cs).tolist())
        for off in old_tables:
            if off in freed:
                l2_cache.discard(off)
    txn.then(follow)


async def empty(meta: Metadata, alloc: Allocator, l2_cache: TableCache[Table]) -> None:
    """The active disk without a single cluster (it reads the backing file
    again): a new L1 table of zeros, the old tables and data lose the
    active disk's reference, in one commit."""
    h, cs = meta.header, meta.geo.cluster_size
    async with Transaction(alloc) as txn:
        old_tables = await drop_active(meta, l2_cache, txn)
        l1_at = await txn.allocate(h.l1_size * 8) if h.l1_size else 0
        if h.l1_size:
            meta.write(l1_at, bytes(h.l1_size * 8), "new L1 table")
        txn.set(l1_table_offset=l1_at)

        def follow() -> None:
            if h.l1_size:
                meta.drop_structure(Kind.ACTIVE_L1, h.l1_table_offset, h.l1_size * 8)
                meta.add_structure(Kind.ACTIVE_L1, l1_at, h.l1_size * 8)
            freed = set((txn.freed * cs).tolist())
            for off in old_tables:
                meta.drop_structure(Kind.ACTIVE_L2, off, cs)
                if off in freed:
                    l2_cache.discard(off)
        txn.then(follow)
        await txn.commit()
