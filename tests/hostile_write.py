"""Hostile images written to (issue 23): a seeded generator of damaged images and
write sessions, and the judge of "never worse than it was".

A case is one seed. The seed picks a base layout (built once per process with
qemu-img / qemu-io: cluster sizes 512 B - 64 KiB, refcount widths 1 and 16, v2
and v3, internal snapshots, persistent bitmaps, compressed clusters, extended
L2 entries, a backing file, lazy refcounts, zero clusters, an external data file
(data_file, data_file_raw); every 64 KiB chunk of the tracked guest ranges written
with its own qemu-io patterns), one structure-aware mutation (found by parsing the
clean base image: header fields, L1 and L2 entries, compressed descriptors,
extended-L2 bitmaps, refcount table entries, refcounts of used clusters, the
snapshot table and snapshot L1 tables, the bitmap directory and bitmap tables, the
external data file's feature bits and name extension, or a bit flip inside one of
those), and a session of 4-10 writes (pattern or zero, 4 KiB - 128 KiB, most of
them over the guest range the mutation concerns) interleaved with flushes.

Data-file layouts (DATA_FILE_LAYOUTS) name their data file relative ("disk.data"),
and QEMU 7.2 resolves that name against its working directory, not the image's:
so every copy of a case (before/, a/, b/, c/ in the case's directory) is a
directory of its own holding disk.qcow2 and its own copies of the backing file and
data file under the names the header gives, every QEMU tool runs in that directory
(qemu_run, qemu_popen), and so does qcowfs's child. Their L2 entries point into the
data file (refcounts do not cover it); the "datafile" family damages only the qcow2
file (the incompatible data-file bit, the data_file_raw autoclear bit, the name:
missing, NULs, length 0 / short / huge, the image itself, the backing file).

The session runs with QEMU (qemu-io, overlap-check=all) on copy A and through
qcowfs (`qcowfs.aio.Image(path, "r+")`, prepare(), disk.write / disk.zero /
disk.flush, close(), in a killable child) on copy B. A third copy is opened
read-only by qcowfs and read entirely. The judge (issue 23, "never worse than
it was"):

(a) qcowfs neither crashes, hangs, nor raises anything but a QcowError with a
    one-line message;
(b) `qemu-img check` of B counts no more corruptions than max(before, after
    QEMU on A), and can still check B if it could check the image before;
(c) every 64 KiB chunk QEMU read before (qemu-nbd, chunk by chunk, a fresh
    server after each error as QEMU makes the whole image unusable after a
    fatal corruption) QEMU still reads on B;
(d) what QEMU reads on B is the old content overlaid with qcowfs's acknowledged
    writes (a write is acknowledged when it returned and the next flush
    returned): a byte last written by an acknowledged write holds its data
    (unless a later, failed write may have replaced it), a byte under failed or
    unacknowledged writes only holds its old value or one of theirs, every other
    byte its old value; an acknowledged write over a chunk QEMU could not read
    before must be readable by QEMU afterwards (read over its exact range);
(e) a read-only open changes no byte of the file, and what it serves of a chunk
    QEMU reads is what QEMU reads;
and internal snapshots and the backing file keep their content.

Outcomes: refused (open or prepare raised a QcowError), clean (every operation
succeeded), corrupt (qcowfs marked the image corrupt), errors (some operations
failed, no corrupt mark), violation (any rule broken); QEMU's session is
"crashed" when qemu-io was killed by a signal (an assertion of QEMU's). Each violation has a
class (unreadable-after, acked-lost, untouched-changed, failed-write-garbage,
acked-unreadable, acked-unopenable, unopenable-after, check-worse, check-fails,
magic-lost, snapshot-changed, backing-changed, crash, hang, bad-message,
ro-changed-file, ro-read-differs, other-copy-changed: qcowfs's session changed
a file of another copy's directory, flush-first-sign: the first error was a
flush, after writes that went astray), and says whether QEMU's own session on
copy A breaks the same rule ("QEMU too"): the issue asks qcowfs never to make
an image worse, whatever QEMU does, so both fail.

Run `python tests/hostile_write.py --seed N` to reproduce one case (verbose,
`--keep DIR` keeps the damaged image); `--cases N` / `--minutes M` / `--seeds
A,B,...` (`--jobs J`, `--start S`, `--stats FILE`) run many and print the
outcome counts and every violation class with a seed that shows it. A seed
names the same case only for the same version of this file (and of QEMU).
Without `--layout`, a seed draws a data-file layout in about 14% of the cases
(from a second generator of the seed: every other seed names the case it named
before data-file layouts existed). `--layout SPEC` (names or fnmatch patterns,
comma-separated, or "data-file" for all data-file layouts) draws only those
layouts, the family cycling by seed through the families that apply to them
(plus the data-file family, twice): a seed then names another case, and its
report's reproduce line carries the same --layout.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import fnmatch
import hashlib
import io
import json
import logging
import multiprocessing
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np

from corruption import (COMPRESSED, COPIED, OFFSET_MASK, ZERO_FLAG, QCOWFS_TIMEOUT,
                        in_child, snapshot_entries)
from images import EXT_BITMAPS, EXT_DATA_FILE, FIELDS, GiB, Header, KiB, MiB, TiB, create, qimg, qio

CHUNK = 64 * KiB
QEMU_TIMEOUT = 60
INCOMPAT_DIRTY, INCOMPAT_CORRUPT, INCOMPAT_EXTL2, INCOMPAT_COMPRESSION = 1, 2, 16, 8
BAD_TEXT = ("Traceback", "internal error", "OverflowError", "Exception")


# ==========================================================================
# layouts

@dataclass(frozen=True)
class Layout:
    name: str
    cluster_size: int
    vsize: int
    regions: tuple[tuple[int, int], ...]       # tracked guest ranges (64 KiB aligned)
    compat: str = "1.1"
    refcount_bits: int = 16
    compress: str | None = None                # compressed clusters: "zlib" / "zstd"
    snapshots: int = 0
    bitmaps: bool = False
    backing: bool = False
    extended_l2: bool = False
    zeros: bool = False                        # zero clusters (write -z, with and without -u)
    lazy: bool = False
    data_file: str = ""                        # external data file DATA_FILE: "file", or "raw" (data_file_raw)

    @property
    def v3(self) -> bool:
        return self.compat != "0.10"


LAYOUTS: dict[str, Layout] = {lay.name: lay for lay in (
    Layout("c64k-1g", 64 * KiB, GiB, ((0, 4 * MiB), (512 * MiB, 2 * MiB)), compress="zlib", zeros=True),
    Layout("c4k-rc1", 4 * KiB, 6 * MiB, ((0, 6 * MiB),), refcount_bits=1, zeros=True),
    Layout("c512", 512, 2 * MiB, ((0, 2 * MiB),), compress="zlib"),
    Layout("c64k-v2", 64 * KiB, 4 * MiB, ((0, 4 * MiB),), compat="0.10", compress="zlib"),
    Layout("c4k-v2-snap", 4 * KiB, 4 * MiB, ((0, 4 * MiB),), compat="0.10", snapshots=1),
    Layout("c64k-snap2", 64 * KiB, 4 * MiB, ((0, 4 * MiB),), snapshots=2, compress="zlib"),
    Layout("c64k-bitmaps", 64 * KiB, 4 * MiB, ((0, 4 * MiB),), bitmaps=True, zeros=True),
    Layout("c4k-snap-bitmaps", 4 * KiB, 4 * MiB, ((0, 4 * MiB),), snapshots=1, bitmaps=True),
    Layout("c4k-zstd", 4 * KiB, 4 * MiB, ((0, 4 * MiB),), compress="zstd", zeros=True),
    Layout("c64k-extl2", 64 * KiB, 4 * MiB, ((0, 4 * MiB),), extended_l2=True, zeros=True, compress="zlib"),
    Layout("c16k-extl2-backing", 16 * KiB, 4 * MiB, ((0, 4 * MiB),), extended_l2=True, backing=True,
           zeros=True),
    Layout("c64k-backing", 64 * KiB, 4 * MiB, ((0, 4 * MiB),), backing=True, zeros=True),
    Layout("c64k-lazy-rc1", 64 * KiB, 4 * MiB, ((0, 4 * MiB),), lazy=True, refcount_bits=1),
    Layout("c512-v2", 512, MiB, ((0, MiB),), compat="0.10"),
)}

# An external data file, named relative (DATA_FILE) in the header: QEMU 7.2 resolves that
# name against its working directory, so every copy of such an image lives in a directory
# of its own with its own copy of the data file, and every QEMU tool runs in that directory
# (qemu_run / qemu_popen). QEMU refuses a data file with v2, internal snapshots and
# compressed clusters, and data_file_raw with a backing file: none of those here.
DATA_FILE = "disk.data"
DATA_FILE_LAYOUTS: dict[str, Layout] = {lay.name: lay for lay in (
    Layout("c64k-df-bitmaps", 64 * KiB, 4 * MiB, ((0, 4 * MiB),), data_file="file", bitmaps=True, zeros=True),
    Layout("c4k-df-raw", 4 * KiB, 4 * MiB, ((0, 4 * MiB),), data_file="raw", zeros=True),
    Layout("c16k-df-extl2-backing", 16 * KiB, 4 * MiB, ((0, 4 * MiB),), data_file="file", extended_l2=True,
           backing=True, zeros=True),
    Layout("c64k-df-raw-bitmaps-lazy", 64 * KiB, 4 * MiB, ((0, 4 * MiB),), data_file="raw", bitmaps=True,
           lazy=True, zeros=True),
    Layout("c512-df-rc1", 512, 2 * MiB, ((0, 2 * MiB),), data_file="file", refcount_bits=1, zeros=True),
    Layout("c64k-df-raw-extl2", 64 * KiB, 4 * MiB, ((0, 4 * MiB),), data_file="raw", extended_l2=True,
           zeros=True),
    Layout("c4k-df-backing-lazy", 4 * KiB, 4 * MiB, ((0, 4 * MiB),), data_file="file", backing=True, lazy=True,
           zeros=True),
)}
ALL_LAYOUTS: dict[str, Layout] = {**LAYOUTS, **DATA_FILE_LAYOUTS}


def _pattern(chunk: int, piece: int, phase: int) -> int:
    """Base data bytes: 0x01..0x7e (session writes use 0x80..0xfe, zero writes 0)."""
    return (chunk * 31 + piece * 7 + phase * 59) % 126 + 1


def _chunks(lay: Layout) -> list[int]:
    return [off for start, ln in lay.regions for off in range(start, start + ln, CHUNK)]


def _fill_cmds(lay: Layout, rng: random.Random, phase: int, density: float) -> list[str]:
    """qemu-io commands giving the tracked chunks known, varied content."""
    cs = lay.cluster_size
    first: list[str] = []          # compressed writes go to unallocated clusters: before the rest
    rest: list[str] = []
    piece = 16 * KiB if cs >= 4 * KiB else 8 * KiB
    for n, c in enumerate(_chunks(lay)):
        if rng.random() > density:
            continue
        kind = rng.random()
        if lay.compress and phase == 0 and kind < 0.15:
            for k, off in enumerate(range(c, c + min(CHUNK, 4 * cs), cs)):
                first.append(f"write -q -c -P {_pattern(n, k, phase):#x} {off} {cs}")
            continue
        for k, off in enumerate(range(c, c + CHUNK, piece)):
            if rng.random() < 0.8:
                rest.append(f"write -q -P {_pattern(n, k, phase):#x} {off} {piece}")
        if rng.random() < 0.3:
            rest.append(f"write -q -P {_pattern(n, 9, phase):#x} {c + rng.randrange(CHUNK - 6000)} "
                        f"{rng.randint(1, 5000)}")
        if lay.zeros and lay.v3 and rng.random() < 0.2:
            z = c + rng.randrange(0, CHUNK // cs) * cs
            rest.append(f"write -q -z {'-u ' if rng.random() < 0.5 else ''}{z} {cs}")
    return first + rest


def build_layout(lay: Layout, d: Path) -> Path:
    """The clean base image of LAY in D (D/disk.qcow2, D/base.qcow2 for a backing file, D/DATA_FILE
    for an external data file). Every QEMU tool runs in D (a relative data file name is resolved
    against the working directory)."""
    d = d.resolve()
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"layout-{lay.name}")
    opts: dict[str, Any] = {"cluster_size": lay.cluster_size, "compat": lay.compat}
    if lay.refcount_bits != 16:
        opts["refcount_bits"] = lay.refcount_bits
    if lay.extended_l2:
        opts["extended_l2"] = "on"
    if lay.compress == "zstd":
        opts["compression_type"] = "zstd"
    if lay.lazy:
        opts["lazy_refcounts"] = "on"
    if lay.data_file:
        opts["data_file"] = DATA_FILE
        if lay.data_file == "raw":
            opts["data_file_raw"] = "on"
    img = d / "disk.qcow2"
    if lay.backing:
        base = create(d / "base.qcow2", lay.vsize, cwd=d)
        base_lay = Layout("base", 64 * KiB, lay.vsize, lay.regions)
        qio(base, *_fill_cmds(base_lay, random.Random("base"), 7, 1.0), cwd=d)
        create(img, lay.vsize, backing="base.qcow2", backing_fmt="qcow2", cwd=d, **opts)
    else:
        create(img, lay.vsize, cwd=d, **opts)
    if lay.bitmaps:
        qimg("bitmap", "--add", "--granularity", "64K", img, "b0", cwd=d)
    qio(img, *_fill_cmds(lay, rng, 0, 0.4 if lay.backing else 0.75), cwd=d)
    if lay.bitmaps:
        qimg("bitmap", "--add", "--granularity", "16K", "--disable", img, "b1", cwd=d)
        qimg("bitmap", "--merge", "b0", img, "b1", cwd=d)
    for s in range(lay.snapshots):
        qimg("snapshot", "-c", f"s{s}", img, cwd=d)
        qio(img, *_fill_cmds(lay, rng, s + 1, 0.3), cwd=d)
    if lay.data_file and not (d / DATA_FILE).exists():
        raise RuntimeError(f"{lay.name}: qemu-img made no {DATA_FILE} in {d}")
    return img


class BaseCache:
    """Base images and their structure maps, built once per process in DIRECTORY."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory).resolve()
        self._maps: dict[str, ImgMap] = {}

    def get(self, name: str) -> "ImgMap":
        if name not in self._maps:
            d = self.dir / name
            img = d / "disk.qcow2"
            if not (d / ".done").exists():
                if d.exists():
                    shutil.rmtree(d)
                build_layout(ALL_LAYOUTS[name], d)
                (d / ".done").touch()
            self._maps[name] = parse(img, ALL_LAYOUTS[name])
        return self._maps[name]


