"""On-disk structures of qcow2: pure parsing and packing, no I/O.

Names follow docs/interop/qcow2.txt in QEMU. Every integer is big-endian.
"""
from __future__ import annotations

import enum
import struct

import numpy as np
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterator

from .errors import InvalidImageError

QCOW_MAGIC = b"QFI\xfb"
V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_REFCOUNT_ORDER = 6
# QEMU's limits: tables larger than these are refused as absurd.
MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
MAX_SNAPSHOTS = 65536
MAX_VIRTUAL_SIZE = 1 << 61

# Incompatible feature bits.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
# Compatible feature bits.
COMPAT_LAZY_REFCOUNTS = 1 << 0
# Autoclear feature bits.
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_KNOWN = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

CRYPT_NONE = 0
CRYPT_AES = 1
CRYPT_LUKS = 2
CRYPT_NAMES = {CRYPT_AES: "AES (legacy qcow2 encryption)", CRYPT_LUKS: "LUKS"}

# Header extension types.
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_CRYPTO = 0x0537BE77
EXT_BITMAPS = 0x23852875
EXT_DATA_FILE = 0x44415441

FEATURE_TYPE_INCOMPAT = 0
FEATURE_TYPE_COMPAT = 1
FEATURE_TYPE_AUTOCLEAR = 2
FEATURE_ENTRY_SIZE = 48

# L1/L2 entry bits.
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
SUBCLUSTERS_PER_CLUSTER = 32
SC_ALL = 0xFFFFFFFF

# Snapshots.
SNAPSHOT_HEADER_SIZE = 40
SNAPSHOT_MIN_EXTRA_V3 = 16

# Bitmaps.
BME_IN_USE = 1 << 0
BME_AUTO = 1 << 1
BME_EXTRA_DATA_COMPATIBLE = 1 << 2
BME_RESERVED_FLAGS = ~(BME_IN_USE | BME_AUTO | BME_EXTRA_DATA_COMPATIBLE) & 0xFFFFFFFF
BME_TYPE_DIRTY_TRACKING = 1
BME_HEADER_SIZE = 24
BME_TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_TABLE_ALL_ONES = 1 << 0
BME_MIN_GRANULARITY_BITS = 9
BME_MAX_GRANULARITY_BITS = 31
BME_MAX_NAME_SIZE = 1023
BITMAP_FLAG_NAMES = {BME_IN_USE: "in-use", BME_AUTO: "auto", BME_EXTRA_DATA_COMPATIBLE: "extra-data-compatible"}

FEATURE_NAMES_BUILTIN = {
    (FEATURE_TYPE_INCOMPAT, 0): "dirty bit",
    (FEATURE_TYPE_INCOMPAT, 1): "corrupt bit",
    (FEATURE_TYPE_INCOMPAT, 2): "external data file",
    (FEATURE_TYPE_INCOMPAT, 3): "compression type",
    (FEATURE_TYPE_INCOMPAT, 4): "extended L2 entries",
    (FEATURE_TYPE_COMPAT, 0): "lazy refcounts",
    (FEATURE_TYPE_AUTOCLEAR, 0): "bitmaps",
    (FEATURE_TYPE_AUTOCLEAR, 1): "raw external data",
}

_HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
_HEADER_V3 = struct.Struct(">QQQII")
_EXT_HEAD = struct.Struct(">II")
_BITMAPS_EXT = struct.Struct(">IIQQ")
_CRYPTO_EXT = struct.Struct(">QQ")
_SNAPSHOT = struct.Struct(">QIHHIIQII")
_BME = struct.Struct(">QIIBBHI")


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def pad8(n: int) -> int:
    return align_up(n, 8)


@dataclass
class HeaderExtension:
    type: int
    data: bytes


