"""The in-process test tier: images built by QEMU, written by qcowfs' Image, judged by QEMU.

No FUSE, no root, no daemon: the tests open images with the public API (`qcowfs.aio`), drive
writes, resize, flush and close on it, and then ask QEMU's own tools whether the
image is still what it must be. qemu-img / qemu-io / qemu-nbd are only the
oracle and the image builders here; qcowfs never calls them.

Three parts:

* building (`Layout`, `build`): a qcow2 image for any combination of cluster
  size, refcount width, compat level, extended L2, lazy refcounts (optionally
  left dirty by a killed qemu-io), compression type, a qcow2 backing file with
  data, compressed clusters, internal snapshots and persistent bitmaps (auto or
  disabled);
* driving (`Subject`): open the Image in-process, write / resize / flush /
  close it while a raw model of the disk (a sparse file) and the expected
  bits of every bitmap follow each write;
* judging (`Subject.judge`): `qemu-img check` exit 0, `qemu-img compare` of the
  image with the model, every internal snapshot unchanged since it was taken,
  and every persistent bitmap exactly as QEMU must see it.

Bitmap oracle (honest note): the bits are read *through QEMU*, not through
qcowfs. Each bitmap is exported with `qemu-nbd -B NAME` on a unix socket and
read back with `qemu-img map --image-opts driver=nbd,...,x-dirty-bitmap=
qemu:dirty-bitmap:NAME`, where dirty areas show as `"data": false`. That costs
~30 ms per bitmap, so it is cheap enough to do after every session. qemu-nbd
refuses a bitmap still flagged in_use, and `qemu-img info` must list every
bitmap without the in-use flag as well. The expected bits are the bits QEMU
showed when the bitmap was made (or at build time) plus every granule a write
touched since, while the bitmap was auto; a disabled bitmap must not change.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import trio

import luks
from qcowfs.errors import QcowError, ResizeError
import qcowfs
import qcowfs.aio
from qcowfs.aio import Image
from qcowfs.engine.metadata import Metadata
from qcowfs.engine.references import build_overlap_map

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
TIMEOUT = 300
# How long qemu-img amend may take on a model image (they are small) before it
# is taken to hang, and the cluster size from which 7.2's amend of refcount_bits
# always hangs (amend_offline).
QEMU_AMEND_TIMEOUT = 60
QEMU_AMEND_HANGS_FROM = 512 * KiB
T = TypeVar("T")


# --------------------------------------------------------------------------
# running the QEMU tools

def run(*args: object, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run a command and capture its output; never raises on a non-zero exit."""
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)


def clip(text: str, head: int = 40, tail: int = 10) -> str:
    """A long tool output cut to its first and last lines: a broken refcount table makes
    `qemu-img check` print 180,000 lines, which must not drown the assertion message."""
    lines = text.splitlines()
    if len(lines) <= head + tail:
        return text
    return "\n".join(lines[:head] + [f"... ({len(lines) - head - tail} lines left out) ..."] + lines[-tail:])


def must(*args: object) -> str:
    """Run a QEMU tool that has to succeed (building or reading the oracle)."""
    p = run(*args)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} exited {p.returncode}:\n{clip(p.stdout + p.stderr)}")
    return p.stdout


@dataclass(frozen=True)
class Secrets:
    """The LUKS secrets of an image and of its backing file (None: not encrypted)."""
    image: str | None = None
    backing: str | None = None


PLAIN = Secrets()


def naming(image: Path, secrets: Secrets = PLAIN, fmt: bool = True,
           backing: bool = True) -> tuple[list[object], list[object]]:
    """How a QEMU tool is told about IMAGE: (options, the image argument). An
    encrypted image (or backing file) needs its secret and --image-opts (which
    excludes -f). BACKING false: for a tool that opens no backing file
    (qemu-img bitmap), which refuses options for one."""
    back = secrets.backing if backing else None
    if secrets.image is None and back is None:
        return (["-f", "qcow2"] if fmt else []), [image]
    pre: list[object] = []
    opts = f"driver=qcow2,file.filename={str(image).replace(',', ',,')}"
    if secrets.image is not None:
        pre += luks.secret_object(secrets.image, "sec0")
        opts += ",encrypt.key-secret=sec0"
    if back is not None:
        pre += luks.secret_object(back, "sec1")
        opts += ",backing.encrypt.key-secret=sec1"
    return [*pre, "--image-opts"], [opts]


def qemu_io(image: Path, *cmds: str, secrets: Secrets = PLAIN) -> None:
    """qemu-io reports some I/O errors on stdout and still exits 0: treat both as failure."""
    pre, target = naming(image, secrets)
    args: list[object] = ["qemu-io", *pre]
    for c in cmds:
        args += ["-c", c]
    p = run(*args, *target)
    if p.returncode != 0 or "failed" in p.stdout or "error" in p.stdout.lower():
        raise RuntimeError(f"qemu-io {list(cmds)} on {image} exited {p.returncode}:\n{clip(p.stdout + p.stderr)}")


def info(image: Path) -> dict[str, Any]:
    return json.loads(must("qemu-img", "info", "--output=json", image))


def to_raw(image: Path, dest: Path, snapshot_id: str | None = None, secrets: Secrets = PLAIN) -> Path:
    pre, target = naming(image, secrets, fmt=False)
    args: list[object] = ["qemu-img", "convert", *pre, "-O", "raw"]
    if snapshot_id is not None:
        args += ["-l", f"snapshot.id={snapshot_id}"]
    must(*args, *target, dest)
    return dest


# --------------------------------------------------------------------------
# data written by the tests

