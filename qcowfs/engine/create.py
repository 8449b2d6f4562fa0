"""Creating an image (qemu-img create -f qcow2): the first cluster, refcount
table and blocks, the L1 table, a LUKS header, and the preallocated L2
tables and data clusters of a new qcow2 file, laid out and written in one
pass.

A new image has no history, so nothing here goes through the allocator:
every structure's place is known before the first byte is written (header,
refcount table, refcount blocks, L1 table, LUKS area, L2 tables, data
clusters, in that order, as QEMU lays out the first four), and so is every
refcount (1 for each used cluster). The file is written under a temporary
name in the target's directory, fsync'd and renamed over the target: a
crash or an error leaves the target absent (or as it was), never half made.

Option names and rules are qemu-img's (block/qcow2.c qcow2_co_create,
crypto/block-luks.c): an option combination qemu-img refuses is refused
here with the same reason, before anything is touched.
"""
from __future__ import annotations

import dataclasses
import os
import stat
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import QcowError, UnsupportedFeatureError, UsageError
from ..format import (AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, COMPRESSION_ZLIB, COMPRESSION_ZSTD,
                      CRYPT_LUKS, CRYPT_NONE, EXT_BACKING_FORMAT, EXT_CRYPTO, EXT_DATA_FILE,
                      INCOMPAT_COMPRESSION, INCOMPAT_DATA_FILE,
                      INCOMPAT_EXTL2, L2E_OFFSET_MASK, MAX_CLUSTER_BITS, MAX_VIRTUAL_SIZE, MIN_CLUSTER_BITS,
                      OFLAG_COPIED, OFLAG_ZERO, V2_HEADER_LENGTH, V3_HEADER_LENGTH, Geometry, Header,
                      HeaderExtension, encode_table, feature_table, refcount_block_of_ones, wants_feature_table,
                      whole_sectors, zero_table)
from ..host.hostfile import same_file
from ..host.locking import lock_image
from .opening import chain_files, refuse_loop, resolve_backing

DEFAULT_CLUSTER_SIZE = 1 << 16
# crypto/block-luks.c: key material starts 4 KiB into the header, each
# slot's material is rounded up to 4 KiB; PBKDF2 counts are timed to
# iter-time milliseconds but never below these.
LUKS_KEY_SLOT_OFFSET = 4096
LUKS_KEY_SLOT_ALIGN = 4096
LUKS_MIN_SLOT_ITERS = 1000
LUKS_MIN_MASTER_KEY_ITERS = 1000
LUKS_DEFAULT_ITER_TIME_MS = 2000
# The master key digest's PBKDF2 takes an eighth of iter-time (cryptsetup's
# choice, kept by QEMU: eight slots tried cost about one iter-time).
LUKS_MASTER_KEY_ITER_SHARE = 8
# QEMU's bounds on a PBKDF2 count: the rate times iter-time in 64 bits, the
# count in the header's 32.
UINT64_MAX = (1 << 64) - 1
UINT32_MAX = (1 << 32) - 1
PREALLOCATION_MODES = ("off", "metadata", "falloc", "full")
# Zeros written per pwrite by preallocation=full.
FULL_PREALLOC_CHUNK = 8 << 20

# Every option, with the kind of value it takes: the command line turns
# qemu-img's text into these (sizes with suffixes, on/off), the library
# takes Python values. Keys are qemu-img's names; the library's keyword
# arguments are the same with "." and "-" written "_".
OPTION_KINDS: dict[str, str] = {
    "size": "size", "cluster_size": "size", "compat": "str", "refcount_bits": "int",
    "lazy_refcounts": "bool", "extended_l2": "bool", "compression_type": "str", "preallocation": "str",
    "data_file": "str", "data_file_raw": "bool", "backing_file": "str", "backing_fmt": "str",
    "encrypt.format": "str", "encrypt.cipher-alg": "str", "encrypt.cipher-mode": "str",
    "encrypt.ivgen-alg": "str", "encrypt.ivgen-hash-alg": "str", "encrypt.hash-alg": "str",
    "encrypt.iter-time": "int",
}


def keyword(name: str) -> str:
    """The library's keyword for qemu-img option NAME (encrypt.cipher-alg -> encrypt_cipher_alg)."""
    return name.replace(".", "_").replace("-", "_")


KEYWORDS = {keyword(name): name for name in OPTION_KINDS}


