"""The public API for trio programs: qcow2 images as coroutines.

    import trio, qcowfs.aio

    async def main():
        async with qcowfs.aio.open("disk.qcow2", "r+") as image:
            await image.disk.write(0, b"hello")
            print(await image.disk.read(0, 5), image.snapshots)

    trio.run(main)

Everything here is also in `qcowfs` itself, synchronous (`qcowfs.open`): a
plain script needs to know nothing of trio. The mount is a client of this
module (its files are `Disk` objects), and so are the control socket and
the command line: what they can do, a program can.

Errors are `qcowfs.QcowError` and its family, each with a message a user
understands and the errno the mount answers.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Awaitable, Callable, Generator, Literal, Sequence

from .engine.bitmaps import find as find_bitmap, read_bitmap, usable as usable_bitmap
from .engine.chain import Span
from .engine.image import Image as _EngineImage
from .engine.mapper import L1Table
from .engine.opening import DEFAULT_L2_CACHE_BYTES, OpenOptions, RawSource, probe_format
from .engine.snapshots import BY_ID, find_snapshot, snapshot_disk_size, snapshot_problem
from .errors import (CorruptionError, NoSpaceError, QcowError, ReadOnlyError, RequestError, ResizeError,
                     UsageError)
from .format import SnapshotEntry
from .host.secret import Keyring
from .host.hostfile import same_file
from .host.waiting import in_thread, shielded
from .records import Bitmap, CheckResult, Checkpoint, Comparison, Snapshot

# The engine's operations (snapshot_ops, bitmap_ops, check, extents, info,
# create, convert, chain_ops) are imported by the functions that use them:
# a command or a mount loads only what it runs (docs/speed.md, start-up).

__all__ = ["open", "create", "convert", "measure", "Image", "Disk"]

Mode = Literal["r", "r+"]


def __getattr__(name: str) -> Any:
    """CREATE_OPTIONS / AMEND_OPTIONS: create's and amend's options in
    qemu-img's names, with the kind of value each takes ("size", "int",
    "bool", "str"): what the command line converts -o text to. Made on
    first use (they are the engine's tables)."""
    if name == "CREATE_OPTIONS":
        from .engine.create import OPTION_KINDS
        return dict(OPTION_KINDS)
    if name == "AMEND_OPTIONS":
        from .engine.amend import OPTION_KINDS as AMEND_KINDS
        return dict(AMEND_KINDS)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# qemu-img's -t: every mode but "unsafe" flushes (qcowfs always writes through
# the host page cache, so "none", "directsync" and "writethrough" mean "writeback").
CACHE_MODES = ("writeback", "writethrough", "none", "directsync", "unsafe")


def check_cache_mode(cache: str, what: str = "cache mode") -> None:
    """Refuse a CACHE that is not one of qemu-img's modes (WHAT names the option)."""
    if cache not in CACHE_MODES:
        raise UsageError(f"{what} must be one of {', '.join(CACHE_MODES)}, not {cache!r}")
# What opens encrypted images: a passphrase, several (tried in order on each
# encrypted image: the layers of a chain may have different keys), a function
# called for one when an encrypted image is opened, or a Keyring; or key files.
Passphrase = str | bytes | Sequence[str | bytes] | Callable[[], bytes] | Keyring | None
KeyFile = str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None


def _keyring(passphrase: Passphrase, key_file: KeyFile) -> Keyring | None:
    """What the engine asks when (and only when) it opens an encrypted image;
    one object per command, so a function is called once for a chain with one key."""
    if passphrase is not None and key_file is not None:
        raise UsageError("give either passphrase or key_file, not both")
    if key_file is not None:
        files = [key_file] if isinstance(key_file, (str, os.PathLike)) else list(key_file)
        return Keyring(key_files=[os.fspath(f) for f in files])
    if passphrase is None or isinstance(passphrase, Keyring):
        return passphrase
    if callable(passphrase):
        ask = passphrase
        return Keyring(ask=lambda image: ask())
    secrets = [passphrase] if isinstance(passphrase, (str, bytes)) else list(passphrase)
    return Keyring(passphrases=[p.encode() if isinstance(p, str) else p for p in secrets])


def _new_key(passphrase: Passphrase, key_file: KeyFile, path: str) -> Callable[[], bytes] | None:
    """The one passphrase of a new encrypted image at PATH."""
    keys = _keyring(passphrase, key_file)
    if keys is None:
        return None
    if keys.sources > 1:
        raise UsageError("a new encrypted image takes one passphrase, not several")
    return lambda: next(iter(keys(path)))


class Disk:
    """A virtual disk of an open image, by byte offset: the active disk
    (`Image.disk`, writable in mode "r+") or an internal snapshot's
    (`Image.snapshot(name)`, read-only).

    Reads past the end are short (empty at or after it); writes are cut at
    the end, and a write that starts there fails with NoSpaceError (ENOSPC),
    as a block device does."""

    def __init__(self, image: "Image", entry: SnapshotEntry | None = None) -> None:
        self._image = image
        self._engine = image._engine
        self._entry = entry
        if entry is None:
            self._l1: L1Table | None = None
            self._problem: tuple[str, bool] | None = None
        else:
            self._l1 = L1Table(self._engine.file, entry.l1_table_offset, entry.l1_size)
            self._problem = snapshot_problem(entry, self._engine.header.version, self._engine.geo.cluster_size,
                                             self._engine.file.known_size)
            self._epoch = self._engine.tables_epoch

    # ---- what it is ---------------------------------------------------------------

    @property
    def size(self) -> int:
        """The virtual size in bytes (whole 512-byte sectors, as QEMU shows it)."""
        if self._entry is None:
            return self._engine.size
        return snapshot_disk_size(self._entry, self._engine.size)

    @property
    def writable(self) -> bool:
        """The active disk of an image opened "r+" (snapshots never are)."""
        return self._entry is None and not self._engine.read_only

    @property
    def snapshot(self) -> Snapshot | None:
        """The snapshot this disk shows, or None for the active disk."""
        return Snapshot.from_entry(self._entry) if self._entry is not None else None

    @property
    def allocated(self) -> int:
        """Host bytes the image occupies, at most the disk's size (what a
        file's st_blocks * 512 says: du and cp's sparse test see it)."""
        return min(self.size, self._engine.host_usage())

    def _table(self) -> L1Table:
        """The L1 table reads go through; a snapshot's is read afresh when a
        force-shared image dropped its tables (see Image.revalidate)."""
        if self._l1 is None:
            return self._engine.active_l1
        if self._epoch != self._engine.tables_epoch:
            self._epoch = self._engine.tables_epoch
            self._l1.forget()
        return self._l1

    def _readable(self) -> None:
        if self._engine.backing_error is not None:
            raise QcowError(self._engine.backing_error)
        if self._problem is not None and not self._problem[1]:
            raise CorruptionError(self._problem[0])

    def _clip(self, offset: int, length: int) -> int:
        if offset < 0 or length < 0:
            raise UsageError("offset and length must not be negative")
        return max(0, min(length, self.size - offset))

    # ---- reading ------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytearray:
        """LENGTH bytes at OFFSET (fewer at the end of the disk)."""
        n = self._clip(offset, length)
        if n <= 0:
            return bytearray()
        self._readable()
        return await self._engine.read(self._table(), offset, n)

    async def readinto(self, buf: bytearray | memoryview, offset: int) -> int:
        """Fill BUF from OFFSET; bytes read (fewer at the end of the disk)."""
        view = memoryview(buf).cast("B")
        n = self._clip(offset, len(view))
        if n <= 0:
            return 0
        if self.readinto_nowait(view[:n], offset):
            return n
        self._readable()
        await self._engine.read_disk_into(self._table(), view[:n], offset)
        return n

    def read_nowait(self, offset: int, length: int) -> bytearray | None:
        """The bytes at OFFSET without awaiting, when the tables that map them
        through the whole backing chain are cached and the bytes are in the
        host page cache; else None (then call read). A server's hot path: no
        await, one pread per piece (a host-contiguous run of one layer).
        None for a force-shared image (its reads check the tables first)."""
        n = self._clip(offset, length)
        if n <= 0:
            return bytearray()
        buf = bytearray(n)
        return buf if self._fill_nowait(memoryview(buf), offset) else None

    def readinto_nowait(self, buf: memoryview, offset: int) -> bool:
        """read_nowait into BUF (the whole of it, inside the disk); False: use readinto."""
        return offset + len(buf) <= self.size and self._fill_nowait(buf, offset)

    def _fill_nowait(self, buf: memoryview, offset: int) -> bool:
        """BUF from OFFSET (inside the disk) without awaiting, or False. Not
        for an image another program writes (its tables are checked on the
        general path), nor a disk whose reads fail (read() says why)."""
        if self._image._force_share or self._engine.backing_error is not None or self._problem is not None:
            return False
        try:
            return self._engine.read_nowait(self._table(), buf, offset)
        except CorruptionError:
            return False  # readinto() meets it again, and reports it

    def cheap_span(self, offset: int, lo: int, hi: int) -> Span | None:
        """The part of [LO, HI) around OFFSET that reads as plain data,
        zeros or a compressed cluster a read has just decompressed, from this
        image or the backing chain, known from cached tables alone: what is
        cheap to read ahead, one pread or copy per piece (None: OFFSET's own
        piece is not cheap: compressed and not decompressed, encrypted with a
        cipher that decrypts sector by sector, or its tables are not cached).
        `Span.held`: the span is cheap only while a decompressed cluster is
        kept, so read it at once."""
        if self._engine.backing_error is not None or self._problem is not None:
            return None
        return self._engine.cheap_span(self._table(), offset, lo, min(hi, self.size))

    async def find(self, offset: int, data: bool) -> int:
        """lseek(SEEK_DATA) (DATA) or lseek(SEEK_HOLE): the first data or hole
        at or after OFFSET (inside the disk), the size if there is none.
        Holes are what QEMU's block status calls them (zero clusters,
        unallocated clusters with nothing below)."""
        self._clip(offset, 0)
        self._readable()
        return await self._engine.find(self._table(), offset, self.size, data)

    # ---- writing ------------------------------------------------------------------

    def _writer(self) -> None:
        if self._entry is not None:
            raise ReadOnlyError("a snapshot's disk is read-only")
        if self._engine.read_only:
            raise ReadOnlyError("the image is open read-only (open it with mode \"r+\")")

    def _write_length(self, offset: int, length: int) -> int:
        self._writer()
        if offset < 0:
            raise UsageError("offset must not be negative")
        if length and offset >= self.size:
            raise NoSpaceError(f"no space past the end of the disk ({self.size} bytes)")
        return min(length, self.size - offset)

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Write DATA at OFFSET: bytes written (cut at the end of the disk).
        Durable once flush() returns."""
        n = self._write_length(offset, len(data))
        if n <= 0:
            return 0
        if self._image._compress:
            return await self._write_compressing(offset, bytes(data[:n]) if n < len(data) else data)
        return await self._engine.write(offset, bytes(data[:n]) if n < len(data) else data)

    def write_nowait(self, offset: int, data: bytes | bytearray | memoryview) -> int | None:
        """The write's hot path, without awaiting: an overwrite of clusters this
        image alone owns (one pwrite). None: call write()."""
        n = self._write_length(offset, len(data))
        if n <= 0:
            return 0
        if self._image._compress:
            return None
        return n if self._engine.write_nowait(offset, data[:n] if n < len(data) else data) else None

    async def write_compressed(self, offset: int, blobs: list[bytes]) -> None:
        """Store whole clusters from cluster-aligned OFFSET as compressed
        clusters: BLOBS[i] is cluster i compressed with the image's codec
        (qcowfs.format.compression.compress_cluster), shorter than a cluster."""
        self._write_length(offset, 1)
        await self._engine.write_compressed(offset, blobs)

    async def _write_compressing(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """write() of an image opened with compress=True (QEMU's compress
        filter): the whole clusters of DATA are stored compressed (in worker
        threads) where they shrink, the partial ones at either end plainly."""
        from .format.compression import compress_cluster

        if self._engine.encryption is not None or self._engine.external_data:
            raise UsageError("compress cannot be used with an encrypted image or an external data file "
                             "(QEMU cannot store compressed clusters there either)")
        cs, ctype = self._engine.geo.cluster_size, self._engine.geo.compression_type
        view = memoryview(data)
        lo, hi = -(-offset // cs) * cs, (offset + len(data)) // cs * cs
        if lo >= hi:
            return await self._engine.write(offset, data)
        if lo > offset:
            await self._engine.write(offset, view[: lo - offset])
        blobs = await in_thread(
            lambda: [compress_cluster(view[p - offset : p - offset + cs], ctype) for p in range(lo, hi, cs)])
        for i, blob in enumerate(blobs):
            p = lo + i * cs
            if blob is None:
                await self._engine.write(p, view[p - offset : p - offset + cs])
            else:
                await self._engine.write_compressed(p, [blob])
        if hi < offset + len(data):
            await self._engine.write(hi, view[hi - offset :])
        return len(data)

    async def zero(self, offset: int, length: int, unmap: bool = True) -> None:
        """Make [offset, offset+length) read as zeros without writing data where
        the format can say so: UNMAP (discard, fallocate PUNCH_HOLE) frees the
        host clusters, else (ZERO_RANGE) clusters the image owns stay
        allocated, so later writes need none. Bitmaps count it as written."""
        self._writer()
        if self._clip(offset, length) <= 0:
            return
        await self._engine.zero(offset, length, unmap)

    async def truncate(self, size: int) -> int:
        """Grow the disk to SIZE bytes (shrinking is refused: ResizeError); the
        new size."""
        self._writer()
        if size < self.size:
            raise ResizeError("shrinking the disk is not supported")
        if size > self.size:
            await self._engine.resize(size)
        return self.size

    async def flush(self) -> None:
        """Everything written so far durable in the image (fsync)."""
        if self.writable:
            await self._engine.flush()


class Image:
    """An open qcow2 image. Open it with `qcowfs.aio.open` (which also does
    what must precede the first change in mode "r+": dirty-bit repair,
    lazy-refcount rebuild, marking tracked bitmaps in use). Constructing
    it directly opens the file without a trio loop (the mount does so
    before it forks); changes then do that preparation themselves.

    MODE is "r" (read-only: reader locks, nothing is ever written) or "r+"
    (read-write: QEMU's writer locks). PASSPHRASE (str, bytes, or a function
    returning bytes) or KEY_FILE (every byte of the file, as QEMU's
    `secret,file=`) unlocks a LUKS image. Several (a list of passphrases or
    of key files, or a `Keyring`) are tried in order on each encrypted image
    opened, the image and every layer of its backing chain, which may each
    have their own key (a wrong one costs its PBKDF2 time, about 2 s at
    QEMU's default iter-time: put the top image's first); without either an encrypted image
    opens for info, check and maps, and reading its data raises
    PassphraseError. FORCE_SHARE opens, read-only, an image another program
    holds (qemu-img's -U): what it shows may change meanwhile. REQUIRE_BACKING
    false opens, read-only, an image whose backing file cannot be opened (to
    describe it, as qemu-img info does); its disks then refuse every read.
    COMPRESS (mode "r+", QEMU's compress filter): every whole cluster the
    disk's writes cover is stored compressed (zlib or zstd, the image's
    compression_type) where it shrinks; a later write into a compressed
    cluster turns it back into a standard one. CACHE "unsafe" (QEMU's
    cache=unsafe) skips every flush: for a new image nothing else uses yet
    (what convert writes); a crash of the host may then tear it."""

    def __init__(self, path: str | os.PathLike[str], mode: Mode = "r", *, passphrase: Passphrase = None,
                 key_file: KeyFile = None, force_share: bool = False,
                 l2_cache_size: int = DEFAULT_L2_CACHE_BYTES, repair: bool = False,
                 require_backing: bool = True, compress: bool = False, cache: str = "writeback") -> None:
        if mode not in ("r", "r+"):
            raise UsageError(f"mode must be \"r\" or \"r+\", not {mode!r}")
        if force_share and mode != "r":
            raise UsageError("force_share needs a read-only open (mode \"r\")")
        self.path = os.path.abspath(os.fspath(path))
        self._force_share = force_share
        check_cache_mode(cache)
        if compress and mode != "r+":
            raise UsageError("compress needs a writable open (mode \"r+\")")
        self._compress = compress
        self._engine = _EngineImage(self.path, OpenOptions(
            read_only=mode == "r", l2_cache_bytes=l2_cache_size, force_share=force_share, repair=repair,
            passphrase=_keyring(passphrase, key_file), backing_required=require_backing,
            unsafe_cache=cache == "unsafe"))
        self._disk = Disk(self)
        self._closed = False

    async def prepare(self) -> None:
        """What must precede the first change of an image opened "r+" (open()
        does it; every change does it first too). Nothing in mode "r"."""
        if not self._engine.read_only:
            await self._engine.prepare_writes()

    async def __aenter__(self) -> "Image":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Flush everything, store tracked bitmaps, release locks and files.
        Runs to its end in a cancelled scope too (`async with` leaves a
        scope a timeout cancelled: the close is then what makes the writes
        made so far durable and the bitmaps consistent)."""
        if not self._closed:
            self._closed = True
            with shielded():
                await self._engine.close()

    # ---- what it is ---------------------------------------------------------------

    @property
    def read_only(self) -> bool:
        return self._engine.read_only

    @property
    def files(self) -> list[str]:
        """Every host file the disk is read from or written to: the image,
        its external data file, the files of its backing chain."""
        return self._engine.files()

    @property
    def force_share(self) -> bool:
        return self._force_share

    @property
    def virtual_size(self) -> int:
        """The disk's size in bytes (whole 512-byte sectors)."""
        return self._engine.size

    @property
    def cluster_size(self) -> int:
        return self._engine.geo.cluster_size

    @property
    def encryption(self) -> str | None:
        """"LUKS", "AES (legacy qcow2 encryption)", or None."""
        return self._engine.encryption

    @property
    def warnings(self) -> list[str]:
        """What a read-only open left out, one line each (a damaged snapshot
        table or bitmap directory: the disk is still served)."""
        return list(self._engine.warnings)

    @property
    def corrupt(self) -> bool:
        """Whether the image was marked corrupt while open (no more changes)."""
        return self._engine.corrupt

    @property
    def disk(self) -> Disk:
        """The active virtual disk."""
        return self._disk

    @property
    def snapshots(self) -> list[Snapshot]:
        """The internal snapshots, in table order."""
        return [Snapshot.from_entry(e) for e in self._engine.snapshots]

    @property
    def bitmaps(self) -> list[Bitmap]:
        """The persistent dirty bitmaps, in directory order."""
        return [Bitmap(b.name, b.granularity, tuple(b.flag_names), b.problem) for b in self._engine.bitmaps]

    def snapshot(self, name: str) -> Disk:
        """The read-only disk of snapshot NAME (a name, or an id)."""
        return Disk(self, self._engine.snapshots[find_snapshot(self._engine.snapshots, name)])

    def snapshot_disks(self) -> list[Disk]:
        """The disk of every snapshot, in table order (names need not be unique)."""
        return [Disk(self, e) for e in self._engine.snapshots]

    # ---- what qemu-img shows -------------------------------------------------------

    async def info(self) -> dict[str, Any]:
        """What `qemu-img info --output=json` prints, with its keys."""
        from .engine.info import describe
        return describe(self._engine)

    async def check(self, repair: bool = False, progress: Callable[[float], None] | None = None) -> CheckResult:
        """`qemu-img check` (with REPAIR, `-r all`: needs mode "r+"). See also
        `qcowfs.aio.check`, which can open an image marked corrupt to repair it."""
        from .engine.check import check as _check
        if repair and self._engine.read_only:
            raise ReadOnlyError("a repair needs the image opened with mode \"r+\"")
        if repair or self.read_only or self.corrupt:
            r = await _check(self._engine, repair=repair, progress=progress)
        else:
            # Open for writing (a mount's image, written meanwhile): the caches
            # hold changes the file does not have yet, so the check runs at one
            # instant with every cache flushed, writes waiting until it is done.
            async with self._engine.exclusive():
                r = await _check(self._engine, progress=progress)
        return CheckResult.of(r, self.path)

    async def map(self, snapshot: "str | Disk | None" = None, *, start: int = 0,
                  length: int | None = None) -> list[dict[str, Any]]:
        """The allocation map as `qemu-img map --output=json` (of a snapshot's
        disk with SNAPSHOT: a name, an id, or its Disk), backing chain included;
        of the bytes [START, START+LENGTH) only, as qemu-img map's
        --start-offset and --max-length."""
        from .engine import extents
        if isinstance(snapshot, Disk):
            entry = snapshot._entry
        else:
            entry = self._engine.snapshots[find_snapshot(self._engine.snapshots, snapshot)] if snapshot else None
        return await extents.disk_map(self._engine, entry, start, length)

    async def dirty_extents(self, name: str) -> list[dict[str, Any]]:
        """Bitmap NAME's extents as `nbdinfo --map=qemu:dirty-bitmap:NAME --json`."""
        from .engine import extents
        return await extents.dirty_map(self._engine.file, self._usable_bitmap(name))

    async def bitmap_bits(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Bitmap NAME's bits, bytes [offset, offset+length) (bit i of byte j:
        granule 8*j+i), as they are now (live while tracked)."""
        bm = find_bitmap(self._engine.bitmaps, name)  # (an inconsistent one: CorruptionError)
        if offset < 0 or (length is not None and length < 0):
            raise UsageError("offset and length must not be negative")
        return await read_bitmap(bm, self._engine.file, offset, bm.size if length is None else length)

    def _usable_bitmap(self, name: str) -> Any:
        return usable_bitmap(find_bitmap(self._engine.bitmaps, name))

    def host_usage(self) -> int:
        """Host bytes the image file (and its external data file) occupy."""
        return self._engine.host_usage()

    # ---- changes ("r+") -------------------------------------------------------------

    async def create_snapshot(self, name: str) -> Snapshot:
        """Internal snapshot NAME of the disk as it is at this instant."""
        return Snapshot.from_entry(await self._engine.create_snapshot(name))

    async def delete_snapshot(self, name: str) -> None:
        """Delete snapshot NAME (a name or an id); its clusters are freed."""
        await self._engine.delete_snapshot(name)

    async def apply_snapshot(self, name: str) -> None:
        """Revert the disk to snapshot NAME (a name or an id), as `qemu-img
        snapshot -a`: the disk takes the snapshot's content and size; the
        snapshot stays. Refused while the image has persistent bitmaps (as in
        QEMU). Atomic: a crash leaves the old disk or the snapshot's."""
        await self._engine.apply_snapshot(name)

    async def add_bitmap(self, name: str, granularity: int | None = None, enabled: bool = True) -> None:
        """A new persistent bitmap (QEMU's default granularity: the cluster
        size clamped to 4K..64K); ENABLED, it tracks writes from now on."""
        await self._engine.add_bitmap(name, granularity, enabled)

    async def remove_bitmap(self, name: str) -> None:
        """Remove bitmap NAME (its clusters are freed)."""
        await self._engine.change_bitmap(name, "remove")

    async def clear_bitmap(self, name: str) -> None:
        """Clear every bit of bitmap NAME."""
        await self._engine.change_bitmap(name, "clear")

    async def enable_bitmap(self, name: str) -> None:
        """Make bitmap NAME track writes (QEMU's "auto" flag)."""
        await self._engine.change_bitmap(name, "enable")

    async def disable_bitmap(self, name: str) -> None:
        """Stop bitmap NAME tracking writes; its bits are kept."""
        await self._engine.change_bitmap(name, "disable")

    async def merge_bitmaps(self, dest: str, *sources: str,
                            source_image: str | os.PathLike[str] | None = None) -> None:
        """Add the bits of every SOURCE bitmap (any granularity) to DEST; with
        SOURCE_IMAGE, SOURCES are bitmaps of that image (qemu-img bitmap
        --merge -b), opened read-only here, of a disk of the same size."""
        if not sources:
            raise UsageError("merge_bitmaps needs at least one source bitmap")
        if source_image is None or same_file(os.fspath(source_image), self.path):
            await self._engine.change_bitmap(dest, "merge", list(sources))
            return
        async with Image(source_image, "r", require_backing=False) as other:
            external = [(find_bitmap(other._engine.bitmaps, name), await other.bitmap_bits(name))
                        for name in sources]
        await self._engine.change_bitmap(dest, "merge", external=external)

    async def checkpoint(self, name: str) -> Checkpoint:
        """In one commit at one instant: snapshot NAME, a frozen copy B@NAME of
        every enabled bitmap B, and a new enabled bitmap NAME."""
        entry = await self._engine.checkpoint(name)
        return Checkpoint(Snapshot.from_entry(entry), tuple(b.name for b in self._engine.bitmaps))

    async def resize(self, size: int, shrink: bool = False) -> None:
        """Resize the virtual disk to SIZE bytes, as `qemu-img resize`: a grow
        adds an area that reads zeros; a shrink needs SHRINK (what lies past
        the new end is dropped and its clusters freed). Persistent bitmaps
        follow the new size. Refused (ResizeError) where qemu-img refuses:
        a size not a multiple of 512 or not positive, a version 2 image with
        internal snapshots, an inconsistent bitmap. Atomic: a crash leaves
        the old size and content or the new."""
        if size < self._engine.size and not shrink:
            raise ResizeError(f"{size} is smaller than the disk ({self._engine.size}): shrinking drops "
                              "what lies past the new end; pass shrink=True (--shrink) to do it")
        await self._engine.resize(size)

    async def flush(self) -> None:
        """Everything written so far durable in the image."""
        await self._engine.flush()

    async def revalidate(self) -> None:
        """force_share: drop every table read so far and re-read the header (a
        server calls it periodically; see docs/mounting.md, images in use)."""
        await self._engine.revalidate()

    @property
    def engine(self) -> _EngineImage:
        """The engine's image behind this one (qcowfs.engine.image.Image): for
        tests and tools that check the engine's own state. Not a stable API."""
        return self._engine

    @property
    def tables_epoch(self) -> int:
        """force_share: bumped each time revalidate() dropped the tables."""
        return self._engine.tables_epoch


class _Opening:
    """What open() returns: awaitable (`image = await open(...)`) and an async
    context manager (`async with open(...) as image:`)."""

    def __init__(self, make: Callable[[], Awaitable[Image]]) -> None:
        self._make = make
        self._image: Image | None = None

    def __await__(self) -> Generator[Any, None, Image]:
        return self._make().__await__()

    async def __aenter__(self) -> Image:
        self._image = await self._make()
        return self._image

    async def __aexit__(self, *exc: object) -> None:
        assert self._image is not None
        await self._image.close()


def open(path: str | os.PathLike[str], mode: Mode = "r", *, passphrase: Passphrase = None,
         key_file: KeyFile = None, force_share: bool = False,
         l2_cache_size: int = DEFAULT_L2_CACHE_BYTES, compress: bool = False) -> _Opening:
    """Open a qcow2 image: `async with qcowfs.aio.open(path, "r+") as image:`
    (or `image = await qcowfs.aio.open(...)`, then `await image.close()`).
    See `Image` for the arguments."""
    async def make() -> Image:
        image = Image(path, mode, passphrase=passphrase, key_file=key_file, force_share=force_share,
                      l2_cache_size=l2_cache_size, compress=compress)
        try:
            await image.prepare()
        except BaseException:
            await image.close()
            raise
        return image
    return _Opening(make)


async def check(path: str | os.PathLike[str], repair: bool = False, *, force_share: bool = False,
                progress: Callable[[float], None] | None = None) -> CheckResult:
    """`qemu-img check [-r all]` of the image at PATH. A repair opens the image
    for writing even if it is marked corrupt (that is what a repair is for)
    and clears the mark once no corruption is left."""
    if repair and force_share:
        raise UsageError("force_share cannot be used with a repair: a repair must own the image")
    image = Image(path, "r+" if repair else "r", force_share=force_share, repair=repair)
    try:
        return await image.check(repair, progress)
    finally:
        await image.close()


async def info(path: str | os.PathLike[str], *, format: str | None = None,
               force_share: bool = False) -> dict[str, Any]:
    """What `qemu-img info --output=json` prints for the image at PATH, with
    its keys: a qcow2 image (as `Image.info`; its backing file need not be
    there, and an encrypted image is described without its passphrase) or
    a raw file (read without a lock, as qemu-img reads it). FORMAT ("qcow2"
    or "raw") as qemu-img's -f, else probed as qemu-img probes (a file that
    does not start with the qcow2 magic is raw). FORCE_SHARE as for `open`."""
    path = os.fspath(path)
    if _format(path, format) == "raw":
        from .engine.info import describe_raw

        # (no lock: a raw file's info is its size, and qemu-img info takes
        # none either: it opens with BDRV_O_NO_IO)
        source = RawSource(path, force_share=True)
        try:
            return describe_raw(source)
        finally:
            await source.close()
    async with Image(path, "r", force_share=force_share, require_backing=False) as image:
        return await image.info()


async def map(path: str | os.PathLike[str], *, format: str | None = None, start: int = 0, length: int | None = None,
              snapshot: str | None = None, force_share: bool = False) -> list[dict[str, Any]]:
    """`qemu-img map --output=json` of the image at PATH: a qcow2 image (as
    `Image.map`, backing chain included; SNAPSHOT: an internal snapshot's
    disk) or a raw file (data where the host file has data, zeros in its
    holes); START and LENGTH as qemu-img map's --start-offset and
    --max-length. FORMAT as qemu-img's -f, else probed."""
    path = os.fspath(path)
    fmt = _format(path, format)
    if fmt == "raw":
        from .engine.extents import raw_map

        if snapshot is not None:
            raise UsageError("a raw image has no snapshots")
        source = RawSource(path, force_share)
        try:
            return raw_map(source, source.size, start, length)
        finally:
            await source.close()
    async with Image(path, "r", force_share=force_share) as image:
        return await image.map(snapshot, start=start, length=length)


async def resize(path: str | os.PathLike[str], size: int, *, shrink: bool = False, format: str | None = None,
                 preallocation: str = "off", passphrase: Passphrase = None, key_file: KeyFile = None) -> None:
    """`qemu-img resize PATH SIZE` of a qcow2 image (as `Image.resize`;
    PASSPHRASE / KEY_FILE open an encrypted one) or a raw file (cut or
    extended to exactly SIZE bytes; its disk is that in whole sectors). A
    size below the disk's needs SHRINK (--shrink). PREALLOCATION ("falloc",
    "full": a raw file's grown tail reserved or written with zeros; only
    "off" for a qcow2 image here). FORMAT as qemu-img's -f, else probed."""
    path = os.fspath(path)
    if _format(path, format) == "raw":
        from .engine.raw import resize_raw

        await in_thread(resize_raw, path, size, shrink, preallocation)
        return
    if preallocation != "off":
        raise UsageError(f"preallocation={preallocation} on resize is for raw images here: a qcow2 image's "
                         "grown area is left unallocated (it reads zeros)")
    async with Image(path, "r+", passphrase=passphrase, key_file=key_file) as image:
        await image.resize(size, shrink=shrink)


def create_sync(path: str | os.PathLike[str], size: int | None = None, *, format: str = "qcow2",
                passphrase: Passphrase = None, key_file: KeyFile = None, unsafe: bool = False,
                **options: Any) -> None:
    """`qemu-img create` (see `create`), on the caller's thread."""
    from .engine import create as _create
    target = os.fspath(path)
    if format == "raw":
        if passphrase is not None or key_file is not None:
            raise UsageError("a raw image is not encrypted: it takes no passphrase")
        _create.create_raw(target, size, **options)
        return
    if format != "qcow2":
        raise UsageError(f"qcowfs creates qcow2 and raw images, not '{format}'")
    backing, fmt = options.get("backing_file"), options.get("backing_fmt")
    if size is None and backing is not None:
        if unsafe:
            raise UsageError("image creation needs a size parameter (with unsafe, the backing file is not read)")
        if fmt is not None:
            size = _create.backing_size(target, backing, fmt)
    opts = _create.create_options(size, **options)
    if backing is not None and not unsafe:
        _create.backing_size(target, backing, opts.backing_fmt or "raw")  # (it must open)
    _create.create(target, opts, _new_key(passphrase, key_file, target))


async def create(path: str | os.PathLike[str], size: int | None = None, *, format: str = "qcow2",
                 passphrase: Passphrase = None, key_file: KeyFile = None, unsafe: bool = False,
                 **options: Any) -> None:
    """Create a qcow2 image at PATH of SIZE bytes, as `qemu-img create -f
    qcow2 -o OPTIONS PATH SIZE` (FORMAT "raw": a raw image, as `qemu-img
    create -f raw`, whose one option is preallocation ("off", "falloc",
    "full")): OPTIONS are qemu-img's option names with
    "." and "-" written "_" (cluster_size, compat ("0.10" or "1.1"),
    refcount_bits, lazy_refcounts, extended_l2, compression_type ("zlib",
    "zstd"), preallocation ("off", "metadata", "falloc", "full"),
    data_file, data_file_raw, backing_file, backing_fmt ("qcow2", "raw"),
    encrypt_format ("luks"), encrypt_cipher_alg, encrypt_cipher_mode,
    encrypt_ivgen_alg, encrypt_ivgen_hash_alg, encrypt_hash_alg,
    encrypt_iter_time (ms)). Values are Python values or qemu-img's text
    ("on"/"off" for booleans; sizes are numbers). Without SIZE the backing
    file's size is taken. PASSPHRASE or KEY_FILE: the LUKS passphrase.
    UNSAFE (qemu-img -u): the backing file is not opened. An existing file
    at PATH is replaced (refused while another program holds it); on any
    failure PATH is left absent or as it was."""
    await in_thread(lambda: create_sync(path, size, format=format, passphrase=passphrase, key_file=key_file,
                                        unsafe=unsafe, **options))


class _QcowTarget:
    """A new qcow2 image's disk as convert's target (engine.convert.CompressedTarget)."""

    def __init__(self, image: Image) -> None:
        disk = image.disk
        self.write, self.zero, self.write_compressed = disk.write, disk.zero, disk.write_compressed
        self.cluster_size = image.cluster_size
        self.compression_type = image.engine.geo.compression_type


class _QcowSource:
    """A qcow2 image's disk (or a snapshot's) as convert's source: its data
    ranges from the allocation map (backing chain included)."""

    def __init__(self, image: Image, snapshot: tuple[str, tuple[str, ...]] | None) -> None:
        self._image = image
        self._snapshot: Disk | None = None
        if snapshot is not None:
            key, order = snapshot
            self._snapshot = Disk(image, image._engine.snapshots[find_snapshot(image._engine.snapshots, key, order)])
        self._disk = self._snapshot if self._snapshot is not None else image.disk
        self.size = self._disk.size
        self.readinto = self._disk.readinto
        self._map: list[dict[str, Any]] | None = None   # (-C: the map, read once)

    async def host_runs(self, offset: int, n: int) -> list[tuple[int, int, int]] | None:
        """convert -C: where the image file holds [offset, offset+N) as it
        reads (plain data clusters of this image, no data file), from the
        map; None where any of it is elsewhere or otherwise (convert.OffloadSource)."""
        if self._map is None:
            self._map = await self._image.map(self._snapshot)
        engine = self._image._engine
        if engine.external_data:
            return None
        runs: list[tuple[int, int, int]] = []
        end = offset + n
        for e in self._map:
            lo, hi = max(offset, e["start"]), min(end, e["start"] + e["length"])
            if lo >= hi:
                continue
            if not e["data"] or e["zero"] or e["depth"] or "offset" not in e:
                return None
            runs.append((engine.file.fd, e["offset"] + lo - e["start"], hi - lo))
        return runs if sum(r[2] for r in runs) == n else None

    async def data_ranges(self, zeros: bool = True) -> list[tuple[int, int]]:
        """Where the disk has data; not ZEROS: less where block status says
        zero as well (a hole of a metadata-preallocated image's file)."""
        return [(start, stop) for start, stop, kind in await self.allocation(zeros) if kind == "data"]

    async def allocation(self, zeros: bool = True) -> list[tuple[int, int, str]]:
        """(start, stop, kind) runs covering the disk: "data", "zero" (a zero
        cluster of some layer; not ZEROS: also data the map calls zero) or
        "unallocated" (in every layer)."""
        out: list[tuple[int, int, str]] = []
        for e in await self._image.map(self._snapshot):
            kind = "data" if e["data"] and (zeros or not e["zero"]) else "zero" if e["present"] else "unallocated"
            if out and out[-1][1] == e["start"] and out[-1][2] == kind:
                out[-1] = (out[-1][0], e["start"] + e["length"], kind)
            else:
                out.append((e["start"], e["start"] + e["length"], kind))
        return out


def _source(path: str, fmt: str, keys: Keyring | None, force_share: bool,
            closers: list[Callable[[], Awaitable[None]]],
            snapshot: tuple[str, tuple[str, ...]] | None = None) -> tuple[Image | None, Any]:
    """The disk at PATH (FMT: qcow2 or raw; SNAPSHOT: a snapshot's) as convert
    and compare read it, and its Image (None for a raw file); its closer
    joins CLOSERS."""
    if fmt == "qcow2":
        image = Image(path, "r", passphrase=keys, force_share=force_share)
        closers.append(image.close)
        return image, _QcowSource(image, snapshot)
    from .engine.convert import RawDisk
    raw = RawDisk(path, force_share)
    closers.append(raw.close)
    return None, raw


def _probe(path: str) -> str:
    """qcow2 or raw, as qemu-img probes PATH (engine.opening.probe_format)."""
    try:
        return probe_format(path)
    except OSError as e:
        raise QcowError(f"could not open {path}: {e.strerror}") from None


def _format(path: str, format: str | None) -> str:
    """FORMAT ("qcow2" or "raw", qemu-img's -f) of the image at PATH, else
    its format as qemu-img probes it."""
    if format is None:
        return _probe(path)
    if format not in ("qcow2", "raw"):
        raise UsageError(f"unknown image format '{format}' (qcowfs takes qcow2 and raw)")
    return format


def _snapshot_key(spec: str) -> tuple[str, tuple[str, ...]]:
    """-l's forms, as qemu-img convert takes them: snapshot.id=ID,
    snapshot.name=NAME, or ID or NAME (an id first); the key and the order
    of find_snapshot."""
    for prefix, order in (("snapshot.name=", ("name",)), ("snapshot.id=", ("id",))):
        if spec.startswith(prefix):
            return spec[len(prefix):], order
    return spec, BY_ID


async def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, src_format: str | None = None,
                  out_format: str = "qcow2", compress: bool = False, snapshot: str | None = None,
                  backing_file: str | None = None, backing_fmt: str | None = None, sparse_size: int = 4096,
                  force_share: bool = False, passphrase: Passphrase = None,
                  key_file: KeyFile = None, target_passphrase: Passphrase = None,
                  target_key_file: str | os.PathLike[str] | None = None,
                  progress: Callable[[float], None] | None = None, cache: str = "unsafe",
                  compress_threads: int | None = None, skip_create: bool = False, target_is_zero: bool = False,
                  salvage: bool = False, bitmaps: bool = False, skip_broken_bitmaps: bool = False,
                  rate_limit: int = 0, copy_offload: bool = False, source_range: tuple[int, int | None] | None = None,
                  **options: Any) -> None:
    """Copy the disk of SRC into the new image DST, as `qemu-img convert`:
    SRC is qcow2 (any layout qcowfs reads; SNAPSHOT: an internal snapshot's
    disk instead of the active one; PASSPHRASE / KEY_FILE for an encrypted
    one) or raw (SRC_FORMAT; default: probed); OUT_FORMAT "qcow2" (the
    default here; the command line's default is raw, as qemu-img's) or "raw".
    Ranges SRC holds no data in, and blocks of zeros (SPARSE_SIZE bytes for
    a raw DST, a cluster for a qcow2 one; 0: write every byte), stay
    unallocated. OPTIONS: create options of a qcow2 DST (see `create`;
    TARGET_PASSPHRASE / TARGET_KEY_FILE for encrypt_format="luks").
    COMPRESS: compressed clusters (zlib or zstd, per compression_type),
    made by COMPRESS_THREADS worker threads (default: one per core, up to 4;
    the image is the same for any number).
    BACKING_FILE (-B): DST gets this backing file (BACKING_FMT, default
    probed) and holds only what differs from it; an encrypted one opens with
    SRC's passphrases, as SRC's own backing chain does (several are tried in
    order on each, as for `Image`). FORCE_SHARE: read SRC
    whatever holds it (qemu-img -U). PROGRESS(fraction) is called as the
    copy goes. CACHE (qemu-img -t): "unsafe" (the default, as qemu-img's)
    never flushes; any other mode makes DST durable (fsync) before it
    appears under its name. DST appears complete or not at all: it is written under a
    temporary name next to it and renamed at the end (removed on failure;
    a killed process leaves a hidden .DST.qcowfs-* file behind).

    SKIP_CREATE (qemu-img -n): DST exists, an image of OUT_FORMAT at least
    as large as SRC's disk (else refused, as qemu-img refuses "output file
    is smaller than input file"), and is written in place: what SRC holds
    is written, and every range of SRC that reads zeros is zeroed in DST
    (zero clusters, or holes punched in a raw file), so DST reads as SRC
    whatever it held; what lies beyond SRC's size is left as it is. OPTIONS
    are refused with it (qemu-img: "-o has no effect when skipping image
    creation"); TARGET_PASSPHRASE / TARGET_KEY_FILE open an encrypted DST.
    With BACKING_FILE, DST is taken to be an image over that file already
    (its backing file is not changed, as in qemu-img): what differs from
    BACKING_FILE is written, the rest of DST left as it is. A failure
    midway (a read error, a full disk, a kill) leaves DST partly written:
    consistent (clean in `qemu-img check`), its content a mix of old and
    new, as qemu-img -n leaves it.
    COPY_OFFLOAD (qemu-img -C): the kernel copies what SRC's file holds as
    the disk reads it into a raw DST (copy_file_range: a reflink on XFS or
    btrfs, no copy through memory); the rest (compressed or encrypted
    clusters, backing files, a qcow2 DST) is copied as usual. Data is then
    not searched for zeros. Not with COMPRESS or SALVAGE (as qemu-img).
    RATE_LIMIT (qemu-img -r): at most this many bytes of SRC's data a
    second (0, the default: no limit), so that a copy of a busy disk leaves
    the storage to others.
    TARGET_IS_ZERO (--target-is-zero, only with SKIP_CREATE, as in
    qemu-img): DST is taken to read zeros already: ranges of zeros are not
    written.
    SALVAGE (--salvage): a read of SRC that fails (a damaged table or
    cluster, an I/O error) does not stop the copy: it is done again in
    smaller pieces, down to 512-byte sectors, and the sectors that still
    fail are written as zeros; each run of them is one warning of the
    qcowfs logger ("error while reading offset N (M bytes): why; written
    as zeros"); a map that cannot be read is one warning too (then every
    range is read).
    BITMAPS (--bitmaps; a qcow2 SRC and DST): every persistent bitmap of SRC
    (its own, not its backing files') is copied into DST once the data is:
    name, granularity, enabled or disabled, the same granules dirty. An
    inconsistent one (in use: not saved cleanly) is refused, before
    anything is written, unless SKIP_BROKEN_BITMAPS (then it is left out,
    with a warning). A bitmap DST (-n) already has by that name is refused
    before anything is written too.
    SOURCE_RANGE (START, END): only those bytes of SRC's disk (END None or
    past the disk: to its end), as a disk of their own (`dd`); a START past
    the end of the disk is refused; not with SKIP_CREATE, BACKING_FILE,
    BITMAPS or COPY_OFFLOAD."""
    from .engine import builder as _builder, convert as _convert, create as _create
    from .host.logs import log

    src_path, dst_path = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(dst))
    if out_format not in ("qcow2", "raw"):
        raise UsageError(f"output format '{out_format}' is not supported (qcow2 or raw)")
    if src_format not in (None, "qcow2", "raw"):
        raise UsageError(f"source format '{src_format}' is not supported (qcow2 or raw)")
    if target_is_zero and not skip_create:
        raise UsageError("--target-is-zero needs -n (skip_create), as in qemu-img: a new image reads zeros")
    if skip_broken_bitmaps and not bitmaps:
        raise UsageError("--skip-broken-bitmaps needs --bitmaps, as in qemu-img")
    if skip_create and options:
        raise UsageError("-o has no effect when skipping image creation (-n), as in qemu-img")
    if copy_offload and (compress or salvage):
        raise UsageError(f"copy offloading (-C) cannot be used with {'-c' if compress else '--salvage'}, "
                         "as in qemu-img")
    if bitmaps and out_format != "qcow2":
        raise UsageError("--bitmaps needs a qcow2 target (-O qcow2): a raw image has no bitmaps")
    if source_range is not None and (skip_create or backing_file is not None or bitmaps or copy_offload):
        raise UsageError("a range of the source is copied into a new image only (not with -n, -B, --bitmaps "
                         "or -C)")
    if out_format == "raw" and (compress or backing_file is not None):
        raise UsageError("-c and -B need a qcow2 target (-O qcow2)")
    # (a raw target takes qemu-img's one raw option: its space reserved or written first)
    raw_preallocation = _create.raw_preallocation(**options) if out_format == "raw" else "off"
    check_cache_mode(cache)
    if sparse_size < 0 or sparse_size % 512:
        raise UsageError("the sparse size (-S) must be a multiple of 512")
    if compress_threads is not None and compress_threads < 1:
        raise UsageError("compress_threads must be at least 1")
    if not os.path.exists(src_path):
        raise QcowError(f"could not open {src}: No such file or directory")
    if skip_create and not os.path.exists(dst_path):
        raise QcowError(f"could not open {dst}: No such file or directory (-n writes into an existing image)")
    if os.path.exists(dst_path) and os.path.samefile(src_path, dst_path):
        raise UsageError("the source and the destination are the same file")
    if backing_file is not None and backing_fmt is None:
        backing_fmt = _probe(_create.resolve_backing(dst_path, backing_file))
    if compress and (options.get("encrypt_format") or options.get("data_file")):
        raise UsageError("compressed clusters cannot be written with encryption or an external data file")
    if compress and options.get("preallocation", "off") != "off":
        raise UsageError("compression and preallocation cannot be used at the same time (as in qemu-img)")
    fmt = src_format or _probe(src_path)
    if snapshot is not None and fmt != "qcow2":
        raise UsageError("-l (snapshot) needs a qcow2 source")
    if bitmaps and fmt != "qcow2":
        raise UsageError("--bitmaps needs a qcow2 source: a raw image has no bitmaps")
    target_keys = _keyring(target_passphrase, target_key_file)
    target_key = None if skip_create else _new_key(target_keys, None, dst_path)
    # (the source's passphrase opens its backing chain, and the -B file too: mostly the
    # source's own backing file)
    src_key = _keyring(passphrase, key_file)
    closers: list[Callable[[], Awaitable[None]]] = []
    final = _create.replaced_file(dst_path)
    # A block device is written in place (raw only), not replaced: what the
    # source does not hold is zeroed there, and a failure leaves it partly
    # written. So is an existing image with -n.
    device = _create.target_is_device(final)
    if device and out_format != "raw":
        _create.refuse_device(final)
    in_place = device or skip_create
    tmp = final if in_place else _create.temp_name(final)
    made = False
    held = -1
    try:
        source: Any
        copies: list[tuple[Any, bytes]] = []
        broken: list[Any] = []
        image, source = _source(src_path, fmt, src_key, force_share, closers,
                                _snapshot_key(snapshot) if snapshot is not None else None)
        if image is not None:
            for f in image.files[1:]:
                if same_file(f, final):
                    raise UsageError(f"the destination {dst} is {f}, a file of the source: it is read while "
                                     "the copy is made")
            if bitmaps:
                if image._engine.header.version < 3:
                    raise UsageError(f"--bitmaps: {src} is a version 2 image, which has no persistent bitmaps "
                                     "(qemu-img: source lacks bitmap support)")
                copies, broken = await _bitmaps_to_copy(image._engine, skip_broken_bitmaps)
        if source_range is not None:
            start, end = source_range
            if start > source.size:
                raise RequestError(f"{src}: cannot skip to offset {start}: the disk has {source.size} bytes")
            source = _convert.Window(source, start, source.size if end is None else max(start, min(end, source.size)))
        size = source.size
        if salvage:
            source = _convert.Salvaging(source, lambda line: log.warning("%s", line))
        opts = None
        if out_format == "qcow2" and not skip_create:
            opts = _create.create_options(size, backing_file=backing_file, backing_fmt=backing_fmt, **options)
            _create.check_references(dst_path, opts)  # (the image is made as TMP, published as DST)
            if opts.encrypt is not None and target_key is None:
                raise UsageError("an encrypted target needs a passphrase (target_passphrase or target_key_file)")
            if bitmaps and opts.version < 3:
                raise UsageError("--bitmaps: persistent bitmaps need a version 3 image (compat=1.1), as in QEMU")
        if backing_file is not None:  # (it must open: said as given, before anything is made)
            _create.backing_size(dst_path, backing_file, backing_fmt or "raw")
        if not (skip_create and out_format == "qcow2"):   # (an image opened "r+" locks itself)
            held = _create.hold_target(final)
        plan = _convert.CopyPlan(size, sparse_size, compress, None, progress, rate=rate_limit,
                                 offload=copy_offload)
        if compress_threads is not None:
            plan.threads = compress_threads
        # -n: the target is told every range of zeros (unless it reads zeros, or
        # -B says it reads that file where the source does), freeing what it held there
        plan.unmap = skip_create
        if out_format == "qcow2":
            target: Any
            out: Image | None = None
            if opts is not None and not copies and not compress and _builder.fits(opts):
                # (a new plain image: written front to back, without the writer's refcount engine)
                os.close(_create.new_file(tmp))
                made = True
                target = _builder.ImageBuilder(tmp, opts, flushes=cache != "unsafe")
                closers.insert(0, target.close)
                cluster_size = opts.cluster_size
            else:
                if opts is not None:
                    await in_thread(lambda: _create.create(tmp, opts, target_key))
                    made = True
                out = Image(tmp, "r+", passphrase=target_keys, cache=cache)
                closers.insert(0, out.close)
                if skip_create:   # (checked before the image is written: prepare may write)
                    if out.virtual_size < size:
                        raise RequestError(f"{dst} is too small for the disk: {out.virtual_size} bytes, the disk "
                                           f"{size} (as in qemu-img, -n does not grow it)")
                    if bitmaps and out.engine.header.version < 3:
                        raise UsageError(f"--bitmaps: {dst} is a version 2 image, which has no persistent bitmaps")
                    if copies:   # (names free, else refused; bitmap_ops loads numpy: only for bitmaps)
                        from .engine import bitmap_ops
                        bitmap_ops.plan_copies(out.engine.meta, out.engine.bitmaps, copies)
                await out.prepare()
                if backing_file is not None:
                    if backing_fmt == "qcow2":
                        base = Image(_create.resolve_backing(dst_path, backing_file), "r", passphrase=src_key,
                                     force_share=True)
                        closers.append(base.close)
                        plan.backing = _QcowSource(base, None)
                    else:
                        raw = _convert.RawDisk(_create.resolve_backing(dst_path, backing_file), force_share=True)
                        closers.append(raw.close)
                        plan.backing = raw
                plan.zero_init = (target_is_zero or backing_file is not None) if opts is None else opts.reads_zeros
                target, cluster_size = _QcowTarget(out), out.cluster_size
            plan.align = cluster_size
            if plan.granularity and not target_is_zero:
                # (zeros stay holes by the cluster; in a target said to read zeros, blocks of
                # -S's size are left out inside clusters too, as qemu-img leaves them)
                plan.granularity = cluster_size
            await _convert.copy(source, target, plan)
            for bm in broken:
                log.warning("skipping inconsistent bitmap '%s' (%s)", bm.name, bm.problem)
            if out is None:
                await target.finish()   # (its closer stays: closing twice does nothing)
            else:
                if copies:
                    await out.engine.copy_bitmaps(copies)
                closers.remove(out.close)
                await out.close()
        else:
            if not in_place:
                fd = _create.new_file(tmp)
                made = True
                try:
                    if raw_preallocation != "off":
                        os.ftruncate(fd, size)
                        await in_thread(_create.preallocate_data, fd, 0, size, raw_preallocation)
                finally:
                    os.close(fd)
            target = _convert.RawTarget(tmp, size, flushes=cache != "unsafe", in_place=in_place)
            closers.insert(0, target.finish)
            plan.zero_init = not in_place or target_is_zero
            await _convert.copy(source, target, plan)
            closers.remove(target.finish)
            await target.finish()
        if isinstance(source, _convert.Salvaging):
            source.flush()
        if not in_place:
            _create.publish(tmp, final, durable=cache != "unsafe")
        made = False
    except OSError as e:
        if e.filename != tmp:
            raise
        raise QcowError.from_os(f"cannot write {dst_path}", e) from None  # (not the hidden name)
    finally:
        for close in closers:
            with shielded():
                try:
                    await close()
                except Exception:  # noqa: BLE001 - the first error is the one to report
                    pass
        if made:
            _create.remove_quietly(tmp)
        if held >= 0:
            os.close(held)


