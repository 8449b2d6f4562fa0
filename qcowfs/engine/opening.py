"""Opening an image: header validation, encryption, the snapshot table, the
external data file and the backing chain (QEMU's qcow2_do_open).

Everything that can be checked before serving a request is checked here, so a
bad image refuses to open with one clear line instead of failing later.
"""
from __future__ import annotations

import bisect
import functools
import itertools
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

from ..errors import InvalidImageError, QcowError, TruncatedError, UnsupportedFeatureError, UsageError
from ..format import (COMPRESSION_NAMES, CRYPT_AES, CRYPT_LUKS, CRYPT_NONE, EXT_BACKING_FORMAT, EXT_CRYPTO,
                      EXT_DATA_FILE, FEATURE_TYPE_INCOMPAT, INCOMPAT_COMPRESSION, INCOMPAT_KNOWN,
                      MAX_L1_BYTES, MAX_REFTABLE_BYTES, MAX_SNAPSHOTS, MAX_VIRTUAL_SIZE, QCOW_MAGIC,
                      CryptoHeaderExtension, Geometry, Header, SnapshotEntry, whole_sectors)
from ..host.hostfile import HostFile, same_file
from ..host.locking import lock_image
from . import DEFAULT_L2_CACHE_BYTES
from . import chain
from .chain import Lookup, Piece, Source
from .mapper import DATA, zero_fill
from .snapshots import too_much_extra

if TYPE_CHECKING:
    from ..format.crypto import DiskCipher, LuksVolume

MAX_CHAIN_DEPTH = 64
# The passphrases to try on the encrypted image at a path, in order, taken one
# at a time (`host.secret.Keyring`): each layer of a chain may have its own.
Passphrases = Callable[[str], Iterable[bytes]]
# QEMU's limit on the snapshot table (QCOW_MAX_SNAPSHOTS_SIZE).
MAX_SNAPSHOT_TABLE = 64 << 20
# The header bytes that hold the compression type (QEMU refuses the feature bit without them).
COMPRESSION_TYPE_END = 105
# Extended L2 entries need subclusters of at least 512 bytes.
MIN_EXTENDED_L2_CLUSTER_BITS = 14
# The largest offset a host file can have (off_t): tables past it are refused.
MAX_FILE_OFFSET = (1 << 63) - 1
_PROTOCOL = re.compile(r"^[A-Za-z][A-Za-z0-9.+-]*:")


@dataclass
class OpenOptions:
    """How an image is opened (the engine's side of `qcowfs.open`'s arguments)."""

    read_only: bool = True
    l2_cache_bytes: int = DEFAULT_L2_CACHE_BYTES
    # `qcowfs check --repair`: open a corrupt image for writing, to fix it.
    repair: bool = False
    # QEMU's -U / force-share=on: a read-only open that ignores other
    # programs' write locks (what it shows may change under it).
    force_share: bool = False
    # The passphrases of an encrypted image (and of encrypted backing files,
    # each of which may have its own), asked only when one is opened. None:
    # open the metadata only (info, check), guest data of an encrypted image
    # can then not be read.
    passphrase: Passphrases | None = None
    # False (info): a backing file that cannot be opened is a warning, and the
    # image opens alone (qemu-img info shows an image whose backing file is gone).
    backing_required: bool = True
    # QEMU's cache=unsafe: flushes of the image (and its data file) are
    # skipped. For a new image nothing else uses yet (qemu-img convert's
    # default): a crash of the host may tear it; a killed process does not.
    unsafe_cache: bool = False
    # False (commit, rebase -u): the backing file is not opened at all; the
    # image alone (its unallocated clusters read zeros). For tools that work
    # on one layer of a chain while holding other layers themselves.
    open_backing: bool = True


