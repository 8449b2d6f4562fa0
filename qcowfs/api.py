"""The public API, synchronous: `qcowfs.open` and what it returns.

Each call runs the coroutine of `qcowfs.aio` to its end on the caller's
thread, without a loop (`host.waiting.drive`): there is one request, so
every wait of the engine (a host read, an fsync) is done in place, and a
plain script needs to know nothing of trio, nor load it. A call costs a few
microseconds more than the engine's own work (a trio.run costs about
330 us, a call through a loop in another thread about 60).

The hot paths skip even that: a read of plain data clusters whose tables are
cached and whose bytes are in the host page cache is one pread
(`Disk.readinto_nowait`), and so is an overwrite of clusters the image alone
owns (`Disk.write_nowait`).

An Image (and its Disks) may be used from several threads: calls are
serialised by a lock per image. A change on an open image, once started,
runs to its end as a FUSE request does: Ctrl-C (KeyboardInterrupt) during
one is raised when it is done. The operations on files (`check`, `convert`,
`commit`, `rebase`) stop at Ctrl-C, leaving what a kill leaves: the
destination absent, the image as it was or as it is once done.
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import signal
import threading
from typing import Any, Callable, Coroutine, Iterator, TypeVar

from . import aio
from .engine.opening import DEFAULT_L2_CACHE_BYTES
from .errors import UsageError
from .host.waiting import drive
from .records import Bitmap, CheckResult, Checkpoint, Comparison, Snapshot

__all__ = ["open", "check", "compare", "create", "convert", "measure", "commit", "rebase", "Image", "Disk"]
T = TypeVar("T")


@contextlib.contextmanager
def _to_its_end() -> Iterator[None]:
    """Ctrl-C during the block is raised after it (main thread, default
    handler; elsewhere Python delivers no KeyboardInterrupt anyway)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    caught: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


class Disk(io.RawIOBase):
    """A virtual disk as a seekable binary file: `Image.disk` (read-write in
    mode "r+") or `Image.snapshot(name)` (read-only).

    read/readinto/write/seek/tell as any raw file; `truncate(size)` grows
    the disk (shrinking raises ResizeError); `flush()` makes every write
    durable (fsync); `seek(pos, os.SEEK_DATA)` / `os.SEEK_HOLE` find data and
    holes as lseek(2) does (OSError ENXIO past the end). Reads stop at the
    end of the disk; a write there raises NoSpaceError (ENOSPC).
    `pread`/`pwrite` do the same at an offset, without moving the position."""

    def __init__(self, image: "Image", disk: aio.Disk) -> None:
        super().__init__()
        self._image = image
        self._disk = disk
        self._pos = 0

    # ---- io.RawIOBase ----------------------------------------------------------------

    def readable(self) -> bool:
        """Always True: every disk can be read."""
        return True

    def writable(self) -> bool:
        """True for the active disk of an image opened "r+"."""
        return self._disk.writable

    def seekable(self) -> bool:
        """Always True."""
        return True

    @property
    def size(self) -> int:
        """The virtual size in bytes."""
        return self._disk.size

    @property
    def snapshot_info(self) -> Snapshot | None:
        """The snapshot this disk shows (None: the active disk)."""
        return self._disk.snapshot

    def readinto(self, buf: Any) -> int:
        """Read into BUF from the position (fewer bytes at the end of the disk)."""
        n = self.preadinto(buf, self._pos)
        self._pos += n
        return n

    def preadinto(self, buf: Any, offset: int) -> int:
        """Fill BUF from OFFSET without moving the position: bytes read."""
        self._check_open()
        view = memoryview(buf).cast("B")
        with self._image._lock:
            if self._disk.readinto_nowait(view, offset):
                return len(view)
            return drive(self._disk.readinto(view, offset))

    def pread(self, offset: int, length: int) -> bytes:
        """LENGTH bytes at OFFSET (fewer at the end), without moving the position."""
        buf = bytearray(max(0, min(length, self.size - offset)))
        n = self.preadinto(buf, offset) if buf else 0
        return bytes(buf[:n])

    def readall(self) -> bytes:
        """Everything from the position to the end of the disk."""
        data = self.pread(self._pos, self.size - self._pos)
        self._pos += len(data)
        return data

    def write(self, data: Any) -> int:
        """Write DATA at the position: bytes written (cut at the end of the disk)."""
        n = self.pwrite(data, self._pos)
        self._pos += n
        return n

    def pwrite(self, data: Any, offset: int) -> int:
        """Write DATA at OFFSET without moving the position: bytes written."""
        self._check_open()
        view = memoryview(data).cast("B")  # (any bytes-like object, counted in bytes; no copy)
        with self._image._lock:
            done = self._disk.write_nowait(offset, view)
            if done is not None:
                return done
            return self._image._run(self._disk.write, offset, view)

    def zero(self, offset: int, length: int, unmap: bool = True) -> None:
        """Make [offset, offset+length) read as zeros without writing data where
        the format can say so (UNMAP: discard, the host clusters are freed;
        else they stay allocated). fallocate's PUNCH_HOLE and ZERO_RANGE."""
        self._check_open()
        with self._image._lock:
            self._image._run(self._disk.zero, offset, length, unmap)

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        """Move the position (SEEK_SET, SEEK_CUR, SEEK_END, SEEK_DATA, SEEK_HOLE)."""
        self._check_open()
        if whence == os.SEEK_SET:
            new = pos
        elif whence == os.SEEK_CUR:
            new = self._pos + pos
        elif whence == os.SEEK_END:
            new = self.size + pos
        elif whence in (getattr(os, "SEEK_DATA", 3), getattr(os, "SEEK_HOLE", 4)):
            data = whence == getattr(os, "SEEK_DATA", 3)
            if pos < 0 or pos >= self.size:
                raise OSError(6, "No such device or address")  # ENXIO, as lseek
            with self._image._lock:
                new = self._image._run(self._disk.find, pos, data)
            if data and new >= self.size:
                raise OSError(6, "No such device or address")
        else:
            raise ValueError(f"invalid whence ({whence})")
        if new < 0:
            raise OSError(22, "Invalid argument")
        self._pos = new
        return new

    def tell(self) -> int:
        """The position."""
        return self._pos

    def truncate(self, size: int | None = None) -> int:
        """Grow the disk to SIZE (default: the position); shrinking raises ResizeError."""
        self._check_open()
        with self._image._lock:
            return self._image._run(self._disk.truncate, self._pos if size is None else size)

    def flush(self) -> None:
        """fsync: everything written through this image is durable."""
        if self.closed or self._image.closed:
            return
        if self._disk.writable:
            with self._image._lock:
                self._image._run(self._disk.flush)

    def _check_open(self) -> None:
        if self.closed or self._image.closed:
            raise ValueError("I/O operation on a closed disk")


