"""The allocator: refcount table and blocks, cluster allocation, table growth.

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
from typing import NamedTuple

import numpy as np

from ..cache import TableCache
from ...errors import CorruptionError, NoSpaceError
from ...format import refcount_get, refcount_set
from ...format.bulk import refcount_array, refcount_store, refcount_values
from ..metadata import Metadata
from ..overlap import Kind
from ..stored import refcount_table

DEFAULT_REFCOUNT_CACHE_BYTES = 4 << 20
# Above this many host clusters the referenced-cluster bitmap is not kept
# (it would take more than 128 MiB).
MAX_TRACKED_CLUSTERS = 1 << 30


class Release(NamedTuple):
    """One reference a write is about to drop: host bytes [offset,
    offset+length). PUNCH: free host space too if the refcount reaches 0.
    SHARED: the entry dropping it lacks COPIED, so it says other references
    exist; the refcount must then stay above 0 after the drop (QEMU's check
    counts refcount 1 without COPIED as corruption, and freeing the cluster
    would hand out data another entry still reads)."""
    offset: int
    length: int
    punch: bool = True
    shared: bool = False


class ClusterBits:
    """A set of host cluster indexes, as a bitmap that grows as needed."""

    def __init__(self) -> None:
        self.bits = np.zeros(0, np.uint8)

    def add(self, clusters: np.ndarray) -> None:
        need = (int(clusters.max()) >> 3) + 1
        if need > len(self.bits):
            grown = np.zeros(max(need, 2 * len(self.bits)), np.uint8)
            grown[: len(self.bits)] = self.bits
            self.bits = grown
        np.bitwise_or.at(self.bits, clusters >> 3, (np.uint8(1) << (clusters & 7).astype(np.uint8)))

    def first_in(self, start: int, n: int) -> int:
        """The first cluster of [start, start+n) in the set, or -1."""
        ref = self.bits
        lo, hi = start >> 3, min(len(ref), ((start + n - 1) >> 3) + 1)
        if lo >= hi or not ref[lo:hi].any():
            return -1
        bits = np.unpackbits(ref[lo:hi], bitorder="little")
        hit = np.flatnonzero(bits[start - lo * 8 : start - lo * 8 + n])
        return start + int(hit[0]) if len(hit) else -1

    def discard(self, c: int) -> None:
        if c >> 3 < len(self.bits):
            self.bits[c >> 3] &= ~np.uint8(1 << (c & 7))


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
        # (host offset, bytes, punch) to release later; PUNCH: give the host space
        # back if the refcount reaches 0 (see release_later).
        self.pending: list[tuple[int, int, bool]] = []
        # Per cluster, how many of the pending decreases fall on it (up to 65535).
        self._pending_counts = np.zeros(0, np.uint16)
        self.free_hint = 0
        # Host clusters the L2 tables loaded so far reference (all of them), and
        # those they use as standard data clusters.
        self._referenced = ClusterBits()
        self._data_refs = ClusterBits()
        self._track_refs = -(-meta.file.known_size // geo.cluster_size) <= MAX_TRACKED_CLUSTERS
        self.uncounted_below = self._uncounted_below()
        # Cluster ranges [a, b) whose refcounts are guesses (unblocked_counts:
        # 1 for what the file held where a refcount block was missing). Such a
        # cluster may have more references (compressed clusters sharing it, a
        # snapshot): a drop never frees it (a leak at worst). Hostile soak seed
        # 11003393: one guessed 1 for a host cluster eight compressed clusters
        # shared, an overwrite of one of them freed it, and the next
        # allocation wrote over the other seven.
        self._guessed: list[tuple[int, int]] = []

    def _uncounted_below(self) -> int:
        """The clusters below which a range no refcount block covers (a
        refcount table entry of 0) is damage, not free space. QEMU counts every
        cluster it allocates, so such a range inside the file may hold clusters
        in use, by tables this session has not loaded (hostile soak seed
        9900082: a zeroed entry, and data written into clusters another guest
        range read): they are not handed out (a leak at worst). That is every
        cluster of the file, unless all it holds past the last range a block
        covers is a hole (a file extended by truncate): that tail is free."""
        cs, rpb = self.geo.cluster_size, self.rpb
        clusters = -(-self.file.known_size // cs)
        last = next((r for r in range(len(self.table) - 1, -1, -1) if self.table[r]), -1)
        counted = (last + 1) * rpb
        if counted < clusters and self.file.seek(counted * cs, data=True) is None:
            return counted
        return clusters

    def _write_block(self, offset: int, data: bytes) -> None:
        self._check_not_referenced(offset)
        self.meta.write(offset, data, "refcount block", ignore=Kind.REFCOUNT_BLOCK)

    def _check_not_referenced(self, offset: int) -> None:
        """Refuse to write a refcount block that a loaded L2 table still
        references (the overlap map knows metadata, not the disk's data): a
        refcount table entry pointing at a data cluster, whose counts would
        be written over the guest's bytes (hostile soak seed 11000775: a
        flipped entry, and an allocation set a bit in the data; QEMU, with
        lazy refcounts, had not written its refcount blocks yet when it found
        the damage). Checked when written, not when read: an L2 entry that
        aliases a real refcount block may be dropped first (a discard:
        Writer._droppable), and the block is then written as it should be."""
        if self.referenced_in(offset // self.geo.cluster_size, 1) >= 0:
            raise CorruptionError(f"refcount block at {offset:#x} is a cluster an L2 table references: the "
                                  "refcount table is damaged")

    async def _load_block(self, offset: int) -> bytearray:
        other = self.meta.overlap.kinds_at(offset, self.geo.cluster_size) & ~Kind.REFCOUNT_BLOCK
        if other:
            # (A refcount table entry pointing at an L1 or L2 table: its "counts"
            # would be read from, and written over, that table.)
            raise CorruptionError(f"refcount block at {offset:#x} overlaps other metadata: the refcount "
                                  "table is damaged")
        raw = await self.file.read(offset, self.geo.cluster_size)
        if len(raw) < self.geo.cluster_size:
            raise CorruptionError(f"refcount block at {offset:#x} runs past the end of the file")
        return bytearray(raw)

    def block_offset(self, rt_index: int) -> int:
        """The host offset of refcount block RT_INDEX (0: none yet), validated."""
        off = self.table[rt_index] if rt_index < len(self.table) else 0
        if off and (off % self.geo.cluster_size or off >= self.file.known_size):
            raise CorruptionError(f"refcount table entry {rt_index} points to an invalid offset {off:#x}")
        return off

    # ---- reading refcounts -----------------------------------------------------

    async def get(self, cluster: int) -> int:
        off = self.block_offset(cluster // self.rpb)
        if not off:
            return 0
        block = self.cache.peek(off) or await self.cache.get(off)
        return refcount_get(block, cluster % self.rpb, self.order)

    async def frees(self, offset: int, length: int) -> bool:
        """Whether one more drop of [offset, offset+length) would bring a
        cluster of it to refcount 0, the drops already pending counted: the
        drop that would let the cluster be reused."""
        cs = self.geo.cluster_size
        first, end = offset // cs, (offset + length - 1) // cs + 1
        guessed = self._guessed_in(first, end)
        for c in range(first, end):
            if guessed is not None and guessed[c - first]:
                continue  # (never freed: see _guessed)
            pending = int(self._pending_counts[c]) if c < len(self._pending_counts) else 0
            if await self.get(c) - pending <= 1:
                return True
        return False

    # ---- changing refcounts ------------------------------------------------------

    # ---- host clusters known to be referenced ----------------------------------------

    def note_references(self, host_offsets: np.ndarray, data: bool = True) -> None:
        """Remember host clusters an L2 table just loaded points to: DATA, as
        standard data clusters, or (not DATA) as clusters compressed data claims."""
        if not self._track_refs or not len(host_offsets):
            return
        c = (host_offsets >> np.uint64(self.geo.cluster_bits)).astype(np.int64)
        if int(c.max()) >= MAX_TRACKED_CLUSTERS:
            self._track_refs = False
            self._referenced, self._data_refs = ClusterBits(), ClusterBits()
            return
        self._referenced.add(c)
        if data:
            self._data_refs.add(c)

    def referenced_in(self, start: int, n: int) -> int:
        """The first cluster of [start, start+n) known referenced, or -1."""
        return self._referenced.first_in(start, n)

    def data_referenced_in(self, start: int, n: int) -> int:
        """The first cluster of [start, start+n) a loaded L2 table uses as a
        standard data cluster, or -1 (compressed data never lies there)."""
        return self._data_refs.first_in(start, n)

    def alias_dropped(self, host: int) -> None:
        """An L2 entry that aliased HOST's cluster (metadata, by the checks:
        see Writer._droppable) is gone: no loaded table references it now,
        so its counts may be read and written again."""
        self._forget_reference(host // self.geo.cluster_size)

    def _forget_reference(self, c: int) -> None:
        self._referenced.discard(c)
        self._data_refs.discard(c)

    def _verify_free(self, start: int, n: int) -> None:
        """Refuse to hand out clusters the refcounts call free but that are in use."""
        cs = self.geo.cluster_size
        kinds = self.meta.overlap.kinds_at(start * cs, n * cs)
        if kinds:
            self.meta.overlap.check(start * cs, n * cs, "a cluster with refcount 0")
        c = self.referenced_in(start, n)
        if c >= 0:
            raise CorruptionError(f"cluster {c} has refcount 0 but an L2 table references it")

    async def change(self, cluster: int, delta: int, count: int = 1, punch: bool = True) -> None:
        """Add DELTA to the refcounts of COUNT clusters from CLUSTER, now
        (one block lookup per refcount block, not per cluster)."""
        rpb, order = self.rpb, self.order
        end = cluster + count
        while cluster < end:
            rt_index = cluster // rpb
            stop = min(end, (rt_index + 1) * rpb)
            off = self.block_offset(rt_index)
            if not off:
                if delta < 0:
                    raise CorruptionError(f"refcount of cluster {cluster} would drop below zero")
                off = await self._new_block(rt_index)
            async with self.cache.pinned(off) as block:
                lo = cluster - rt_index * rpb
                values = refcount_values(block, order, lo, lo + stop - cluster) + delta
                self._check_counts(values, cluster)
                guessed = self._guessed_in(cluster, stop) if delta < 0 else None
                if guessed is not None:
                    values[guessed & (values < 1)] = 1  # (never freed: see _guessed)
                refcount_store(block, order, lo, values)
                freed = ((values == 0).nonzero()[0] + cluster).tolist() if delta < 0 else []
                for c in freed:
                    self._forget_reference(c)
                if freed and freed[0] < self.free_hint:
                    self.free_hint = freed[0]
                self.cache.mark_dirty(off)
                if punch:
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
        # Never metadata, whatever the refcounts say (they may be damaged).
        clusters = [c for c in clusters if not self.meta.overlap.kinds_at(c * cs, cs)]
        run_start = run_end = -1
        for c in clusters + [-2]:
            if c == run_end:
                run_end += 1
                continue
            if run_start >= 0 and not self.file.zero_range(run_start * cs, (run_end - run_start) * cs, True):
                return  # the host filesystem cannot punch holes: keep the space
            run_start, run_end = c, c + 1

    async def change_range(self, offset: int, length: int, delta: int, punch: bool = True) -> None:
        cs = self.geo.cluster_size
        first = offset // cs
        await self.change(first, delta, (offset + length - 1) // cs + 1 - first, punch)

    def release_later(self, offset: int, length: int, punch: bool = True) -> None:
        """Drop one reference to [offset, offset+length) once the drop is safe.
        The refcount blocks it will go through are checked now (no I/O), so a
        bad refcount table fails this request, not a later flush. Without
        PUNCH a cluster this frees keeps its bytes on the host (the sectors of
        a compressed cluster: a damaged descriptor may claim clusters that
        another entry, in a table not loaded, still uses; QEMU leaves them too)."""
        cs = self.geo.cluster_size
        for r in range(offset // cs // self.rpb, (offset + length - 1) // cs // self.rpb + 1):
            if not self.block_offset(r):
                raise CorruptionError(f"cluster {offset // cs} is in use but has no refcount block")
        self.pending.append((offset, length, punch))
        first, last = offset // cs, (offset + length - 1) // cs
        if last >= len(self._pending_counts):
            grown = np.zeros(max(last + 1, 2 * len(self._pending_counts)), np.uint16)
            grown[: len(self._pending_counts)] = self._pending_counts
            self._pending_counts = grown
        counts = self._pending_counts[first : last + 1]
        counts[counts < np.iinfo(np.uint16).max] += 1

    async def verify_release(self, releases: list[Release]) -> None:
        """Refuse now, before anything changes, the drops of RELEASES where a
        refcount would go below zero (below one for a SHARED release) once
        the drops already pending and those earlier in RELEASES are counted: the refcounts or the entry
        are damaged there. The write that wanted the drop then fails before
        it is acknowledged, instead of its fsync failing later (when the drop
        is applied), and no cluster still in use is freed."""
        cs, rpb = self.geo.cluster_size, self.rpb
        earlier: dict[int, int] = {}  # drops of RELEASES already counted (compressed clusters share)
        for rel in releases:
            c, end = rel.offset // cs, (rel.offset + rel.length - 1) // cs + 1
            for k in range(c, end):
                earlier[k] = earlier.get(k, 0) + 1
            while c < end:
                r = c // rpb
                stop = min(end, (r + 1) * rpb)
                off = self.block_offset(r)
                if not off:
                    raise CorruptionError(f"cluster {c} is in use but has no refcount block")
                block = self.cache.peek(off) or await self.cache.get(off)
                values = refcount_values(block, self.order, c - r * rpb, stop - r * rpb)
                pending = self._pending_counts[c:stop]
                need = np.full(stop - c, 2 if rel.shared else 1, np.int64)
                need[: len(pending)] += pending
                need += [earlier[k] - 1 for k in range(c, stop)]
                guessed = self._guessed_in(c, stop)
                if guessed is not None:
                    need[guessed] = 1  # (a guessed count says nothing more: the drop leaves it at 1)
                short = np.flatnonzero(np.asarray(values) < need)
                if len(short):
                    bad = c + int(short[0])
                    value = int(values[short[0]])
                    if rel.shared and value >= need[short[0]] - 1:
                        raise CorruptionError(f"cluster {bad} has refcount {value} but an entry without "
                                              "COPIED says it is shared (the refcounts are damaged)")
                    raise CorruptionError(f"cluster {bad} is in use but its refcount is "
                                          f"{value} (the refcounts are damaged)")
                c = stop

    def forget_pending(self) -> None:
        """Drop every pending decrease (the image is marked corrupt: a leak, never a loss)."""
        self.pending = []
        self._pending_counts = np.zeros(0, np.uint16)

    async def apply_pending(self) -> bool:
        """Apply deferred decreases (the caller made the dropped references durable).
        Ranges that continue each other at a cluster boundary go as one change
        (a discard of a GiB is then a few refcount updates and host punches, not
        one per cluster); ranges that share a cluster (compressed clusters)
        stay apart, as each holds its own reference."""
        pending, self.pending = sorted(self.pending), []
        cs = self.geo.cluster_size
        for offset, length, _punch in pending:
            self._pending_counts[offset // cs : (offset + length - 1) // cs + 1] = 0
        merged: list[tuple[int, int, bool]] = []
        for offset, length, punch in pending:
            if merged and offset == merged[-1][1] and offset % cs == 0 and punch == merged[-1][2]:
                merged[-1] = (merged[-1][0], offset + length, punch)
            else:
                merged.append((offset, offset + length, punch))
        for start, end, punch in merged:
            await self.change_range(start, end - start, -1, punch)
        return bool(pending)

    # ---- allocation ------------------------------------------------------------------

    async def allocate(self, n: int) -> int:
        """Find N contiguous free clusters, take one reference each; host offset."""
        while True:
            start = await self.find_free(n)
            missing = [r for r in range(start // self.rpb, (start + n - 1) // self.rpb + 1)
                       if not self.block_offset(r)]
            if not missing:
                break
            for r in missing:
                await self._new_block(r)
        self._verify_free(start, n)
        await self.change(start, 1, n)
        self.free_hint = start + n
        return start * self.geo.cluster_size

    async def find_free(self, n: int, covered_only: bool = False, start: int | None = None) -> int:
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
            off = self.block_offset(r)
            if not off:
                if covered_only and r >= len(self.table):
                    return -1
                lo = max(lo, self.uncounted_below - r * rpb)
                segments: list[tuple[int, int]] = [] if covered_only or lo >= rpb else [(lo, rpb)]
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
            off = self.block_offset(r)
            if off:
                block = self.cache.peek(off)
                if block is None or refcount_values(block, self.order, c - r * rpb, stop - r * rpb).any():
                    return False
            elif c < self.uncounted_below:
                return False
            c = stop
        return True

    def unblocked_counts(self, rt_index: int) -> np.ndarray:
        """The refcounts a new block for range RT_INDEX starts from, which no
        block covered: 1 for the clusters below the file's first end (they
        may be in use: uncounted_below), 0 past it. The 1s are guesses
        (_guessed): no drop frees those clusters."""
        first = rt_index * self.rpb
        guessed = (first, min(first + self.rpb, self.uncounted_below))
        if guessed[0] < guessed[1] and guessed not in self._guessed:
            self._guessed.append(guessed)
        return (np.arange(first, first + self.rpb) < self.uncounted_below).astype(np.int64)

    def _guessed_in(self, start: int, stop: int) -> np.ndarray | None:
        """Which clusters of [start, stop) have guessed refcounts (None: none)."""
        hits = [(max(a, start), min(b, stop)) for a, b in self._guessed if a < stop and start < b]
        if not hits:
            return None
        mask = np.zeros(stop - start, bool)
        for a, b in hits:
            mask[a - start : b - start] = True
        return mask

    async def _new_block(self, rt_index: int) -> int:
        """Create the refcount block for RT_INDEX, in a cluster some block already
        counts, or else in its own range (counting itself). The clusters of its
        range below the file's first end count as used once (uncounted_below:
        they may be in use; a leak at worst, and the right count for a cluster
        one table references)."""
        if rt_index >= len(self.table):
            await self._grow_table(rt_index + 1)
            off = self.block_offset(rt_index)
            if off:
                return off
        cs, first = self.geo.cluster_size, rt_index * self.rpb
        block = bytearray(cs)
        refcount_store(block, self.order, 0, self.unblocked_counts(rt_index))
        place = await self.find_free(1, covered_only=True)
        if place >= 0:
            self._verify_free(place, 1)
            await self.change(place, 1)
            await self.cache.flush()
        else:
            place = max(first, self.uncounted_below)
            if place >= first + self.rpb:
                raise CorruptionError(f"refcount table entry {rt_index} is missing for clusters the file holds, "
                                      "and no counted cluster is free for a new refcount block")
            self._verify_free(place, 1)
            refcount_set(block, place - first, self.order, 1)
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
