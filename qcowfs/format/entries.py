"""Table entries: L1 and L2 entries (standard and extended), subcluster
types, compressed cluster descriptors, and refcount block packing
(docs/interop/qcow2.txt, "Cluster mapping" and "Host cluster management")."""
from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from .header import align_up


# L1/L2 entry bits.
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
# Reserved bits of a standard (not compressed) L2 entry (QEMU's L2E_STD_RESERVED_MASK).
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED_MASK = 0x1FF
SC_ALL = 0xFFFFFFFF


@dataclass(frozen=True)
class CompressedDescriptor:
    """Where a compressed cluster's bytes are: an unaligned host range."""

    host_offset: int
    length: int


def compressed_shift(cluster_bits: int) -> int:
    """Bit position x of the sector count in a compressed L2 entry."""
    return 62 - (cluster_bits - 8)


def decode_compressed(entry: int, cluster_bits: int) -> CompressedDescriptor:
    x = compressed_shift(cluster_bits)
    offset = entry & ((1 << x) - 1)
    sectors = (entry >> x) & ((1 << (62 - x)) - 1)
    return CompressedDescriptor(offset, (sectors + 1) * 512 - (offset & 511))


def encode_compressed(host_offset: int, length: int, cluster_bits: int) -> int:
    x = compressed_shift(cluster_bits)
    end = host_offset + length
    extra_sectors = (align_up(end, 512) - (host_offset & ~511)) // 512 - 1
    return OFLAG_COMPRESSED | (extra_sectors << x) | host_offset


# ---- what an L2 entry means: QEMU's subcluster types --------------------------

class SubclusterType(enum.IntEnum):
    """QEMU's QCow2SubclusterType: the one classification of L2 entries that
    mapping, writing and checking share (qcow2_get_subcluster_type)."""

    UNALLOCATED_PLAIN = 0   # reads from the backing chain, no host cluster
    UNALLOCATED_ALLOC = 1   # reads from the backing chain, host cluster kept
    ZERO_PLAIN = 2          # reads as zeros, no host cluster
    ZERO_ALLOC = 3          # reads as zeros, host cluster kept (preallocated)
    NORMAL = 4              # data at the host offset
    COMPRESSED = 5          # a compressed cluster (no subclusters)
    INVALID = 6             # an extended entry no writer may produce


def cluster_type(entry: int, extended: bool, external: bool) -> SubclusterType:
    """The type of a whole (non-extended) cluster, or of the cluster part of an
    extended entry (NORMAL / UNALLOCATED_PLAIN / COMPRESSED there).

    Bit 0 is a zero flag only without extended L2 (in a v2 image it is an
    error the reader reports; see Mapper). Offset 0 is a real cluster in an
    external data file when COPIED says so."""
    if entry & OFLAG_COMPRESSED:
        return SubclusterType.COMPRESSED
    off = entry & L2E_OFFSET_MASK
    if entry & OFLAG_ZERO and not extended:
        return SubclusterType.ZERO_ALLOC if off else SubclusterType.ZERO_PLAIN
    if not off and not (external and entry & OFLAG_COPIED):
        return SubclusterType.UNALLOCATED_PLAIN
    return SubclusterType.NORMAL


def subcluster_type(entry: int, bitmap: int, sc: int, extended: bool, external: bool) -> SubclusterType:
    """The type of subcluster SC of an L2 entry (SC 0 for standard entries)."""
    t = cluster_type(entry, extended, external)
    if not extended or t == SubclusterType.COMPRESSED:
        return t
    alloc, zero = bitmap & SC_ALL, bitmap >> 32
    if t == SubclusterType.NORMAL:
        if alloc & zero:
            return SubclusterType.INVALID
        if zero >> sc & 1:
            return SubclusterType.ZERO_ALLOC
        return SubclusterType.NORMAL if alloc >> sc & 1 else SubclusterType.UNALLOCATED_ALLOC
    if alloc:
        return SubclusterType.INVALID
    return SubclusterType.ZERO_PLAIN if zero >> sc & 1 else SubclusterType.UNALLOCATED_PLAIN


