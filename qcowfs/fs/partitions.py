"""Partitions as files: partitions/N for each MBR or GPT partition of disk.raw,
snapshot-partitions/NAME/N for each snapshot file's.

The table is parsed here (512-byte sectors), from the file's bytes as they
are at each listing: a directory of partitions is refreshed whenever it is
listed or looked up in (DirNode.refresh), so a table written through
disk.raw shows at the next listing. A partition file is a window of its
disk file: the same rights, reads and writes shifted by its start.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from ..errors import NoSpaceError, ReadOnlyError
from .views import DirNode, FileNode, FileView

SECTOR = 512
MBR_EXTENDED = {0x05, 0x0F, 0x85}
MBR_GPT_PROTECTIVE = 0xEE
MAX_LOGICAL = 128
MAX_GPT_ENTRIES = 1024
_MBR_ENTRY = struct.Struct("<B3sB3sII")  # status, CHS first, type, CHS last, first LBA, sectors
_GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")  # up to the entries' CRC
_GPT_ENTRY = struct.Struct("<16s16sQQQ72s")

Children = dict[str, "DirNode | FileNode"]


@dataclass(frozen=True)
class Partition:
    """One partition: its number, byte range and what the table says of it."""

    number: int
    start: int
    length: int
    attrs: dict[str, str] = field(default_factory=dict, hash=False)

    def key(self) -> tuple[int, int, int, tuple[tuple[str, str], ...]]:
        return self.number, self.start, self.length, tuple(sorted(self.attrs.items()))


async def read_table(disk: FileView) -> list[Partition]:
    """The partitions DISK's table describes now (GPT if the MBR is
    protective, else MBR with logical partitions from 5 on); [] without a
    table. Partitions are clipped to the disk's size; empty ones left out."""
    size = disk.size
    mbr = bytes(await disk.read(0, SECTOR))
    if len(mbr) < SECTOR or mbr[510:512] != b"\x55\xaa":
        return []
    entries = [_MBR_ENTRY.unpack_from(mbr, 446 + 16 * i) for i in range(4)]
    if any(e[2] == MBR_GPT_PROTECTIVE for e in entries):
        parts = await _gpt(disk)
    else:
        parts = await _mbr(disk, entries)
    out = []
    for p in parts:
        length = min(p.length, size - p.start)
        if length > 0:
            out.append(Partition(p.number, p.start, length, p.attrs))
    return out


async def _mbr(disk: FileView, entries: list[tuple[int, bytes, int, bytes, int, int]]) -> list[Partition]:
    parts = []
    for i, (_, _, ptype, _, lba, sectors) in enumerate(entries):
        if ptype == 0 or sectors == 0:
            continue
        parts.append(Partition(i + 1, lba * SECTOR, sectors * SECTOR, _mbr_attrs(ptype)))
        if ptype in MBR_EXTENDED:
            parts += await _logical(disk, lba)
    return parts


def _mbr_attrs(ptype: int) -> dict[str, str]:
    return {"table": "mbr", "type": f"0x{ptype:02x}"}


async def _logical(disk: FileView, ext_lba: int) -> list[Partition]:
    """The chain of extended boot records: each holds one logical partition
    (relative to itself) and a link (relative to the extended partition)."""
    parts: list[Partition] = []
    ebr_lba, seen = ext_lba, set()
    while len(parts) < MAX_LOGICAL and ebr_lba not in seen:
        seen.add(ebr_lba)
        ebr = bytes(await disk.read(ebr_lba * SECTOR, SECTOR))
        if len(ebr) < SECTOR or ebr[510:512] != b"\x55\xaa":
            break
        first = _MBR_ENTRY.unpack_from(ebr, 446)
        link = _MBR_ENTRY.unpack_from(ebr, 462)
        if first[2] and first[5]:
            parts.append(Partition(5 + len(parts), (ebr_lba + first[4]) * SECTOR, first[5] * SECTOR,
                                   _mbr_attrs(first[2])))
        if not link[2] or not link[4]:
            break
        ebr_lba = ext_lba + link[4]
    return parts


