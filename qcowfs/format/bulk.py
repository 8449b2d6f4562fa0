"""The vectorised forms of entries.py's decoding, with numpy: for bulk work
(check, convert, refcounts, allocating writes, snapshots, resize, the map
of long ranges), which imports this module where it does that work. What
reads, mounts read-only and one-shot commands that only describe an image
never import numpy (docs/speed.md): entries.py holds the scalar forms,
and each function here is pinned to its scalar form by a test."""
from __future__ import annotations

import numpy as np

from .entries import (L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO, SubclusterType, Table,
                      compressed_shift, refcount_set)


# ---- L1 and L2 tables -------------------------------------------------------

def table_view(table: Table) -> np.ndarray:
    """The words of TABLE (entries.Table) as uint64, zero-copy and writable:
    what numpy code changes there, the table holds."""
    return np.frombuffer(table, np.uint64)


def l2_rows(table: Table, extended: bool) -> np.ndarray:
    """An L2 table as numpy rows, zero-copy and writable: one uint64 per
    entry, or with extended L2 one row (entry, bitmap) per entry."""
    view = table_view(table)
    return view.reshape(-1, 2) if extended else view


def l2_words(table: Table, extended: bool) -> np.ndarray:
    """The first word of every entry of an L2 table (zero-copy, writable)."""
    view = table_view(table)
    return view[0::2] if extended else view


# ---- L2 entries ---------------------------------------------------------------

def cluster_types(entries: np.ndarray, external: bool) -> np.ndarray:
    """cluster_type() of every standard (non-extended) entry at once, for long
    ranges; pinned to the scalar version by a property test."""
    comp = (entries & np.uint64(OFLAG_COMPRESSED)) != 0
    off = entries & np.uint64(L2E_OFFSET_MASK)
    zero = (entries & np.uint64(OFLAG_ZERO)) != 0
    # (.value throughout: numpy takes an IntEnum member by a slow path, six
    # times the cost of the operation itself on a table of 64K entries)
    out = np.full(len(entries), SubclusterType.NORMAL.value, np.int8)
    unalloc = off == 0
    if external:
        unalloc &= (entries & np.uint64(OFLAG_COPIED)) == 0
    out[unalloc] = SubclusterType.UNALLOCATED_PLAIN.value
    out[zero & (off == 0)] = SubclusterType.ZERO_PLAIN.value
    out[zero & (off != 0)] = SubclusterType.ZERO_ALLOC.value
    out[comp] = SubclusterType.COMPRESSED.value
    return out


def data_host_offsets(words: np.ndarray) -> np.ndarray:
    """Host offsets of the standard (non-compressed) clusters the first words
    of L2 entries point to (zero clusters with a preallocation included)."""
    std = words[(words & np.uint64(OFLAG_COMPRESSED)) == 0] & np.uint64(L2E_OFFSET_MASK)
    return std[std != 0]


def compressed_host_offsets(words: np.ndarray, cluster_bits: int) -> np.ndarray:
    """Host offsets of every cluster the compressed descriptors among the first
    words of L2 entries reach into (a descriptor spans at most three clusters:
    its sector count is below two clusters' worth). What the descriptor
    claims counts, even where it is damaged and reaches past the end of the
    file: a cluster it claims must not be handed out as free."""
    comp = words[(words & np.uint64(OFLAG_COMPRESSED)) != 0]
    if not len(comp):
        return np.zeros(0, np.uint64)
    x = compressed_shift(cluster_bits)
    offset = comp & np.uint64((1 << x) - 1)
    sectors = (comp >> np.uint64(x)) & np.uint64((1 << (62 - x)) - 1)
    start = offset & ~np.uint64(511)
    last = (start + (sectors + np.uint64(1)) * np.uint64(512) - np.uint64(1)) >> np.uint64(cluster_bits)
    first = start >> np.uint64(cluster_bits)
    spans = [first + np.uint64(k) for k in range(3)]
    return np.concatenate([c[c <= last] for c in spans]) << np.uint64(cluster_bits)




# ---- refcount blocks, many entries at once -----------------------------------

def refcount_values(block: bytes | bytearray, order: int, lo: int, hi: int) -> np.ndarray:
    """Entries [lo, hi) of a refcount block as integers, a copy: int64, or
    Python ints for 64-bit refcounts (int64 cannot hold them all). One numpy
    pass instead of one refcount_get per cluster: a 1 MiB write allocates
    16 clusters of 64 KiB at once."""
    if order >= 3:
        width = 1 << (order - 3)
        raw = refcount_array(block[lo * width : hi * width], order)
        return np.array(raw.tolist(), dtype=object) if order == 6 else raw.astype(np.int64)
    per_byte = 8 >> order
    first = lo // per_byte
    values = refcount_array(block[first : -(-hi // per_byte)], order).astype(np.int64)
    return values[lo - first * per_byte : hi - first * per_byte]


def refcount_store(block: bytearray, order: int, lo: int, values: np.ndarray) -> None:
    """Write VALUES (each fitting the width) as entries from LO of a refcount block."""
    if order >= 3:
        width = 1 << (order - 3)
        block[lo * width : (lo + len(values)) * width] = values.astype(f">u{width}").tobytes()
        return
    for i, value in enumerate(values.tolist()):
        refcount_set(block, lo + i, order, value)


def refcount_array(block: bytes | bytearray, order: int) -> np.ndarray:
    """All entries of a refcount block as an integer array (for free-space search)."""
    if order >= 3:
        return np.frombuffer(bytes(block), dtype=f">u{1 << (order - 3)}")
    bits = 1 << order
    raw = np.frombuffer(bytes(block), np.uint8)
    shifts = np.arange(8 // bits, dtype=np.uint8) * bits
    return ((raw[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)


def encode_refcount_block(values: np.ndarray, order: int, cluster_size: int) -> bytes:
    """A refcount block holding VALUES (zero-padded to a whole block)."""
    per_block = (cluster_size * 8) >> order
    full = np.zeros(per_block, np.uint64)
    full[: len(values)] = values
    if order >= 3:
        return full.astype(f">u{1 << (order - 3)}").tobytes()
    bits = 1 << order
    shifts = (np.arange(8 // bits, dtype=np.uint64) * np.uint64(bits))
    packed = (full.reshape(-1, 8 // bits) << shifts).sum(axis=1)
    return packed.astype(np.uint8).tobytes()


# ---- sets of cluster indexes ---------------------------------------------------

def unique_inverse(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(VALUES, return_inverse=True) of a 1-d array, without
    np.unique: numpy 2's unique imports numpy.ma on its first call (some
    5-10 ms of every command that changes an image, for masked arrays we
    never have). The sorted distinct values, and where each value is among them."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    first = np.ones(len(ordered), bool)
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    inverse = np.empty(len(values), np.intp)
    inverse[order] = np.cumsum(first) - 1
    return ordered[first], inverse
