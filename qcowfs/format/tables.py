"""The snapshot table and the bitmap directory: their entries, parsed and
packed (docs/interop/qcow2.txt, "Snapshots" and "Bitmaps extension")."""
from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import InvalidImageError
from .header import pad8

# Snapshots.
SNAPSHOT_HEADER_SIZE = 40
SNAPSHOT_MIN_EXTRA_V3 = 16
# A snapshot's icount when none was recorded (QEMU writes -1; qemu-img info leaves it out).
NO_ICOUNT = (1 << 64) - 1

# Bitmaps.
BME_IN_USE = 1 << 0
BME_AUTO = 1 << 1
BME_EXTRA_DATA_COMPATIBLE = 1 << 2
BME_RESERVED_FLAGS = ~(BME_IN_USE | BME_AUTO | BME_EXTRA_DATA_COMPATIBLE) & 0xFFFFFFFF
BME_TYPE_DIRTY_TRACKING = 1
BME_HEADER_SIZE = 24
BME_TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_TABLE_ALL_ONES = 1 << 0
# Reserved bits of a bitmap table entry (QEMU's BME_TABLE_ENTRY_RESERVED_MASK).
BME_TABLE_RESERVED_MASK = 0xFF000000000001FE
BME_MIN_GRANULARITY_BITS = 9
BME_MAX_GRANULARITY_BITS = 31
BME_MAX_NAME_SIZE = 1023
BITMAP_FLAG_NAMES = {BME_IN_USE: "in-use", BME_AUTO: "auto", BME_EXTRA_DATA_COMPATIBLE: "extra-data-compatible"}

_SNAPSHOT = struct.Struct(">QIHHIIQII")
_BME = struct.Struct(">QIIBBHI")


@dataclass
class SnapshotEntry:
    """One entry of the snapshot table, as stored (its extra data kept whole)."""

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
    def parse_table(cls, buf: bytes, count: int, partial: bool = False) -> list["SnapshotEntry"]:
        """COUNT entries of the table BUF holds; PARTIAL (a repair): the entries
        before the first that cannot be read, where that is an error otherwise."""
        entries: list[SnapshotEntry] = []
        pos = 0
        for _ in range(count):
            problem = None
            if pos + SNAPSHOT_HEADER_SIZE > len(buf):
                problem = "snapshot table is truncated"
            else:
                (l1_off, l1_size, id_len, name_len, dsec, dnsec, clock, vmss,
                 extra_len) = _SNAPSHOT.unpack_from(buf, pos)
                end = pos + SNAPSHOT_HEADER_SIZE + extra_len + id_len + name_len
                if end > len(buf):
                    problem = "snapshot table entry is truncated"
                else:
                    at = pos + SNAPSHOT_HEADER_SIZE
                    extra = bytes(buf[at : at + extra_len])
                    at += extra_len
                    ident = bytes(buf[at : at + id_len]).decode("utf-8", "replace")
                    name = bytes(buf[at + id_len : end]).decode("utf-8", "replace")
                    if max(len(ident.encode()), len(name.encode())) > 0xFFFF:
                        problem = "snapshot table entry has an id or name that is not UTF-8 text"
            if problem is not None:
                if partial:
                    return entries
                raise InvalidImageError(problem)
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
    """One entry of the bitmap directory, as stored."""

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
