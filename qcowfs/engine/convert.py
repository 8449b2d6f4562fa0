"""The copy of `qemu-img convert`: a source disk's data into a new image.

The loop works on two small protocols, so it knows neither where the source
comes from (a qcow2 disk or snapshot, a raw file) nor what the target is (a
qcow2 image, a raw file): the source tells where its data lies (`find`:
the map of a qcow2 image, SEEK_DATA/SEEK_HOLE of a raw file) and is read
only there; every range the source calls a hole stays unallocated in the
target, and so does every block of zeros the data holds (at the target's
granularity: a cluster of a qcow2 target, the -S size of a raw one).

Compression (-c) runs in worker threads, a share of each chunk's clusters
each (zlib and zstd release the GIL, so the cores work together); the
compressed clusters are then written by the engine's writer in one batch
per chunk (Writer.write_compressed).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import trio

from ..format.compression import compress_cluster
from ..host.hostfile import HostFile
from .opening import RawSource

# Bytes read and written per step: large enough that per-call costs vanish,
# small enough to show progress and keep memory low.
CHUNK = 4 << 20
COMPRESS_THREADS = max(1, min(4, os.cpu_count() or 1))


class SourceDisk(Protocol):
    @property
    def size(self) -> int: ...
    async def readinto(self, buf: bytearray | memoryview, offset: int) -> int: ...
    async def data_ranges(self) -> list[tuple[int, int]]:
        """[start, end) of every range that may hold data, in order."""


class TargetDisk(Protocol):
    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> int: ...
    async def zero(self, offset: int, length: int, unmap: bool = True) -> None: ...


class CompressedTarget(TargetDisk, Protocol):
    @property
    def cluster_size(self) -> int: ...
    @property
    def compression_type(self) -> int: ...
    async def write_compressed(self, offset: int, blobs: list[bytes]) -> None: ...


class RawDisk:
    """A raw file as a source disk: its data where SEEK_DATA finds it."""

    def __init__(self, path: str, force_share: bool = False) -> None:
        self._src = RawSource(path, force_share)
        self.size = self._src.size

    async def readinto(self, buf: bytearray | memoryview, offset: int) -> int:
        n = max(0, min(len(buf), self.size - offset))
        await self._src.read_into(memoryview(buf)[:n], offset)
        return n

    async def data_ranges(self) -> list[tuple[int, int]]:
        out = []
        pos = 0
        while pos < self.size:
            start = await self._src.seek(pos, self.size, True)
            if start >= self.size:
                break
            end = await self._src.seek(start, self.size, False)
            out.append((start, end))
            pos = max(end, start + 1)
        return out

    async def close(self) -> None:
        await self._src.close()


class RawTarget:
    """A new raw file as the target: sized first (all holes), then only the
    data is written."""

    def __init__(self, fd_path: str, size: int, flushes: bool = True) -> None:
        self.file = HostFile(fd_path, writable=True)
        self.file.flushes = flushes
        self.file.truncate(size)

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        self.file.write_sync(data, offset)
        return len(data)

    async def zero(self, offset: int, length: int, unmap: bool = True) -> None:
        # (a new file reads zeros where nothing was written)
        return None

    async def finish(self) -> None:
        await self.file.sync()
        self.file.close()


@dataclass
class CopyPlan:
    size: int
    granularity: int          # zeros of this size (aligned) stay holes; 0: write all
    compress: bool = False
    backing: SourceDisk | None = None   # -B: write only what differs from it
    progress: Callable[[float], None] | None = None
    align: int = 512          # data ranges widened to this (a qcow2 target's cluster size)


def _zero_blocks(view: memoryview, unit: int) -> np.ndarray:
    """Per UNIT-sized block of VIEW (the last may be short): all zeros?"""
    n = len(view)
    whole = n // unit * unit
    arr = np.frombuffer(view[:whole], np.uint64 if unit % 8 == 0 else np.uint8)
    out = np.asarray(~arr.reshape(n // unit, -1).any(axis=1) if whole else np.zeros(0, bool), bool)
    if whole < n:
        out = np.append(out, not any(view[whole:]))
    return np.asarray(out, bool)


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) index runs where FLAGS is true."""
    padded = np.concatenate(([False], flags, [False])).astype(np.int8)
    edges = np.diff(padded)
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