@dataclass
class Header:
    """The fixed part of the first cluster, plus its extensions and backing name."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = COMPRESSION_ZLIB
    extensions: list[HeaderExtension] = field(default_factory=list)
    backing_file: str | None = None

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // self.l2_entry_size

    def extension(self, ext_type: int) -> bytes | None:
        for ext in self.extensions:
            if ext.type == ext_type:
                return ext.data
        return None

    def feature_names(self) -> dict[tuple[int, int], str]:
        """Names from the image's feature name table, over the built-in ones."""
        names = dict(FEATURE_NAMES_BUILTIN)
        table = self.extension(EXT_FEATURE_TABLE) or b""
        for pos in range(0, len(table) - FEATURE_ENTRY_SIZE + 1, FEATURE_ENTRY_SIZE):
            ftype, bit = table[pos], table[pos + 1]
            raw = table[pos + 2 : pos + FEATURE_ENTRY_SIZE].split(b"\0", 1)[0]
            names[(ftype, bit)] = raw.decode("utf-8", "replace")
        return names

    @classmethod
    def parse(cls, buf: bytes) -> "Header":
        """Parse the header from the start of the first cluster (or all of it)."""
        if len(buf) < V2_HEADER_LENGTH:
            raise InvalidImageError("file is too short to be a qcow2 image")
        f = _HEADER_V2.unpack_from(buf, 0)
        if f[0] != QCOW_MAGIC:
            raise InvalidImageError("not a qcow2 image (bad magic)")
        version = f[1]
        if version not in (2, 3):
            raise InvalidImageError(f"unsupported qcow2 version {version}")
        hdr = cls(version, *f[2:])
        if version == 3:
            if len(buf) < V3_MIN_HEADER_LENGTH:
                raise InvalidImageError("file is too short for a qcow2 v3 header")
            (hdr.incompatible_features, hdr.compatible_features, hdr.autoclear_features,
             hdr.refcount_order, hdr.header_length) = _HEADER_V3.unpack_from(buf, V2_HEADER_LENGTH)
            if hdr.header_length < V3_MIN_HEADER_LENGTH or hdr.header_length % 8:
                raise InvalidImageError(f"invalid header length {hdr.header_length}")
            if hdr.header_length > 104:
                if len(buf) < 105:
                    raise InvalidImageError("file is too short for its header")
                hdr.compression_type = buf[104]
        if not MIN_CLUSTER_BITS <= hdr.cluster_bits <= MAX_CLUSTER_BITS:
            raise InvalidImageError(f"unsupported cluster size 2^{hdr.cluster_bits} (must be 512 B to 2 MiB)")
        if hdr.refcount_order > MAX_REFCOUNT_ORDER:
            raise InvalidImageError(f"invalid refcount order {hdr.refcount_order}")
        if hdr.header_length > hdr.cluster_size:
            raise InvalidImageError("header is larger than a cluster")
        if len(buf) >= hdr.header_length:
            hdr.extensions = list(parse_extensions(buf[: hdr.cluster_size], hdr.header_length))
        if hdr.backing_file_offset:
            end = hdr.backing_file_offset + hdr.backing_file_size
            if hdr.backing_file_size > 1023 or end > hdr.cluster_size or end > len(buf):
                raise InvalidImageError("backing file name lies outside the header cluster")
            try:
                hdr.backing_file = buf[hdr.backing_file_offset:end].decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidImageError("backing file name is not valid UTF-8") from None
        return hdr

    def pack_fields(self) -> bytes:
        """The fixed header fields alone (72 bytes for v2, header_length for v3)."""
        out = bytearray(_HEADER_V2.pack(
            QCOW_MAGIC, self.version, self.backing_file_offset, self.backing_file_size,
            self.cluster_bits, self.size, self.crypt_method, self.l1_size, self.l1_table_offset,
            self.refcount_table_offset, self.refcount_table_clusters, self.nb_snapshots,
            self.snapshots_offset))
        if self.version >= 3:
            out += _HEADER_V3.pack(self.incompatible_features, self.compatible_features,
                                   self.autoclear_features, self.refcount_order, self.header_length)
            out += bytes(self.header_length - len(out))
            if self.header_length > 104:
                out[104] = self.compression_type
        return bytes(out)

    def pack(self) -> bytes:
        """Fields, extensions (with the end marker) and backing name: a new first cluster."""
        out = bytearray(self.pack_fields())
        for ext in self.extensions:
            out += _EXT_HEAD.pack(ext.type, len(ext.data)) + ext.data
            out += bytes(pad8(len(ext.data)) - len(ext.data))
        out += _EXT_HEAD.pack(EXT_END, 0)
        if self.backing_file is not None:
            name = self.backing_file.encode()
            self.backing_file_offset, self.backing_file_size = len(out), len(name)
            out[8:20] = struct.pack(">QI", len(out), len(name))
            out += name
        return bytes(out)

    def set_extension(self, ext_type: int, data: bytes | None) -> None:
        """Replace (or with None, drop) one header extension, keeping the order."""
        self.extensions = with_extension(self.extensions, ext_type, data)