def cluster_types(entries: "np.ndarray", external: bool) -> "np.ndarray":
    """cluster_type() of every standard (non-extended) entry at once, for long
    ranges; pinned to the scalar version by a property test."""
    comp = (entries & np.uint64(OFLAG_COMPRESSED)) != 0
    off = entries & np.uint64(L2E_OFFSET_MASK)
    zero = (entries & np.uint64(OFLAG_ZERO)) != 0
    out = np.full(len(entries), SubclusterType.NORMAL, np.int8)
    unalloc = off == 0
    if external:
        unalloc &= (entries & np.uint64(OFLAG_COPIED)) == 0
    out[unalloc] = SubclusterType.UNALLOCATED_PLAIN
    out[zero & (off == 0)] = SubclusterType.ZERO_PLAIN
    out[zero & (off != 0)] = SubclusterType.ZERO_ALLOC
    out[comp] = SubclusterType.COMPRESSED
    return out


def data_host_offsets(words: "np.ndarray") -> "np.ndarray":
    """Host offsets of the standard (non-compressed) clusters the first words
    of L2 entries point to (zero clusters with a preallocation included)."""
    std = words[(words & np.uint64(OFLAG_COMPRESSED)) == 0] & np.uint64(L2E_OFFSET_MASK)
    return std[std != 0]


def compressed_host_offsets(words: "np.ndarray", cluster_bits: int) -> "np.ndarray":
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


def extended_problem(entry: int, bitmap: int, external: bool) -> str | None:
    """Why an extended L2 entry's subclusters are INVALID (QEMU refuses to
    read or write through them), or None. (A compressed cluster ignores its
    bitmap; a non-zero one is only an error for check.)"""
    if entry & OFLAG_COMPRESSED:
        return None
    alloc, zero = bitmap & SC_ALL, bitmap >> 32
    if alloc & zero:
        return "a subcluster is marked both allocated and zero"
    if alloc and cluster_type(entry, True, external) == SubclusterType.UNALLOCATED_PLAIN:
        return "allocated subclusters but no host cluster"
    return None


# ---- refcount blocks ---------------------------------------------------------

def refcount_get(block: bytes | bytearray, index: int, order: int) -> int:
    """Entry INDEX of a refcount block; sub-byte widths are LSB-first within a byte."""
    if order >= 3:
        width = 1 << (order - 3)
        return int.from_bytes(block[index * width : (index + 1) * width], "big")
    bits = 1 << order
    per_byte = 8 // bits
    byte = block[index // per_byte]
    return (byte >> ((index % per_byte) * bits)) & ((1 << bits) - 1)


def refcount_set(block: bytearray, index: int, order: int, value: int) -> None:
    bits = 1 << order
    if value < 0 or value >> bits:
        raise ValueError(f"refcount {value} does not fit in {bits} bits")
    if order >= 3:
        width = bits // 8
        block[index * width : (index + 1) * width] = value.to_bytes(width, "big")
        return
    per_byte = 8 // bits
    shift = (index % per_byte) * bits
    mask = ((1 << bits) - 1) << shift
    i = index // per_byte
    block[i] = (block[i] & ~mask) | (value << shift)


def refcount_values(block: bytes | bytearray, order: int, lo: int, hi: int) -> "np.ndarray":
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


def refcount_store(block: bytearray, order: int, lo: int, values: "np.ndarray") -> None:
    """Write VALUES (each fitting the width) as entries from LO of a refcount block."""
    if order >= 3:
        width = 1 << (order - 3)
        block[lo * width : (lo + len(values)) * width] = values.astype(f">u{width}").tobytes()
        return
    for i, value in enumerate(values.tolist()):
        refcount_set(block, lo + i, order, value)


def refcount_array(block: bytes | bytearray, order: int) -> "np.ndarray":
    """All entries of a refcount block as an integer array (for free-space search)."""
    if order >= 3:
        return np.frombuffer(bytes(block), dtype=f">u{1 << (order - 3)}")
    bits = 1 << order
    raw = np.frombuffer(bytes(block), np.uint8)
    shifts = np.arange(8 // bits, dtype=np.uint8) * bits
    return ((raw[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)


def encode_refcount_block(values: "np.ndarray", order: int, cluster_size: int) -> bytes:
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
