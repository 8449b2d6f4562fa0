"""Runs of fixed-size blocks of a buffer: which are zeros, which differ
from what another buffer holds at the same place.

The one place a command that copies a disk judges its blocks: convert
leaves a block of zeros unallocated (at the target's granularity: a
cluster, or the -S size of a raw target) and, with -B, writes only the
blocks that differ from the backing file; a safe rebase writes only the
blocks where the old backing chain and the new one differ. (A dirty map
skips a bitmap's blocks of zeros with it too.) A run is
[a, b) of block indexes; the last block of a buffer may be short.
"""
from __future__ import annotations

import re

Runs = list[tuple[int, int]]   # [a, b) runs of block indexes

# The largest buffer the zero check takes (convert's chunk, rebase's piece),
# and so the largest write they make: 2 MiB, as qemu-img copies. With 4 MiB,
# the kernel's copy of those writes into the page cache cost 3-20 times as
# much in some runs on the bench's VM (rebase: 0.18-0.47 s of system time
# against 0.11-0.16; convert of a full 1 GiB image: 1.6-2.8 s in 7 of 13
# runs, never with 2 MiB; docs/speed.md).
MAX_BUFFER = 2 << 20
# Zeros to compare buffers with: one calloc'd block, never written, so its
# pages are the kernel's shared zero page (no resident memory); sliced as a
# memoryview, never as bytes (a bytes slice is a copy).
_ZEROS = memoryview(bytes(MAX_BUFFER))
# A run of zero bytes (the first bytes of the blocks that may be all zeros).
_ZERO_RUN = re.compile(rb"\0+")


def zero_runs(buf: bytes | bytearray, n: int, unit: int) -> Runs:
    """The runs of UNIT-sized blocks of BUF[:N] that are all zeros. Only a
    block whose first byte is zero can be one: a strided slice gives those
    first bytes, a regular expression their runs, and each run is compared
    whole (bytearray.startswith is a memcmp; a memoryview's == compares byte
    by byte, 50 times slower), block by block only where the whole run is
    not zeros. No numpy: a 4 MiB chunk of data costs 1-20 us, one of zeros
    105-140 (half numpy's time), so its import (65 ms) pays for 2 GiB of
    such chunks; only chunks of small blocks that begin with zeros and then
    hold data cost more than with numpy (1.1 ms against 0.38 for 512-byte
    blocks, 0.24 against 0.22 for 4 KiB ones; docs/speed.md)."""
    out: Runs = []
    whole = n // unit
    block = _ZEROS[:unit]
    for m in _ZERO_RUN.finditer(buf[0 : whole * unit : unit]):
        a, b = m.span()
        if buf.startswith(_ZEROS[: (b - a) * unit], a * unit):
            out.append((a, b))
            continue
        out.extend(index_runs([i for i in range(a, b) if buf.startswith(block, i * unit)]))
    if whole * unit < n and buf.startswith(_ZEROS[: n - whole * unit], whole * unit):
        if out and out[-1][1] == whole:
            out[-1] = (out[-1][0], whole + 1)
        else:
            out.append((whole, whole + 1))
    return out


def zero_word_runs(buf: bytes | bytearray | memoryview, unit: int) -> Runs:
    """The runs of UNIT-byte words of BUF that are all zeros, for the small
    words of a table (an L2 entry: 8 or 16 bytes), which zero_runs' test of
    first bytes does not suit (an allocated entry's first byte is zero too).
    A zero word lies in a run of at least UNIT zero bytes, and each whole
    word inside such a run is zero: one regular expression finds them all,
    and only the other words cost a Python step."""
    out: Runs = []
    for m in re.finditer(b"\\0{%d,}" % unit, buf):
        a, b = -(-m.start() // unit), m.end() // unit
        if a < b:
            out.append((a, b))
    return out


def differing_runs(buf: bytearray, theirs: memoryview, n: int, unit: int) -> tuple[Runs, Runs]:
    """The runs of UNIT-sized blocks of BUF[:N] that differ from THEIRS[:N]:
    (those that are all zeros, the others). Equal buffers, the common case
    of a copy against a backing file, cost one memcmp."""
    if buf.startswith(theirs[:n]):
        return [], []
    count = -(-n // unit)
    differ = [i for i in range(count) if not buf.startswith(theirs[i * unit : min(n, (i + 1) * unit)], i * unit)]
    zero = {i for a, b in zero_runs(buf, n, unit) for i in range(a, b)}
    return index_runs([i for i in differ if i in zero]), index_runs([i for i in differ if i not in zero])


def index_runs(indexes: list[int]) -> Runs:
    """[a, b) runs of the ascending INDEXES."""
    out: Runs = []
    for i in indexes:
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def complement(runs: Runs, count: int) -> Runs:
    """The runs of [0, COUNT) outside RUNS (ascending, disjoint)."""
    out: Runs = []
    pos = 0
    for a, b in runs:
        if a > pos:
            out.append((pos, a))
        pos = b
    if pos < count:
        out.append((pos, count))
    return out


def widened(ranges: list[tuple[int, int]], unit: int) -> list[tuple[int, int]]:
    """Byte RANGES (ascending) widened to whole UNIT-sized blocks (a range of
    a subcluster, or of a raw file's 4 KiB block, becomes its cluster),
    overlapping ones merged: the blocks the comparisons above then judge."""
    out: list[tuple[int, int]] = []
    for start, end in ranges:
        start, end = start // unit * unit, -(-end // unit) * unit
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out
