"""Encrypted images: the LUKS1 header inside qcow2, key unlock, sector ciphers,
and QEMU's legacy AES method.

A LUKS-encrypted qcow2 (crypt_method 2) names a LUKS1 header and its key
material in clusters of the image (the full-disk-encryption header
extension). A passphrase unlocks one of eight key slots: PBKDF2 gives a key
that decrypts the slot's anti-forensically split master key, the AF merge
joins it, and a second PBKDF2 checks it against the header's digest. The
master key then encrypts every 512-byte sector of guest data with the IV of
its sector number, counted from the HOST offset in the image file (QEMU's
crypt_physical_offset): a cluster that moves must be decrypted and
re-encrypted, never copied as ciphertext.

The legacy method (crypt_method 1) is AES-128-CBC with plain64 IVs over
512-byte sectors numbered by the GUEST offset, the key being the first 16
bytes of the password, zero padded (QEMU's crypto/block-qcow.c). qcowfs reads
it only.

The ciphers and PBKDF2 come from `cryptography` (AES in ECB, CBC, CTR and
XTS mode; hashlib's PBKDF2 only for ripemd160). Written here, from the LUKS1 specification, is only
what no library provides: the AF merge with its diffuse hash, and AES-192 in
XTS mode (OpenSSL has no 192-bit XTS), built from AES-ECB per IEEE 1619 and
pinned to the library's XTS by a test for the key sizes both have.

No function here logs or formats key material: errors name the slot and the
reason only.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import os
import struct
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterable, TypeVar

import numpy as np

from ..errors import InvalidImageError, PassphraseError, UnsupportedFeatureError

# ---- LUKS1 on-disk constants (the LUKS1 specification, QEMU's crypto/block-luks.c) ----

LUKS_MAGIC = b"LUKS\xba\xbe"
LUKS_VERSION = 1
LUKS_SECTOR_SIZE = 512
# From this many sectors on, XTS runs as one AES-ECB call over all of them
# (XtsFromEcb) instead of a cipher context per sector, which costs some
# 3.5 us each (its key schedule): XtsFromEcb costs some 7 us for one sector
# and little more per sector, so 3 sectors take 10 us instead of 11, a 4 KiB
# read (8 sectors) 11 instead of 26 (in-process, alternating, hand runs).
XTS_FROM_ECB_SECTORS = 3
LUKS_CIPHER_NAME_LEN = 32
LUKS_CIPHER_MODE_LEN = 32
LUKS_HASH_SPEC_LEN = 32
LUKS_DIGEST_LEN = 20
LUKS_SALT_LEN = 32
LUKS_UUID_LEN = 40
LUKS_NUM_KEY_SLOTS = 8
LUKS_STRIPES = 4000
LUKS_KEY_ENABLED = 0x00AC71F3
LUKS_KEY_DISABLED = 0x0000DEAD
LUKS_HEADER_SIZE = 592

# Sector size of the legacy AES method.
QCOW_AES_SECTOR_SIZE = 512
QCOW_AES_KEY_LEN = 16

T = TypeVar("T")
# OpenSSL's PKCS5_PBKDF2_HMAC counts iterations in a C int (`cryptography`
# panics past it, hashlib refuses): a LUKS count is 32 bits unsigned, and
# QEMU's nettle takes all of them, but a count past this one would take some
# ten minutes of SHA-256 a slot on the machines of 2026.
PBKDF2_MAX_ITERATIONS = (1 << 31) - 1

_KEY_SLOT = struct.Struct(">II32sII")
_HEADER = struct.Struct(">6sH32s32s32sII20s32sI40s")
assert _HEADER.size + LUKS_NUM_KEY_SLOTS * _KEY_SLOT.size == LUKS_HEADER_SIZE

# Hashes QEMU's LUKS accepts (QCryptoHashAlgorithm names), as hashlib names.
HASHES = {"md5": "md5", "sha1": "sha1", "sha224": "sha224", "sha256": "sha256",
          "sha384": "sha384", "sha512": "sha512", "ripemd160": "ripemd160"}
AES_KEY_SIZES = (16, 24, 32)
MODES = ("ecb", "cbc", "xts", "ctr")
IVGENS = ("plain", "plain64", "essiv")


def _cstr(raw: bytes, what: str) -> str:
    """A NUL-terminated ASCII field of the header."""
    if b"\0" not in raw:
        raise InvalidImageError(f"LUKS header is corrupted: the {what} is not terminated")
    try:
        return raw.split(b"\0", 1)[0].decode("ascii")
    except UnicodeDecodeError:
        raise InvalidImageError(f"LUKS header is corrupted: the {what} is not ASCII") from None


@dataclass(frozen=True)
class LuksKeySlot:
    """One of the eight key slots of a LUKS1 header."""

    active: int
    iterations: int
    salt: bytes
    key_offset: int       # in 512-byte sectors from the start of the LUKS header
    stripes: int

    @property
    def enabled(self) -> bool:
        return self.active == LUKS_KEY_ENABLED

    def material_length(self, key_bytes: int) -> int:
        """Bytes of split key material, whole sectors."""
        n = key_bytes * self.stripes
        return -(-n // LUKS_SECTOR_SIZE) * LUKS_SECTOR_SIZE


@dataclass(frozen=True)
class LuksHeader:
    """The 592-byte LUKS1 header (all integers big-endian)."""

    magic: bytes
    version: int
    cipher_name: str
    cipher_mode: str
    hash_spec: str
    payload_offset: int   # in 512-byte sectors (unused inside qcow2)
    key_bytes: int
    mk_digest: bytes
    mk_digest_salt: bytes
    mk_digest_iterations: int
    uuid: str
    key_slots: tuple[LuksKeySlot, ...]

    @classmethod
    def parse(cls, buf: bytes) -> "LuksHeader":
        if len(buf) < LUKS_HEADER_SIZE:
            raise InvalidImageError("LUKS header is truncated")
        (magic, version, name, mode, hspec, payload, key_bytes, digest, salt, iters,
         uuid) = _HEADER.unpack_from(buf, 0)
        if magic != LUKS_MAGIC:
            raise InvalidImageError("LUKS header is corrupted: bad magic")
        if version != LUKS_VERSION:
            raise UnsupportedFeatureError(f"LUKS version {version} is not supported (only LUKS1)")
        slots = tuple(LuksKeySlot(*_KEY_SLOT.unpack_from(buf, _HEADER.size + i * _KEY_SLOT.size))
                      for i in range(LUKS_NUM_KEY_SLOTS))
        return cls(magic, version, _cstr(name, "cipher name"), _cstr(mode, "cipher mode"),
                   _cstr(hspec, "hash spec"), payload, key_bytes, digest, salt, iters,
                   uuid.split(b"\0", 1)[0].decode("ascii", "replace"), slots)

    def pack(self) -> bytes:
        """The 592 bytes of the header (the inverse of parse)."""
        out = bytearray(_HEADER.pack(self.magic, self.version, self.cipher_name.encode(),
                                     self.cipher_mode.encode(), self.hash_spec.encode(), self.payload_offset,
                                     self.key_bytes, self.mk_digest, self.mk_digest_salt,
                                     self.mk_digest_iterations, self.uuid.encode()))
        for s in self.key_slots:
            out += _KEY_SLOT.pack(s.active, s.iterations, s.salt, s.key_offset, s.stripes)
        return bytes(out)


@dataclass(frozen=True)
class CipherSpec:
    """What the header's cipher strings mean: "aes" + "xts-plain64" + 64 key
    bytes is aes-256 in XTS mode with plain64 IVs (QEMU's names)."""

    cipher_alg: str        # "aes-128", "aes-192", "aes-256"
    mode: str              # ecb, cbc, xts, ctr
    ivgen: str             # plain, plain64, essiv
    ivgen_hash: str | None  # essiv's hash
    hash: str              # PBKDF2 and AF hash
    key_bytes: int

    @classmethod
    def of(cls, h: LuksHeader) -> "CipherSpec":
        mode, sep, ivspec = h.cipher_mode.partition("-")
        if not sep:
            raise InvalidImageError(f"LUKS header is corrupted: cipher mode '{h.cipher_mode}' has no IV generator")
        ivgen, _, ivhash = ivspec.partition(":")
        if mode not in MODES:
            raise UnsupportedFeatureError(f"LUKS cipher mode '{mode}' is not supported")
        if ivgen not in IVGENS:
            raise UnsupportedFeatureError(f"LUKS IV generator '{ivgen}' is not supported")
        if h.hash_spec not in HASHES:
            raise UnsupportedFeatureError(f"LUKS hash '{h.hash_spec}' is not supported")
        if h.cipher_name != "aes":
            raise UnsupportedFeatureError(f"LUKS cipher '{h.cipher_name}' is not supported (qcowfs supports "
                                          "AES; the cryptography library has no Serpent or Twofish)")
        single = h.key_bytes // 2 if mode == "xts" else h.key_bytes
        if single not in AES_KEY_SIZES or (mode == "xts" and h.key_bytes % 2):
            raise InvalidImageError(f"LUKS header is corrupted: {h.key_bytes} key bytes for aes-{mode}")
        if ivgen == "essiv":
            if not ivhash:
                raise InvalidImageError("LUKS header is corrupted: essiv without a hash")
            if ivhash not in HASHES:
                raise UnsupportedFeatureError(f"LUKS IV hash '{ivhash}' is not supported")
        return cls(f"aes-{single * 8}", mode, ivgen, ivhash or None, h.hash_spec, h.key_bytes)


# ---- the AF splitter (LUKS1 specification, "AF-merge") ---------------------------------

def _hash_new(hash_name: str) -> Callable[..., Any]:
    """hashlib's constructor of HASH_NAME: hashlib.sha256 and its kin are
    several times quicker to call than hashlib.new, which matters 8000 times
    per key slot (ripemd160 has only hashlib.new)."""
    name = HASHES[hash_name]
    direct = getattr(hashlib, name, None)
    return direct if direct is not None else lambda data=b"": hashlib.new(name, data)


def _diffuse(block: bytes, hash_name: str) -> bytes:
    """LUKS1's diffusion: each digest-sized piece i is replaced by
    H(be32(i) || piece), the last, shorter piece by a truncated hash."""
    return _Diffuser(len(block), hash_name).diffuse(block)


class _Diffuser:
    """The diffusion of one block size and hash, its piece boundaries and
    big-endian piece numbers computed once for the 3999 blocks of a slot."""

    def __init__(self, size: int, hash_name: str) -> None:
        self._new = _hash_new(hash_name)
        step = self._new().digest_size
        self._pieces = [(struct.pack(">I", i), pos, min(pos + step, size))
                        for i, pos in enumerate(range(0, size, step))]

    def diffuse(self, block: bytes) -> bytes:
        new = self._new
        return b"".join(new(number + block[a:b]).digest()[: b - a] for number, a, b in self._pieces)


def _af_chain(stripes: bytes | bytearray, key_bytes: int, count: int, hash_name: str) -> int:
    """d after COUNT stripes of the AF chain, d = diffuse(d xor s_i) from d = 0,
    as a big-endian integer: Python integers XOR a key-sized block faster
    than numpy arrays that small, and the chain is sequential (no batching)."""
    diffuser = _Diffuser(key_bytes, hash_name)
    d = 0
    for pos in range(0, count * key_bytes, key_bytes):
        x = d ^ int.from_bytes(stripes[pos : pos + key_bytes], "big")
        d = int.from_bytes(diffuser.diffuse(x.to_bytes(key_bytes, "big")), "big")
    return d


def af_merge(material: bytes | bytearray, key_bytes: int, stripes: int, hash_name: str) -> bytes:
    """Join STRIPES stripes of KEY_BYTES each: d = diffuse(d xor s_i) over all
    but the last stripe, then the key is d xor the last."""
    if len(material) < key_bytes * stripes:
        raise ValueError("split key material is too short")
    d = _af_chain(material, key_bytes, stripes - 1, hash_name)
    last = (stripes - 1) * key_bytes
    return (d ^ int.from_bytes(material[last : last + key_bytes], "big")).to_bytes(key_bytes, "big")


def af_split(key: bytes, stripes: int, hash_name: str, random: bytes) -> bytes:
    """The inverse of af_merge: RANDOM gives the first STRIPES-1 stripes
    (len(key) * (stripes - 1) bytes, from a CSPRNG), the last one is chosen
    so that the merge yields KEY."""
    n = len(key)
    if len(random) != n * (stripes - 1):
        raise ValueError("af_split needs key length * (stripes - 1) random bytes")
    d = _af_chain(random, n, stripes - 1, hash_name)
    return random + (d ^ int.from_bytes(key, "big")).to_bytes(n, "big")


# ---- IV generators (QEMU's crypto/ivgen-*.c) ----------------------------------------

# The ESSIV cipher's key length is the hash's digest length (dm-crypt's quirk,
# kept by QEMU): aes-128 with sha256 ESSIV uses aes-256 for the IVs.
def _essiv_key(master_key: bytes, hash_name: str) -> bytes:
    salt = hashlib.new(HASHES[hash_name], master_key).digest()
    if len(salt) not in AES_KEY_SIZES:
        raise UnsupportedFeatureError(f"essiv with {hash_name} needs an AES key of {len(salt)} bytes, "
                                      "which AES does not have")
    return salt


@functools.lru_cache(maxsize=4)
def _iv_ramp(count: int) -> tuple[int, int]:
    """Two integers whose little-endian 16-byte blocks are 1 and i (block i of
    COUNT): the IVs of sectors b .. b+COUNT-1 are then the bytes of b*R + S,
    two integer operations instead of a bytes object per sector (0.2 against
    1.4 us for 8 sectors). Kept for the last few counts a workload uses."""
    ramp = np.zeros((count, 2), "<u8")
    ramp[:, 0] = np.arange(count)
    return int.from_bytes(b"\1".ljust(16, b"\0") * count, "little"), int.from_bytes(ramp.tobytes(), "little")


class SectorCipher:
    """Encrypts and decrypts whole 512-byte sectors of one key, each with the
    IV of its sector number."""

    def __init__(self, spec: CipherSpec, key: bytes) -> None:
        # Imported here: it costs a mount of a plain image some 50 ms of start-up.
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        self.spec = spec
        self._new = Cipher
        # The modes with a per-sector IV are built per sector (the IV is part of the mode).
        self._iv_mode: Callable[[bytes], Any] | None = {
            "cbc": modes.CBC, "xts": modes.XTS, "ctr": modes.CTR}.get(spec.mode)
        self._alg = algorithms.AES(key) if not (spec.mode == "xts" and len(key) == 48) else None
        self._xts_ecb = XtsFromEcb(key) if spec.mode == "xts" else None
        self._ecb = Cipher(self._alg, modes.ECB()) if spec.mode == "ecb" and self._alg else None
        # A long run costs a few array operations, not a cipher context per
        # sector (3.5 us each): what makes reading ahead worth it.
        self.batched = self._xts_ecb is not None or self._ecb is not None
        self._essiv = (Cipher(algorithms.AES(_essiv_key(key, spec.ivgen_hash or "")), modes.ECB())
                       if spec.ivgen == "essiv" else None)
        # plain IVs are the sector number modulo 2^32, plain64 and essiv's modulo 2^64.
        self._iv_mask = 0xFFFFFFFF if spec.ivgen == "plain" else 0xFFFFFFFFFFFFFFFF

    def ivs(self, first: int, count: int) -> bytes:
        """The 16-byte IVs of sectors FIRST .. FIRST+COUNT-1, one after the other."""
        mask = self._iv_mask
        base = first & mask
        if base + count - 1 <= mask:
            ramp, steps = _iv_ramp(count)
            blocks = (base * ramp + steps).to_bytes(16 * count, "little")
        else:  # the sector number wraps inside the run
            blocks = b"".join(((base + i) & mask).to_bytes(16, "little") for i in range(count))
        if self._essiv is None:
            return blocks
        return self._essiv.encryptor().update(blocks)

    def _run(self, data: bytes | bytearray | memoryview, dst: bytearray | memoryview,
             sector: int, encrypt: bool) -> None:
        """Encrypt or decrypt DATA into DST (as long; it may be DATA itself)."""
        n = len(data)
        if n % LUKS_SECTOR_SIZE:
            raise ValueError("encrypted I/O must be whole 512-byte sectors")
        if self._ecb is not None:
            ctx = self._ecb.encryptor() if encrypt else self._ecb.decryptor()
            dst[:] = ctx.update(data)
            return
        count = n // LUKS_SECTOR_SIZE
        ivs = self.ivs(sector, count)
        if self._xts_ecb is not None and (self._alg is None or count >= XTS_FROM_ECB_SECTORS):
            self._xts_ecb.run_into(data, ivs, encrypt, dst)
            return
        alg, mode, new = self._alg, self._iv_mode, self._new
        assert alg is not None and mode is not None
        view, out = memoryview(data), memoryview(dst)
        for pos in range(0, n, LUKS_SECTOR_SIZE):
            c = new(alg, mode(ivs[pos // 32 : pos // 32 + 16]))
            ctx = c.encryptor() if encrypt else c.decryptor()
            out[pos : pos + LUKS_SECTOR_SIZE] = ctx.update(view[pos : pos + LUKS_SECTOR_SIZE])

    def encrypt(self, data: bytes | bytearray | memoryview, sector: int) -> bytearray:
        out = bytearray(len(data))
        self._run(data, out, sector, True)
        return out

    def decrypt(self, data: bytes | bytearray | memoryview, sector: int) -> bytearray:
        out = bytearray(len(data))
        self._run(data, out, sector, False)
        return out

    def decrypt_into(self, buf: bytearray | memoryview, sector: int) -> None:
        """Decrypt BUF in place (no copy of the result)."""
        self._run(buf, buf, sector, False)


# A 512-byte sector is 32 AES blocks, so 32 tweaks.
XTS_BLOCKS = LUKS_SECTOR_SIZE // 16
# Up to this many sectors the tweaks come from the table (_xts_tweak_table),
# above it from shifts of T (_xts_tweaks_by_shift): the table's gather reads
# 8 KiB per sector, the shifts cost about 12 us per call and little per
# sector (in-process, the two alternating: equal near 24 sectors).
XTS_TABLE_SECTORS = 24


def _xts_tweaks_by_shift(t: np.ndarray) -> np.ndarray:
    """The (sectors, 32, 2) little-endian 64-bit halves of every block's tweak
    T * alpha^j, from the (sectors, 2) halves of each sector's T. Tweak j >= 1
    is T shifted left by j, the j bits shifted out folded back by
    x^128 = x^7 + x^2 + x + 1; for j < 57 one fold suffices, so all 32 tweaks
    of every sector come from T in a dozen array operations."""
    shift = np.arange(1, XTS_BLOCKS, dtype=np.uint64)
    out_bits = np.uint64(64) - shift
    lo, hi = t[:, 0:1], t[:, 1:2]
    out = np.empty((len(t), XTS_BLOCKS, 2), np.uint64)
    out[:, 0] = t
    out[:, 1:, 1] = (hi << shift) | (lo >> out_bits)
    shifted_out = hi >> out_bits
    low = shifted_out ^ (shifted_out << np.uint64(1)) ^ (shifted_out << np.uint64(2))
    low ^= shifted_out << np.uint64(7)
    low ^= lo << shift
    out[:, 1:, 0] = low
    return out


@functools.cache
def _xts_tweak_table() -> np.ndarray:
    """(16 * 256, 64) uint64: row 256 p + v holds the 512 bytes of the 32
    tweaks of the T whose byte p is v and every other byte 0. T -> T * alpha^j
    is linear over GF(2), so a sector's tweaks are the XOR of the 16 rows its
    T's bytes pick: one gather and one XOR-reduce for a whole run of sectors.
    2 MiB, the same for every key: built once per process (a few ms), and
    only when an XTS cipher is made, never for a plain image; a position at
    a time, so that its temporaries stay small (built at once, they left
    the daemon 2 MiB more of heap than the table)."""
    table = np.empty((16 * 256, 2 * XTS_BLOCKS), np.uint64)
    v = np.arange(256, dtype=np.uint64)
    for p in range(16):
        t = np.zeros((256, 2), np.uint64)
        t[:, p // 8] = v << np.uint64(8 * (p % 8))
        table[256 * p : 256 * (p + 1)] = _xts_tweaks_by_shift(t).reshape(256, -1)
    return table


# Added to the (16, sectors) bytes of the Ts: their rows in _xts_tweak_table.
_XTS_TABLE_ROW = (np.arange(16, dtype=np.intp) * 256)[:, None]


class XtsFromEcb:
    """AES in XTS mode (IEEE 1619) from AES-ECB: for AES-192, which OpenSSL's
    XTS lacks, and for runs of sectors, where one ECB call beats a cipher
    context per sector (a test pins it to the library's XTS): for each
    sector T = E_K2(IV), and block j is E_K1(P xor T_j) xor T_j with
    T_j = T * alpha^j in GF(2^128). 512-byte sectors need no ciphertext
    stealing.

    The ECB contexts are made once and fed forever: ECB keeps no state
    between whole blocks, and making a context (the key schedule) is what
    costs a per-sector XTS context most of its time. The tweaks of a short
    run come from a table (_xts_tweak_table), of a long one from shifts of
    T (_xts_tweaks_by_shift)."""

    def __init__(self, key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        half = len(key) // 2
        k1 = Cipher(algorithms.AES(key[:half]), modes.ECB())
        self._k1_encrypt, self._k1_decrypt = k1.encryptor(), k1.decryptor()
        self._k2_encrypt = Cipher(algorithms.AES(key[half:]), modes.ECB()).encryptor()
        self._table = _xts_tweak_table()

    def tweaks(self, ivs: bytes) -> np.ndarray:
        """The (sectors, 64) little-endian 64-bit words of every sector's 32
        tweaks, from the sectors' IVS (16 bytes each)."""
        t = self._k2_encrypt.update(ivs)
        count = len(t) // 16
        if count <= XTS_TABLE_SECTORS:
            rows = np.frombuffer(t, np.uint8).reshape(count, 16).T + _XTS_TABLE_ROW
            return np.bitwise_xor.reduce(self._table.take(rows, axis=0), axis=0)
        return _xts_tweaks_by_shift(np.frombuffer(t, "<u8").reshape(count, 2)).reshape(count, 2 * XTS_BLOCKS)

    def run_into(self, data: bytes | bytearray | memoryview, ivs: bytes, encrypt: bool,
                 dst: bytearray | memoryview) -> None:
        """Encrypt or decrypt the sectors of DATA (IVS: 16 bytes each) into
        DST, which may be DATA itself: one ECB call between two XORs with
        the tweaks. The ECB call goes from one scratch buffer into another
        (with the 16 bytes of room update_into asks for): cryptography 51
        refuses an update_into whose input and output overlap."""
        tweaks = self.tweaks(ivs)
        count, words = tweaks.shape
        x = np.empty((count, words), np.uint64)
        np.bitwise_xor(np.frombuffer(data, "<u8").reshape(count, words), tweaks, out=x)
        out = np.empty(count * words + 2, np.uint64)
        ctx = self._k1_encrypt if encrypt else self._k1_decrypt
        ctx.update_into(x.data.cast("B"), out.data.cast("B"))
        np.bitwise_xor(out[: count * words].reshape(count, words), tweaks,
                       out=np.frombuffer(dst, "<u8").reshape(count, words))


# ---- the cipher of an image's data ---------------------------------------------------

class DiskCipher:
    """Encrypts and decrypts guest data clusters where they lie: sectors are
    numbered from the host offset (LUKS) or the guest offset (legacy AES).
    Buffers are whole, aligned sectors; the caller widens partial ones."""

    sector_size = LUKS_SECTOR_SIZE

    def __init__(self, cipher: SectorCipher, physical: bool, description: str,
                 master_key: bytes | None = None) -> None:
        self._cipher = cipher
        self.physical = physical
        self.description = description
        self._master_key = master_key

    @property
    def master_key(self) -> bytes | None:
        """The LUKS master key this cipher was unlocked with (None for legacy
        AES): what a new key slot seals (engine/keyslots.py), so that adding
        a passphrase needs no second unlock. Kept in memory only, as the
        cipher keeps it: never logged, formatted or written but sealed."""
        return self._master_key

    @property
    def batched(self) -> bool:
        """Its cipher decrypts a run of sectors at once (SectorCipher.batched)."""
        return self._cipher.batched

    def _sector(self, host: int, guest: int) -> int:
        return (host if self.physical else guest) // LUKS_SECTOR_SIZE

    def decrypt_into(self, buf: memoryview, host: int, guest: int) -> None:
        """Decrypt BUF (read from HOST, guest offset GUEST) in place."""
        self._cipher.decrypt_into(buf, self._sector(host, guest))

    def encrypt(self, data: bytes | bytearray | memoryview, host: int, guest: int) -> bytearray:
        """DATA as it must be stored at HOST."""
        return self._cipher.encrypt(data, self._sector(host, guest))


# ---- unlocking ------------------------------------------------------------------------

def passphrase_text(secret: bytes) -> bytes:
    """The passphrase as QEMU uses a secret: its bytes must be UTF-8 without a
    NUL (qcrypto_secret_lookup_as_utf8); nothing is stripped, so a key file
    ending in a newline has the newline in its passphrase."""
    if b"\0" in secret:
        raise PassphraseError("the passphrase contains a NUL byte, which QEMU secrets cannot hold")
    try:
        secret.decode("utf-8")
    except UnicodeDecodeError:
        raise PassphraseError("the passphrase is not valid UTF-8 (QEMU secrets must be)") from None
    return secret


def pbkdf2(hash_name: str, secret: bytes, salt: bytes, iterations: int, length: int) -> bytes:
    """PBKDF2-HMAC, from the `cryptography` library where it has the hash:
    its OpenSSL derives SHA-256 twice as fast as the one hashlib is built
    with here (OpenSSL 3.0), about as fast as QEMU's nettle, and the slot
    key's derivation is nearly all of the time an unlock takes. hashlib for
    ripemd160, which `cryptography` lacks."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

    if iterations > PBKDF2_MAX_ITERATIONS:
        raise UnsupportedFeatureError(f"a LUKS header asks for {iterations} PBKDF2 iterations: OpenSSL's "
                                      f"PBKDF2 takes at most {PBKDF2_MAX_ITERATIONS}")
    algorithm = getattr(hashes, HASHES[hash_name].upper(), None)
    if algorithm is not None:
        return PBKDF2HMAC(algorithm(), length, salt, iterations).derive(secret)
    try:
        return hashlib.pbkdf2_hmac(HASHES[hash_name], secret, salt, iterations, length)
    except ValueError:
        raise UnsupportedFeatureError(f"hash {hash_name} is not available in this Python's OpenSSL") from None


class _TrialThreads:
    """Up to WORKERS daemon threads that run key slot trials in the order
    submitted: an executor whose threads do not keep the process alive. A
    derivation cannot be stopped, and PBKDF2 counts are bounded only by
    OpenSSL (2^31 - 1 iterations a slot: ten minutes): with
    concurrent.futures' threads an interrupted unlock (Ctrl-C) would still
    wait for every derivation to end, at the `with` and again at exit. In a
    process that goes on after the interruption (the library's caller), a
    derivation under way runs to its end on its thread."""

    def __init__(self, workers: int) -> None:
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None] = \
            queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name="qcowfs-luks", daemon=True)
                         for _ in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        future: Future[T] = Future()
        self._queue.put((future, fn, args))
        return future

    def _work(self) -> None:
        while (task := self._queue.get()) is not None:
            future, fn, args = task
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as e:  # noqa: BLE001 - the caller's to raise
                    future.set_exception(e)

    def end(self, wait: bool) -> None:
        """Cancel what has not started; WAIT: until the threads are gone (a
        mount forks after the unlock: no thread of it may be running then)."""
        while True:
            try:
                task = self._queue.get_nowait()
            except queue.Empty:
                break
            if task is not None:
                task[0].cancel()
        for _ in self._threads:
            self._queue.put(None)
        if wait:
            for t in self._threads:
                t.join()


@dataclass(frozen=True)
class LuksVolume:
    """A LUKS header inside an image, checked, and its cipher settings."""

    header: LuksHeader
    spec: CipherSpec
    offset: int           # of the LUKS header in the image file
    length: int           # of the header and key material (the extension's length)

    @classmethod
    def parse(cls, raw: bytes, offset: int, length: int) -> "LuksVolume":
        h = LuksHeader.parse(raw)
        vol = cls(h, CipherSpec.of(h), offset, length)
        vol._check()
        return vol

    def _check(self) -> None:
        """What QEMU's qcrypto_block_luks_check_header refuses, and counts of 0
        iterations: one clear line each, before any PBKDF2 runs. Counts are
        not bounded otherwise, as in QEMU and cryptsetup: a real image may ask
        for many (an iter-time of 25 s made 106 million here, a faster machine
        makes more for the same time), and an unlock stops at once on Ctrl-C
        or SIGTERM (_TrialThreads)."""
        h = self.header
        if h.mk_digest_iterations < 1:
            raise InvalidImageError("LUKS header asks for 0 PBKDF2 iterations for the master key digest")
        used: list[tuple[int, int, int]] = []
        for i, s in enumerate(h.key_slots):
            if s.active not in (LUKS_KEY_ENABLED, LUKS_KEY_DISABLED):
                raise InvalidImageError(f"LUKS header is corrupted: key slot {i} state {s.active:#x}")
            if not s.enabled:
                continue
            if s.iterations < 1:
                raise InvalidImageError(f"LUKS key slot {i} asks for 0 PBKDF2 iterations")
            start, end = self.material_range(i)
            for j, a, b in used:
                if start < b and a < end:
                    raise InvalidImageError(f"LUKS key slots {j} and {i} overlap")
            used.append((i, start, end))
        if not used:
            raise InvalidImageError("LUKS header has no active key slot")

    def material_range(self, i: int) -> tuple[int, int]:
        """Where key slot I's material lies (whole sectors), in bytes from the
        start of the LUKS header: inside the LUKS area, after the header."""
        s = self.header.key_slots[i]
        if s.stripes != LUKS_STRIPES:
            raise InvalidImageError(f"LUKS key slot {i} is corrupted: {s.stripes} stripes, not {LUKS_STRIPES}")
        start = s.key_offset * LUKS_SECTOR_SIZE
        end = start + s.material_length(self.header.key_bytes)
        if start < LUKS_HEADER_SIZE or end > self.length:
            raise InvalidImageError(f"LUKS key slot {i} key material lies outside the LUKS header area")
        return start, end

    def material_apart(self, i: int) -> tuple[int, int]:
        """material_range of key slot I, which must also lie apart from every
        other active slot's: what a slot about to be written or erased needs
        (an inactive slot's fields are only checked here, as its material is
        only touched then)."""
        start, end = self.material_range(i)
        for j in self.active_slots:
            if j != i:
                a, b = self.material_range(j)
                if start < b and a < end:
                    raise InvalidImageError(f"LUKS key slots {min(i, j)} and {max(i, j)} overlap")
        return start, end

    @property
    def active_slots(self) -> list[int]:
        return [i for i, s in enumerate(self.header.key_slots) if s.enabled]

    def unlock(self, passphrases: Iterable[bytes], read: Callable[[int, int], bytes]) -> DiskCipher:
        """The data cipher, from the first of PASSPHRASES (tried in order, and
        taken one at a time: a prompt among them asks only once the ones
        before failed) that opens a key slot. READ(offset, length) reads the
        image file. Raises PassphraseError if none does."""
        tried = 0
        for passphrase in passphrases:
            tried += 1
            cipher = self._unlock_with(passphrase, read)
            if cipher is not None:
                return cipher
        raise PassphraseError("no key slot matches this passphrase" if tried == 1 else
                              f"no key slot matches any of the {tried} passphrases given" if tried else
                              "no passphrase given")

    def _unlock_with(self, passphrase: bytes, read: Callable[[int, int], bytes]) -> DiskCipher | None:
        """The data cipher, from the first key slot PASSPHRASE opens (in slot
        order, as QEMU's qcrypto_block_luks_find_key); None if none does."""
        trials = self._trials(passphrase_text(passphrase), self.active_slots, read)
        try:
            for _, key in trials:
                if key is not None:
                    return self._cipher(key)
        finally:
            trials.close()  # (now, not when collected: no trial thread outlives the call)
        return None

    def opened_by(self, passphrase: bytes, slots: Iterable[int], read: Callable[[int, int], bytes]) -> list[int]:
        """Which of SLOTS PASSPHRASE opens (every one tried, as QEMU's key
        slot erase does; an inactive slot opens with nothing)."""
        enabled = [i for i in slots if self.header.key_slots[i].enabled]
        return [i for i, key in self._trials(passphrase_text(passphrase), enabled, read) if key is not None]

    def _trials(self, secret: bytes, slots: list[int], read: Callable[[int, int], bytes]
                ) -> Generator[tuple[int, bytes | None], None, None]:
        """(slot, master key if SECRET opens it else None) for each of SLOTS
        (active ones), in slot order.

        With several slots they are tried at once, one thread per core:
        `cryptography`'s PBKDF2 releases the GIL, so a wrong passphrase on
        an image with two slots costs one slot's derivation on two cores,
        not two in a row (QEMU tries them one after the other). The key
        material is read here, on the caller's thread, in slot order; what a
        slot's trial raises is raised in its turn, as the search one slot at
        a time would. Closed early (the caller found its slot), at most one
        trial per core beyond it runs to its end (a derivation cannot be
        stopped): the threads are gone once the generator is closed (a
        mount forks after the unlock). One slot or one core: one trial at a
        time."""
        workers = max(1, min(len(slots), os.cpu_count() or 1))
        trials: list[tuple[int, Future[bytes | None]]] = []
        unreadable: InvalidImageError | None = None
        pool = _TrialThreads(workers)
        interrupted = True
        try:
            for i in slots:
                try:
                    material = self._material(i, read)
                except InvalidImageError as e:
                    unreadable = e   # (no slot after it would be tried one at a time)
                    break
                trials.append((i, pool.submit(self._try_material, i, secret, material)))
            for i, trial in trials:
                yield i, trial.result()
            interrupted = False
        except GeneratorExit:
            interrupted = False
            raise
        finally:
            pool.end(wait=not interrupted)
        if unreadable is not None:
            raise unreadable

    def _material(self, i: int, read: Callable[[int, int], bytes]) -> bytes:
        """Key slot I's split key material, read from the image file."""
        slot = self.header.key_slots[i]
        length = slot.material_length(self.header.key_bytes)
        material = read(self.offset + slot.key_offset * LUKS_SECTOR_SIZE, length)
        if len(material) < length:
            raise InvalidImageError(f"LUKS key slot {i} key material lies past the end of the image file")
        return material

    def _try_material(self, i: int, secret: bytes, material: bytes) -> bytes | None:
        """The master key if SECRET opens key slot I (its key MATERIAL read), else None."""
        h, spec = self.header, self.spec
        slot = h.key_slots[i]
        slot_key = pbkdf2(spec.hash, secret, slot.salt, slot.iterations, h.key_bytes)
        split = SectorCipher(spec, slot_key).decrypt(material, 0)
        candidate = af_merge(split, h.key_bytes, slot.stripes, spec.hash)
        digest = pbkdf2(spec.hash, candidate, h.mk_digest_salt, h.mk_digest_iterations, LUKS_DIGEST_LEN)
        return candidate if hmac.compare_digest(digest, h.mk_digest) else None

    def _cipher(self, master_key: bytes) -> DiskCipher:
        spec = self.spec
        return DiskCipher(SectorCipher(spec, master_key), physical=True,
                          description=f"LUKS {spec.cipher_alg}-{spec.mode}-{spec.ivgen}", master_key=master_key)


def seal_master_key(spec: CipherSpec, master_key: bytes, passphrase: bytes, salt: bytes, iterations: int,
                    stripes: int = LUKS_STRIPES) -> bytes:
    """A key slot's material (QEMU's qcrypto_block_luks_store_key): MASTER_KEY
    split into STRIPES anti-forensic stripes (random from the OS), encrypted
    with the key PBKDF2 derives from PASSPHRASE (SALT, ITERATIONS), sectors
    numbered from 0. As long as QEMU writes, key bytes x stripes: a length
    that is not whole sectors (24-byte keys) is cut from whole sectors,
    which in every mode but XTS (whose keys always give whole sectors)
    encrypt the same prefix. The inverse of LuksVolume._try_material."""
    slot_key = pbkdf2(spec.hash, passphrase_text(passphrase), salt, iterations, spec.key_bytes)
    n = len(master_key) * stripes
    split = af_split(master_key, stripes, spec.hash, os.urandom(len(master_key) * (stripes - 1)))
    split += bytes(-n % LUKS_SECTOR_SIZE)
    return bytes(SectorCipher(spec, slot_key).encrypt(split, 0)[:n])


def legacy_aes_cipher(passphrase: bytes) -> DiskCipher:
    """QEMU's legacy qcow2 AES (crypto/block-qcow.c): the key is the first 16
    bytes of the password, zero padded; AES-128-CBC, plain64 IVs, sectors by
    guest offset. There is no check value: a wrong password reads garbage."""
    key = passphrase_text(passphrase)[:QCOW_AES_KEY_LEN].ljust(QCOW_AES_KEY_LEN, b"\0")
    # (no PBKDF2 here: the hash field is unused)
    spec = CipherSpec("aes-128", "cbc", "plain64", None, "sha256", QCOW_AES_KEY_LEN)
    return DiskCipher(SectorCipher(spec, key), physical=False, description="legacy AES-128-CBC")
