"""`qemu-img amend`: change the options of an existing image (QEMU's
qcow2_amend_options), in QEMU's order: upgrade first (what follows may need
version 3), then the LUKS key slots, the refcount width, the data file
options, lazy refcounts, the size, and a downgrade last (what it cannot
carry is removed before).

Every request is checked whole before anything is written, so a refusal
leaves the image exactly as it was (qemu-img checks some conditions only
when it gets there: an amend it refuses halfway has changed the image up to
that step). Each step is crash-safe on its own: new structures are written
and synced before the header names them.

What qcowfs does otherwise than qemu-img 7.2 (docs/design.md):
- a downgrade of an image with persistent bitmaps is refused (qemu-img
  writes a version 2 header beside the bitmap directory, whose clusters
  `qemu-img check` then calls leaked, and QEMU warns on every open);
- a downgrade checks every snapshot for zstd-compressed clusters, not only
  the active disk (a version 2 reader would read them as zlib);
- a downgrade of an encrypted image with zero clusters is refused (QEMU
  writes plain zeros into the host cluster, which then decrypt to noise);
- a key slot change is checked whole first, PBKDF2 included (the slots an
  old passphrase opens, the count of a new slot): qemu-img upgrades before
  it finds a wrong old passphrase; a new slot whose PBKDF2 count is past
  what OpenSSL derives (format/crypto.PBKDF2_MAX_ITERATIONS) is refused
  (engine/create.luks_iterations).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from ..errors import RequestError, UsageError
from ..format import (AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, COMPRESSION_ZLIB, COMPRESSION_ZSTD, CRYPT_NONE,
                      EXT_BACKING_FORMAT, EXT_BITMAPS, EXT_DATA_FILE, EXT_FEATURE_TABLE, INCOMPAT_COMPRESSION,
                      INCOMPAT_DIRTY, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO, V2_HEADER_LENGTH, V3_HEADER_LENGTH,
                      feature_table, wants_feature_table, with_extension)
from .overlap import Kind
from .references import L2Refs, walk

if TYPE_CHECKING:
    from ..format import Header, HeaderExtension
    from .opening import Passphrases
    from .image import Image
    from .keyslots import KeySlotChange
    from .refcount import Allocator

COMPAT_LEVELS = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
# qemu-img amend -o's options for qcow2 (QEMU's qcow2_amend_opts), with the
# kind of value each takes (as engine/create.py's OPTION_KINDS). The other
# creation options are refused: they can only be chosen at creation.
OPTION_KINDS: dict[str, str] = {
    "compat": "str", "size": "size", "backing_file": "str", "backing_fmt": "str", "data_file": "str",
    "data_file_raw": "bool", "lazy_refcounts": "bool", "refcount_bits": "int",
    "encrypt.state": "str", "encrypt.keyslot": "int", "encrypt.iter-time": "int",
}
MAX_V2_VM_STATE = (1 << 32) - 1


@dataclass
class AmendRequest:
    """What `qemu-img amend -o` asks; None: left as it is."""

    compat: str | None = None            # "0.10"/"v2" or "1.1"/"v3"
    lazy_refcounts: bool | None = None
    refcount_bits: int | None = None
    size: int | None = None              # exactly this virtual size (grow or shrink, as QEMU's amend)
    backing_file: str | None = None      # must be what the image says (QEMU: rebase changes it)
    backing_fmt: str | None = None
    data_file: str | None = None         # a new name for the external data file
    data_file_raw: bool | None = None    # can only be switched off
    keys: KeySlotChange | None = None    # LUKS key slots (engine/keyslots.py)

    def version(self, current: int) -> int:
        if self.compat is None:
            return current
        if self.compat not in COMPAT_LEVELS:
            raise UsageError(f"unknown compatibility level {self.compat} (0.10 or 1.1)")
        return COMPAT_LEVELS[self.compat]


def check_request(image: Image, req: AmendRequest) -> int:
    """Everything qemu-img refuses (and what qcowfs refuses besides), before
    anything is written; the version the image ends with."""
    h = image.header
    version = req.version(h.version)
    bits = req.refcount_bits if req.refcount_bits is not None else h.refcount_bits
    if bits <= 0 or bits > 64 or bits & (bits - 1):
        raise UsageError("refcount_bits: the width must be a power of two and may not exceed 64 bits")
    if version < 3 and bits != 16:
        raise UsageError(f"refcount widths other than 16 bits need compat=1.1 (refcount_bits={bits})")
    if bits < h.refcount_bits:
        image.check_refcount_width(bits)
    if req.data_file is not None and not h.external_data:
        raise UsageError("data_file can only be set for images that use an external data file")
    if req.data_file == "":
        # (QEMU takes "" and leaves an image that opens only with a data file
        # given at each open, which qcowfs has no option for)
        raise UsageError("data_file cannot be emptied: the image needs its data file")
    if req.data_file_raw and not image.data_file_raw:
        raise UsageError("data_file_raw cannot be set on existing images")
    if req.backing_file is not None or req.backing_fmt is not None:
        raw = h.extension(EXT_BACKING_FORMAT)
        fmt = raw.decode("utf-8", "replace") if raw is not None else None
        if req.backing_file != h.backing_file or req.backing_fmt != fmt:
            raise UsageError("the backing file cannot be amended: use `qcowfs rebase` (-u only changes the "
                             "name) instead")
    if req.lazy_refcounts and version < 3:
        raise UsageError("lazy refcounts need compat=1.1")
    if req.keys is not None:
        if h.crypt_method == CRYPT_NONE:
            raise UsageError("the encryption options cannot be amended: the image is not encrypted")
        if image.luks is None:
            raise UsageError("only LUKS encryption options can be amended")
    if req.size is not None:
        image.check_resize(req.size, max(version, h.version))  # (an upgrade comes first, a downgrade last)
    if req.keys is not None:
        from .keyslots import check_change
        check_change(image, req.keys)
    if version < h.version:
        _check_downgrade(image, bits, req.size if req.size is not None else h.size)
    return version


def _check_downgrade(image: Image, bits: int, size: int) -> None:
    """QEMU's qcow2_downgrade refusals, and qcowfs's own (the module's docstring)."""
    h = image.header
    if bits != 16:
        raise UsageError("compat=0.10 requires refcount_bits=16")
    if h.external_data:
        raise RequestError("an image with an external data file cannot be downgraded (compat=0.10 has none)")
    for s in image.snapshots:
        if s.state_size > MAX_V2_VM_STATE or (s.disk_size is not None and s.disk_size != size):
            raise RequestError(f"snapshot '{s.name}' prevents the downgrade (its disk size or VM state size "
                               "cannot be said in version 2), as in QEMU")
    other = h.incompatible_features & ~(INCOMPAT_COMPRESSION | INCOMPAT_DIRTY)
    if other:
        raise RequestError(f"an image with incompatible features {other:#x} set cannot be downgraded "
                           f"({', '.join(n for (t, b), n in h.feature_names().items() if t == 0 and other >> b & 1)})")
    if image.bitmaps or h.extension(EXT_BITMAPS) is not None:
        raise RequestError("an image with persistent bitmaps cannot be downgraded (compat=0.10 has none): "
                           "remove them first (qcowfs bitmap remove)")


async def _downgrade_scan(image: Image) -> None:
    """The refusals a downgrade can only find in the tables: zstd-compressed
    clusters anywhere (active disk or snapshots), zero clusters in an
    encrypted image."""
    h = image.header
    zstd = h.compression_type == COMPRESSION_ZSTD
    encrypted = h.crypt_method != CRYPT_NONE
    if not (zstd or encrypted):
        return
    for table in _l2_tables(image):
        words = table.words
        if zstd and (words & np.uint64(OFLAG_COMPRESSED)).any():
            raise RequestError("an image with zstd compression and compressed clusters cannot be downgraded "
                               "(version 2 images know only zlib)")
        if encrypted and len(_zero_entries(words)):
            raise RequestError("an encrypted image with zero clusters cannot be downgraded (version 2 has no "
                               "zero clusters, and zeros written in their place would decrypt to noise)")


def _l2_tables(image: Image) -> Iterator[L2Refs]:
    """Every L2 table of the active disk and of the snapshots, once each
    (the references walker: its words, and how many L1 entries name it)."""
    for ref in walk(image.meta, refcount_structure=False):
        if isinstance(ref, L2Refs):
            yield ref


def _zero_entries(words: np.ndarray) -> list[int]:
    """The indexes of WORDS (entries of a standard L2 table) that are zero
    clusters (in a compressed cluster's entry bit 0 belongs to its offset)."""
    return np.flatnonzero((words & np.uint64(OFLAG_ZERO | OFLAG_COMPRESSED)) == np.uint64(OFLAG_ZERO)).tolist()


async def run(path: str, req: AmendRequest, passphrase: Passphrases | None) -> None:
    """Amend the image at PATH as REQ asks (see the module's docstring)."""
    from .image import Image
    from .opening import OpenOptions

    options = OpenOptions(read_only=False, passphrase=passphrase)
    image = Image(path, options)
    try:
        version = check_request(image, req)
        if version < image.header.version:
            await _downgrade_scan(image)
        await image.prepare_writes()
        if version > image.header.version:
            # (closed and opened again: what follows sees the new version's geometry)
            await upgrade(image)
            await image.close()
            image = Image(path, options)
            await image.prepare_writes()
        if req.keys is not None:
            from .keyslots import apply_change
            await apply_change(image, req.keys)
        if req.refcount_bits is not None and req.refcount_bits != image.header.refcount_bits:
            await image.change_refcount_width(req.refcount_bits)
        await set_features(image, req)
        if req.size is not None and req.size != image.header.size:
            await image.resize(req.size)
        if version < image.header.version:
            await downgrade(image)
    finally:
        await image.close()


async def upgrade(image: Image) -> None:
    """Version 2 to 3 (QEMU's qcow2_upgrade): snapshot entries get the extra
    data version 3 requires, the header gets its version 3 fields (no
    feature bits) and QEMU's feature name table; one commit."""
    from . import snapshot_ops
    from .refcount import Transaction

    async with image.exclusive() as alloc, Transaction(alloc) as txn:
        await snapshot_ops.stage_full_extra(image.meta, txn)
        txn.set(version=3, header_length=V3_HEADER_LENGTH, incompatible_features=0, compatible_features=0,
                autoclear_features=0, refcount_order=4, compression_type=COMPRESSION_ZLIB,
                extensions=lambda exts: _with_feature_table(image.header, exts))
        await txn.commit()


def _with_feature_table(h: Header, exts: list[HeaderExtension]) -> list[HeaderExtension]:
    """EXTS with QEMU's feature name table, where QEMU writes one (clusters
    over 4 KiB) and the first cluster has room for the version 3 header
    with it (as create leaves it out)."""
    if not wants_feature_table(3, h.cluster_size):
        return exts
    out = with_extension(exts, EXT_FEATURE_TABLE, feature_table().data)
    upgraded = dataclasses.replace(h, version=3, header_length=V3_HEADER_LENGTH, extensions=out)
    return out if len(upgraded.pack()) <= h.cluster_size else exts


async def downgrade(image: Image) -> None:
    """Version 3 to 2 (QEMU's qcow2_downgrade), once check_request allowed
    it and the image is clean (Image.prepare_writes): every zero cluster
    becomes what version 2 can say (expand_zero_clusters), then the header is
    written as version 2, without feature bits or the feature name table."""
    await _downgrade_scan(image)
    async with image.exclusive() as alloc:
        await _expand_zero_clusters(image, alloc)
    await image.meta.update(version=2, header_length=V2_HEADER_LENGTH, incompatible_features=0,
                            compatible_features=0, autoclear_features=0, compression_type=COMPRESSION_ZLIB,
                            extensions=lambda exts: with_extension(exts, EXT_FEATURE_TABLE, None))


async def _expand_zero_clusters(image: Image, alloc: Allocator) -> None:
    """QEMU's expand_zero_clusters_in_l1, over the L2 tables of the active
    disk and of every snapshot (each table once): a zero cluster without a
    host cluster becomes unallocated where nothing lies below (no backing
    file), else a new cluster of zeros (counted once for each table
    reference, COPIED where that is one); one with a host cluster has its
    cluster zeroed and keeps it. The new clusters' zeros and refcounts are on
    disk before the table that names them is written (a crash leaks at worst)."""
    meta, cs = image.meta, image.geo.cluster_size
    has_backing = image.header.backing_file is not None
    zeros = bytes(cs)
    for table in _l2_tables(image):
        l2_offset, words = table.offset, table.words
        hits = _zero_entries(words)
        if not hits:
            continue
        new = words.copy()
        refs = await alloc.get(l2_offset // cs)
        for i in hits:
            entry = int(words[i])
            host = entry & L2E_OFFSET_MASK
            if not host:
                if not has_backing:
                    new[i] = 0
                    continue
                host = await alloc.allocate(1)
                if refs > 1:
                    await alloc.change(host // cs, refs - 1)
                entry = host | (OFLAG_COPIED if refs == 1 else 0)
            meta.check_data(host, cs)
            image.file.write_sync(zeros, host)
            new[i] = entry & ~OFLAG_ZERO
        await alloc.flush()
        await image.file.sync()
        meta.write(l2_offset, new.astype(">u8").tobytes(), "L2 table", ignore=Kind.ACTIVE_L2 | Kind.INACTIVE_L2)
        image.l2_cache.discard(l2_offset)
    await image.file.sync()
    image.mapper.forget()


async def set_features(image: Image, req: AmendRequest) -> None:
    """The data file options and lazy refcounts: header fields alone, in one
    header write (lazy refcounts off needs a clean image first, which every
    write makes: Image.prepare_writes)."""
    h = image.header
    fields: dict[str, Any] = {}
    if req.data_file_raw is False and h.autoclear_features & AUTOCLEAR_DATA_FILE_RAW:
        fields["autoclear_features"] = h.autoclear_features & ~AUTOCLEAR_DATA_FILE_RAW
    if req.lazy_refcounts is not None and bool(h.compatible_features & COMPAT_LAZY_REFCOUNTS) != req.lazy_refcounts:
        fields["compatible_features"] = h.compatible_features ^ COMPAT_LAZY_REFCOUNTS
    if req.data_file is not None:
        name = req.data_file.encode()
        fields["extensions"] = lambda exts: with_extension(exts, EXT_DATA_FILE, name)
    if fields:
        await image.flush()
        await image.meta.update(**fields)