@dataclass(frozen=True)
class EncryptOptions:
    """LUKS settings, in qemu-img's names and defaults (aes-256-xts-plain64, sha256)."""

    cipher_alg: str = "aes-256"
    cipher_mode: str = "xts"
    ivgen_alg: str = "plain64"
    ivgen_hash_alg: str | None = None
    hash_alg: str = "sha256"
    iter_time: int = LUKS_DEFAULT_ITER_TIME_MS

    @property
    def key_bytes(self) -> int:
        single = int(self.cipher_alg.split("-")[1]) // 8
        return 2 * single if self.cipher_mode == "xts" else single

    @property
    def mode_string(self) -> str:
        """The LUKS header's cipher mode, e.g. "xts-plain64" or "cbc-essiv:sha256"."""
        ivgen = f"{self.ivgen_alg}:{self.ivgen_hash_alg}" if self.ivgen_alg == "essiv" else self.ivgen_alg
        return f"{self.cipher_mode}-{ivgen}"


@dataclass(frozen=True)
class CreateOptions:
    """A new image, checked: what `qemu-img create -f qcow2 -o ...` takes."""

    size: int
    cluster_size: int = DEFAULT_CLUSTER_SIZE
    compat: str = "1.1"
    refcount_bits: int = 16
    lazy_refcounts: bool = False
    extended_l2: bool = False
    compression_type: str = "zlib"
    preallocation: str = "off"
    data_file: str | None = None
    data_file_raw: bool = False
    backing_file: str | None = None
    backing_fmt: str | None = None
    encrypt: EncryptOptions | None = None

    @property
    def version(self) -> int:
        return 2 if self.compat == "0.10" else 3

    @property
    def zero_flagged(self) -> bool:
        """Whether preallocated clusters are flagged zero: an encrypted
        image's, whose host zeros (or holes) decrypt to noise (QEMU shows
        that noise), where the format can say zero (v3; with extended L2
        their subclusters stay unallocated and read zeros anyway)."""
        return self.encrypt is not None and self.version >= 3 and not self.extended_l2

    @property
    def reads_zeros(self) -> bool:
        """Whether the new disk reads zeros everywhere: not where an encrypted
        image's preallocated clusters are neither flagged zero nor made of
        unallocated subclusters (v2)."""
        return self.encrypt is None or self.preallocation == "off" or self.zero_flagged or self.extended_l2

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.cluster_size.bit_length() - 1, self.extended_l2, self.version >= 3,
                        COMPRESSION_ZSTD if self.compression_type == "zstd" else COMPRESSION_ZLIB,
                        self.refcount_bits.bit_length() - 1)


def option_bool(name: str, value: Any) -> bool:
    """An on/off option's value (a bool, or qemu-img's words for one)."""
    if isinstance(value, bool):
        return value
    if value in ("on", "true", "yes"):
        return True
    if value in ("off", "false", "no"):
        return False
    raise UsageError(f"parameter '{name}' expects 'on' or 'off', not '{value}'")


def option_int(name: str, value: Any) -> int:
    """A number option's value (an int, or its digits)."""
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            return int(str(value))
        except ValueError:
            raise UsageError(f"parameter '{name}' expects a number, not '{value}'") from None
    return value


def _power_of_two(n: int) -> bool:
    return n > 0 and not n & (n - 1)


# (qemu-img 7.2 refuses it too: "Backing file specified without backing format")
NO_BACKING_FORMAT = "backing file specified without backing format (give -F qcow2 or -F raw)"


def disk_size(size: Any) -> int:
    """A new disk's SIZE as qemu-img takes it: checked, and rounded up to
    whole sectors (qcow2 and raw alike)."""
    size = option_int("size", size)
    if size < 0 or size > MAX_VIRTUAL_SIZE:
        raise UsageError(f"invalid image size {size}")
    return whole_sectors(size)


def create_options(size: int | None, **kwargs: Any) -> CreateOptions:
    """CreateOptions from keyword arguments (library names, see KEYWORDS),
    checked as qemu-img checks them. SIZE None: the caller takes it from the
    backing file (size_from_backing)."""
    unknown = sorted(set(kwargs) - set(KEYWORDS))
    if unknown:
        raise UsageError(f"invalid parameter '{KEYWORDS.get(unknown[0], unknown[0])}' for qcow2 "
                         f"(known: {', '.join(OPTION_KINDS)})")
    v = {k: val for k, val in kwargs.items() if val is not None}
    enc: dict[str, Any] = {k[len("encrypt_"):]: v.pop(k) for k in list(v) if k.startswith("encrypt_")}
    for k in ("lazy_refcounts", "extended_l2", "data_file_raw"):
        if k in v:
            v[k] = option_bool(k, v[k])
    for k in ("refcount_bits", "cluster_size"):
        if k in v:
            v[k] = option_int(k, v[k])
    if size is None:
        if v.get("backing_file") is not None and v.get("backing_fmt") is None:
            raise UsageError(NO_BACKING_FORMAT)
        raise UsageError("image creation needs a size (or a backing file to take it from)")
    opts = CreateOptions(size=disk_size(size), **v)
    fmt = enc.pop("format", None)
    if fmt is not None and fmt != "luks":
        raise UsageError(f"encryption format '{fmt}' is not supported (only 'luks'; QEMU no longer creates 'aes')")
    if enc and fmt is None:
        raise UsageError("encrypt.* options need encrypt.format=luks")
    if fmt is not None:
        if "iter_time" in enc:
            enc["iter_time"] = option_int("encrypt.iter-time", enc["iter_time"])
        opts = dataclasses.replace(opts, encrypt=EncryptOptions(**enc))
    _check(opts)
    return opts


