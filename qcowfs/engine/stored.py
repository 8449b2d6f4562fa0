"""The refcounts as the image stores them: its refcount table and the blocks
it names, read as they are (blocking reads: check, map, open time).

Apart from references.py (numpy, the walker of every reference) because
`qcowfs map` reads them too, and a map of a small disk imports no numpy
(docs/speed.md): what is here needs only the standard library.
"""
from __future__ import annotations

import struct
from typing import Iterator

from ..format import REFT_OFFSET_MASK, Geometry, Header, refcount_nonzero
from ..host.hostfile import HostFile


def refcount_table(file: HostFile, h: Header) -> list[int]:
    """Block offsets of the refcount table the header names."""
    raw = file.read_sync(h.refcount_table_offset, h.refcount_table_clusters * h.cluster_size)
    return [e & REFT_OFFSET_MASK for e in struct.unpack(f">{len(raw) // 8}Q", raw)]


def stored_blocks(file: HostFile, h: Header, geo: Geometry, nclusters: int) -> Iterator[tuple[int, bytes, int]]:
    """(first cluster, block, how many of its entries count) of each refcount
    block that covers clusters 0..nclusters-1 and lies where a block can
    (aligned, whole in the file): the clusters of the others read as 0."""
    rpb, cs = geo.refcounts_per_block, geo.cluster_size
    for r, off in enumerate(refcount_table(file, h)):
        if not off or r * rpb >= nclusters or off % cs:
            continue
        raw = file.read_sync(off, cs)
        if len(raw) < cs:
            continue
        yield r * rpb, raw, min(rpb, nclusters - r * rpb)


def refcounted_clusters(file: HostFile, h: Header, geo: Geometry, nclusters: int) -> int:
    """How many of clusters 0..nclusters-1 have a stored refcount other than 0."""
    return sum(refcount_nonzero(raw, geo.refcount_order, n) for _, raw, n in stored_blocks(file, h, geo, nclusters))