async def _bitmaps_to_copy(engine: _EngineImage, skip_broken: bool) -> tuple[list[tuple[Any, bytes]], list[Any]]:
    """convert --bitmaps: the persistent bitmaps of ENGINE to copy, each with
    its bits, and the inconsistent ones SKIP_BROKEN leaves out (without it,
    one is refused, as qemu-img refuses it). A bitmaps extension QEMU
    ignores (its autoclear bit clear: written by a program that knows no
    bitmaps) has none to copy, as for qemu-img."""
    from .format import AUTOCLEAR_BITMAPS

    copies: list[tuple[Any, bytes]] = []
    broken: list[Any] = []
    if not engine.header.autoclear_features & AUTOCLEAR_BITMAPS:
        return copies, broken
    for bm in engine.bitmaps:
        if bm.problem is None:
            copies.append((bm, await read_bitmap(bm, engine.file, 0, bm.size)))
        elif skip_broken:
            broken.append(bm)
        else:
            raise RequestError(f"cannot copy inconsistent bitmap '{bm.name}' ({bm.problem}): try "
                               "--skip-broken-bitmaps, or remove it (qcowfs bitmap remove)")
    return copies, broken


async def dd(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, block_size: int = 512,
             count: int | None = None, skip: int = 0, src_format: str | None = None, out_format: str = "raw",
             force_share: bool = False, passphrase: Passphrase = None, key_file: KeyFile = None) -> None:
    """`qemu-img dd if=SRC of=DST bs=BLOCK_SIZE count=COUNT skip=SKIP`: a new
    image DST (OUT_FORMAT "raw", qemu-img's default, or "qcow2") holding the
    bytes of SRC's disk from SKIP blocks on, up to COUNT blocks from the
    start of the disk (qemu-img 7.2 counts COUNT from the start, not from
    SKIP: the copy is min(COUNT blocks, the disk) less SKIP blocks). A SKIP
    past the end of the disk is refused (qemu-img 7.2 says it cannot skip
    there, then makes an empty image and exits 0). Made as `convert` makes
    a new image (whole or not at all; zeros left unallocated)."""
    if not 1 <= block_size <= 2**31 - 1:
        raise UsageError("invalid bs: it must be between 1 and 2147483647 (as in qemu-img)")
    if skip < 0 or (count is not None and count < 0):
        raise UsageError("count and skip must not be negative")
    await convert(src, dst, src_format=src_format, out_format=out_format, force_share=force_share,
                  passphrase=passphrase, key_file=key_file,
                  source_range=(skip * block_size, None if count is None else count * block_size))


