"""Guest offsets to host runs, over any L1 table (the active one or a snapshot's).

A request is cut into runs of clusters that read the same way (unallocated,
zero, data at contiguous host offsets, one compressed cluster), so a read
costs one pread per host-contiguous run, not one per cluster. Tables are
entries.Table (array.array): a read classifies its entries one by one in
Python; only a span longer than NUMPY_THRESHOLD entries is classified with
numpy, imported then (a read-only mount never spans that far: docs/speed.md).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Callable

from .cache import TableCache
from ..format.compression import decompress_cluster, decompress_clusters
from ..errors import CorruptionError, PassphraseError, ReadOnlyError
from ..format import (L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_ZERO, SC_ALL,
                     Geometry, SubclusterType, Table, cluster_type, decode_compressed, decode_table,
                     extended_problem, subcluster_type)
from ..host.hostfile import HostFile
from ..host.logs import log

if TYPE_CHECKING:
    import numpy as np

    from ..format.crypto import DiskCipher  # (an encrypted image only: imported by opening)


# Run kinds. MISSING: a span whose L2 table is not at hand (map_cached; host:
# its L1 index).
UNALLOC, ZERO, DATA, COMPRESSED, MIXED, MISSING = range(6)
KIND_NAMES = ("unallocated", "zero", "data", "compressed", "mixed", "missing")
# How each L2 (sub)cluster type reads (INVALID never reaches a lookup).
RUN_KIND = (UNALLOC, UNALLOC, ZERO, ZERO, DATA, COMPRESSED, -1)

# (kind, guest offset, length, host): host is the byte offset for DATA and the
# raw L2 entry for COMPRESSED.
Run = tuple[int, int, int, int]

# Bytes of decompressed clusters kept (an LRU, at least 2 clusters): a small
# read of a compressed cluster inflates all of it, and the next small reads
# in it are served from here, and so are the clusters inflate_ahead decodes
# together (half of it). Counted in bytes, not clusters: 64 clusters of 2 MiB
# were 128 MiB. 1 MiB: read-around copies the cluster it pushes at once
# (chain.Span.held), so the cache no longer has to keep it until the push;
# 4 MiB, which it had to, cost a read-only mount of a zlib image 6 MiB more
# for the same random reads (docs/speed.md).
DECOMPRESSED_BYTES = 1 << 20

# Spans of more entries than this are classified with numpy, imported then.
# At 256 entries of plain data both take about 40 us (docs/speed.md); a
# read of 1 MiB never spans more (2 or 4 KiB clusters; a table of 512 B ones
# holds 64), so a read-only mount does not import numpy.
NUMPY_THRESHOLD = 256
L1_CHUNK_BITS = 12
L1_CHUNK_MASK = (1 << L1_CHUNK_BITS) - 1


class L1Table:
    """An L1 table, read lazily in chunks so a huge sparse disk costs little.

    WRITE (offset, bytes) writes entries: the metadata owner passes its
    checked write for the active table; snapshot tables have none."""

    def __init__(self, file: HostFile, offset: int, size: int,
                 write: Callable[[int, bytes], None] | None = None, pad: bool = False) -> None:
        self.file = file
        # PAD: entries past the end of the file read as 0 (a salvage), else an error.
        self.pad = pad
        self.offset = offset
        self.size = size
        self._write = write
        self._chunks: dict[int, Table] = {}

    async def get(self, index: int) -> int:
        if index >= self.size:
            return 0
        chunk = self._chunks.get(index >> L1_CHUNK_BITS)
        if chunk is None:
            chunk = await self._load(index >> L1_CHUNK_BITS)
        return chunk[index & L1_CHUNK_MASK]

    def cached(self, index: int) -> int | None:
        """The entry if its chunk is loaded (no await): for the write fast path."""
        chunk = self._chunks.get(index >> L1_CHUNK_BITS)
        if chunk is None or index >= self.size:
            return None
        return chunk[index & L1_CHUNK_MASK]

    async def _load(self, c: int) -> Table:
        start = c << L1_CHUNK_BITS
        n = min(1 << L1_CHUNK_BITS, self.size - start)
        raw = await self.file.read(self.offset + start * 8, n * 8)
        if len(raw) < n * 8:
            if not self.pad:
                raise CorruptionError("L1 table runs past the end of the image file")
            raw = raw.ljust(n * 8, b"\0")
        chunk = decode_table(raw)
        self._chunks[c] = chunk
        return chunk

    async def set(self, index: int, value: int) -> None:
        """Change one entry in the file and in memory (the caller orders it)."""
        if self._write is None:
            raise ReadOnlyError("this L1 table is read-only")
        await self.get(index)
        self._write(self.offset + index * 8, value.to_bytes(8, "big"))
        self._chunks[index >> L1_CHUNK_BITS][index & L1_CHUNK_MASK] = value

    def forget(self) -> None:
        """Drop the loaded entries: the next lookups read the table again (an
        image another program writes: force_share)."""
        self._chunks = {}

    async def next_allocated(self, index: int, stop: int) -> int:
        """The first index in [index, stop) with an L2 table, else STOP: a
        whole chunk of entries at a time, so a huge sparse disk is skipped
        by L1 entry, never cluster by cluster."""
        stop = min(stop, self.size)
        while index < stop:
            c = index >> L1_CHUNK_BITS
            chunk = self._chunks.get(c)
            if chunk is None:
                chunk = await self._load(c)
            lo = index & L1_CHUNK_MASK
            for i in range(lo, min(len(chunk), lo + stop - index)):
                if chunk[i] & L1E_OFFSET_MASK:
                    return index + i - lo
            index = (c + 1) << L1_CHUNK_BITS
        return stop

    def chunk(self, index: int) -> Table | None:
        """The loaded chunk holding entry INDEX, or None (the read hot path)."""
        return self._chunks.get(index >> L1_CHUNK_BITS)

    async def entries(self) -> np.ndarray:
        """The whole table, a numpy copy (for snapshot and resize work, not
        the read path: numpy is imported here)."""
        import numpy as np

        from ..format.bulk import table_view
        for c in range(-(-self.size // (1 << L1_CHUNK_BITS))):
            if c not in self._chunks:
                await self._load(c)
        if not self.size:
            return np.zeros(0, np.uint64)
        return np.concatenate([table_view(self._chunks[c]) for c in sorted(self._chunks)])


_ZEROS = bytes(1 << 20)


def zero_fill(buf: memoryview) -> None:
    """Write zeros over BUF (a MiB of them at a time, from one shared buffer)."""
    for pos in range(0, len(buf), len(_ZEROS)):
        n = min(len(_ZEROS), len(buf) - pos)
        buf[pos : pos + n] = _ZEROS[:n]


def _append(runs: list[Run], kind: int, guest: int, length: int, host: int) -> None:
    """Add a run, merging it into the previous one when it continues it."""
    if runs:
        k, g, n, h = runs[-1]
        if k == kind and g + n == guest and kind != COMPRESSED and (kind != DATA or h + n == host):
            runs[-1] = (k, g, n + length, h)
            return
    runs.append((kind, guest, length, host))


class Mapper:
    """Maps and reads guest ranges through L1/L2 tables; one per image."""

    def __init__(self, geo: Geometry, file: HostFile, data_file: HostFile,
                 l2_cache: TableCache[Table], encrypted: bool = False,
                 cipher: DiskCipher | None = None, salvage: bool = False) -> None:
        self.geo = geo
        # Data clusters of an encrypted image are ciphertext (compressed ones
        # are not: QEMU stores them in clear); CIPHER is None when the image
        # was opened without its passphrase (info, check).
        self.encrypted = encrypted
        self._cipher = cipher
        # A read-only open salvages a truncated file as QEMU reads it: L2 tables
        # and data clusters past the end of the file read as zeros.
        self.salvage = salvage
        self._warned_past_end = False
        self.file = file
        self.data_file = data_file
        self.external_data = data_file is not file
        self.l2_cache = l2_cache
        self._cluster_mask = geo.cluster_size - 1
        # Precomputed for read_cached_into, the per-request hot path.
        self._span_bits = geo.l2_span.bit_length() - 1
        # Entries read_cached_into leaves to the general path (bit 0 is an error in v2).
        self._special = OFLAG_COMPRESSED | OFLAG_ZERO
        self._decompressed: OrderedDict[int, bytes] = OrderedDict()
        self._decompressed_max = max(2, DECOMPRESSED_BYTES // geo.cluster_size)
        # At most this many clusters inflated at once ahead of a read (so that
        # none is evicted before the read takes it).
        self.inflate_batch = self._decompressed_max // 2

    # ---- L2 tables ----------------------------------------------------------

    def l2_offset(self, l1_entry: int) -> int:
        """The L2 table's host offset from an L1 entry, validated (0: none).
        Past the end of the file: an error, or (salvage) no table, as QEMU
        reads zeros there."""
        off = l1_entry & L1E_OFFSET_MASK
        if off and (off & self._cluster_mask or off < self.geo.cluster_size):
            raise CorruptionError(f"L1 entry points to an invalid L2 table offset {off:#x}")
        if off >= self.file.known_size:
            if self.salvage:
                self._past_end(off)
                return 0
            raise CorruptionError(f"L1 entry points to an invalid L2 table offset {off:#x}")
        return off

    def _past_end(self, host: int) -> None:
        """Say once that metadata or data lies past the end of the image file."""
        if not self._warned_past_end:
            self._warned_past_end = True
            log.warning("the image file ends before what it maps (at %#x and maybe more): that reads "
                        "as zeros, as QEMU reads it (is the file truncated?)", host)

    async def l2_table(self, l1: L1Table, index: int) -> Table | None:
        off = self.l2_offset(await l1.get(index))
        return await self.l2_cache.get(off) if off else None

    # ---- mapping ------------------------------------------------------------

    async def map(self, l1: L1Table, offset: int, length: int) -> list[Run]:
        runs: list[Run] = []
        span = self.geo.l2_span
        pos, end = offset, offset + length
        while pos < end:
            index = pos // span
            chunk_end = min(end, (index + 1) * span)
            self._map_span(await self.l2_table(l1, index), index * span, pos, chunk_end, runs)
            pos = chunk_end
        return runs

    def map_cached(self, l1: L1Table, offset: int, length: int,
                   loaded: dict[tuple[L1Table, int], Table | None] | None = None) -> list[Run]:
        """map() from the tables at hand, without I/O or await: the cached
        ones, then LOADED ({(l1, index): table or None}: what the general
        path read for this request). A span whose table is not at hand is
        one MISSING run (host: its L1 index), so that one walk finds every
        table a request lacks. (Entries are validated when a table is
        loaded: an L1 entry a load would refuse is never at hand.)"""
        runs: list[Run] = []
        sb = self._span_bits
        pos, end = offset, offset + length
        while pos < end:
            index = pos >> sb
            chunk_end = min(end, (index + 1) << sb)
            entry = l1.cached(index)
            table = self.l2_cache.peek(entry & L1E_OFFSET_MASK) if entry else None
            if table is None and entry != 0:  # (0: no table at all)
                key = (l1, index)
                if loaded is None or key not in loaded:
                    runs.append((MISSING, pos, chunk_end - pos, index))
                    pos = chunk_end
                    continue
                table = loaded[key]
            self._map_span(table, index << sb, pos, chunk_end, runs)
            pos = chunk_end
        return runs

    def _map_span(self, table: Table | None, base: int, start: int, end: int, runs: list[Run]) -> None:
        """The runs of [start, end) inside the span of one L2 table (None: none)."""
        if table is None:
            _append(runs, UNALLOC, start, end - start, 0)
        else:
            self._map_table(table, base, start, end, runs)

    def _map_table(self, table: Table, base: int, start: int, end: int, runs: list[Run]) -> None:
        cb = self.geo.cluster_bits
        first = (start - base) >> cb
        last = (end - 1 - base) >> cb
        if self.geo.extended_l2:
            self._map_table_ext(table, base, first, last, start, end, runs)
        elif first == last:  # (a small read: one entry)
            e = table[first]
            kind, host = self._classify(e, base + (first << cb)) if e else (UNALLOC, 0)
            _append(runs, kind, start, end - start, host + (start - base - (first << cb)) if kind == DATA else host)
        elif last - first + 1 > NUMPY_THRESHOLD:
            self._map_table_numpy(table, base, first, last, start, end, runs)
        else:
            self._map_table_entries(table, base, first, last, start, end, runs)

    def _map_table_entries(self, table: Table, base: int, first: int, last: int,
                           start: int, end: int, runs: list[Run]) -> None:
        """_map_table of standard entries, one by one: plain data clusters
        and unallocated ones (nearly all entries) are decided inline and
        runs grow in locals; the other entries go through _classify."""
        cb, cs = self.geo.cluster_bits, self.geo.cluster_size
        special, unaligned = self._special, self._cluster_mask
        lowest = 0 if self.external_data else cs  # (below: the header, an error _classify names)
        ext = self.external_data   # (its clusters lie at their guest offsets: else _classify raises)
        # The run being built: kind, guest start, host start (DATA) or entry.
        kind, g, h = -1, 0, 0
        for i in range(first, last + 1):
            e = table[i]
            off = e & L2E_OFFSET_MASK
            c0 = base + (i << cb)
            if not e & special and off >= lowest and off and not off & unaligned and (not ext or off == c0):
                if kind == DATA and h + (c0 - g) == off:
                    continue
                k, host = DATA, off
            elif not e:
                if kind == UNALLOC:
                    continue
                k, host = UNALLOC, 0
            else:
                k, host = self._classify(e, c0)
                if k == kind and k == ZERO:
                    continue
            if kind >= 0:
                g0 = max(start, g)
                _append(runs, kind, g0, c0 - g0, h + (g0 - g) if kind == DATA else h)
            kind, g, h = k, c0, host
        g0, g1 = max(start, g), min(end, base + ((last + 1) << cb))
        _append(runs, kind, g0, g1 - g0, h + (g0 - g) if kind == DATA else h)

    def _map_table_ext(self, table: Table, base: int, first: int, last: int,
                       start: int, end: int, runs: list[Run]) -> None:
        """_map_table of extended entries (two words each), cluster by cluster."""
        cb, cs = self.geo.cluster_bits, self.geo.cluster_size
        for i in range(first, last + 1):
            c0 = base + (i << cb)
            g0, g1 = max(start, c0), min(end, c0 + cs)
            w0, bitmap = table[2 * i], table[2 * i + 1]
            kind, host = self._classify_ext(w0, bitmap, c0)
            if kind == MIXED:
                self._map_subclusters(w0, bitmap, c0, g0, g1, runs)
                continue
            if kind == DATA:
                host += g0 - c0
            _append(runs, kind, g0, g1 - g0, host)

    def _classify(self, e: int, guest: int) -> tuple[int, int]:
        """Run kind and host offset of a standard L2 entry of the cluster at GUEST."""
        t = cluster_type(e, False, self.external_data)
        if t == SubclusterType.COMPRESSED:
            return COMPRESSED, e
        if t == SubclusterType.UNALLOCATED_PLAIN:
            return UNALLOC, 0
        off = e & L2E_OFFSET_MASK
        if t != SubclusterType.NORMAL:
            self.check_zero(t, off)
            return ZERO, 0
        self.check_mapped(off, guest)
        return DATA, off

    def check_zero(self, t: SubclusterType, off: int) -> None:
        """A zero cluster is only legal in v3, and a preallocated one must be
        aligned (QEMU answers EIO and marks the image corrupt otherwise)."""
        if not self.geo.zero_flag:
            raise CorruptionError("L2 entry has the zero flag in a version 2 image")
        if t == SubclusterType.ZERO_ALLOC and off & self._cluster_mask:
            raise CorruptionError(f"preallocated zero cluster at an unaligned offset {off:#x}")

    def check_mapped(self, off: int, guest: int | None) -> None:
        """Raise CorruptionError unless OFF may be read as the data cluster of
        the guest cluster at GUEST: aligned, not the header (past the end of
        the file it reads as zeros, as QEMU's); in an external data file at
        GUEST itself, where QEMU puts it and where only it reads it
        (qcow2_get_host_offset: another offset is corruption). GUEST None:
        nothing is read through the entry (no allocated subcluster, or a
        reference being dropped)."""
        if off & self._cluster_mask:
            raise CorruptionError(f"L2 entry points to an unaligned cluster offset {off:#x}")
        if not self.external_data:
            if off < self.geo.cluster_size:
                raise CorruptionError(f"L2 entry points outside the image file ({off:#x})")
        elif guest is not None and off != guest:
            raise CorruptionError(f"external data file host cluster offset {off:#x} does not match "
                                  f"guest cluster offset {guest:#x}")

    def check_data(self, off: int, guest: int | None) -> None:
        """Raise CorruptionError unless OFF is the data cluster of GUEST that
        may be written or read in one pread: check_mapped, and inside the file."""
        self.check_mapped(off, guest)
        if not self.external_data and off >= self.file.known_size:
            raise CorruptionError(f"L2 entry points outside the image file ({off:#x})")

    def _classify_ext(self, w0: int, bitmap: int, guest: int) -> tuple[int, int]:
        """Run kind and host offset of an extended L2 entry of the cluster at
        GUEST (MIXED: per subcluster)."""
        why = extended_problem(w0, bitmap, self.external_data)
        if why:
            raise CorruptionError(f"extended L2 entry is invalid: {why}")
        t = cluster_type(w0, True, self.external_data)
        if t == SubclusterType.COMPRESSED:
            return COMPRESSED, w0
        off = w0 & L2E_OFFSET_MASK
        alloc, zero = bitmap & SC_ALL, bitmap >> 32
        if t == SubclusterType.NORMAL:
            self.check_mapped(off, guest if alloc else None)  # (no subcluster read there: no place)
        if alloc == SC_ALL:
            return DATA, off
        if zero == SC_ALL:
            return ZERO, 0
        if not alloc and not zero:
            return UNALLOC, 0
        return MIXED, off

    def _map_subclusters(self, w0: int, bitmap: int, c0: int, g0: int, g1: int, runs: list[Run]) -> None:
        sc = self.geo.subcluster_size
        off = w0 & L2E_OFFSET_MASK
        for s in range((g0 - c0) // sc, (g1 - 1 - c0) // sc + 1):
            s0 = c0 + s * sc
            a, b = max(g0, s0), min(g1, s0 + sc)
            kind = RUN_KIND[subcluster_type(w0, bitmap, s, True, self.external_data)]
            _append(runs, kind, a, b - a, off + (a - c0) if kind == DATA else 0)

    def _map_table_numpy(self, table: Table, base: int, first: int, last: int,
                         start: int, end: int, runs: list[Run]) -> None:
        """_map_table of a long span of standard entries, in numpy passes."""
        import numpy as np

        from ..format.bulk import cluster_types, table_view
        cb, cs = self.geo.cluster_bits, self.geo.cluster_size
        e = table_view(table)[first : last + 1]
        off = e & np.uint64(L2E_OFFSET_MASK)
        types = cluster_types(e, self.external_data)
        kind = np.array(RUN_KIND, np.int8)[types]
        comp = kind == COMPRESSED
        zero = kind == ZERO
        if zero.any():
            bad = zero & (types == SubclusterType.ZERO_ALLOC.value) & ((off & np.uint64(self._cluster_mask)) != 0)
            if not self.geo.zero_flag or bad.any():
                i = int(np.flatnonzero(zero if not self.geo.zero_flag else bad)[0])
                self.check_zero(SubclusterType(int(types[i])), int(off[i]))
        data = kind == DATA
        if data.any():
            bad = data & ((off & np.uint64(self._cluster_mask)) != 0)
            if not self.external_data:
                bad |= data & (off < np.uint64(cs))
            else:  # (at its guest offset: check_mapped says why)
                guests = np.arange(first, last + 1, dtype=np.uint64) * np.uint64(cs) + np.uint64(base)
                bad |= data & (off != guests)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                self.check_mapped(int(off[i]), base + ((first + i) << cb))  # raises with the precise reason
                raise CorruptionError(f"L2 entry points to an invalid cluster offset {int(off[i]):#x}")
        brk = np.flatnonzero((kind[1:] != kind[:-1]) | (kind[1:] == COMPRESSED)
                             | (data[1:] & (off[1:] != off[:-1] + np.uint64(cs)))) + 1
        starts = [0, *brk.tolist()]
        ends = starts[1:] + [len(e)]
        kinds = kind[starts].tolist()
        hosts = np.where(comp, e, np.where(data, off, 0))[starts].tolist()  # (as _classify: 0 for the rest)
        for s, t, k, h in zip(starts, ends, kinds, hosts):
            c0 = base + ((first + s) << cb)
            g0, g1 = max(start, c0), min(end, base + ((first + t) << cb))
            _append(runs, k, g0, g1 - g0, h + (g0 - c0) if k == DATA else h)

    # ---- reading ------------------------------------------------------------

    def cached_table(self, l1: L1Table, index: int) -> Table | None:
        """L2 table INDEX of L1 if its entry and the table are cached (no I/O), else None."""
        entry = l1.cached(index)
        return self.l2_cache.peek(entry & L1E_OFFSET_MASK) if entry else None

    def cached_host(self, l1: L1Table, offset: int, length: int) -> int | None:
        """The hot path's lookup: the host offset of guest [offset, offset+length)
        if that range is one host-contiguous run of plain data clusters whose
        tables are cached (no await, no I/O), else None. (Written flat, with
        precomputed values: it runs once per FUSE read.)"""
        sb = self._span_bits
        index = offset >> sb
        if (offset + length - 1) >> sb != index or self.geo.extended_l2:
            return None
        entry = l1.cached(index)  # (cached_table, written out: one call less per read)
        table = self.l2_cache.peek(entry & L1E_OFFSET_MASK) if entry else None
        if table is None:
            return None
        cb = self.geo.cluster_bits
        first = (offset & ((1 << sb) - 1)) >> cb
        last = ((offset + length - 1) & ((1 << sb) - 1)) >> cb
        special = self._special
        e = table[first]
        host = e & L2E_OFFSET_MASK
        if e & special or not host:
            return None
        for k in range(first + 1, last + 1):
            e = table[k]
            if e & special or e & L2E_OFFSET_MASK != host + ((k - first) << cb):
                return None
        last_host = host + ((last - first) << cb)
        within = offset & self._cluster_mask
        if host & self._cluster_mask or (host != offset - within if self.external_data else (
                host <= self._cluster_mask or last_host >= self.file.known_size)):
            guest = offset - within
            self.check_data(host, guest)  # raises with the precise reason
            self.check_data(last_host, guest + (last_host - host))
        return host + within

    def read_cached_into(self, l1: L1Table, buf: memoryview, offset: int) -> bool:
        """Fill BUF from a range that is one host-contiguous data run, with its
        tables cached and its bytes in the host page cache, without a single
        await (and decrypted, if it is whole encryption sectors). False means:
        take the general path."""
        host = self.cached_host(l1, offset, len(buf))
        if host is None:
            return False
        cipher = self._cipher
        if self.encrypted:
            # Only whole sectors of a cipher we have: the general path widens
            # partial ones, and says why an image opened without its
            # passphrase cannot be read.
            if cipher is None or (host | len(buf)) % cipher.sector_size:
                return False
        if self.data_file.read_nowait(buf, host) != len(buf):
            return False
        if cipher is not None:
            cipher.decrypt_into(buf, host, offset)
        return True

    async def read_run(self, kind: int, dst: memoryview, guest: int, host: int) -> None:
        """Fill DST with a DATA or COMPRESSED run of this image (chain.Layer)."""
        if kind == DATA:
            if self.encrypted:
                await self._read_decrypted(dst, host, guest)
            else:
                got = await self.data_file.read_into(dst, host)
                if got < len(dst):  # past the end of the file: zeros, as QEMU reads them
                    self._past_end(host + got)
                    zero_fill(dst[got:])
        else:
            cluster = await self.compressed_cluster(host)
            o = guest & self._cluster_mask
            dst[:] = cluster[o : o + len(dst)]

    def read_run_nowait(self, kind: int, dst: memoryview, guest: int, host: int) -> bool:
        """read_run from the host page cache and the decompressed clusters,
        without awaiting; False: take read_run (it would block, the run is
        encrypted, or it reaches past the end of the file)."""
        if kind == DATA:
            return not self.encrypted and self.data_file.read_nowait(dst, host) == len(dst)
        cluster = self._cached_cluster(host)
        if cluster is None:
            return False
        o = guest & self._cluster_mask
        dst[:] = cluster[o : o + len(dst)]
        return True

    def cheap(self, kind: int, host: int) -> bool:
        """A run of KIND at HOST reads now without decoding (chain.Layer):
        plain data is one pread; encrypted data one pread and a batched
        decrypt if the cipher has one (XTS: 0.2 ms for a 256 KiB window;
        not CBC's cipher context per sector); a compressed cluster (HOST:
        its L2 entry) only once decompressed: a small read of it has just
        inflated the whole cluster, so pushing the rest costs a copy, not
        another inflate."""
        if kind == DATA:
            return not self.encrypted or self._cipher is not None and self._cipher.batched
        return kind == COMPRESSED and host in self._decompressed

    def forget(self) -> None:
        """Drop decompressed clusters (force_share: their host clusters may be reused)."""
        self._decompressed.clear()

    @property
    def cipher(self) -> DiskCipher:
        """The data cipher of an encrypted image (reads and writes of guest data)."""
        if self._cipher is None:
            raise PassphraseError("the image is encrypted and was opened without its passphrase")
        return self._cipher

    async def _read_decrypted(self, dst: memoryview, host: int, guest: int) -> None:
        """Read DST from HOST and decrypt it: whole encryption sectors, so an
        unaligned range is read into a wider buffer first."""
        cipher = self.cipher
        ss = cipher.sector_size
        lo, hi = host - host % ss, -(-(host + len(dst)) // ss) * ss
        buf = dst if (lo, hi) == (host, host + len(dst)) else memoryview(bytearray(hi - lo))
        await self.data_file.read_into(buf, lo)
        # On the trio thread: the per-sector cipher setup holds the GIL, so a
        # worker thread did not pay (make bench, LUKS rows: no gain in reads).
        cipher.decrypt_into(buf, lo, guest - (host - lo))
        if buf is not dst:
            dst[:] = buf[host - lo : host - lo + len(dst)]

    async def compressed_cluster(self, entry: int) -> bytes:
        cached = self._cached_cluster(entry)
        if cached is not None:
            return cached
        raw = await self._compressed_bytes(entry)
        cluster = decompress_cluster(raw, self.geo.cluster_size, self.geo.compression_type)
        self._keep_decompressed(entry, cluster)
        return cluster

    async def decodes(self, entry: int) -> bool:
        """Whether the compressed cluster of ENTRY decodes to one whole
        cluster. Asked before a write drops the reference: a descriptor that
        does not decode is damaged, and the sectors it names may belong to
        something else (its decode is not kept: the sectors may be reused)."""
        if self._cached_cluster(entry) is not None:
            return True
        try:
            decompress_cluster(await self._compressed_bytes(entry), self.geo.cluster_size,
                               self.geo.compression_type)
        except CorruptionError:
            return False
        return True

    async def inflate_ahead(self, entries: list[int]) -> None:
        """Decompress the clusters of ENTRIES (L2 entries of compressed
        clusters a read is about to take, at most inflate_batch) into the
        cache at once: their inflating runs on several cores
        (compression.decompress_clusters), where one by one it ran on one."""
        missing = [e for e in dict.fromkeys(entries) if e not in self._decompressed]
        if len(missing) < 2:
            return
        raws = [await self._compressed_bytes(e) for e in missing]
        for entry, cluster in zip(missing, decompress_clusters(raws, self.geo.cluster_size,
                                                                self.geo.compression_type)):
            self._keep_decompressed(entry, cluster)

    async def _compressed_bytes(self, entry: int) -> bytes:
        desc = decode_compressed(entry, self.geo.cluster_bits)
        if desc.host_offset < self.geo.cluster_size or desc.host_offset >= self.file.known_size:
            raise CorruptionError(f"compressed cluster offset {desc.host_offset:#x} is outside the image")
        return await self.file.read(desc.host_offset, desc.length)

    def _cached_cluster(self, entry: int) -> bytes | None:
        """The decompressed cluster of ENTRY if kept (now the most recent), else None."""
        cluster = self._decompressed.get(entry)
        if cluster is not None:
            self._decompressed.move_to_end(entry)
        return cluster

    def _keep_decompressed(self, entry: int, cluster: bytes) -> None:
        self._decompressed[entry] = cluster
        if len(self._decompressed) > self._decompressed_max:
            self._decompressed.popitem(last=False)
