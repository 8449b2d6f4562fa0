"""Operations on a backing chain: commit (qemu-img commit) and rebase
(qemu-img rebase), each on engine Images and raw files it opens itself.

Commit opens every image above BASE alone (without its backing file: the
clusters each holds are what it contributes) and BASE for writing with its
own chain below; each image takes the locks QEMU's qemu-img commit takes
(writer on the top when it is emptied and on BASE, reader on the images
between). What the images above BASE hold (data and zeros, the topmost
layer winning) is written into BASE; then the top is emptied in one commit
(unless `drop`). The top's content never changes meanwhile: BASE changes
only where an image above it holds the data that is read.

Rebase (safe mode) writes into IMAGE, where it holds nothing itself, what
its old backing chain shows and the new one does not; then one header
write switches the backing pointer. Until that write the image reads as
before (it only gains what it already showed); after it, the same content
through the new backing file. Unsafe mode (`-u`) is the header write alone.
"""
from __future__ import annotations

import os
from typing import Callable, Iterator

from ..errors import QcowError, RequestError, UnsupportedFeatureError
from ..format import whole_sectors
from ..host.hostfile import HostFile, same_file
from ..host.locking import lock_image
from ..host.waiting import Pace
from .blocks import MAX_BUFFER, differing_runs, widened
from .extents import allocation
from .image import Image
from .mapper import zero_fill
from .chain import Source
from .opening import OpenOptions, Passphrases, RawSource, backing_of, probe_format, refuse_loop, resolve_backing

CHUNK = MAX_BUFFER
Progress = Callable[[float], None] | None
# The passphrases of the encrypted images of the chains a command opens
# (OpenOptions.passphrase): asked only when one is opened.
Key = Passphrases | None