async def compare(first: str | os.PathLike[str], second: str | os.PathLike[str], *,
                  first_format: str | None = None, second_format: str | None = None, strict: bool = False,
                  force_share: bool = False, passphrase: Passphrase = None, key_file: KeyFile = None,
                  progress: Callable[[float], None] | None = None) -> Comparison:
    """`qemu-img compare FIRST SECOND`: whether the two disks (qcow2 with
    their backing chains, or raw; FIRST_FORMAT / SECOND_FORMAT, else probed)
    read the same. Disks of different sizes compare as if the shorter read
    zeros past its end, as qemu-img compares them. STRICT (-s): a size
    mismatch is a difference, and so is a range allocated differently
    (data, a zero cluster, nothing allocated) though it reads the same.
    (qemu-img's strict mode compares QEMU's block status flags, among them
    whether a run reaches the end of the disk: it also calls "different"
    two empty images whose last runs start at different places; qcowfs
    compares what is allocated.) Only what either disk holds is read."""
    from .engine import compare as _compare

    paths = [os.path.abspath(os.fspath(p)) for p in (first, second)]
    for given, p, fmt in zip((first, second), paths, (first_format, second_format)):
        if fmt not in (None, "qcow2", "raw"):
            raise UsageError(f"format '{fmt}' is not supported (qcow2 or raw)")
        if not os.path.exists(p):
            raise QcowError(f"could not open {os.fspath(given)}: No such file or directory")
    keys = _keyring(passphrase, key_file)
    closers: list[Callable[[], Awaitable[None]]] = []
    try:
        a = _source(paths[0], first_format or _probe(paths[0]), keys, force_share, closers)[1]
        b = _source(paths[1], second_format or _probe(paths[1]), keys, force_share, closers)[1]
        sizes = (a.size, b.size)
        if strict and a.size != b.size:
            return Comparison(False, sizes)
        kinds = _compare.first_kind_difference(await a.allocation(), await b.allocation()) if strict else None
        content = await _compare.first_difference(a, b, progress)
        if kinds is not None and (content is None or kinds <= content):
            return Comparison(False, sizes, offset=kinds, allocation=True)
        return Comparison(content is None, sizes, offset=content)
    finally:
        for close in reversed(closers):
            await close()


