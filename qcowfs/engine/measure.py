"""How large a file a new image needs (qemu-img measure): QEMU's estimate,
to the byte, for a qcow2 or raw image of a given size or holding a given
disk.

The qcow2 numbers are QEMU's formulas (block/qcow2.c qcow2_measure,
qcow2_calc_prealloc_size; block/qcow2-bitmap.c for the bitmaps), not the
layout `create` makes: "fully allocated" is header + every L2 table + the
L1 table + the refcount structures counting all of it + every data
cluster (+ a LUKS header); "required" is the same less the data clusters
the disk does not hold. The refcount structures are found by the same
fixed point as a new image's (create.refcount_metadata_clusters).

The options are checked as qcow2_measure checks them, which is less than
create does: what only shapes an image (lazy_refcounts, data_file,
compression_type, backing_fmt...) is taken, its value's type checked, and
changes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from ..errors import UsageError
from ..format import MAX_CLUSTER_BITS, MIN_CLUSTER_BITS, whole_sectors
from .create import (DEFAULT_CLUSTER_SIZE, KEYWORDS, OPTION_KINDS, PREALLOCATION_MODES, EncryptOptions,
                     option_bool, option_int, check_encrypt, luks_header_bytes, refcount_metadata_clusters)

# QEMU's QCOW_MAX_L1_SIZE: the L1 table of a --size measure must fit in it.
MAX_L1_BYTES = 32 << 20
# bdrv sizes are int64 (qemu-img: "Must be between 0 and 9223372036854775807").
MAX_SIZE = (1 << 63) - 1
# The options of a raw output: raw's and the file protocol's (qemu-img -O raw -o).
RAW_OPTIONS = ("size", "preallocation")


@dataclass(frozen=True)
class MeasureOptions:
    """A qcow2 output's options, as qcow2_measure reads them."""

    cluster_size: int = DEFAULT_CLUSTER_SIZE
    version: int = 3
    refcount_order: int = 4
    extended_l2: bool = False
    preallocation: str = "off"
    backing_file: bool = False
    luks_bytes: int = 0

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8