async def _gpt(disk: FileView) -> list[Partition]:
    hdr = bytes(await disk.read(SECTOR, SECTOR))
    if len(hdr) < _GPT_HEADER.size or hdr[:8] != b"EFI PART":
        return []
    entries_lba, count, entry_size = _GPT_HEADER.unpack_from(hdr)[10:13]
    if entry_size < _GPT_ENTRY.size or not 0 < count <= MAX_GPT_ENTRIES:
        return []
    raw = bytes(await disk.read(entries_lba * SECTOR, count * entry_size))
    import uuid  # (only a GPT disk needs it)

    parts = []
    for i in range(min(count, len(raw) // entry_size)):
        type_guid, part_guid, first, last, _, name = _GPT_ENTRY.unpack_from(raw, i * entry_size)
        if type_guid == bytes(16) or last < first:
            continue
        parts.append(Partition(i + 1, first * SECTOR, (last - first + 1) * SECTOR, {
            "table": "gpt",
            "type_guid": str(uuid.UUID(bytes_le=type_guid)),
            "uuid": str(uuid.UUID(bytes_le=part_guid)),
            "name": name.decode("utf-16-le", "replace").split("\0", 1)[0],
        }))
    return parts


class PartitionView(FileView):
    """partitions/N: the byte range of one partition of a disk file, with
    that file's rights and caching."""

    def __init__(self, disk: FileView, part: Partition) -> None:
        self.disk = disk
        self.part = part
        self.writable = disk.writable
        self.keep_cache = disk.keep_cache
        self.direct_io = disk.direct_io
        self.unchanging = disk.unchanging
        self.mtime_ns = disk.mtime_ns

    @property
    def size(self) -> int:
        return self.part.length

    def xattrs(self) -> dict[str, bytes]:
        out = {f"user.qcow2.partition.{k}": v.encode() for k, v in self.part.attrs.items()}
        out["user.qcow2.partition.start"] = str(self.part.start).encode()
        out["user.qcow2.partition.length"] = str(self.part.length).encode()
        return out

    def read_cached(self, offset: int, length: int) -> bytes | bytearray | None:
        n = self.clip(offset, length)
        return self.disk.read_cached(self.part.start + offset, n) if n > 0 else b""

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        n = self.clip(offset, length)
        return await self.disk.read(self.part.start + offset, n) if n > 0 else b""

    async def write(self, offset: int, data: bytes) -> int:
        n = self.clip(offset, len(data))
        return await self.disk.write(self.part.start + offset, data[:n] if n < len(data) else data)

    async def truncate(self, size: int) -> None:
        raise ReadOnlyError("a partition's size is set by the partition table")

    async def fsync(self) -> None:
        await self.disk.fsync()

    # Discard, zeroing and holes as through the disk file (mkfs and fstrim
    # through a loop device on the partition send fallocate; cp and tar seek).

    async def zero(self, offset: int, length: int, unmap: bool) -> None:
        n = self.clip(offset, length)
        if n > 0:
            await self.disk.zero(self.part.start + offset, n, unmap)

    async def allocate(self, offset: int, length: int, keep_size: bool) -> None:
        """Inside the partition as the disk file does (its rights decide);
        past its end it cannot grow."""
        if not keep_size and offset + length > self.size:
            raise NoSpaceError("a partition's size is set by the partition table: it cannot grow")
        n = self.clip(offset, length)
        await self.disk.allocate(self.part.start + offset, max(n, 0), keep_size=True)

    async def seek(self, offset: int, data: bool) -> int:
        found = await self.disk.seek(self.part.start + offset, data)
        return min(found - self.part.start, self.size)


def _partition_lister(disk: FileView) -> Callable[[Children], Awaitable[Children]]:
    async def refresh(old: Children) -> Children:
        kept = {n.view.part.key(): n for n in old.values()
                if isinstance(n, FileNode) and isinstance(n.view, PartitionView)}
        out: Children = {}
        for p in await read_table(disk):
            name = str(p.number)
            node = kept.get(p.key())
            out[name] = node if node is not None else FileNode(name, PartitionView(disk, p))
        return out
    return refresh


def _snapshot_lister(snapshots: DirNode) -> Callable[[Children], Awaitable[Children]]:
    """snapshot-partitions/: one directory NAME per snapshots/NAME.raw now
    (a snapshot file that stays keeps its directory)."""
    made: dict[int, DirNode] = {}  # id(snapshot view) -> its directory

    async def refresh(old: Children) -> Children:
        out: Children = {}
        views = {}
        for name, node in snapshots.children.items():
            if not isinstance(node, FileNode) or not name.endswith(".raw"):
                continue
            dname = name[: -len(".raw")]
            views[id(node.view)] = node.view
            d = made.get(id(node.view))
            if d is None or d.name != dname or old.get(dname) is not d:
                d = made[id(node.view)] = DirNode(dname, mtime_ns=node.view.mtime_ns,
                                                  refresh=_partition_lister(node.view))
            out[dname] = d
        for k in set(made) - set(views):
            del made[k]
        return out
    return refresh


def add_partitions(root: DirNode) -> None:
    """partitions/ (of disk.raw) and snapshot-partitions/ (of each snapshot
    file) in ROOT, over the views the tree has now (overlays included)."""
    disk = root.children.get("disk.raw")
    if isinstance(disk, FileNode):
        root.children["partitions"] = DirNode("partitions", mtime_ns=root.mtime_ns,
                                              refresh=_partition_lister(disk.view))
    snaps = root.children.get("snapshots")
    if isinstance(snaps, DirNode):
        root.children["snapshot-partitions"] = DirNode("snapshot-partitions", mtime_ns=root.mtime_ns,
                                                       refresh=_snapshot_lister(snaps))
