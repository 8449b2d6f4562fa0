"""Table entries: L1 and L2 entries (standard and extended), subcluster
types, compressed cluster descriptors, and refcount block packing
(docs/interop/qcow2.txt, "Cluster mapping" and "Host cluster management")."""
from __future__ import annotations

import enum
import functools
import sys
from array import array
from dataclasses import dataclass
from typing import TypeAlias

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


# ---- L1 and L2 tables in memory -----------------------------------------------

# A table as the engine holds it: one native unsigned 64-bit integer per
# entry (with extended L2, two per entry: the entry, then its subcluster
# bitmap). array.array, not numpy: indexing it gives Python ints at the
# cost of a list's, and a read-only open, mount or one-shot command never
# imports numpy for it (docs/speed.md). Bulk work takes a zero-copy numpy
# view of the same memory (format/bulk.py).
Table: TypeAlias = "array[int]"
_SWAP = sys.byteorder == "little"  # (the file's entries are big-endian)


def decode_table(raw: bytes | bytearray | memoryview) -> Table:
    """The entries of an on-disk table (big-endian 64-bit words)."""
    table = array("Q")
    table.frombytes(raw)
    if _SWAP:
        table.byteswap()
    return table


def encode_table(table: Table) -> bytes:
    """A table as it is stored (its big-endian bytes; TABLE is left as it is)."""
    if not _SWAP:
        return table.tobytes()
    out = table[:]
    out.byteswap()
    return out.tobytes()


def zero_table(words: int) -> Table:
    """A table of WORDS zero words (a new L2 table: all unallocated)."""
    return array("Q", bytes(8 * words))


assert array("Q").itemsize == 8


@dataclass(frozen=True)
class CompressedDescriptor:
    """Where a compressed cluster's bytes are: an unaligned host range."""

    host_offset: int
    length: int

    @property
    def sectors(self) -> tuple[int, int]:
        """[start, end) of the host bytes its reference holds: its sectors from
        the first one's start, as QEMU counts and frees them."""
        return self.host_offset & ~511, self.host_offset + self.length


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


def refcount_block_of_ones(count: int, order: int, cluster_size: int) -> bytes:
    """A refcount block whose first COUNT entries are 1 and the rest 0: a
    new image's (each cluster it uses is used once), for any COUNT without
    a loop per entry (or numpy, which `create` would pay 50 ms to import)."""
    if order >= 3:
        width = 1 << (order - 3)
        ones = (1).to_bytes(width, "big") * count
    else:
        bits = 1 << order
        per_byte = 8 // bits
        full = sum(1 << (k * bits) for k in range(per_byte))
        tail = sum(1 << (k * bits) for k in range(count % per_byte))
        ones = bytes([full]) * (count // per_byte) + (bytes([tail]) if tail else b"")
    if len(ones) > cluster_size:
        raise ValueError(f"{count} refcounts do not fit in one block")
    return ones + bytes(cluster_size - len(ones))


@functools.cache
def _nonzero_fields(order: int) -> bytes:
    """Per byte value: how many of its sub-byte refcounts (ORDER 0, 1, 2) are
    not 0 (a translate table; made when first needed, not at every start)."""
    mask = (1 << (1 << order)) - 1
    return bytes(sum(1 for k in range(0, 8, 1 << order) if b >> k & mask) for b in range(256))


# The array typecodes of refcounts of a whole number of bytes (order 3..6).
_REFCOUNT_TYPECODES = {3: "B", 4: "H", 5: "I", 6: "Q"}
assert all(array(t).itemsize == 1 << (order - 3) for order, t in _REFCOUNT_TYPECODES.items())


def refcount_nonzero(block: bytes | bytearray, order: int, count: int) -> int:
    """How many of the first COUNT entries of a refcount block are not 0, in
    C loops of the standard library (qcowfs map asks, for each image it maps,
    how many clusters are in use: numpy would cost more to import)."""
    if order >= 3:
        width = 1 << (order - 3)
        words = array(_REFCOUNT_TYPECODES[order])
        words.frombytes(block[: count * width])  # (byte order does not change what is 0)
        return count - words.count(0)
    per_byte = 8 >> order
    whole = count // per_byte
    n = sum(block[:whole].translate(_nonzero_fields(order)))
    return n + sum(1 for i in range(whole * per_byte, count) if refcount_get(block, i, order))