async def copy(src: SourceDisk, dst: TargetDisk, plan: CopyPlan) -> None:
    """Copy SRC's data into the empty DST (see the module's docstring)."""
    buf = bytearray(CHUNK)
    other = bytearray(CHUNK) if plan.backing is not None else None
    below = await plan.backing.data_ranges() if plan.backing is not None else []
    size = plan.size
    pos = 0
    for start, end in _aligned(await src.data_ranges(), plan.align) + [(size, size)]:
        end = min(end, size)
        await _hole(dst, below, pos, min(start, size))
        # Chunks aligned to the chunk size (so to every cluster size).
        c = start
        while c < end:
            n = min(end, (c // CHUNK + 1) * CHUNK) - c
            view = memoryview(buf)[:n]
            await src.readinto(view, c)
            await _chunk(plan, dst, c, view, other)
            c += n
            if plan.progress is not None:
                plan.progress(min(1.0, c / size))
        pos = max(pos, end)
    if plan.progress is not None:
        plan.progress(1.0)


def _aligned(ranges: list[tuple[int, int]], unit: int) -> list[tuple[int, int]]:
    """RANGES widened to whole UNITs (a range of a subcluster, or of a raw
    file's 4 KiB block, becomes its cluster), overlapping ones merged."""
    out: list[tuple[int, int]] = []
    for start, end in ranges:
        start, end = start // unit * unit, -(-end // unit) * unit
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


async def _hole(dst: TargetDisk, below: list[tuple[int, int]], start: int, end: int) -> None:
    """Source range [start, end) reads zeros: nothing to write, except where
    a -B backing file shows data (BELOW): there the target must say zeros."""
    for d, h in below:
        lo, hi = max(d, start), min(h, end)
        if lo < hi:
            await dst.zero(lo, hi - lo, unmap=False)


async def _chunk(plan: CopyPlan, dst: TargetDisk, offset: int, view: memoryview,
                 other: bytearray | None) -> None:
    """Write one chunk of source data: its non-zero blocks (or, with -B,
    its blocks that differ from the backing file)."""
    unit = plan.granularity or len(view)
    if plan.compress:
        unit = dst.cluster_size  # type: ignore[attr-defined]
    if plan.backing is not None and other is not None:
        theirs = memoryview(other)[: len(view)]
        await plan.backing.readinto(theirs, offset)
        cut = len(view) // unit * unit
        same = np.frombuffer(view[:cut], np.uint8).reshape(-1, unit) == \
            np.frombuffer(theirs[:cut], np.uint8).reshape(-1, unit)
        keep = ~same.all(axis=1)
        if cut < len(view):
            keep = np.append(keep, view[cut:] != theirs[cut:])
        zero = _zero_blocks(view, unit) & keep
        for a, b in _runs(zero):
            await dst.zero(offset + a * unit, min(len(view), b * unit) - a * unit, unmap=False)
        keep &= ~zero
    elif plan.granularity:
        keep = ~_zero_blocks(view, unit)
    else:
        keep = np.ones(-(-len(view) // unit), bool)
    if plan.compress:
        await _compressed(dst, offset, view, keep)  # type: ignore[arg-type]
        return
    for a, b in _runs(keep):
        await dst.write(offset + a * unit, view[a * unit : min(len(view), b * unit)])


async def _compressed(dst: CompressedTarget, offset: int, view: memoryview, keep: np.ndarray) -> None:
    """The clusters of KEEP compressed in worker threads, then written as one
    batch per run of clusters; the ones that do not shrink written plainly."""
    cs, ctype = dst.cluster_size, dst.compression_type
    wanted = np.flatnonzero(keep).tolist()
    blobs: dict[int, bytes | None] = {}

    def work(part: list[int]) -> None:
        for i in part:
            piece = view[i * cs : (i + 1) * cs]
            if len(piece) < cs:
                piece = memoryview(bytes(piece) + bytes(cs - len(piece)))
            blobs[i] = compress_cluster(piece, ctype)

    threads = min(COMPRESS_THREADS, len(wanted))
    if threads <= 1:
        await trio.to_thread.run_sync(work, wanted)
    else:
        async with trio.open_nursery() as nursery:
            for t in range(threads):
                nursery.start_soon(trio.to_thread.run_sync, work, wanted[t::threads])
    run: list[bytes] = []
    run_start = -1
    for i in wanted + [-1]:
        blob = blobs.get(i)
        if run and (i != run_start + len(run) or blob is None):
            await dst.write_compressed(offset + run_start * cs, run)
            run = []
        if i < 0:
            break
        if blob is None:
            await dst.write(offset + i * cs, view[i * cs : (i + 1) * cs])
            continue
        if not run:
            run_start = i
        run.append(blob)