class Image:
    """An open qcow2 image: what `qcowfs.open` returns (a context manager).
    The synchronous face of `qcowfs.aio.Image`: same names, same records,
    same errors."""

    def __init__(self, image: aio.Image) -> None:
        self._aio = image
        self._lock = threading.RLock()
        self.closed = False
        self._disk: Disk | None = None

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on a closed image")

    def _run(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        self._check_open()
        with _to_its_end():
            return drive(fn(*args))

    def _call(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        with self._lock:
            return self._run(fn, *args)

    def __enter__(self) -> "Image":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "r" if self.read_only else "r+"
        return f"<qcowfs.Image {self.path!r} mode={mode!r}{' closed' if self.closed else ''}>"

    def close(self) -> None:
        """Flush everything, store tracked bitmaps, release locks and files."""
        with self._lock:
            if not self.closed:
                try:
                    with _to_its_end():
                        drive(self._aio.close())
                finally:
                    self.closed = True

    # ---- what it is ---------------------------------------------------------------------

    @property
    def path(self) -> str:
        return self._aio.path

    @property
    def read_only(self) -> bool:
        return self._aio.read_only

    @property
    def files(self) -> list[str]:
        """Every host file the disk is read from or written to: the image,
        its external data file, the files of its backing chain (what a
        copy of the whole image takes)."""
        return self._aio.files

    @property
    def force_share(self) -> bool:
        return self._aio.force_share

    @property
    def virtual_size(self) -> int:
        """The disk's size in bytes (whole 512-byte sectors)."""
        return self._aio.virtual_size

    @property
    def cluster_size(self) -> int:
        return self._aio.cluster_size

    @property
    def encryption(self) -> str | None:
        return self._aio.encryption

    @property
    def warnings(self) -> list[str]:
        """What a read-only open left out (a damaged snapshot table...), one line each."""
        return self._aio.warnings

    @property
    def disk(self) -> Disk:
        """The active disk as a seekable raw file (one object per image, with one
        position; a new one once it was closed, e.g. by a `with image.disk:`)."""
        if self._disk is None or self._disk.closed:
            self._disk = Disk(self, self._aio.disk)
        return self._disk

    def snapshot(self, name: str) -> Disk:
        """Snapshot NAME's disk (a name or an id), read-only, as a raw file."""
        return Disk(self, self._aio.snapshot(name))

    @property
    def snapshots(self) -> list[Snapshot]:
        return self._aio.snapshots

    @property
    def bitmaps(self) -> list[Bitmap]:
        return self._aio.bitmaps

    def info(self) -> dict[str, Any]:
        """What `qemu-img info --output=json` prints."""
        return self._call(self._aio.info)

    def check(self, repair: bool = False) -> CheckResult:
        """`qemu-img check` (REPAIR: `-r all`, mode "r+")."""
        return self._call(self._aio.check, repair)

    def map(self, snapshot: str | None = None, *, start: int = 0, length: int | None = None) -> list[dict[str, Any]]:
        """`qemu-img map --output=json` (of snapshot SNAPSHOT's disk; of the
        bytes [START, START+LENGTH) only, as --start-offset and --max-length)."""
        return self._call(functools.partial(self._aio.map, snapshot, start=start, length=length))

    def dirty_extents(self, name: str) -> list[dict[str, Any]]:
        """`nbdinfo --map=qemu:dirty-bitmap:NAME --json` of bitmap NAME."""
        return self._call(self._aio.dirty_extents, name)

    def bitmap_bits(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Bitmap NAME's bits (bit i of byte j: granule 8*j+i)."""
        return self._call(self._aio.bitmap_bits, name, offset, length)

    # ---- changes (mode "r+") --------------------------------------------------------

    def create_snapshot(self, name: str) -> Snapshot:
        return self._call(self._aio.create_snapshot, name)

    def delete_snapshot(self, name: str) -> None:
        self._call(self._aio.delete_snapshot, name)

    def apply_snapshot(self, name: str) -> None:
        self._call(self._aio.apply_snapshot, name)

    def add_bitmap(self, name: str, granularity: int | None = None, enabled: bool = True) -> None:
        self._call(self._aio.add_bitmap, name, granularity, enabled)

    def remove_bitmap(self, name: str) -> None:
        self._call(self._aio.remove_bitmap, name)

    def clear_bitmap(self, name: str) -> None:
        self._call(self._aio.clear_bitmap, name)

    def enable_bitmap(self, name: str) -> None:
        self._call(self._aio.enable_bitmap, name)

    def disable_bitmap(self, name: str) -> None:
        self._call(self._aio.disable_bitmap, name)

    def merge_bitmaps(self, dest: str, *sources: str, source_image: str | os.PathLike[str] | None = None) -> None:
        self._call(functools.partial(self._aio.merge_bitmaps, dest, *sources, source_image=source_image))

    def checkpoint(self, name: str) -> Checkpoint:
        return self._call(self._aio.checkpoint, name)

    def resize(self, size: int, shrink: bool = False) -> None:
        self._call(self._aio.resize, size, shrink)

    def flush(self) -> None:
        self._call(self._aio.flush)


def _share_docs(sync: type, twin: type) -> None:
    """The synchronous methods say what their coroutine twins say (one text)."""
    for name, member in vars(sync).items():
        if callable(member) and not (member.__doc__ or "").strip() and hasattr(twin, name):
            member.__doc__ = getattr(twin, name).__doc__


_share_docs(Image, aio.Image)


def open(path: str | os.PathLike[str], mode: aio.Mode = "r", *, passphrase: aio.Passphrase = None,
         key_file: str | os.PathLike[str] | None = None, force_share: bool = False,
         l2_cache_size: int = DEFAULT_L2_CACHE_BYTES, compress: bool = False) -> Image:
    """Open the qcow2 image at PATH; use it as a context manager:

        with qcowfs.open("disk.qcow2", "r+") as image:
            image.disk.seek(1 << 20)
            image.disk.write(b"hello")
            image.create_snapshot("after-hello")

    MODE "r" reads (reader locks: QEMU cannot write the image meanwhile);
    "r+" also writes, and before returning does what a writable mount does
    before its first write (dirty-bit repair, lazy-refcount rebuild,
    tracked bitmaps marked in use). PASSPHRASE or KEY_FILE unlocks a LUKS
    image; FORCE_SHARE reads an image another program holds (qemu-img -U);
    COMPRESS (mode "r+") stores the whole clusters writes cover compressed.
    Errors: `qcowfs.QcowError` and its family, one readable line each."""
    if not isinstance(mode, str):
        raise UsageError("mode must be \"r\" or \"r+\"")
    image = aio.Image(path, mode, passphrase=passphrase, key_file=key_file, force_share=force_share,
                      l2_cache_size=l2_cache_size, compress=compress)
    wrapped = Image(image)
    try:
        wrapped._call(image.prepare)
    except BaseException:
        wrapped.close()
        raise
    return wrapped


def info(path: str | os.PathLike[str], *, format: str | None = None, force_share: bool = False) -> dict[str, Any]:
    """What `qemu-img info --output=json` prints for the qcow2 image or raw
    file at PATH (see `qcowfs.aio.info`)::

        qcowfs.info("vm.qcow2")["virtual-size"]"""
    return drive(aio.info(path, format=format, force_share=force_share))


def map(path: str | os.PathLike[str], **options: Any) -> list[dict[str, Any]]:
    """`qemu-img map --output=json` of a qcow2 image or a raw file (see
    `qcowfs.aio.map`)::

        [e for e in qcowfs.map("disk.raw") if e["data"]]"""
    return drive(aio.map(path, **options))


def resize(path: str | os.PathLike[str], size: int, **options: Any) -> None:
    """`qemu-img resize` of a qcow2 image or a raw file (see `qcowfs.aio.resize`)::

        qcowfs.resize("disk.raw", 20 << 30, preallocation="falloc")"""
    drive(aio.resize(path, size, **options))


def check(path: str | os.PathLike[str], repair: bool = False, *, force_share: bool = False) -> CheckResult:
    """`qemu-img check [-r all]` of the image at PATH (see `qcowfs.aio.check`)."""
    return drive(aio.check(path, repair, force_share=force_share))


def create(path: str | os.PathLike[str], size: int | None = None, *, format: str = "qcow2",
           passphrase: aio.Passphrase = None, key_file: str | os.PathLike[str] | None = None, unsafe: bool = False,
           **options: Any) -> None:
    """Create a qcow2 image, as `qemu-img create -f qcow2` (see `qcowfs.aio.create`),
    or with FORMAT "raw" a raw one, as `qemu-img create -f raw`:

        qcowfs.create("disk.qcow2", 10 << 30, cluster_size=1 << 16, lazy_refcounts=True)
        qcowfs.create("overlay.qcow2", backing_file="disk.qcow2", backing_fmt="qcow2")
        qcowfs.create("disk.raw", 10 << 30, format="raw", preallocation="falloc")"""
    aio.create_sync(path, size, format=format, passphrase=passphrase, key_file=key_file, unsafe=unsafe, **options)


def compare(first: str | os.PathLike[str], second: str | os.PathLike[str], **options: Any) -> Comparison:
    """Whether two disks read the same, as `qemu-img compare` (see
    `qcowfs.aio.compare` for the options):

        if not qcowfs.compare("vm.qcow2", "backup.qcow2").identical: ..."""
    return drive(aio.compare(first, second, **options))


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], **options: Any) -> None:
    """Copy the disk of SRC into the new image DST, as `qemu-img convert`
    (see `qcowfs.aio.convert` for the options):

        qcowfs.convert("vm.qcow2", "small.qcow2", compress=True, compression_type="zstd")
        qcowfs.convert("vm.qcow2", "vm.raw", out_format="raw")"""
    drive(aio.convert(src, dst, **options))


def dd(src: str | os.PathLike[str], dst: str | os.PathLike[str], **options: Any) -> None:
    """`qemu-img dd`: a new image DST of a range of SRC's disk (see
    `qcowfs.aio.dd` for block_size, count, skip and the rest)::

        qcowfs.dd("vm.qcow2", "mbr.raw", block_size=512, count=1)"""
    drive(aio.dd(src, dst, **options))


def measure(src: str | os.PathLike[str] | None = None, **options: Any) -> dict[str, int]:
    """`qemu-img measure`: how large a file a new image needs, for a disk of
    `size=` bytes or holding the disk of SRC (see `qcowfs.aio.measure` for
    the options)::

        qcowfs.measure("vm.qcow2", out_format="qcow2")   # {"bitmaps": 0, "required": ..., "fully-allocated": ...}
        qcowfs.measure(size=20 << 30, cluster_size=1 << 21)
    """
    return drive(aio.measure(src, **options))


def commit(overlay: str | os.PathLike[str], base: str | os.PathLike[str] | None = None, *,
           drop: bool = False, progress: Callable[[float], None] | None = None,
           passphrase: aio.Passphrase = None, key_file: str | os.PathLike[str] | None = None,
           rate_limit: int = 0) -> None:
    """`qemu-img commit` (see `qcowfs.aio.commit`)."""
    drive(aio.commit(overlay, base, drop=drop, progress=progress, passphrase=passphrase, key_file=key_file,
                     rate_limit=rate_limit))


def rebase(image: str | os.PathLike[str], backing: str, *, backing_format: str | None = None,
           unsafe: bool = False, progress: Callable[[float], None] | None = None,
           force_share: bool = False, passphrase: aio.Passphrase = None,
           key_file: str | os.PathLike[str] | None = None) -> None:
    """`qemu-img rebase` (see `qcowfs.aio.rebase`)."""
    drive(aio.rebase(image, backing, backing_format=backing_format, unsafe=unsafe, progress=progress,
                     force_share=force_share, passphrase=passphrase, key_file=key_file))


def amend(image: str | os.PathLike[str], **options: Any) -> None:
    """`qemu-img amend`: change what the image's header says (see
    `qcowfs.aio.amend` for the options):

        qcowfs.amend("old.qcow2", compat="1.1", lazy_refcounts=True)
        qcowfs.amend("vm.qcow2", encrypt_state="active", new_passphrase="second key", passphrase="first key")"""
    drive(aio.amend(image, **options))