def counter_block(n: int, tag: int) -> bytes:
    """Compressible but position-dependent: 16-byte records, so a misplaced cluster differs."""
    return b"".join(b"%04x%011x\n" % (tag & 0xFFFF, i) for i in range(-(-n // 16)))[:n]


def make_data(kind: str, n: int, seed: int) -> bytes:
    """Write buffers of the kinds that take different paths in the writer: random data,
    all zeros (zero detection), one repeated byte (compresses), position-dependent text."""
    if kind == "zeros":
        return bytes(n)
    if kind == "pattern":
        return bytes([seed % 255 + 1]) * n
    if kind == "text":
        block = counter_block(min(n, 64 * KiB), seed)
        return (block * -(-n // len(block)))[:n]
    return random.Random(seed).randbytes(n)


# --------------------------------------------------------------------------
# layouts

@dataclass(frozen=True)
class BitmapSpec:
    name: str
    auto: bool = True
    granularity: int = 64 * KiB


@dataclass(frozen=True)
class Layout:
    """Everything `build` needs to make one image with qemu-img / qemu-io."""
    size: int = 64 * MiB
    cluster_size: int = 64 * KiB
    refcount_bits: int = 16
    compat: str = "1.1"                 # "0.10" (v2) or "1.1" (v3)
    extended_l2: bool = False
    lazy_refcounts: bool = False
    dirty: bool = False                 # lazy refcounts only: qemu-io killed after writing
    compression_type: str = "zlib"
    backing_size: int = 0               # a qcow2 backing file with data, this big (0: none)
    backing_cluster_size: int = 64 * KiB
    prefill: bool = False               # qemu-io writes data before qcowfs sees the image
    compressed: int = 0                 # compressed clusters written with `qemu-io write -c`
    snapshots: int = 0                  # internal snapshots taken at build time
    bitmaps: tuple[BitmapSpec, ...] = ()
    encrypted: bool = False             # LUKS (qemu-img's default cipher), the secret of tests/luks.py
    backing_key: str = ""               # the backing file LUKS too: "same" secret, or "other" (its own)
    data_file: str = ""                 # "external": the data in disk.data; "raw": data_file_raw too
    preallocation: str = "off"          # qemu-img create's: off, metadata, falloc, full
    seed: int = 0

    @property
    def v3(self) -> bool:
        return self.compat == "1.1"

    @property
    def backing_secret(self) -> str | None:
        """The backing file's LUKS secret as built (None: plain)."""
        return {"same": luks.SECRET, "other": luks.OTHER_SECRET}.get(self.backing_key)

    def problems(self) -> list[str]:
        """Why QEMU would refuse to make this image (empty: buildable)."""
        out = []
        if self.size % 512 or self.size <= 0:
            out.append("virtual size must be a positive multiple of 512")
        if not self.v3:
            if self.refcount_bits != 16:
                out.append("v2 has 16-bit refcounts only")
            if self.extended_l2 or self.lazy_refcounts or self.bitmaps or self.compression_type != "zlib":
                out.append("extended L2, lazy refcounts, bitmaps and zstd need v3")
        if self.extended_l2 and self.cluster_size < 16 * KiB:
            out.append("extended L2 needs clusters of at least 16 KiB")
        if self.dirty and not self.lazy_refcounts:
            out.append("only a lazy-refcounts image can be left dirty")
        if self.dirty and (self.bitmaps or self.snapshots):
            out.append("a dirty image stays dirty only if nothing opens it read-write after the kill "
                       "(and bitmaps would be left in_use)")
        if self.snapshots and not snapshot_fits(self.refcount_bits, self.snapshots, self.compressed):
            out.append("refcounts too narrow for that many snapshots")
        if self.data_file not in ("", "external", "raw"):
            out.append(f"data_file is '', 'external' or 'raw', not {self.data_file!r}")
        if self.data_file and not self.v3:
            out.append("an external data file needs v3")
        if self.data_file and (self.snapshots or self.compressed):
            out.append("an external data file holds neither internal snapshots nor compressed clusters")
        if self.data_file == "raw" and self.backing_size:
            out.append("data_file_raw and a backing file cannot be used at the same time")
        if self.preallocation not in ("off", "metadata", "falloc", "full"):
            out.append(f"preallocation is off, metadata, falloc or full, not {self.preallocation!r}")
        if self.preallocation != "off" and self.backing_size and not self.extended_l2:
            out.append("a backing file and preallocation need extended L2 (QEMU)")
        if self.preallocation != "off" and (self.compressed or self.dirty):
            out.append("preallocated clusters take no compressed write (QEMU compresses into unallocated "
                       "clusters only), and a write allocates nothing, so none leaves lazy refcounts dirty")
        if self.backing_key not in ("", "same", "other"):
            out.append(f"backing_key is '', 'same' or 'other', not {self.backing_key!r}")
        if self.backing_key and not self.backing_size:
            out.append("backing_key needs a backing file")
        if self.data_file == "raw" and self.dirty:
            out.append("data_file_raw preallocates every cluster: no write allocates, none leaves "
                       "lazy refcounts dirty")
        return out

    def describe(self) -> str:
        """One line a failure report can rebuild the image from."""
        parts = [f"size={self.size}", f"cluster={self.cluster_size}", f"refcount_bits={self.refcount_bits}",
                 f"compat={self.compat}"]
        for name in ("extended_l2", "lazy_refcounts", "dirty", "prefill", "encrypted"):
            if getattr(self, name):
                parts.append(name)
        if self.compression_type != "zlib":
            parts.append(f"compression={self.compression_type}")
        if self.backing_size:
            parts.append(f"backing={self.backing_size}@{self.backing_cluster_size}")
        if self.backing_key:
            parts.append(f"backing_key={self.backing_key}")
        if self.compressed:
            parts.append(f"compressed={self.compressed}")
        if self.snapshots:
            parts.append(f"snapshots={self.snapshots}")
        if self.data_file:
            parts.append(f"data_file={self.data_file}")
        if self.preallocation != "off":
            parts.append(f"preallocation={self.preallocation}")
        for b in self.bitmaps:
            parts.append(f"bitmap={b.name}:{'auto' if b.auto else 'disabled'}:{b.granularity}")
        parts.append(f"seed={self.seed}")
        return "Layout(" + ", ".join(parts) + ")"

    def features(self) -> str:
        """The combination of features, without sizes and seed (counted by `make soak`)."""
        f = [f"c{self.cluster_size}", f"r{self.refcount_bits}", "v3" if self.v3 else "v2"]
        f += [n for n in ("extended_l2", "lazy_refcounts", "dirty", "prefill", "encrypted") if getattr(self, n)]
        if self.compression_type != "zlib":
            f.append(self.compression_type)
        if self.backing_size:
            f.append("backing")
        if self.backing_key:
            f.append(f"backing-luks-{self.backing_key}")
        if self.compressed:
            f.append("compressed")
        if self.snapshots:
            f.append("snapshots")
        if self.data_file:
            f.append("data-file" if self.data_file == "external" else "data-file-raw")
        if self.preallocation != "off":
            f.append(f"prealloc-{self.preallocation}")
        if self.bitmaps:
            f.append("bitmaps-" + "".join("a" if b.auto else "d" for b in self.bitmaps))
        return "+".join(f)


def snapshot_fits(refcount_bits: int, snapshots: int, compressed: int) -> bool:
    """True if QEMU can hold this many snapshots without a refcount overflow: every
    cluster then has snapshots+1 references, times the compressed clusters QEMU may
    pack into one host cluster. (qemu-img refuses the snapshot otherwise.)"""
    return (snapshots + 1) * max(1, compressed) < (1 << refcount_bits) - 1


# --------------------------------------------------------------------------
# the raw model and the expected bitmaps

class Model:
    """The disk as it must read: a sparse raw file, written alongside every write."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = path.stat().st_size

    def write(self, offset: int, data: bytes) -> None:
        assert 0 <= offset and offset + len(data) <= self.size, (offset, len(data), self.size)
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    def read(self, offset: int, length: int) -> bytes:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def resize(self, new_size: int) -> None:
        """Grown areas read zeros (QEMU and qcowfs both hide a larger backing file there)."""
        os.truncate(self.path, new_size)
        self.size = new_size


@dataclass
class ExpectedBitmap:
    name: str
    auto: bool
    granularity: int
    bits: np.ndarray

    def resize(self, size: int) -> None:
        """The disk is SIZE now: bits past the end go, new ones are clear (as QEMU
        resizes its bitmaps, and qcowfs its stored ones)."""
        n = nbits(size, self.granularity)
        grown = np.zeros(n, bool)
        grown[: min(n, len(self.bits))] = self.bits[:n]
        self.bits = grown

    def mark(self, offset: int, length: int) -> None:
        if self.auto and length > 0:
            g = self.granularity
            self.bits[offset // g : (offset + length - 1) // g + 1] = True


def nbits(size: int, granularity: int) -> int:
    return -(-size // granularity)


@contextlib.contextmanager
def nbd_export(image: Path, name: str, secrets: Secrets = PLAIN) -> Iterator[str]:
    """`qemu-nbd -B NAME` of IMAGE on a unix socket (its path), for one client."""
    # unix socket paths are limited to 108 bytes: not under pytest's long tmp_path
    d = tempfile.mkdtemp(prefix="qnbd", dir="/tmp")
    sock, pidfile = os.path.join(d, "s"), os.path.join(d, "pid")
    try:
        pre, target = naming(image, secrets)
        must("qemu-nbd", "--fork", "-r", *pre, "-B", name, "-k", sock, "--pid-file", pidfile, *target)
        yield sock
    finally:
        try:
            pid = int(Path(pidfile).read_text())
        except (OSError, ValueError):
            pid = 0
        if pid:
            # qemu-nbd without -t exits after its one client; until it has, it holds the
            # image (and its lock): the next session must not start before that
            _wait_gone(pid, 10) or (_kill(pid) and _wait_gone(pid, 10))
        shutil.rmtree(d, ignore_errors=True)


def nbd_dirty_map(image: Path, name: str, secrets: Secrets = PLAIN) -> list[dict[str, Any]]:
    """QEMU's extent list of bitmap NAME (qemu-nbd -B + nbdinfo --map=qemu:dirty-bitmap:NAME
    --json): what `qcowfs map --bitmap` must equal."""
    with nbd_export(image, name, secrets) as sock:
        return list(json.loads(must("nbdinfo", f"--map=qemu:dirty-bitmap:{name}", "--json",
                                    f"nbd+unix:///?socket={sock}")))


def dirty_bits(image: Path, name: str, granularity: int, size: int, secrets: Secrets = PLAIN) -> np.ndarray:
    """The bits of bitmap NAME as QEMU sees them (see the module docstring)."""
    bits = np.zeros(nbits(size, granularity), bool)
    with nbd_export(image, name, secrets) as sock:
        out = must("qemu-img", "map", "--output=json", "--image-opts",
                   f"driver=nbd,server.type=unix,server.path={sock},"
                   f"x-dirty-bitmap=qemu:dirty-bitmap:{name.replace(',', ',,')}")
    for e in json.loads(out):
        if not e["data"]:
            start, end = e["start"], e["start"] + e["length"]
            bits[start // granularity : (end - 1) // granularity + 1] = True
    return bits


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:   # a zombie holds no files: count it as gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _kill(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    return True


def describe_bits(bits: np.ndarray, granularity: int, limit: int = 8) -> str:
    """Set bits as guest byte ranges, for assertion messages."""
    idx = np.flatnonzero(bits)
    if not len(idx):
        return "none"
    runs: list[tuple[int, int]] = []
    start = prev = int(idx[0])
    for i in map(int, idx[1:]):
        if i != prev + 1:
            runs.append((start, prev))
            start = i
        prev = i
    runs.append((start, prev))
    text = ", ".join(f"[{a * granularity:#x}, {(b + 1) * granularity:#x})" for a, b in runs[:limit])
    return text + (f" and {len(runs) - limit} more ranges" if len(runs) > limit else "")


# --------------------------------------------------------------------------
# building

def _create(path: Path, size: int, backing: Path | None = None, secret: str | None = None,
            backing_encrypted: bool = False, **opts: object) -> None:
    args: list[object] = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if secret is not None:
        args += luks.secret_object(secret)
        opts.update({"encrypt.format": "luks", "encrypt.key-secret": "sec0", "encrypt.iter-time": 10})
    if opts:
        args += ["-o", ",".join(f"{k}={v}" for k, v in opts.items())]
    if backing is not None:
        args += ["-b", backing.name, "-F", "qcow2"]
        if backing_encrypted:
            args.append("-u")   # (qemu-img create cannot be given the backing file's secret)
    (luks.create_encrypted if secret is not None else must)(*args, path, size)


def _scatter(rng: random.Random, src: Path, size: int, n: int, max_len: int) -> list[str]:
    """qemu-io writes of varied data at unaligned offsets, one touching the last byte."""
    cmds = []
    last = min(777, size)
    cmds.append(f"write -s {src} {size - last} {last}")
    for _ in range(n):
        ln = rng.randint(1, max(1, min(max_len, size // 4)))
        off = rng.randint(0, size - ln)
        r = rng.random()
        if r < 0.4:
            cmds.append(f"write -s {src} {off} {ln}")
        elif r < 0.8:
            cmds.append(f"write -P 0x{rng.randint(1, 255):02x} {off} {ln}")
        else:
            cmds.append(f"write -z {off} {ln}")
    return cmds


@dataclass
class Subject:
    """An image under test, its raw model, its snapshots and bitmaps as they must be."""
    directory: Path
    image: Path
    layout: Layout
    model: Model
    snapshots: dict[str, Path] = field(default_factory=dict)      # snapshot id -> expected raw
    snapshot_names: dict[str, str] = field(default_factory=dict)  # snapshot id -> name
    bitmaps: dict[str, ExpectedBitmap] = field(default_factory=dict)
    open_image: Image | None = None
    backing_secret: str | None = None   # the LUKS secret of the backing file it names now
    written: int = 0
    sessions: int = 0
    _snap_counter: int = 0

    # ---- offline changes (qemu-img / qemu-io while the image is closed) -------

    @property
    def secrets(self) -> Secrets:
        return Secrets(luks.SECRET if self.layout.encrypted else None, self.backing_secret)

    def passphrases(self) -> list[str] | None:
        """What qcowfs is given: the image's key first, then its backing file's."""
        keys = [k for k in dict.fromkeys((self.secrets.image, self.secrets.backing)) if k is not None]
        return keys or None

    def _pre(self, fmt: bool = True, backing: bool = True) -> list[object]:
        return naming(self.image, self.secrets, fmt, backing)[0]

    def _target(self, backing: bool = True) -> list[object]:
        return naming(self.image, self.secrets, backing=backing)[1]

    def _closed(self) -> None:
        assert self.open_image is None, "QEMU tools must not touch an image qcowfs has open"

    # ---- qcowfs commit and rebase between sessions: the disk must read the same ------------

    def backing_path(self) -> Path:
        """The backing file the image names now (base.qcow2 until a rebase moved it)."""
        name = info(self.image).get("backing-filename")
        assert name, "the image has no backing file"
        return self.directory / name

    async def commit_offline(self) -> None:
        """`qcowfs commit`: the image's clusters into its backing file, the image emptied.
        Its disk (the model), its bitmaps and the base's health must not change; then QEMU
        judges it all. (Not with snapshots: they read through the changed base, as in QEMU.)"""
        self._closed()
        base = self.backing_path()
        await qcowfs.aio.commit(self.image, passphrase=self.passphrases())
        if base.suffix == ".qcow2":
            pre, target = naming(base, Secrets(self.backing_secret), fmt=False)
            p = run("qemu-img", "check", *pre, *target)
            assert p.returncode == 0, f"{self.layout.describe()}: base after commit:\n{p.stdout}{p.stderr}"
        self.judge()

    async def rebase_offline(self, offset: int, length: int, byte: int, past_end: int = 0) -> None:
        """`qcowfs rebase` (safe) onto a raw copy of the backing file that differs at
        [offset, +length), and with PAST_END (a byte, 0: no) as long as the disk, that
        byte past the old backing file's end, where the old chain reads zeros: the
        disk must read the same, through the new backing file. With snapshots (they
        read through the backing file, as in QEMU) or bitmaps (the copy-in counts as
        writes, in other ranges than QEMU's) the copy is left the same: then only the
        pointer moves."""
        self._closed()
        self._snap_counter += 1
        new = self.directory / f"base-{self._snap_counter}.raw"
        to_raw(self.backing_path(), new, secrets=Secrets(self.backing_secret))
        if not self.snapshots and not self.bitmaps:
            must("qemu-io", "-f", "raw", "-c", f"write -P {byte} {offset} {length}", new)
            old_end = new.stat().st_size
            if past_end and old_end < self.model.size:
                os.truncate(new, self.model.size)
                must("qemu-io", "-f", "raw", "-c", f"write -P {past_end} {old_end} {self.model.size - old_end}",
                     new)
        await qcowfs.aio.rebase(self.image, new.name, backing_format="raw", passphrase=self.passphrases())
        assert info(self.image).get("backing-filename") == new.name
        self.backing_secret = None
        self.judge()

    async def rebase_standalone_offline(self, byte: int) -> None:
        """`qcowfs rebase` (safe) of an image with no backing file onto a raw file of
        BYTE throughout, as long as the disk: where the image holds nothing (it reads
        zeros) it must go on reading zeros, not the new base."""
        self._closed()
        self._snap_counter += 1
        new = self.directory / f"base-{self._snap_counter}.raw"
        with open(new, "wb") as f:
            f.truncate(self.model.size)
        must("qemu-io", "-f", "raw", "-c", f"write -P {byte} 0 {self.model.size}", new)
        await qcowfs.aio.rebase(self.image, new.name, backing_format="raw", passphrase=self.passphrases())
        assert info(self.image).get("backing-filename") == new.name
        self.judge()

    async def convert_offline(self, out_format: str, compress: str | None, snapshot: str | None) -> None:
        """`qcowfs convert` of the image (or of snapshot SNAPSHOT) into a new qcow2
        (COMPRESS: "zlib"/"zstd" clusters, or plain) or raw file: what it reads must be
        the model's disk (the snapshot's), the new image clean in `qemu-img check`;
        the source does not change (QEMU judges it all again)."""
        self._closed()
        out = self.directory / f"converted.{out_format}"
        options: dict[str, Any] = {}
        if compress is not None:
            options = {"compress": True, "compression_type": compress}
        await qcowfs.aio.convert(self.image, out, out_format=out_format,
                                 snapshot=self.snapshot_names[snapshot] if snapshot is not None else None,
                                 passphrase=self.passphrases(), **options)
        try:
            where = f"{self.layout.describe()}\nconvert -O {out_format} compress={compress} snapshot={snapshot}"
            if out_format == "qcow2":
                p = run("qemu-img", "check", out)
                assert p.returncode == 0, f"{where}: the converted image:\n{clip(p.stdout + p.stderr)}"
            expected = self.snapshots[snapshot] if snapshot is not None else self.model.path
            p = run("qemu-img", "compare", "-f", out_format, "-F", "raw", out, expected)
            assert p.returncode == 0, f"{where}: differs from the model:\n{clip(p.stdout + p.stderr)}"
        finally:
            out.unlink(missing_ok=True)
        self.judge()

    def snapshot_create(self) -> str:
        """`qemu-img snapshot -c`; its content must stay the model's content of now."""
        self._closed()
        self._snap_counter += 1
        name = f"snap{self._snap_counter}"
        must("qemu-img", "snapshot", *self._pre(False), "-c", name, *self._target())
        sid = next(s["id"] for s in info(self.image).get("snapshots", []) if s["name"] == name)
        expected = self.directory / f"snapshot-{sid}.raw"
        to_raw(self.image, expected, sid, self.secrets)
        p = run("qemu-img", "compare", "-f", "raw", "-F", "raw", expected, self.model.path)
        assert p.returncode == 0, f"snapshot {name} (id {sid}) is not the model at creation:\n{p.stdout}{p.stderr}"
        self.snapshots[sid] = expected
        self.snapshot_names[sid] = name
        return sid

    def _reverted_copy(self, sid: str) -> Path:
        """The disk of snapshot SID as QEMU reads it after `qemu-img snapshot -a` on a
        copy of the image (next to it: the same backing file), converted to raw."""
        copy = self.directory / "reverted.qcow2"
        shutil.copyfile(self.image, copy)
        try:
            # (QEMU refuses to revert an image with dirty bitmaps; they are not the disk)
            for name in self.bitmaps:
                bpre, btarget = naming(copy, self.secrets, fmt=False, backing=False)
                must("qemu-img", "bitmap", *bpre, "--remove", *btarget, name)
            pre, target = naming(copy, self.secrets, fmt=False)
            must("qemu-img", "snapshot", *pre, "-a", self.snapshot_names[sid], *target)
            return to_raw(copy, self.directory / "snapshot-now.raw", None, self.secrets)
        finally:
            copy.unlink()

    def snapshot_delete(self, sid: str) -> None:
        self._closed()
        must("qemu-img", "snapshot", *self._pre(False), "-d", self.snapshot_names.pop(sid),  # -d takes names
             *self._target())
        self.snapshots.pop(sid).unlink()

    async def _live_snapshot(self, prefix: str, take: Callable[[Image, str], Awaitable[Any]],
                             refusable: bool) -> str | None:
        """Snapshot (TAKE) through qcowfs in the open session; it must hold the model of now.
        Where it may be REFUSABLE (refcounts too narrow...), a refusal must leave the image as
        it was (None)."""
        image = self._image()
        self._snap_counter += 1
        name = f"{prefix}{self._snap_counter}"
        size = os.path.getsize(self.image)
        try:
            made = await take(image, name)
        except QcowError as e:
            assert refusable, f"{self.layout.describe()}: {name} refused: {e}"
            assert os.path.getsize(self.image) == size and name not in [s.name for s in image.snapshots]
            return None
        assert not self.layout.data_file, f"{self.layout.describe()}: {name} taken with an external data file"
        sid = made.id if isinstance(made, qcowfs.Snapshot) else made.snapshot.id
        # Converted as the judge converts the snapshot (the same holes for `compare -s`).
        expected = self.directory / f"snapshot-{sid}.raw"
        must("qemu-img", "convert", "-f", "raw", "-O", "raw", self.model.path, expected)
        self.snapshots[sid] = expected
        self.snapshot_names[sid] = name
        self.overlap_consistent()
        return sid

    def _snapshot_fits(self) -> bool:
        """Whether QEMU could take one more snapshot: refcounts wide enough, and no
        external data file (its clusters are not refcounted: no internal snapshots)."""
        return not self.layout.data_file and snapshot_fits(self.layout.refcount_bits,
                                                           len(self._image().snapshots) + 1, self.layout.compressed)

    async def live_snapshot_create(self) -> str | None:
        """A snapshot through qcowfs (refused only where the refcounts are too narrow)."""
        return await self._live_snapshot("live", Image.create_snapshot, not self._snapshot_fits())

    async def live_snapshot_delete(self, sid: str) -> None:
        await self._image().delete_snapshot(self.snapshot_names.pop(sid))
        self.snapshots.pop(sid).unlink()
        self.overlap_consistent()

    async def live_snapshot_apply(self, sid: str) -> None:
        """Revert to snapshot SID through qcowfs: the model becomes the snapshot's content
        and size. Refused, with nothing changed, while the image has bitmaps (as QEMU 7.2)."""
        image = self._image()
        if image.bitmaps:
            size = os.path.getsize(self.image)
            try:
                await image.apply_snapshot(sid)
            except QcowError:
                assert os.path.getsize(self.image) == size
                return
            raise AssertionError(f"{self.layout.describe()}: a snapshot was applied over bitmaps")
        await image.apply_snapshot(sid)
        shutil.copyfile(self.snapshots[sid], self.model.path)
        self.model.size = os.path.getsize(self.model.path)
        assert image.virtual_size == self.model.size, (image.virtual_size, self.model.size)
        self.overlap_consistent()

    def overlap_consistent(self) -> None:
        """The overlap map kept up to date through live metadata changes equals one
        built afresh from what is on disk now (else a later write could land on metadata,
        or be refused for no reason)."""
        image = self._image().engine  # (the engine's own state: white-box)
        fresh = Metadata(image.file, image.header, image.geo)
        fresh.snapshots = list(image.snapshots)
        fresh.bitmap_directory = list(image.meta.bitmap_directory)
        build_overlap_map(fresh)
        assert image.meta.overlap == fresh.overlap, \
            f"{self.layout.describe()}: overlap map drifted: {image.meta.overlap.differences(fresh.overlap)[:8]}"

    # ---- bitmaps and checkpoints through qcowfs, in the open session ------------------

    async def live_bitmap_add(self, name: str, auto: bool, granularity: int) -> None:
        image = self._image()
        if not self.layout.v3:  # QEMU: "Cannot store dirty bitmaps in qcow2 v2 files"
            try:
                await image.add_bitmap(name, granularity, auto)
            except QcowError:
                return
            raise AssertionError("a bitmap was added to a v2 image")
        await image.add_bitmap(name, granularity, auto)
        self.bitmaps[name] = ExpectedBitmap(name, auto, granularity,
                                            np.zeros(nbits(self.model.size, granularity), bool))
        self.overlap_consistent()

    async def live_bitmap_change(self, name: str, action: str, source: str | None = None) -> None:
        """remove, clear, enable, disable, merge (SOURCE into NAME) through qcowfs."""
        image = self._image()
        if action == "merge":
            assert source is not None
            await image.merge_bitmaps(name, source)
        else:
            await getattr(image, f"{action}_bitmap")(name)
        self.overlap_consistent()
        bm = self.bitmaps[name]
        if action == "remove":
            del self.bitmaps[name]
        elif action == "clear":
            bm.bits[:] = False
        elif action in ("enable", "disable"):
            bm.auto = action == "enable"
        elif action == "merge":
            assert source is not None
            src = self.bitmaps[source]
            for i in np.flatnonzero(src.bits).tolist():
                g0 = i * src.granularity
                g1 = min(self.model.size, g0 + src.granularity) - 1
                bm.bits[g0 // bm.granularity : g1 // bm.granularity + 1] = True

    async def live_checkpoint(self) -> None:
        """`qcowfs checkpoint`: a snapshot of now, frozen copies of the enabled bitmaps, and a
        new enabled bitmap, in one commit (refused where the refcounts are too narrow or on v2)."""
        enabled = [b for b in self.bitmaps.values() if b.auto]
        sid = await self._live_snapshot("cp", Image.checkpoint, not self._snapshot_fits() or not self.layout.v3)
        if sid is None:
            return
        assert self.layout.v3, "a checkpoint (with bitmaps) was made on a v2 image"
        name = self.snapshot_names[sid]
        for b in enabled:
            self.bitmaps[f"{b.name}@{name}"] = ExpectedBitmap(f"{b.name}@{name}", False, b.granularity,
                                                              b.bits.copy())
        g = enabled[0].granularity if enabled else min(max(self.layout.cluster_size, 4 * KiB), 64 * KiB)
        self.bitmaps[name] = ExpectedBitmap(name, True, g, np.zeros(nbits(self.model.size, g), bool))

    def bitmap_add(self, name: str, auto: bool, granularity: int) -> None:
        self._closed()
        args: list[object] = ["qemu-img", "bitmap", "--add", "-g", granularity]
        if not auto:
            args.append("--disable")
        must(*args, *self._pre(False, backing=False), *self._target(backing=False), name)
        self.bitmaps[name] = ExpectedBitmap(name, auto, granularity,
                                            np.zeros(nbits(self.model.size, granularity), bool))

    def bitmap_remove(self, name: str) -> None:
        self._closed()
        must("qemu-img", "bitmap", *self._pre(False, backing=False), "--remove", *self._target(backing=False), name)
        del self.bitmaps[name]

    def bitmap_clear(self, name: str) -> None:
        self._closed()
        must("qemu-img", "bitmap", *self._pre(False, backing=False), "--clear", *self._target(backing=False), name)
        self.bitmaps[name].bits[:] = False

    def resized(self, new_size: int) -> None:
        """What must hold once the disk is NEW_SIZE: the model, and every bitmap's bits."""
        self.model.resize(new_size)
        for bm in self.bitmaps.values():
            bm.resize(new_size)

    def resize_offline(self, new_size: int) -> None:
        """`qemu-img resize` (grow), where QEMU does it (see offline_resize_refused)."""
        self._closed()
        assert self.offline_resize_refused() is None, self.offline_resize_refused()
        must("qemu-img", "resize", "-q", *self._pre(), *self._target(), new_size)
        self.resized(new_size)

    def amend_offline(self, options: dict[str, Any]) -> None:
        """`qcowfs amend` beside `qemu-img amend` on a copy of the image: where
        QEMU amends, ours amends too, to the same disk (then QEMU judges it all);
        where ours refuses, the image is as it was, and QEMU refuses too or the
        refusal is one engine/amend.py says qcowfs makes where QEMU goes on."""
        self._closed()
        twin = self.directory / "amend-twin.qcow2"
        shutil.copy(self.image, twin)
        text = ",".join(f"{k}={'on' if v is True else 'off' if v is False else v}" for k, v in options.items())
        pre, target = naming(twin, self.secrets, fmt=False)
        # (in the image's directory: qemu-img 7.2's amend looks for a relative data file there)
        q: subprocess.CompletedProcess[str] | None = None
        # qemu-img 7.2 never ends a change of the refcount width of an image of
        # 512 KiB clusters or more (docs/design.md): no oracle there, and no
        # minute spent waiting for it; the timeout catches a hang anywhere else
        if "refcount_bits" not in options or self.layout.cluster_size < QEMU_AMEND_HANGS_FROM:
            try:
                q = subprocess.run([str(a) for a in ("qemu-img", "amend", *pre, "-o", text, *target)],
                                   capture_output=True, text=True, timeout=QEMU_AMEND_TIMEOUT, cwd=self.directory)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"qemu-img amend -o {text} hung on {self.layout.describe()}") from None
        before = self.image.read_bytes()
        where = f"{self.layout.describe()}\namend -o {text}"
        try:
            qcowfs.amend(self.image, **options, passphrase=self.passphrases())
        except QcowError as e:
            assert self.image.read_bytes() == before, f"a refused amend changed the image\n{where}\n{e}"
            ours_only = ("persistent bitmaps", "zstd", "encrypted image with zero clusters")
            assert q is None or q.returncode != 0 or any(w in str(e) for w in ours_only), \
                f"qcowfs refused what qemu-img amends: {e}\n{where}"
            twin.unlink()
            return
        assert q is None or q.returncode == 0, f"qemu-img refused what qcowfs amended: {q.stderr}\n{where}"
        if q is not None and "--image-opts" not in pre:  # (encrypted: judge compares it with the model)
            p = run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", self.image, twin)
            assert p.returncode == 0, f"the disk differs from qemu-img's amend\n{where}\n{p.stdout}{p.stderr}"
        twin.unlink()
        compat = options.get("compat", self.layout.compat)
        self.layout = replace(self.layout, compat=compat,
                              refcount_bits=options.get("refcount_bits", self.layout.refcount_bits),
                              lazy_refcounts=options.get("lazy_refcounts", self.layout.lazy_refcounts)
                              and compat == "1.1")
        self.judge()

    def qemu_write(self, offset: int, length: int, byte: int) -> None:
        """A write by QEMU between sessions (it marks auto bitmaps like any write)."""
        self._closed()
        if byte == 0:
            qemu_io(self.image, f"write -z {offset} {length}", secrets=self.secrets)
        else:
            qemu_io(self.image, f"write -P 0x{byte:02x} {offset} {length}", secrets=self.secrets)
        self.model.write(offset, bytes([byte]) * length)
        for bm in self.bitmaps.values():
            bm.mark(offset, length)

    # ---- in-process sessions --------------------------------------------------

    async def open(self) -> Image:
        self._closed()
        image = await qcowfs.aio.open(self.image, "r+",
                                      passphrase=self.passphrases())
        assert image.virtual_size == self.model.size, (image.virtual_size, self.model.size)
        self.open_image = image
        self.sessions += 1
        return image

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[Image]:
        """open() ... close(); after a failure abandon(), so the first error shows."""
        image = await self.open()
        try:
            yield image
            await self.close()
        finally:
            await self.abandon()

    def _image(self) -> Image:
        assert self.open_image is not None, "no open session"
        return self.open_image

    async def write(self, offset: int, data: bytes) -> None:
        """A write as the FUSE layer does it (Disk.write: the in-place fast path first)."""
        n = await self._image().disk.write(offset, data)
        assert n == len(data), f"write of {len(data)} bytes at {offset} returned {n}"
        self.model.write(offset, data)
        self.written += len(data)
        for bm in self.bitmaps.values():
            bm.mark(offset, len(data))

    async def zero(self, offset: int, length: int, unmap: bool) -> None:
        """fallocate PUNCH_HOLE (UNMAP) or ZERO_RANGE through qcowfs: reads
        zeros after, and bitmaps count it as written (clipped to the disk)."""
        await self._image().disk.zero(offset, length, unmap)
        length = min(length, self.model.size - offset)
        if length > 0:
            self.model.write(offset, bytes(length))
            for bm in self.bitmaps.values():
                bm.mark(offset, length)

    async def check_seek(self, offset: int) -> None:
        """SEEK_DATA and SEEK_HOLE from OFFSET through qcowfs agree with the model: the
        bytes from OFFSET to the next data (or the end) are zeros, and a hole found
        starts a range of zeros (holes are never made up)."""
        image, size = self._image(), self.model.size
        data = await image.disk.find(offset, True)
        hole = await image.disk.find(offset, False)
        assert offset <= data <= size and offset <= hole <= size, (offset, data, hole, size)
        assert min(data, hole) == offset or data == hole == size, (offset, data, hole)
        step = 1 << 20
        for pos in range(offset, data, step):
            chunk = self.model.read(pos, min(step, data - pos))
            assert chunk.count(0) == len(chunk), f"SEEK_DATA from {offset} skipped data near {pos}"
        if hole < size:
            n = min(size - hole, self.layout.cluster_size)
            end = await image.disk.find(hole, True)
            chunk = self.model.read(hole, min(n, end - hole))
            assert chunk.count(0) == len(chunk), f"SEEK_HOLE from {offset} gave {hole}, which holds data"

    async def write_concurrently(self, writes: Sequence[tuple[int, bytes]]) -> None:
        """Disjoint writes in flight at once, as FUSE sends them (allocation must serialise)."""
        spans = sorted((o, o + len(d)) for o, d in writes)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "concurrent writes must be disjoint"
        async with trio.open_nursery() as nursery:
            for offset, data in writes:
                nursery.start_soon(self.write, offset, data)

    async def read_back(self, offset: int, length: int) -> None:
        """Read through qcowfs in the open session; must match the model."""
        image = self._image()
        got = bytes(await image.disk.read(offset, length))
        want = self.model.read(offset, length)
        if got != want:
            first = next(i for i in range(min(len(got), len(want))) if got[i] != want[i]) \
                if len(got) == len(want) else -1
            raise AssertionError(f"qcowfs reads back other bytes at [{offset}, +{length}): "
                                 f"first difference at {offset + first} (lengths {len(got)}/{len(want)})")

    def resize_refused(self) -> str | None:
        """Why QEMU refuses to grow this image now (None: it grows it)."""
        if not self.layout.v3 and self.layout.backing_size > self.model.size:
            # the new area must hide the backing file's data, and v2 has no zero clusters
            return "v2 over a larger backing file (QEMU: Failed to zero out new clusters)"
        if not self.layout.v3 and self.snapshots:
            # v2 snapshot entries have no disk size: QEMU would show every snapshot at the
            # new size, with backing-file data appearing in it past the old end
            return "a v2 image with internal snapshots (QEMU: Can't resize a v2 image which has snapshots)"
        return None

    def offline_resize_refused(self) -> str | None:
        """Why `qemu-img resize` cannot grow this image now (None: it can)."""
        if self.layout.encrypted and self.layout.data_file == "raw":
            # (QEMU maps the grown area onto the data file's zeros, which decrypt to noise:
            # not zeros, so not a disk the model can say; qcowfs keeps it zeros)
            return "QEMU's grown area of an encrypted data_file_raw image reads noise"
        return self.resize_refused()

    async def resize(self, new_size: int) -> None:
        """Grow through qcowfs; where QEMU refuses, qcowfs must refuse too (ResizeError).
        Bitmaps follow the new size (as QEMU 7.2 resizes them)."""
        image = self._image()
        why = self.resize_refused()
        if why is not None:
            try:
                await image.resize(new_size)
            except ResizeError:
                assert image.virtual_size == self.model.size
                return
            raise AssertionError(f"{self.layout.describe()}: resize to {new_size} was not refused: {why}")
        await image.resize(new_size)
        assert image.virtual_size == new_size, (image.virtual_size, new_size)
        self.resized(new_size)
        self.overlap_consistent()

    async def flush(self) -> None:
        await self._image().flush()

    async def close(self) -> None:
        image = self._image()
        self.open_image = None
        await image.close()

    async def abandon(self) -> None:
        """Close after a failure without letting a second error hide the first."""
        image, self.open_image = self.open_image, None
        if image is not None:
            try:
                await image.close()
            except Exception:
                pass

    # ---- judging ----------------------------------------------------------------

    def judge(self) -> None:
        """What must hold after every session: the whole oracle, QEMU's view
        (check, compare, map, snapshots, bitmaps)."""
        self._closed()
        where = f"{self.layout.describe()}\nimage {self.image}"
        p = run("qemu-img", "check", *self._pre(False), *self._target())
        assert p.returncode == 0, f"qemu-img check exited {p.returncode}\n{where}\n{clip(p.stdout + p.stderr)}"

        inf = info(self.image)
        assert inf["virtual-size"] == self.model.size, \
            f"virtual size {inf['virtual-size']} != model {self.model.size}\n{where}"
        assert not inf.get("dirty-flag"), f"dirty bit left set after a clean close\n{where}"
        data = inf["format-specific"]["data"]
        assert not data.get("corrupt"), f"image marked corrupt\n{where}"

        pre, target = self._pre(), self._target()
        if "--image-opts" in pre:
            p = run("qemu-img", "compare", *pre, *target, f"driver=raw,file.filename={self.model.path}")
        else:
            p = run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", self.image, self.model.path)
        assert p.returncode == 0, f"qemu-img compare with the model exited {p.returncode}\n{where}\n" \
                                  f"{clip(p.stdout + p.stderr)}"
        theirs = json.loads(must("qemu-img", "map", "--output=json", *pre, *target))
        with qcowfs.open(self.image, passphrase=self.passphrases()) as image:
            ours = image.map()
        if ours != theirs:
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            raise AssertionError(f"map differs from qemu-img map at entry {at} of {len(ours)} / {len(theirs)}: "
                                 f"{ours[at:at + 2]} / {theirs[at:at + 2]}\n{where}")
        if self.layout.data_file == "raw" and not self.layout.encrypted:
            # data_file_raw: the data file alone is a raw image of the disk (zeroed, discarded
            # and grown ranges included), whatever the metadata says
            p = run("qemu-img", "compare", "-f", "raw", "-F", "raw", self.directory / "disk.data", self.model.path)
            assert p.returncode == 0, f"the raw data file is not the disk\n{where}\n{clip(p.stdout + p.stderr)}"

        ids = sorted(s["id"] for s in inf.get("snapshots", []))
        assert ids == sorted(self.snapshots), f"snapshots {ids}, expected {sorted(self.snapshots)}\n{where}"
        for sid, expected in self.snapshots.items():
            now = to_raw(self.image, self.directory / "snapshot-now.raw", sid, self.secrets)
            try:
                if now.stat().st_size < expected.stat().st_size:
                    # the disk is smaller now than the snapshot (a smaller one was applied since):
                    # `convert -l` shows a snapshot only up to the disk's current size, so QEMU
                    # reverts a copy of the image to it and converts that, all of it
                    now.unlink()
                    now = self._reverted_copy(sid)
                # `convert -l` shows a snapshot at the disk's current size, past the snapshot's
                # own size reading through to the backing file (QEMU does that on images it grew
                # itself): only the snapshot's own size is its content
                os.truncate(now, expected.stat().st_size)
                p = run("qemu-img", "compare", "-s", "-f", "raw", "-F", "raw", now, expected)
                assert p.returncode == 0, f"snapshot id {sid} changed\n{where}\n{p.stdout}{p.stderr}"
            finally:
                now.unlink()

        listed = {b["name"]: b for b in data.get("bitmaps", [])}
        assert sorted(listed) == sorted(self.bitmaps), \
            f"bitmaps {sorted(listed)}, expected {sorted(self.bitmaps)}\n{where}"
        for name, bm in self.bitmaps.items():
            flags = listed[name]["flags"]
            assert "in-use" not in flags, f"bitmap {name} left in use: {flags}\n{where}"
            assert ("auto" in flags) == bm.auto, f"bitmap {name} flags {flags}, auto={bm.auto}\n{where}"
            assert listed[name]["granularity"] == bm.granularity
            got = dirty_bits(self.image, name, bm.granularity, self.model.size, self.secrets)
            missing, extra = bm.bits & ~got, got & ~bm.bits
            assert not missing.any(), (f"bitmap {name} ({'auto' if bm.auto else 'disabled'}) misses written "
                                       f"ranges: {describe_bits(missing, bm.granularity)}\n{where}")
            assert not extra.any(), (f"bitmap {name} ({'auto' if bm.auto else 'disabled'}) has bits no write "
                                     f"set: {describe_bits(extra, bm.granularity)}\n{where}")


def build(directory: Path, layout: Layout) -> Subject:
    """Make the image LAYOUT describes with qemu-img / qemu-io, and its model from QEMU's view."""
    bad = layout.problems()
    assert not bad, f"{layout.describe()}: {bad}"
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(layout.seed)
    src = directory / "src.bin"
    src.write_bytes(rng.randbytes(256 * KiB))
    img = directory / "disk.qcow2"
    cs = layout.cluster_size

    backing = None
    if layout.backing_size:
        backing = directory / "base.qcow2"
        _create(backing, layout.backing_size, secret=layout.backing_secret, cluster_size=layout.backing_cluster_size)
        qemu_io(backing, *_scatter(rng, src, layout.backing_size, 6, 256 * KiB),
                secrets=Secrets(layout.backing_secret))

    opts: dict[str, object] = {"cluster_size": cs, "compat": layout.compat}
    if layout.v3:
        opts["refcount_bits"] = layout.refcount_bits
        opts["compression_type"] = layout.compression_type
    if layout.extended_l2:
        opts["extended_l2"] = "on"
    if layout.lazy_refcounts:
        opts["lazy_refcounts"] = "on"
    if layout.data_file:
        # (an absolute name: qemu-img creates it relative to its working directory)
        opts["data_file"] = directory / "disk.data"
    if layout.data_file == "raw":
        opts["data_file_raw"] = "on"
    if layout.preallocation != "off":
        opts["preallocation"] = layout.preallocation
    secrets = Secrets(luks.SECRET if layout.encrypted else None, layout.backing_secret)
    _create(img, layout.size, backing, secrets.image, layout.backing_secret is not None, **opts)

    cmds: list[str] = []
    taken: set[int] = set()
    if layout.dirty:
        # the first write to a fresh image allocates: with lazy refcounts that sets the dirty bit
        n = rng.randint(1, min(300 * KiB, layout.size))
        off = rng.randrange(0, layout.size - n + 1)
        cmds.append(f"write -P 0x5d {off} {n}")
        taken = set(range(off // cs, (off + n - 1) // cs + 1))
    # Compressed clusters before other data: QEMU only compresses into unallocated clusters.
    free = [c for c in range(layout.size // cs) if c not in taken]
    if layout.compressed and free:
        for c in sorted(rng.sample(free, min(layout.compressed, len(free)))):
            cmds.append(f"write -c -P 0x{rng.randint(1, 255):02x} {c * cs} {cs}")
    if layout.prefill:
        cmds += _scatter(rng, src, layout.size, 8, 256 * KiB)
    if layout.dirty:
        # killed with everything written and flushed, but never closed: the dirty bit stays
        pre, target = naming(img, secrets)
        args: list[object] = ["qemu-io", *pre]
        for cmd in cmds + ["flush", "sigraise 9"]:
            args += ["-c", cmd]
        p = run(*args, *target)
        assert p.returncode in (-9, 137), f"qemu-io was not killed: {p.returncode} {p.stdout} {p.stderr}"
        assert info(img).get("dirty-flag"), "qemu-io killed after writing did not leave the dirty bit"
    elif cmds:
        qemu_io(img, *cmds, secrets=secrets)

    # the model starts as QEMU's view of what was built (after a kill: what survived it)
    model = Model(to_raw(img, directory / "model.raw", secrets=secrets))
    subject = Subject(directory, img, layout, model, backing_secret=layout.backing_secret)
    for i in range(layout.snapshots):
        subject.snapshot_create()
        # the next snapshot (and the active disk) differ from this one
        n = rng.randint(1, min(64 * KiB, layout.size))
        subject.qemu_write(rng.randrange(0, layout.size - n + 1), n, rng.randint(1, 255))
    for spec in layout.bitmaps:
        subject.bitmap_add(spec.name, spec.auto, spec.granularity)
    if layout.bitmaps:
        # QEMU's own writes set bits of the auto bitmaps: qcowfs must keep them
        n = rng.randint(1, min(200 * KiB, layout.size))
        subject.qemu_write(rng.randrange(0, layout.size - n + 1), n, rng.randint(0, 255))
    return subject


# --------------------------------------------------------------------------
# one trio run shared by the plain (synchronous) rules of a state machine

class TrioThread:
    """A trio run in a worker thread for the life of one state machine example.

    Hypothesis rules are plain functions, but an Image opened in one rule must be
    used by the next within the same trio run (its locks and worker threads belong
    to it), as in the daemon. `run` calls an async function in that run.
    """

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._thread.start()
        self._ready.wait(30)
        assert self._token is not None, "trio thread did not start"

    async def _main(self) -> None:
        self._stop = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        self._ready.set()
        await self._stop.wait()

    def run(self, afn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return trio.from_thread.run(afn, *args, trio_token=self._token)

    def close(self) -> None:
        if self._stop is not None and self._thread.is_alive():
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(30)


def chunks(total: int, step: int = MiB) -> Iterable[tuple[int, int]]:
    """(offset, length) pieces of [0, total), STEP at a time."""
    for off in range(0, total, step):
        yield off, min(step, total - off)


__all__ = ["BitmapSpec", "Layout", "Model", "Subject", "TrioThread", "build", "chunks", "clip", "info",
           "make_data", "must", "qemu_io", "run", "snapshot_fits", "KiB", "MiB", "GiB"]