def _check(o: CreateOptions) -> None:
    """qemu-img's refusals (qcow2_co_create, qcrypto_block_luks_create)."""
    cs = o.cluster_size
    if not _power_of_two(cs) or not 1 << MIN_CLUSTER_BITS <= cs <= 1 << MAX_CLUSTER_BITS:
        raise UsageError("cluster size must be a power of two between 512 and 2048k")
    if o.compat not in ("0.10", "1.1", "v2", "v3"):
        raise UsageError(f"invalid compat '{o.compat}' (0.10 or 1.1)")
    if o.compat in ("v2", "v3"):
        object.__setattr__(o, "compat", "0.10" if o.compat == "v2" else "1.1")
    if not _power_of_two(o.refcount_bits) or o.refcount_bits > 64:
        raise UsageError("refcount width must be a power of two and may not exceed 64 bits")
    if o.compression_type not in ("zlib", "zstd"):
        raise UsageError(f"invalid compression type '{o.compression_type}' (zlib or zstd)")
    if o.preallocation not in PREALLOCATION_MODES:
        raise UsageError(f"invalid preallocation mode '{o.preallocation}' ({', '.join(PREALLOCATION_MODES)})")
    if o.version < 3:
        if o.lazy_refcounts:
            raise UsageError("lazy refcounts only supported with compatibility level 1.1 and above")
        if o.refcount_bits != 16:
            raise UsageError("different refcount widths than 16 bits require compatibility level 1.1 or above")
        if o.data_file:
            raise UsageError("data-file requires compat=1.1")
        if o.extended_l2:
            raise UsageError("extended L2 entries are only supported with compatibility level 1.1 and above")
        if o.compression_type != "zlib":
            raise UsageError("non-zlib compression type is only supported with compatibility level 1.1 and above")
    if o.extended_l2 and cs < 16384:
        raise UsageError("extended L2 entries are only supported with cluster sizes of at least 16384 bytes")
    if o.data_file_raw and not o.data_file:
        raise UsageError("data-file-raw requires data-file")
    if o.backing_file is not None:
        if o.data_file_raw:
            raise UsageError("backing file and data-file-raw cannot be used at the same time")
        if o.preallocation != "off" and not o.extended_l2:
            raise UsageError("backing file and preallocation can only be used at the same time if "
                             "extended_l2 is on")
        if o.backing_fmt is None:
            raise UsageError(NO_BACKING_FORMAT)
        if o.backing_fmt not in ("qcow2", "raw"):
            raise UsageError(f"backing format '{o.backing_fmt}' is not supported (qcow2 or raw)")
    elif o.backing_fmt is not None:
        raise UsageError("a backing format needs a backing file")
    if o.encrypt is not None:
        check_encrypt(o.encrypt)


def check_encrypt(e: EncryptOptions) -> None:
    """qemu-img's refusals of LUKS settings (qcrypto_block_luks_create)."""
    if e.cipher_alg not in ("aes-128", "aes-192", "aes-256"):
        raise UsageError(f"cipher '{e.cipher_alg}' is not supported (aes-128, aes-192, aes-256)")
    if e.cipher_mode not in ("xts", "cbc", "ecb", "ctr"):
        raise UsageError(f"cipher mode '{e.cipher_mode}' is not supported (xts, cbc, ecb, ctr)")
    if e.ivgen_alg not in ("plain", "plain64", "essiv"):
        raise UsageError(f"IV generator '{e.ivgen_alg}' is not supported (plain, plain64, essiv)")
    from ..format.crypto import HASHES  # (the LUKS code, with numpy and cryptography: for LUKS only)

    for what, h in (("hash", e.hash_alg), ("IV hash", e.ivgen_hash_alg)):
        if h is not None and h not in HASHES:
            raise UsageError(f"{what} '{h}' is not supported ({', '.join(HASHES)})")
    if e.ivgen_alg == "essiv" and e.ivgen_hash_alg is None:
        object.__setattr__(e, "ivgen_hash_alg", "sha256")
    if e.ivgen_alg != "essiv" and e.ivgen_hash_alg is not None:
        raise UsageError("encrypt.ivgen-hash-alg is only for encrypt.ivgen-alg=essiv")
    if e.iter_time < 1:
        raise UsageError("encrypt.iter-time must be at least 1 (milliseconds)")


