"""Refcounts: the refcount table and blocks, cluster allocation, table growth.

Increases go into the refcount block cache at once and reach the disk before
any L2 table that points to the new clusters (the L2 cache depends on this
one). Decreases wait in `pending` until the references they drop are on disk
(see `Image.flush`), so a crash can leak a cluster but never free one that
is still referenced.
"""
from __future__ import annotations

import struct

import numpy as np

from .cache import TableCache
from .errors import CorruptionError, NoSpaceError
from .format import (REFT_OFFSET_MASK, Geometry, refcount_array, refcount_get,
                     refcount_set)
from .hostfile import HostFile

DEFAULT_REFCOUNT_CACHE_BYTES = 4 << 20
HEADER_REFTABLE_FIELDS = 48  # refcount_table_offset (8) + refcount_table_clusters (4)


class Allocator:
    """Refcount bookkeeping and free-cluster search for one writable image."""

    def __init__(self, geo: Geometry, file: HostFile, table_offset: int, table_clusters: int) -> None:
        self.geo = geo
        self.file = file
        self.order = geo.refcount_order
        self.max_refcount = (1 << (1 << self.order)) - 1
        self.rpb = geo.refcounts_per_block
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        raw = file.read_sync(table_offset, table_clusters * geo.cluster_size)
        self.table: list[int] = [e & REFT_OFFSET_MASK for e in
                                 np.frombuffer(raw, ">u8").astype(np.uint64).tolist()]
        self.cache: TableCache[bytearray] = TableCache(
            "refcount", file, DEFAULT_REFCOUNT_CACHE_BYTES // geo.cluster_size,
            self._load_block, bytes)
        self.pending: list[tuple[int, int]] = []   # (host offset, bytes) to release later
        self.free_hint = 0

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
                base = rt_index * rpb
                for c in range(cluster, stop):
                    value = refcount_get(block, c - base, order) + delta
                    if value < 0:
                        raise CorruptionError(f"refcount of cluster {c} would drop below zero")
                    if value > self.max_refcount:
                        raise NoSpaceError(f"refcount of cluster {c} would overflow "
                                           f"{1 << order} bits")
                    refcount_set(block, c - base, order, value)
                    if value == 0 and c < self.free_hint:
                        self.free_hint = c
                self.cache.mark_dirty(off)
            cluster = stop

    async def change_range(self, offset: int, length: int, delta: int) -> None:
        cs = self.geo.cluster_size
        first = offset // cs
        await self.change(first, delta, (offset + length - 1) // cs + 1 - first)

    def release_later(self, offset: int, length: int) -> None:
        """Drop one reference to [offset, offset+length) once the drop is safe."""
        self.pending.append((offset, length))

    async def apply_pending(self) -> bool:
        """Apply deferred decreases (the caller made the dropped references durable)."""
        pending, self.pending = self.pending, []
        for offset, length in pending:
            await self.change_range(offset, length, -1)
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
        await self.change(start, 1, n)
        self.free_hint = start + n
        return start * self.geo.cluster_size

    async def _find_free(self, n: int, covered_only: bool = False) -> int:
        """First run of N free clusters at or after the hint, a block at a time.
        With COVERED_ONLY, only clusters that already have a refcount block."""
        rpb = self.rpb
        c = self.free_hint
        if n <= 64 and not covered_only and self._free_at(c, n):
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
        """Whether clusters [c, c+n) are known free without I/O (cached blocks)."""
        for k in range(c, c + n):
            off = self._block_offset(k // self.rpb)
            if off:
                block = self.cache.peek(off)
                if block is None or refcount_get(block, k % self.rpb, self.order):
                    return False
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
            await self.change(place, 1)
            await self.cache.flush()
        else:
            place = rt_index * self.rpb
            refcount_set(block, 0, self.order, 1)
        offset = place * cs
        # The block (and its own refcount) must be on disk before the table
        # entry that points to it.
        self.file.write_sync(block, offset)
        await self.file.sync()
        self.table[rt_index] = offset
        self.file.write_sync(struct.pack(">Q", offset), self.table_offset + rt_index * 8)
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
            self.file.write_sync(block, (area + j) * cs)
            new_table[r] = (area + j) * cs
        for c in range(area, end):
            if c // rpb < len(self.table) and self.table[c // rpb]:
                await self.change(c, 1)
        await self.cache.flush()
        self.file.write_sync(np.array(new_table, dtype=">u8").tobytes(), table_at * cs)
        await self.file.sync()
        old = (self.table_offset, self.table_clusters)
        self.file.write_sync(struct.pack(">QI", table_at * cs, tclusters), HEADER_REFTABLE_FIELDS)
        await self.file.sync()
        self.table, self.table_offset, self.table_clusters = new_table, table_at * cs, tclusters
        self.release_later(old[0], old[1] * cs)

    async def flush(self) -> None:
        await self.cache.flush()
