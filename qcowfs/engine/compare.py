"""qemu-img compare: where two disks first read differently.

The disks are convert's sources (a qcow2 image's disk, backing chain
included, through its map; a raw file through SEEK_DATA), so only what
either calls data is read: where neither does, both read zeros. A disk
reads zeros past its end, as qemu-img compares the larger disk's tail with
zeros. Differences are told as qemu-img tells them: the start of the first
512-byte sector that differs.
"""
from __future__ import annotations

from typing import Callable, Protocol

from .blocks import MAX_BUFFER
from .convert import SourceDisk

SECTOR = 512


def merged(ranges: list[tuple[int, int]], end: int) -> list[tuple[int, int]]:
    """RANGES ([start, stop) pairs, in any order, overlapping) as sorted
    disjoint ranges, each cut at END."""
    out: list[tuple[int, int]] = []
    for start, stop in sorted(ranges):
        stop = min(stop, end)
        if start >= stop:
            continue
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], stop))
        else:
            out.append((start, stop))
    return out


async def first_difference(a: SourceDisk, b: SourceDisk,
                           progress: Callable[[float], None] | None = None) -> int | None:
    """The start of the first sector where A and B read differently (the
    shorter reading zeros past its end), or None where they read the same."""
    size = max(a.size, b.size)
    ranges = merged(await a.data_ranges() + await b.data_ranges(), size)
    total = sum(stop - start for start, stop in ranges) or 1
    longest = min(MAX_BUFFER, max((stop - start for start, stop in ranges), default=0))
    mine, theirs = bytearray(longest), bytearray(longest)
    done = 0
    for start, stop in ranges:
        for pos in range(start, stop, MAX_BUFFER):
            n = min(MAX_BUFFER, stop - pos)
            va, vb = memoryview(mine)[:n], memoryview(theirs)[:n]
            await _read(a, va, pos)
            await _read(b, vb, pos)
            if va != vb:
                return (pos + _first_unequal(va, vb)) // SECTOR * SECTOR
            done += n
            if progress is not None:
                progress(done / total)
    return None


async def _read(disk: SourceDisk, view: memoryview, offset: int) -> None:
    """VIEW filled from DISK at OFFSET, zeros past its end."""
    n = await disk.readinto(view, offset) if offset < disk.size else 0
    if n < len(view):
        view[n:] = bytes(len(view) - n)


def _first_unequal(a: memoryview, b: memoryview) -> int:
    """Index of the first byte where A and B (unequal, of one length)
    differ: halving, each step one comparison in C."""
    lo, hi = 0, len(a)  # (a[:lo] == b[:lo]; they differ before hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


# What a range of a disk is, for the strict mode (qemu-img compare -s):
# data, a zero range the image holds (a zero cluster, a raw file's hole), or
# nothing allocated in the whole chain.
DATA, ZERO, UNALLOCATED = "data", "zero", "unallocated"


class MappedDisk(SourceDisk, Protocol):
    async def allocation(self) -> list[tuple[int, int, str]]:
        """(start, stop, kind) runs covering the disk, in order (DATA, ZERO, UNALLOCATED)."""


def first_kind_difference(a: list[tuple[int, int, str]], b: list[tuple[int, int, str]]) -> int | None:
    """The first offset where the allocation kinds A and B give (runs
    (start, stop, kind) covering one disk each, in order) differ, or None."""
    i = j = 0
    pos = 0
    while i < len(a) and j < len(b):
        if a[i][2] != b[j][2]:
            return pos
        pos = min(a[i][1], b[j][1])
        i += a[i][1] == pos
        j += b[j][1] == pos
    return None