class RawSource:
    """A raw backing file: reads past its end are zeros."""

    def __init__(self, path: str, force_share: bool = False) -> None:
        self.path = path
        try:
            self.file = HostFile(path)
        except OSError as e:  # (a directory; a pipe, which cannot seek)
            raise QcowError.from_os(f"cannot read {path}", e) from None
        self.size = whole_sectors(self.file.known_size)  # (as QEMU sizes a raw file: the tail reads zeros)
        try:
            lock_image(self.file.fd, path, writer=False, force_share=force_share)
        except QcowError:
            self.file.close()
            raise

    def resolve(self, offset: int, length: int, out: list[Piece], lookup: Lookup) -> None:
        """Its pieces (chain.Source): data at the guest offset."""
        out.append((DATA, offset, length, offset, self))

    async def read_into(self, buf: memoryview, offset: int) -> None:
        await chain.read(functools.partial(chain.below, self), buf, offset)

    async def read_run(self, kind: int, dst: memoryview, guest: int, host: int) -> None:
        """A piece of this file (chain.Layer); the sector tail past its end reads zeros."""
        got = await self.file.read_into(dst, host)
        zero_fill(dst[got:])

    def read_run_nowait(self, kind: int, dst: memoryview, guest: int, host: int) -> bool:
        return self.file.read_nowait(dst, host) == len(dst)

    def cheap(self, kind: int, host: int) -> bool:
        return True

    inflate_batch = 0  # (a raw file has no compressed clusters)

    async def inflate_ahead(self, entries: list[int]) -> None:
        """(A raw file has no compressed clusters.)"""

    async def close(self) -> None:
        self.file.close()

    async def seek(self, offset: int, end: int, data: bool) -> int:
        """Data and holes as the host filesystem keeps them (SEEK_DATA/SEEK_HOLE);
        the sector tail past the file's end is a hole."""
        real = self.file.known_size
        if offset >= real:
            return end if data else offset
        found = self.file.seek(offset, data)
        return end if found is None else min(found, end)  # (None: no data after OFFSET)

    def chain(self) -> list[tuple[str, str]]:
        return [(self.path, "raw")]


def check_table(name: str, offset: int, length: int, cluster_size: int, file_size: int) -> list[str]:
    """Refuse a misplaced table; a table past the end of the file: one line to return."""
    if offset % cluster_size:
        raise InvalidImageError(f"{name} offset {offset:#x} is not cluster aligned")
    if offset < cluster_size:
        raise InvalidImageError(f"{name} overlaps the image header")
    if offset + length > MAX_FILE_OFFSET:  # (QEMU: "offset invalid")
        raise InvalidImageError(f"{name} offset {offset:#x} is invalid")
    if offset + length > file_size:
        return [f"{name} lies past the end of the image file"]
    return []


def resolve_backing(image_path: str, name: str) -> str:
    if name.startswith("json:"):
        raise UnsupportedFeatureError("backing file given as a json: specification is not supported")
    if _PROTOCOL.match(name):
        raise UnsupportedFeatureError(f"backing file '{name}' uses a protocol; only local files are supported")
    if not name:
        raise InvalidImageError("backing file name is empty")
    if "\0" in name:
        raise InvalidImageError("backing file name contains a NUL byte")
    return os.path.join(os.path.dirname(image_path), name)


def probe_format(path: str) -> str:
    """qemu-img's format probe among the formats qcowfs knows: qcow2 if
    PATH starts with the qcow2 magic, else raw. OSError if it cannot be
    read (each caller says what it was opening)."""
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == QCOW_MAGIC else "raw"


def backing_of(image_path: str, h: Header) -> tuple[str, str]:
    """(path, format) of the backing file that header H of IMAGE_PATH names:
    the format from its extension, else probed as QEMU probes it (OSError
    if that cannot read the file)."""
    assert h.backing_file is not None
    path = resolve_backing(image_path, h.backing_file)
    ext = h.extension(EXT_BACKING_FORMAT)
    fmt = ext.decode("utf-8", "replace") if ext is not None else probe_format(path)
    if fmt not in ("qcow2", "raw"):
        raise UnsupportedFeatureError(f"backing file format '{fmt}' is not supported")
    return path, fmt


def chain_files(path: str, fmt: str) -> list[str]:
    """PATH and the files of its backing chain, as their headers name them,
    read without opening the chain (no locks, no passphrases; what `-u`
    may still look at). The walk stops at a raw file, at a file that cannot
    be read or parsed (it is listed), at a loop and at MAX_CHAIN_DEPTH:
    it serves to refuse a change that would make a chain loop back."""
    out: list[str] = []
    while len(out) < MAX_CHAIN_DEPTH and not any(same_file(path, p) for p in out):
        out.append(path)
        if fmt != "qcow2":
            break
        try:
            with open(path, "rb") as f:
                h = Header.parse(f.read(1 << 21))
            if h.backing_file is None:
                break
            path, fmt = backing_of(path, h)
        except (OSError, QcowError):
            break
    return out


def refuse_loop(image_path: str, backing: str, backing_fmt: str) -> None:
    """Refuse to give IMAGE_PATH the backing file BACKING (a path): the
    image would be in its own backing chain, which no program can open
    (qemu-img refuses the first case only, by name)."""
    for f in chain_files(backing, backing_fmt):
        if same_file(f, image_path):
            how = "it is the image itself" if f == backing else f"its chain leads back through {f}"
            raise UsageError(f"{image_path} cannot be in its own backing chain: backing file "
                             f"{os.path.normpath(backing)}: {how}")


