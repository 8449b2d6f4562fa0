"""Extent maps: where a disk has data (qemu-img map) and what a bitmap marks dirty.

`allocation` answers as `qemu-img map --output=json` does, entry for entry:
QEMU's block status of each layer (qcow2_co_block_status), walked down the
backing chain until a layer says data or zero (its depth), merged as
qemu-img merges (same flags, contiguous host offsets). `dirty` answers as
`nbdinfo --map=qemu:dirty-bitmap:NAME --json` over `qemu-nbd -B NAME` does.
Both are what a backup tool needs from a plain file: which ranges to copy.
"""
from __future__ import annotations

import os
import re
import sys
from array import array
from dataclasses import dataclass, field
from typing import Any, Protocol

from .bitmaps import Bitmap, read_bitmap
from .blocks import MAX_BUFFER, complement, zero_runs, zero_word_runs
from ..errors import UsageError
from ..format import L2E_OFFSET_MASK, Header, SnapshotEntry, SubclusterType, Table, cluster_type, subcluster_type
from ..host.hostfile import HostFile
from .mapper import NUMPY_THRESHOLD, L1Table, Mapper
from .stored import refcounted_clusters
from .snapshots import snapshot_disk_size


@dataclass
class Extent:
    """One entry of qemu-img map --output=json."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None = None

    def json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"start": self.start, "length": self.length, "depth": self.depth,
                             "present": self.present, "zero": self.zero, "data": self.data}
        if self.offset is not None:
            d["offset"] = self.offset
        return d

    def follows(self, prev: "Extent") -> bool:
        """PREV and this are one entry for qemu-img (its entry_mergeable)."""
        return (prev.start + prev.length == self.start and prev.depth == self.depth
                and prev.present == self.present and prev.zero == self.zero and prev.data == self.data
                and (prev.offset is None) == (self.offset is None)
                and (prev.offset is None or prev.offset + prev.length == self.offset))


class Layer(Protocol):
    """What allocation() needs of an image in the chain (Image provides it)."""

    mapper: Mapper
    file: HostFile

    @property
    def header(self) -> Header: ...

    @property
    def size(self) -> int: ...

    @property
    def active_l1(self) -> L1Table: ...

    @property
    def backing(self) -> object: ...


async def disk_map(layer: Layer, snapshot: SnapshotEntry | None = None, start: int = 0,
                   length: int | None = None) -> list[dict[str, Any]]:
    """`qemu-img map --output=json` of the active disk, or of SNAPSHOT's own
    view (its L1 table, its size): what `qcowfs map` and maps/*.json show.
    START and LENGTH: qemu-img map's --start-offset and --max-length (the
    range is cut at the end of the disk; an empty one is qemu-img's single
    entry of length 0)."""
    l1 = None if snapshot is None else L1Table(layer.mapper.file, snapshot.l1_table_offset, snapshot.l1_size)
    size = layer.size if snapshot is None else snapshot_disk_size(snapshot, layer.size)
    end = _range_end(size, start, length)
    if start >= end:
        return _empty_range(start)
    return [e.json() for e in await allocation(layer, start, end, l1)]


def raw_map(raw: object, size: int, start: int = 0, length: int | None = None) -> list[dict[str, Any]]:
    """`qemu-img map --output=json` of a raw file (a disk of SIZE bytes):
    data where the host file has data, zeros in its holes, each at its own
    offset; START and LENGTH as for disk_map."""
    end = _range_end(size, start, length)
    if start >= end:
        return _empty_range(start)
    return [e.json() for e in _raw_status(raw, start, end, 0)]


def _range_end(size: int, start: int, length: int | None) -> int:
    """The end of qemu-img map's range from START: LENGTH bytes, cut at SIZE."""
    if start < 0 or (length is not None and length < 0):
        raise UsageError("start and length must not be negative")
    return size if length is None else min(size, start + length)


def _empty_range(start: int) -> list[dict[str, Any]]:
    """qemu-img map of an empty range: one entry of length 0."""
    return [{"start": start, "length": 0, "depth": 0, "present": False, "zero": False, "data": False}]


async def dirty_map(file: HostFile, bm: Bitmap) -> list[dict[str, Any]]:
    """The dirty extents of BM as they are now (a tracked bitmap's from memory)."""
    return dirty(await read_bitmap(bm, file, 0, bm.size), bm.granularity, bm.virtual_size)


def map_text(extents: list[dict[str, Any]]) -> str:
    """EXTENTS (a map's, a dirty map's) as JSON text with one extent a line,
    as `qemu-img map --output=json` and `nbdinfo --json` print them: one
    json.dumps of the whole list, split between extents (no value holds
    "}, {"); a call per extent cost a map of 8,500 extents 20 ms."""
    import json  # (only JSON output pays for it)

    text = json.dumps(extents).replace("}, {", "},\n{")
    if extents and "start" in extents[0]:  # (qemu-img map opens each object with "{ ", nbdinfo with "{")
        text = text.replace('{"', '{ "')
    return text + "\n"


def _add(out: list[Extent], e: Extent) -> None:
    if out and e.follows(out[-1]):
        out[-1].length += e.length
    elif e.length > 0:
        out.append(e)


# A range of at most this many clusters is mapped entry by entry in Python,
# unless numpy is imported already (convert, check, a writable image); a
# longer one with numpy over each L2 table's span of more than
# NUMPY_THRESHOLD entries. A disk of 64K clusters (4 GiB of 64 KiB ones)
# allocated everywhere maps in Python in about the time numpy takes to
# import, and a small disk imports none (docs/speed.md).
MAP_PYTHON_CLUSTERS = 1 << 16
# The types whose entries carry a host offset (a run of them is host-contiguous).
_WITH_OFFSET = (SubclusterType.NORMAL, SubclusterType.ZERO_ALLOC)

# How each (sub)cluster type answers block status: (present, zero, data, has offset).
_STATUS = {
    SubclusterType.NORMAL: (True, False, True, True),
    SubclusterType.ZERO_PLAIN: (True, True, False, False),
    SubclusterType.ZERO_ALLOC: (True, True, False, True),
    SubclusterType.COMPRESSED: (True, False, True, False),
}


def metadata_preallocated(layer: Layer) -> bool:
    """QEMU's qcow2_detect_metadata_preallocation: an image whose refcounts
    count clearly more clusters than its file occupies on the host
    (preallocation=metadata leaves the data clusters as holes). QEMU then
    asks the host file about each data run, and holes there map as zeros."""
    cs = layer.mapper.geo.cluster_size
    real_clusters = os.fstat(layer.file.fd).st_blocks * 512 // cs
    threshold = max(real_clusters * 10 // 9, real_clusters + 2)
    return refcounted_clusters(layer.file, layer.header, layer.mapper.geo, -(-layer.file.known_size // cs)) >= threshold


async def allocation(layer: Layer, start: int, end: int, l1: L1Table | None = None) -> list[Extent]:
    """qemu-img map of [start, end) of LAYER's disk (through L1: a snapshot's table).
    The walk keeps metadata_preallocated per layer (by id) in a dict of its
    own, asked once per map: it reads every refcount block."""
    return await _status(layer, [(start, end)], l1, 0, {})


async def _status(layer: Layer, ranges: list[tuple[int, int]], l1: L1Table | None, depth: int,
                  prealloc_of: dict[int, bool]) -> list[Extent]:
    """Block status over RANGES (sorted, disjoint) of LAYER's disk: its own
    extents, and where it has nothing, its backing chain's, asked in one call
    for all of LAYER's holes (an overlay scattered over its backing file has
    thousands)."""
    own = await _own_status(layer, ranges, l1, depth, prealloc_of)
    lower = iter(await _below(layer, own.holes, depth, prealloc_of))
    out: list[Extent] = []
    pending = next(lower, None)
    for item in own.items:
        if isinstance(item, Extent):
            _add(out, item)
            continue
        while pending is not None and pending.start < item[1]:  # (the hole's extents, in order)
            _add(out, pending)
            pending = next(lower, None)
    return out


@dataclass
class _Parts:
    """One layer's own answer over some ranges, in order: its extents, and
    the holes where the layers below answer (adjacent holes as one)."""

    items: list[Extent | tuple[int, int]] = field(default_factory=list)
    holes: list[tuple[int, int]] = field(default_factory=list)

    def hole(self, a: int, b: int) -> None:
        if a >= b:
            return
        if self.holes and self.items[-1] == self.holes[-1] and self.holes[-1][1] == a:
            self.holes[-1] = self.items[-1] = (self.holes[-1][0], b)
        else:
            self.holes.append((a, b))
            self.items.append((a, b))


async def _own_status(layer: Layer, ranges: list[tuple[int, int]], l1: L1Table | None, depth: int,
                      prealloc_of: dict[int, bool]) -> _Parts:
    """LAYER's own block status over RANGES (sorted, disjoint): each L2 table
    is classified once for all the ranges in it (_pieces)."""
    mapper = layer.mapper
    geo = mapper.geo
    l1 = l1 if l1 is not None else layer.active_l1
    span, cb = geo.l2_span, geo.cluster_bits
    bulk = sum(b - a for a, b in ranges) >> cb > MAP_PYTHON_CLUSTERS or "numpy" in sys.modules
    out = _Parts()
    todo = ranges[::-1]  # (taken from the end: the lowest first)
    while todo:
        pos, end = todo.pop()
        index = pos // span
        table = await mapper.l2_table(l1, index)
        if table is None:
            # No L2 table here nor, maybe, for many entries on: skipped by L1 entry
            # (as lseek does), not cluster by cluster.
            stop = await l1.next_allocated(index, -(-(todo[0][1] if todo else end) // span))
            for a, b in _take(todo, pos, end, max(stop, index + 1) * span):
                out.hole(a, b)
            continue
        base = index * span
        group = _take(todo, pos, end, base + span)
        pieces = _pieces(mapper, table, base, (group[0][0] - base) >> cb, (group[-1][1] - 1 - base) >> cb, bulk)
        k = 0
        for a0, b0 in group:
            while pieces[k][1] <= a0:
                k += 1
            for j in range(k, len(pieces)):
                if pieces[j][0] >= b0:
                    break
                _classify(layer, pieces[j], max(pieces[j][0], a0), min(pieces[j][1], b0), depth, prealloc_of, out)
    return out


def _take(todo: list[tuple[int, int]], pos: int, end: int, stop: int) -> list[tuple[int, int]]:
    """[POS, END) and the ranges of TODO (descending) that begin before STOP,
    cut at STOP: what lies past it goes back onto TODO."""
    taken = []
    while True:
        taken.append((pos, min(end, stop)))
        if end > stop:
            todo.append((stop, end))
        if not todo or todo[-1][0] >= stop:
            return taken
        pos, end = todo.pop()


def _classify(layer: Layer, piece: tuple[int, int, SubclusterType, int], a: int, b: int, depth: int,
              prealloc_of: dict[int, bool], out: _Parts) -> None:
    """Block status of [A, B), a part of PIECE of LAYER's table, into OUT."""
    mapper = layer.mapper
    start, _, t, host = piece
    # (host is the offset of the cluster START is in; QEMU gives no host offset
    # for encrypted data: it is not the guest's bytes)
    offset = host + a - (start >> mapper.geo.cluster_bits << mapper.geo.cluster_bits) if not mapper.encrypted else None
    if t == SubclusterType.NORMAL and offset is not None and _preallocated(layer, prealloc_of):
        # (what the host file's block status adds to a data run: past its end, a hole)
        for host_at, n, has_data in mapper.data_file.data_runs(offset, offset + b - a):
            out.items.append(Extent(a + host_at - offset, n, depth, True, not has_data, True, host_at))
    elif t in _STATUS:
        present, zero, data, has_offset = _STATUS[t]
        out.items.append(Extent(a, b - a, depth, present, zero, data, offset if has_offset else None))
    elif t == SubclusterType.UNALLOCATED_ALLOC:
        # A subcluster of an allocated cluster: QEMU gives its host offset
        # where nothing below shows through (no backing file, or past its end).
        below = min(b, max(a, _backing_size(layer)))
        out.hole(a, below)
        if below < b:
            out.items.append(Extent(below, b - below, depth, False, True, False,
                                    None if offset is None else offset + below - a))
    else:
        out.hole(a, b)


def _preallocated(layer: Layer, prealloc_of: dict[int, bool]) -> bool:
    """metadata_preallocated(LAYER), asked at its first data run of a map."""
    known = prealloc_of.get(id(layer))
    if known is None:
        known = prealloc_of[id(layer)] = metadata_preallocated(layer)
    return known


def _pieces(mapper: Mapper, table: Table, base: int, first: int, last: int,
            bulk: bool) -> list[tuple[int, int, SubclusterType, int]]:
    """(guest start, guest end, type, host offset of the start's cluster)
    for the clusters FIRST..LAST of TABLE: per subcluster with extended L2,
    else per run of clusters that qemu-img shows as one entry anyway (same
    type; for the types with a host offset, host-contiguous). Runs of
    unallocated entries are found in one pass over the table's bytes
    (blocks.zero_word_runs) and each is one piece: only the other entries
    cost a Python step (a layer of a chain is mostly unallocated). With numpy
    (BULK) over a long span: a Python step per cluster made a 1 GiB image's
    map cost 0.1 s when entries were numpy scalars (now 10-15 ms)."""
    geo = mapper.geo
    cb, cs = geo.cluster_bits, geo.cluster_size
    words = 2 if geo.extended_l2 else 1
    if words == 1 and bulk and last - first + 1 > NUMPY_THRESHOLD:
        return _pieces_numpy(mapper, table, base, first, last)
    out: list[tuple[int, int, SubclusterType, int]] = []
    external = mapper.external_data
    unallocated = SubclusterType.UNALLOCATED_PLAIN
    entries = memoryview(table).cast("B")[first * 8 * words : (last + 1) * 8 * words]
    k = first
    for za, zb in [*zero_word_runs(entries, 8 * words), (last + 1 - first, last + 1 - first)]:
        while k < first + za:
            c0 = base + (k << cb)
            if words == 2:
                _subcluster_pieces(out, mapper, table[2 * k], table[2 * k + 1], c0)
                k += 1
                continue
            e = table[k]
            t = cluster_type(e, False, external)
            h = e & L2E_OFFSET_MASK
            # (a host-contiguous run is one step: the image a copy made is mostly such runs)
            n = _contiguous(table, k, first + za, cs) if t in _WITH_OFFSET else 1
            k += n
            if out:
                a, _, pt, ph = out[-1]
                if pt == t and (t not in _WITH_OFFSET or ph + (c0 - a) == h):
                    out[-1] = (a, c0 + n * cs, t, ph)
                    continue
            out.append((c0, c0 + n * cs, t, h))
        k = first + zb
        if za < zb:
            c0, c1 = base + ((first + za) << cb), base + ((first + zb) << cb)
            if out and out[-1][2] == unallocated:
                out[-1] = (out[-1][0], c1, unallocated, 0)
            else:
                out.append((c0, c1, unallocated, 0))
    return out


def _contiguous(table: Table, k: int, end: int, step: int) -> int:
    """How many entries of TABLE from K (before END) are table[K] plus STEP
    each time (the same type and flags, host-contiguous clusters), in
    comparisons of arrays (C loops): one where the whole range is a run."""
    e = table[k]
    lo, hi = 1, end - k     # (the first LO entries follow, the first HI may not)
    if table[k:end] == array("Q", range(e, e + hi * step, step)):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if table[k:k + mid] == array("Q", range(e, e + mid * step, step)):
            lo = mid
        else:
            hi = mid
    return lo


def _subcluster_pieces(out: list[tuple[int, int, SubclusterType, int]], mapper: Mapper,
                       entry: int, bitmap: int, c0: int) -> None:
    """The pieces of one extended L2 entry at guest offset C0: one per
    subcluster, or one for a compressed cluster."""
    cs, sc = mapper.geo.cluster_size, mapper.geo.subcluster_size
    h = entry & L2E_OFFSET_MASK
    for s in range(cs // sc):
        t = subcluster_type(entry, bitmap, s, True, mapper.external_data)
        if t == SubclusterType.COMPRESSED:
            out.append((c0, c0 + cs, t, h))
            return
        # (a subcluster's host offset: its cluster's, as for every piece)
        out.append((c0 + s * sc, c0 + (s + 1) * sc, t, h))


def _pieces_numpy(mapper: Mapper, table: Table, base: int, first: int,
                  last: int) -> list[tuple[int, int, SubclusterType, int]]:
    """_pieces of standard entries in numpy passes (a long range)."""
    import numpy as np

    from ..format.bulk import cluster_types, table_view
    cb, cs = mapper.geo.cluster_bits, mapper.geo.cluster_size
    entries = table_view(table)[first : last + 1]
    types = np.asarray(cluster_types(entries, mapper.external_data))
    hosts = entries & np.uint64(L2E_OFFSET_MASK)
    with_offset = (types == SubclusterType.NORMAL.value) | (types == SubclusterType.ZERO_ALLOC.value)
    cut = (types[1:] != types[:-1]) | (with_offset[1:] & (hosts[1:] != hosts[:-1] + np.uint64(cs)))
    starts = [0, *(np.flatnonzero(cut) + 1).tolist()]
    ends = starts[1:] + [len(entries)]
    return [(base + ((first + i) << cb), base + ((first + j) << cb), SubclusterType(int(types[i])), int(hosts[i]))
            for i, j in zip(starts, ends)]


def _backing_size(layer: Layer) -> int:
    backing = layer.backing
    return int(getattr(backing, "size", 0)) if backing is not None else 0


async def _below(layer: Layer, holes: list[tuple[int, int]], depth: int,
                 prealloc_of: dict[int, bool]) -> list[Extent]:
    """Block status of the HOLES (sorted, disjoint) of LAYER: its backing
    file's, else (no backing file, or past its end) zeros of LAYER's depth."""
    size = _backing_size(layer)  # (0 without a backing file)
    inside = [(a, min(b, size)) for a, b in holes if a < size]
    out: list[Extent] = []
    if inside:
        backing = layer.backing
        if hasattr(backing, "mapper"):
            out = await _status(backing, inside, None, depth + 1, prealloc_of)  # type: ignore[arg-type]
        else:
            for a, b in inside:
                for e in _raw_status(backing, a, b, depth + 1):
                    _add(out, e)
    for a, b in holes:  # (what lies past the backing file's end comes after all of it)
        if b > size:
            _add(out, Extent(max(a, size), b - max(a, size), depth, False, True, False))
    return out


def _raw_status(raw: object, start: int, end: int, depth: int) -> list[Extent]:
    """A raw backing file: data where the host file has data, zeros in its holes."""
    file: HostFile = raw.file  # type: ignore[attr-defined]
    out: list[Extent] = []
    for pos, n, has_data in file.data_runs(start, end):
        _add(out, Extent(pos, n, depth, True, not has_data, has_data, pos))
    return out


def dirty(bits: bytes, granularity: int, size: int) -> list[dict[str, Any]]:
    """The extents of a bitmap's BITS as nbdinfo --map=qemu:dirty-bitmap:NAME --json.
    (Costs what the set bits cost: a sparse bitmap of a huge disk is quick.)"""
    nbits = -(-size // granularity)
    out: list[dict[str, Any]] = []

    def add(lo_bit: int, hi_bit: int, is_dirty: bool) -> None:
        lo, hi = lo_bit * granularity, min(size, hi_bit * granularity)
        if hi > lo:
            out.append({"offset": lo, "length": hi - lo, "type": int(is_dirty),
                        "description": "dirty" if is_dirty else "clean"})
    prev = 0
    for lo, hi in set_runs(bits, nbits):
        add(prev, lo, False)
        add(lo, hi, True)
        prev = hi
    add(prev, nbits, False)
    return out


# A run of bytes that are not zero (where a bitmap has set bits).
_SET_BYTES = re.compile(rb"[^\0]+")
# Blocks of zero bytes skipped with a memcmp each (blocks.zero_runs), before
# the regular expression looks at the others byte by byte: 0.3 ms instead of
# 20 for the 2 MiB bitmap of a terabyte with a few dirty megabytes.
_SET_BLOCK = 4096
# Bytes of such a run taken as one Python int at a time: each step of the
# walk below shifts the int, so a short one keeps a bitmap of alternating
# bits linear (256 bytes: a shift costs about what the step's other work does).
_SET_PIECE = 256


def set_runs(bits: bytes, nbits: int) -> list[tuple[int, int]]:
    """[lo, hi) runs of the set bits among the first NBITS of BITS (QEMU's
    order: bit k of byte i is bit 8i+k). No numpy, so that a dirty map
    (`qcowfs map --bitmap`, a mount's maps/bitmaps/) costs no 70 ms import:
    blocks of zeros are skipped, the other bytes read as ints, run by run
    (x & -x finds a run's start, x ^ (x + 1) its length)."""
    out: list[tuple[int, int]] = []
    nbytes = -(-nbits // 8)
    for base in range(0, nbytes, MAX_BUFFER):
        piece = bits[base : min(nbytes, base + MAX_BUFFER)]
        n = len(piece)
        for a, b in complement(zero_runs(piece, n, _SET_BLOCK), -(-n // _SET_BLOCK)):
            for m in _SET_BYTES.finditer(piece, a * _SET_BLOCK, min(n, b * _SET_BLOCK)):
                i, j = m.span()
                for c in range(i, j, _SET_PIECE):
                    _add_set_bits(out, int.from_bytes(piece[c : min(j, c + _SET_PIECE)], "little"), (base + c) * 8)
    while out and out[-1][1] > nbits:  # (bits of the last byte past the disk)
        lo, _ = out.pop()
        if lo < nbits:
            out.append((lo, nbits))
            break
    return out


def _add_set_bits(out: list[tuple[int, int]], x: int, pos: int) -> None:
    """Append to OUT the runs of set bits of X, whose bit 0 is bit POS
    (a run that continues OUT's last one extends it)."""
    while x:
        skip = (x & -x).bit_length() - 1
        x >>= skip
        pos += skip
        n = (x ^ (x + 1)).bit_length() - 1
        if out and out[-1][1] == pos:
            out[-1] = (out[-1][0], pos + n)
        else:
            out.append((pos, pos + n))
        x >>= n
        pos += n