# ==========================================================================
# the structure map of a clean base image

@dataclass
class L2Ent:
    guest: int
    offset: int                # file offset of the entry
    word: int
    bitmap: int | None         # extended L2: the subcluster bitmap word
    l1_index: int


@dataclass
class BitmapEnt:
    entry_offset: int
    table_offset: int
    table_size: int
    flags: int
    granularity_bits: int
    name: str


@dataclass
class ImgMap:
    path: Path
    layout: Layout
    h: Any
    cs: int
    cbits: int
    version: int
    ext: bool
    esize: int
    l2n: int
    rc_bits: int
    file_size: int
    l1: list[int]
    l2_tables: dict[int, int]
    l2e: list[L2Ent]
    reftable: list[int]
    refcounts: dict[int, int]          # cluster -> refcount (non-zero ones)
    kinds: dict[int, str]              # cluster -> what it holds
    guest_of: dict[int, int]           # data cluster -> a guest offset mapped there
    snaps: list[Any]
    snap_l1: list[list[int]]
    bitmaps: list[BitmapEnt]
    bm_dir: tuple[int, int, int] | None    # (extension data offset, directory offset, size)
    bm_table_entries: list[tuple[int, int]]
    # an external data file: L2 entries point into it (GUEST_OF and KINDS are of the qcow2 file only)
    data_file: bool = False
    df_size: int = 0                                   # its size
    df_guest_of: dict[int, int] = field(default_factory=dict)    # its cluster -> a guest offset mapped there
    df_ext: tuple[int, int, int] | None = None         # its name extension: (type field, data, length)

    @property
    def l1_coverage(self) -> int:
        return self.l2n * self.cs

    def tracked(self, guest: int) -> bool:
        return any(s <= guest < s + n for s, n in self.layout.regions)

    def first_of(self, kind: str) -> int | None:
        cl = sorted(c for c, k in self.kinds.items() if k == kind)
        return cl[0] * self.cs if cl else None

    def clusters_of(self, kind: str) -> list[int]:
        return sorted(c for c, k in self.kinds.items() if k == kind)

    def compressed_span(self, word: int) -> tuple[int, int]:
        return compressed_span(self.cbits, word)


def compressed_span(cbits: int, word: int) -> tuple[int, int]:
    """(host offset, length) of a compressed L2 entry's data."""
    x = 62 - (cbits - 8)
    off = word & ((1 << x) - 1)
    nsect = (word >> x) & ((1 << (cbits - 8)) - 1)
    return off, (nsect + 1) * 512 - (off % 512)


def _u64(data: bytes, off: int) -> int:
    return struct.unpack_from(">Q", data, off)[0] if 0 <= off and off + 8 <= len(data) else 0


def _refcounts_of_block(block: bytes, bits: int) -> np.ndarray:
    if bits == 1:
        return np.unpackbits(np.frombuffer(block, np.uint8), bitorder="little").astype(np.uint64)
    if bits in (2, 4):
        bytes_ = np.frombuffer(block, np.uint8)
        per = 8 // bits
        return np.stack([(bytes_ >> (i * bits)) & ((1 << bits) - 1) for i in range(per)], 1).reshape(-1) \
            .astype(np.uint64)
    dt = {8: ">u1", 16: ">u2", 32: ">u4", 64: ">u8"}[bits]
    return np.frombuffer(block, dt).astype(np.uint64)


