"""Reads through a backing chain: the fall-through rule, in one place.

A guest range of a disk is resolved, through every layer's L1/L2 tables at
once, into pieces `(kind, guest, length, host, layer)`: DATA at a host
offset of one layer's file, COMPRESSED (host: the L2 entry), ZERO. The
rule that takes a range from one layer to the next lives only here
(`resolve`, `below`): unallocated clusters and subclusters read the backing
file, a range past a backing file's end (a backing file smaller than the
overlay) reads zeros, and so does an unallocated range with no backing file.
A raw backing file is a layer whose pieces are DATA at their guest offset.

The walk itself never awaits: it uses the tables at hand, and a span whose
L2 table is not at hand becomes a miss. A read then takes one of two paths:

- `read_nowait`, the per-request hot path: one walk, one pread per piece
  from the host page cache (RWF_NOWAIT), no await; False on any miss;
- `read`, the general path: walk, load every table the walk missed, walk
  again (the tables loaded stay at hand for the request, whatever the
  cache evicts), then read each piece, awaiting the host where it blocks.

Commit and rebase (several images of a chain written at once) are
`chain_ops.py`; block status through the chain is `extents.py`.
"""
from __future__ import annotations

import itertools
from typing import Callable, NamedTuple, Protocol

from ..format import Table
from .mapper import COMPRESSED, DATA, MISSING, NUMPY_THRESHOLD, UNALLOC, ZERO, L1Table, Mapper, zero_fill

# (kind, guest offset, length, host, layer that reads it): kind is DATA,
# COMPRESSED or ZERO (LAYER None), never UNALLOC.
Piece = tuple[int, int, int, int, "Layer | None"]
# The general path reads a long request this much at a time, so that the
# tables one walk keeps at hand stay few.
SLICE = 8 << 20


class Layer(Protocol):
    """What reads the pieces of one layer: a qcow2 image's Mapper or a raw file."""

    # The most compressed clusters one inflate_ahead takes.
    inflate_batch: int

    async def read_run(self, kind: int, dst: memoryview, guest: int, host: int) -> None:
        """Fill DST with a piece of KIND at HOST (guest offset GUEST)."""

    def read_run_nowait(self, kind: int, dst: memoryview, guest: int, host: int) -> bool:
        """read_run without awaiting, from the host page cache; False: it would block."""

    async def inflate_ahead(self, entries: list[int]) -> None:
        """Decompress the compressed clusters of ENTRIES at once, ahead of
        their read_run (a layer with no compressed clusters has none)."""

    def cheap(self, kind: int, host: int) -> bool:
        """A piece of KIND at HOST reads now without decoding: one pread, or
        a compressed cluster decompressed already (read-around pushes those)."""


class Lookup:
    """The tables one request walks through: the L2 tables the general path
    loaded for it ({(l1, index): table or None}), and what a walk missed."""

    __slots__ = ("loaded", "missed")

    def __init__(self) -> None:
        self.loaded: dict[tuple[L1Table, int], Table | None] | None = None
        self.missed: list[tuple[Mapper, L1Table, int]] = []


class Source(Protocol):
    """Something below an image that a guest range is read from: a qcow2
    image's active disk or a raw file."""

    @property
    def size(self) -> int: ...

    def resolve(self, offset: int, length: int, out: list[Piece], lookup: Lookup) -> None:
        """Append the pieces of [offset, offset+length) to OUT (inside the source: see `below`)."""

    async def read_into(self, buf: memoryview, offset: int) -> None:
        """Fill all of BUF from OFFSET; bytes past the source's end read as zeros."""

    async def seek(self, offset: int, end: int, data: bool) -> int:
        """The first offset in [offset, end) that is data (DATA) or a hole (not
        DATA), else END. Past the source's end everything is a hole."""


def resolve(mapper: Mapper, l1: L1Table, backing: Source | None, offset: int, length: int,
            out: list[Piece], lookup: Lookup) -> None:
    """Append to OUT the pieces of guest [offset, offset+length) of the disk
    L1 maps: what this layer holds, and below its unallocated runs (and
    subclusters) what `below` finds. Spans whose tables are not at hand go
    to LOOKUP.missed instead. (With its first three arguments bound, a Walk.)"""
    for kind, guest, n, host in mapper.map_cached(l1, offset, length, lookup.loaded):
        if kind == UNALLOC:
            below(backing, guest, n, out, lookup)
        elif kind == MISSING:
            lookup.missed.append((mapper, l1, host))
        else:
            out.append((kind, guest, n, host, None if kind == ZERO else mapper))


def below(backing: Source | None, offset: int, length: int, out: list[Piece], lookup: Lookup) -> None:
    """Append to OUT the pieces of [offset, offset+length) where an image
    holds nothing: its backing file's up to that file's end, zeros past it
    (a backing file smaller than the overlay) and without a backing file.
    (With BACKING bound, a Walk that reads a Source as a whole.)"""
    n = 0 if backing is None else max(0, min(length, backing.size - offset))
    if n > 0:
        backing.resolve(offset, n, out, lookup)  # type: ignore[union-attr]
    if n < length:
        out.append((ZERO, offset + n, length - n, 0, None))


Walk = Callable[[int, int, list[Piece], Lookup], None]


