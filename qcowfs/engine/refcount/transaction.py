"""Transactions: refcount changes that take effect in the same header write
as the structures that need them (snapshots, bitmaps, checkpoints)."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ...errors import CorruptionError, NoSpaceError, QcowError
from ...format.bulk import encode_refcount_block, refcount_array, unique_inverse
from .allocator import Allocator


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
            c = await alloc.find_free(n, covered_only=True, start=self._search)
            if c < 0 or c + n > self.start:
                self._search = self.start
                return -1
            clash = [b for a, b in self._taken if a < c + n and c < b]
            if clash:
                self._search = max(clash)
                continue
            cs = alloc.geo.cluster_size
            if alloc.meta.overlap.kinds_at(c * cs, n * cs) or alloc.referenced_in(c, n) >= 0:
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
        for r in sorted(set(ranges.tolist())):
            off = alloc.block_offset(r)
            sel = ranges == r
            values = refcount_array(await alloc.cache.get(off), alloc.order) if off else alloc.unblocked_counts(r)
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
            cl, inv = unique_inverse(np.concatenate(self._clusters))
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
        meta.header_with(**fields)  # (a header that cannot be written is refused before anything is)
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
                replaced = {r: alloc.block_offset(r) for r in ranges}
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
                      else alloc.unblocked_counts(r))
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
        try:
            await meta.update(refcount_table_offset=table_at * cs, refcount_table_clusters=tclusters, **fields)
        finally:
            # Written, even if its fsync failed or was cancelled: the image is
            # the new one, and memory follows it before any error is told. Not
            # written: nothing points to the new structures (__aexit__ takes them back).
            if meta.header.refcount_table_offset == table_at * cs:
                self._switch(table, new_blocks, replaced, freed, (old_table_at, old_tclusters * cs))

    def _switch(self, table: np.ndarray, new_blocks: dict[int, bytes], replaced: dict[int, int],
                freed: list[np.ndarray], old_table: tuple[int, int]) -> None:
        """The header names the new structures: the allocator follows them
        (live), and what was staged to follow runs."""
        self.committed = True
        self.freed = np.concatenate(freed) if freed else np.zeros(0, np.int64)
        self.alloc.adopt([int(x) for x in table.tolist()], new_blocks, replaced, self.freed, old_table)
        for fn in self._after:
            fn()
