"""The copy of `qemu-img convert`: a source disk's data into a new image.

The loop works on two small protocols, so it knows neither where the source
comes from (a qcow2 disk or snapshot, a raw file) nor what the target is (a
qcow2 image, a raw file): the source tells where its data lies (`find`:
the map of a qcow2 image, SEEK_DATA/SEEK_HOLE of a raw file) and is read
only there; every range the source calls a hole stays unallocated in the
target, and so does every block of zeros the data holds (at the target's
granularity: a cluster of a qcow2 target, the -S size of a raw one).
A target that does not read zeros by itself (-n: an existing image, a
block device) is told every such range instead (CopyPlan.zero_init off).

`Salvaging` wraps a source for --salvage: a read that fails is done again
in pieces, down to 512-byte sectors, and the sectors that still fail read
zeros, each run of them one warning (qemu-img convert --salvage).

The source is read one chunk ahead, on a worker thread (`Lane`), while
the loop zero-checks and writes the chunk before: a copy inside the page
cache costs two kernel copies per byte (the read and the write) plus the
loop's own work, and the read is the part that overlaps well
(docs/speed.md has the numbers).

Compression (-c) runs in one pool of worker threads (`Compressor`), a
job per few clusters (zlib and zstd release the GIL, so the cores work
together), with up to IN_FLIGHT chunks queued: while the workers compress,
the loop reads the next chunks, and the compressed clusters of the oldest
chunk are written, in order, by the engine's writer in one batch per run
(Writer.write_compressed). The output is the same for any number of threads.
"""
from __future__ import annotations

import errno
import os
import stat
import threading
from collections import deque
from dataclasses import dataclass
from queue import SimpleQueue
from typing import TYPE_CHECKING, Any, Callable, Coroutine, Protocol

from ..format import whole_sectors
from ..format.compression import compress_cluster
from ..errors import PassphraseError, QcowError, RequestError
from ..host.hostfile import HostFile
from ..host.waiting import Pace, drive, in_thread
from .blocks import MAX_BUFFER, Runs, complement, differing_runs, widened, zero_runs
from .mapper import zero_fill
from .opening import RawSource

if TYPE_CHECKING:
    from concurrent.futures import Future

# Bytes read and written per step: large enough that per-call costs vanish,
# small enough to show progress and keep memory low.
CHUNK = MAX_BUFFER
COMPRESS_THREADS = 4
# Chunks whose clusters are being compressed while the loop reads on: enough
# that the workers do not wait for the loop's reads and writes (with none
# queued, as before, the cores idled while each chunk was read and written),
# few enough to keep memory at a few chunks.
IN_FLIGHT = 3
# Bytes of clusters one compression job takes (whole clusters, at least one).
JOB_BYTES = 512 << 10


class SourceDisk(Protocol):
    @property
    def size(self) -> int: ...
    async def readinto(self, buf: bytearray | memoryview, offset: int) -> int: ...
    async def data_ranges(self) -> list[tuple[int, int]]:
        """[start, end) of every range that may hold data, in order."""


class TargetDisk(Protocol):
    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> int: ...
    async def zero(self, offset: int, length: int, unmap: bool = True) -> None: ...


class OffloadSource(SourceDisk, Protocol):
    async def host_runs(self, offset: int, n: int) -> list[tuple[int, int, int]] | None:
        """(fd, host offset, length) runs that hold the disk's bytes
        [offset, offset+N) as they are, in order; None where some of it
        cannot be copied from a file as it lies (compressed, encrypted, in a
        backing file, a preallocated zero cluster)."""


class OffloadTarget(TargetDisk, Protocol):
    def copy_from(self, fd: int, src_offset: int, offset: int, n: int) -> bool:
        """Copy N bytes of FD at SRC_OFFSET to OFFSET in the kernel; False where
        it cannot (the bytes are then written the usual way)."""


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
        return [(pos, pos + n) for pos, n, has_data in self._src.file.data_runs(0, self.size) if has_data]

    async def host_runs(self, offset: int, n: int) -> list[tuple[int, int, int]] | None:
        """The file itself (its tail past the end, which reads zeros, cannot be copied)."""
        return [(self._src.file.fd, offset, n)] if offset + n <= self._src.file.known_size else None

    async def allocation(self) -> list[tuple[int, int, str]]:
        """(start, stop, "data" or "zero": a hole) runs covering the file."""
        return [(pos, pos + n, "data" if has_data else "zero")
                for pos, n, has_data in self._src.file.data_runs(0, self.size)]

    async def close(self) -> None:
        await self._src.close()