def validate_header(h: Header, geo: Geometry, file_size: int, repair: bool = False) -> list[str]:
    """Refuse a header whose fields QEMU would refuse (or that we cannot serve).
    What it names past the end of the file is not refused here but returned,
    one line each: QEMU reads zeros there, so a read-only open can salvage
    what is left (a truncated image), where a writable one must refuse.
    REPAIR (`check --repair`, which rebuilds the refcount structure): as
    QEMU's check opens it, a refcount table that is empty, on the header or
    past the end of the file is no reason to refuse the image."""
    truncated: list[str] = []
    cs = geo.cluster_size
    if h.crypt_method not in (CRYPT_NONE, CRYPT_AES, CRYPT_LUKS):
        raise UnsupportedFeatureError(f"the image is encrypted with an unknown method ({h.crypt_method})")
    unknown = h.incompatible_features & ~INCOMPAT_KNOWN
    if unknown:
        names = h.feature_names()
        feats = ", ".join(names.get((FEATURE_TYPE_INCOMPAT, b), f"unknown feature bit {b}")
                          for b in range(64) if unknown >> b & 1)
        raise UnsupportedFeatureError(f"image uses unsupported incompatible feature(s): {feats}")
    if h.compression_type not in COMPRESSION_NAMES:
        raise UnsupportedFeatureError(f"unknown compression type {h.compression_type}")
    if h.compression_type and not h.incompatible_features & INCOMPAT_COMPRESSION:
        raise InvalidImageError("compression type is set without its incompatible feature bit")
    if not h.compression_type and h.incompatible_features & INCOMPAT_COMPRESSION:
        raise InvalidImageError("the compression type feature bit is set for zlib, which must not have it")
    if h.incompatible_features & INCOMPAT_COMPRESSION and h.header_length < COMPRESSION_TYPE_END:
        raise InvalidImageError("the compression type feature bit is set, but the header has no "
                                "compression type field")
    if h.extended_l2 and geo.cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS:
        raise InvalidImageError("extended L2 entries need clusters of at least 16 KiB")
    if h.size > MAX_VIRTUAL_SIZE:
        raise InvalidImageError(f"virtual size {h.size} is too large")
    if h.l1_size * 8 > MAX_L1_BYTES:
        raise InvalidImageError(f"L1 table is too large ({h.l1_size} entries)")
    if h.l1_size < geo.l1_entries_needed(h.size):
        raise InvalidImageError("L1 table is too small for the virtual size")
    if h.l1_size:
        truncated += check_table("L1 table", h.l1_table_offset, h.l1_size * 8, cs, file_size)
    rt_bytes = h.refcount_table_clusters * cs
    if rt_bytes > MAX_REFTABLE_BYTES or not (h.refcount_table_clusters or repair):
        raise InvalidImageError(f"invalid refcount table size ({h.refcount_table_clusters} clusters)")
    if not repair:
        truncated += check_table("refcount table", h.refcount_table_offset, rt_bytes, cs, file_size)
    elif h.refcount_table_offset % cs or h.refcount_table_offset + rt_bytes > MAX_FILE_OFFSET:
        raise InvalidImageError(f"refcount table offset {h.refcount_table_offset:#x} is invalid")
    if h.nb_snapshots > MAX_SNAPSHOTS:
        raise InvalidImageError(f"too many snapshots ({h.nb_snapshots})")
    return truncated


def open_encryption(h: Header, geo: Geometry, file: HostFile, options: OpenOptions
                    ) -> tuple[LuksVolume | None, DiskCipher | None]:
    """The LUKS header (checked) and, given a passphrase, the data cipher.
    Legacy AES is read-only (QEMU's emulators no longer write it either)."""
    if h.crypt_method != CRYPT_LUKS and h.extension(EXT_CRYPTO) is not None:
        raise InvalidImageError("the image has an encryption header extension but is not LUKS-encrypted")
    if h.crypt_method == CRYPT_NONE:
        return None, None
    from ..format.crypto import LUKS_HEADER_SIZE, LuksVolume, legacy_aes_cipher  # (encrypted images only)
    if h.crypt_method == CRYPT_AES:
        if not options.read_only and not options.repair:
            raise UnsupportedFeatureError("images encrypted with legacy AES can only be opened read-only "
                                          "(mount with --read-only or -o ro)")
        first = next(iter(options.passphrase(file.path)), None) if options.passphrase is not None else None
        return None, legacy_aes_cipher(first) if first is not None else None  # (no key check: the first)
    raw = h.extension(EXT_CRYPTO)
    if raw is None:
        raise InvalidImageError("the image is LUKS-encrypted but has no encryption header extension")
    fde = CryptoHeaderExtension.parse(raw)
    cs = geo.cluster_size
    if fde.offset % cs or fde.offset < cs or fde.length < LUKS_HEADER_SIZE:
        raise InvalidImageError(f"the LUKS header at {fde.offset:#x} (+{fde.length}) is misplaced")
    if fde.offset + fde.length > file.known_size:
        raise InvalidImageError("the LUKS header lies past the end of the image file")
    luks = LuksVolume.parse(file.read_sync(fde.offset, LUKS_HEADER_SIZE), fde.offset, fde.length)
    if options.passphrase is None:
        return luks, None
    return luks, luks.unlock(options.passphrase(file.path), file.read_sync)