def read_nowait(walk: Walk, buf: memoryview, offset: int) -> bool:
    """Fill BUF from guest OFFSET with the pieces WALK(offset, length, out,
    lookup) appends (Source.resolve, or `resolve` of a disk), from the tables
    at hand and the host page cache, without a single await; False: some
    table or byte is not there (take the general path)."""
    pieces: list[Piece] = []
    lookup = Lookup()
    walk(offset, len(buf), pieces, lookup)
    if lookup.missed:
        return False
    for kind, guest, length, host, layer in pieces:
        dst = buf[guest - offset : guest - offset + length]
        if layer is None:
            zero_fill(dst)
        elif not layer.read_run_nowait(kind, dst, guest, host):
            return False
    return True


async def read(walk: Walk, buf: memoryview, offset: int) -> None:
    """Fill all of BUF from guest OFFSET: WALK(offset, length, out, lookup)
    appends the pieces of a range; the tables it misses are loaded and it
    walks again (a SLICE of the request at a time)."""
    for start in range(0, len(buf), SLICE):
        n = min(SLICE, len(buf) - start)
        lookup = Lookup()
        lookup.loaded = {}
        while True:
            pieces: list[Piece] = []
            walk(offset + start, n, pieces, lookup)
            if not lookup.missed:
                break
            for mapper, l1, index in lookup.missed:
                lookup.loaded[(l1, index)] = await mapper.l2_table(l1, index)
            lookup.missed = []
        for i, (kind, guest, length, host, layer) in enumerate(pieces):
            dst = buf[guest - offset : guest - offset + length]
            if layer is None:
                zero_fill(dst)
                continue
            if kind == COMPRESSED and not layer.cheap(kind, host):
                # This and the next compressed clusters of the layer, inflated together.
                ahead = (p[3] for p in itertools.islice(pieces, i, None) if p[0] == COMPRESSED and p[4] is layer)
                await layer.inflate_ahead(list(itertools.islice(ahead, layer.inflate_batch)))
            await layer.read_run(kind, dst, guest, host)


class Span(NamedTuple):
    """A guest range that is cheap to read ahead (cheap_span)."""

    lo: int
    hi: int
    # The range holds a compressed cluster that is cheap only while the
    # decompressed-cluster cache keeps it: read it now (read-around pushes it
    # later, after other reads' inflates may have evicted it and it would be
    # inflated again).
    held: bool


def cheap_span(walk: Walk, offset: int, lo: int, hi: int) -> Span | None:
    """The guest range around OFFSET, within [LO, HI), known from the tables
    at hand to read as cheap pieces (data with one pread each, zeros, a
    compressed cluster a read has just decompressed), from any layer: what
    is cheap to read ahead. None when OFFSET's own piece is not cheap
    (encrypted, compressed and not decompressed) or its table is not at hand."""
    pieces: list[Piece] = []
    walk(lo, hi - lo, pieces, Lookup())
    at = next((i for i, p in enumerate(pieces) if p[1] <= offset < p[1] + p[2]), None)

    def cheap(p: Piece) -> bool:
        return p[4] is None or p[4].cheap(p[0], p[3])

    if at is None or not cheap(pieces[at]):
        return None
    first = last = at
    while first > 0 and cheap(pieces[first - 1]) and pieces[first - 1][1] + pieces[first - 1][2] == pieces[first][1]:
        first -= 1
    while last + 1 < len(pieces) and cheap(pieces[last + 1]) and pieces[last][1] + pieces[last][2] == pieces[last + 1][1]:
        last += 1
    return Span(pieces[first][1], pieces[last][1] + pieces[last][2],
                any(p[0] == COMPRESSED for p in pieces[first : last + 1]))


# ---- holes and data (lseek SEEK_DATA / SEEK_HOLE) ------------------------------------


async def seek(mapper: Mapper, l1: L1Table, offset: int, end: int, data: bool, backing: Source | None) -> int:
    """The first guest offset in [offset, end) of the disk L1 maps that is
    data (DATA) or a hole (not DATA), else END, as QEMU's block status
    answers it: data is a data or compressed cluster here, or data in the
    backing chain under an unallocated one; zero clusters (preallocated or
    not) and unallocated clusters with no backing data are holes. Empty L1
    ranges are skipped by L1 entry."""
    span = mapper.geo.l2_span
    pos = offset
    while pos < end:
        index = pos // span
        first = await l1.next_allocated(index, -(-end // span))
        if first > index:  # no L2 table for [pos, stop): unallocated
            stop = min(end, first * span)
            found = await _seek_unallocated(pos, stop, data, backing)
            if found < stop:
                return found
            pos = stop
            continue
        chunk_end = min(end, (index + 1) * span)
        # A slice of the table at a time, up to the first hit: each slice is
        # mapped in Python (a daemon that serves lseek imports no numpy).
        stop = min(chunk_end, pos + (NUMPY_THRESHOLD << mapper.geo.cluster_bits))
        for kind, guest, length, _host in await mapper.map(l1, pos, stop - pos):
            if kind == UNALLOC:
                found = await _seek_unallocated(guest, guest + length, data, backing)
                if found < guest + length:
                    return found
            elif (kind in (DATA, COMPRESSED)) == data:
                return guest
        pos = stop
    return end


async def _seek_unallocated(start: int, end: int, data: bool, backing: Source | None) -> int:
    """seek() over unallocated clusters: what the backing chain holds there
    (past the backing file's end, or with none: a hole)."""
    if backing is None or start >= backing.size:
        return end if data else start
    stop = min(end, backing.size)
    found = await backing.seek(start, stop, data)
    if found < stop:
        return found
    return end if data else stop