def parse(img: Path, lay: Layout) -> ImgMap:
    h: Any = Header(img)
    data = img.read_bytes()
    cs, cbits = h.cluster_size, h.cluster_bits
    ext = bool(h.incompatible_features & INCOMPAT_EXTL2)
    esize = 16 if ext else 8
    l2n = cs // esize
    kinds: dict[int, str] = {}

    def mark(off: int, n: int, what: str) -> None:
        for c in range(off // cs, (off + max(n, 1) + cs - 1) // cs):
            kinds.setdefault(c, what)

    mark(0, cs, "header")
    l1 = [_u64(data, h.l1_table_offset + 8 * i) for i in range(h.l1_size)]
    mark(h.l1_table_offset, 8 * h.l1_size, "L1 table")
    mark(h.refcount_table_offset, h.refcount_table_clusters * cs, "refcount table")
    reftable = [_u64(data, h.refcount_table_offset + 8 * i) for i in range(h.refcount_table_clusters * cs // 8)]
    rc_bits = 1 << h.refcount_order
    per_block = cs * 8 // rc_bits
    refcounts: dict[int, int] = {}
    for i, e in enumerate(reftable):
        rb = e & OFFSET_MASK
        if not rb:
            continue
        mark(rb, cs, "refcount block")
        arr = _refcounts_of_block(data[rb:rb + cs], rc_bits)
        for nz in np.nonzero(arr)[0].tolist():
            refcounts[i * per_block + nz] = int(arr[nz])
    l2_tables: dict[int, int] = {}
    l2e: list[L2Ent] = []
    guest_of: dict[int, int] = {}
    df_guest_of: dict[int, int] = {}
    snap_l2: set[int] = set()
    for i, e in enumerate(l1):
        t = e & OFFSET_MASK
        if not t:
            continue
        l2_tables[i] = t
        mark(t, cs, "L2 table")
        for j in range(l2n):
            guest = (i * l2n + j) * cs
            if guest >= h.size:
                break
            eo = t + j * esize
            w = _u64(data, eo)
            ent = L2Ent(guest, eo, w, _u64(data, eo + 8) if ext else None, i)
            l2e.append(ent)
            if w & COMPRESSED:
                m = compressed_span(cbits, w)
                mark(m[0], m[1], "compressed data")
                guest_of.setdefault(m[0] // cs, guest)
            elif w & OFFSET_MASK and lay.data_file:
                df_guest_of.setdefault((w & OFFSET_MASK) // cs, guest)
            elif w & OFFSET_MASK:
                mark(w & OFFSET_MASK, cs, "data")
                guest_of.setdefault((w & OFFSET_MASK) // cs, guest)
    snaps = snapshot_entries(img) if h.nb_snapshots else []
    if snaps:
        mark(h.snapshots_offset, sum(s.length for s in snaps), "snapshot table")
    snap_l1: list[list[int]] = []
    for s in snaps:
        mark(s.l1_table_offset, 8 * s.l1_size, "snapshot L1 table")
        tab = [_u64(data, s.l1_table_offset + 8 * i) for i in range(s.l1_size)]
        snap_l1.append(tab)
        for e in tab:
            t = e & OFFSET_MASK
            if t and t not in l2_tables.values():
                snap_l2.add(t)
                mark(t, cs, "snapshot L2 table")
                for j in range(l2n):
                    w = _u64(data, t + j * esize)
                    if w & COMPRESSED:
                        m = compressed_span(cbits, w)
                        mark(m[0], m[1], "compressed data")
                    elif w & OFFSET_MASK:
                        mark(w & OFFSET_MASK, cs, "snapshot data")
    bitmaps: list[BitmapEnt] = []
    bm_dir = None
    bm_table_entries: list[tuple[int, int]] = []
    try:
        _, _, ext_data, _ = h.ext(EXT_BITMAPS)
        nb, _res, dsize, doff = struct.unpack_from(">IIQQ", h.raw, ext_data)
        bm_dir = (ext_data, doff, dsize)
        mark(doff, dsize, "bitmap directory")
        pos = doff
        for _ in range(nb):
            toff, tsize, flags, _typ, gbits, nlen, xlen = struct.unpack_from(">QIIBBHI", data, pos)
            name = data[pos + 24 + xlen: pos + 24 + xlen + nlen].decode(errors="replace")
            bitmaps.append(BitmapEnt(pos, toff, tsize, flags, gbits, name))
            mark(toff, 8 * tsize, "bitmap table")
            for k in range(tsize):
                e = _u64(data, toff + 8 * k)
                bm_table_entries.append((toff + 8 * k, e))
                if e & OFFSET_MASK:
                    mark(e & OFFSET_MASK, cs, "bitmap data")
            pos += (24 + xlen + nlen + 7) // 8 * 8
    except KeyError:
        pass
    df_ext = None
    df_size = 0
    if lay.data_file:
        typ_off, ext_data, ext_len = h.ext(EXT_DATA_FILE)[1:]
        df_ext = (typ_off, ext_data, ext_len)
        df_size = (img.parent / DATA_FILE).stat().st_size
    return ImgMap(img, lay, h, cs, cbits, h.version, ext, esize, l2n, rc_bits, len(data), l1, l2_tables,
                  l2e, reftable, refcounts, kinds, guest_of, snaps, snap_l1, bitmaps, bm_dir, bm_table_entries,
                  bool(lay.data_file), df_size, df_guest_of, df_ext)


# ==========================================================================
# mutations

@dataclass
class Mutation:
    family: str
    kind: str
    desc: str
    patches: list[tuple[int, bytes]] = field(default_factory=list)
    hints: list[tuple[int, int]] = field(default_factory=list)     # guest ranges the damage concerns

    @property
    def name(self) -> str:
        return f"{self.family}/{self.kind}"


def q(v: int) -> bytes:
    return struct.pack(">Q", v & (2**64 - 1))


def u32(v: int) -> bytes:
    return struct.pack(">I", v & (2**32 - 1))


class Mutator:
    """Structure-aware mutations of one base image (its clean map M), from RNG."""

    def __init__(self, m: ImgMap, rng: random.Random) -> None:
        self.m, self.rng = m, rng

    # ---- helpers ---------------------------------------------------------------------

    def eof(self) -> int:
        return (self.m.file_size + self.m.cs - 1) // self.m.cs * self.m.cs

    def targets(self, exclude: int | None = None) -> dict[str, int]:
        """Host offsets (cluster aligned) an entry can be made to point at."""
        m = self.m
        out: dict[str, int] = {}
        for kind in ("L1 table", "refcount table", "refcount block", "L2 table", "snapshot table",
                     "snapshot L1 table", "snapshot L2 table", "bitmap directory", "bitmap table",
                     "bitmap data", "data", "compressed data", "snapshot data"):
            cl = [c * m.cs for c in m.clusters_of(kind) if c * m.cs != exclude]
            if cl:
                out[kind] = self.rng.choice(cl)
        out["header cluster"] = 0
        out["just past EOF"] = self.eof()
        out["far past EOF (1 TiB)"] = TiB
        return out

    def host_eof(self) -> int:
        """The end of the file data clusters live in (the data file, if any), cluster aligned."""
        if not self.m.data_file:
            return self.eof()
        return (self.m.df_size + self.m.cs - 1) // self.m.cs * self.m.cs

    def data_targets(self, exclude: int | None = None) -> dict[str, int]:
        """Offsets in the external data file an L2 entry can be made to point at."""
        m, cs = self.m, self.m.cs
        out: dict[str, int] = {}
        mapped = [c * cs for c in sorted(m.df_guest_of) if c * cs != exclude]
        if mapped:
            out["data-file cluster of another guest cluster"] = self.rng.choice(mapped)
        unmapped = [c * cs for c in range(self.host_eof() // cs) if c not in m.df_guest_of and c * cs != exclude]
        if unmapped:
            out["unmapped data-file cluster"] = self.rng.choice(unmapped)
        out["just past the data file's end"] = self.host_eof()
        out["far past EOF (1 TiB)"] = TiB
        return out

    def pick_target(self, exclude: int | None = None, no_header: bool = False) -> tuple[str, int]:
        t = self.targets(exclude)
        if no_header:
            t.pop("header cluster", None)
        name = self.rng.choice(sorted(t))
        return name, t[name]

    def misalign(self, off: int) -> int | None:
        if self.m.cs <= 512:
            return None
        return off + self.rng.choice([512, self.m.cs // 2, self.m.cs - 512])

    def guest_range_of_cluster(self, host: int, data: bool = False) -> list[tuple[int, int]]:
        """The guest cluster mapped at HOST of the image file (DATA: of the data file, if any)."""
        g = (self.m.df_guest_of if data and self.m.data_file else self.m.guest_of).get(host // self.m.cs)
        return [(g, self.m.cs)] if g is not None else []

    def unallocated_hints(self) -> list[tuple[int, int]]:
        """Guest clusters with nothing allocated: a write there allocates."""
        free = [e.guest for e in self.m.l2e if e.word == 0 and (e.bitmap or 0) == 0 and self.m.tracked(e.guest)]
        self.rng.shuffle(free)
        return [(g, self.m.cs) for g in free[:4]]

    def shared_hints(self) -> list[tuple[int, int]]:
        """Guest clusters shared with a snapshot (no COPIED flag): a write copies them."""
        sh = [e.guest for e in self.m.l2e if e.word & OFFSET_MASK and not e.word & COPIED
              and self.m.tracked(e.guest)]
        self.rng.shuffle(sh)
        return [(g, self.m.cs) for g in sh[:4]]

    def l1_hint(self, i: int) -> list[tuple[int, int]]:
        cov = self.m.l1_coverage
        out = []
        for s, n in self.m.layout.regions:
            lo, hi = max(s, i * cov), min(s + n, (i + 1) * cov)
            if lo < hi:
                out.append((lo, hi - lo))
        return out

    # ---- families ---------------------------------------------------------------------

    def family_header(self) -> Mutation | None:
        m, r, h = self.m, self.rng, self.m.h
        choices: list[tuple[str, str, int | None]] = [
            ("l1_size", "l1_size - 1", h.l1_size - 1), ("l1_size", "l1_size + 1", h.l1_size + 1),
            ("l1_size", "l1_size + 100", h.l1_size + 100), ("l1_size", "l1_size 0", 0),
            ("l1_size", "l1_size 2^25", 1 << 25),
            ("l1_table_offset", "l1_table_offset + cluster", h.l1_table_offset + m.cs),
            ("l1_table_offset", "l1_table_offset -> an L2 table", m.first_of("L2 table")),
            ("l1_table_offset", "l1_table_offset -> the refcount table", h.refcount_table_offset),
            ("l1_table_offset", "l1_table_offset misaligned", self.misalign(h.l1_table_offset)),
            ("refcount_table_clusters", "refcount_table_clusters 0", 0),
            ("refcount_table_clusters", "refcount_table_clusters + 1", h.refcount_table_clusters + 1),
            ("refcount_table_clusters", "refcount_table_clusters 0xffff", 0xFFFF),
            ("refcount_table_offset", "refcount_table_offset -> the L1 table", h.l1_table_offset),
            ("refcount_table_offset", "refcount_table_offset -> the refcount block", m.first_of("refcount block")),
            ("refcount_table_offset", "refcount_table_offset + cluster", h.refcount_table_offset + m.cs),
            ("refcount_table_offset", "refcount_table_offset misaligned", self.misalign(h.refcount_table_offset)),
            ("refcount_table_offset", "refcount_table_offset past EOF", self.eof()),
            ("size", "size doubled", h.size * 2), ("size", "size + cluster", h.size + m.cs),
            ("size", "size halved", h.size // 2),
            ("size", "size past what L1 covers", m.l1_coverage * h.l1_size + m.cs),
        ]
        if h.nb_snapshots:
            choices += [("snapshots_offset", "snapshots_offset + 8", h.snapshots_offset + 8),
                        ("snapshots_offset", "snapshots_offset -> the L1 table", h.l1_table_offset),
                        ("snapshots_offset", "snapshots_offset past EOF", self.eof()),
                        ("nb_snapshots", "nb_snapshots + 1", h.nb_snapshots + 1),
                        ("nb_snapshots", "nb_snapshots - 1", h.nb_snapshots - 1)]
        else:
            choices += [("nb_snapshots", "nb_snapshots 1 (no table)", 1)]
        if m.version >= 3:
            inc, comp, auto = h.incompatible_features, h.compatible_features, h.autoclear_features
            choices += [("incompatible_features", "dirty bit set", inc | INCOMPAT_DIRTY),
                        ("incompatible_features", "corrupt bit set", inc | INCOMPAT_CORRUPT),
                        ("incompatible_features", "extended-L2 bit toggled", inc ^ INCOMPAT_EXTL2),
                        ("incompatible_features", "compression-type bit toggled", inc ^ INCOMPAT_COMPRESSION),
                        ("compatible_features", "lazy-refcounts bit toggled", comp ^ 1),
                        ("autoclear_features", "bitmaps autoclear bit toggled", auto ^ 1),
                        ("refcount_order", "refcount_order changed",
                         r.choice([o for o in (0, 1, 3, 4, 5, 6) if o != h.refcount_order])),
                        ("header_length", "header_length + 8", h.header_length + 8),
                        ("header_length", "header_length 100", 100),
                        ("version", "version 2", 2)]
        else:
            choices += [("version", "version 3 (v2 header)", 3)]
        choices += [("cluster_bits", "cluster_bits + 1", m.cbits + 1), ("cluster_bits", "cluster_bits - 1", m.cbits - 1)]
        if h.backing_file_offset:
            choices += [("backing_file_size", "backing_file_size + 1", h.backing_file_size + 1),
                        ("backing_file_offset", "backing_file_offset + 1", h.backing_file_offset + 1)]
        choices = [c for c in choices if c[2] is not None and c[2] >= 0]
        fld, desc, value = r.choice(choices)
        off, fmt = FIELDS[fld]
        old = struct.unpack_from(fmt, h.raw, off)[0]
        assert value is not None
        slug = desc.replace(" -> ", ":").replace(" ", "-")
        return Mutation("header", slug,
                        f"header field {fld} {old:#x} -> {value:#x} ({desc})",
                        [(off, struct.pack(fmt, value & ((1 << (8 * struct.calcsize(fmt))) - 1)))],
                        [])

    def family_l1(self) -> Mutation | None:
        m, r = self.m, self.rng
        used = [i for i, e in enumerate(m.l1) if e and self.l1_hint(i)]
        free = [i for i, e in enumerate(m.l1) if not e and self.l1_hint(i)]
        if not used:
            return None
        i = r.choice(used)
        e = m.l1[i]
        t = e & OFFSET_MASK
        kinds = ["target", "target", "target", "past-eof", "misaligned", "reserved-low", "reserved-high", "zero",
                 "copied-flip", "flip"]
        if len(used) > 1:
            kinds.append("share-other")
        if free:
            kinds.append("free-entry-target")
        kind = r.choice(kinds)
        hints = self.l1_hint(i)
        new: int | None
        what = ""
        if kind == "target":
            what, off = self.pick_target(exclude=t, no_header=True)
            new = COPIED | off
            kind = f"target:{what}"
        elif kind == "past-eof":
            new = COPIED | r.choice([self.eof(), self.eof() + 7 * m.cs, TiB])
        elif kind == "misaligned":
            x = self.misalign(t)
            new = None if x is None else (e & ~OFFSET_MASK) | x
        elif kind == "reserved-low":
            new = e | (1 << r.randint(1, 8))
        elif kind == "reserved-high":
            new = e | (1 << r.randint(56, 62))
        elif kind == "zero":
            new = 0
        elif kind == "copied-flip":
            new = e ^ COPIED
        elif kind == "share-other":
            other = r.choice([j for j in used if j != i])
            new = m.l1[other]
            hints += self.l1_hint(other)
        elif kind == "free-entry-target":
            i = r.choice(free)
            e = m.l1[i]
            what, off = self.pick_target(no_header=True)
            new = COPIED | off
            hints = self.l1_hint(i)
            kind = f"free-entry-target:{what}"
        else:
            new = e ^ (1 << r.choice([*range(9, 56), 0, 63, 62]))
        if new is None:
            return None
        off = m.h.l1_table_offset + 8 * i
        return Mutation("l1", kind, f"L1 entry {i} (file {off:#x}) {e:#x} -> {new:#x}"
                        + (f" ({what})" if what else ""), [(off, q(new))], hints)

    def _l2_pick(self, pred: Callable[[L2Ent], bool]) -> L2Ent | None:
        cand = [e for e in self.m.l2e if pred(e) and self.m.tracked(e.guest)]
        return self.rng.choice(cand) if cand else None

    def family_l2(self) -> Mutation | None:
        m, r = self.m, self.rng
        cats = ["data", "data", "unallocated"]
        if any(e.word & COMPRESSED for e in m.l2e):
            cats += ["compressed", "compressed"]
        if any(e.word & ZERO_FLAG and not m.ext for e in m.l2e):
            cats.append("zero")
        cat = r.choice(cats)
        if cat == "data":
            ent = self._l2_pick(lambda e: bool(e.word & OFFSET_MASK) and not e.word & COMPRESSED)
        elif cat == "compressed":
            ent = self._l2_pick(lambda e: bool(e.word & COMPRESSED))
        elif cat == "zero":
            ent = self._l2_pick(lambda e: bool(e.word & ZERO_FLAG) and not e.word & COMPRESSED)
        else:
            ent = self._l2_pick(lambda e: e.word == 0 and not e.bitmap)
        if ent is None:
            return None
        e = ent.word
        host = e & OFFSET_MASK
        hints = [(max(0, ent.guest - m.cs), 3 * m.cs)]
        what = ""
        new: int | None = None
        if cat in ("data", "zero", "unallocated"):
            kinds = ["target", "target", "target", "past-eof", "misaligned", "reserved-low", "reserved-high",
                     "copied-flip", "compressed-set", "flip", "zero-flag-misaligned"]
            if cat != "unallocated":
                kinds += ["zero", "share-other", "zero-flag"]
            kind = r.choice(kinds)
            if kind == "target" and m.data_file:
                t = self.data_targets(exclude=host)
                what = r.choice(sorted(t))
                off = t[what]
                new = COPIED | off
                kind = f"target:{what}"
                hints += self.guest_range_of_cluster(off, data=True)
            elif kind == "target":
                what, off = self.pick_target(exclude=host)
                new = COPIED | off
                kind = f"target:{what}"
                hints += self.guest_range_of_cluster(off)
            elif kind == "past-eof":
                new = COPIED | r.choice([self.host_eof(), self.host_eof() + 5 * m.cs, TiB])
            elif kind == "misaligned":
                x = self.misalign(host or m.first_of("data") or m.cs)
                new = None if x is None else (e & ~OFFSET_MASK) | COPIED | x
            elif kind == "reserved-low":
                new = e | (1 << r.randint(1, 8)) if not m.ext else e | (1 << r.randint(0, 8))
            elif kind == "reserved-high":
                new = e | (1 << r.randint(56, 61))
            elif kind == "copied-flip":
                new = e ^ COPIED
            elif kind == "compressed-set":
                x = 62 - (m.cbits - 8)
                base = host or m.first_of("data") or 0
                new = COMPRESSED | (r.randrange(1 << (m.cbits - 8)) << x) | (base + r.randrange(0, m.cs, 16))
            elif kind == "zero":
                new = 0
            elif kind == "zero-flag":
                new = e | ZERO_FLAG
                kind = "zero-flag" + ("-v2" if m.version == 2 else "")
            elif kind == "zero-flag-misaligned":
                x = self.misalign(host or m.first_of("data") or m.cs)
                new = None if x is None else COPIED | ZERO_FLAG | x
            elif kind == "share-other":
                other = self._l2_pick(lambda o: bool(o.word & OFFSET_MASK) and not o.word & COMPRESSED
                                      and o.guest != ent.guest)
                if other is None:
                    return None
                new = COPIED | (other.word & OFFSET_MASK)
                hints.append((other.guest, m.cs))
            else:
                new = e ^ (1 << r.choice([*range(9, 56), 0, 63, 62]))
            kind = f"{cat}:{kind}"
        else:  # compressed
            x = 62 - (m.cbits - 8)
            off, _ = m.compressed_span(e)
            kind = r.choice(["max-sectors", "sectors-random", "past-eof", "into-metadata", "copied-set",
                             "offset-zero", "zero-flag", "flip"])
            if kind == "max-sectors":   # qemu-iotests 214: the sector count reaches past EOF
                new = e | (((1 << (m.cbits - 8)) - 1) << x)
            elif kind == "sectors-random":
                new = (e & ~(((1 << (m.cbits - 8)) - 1) << x)) | (r.randrange(1 << (m.cbits - 8)) << x)
            elif kind == "past-eof":
                new = (e & ~((1 << x) - 1)) | (self.eof() + r.randrange(0, 4096, 16)) & ((1 << x) - 1)
            elif kind == "into-metadata":
                what, t = self.pick_target(no_header=True)
                new = (e & ~((1 << x) - 1)) | (t & ((1 << x) - 1))
            elif kind == "copied-set":
                new = e | COPIED
            elif kind == "offset-zero":
                new = e & ~((1 << x) - 1)
            elif kind == "zero-flag":
                new = e | ZERO_FLAG
            else:
                new = e ^ (1 << r.randrange(0, 62))
            kind = f"compressed:{kind}"
            del off
        if new is None:
            return None
        return Mutation("l2", kind, f"L2 entry of guest {ent.guest:#x} (file {ent.offset:#x}) {e:#x} -> "
                        f"{new:#x}" + (f" ({what})" if what else ""), [(ent.offset, q(new))], hints)

    def family_extl2(self) -> Mutation | None:
        """Invalid subcluster bitmaps (qemu-iotests 271), extended L2 only."""
        m, r = self.m, self.rng
        if not m.ext:
            return None
        kind = r.choice(["alloc-and-zero", "alloc-no-offset", "alloc-and-zero-no-offset", "compressed-bitmap",
                         "zero-bit-std-word", "all-ones", "zero-all-alloc-all", "flip-bitmap"])
        if kind in ("alloc-no-offset", "alloc-and-zero-no-offset"):
            ent = self._l2_pick(lambda e: e.word == 0)
        elif kind == "compressed-bitmap":
            ent = self._l2_pick(lambda e: bool(e.word & COMPRESSED))
        else:
            ent = self._l2_pick(lambda e: bool(e.word & OFFSET_MASK) and not e.word & COMPRESSED)
        if ent is None:
            return None
        bm = ent.bitmap or 0
        sc = r.randrange(32)
        patches: list[tuple[int, bytes]]
        if kind == "alloc-and-zero":
            new = bm | (1 << sc) | (1 << (32 + sc))
        elif kind == "alloc-no-offset":
            new = (1 << sc) | (r.getrandbits(32) if r.random() < 0.3 else 0)
        elif kind == "alloc-and-zero-no-offset":
            new = (1 << sc) | (1 << (32 + sc))
        elif kind == "compressed-bitmap":
            new = r.getrandbits(64) or 1
        elif kind == "all-ones":
            new = 2**64 - 1
        elif kind == "zero-all-alloc-all":
            new = 0xFFFFFFFF_FFFFFFFF ^ (1 << (32 + sc))
        elif kind == "flip-bitmap":
            new = bm ^ (1 << r.randrange(64))
        else:
            patches = [(ent.offset, q(ent.word | ZERO_FLAG))]
            return Mutation("extl2", kind, f"extended L2 entry of guest {ent.guest:#x} (file {ent.offset:#x}): "
                            f"bit 0 of the first word set ({ent.word:#x})", patches, [(ent.guest, m.cs)])
        return Mutation("extl2", kind, f"extended L2 entry of guest {ent.guest:#x} (file {ent.offset:#x}, word "
                        f"{ent.word:#x}): bitmap {bm:#018x} -> {new:#018x}", [(ent.offset + 8, q(new))],
                        [(max(0, ent.guest - m.cs), 3 * m.cs)])

    def family_reftable(self) -> Mutation | None:
        m, r = self.m, self.rng
        used = [i for i, e in enumerate(m.reftable) if e]
        i = r.choice(used)
        e = m.reftable[i]
        kind = r.choice(["zero", "past-eof", "misaligned", "target", "target", "reserved-low", "extra-entry",
                         "flip"])
        what = ""
        if kind == "zero":
            new = 0
        elif kind == "past-eof":
            new = r.choice([self.eof(), TiB])
        elif kind == "misaligned":
            x = self.misalign(e)
            new = x if x is not None else e | 0x100
        elif kind == "target":
            what, new = self.pick_target(exclude=e & OFFSET_MASK, no_header=True)
            kind = f"target:{what}"
        elif kind == "reserved-low":
            new = e | (1 << r.randint(0, 8))
        elif kind == "extra-entry":
            free = [j for j, x in enumerate(m.reftable) if not x]
            if not free:
                return None
            i = free[0] if r.random() < 0.7 else r.choice(free)
            what, new = self.pick_target(no_header=True)
            e = 0
            kind = f"extra-entry:{what}"
        else:
            new = e ^ (1 << r.randrange(9, 56))
        off = m.h.refcount_table_offset + 8 * i
        return Mutation("reftable", kind, f"refcount table entry {i} (file {off:#x}) {e:#x} -> {new:#x}"
                        + (f" ({what})" if what else ""), [(off, q(new))], self.unallocated_hints())

    def family_refblock(self) -> Mutation | None:
        m, r = self.m, self.rng
        by_kind: dict[str, list[int]] = collections.defaultdict(list)
        for c, rc in m.refcounts.items():
            by_kind[m.kinds.get(c, "unreferenced")].append(c)
        kind_of = r.choice(sorted(by_kind))
        c = r.choice(by_kind[kind_of])
        old = m.refcounts[c]
        maxv = (1 << m.rc_bits) - 1
        options = ["zero", "max", "leak", "zero"]
        if old >= 2:
            options += ["one-for-two", "one-for-two"]
        how = r.choice(options)
        new = {"zero": 0, "max": maxv, "leak": min(maxv, old + 1), "one-for-two": 1}[how]
        if new == old:
            new = 0
            how = "zero"
        if not any(m.reftable):
            return None
        per_block = m.cs * 8 // m.rc_bits
        rb = m.reftable[c // per_block] & OFFSET_MASK
        idx = c % per_block
        if m.rc_bits >= 8:
            patch = (rb + idx * m.rc_bits // 8, new.to_bytes(m.rc_bits // 8, "big"))
        else:
            byte_off = rb + idx * m.rc_bits // 8
            shift = (idx * m.rc_bits) % 8
            cur = m.path.read_bytes()[byte_off]
            mask = ((1 << m.rc_bits) - 1) << shift
            patch = (byte_off, bytes([(cur & ~mask) | ((new << shift) & mask)]))
        hints = self.guest_range_of_cluster(c * m.cs) + self.unallocated_hints()
        return Mutation("refblock", f"{kind_of}:{how}", f"refcount of cluster {c} (host {c * m.cs:#x}, "
                        f"{kind_of}) {old} -> {new} (refcount block {rb:#x})", [patch], hints)

    def family_snapshot(self) -> Mutation | None:
        m, r = self.m, self.rng
        if not m.snaps:
            return None
        k = r.randrange(len(m.snaps))
        s = m.snaps[k]
        hints = self.shared_hints()
        kind = r.choice(["l1-past-eof", "l1-misaligned", "l1-into-active-l1", "l1-into-active-l2", "l1-size-huge",
                         "l1-size-zero", "l1-size-plus", "id-size-huge", "extra-size-huge", "l1-entry-past-eof",
                         "l1-entry-into-active-l2", "l1-entry-copied", "l1-entry-zero", "nb-snapshots-plus",
                         "nb-snapshots-minus", "flip"])
        eo = s.entry_offset
        if kind == "nb-snapshots-plus":
            p = [(FIELDS["nb_snapshots"][0], u32(len(m.snaps) + 1))]
        elif kind == "nb-snapshots-minus":
            p = [(FIELDS["nb_snapshots"][0], u32(len(m.snaps) - 1))]
        elif kind == "l1-past-eof":
            p = [(eo, q(r.choice([self.eof(), TiB])))]
        elif kind == "l1-misaligned":
            x = self.misalign(s.l1_table_offset)
            p = [(eo, q(x if x is not None else s.l1_table_offset + 8))]
        elif kind == "l1-into-active-l1":
            p = [(eo, q(m.h.l1_table_offset))]
        elif kind == "l1-into-active-l2":
            p = [(eo, q(r.choice(list(m.l2_tables.values()))))]
        elif kind == "l1-size-huge":
            p = [(eo + 8, u32(r.choice([0x7FFFFFFF, 1 << 25, s.l1_size + 1000])))]
        elif kind == "l1-size-zero":
            p = [(eo + 8, u32(0))]
        elif kind == "l1-size-plus":
            p = [(eo + 8, u32(s.l1_size + 1))]
        elif kind == "id-size-huge":
            p = [(eo + 12, struct.pack(">H", 0xFFFF))]
        elif kind == "extra-size-huge":
            p = [(eo + 36, u32(r.choice([1025, 0x10000, 0xFFFFFFF0])))]
        elif kind.startswith("l1-entry"):
            tab = m.snap_l1[k]
            used = [i for i, e in enumerate(tab) if e]
            if not used:
                return None
            i = r.choice(used)
            val = {"l1-entry-past-eof": COPIED | self.eof(), "l1-entry-into-active-l2": r.choice(list(m.l2_tables.values())),
                   "l1-entry-copied": tab[i] | COPIED, "l1-entry-zero": 0}[kind]
            p = [(s.l1_table_offset + 8 * i, q(val))]
        else:
            off = eo + r.randrange(0, 40)
            p = [(off, bytes([m.path.read_bytes()[off] ^ (1 << r.randrange(8))]))]
        desc = f"snapshot {s.id} ('{s.name}', entry at {eo:#x}, L1 {s.l1_table_offset:#x} x {s.l1_size}): {kind} " + \
            ", ".join(f"[{o:#x}] <- {b.hex()}" for o, b in p)
        return Mutation("snapshot", kind, desc, p, hints)

    def family_bitmap(self) -> Mutation | None:
        m, r = self.m, self.rng
        if m.bm_dir is None or not m.bitmaps:
            return None
        ext_data, doff, dsize = m.bm_dir
        b = r.choice(m.bitmaps)
        kind = r.choice(["dir-into-l1", "dir-past-eof", "dir-misaligned", "dir-into-refblock", "dir-size-plus",
                         "dir-size-huge", "nb-plus", "table-past-eof", "table-into-l1", "table-misaligned",
                         "table-size-huge", "table-size-zero", "in-use-set", "unknown-flag", "granularity-absurd",
                         "name-size-huge", "extra-data", "type-wrong", "autoclear-cleared"])

        def hdr_off(k: int) -> int:
            """The bitmaps extension's fields: nb_bitmaps +0, reserved +4, directory size +8, offset +16."""
            return ext_data + k
        if kind == "dir-into-l1":
            p = [(hdr_off(16), q(m.h.l1_table_offset))]
        elif kind == "dir-past-eof":
            p = [(hdr_off(16), q(r.choice([self.eof(), TiB])))]
        elif kind == "dir-misaligned":
            p = [(hdr_off(16), q(doff + 8))]
        elif kind == "dir-into-refblock":
            p = [(hdr_off(16), q(m.first_of("refcount block") or 0))]
        elif kind == "dir-size-plus":
            p = [(hdr_off(8), q(dsize + 8))]
        elif kind == "dir-size-huge":
            p = [(hdr_off(8), q(r.choice([1 << 30, 1 << 40, 65536 * 1024 + 8])))]
        elif kind == "nb-plus":
            p = [(hdr_off(0), u32(len(m.bitmaps) + 1))]
        elif kind == "table-past-eof":
            p = [(b.entry_offset, q(r.choice([self.eof(), TiB])))]
        elif kind == "table-into-l1":
            p = [(b.entry_offset, q(m.h.l1_table_offset))]
        elif kind == "table-misaligned":
            p = [(b.entry_offset, q(b.table_offset + 8))]
        elif kind == "table-size-huge":
            p = [(b.entry_offset + 8, u32(r.choice([0x7FFFFFFF, 1 << 20, b.table_size + 1])))]
        elif kind == "table-size-zero":
            p = [(b.entry_offset + 8, u32(0))]
        elif kind == "in-use-set":
            p = [(b.entry_offset + 12, u32(b.flags | 1))]
        elif kind == "unknown-flag":
            p = [(b.entry_offset + 12, u32(b.flags | (1 << r.randint(2, 31))))]
        elif kind == "granularity-absurd":
            p = [(b.entry_offset + 17, bytes([r.choice([0, 8, 32, 63, 200])]))]
        elif kind == "name-size-huge":
            p = [(b.entry_offset + 18, struct.pack(">H", r.choice([0, 1024, 0xFFFF])))]
        elif kind == "extra-data":
            p = [(b.entry_offset + 20, u32(r.choice([8, 0x10000])))]
        elif kind == "type-wrong":
            p = [(b.entry_offset + 16, bytes([r.choice([0, 2, 255])]))]
        else:
            p = [(FIELDS["autoclear_features"][0], q(m.h.autoclear_features & ~1))]
        desc = f"bitmap directory at {doff:#x} (bitmap '{b.name}', entry {b.entry_offset:#x}, table " \
               f"{b.table_offset:#x} x {b.table_size}): {kind} " + ", ".join(f"[{o:#x}] <- {x.hex()}" for o, x in p)
        return Mutation("bitmap", kind, desc, p, [])

    def family_bitmap_table(self) -> Mutation | None:
        m, r = self.m, self.rng
        if not m.bm_table_entries:
            return None
        used = [x for x in m.bm_table_entries if x[1] & OFFSET_MASK]
        off, e = r.choice(used) if used and r.random() < 0.8 else r.choice(m.bm_table_entries)
        kind = r.choice(["past-eof", "misaligned", "target", "target", "all-ones-with-offset", "reserved",
                         "all-ones"])
        what = ""
        if kind == "past-eof":
            new = r.choice([self.eof(), TiB])
        elif kind == "misaligned":
            x = self.misalign(e & OFFSET_MASK or m.cs)
            new = x if x is not None else (e | 0x100)
        elif kind == "target":
            what, new = self.pick_target(exclude=e & OFFSET_MASK, no_header=True)
            kind = f"target:{what}"
        elif kind == "all-ones-with-offset":
            new = (e & OFFSET_MASK or m.first_of("data") or m.cs) | 1
        elif kind == "reserved":
            new = e | (1 << r.choice([*range(1, 9), *range(56, 64)]))
        else:
            new = 1
        return Mutation("bitmap-table", kind, f"bitmap table entry at {off:#x} {e:#x} -> {new:#x}"
                        + (f" ({what})" if what else ""), [(off, q(new))], [])

    def family_flip(self) -> Mutation | None:
        """A random bit flip, at a random place of one metadata structure (not only random
        flips: the structure is chosen, the bit is random)."""
        m, r = self.m, self.rng
        areas: list[tuple[str, int, int]] = [("header", 0, max(104, m.h.header_length) if m.version >= 3 else 72),
                                             ("L1 table", m.h.l1_table_offset, 8 * len(m.l1)),
                                             ("refcount table", m.h.refcount_table_offset,
                                              8 * max(1, sum(1 for x in m.reftable if x)))]
        for t in m.l2_tables.values():
            areas.append(("L2 table", t, m.cs))
        rb = m.first_of("refcount block")
        if rb is not None:
            hi = max(m.refcounts) * m.rc_bits // 8 + 8 if m.refcounts else 64
            areas.append(("refcount block", rb, min(m.cs, hi)))
        if m.snaps:
            areas.append(("snapshot table", m.h.snapshots_offset, sum(s.length for s in m.snaps)))
        if m.bm_dir:
            areas.append(("bitmap directory", m.bm_dir[1], m.bm_dir[2]))
        if m.df_ext:
            areas.append(("data file name extension", m.df_ext[0], 8 + m.df_ext[2]))
        what, start, length = r.choice(areas)
        off = start + r.randrange(length)
        data = m.path.read_bytes()
        bit = r.randrange(8)
        return Mutation("flip", what, f"bit {bit} of byte {off:#x} flipped ({what} at {start:#x})",
                        [(off, bytes([data[off] ^ (1 << bit)]))], [])

    def family_datafile(self) -> Mutation | None:
        """The qcow2 file's own account of its external data file: the incompatible feature
        bit, the data_file_raw autoclear bit, the name extension (the data file itself is
        never touched)."""
        m, r, h = self.m, self.rng, self.m.h
        if m.df_ext is None:
            return None
        typ_off, data_off, ln = m.df_ext
        room = (ln + 7) // 8 * 8          # the name may grow into its padding
        inc_off, auto_off = FIELDS["incompatible_features"][0], FIELDS["autoclear_features"][0]
        kinds = ["incompat-bit-cleared", "incompat-bit-cleared", "raw-bit-toggled", "raw-bit-toggled",
                 "name-missing", "name-nul", "name-length-zero", "name-length-huge", "name-length-minus",
                 "name-self"]
        if m.layout.backing:
            kinds.append("name-backing")
        kind = r.choice(kinds)
        hints: list[tuple[int, int]] = []

        def name(text: str) -> list[tuple[int, bytes]]:
            raw = text.encode()
            assert len(raw) <= room
            return [(typ_off + 4, u32(len(raw))), (data_off, raw + bytes(room - len(raw)))]
        if kind == "incompat-bit-cleared":
            # the L2 entries then map guest clusters into the qcow2 file itself, over its metadata
            p = [(inc_off, q(h.incompatible_features & ~4))]
            over = [g for c, g in sorted(m.df_guest_of.items()) if c * m.cs < m.file_size and m.tracked(g)]
            r.shuffle(over)
            hints = [(g, m.cs) for g in over[:4]]
        elif kind == "raw-bit-toggled":
            p = [(auto_off, q(h.autoclear_features ^ 2))]
            hints = self.unallocated_hints()
        elif kind == "name-missing":
            p = name(DATA_FILE[:-1] + "_")
        elif kind == "name-nul":
            p = [(data_off, bytes(ln))]
        elif kind == "name-length-zero":
            p = [(typ_off + 4, u32(0))]
        elif kind == "name-length-huge":
            p = [(typ_off + 4, u32(r.choice([m.cs, 0xFFFF, 0xFFFFFFFF])))]
        elif kind == "name-length-minus":
            p = [(typ_off + 4, u32(ln - 1))]
        elif kind == "name-self":
            p = name("disk.qcow2")
        else:
            p = name("base.qcow2")
        desc = f"data file ({m.layout.data_file}, name extension at {typ_off:#x}): {kind} " + \
            ", ".join(f"[{o:#x}] <- {b.hex()}" for o, b in p)
        return Mutation("datafile", kind, desc, p, hints)

    FAMILIES: tuple[str, ...] = ("header", "l1", "l2", "l2", "extl2", "reftable", "refblock", "snapshot",
                                 "bitmap", "bitmap-table", "flip")

    def make(self, family: str) -> Mutation | None:
        fn = getattr(self, "family_" + family.replace("-", "_"))
        return fn()


def family_applies(family: str, lay: Layout) -> bool:
    if family == "extl2":
        return lay.extended_l2
    if family == "snapshot":
        return lay.snapshots > 0
    if family in ("bitmap", "bitmap-table"):
        return lay.bitmaps
    if family == "datafile":
        return bool(lay.data_file)
    return True


# ==========================================================================
# sessions

@dataclass(frozen=True)
class W:
    """A guest write of LENGTH bytes of PATTERN (0 with ZERO: qemu-io write -z, Disk.zero)."""

    offset: int
    length: int
    pattern: int
    zero: bool = False

    @property
    def value(self) -> int:
        return 0 if self.zero else self.pattern

    def qemu(self) -> str:
        if self.zero:
            return f"write -z {self.offset} {self.length}"
        return f"write -P {self.pattern:#x} {self.offset} {self.length}"

    def show(self) -> str:
        what = "zero" if self.zero else f"{self.pattern:#04x}"
        return f"write [{self.offset:#x}, +{self.length:#x}) {what}"


FLUSH = "flush"
Op = W | str


def make_session(m: ImgMap, mut: Mutation, rng: random.Random, seed: int) -> list[Op]:
    hints = [(g, n) for g, n in mut.hints if m.tracked(g)]
    regions = m.layout.regions
    ops: list[Op] = []
    n = rng.randint(4, 10)
    for i in range(n):
        length = rng.choice([4 * KiB, 8 * KiB, 16 * KiB, 32 * KiB, 64 * KiB, 128 * KiB,
                             rng.randrange(4 * KiB, 128 * KiB + 1)])
        if hints and rng.random() < 0.6:
            g, hn = rng.choice(hints)
            off = g + rng.randrange(0, max(1, hn)) - rng.randrange(0, length // 2 + 1)
        else:
            s, rn = rng.choice(regions)
            off = s + rng.randrange(0, rn)
        if rng.random() < 0.6:
            off = off // 512 * 512
            length = max(512, length // 512 * 512)
        # inside one tracked region
        for s, rn in regions:
            if s <= off < s + rn:
                break
        else:
            s, rn = min(regions, key=lambda reg: min(abs(reg[0] - off), abs(reg[0] + reg[1] - off)))
            off = min(max(off, s), s + rn - 512)
        length = min(length, s + rn - off)
        zero = rng.random() < 0.12
        ops.append(W(off, length, 0x80 + (seed * 13 + i) % 127, zero))
        if rng.random() < 0.45:
            ops.append(FLUSH)
    if ops[-1] != FLUSH:
        ops.append(FLUSH)
    return ops


# ==========================================================================
# the case

@dataclass
class Case:
    seed: int
    layout: str
    mutation: Mutation
    ops: list[Op]


# Without --layout, a data-file layout replaces the layout drawn (from LAYOUTS, as before
# they existed) in DF_SHARE of the cases whose family applies to one (then in every
# attempt of the case), and the data-file family replaces that family in DF_OWN_FAMILY of
# those. These draws come from a second generator of the seed, so a case that draws no
# data-file layout is exactly the case the seed named before they existed.
DF_SHARE = 0.15
DF_OWN_FAMILY = 0.25


def select_layouts(spec: str) -> list[str]:
    """The layouts a --layout SPEC names: comma-separated names or fnmatch patterns, or
    "data-file" for every layout with an external data file."""
    out: list[str] = []
    for part in (x.strip() for x in spec.split(",")):
        if not part:
            continue
        hit = list(DATA_FILE_LAYOUTS) if part == "data-file" else fnmatch.filter(ALL_LAYOUTS, part)
        if not hit:
            raise ValueError(f"--layout {part!r} names no layout (layouts: {', '.join(ALL_LAYOUTS)})")
        out += [n for n in hit if n not in out]
    if not out:
        raise ValueError(f"--layout {spec!r} names no layout")
    return out


def make_case(seed: int, cache: BaseCache, only: str | None = None) -> Case:
    """The case of SEED; ONLY: a --layout spec (the seed then names a case among those layouts,
    the family cycling through the families that apply to them, "datafile" twice)."""
    rng = random.Random(seed)
    if only:
        allowed = select_layouts(only)
        fams = [f for f in Mutator.FAMILIES + ("datafile", "datafile")
                if any(family_applies(f, ALL_LAYOUTS[n]) for n in allowed)]
        family = fams[seed % len(fams)]
        names = [n for n in allowed if family_applies(family, ALL_LAYOUTS[n])]
        return _first_mutation(seed, cache, rng, family, lambda: rng.choice(names), f" (--layout {only})")
    fams = Mutator.FAMILIES
    family = fams[seed % len(fams)]
    names = [n for n in LAYOUTS if family_applies(family, LAYOUTS[n])]
    df_names = [n for n in DATA_FILE_LAYOUTS if family_applies(family, DATA_FILE_LAYOUTS[n])]
    side = random.Random(f"data-file-{seed}")
    data_file = bool(df_names) and side.random() < DF_SHARE
    fam = "datafile" if data_file and side.random() < DF_OWN_FAMILY else family

    def pick() -> str:
        name = rng.choice(names)   # (drawn either way: other seeds keep naming the same case)
        return side.choice(df_names) if data_file else name
    return _first_mutation(seed, cache, rng, fam, pick, "")


def _first_mutation(seed: int, cache: BaseCache, rng: random.Random, family: str, pick: Callable[[], str],
                    what: str) -> Case:
    """The case of the first of 50 layouts PICK draws where FAMILY has a mutation that changes something."""
    for _ in range(50):
        name = pick()
        m = cache.get(name)
        mut = Mutator(m, rng).make(family)
        if mut is not None and mut.patches:
            return Case(seed, name, mut, make_session(m, mut, rng, seed))
    raise RuntimeError(f"seed {seed}: no applicable mutation of family {family}{what}")


# ==========================================================================
# QEMU's view, chunk by chunk (qemu-nbd)

def qemu_run(args: Sequence[Any], img: Path, **kw: Any) -> subprocess.CompletedProcess[Any]:
    """A QEMU tool (qemu-img, qemu-io) run on IMG, in IMG's directory: QEMU 7.2 resolves a
    relative external data file name against its working directory (not the image's), and
    every copy of a case has its own directory with its own data file under that name.
    Every QEMU command of the judge goes through here or qemu_popen."""
    img = Path(img)
    assert img.is_absolute(), img
    kw.setdefault("capture_output", True)
    kw.setdefault("timeout", QEMU_TIMEOUT)
    if kw.get("text"):   # (its messages quote damaged names: any bytes, seed 1125 of --layout data-file)
        kw.setdefault("errors", "replace")
    return subprocess.run([str(a) for a in args], cwd=img.parent, **kw)


def qemu_popen(args: Sequence[Any], img: Path, **kw: Any) -> subprocess.Popen[bytes]:
    """A QEMU tool (qemu-nbd) started on IMG, in IMG's directory (see qemu_run)."""
    img = Path(img)
    assert img.is_absolute(), img
    return subprocess.Popen([str(a) for a in args], cwd=img.parent, **kw)


class NBDReader:
    """Reads of an image through qemu-nbd (read-only). After a failed read the server is
    restarted: QEMU makes a whole image unusable after a fatal corruption."""

    def __init__(self, img: Path, snapshot: str | None = None) -> None:
        self.img = img
        self.snapshot = snapshot
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.dir = tempfile.mkdtemp(prefix="hw", dir="/tmp")
        self.open_error = ""
        self.size = 0
        self.restarts = 0

    def _start(self) -> bool:
        path = os.path.join(self.dir, "s")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        args = ["qemu-nbd", "-r", "-f", "qcow2", "-k", path]
        if self.snapshot:
            args += ["-l", f"snapshot.id={self.snapshot}"]
        args.append(str(self.img))
        self.proc = qemu_popen(args, self.img, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while not os.path.exists(path):
            if self.proc.poll() is not None:
                self.open_error = (self.proc.stderr.read() if self.proc.stderr else b"").decode(errors="replace")
                self.proc = None
                return False
            if time.monotonic() > deadline:
                self._stop()
                self.open_error = "qemu-nbd did not start"
                return False
            time.sleep(0.002)
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(QEMU_TIMEOUT)
        self.sock = s
        try:
            for _ in range(1000):
                try:
                    s.connect(path)
                    break
                except (ConnectionRefusedError, FileNotFoundError):
                    time.sleep(0.002)
            hdr = self._recv(18)
            assert hdr[:8] == b"NBDMAGIC", hdr
            flags = struct.unpack(">H", hdr[16:])[0]
            s.sendall(struct.pack(">I", flags & 3))
            s.sendall(struct.pack(">QII", 0x49484156454F5054, 1, 0))
            self.size = struct.unpack(">QH", self._recv(10))[0]
            if not flags & 2:
                self._recv(124)
        except (OSError, EOFError) as e:
            # qemu-nbd gave up on the image after creating its socket
            s.close()
            self.sock = None
            proc = self.proc
            self.proc = None
            assert proc is not None
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            err = (proc.stderr.read() if proc.stderr else b"").decode(errors="replace").strip()
            if proc.stderr:
                proc.stderr.close()
            self.open_error = err or f"qemu-nbd: {e}"
            return False
        return True

    def _recv(self, n: int) -> bytes:
        assert self.sock is not None
        buf = bytearray()
        while len(buf) < n:
            c = self.sock.recv(n - len(buf))
            if not c:
                raise EOFError("qemu-nbd closed the connection")
            buf += c
        return bytes(buf)

    def _stop(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 0, 0, 0))
            self.sock.close()
            self.sock = None
        if self.proc is not None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stderr:
                self.proc.stderr.close()
            self.proc = None

    def read(self, off: int, length: int) -> bytes | None:
        if self.sock is None:
            if self.open_error or not self._start():
                return None
        assert self.sock is not None
        try:
            self.sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 1, off, length))
            magic, err, _ = struct.unpack(">IIQ", self._recv(16))
            assert magic == 0x67446698, hex(magic)
            if err == 0:
                return self._recv(length)
        except (EOFError, OSError):
            pass
        self._stop()
        self.restarts += 1
        return None

    def close(self) -> None:
        self._stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "NBDReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def qemu_chunks(img: Path, chunks: Sequence[int]) -> tuple[list[bytes | None], str]:
    """Each 64 KiB chunk as QEMU reads it (None: an error); and why QEMU cannot open it ("" if it can)."""
    with NBDReader(img) as r:
        out = [r.read(c, CHUNK) for c in chunks]
        return out, r.open_error.strip()


def qemu_range(img: Path, off: int, length: int) -> bytes | None:
    with NBDReader(img) as r:
        return r.read(off, length)


def qemu_snapshot(img: Path, ident: str, scratch: Path) -> bytes | None:
    dest = scratch / f"_snap_{ident}_{os.getpid()}.raw"
    p = qemu_run(["qemu-img", "convert", "-U", "-O", "raw", "-l", f"snapshot.id={ident}", img, dest.resolve()],
                 img)
    data = dest.read_bytes() if p.returncode == 0 else None
    dest.unlink(missing_ok=True)
    return data


@dataclass
class CheckState:
    rc: int
    corruptions: int
    leaks: int
    check_errors: int
    text: str

    def show(self) -> str:
        if self.rc == 1 and not self.corruptions:
            return f"exit 1 ({self.text.strip().splitlines()[-1][:120] if self.text.strip() else 'no output'})"
        return f"exit {self.rc}, {self.corruptions} corruptions, {self.leaks} leaks"


def qemu_check(img: Path) -> CheckState:
    p = qemu_run(["qemu-img", "check", "--output=json", img], img, text=True)
    try:
        js = json.loads(p.stdout) if p.stdout.strip() else {}
    except json.JSONDecodeError:
        js = {}
    return CheckState(p.returncode, js.get("corruptions", 0), js.get("leaks", 0), js.get("check-errors", 0),
                      p.stdout + p.stderr)


def header_bits(img: Path) -> tuple[bool, int]:
    """(qcow2 magic intact, incompatible feature bits)."""
    with open(img, "rb") as f:
        raw = f.read(80)
    magic = raw[:4] == b"QFI\xfb"
    version = struct.unpack(">I", raw[4:8])[0] if len(raw) >= 8 else 0
    return magic, struct.unpack(">Q", raw[72:80])[0] if version >= 3 and len(raw) >= 80 else 0


# ==========================================================================
# the two sessions

_FAIL_LINE = ("write failed:", "flush failed:")


def qemu_session(img: Path, ops: Sequence[Op]) -> dict[str, Any]:
    """qemu-io with overlap-check=all: per op "ok" / "err: ..." (a failed flush is not always
    reported by qemu-io: then it counts as done)."""
    opts = f"driver=qcow2,file.filename={str(img).replace(',', ',,')},overlap-check=all"
    args = ["qemu-io", "--image-opts"]
    for op in ops:
        args += ["-c", FLUSH if op == FLUSH else op.qemu()]  # type: ignore[union-attr]
    args.append(opts)
    p = qemu_run(args, img, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(("wrote ", *_FAIL_LINE))]
    results: list[str] = []
    li = 0
    for op in ops:
        if op == FLUSH:
            if li < len(lines) and lines[li].startswith("flush failed:"):
                results.append("err: " + lines[li])
                li += 1
            else:
                results.append("ok")
            continue
        if li < len(lines) and lines[li].startswith(("wrote ", "write failed:")):
            results.append("ok" if lines[li].startswith("wrote ") else "err: " + lines[li])
            li += 1
        else:
            results.append("err: (no answer)")
    opened = not (p.returncode != 0 and not lines)
    # killed by a signal (an assertion of QEMU's aborts it): not a refusal
    crash = (p.stderr.strip() or f"killed by signal {-p.returncode}") if p.returncode < 0 else ""
    return {"opened": opened, "open_error": "" if opened else p.stderr.strip(), "results": results,
            "log": p.stdout + p.stderr, "crash": crash}


def _capture_log() -> io.StringIO:
    """In a child: qcowfs's log into a buffer (for the report), not onto stderr."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    log = logging.getLogger("qcowfs")
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    return buf


def _qcowfs_write_session(path: str, ops: Sequence[Op]) -> dict[str, Any]:
    """In a child: open "r+", prepare, run OPS through image.disk, close (in PATH's directory,
    as QEMU runs: a relative data file name resolves to this copy's, wherever qcowfs looks)."""
    import trio

    os.chdir(os.path.dirname(os.path.abspath(path)))

    from qcowfs.aio import Image
    from qcowfs.errors import QcowError

    out: dict[str, Any] = {"opened": False, "open_error": "", "results": [], "corrupt": False,
                           "close_error": "", "crash": "", "warnings": []}

    async def session() -> None:
        try:
            image = Image(path, "r+")
        except QcowError as e:
            out["open_error"] = f"{type(e).__name__}: {e}"
            return
        try:
            try:
                await image.prepare()
            except QcowError as e:
                out["open_error"] = f"prepare: {type(e).__name__}: {e}"
                return
            out["opened"] = True
            out["warnings"] = list(image.warnings)
            disk = image.disk
            for op in ops:
                try:
                    if op == FLUSH:
                        await disk.flush()
                    elif op.zero:  # type: ignore[union-attr]
                        await disk.zero(op.offset, op.length, unmap=False)  # type: ignore[union-attr]
                    else:
                        n = await disk.write(op.offset, bytes([op.pattern]) * op.length)  # type: ignore[union-attr]
                        if n != op.length:  # type: ignore[union-attr]
                            out["results"].append(f"err: short write ({n} bytes)")
                            continue
                    out["results"].append("ok")
                except QcowError as e:
                    out["results"].append(f"err: {type(e).__name__}: {e}")
            out["corrupt"] = bool(image.corrupt)
        except Exception:
            out["crash"] = traceback.format_exc()
        finally:
            try:
                await image.close()
            except QcowError as e:
                out["close_error"] = f"{type(e).__name__}: {e}"
            except Exception:
                out["crash"] = out["crash"] or traceback.format_exc()

    async def bounded() -> None:
        with trio.fail_after(QCOWFS_TIMEOUT):
            await session()

    logbuf = _capture_log()
    trio.run(bounded)
    out["log"] = logbuf.getvalue()
    return out


FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE = 0x01, 0x10
_libc = None


def _fallocate(fd: int, mode: int, off: int, length: int) -> None:
    global _libc
    import ctypes
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if _libc.fallocate(fd, mode, off, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _mount_write_session(path: Path, ops: Sequence[Op]) -> dict[str, Any]:
    """The same session through a real writable FUSE mount (`qcowfs mount`):
    pwrite, fallocate(ZERO_RANGE) and fsync on disk.raw, then `qcowfs umount`.
    A refused mount is a refused open; a traceback in the daemon's log a crash."""
    out: dict[str, Any] = {"opened": False, "open_error": "", "results": [], "corrupt": False,
                           "close_error": "", "crash": "", "warnings": []}
    mnt = path.parent / "mnt"
    mnt.mkdir(exist_ok=True)
    log = path.parent / "daemon.log"
    qcowfs_bin = str(Path(sys.executable).parent / "qcowfs")
    p = subprocess.run([qcowfs_bin, "mount", "-o", f"log_file={log}", str(path), str(mnt)],
                       capture_output=True, text=True, timeout=QCOWFS_TIMEOUT + 20, cwd=path.parent)
    if p.returncode != 0:
        out["open_error"] = p.stderr.strip()
        if "Traceback" in p.stderr:
            out["crash"] = p.stderr
        return out
    try:
        out["opened"] = True
        fd = os.open(mnt / "disk.raw", os.O_RDWR)
        try:
            for op in ops:
                try:
                    if op == FLUSH:
                        os.fsync(fd)
                    elif op.zero:  # type: ignore[union-attr]
                        _fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                                   op.offset, op.length)  # type: ignore[union-attr]
                    else:
                        n = os.pwrite(fd, bytes([op.pattern]) * op.length, op.offset)  # type: ignore[union-attr]
                        if n != op.length:  # type: ignore[union-attr]
                            out["results"].append(f"err: short write ({n} bytes)")
                            continue
                    out["results"].append("ok")
                except OSError as e:
                    out["results"].append(f"err: OSError: {e}")
        finally:
            os.close(fd)
    finally:
        u = subprocess.run([qcowfs_bin, "umount", str(mnt)], capture_output=True, text=True,
                           timeout=QCOWFS_TIMEOUT + 20)
        if u.returncode != 0:
            out["close_error"] = u.stderr.strip()
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        text = log.read_text(errors="replace") if log.exists() else ""
        out["log"] = text
        if "Traceback" in text:
            out["crash"] = text[text.index("Traceback"):]
    return out


def _qcowfs_read_session(path: str, chunks: Sequence[int]) -> dict[str, Any]:
    """In a child: open "r", read every chunk, close (in PATH's directory)."""
    import trio

    os.chdir(os.path.dirname(os.path.abspath(path)))

    from qcowfs.aio import Image
    from qcowfs.errors import QcowError

    out: dict[str, Any] = {"opened": False, "open_error": "", "chunks": [], "errors": [], "crash": ""}

    async def session() -> None:
        try:
            image = Image(path, "r")
        except QcowError as e:
            out["open_error"] = f"{type(e).__name__}: {e}"
            return
        try:
            out["opened"] = True
            for c in chunks:
                try:
                    data = bytes(await image.disk.read(c, CHUNK))
                    out["chunks"].append(data if len(data) == CHUNK else None)   # past the end: none
                except QcowError as e:
                    out["chunks"].append(None)
                    out["errors"].append(f"{type(e).__name__}: {e}")
        except Exception:
            out["crash"] = traceback.format_exc()
        finally:
            try:
                await image.close()
            except QcowError as e:
                out["errors"].append(f"close: {type(e).__name__}: {e}")
            except Exception:
                out["crash"] = out["crash"] or traceback.format_exc()

    async def bounded() -> None:
        with trio.fail_after(QCOWFS_TIMEOUT):
            await session()

    _capture_log()
    trio.run(bounded)
    return out


def run_child(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    status, value = in_child(fn, QCOWFS_TIMEOUT + 5)
    if status == "ok":
        return value
    if status == "timeout":
        return {"timeout": True}
    return {"crash": value}


# ==========================================================================
# the judge

def acked(ops: Sequence[Op], results: Sequence[str]) -> list[tuple[W, str]]:
    """(write, "acked" | "unacked" | "failed") for each write: acknowledged = it returned and
    the next flush returned; failed = it raised (or never ran)."""
    out: list[tuple[W, str]] = []
    pending: list[int] = []
    for i, op in enumerate(ops):
        res = results[i] if i < len(results) else "err: not run"
        if op == FLUSH:
            if res == "ok":
                for j in pending:
                    out[j] = (out[j][0], "acked")
            pending = []
            continue
        assert isinstance(op, W)
        out.append((op, "unacked" if res == "ok" else "failed"))
        if res == "ok":
            pending.append(len(out) - 1)
    return out


def clip_writes(writes: Sequence[tuple[W, str]], size: int) -> list[tuple[W, str]]:
    """WRITES cut at the end of a disk of SIZE bytes (what lies past it does not exist)."""
    return [(W(w.offset, min(w.length, size - w.offset), w.pattern, w.zero), st)
            for w, st in writes if w.offset < size]


def virtual_size(img: Path) -> int:
    with open(img, "rb") as f:
        f.seek(24)
        raw = f.read(8)
    return struct.unpack(">Q", raw)[0] if len(raw) == 8 else 0


def _hx(b: bytes) -> str:
    return b.hex(" ")


@dataclass
class Problem:
    cls: str
    text: str
    qemu_too: bool = False      # QEMU's own session on a copy breaks the same rule

    @property
    def key(self) -> str:
        return self.cls + (" (QEMU too)" if self.qemu_too else "")


def judge_content(chunks: Sequence[int], before: Sequence[bytes | None], after: Sequence[bytes | None],
                  writes: Sequence[tuple[W, str]], img: Path, who: str, after_open_error: str = ""
                  ) -> list[Problem]:
    """Rules (c) and (d) for one image after one implementation's session."""
    problems: list[Problem] = []
    vals = np.array([w.value for w, _ in writes] + [0], dtype=np.int64)
    if after_open_error:
        why = after_open_error.strip().splitlines()[-1][:200] if after_open_error.strip() else "?"
        n_before = sum(b is not None for b in before)
        n_acked = sum(st == "acked" for _, st in writes)
        if n_before:
            return [Problem("unopenable-after", f"QEMU read {n_before} chunks before; after {who}'s session it "
                            f"cannot open the image at all ({why})")]
        if n_acked:
            return [Problem("acked-unopenable", f"QEMU cannot open the image, before or after ({why}); {who} "
                            f"acknowledged {n_acked} writes there, which QEMU will never find")]
        return []

    unreadable_acked: set[int] = set()

    def covering(g: int) -> str:
        ws = [f"#{i} {w.show()} {st}" for i, (w, st) in enumerate(writes) if w.offset <= g < w.offset + w.length]
        return "; ".join(ws) or "no write of the session"

    for ci, c in enumerate(chunks):
        b, a = before[ci], after[ci]
        if b is not None and a is None:
            touched = [f"#{i} {w.show()} {st}" for i, (w, st) in enumerate(writes)
                       if w.offset < c + CHUNK and c < w.offset + w.length]
            problems.append(Problem("unreadable-after",
                                    f"chunk [{c:#x}, +64K) QEMU read before (first bytes {_hx(b[:8])}) is "
                                    f"unreadable by QEMU after {who}'s session (writes over it: "
                                    f"{'; '.join(touched) or 'none'})"))
            continue
        n = CHUNK
        last_acked = np.full(n, -1, dtype=np.int64)
        for i, (w, st) in enumerate(writes):
            lo, hi = max(w.offset, c) - c, min(w.offset + w.length, c + n) - c
            if lo < hi and st == "acked":
                last_acked[lo:hi] = i
        if a is None:
            # unreadable before and after: the acknowledged bytes must still be found by QEMU
            for i, (w, st) in enumerate(writes):
                if st != "acked":
                    continue
                lo, hi = max(w.offset, c) - c, min(w.offset + w.length, c + n) - c
                if lo >= hi or not (last_acked[lo:hi] == i).any():
                    continue
                got = qemu_range(img, c + lo, hi - lo)
                if got is None:
                    if i not in unreadable_acked:
                        unreadable_acked.add(i)
                        problems.append(Problem("acked-unreadable",
                                                f"acknowledged write #{i} {w.show()}: QEMU cannot read "
                                                f"[{c + lo:#x}, +{hi - lo:#x}) of it after {who}'s session "
                                                f"(the chunk was unreadable before too)"))
                    continue
                mine = last_acked[lo:hi] == i
                later_ok = np.zeros(hi - lo, bool)
                arr = np.frombuffer(got, np.uint8)
                for j, (w2, st2) in enumerate(writes):
                    if j > i and st2 != "acked":
                        l2, h2 = max(w2.offset, c + lo) - c - lo, min(w2.offset + w2.length, c + hi) - c - lo
                        if l2 < h2:
                            later_ok[l2:h2] |= arr[l2:h2] == w2.value
                bad = mine & (arr != w.value) & ~later_ok
                if bad.any():
                    k = int(np.argmax(bad))
                    problems.append(Problem("acked-lost",
                                            f"acknowledged write #{i} {w.show()} over a chunk QEMU could not "
                                            f"read before: at {c + lo + k:#x} QEMU reads {_hx(got[k:k + 8])} "
                                            f"after {who}'s session, expected {w.value:02x}"))
            continue
        arr = np.frombuffer(a, np.uint8)
        known = b is not None
        old = np.frombuffer(b, np.uint8) if b is not None else np.zeros(n, np.uint8)
        expect = np.where(last_acked >= 0, vals[last_acked], old)
        ok = (arr == expect) | ((last_acked < 0) & (not known))
        for i, (w, st) in enumerate(writes):
            if st == "acked":
                continue
            lo, hi = max(w.offset, c) - c, min(w.offset + w.length, c + n) - c
            if lo < hi:
                ok[lo:hi] |= (arr[lo:hi] == w.value) & (last_acked[lo:hi] < i)
        bad = ~ok
        if not bad.any():
            continue
        k = int(np.argmax(bad))
        g = c + k
        nbad = int(bad.sum())
        span = int(n - np.argmax(bad[::-1]) - 1)
        if last_acked[k] >= 0:
            cls = "acked-lost"
        elif any(w.offset <= g < w.offset + w.length for w, _ in writes):
            cls = "failed-write-garbage"
        else:
            cls = "untouched-changed"
        e8 = bytes(expect[k:k + 8].astype(np.uint8))
        problems.append(Problem(cls,
                                f"chunk [{c:#x}, +64K) after {who}'s session: {nbad} wrong bytes in "
                                f"[{g:#x}, {c + span + 1:#x}); at {g:#x} old {_hx(b[k:k + 8]) if b else '(unreadable)'}, "
                                f"expected {_hx(e8)}, QEMU reads {_hx(a[k:k + 8])}; writes covering it: "
                                f"{covering(g)}"))
    return problems


@dataclass
class Result:
    seed: int
    layout: str
    mutation: Mutation
    ops: list[Op]
    outcome: str = ""
    qemu_outcome: str = ""
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    qcowfs: dict[str, Any] = field(default_factory=dict)
    qemu: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    mount: bool = False  # qcowfs's session went through a real FUSE mount
    only: str = ""       # the --layout spec the seed was drawn under

    @property
    def violations(self) -> list[Problem]:
        return self.problems

    def session_text(self, results: Sequence[str]) -> str:
        parts = []
        for i, op in enumerate(self.ops):
            r = results[i] if i < len(results) else "not run"
            r = "ok" if r == "ok" else r.replace("err: ", "ERR ")[:140]
            parts.append(f"flush {r}" if op == FLUSH else f"{op.show()} {r}")  # type: ignore[union-attr]
        return "; ".join(parts)

    def report(self) -> str:
        f, qm = self.qcowfs, self.qemu
        if f.get("timeout"):
            fs = "hung (killed)"
        elif f.get("open_error"):
            fs = f"refused: {f['open_error'][:200]}"
        else:
            fs = self.session_text(f.get("results", [])) + (f"; close: {f['close_error']}" if f.get("close_error")
                                                           else "")
        qs = self.session_text(qm.get("results", [])) if qm.get("opened") else \
            f"{'crashed' if qm.get('crash') else 'refused'}: {qm.get('open_error', '')[:200]}"
        if qm.get("opened") and qm.get("crash"):
            qs += f"; then crashed: {qm['crash'][:200]}"
        lines = [f"seed {self.seed}: layout {self.layout}, mutation {self.mutation.name}: {self.mutation.desc}.",
                 f"  qcowfs ({self.outcome}): {fs}",
                 f"  QEMU on a copy ({self.qemu_outcome}): {qs}",
                 "  qemu-img check: " + ", ".join(f"{k} {v}" for k, v in self.checks.items())]
        lines += [f"  VIOLATION [{p.cls}]: {p.text}" for p in self.problems]
        if self.problems:
            lines.append(f"  qcowfs log: {self.qcowfs.get('log', '').strip()[:600]}" if self.qcowfs.get("log")
                         else "  qcowfs log: (nothing)")
        lines += [f"  note: {n}" for n in self.notes]
        if f.get("crash"):
            lines.append("  qcowfs traceback:\n" + f["crash"])
        lines.append(f"  reproduce: python tests/hostile_write.py {'--mount ' if self.mount else ''}"
                     + (f"--layout {self.only} " if self.only else "") + f"--seed {self.seed}")
        return "\n".join(lines)

    def summary_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "layout": self.layout, "mutation": self.mutation.name,
                "outcome": self.outcome, "qemu": self.qemu_outcome,
                "classes": sorted({p.key for p in self.problems}), "seconds": round(self.seconds, 2),
                "report": self.report() if self.problems else ""}


def _bad_message(msg: str) -> bool:
    return "\n" in msg.strip() or any(b in msg for b in BAD_TEXT)


def _sha(p: Path) -> str:
    """The digest of P's content, read as a guest would (holes are zeros): streamed, skipping
    holes (SEEK_DATA), all-zero blocks left out of the digest, so a sparse data file that a
    write far out (an L2 entry pointing at 1 TiB) made huge costs little and the digest does
    not depend on what is allocated."""
    h = hashlib.sha256()
    blk = MiB
    with open(p, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(size.to_bytes(8, "little"))
        pos = 0
        while pos < size:
            try:
                data_at = os.lseek(f.fileno(), pos, os.SEEK_DATA)
            except OSError:         # ENXIO: only a hole to the end
                break
            end = os.lseek(f.fileno(), data_at, os.SEEK_HOLE)
            pos = data_at // blk * blk          # POS is block aligned: never a block hashed twice
            while pos < end:
                f.seek(pos)
                data = f.read(blk)
                if data.count(0) != len(data):
                    h.update(pos.to_bytes(8, "little"))
                    h.update(data)
                pos += blk
    return h.hexdigest()


def _outcome(run: dict[str, Any], corrupt_bit: bool) -> str:
    if run.get("timeout"):
        return "hung"
    if run.get("crash") and not run.get("opened"):
        return "crashed"
    if not run.get("opened"):
        return "refused"
    if run.get("corrupt") or corrupt_bit:
        return "corrupt"
    if any(r != "ok" for r in run.get("results", [])):
        return "errors"
    return "clean"


def _dir_sha(d: Path) -> dict[str, str]:
    """The digest of every file in D (a copy's image, backing file, data file)."""
    return {p.name: _sha(p) for p in sorted(d.iterdir()) if p.is_file()}


def _copy_case_dir(src: Path, dest: Path) -> Path:
    """A copy of a case's directory SRC (the image disk.qcow2, its backing file base.qcow2 and
    data file DATA_FILE, under the names the image gives them) as DEST; its image."""
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".done", "_*", "mnt", "*.log"))
    return dest / "disk.qcow2"


def run_case(seed: int, cache: BaseCache, work: Path, mount: bool = False, only: str | None = None) -> Result:
    """One seed; MOUNT: qcowfs's session through a real writable FUSE mount, not in-process;
    ONLY: a --layout spec.

    Each copy of the damaged image is a directory of its own in the case's directory
    (before/: the reference, a/: QEMU's session, b/: qcowfs's, c/: the read-only open),
    holding disk.qcow2 and a copy of its backing file and data file under the names the
    header gives them; QEMU tools run in that directory (qemu_run), qcowfs's child there too."""
    t0 = time.monotonic()
    case = make_case(seed, cache, only)
    m = cache.get(case.layout)
    lay = m.layout
    res = Result(seed, case.layout, case.mutation, case.ops, mount=mount, only=only or "")
    p = res.problems.append
    work.mkdir(parents=True, exist_ok=True)
    d = (work / f"case{seed}").resolve()
    if d.exists():
        shutil.rmtree(d)
    d.mkdir()
    orig = _copy_case_dir(m.path.parent, d / "before")
    with open(orig, "r+b") as fh:
        for off, data in case.mutation.patches:
            fh.seek(off)
            fh.write(data)
    a_img, b_img, c_img = (_copy_case_dir(orig.parent, d / n) for n in ("a", "b", "c"))
    base_sha = _sha(orig.parent / "base.qcow2") if lay.backing else ""
    orig_sha = _dir_sha(orig.parent)
    chunks = _chunks(lay)

    before, before_err = qemu_chunks(orig, chunks)
    check0 = qemu_check(orig)
    snap_ids = [e.id for e in m.snaps]
    snaps_before = {i: qemu_snapshot(orig, i, d) for i in snap_ids}
    if _dir_sha(orig.parent) != orig_sha:
        raise AssertionError("qemu-nbd / qemu-img changed the image they only read")

    # ---- QEMU on A, qcowfs on B, qcowfs read-only on C ------------------------------------
    qemu = qemu_session(a_img, case.ops)
    res.qemu = qemu
    check_a = qemu_check(a_img)
    a_sha = _dir_sha(a_img.parent)
    f = _mount_write_session(b_img, case.ops) if mount else \
        run_child(lambda: _qcowfs_write_session(str(b_img), case.ops))
    res.qcowfs = f
    for other, sha in ((orig, orig_sha), (a_img, a_sha)):
        changed = sorted(k for k, v in _dir_sha(other.parent).items() if sha.get(k) != v)
        if changed:
            p(Problem("other-copy-changed", f"qcowfs's session on {b_img.parent.name}/ changed "
                      f"{', '.join(changed)} of another copy ({other.parent.name}/)"))
    _, bits_b = header_bits(b_img)
    _, bits_0 = header_bits(orig)
    _, bits_a = header_bits(a_img)
    res.outcome = _outcome(f, bool(bits_b & INCOMPAT_CORRUPT) and not bits_0 & INCOMPAT_CORRUPT)
    res.qemu_outcome = _outcome({"opened": qemu["opened"], "results": qemu["results"], "crash": qemu["crash"]},
                                bool(bits_a & INCOMPAT_CORRUPT) and not bits_0 & INCOMPAT_CORRUPT)
    check_b = qemu_check(b_img)
    res.checks = {"before": check0.show(), "after QEMU": check_a.show(), "after qcowfs": check_b.show()}

    # (a) no crash, no hang, one-line QcowErrors
    if f.get("timeout"):
        p(Problem("hang", f"the qcowfs session did not finish within {QCOWFS_TIMEOUT + 5:g}s (killed)"))
    if f.get("crash"):
        p(Problem("crash", "qcowfs raised something other than a QcowError: "
                  + f["crash"].strip().splitlines()[-1][:300]))
    for msg in [f.get("open_error", ""), f.get("close_error", "")] + \
            [r[5:] for r in f.get("results", []) if r != "ok"]:
        if msg and _bad_message(msg):
            p(Problem("bad-message", f"error message is not one clear line: {msg[:300]!r}"))

    # (b) qemu-img check no worse
    if check_b.rc == 1 and check0.rc != 1 and check_a.rc != 1:
        p(Problem("check-fails", f"qemu-img check could check the image before (and after QEMU's session) "
                  f"but not after qcowfs's: {check_b.show()}"))
    elif check_b.corruptions > max(check0.corruptions, check_a.corruptions):
        p(Problem("check-worse", f"qemu-img check after qcowfs counts {check_b.corruptions} corruptions; "
                  f"before {check0.corruptions}, after QEMU's session {check_a.corruptions}; new: "
                  + new_check_messages(b_img, orig)))
    if header_bits(orig)[0] and not header_bits(b_img)[0]:
        p(Problem("magic-lost", "the image no longer starts with the qcow2 magic"))

    # (c), (d) QEMU's reads of B against the old image plus the acknowledged writes
    writes_b = acked(case.ops, f.get("results", [])) if f.get("opened") else \
        [(op, "failed") for op in case.ops if isinstance(op, W)]
    writes_b = clip_writes(writes_b, virtual_size(b_img))
    after_b, b_open_error = qemu_chunks(b_img, chunks)
    content = judge_content(chunks, before, after_b, writes_b, b_img, "qcowfs", b_open_error)
    if content:
        # the same rule on QEMU's own copy, to say whether QEMU keeps it
        writes_a = acked(case.ops, qemu["results"]) if qemu["opened"] else \
            [(op, "failed") for op in case.ops if isinstance(op, W)]
        writes_a = clip_writes(writes_a, virtual_size(a_img))
        after_a, a_open_error = qemu_chunks(a_img, chunks)
        classes_a = {x.cls for x in judge_content(chunks, before, after_a, writes_a, a_img, "QEMU", a_open_error)}
        for prob in content:
            prob.qemu_too = prob.cls in classes_a
            prob.text += (" [QEMU's own session on a copy breaks this rule too]" if prob.qemu_too
                          else " [QEMU's session on a copy keeps this rule]")
        res.problems += content
    if res.problems and f.get("opened"):
        first_fail = next((i for i, r in enumerate(f.get("results", [])) if r != "ok"), None)
        if first_fail is not None and case.ops[first_fail] == FLUSH:
            p(Problem("flush-first-sign", f"the first error qcowfs reported was a flush (op #{first_fail}: "
                      f"{f['results'][first_fail][5:][:160]}), after writes that had returned and went astray "
                      "(see the other violations)"))

    # snapshots and the backing file keep their content
    for ident, content_before in snaps_before.items():
        if content_before is None:
            continue
        after = qemu_snapshot(b_img, ident, d)
        if after != content_before:
            if after is None:
                why = "QEMU can no longer read it"
            else:
                k = next(i for i in range(min(len(after), len(content_before)))
                         if after[i] != content_before[i]) if len(after) == len(content_before) else -1
                why = f"first difference at {k:#x}" if k >= 0 else "its size changed"
            qemu_too = qemu_snapshot(a_img, ident, d) != content_before
            p(Problem("snapshot-changed", f"internal snapshot {ident} reads differently after qcowfs's "
                      f"session ({why})" + (" [QEMU's own session on a copy changes it too]" if qemu_too
                                            else " [QEMU's session on a copy keeps it]"), qemu_too))
    if lay.backing and _sha(b_img.parent / "base.qcow2") != base_sha:
        qemu_too = _sha(a_img.parent / "base.qcow2") != base_sha
        p(Problem("backing-changed", "the backing file was modified"
                  + (" [QEMU's own session on a copy modifies it too]" if qemu_too
                     else " [QEMU's session on a copy keeps it]"), qemu_too))

    # (e) a read-only open changes nothing and serves what QEMU serves
    c_sha = _dir_sha(c_img.parent)
    ro = run_child(lambda: _qcowfs_read_session(str(c_img), chunks))
    if ro.get("timeout"):
        p(Problem("hang", "a read-only qcowfs open reading every chunk did not finish (killed)"))
    if ro.get("crash"):
        p(Problem("crash", "read-only qcowfs raised something other than a QcowError: "
                  + ro["crash"].strip().splitlines()[-1][:300]))
    for msg in [ro.get("open_error", "")] + ro.get("errors", []):
        if msg and _bad_message(msg):
            p(Problem("bad-message", f"read-only: error message is not one clear line: {msg[:300]!r}"))
    c_changed = sorted(k for k, v in _dir_sha(c_img.parent).items() if c_sha.get(k) != v)
    if c_changed:
        p(Problem("ro-changed-file", "a read-only qcowfs open (reading every chunk) changed "
                  + ", ".join(c_changed)))
    served_more = 0
    for ci, got in enumerate(ro.get("chunks", [])):
        want = before[ci]
        if got is not None and want is not None and got != want:
            k = next(i for i in range(CHUNK) if got[i] != want[i])
            p(Problem("ro-read-differs", f"read-only qcowfs reads chunk [{chunks[ci]:#x}, +64K) differently "
                      f"from QEMU: at {chunks[ci] + k:#x} QEMU {_hx(want[k:k + 8])}, qcowfs {_hx(got[k:k + 8])}"))
            break
        if got is not None and want is None:
            served_more += 1
    if served_more:
        res.notes.append(f"read-only qcowfs served {served_more} chunks QEMU cannot read")
    if before_err:
        res.notes.append(f"QEMU cannot open the damaged image: {before_err.splitlines()[-1][:160]}")
    if res.problems:
        res.outcome = "violation"
    res.seconds = time.monotonic() - t0
    shutil.rmtree(d, ignore_errors=True)
    return res


def check_messages(img: Path) -> list[str]:
    """The ERROR lines of `qemu-img check` (human output) of IMG."""
    p = qemu_run(["qemu-img", "check", img], img, text=True)
    return [ln.strip() for ln in (p.stdout + p.stderr).splitlines() if ln.startswith(("ERROR", "Warning"))]


def new_check_messages(after: Path, before: Path) -> str:
    """What `qemu-img check` says of AFTER and did not say of BEFORE (the first three)."""
    old = set(check_messages(before))
    new = [ln for ln in check_messages(after) if ln not in old]
    return "; ".join(new[:3]) + (f" (+{len(new) - 3} more)" if len(new) > 3 else "") if new else "(no new lines)"


# ==========================================================================
# many cases (make soak)

_CACHE: BaseCache | None = None


_MOUNT = False
_ONLY: str | None = None


def _worker_init(cache_dir: str, mount: bool, only: str | None = None) -> None:
    global _CACHE, _MOUNT, _ONLY
    _CACHE = BaseCache(Path(cache_dir))
    _MOUNT = mount
    _ONLY = only


def _worker_case(seed: int, work: str) -> dict[str, Any]:
    assert _CACHE is not None
    try:
        return run_case(seed, _CACHE, Path(work), _MOUNT, _ONLY).summary_dict()
    except Exception:
        return {"seed": seed, "outcome": "harness-error", "classes": ["harness-error"],
                "report": f"seed {seed}: the harness failed:\n{traceback.format_exc()}", "layout": "?",
                "mutation": "?", "qemu": "?", "seconds": 0}


def soak(start: int, cases: int | None, minutes: float | None, jobs: int, stats: Path | None,
         seed_list: Sequence[int] | None = None, mount: bool = False, only: str | None = None) -> int:
    top = Path(tempfile.mkdtemp(prefix="qcowfs-hostile-write-"))
    cache_dir = top / "bases"
    cache = BaseCache(cache_dir)
    for name in select_layouts(only) if only else ALL_LAYOUTS:        # built once, before the workers fork
        cache.get(name)
    deadline = time.monotonic() + minutes * 60 if minutes else None
    counts: collections.Counter[str] = collections.Counter()
    qemu_counts: collections.Counter[str] = collections.Counter()
    classes: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    fam_counts: collections.Counter[str] = collections.Counter()
    shown: collections.Counter[tuple[Any, ...]] = collections.Counter()
    lay_counts: collections.Counter[str] = collections.Counter()
    done = 0
    t0 = time.monotonic()
    seeds = iter(seed_list if seed_list else range(start, start + cases) if cases else _count(start))
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init,
                                                initargs=(str(cache_dir), mount, only)) as ex:
        running: set[concurrent.futures.Future[dict[str, Any]]] = set()

        def submit() -> bool:
            if deadline is not None and time.monotonic() > deadline:
                return False
            s = next(seeds, None)
            if s is None:
                return False
            running.add(ex.submit(_worker_case, s, str(top / "work")))
            return True

        for _ in range(jobs * 2):
            submit()
        while running:
            finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for fut in finished:
                running.discard(fut)
                r = fut.result()
                lay_counts[r["layout"]] += 1
                done += 1
                counts[r["outcome"]] += 1
                qemu_counts[r["qemu"]] += 1
                fam_counts[r["mutation"].split("/")[0]] += 1
                for cl in r["classes"]:
                    classes[cl].append(r)
                if r["report"]:
                    # the whole report for the first cases of each kind, one line for the rest
                    kind = (tuple(r["classes"]), r["mutation"].split(":")[0])
                    shown[kind] += 1
                    if shown[kind] <= 2:
                        print(r["report"], flush=True)
                    else:
                        print(f"seed {r['seed']}: {r['mutation']} on {r['layout']}: "
                              f"{', '.join(r['classes'])}", flush=True)
                if stats is not None:
                    with open(stats, "a") as fh:
                        fh.write(json.dumps({k: v for k, v in r.items() if k != "report"}) + "\n")
                if done % 100 == 0:
                    print(f"hostile-write: {done} cases, {dict(counts)} ({time.monotonic() - t0:.0f}s)",
                          flush=True)
                submit()
    shutil.rmtree(top, ignore_errors=True)
    print(f"\nhostile-write: {done} cases (seeds from {start}" + (f", --layout {only}" if only else "")
          + f") in {(time.monotonic() - t0) / 60:.1f} min")
    print("layouts: " + ", ".join(f"{k} {v}" for k, v in sorted(lay_counts.items())))
    print("qcowfs outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print("QEMU outcomes:   " + ", ".join(f"{k} {v}" for k, v in sorted(qemu_counts.items())))
    print("mutation families: " + ", ".join(f"{k} {v}" for k, v in sorted(fam_counts.items())))
    for cl, rs in sorted(classes.items()):
        muts = collections.Counter(r["mutation"] for r in rs)
        print(f"violation class {cl}: {len(rs)} cases, e.g. seed {rs[0]['seed']} ({rs[0]['mutation']}); "
              f"mutations: " + ", ".join(f"{k} x{v}" for k, v in muts.most_common(8)))
    return 1 if classes else 0


def _count(start: int) -> Iterator[int]:
    while True:
        yield start
        start += 1


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, help="run one case, verbosely")
    ap.add_argument("--keep", type=Path, help="with --seed: keep the images in this directory")
    ap.add_argument("--cases", type=int, help="run this many cases (seeds START, START+1, ...)")
    ap.add_argument("--minutes", type=float, help="run cases until this much time has passed")
    ap.add_argument("--start", type=int, default=0, help="first seed (default 0)")
    ap.add_argument("--seeds", help="run these seeds (comma-separated), as --cases does")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--stats", type=Path, help="append one JSON line per case to this file")
    ap.add_argument("--mount", action="store_true",
                    help="write through a real writable FUSE mount (qcowfs mount), not in-process")
    ap.add_argument("--layout", metavar="SPEC",
                    help="draw only these layouts: comma-separated names or fnmatch patterns, or "
                         "'data-file' for every layout with an external data file (a seed then names "
                         "another case than without)")
    args = ap.parse_args(argv)
    if args.layout:
        try:
            select_layouts(args.layout)
        except ValueError as e:
            ap.error(str(e))
    if args.seed is not None:
        with tempfile.TemporaryDirectory(prefix="qcowfs-hw-") as tmp:
            cache = BaseCache(Path(tmp) / "bases")
            case = make_case(args.seed, cache, args.layout)
            print(f"seed {args.seed}: layout {case.layout}; mutation {case.mutation.name}: {case.mutation.desc}")
            print("session: " + "; ".join("flush" if op == FLUSH else op.show() for op in case.ops))  # type: ignore[union-attr]
            work = Path(tmp) / "work"
            if args.keep:
                _keep_case(args.seed, cache, args.keep, args.layout)
            r = run_case(args.seed, cache, work, args.mount, args.layout)
            print(r.report())
            print(f"outcome: {r.outcome} ({r.seconds:.1f}s)")
            return 1 if r.problems else 0
    seed_list = [int(x) for x in args.seeds.split(",") if x.strip()] if args.seeds else None
    if not args.cases and not args.minutes and not seed_list:
        ap.error("give --seed, --seeds, --cases or --minutes")
    return soak(args.start, args.cases, args.minutes, args.jobs, args.stats, seed_list, args.mount, args.layout)


def _keep_case(seed: int, cache: BaseCache, dest: Path, only: str | None = None) -> None:
    """The damaged image of SEED (and its backing file and data file) in DEST, for a look by
    hand (run QEMU tools in DEST: a relative data file name resolves against the working
    directory)."""
    case = make_case(seed, cache, only)
    m = cache.get(case.layout)
    dest.mkdir(parents=True, exist_ok=True)
    for p in m.path.parent.iterdir():
        if p.suffix == ".qcow2" or p.name == DATA_FILE:
            shutil.copyfile(p, dest / p.name)
    with open(dest / "disk.qcow2", "r+b") as f:
        for off, data in case.mutation.patches:
            f.seek(off)
            f.write(data)
    print(f"damaged image: {dest / 'disk.qcow2'}")


if __name__ == "__main__":
    sys.exit(main())