def with_extension(extensions: list[HeaderExtension], ext_type: int,
                   data: bytes | None) -> list[HeaderExtension]:
    """EXTENSIONS with the one of EXT_TYPE replaced in its place (appended if
    new), or dropped for None: a new list, the old one is left as it was."""
    if data is None:
        return [HeaderExtension(e.type, e.data) for e in extensions if e.type != ext_type]
    out = [HeaderExtension(e.type, data if e.type == ext_type else e.data) for e in extensions]
    if all(e.type != ext_type for e in extensions):
        out.append(HeaderExtension(ext_type, data))
    return out


def parse_extensions(buf: bytes, start: int) -> Iterator[HeaderExtension]:
    pos = start
    while True:
        if pos + 8 > len(buf):
            raise InvalidImageError("header extensions run past the first cluster")
        ext_type, length = _EXT_HEAD.unpack_from(buf, pos)
        pos += 8
        if ext_type == EXT_END:
            return
        if pos + length > len(buf):
            raise InvalidImageError(f"header extension 0x{ext_type:08x} runs past the first cluster")
        yield HeaderExtension(ext_type, bytes(buf[pos : pos + length]))
        pos += pad8(length)


@dataclass
class BitmapsExtension:
    nb_bitmaps: int
    directory_size: int
    directory_offset: int

    @classmethod
    def parse(cls, data: bytes) -> "BitmapsExtension":
        if len(data) < _BITMAPS_EXT.size:
            raise InvalidImageError("bitmaps extension is too short")
        nb, reserved, size, offset = _BITMAPS_EXT.unpack_from(data)
        if reserved:
            raise InvalidImageError("bitmaps extension has reserved bits set")
        return cls(nb, size, offset)

    def pack(self) -> bytes:
        return _BITMAPS_EXT.pack(self.nb_bitmaps, 0, self.directory_size, self.directory_offset)


@dataclass(frozen=True)
class CryptoHeaderExtension:
    """The full disk encryption header pointer: where the LUKS header and its
    key material lie in the image file (cluster aligned, counted as used)."""

    offset: int
    length: int

    @classmethod
    def parse(cls, data: bytes) -> "CryptoHeaderExtension":
        if len(data) < _CRYPTO_EXT.size:
            raise InvalidImageError("full disk encryption header extension is too short")
        return cls(*_CRYPTO_EXT.unpack_from(data))


