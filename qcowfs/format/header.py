"""The header: the fixed fields of the first cluster, its extensions, the
feature bits, and the geometry derived from it (docs/interop/qcow2.txt,
"Header" and "Header extensions")."""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterator

from ..errors import InvalidImageError

QCOW_MAGIC = b"QFI\xfb"
V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104
# QEMU writes a 112-byte v3 header (compression_type at byte 104, padded).
V3_HEADER_LENGTH = 112

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_REFCOUNT_ORDER = 6
# QEMU's limits: tables larger than these are refused as absurd.
MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
MAX_SNAPSHOTS = 65536
MAX_VIRTUAL_SIZE = 1 << 61
# Disks are whole sectors (QEMU's BDRV_SECTOR_SIZE): a raw file's disk, a new
# disk's size, a range of a disk as one of its own.
SECTOR_SIZE = 512
# Extended L2 entries split a cluster into this many subclusters.
SUBCLUSTERS_PER_CLUSTER = 32

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


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def pad8(n: int) -> int:
    return align_up(n, 8)


@dataclass
class HeaderExtension:
    """One header extension: its type (EXT_*) and its data, unpadded."""

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
    def external_data(self) -> bool:
        """Guest clusters live in an external data file (at their guest
        offset): L2 entries point there, and no refcount counts them."""
        return bool(self.incompatible_features & INCOMPAT_DATA_FILE)

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
            # A C string to QEMU (qcow2_do_open): what follows a NUL byte is
            # not part of the name, and a name that starts with one is none.
            raw = bytes(buf[hdr.backing_file_offset:end]).split(b"\0", 1)[0]
            try:
                hdr.backing_file = raw.decode("utf-8") if raw else None
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


# QEMU writes its feature name table into version 3 headers of clusters
# larger than this only (qcow2_update_header): eight names take 392 bytes,
# which would leave a 512-byte cluster's header next to no room for a backing
# file name or the bitmaps extension.
FEATURE_TABLE_MAX_OMITTED = 4096


def feature_table() -> HeaderExtension:
    """QEMU's feature name table extension."""
    return HeaderExtension(EXT_FEATURE_TABLE, b"".join(bytes([t, bit]) + name.encode().ljust(46, b"\0")
                                                       for (t, bit), name in FEATURE_NAMES_BUILTIN.items()))


def whole_sectors(n: int) -> int:
    """N bytes rounded up to whole sectors: the disk QEMU makes of them."""
    return -(-n // SECTOR_SIZE) * SECTOR_SIZE


def wants_feature_table(version: int, cluster_size: int) -> bool:
    """Whether QEMU writes its feature name table into such a header."""
    return version >= 3 and cluster_size > FEATURE_TABLE_MAX_OMITTED


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
    """The bitmaps extension: where the bitmap directory lies and how many
    bitmaps it lists."""

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
