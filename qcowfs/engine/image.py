"""An open image: the state of one qcow2 file (QEMU's BDRVQcow2State) and the
entry points every reader and writer goes through.

Opening is `opening.py`; reads are `mapper.py`, writes `writer.py`, refcounts
`refcount/`, snapshots `snapshot_ops.py`, bitmaps `bitmaps.py`/`bitmap_ops.py`.
This class ties them together and is the one place where two rules are
enforced for every entry point:

- *not writable*: `_check_writable` raises ReadOnlyError (EROFS) on an image
  opened read-only and CorruptionError (EIO) on one marked corrupt;
- *corruption*: a CorruptionError met by any entry point of a writable image
  goes to `signal_corruption` (QEMU's qcow2_signal_corruption): the corrupt
  bit is set and nothing is written through the image again.
"""
from __future__ import annotations

import functools
import os
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, NoReturn, TypeVar


from ..errors import (CorruptionError, InvalidImageError, QcowError, ReadOnlyError, RequestError, TruncatedError,
                      UnsupportedFeatureError)
from ..format import (EXT_BACKING_FORMAT, with_extension, AUTOCLEAR_DATA_FILE_RAW, AUTOCLEAR_KNOWN, CRYPT_NAMES, CRYPT_NONE, INCOMPAT_CORRUPT,
                      INCOMPAT_DIRTY, Geometry, Header, SnapshotEntry, Table,
                      decode_table, encode_table)
from ..host.hostfile import HostFile
from ..host.locking import lock_image
from ..host.logs import log
from ..host.waiting import Lock, in_thread, shielded
from . import chain
from .bitmaps import Bitmap, data_clusters, load_bitmaps, start_tracking, store_bitmaps
from .cache import TableCache
from .chain import Lookup, Piece, Source, Span
from .mapper import L1Table, Mapper
from .metadata import Metadata
from .opening import (MAX_CHAIN_DEPTH, OpenOptions, open_backing, open_data_file, open_encryption,
                      read_snapshot_table, validate_header)
from .overlap import Kind
from .snapshots import BY_ID, find_snapshot, snapshot_problem

if TYPE_CHECKING:
    from .refcount import Allocator
    from .writer import Writer

# What only changes need (writer.py, refcount/, references.py's overlap map,
# snapshot_ops.py, bitmap_ops.py, resize.py) is imported by the methods that
# change the image, not here: a read-only open, a mount of one and every
# one-shot command that only reads start without loading it (docs/speed.md).

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def signals_corruption(method: F) -> F:
    """Decorate an entry point of Image: a CorruptionError it meets reaches
    `signal_corruption` (on a writable image) before it propagates. The one
    path from a detected corruption to the corrupt bit."""
    @functools.wraps(method)
    async def guarded(self: "Image", *args: Any, **kwargs: Any) -> Any:
        try:
            return await method(self, *args, **kwargs)
        except CorruptionError as e:
            await self.signal_corruption(e)
    return guarded  # type: ignore[return-value]