@dataclass
class SnapshotEntry:
    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    extra: bytes = b""
    # From the extra data, when present (v3 always has both).
    vm_state_size_large: int | None = None
    disk_size: int | None = None
    icount: int | None = None

    @property
    def state_size(self) -> int:
        return self.vm_state_size_large if self.vm_state_size_large is not None else self.vm_state_size

    @classmethod
    def parse_table(cls, buf: bytes, count: int) -> list["SnapshotEntry"]:
        entries, pos = [], 0
        for _ in range(count):
            if pos + SNAPSHOT_HEADER_SIZE > len(buf):
                raise InvalidImageError("snapshot table is truncated")
            (l1_off, l1_size, id_len, name_len, dsec, dnsec, clock, vmss,
             extra_len) = _SNAPSHOT.unpack_from(buf, pos)
            pos += SNAPSHOT_HEADER_SIZE
            end = pos + extra_len + id_len + name_len
            if end > len(buf):
                raise InvalidImageError("snapshot table entry is truncated")
            extra = bytes(buf[pos : pos + extra_len])
            pos += extra_len
            ident = bytes(buf[pos : pos + id_len]).decode("utf-8", "replace")
            pos += id_len
            name = bytes(buf[pos : pos + name_len]).decode("utf-8", "replace")
            pos = pad8(end)
            e = cls(l1_off, l1_size, ident, name, dsec, dnsec, clock, vmss, extra)
            if extra_len >= 8:
                e.vm_state_size_large = struct.unpack_from(">Q", extra, 0)[0]
            if extra_len >= 16:
                e.disk_size = struct.unpack_from(">Q", extra, 8)[0]
            if extra_len >= 24:
                e.icount = struct.unpack_from(">Q", extra, 16)[0]
            entries.append(e)
        return entries

    def pack(self) -> bytes:
        ident, name = self.id_str.encode(), self.name.encode()
        out = _SNAPSHOT.pack(self.l1_table_offset, self.l1_size, len(ident), len(name), self.date_sec,
                             self.date_nsec, self.vm_clock_nsec, self.vm_state_size,
                             len(self.extra)) + self.extra + ident + name
        return out + bytes(pad8(len(out)) - len(out))


@dataclass
class BitmapDirEntry:
    bitmap_table_offset: int
    bitmap_table_size: int
    flags: int
    type: int
    granularity_bits: int
    name: str
    extra: bytes = b""

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    @property
    def flag_names(self) -> list[str]:
        return [n for bit, n in BITMAP_FLAG_NAMES.items() if self.flags & bit]

    @classmethod
    def parse_directory(cls, buf: bytes, count: int) -> list["BitmapDirEntry"]:
        entries, pos = [], 0
        for _ in range(count):
            if pos + BME_HEADER_SIZE > len(buf):
                raise InvalidImageError("bitmap directory is truncated")
            table_off, table_size, flags, btype, gbits, name_len, extra_len = _BME.unpack_from(buf, pos)
            pos += BME_HEADER_SIZE
            end = pos + extra_len + name_len
            if end > len(buf):
                raise InvalidImageError("bitmap directory entry is truncated")
            extra = bytes(buf[pos : pos + extra_len])
            name = bytes(buf[pos + extra_len : end]).decode("utf-8", "replace")
            pos = pad8(end)
            entries.append(cls(table_off, table_size, flags, btype, gbits, name, extra))
        return entries

    def pack(self) -> bytes:
        name = self.name.encode()
        out = _BME.pack(self.bitmap_table_offset, self.bitmap_table_size, self.flags, self.type,
                        self.granularity_bits, len(name), len(self.extra)) + self.extra + name
        return out + bytes(pad8(len(out)) - len(out))


# ---- L2 entries -------------------------------------------------------------

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


@dataclass(frozen=True)
class Geometry:
    """Sizes derived from the header that every layer needs, computed once."""

    cluster_bits: int
    extended_l2: bool
    zero_flag: bool          # v3 L2 entries have a zero flag in bit 0
    compression_type: int
    refcount_order: int

    @cached_property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @cached_property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @cached_property
    def l2_entries(self) -> int:
        return self.cluster_size // self.l2_entry_size

    @cached_property
    def l2_span(self) -> int:
        """Guest bytes covered by one L2 table."""
        return self.l2_entries << self.cluster_bits

    @cached_property
    def subcluster_size(self) -> int:
        return self.cluster_size // SUBCLUSTERS_PER_CLUSTER if self.extended_l2 else self.cluster_size

    @cached_property
    def refcounts_per_block(self) -> int:
        return (self.cluster_size * 8) >> self.refcount_order

    @classmethod
    def from_header(cls, h: Header) -> "Geometry":
        return cls(h.cluster_bits, h.extended_l2, h.version >= 3, h.compression_type, h.refcount_order)

    def l1_entries_needed(self, virtual_size: int) -> int:
        return -(-virtual_size // self.l2_span)


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
