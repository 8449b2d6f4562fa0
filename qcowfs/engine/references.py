"""Every reference an image holds, from one walker.

`walk` yields each structure the header leads to (header, L1 tables, L2
tables, refcount table and blocks, snapshot table, bitmap directory and
tables and data) as a Ref, and each L2 table's contents once as an L2Refs
batch (with how many L1 entries point to it). Check counts them, refcount
rebuild turns the counts into refcounts, the overlap map is built from the
metadata among them: one reading of the format for all three.

Reads are blocking (open time, offline check): nothing is served meanwhile.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from ..format import (AUTOCLEAR_BITMAPS, L1E_RESERVED_MASK, L2E_STD_RESERVED_MASK, REFT_RESERVED_MASK, Geometry, BME_TABLE_OFFSET_MASK, CRYPT_LUKS, EXT_BITMAPS, EXT_CRYPTO, L1E_OFFSET_MASK,
                     L2E_OFFSET_MASK, OFLAG_COMPRESSED, BitmapsExtension,
                     CryptoHeaderExtension, Header, SubclusterType, cluster_type,
                     compressed_shift,
                     extended_problem)
from ..format.bulk import cluster_types, data_host_offsets, refcount_array
from ..host.hostfile import HostFile
from .metadata import Metadata
from .overlap import Kind
from .snapshots import counted_table_length, snapshot_problem
from .stored import refcount_table, stored_blocks


@dataclass(frozen=True)
class Ref:
    """One structure: KIND (None for guest data) at [offset, offset+length)."""

    kind: Kind | None
    what: str
    offset: int
    length: int
    times: int = 1


@dataclass
class L2Refs:
    """The contents of one L2 table, referenced TIMES times (ACTIVE: by the
    active L1 among them)."""

    offset: int
    words: np.ndarray          # first word of every entry
    bitmaps: np.ndarray | None  # second word (extended L2), else None
    times: int
    active: bool

    def data_clusters(self, external: bool) -> np.ndarray:
        """Host offsets of the standard clusters (image file only)."""
        return np.zeros(0, np.uint64) if external else data_host_offsets(self.words)

    def compressed_ranges(self, cluster_bits: int) -> list[tuple[int, int]]:
        """(start, length) of the host bytes of each compressed cluster, rounded
        out to sectors as QEMU counts them."""
        x = compressed_shift(cluster_bits)
        out = []
        for e in self.words[(self.words & np.uint64(OFLAG_COMPRESSED)) != 0].tolist():
            host = e & ((1 << x) - 1)
            sectors = (e >> x) & ((1 << (62 - x)) - 1)
            out.append((host & ~511, (sectors + 1) * 512))
        return out


    def clusters(self, cluster_bits: int, external: bool) -> np.ndarray:
        """The host cluster index of every reference the table holds, once
        per reference (a compressed cluster: each cluster it touches), as
        count_references counts them."""
        cs = 1 << cluster_bits
        parts = [(self.data_clusters(external) >> np.uint64(cluster_bits)).astype(np.int64)]
        for start, length in self.compressed_ranges(cluster_bits):
            parts.append(np.arange(start // cs, (start + length - 1) // cs + 1, dtype=np.int64))
        return np.concatenate(parts)


def read_entries(file: HostFile, offset: int, count: int) -> np.ndarray:
    """COUNT big-endian 64-bit entries at OFFSET (missing ones read as 0)."""
    raw = file.read_sync(offset, count * 8)
    return np.frombuffer(raw.ljust(count * 8, b"\0"), ">u8").astype(np.uint64)


def stored_refcounts(file: HostFile, h: Header, geo: Geometry, nclusters: int) -> np.ndarray:
    """The stored refcount of clusters 0..nclusters-1 (0 where no block or a
    misplaced one says otherwise: what check compares with the references)."""
    out = np.zeros(nclusters, np.int64)
    for first, raw, n in stored_blocks(file, h, geo, nclusters):
        # 64-bit refcounts beyond int64 are still "more than referenced" (a leak).
        vals = refcount_array(raw, geo.refcount_order)
        if geo.refcount_order == 6:
            vals = np.minimum(vals, np.uint64(1 << 62))
        out[first : first + n] = vals[:n].astype(np.int64)
    return out


def walk(meta: Metadata, *, refcount_structure: bool = True, l2_contents: bool = True,
         progress: Callable[[float], None] | None = None) -> Iterator[Ref | L2Refs]:
    """Every reference of the image (see the module docstring)."""
    h, geo, file = meta.header, meta.geo, meta.file
    cs = geo.cluster_size
    yield Ref(Kind.MAIN_HEADER, "header", 0, cs)
    crypto = h.extension(EXT_CRYPTO)
    if crypto is not None and h.crypt_method == CRYPT_LUKS:
        # The LUKS header and key slots: referenced like metadata, so that
        # check counts them and a repair never frees them (as QEMU's check).
        fde = CryptoHeaderExtension.parse(crypto)
        yield Ref(Kind.CRYPTO_HEADER, "LUKS header", fde.offset, fde.length)
    yield Ref(Kind.ACTIVE_L1, "active L1 table", h.l1_table_offset, h.l1_size * 8)
    if refcount_structure:
        yield Ref(Kind.REFCOUNT_TABLE, "refcount table", h.refcount_table_offset,
                  h.refcount_table_clusters * cs)
        for off in refcount_table(file, h):
            if off:
                yield Ref(Kind.REFCOUNT_BLOCK, "refcount block", off, cs)
    if h.nb_snapshots:
        # (A table that could not be read, past the end of the file, counts
        # at least its first entry's header: check reports it.)
        yield Ref(Kind.SNAPSHOT_TABLE, "snapshot table", h.snapshots_offset,
                  counted_table_length(meta.snapshots, h.nb_snapshots))
    l1s = [(h.l1_table_offset, h.l1_size, True)]
    for s in meta.snapshots:
        yield Ref(Kind.INACTIVE_L1, f"snapshot {s.id_str} L1 table", s.l1_table_offset, s.l1_size * 8)
        l1s.append((s.l1_table_offset, s.l1_size, False))
    yield from _bitmap_refs(meta)
    l2_refs: Counter[int] = Counter()
    active: set[int] = set()
    for offset, size, is_active in l1s:
        if not size or offset % cs or offset + size * 8 > file.known_size:
            continue  # check reports it; readers refuse it
        offs = read_entries(file, offset, size) & np.uint64(L1E_OFFSET_MASK)
        for off in offs[offs != 0].tolist():
            l2_refs[off] += 1
            if is_active:
                active.add(off)
    for n, (off, times) in enumerate(sorted(l2_refs.items())):
        if progress:
            progress(n / max(1, len(l2_refs)))
        if off in active:
            yield Ref(Kind.ACTIVE_L2, "L2 table", off, cs, 1)
            if times > 1:
                yield Ref(Kind.INACTIVE_L2, "L2 table", off, cs, times - 1)
        else:
            yield Ref(Kind.INACTIVE_L2, "L2 table", off, cs, times)
        if not l2_contents or off % cs:
            continue
        raw = file.read_sync(off, cs)
        if len(raw) < cs:
            continue
        table = np.frombuffer(raw, ">u8").astype(np.uint64)
        if geo.extended_l2:
            yield L2Refs(off, table[0::2], table[1::2], times, off in active)
        else:
            yield L2Refs(off, table, None, times, off in active)


def _bitmap_refs(meta: Metadata) -> Iterator[Ref]:
    data = meta.header.extension(EXT_BITMAPS)
    if data is None or not meta.header.autoclear_features & AUTOCLEAR_BITMAPS:
        # (An extension a program without bitmap support left behind: QEMU
        # ignores it, and its check calls its clusters leaks.)
        return
    ext = BitmapsExtension.parse(data)
    yield Ref(Kind.BITMAP_DIRECTORY, "bitmap directory", ext.directory_offset, ext.directory_size)
    cs = meta.geo.cluster_size
    for e in meta.bitmap_directory:
        yield Ref(Kind.BITMAP_TABLE, f"bitmap '{e.name}' table", e.bitmap_table_offset,
                  e.bitmap_table_size * 8)
        # Only the entries inside the file (those past its end read as 0): a
        # damaged size (a u32) asked for up to 32 GiB of zeros (hostile seed
        # 500046: check ran out of memory and was killed).
        inside = max(0, min(e.bitmap_table_size, (meta.file.known_size - e.bitmap_table_offset) // 8))
        for entry in read_entries(meta.file, e.bitmap_table_offset, inside).tolist():
            off = entry & BME_TABLE_OFFSET_MASK
            if off:
                yield Ref(None, f"bitmap '{e.name}' data", off, cs)


def build_overlap_map(meta: Metadata) -> None:
    """Register every metadata structure of the image in its overlap map
    (a writable open; the L2 tables' contents are not read)."""
    end = meta.file.known_size
    for ref in walk(meta, l2_contents=False):
        if not isinstance(ref, Ref) or ref.kind is None or ref.length <= 0:
            continue
        if ref.offset < end:
            for _ in range(ref.times):
                meta.add_structure(ref.kind, ref.offset, min(ref.length, end - ref.offset))
        if ref.offset + ref.length > end:  # (damage: the file may grow into it)
            start = max(ref.offset, end)
            meta.add_structure_past_end(ref.kind, start, ref.offset + ref.length - start)


# ---- counting -------------------------------------------------------------------

Report = Callable[[str], None]


@dataclass
class Counted:
    """How many times each host cluster is referenced, and what check needs
    besides: the active L2 tables (COPIED flags) and allocation statistics."""

    counts: np.ndarray
    active_tables: dict[int, np.ndarray]
    # Of the active disk, as qemu-img check counts them (snapshots excluded).
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0


def count_references(meta: Metadata, corruption: Report, *, refcount_structure: bool = True,
                     progress: Callable[[float], None] | None = None) -> Counted:
    """Count every reference (without the refcount table and blocks when
    REFCOUNT_STRUCTURE is false, as a rebuild wants); CORRUPTION(message) is
    called once for each inconsistency found on the way."""
    geo, cs = meta.geo, meta.geo.cluster_size
    external = meta.header.external_data
    out = Counted(np.zeros(max(1, -(-meta.file.known_size // cs)), np.int64), {})

    for snap in meta.snapshots:
        problem = snapshot_problem(snap, meta.header.version, cs, meta.file.known_size)
        if problem:
            corruption(f"ERROR {problem[0]}")
    _reserved_bits(meta, corruption, refcount_structure)
    aligned = {Kind.REFCOUNT_BLOCK: "refcount block", Kind.ACTIVE_L2: "L2 table",
               Kind.INACTIVE_L2: "L2 table"}
    batch: list[L2Refs] = []

    def said(msg: str) -> None:
        """CORRUPTION, once the tables met before are counted (and their messages said)."""
        count_batch()
        corruption(msg)

    def count_batch() -> None:
        _count_tables(out, batch, corruption, geo, external)
        batch.clear()

    for ref in walk(meta, refcount_structure=refcount_structure, progress=progress):
        if isinstance(ref, L2Refs):
            if ref.active:
                out.active_tables[ref.offset] = _interleave(ref)
            batch.append(ref)
            if len(batch) * cs >= BATCH_BYTES:
                count_batch()
        elif ref.kind in aligned and ref.offset % cs:
            said(f"ERROR {aligned[ref.kind]} offset {ref.offset:#x} is not cluster aligned")
        else:
            _add_range(out, said, cs, ref.offset, ref.length, ref.what, ref.times)
    count_batch()
    return out


def _add_range(out: Counted, corruption: Report, cs: int, offset: int, length: int, what: str,
               times: int) -> None:
    """Count TIMES references to each cluster of [OFFSET, OFFSET+LENGTH)
    (a corruption if it reaches past the end of the file)."""
    if length <= 0:
        return
    first, last = offset // cs, (offset + length - 1) // cs
    if last >= len(out.counts):
        corruption(f"ERROR {what} at {offset:#x} lies past the end of the image file")
        return
    if first == last:  # (an L2 table or a refcount block: a tenth of a slice's cost)
        out.counts[first] += times
    else:
        out.counts[first : last + 1] += times


# L2 tables counted at once (bytes of table): large enough that numpy's
# per-call cost vanishes, small enough that the dozen temporaries of a batch
# stay in the CPU's cache and reuse the heap's memory. 16 MiB made each
# temporary a fresh mapping that the kernel had to fault in and zero: the
# whole check of a 2 GiB image of 4 KiB clusters took 58 ms, now 28
# (docs/speed.md); a sparse 100 GiB image of 64 KiB clusters the same.
BATCH_BYTES = 256 << 10


def _count_tables(out: Counted, refs: list[L2Refs], corruption: Report, geo: Geometry,
                  external: bool) -> None:
    """Count the references of the L2 tables REFS, in one go for every
    standard table without compressed clusters or anything to report (the
    usual case), the others one by one (_count_table) so that their
    messages come out in order."""
    if not refs:
        return
    cs = geo.cluster_size
    counted = [False] * len(refs)
    simple = [i for i, ref in enumerate(refs) if ref.bitmaps is None]
    if simple:
        # Only the entries that are not 0 (most of a sparse disk's are 0, and
        # an entry of 0 references nothing and is never wrong).
        width = len(refs[simple[0]].words)
        words = np.concatenate([refs[i].words for i in simple])
        at = np.flatnonzero(words)
        e, row = (words[at] if len(at) < len(words) else words), at // width
        # Compressed, reserved bits, a data cluster not aligned (in the data
        # file too, as QEMU checks it) or past the end: told by _count_table.
        odd = OFLAG_COMPRESSED | L2E_STD_RESERVED_MASK | (L2E_OFFSET_MASK & (cs - 1))
        host = np.zeros(len(e), np.uint64) if external else e & np.uint64(L2E_OFFSET_MASK)
        trouble = ((e & np.uint64(odd)) != 0) | (host >= np.uint64(len(out.counts) * cs))
        fast = np.ones(len(simple), bool)
        if trouble.any():
            fast[row[trouble]] = False
            keep = fast[row]
            e, row, host = e[keep], row[keep], host[keep]
        times = np.array([refs[i].times for i in simple], np.int64)
        used = host != 0
        all_used = used.all()  # (a fully allocated disk: no copies)
        clusters = (host if all_used else host[used]) >> np.uint64(geo.cluster_bits)
        np.add.at(out.counts, clusters.view(np.int64),  # (below 2**56: a view, not a conversion)
                  (times[row] if all_used else times[row[used]]) if times.max() > 1 else 1)
        active = np.array([refs[i].active for i in simple], bool)
        if not active.all():
            active = active[row]
            e, row = e[active], row[active]
        _fragmentation(out, e, cluster_types(e, external), row, cs)
        for i, ok in zip(simple, fast.tolist()):
            counted[i] = ok
    for ref, ok in zip(refs, counted):
        if not ok:
            _count_table(out, ref, corruption, geo, external)


def _count_table(out: Counted, ref: L2Refs, corruption: Report, geo: Geometry, external: bool) -> None:
    """Count the references of one L2 table, reporting what is wrong in it."""
    cs = geo.cluster_size
    std = ref.words[(ref.words & np.uint64(OFLAG_COMPRESSED)) == 0]
    for e in std[(std & np.uint64(L2E_STD_RESERVED_MASK)) != 0].tolist():
        for _ in range(ref.times):  # (QEMU checks a table once per L1 entry naming it)
            corruption(f"ERROR found l2 entry with reserved bits set: {e:x}")
    if ref.bitmaps is not None:
        for k, (w, b) in enumerate(zip(ref.words.tolist(), ref.bitmaps.tolist())):
            why = extended_problem(w, b, external) or (
                "compressed cluster has a non-zero subcluster bitmap"
                if w & OFLAG_COMPRESSED and b else None)
            if why:
                corruption(f"ERROR L2 table {ref.offset:#x} entry {k}: {why}")
    data = data_host_offsets(ref.words)  # (in the data file too: QEMU checks their alignment)
    bad = data % np.uint64(cs) != 0
    if bad.any():
        for off in data[bad].tolist():
            corruption(f"ERROR data cluster offset {off:#x} is not cluster aligned")
        data = data[~bad]
    if external:
        data = data[:0]  # (the data file's clusters have no refcounts)
    idx = (data // np.uint64(cs)).astype(np.int64)
    past = idx >= len(out.counts)
    for off in data[past].tolist():
        corruption(f"ERROR data cluster at {off:#x} lies past the end of the image file")
    np.add.at(out.counts, idx[~past], ref.times)
    for start, length in ref.compressed_ranges(geo.cluster_bits):
        _add_range(out, corruption, cs, start, length, "compressed cluster", ref.times)
    if ref.active:
        if ref.bitmaps is not None:
            types = np.array([cluster_type(e, True, external) for e in ref.words.tolist()], np.int8)
        else:
            types = cluster_types(ref.words, external)
        _fragmentation(out, ref.words, types, np.zeros(len(ref.words), np.int64), cs)


def _reserved_bits(meta: Metadata, corruption: Report, refcount_structure: bool) -> None:
    """Entries of the L1 tables (active and each snapshot's) and of the
    refcount table with reserved bits set: each a corruption, as qemu-img
    check counts them."""
    h, file, cs = meta.header, meta.file, meta.geo.cluster_size
    l1s = [(h.l1_table_offset, h.l1_size)] + [(s.l1_table_offset, s.l1_size) for s in meta.snapshots]
    for offset, size in l1s:
        if not size or offset % cs or offset + size * 8 > file.known_size:
            continue  # (reported as a misplaced table)
        entries = read_entries(file, offset, size)
        for e in entries[(entries & np.uint64(L1E_RESERVED_MASK)) != 0].tolist():
            corruption(f"ERROR found L1 entry with reserved bits set: {e:x}")
    if refcount_structure:
        raw = read_entries(file, h.refcount_table_offset, h.refcount_table_clusters * cs // 8)
        for i in np.flatnonzero(raw & np.uint64(REFT_RESERVED_MASK)).tolist():
            corruption(f"ERROR refcount table entry {i} has reserved bits set")


def _fragmentation(out: Counted, words: np.ndarray, types: np.ndarray, table: np.ndarray, cs: int) -> None:
    """qemu-img check's statistics of active L2 tables (first WORDS of their
    entries in order, their cluster TYPES, and which TABLE each is in):
    allocated clusters (data, preallocated zero, compressed), and fragmented
    ones (compressed, or not right after the previous allocated cluster of
    the same table)."""
    comp = int((types == SubclusterType.COMPRESSED.value).sum())
    alloc = (types == SubclusterType.NORMAL.value) | (types == SubclusterType.ZERO_ALLOC.value)
    if not alloc.all():  # (a fully allocated disk skips both copies)
        words, table = words[alloc], table[alloc]
    # (host offsets are below 2**56: a view as int64, not a conversion)
    offs = (words & np.uint64(L2E_OFFSET_MASK)).view(np.int64)
    jumps = np.flatnonzero(np.diff(offs) != cs)  # (few: look up their tables only)
    out.compressed_clusters += comp
    out.allocated_clusters += comp + len(offs)
    out.fragmented_clusters += comp + int((table[jumps] == table[jumps + 1]).sum())


def _interleave(ref: L2Refs) -> np.ndarray:
    """The table as stored (both words of extended entries)."""
    if ref.bitmaps is None:
        return ref.words
    table = np.empty(len(ref.words) * 2, np.uint64)
    table[0::2], table[1::2] = ref.words, ref.bitmaps
    return table
