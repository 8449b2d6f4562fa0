"""Guest writes: in-place overwrites, cluster allocation, copy-on-write, zeroing.

The common case, overwriting clusters this image alone owns (COPIED), is one
pwrite with no await and no lock. Everything that changes metadata runs under
one lock, cluster run by cluster run: new clusters are filled completely
(old contents from the backing chain, a compressed cluster, a shared cluster
or zeros, merged with the new bytes) in one pwrite before the L2 entry that
points to them changes.
"""
from __future__ import annotations

import functools
from typing import Callable, Collection

import numpy as np

from .cache import TableCache
from ..errors import CorruptionError, UnsupportedFeatureError
from ..format import (L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO, SC_ALL,
                     Geometry, SubclusterType, Table, cluster_type, decode_compressed,
                     encode_compressed, extended_problem, zero_table)
from ..format.bulk import cluster_types, l2_rows, l2_words
from ..host.hostfile import HostFile
from ..host.logs import log
from ..host.waiting import Lock
from . import chain
from .chain import Source
from .mapper import UNALLOC, ZERO, L1Table, Mapper
from .metadata import Metadata
from .overlap import Kind
from .refcount import Allocator, Release


# What a write must do with one cluster.
IN_PLACE, REUSE, ALLOCATE = range(3)
_SPECIAL = OFLAG_COMPRESSED | OFLAG_ZERO