# ---- LUKS --------------------------------------------------------------------------

# Seconds of CPU time a PBKDF2 rate is measured over (_iterations_per_second).
PBKDF2_TIMING = 0.1


def _iterations_per_second(hash_name: str, length: int) -> int:
    """PBKDF2 rate of this machine for LENGTH output bytes, as
    qcrypto_pbkdf2_count_iters measures it: a 64-byte slot key from SHA-256
    is two PBKDF2 blocks, each of every iteration, so it counts half the
    iterations of the 20-byte master key digest for the same time. Timed,
    as QEMU times it, in the CPU time of this thread (the derivation runs in
    it), not on the wall clock: on a busy machine the wall clock counted
    the other processes' time too, and a slot got half the iterations its
    iter-time asks (QEMU's count for the same iter-time was twice ours at a
    load of 4 on 2 cores). PBKDF2_TIMING of CPU time at least, where QEMU
    takes 500 ms (its clock ticks; this one counts nanoseconds)."""
    from ..format.crypto import LUKS_SALT_LEN, pbkdf2

    n = 1 << 14
    while True:
        t0 = time.thread_time()
        pbkdf2(hash_name, b"qcowfs", bytes(LUKS_SALT_LEN), n, length)
        dt = time.thread_time() - t0
        if dt >= PBKDF2_TIMING or n >= 1 << 26:
            return max(1, int(n / max(dt, 1e-6)))
        n *= 4


def luks_iterations(hash_name: str, length: int, iter_time: int, minimum: int, share: int = 1) -> int:
    """The PBKDF2 count of a new LUKS key slot (LENGTH: the key's bytes;
    minimum LUKS_MIN_SLOT_ITERS) or master key digest (LUKS_DIGEST_LEN,
    LUKS_MIN_MASTER_KEY_ITERS, share LUKS_MASTER_KEY_ITER_SHARE), as QEMU's
    qcrypto_block_luks_create and qcrypto_block_luks_store_key compute it:
    this machine's rate times ITER_TIME ms (0 gives the minimum, as in
    qemu-img amend), divided by SHARE, at least MINIMUM. A count QEMU cannot
    scale or store is refused as QEMU refuses it."""
    from ..format.crypto import PBKDF2_MAX_ITERATIONS

    rate = _iterations_per_second(hash_name, length)
    if iter_time and rate > UINT64_MAX // iter_time:
        raise UsageError(f"encrypt.iter-time={iter_time} is too long: {rate} PBKDF2 iterations a second "
                         "cannot be scaled to it")
    count = rate * iter_time // 1000 // share
    if count > UINT32_MAX:
        raise UsageError(f"encrypt.iter-time={iter_time} is too long: it asks for {count} PBKDF2 iterations "
                         f"here, more than LUKS can store ({UINT32_MAX})")
    if count > PBKDF2_MAX_ITERATIONS:  # (qcowfs could not derive that slot's key, to make it or open it)
        raise UsageError(f"encrypt.iter-time={iter_time} is too long: it asks for {count} PBKDF2 iterations "
                         f"here, more than OpenSSL's PBKDF2 takes ({PBKDF2_MAX_ITERATIONS})")
    return max(count, minimum)