async def measure(src: str | os.PathLike[str] | None = None, *, size: int | None = None,
                  out_format: str = "qcow2", src_format: str | None = None, snapshot: str | None = None,
                  force_share: bool = False, passphrase: Passphrase = None, key_file: KeyFile = None,
                  **options: Any) -> dict[str, int]:
    """How large a file a new image of OUT_FORMAT ("qcow2", the default
    here; or "raw") needs, as `qemu-img measure`: for a disk of SIZE bytes
    (nothing allocated), or holding the disk of SRC (qcow2 or raw, per
    SRC_FORMAT, default probed; SNAPSHOT: an internal snapshot's clusters,
    as for `convert`, over the active disk's size, as qemu-img takes it). Give SRC or SIZE, not both. OPTIONS: create options of
    a qcow2 image (see `create`; those that change the numbers are
    cluster_size, compat, refcount_bits, extended_l2, preallocation,
    encrypt_format="luks" with the encrypt_* options, backing_file).

    The answer has qemu-img's JSON keys, in its order: "required" (bytes
    the image takes once the disk is copied in: metadata as for a fully
    allocated image, plus the clusters of SRC's disk that hold data, its
    backing chain's included, zero clusters not; all of them with a
    backing_file or a full/falloc preallocation), "fully-allocated" (every
    cluster allocated), and "bitmaps" first, for a version 3 qcow2 SRC and
    output: the bytes its persistent bitmaps take when copied (`convert`'s
    BITMAPS). A raw output needs the disk's size, both numbers. The
    estimate is QEMU's, to the byte: `convert` into an image of that size
    fits. No passphrase is needed for a LUKS output (the header's size does
    not depend on it); an encrypted SRC is measured from its tables
    (PASSPHRASE / KEY_FILE are taken, not needed)."""
    from .engine import measure as _measure

    if out_format not in ("qcow2", "raw"):
        raise UsageError(f"output format '{out_format}' is not supported (qcow2 or raw)")
    if src_format not in (None, "qcow2", "raw"):
        raise UsageError(f"source format '{src_format}' is not supported (qcow2 or raw)")
    o: _measure.MeasureOptions | None = None   # (None: a raw output, whose size is the disk's)
    if out_format == "qcow2":
        o = _measure.qcow2_options(**options)
    else:
        _measure.raw_options(**options)
    if src is None:
        if size is None:
            raise UsageError("give a source image or a size (qemu-img: --size N or one filename)")
        if src_format is not None or snapshot is not None:
            raise UsageError("a source format (-f) and a snapshot (-l) need a source image, not a size")
        size = _measure.check_size(size)
        if o is None:
            return {"required": size, "fully-allocated": size}
        _measure.too_large(size, o)
        return _measure.qcow2_result(o, size, None, None)
    if size is not None:
        raise UsageError("a size cannot be given with a source image (qemu-img: --size N or one filename)")
    src_path = os.path.abspath(os.fspath(src))
    if not os.path.exists(src_path):
        raise QcowError(f"could not open {src}: No such file or directory")
    fmt = src_format or _probe(src_path)
    if snapshot is not None and fmt != "qcow2":
        raise UsageError("-l (snapshot) needs a qcow2 source")
    source: Any
    bitmaps: int | None = None
    if fmt == "qcow2":
        from .format import AUTOCLEAR_BITMAPS

        image = Image(src_path, "r", passphrase=_keyring(passphrase, key_file), force_share=force_share)
        closer = image.close
        engine = image._engine
        source = _QcowSource(image, _snapshot_key(snapshot) if snapshot is not None else None)
        ranges = functools.partial(source.data_ranges, zeros=False)   # (QEMU counts what is zero as no data)
        # (with -l too, QEMU takes the active disk's size: a snapshot's table is read up to it)
        disk_size = image.virtual_size
        if o is not None and engine.header.version >= 3:
            # (what QEMU loads: every bitmap of a consistent extension, in use or not)
            loaded = engine.bitmaps if engine.header.autoclear_features & AUTOCLEAR_BITMAPS else []
            bitmaps = _measure.bitmaps_size([(b.name, b.granularity, b.virtual_size) for b in loaded],
                                            o.cluster_size)
    else:
        from .engine import convert as _convert

        source = _convert.RawDisk(src_path, force_share)
        closer, ranges = source.close, source.data_ranges
        disk_size = source.size
    try:
        if o is None:
            return {"required": disk_size, "fully-allocated": disk_size}
        data = None if o.backing_file else await ranges()
        held = _measure.data_clusters_bytes(data or [], disk_size, o.cluster_size)
        return _measure.qcow2_result(o, disk_size, held, bitmaps)
    finally:
        with shielded():
            await closer()