class Image:
    """An open qcow2 image: its header, tables, caches and backing chain."""

    def __init__(self, path: str, options: OpenOptions, chain: tuple[tuple[int, int], ...] = ()) -> None:
        self.path = path
        self.options = options
        self.read_only = options.read_only
        self.backing: Source | None = None
        # Why the backing file is not open (OpenOptions.backing_required off), or None.
        self.backing_error: str | None = None
        self.data_file: HostFile | None = None
        if options.force_share and not options.read_only:
            raise QcowError("force-share (-U) is only for read-only opens")
        try:
            self.file = HostFile(path, writable=not options.read_only)
            self.file.flushes = not options.unsafe_cache
        except OSError as e:
            raise QcowError.from_os(f"cannot open {path}", e) from None
        if not self.read_only and self.file.is_block_device():
            # (new clusters go past the end of the file, as in a file that
            # grows: a device has none to give, and QEMU's placement by
            # refcounts alone is not done here)
            self._close_files()
            raise UnsupportedFeatureError(f"{path} is a block device: a qcow2 image on a block device opens "
                                          "read-only only")
        try:
            self._open(chain)
        except OSError as e:  # (a directory, an unreadable file...)
            self._close_files()
            raise QcowError.from_os(f"cannot read {path}", e) from None
        except QcowError as e:
            self._close_files()
            if chain:  # (a backing file: open_backing names it, as "backing file PATH")
                raise
            raise e.about(path) from None
        except BaseException:
            self._close_files()
            raise

    # ---- open ---------------------------------------------------------------

    def _open(self, chain: tuple[tuple[int, int], ...]) -> None:
        st = os.fstat(self.file.fd)
        ident = (st.st_dev, st.st_ino)
        if ident in chain:
            raise InvalidImageError(f"backing chain loops back to {self.path}")
        if len(chain) >= MAX_CHAIN_DEPTH:
            raise InvalidImageError(f"backing chain is deeper than {MAX_CHAIN_DEPTH}")
        h = Header.parse(self.file.read_sync(0, 1 << 21))
        self.geo = Geometry.from_header(h)
        truncated = validate_header(h, self.geo, self.file.known_size, self.options.repair)
        # (A repair reads what lies past the end as zeros too, as QEMU's check
        # does, and mends what it can around it.)
        salvage = self.read_only or self.options.repair
        if truncated and not salvage:
            raise InvalidImageError(f"{truncated[0]} (open it read-only to read what is left)")
        self.luks, self.cipher = open_encryption(h, self.geo, self.file, self.options)
        meta = self.meta = Metadata(self.file, h, self.geo, salvage=salvage)
        # What a read-only open left out (damaged snapshot table or bitmap
        # directory): the active disk is still served, as qemu-img convert does.
        self.left_out: list[str] = []
        # What a read-only open of a truncated file reads as zeros.
        self.salvaged = [f"{t}: what lies past the end reads as zeros, as QEMU reads it"
                         for t in truncated]
        if h.autoclear_features & AUTOCLEAR_DATA_FILE_RAW and not h.external_data:
            # QEMU refuses the image whole. Reading needs no data file, so a
            # read-only open serves the disk; a write would be acknowledged
            # into an image QEMU never opens.
            damage = "the header says data_file_raw but the image has no external data file (QEMU refuses it)"
            if not self.read_only:
                raise InvalidImageError(f"{damage}: open it read-only to read the disk")
            self.salvaged.append(damage)
        meta.snapshots = self._optional("snapshot table", "snapshots",
                                        lambda: read_snapshot_table(h, self.geo, self.file, self.options.repair))
        self.bitmaps: list[Bitmap] = self._optional("bitmap directory", "bitmaps",
                                                    lambda: load_bitmaps(h, self.file))
        meta.bitmap_directory = [bm.entry for bm in self.bitmaps]
        self._changed = False
        self._prepared = False
        if h.external_data:
            self.data_file = open_data_file(self.path, h, writable=not self.read_only)
            self.data_file.flushes = self.file.flushes
        mapper_file = self.data_file or self.file
        self.l2_cache: TableCache[Table] = TableCache(
            "L2", self.file, self.options.l2_cache_bytes // self.geo.cluster_size,
            self._load_l2, encode_table, self._write_l2)
        self.mapper = Mapper(self.geo, self.file, mapper_file, self.l2_cache,
                             encrypted=h.crypt_method != CRYPT_NONE, cipher=self.cipher,
                             salvage=salvage)
        self.corrupt = False
        # Why what acknowledged writes changed could not be flushed when the
        # image was marked corrupt (None: it was, or it never was marked).
        self._unflushed: str | None = None
        # force_share: bumped whenever the tables read so far are dropped
        # (revalidate); views holding their own L1 tables drop theirs then.
        self.tables_epoch = 0
        # force_share: why the active disk / the snapshots can no longer be
        # read safely (the writer moved the structures they are read through).
        self.disk_moved: str | None = None
        self.snapshots_moved: str | None = None
        self.allocator: Allocator | None = None
        self.writer: Writer | None = None
        if self.read_only:
            lock_image(self.file.fd, self.path, writer=False, force_share=self.options.force_share)
        else:
            self._open_writable(h)
        if not self.options.open_backing:
            return
        try:
            self.backing = open_backing(self.path, h, self.options, chain + (ident,), Image)
        except QcowError as e:
            if self.options.backing_required or not self.read_only:
                raise
            self.backing_error = str(e)
            self.left_out.append(f"{e}: the disk is described without it")

    def _open_writable(self, h: Header) -> None:
        from .references import build_overlap_map
        from .writer import Writer
        if h.incompatible_features & INCOMPAT_CORRUPT and not self.options.repair:
            raise QcowError(f"{self.path} is marked corrupt: mount it with --read-only, or repair "
                            "it with `qcowfs check --repair`")
        for snap in self.snapshots:
            problem = snapshot_problem(snap, h.version, self.geo.cluster_size, self.file.known_size)
            if problem and not problem[1] and not self.options.repair:
                # Its L2 tables cannot be protected from our writes (QEMU's
                # inactive-L2 overlap check fails the same way). A repair
                # drops the entry before it writes anything else (mend_snapshots).
                raise CorruptionError(f"{problem[0]}: the image can only be opened read-only")
        for bm in self.bitmaps:
            if bm.damaged and not self.options.repair:  # (a repair mends it first: mend_bitmaps)
                # QEMU refuses to open such an image at all ("doesn't satisfy the
                # constraints"); writing to it could only make that worse.
                raise CorruptionError(f"bitmap '{bm.name}' is damaged ({bm.problem}): the image can "
                                      "only be opened read-only")
        lock_image(self.file.fd, self.path, writer=True)
        if self.data_file is not None:
            lock_image(self.data_file.fd, self.data_file.path, writer=True)
        build_overlap_map(self.meta)
        cs = self.geo.cluster_size
        for bm in self.bitmaps:
            hit = next((off for off in data_clusters(bm) if self.meta.overlap.kinds_at(off, cs)), None)
            if hit is not None and not self.options.repair:
                # (Storing it at close would free "its" clusters: they are metadata.)
                raise CorruptionError(f"bitmap '{bm.name}' has a data cluster at {hit:#x} on metadata: the "
                                      "image can only be opened read-only")
        alloc = self.reload_refcounts()
        self.writer = Writer(self.geo, self.mapper, self.meta, alloc, lambda: self.backing)
        self._flush_lock = Lock()

    @property
    def warnings(self) -> list[str]:
        """One line for each thing a read-only open left out or salvaged."""
        return self.left_out + self.salvaged

    @property
    def header(self) -> Header:
        """The current header (owned by self.meta; read only)."""
        return self.meta.header

    @property
    def snapshots(self) -> list[SnapshotEntry]:
        return self.meta.snapshots

    @property
    def active_l1(self) -> L1Table:
        return self.meta.active_l1

    @property
    def external_data(self) -> bool:
        return self.data_file is not None

    def reload_refcounts(self) -> Allocator:
        """(Re)read the refcount table named by the header, with empty caches."""
        from .refcount import Allocator
        alloc = self.allocator = Allocator(self.meta)
        self.l2_cache.clear()
        self.l2_cache.depends_on = alloc.cache
        if self.writer is not None:
            self.writer.alloc = alloc
        return alloc

    def _optional(self, what: str, shown: str, read: Callable[[], list[T]]) -> list[T]:
        try:
            return read()
        except TruncatedError as e:
            if not self.read_only:
                raise
            self.salvaged.append(f"{e}: {shown} are not shown")
            return []
        except InvalidImageError as e:
            if not self.read_only:
                raise
            self.left_out.append(f"the {what} is damaged ({e}): {shown} are not shown")
            return []

    @property
    def encryption(self) -> str | None:
        """How the image is encrypted (CRYPT_NAMES), or None."""
        return CRYPT_NAMES.get(self.header.crypt_method)

    # ---- reading ------------------------------------------------------------

    @property
    def size(self) -> int:
        """The virtual size as QEMU presents it: whole 512-byte sectors."""
        return self.meta.disk_size

    def host_usage(self) -> int:
        """Host bytes the image (and its data file) occupy: the st_blocks of
        its disk files, so that du and cp's sparse-file test (st_blocks
        below st_size: then cp seeks for holes) see a sparse disk."""
        files = [self.file] + ([self.data_file] if self.data_file is not None else [])
        return sum(os.fstat(f.fd).st_blocks * 512 for f in files)

    @property
    def data_file_raw(self) -> bool:
        return bool(self.header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW)

    async def _load_l2(self, offset: int) -> Table:
        raw = await self.file.read(offset, self.geo.cluster_size)
        if len(raw) < self.geo.cluster_size:
            if not self.read_only:
                raise InvalidImageError(f"L2 table at {offset:#x} runs past the end of the image file")
            raw = raw.ljust(self.geo.cluster_size, b"\0")  # (salvage: zeros, as QEMU reads them)
        table = decode_table(raw)
        if self.allocator is not None and not self.external_data:
            # (A writable image: the allocator has imported numpy already.)
            from ..format.bulk import compressed_host_offsets, data_host_offsets, l2_words
            words = l2_words(table, self.geo.extended_l2)
            self.allocator.note_references(data_host_offsets(words))
            self.allocator.note_references(compressed_host_offsets(words, self.geo.cluster_bits), data=False)
        return table

    def _write_l2(self, offset: int, data: bytes) -> None:
        self.meta.write(offset, data, "L2 table", ignore=Kind.ACTIVE_L2)

    def resolve(self, offset: int, length: int, out: list[Piece], lookup: Lookup) -> None:
        """The active disk as a Source (this image as a backing file): its pieces."""
        chain.resolve(self.mapper, self.active_l1, self.backing, offset, length, out, lookup)

    def _walk(self, l1: L1Table) -> chain.Walk:
        """The pieces of the disk L1 maps, through this image and the chain below."""
        return functools.partial(chain.resolve, self.mapper, l1, self.backing)

    async def read_into(self, buf: memoryview, offset: int) -> None:
        """The active disk as a Source (zeros past its end)."""
        await chain.read(functools.partial(chain.below, self), buf, offset)

    async def read(self, l1: L1Table, offset: int, length: int) -> bytearray:
        """LENGTH bytes of the disk L1 maps (the active one or a snapshot's) at OFFSET."""
        buf = bytearray(length)
        await self.read_disk_into(l1, memoryview(buf), offset)
        return buf

    @signals_corruption
    async def read_disk_into(self, l1: L1Table, buf: memoryview, offset: int) -> None:
        """Fill BUF with the disk L1 maps (the active one or a snapshot's) from OFFSET."""
        if self.options.force_share:
            await self._read_shared(l1, buf, offset)
        else:
            await chain.read(self._walk(l1), buf, offset)

    def read_nowait(self, l1: L1Table, buf: memoryview, offset: int) -> bool:
        """read_disk_into without a single await, when every table it needs
        through the chain is cached and every byte is in the host page
        cache (one pread per piece); False: call read_disk_into. The plain
        case, one host-contiguous run of this image's data, is looked up
        first without walking the chain."""
        return (self.mapper.read_cached_into(l1, buf, offset)
                or chain.read_nowait(self._walk(l1), buf, offset))

    def cheap_span(self, l1: L1Table, offset: int, lo: int, hi: int) -> Span | None:
        """The part of [LO, HI) around OFFSET of the disk L1 maps that reads
        as plain pieces from cached tables (see chain.cheap_span)."""
        return chain.cheap_span(self._walk(l1), offset, lo, hi)

    # ---- force_share: an image another program writes -------------------------------

    async def _read_shared(self, l1: L1Table, buf: memoryview, offset: int) -> None:
        """A read of a force-shared image: refused once the writer moved the
        tables it goes through; a table that looks inconsistent (caught
        mid-update, or pointing past the end we knew) is read afresh once."""
        moved = self.disk_moved if l1 is self.active_l1 else self.snapshots_moved
        if moved is not None:
            raise CorruptionError(f"{moved}: remount to follow it")
        try:
            await chain.read(self._walk(l1), buf, offset)
        except CorruptionError:
            await self.revalidate()
            l1.forget()
            await chain.read(self._walk(l1), buf, offset)

    async def revalidate(self) -> None:
        """force_share: drop every table read so far (L2 tables, the active
        L1's entries, decompressed clusters; snapshot views drop their L1s on
        the epoch change), take the file's size as it is now, and re-read the
        header: if the writer moved the active L1 table or resized the disk,
        or changed the snapshot table, reads through the old ones are refused
        from then on (their clusters may have been freed and reused)."""
        self.file.refresh_size()
        # (The fields compared live in the first bytes; 64K holds any usual
        # extension area without reading a whole 2M cluster ten times a second.)
        raw = await self.file.read(0, min(self.geo.cluster_size, 65536))
        try:
            h = Header.parse(raw)
        except (QcowError, ValueError) as e:  # caught mid-write: try at the next round
            log.debug("%s: header unreadable while revalidating: %s", self.path, e)
            h = self.header
        old = self.header
        if self.disk_moved is None and (h.l1_table_offset, h.l1_size, h.size) != (
                old.l1_table_offset, old.l1_size, old.size):
            self.disk_moved = "the writer of the image moved its L1 table or resized the disk"
            log.warning("%s: %s: disk.raw reads fail from now on (remount)", self.path, self.disk_moved)
        if self.snapshots_moved is None and (h.snapshots_offset, h.nb_snapshots) != (
                old.snapshots_offset, old.nb_snapshots):
            self.snapshots_moved = "the writer of the image changed its snapshot table"
            log.warning("%s: %s: snapshot reads fail from now on (remount)", self.path,
                        self.snapshots_moved)
        self.l2_cache.clear()
        self.active_l1.forget()
        self.mapper.forget()
        self.tables_epoch += 1

    async def seek(self, offset: int, end: int, data: bool) -> int:
        """The active disk as a Source: its data and holes (see Mapper.seek)."""
        stop = min(end, self.size)
        if offset >= stop:
            return end if data else offset
        found = await chain.seek(self.mapper, self.active_l1, offset, stop, data, self.backing)
        return end if found == stop and data else found

    @signals_corruption
    async def find(self, l1: L1Table, offset: int, size: int, data: bool) -> int:
        """lseek(SEEK_DATA / SEEK_HOLE) of a disk of SIZE bytes through L1:
        the first data (DATA) or hole at or after OFFSET, SIZE if none."""
        return await chain.seek(self.mapper, l1, offset, size, data, self.backing)

    def chain(self) -> list[tuple[str, str]]:
        """(path, format) of this image and every image below it."""
        out = [(self.path, "qcow2")]
        if self.backing is not None:
            out += self.backing.chain()  # type: ignore[attr-defined]
        return out

    def files(self) -> list[str]:
        """Every host file the disk is read from or written to: this image,
        its external data file, and the files of the backing chain below."""
        out = [self.path] + ([self.data_file.path] if self.data_file is not None else [])
        if isinstance(self.backing, Image):
            out += self.backing.files()
        elif self.backing is not None:
            out += [p for p, _ in self.backing.chain()]  # type: ignore[attr-defined]
        return out

    # ---- close --------------------------------------------------------------

    # ---- writing --------------------------------------------------------------

    def _check_writable(self) -> Writer:
        """The one guard of every change: ReadOnlyError (EROFS) on an image
        opened read-only, CorruptionError (EIO) once it is marked corrupt."""
        if self.corrupt:
            raise CorruptionError("the image is marked corrupt; changes are refused")
        if self.writer is None:
            raise ReadOnlyError("the image is open read-only")
        return self.writer

    async def prepare_writes(self) -> None:
        """Before the first change: rebuild refcounts of a dirty image, drop
        unknown autoclear bits (their meaning is lost once we write), mark
        tracked bitmaps in use. Once; every change calls it first, so none
        can skip it (`qcowfs.open(..., "r+")` calls it at open)."""
        if self._prepared:
            return
        self._check_writable()
        self._prepared = True
        if self.header.incompatible_features & INCOMPAT_DIRTY:
            log.info("%s has the dirty bit set: rebuilding refcounts", self.path)
            await self.rebuild_refcounts()
            await self.meta.update(incompatible_features=lambda bits: bits & ~INCOMPAT_DIRTY)
        if self.header.autoclear_features & ~AUTOCLEAR_KNOWN:
            await self.meta.update(autoclear_features=lambda bits: bits & AUTOCLEAR_KNOWN)
        await start_tracking(self.meta, self.bitmaps)
        for bm in self.bitmaps:
            if bm.problem is not None:
                log.warning("bitmap '%s' is not used: %s", bm.name, bm.problem)

    async def mend_snapshots(self) -> list[str]:
        """A repair's first change: the snapshot table without the entries
        whose L1 table cannot be read, and with the extra data v3 asks for
        (snapshot_ops.mend_table). What was done, one line each."""
        from . import snapshot_ops
        return await snapshot_ops.mend_table(self.meta)

    async def mend_bitmaps(self) -> list[str]:
        """A repair's change before the rebuild: bitmaps QEMU can open the
        image with (bitmap_ops.mend). What was done, one line each."""
        from . import bitmap_ops
        self.bitmaps, done = await bitmap_ops.mend(self.meta, self.bitmaps)
        return done

    async def rebuild_refcounts(self, progress: Callable[[float], None] | None = None) -> None:
        """A new refcount structure from the references (dirty image, repair)."""
        from .refcount import rebuild
        await rebuild(self.meta, self.external_data, progress, saturate=self.options.repair)
        self.reload_refcounts()

    @signals_corruption
    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Write DATA at guest OFFSET of the active disk (inside the disk)."""
        writer = self._check_writable()
        if self._prepared and writer.write_in_place(offset, data):
            self.written(offset, len(data))  # (one pwrite, no await: no cancel can cut it)
            return len(data)
        # A write runs to its end once it starts (a cancel is heard after
        # it): between taking clusters and pointing L2 at them, and between
        # changing data and marking the dirty bitmaps, a cancelled write would
        # leave leaked clusters or a bitmap that misses a change. (The
        # shield costs 6 us: the in-place overwrite above goes without it.)
        with shielded():
            if not self._prepared:
                await self.prepare_writes()
            if not writer.write_in_place(offset, data):
                await writer.write(offset, data)
            self.written(offset, len(data))
        return len(data)

    @signals_corruption
    async def write_compressed(self, offset: int, blobs: list[bytes]) -> None:
        """Store whole clusters from cluster-aligned OFFSET as compressed
        clusters (BLOBS: each one compressed; see Writer.write_compressed)."""
        writer = self._check_writable()
        with shielded():  # (see write)
            if not self._prepared:
                await self.prepare_writes()
            await writer.write_compressed(offset, blobs)
            self.written(offset, min(len(blobs) * self.geo.cluster_size, self.size - offset))

    def write_nowait(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        """write()'s fast path without awaiting: an overwrite of clusters this
        image alone owns (Writer.write_in_place). False: call write()."""
        if self.corrupt or self.writer is None or not self._prepared:
            return False
        try:
            if not self.writer.write_in_place(offset, data):
                return False
        except CorruptionError:
            return False  # write() meets it again, and signals it
        self.written(offset, len(data))
        return True

    @signals_corruption
    async def zero(self, offset: int, length: int, unmap: bool) -> None:
        """Make [offset, offset+length) of the disk read as zeros, without data
        clusters where the format allows: UNMAP (discard, PUNCH_HOLE) frees
        the host clusters, else (ZERO_RANGE) owned ones stay preallocated.
        Dirty bitmaps count it as written. See Writer.zero."""
        writer = self._check_writable()
        with shielded():  # (see write)
            await self.prepare_writes()
            length = min(length, self.size - offset)
            if length <= 0:
                return
            await writer.zero(offset, length, unmap, self.size)
            self.written(offset, length)

    def written(self, offset: int, length: int) -> None:
        """Live dirty tracking: bits are set before the write is acknowledged."""
        self._changed = True
        for bm in self.bitmaps:
            if bm.bits is not None:
                bm.mark(offset, length)

    async def signal_corruption(self, why: CorruptionError) -> NoReturn:
        """Stop writing through metadata that failed a check, and say so in the
        image (QEMU's qcow2_signal_corruption). A read-only image is left as
        it is: the error fails the request, nothing more. Raises WHY, or when
        this call marked the image, an error that says so too (the one line a
        command prints; a mount logs it where it fails the request)."""
        if self.corrupt or self.writer is None:
            raise why
        self.corrupt = True
        log.info("%s: corruption found while writing (%s): the image is marked corrupt", self.path, why)
        await self._keep_acknowledged()
        marked = "the image is marked corrupt and takes no more writes"
        if self.header.version >= 3:
            await self.meta.update(incompatible_features=lambda bits: bits | INCOMPAT_CORRUPT)
        else:
            marked = "no more writes go through this open (a version 2 image has no corrupt bit)"
        raise CorruptionError(f"{self.path}: corruption found while writing ({why}): {marked}") from why

    async def _keep_acknowledged(self) -> None:
        """Before the image is marked corrupt, what writes acknowledged so far
        changed is made durable: their data is in place already, their L2
        entries and refcount increases wait in the caches (each was checked
        when it was made). A write acknowledged and not yet fsync'd must not
        be lost because a later one met damage: QEMU would find it after a
        flush, so it must find it after this. Refcount decreases are dropped
        (at worst a leak, never a reference to a free cluster). Whatever
        cannot be written now is logged; the corrupt bit still follows."""
        alloc = self.allocator
        if alloc is None:
            return
        alloc.forget_pending()
        try:
            async with self._flush_lock:
                await self.l2_cache.flush()
                await alloc.flush()
                await self.file.sync()
                if self.data_file is not None:
                    await self.data_file.sync()
        except (QcowError, OSError) as e:
            log.error("%s: what was written before could not all be flushed: %s", self.path, e)
            self._unflushed = str(e)  # (every later flush fails: no fsync may say it is there)

    @signals_corruption
    async def flush(self) -> None:
        """Data, refcount increases, fsync, L2 tables, fsync, refcount decreases.
        (Nothing on a read-only image, nor on one marked corrupt.)"""
        if self.corrupt and self._unflushed is not None:
            raise CorruptionError(f"the image is marked corrupt, and what was written before could not "
                                  f"all be flushed ({self._unflushed})")
        if self.allocator is None or self.corrupt:
            return
        async with self._flush_lock:
            alloc = self.allocator
            assert alloc is not None
            # Runs to its end once started (bounded: the caches and two
            # fsyncs): the decreases held aside here, or taken by
            # apply_pending, would be lost to a cancel in between (leaked clusters).
            with shielded():
                pending, alloc.pending = alloc.pending, []
                await self.l2_cache.flush()
                await alloc.flush()
                await self.file.sync()
                if pending:
                    alloc.pending[:0] = pending
                    await alloc.apply_pending()
                    await alloc.flush()
                    await self.file.sync()
                if self.data_file is not None:
                    await self.data_file.sync()

    # ---- metadata operations while the disk is in use ----------------------------------

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[Allocator]:
        """Hold the image for a metadata operation at one instant: writes in
        flight are drained, new ones wait (the in-place fast path too), and
        every cache is flushed. A corruption found on the way marks the
        image corrupt, as a write's would."""
        writer = self._check_writable()
        await self.prepare_writes()
        async with writer.lock:
            writer.frozen = True
            try:
                await self.flush()
                assert self.allocator is not None  # a writer has one
                yield self.allocator
            except CorruptionError as e:
                await self.signal_corruption(e)
            finally:
                writer.frozen = False

    async def create_snapshot(self, name: str) -> SnapshotEntry:
        """Internal snapshot NAME of the disk as it is at this instant."""
        from . import snapshot_ops
        async with self.exclusive() as alloc:
            return await snapshot_ops.create(self.meta, alloc, self.l2_cache, name)

    async def delete_snapshot(self, name: str) -> None:
        from . import snapshot_ops
        async with self.exclusive() as alloc:
            await snapshot_ops.delete(self.meta, alloc, self.l2_cache, find_snapshot(self.meta.snapshots, name))

    async def apply_snapshot(self, name: str) -> None:
        """The active disk becomes snapshot NAME's (its content and its size),
        as `qemu-img snapshot -a` (NAME: an id, else a name, as it takes them).
        Refused, as QEMU refuses it, while the image has persistent bitmaps
        (they would no longer describe the disk)."""
        from . import snapshot_ops
        self._check_writable()
        index = find_snapshot(self.meta.snapshots, name, BY_ID)
        if self.bitmaps:
            raise RequestError("the image has persistent bitmaps: a snapshot cannot be applied while "
                               "it has any (as in QEMU; remove them first)")
        async with self.exclusive() as alloc:
            await snapshot_ops.apply(self.meta, alloc, self.l2_cache, index)
            self.mapper.forget()

    async def make_empty(self) -> None:
        """Drop every cluster of the active disk (QEMU's bdrv_make_empty, as
        after qemu-img commit): it reads its backing file everywhere again.
        One commit: a new empty L1 table, the old tables and data lose the
        active disk's reference."""
        from . import snapshot_ops
        async with self.exclusive() as alloc:
            await snapshot_ops.empty(self.meta, alloc, self.l2_cache)
            self.mapper.forget()

    async def set_backing(self, name: str | None, fmt: str | None) -> None:
        """Point the image at backing file NAME of format FMT (None: no backing
        file), in one header write after everything written so far is
        durable (qemu-img rebase's last step). The backing file opened now
        is not changed: callers close the image after this."""
        self._check_writable()
        await self.prepare_writes()
        await self.flush()
        ext = fmt.encode() if name is not None and fmt is not None else None
        await self.meta.update(backing_file=name, backing_file_offset=0, backing_file_size=0,
                               extensions=lambda exts: with_extension(exts, EXT_BACKING_FORMAT, ext))

    async def add_bitmap(self, name: str, granularity: int | None = None, enabled: bool = True) -> None:
        """A new persistent bitmap; enabled, it tracks writes from this instant."""
        from . import bitmap_ops
        from .refcount import Transaction
        async with self.exclusive() as alloc, Transaction(alloc) as txn:
            plans = await bitmap_ops.plan_add(self.meta, self.bitmaps, name, granularity, enabled)
            await bitmap_ops.stage(self.meta, txn, plans, [], self._adopt_bitmaps)
            await txn.commit()

    async def copy_bitmaps(self, copies: list[tuple[Bitmap, bytes]]) -> None:
        """New bitmaps copied from another image's: for each (SOURCE, BITS),
        SOURCE's name, granularity and enabled state, BITS its bits; all in
        one commit (bitmap_ops.plan_copies)."""
        from . import bitmap_ops
        from .refcount import Transaction
        async with self.exclusive() as alloc, Transaction(alloc) as txn:
            plans = bitmap_ops.plan_copies(self.meta, self.bitmaps, copies)
            await bitmap_ops.stage(self.meta, txn, plans, [], self._adopt_bitmaps)
            await txn.commit()

    async def change_bitmap(self, name: str, action: str, sources: list[str] | None = None,
                            external: list[tuple[Bitmap, bytes]] | None = None) -> None:
        """remove, clear, enable, disable, or merge SOURCES (and EXTERNAL:
        another image's bitmaps, with their bits) into bitmap NAME."""
        from . import bitmap_ops
        from .refcount import Transaction
        async with self.exclusive() as alloc, Transaction(alloc) as txn:
            plans, removed = await bitmap_ops.plan_change(self.meta, self.bitmaps, name, action, sources or [],
                                                          external or [])
            await bitmap_ops.stage(self.meta, txn, plans, removed, self._adopt_bitmaps)
            await txn.commit()

    async def checkpoint(self, name: str) -> SnapshotEntry:
        """In one commit at one instant: internal snapshot NAME, a frozen copy
        B@NAME of every tracked bitmap B, and a new tracked bitmap NAME."""
        from . import bitmap_ops, snapshot_ops
        from .refcount import Transaction
        async with self.exclusive() as alloc, Transaction(alloc) as txn:
            plans = bitmap_ops.plan_checkpoint(self.meta, self.bitmaps, name)
            entry = await snapshot_ops.stage_create(self.meta, self.l2_cache, txn, name)
            await bitmap_ops.stage(self.meta, txn, plans, [], self._adopt_bitmaps)
            await txn.commit()
        return entry

    def _adopt_bitmaps(self, bitmaps: list[Bitmap]) -> None:
        self.bitmaps = bitmaps
        self._changed = True  # tracked bits are stored at close

    def check_resize(self, new_size: int, version: int | None = None) -> None:
        """What a resize to NEW_SIZE would refuse, before anything is touched
        (VERSION: the image's by then, where an amend upgrades it first)."""
        from .resize import check_resize
        check_resize(self.meta, self.bitmaps, new_size, self.backing.size if self.backing is not None else 0,
                     version)

    def check_refcount_width(self, bits: int) -> None:
        """What change_refcount_width(BITS) would refuse, before anything is touched."""
        from .refcount.rebuild import check_width
        check_width(self.meta, bits.bit_length() - 1)

    async def change_refcount_width(self, bits: int) -> None:
        """Refcounts of BITS bits each (qemu-img amend -o refcount_bits=):
        a new refcount structure of that width, counted from the references
        and switched to in one header write (refcount.rebuild); refused
        before anything is written where a cluster has more references than
        the width can count."""
        from .refcount import rebuild
        async with self.exclusive():
            await rebuild(self.meta, self.external_data, order=bits.bit_length() - 1)
        self.reload_refcounts()

    @signals_corruption
    async def resize(self, new_size: int) -> None:
        """Grow or shrink the virtual disk to NEW_SIZE (see resize.py: one
        commit; what lies past a smaller end is dropped and its clusters
        freed; persistent bitmaps follow). The area a grow adds reads zeros,
        even where a larger backing file or the tail of the last cluster (an
        earlier shrink's, a smaller snapshot's) has data: that tail is
        zeroed first (past the end, nobody sees it), the rest in the commit."""
        from .refcount import Transaction
        from .resize import check_resize, stage_resize
        writer = self._check_writable()
        backing_size = self.backing.size if self.backing is not None else 0
        check_resize(self.meta, self.bitmaps, new_size, backing_size)
        if new_size == self.header.size:
            return
        old_size = self.size
        await self.prepare_writes()
        raw_data = self.data_file if self.data_file_raw else None
        # (An encrypted one's data file holds ciphertext: zeros there decrypt
        # to noise, so its grown area stays unallocated, reading zeros; QEMU
        # maps it too, and shows the noise.)
        grow_raw = raw_data if raw_data is not None and self.header.crypt_method == CRYPT_NONE \
            and new_size > old_size else None
        tail_end = min(new_size, -(-old_size // self.geo.cluster_size) * self.geo.cluster_size)
        if grow_raw is not None:
            # A data_file_raw image reads its data file 1:1: cut there, the
            # tail of the last cluster and the grown area read zeros (what a
            # longer data file held past the old end nobody saw), with no
            # change to the tables (as QEMU leaves them).
            await in_thread(os.ftruncate, grow_raw.fd, old_size)
        elif tail_end > old_size:
            await writer.zero(old_size, tail_end - old_size, False, tail_end)
        async with self.exclusive() as alloc, Transaction(alloc) as txn:
            await stage_resize(self.meta, self.l2_cache, txn, self.bitmaps, new_size, backing_size,
                               self._adopt_bitmaps)
            await txn.commit()
        self.mapper.forget()
        if raw_data is not None:
            await in_thread(os.ftruncate, raw_data.fd, new_size)
            raw_data.refresh_size()
            if grow_raw is not None:
                await writer.map_data_file_raw(old_size, new_size)

    async def close(self) -> None:
        log.debug("%s: %d reads from the page cache, %d in a worker thread; L2 cache %d hits, "
                  "%d misses", self.path, self.file.cached_reads, self.file.thread_reads,
                  self.l2_cache.hits, self.l2_cache.misses)
        try:
            if self.writer is not None:
                try:
                    await self.flush()
                    if not self.corrupt:
                        assert self.allocator is not None  # a writer has one
                        await store_bitmaps(self.meta, self.allocator, self.bitmaps, self._changed)
                        await self.flush()
                finally:
                    self.writer = None
        finally:
            if self.backing is not None:
                await self.backing.close()  # type: ignore[attr-defined]
                self.backing = None
            self._close_files()

    def _close_files(self) -> None:
        if self.data_file is not None:
            self.data_file.close()
        self.file.close()
