"""Refcounts: the refcount table and blocks, cluster allocation, table growth,
COPIED flags, and the rebuild of all of it from the references.

Increases go into the refcount block cache at once and reach the disk before
any L2 table that points to the new clusters (the L2 cache depends on this
one). Decreases wait in `pending` until the references they drop are on disk
(see `Image.flush`), so a crash can leak a cluster but never free one that
is still referenced.

The refcount table's pointer belongs to the metadata owner (Metadata): this
module reads it there and changes it through Metadata.update.

A cluster the refcounts call free is checked before it is handed out: it
must hold no live metadata (the overlap map) and no L2 table loaded this
session may reference it (a bitmap of referenced host clusters, filled as
tables are loaded). A hit means the refcounts lie: CorruptionError, and the
image is marked corrupt instead of losing data. References from tables never
loaded (snapshots' data, parts of the disk not touched this session) cannot
be checked without a full scan (`qcowfs check`).
"""
from __future__ import annotations

import struct
from typing import Any, Callable

import numpy as np

from .cache import TableCache
from .errors import CorruptionError, NoSpaceError, QcowError
from .format import (L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED,
                     encode_refcount_block, refcount_array, refcount_get, refcount_set,
                     refcount_store, refcount_values)
from .metadata import Metadata
from .overlap import Kind
from .references import count_references, read_entries, refcount_table

DEFAULT_REFCOUNT_CACHE_BYTES = 4 << 20
# Above this many host clusters the referenced-cluster bitmap is not kept
# (it would take more than 128 MiB).
MAX_TRACKED_CLUSTERS = 1 << 30