async def commit(overlay: str | os.PathLike[str], base: str | os.PathLike[str] | None = None, *,
                 drop: bool = False, progress: Callable[[float], None] | None = None,
                 passphrase: Passphrase = None, key_file: KeyFile = None, rate_limit: int = 0) -> None:
    """`qemu-img commit [-b BASE] [-d] [-r RATE] OVERLAY`: write what OVERLAY (and the
    images between it and BASE) hold into BASE (default: OVERLAY's backing
    file; qcow2 or raw), then empty OVERLAY unless DROP. With BASE, OVERLAY
    is not emptied (as qemu-img: -b implies -d; the images between are then
    outdated). OVERLAY's content never changes on the way; a crash leaves
    BASE partly written (as QEMU's commit does), clean in `qemu-img check`.
    PASSPHRASE / KEY_FILE: of the encrypted images of the chain (several are
    tried in order on each, as for `Image`). RATE_LIMIT: at most that many
    bytes of data written a second (0: as fast as it goes), as -r."""
    from .engine import chain_ops
    if rate_limit < 0:
        raise UsageError("rate_limit must not be negative")
    await chain_ops.commit(os.fspath(overlay), os.fspath(base) if base is not None else None, drop, progress,
                           _keyring(passphrase, key_file), rate_limit)


