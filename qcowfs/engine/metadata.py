"""The one owner of on-disk metadata state (QEMU's BDRVQcow2State).

Every header field and every pointer to a metadata structure (active L1
table, refcount table, snapshot table, bitmap directory) lives here once.
Other modules read it; a change goes through `update`, which builds the
whole header from memory and writes it (QEMU's qcow2_update_header), so a
later header write can never put back a stale pointer. (It once did:
refcount-table growth wrote its pointer by offset, and storing bitmaps at
unmount wrote the old one back over it.)

Every metadata write goes through `write`, which first asks the overlap map
whether the target holds another live structure; guest data writes ask
`check_data`. Either refusal is an OverlapError (a CorruptionError): the
image's owner then marks the image corrupt and stops writing.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

from ..errors import QcowError
from ..format import (EXT_FEATURE_TABLE, BitmapDirEntry, Geometry, Header, SnapshotEntry, wants_feature_table,
                     with_extension)
from ..host.hostfile import HostFile
from ..host.waiting import Lock, shielded
from .mapper import L1Table
from .overlap import Kind, OverlapMap


class Metadata:
    """Header, table pointers, snapshot list, bitmap directory and the
    overlap map of one open image."""

    def __init__(self, file: HostFile, header: Header, geo: Geometry, salvage: bool = False) -> None:
        self.file = file
        # A read-only open of a truncated file: its active L1 table reads zeros
        # past the end of the file, as QEMU reads it.
        self.salvage = salvage
        self.geo = geo
        self._header = header
        self.disk_size = _disk_size(header)
        self.overlap = OverlapMap(geo.cluster_bits)
        # check_data(host, length): guest data never lands on metadata (image
        # file only). A partial, not a method: it runs on every data write.
        self.check_data: Callable[[int, int], None] = functools.partial(self.overlap.check, what="guest data")
        self.snapshots: list[SnapshotEntry] = []
        # The bitmap directory as stored (the tracking state of each bitmap
        # lives in bitmaps.Bitmap, which refers to these entries).
        self.bitmap_directory: list[BitmapDirEntry] = []
        self.active_l1 = self._l1_for(header)
        self._update_lock = Lock()

    @property
    def header(self) -> Header:
        """The current header (read it; change it only through update())."""
        return self._header

    def _l1_for(self, h: Header) -> L1Table:
        return L1Table(self.file, h.l1_table_offset, h.l1_size, self._write_l1_entry, pad=self.salvage)

    def _write_l1_entry(self, offset: int, data: bytes) -> None:
        self.write(offset, data, "active L1 entry", ignore=Kind.ACTIVE_L1)

    # ---- the header -------------------------------------------------------------

    def header_with(self, snapshots: list[SnapshotEntry] | None = None,
                    bitmap_directory: list[BitmapDirEntry] | None = None, **fields: Any) -> Header:
        """The header `update(**FIELDS)` writes (a value may be a function of
        the current one; the tables update takes beside them change none of
        its bytes), checked to fit in the first cluster, so that a change
        can ask before it writes anything. As QEMU's qcow2_update_header, a
        header of clusters of 4 KiB or less carries no feature name table
        (an older qcowfs wrote one wherever it fitted: it would keep a
        bitmaps extension out)."""
        old = self._header
        values = {k: v(getattr(old, k)) if callable(v) else v for k, v in fields.items()}
        values.setdefault("extensions", list(old.extensions))
        new = dataclasses.replace(old, **values)
        if not wants_feature_table(new.version, new.cluster_size):
            new.extensions = with_extension(new.extensions, EXT_FEATURE_TABLE, None)
        if (n := len(new.pack())) > self.geo.cluster_size:
            raise QcowError(f"the header would take {n} bytes, more than its cluster ({self.geo.cluster_size} "
                            "bytes): nothing was changed (a shorter backing file name makes room)")
        return new

    async def update(self, snapshots: list[SnapshotEntry] | None = None,
                     bitmap_directory: list[BitmapDirEntry] | None = None, **fields: Any) -> None:
        """Change header fields: the whole header is packed from memory, written
        in one pwrite and fsync'd; memory switches once that is done
        (SNAPSHOTS, BITMAP_DIRECTORY: the lists the new header's tables hold).

        A value may be a function of the current one (feature bits:
        `incompatible_features=lambda bits: bits | INCOMPAT_CORRUPT`).
        Callers put what the new values point to on disk (and fsync) first.
        Updates are serialised: one built from memory while another waits for
        its fsync would write the other's change back out."""
        async with self._update_lock:
            old = self._header
            new = self.header_with(**fields)
            self.file.write_sync(new.pack(), 0)
            # The file names the new structures from this write on (every
            # reader of the file sees it): memory follows at once, whatever
            # happens to the fsync (a cancelled caller, an I/O error), or the
            # next update would write the old header back over it.
            self._header = new
            self.disk_size = _disk_size(new)
            if (new.version, new.refcount_order) != (old.version, old.refcount_order):
                # (an amend: the refcounts' width, zero clusters; whoever reads
                # the geometry from here on gets the new one)
                self.geo = Geometry.from_header(new)
            if snapshots is not None:
                self.snapshots = snapshots
            if bitmap_directory is not None:
                self.bitmap_directory = bitmap_directory
            if (old.l1_table_offset, old.l1_size) != (new.l1_table_offset, new.l1_size):
                self.active_l1 = self._l1_for(new)
            with shielded():  # (bounded: a cancelled caller waits for it, and hears of it after)
                await self.file.sync()

    async def set_extension(self, ext_type: int, data: bytes | None) -> None:
        """Replace (None: drop) one header extension, through update()."""
        await self.update(extensions=lambda extensions: with_extension(extensions, ext_type, data))

    # ---- writes of metadata and data ---------------------------------------------------

    def write(self, offset: int, data: bytes | bytearray | memoryview, what: str,
              ignore: int = 0) -> None:
        """Write a metadata structure (or part of one) at OFFSET, after checking
        that it lands on nothing live but its own kind (IGNORE)."""
        self.overlap.check(offset, len(data), what, ignore)
        self.file.write_sync(data, offset)

    def add_structure(self, kind: Kind, offset: int, length: int) -> None:
        self.overlap.add(offset, length, kind)

    def add_structure_past_end(self, kind: Kind, offset: int, length: int) -> None:
        """A structure a damaged image places past the end of its file: nothing
        may be written there even once the file has grown that far."""
        self.overlap.add_far(offset, length, kind)

    def forget_past_end(self, kinds: Kind) -> None:
        """What structures of KINDS a damaged image places past the end of
        its file is nothing to keep (a rebuild replaces them all)."""
        self.overlap.forget_far(kinds)

    def drop_structure(self, kind: Kind, offset: int, length: int) -> None:
        self.overlap.remove(offset, length, kind)

    def replace_structures(self, kind: Kind, ranges: list[tuple[int, int]]) -> None:
        """All structures of KIND are now RANGES (after a rebuild)."""
        self.overlap.remove_kind(kind)
        for offset, length in ranges:
            self.overlap.add(offset, length, kind)


def _disk_size(header: Header) -> int:
    """The virtual size as QEMU presents it, whole 512-byte sectors: kept
    beside the header (Metadata.disk_size), since every read clips to it."""
    return header.size & ~511