class Window:
    """The bytes [START, END) of SOURCE's disk as a disk of their own (`qcowfs
    dd`'s skip and count): reads and the map shifted by START, cut at END.
    The disk is whole sectors, as every disk: past END, to the next
    multiple of 512, it reads zeros (as qemu-img dd leaves them)."""

    def __init__(self, source: SourceDisk, start: int, end: int) -> None:
        self._src = source
        self._start = start
        self._length = max(0, end - start)
        self.size = whole_sectors(self._length)

    async def data_ranges(self) -> list[tuple[int, int]]:
        lo, hi = self._start, self._start + self._length
        return [(max(a, lo) - lo, min(b, hi) - lo) for a, b in await self._src.data_ranges() if a < hi and b > lo]

    async def readinto(self, buf: bytearray | memoryview, offset: int) -> int:
        n = max(0, min(len(buf), self.size - offset))
        view = memoryview(buf)[:n]
        inside = max(0, min(n, self._length - offset))
        await self._src.readinto(view[:inside], self._start + offset)
        zero_fill(view[inside:])
        return n


# --salvage: a failing read is done again in pieces of this size, and a piece
# that fails sector by sector (qemu-img goes to sectors at once: the same
# sectors fail, in far fewer reads where most of a chunk is sound).
SALVAGE_PIECE = 64 << 10
SECTOR = 512