class Writer:
    """Writes guest ranges through the active L1 table of one writable image."""

    def __init__(self, geo: Geometry, mapper: Mapper, meta: Metadata, allocator: Allocator,
                 backing: Callable[[], Source | None]) -> None:
        self.geo = geo
        self.mapper = mapper
        self.meta = meta
        self.alloc = allocator
        self.l2_cache: TableCache[Table] = mapper.l2_cache
        # Words per L2 entry in a Table (extended L2: the entry, its bitmap).
        self._words = 2 if geo.extended_l2 else 1
        self.file: HostFile = mapper.file
        self.data_file: HostFile = mapper.data_file
        self.external = mapper.external_data
        self._backing = backing
        self.lock = Lock()
        # Set while a metadata operation holds the image (Image.exclusive):
        # the fast path then waits for the lock like every other write.
        self.frozen = False
        self._zero_cluster = bytes(geo.cluster_size)
        # Zero detection needs the v3 zero flag, and an external data file
        # must receive every byte (data_file_raw keeps it a valid raw image).
        self.detect_zeroes = geo.zero_flag and not self.external
        # Compressed descriptors found not to decode (_verify_release): their
        # sectors are never released, a leak rather than a freed cluster
        # something else may use.
        self._undecodable: set[int] = set()

    # ---- the fast path -----------------------------------------------------------

    def write_in_place(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        """Overwrite clusters we own, without awaiting; False if metadata must change."""
        if self.frozen:
            return False
        geo = self.geo
        span = geo.l2_span
        index = offset // span
        end = offset + len(data)
        if (end - 1) // span != index:
            return False
        table = self.mapper.cached_table(self.meta.active_l1, index)
        if table is None:
            return False
        cb, w = geo.cluster_bits, self._words
        first = (offset - index * span) >> cb
        last = (end - 1 - index * span) >> cb
        host = table[first * w] & L2E_OFFSET_MASK
        for k in range(first, last + 1):
            if self._state(table, k) != IN_PLACE:
                return False
            if k > first and table[k * w] & L2E_OFFSET_MASK != host + ((k - first) << cb):
                return False
        if self.detect_zeroes and end - offset >= geo.cluster_size and self._has_zero_cluster(offset, data):
            return False  # (the allocating path turns it into a zero entry)
        # Never write through an entry that fails a check (raises CorruptionError).
        self._check_host(host, (last - first + 1) << cb, offset - (offset & (geo.cluster_size - 1)))
        self._put(data, host + (offset & (geo.cluster_size - 1)), offset)
        return True

    def _put(self, data: bytes | bytearray | memoryview, host: int, guest: int) -> None:
        """Write guest DATA over an allocated cluster at HOST. Encrypted: the
        partial sectors at either end are decrypted and merged first (a
        synchronous read, so no other task sees the sector half written)."""
        if not self.mapper.encrypted:
            self.data_file.write_sync(data, host)
            return
        cipher = self.mapper.cipher
        ss = cipher.sector_size
        end = host + len(data)
        lo, hi = host - host % ss, -(-end // ss) * ss
        plain = bytearray(hi - lo)
        partial = {lo} if lo != host else set()
        if hi != end:
            partial.add(hi - ss)
        for sector in partial:
            old = memoryview(bytearray(self.data_file.read_sync(sector, ss).ljust(ss, b"\0")))
            cipher.decrypt_into(old, sector, guest - host + sector)
            plain[sector - lo : sector - lo + ss] = old
        plain[host - lo : end - lo] = data
        self.data_file.write_sync(cipher.encrypt(plain, lo, guest - (host - lo)), lo)

    def _check_host(self, host: int, length: int, guest: int | None) -> None:
        """A data run's host clusters are plausible and hold no metadata; those
        of the guest clusters from GUEST, if it is given (data written through
        them: in an external data file they must lie at GUEST, see
        Mapper.check_mapped); None: a reference dropped, nothing written there."""
        last = length - self.geo.cluster_size
        self.mapper.check_data(host, guest)
        if last > 0:
            self.mapper.check_data(host + last, guest + last if guest is not None else None)
        if not self.external:
            self.meta.check_data(host, length)

    def _has_zero_cluster(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        cs = self.geo.cluster_size
        view = memoryview(data)
        return any(self._zero_cluster_at(view, p) for p in range(-offset % cs, len(data) - cs + 1, cs))

    def _zero_cluster_at(self, data: memoryview, lo: int) -> bool:
        """Whether DATA holds a whole cluster of zeros from LO. The first byte
        decides for almost all data (a memoryview compares byte by byte)."""
        hi = lo + self.geo.cluster_size
        return lo >= 0 and hi <= len(data) and not data[lo] and data[lo:hi] == self._zero_cluster

    def _state(self, table: Table, k: int) -> int:
        """IN_PLACE, REUSE (our cluster, entry must change) or ALLOCATE."""
        if self.geo.extended_l2:
            e, bitmap = table[2 * k], table[2 * k + 1]
            if bitmap == SC_ALL and e & OFLAG_COPIED and not e & OFLAG_COMPRESSED:
                return IN_PLACE
            t = cluster_type(e, True, self.external)
            why = extended_problem(e, bitmap, self.external)
            if why:  # never write through an entry QEMU would call corrupt
                raise CorruptionError(f"extended L2 entry is invalid: {why}")
            if t == SubclusterType.COMPRESSED or not e & OFLAG_COPIED:
                return ALLOCATE
            return REUSE if t == SubclusterType.NORMAL else ALLOCATE
        e = table[k]
        if e & OFLAG_COPIED and not e & _SPECIAL and e & L2E_OFFSET_MASK:
            return IN_PLACE  # the common case, decided without a call
        t = cluster_type(e, False, self.external)
        if t == SubclusterType.COMPRESSED or not e & OFLAG_COPIED or t == SubclusterType.UNALLOCATED_PLAIN:
            return ALLOCATE
        if t == SubclusterType.NORMAL:
            return IN_PLACE
        self.mapper.check_zero(t, e & L2E_OFFSET_MASK)
        return REUSE if t == SubclusterType.ZERO_ALLOC or self.external else ALLOCATE

    # ---- the allocating path ---------------------------------------------------

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        await self.lock.acquire()
        try:
            span = self.geo.l2_span
            pos, end = offset, offset + len(data)
            view = memoryview(data)
            if (end - 1) >> self.geo.cluster_bits != offset >> self.geo.cluster_bits:
                await self._check_targets(offset, end)
            while pos < end:
                index = pos // span
                chunk_end = min(end, (index + 1) * span)
                table_off = await self._writable_l2(index)
                async with self.l2_cache.pinned(table_off) as table:
                    await self._write_table(table_off, table, index * span, pos, view[pos - offset : chunk_end - offset])
                pos = chunk_end
        finally:
            self.lock.release()

    async def _check_targets(self, offset: int, end: int) -> None:
        """Every cluster of a write over several, and every L2 table it changes
        in place, is checked before any changes: one that fails (a table or
        an entry on metadata, an invalid one) then fails the
        write before its other clusters are allocated and written (their
        refcounts would change what the bad entry shows, as QEMU's
        overlap check refuses the whole request first)."""
        span, cb, cs = self.geo.l2_span, self.geo.cluster_bits, self.geo.cluster_size
        pos = offset
        while pos < end:
            index = pos // span
            chunk_end = min(end, (index + 1) * span)
            l1e = await self.meta.active_l1.get(index)
            table_off = self.mapper.l2_offset(l1e)
            if table_off and l1e & OFLAG_COPIED:
                self._check_in_place_l2(table_off)
            table = await self.l2_cache.get(table_off) if table_off else None
            if table is not None:
                base = index * span
                for k in range((pos - base) >> cb, ((chunk_end - 1 - base) >> cb) + 1):
                    state = self._state(table, k)
                    if state != ALLOCATE:  # (REUSE: an external data file's is rewritten at its guest offset)
                        self._check_host(self._entry(table, k)[0] & L2E_OFFSET_MASK, cs,
                                         base + (k << cb) if state == IN_PLACE else None)
            pos = chunk_end

    def _check_in_place_l2(self, table_off: int) -> None:
        """An L2 table changed in place must be an active L2 table and nothing else."""
        self.meta.overlap.check(table_off, self.geo.cluster_size, "L2 table", ignore=Kind.ACTIVE_L2)

    async def _writable_l2(self, index: int) -> int:
        """The L2 table for INDEX, allocated or copied so that we own it."""
        l1 = self.meta.active_l1
        l1e = await l1.get(index)
        old = self.mapper.l2_offset(l1e)
        if old and l1e & OFLAG_COPIED:
            self._check_in_place_l2(old)
            return old
        cs = self.geo.cluster_size
        if old:
            await self.alloc.verify_release([Release(old, cs, shared=True)])
        new = await self.alloc.allocate(1)
        table = (await self.l2_cache.get(old))[:] if old else zero_table(cs // 8)
        self.meta.add_structure(Kind.ACTIVE_L2, new, cs)
        self.l2_cache.put_new(new, table)
        # The new table and its refcount must be on disk before L1 points to it.
        await self.l2_cache.flush()
        await self.file.sync()
        await l1.set(index, new | OFLAG_COPIED)
        if old:
            self.meta.drop_structure(Kind.ACTIVE_L2, old, cs)
            self.alloc.release_later(old, cs)
        return new

    async def _write_table(self, table_off: int, table: Table, base: int, start: int,
                           data: memoryview) -> None:
        cb, cs = self.geo.cluster_bits, self.geo.cluster_size
        end = start + len(data)
        k = (start - base) >> cb
        last = (end - 1 - base) >> cb
        while k <= last:
            c0 = base + (k << cb)
            g0, g1 = max(start, c0), min(end, c0 + cs)
            piece = data[g0 - start : g1 - start]
            state = self._state(table, k)
            if self.detect_zeroes and g1 - g0 == cs and self._zero_cluster_at(piece, 0):
                await self._verify_release([self._entry(table, k)], [c0])
                self._set_zero(table, k)
                self.l2_cache.mark_dirty(table_off)
                k += 1
            elif state == IN_PLACE:
                host = self._entry(table, k)[0] & L2E_OFFSET_MASK
                self._check_host(host, cs, c0)
                self._put(piece, host + (g0 - c0), g0)
                k += 1
            else:
                n = self._run_length(table, k, last, base, start, data) if state == ALLOCATE else 1
                await self._fill_run(table, k, n, base, start, data, reuse=state == REUSE)
                self.l2_cache.mark_dirty(table_off)
                k += n

    def _run_length(self, table: Table, k: int, last: int, base: int, start: int,
                    data: memoryview) -> int:
        """How many clusters from K (which needs a new cluster) up to LAST one
        allocation takes: those that need a new cluster too, up to the first
        whole cluster of zeros (that becomes a zero entry instead). Entries
        never allocated, the common case (an empty image), are found in one
        numpy pass, not one _state call each."""
        n = 1 + self._unallocated(table, k + 1, last)
        while k + n <= last and self._state(table, k + n) == ALLOCATE:
            n += 1
        if self.detect_zeroes:
            cb = self.geo.cluster_bits
            for j in range(k + 1, k + n):
                if self._zero_cluster_at(data, base + (j << cb) - start):
                    return j - k
        return n

    def _unallocated(self, table: Table, first: int, last: int) -> int:
        """How many entries from FIRST (to LAST) are all zeros: unallocated,
        with nothing of their own (such an entry is always ALLOCATE)."""
        rows = l2_rows(table, self.geo.extended_l2)[first : last + 1]
        if not rows.any():
            return len(rows)
        used = rows.any(axis=1) if self.geo.extended_l2 else rows != 0
        return int(np.flatnonzero(used)[0])

    def _used(self, entries: Table) -> list[int]:
        """The indexes of the entries of ENTRIES (a piece of a table) with any bit set."""
        return [j for j in range(len(entries) // self._words) if self._entry(entries, j) != (0, 0)]

    async def _fill_run(self, table: Table, k: int, n: int, base: int, start: int,
                        data: memoryview, reuse: bool) -> None:
        """Write N clusters (old contents + new bytes), then point L2 at them.
        Whole clusters, except with extended L2: there only the subclusters
        QEMU writes (see _written), the others keep what they were."""
        cb, cs = self.geo.cluster_bits, self.geo.cluster_size
        c0 = base + (k << cb)
        end = start + len(data)
        lo, hi = max(start, c0), min(end, c0 + n * cs)
        old = table[k * self._words : (k + n) * self._words]  # (a copy)
        run_lo, run_hi = self._written(old, c0, n, lo, hi, reuse)
        # Old contents only where the new bytes do not cover the run; the
        # pieces go out in one pwritev, the new bytes never copied.
        parts: list[bytearray | memoryview] = [data[lo - start : hi - start]]
        if lo > run_lo:
            head = bytearray(lo - run_lo)
            await self._old_contents(memoryview(head), run_lo)
            parts.insert(0, head)
        if hi < run_hi:
            tail = bytearray(run_hi - hi)
            await self._old_contents(memoryview(tail), hi)
            parts.append(tail)
        if not reuse and any(old):
            used = self._used(old)
            await self._verify_release([self._entry(old, j) for j in used], [c0 + (j << cb) for j in used])
        if self.external:
            host = c0  # guest offset == host offset in an external data file
        elif reuse:  # (one cluster)
            host = self._entry(old, 0)[0] & L2E_OFFSET_MASK
        else:
            host = await self.alloc.allocate(n)
        if reuse:  # (new clusters were checked when allocated)
            self._check_host(host, n * cs, c0)
        at = host + (run_lo - c0)
        if not reuse and not self.external:
            self.data_file.allocate(at, run_hi - run_lo)   # (new clusters: see HostFile.allocate)
        if self.mapper.encrypted:
            # Encrypted where they now lie: old contents are plaintext (read
            # through the mapper), never copied ciphertext.
            self.data_file.write_sync(self.mapper.cipher.encrypt(b"".join(parts), at, run_lo), at)
        else:
            self.data_file.writev_sync(parts, at)
        self._set_data(table, k, n, host, self._bitmaps(old, c0, run_lo, run_hi))
        if not reuse and any(old):
            for j in self._used(old):
                self._release(*self._entry(old, j))

    def _written(self, old: Table, c0: int, n: int, lo: int, hi: int, reuse: bool) -> tuple[int, int]:
        """The guest range [run_lo, run_hi) a write of [LO, HI) to the N
        clusters from C0 (old entries OLD) puts on the host. Whole clusters,
        but with extended L2 as QEMU's calculate_l2_meta: the written
        subclusters only, in a cluster we keep (REUSE); in new clusters, in
        the first and the last one from the written subcluster (or the first
        allocated one, if lower) to the written one (or the last allocated
        one, if higher): allocated subclusters move along, unallocated and
        zero ones outside stay so (reading from the backing file or as zeros)."""
        cs = self.geo.cluster_size
        if not self.geo.extended_l2:
            return c0, c0 + n * cs
        last = c0 + (n - 1) * cs
        first_lo, _ = self._subcluster_span(self._entry(old, 0), lo - c0, min(hi - c0, cs), reuse)
        _, last_hi = self._subcluster_span(self._entry(old, n - 1), max(lo - last, 0), hi - last, reuse)
        return c0 + first_lo, last + last_hi

    def _subcluster_span(self, entry: tuple[int, int], a: int, b: int, keep: bool) -> tuple[int, int]:
        """Within one extended-L2 cluster: the subcluster-aligned byte range
        that covers [A, B) and, unless the cluster is KEPT, every subcluster
        ENTRY has allocated (all of it for a compressed cluster)."""
        sc, cs = self.geo.subcluster_size, self.geo.cluster_size
        if entry[0] & OFLAG_COMPRESSED:
            return 0, cs
        first, last = a // sc, (b - 1) // sc
        alloc = entry[1] & SC_ALL
        if alloc and not keep:
            first = min(first, (alloc & -alloc).bit_length() - 1)
            last = max(last, alloc.bit_length() - 1)
        return first * sc, (last + 1) * sc

    def _bitmaps(self, old: Table, c0: int, run_lo: int, run_hi: int) -> np.ndarray | None:
        """Extended L2: the new bitmaps of the clusters from C0 once guest
        [run_lo, run_hi) is written there: those subclusters allocated and
        not zero, the others as they were (none: standard L2 entries)."""
        if not self.geo.extended_l2:
            return None
        cs, sc = self.geo.cluster_size, self.geo.subcluster_size
        out = np.empty(len(old) // 2, np.uint64)
        for j in range(len(out)):
            cj = c0 + j * cs
            a, b = max(run_lo, cj) - cj, min(run_hi, cj + cs) - cj
            written = ((1 << (b // sc)) - 1) ^ ((1 << (a // sc)) - 1)
            e, bitmap = self._entry(old, j)
            bitmap = 0 if e & OFLAG_COMPRESSED else bitmap
            out[j] = ((bitmap & SC_ALL) | written) | (((bitmap >> 32) & ~written) << 32)
        return out

    async def _old_contents(self, buf: memoryview, guest: int) -> None:
        await chain.read(functools.partial(chain.resolve, self.mapper, self.meta.active_l1, self._backing()),
                         buf, guest)

    # ---- compressed clusters (qemu-img convert -c, QEMU's compress filter) ----------

    async def write_compressed(self, offset: int, blobs: list[bytes]) -> None:
        """Store the len(BLOBS) whole clusters from cluster-aligned guest
        OFFSET as compressed clusters: BLOBS[i] is cluster i compressed with
        the image's codec, shorter than a cluster. They are packed byte
        after byte into host clusters allocated for them (QEMU's
        qcow2_alloc_bytes), each counted once per compressed cluster that
        touches it; then the L2 entries change, old clusters are released.
        A later write into one of them allocates a standard cluster
        (_state: a compressed cluster is ALLOCATE)."""
        if self.external or self.mapper.encrypted:
            raise UnsupportedFeatureError("compressed clusters are not supported with an external data "
                                          "file or encryption (as in QEMU)")
        cs, cb, span = self.geo.cluster_size, self.geo.cluster_bits, self.geo.l2_span
        if offset % cs or any(len(b) >= cs for b in blobs):
            raise ValueError("compressed writes are whole clusters that shrink")
        if not blobs:
            return
        await self.lock.acquire()
        try:
            places, counts = self._pack_compressed([len(b) for b in blobs])
            n = len(counts)
            host = await self.alloc.allocate(n)
            self.meta.check_data(host, n * cs)  # (new clusters: past the end of the file, maybe)
            for j in np.flatnonzero(counts > 1).tolist():
                await self.alloc.change((host >> cb) + j, int(counts[j]) - 1)
            buf = bytearray(n * cs)
            for pos, blob in zip(places, blobs):
                buf[pos : pos + len(blob)] = blob
            self.file.write_sync(buf, host)
            self.alloc.note_references(np.arange(host, host + n * cs, cs, dtype=np.uint64), data=False)
            i = 0
            while i < len(blobs):
                guest = offset + (i << cb)
                index = guest // span
                k = (guest - index * span) >> cb
                m = min(len(blobs) - i, self.geo.l2_entries - k)
                table_off = await self._writable_l2(index)
                async with self.l2_cache.pinned(table_off) as table:
                    old = [self._entry(table, k + j) for j in range(m)]
                    await self._verify_release(old, [guest + (j << cb) for j in range(m)])
                    for j in range(m):
                        self._set_entry(table, k + j, encode_compressed(host + places[i + j],
                                                                        len(blobs[i + j]), cb), 0)
                    self.l2_cache.mark_dirty(table_off)
                    for e in old:
                        self._release(*e)
                i += m
        finally:
            self.lock.release()

    def _pack_compressed(self, lengths: list[int]) -> tuple[list[int], np.ndarray]:
        """Offsets (from the first allocated cluster) of compressed clusters
        of LENGTHS packed end to end, and how many of them touch each host
        cluster; a host cluster whose refcount would overflow (1- or 2-bit
        refcounts) is not shared: the next one starts a new cluster."""
        cs = self.geo.cluster_size
        limit = self.alloc.max_refcount
        counts: list[int] = []
        places: list[int] = []
        pos = 0
        for length in lengths:
            first = pos // cs
            if first < len(counts) and counts[first] >= limit:
                pos = (first + 1) * cs
                first += 1
            last = (pos + length - 1) // cs
            while len(counts) <= last:
                counts.append(0)
            for c in range(first, last + 1):
                counts[c] += 1
            places.append(pos)
            pos += length
        return places, np.array(counts, np.int64)

    # ---- zeroing and discard (fallocate PUNCH_HOLE / ZERO_RANGE) --------------------

    async def zero(self, offset: int, length: int, unmap: bool, disk_size: int) -> None:
        """Make guest bytes [offset, offset+length) read as zeros, changing L2
        entries instead of writing data wherever the format can say "zeros"
        (QEMU's qcow2_cluster_discard / qcow2_subcluster_zeroize).

        UNMAP (discard, PUNCH_HOLE) also drops the host clusters: a cluster
        becomes unallocated when nothing below it shows through (no backing
        data there), else a zero cluster. Without UNMAP (ZERO_RANGE) a
        cluster this image alone owns keeps its host cluster as a
        preallocated zero cluster, so later writes need no allocation.
        Dropping a reference is a refcount decrement (Allocator.release_later):
        a cluster a snapshot shares stays allocated for it. Pieces an L2
        entry cannot express (unaligned to a (sub)cluster, inside a
        compressed cluster, or v2 with a backing file below) are written as
        zeros. The last cluster of a disk whose size is not cluster-aligned
        counts as whole when the range reaches DISK_SIZE."""
        end = offset + length
        unit = self.geo.subcluster_size
        lo = -(-offset // unit) * unit
        hi = end if end == disk_size else end - end % unit
        if hi > disk_size:
            hi = disk_size
        if lo >= hi:
            await self._write_zeros(offset, end)
            return
        hi_aligned = -(-hi // unit) * unit  # the partial last unit at the end of the disk
        await self._write_zeros(offset, lo)
        await self._write_zeros(hi, end)
        async with self.lock:
            fallback = await self._zero_aligned(lo, hi_aligned, unmap)
        for g0, g1 in fallback:
            await self._write_zeros(g0, min(g1, disk_size))

    async def map_data_file_raw(self, start: int, end: int) -> None:
        """Point the unallocated clusters of guest [start, end) at the same
        offsets of the external data file. A data_file_raw image's L1/L2
        tables are a 1:1 map of the whole disk (create preallocates them), so
        the data file read alone and the image read through its tables
        agree; QEMU's qcow2_co_truncate preallocates the metadata of the
        area a grow adds for that reason, and so does resize here. As in
        QEMU, an extended L2 entry gets its host offset and no allocated
        subcluster."""
        geo = self.geo
        cs, span = geo.cluster_size, geo.l2_span
        async with self.lock:
            pos = start // cs * cs
            while pos < end:
                index = pos // span
                chunk_end = min(end, (index + 1) * span)
                base = index * span
                first, stop = (pos - base) // cs, (chunk_end - 1 - base) // cs + 1
                table_off = await self._writable_l2(index)
                async with self.l2_cache.pinned(table_off) as table:
                    words = l2_words(table, geo.extended_l2)[first:stop]
                    free = words == 0
                    if geo.extended_l2:
                        free &= l2_rows(table, True)[first:stop, 1] == 0
                    hosts = (np.arange(first, stop, dtype=np.uint64) << np.uint64(geo.cluster_bits)) \
                        + np.uint64(base | OFLAG_COPIED)
                    words[free] = hosts[free]
                    self.l2_cache.mark_dirty(table_off)
                pos = chunk_end

    async def _write_zeros(self, start: int, end: int) -> None:
        """Zeros written as data where [start, end) does not read as zeros
        already, a MiB at a time (the format cannot say "zero" there). A
        trim of an already trimmed range thus allocates nothing."""
        if start >= end:
            return
        step = 1 << 20
        for kind, guest, length, _host in await self.mapper.map(self.meta.active_l1, start, end - start):
            if kind == ZERO or (kind == UNALLOC and not self._below(guest, guest + length)):
                continue
            for pos in range(guest, guest + length, step):
                await self.write(pos, bytes(min(step, guest + length - pos)))

    async def _zero_aligned(self, start: int, end: int, unmap: bool) -> list[tuple[int, int]]:
        """zero() of a (sub)cluster-aligned range, L2 table by L2 table (the
        writer lock held); the ranges that must be written as data instead."""
        span = self.geo.l2_span
        fallback: list[tuple[int, int]] = []
        pos = start
        while pos < end:
            index = pos // span
            chunk_end = min(end, (index + 1) * span)
            base = index * span
            table = await self.mapper.l2_table(self.meta.active_l1, index)
            if table is None and not self._below(pos, chunk_end):
                pos = chunk_end  # unallocated with nothing below: already zeros
                continue
            if table is None:
                table = zero_table(self.geo.cluster_size // 8)
            # Decide on the current table first: a table that needs no change
            # is neither allocated nor copied away from a snapshot.
            dropped: list[tuple[int, int]] = []
            guests: list[int] = []
            if self._zero_entries(table, base, pos, chunk_end, unmap, apply=False, fallback=fallback,
                                  dropped=dropped, guests=guests):
                await self._verify_release(dropped, guests)
                table_off = await self._writable_l2(index)
                async with self.l2_cache.pinned(table_off) as writable:
                    # (the same decisions: a copy holds the same entries)
                    self._zero_entries(writable, base, pos, chunk_end, unmap, apply=True, fallback=[])
                    self.l2_cache.mark_dirty(table_off)
            pos = chunk_end
        return fallback

    def _below(self, start: int, end: int) -> bool:
        """Whether the backing chain may show through guest bytes [start, end)."""
        backing = self._backing()
        return backing is not None and start < backing.size

    def _zero_entries(self, table: Table, base: int, start: int, end: int, unmap: bool,
                      apply: bool, fallback: list[tuple[int, int]],
                      dropped: list[tuple[int, int]] | None = None, guests: list[int] | None = None) -> bool:
        """Make the entries for [start, end) of the L2 table at guest BASE say
        "zeros" (APPLY) or only tell whether any would change. Synchronous,
        so no other task sees half of it. Ranges only data can zero go to
        FALLBACK."""
        geo = self.geo
        cb, cs = geo.cluster_bits, geo.cluster_size
        changed = False
        for k in self._may_change(table, base, (start - base) >> cb, (end - 1 - base) >> cb, unmap):
            c0 = base + (k << cb)
            g0, g1 = max(start, c0), min(end, c0 + cs)
            old = self._entry(table, k)
            new = self._zeroed_entry(old, c0, g0, g1, unmap)
            if new is None:
                fallback.append((g0, g1))
                continue
            if new == old:
                continue
            changed = True
            releases = (old[0] & L2E_OFFSET_MASK) != (new[0] & L2E_OFFSET_MASK) or old[0] & OFLAG_COMPRESSED
            host = 0 if old[0] & OFLAG_COMPRESSED else old[0] & L2E_OFFSET_MASK
            if releases and host:
                releases = self._droppable(host, c0, apply)  # (if not, the entry goes, its reference stays)
            elif host:
                # An entry that keeps its host cluster (ZERO_RANGE on one we
                # own) is only flagged, as QEMU does: nothing is written there,
                # and a later write in place meets the overlap check. But it
                # must be one QEMU can read (aligned, not the header; in an
                # external data file at its guest offset: QEMU checks that
                # for a zero entry with an offset too), or the zeros
                # acknowledged here would read as an error (soak seeds
                # 8701179, 60099 through a mount).
                self.mapper.check_mapped(host, c0)
            if dropped is not None and releases:
                dropped.append(old)
                if guests is not None:
                    guests.append(c0)
            if not apply:
                continue
            if self.external:
                # Guest offset == host offset: the data file itself must read
                # zeros (data_file_raw keeps it a valid raw image); punching
                # also gives its space back.
                if not self.data_file.zero_range(g0, g1 - g0, unmap):
                    self.data_file.write_sync(bytes(g1 - g0), g0)
            self._set_entry(table, k, *new)
            if releases:
                # Only a discard gives the host space back, as QEMU passes a
                # freed cluster's discard to the file only when opened with
                # unmap: a ZERO_RANGE that frees a cluster (version 2, nothing
                # below) leaves its bytes, which another entry of a damaged
                # image may still read (hostile soak seed 1352998606)
                self._release(*old, punch=unmap)
        return changed

    def _droppable(self, host: int, guest: int, apply: bool) -> bool:
        """Whether the reference an L2 entry holds on HOST (of the cluster at
        GUEST) may be dropped with the entry. Not when the host cluster fails
        a check: it may be metadata (an entry aliasing a refcount block, hostile
        soak seed 9700199), and QEMU's discard, which drops such a reference
        all the same, frees that cluster for the next allocation to overwrite.
        The entry is still dropped, so the guest reads zeros as asked and the
        alias is gone, but the count stays: it then counts the metadata's own
        reference alone (or leaks one, which `qemu-img check -r leaks`
        repairs)."""
        try:
            self._check_host(host, self.geo.cluster_size, None)
        except CorruptionError as e:
            if apply:
                log.warning("the L2 entry of guest %#x is dropped but its reference kept: %s", guest, e)
                self.alloc.alias_dropped(host)
            return False
        return True

    def _may_change(self, table: Table, base: int, first: int, last: int, unmap: bool) -> list[int]:
        """Indexes in [first, last] of the entries _zeroed_entry may change,
        found with numpy: the entries that read zeros already and stay as
        they are (unallocated with nothing below, zero clusters) are left
        out at once, so trimming free space that L2 tables cover costs
        little per cluster (fstrim trims all free space every time)."""
        geo = self.geo
        table_rows = l2_rows(table, geo.extended_l2)
        if not geo.zero_flag and not geo.extended_l2:
            rows = table_rows[first : last + 1]
            if ((rows & np.uint64(OFLAG_ZERO)) & ~(rows >> np.uint64(62)) & np.uint64(1)).any():
                raise CorruptionError("L2 entry has the zero flag in a version 2 image")
        backing = self._backing()
        c0 = np.uint64(base) + (np.arange(first, last + 1, dtype=np.uint64) << np.uint64(geo.cluster_bits))
        below = c0 < np.uint64(backing.size) if backing is not None else np.zeros(len(c0), bool)
        if geo.extended_l2:
            w0, bitmap = table_rows[first : last + 1, 0], table_rows[first : last + 1, 1]
            unalloc = (w0 & np.uint64(L2E_OFFSET_MASK | OFLAG_COMPRESSED)) == 0
            if self.external:
                unalloc &= (w0 & np.uint64(OFLAG_COPIED)) == 0
            stays = unalloc & ~below & ((bitmap & np.uint64(SC_ALL)) == 0)
        else:
            types = cluster_types(table_rows[first : last + 1], self.external)
            stays = (((types == SubclusterType.UNALLOCATED_PLAIN.value) & ~below)
                     | (types == SubclusterType.ZERO_PLAIN.value))
            if not unmap:
                stays |= types == SubclusterType.ZERO_ALLOC.value
        return (np.flatnonzero(~stays) + first).tolist()

    def _zeroed_entry(self, old: tuple[int, int], c0: int, g0: int, g1: int,
                      unmap: bool) -> tuple[int, int] | None:
        """The (entry, bitmap) that makes guest [g0, g1) of the cluster at C0
        read as zeros: OLD if it already does, None if only data can."""
        geo = self.geo
        e, bitmap = old
        t = cluster_type(e, geo.extended_l2, self.external)
        why = extended_problem(e, bitmap, self.external) if geo.extended_l2 else None
        if why:
            raise CorruptionError(f"extended L2 entry is invalid: {why}")
        below = self._below(c0, c0 + geo.cluster_size)
        whole = g1 - g0 == geo.cluster_size
        # ZERO_RANGE keeps a cluster this image alone owns, as preallocated zeros.
        keep = not unmap and t == SubclusterType.NORMAL and bool(e & OFLAG_COPIED)
        if t == SubclusterType.UNALLOCATED_PLAIN and not below:
            return old  # nothing below: reads zeros already
        if not geo.extended_l2:
            if t == SubclusterType.ZERO_PLAIN or (t == SubclusterType.ZERO_ALLOC and not (unmap and whole)):
                return old
            if not whole:
                return None
            if keep and geo.zero_flag:
                return (e | OFLAG_ZERO, 0)
            if not below:
                return (0, 0)
            return (OFLAG_ZERO, 0) if geo.zero_flag else None
        zero_all = SC_ALL << 32
        if t == SubclusterType.COMPRESSED:
            return ((0, zero_all) if below else (0, 0)) if whole else None
        sc = geo.subcluster_size
        first, last = (g0 - c0) // sc, (g1 - 1 - c0) // sc
        mask = ((1 << (last - first + 1)) - 1) << first
        alloc, zero = bitmap & SC_ALL, bitmap >> 32
        if t == SubclusterType.NORMAL and (keep or not whole):
            # The host cluster stays (owned, or other subclusters use it).
            return (e, (alloc & ~mask) | ((zero | mask) << 32))
        if t == SubclusterType.NORMAL:  # the whole cluster is dropped
            return (0, zero_all) if below else (0, 0)
        return (e, (zero | mask) << 32)  # unallocated, with backing data below

    # ---- L2 entries ----------------------------------------------------------------

    def _entry(self, table: Table, k: int) -> tuple[int, int]:
        """L2 entry K of TABLE: (entry, bitmap); bitmap 0 without extended L2."""
        if self.geo.extended_l2:
            return table[2 * k], table[2 * k + 1]
        return table[k], 0

    def _set_entry(self, table: Table, k: int, entry: int, bitmap: int) -> None:
        """Make L2 entry K of TABLE say ENTRY (and BITMAP, with extended L2)."""
        if self.geo.extended_l2:
            table[2 * k], table[2 * k + 1] = entry, bitmap
        else:
            table[k] = entry

    def _set_data(self, table: Table, k: int, n: int, host: int,
                  bitmaps: np.ndarray | None = None) -> None:
        """Point entries K..K+N-1 at the N host clusters from HOST, which we
        own (extended L2: with BITMAPS, or every subcluster allocated)."""
        hosts = (np.arange(n, dtype=np.uint64) << np.uint64(self.geo.cluster_bits)) + np.uint64(host | OFLAG_COPIED)
        rows = l2_rows(table, self.geo.extended_l2)
        if self.geo.extended_l2:
            rows[k : k + n, 0] = hosts
            rows[k : k + n, 1] = SC_ALL if bitmaps is None else bitmaps
        else:
            rows[k : k + n] = hosts
        if not self.external:  # (what a damaged compressed descriptor must not claim later)
            self.alloc.note_references(hosts & np.uint64(L2E_OFFSET_MASK), data=True)

    def _set_zero(self, table: Table, k: int) -> None:
        old = self._entry(table, k)
        if self.geo.extended_l2:
            self._set_entry(table, k, 0, SC_ALL << 32)
        else:
            self._set_entry(table, k, OFLAG_ZERO, 0)
        self._release(*old)

    async def _verify_release(self, entries: list[tuple[int, int]], guests: list[int]) -> None:
        """Refuse now (Allocator.verify_release) the drops of old L2 ENTRIES
        that find damaged refcounts, after decoding each compressed cluster
        among them whose drop would free a host cluster. A descriptor whose
        sectors do not decode is damaged: it may name sectors of a data
        cluster (the refcount says nothing: QEMU counts one reference per
        descriptor), and dropping it would free that cluster while in use.
        Its sectors are kept instead (a leak, which `qemu-img check -r leaks`
        repairs), and the write that replaces it goes on. A drop that leaves
        the clusters in use frees nothing, so it is not decoded: of the
        compressed clusters packed into one host cluster only the last one
        dropped is (a partial overwrite has decoded it already).

        A drop that would free the host cluster of a compressed cluster a
        snapshot holds at the same guest offset (GUESTS: of each entry) finds
        a refcount too low for its references: a shared release, refused."""
        shared: set[int] = set()
        for (entry, _bitmap), guest in zip(entries, guests):
            if not entry & OFLAG_COMPRESSED or self.external or entry in self._undecodable:
                continue
            start, end = decode_compressed(entry, self.geo.cluster_bits).sectors
            if not await self.alloc.frees(start, end - start):
                continue
            if not await self.mapper.decodes(entry):
                log.warning("compressed cluster descriptor %#x does not decode: the L2 entry is "
                            "damaged, its sectors stay allocated (a leak)", entry)
                self._undecodable.add(entry)
            elif await self._in_a_snapshot(entry, guest):
                shared.add(entry)
        await self.alloc.verify_release(self._released(entries, shared))

    async def _in_a_snapshot(self, entry: int, guest: int) -> bool:
        """Whether an internal snapshot's L2 entry for GUEST is ENTRY too."""
        span = self.geo.l2_span
        k = (guest % span) >> self.geo.cluster_bits
        for snap in self.meta.snapshots:
            table = await self.mapper.l2_table(L1Table(self.file, snap.l1_table_offset, snap.l1_size),
                                               guest // span)
            if table is not None and table[k * self._words] == entry:
                return True
        return False

    def _released(self, entries: list[tuple[int, int]], shared: Collection[int] = ()) -> list[Release]:
        """The references dropping old L2 ENTRIES ((entry, bitmap)) releases:
        a data cluster (shared when the entry lacks COPIED), or the sectors a
        compressed cluster occupies (not punched: see release_later; shared
        when in SHARED); none in an external data file."""
        if self.external:
            return []
        out: list[Release] = []
        for entry, _bitmap in entries:
            if entry in self._undecodable:
                continue
            if entry & OFLAG_COMPRESSED:
                d = decode_compressed(entry, self.geo.cluster_bits)
                if d.length > self.geo.cluster_size + 512:
                    # QEMU never stores a cluster compressed unless it shrinks:
                    # more sectors than that is a damaged descriptor (qemu-iotests
                    # 214), and dropping them would free clusters others use.
                    raise CorruptionError(f"compressed cluster descriptor {entry:#x} claims {d.length} "
                                          "bytes, more than a cluster: the L2 entry is damaged")
                start, end = d.sectors
                cs, cb = self.geo.cluster_size, self.geo.cluster_bits
                first, last = start >> cb, (end - 1) >> cb
                if self.alloc.data_referenced_in(first, last - first + 1) >= 0:
                    raise CorruptionError(f"compressed cluster descriptor {entry:#x} claims a data cluster "
                                          "another L2 entry uses: the L2 entry is damaged")
                if start < cs or self.meta.overlap.kinds_at(start, end - start):
                    raise CorruptionError(f"compressed cluster descriptor {entry:#x} points into metadata: "
                                          "the L2 entry is damaged")
                out.append(Release(start, end - start, punch=False, shared=entry in shared))
            elif entry & L2E_OFFSET_MASK:
                out.append(Release(entry & L2E_OFFSET_MASK, self.geo.cluster_size,
                                   shared=not entry & OFLAG_COPIED))
        return out

    def _release(self, entry: int, bitmap: int, punch: bool = True) -> None:
        """Drop the reference an old L2 entry held (once it is off the disk);
        PUNCH false: a cluster freed keeps its host space (see zero)."""
        for rel in self._released([(entry, bitmap)]):
            self.alloc.release_later(rel.offset, rel.length, rel.punch and punch)