class _Meter:
    """Walks ranges in pieces of at most CHUNK bytes, reporting to PROGRESS
    the fraction of TOTAL bytes done (commit and rebase alike)."""

    def __init__(self, total: int, progress: Progress) -> None:
        self.total, self.done, self.progress = total or 1, 0, progress

    def pieces(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """(offset, length) of each piece of [START, END); counted done once taken."""
        pos = start
        while pos < end:
            n = min(CHUNK, end - pos)
            yield pos, n
            pos += n
            self.advance(n)

    def advance(self, n: int) -> None:
        self.done += n
        if self.progress:
            self.progress(self.done / self.total)

    def finish(self) -> None:
        if self.progress:
            self.progress(1.0)


Ranges = list[tuple[int, int]]


def _probe(path: str) -> str:
    try:
        return probe_format(path)
    except OSError as e:
        raise QcowError.from_os(f"cannot open {path}", e) from None


def _backing_of(image: Image) -> tuple[str, str] | None:
    """(path, format) of IMAGE's backing file, as its header names it."""
    if image.header.backing_file is None:
        return None
    try:
        return backing_of(image.path, image.header)
    except OSError as e:
        raise QcowError.from_os(f"cannot open backing file {e.filename}", e) from None


def subtract(ranges: Ranges, covered: Ranges) -> Ranges:
    """The parts of RANGES (start, end) outside COVERED (both sorted, disjoint)."""
    out: Ranges = []
    j = 0
    for start, end in ranges:
        pos = start
        while j < len(covered) and covered[j][1] <= pos:
            j += 1
        k = j
        while pos < end and k < len(covered) and covered[k][0] < end:
            c0, c1 = covered[k]
            if c0 > pos:
                out.append((pos, c0))
            pos = max(pos, c1)
            k += 1
        if pos < end:
            out.append((pos, end))
    return out


def union(a: Ranges, b: Ranges) -> Ranges:
    out: Ranges = []
    for start, end in sorted(a + b):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


class RawTarget:
    """A raw base file opened for writing, with QEMU's writer locks."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.file = HostFile(path, writable=True)
        try:
            lock_image(self.file.fd, path, writer=True)
        except QcowError:
            self.file.close()
            raise
        self.size = whole_sectors(self.file.known_size)

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.file.write_sync(data, offset)

    async def zero(self, offset: int, length: int) -> None:
        pos = offset
        while pos < offset + length:
            n = min(CHUNK, offset + length - pos)
            self.file.write_sync(bytes(n), pos)
            pos += n

    async def grow(self, size: int) -> None:
        if self.file.is_block_device():  # (before anything is written)
            raise RequestError(f"{self.path} is a block device of {self.file.known_size} bytes: it cannot "
                               f"grow to the disk's {size}")
        self.file.truncate(size)
        self.size = size

    async def close(self) -> None:
        os.fsync(self.file.fd)
        self.file.close()


def _names(base: str, layer: str, referrer: str) -> bool:
    """Whether BASE (commit -b) names backing file LAYER, which REFERRER's
    header names: from the working directory, or, as qemu-img resolves it
    (bdrv_find_backing_image), from REFERRER's directory, where a relative
    backing file name is read from."""
    return same_file(layer, base) or (not os.path.isabs(base)
                                      and same_file(layer, os.path.join(os.path.dirname(referrer), base)))


async def _layer_ranges(layer: Image) -> tuple[Ranges, Ranges]:
    """(data, zero) ranges LAYER itself holds (opened without its backing file)."""
    data: Ranges = []
    zero: Ranges = []
    for e in await allocation(layer, 0, layer.size):
        if e.present and e.depth == 0:
            (zero if e.zero else data).append((e.start, e.start + e.length))
    return data, zero


async def commit(path: str, base: str | None = None, drop: bool = False, progress: Progress = None,
                 passphrase: Key = None, rate: int = 0) -> None:
    """qemu-img commit [-b BASE] [-d] [-r RATE] PATH. With BASE the top is not
    emptied (as qemu-img: -b implies -d, the images between are outdated).
    PASSPHRASE: of the encrypted images of the chain. RATE: at most that
    many bytes of data a second (0: no limit)."""
    empty_top = not drop and base is None
    opened: list[Image] = []
    target: Image | RawTarget | None = None
    try:
        top = Image(path, OpenOptions(read_only=not empty_top, open_backing=False, passphrase=passphrase))
        opened.append(top)
        below = _backing_of(top)
        if below is None:
            raise RequestError(f"{path} has no backing file: there is nothing to commit into")
        while base is not None and not _names(base, below[0], opened[-1].path):
            if below[1] != "qcow2" or any(same_file(below[0], i.path) for i in opened):
                raise RequestError(f"'{base}' is not in the backing chain of {path}")
            layer = Image(below[0], OpenOptions(read_only=True, open_backing=False, passphrase=passphrase))
            opened.append(layer)
            nxt = _backing_of(layer)
            if nxt is None:
                raise RequestError(f"'{base}' is not in the backing chain of {path}")
            below = nxt
        base_path, base_fmt = below
        target = (Image(base_path, OpenOptions(read_only=False, passphrase=passphrase)) if base_fmt == "qcow2"
                  else RawTarget(base_path))
        if isinstance(target, Image):
            await target.prepare_writes()
        await _copy_down(opened, target, progress, Pace(rate))
        if isinstance(target, Image):
            await target.flush()
        if empty_top:
            await top.make_empty()
    finally:
        errors: list[BaseException] = []
        for img in [*opened, *([target] if target is not None else [])]:
            try:
                await img.close()
            except (QcowError, OSError) as e:
                errors.append(e)
        if errors:
            raise errors[0]


async def _copy_down(layers: list[Image], target: "Image | RawTarget", progress: Progress, pace: Pace) -> None:
    """What LAYERS (topmost first) show, written into TARGET: what each
    holds where the layers above it hold nothing, and zeros past the end
    of a layer shorter than the top (a read there stops at that layer, as
    QEMU's block status says: allocated zeros, which its commit writes)."""
    size = layers[0].size
    target_size = target.size
    if target_size < size:
        if isinstance(target, Image):
            await target.resize(size)
        else:
            await target.grow(size)
    plan: list[tuple[Image, int, int, bool]] = []
    covered: Ranges = []
    for layer in layers:
        data, zero = await _layer_ranges(layer)
        for ranges, is_zero in ((data, False), (zero, True)):
            for start, end in subtract([(s, min(e, size)) for s, e in ranges if s < size], covered):
                plan.append((layer, start, end, is_zero))
        past_end = [(layer.size, size)] if layer.size < size else []
        for start, end in subtract(past_end, union(covered, union(data, zero))):
            plan.append((layer, start, end, True))
        covered = union(covered, union(union(data, zero), past_end))
    meter = _Meter(sum(end - start for _, start, end, _ in plan), progress)
    for layer, start, end, is_zero in sorted(plan, key=lambda p: p[1]):
        if is_zero:
            if isinstance(target, Image):
                await target.zero(start, end - start, unmap=False)
            else:
                await target.zero(start, end - start)
            meter.advance(end - start)
        else:
            for pos, n in meter.pieces(start, end):
                await target.write(pos, await layer.read(layer.active_l1, pos, n))
                await pace.copied(n)
    meter.finish()


def _open_source(path: str, fmt: str, force_share: bool, passphrase: Key) -> Source:
    if fmt == "raw":
        return RawSource(path, force_share)
    return Image(path, OpenOptions(read_only=True, force_share=force_share, passphrase=passphrase))


async def rebase(path: str, backing: str, backing_fmt: str | None = None, unsafe: bool = False,
                 progress: Progress = None, force_share: bool = False, passphrase: Key = None) -> None:
    """qemu-img rebase [-u] [-U] -b BACKING [-F FMT] PATH (BACKING "": no
    backing file; FORCE_SHARE: the new backing file opened without locks,
    as qemu-img 7.2 opens it: the old one is opened with the image, locked).
    PASSPHRASE: of the encrypted images (the image, the old and new chains)."""
    if backing_fmt is not None and backing_fmt not in ("qcow2", "raw"):
        raise UnsupportedFeatureError(f"backing file format '{backing_fmt}' is not supported")
    image = Image(path, OpenOptions(read_only=False, open_backing=not unsafe, passphrase=passphrase))
    new: Source | None = None
    try:
        new_path = resolve_backing(image.path, backing) if backing else None
        fmt = backing_fmt
        if new_path is not None:
            if fmt is None:
                if unsafe and not os.path.exists(new_path):
                    raise RequestError(f"cannot open {new_path} to find its format: give it with -F")
                fmt = _probe(new_path)
            refuse_loop(image.path, new_path, fmt)
        if not unsafe:
            if new_path is not None:
                assert fmt is not None
                new = _open_source(new_path, fmt, force_share, passphrase)
            await _copy_differences(image, new, progress)
        await image.set_backing(backing or None, fmt if backing else None)
    finally:
        try:
            if new is not None:
                await new.close()  # type: ignore[attr-defined]
        finally:
            await image.close()


async def _with_data(src: Source | None, ranges: Ranges) -> Ranges:
    """The parts of RANGES where SRC (a backing chain; None: none) has data,
    as SEEK_DATA finds it: the rest reads zeros."""
    out: Ranges = []
    if src is None:
        return out
    for start, end in ranges:
        pos = start
        while pos < end:
            data = await src.seek(pos, end, True)
            if data >= end:
                break
            pos = max(await src.seek(data, end, False), data + 1)  # (never in place, whatever a damaged map says)
            out.append((data, pos))
    return out


async def _copy_differences(image: Image, new: Source | None, progress: Progress) -> None:
    """Where IMAGE holds nothing itself and its old backing chain differs
    from NEW (None: zeros), what the old one shows, written into IMAGE: each
    run of differing blocks (subclusters: what one write can allocate
    alone, as qemu-img rebase aligns its writes) in one write, or one zero
    write where the old chain shows zeros. Only where either chain has
    data: where both have holes both read zeros (a sparse 100 GiB overlay
    was read whole, 200 GiB of zeros compared)."""
    old = image.backing
    size = image.size
    held: Ranges = []
    for e in await allocation(image, 0, size):
        if e.present and e.depth == 0:
            held.append((e.start, e.start + e.length))
    held = union(held, [])
    free = subtract([(0, size)], held)
    unit = image.geo.subcluster_size
    shown = union(await _with_data(old, free), await _with_data(new, free))
    todo = subtract(widened(shown, unit), held + [(size, size + unit)])  # (widened: less than a unit past the end)
    # A zero write leaves an unallocated cluster as it is where nothing
    # shows through it (it reads zeros already): from the first cluster past
    # the old chain's end on. The new chain may show data there, so the
    # zeros are written as data instead (whole clusters of them become zero
    # entries, as a zero write would make them).
    cs = image.geo.cluster_size
    reach = -(-old.size // cs) * cs if old is not None else 0
    meter = _Meter(sum(e - s for s, e in todo), progress)
    ours, theirs = bytearray(CHUNK), bytearray(CHUNK)
    for start, end in todo:
        for pos, n in meter.pieces(start, end):
            a, b = memoryview(ours)[:n], memoryview(theirs)[:n]
            for chain, buf in ((old, a), (new, b)):
                if chain is not None:
                    await chain.read_into(buf, pos)
                else:
                    zero_fill(buf)
            zeros, data = differing_runs(ours, b, n, unit)
            for lo, hi in zeros:
                z0, z1 = pos + lo * unit, pos + min(n, hi * unit)
                if z0 < reach:
                    await image.zero(z0, min(z1, reach) - z0, unmap=False)
                if z1 > reach:
                    await image.write(max(z0, reach), a[max(z0, reach) - pos : z1 - pos])
            for lo, hi in data:
                await image.write(pos + lo * unit, a[lo * unit : min(n, hi * unit)])
    meter.finish()