class Allocator:
    """Refcount bookkeeping and free-cluster search for one writable image."""

    def __init__(self, meta: Metadata) -> None:
        geo = self.geo = meta.geo
        self.meta = meta
        self.file = meta.file
        self.order = geo.refcount_order
        self.max_refcount = (1 << (1 << self.order)) - 1
        self.rpb = geo.refcounts_per_block
        self.table: list[int] = refcount_table(meta.file, meta.header)
        self.cache: TableCache[bytearray] = TableCache(
            "refcount", meta.file, DEFAULT_REFCOUNT_CACHE_BYTES // geo.cluster_size,
            self._load_block, bytes, self._write_block)
        self.pending: list[tuple[int, int]] = []   # (host offset, bytes) to release later
        self.free_hint = 0
        self._referenced = np.zeros(0, np.uint8)
        self._track_refs = -(-meta.file.known_size // geo.cluster_size) <= MAX_TRACKED_CLUSTERS

    def _write_block(self, offset: int, data: bytes) -> None:
        self.meta.write(offset, data, "refcount block", ignore=Kind.REFCOUNT_BLOCK)

    async def _load_block(self, offset: int) -> bytearray:
        raw = await self.file.read(offset, self.geo.cluster_size)
        if len(raw) < self.geo.cluster_size:
            raise CorruptionError(f"refcount block at {offset:#x} runs past the end of the file")
        return bytearray(raw)

    def _block_offset(self, rt_index: int) -> int:
        off = self.table[rt_index] if rt_index < len(self.table) else 0
        if off and (off % self.geo.cluster_size or off >= self.file.known_size):
            raise CorruptionError(f"refcount table entry {rt_index} points to an invalid offset {off:#x}")
        return off

    # ---- reading refcounts -----------------------------------------------------

    async def get(self, cluster: int) -> int:
        off = self._block_offset(cluster // self.rpb)
        if not off:
            return 0
        block = self.cache.peek(off) or await self.cache.get(off)
        return refcount_get(block, cluster % self.rpb, self.order)

    # ---- changing refcounts ------------------------------------------------------

    # ---- host clusters known to be referenced ----------------------------------------

    def note_references(self, host_offsets: np.ndarray) -> None:
        """Remember host clusters an L2 table just loaded points to."""
        if not self._track_refs or not len(host_offsets):
            return
        c = (host_offsets >> np.uint64(self.geo.cluster_bits)).astype(np.int64)
        need = (int(c.max()) >> 3) + 1
        if need > len(self._referenced):
            if need > MAX_TRACKED_CLUSTERS >> 3:
                self._track_refs = False
                return
            grown = np.zeros(max(need, 2 * len(self._referenced)), np.uint8)
            grown[: len(self._referenced)] = self._referenced
            self._referenced = grown
        np.bitwise_or.at(self._referenced, c >> 3, (np.uint8(1) << (c & 7).astype(np.uint8)))

    def _referenced_in(self, start: int, n: int) -> int:
        """The first cluster of [start, start+n) known referenced, or -1."""
        ref = self._referenced
        lo, hi = start >> 3, min(len(ref), ((start + n - 1) >> 3) + 1)
        if lo >= hi or not ref[lo:hi].any():
            return -1
        bits = np.unpackbits(ref[lo:hi], bitorder="little")
        hit = np.flatnonzero(bits[start - lo * 8 : start - lo * 8 + n])
        return start + int(hit[0]) if len(hit) else -1

    def _forget_reference(self, c: int) -> None:
        if c >> 3 < len(self._referenced):
            self._referenced[c >> 3] &= ~np.uint8(1 << (c & 7))

    def _verify_free(self, start: int, n: int) -> None:
        """Refuse to hand out clusters the refcounts call free but that are in use."""
        cs = self.geo.cluster_size
        kinds = self.meta.overlap.kinds_at(start * cs, n * cs)
        if kinds:
            self.meta.overlap.check(start * cs, n * cs, "a cluster with refcount 0")
        c = self._referenced_in(start, n)
        if c >= 0:
            raise CorruptionError(f"cluster {c} has refcount 0 but an L2 table references it")

    async def change(self, cluster: int, delta: int, count: int = 1) -> None:
        """Add DELTA to the refcounts of COUNT clusters from CLUSTER, now
        (one block lookup per refcount block, not per cluster)."""
        rpb, order = self.rpb, self.order
        end = cluster + count
        while cluster < end:
            rt_index = cluster // rpb
            stop = min(end, (rt_index + 1) * rpb)
            off = self._block_offset(rt_index)
            if not off:
                if delta < 0:
                    raise CorruptionError(f"refcount of cluster {cluster} would drop below zero")
                off = await self._new_block(rt_index)
            async with self.cache.pinned(off) as block:
                lo = cluster - rt_index * rpb
                values = refcount_values(block, order, lo, lo + stop - cluster) + delta
                self._check_counts(values, cluster)
                refcount_store(block, order, lo, values)
                freed = ((values == 0).nonzero()[0] + cluster).tolist() if delta < 0 else []
                for c in freed:
                    self._forget_reference(c)
                if freed and freed[0] < self.free_hint:
                    self.free_hint = freed[0]
                self.cache.mark_dirty(off)
                self._punch(freed)
            cluster = stop

    def _check_counts(self, values: np.ndarray, cluster: int) -> None:
        """New refcounts VALUES of the clusters from CLUSTER must fit: checked
        before any changes, so a refused change leaves the block as it was."""
        bad = (values < 0) | (values > self.max_refcount)
        if not bad.any():
            return
        first = int(bad.nonzero()[0][0])
        if values[first] < 0:
            raise CorruptionError(f"refcount of cluster {cluster + first} would drop below zero")
        raise NoSpaceError(f"refcount of cluster {cluster + first} would overflow {1 << self.order} bits")

    def _punch(self, clusters: list[int]) -> None:
        """Give the host space of clusters that just became free back to the
        host filesystem (as QEMU's discard passes down), so the image file's
        disk usage drops at once. Done before any await: a free cluster can
        be handed out again only after that, so no new data is ever punched.
        Nothing references these clusters any more (their last reference was
        dropped on disk first), so a crash loses nothing."""
        cs = self.geo.cluster_size
        run_start = run_end = -1
        for c in clusters + [-2]:
            if c == run_end:
                run_end += 1
                continue
            if run_start >= 0 and not self.file.zero_range(run_start * cs, (run_end - run_start) * cs, True):
                return  # the host filesystem cannot punch holes: keep the space
            run_start, run_end = c, c + 1

    async def change_range(self, offset: int, length: int, delta: int) -> None:
        cs = self.geo.cluster_size
        first = offset // cs
        await self.change(first, delta, (offset + length - 1) // cs + 1 - first)

    def release_later(self, offset: int, length: int) -> None:
        """Drop one reference to [offset, offset+length) once the drop is safe.
        The refcount blocks it will go through are checked now (no I/O), so a
        bad refcount table fails this request, not a later flush."""
        cs = self.geo.cluster_size
        for r in range(offset // cs // self.rpb, (offset + length - 1) // cs // self.rpb + 1):
            if not self._block_offset(r):
                raise CorruptionError(f"cluster {offset // cs} is in use but has no refcount block")
        self.pending.append((offset, length))

    async def apply_pending(self) -> bool:
        """Apply deferred decreases (the caller made the dropped references durable).
        Ranges that continue each other at a cluster boundary go as one change
        (a discard of a GiB is then a few refcount updates and host punches, not
        one per cluster); ranges that share a cluster (compressed clusters)
        stay apart, as each holds its own reference."""
        pending, self.pending = sorted(self.pending), []
        cs = self.geo.cluster_size
        merged: list[list[int]] = []
        for offset, length in pending:
            if merged and offset == merged[-1][1] and offset % cs == 0:
                merged[-1][1] = offset + length
            else:
                merged.append([offset, offset + length])
        for start, end in merged:
            await self.change_range(start, end - start, -1)
        return bool(pending)

    # ---- allocation ------------------------------------------------------------------

    async def allocate(self, n: int) -> int:
        """Find N contiguous free clusters, take one reference each; host offset."""
        while True:
            start = await self._find_free(n)
            missing = [r for r in range(start // self.rpb, (start + n - 1) // self.rpb + 1)
                       if not self._block_offset(r)]
            if not missing:
                break
            for r in missing:
                await self._new_block(r)
        self._verify_free(start, n)
        await self.change(start, 1, n)
        self.free_hint = start + n
        return start * self.geo.cluster_size

    async def _find_free(self, n: int, covered_only: bool = False, start: int | None = None) -> int:
        """First run of N free clusters at or after START (default: the hint), a
        block at a time. With COVERED_ONLY, only clusters that already have a
        refcount block (-1 if there are none)."""
        rpb = self.rpb
        c = self.free_hint if start is None else start
        if n <= 64 and not covered_only and start is None and self._free_at(c, n):
            return c  # usually: right after the last allocation
        run_start, run_len = c, 0
        while True:
            r, lo = divmod(c, rpb)
            off = self._block_offset(r)
            if not off:
                if covered_only and r >= len(self.table):
                    return -1
                segments: list[tuple[int, int]] = [] if covered_only else [(lo, rpb)]
            else:
                block = self.cache.peek(off) or await self.cache.get(off)
                free = np.concatenate(([False], refcount_array(block, self.order)[lo:] == 0, [False]))
                edges = np.diff(free.astype(np.int8))
                segments = list(zip((np.flatnonzero(edges == 1) + lo).tolist(),
                                    (np.flatnonzero(edges == -1) + lo).tolist()))
            for s, e in segments:
                g = r * rpb + s
                if run_len and g == run_start + run_len:
                    run_len += e - s
                else:
                    run_start, run_len = g, e - s
                if run_len >= n:
                    return run_start
            c = (r + 1) * rpb

    def _free_at(self, c: int, n: int) -> bool:
        """Whether clusters [c, c+n) are known free without I/O (cached blocks),
        a refcount block at a time."""
        rpb, end = self.rpb, c + n
        while c < end:
            r = c // rpb
            stop = min(end, (r + 1) * rpb)
            off = self._block_offset(r)
            if off:
                block = self.cache.peek(off)
                if block is None or refcount_values(block, self.order, c - r * rpb, stop - r * rpb).any():
                    return False
            c = stop
        return True

    async def _new_block(self, rt_index: int) -> int:
        """Create the refcount block for RT_INDEX, in a cluster some block already
        counts, or else as the first cluster of its own range (counting itself)."""
        if rt_index >= len(self.table):
            await self._grow_table(rt_index + 1)
            off = self._block_offset(rt_index)
            if off:
                return off
        cs = self.geo.cluster_size
        block = bytearray(cs)
        place = await self._find_free(1, covered_only=True)
        if place >= 0:
            self._verify_free(place, 1)
            await self.change(place, 1)
            await self.cache.flush()
        else:
            place = rt_index * self.rpb
            self._verify_free(place, 1)
            refcount_set(block, 0, self.order, 1)
        offset = place * cs
        # The block (and its own refcount) must be on disk before the table
        # entry that points to it.
        self.meta.write(offset, block, "new refcount block")
        await self.file.sync()
        self.meta.write(self.meta.header.refcount_table_offset + rt_index * 8, struct.pack(">Q", offset),
                        "refcount table entry", ignore=Kind.REFCOUNT_TABLE)
        self.table[rt_index] = offset
        self.meta.add_structure(Kind.REFCOUNT_BLOCK, offset, cs)
        self.cache.put_new(offset, block, dirty=False)
        return offset

    async def _grow_table(self, min_entries: int) -> None:
        """Move the refcount table to a larger one placed after the end of the
        file, with new blocks for the ranges it lands in, counting itself."""
        cs, rpb, per_cluster = self.geo.cluster_size, self.rpb, self.geo.cluster_size // 8
        area = -(-self.file.known_size // cs)
        nblocks, tclusters = 0, 1
        while True:
            end = area + nblocks + tclusters
            new_ranges = [r for r in range(area // rpb, (end - 1) // rpb + 1)
                          if r >= len(self.table) or not self.table[r]]
            entries = max(min_entries, -(-end // rpb), 2 * len(self.table))
            t = -(-entries // per_cluster)
            if (len(new_ranges), t) == (nblocks, tclusters):
                break
            nblocks, tclusters = len(new_ranges), t
        table_at = area + nblocks
        new_table = self.table + [0] * (tclusters * per_cluster - len(self.table))
        for j, r in enumerate(new_ranges):
            block = bytearray(cs)
            for c in range(max(r * rpb, area), min((r + 1) * rpb, end)):
                refcount_set(block, c - r * rpb, self.order, 1)
            self.meta.write((area + j) * cs, block, "new refcount block")
            new_table[r] = (area + j) * cs
        for c in range(area, end):
            if c // rpb < len(self.table) and self.table[c // rpb]:
                await self.change(c, 1)
        await self.cache.flush()
        self.meta.write(table_at * cs, np.array(new_table, dtype=">u8").tobytes(), "new refcount table")
        await self.file.sync()
        h = self.meta.header
        old = (h.refcount_table_offset, h.refcount_table_clusters * cs)
        await self.meta.update(refcount_table_offset=table_at * cs, refcount_table_clusters=tclusters)
        self.table = new_table
        self.meta.drop_structure(Kind.REFCOUNT_TABLE, *old)
        self.meta.add_structure(Kind.REFCOUNT_TABLE, table_at * cs, tclusters * cs)
        for j in range(len(new_ranges)):
            self.meta.add_structure(Kind.REFCOUNT_BLOCK, (area + j) * cs, cs)
        self.release_later(*old)

    async def flush(self) -> None:
        await self.cache.flush()

    def adopt(self, table: list[int], blocks: dict[int, bytes], replaced: dict[int, int],
              freed: np.ndarray, old_table: tuple[int, int]) -> None:
        """Follow the refcount structure a Transaction committed: TABLE with the
        new BLOCKS in place of REPLACED (range -> old offset); FREED clusters
        lost their last reference."""
        cs = self.geo.cluster_size
        self.table = table
        self.meta.drop_structure(Kind.REFCOUNT_TABLE, *old_table)
        self.meta.add_structure(Kind.REFCOUNT_TABLE, self.meta.header.refcount_table_offset,
                                self.meta.header.refcount_table_clusters * cs)
        for off in replaced.values():
            if off:
                self.cache.discard(off)
                self.meta.drop_structure(Kind.REFCOUNT_BLOCK, off, cs)
        for off, raw in blocks.items():
            self.cache.put_new(off, bytearray(raw), dirty=False)
            self.meta.add_structure(Kind.REFCOUNT_BLOCK, off, cs)
        for c in freed.tolist():
            self._forget_reference(c)
        if len(freed):
            self.free_hint = min(self.free_hint, int(freed.min()))


# ---- transactions -----------------------------------------------------------------------

class Transaction:
    """Refcount changes that take effect in the same header write as the
    structures that need them (QEMU has no such thing; see snapshots.py).

    A snapshot moves references between many tables at once: the refcount
    of a shared cluster and the COPIED flag in the active L2 entry that
    points to it must change together, or `qemu-img check` finds a COPIED
    error between the two writes. So nothing the image uses is changed in
    place: new structures are appended after the end of the file (nothing
    references or counts a cluster there), every refcount block that
    changes is written as a copy there too, with a new refcount table, and
    one header update switches to all of it together with the caller's new
    pointers. A crash before that write leaves the old image exactly as it
    was (the file is only longer); after it, the new one is complete.
    Clusters that lose their last reference are free from the commit on.

    Use it with the writer stopped and every cache flushed (Image.exclusive)."""

    def __init__(self, alloc: "Allocator") -> None:
        if alloc.cache.dirty or alloc.pending:
            raise QcowError("internal error: a refcount transaction needs flushed refcounts")
        self.alloc = alloc
        cs = alloc.geo.cluster_size
        self.start = self.end = -(-alloc.file.known_size // cs)
        self._clusters: list[np.ndarray] = []
        self._deltas: list[np.ndarray] = []
        self._sum: tuple[np.ndarray, np.ndarray] | None = None
        self._taken: list[tuple[int, int]] = []  # cluster ranges allocate() handed out
        self._search = 1
        self.freed: np.ndarray = np.zeros(0, np.int64)
        self._old_size = alloc.file.known_size
        self.committed = False
        # Header fields the commit writes, and what follows it in memory,
        # as the parts of an operation (a snapshot, a bitmap change) staged them.
        self.fields: dict[str, Any] = {}
        self._after: list[Callable[[], None]] = []

    def set(self, **fields: Any) -> None:
        """Header fields (and Metadata.update's in-memory lists) for the commit."""
        clash = set(fields) & set(self.fields)
        if clash:
            raise QcowError(f"internal error: two parts of one commit set {sorted(clash)}")
        self.fields.update(fields)

    def then(self, fn: Callable[[], None]) -> None:
        """Run FN once the commit is on disk (in-memory state follows the image)."""
        self._after.append(fn)

    async def __aenter__(self) -> "Transaction":
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        """A transaction that fails before its commit takes its clusters back
        (they lie past the old end of the file): the image is as it was."""
        if exc_type is not None and not self.committed:
            self.alloc.file.truncate(self._old_size)

    async def allocate(self, nbytes: int) -> int:
        """Host offset of clusters for NBYTES that nothing uses: free ones (refcount
        0, no metadata, not referenced by a table loaded) that this transaction did
        not take yet, else after the end of the file. The old image never points
        to them, so writing them before the commit is safe."""
        alloc = self.alloc
        n = max(1, -(-nbytes // alloc.geo.cluster_size))
        first = await self._free_run(n)
        if first < 0:
            first = self.end
            self.end += n
        self._taken.append((first, first + n))
        self.change_clusters(np.arange(first, first + n, dtype=np.int64), 1)
        return first * alloc.geo.cluster_size

    async def _place(self, n: int) -> int:
        """Where N clusters would go (free ones, else after the caller's), without taking them."""
        search = self._search
        try:
            c = await self._free_run(n)
        finally:
            self._search = search
        return c if c >= 0 else self.end

    async def _free_run(self, n: int) -> int:
        """A run of N free clusters inside the file (covered by refcount blocks) that
        this transaction has not taken, or -1."""
        alloc = self.alloc
        while self._search < self.start:
            c = await alloc._find_free(n, covered_only=True, start=self._search)
            if c < 0 or c + n > self.start:
                self._search = self.start
                return -1
            clash = [b for a, b in self._taken if a < c + n and c < b]
            if clash:
                self._search = max(clash)
                continue
            cs = alloc.geo.cluster_size
            if alloc.meta.overlap.kinds_at(c * cs, n * cs) or alloc._referenced_in(c, n) >= 0:
                self._search = c + 1  # the refcounts lie here: leave it to check
                continue
            self._search = c + n
            return c
        return -1

    def change(self, offset: int, length: int, delta: int) -> None:
        """DELTA to every cluster of [offset, offset+length)."""
        cs = self.alloc.geo.cluster_size
        self.change_clusters(np.arange(offset // cs, (offset + length - 1) // cs + 1, dtype=np.int64), delta)

    def change_clusters(self, clusters: np.ndarray, delta: int) -> None:
        """DELTA to each cluster index of CLUSTERS (repeats count again)."""
        if len(clusters):
            self._clusters.append(clusters.astype(np.int64))
            self._deltas.append(np.full(len(clusters), delta, np.int64))
            self._sum = None

    async def new_refcounts(self, clusters: np.ndarray) -> np.ndarray:
        """What the refcounts of CLUSTERS (indexes) will be after the commit."""
        alloc = self.alloc
        clusters = clusters.astype(np.int64)
        out = np.zeros(len(clusters), np.int64)
        ranges = clusters // alloc.rpb
        for r in np.unique(ranges).tolist():
            off = alloc._block_offset(r)
            if off:
                sel = ranges == r
                values = refcount_array(await alloc.cache.get(off), alloc.order)
                out[sel] = values[clusters[sel] - r * alloc.rpb]
        out[clusters >= self.start] = 0
        cl, delta = self._summed()
        if len(cl):
            pos = np.minimum(np.searchsorted(cl, clusters), len(cl) - 1)
            hit = cl[pos] == clusters
            out[hit] += delta[pos[hit]]
        return out

    def changed_clusters(self) -> np.ndarray:
        """The clusters (sorted indexes) whose refcount the transaction changes so far."""
        return self._summed()[0]

    def _summed(self) -> tuple[np.ndarray, np.ndarray]:
        """(clusters, net delta) of every change so far, sorted (kept until the next change)."""
        if self._sum is None:
            if not self._clusters:
                return np.zeros(0, np.int64), np.zeros(0, np.int64)
            cl, inv = np.unique(np.concatenate(self._clusters), return_inverse=True)
            delta = np.bincount(inv, weights=np.concatenate(self._deltas), minlength=len(cl)).astype(np.int64)
            keep = delta != 0
            self._sum = cl[keep], delta[keep]
        return self._sum

    async def commit(self) -> None:
        """Write the changed refcount blocks and a new table after the new
        structures, then switch the header to them and to the staged fields
        at once; then what was staged to follow runs."""
        fields = self.fields
        alloc, meta = self.alloc, self.alloc.meta
        geo = alloc.geo
        cs, rpb, order, per_cluster = geo.cluster_size, alloc.rpb, alloc.order, geo.cluster_size // 8
        h = meta.header
        old_table_at, old_tclusters = h.refcount_table_offset, h.refcount_table_clusters
        self.change(old_table_at, old_tclusters * cs, -1)
        cl, delta = self._summed()
        ranges = set((cl // rpb).tolist()) | set(range(self.start // rpb, (self.end - 1) // rpb + 1))
        nblocks, tclusters, blocks_at = 0, 0, self.end
        for _ in range(64):
            # The blocks being replaced lose their reference; the new blocks
            # and table (in free clusters, else after the caller's) gain one:
            # both may touch further ranges.
            while True:  # the old blocks lie in ranges of their own: follow them all
                replaced = {r: alloc._block_offset(r) for r in ranges}
                more = {off // cs // rpb for off in replaced.values() if off} - ranges
                if not more:
                    break
                ranges |= more
            end = max(self.end, blocks_at + nblocks + tclusters)
            ranges |= set(range(self.start // rpb, (end - 1) // rpb + 1))
            ranges |= set(range(blocks_at // rpb, (blocks_at + max(1, nblocks + tclusters) - 1) // rpb + 1))
            entries = max(len(alloc.table), max(ranges) + 1)
            t = max(old_tclusters, -(-entries // per_cluster))
            if (len(ranges), t) == (nblocks, tclusters) and set(replaced) == ranges:
                break
            nblocks, tclusters = len(ranges), t
            blocks_at = await self._place(nblocks + tclusters)
        else:
            raise QcowError("internal error: the new refcount structure found no stable place")
        table_at = blocks_at + nblocks
        extra = [off // cs for off in replaced.values() if off]
        cl_all = np.concatenate([cl, np.array(extra, np.int64),
                                 np.arange(blocks_at, table_at + tclusters, dtype=np.int64)])
        d_all = np.concatenate([delta, np.full(len(extra), -1, np.int64),
                                np.ones(table_at + tclusters - blocks_at, np.int64)])
        table = np.zeros(tclusters * per_cluster, np.uint64)
        table[: len(alloc.table)] = alloc.table
        new_blocks: dict[int, bytes] = {}
        freed = []
        for j, r in enumerate(sorted(ranges)):
            old = replaced[r]
            values = (refcount_array(await alloc.cache.get(old), order).astype(np.int64) if old
                      else np.zeros(rpb, np.int64))
            before = values.copy()
            sel = (cl_all >= r * rpb) & (cl_all < (r + 1) * rpb)
            np.add.at(values, cl_all[sel] - r * rpb, d_all[sel])
            bad = np.flatnonzero((values < 0) | (values > alloc.max_refcount))
            if len(bad):
                c = r * rpb + int(bad[0])
                if values[bad[0]] < 0:
                    raise CorruptionError(f"refcount of cluster {c} would drop below zero")
                raise NoSpaceError(f"refcount of cluster {c} would overflow {1 << order} bits")
            mine = [(max(a, r * rpb), min(b, (r + 1) * rpb)) for a, b in self._taken + [(blocks_at, table_at + tclusters)]
                    if a < (r + 1) * rpb and r * rpb < b]
            if any((values[a - r * rpb : b - r * rpb] != 1).any() for a, b in mine):
                raise CorruptionError("clusters the refcounts call free are counted (the refcounts "
                                      "are wrong: run `qcowfs check --repair`)")
            freed.append(r * rpb + np.flatnonzero((values == 0) & (before > 0)))
            at = (blocks_at + j) * cs
            new_blocks[at] = encode_refcount_block(values.astype(np.uint64), order, cs)
            table[r] = at
        for at, raw in new_blocks.items():
            meta.write(at, raw, "refcount block copy")
        meta.write(table_at * cs, table.astype(">u8").tobytes(), "new refcount table")
        await meta.file.sync()
        await meta.update(refcount_table_offset=table_at * cs, refcount_table_clusters=tclusters, **fields)
        self.committed = True
        # Live: the allocator follows the new structure.
        self.freed = np.concatenate(freed) if freed else np.zeros(0, np.int64)
        alloc.adopt([int(x) for x in table.tolist()], new_blocks, replaced, self.freed,
                    (old_table_at, old_tclusters * cs))
        for fn in self._after:
            fn()

# ---- COPIED flags ---------------------------------------------------------------------

def stored_refcount(stored: np.ndarray, offset: int, cluster_size: int) -> int:
    """The refcount STORED gives the cluster at OFFSET (0 past its end)."""
    c = offset // cluster_size
    return int(stored[c]) if c < len(stored) else 0


def copied_errors(meta: Metadata, stored: np.ndarray, active_tables: dict[int, np.ndarray],
                  external: bool) -> tuple[list[int], dict[int, list[int]]]:
    """Active L1 indexes and L2 entry indexes whose COPIED flag disagrees with
    the refcounts STORED (COPIED is set iff the refcount is exactly 1)."""
    h, geo = meta.header, meta.geo
    cs = geo.cluster_size
    bad_l1: list[int] = []
    bad_l2: dict[int, list[int]] = {}
    if not h.l1_size:
        return bad_l1, bad_l2

    def rc(off: int) -> int:
        return stored_refcount(stored, off, cs)

    # References past the end of the file are errors of their own (counted
    # once, as qemu-img does), not COPIED errors too.
    end = meta.file.known_size
    for i, e in enumerate(read_entries(meta.file, h.l1_table_offset, h.l1_size).tolist()):
        off = e & L1E_OFFSET_MASK
        if off and off < end and (rc(off) == 1) != bool(e & OFLAG_COPIED):
            bad_l1.append(i)
    step = 2 if geo.extended_l2 else 1
    for off, table in active_tables.items():
        wrong = []
        for k, e in enumerate(table[::step].tolist()):
            if e & OFLAG_COMPRESSED:
                if e & OFLAG_COPIED:
                    wrong.append(k)
                continue
            host = e & L2E_OFFSET_MASK
            if not host or external or host >= end:
                continue
            if (rc(host) == 1) != bool(e & OFLAG_COPIED):
                wrong.append(k)
        if wrong:
            bad_l2[off] = wrong
    return bad_l1, bad_l2


async def fix_copied(meta: Metadata, stored: np.ndarray, active_tables: dict[int, np.ndarray],
                     external: bool) -> None:
    """Make every COPIED flag of the active tables agree with STORED."""
    bad_l1, bad_l2 = copied_errors(meta, stored, active_tables, external)
    geo = meta.geo
    step = 2 if geo.extended_l2 else 1
    for off, ks in bad_l2.items():
        table = active_tables[off].copy()
        for k in ks:
            e = int(table[k * step])
            host = e & L2E_OFFSET_MASK
            want = not e & OFLAG_COMPRESSED and stored[host // geo.cluster_size] == 1
            table[k * step] = (e | OFLAG_COPIED) if want else (e & ~OFLAG_COPIED)
        meta.write(off, table.astype(">u8").tobytes(), "L2 table", ignore=Kind.ACTIVE_L2)
    if bad_l2:
        await meta.file.sync()
    l1 = meta.active_l1
    for i in bad_l1:
        e = await l1.get(i)
        c = (e & L1E_OFFSET_MASK) // geo.cluster_size
        await l1.set(i, (e | OFLAG_COPIED) if stored[c] == 1 else (e & ~OFLAG_COPIED))
    if bad_l1:
        await meta.file.sync()


# ---- rebuild ----------------------------------------------------------------------------

async def rebuild(meta: Metadata, external: bool,
                  progress: Callable[[float], None] | None = None) -> None:
    """Replace the refcount structure by one computed from the references,
    then make every COPIED flag exact. Crash-safe: the new blocks and table
    go where nothing lives (free clusters, else after the end of the file)
    and the header switches to them only once they are on disk; until then
    the old structure stands as it was.
    (Inconsistent references are counted as they are; `qcowfs check` reports them.)"""
    counted = count_references(meta, lambda _msg: None, refcount_structure=False, progress=progress)
    counts = counted.counts
    geo, cs = meta.geo, meta.geo.cluster_size
    rpb, per_cluster = geo.refcounts_per_block, cs // 8
    if counts.max(initial=0) > (1 << (1 << geo.refcount_order)) - 1:
        raise QcowError("a cluster has more references than the refcount width can count")
    placed = _place_in_free_space(meta, counts) or _place_after_end(meta, counts)
    full, ranges, block_at, table_at, tclusters = placed
    table = np.zeros(tclusters * per_cluster, np.uint64)
    for r, at in zip(ranges, block_at):
        meta.write(at, encode_refcount_block(full[r * rpb : (r + 1) * rpb], geo.refcount_order, cs),
                   "new refcount block")
        table[r] = at
    meta.write(table_at, table.astype(">u8").tobytes(), "new refcount table")
    await meta.file.sync()
    await meta.update(refcount_table_offset=table_at, refcount_table_clusters=tclusters)
    meta.replace_structures(Kind.REFCOUNT_TABLE, [(table_at, tclusters * cs)])
    meta.replace_structures(Kind.REFCOUNT_BLOCK, [(int(o), cs) for o in table[table != 0].tolist()])
    await fix_copied(meta, full, counted.active_tables, external)


# (refcounts, covered ranges, block offsets, table offset, table clusters)
Placement = tuple[np.ndarray, list[int], list[int], int, int]


def _layout(counts: np.ndarray, rpb: int, per_cluster: int, own: list[int]) -> tuple[np.ndarray, list[int], int]:
    """Refcounts with the new structure's own clusters OWN counted, the
    ranges that then need a block, and the table size in clusters."""
    full = np.zeros(max(len(counts), max(own, default=0) + 1), np.int64)
    full[: len(counts)] = counts
    full[own] = 1
    ranges = sorted(set((np.flatnonzero(full) // rpb).tolist()))
    covered = ranges[-1] * rpb + rpb  # past the last range everything is 0
    full = np.concatenate([full[:covered], np.zeros(max(0, covered - len(full)), np.int64)])
    return full, ranges, -(-(ranges[-1] + 1) // per_cluster)


def _place_in_free_space(meta: Metadata, counts: np.ndarray) -> Placement | None:
    """Put the new structure in clusters nothing references and the old
    refcount structure does not use (it must stay valid until the header
    switches), as QEMU's repair does: the file does not grow. None if the
    free space is too small or too scattered."""
    geo, h = meta.geo, meta.header
    cs, rpb, per_cluster = geo.cluster_size, geo.refcounts_per_block, geo.cluster_size // 8
    nfile = -(-meta.file.known_size // cs)
    busy = np.zeros(nfile, bool)
    busy[0] = True
    busy[: min(nfile, len(counts))] |= counts[:nfile] > 0
    t0 = h.refcount_table_offset // cs
    busy[t0 : t0 + h.refcount_table_clusters] = True
    for off in refcount_table(meta.file, h):
        if off and off // cs < nfile:
            busy[off // cs] = True
    free = np.flatnonzero(~busy)
    nblocks, tclusters = len(set((np.flatnonzero(counts) // rpb).tolist())), 1
    for _ in range(8):
        table_c = _first_run(~busy, tclusters)
        if table_c < 0:
            return None
        blocks = [int(c) for c in free if not table_c <= c < table_c + tclusters][:nblocks]
        if len(blocks) < nblocks:
            return None
        own = blocks + list(range(table_c, table_c + tclusters))
        full, ranges, t = _layout(counts, rpb, per_cluster, own)
        if (len(ranges), t) == (nblocks, tclusters):
            return full, ranges, [c * cs for c in blocks], table_c * cs, tclusters
        nblocks, tclusters = len(ranges), t
    return None


def _first_run(free: np.ndarray, n: int) -> int:
    """Start of the first run of N True values, or -1."""
    edges = np.diff(np.concatenate(([0], free.astype(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    fits = np.flatnonzero(ends - starts >= n)
    return int(starts[fits[0]]) if len(fits) else -1


def _place_after_end(meta: Metadata, counts: np.ndarray) -> Placement:
    """The new blocks and table right after everything else, counting themselves."""
    geo = meta.geo
    cs, rpb, per_cluster = geo.cluster_size, geo.refcounts_per_block, geo.cluster_size // 8
    area = max(len(counts), -(-meta.file.known_size // cs))
    nblocks, tclusters = len(set((np.flatnonzero(counts) // rpb).tolist())) + 1, 1
    while True:
        own = list(range(area, area + nblocks + tclusters))
        full, ranges, t = _layout(counts, rpb, per_cluster, own)
        if (len(ranges), t) == (nblocks, tclusters):
            return full, ranges, [(area + j) * cs for j in range(nblocks)], (area + nblocks) * cs, tclusters
        nblocks, tclusters = len(ranges), t