async def rebase(image: str | os.PathLike[str], backing: str, *, backing_format: str | None = None,
                 unsafe: bool = False, progress: Callable[[float], None] | None = None,
                 force_share: bool = False, passphrase: Passphrase = None,
                 key_file: KeyFile = None) -> None:
    """`qemu-img rebase [-u] -b BACKING [-F FMT] IMAGE`: make BACKING (a path
    stored as given, relative to IMAGE's directory; "" for none) IMAGE's
    backing file. Safe mode first copies into IMAGE what its old backing
    chain shows and BACKING does not, so its content stays the same;
    UNSAFE only changes the pointer. BACKING_FORMAT ("qcow2" or "raw";
    probed when absent) is recorded in the image. FORCE_SHARE (qemu-img's
    -U) opens the new backing file without locks. PASSPHRASE / KEY_FILE: of
    the encrypted images (the image, its old and new backing chains; several
    are tried in order on each, as for `Image`)."""
    from .engine import chain_ops
    await chain_ops.rebase(os.fspath(image), backing, backing_format, unsafe, progress, force_share,
                           _keyring(passphrase, key_file))


async def amend(image: str | os.PathLike[str], *, compat: str | None = None,
                lazy_refcounts: bool | str | None = None, refcount_bits: int | str | None = None,
                size: int | None = None, backing_file: str | None = None, backing_fmt: str | None = None,
                data_file: str | None = None, data_file_raw: bool | str | None = None,
                encrypt_state: str | None = None, encrypt_keyslot: int | str | None = None,
                encrypt_iter_time: int | str | None = None, new_passphrase: Passphrase = None,
                new_key_file: KeyFile = None, old_passphrase: Passphrase = None, old_key_file: KeyFile = None,
                force: bool = False, passphrase: Passphrase = None, key_file: KeyFile = None) -> None:
    """`qemu-img amend -o OPTIONS IMAGE`: change what IMAGE's header says.

    COMPAT ("0.10" or "1.1": a downgrade or an upgrade), LAZY_REFCOUNTS,
    REFCOUNT_BITS (a new refcount structure of that width), SIZE (exactly
    that virtual size: QEMU's amend grows and shrinks), DATA_FILE (a new
    name for the external data file), DATA_FILE_RAW (False: the data file
    need no longer stay a raw image); BACKING_FILE / BACKING_FMT only as the
    image has them (`rebase` changes them). LUKS key slots of an encrypted
    image (qemu-img's encrypt.* options): ENCRYPT_STATE "active" puts
    NEW_PASSPHRASE (or NEW_KEY_FILE's bytes) into ENCRYPT_KEYSLOT (default:
    the first free one), its PBKDF2 timed to ENCRYPT_ITER_TIME ms (default
    2000), the master key unlocked by PASSPHRASE / KEY_FILE (qemu-img 7.2
    refuses an old passphrase there); "inactive" erases ENCRYPT_KEYSLOT
    (which OLD_PASSPHRASE, when given too, must open), or every slot
    OLD_PASSPHRASE (OLD_KEY_FILE) opens. FORCE: overwrite an active slot,
    or erase an inactive one or the last active one (the data is then lost
    for good), as qemu-img --force. PASSPHRASE / KEY_FILE: what opens the
    image (and its encrypted backing files).

    Everything is checked before anything is written; then each step is
    crash-safe (engine/amend.py says where qcowfs refuses what qemu-img does).
    On/off and number options may be given as qemu-img's text too ("on", "8")."""
    from .engine.amend import AmendRequest, run
    from .engine.create import option_bool, option_int
    from .engine.keyslots import KeySlotChange

    def on_off(name: str, value: bool | str | None) -> bool | None:
        return None if value is None else option_bool(name, value)

    def number(name: str, value: int | str | None) -> int | None:
        return None if value is None else option_int(name, value)

    lazy_refcounts, data_file_raw = on_off("lazy_refcounts", lazy_refcounts), on_off("data_file_raw", data_file_raw)
    refcount_bits, encrypt_keyslot = number("refcount_bits", refcount_bits), number("encrypt.keyslot", encrypt_keyslot)
    encrypt_iter_time = number("encrypt.iter-time", encrypt_iter_time)
    path = os.fspath(image)
    keys: KeySlotChange | None = None
    if encrypt_state is not None or encrypt_keyslot is not None or encrypt_iter_time is not None \
            or new_passphrase is not None or new_key_file is not None or old_passphrase is not None \
            or old_key_file is not None:
        if encrypt_state not in ("active", "inactive"):
            raise UsageError("the LUKS key slot options need encrypt.state=active (add a passphrase) or "
                             "encrypt.state=inactive (erase key slots)")
        new = _new_key(new_passphrase, new_key_file, path)
        old = _new_key(old_passphrase, old_key_file, path)
        keys = KeySlotChange(encrypt_state, encrypt_keyslot, new() if new is not None else None,  # type: ignore[arg-type]
                             old() if old is not None else None, encrypt_iter_time, force)
    req = AmendRequest(compat, lazy_refcounts, refcount_bits, size, backing_file, backing_fmt, data_file,
                       data_file_raw, keys)
    await run(path, req, _keyring(passphrase, key_file))