class Salvaging:
    """SOURCE as --salvage reads it (qemu-img convert --salvage): a read that
    fails (a QcowError, a damaged table, or an OSError of the host) is done
    again in pieces, then sector by sector; a sector that still fails reads
    zeros, and each run of such sectors (the same error) is one warning,
    WARN("error while reading offset N (M bytes): why; written as zeros").
    A map that cannot be read makes every range data (one warning): the
    reads then find what is there."""

    def __init__(self, source: SourceDisk, warn: Callable[[str], None]) -> None:
        self._src = source
        self._warn = warn
        self.size = source.size
        self._run: tuple[int, int, str] | None = None   # (start, end, why): failed sectors not yet said

    async def data_ranges(self) -> list[tuple[int, int]]:
        try:
            return await self._src.data_ranges()
        except PassphraseError:
            raise   # (no key: nothing to salvage, every read would fail)
        except (QcowError, OSError) as e:
            self._warn(f"error while reading the allocation map: {_why(e)}; every range is read")
            return [(0, self.size)]

    async def readinto(self, buf: bytearray | memoryview, offset: int) -> int:
        n = max(0, min(len(buf), self.size - offset))
        view = memoryview(buf)[:n]
        if await self._read(view, offset) is None:
            return n
        pos = offset
        while pos < offset + n:   # (pieces aligned to SALVAGE_PIECE)
            end = min(offset + n, (pos // SALVAGE_PIECE + 1) * SALVAGE_PIECE)
            if await self._read(view[pos - offset : end - offset], pos) is not None:
                for sector in range(pos, end, SECTOR):
                    last = min(end, sector + SECTOR)
                    piece = view[sector - offset : last - offset]
                    error = await self._read(piece, sector)
                    if error is not None:
                        piece[:] = bytes(len(piece))
                        self._failed(sector, last, _why(error))
            pos = end
        return n

    async def _read(self, view: memoryview, offset: int) -> BaseException | None:
        """VIEW read from the source at OFFSET: None, or the error that failed it."""
        try:
            await self._src.readinto(view, offset)
        except PassphraseError:
            raise
        except (QcowError, OSError) as e:
            return e
        return None

    def _failed(self, start: int, end: int, why: str) -> None:
        if self._run is not None and self._run[1] == start and self._run[2] == why:
            self._run = (self._run[0], end, why)
            return
        self.flush()
        self._run = (start, end, why)

    def flush(self) -> None:
        """Say the failed sectors not yet said (at the end of the copy)."""
        if self._run is not None:
            start, end, why = self._run
            self._warn(f"error while reading offset {start} ({end - start} bytes): {why}; written as zeros")
            self._run = None


def _why(e: BaseException) -> str:
    return (e.strerror or str(e)) if isinstance(e, OSError) else str(e)


class RawTarget:
    """A new raw file as the target: sized first (all holes), then only the
    data is written. Or (IN_PLACE) a block device or an existing file (-n)
    at least SIZE long, written in place: what is not data is zeroed there
    (the copy says every hole: CopyPlan.zero_init off), the rest of it is
    left as it is."""

    def __init__(self, fd_path: str, size: int, flushes: bool = True, in_place: bool = False) -> None:
        self.file = HostFile(fd_path, writable=True)
        self.file.flushes = flushes
        self.in_place = in_place
        self._file_in_place = in_place and stat.S_ISREG(os.fstat(self.file.fd).st_mode)
        if not in_place:
            self.file.truncate(size)
        elif self.file.known_size < size:
            self.file.close()
            raise RequestError(f"{fd_path} is too small for the disk: {self.file.known_size} bytes, "
                               f"the disk {size}")

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        if not self.in_place:
            self.file.allocate(offset, len(data))
        self.file.write_sync(data, offset)
        return len(data)

    def copy_from(self, fd: int, src_offset: int, offset: int, n: int) -> bool:
        """copy_file_range(2): the kernel copies (a reflink on XFS or btrfs,
        no copy through memory at all); False where it cannot (another file
        system, a device, a kernel without it)."""
        try:
            while n:
                done = os.copy_file_range(fd, self.file.fd, n, src_offset, offset)
                if not done:
                    return False
                src_offset, offset, n = src_offset + done, offset + done, n - done
        except OSError as e:
            if e.errno in (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS, errno.EBADF):
                return False
            raise
        return True

    async def zero(self, offset: int, length: int, unmap: bool = True) -> None:
        if not self.in_place:
            return None  # (a new file reads zeros where nothing was written)
        # UNMAP: a hole punched in a file (a device ignores it: BLKZEROOUT's work,
        # as qemu-img asks it)
        if self.file.zero_range(offset, length, punch=unmap and self._file_in_place):
            return None
        zeros = bytes(min(CHUNK, length))
        for pos in range(offset, offset + length, len(zeros)):
            self.file.write_sync(memoryview(zeros)[: min(len(zeros), offset + length - pos)], pos)

    async def finish(self) -> None:
        await self.file.sync()
        self.file.close()


@dataclass
class CopyPlan:
    """What one copy does besides moving data: which zeros stay holes, what
    the target reads by itself, compression, -B, progress and pace."""

    size: int
    granularity: int          # zeros of this size (aligned) stay holes; 0: write all
    compress: bool = False
    backing: SourceDisk | None = None   # -B: write only what differs from it
    progress: Callable[[float], None] | None = None
    align: int = 512          # data ranges widened to this (a qcow2 target's cluster size)
    threads: int = COMPRESS_THREADS   # compression workers (-c)
    zero_init: bool = True    # the target reads zeros where nothing is written (else every byte is said)
    unmap: bool = False       # zeros said to the target free what it holds there (-n: as qemu-img)
    rate: int = 0             # -r: at most this many bytes of data a second (0: as fast as it goes)
    offload: bool = False     # -C: the kernel copies data where source and target allow (copy_file_range)


async def copy(src: SourceDisk, dst: TargetDisk, plan: CopyPlan) -> None:
    """Copy SRC's data into the empty DST (see the module's docstring)."""
    compressor = Compressor(dst, plan.threads) if plan.compress else None  # type: ignore[arg-type]
    below = await plan.backing.data_ranges() if plan.backing is not None else []
    if not plan.zero_init:
        below = [(0, plan.size)]  # (every hole must be said: nothing reads zeros by itself)
    size = plan.size
    steps = _steps(widened(await src.data_ranges(), plan.align), size)
    chunks = [(c, n) for c, n in steps if n >= 0]
    # A buffer per chunk queued for compression (else the one being
    # written), and the one being read ahead; no longer than the longest
    # chunk (bytearray zeroes every byte: 5 ms for two of CHUNK).
    longest = max((n for _, n in chunks), default=0)
    buffers = [bytearray(longest) for _ in range((IN_FLIGHT + 1 if compressor else 1) + 1)]
    other = bytearray(longest) if plan.backing is not None else None
    reads = Lane("qcowfs-read")
    pos = turn = 0
    pace = Pace(plan.rate)
    # -C: each chunk the kernel can copy is copied there; the others are read
    # and written in place (no read-ahead: the next chunk may need none)
    offload = plan.offload and plan.backing is None and not plan.compress and hasattr(src, "host_runs") \
        and hasattr(dst, "copy_from")
    try:
        for c, n in steps:
            if n < 0:   # a hole of the source before C
                await _hole(dst, below, pos, c, plan.unmap)
                continue
            if offload and await _offloaded(src, dst, c, n):  # type: ignore[arg-type]
                pos = c + n
                if plan.progress is not None:
                    plan.progress(min(1.0, pos / size))
                await pace.copied(n)
                continue
            buf = buffers[turn % len(buffers)]
            view = memoryview(buf)[:n]
            if not await reads.result():   # (the first chunk: nothing was read ahead)
                await src.readinto(view, c)
            turn += 1
            if turn < len(chunks) and not offload:
                nc, nn = chunks[turn]
                reads.start(src.readinto(memoryview(buffers[turn % len(buffers)])[:nn], nc))
            keep = await _chunk(plan, dst, c, buf, n, other)
            if compressor is not None:
                await compressor.submit(c, view, keep)
            pos = c + n
            if plan.progress is not None:
                plan.progress(min(1.0, pos / size))
            await pace.copied(n)
        if pos < size:
            await _hole(dst, below, pos, size, plan.unmap)
        if compressor is not None:
            await compressor.drain(0)
    finally:
        reads.close()
        if compressor is not None:
            compressor.close()
    if plan.progress is not None:
        plan.progress(1.0)


async def _offloaded(src: OffloadSource, dst: OffloadTarget, offset: int, n: int) -> bool:
    """Whether the kernel copied SRC's bytes [offset, offset+N) into DST
    (-C); False: they are to be read and written."""
    runs = await src.host_runs(offset, n)
    if runs is None:
        return False
    pos = offset
    for fd, host, length in runs:
        if not await in_thread(dst.copy_from, fd, host, pos, length):
            return False
        pos += length
    return True


class Lane:
    """One worker thread that runs an engine coroutine while the copy loop
    goes on: the source's next chunk is read on it while the loop
    zero-checks and writes the chunk before. One job at a time, so jobs
    keep their order.

    A job is the engine's own coroutine, driven to its end in the thread
    (host.waiting.drive): the lane has its own image (the source), which
    nothing else touches while the job runs, so no lock is needed. A thread
    and two queues, not concurrent.futures: its import (with logging, which
    it loads) was some 5 ms of every convert's start (docs/speed.md).

    Writes stay on the loop's thread: a second lane for them (the zero
    check and the writes of a chunk beside the next read) made the copy
    slower, 0.17-0.24 s against 0.14-0.17 s for -O raw and 0.20-0.28
    against 0.19-0.21 for -O qcow2 (alternating in-process runs): what it
    could overlap is small, and every hand-off and GIL switch costs."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._thread: threading.Thread | None = None
        self._jobs: SimpleQueue[Coroutine[Any, Any, Any] | None] = SimpleQueue()
        self._done: SimpleQueue[BaseException | None] = SimpleQueue()   # (what each job raised)
        self._pending = False

    def start(self, job: Coroutine[Any, Any, Any]) -> None:
        """Run JOB; `result` waits for it. No job may be in flight."""
        assert not self._pending, "one job at a time"
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
            self._thread.start()
        self._pending = True
        self._jobs.put(job)

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                drive(job)
            except BaseException as e:  # noqa: BLE001 - raised again by result(), on the loop's thread
                self._done.put(e)
            else:
                self._done.put(None)

    async def result(self) -> bool:
        """Wait for the job in flight, raise what it raised; False if there was none."""
        if not self._pending:
            return False
        self._pending = False
        error = await in_thread(self._done.get)
        if error is not None:
            raise error
        return True

    def close(self) -> None:
        """Wait for the job in flight (its buffers and its image must outlive it)."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None
        self._pending = False


def _steps(ranges: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """The copy's steps over the data RANGES of a disk of SIZE: (offset, n)
    for a chunk of data, (start, -1) for the hole that ends at START. Chunks
    are aligned to the chunk size (so to every cluster size)."""
    out: list[tuple[int, int]] = []
    pos = 0
    for start, end in ranges:
        start, end = min(start, size), min(end, size)
        if start >= end:
            continue
        if start > pos:
            out.append((start, -1))
        c = start
        while c < end:
            n = min(end, (c // CHUNK + 1) * CHUNK) - c
            out.append((c, n))
            c += n
        pos = end
    return out


async def _hole(dst: TargetDisk, below: list[tuple[int, int]], start: int, end: int, unmap: bool) -> None:
    """Source range [start, end) reads zeros: nothing to write, except where
    a -B backing file shows data (BELOW): there the target must say zeros."""
    for d, h in below:
        lo, hi = max(d, start), min(h, end)
        if lo < hi:
            await dst.zero(lo, hi - lo, unmap=unmap)


async def _chunk(plan: CopyPlan, dst: TargetDisk, offset: int, buf: bytearray, n: int,
                 other: bytearray | None) -> Runs:
    """Write one chunk of source data, BUF[:N]: its non-zero blocks (or,
    with -B, its blocks that differ from the backing file). With
    compression, only the zeros: the runs of blocks to compress are
    returned (blocks of a cluster)."""
    unit = plan.granularity or n
    if plan.compress:
        unit = dst.cluster_size  # type: ignore[attr-defined]
    count = -(-n // unit)
    if plan.backing is not None and other is not None:
        theirs = memoryview(other)[:n]
        await plan.backing.readinto(theirs, offset)
        zeros, keep = differing_runs(buf, theirs, n, unit)
        for a, b in zeros:
            await dst.zero(offset + a * unit, min(n, b * unit) - a * unit, unmap=plan.unmap)
    elif plan.granularity:
        zeros = zero_runs(buf, n, unit)
        keep = complement(zeros, count)
        if not plan.zero_init:  # (a target that does not read zeros by itself is told)
            for a, b in zeros:
                await dst.zero(offset + a * unit, min(n, b * unit) - a * unit, unmap=plan.unmap)
    else:
        keep = [(0, count)]
    if plan.compress:
        return keep
    view = memoryview(buf)
    for a, b in keep:
        await dst.write(offset + a * unit, view[a * unit : min(n, b * unit)])
    return keep


class Compressor:
    """The pool of worker threads that compress clusters (-c), and the queue
    of chunks whose clusters they work on, written in order of submission.

    zlib and zstd release the GIL, so the workers use every core; 4 of them,
    as QEMU's qcow2 (MAX_COMPRESS_THREADS), also give qcowfs the same share
    of a loaded machine as qemu-img."""

    def __init__(self, dst: CompressedTarget, threads: int) -> None:
        from concurrent.futures import ThreadPoolExecutor  # (-c alone: not every convert's start)

        self._dst = dst
        self._cs, self._ctype = dst.cluster_size, dst.compression_type
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="qcowfs-compress")
        self._queue: deque[tuple[int, memoryview, list[int], list[Future[list[bytes | None]]]]] = deque()

    def _job(self, view: memoryview, clusters: list[int]) -> list[bytes | None]:
        """CLUSTERS of VIEW compressed (in a worker thread)."""
        cs, out = self._cs, []
        for i in clusters:
            piece = view[i * cs : (i + 1) * cs]
            if len(piece) < cs:   # the last cluster of a disk that ends inside one
                piece = memoryview(bytes(piece) + bytes(cs - len(piece)))
            out.append(compress_cluster(piece, self._ctype))
        return out

    async def submit(self, offset: int, view: memoryview, keep: Runs) -> None:
        """Queue the clusters of KEEP (runs) of the chunk VIEW at OFFSET, in jobs of
        JOB_BYTES (a job per cluster took the GIL back after every one of
        them, each time a wait on a loaded machine); write out the oldest
        chunks beyond IN_FLIGHT. VIEW must stay unchanged until its chunk is
        written (the caller rotates buffers)."""
        wanted = [i for a, b in keep for i in range(a, b)]
        per = max(1, JOB_BYTES // self._cs)
        jobs = [self._pool.submit(self._job, view, wanted[j : j + per]) for j in range(0, len(wanted), per)]
        self._queue.append((offset, view, wanted, jobs))
        await self.drain(IN_FLIGHT)

    async def drain(self, left: int) -> None:
        """Write the oldest chunks until LEFT remain queued."""
        while len(self._queue) > left:
            offset, view, wanted, jobs = self._queue.popleft()
            if not all(j.done() for j in jobs):
                from concurrent.futures import wait

                await in_thread(wait, jobs)
            await self._write(offset, view, wanted, [b for j in jobs for b in j.result()])

    async def _write(self, offset: int, view: memoryview, wanted: list[int], blobs: list[bytes | None]) -> None:
        """One batch per run of consecutive clusters that shrink; the ones
        that do not are written plainly (as QEMU does)."""
        dst, cs = self._dst, self._cs
        run: list[bytes] = []
        run_start = -1
        for i, blob in zip(wanted + [-1], blobs + [None]):
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

    def close(self) -> None:
        """Stop the workers (queued jobs of a failed copy are dropped)."""
        self._queue.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)