def read_snapshot_table(h: Header, geo: Geometry, file: HostFile, repair: bool = False) -> list[SnapshotEntry]:
    """The snapshot table, within QEMU's limits. REPAIR (`check --repair`):
    what the limits refuse is read as it is, for snapshot_ops.mend_table to
    mend: an entry with too much extra data, the entries of a table too big
    (those that fit are kept), and a table that cannot be found (no entries,
    though the header counts some)."""
    if h.snapshots_offset % geo.cluster_size and not (repair and h.nb_snapshots):
        raise InvalidImageError("snapshot table offset is invalid")  # (QEMU checks it even with no snapshots)
    if not h.nb_snapshots:
        return []
    if h.snapshots_offset < geo.cluster_size or h.snapshots_offset % geo.cluster_size:
        if repair:
            return []
        raise InvalidImageError("snapshot table offset is invalid")
    if h.snapshots_offset >= file.known_size:
        if repair:
            return []
        raise TruncatedError("the snapshot table lies past the end of the image file")
    raw = file.read_sync(h.snapshots_offset, min(h.nb_snapshots * 1024 + 65536, MAX_SNAPSHOT_TABLE))
    entries = SnapshotEntry.parse_table(raw, h.nb_snapshots, partial=repair)
    sizes = list(itertools.accumulate(len(e.pack()) for e in entries))
    if sizes and sizes[-1] > MAX_SNAPSHOT_TABLE:
        if not repair:
            raise InvalidImageError("snapshot table is too big")
        entries = entries[: bisect.bisect_right(sizes, MAX_SNAPSHOT_TABLE)]
    for e in entries:
        if too_much_extra(e) and not repair:
            raise InvalidImageError(f"snapshot {e.id_str} has too much extra data")
    return entries


def open_data_file(image_path: str, h: Header, writable: bool) -> HostFile:
    """The external data file the header names, resolved as a backing file is
    (beside the image). A relative name not found there is tried in the
    working directory: qemu-img creates a relative data file there, and QEMU
    opens it from there, so an image it made in another directory is found
    where QEMU finds it."""
    name = h.extension(EXT_DATA_FILE)
    if not name:
        raise InvalidImageError("image needs an external data file but does not name it")
    text = name.decode("utf-8", "replace")
    path = resolve_backing(image_path, text)
    if not os.path.lexists(path) and not os.path.isabs(text) and os.path.lexists(text):
        path = os.path.abspath(text)
    if writable and same_file(path, image_path):
        raise InvalidImageError("the external data file is the image file itself: guest data would "
                                "overwrite the image's metadata")
    try:
        return HostFile(path, writable=writable)
    except OSError as e:
        raise QcowError(f"cannot open external data file {path}: {e.strerror}") from None


def open_backing(image_path: str, h: Header, options: OpenOptions, chain: tuple[tuple[int, int], ...],
                 open_qcow2: Callable[[str, OpenOptions, tuple[tuple[int, int], ...]], Source]) -> Source | None:
    """The backing file the header names (raw, or qcow2 through OPEN_QCOW2),
    read-only, with reader locks; CHAIN: the (dev, ino) of the images above."""
    if h.backing_file is None:
        return None
    path = resolve_backing(image_path, h.backing_file)
    try:
        path, fmt = backing_of(image_path, h)
        if fmt == "raw":
            return RawSource(path, options.force_share)
    except OSError as e:
        raise QcowError(f"cannot open backing file {path}: {e.strerror}") from None
    try:
        return open_qcow2(path, OpenOptions(read_only=True, l2_cache_bytes=options.l2_cache_bytes,
                                       force_share=options.force_share,
                                       passphrase=options.passphrase), chain)
    except QcowError as e:
        raise type(e)(f"backing file {path}: {e}") from None