def _luks_sectors(enc: EncryptOptions) -> tuple[int, int, int]:
    """Where a new LUKS header's parts lie, in 512-byte sectors: the key
    material's start, each key slot's material, and the payload (the
    header's whole size)."""
    from ..format.crypto import LUKS_NUM_KEY_SLOTS, LUKS_SECTOR_SIZE, LUKS_STRIPES

    split_len = enc.key_bytes * LUKS_STRIPES
    split_sectors = -(-split_len // LUKS_KEY_SLOT_ALIGN) * LUKS_KEY_SLOT_ALIGN // LUKS_SECTOR_SIZE
    header_sectors = LUKS_KEY_SLOT_OFFSET // LUKS_SECTOR_SIZE
    return header_sectors, split_sectors, header_sectors + LUKS_NUM_KEY_SLOTS * split_sectors


def luks_header_bytes(enc: EncryptOptions) -> int:
    """The size of the LUKS header (with its key material) a new image with
    ENC gets, as qcrypto_block_calculate_payload_offset says."""
    from ..format.crypto import LUKS_SECTOR_SIZE

    return _luks_sectors(enc)[2] * LUKS_SECTOR_SIZE


def luks_area(enc: EncryptOptions, passphrase: bytes) -> bytes:
    """The LUKS header and its key material (QEMU's qcrypto_block_luks_create):
    a random master key in slot 0, PBKDF2 counts timed to iter-time.
    (format.crypto is imported here and by the other LUKS functions: a plain
    create loads neither it nor numpy and cryptography, some 50 ms.)"""
    from ..format.crypto import (LUKS_DIGEST_LEN, LUKS_KEY_DISABLED, LUKS_KEY_ENABLED, LUKS_MAGIC,
                                 LUKS_NUM_KEY_SLOTS, LUKS_SALT_LEN, LUKS_SECTOR_SIZE, LUKS_STRIPES, LUKS_VERSION,
                                 CipherSpec, LuksHeader, LuksKeySlot, passphrase_text, pbkdf2, seal_master_key)
    import uuid  # (it imports platform: a few ms a plain create need not pay)

    secret = passphrase_text(passphrase)
    key_bytes = enc.key_bytes
    header_sectors, split_sectors, payload = _luks_sectors(enc)
    master = os.urandom(key_bytes)
    mk_salt, slot_salt = os.urandom(LUKS_SALT_LEN), os.urandom(LUKS_SALT_LEN)
    mk_iters = luks_iterations(enc.hash_alg, LUKS_DIGEST_LEN, enc.iter_time, LUKS_MIN_MASTER_KEY_ITERS,
                               LUKS_MASTER_KEY_ITER_SHARE)
    slot_iters = luks_iterations(enc.hash_alg, key_bytes, enc.iter_time, LUKS_MIN_SLOT_ITERS)
    digest = pbkdf2(enc.hash_alg, master, mk_salt, mk_iters, LUKS_DIGEST_LEN)
    slots = tuple(LuksKeySlot(LUKS_KEY_ENABLED if i == 0 else LUKS_KEY_DISABLED,
                              slot_iters if i == 0 else 0, slot_salt if i == 0 else bytes(LUKS_SALT_LEN),
                              header_sectors + i * split_sectors, LUKS_STRIPES)
                  for i in range(LUKS_NUM_KEY_SLOTS))
    header = LuksHeader(LUKS_MAGIC, LUKS_VERSION, "aes", enc.mode_string, enc.hash_alg, payload, key_bytes,
                        digest, mk_salt, mk_iters, str(uuid.uuid4()), slots)
    spec = CipherSpec.of(header)  # (the checks a reader makes, on what we made)
    material = seal_master_key(spec, master, secret, slot_salt, slot_iters)
    area = bytearray(payload * LUKS_SECTOR_SIZE)
    area[: len(header.pack())] = header.pack()
    start = header_sectors * LUKS_SECTOR_SIZE
    area[start : start + len(material)] = material
    return bytes(area)


# ---- layout and writing ----------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """Where each structure of a new image lies, in clusters."""

    reftable: int
    reftable_clusters: int
    refblocks: int
    nblocks: int
    l1: int
    l1_entries: int
    crypto: int
    crypto_clusters: int
    l2: int
    nl2: int
    data: int
    ndata: int

    @property
    def clusters(self) -> int:
        return self.data + self.ndata


def refcount_metadata_clusters(clusters: int, cluster_size: int, refcount_order: int) -> tuple[int, int]:
    """The refcount blocks and refcount table clusters that count CLUSTERS
    other clusters and themselves: the least fixed point, as QEMU's
    qcow2_refcount_metadata_size finds it (the layout of a new image, and
    what measure adds for a fully allocated one)."""
    per_block = cluster_size * 8 >> refcount_order
    per_table_cluster = cluster_size // 8
    blocks = table = 0
    while True:
        b = -(-(clusters + table + blocks) // per_block)
        t = -(-b // per_table_cluster)
        if (b, t) == (blocks, table):
            return blocks, table
        blocks, table = b, t


def refcount_structures(geo: Geometry, used: int, blocks_at: int, nblocks: int,
                        table_clusters: int) -> tuple[list[bytes], bytes]:
    """The NBLOCKS refcount blocks (to lie from cluster BLOCKS_AT on) and the
    refcount table (TABLE_CLUSTERS clusters) of a new image whose first USED
    clusters are each used once: every count 1 (create's image, the
    builder's), the table pointing at the blocks."""
    cs, per_block = geo.cluster_size, geo.refcounts_per_block
    table = zero_table(table_clusters * cs // 8)
    blocks = []
    for j in range(nblocks):
        blocks.append(refcount_block_of_ones(min(per_block, max(0, used - j * per_block)), geo.refcount_order, cs))
        table[j] = (blocks_at + j) * cs
    return blocks, encode_table(table)


def plan(o: CreateOptions, crypto_bytes: int) -> Layout:
    """The layout of a new image: the refcount structures sized to count
    themselves and everything else."""
    geo = o.geometry
    cs = geo.cluster_size
    l1_entries = geo.l1_entries_needed(o.size)
    l1_clusters = -(-l1_entries * 8 // cs)
    crypto_clusters = -(-crypto_bytes // cs)
    prealloc = o.preallocation != "off" or o.data_file_raw
    nl2 = l1_entries if prealloc else 0
    ndata = -(-o.size // cs) if prealloc and not o.data_file else 0
    body = l1_clusters + crypto_clusters + nl2 + ndata
    b, t = refcount_metadata_clusters(1 + body, cs, geo.refcount_order)
    l1 = 1 + t + b
    crypto = l1 + l1_clusters
    l2 = crypto + crypto_clusters
    return Layout(1, t, 1 + t, b, l1, l1_entries, crypto, crypto_clusters, l2, nl2, l2 + nl2, ndata)


def build_header(o: CreateOptions, lay: Layout, crypto_bytes: int) -> Header:
    """The header of the new image, its extensions in QEMU's order."""
    geo = o.geometry
    cs = geo.cluster_size
    exts: list[HeaderExtension] = []
    if o.backing_fmt is not None:
        exts.append(HeaderExtension(EXT_BACKING_FORMAT, o.backing_fmt.encode()))
    if o.data_file:
        exts.append(HeaderExtension(EXT_DATA_FILE, o.data_file.encode()))
    if o.encrypt is not None:
        exts.append(HeaderExtension(EXT_CRYPTO, (lay.crypto * cs).to_bytes(8, "big")
                                    + crypto_bytes.to_bytes(8, "big")))
    incompat = ((INCOMPAT_DATA_FILE if o.data_file else 0) | (INCOMPAT_EXTL2 if o.extended_l2 else 0)
                | (INCOMPAT_COMPRESSION if o.compression_type == "zstd" else 0))
    h = Header(version=o.version, backing_file_offset=0, backing_file_size=0, cluster_bits=geo.cluster_bits,
               size=o.size, crypt_method=CRYPT_LUKS if o.encrypt else CRYPT_NONE, l1_size=lay.l1_entries,
               l1_table_offset=lay.l1 * cs, refcount_table_offset=lay.reftable * cs,
               refcount_table_clusters=lay.reftable_clusters, nb_snapshots=0, snapshots_offset=0,
               incompatible_features=incompat,
               compatible_features=COMPAT_LAZY_REFCOUNTS if o.lazy_refcounts else 0,
               autoclear_features=AUTOCLEAR_DATA_FILE_RAW if o.data_file_raw else 0,
               refcount_order=geo.refcount_order,
               header_length=V3_HEADER_LENGTH if o.version >= 3 else V2_HEADER_LENGTH,
               compression_type=geo.compression_type, extensions=exts, backing_file=o.backing_file)
    if len(h.pack()) > cs:
        raise UsageError("the backing file name and header extensions do not fit in one cluster "
                         f"of {cs} bytes")
    if wants_feature_table(o.version, cs):
        # QEMU's feature name table, left out where the cluster has no room for it.
        with_table = dataclasses.replace(h, extensions=exts + [feature_table()])
        if len(with_table.pack()) <= cs:
            h = with_table
    return h


def _l2_table(o: CreateOptions, geo: Geometry, first_host: int, index: int, external: bool) -> bytes:
    """Preallocated L2 table INDEX: every cluster of the disk it covers
    points at its data cluster (guest offset == host offset in a data file),
    flagged zero where zero_flagged says (the first write to one goes in
    place)."""
    import numpy as np  # (bulk work: only a preallocated image has L2 tables)

    cs = geo.cluster_size
    first = index * geo.l2_entries
    n = min(geo.l2_entries, -(-o.size // cs) - first)
    clusters = np.arange(first, first + n, dtype=np.uint64)
    hosts = clusters * np.uint64(cs) + np.uint64(0 if external else first_host)
    words = (hosts & np.uint64(L2E_OFFSET_MASK)) | np.uint64(OFLAG_COPIED)
    if o.zero_flagged:
        words |= np.uint64(OFLAG_ZERO)
    table: np.ndarray = np.zeros((geo.l2_entries, 2) if geo.extended_l2 else geo.l2_entries, np.uint64)
    if geo.extended_l2:
        # (QEMU preallocates the host clusters only: every subcluster stays
        # unallocated, reading from the backing file or zeros)
        table[:n, 0] = words
    else:
        table[:n] = words
    return table.astype(">u8").tobytes()


def preallocate_data(fd: int, offset: int, length: int, mode: str) -> None:
    """falloc: reserve the host space; full: write the zeros (metadata: nothing)."""
    if length <= 0 or mode in ("off", "metadata"):
        return
    if mode == "falloc":
        os.posix_fallocate(fd, offset, length)
        return
    zeros = bytes(min(FULL_PREALLOC_CHUNK, length))
    pos = offset
    while pos < offset + length:
        n = min(len(zeros), offset + length - pos)
        os.pwrite(fd, zeros[:n] if n < len(zeros) else zeros, pos)
        pos += n


def write_image(fd: int, o: CreateOptions, crypto: bytes) -> None:
    """Write the whole new image to the empty file FD."""
    geo = o.geometry
    cs = geo.cluster_size
    lay = plan(o, len(crypto))
    header = build_header(o, lay, len(crypto))
    used = 1 + lay.reftable_clusters + lay.nblocks + (lay.clusters - lay.l1)
    blocks, table = refcount_structures(geo, used, lay.refblocks, lay.nblocks, lay.reftable_clusters)
    for j, block in enumerate(blocks):
        os.pwrite(fd, block, (lay.refblocks + j) * cs)
    os.pwrite(fd, table, lay.reftable * cs)
    if crypto:
        os.pwrite(fd, crypto + bytes(lay.crypto_clusters * cs - len(crypto)), lay.crypto * cs)
    l1 = zero_table(lay.l1_entries)
    external = bool(o.data_file)
    for i in range(lay.nl2):
        os.pwrite(fd, _l2_table(o, geo, lay.data * cs, i, external), (lay.l2 + i) * cs)
        l1[i] = ((lay.l2 + i) * cs) | OFLAG_COPIED
    os.pwrite(fd, encode_table(l1), lay.l1 * cs)
    end = max(lay.l1 * cs + lay.l1_entries * 8, lay.l2 * cs)
    if lay.ndata:
        end = lay.clusters * cs
        os.ftruncate(fd, end)
        preallocate_data(fd, lay.data * cs, o.size, o.preallocation)
    if os.fstat(fd).st_size < end:
        os.ftruncate(fd, end)
    # The header last: until it is there, the file is no image at all.
    os.pwrite(fd, header.pack(), 0)


def backing_size(image_path: str, backing: str, fmt: str) -> int:
    """The virtual size of BACKING (relative to IMAGE_PATH's directory), read
    without a lock as qemu-img create reads it (force-share)."""
    path = resolve_backing(image_path, backing)
    try:
        with open(path, "rb") as f:
            if fmt == "raw":
                return whole_sectors(os.fstat(f.fileno()).st_size)
            return Header.parse(f.read(1 << MAX_CLUSTER_BITS)).size
    except OSError as e:
        raise QcowError(f"could not open backing file {backing}: {e.strerror}") from None


def temp_name(path: str) -> str:
    """A new hidden name next to PATH: a rename from it replaces PATH atomically."""
    d, base = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{base}.qcowfs-{os.getpid()}-{os.urandom(4).hex()}")


def target_is_device(path: str) -> bool:
    """Whether PATH (links followed) is a block device, which a raw convert
    writes into in place, as qemu-img does. Any other existing file that is
    not a regular one (a directory, a FIFO, a character device) is refused:
    an image never replaces it."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return False
    except OSError as e:
        raise QcowError.from_os(f"cannot replace {path}", e) from None
    if stat.S_ISBLK(mode):
        return True
    if not stat.S_ISREG(mode):
        raise UsageError(f"{path} exists and is not a regular file nor a block device")
    return False


def refuse_device(path: str) -> None:
    """A qcow2 image is made in a file only (refused before anything is written)."""
    if target_is_device(path):
        raise UnsupportedFeatureError(f"{path} is a block device: qcowfs makes qcow2 images in files "
                                      "(convert -O raw writes a disk into a device)")


def hold_target(path: str) -> int:
    """The existing file at PATH opened and writer-locked (-1 if there is
    none): an image another program holds is refused, as qemu-img refuses
    to overwrite it. Close the fd after the rename."""
    if not os.path.lexists(path):
        return -1
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise QcowError(f"cannot replace {path}: {e.strerror}") from None
    try:
        lock_image(fd, path, writer=True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def publish(tmp: str, path: str, durable: bool = True) -> None:
    """Rename the finished, fsync'd TMP over PATH and make the rename durable
    (not DURABLE: cache=unsafe, the rename alone)."""
    os.rename(tmp, path)
    if not durable:
        return
    dirfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def replaced_file(path: str) -> str:
    """The file that making an image at PATH replaces: where a symbolic link
    at PATH leads (qemu-img writes through a link, so the link stays and
    names the new image). Relative backing and data file names are still
    read against PATH as given, as QEMU reads them."""
    return os.path.realpath(path)


def new_file(path: str) -> int:
    """A descriptor of the new, empty file PATH (read-write, mode 0644):
    an image's temporary name, refused if anything is there."""
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)


def create_file(path: str, fill: Callable[[int], None]) -> None:
    """Make PATH as FILL(fd) writes it into a new file: under a temporary
    name in the same directory, fsync'd, renamed over PATH (whose writer
    lock is taken first). On any failure PATH is absent or as it was."""
    path = replaced_file(path)
    refuse_device(path)
    old = hold_target(path)
    tmp = temp_name(path)
    try:
        fd = new_file(tmp)
    except OSError as e:
        if old >= 0:
            os.close(old)
        raise QcowError(f"cannot create {path}: {e.strerror}") from None
    try:
        fill(fd)
        os.fsync(fd)
        publish(tmp, path)
    except OSError as e:  # (a full disk, a file larger than the filesystem takes: one line naming it)
        remove_quietly(tmp)
        raise QcowError.from_os(f"cannot create {e.filename if e.filename not in (None, tmp) else path}",
                                e) from None
    except BaseException:
        remove_quietly(tmp)
        raise
    finally:
        os.close(fd)
        if old >= 0:
            os.close(old)


# What a raw image takes besides its size: qemu-img's one raw option.
RAW_PREALLOCATION_MODES = ("off", "falloc", "full")


def raw_preallocation(preallocation: Any = "off", **others: Any) -> str:
    """The preallocation mode of a raw image (create -f raw, convert -O raw,
    resize of a raw file), checked; OTHERS are refused as qemu-img refuses
    them (a raw image has no other option)."""
    if others:
        name = next(iter(others))
        if name in ("backing_file", "backing_fmt"):
            raise UsageError("a backing file is not supported for the raw format")
        raise UsageError(f"invalid parameter '{KEYWORDS.get(name, name)}' for raw (known: size, preallocation)")
    if preallocation not in RAW_PREALLOCATION_MODES:
        raise UsageError(f"preallocation={preallocation} is not supported for raw (one of "
                         f"{', '.join(RAW_PREALLOCATION_MODES)})")
    return str(preallocation)


def create_raw(path: str, size: int | None, **options: Any) -> None:
    """qemu-img create -f raw PATH SIZE: a file of SIZE bytes (rounded up to
    whole sectors, as qemu-img does), a hole or preallocated, made as a qcow2
    image is made (create_file: whole or not at all, never over a file
    another program holds). OPTIONS: raw_preallocation's."""
    preallocation = raw_preallocation(**options)
    if size is None:
        raise UsageError("image creation needs a size")
    size = disk_size(size)

    def fill(fd: int) -> None:
        os.ftruncate(fd, size)
        preallocate_data(fd, 0, size, preallocation)
    create_file(path, fill)


def data_file_path(path: str, o: CreateOptions) -> str | None:
    """Where the external data file of the new image PATH goes: beside it."""
    return os.path.join(os.path.dirname(os.path.abspath(path)), o.data_file) if o.data_file else None


def check_references(path: str, o: CreateOptions) -> None:
    """Refuse options under which the image made at PATH would be in its
    own backing chain (qemu-img refuses a backing file named as the image;
    any loop leaves an image no program opens), or its data file would be
    the image itself or a file of its backing chain (the new data would
    overwrite it). Checked before anything is touched: an existing PATH
    stays as it was."""
    path = os.path.abspath(path)
    chain: list[str] = []
    if o.backing_file is not None:
        backing = resolve_backing(path, o.backing_file)
        refuse_loop(path, backing, o.backing_fmt or "raw")
        chain = chain_files(backing, o.backing_fmt or "raw")
    data = data_file_path(path, o)
    if data is not None:
        if same_file(data, path):
            raise UsageError(f"the data file {o.data_file} cannot be the image itself")
        for f in chain:
            if same_file(data, f):
                raise UsageError(f"the data file {o.data_file} cannot be {f}, a file of the backing chain")


def create(path: str, o: CreateOptions, passphrase: Callable[[], bytes] | None = None) -> None:
    """qemu-img create -f qcow2 PATH with options O. PASSPHRASE is asked
    for (once) when O encrypts."""
    check_references(path, o)
    crypto = b""
    if o.encrypt is not None:
        if passphrase is None:
            raise UsageError("an encrypted image needs a passphrase (passphrase= or key_file=)")
        crypto = luks_area(o.encrypt, passphrase())
    data_path = data_file_path(path, o)
    made_data = data_path is not None and not os.path.lexists(data_path)

    def fill(fd: int) -> None:
        if data_path is not None:
            dfd = os.open(data_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                lock_image(dfd, data_path, writer=True)
                os.ftruncate(dfd, 0)
                os.ftruncate(dfd, o.size)
                preallocate_data(dfd, 0, o.size, o.preallocation)
                os.fsync(dfd)
            finally:
                os.close(dfd)
        write_image(fd, o, crypto)
    try:
        create_file(path, fill)
    except BaseException:
        if made_data and data_path is not None:
            remove_quietly(data_path)
        raise