def qcow2_options(**kwargs: Any) -> MeasureOptions:
    """MeasureOptions from create's keywords (values as Python values or
    qemu-img's text), refused where qemu-img measure refuses them."""
    unknown = sorted(set(kwargs) - set(KEYWORDS))
    if unknown:
        raise UsageError(f"invalid parameter '{KEYWORDS.get(unknown[0], unknown[0])}' for qcow2 "
                         f"(known: {', '.join(OPTION_KINDS)})")
    v = {k: val for k, val in kwargs.items() if val is not None}
    for k, val in v.items():   # (every value's type, as qemu-img's option parser checks it)
        kind = OPTION_KINDS[KEYWORDS[k]]
        if kind == "bool":
            v[k] = option_bool(KEYWORDS[k], val)
        elif kind in ("int", "size"):
            v[k] = option_int(KEYWORDS[k], val)
    extended_l2 = v.get("extended_l2", False)
    cs = v.get("cluster_size", DEFAULT_CLUSTER_SIZE)
    if cs <= 0 or cs & (cs - 1) or not 1 << MIN_CLUSTER_BITS <= cs <= 1 << MAX_CLUSTER_BITS:
        raise UsageError("cluster size must be a power of two between 512 and 2048k")
    if extended_l2 and cs < 16384:
        raise UsageError("extended L2 entries are only supported with cluster sizes of at least 16384 bytes")
    compat = v.get("compat", "1.1")
    if compat not in ("0.10", "1.1"):   # (measure takes neither v2 nor v3, as qemu-img 7.2)
        raise UsageError(f"invalid compatibility level '{compat}' (0.10 or 1.1)")
    version = 2 if compat == "0.10" else 3
    bits = v.get("refcount_bits", 16)
    if bits <= 0 or bits & (bits - 1) or bits > 64:
        raise UsageError("refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and bits != 16:
        raise UsageError("different refcount widths than 16 bits require compatibility level 1.1 or above")
    prealloc = v.get("preallocation", "off")
    if prealloc not in PREALLOCATION_MODES:
        raise UsageError(f"invalid preallocation mode '{prealloc}' ({', '.join(PREALLOCATION_MODES)})")
    luks = 0
    if v.get("encrypt_format") == "luks":   # (any other format is no LUKS header: qemu-img ignores it)
        enc = {k[len("encrypt_"):]: val for k, val in v.items() if k.startswith("encrypt_") and k != "encrypt_format"}
        e = EncryptOptions(**enc)
        check_encrypt(e)
        luks = luks_header_bytes(e)
    o = MeasureOptions(cs, version, bits.bit_length() - 1, extended_l2, prealloc, "backing_file" in v, 0)
    return MeasureOptions(**{**o.__dict__, "luks_bytes": -(-luks // cs) * cs})


def raw_options(**kwargs: Any) -> None:
    """A raw output takes qemu-img's raw and file options (size, preallocation): they change nothing."""
    for k, val in kwargs.items():
        if k not in RAW_OPTIONS:
            raise UsageError(f"invalid parameter '{KEYWORDS.get(k, k)}' for raw (known: {', '.join(RAW_OPTIONS)})")
        if k == "preallocation" and val is not None and val not in PREALLOCATION_MODES:
            raise UsageError(f"invalid preallocation mode '{val}' ({', '.join(PREALLOCATION_MODES)})")


def _ceil(n: int, d: int) -> int:
    return -(-n // d)


def check_size(size: int) -> int:
    """--size, in whole sectors as qemu-img takes it."""
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_SIZE:
        raise UsageError(f"invalid image size {size!r} (it must be between 0 and {MAX_SIZE})")
    return min(whole_sectors(size), MAX_SIZE)


def prealloc_size(virtual_size: int, o: MeasureOptions) -> int:
    """Bytes of a fully allocated image (QEMU's qcow2_calc_prealloc_size):
    header, L2 tables, L1 table (each in whole clusters), refcount
    structures and every data cluster."""
    cs = o.cluster_size
    data = -(-virtual_size // cs) * cs
    per_l2 = cs // o.l2_entry_size
    l2_entries = -(-(data // cs) // per_l2) * per_l2
    l1_entries = l2_entries * o.l2_entry_size // cs
    l1_entries = -(-l1_entries // (cs // 8)) * (cs // 8)
    meta = cs + l2_entries * o.l2_entry_size + l1_entries * 8
    blocks, table = refcount_metadata_clusters((meta + data) // cs, cs, o.refcount_order)
    return meta + (blocks + table) * cs + data


def data_clusters_bytes(extents: Iterable[tuple[int, int]], size: int, cluster_size: int) -> int:
    """Bytes of the clusters (of CLUSTER_SIZE) that hold any of the data
    EXTENTS ([start, end) ranges, in order) of a disk of SIZE bytes: what
    qcow2_measure's walk of the block status counts."""
    total, counted = 0, 0   # (counted: where the clusters counted so far end)
    for start, end in extents:
        start, end = max(start, counted), min(end, size)
        if start >= end:
            continue
        first = start // cluster_size * cluster_size
        counted = -(-end // cluster_size) * cluster_size
        total += counted - first
    return total


def too_large(virtual_size: int, o: MeasureOptions) -> None:
    """qemu-img's check of a --size: its L1 table must fit QEMU's limit."""
    cs = o.cluster_size
    l2_tables = _ceil(_ceil(virtual_size, cs), cs // o.l2_entry_size)
    if l2_tables * 8 > MAX_L1_BYTES:
        raise UsageError("the image size is too large (try using a larger cluster size)")


def bitmaps_size(bitmaps: Iterable[tuple[str, int, int]], cluster_size: int) -> int:
    """Bytes the persistent bitmaps (name, granularity, disk size) take when
    copied into an image of CLUSTER_SIZE, every bit allocated (QEMU's
    qcow2_get_persistent_dirty_bitmap_size)."""
    total, directory = 0, 0
    for name, granularity, disk_size in bitmaps:
        clusters = _ceil(_ceil(_ceil(disk_size, granularity), 8), cluster_size)
        total += clusters * cluster_size + _ceil(clusters * 8, cluster_size) * cluster_size
        directory += _ceil(24 + len(name.encode()), 8) * 8   # (a directory entry, no extra data)
    return total + _ceil(directory, cluster_size) * cluster_size


def qcow2_result(o: MeasureOptions, virtual_size: int, data: int | None,
                 bitmaps: int | None) -> dict[str, int]:
    """qemu-img measure -O qcow2's answer, keys in its JSON order: for a
    disk of VIRTUAL_SIZE bytes whose clusters hold DATA bytes (None: --size,
    nothing), BITMAPS (None: no line for them)."""
    cs = o.cluster_size
    aligned = -(-virtual_size // cs) * cs
    required = 0 if data is None else data
    if data is not None and o.backing_file:
        required = aligned   # (the new backing file may share nothing with the disk, as QEMU assumes)
    if o.preallocation in ("full", "falloc"):
        required = aligned
    full = o.luks_bytes + prealloc_size(aligned, o)
    out: dict[str, int] = {}
    if bitmaps is not None and o.version >= 3:
        out["bitmaps"] = bitmaps
    out["required"] = full - aligned + required
    out["fully-allocated"] = full
    return out
