"""The public API (`qcowfs.open`, `qcowfs.check`, `qcowfs.aio`) on real images, judged by QEMU.

Every image here is made by qemu-img / qemu-io (the read matrix of
tests/images.py, the layouts of tests/inproc.py, LUKS images of
tests/luks.py); every verdict is QEMU's: `qemu-img convert` / `compare` for
bytes, `qemu-img check` for consistency, `qemu-img info` / `map` /
`snapshot -l` for metadata, `qemu-nbd -B` + `nbdinfo --map` for bitmaps.
The format is never mocked: what a user of the library gets is what QEMU
sees in the file.

Sections follow the API's promises:
  1. reads: the whole read matrix and every snapshot, in 1 MiB reads; LUKS;
  2. writes through `Image.disk` (and a small hypothesis state machine);
  3. SEEK_DATA / SEEK_HOLE against `qemu-img map`; truncate;
  4. snapshots, bitmaps, checkpoints, map, info, check;
  5. errors (each a `qcowfs.QcowError` with its errno), locks;
  6. the same through `qcowfs.aio` under trio;
  7. the library without pyfuse3 (and `qcowfs mount` without it).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import itertools
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule, run_state_machine_as_test

import luks
import qcowfs
import qcowfs.aio
from conftest import QCOWFS, is_mounted
from images import HUGE, MATRIX, SNAPSHOTS, file_state, oracle, oracle_range, snapshot_table
from images import build as build_matrix
from inproc import (BitmapSpec, ExpectedBitmap, Layout, Subject, make_data, must, nbd_dirty_map, nbits,
                    snapshot_fits)
from inproc import build as build_subject
from test_check import Refcounts, data_clusters
from test_check import make as make_check_image
from test_read_matrix import probe_ranges

KiB, MiB = 1 << 10, 1 << 20
ROOT = Path(__file__).resolve().parent.parent
NORMAL = sorted(set(MATRIX) - HUGE)
KINDS = ("random", "zeros", "pattern", "text")


# --------------------------------------------------------------------------
# QEMU as the oracle (run in the image's directory: QEMU 7.2 resolves relative
# external data file names against the working directory)

def qemu(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a QEMU tool; the caller judges the exit code."""
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300, cwd=cwd)


def qemu_json(*args: object, image: Path) -> Any:
    """A QEMU tool that must succeed and print JSON, run next to IMAGE."""
    p = qemu(*args, cwd=image.parent)
    assert p.returncode == 0, f"{' '.join(map(str, args))} exited {p.returncode}: {p.stderr}"
    return json.loads(p.stdout)


def qemu_info(image: Path) -> dict[str, Any]:
    return qemu_json("qemu-img", "info", "--output=json", image, image=image)


def qemu_map(image: Path) -> list[dict[str, Any]]:
    return qemu_json("qemu-img", "map", "--output=json", image, image=image)


def qemu_check(image: Path) -> tuple[int, dict[str, Any], list[str]]:
    """`qemu-img check --output=json`: (exit code, its JSON, the lines it printed on stderr)."""
    p = qemu("qemu-img", "check", "--output=json", image, cwd=image.parent)
    return p.returncode, (json.loads(p.stdout) if p.stdout.strip() else {}), p.stderr.splitlines()


def qemu_snapshot_raw(image: Path, name: str, dest: Path, encrypted: bool = False) -> bytes:
    """`qemu-img convert -l snapshot.name=NAME -O raw`: snapshot NAME's bytes as QEMU reads them."""
    if encrypted:
        must("qemu-img", "convert", *luks.secret_object(), "--image-opts", "-l", f"snapshot.name={name}",
             luks.image_opts(image), "-O", "raw", dest)
    else:
        p = qemu("qemu-img", "convert", "-l", f"snapshot.name={name}", "-O", "raw", image, dest,
                 cwd=image.parent)
        assert p.returncode == 0, p.stderr
    return dest.read_bytes()


def first_difference(a: bytes, b: bytes) -> int | None:
    """Where A and B first differ (the shorter one's end if one is a prefix), None if equal."""
    if a == b:
        return None
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def assert_same_bytes(got: bytes, want: bytes, what: str, base: int = 0) -> None:
    off = first_difference(got, want)
    assert off is None, (f"{what}: first difference at offset {base + off:#x} "
                         f"(got {len(got)} bytes, expected {len(want)}): "
                         f"{got[off:off + 16].hex()} != {want[off:off + 16].hex()}")


def assert_disk_reads(disk: qcowfs.Disk, expected: Path, what: str) -> None:
    """Read DISK front to back in 1 MiB reads (the file position moving as in any Python
    file), compare with the raw file EXPECTED; a read at the end returns nothing."""
    size = disk.size
    disk.seek(0)
    with open(expected, "rb") as f:
        for pos in range(0, size, MiB):
            assert_same_bytes(disk.read(MiB), f.read(MiB), what, pos)
    assert disk.tell() == size
    assert disk.read(MiB) == b"", f"{what}: a read at the end of the disk returned data"


def passphrase_of(layout: Layout) -> str | None:
    return luks.SECRET if layout.encrypted else None


# --------------------------------------------------------------------------
# 1. reads: the read matrix

@dataclass(frozen=True)
class MatrixImage:
    root: Path      # the directory the builder filled (backing files, data files...)
    image: Path     # the top image


@pytest.fixture(scope="session")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], MatrixImage]:
    """matrix(name): the read-matrix image NAME, built once per session. Every
    test using it only reads it (each asserts so or opens it "r")."""
    cache: dict[str, MatrixImage] = {}

    def get(name: str) -> MatrixImage:
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            cache[name] = MatrixImage(root, build_matrix(name, root).resolve())
        return cache[name]
    return get


def odd_reads(rng: random.Random, size: int) -> list[tuple[int, int]]:
    """(offset, length) pairs at unaligned places, around and past the end."""
    pairs = [(0, 1), (size - 1, 1), (size - 1, 100), (max(0, size - 4097), 8192), (size, 1), (size + 99, 10)]
    for _ in range(40):
        ln = rng.choice([1, 3, 511, 513, 4097, 65535, 65537, 131073, rng.randint(1, 300_000)])
        pairs.append((rng.randrange(0, size), ln))
    return pairs


@pytest.mark.parametrize("name", NORMAL)
def test_read_matrix_matches_qemu(name: str, matrix: Callable[[str], MatrixImage], tmp_path: Path) -> None:
    """`qcowfs.open(img).disk`, read in 1 MiB pieces, is `qemu-img convert -O raw`
    byte for byte; odd-sized preads too; opening "r" changes no file."""
    m = matrix(name)
    expected = oracle(m.image, tmp_path / "expected.raw")
    before = file_state(m.root)
    with qcowfs.open(m.image) as image:
        disk = image.disk
        assert image.read_only and not disk.writable() and disk.readable() and disk.seekable()
        assert image.virtual_size == disk.size == expected.stat().st_size
        assert_disk_reads(disk, expected, name)
        data = expected.read_bytes()
        for off, ln in odd_reads(random.Random(name), disk.size):
            assert_same_bytes(disk.pread(off, ln), data[off:off + ln], f"{name} pread({off}, {ln})", off)
        buf = bytearray(70_001)
        disk.seek(12_345)
        n = disk.readinto(buf)
        assert_same_bytes(bytes(buf[:n]), data[12_345:12_345 + 70_001], f"{name} readinto", 12_345)
    assert file_state(m.root) == before, f"{name}: opening read-only changed a file"


@pytest.mark.parametrize("name", sorted(SNAPSHOTS))
def test_read_snapshots_match_qemu(name: str, matrix: Callable[[str], MatrixImage], tmp_path: Path) -> None:
    """`image.snapshot(name)` (by name and by id) reads what `qemu-img convert -l
    snapshot.name=` reads, up to the snapshot's own size (QEMU pads with zeros
    to the current size); a snapshot's disk is read-only."""
    m = matrix(name)
    sizes = {t["id"]: t["disk_size"] for t in snapshot_table(m.image)}
    with qcowfs.open(m.image) as image:
        assert image.snapshots, name
        for s in image.snapshots:
            want = qemu_snapshot_raw(m.image, s.name, tmp_path / f"snap-{s.id}.raw")
            size = sizes[s.id] or image.virtual_size
            assert want[size:] == bytes(len(want) - size)
            expected = tmp_path / f"snap-{s.id}.trunc"
            expected.write_bytes(want[:size])
            disk = image.snapshot(s.name)
            assert disk.size == size and not disk.writable() and disk.snapshot_info == s
            assert_disk_reads(disk, expected, f"{name} snapshot {s.name!r}")
            by_id = image.snapshot(s.id)
            assert_same_bytes(by_id.pread(0, 2 * MiB), want[:min(size, 2 * MiB)], f"snapshot id {s.id}")


@pytest.mark.parametrize("name", sorted(HUGE))
def test_read_huge_matches_qemu(name: str, matrix: Callable[[str], MatrixImage]) -> None:
    """4 TiB sparse disks: every data extent (and random places) as QEMU reads them."""
    m = matrix(name)
    with qcowfs.open(m.image) as image:
        disk = image.disk
        ranges = probe_ranges(m.image, disk.size, random.Random(name))
        for off, ln in ranges:
            assert_same_bytes(disk.pread(off, ln), oracle_range(m.image, off, ln), f"{name} [{off:#x}+{ln:#x})",
                              off)
        assert disk.pread(disk.size, 100) == b""


# ---- LUKS

@pytest.fixture(scope="module")
def luks_image(tmp_path_factory: pytest.TempPathFactory) -> Subject:
    """A LUKS qcow2 with data and one internal snapshot, built once (PBKDF2 is slow)."""
    return build_subject(tmp_path_factory.mktemp("luks"),
                         Layout(size=8 * MiB, encrypted=True, prefill=True, snapshots=1, seed=5))


@pytest.mark.parametrize("how", ["passphrase-str", "passphrase-bytes", "passphrase-callable", "key_file"])
def test_read_luks(how: str, luks_image: Subject, tmp_path: Path) -> None:
    """Each way of giving the key opens the image; the disk and the snapshot read what QEMU
    decrypts. A key file is taken byte for byte, as QEMU's secret,file= takes it."""
    kwargs: dict[str, Any]
    if how == "key_file":
        key = tmp_path / "key"
        key.write_bytes(luks.SECRET.encode())
        kwargs = {"key_file": key}
    else:
        kwargs = {"passphrase": {"passphrase-str": luks.SECRET, "passphrase-bytes": luks.SECRET.encode(),
                                 "passphrase-callable": luks.passphrase()}[how]}
    img = luks_image.image
    expected = luks.to_raw(img, tmp_path / "expected.raw")
    with qcowfs.open(img, **kwargs) as image:
        assert image.encryption == "LUKS"
        assert_disk_reads(image.disk, expected, f"LUKS ({how})")
        for s in image.snapshots:
            want = qemu_snapshot_raw(img, s.name, tmp_path / "snap.raw", encrypted=True)
            assert_same_bytes(image.snapshot(s.name).pread(0, len(want)), want, f"LUKS snapshot {s.name}")


def test_luks_wrong_or_missing_key(luks_image: Subject, tmp_path: Path) -> None:
    """No key: the image opens for metadata but reading its data raises PassphraseError. A wrong key,
    or the right one with a trailing newline in a key file (QEMU refuses that one too), is
    a PassphraseError at open."""
    img = luks_image.image
    with qcowfs.open(img) as image:
        assert image.info()["encrypted"] is True
        with pytest.raises(qcowfs.PassphraseError) as e:
            image.disk.pread(0, image.disk.size)     # unallocated clusters alone would read zeros
        assert e.value.errno == errno.EACCES
    with pytest.raises(qcowfs.PassphraseError):
        qcowfs.open(img, passphrase="not the passphrase")
    key = tmp_path / "key"
    key.write_bytes(luks.SECRET.encode() + b"\n")
    with pytest.raises(qcowfs.PassphraseError):
        qcowfs.open(img, key_file=key)
    p = qemu("qemu-img", "convert", "--object", f"secret,id=sec0,file={key}", "--image-opts",
             luks.image_opts(img), "-O", "raw", tmp_path / "x.raw")
    assert p.returncode != 0, "QEMU took the key file with a newline: qcowfs must too"
    with pytest.raises(qcowfs.UsageError):
        qcowfs.open(img, passphrase=luks.SECRET, key_file=key)


def test_luks_info_matches_qemu(luks_image: Subject) -> None:
    with qcowfs.open(luks_image.image) as image:
        ours = image.info()
    assert_info_agrees(ours, qemu_info(luks_image.image), "LUKS")


def test_files_are_every_file_of_the_disk(tmp_path: Path) -> None:
    """Image.files: the image, its data file, its backing chain's files
    (a raw base included), in that order."""
    import trio

    import qcowfs.aio

    run_ok = lambda *a: subprocess.run([str(x) for x in a], check=True, cwd=tmp_path)  # noqa: E731
    run_ok("qemu-img", "create", "-q", "-f", "raw", "base.raw", "8M")
    run_ok("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "-o", "data_file=mid.data",
           "mid.qcow2")
    run_ok("qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2")
    want = [str(tmp_path / n) for n in ("top.qcow2", "mid.qcow2", "mid.data", "base.raw")]
    with qcowfs.open(tmp_path / "top.qcow2") as image:
        assert [os.path.realpath(f) for f in image.files] == want

    async def aio_files() -> list[str]:
        async with qcowfs.aio.open(tmp_path / "mid.qcow2") as image:
            return image.files
    assert [os.path.realpath(f) for f in trio.run(aio_files)] == want[1:]


def test_negative_offsets_are_refused_and_change_nothing(tmp_path: Path) -> None:
    """Every call that takes an offset refuses a negative one (UsageError)
    before it reaches the engine: disk.zero(-512, 512) went through, zeroed
    by Python's negative indexing at the far end of the tables, and a
    snapshot taken afterwards left 17 leaked clusters."""
    import trio

    import qcowfs.aio

    img = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "32M"], check=True)
    qemu("qemu-io", "-c", "write -P 7 0 1M", "-c", "write -P 8 31M 1M", img)
    qemu("qemu-img", "bitmap", "--add", img, "b0")
    with qcowfs.open(img, "r+") as image:
        disk = image.disk
        calls: list[Callable[[], Any]] = [lambda: disk.zero(-512, 512), lambda: disk.zero(0, -512),
                                          lambda: disk.pread(-1, 10), lambda: disk.pwrite(b"x", -1)]
        for call in calls:
            with pytest.raises(qcowfs.UsageError, match="negative"):
                call()

    async def aio_calls() -> None:
        async with qcowfs.aio.open(img, "r+") as image:
            for call in (lambda: image.disk.find(-5, True), lambda: image.bitmap_bits("b0", -8, 8),
                         lambda: image.bitmap_bits("b0", 0, -8), lambda: image.disk.zero(-4096, 4096, False)):
                with pytest.raises(qcowfs.UsageError, match="negative"):
                    await call()
            await image.create_snapshot("after")
    trio.run(aio_calls)
    p = qemu("qemu-img", "check", img)
    assert p.returncode == 0 and "leaked" not in p.stdout, p.stdout
    p = qemu("qemu-io", "-c", "read -P 7 0 1M", "-c", "read -P 8 31M 1M", img)
    assert p.returncode == 0 and p.stdout.count("read 1048576/1048576") == 2, p.stdout + p.stderr
    assert "verification failed" not in p.stdout, p.stdout


# --------------------------------------------------------------------------
# 2. writes through Image.disk

WRITE_LAYOUTS: dict[str, Layout] = {
    "c64k-compressed": Layout(size=16 * MiB, prefill=True, compressed=6, seed=1),
    "c4k-over-backing": Layout(size=16 * MiB, cluster_size=4 * KiB, backing_size=16 * MiB, prefill=True,
                               compressed=3, seed=2),
    "extl2-over-backing": Layout(size=8 * MiB, extended_l2=True, backing_size=8 * MiB, compressed=2, seed=3),
    "v2-c512-snapshot": Layout(size=4 * MiB, cluster_size=512, compat="0.10", prefill=True, compressed=4,
                               snapshots=1, seed=4),
    "refcount2-c4k-snapshot": Layout(size=8 * MiB, cluster_size=4 * KiB, refcount_bits=2, prefill=True,
                                     snapshots=1, seed=5),
    "zstd-bitmaps": Layout(size=8 * MiB, compression_type="zstd", compressed=4, prefill=True, seed=6,
                           bitmaps=(BitmapSpec("auto"), BitmapSpec("frozen", auto=False, granularity=128 * KiB))),
    "lazy-refcounts-dirty": Layout(size=8 * MiB, lazy_refcounts=True, dirty=True, seed=7),
    "luks": Layout(size=8 * MiB, encrypted=True, prefill=True, seed=8),
}


def compressed_clusters(subject: Subject) -> list[int]:
    """Guest offsets of the clusters QEMU stored compressed (map: data without an offset)."""
    if not subject.layout.compressed:
        return []
    cs = subject.layout.cluster_size
    return [e["start"] + i for e in qemu_map(subject.image)
            if e["data"] and e["depth"] == 0 and "offset" not in e for i in range(0, e["length"], cs)]


def write_plan(subject: Subject, seed: int) -> list[tuple[int, bytes]]:
    """Writes that take the writer's different paths: across cluster boundaries, the first
    and last byte, unaligned and aligned zeros, whole clusters, partial and whole overwrites
    of compressed clusters, and random ones (over the backing file where there is one)."""
    size, cs = subject.model.size, subject.layout.cluster_size
    rng = random.Random(seed)
    plan: list[tuple[int, bytes]] = [
        (cs - 3, make_data("pattern", 7, 1)),
        (0, b"\xa5"),
        (size - 1, b"\x5a"),
        (size - 5000, make_data("random", 5000, 2)),
        (3 * cs + 17, make_data("random", 2 * cs + 100, 3)),
        (5 * cs, bytes(cs)),
        (7 * cs + 100, bytes(3 * cs)),
        (11 * cs + 1, make_data("text", 2 * cs, 4)),
        (16 * cs, make_data("random", cs, 5)),
    ]
    for i, c in enumerate(compressed_clusters(subject)[:4]):
        plan.append((c + cs // 3, make_data("pattern", 11, 6 + i)) if i % 2 else (c, make_data("random", cs, 6 + i)))
    for i in range(16):
        ln = min(size, rng.choice([1, 511, 512, 513, 4095, 4096, 65536, 65537, rng.randint(1, 300_000)]))
        off = rng.randrange(0, size - ln + 1)
        if rng.random() < 0.3:
            off = off // cs * cs
            ln = min(ln, size - off)
        plan.append((off, make_data(rng.choice(KINDS), ln, 100 + i)))
    return plan


def write(subject: Subject, disk: qcowfs.Disk, offset: int, data: bytes, how: str = "pwrite") -> None:
    """Write through the API (HOW: pwrite, seek+write, or a memoryview); the model and the
    expected bitmaps follow."""
    if how == "seek":
        assert disk.seek(offset) == offset
        n = disk.write(data)
        assert disk.tell() == offset + n
    elif how == "memoryview":
        n = disk.pwrite(memoryview(bytearray(data)), offset)
    else:
        n = disk.pwrite(data, offset)
    assert n == len(data), f"write of {len(data)} bytes at {offset} wrote {n}"
    subject.model.write(offset, data)
    for bm in subject.bitmaps.values():
        bm.mark(offset, len(data))


def open_rw(subject: Subject) -> qcowfs.Image:
    return qcowfs.open(subject.image, "r+", passphrase=passphrase_of(subject.layout))


@pytest.mark.parametrize("name", WRITE_LAYOUTS)
def test_writes_judged_by_qemu(name: str, tmp_path: Path) -> None:
    """Writes through `Image.disk` in "r+"; then `qemu-img check` exits 0, `qemu-img
    compare` with the model (the same bytes written to a raw file) finds nothing,
    snapshots are unchanged, bitmaps hold exactly the written granules. The map the
    open image reports is the one QEMU reads after the close."""
    subject = build_subject(tmp_path / "img", WRITE_LAYOUTS[name])
    plan = write_plan(subject, seed=len(name))
    with open_rw(subject) as image:
        disk = image.disk
        assert disk.writable() and not image.read_only
        for i, (off, data) in enumerate(plan):
            write(subject, disk, off, data, ("pwrite", "seek", "memoryview")[i % 3])
        assert_disk_reads(disk, subject.model.path, f"{name}: read back before close")
        image.flush()
        ours = image.map() if not subject.layout.encrypted else None
    subject.judge()
    if ours is not None:
        assert ours == qemu_map(subject.image), f"{name}: map of the open image differs from QEMU's"


def test_flush_makes_writes_durable(tmp_path: Path) -> None:
    """After `disk.flush()` the file is a consistent image holding every write so far:
    QEMU (with -U, the image being open) checks it clean and reads the model. The image
    then reopens (no kill) with everything in it."""
    subject = build_subject(tmp_path / "img", Layout(size=8 * MiB, cluster_size=4 * KiB, prefill=True,
                                                     compressed=3, seed=11))
    plan = write_plan(subject, seed=11)
    with open_rw(subject) as image:
        for off, data in plan[:20]:
            write(subject, image.disk, off, data)
        image.disk.flush()
        p = qemu("qemu-img", "check", "-U", subject.image)
        assert p.returncode == 0, f"after flush(): qemu-img check -U exited {p.returncode}\n{p.stdout}{p.stderr}"
        p = qemu("qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", subject.image, subject.model.path)
        assert p.returncode == 0, f"after flush(): QEMU does not read the model\n{p.stdout}{p.stderr}"
        for off, data in plan[20:]:
            write(subject, image.disk, off, data)
    with open_rw(subject) as image:
        assert_disk_reads(image.disk, subject.model.path, "reopened r+")
        write(subject, image.disk, 123_457, make_data("random", 99_999, 12))
    with qcowfs.open(subject.image) as image:
        assert_disk_reads(image.disk, subject.model.path, "reopened r")
    subject.judge()


def test_writes_at_the_end_of_the_disk(tmp_path: Path) -> None:
    """A write straddling the end is cut there (a short count, as a block device); one
    starting at the end raises NoSpaceError (ENOSPC); reads there are empty."""
    subject = build_subject(tmp_path / "img", Layout(size=2 * MiB, seed=13))
    size = subject.model.size
    with open_rw(subject) as image:
        disk = image.disk
        assert disk.pwrite(b"abcdef", size - 3) == 3
        subject.model.write(size - 3, b"abc")
        with pytest.raises(qcowfs.NoSpaceError) as e:
            disk.pwrite(b"x", size)
        assert e.value.errno == errno.ENOSPC
        assert disk.pread(size - 3, 100) == b"abc" and disk.pread(size, 10) == b""
        assert disk.seek(0, os.SEEK_END) == size and disk.read() == b""
    subject.judge()


def test_disk_is_a_python_file(tmp_path: Path) -> None:
    """The disk works where Python wants a binary file: buffered wrappers, copyfileobj,
    readall; what goes through them is what QEMU then reads."""
    subject = build_subject(tmp_path / "img", Layout(size=4 * MiB, cluster_size=4 * KiB, prefill=True, seed=14))
    with open_rw(subject) as image:
        buffered = io.BufferedRandom(image.disk, buffer_size=10_000)
        buffered.seek(70_001)
        data = make_data("random", 333_333, 15)
        buffered.write(data)
        buffered.flush()
        subject.model.write(70_001, data)
        buffered.seek(0)
        assert_same_bytes(buffered.read(), subject.model.read(0, subject.model.size), "BufferedRandom read")
        buffered.detach()
        image.disk.seek(0)
        copy = tmp_path / "copy.raw"
        with open(copy, "wb") as f:
            shutil.copyfileobj(image.disk, f, 65_537)
        assert_same_bytes(copy.read_bytes(), subject.model.path.read_bytes(), "copyfileobj")
        image.disk.seek(4 * MiB - 10)
        assert image.disk.readall() == subject.model.read(4 * MiB - 10, 10)
    subject.judge()


def test_threads_share_an_image(tmp_path: Path) -> None:
    """An Image may be used from several threads (a lock per image): disjoint writes and
    reads from four threads at once end as QEMU reads them."""
    subject = build_subject(tmp_path / "img", Layout(size=16 * MiB, cluster_size=16 * KiB, prefill=True,
                                                     compressed=4, seed=16))
    lock = threading.Lock()
    with open_rw(subject) as image:
        def worker(t: int) -> None:
            rng = random.Random(t)
            base = t * 4 * MiB
            for i in range(25):
                ln = rng.randint(1, 200_000)
                off = base + rng.randrange(0, 4 * MiB - ln)
                data = make_data(KINDS[i % 4], ln, t * 100 + i)
                assert image.disk.pwrite(data, off) == ln
                with lock:
                    subject.model.write(off, data)
                assert image.disk.pread(off, ln) == data
        with ThreadPoolExecutor(4) as ex:
            list(ex.map(worker, range(4)))
    subject.judge()


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_images_are_read_on_several_threads_at_once(tmp_path: Path, ctype: str) -> None:
    """qcowfs.open's calls run on their callers' threads: four threads, each
    with its own open of one compressed image, read it whole at once (the
    codecs' objects are per thread) and see what QEMU reads."""
    raw = tmp_path / "src.raw"
    rng = random.Random(7)
    raw.write_bytes(b"".join(bytes([rng.randrange(256)]) * 512 + rng.randbytes(512) for _ in range(4096)))
    img = tmp_path / "c.qcow2"
    subprocess.run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
                    f"compression_type={ctype},cluster_size=4096", raw, img], check=True)
    want = raw.read_bytes()

    def reader(t: int) -> None:
        order = list(range(0, len(want), 64 * KiB))
        random.Random(t).shuffle(order)
        with qcowfs.open(img) as image:
            for off in order:
                assert image.disk.pread(off, 64 * KiB) == want[off : off + 64 * KiB], (t, off)
    with ThreadPoolExecutor(4) as ex:
        list(ex.map(reader, range(4)))


def test_compressed_reads_keep_a_few_mib_whatever_the_cluster_size(tmp_path: Path) -> None:
    """The decompressed clusters an image keeps are bounded in bytes: reading
    a zlib image of 2 MiB clusters whole, in 1 MiB reads, allocates at most
    a few clusters at once (it kept 64 clusters, 128 MiB, and inflated 32 at
    a time ahead of a read), and reads what QEMU reads."""
    import tracemalloc

    raw = tmp_path / "src.raw"
    rng = random.Random(3)
    words = b" ".join(rng.choice([b"cluster", b"zero", b"table"]) for _ in range(400000))[: 2 * MiB]
    with open(raw, "wb") as f:
        for i in range(80):  # 160 MiB of compressible data: 80 clusters
            f.write(bytes([i]) + words[1:])
    img = tmp_path / "c.qcow2"
    subprocess.run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=2M",
                    raw, img], check=True)
    buf = bytearray(MiB)
    with qcowfs.open(img) as image, open(raw, "rb") as want:
        tracemalloc.start()
        try:
            for off in range(0, image.virtual_size, MiB):
                assert image.disk.preadinto(buf, off) == MiB
                assert buf == want.read(MiB), off
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 16 * MiB, f"{peak / MiB:.0f} MiB allocated at once"


# ---- a small model test: random writes, flushes, reopenings, snapshots

MACHINE_LAYOUTS = ("c64k-compressed", "c4k-over-backing", "v2-c512-snapshot", "zstd-bitmaps")


class ApiWriteMachine(RuleBasedStateMachine):
    """Writes through the synchronous API, with flushes (QEMU must then read the model
    with -U), reopenings and snapshots in between; at the end QEMU judges everything."""

    base: Path = Path("/nonexistent")
    examples = itertools.count()

    def __init__(self) -> None:
        super().__init__()
        self.subject: Subject | None = None
        self.image: qcowfs.Image | None = None
        self.snaps = 0

    @initialize(layout=st.sampled_from(MACHINE_LAYOUTS))
    def start(self, layout: str) -> None:
        self.subject = build_subject(self.base / f"ex{next(self.examples)}", WRITE_LAYOUTS[layout])
        self.image = open_rw(self.subject)

    def _parts(self) -> tuple[Subject, qcowfs.Image]:
        assert self.subject is not None and self.image is not None
        return self.subject, self.image

    @rule(data=st.data())
    def write(self, data: st.DataObject) -> None:
        subject, image = self._parts()
        size = subject.model.size
        ln = data.draw(st.sampled_from([1, 511, 4096, 65537]) | st.integers(1, 300_000), label="length")
        ln = min(ln, size)
        off = data.draw(st.integers(0, size - ln), label="offset")
        kind = data.draw(st.sampled_from(KINDS), label="kind")
        write(subject, image.disk, off, make_data(kind, ln, off), data.draw(st.sampled_from(["pwrite", "seek"])))

    @rule(data=st.data())
    def read_back(self, data: st.DataObject) -> None:
        subject, image = self._parts()
        off = data.draw(st.integers(0, subject.model.size - 1), label="read offset")
        ln = data.draw(st.integers(1, 2 * MiB), label="read length")
        assert_same_bytes(image.disk.pread(off, ln), subject.model.read(off, ln), "read back", off)

    @rule()
    def flush_and_peek(self) -> None:
        subject, image = self._parts()
        image.disk.flush()
        p = qemu("qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", subject.image, subject.model.path)
        assert p.returncode == 0, f"after flush(): {p.stdout}{p.stderr}"

    @rule()
    def reopen(self) -> None:
        subject, image = self._parts()
        image.close()
        self.image = open_rw(subject)

    @precondition(lambda self: self.snaps < 2)
    @rule()
    def snapshot(self) -> None:
        subject, image = self._parts()
        if not snapshot_fits(subject.layout.refcount_bits, len(image.snapshots) + 1, subject.layout.compressed):
            return
        self.snaps += 1
        snap = image.create_snapshot(f"m{self.snaps}")
        take_expected_snapshot(subject, snap)

    def teardown(self) -> None:
        if self.image is not None:
            self.image.close()
        if self.subject is not None:
            self.subject.judge()


def take_expected_snapshot(subject: Subject, snap: qcowfs.Snapshot) -> Path:
    """Record that snapshot SNAP holds the model of now (Subject.judge checks it)."""
    expected = subject.directory / f"snapshot-{snap.id}.raw"
    must("qemu-img", "convert", "-f", "raw", "-O", "raw", subject.model.path, expected)
    subject.snapshots[snap.id] = expected
    subject.snapshot_names[snap.id] = snap.name
    return expected


def test_write_state_machine(tmp_path: Path) -> None:
    machine = type("Machine", (ApiWriteMachine,), {"base": tmp_path})
    run_state_machine_as_test(machine, settings=settings(
        max_examples=4, stateful_step_count=10, deadline=None, database=None, derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]))


# --------------------------------------------------------------------------
# 3. SEEK_DATA / SEEK_HOLE, truncate

def expected_seek(extents: list[dict[str, Any]], size: int, pos: int) -> tuple[int | None, int]:
    """lseek's answers from QEMU's map: (SEEK_DATA, SEEK_HOLE) at POS; None for ENXIO.
    Holes are what the map shows without data; the end of the disk is a hole."""
    data = next((max(pos, e["start"]) for e in extents if e["data"] and e["start"] + e["length"] > pos), None)
    hole = next((max(pos, e["start"]) for e in extents if not e["data"] and e["start"] + e["length"] > pos), size)
    return data, hole


def seek_or_enxio(disk: qcowfs.Disk, pos: int, whence: int) -> int | None:
    try:
        return disk.seek(pos, whence)
    except OSError as e:
        assert e.errno == errno.ENXIO, e
        return None


def assert_seeks_match_map(disk: qcowfs.Disk, extents: list[dict[str, Any]], what: str, seed: int = 0) -> None:
    size = disk.size
    assert sum(e["length"] for e in extents) == size
    probes = {0, size - 1}
    for e in extents:
        probes |= {e["start"], e["start"] + e["length"] // 2, e["start"] + e["length"] - 1}
    rng = random.Random(seed)
    probes |= {rng.randrange(size) for _ in range(20)}
    for pos in sorted(probes):
        want = expected_seek(extents, size, pos)
        got = (seek_or_enxio(disk, pos, os.SEEK_DATA), seek_or_enxio(disk, pos, os.SEEK_HOLE))
        assert got == want, f"{what}: at {pos:#x} (SEEK_DATA, SEEK_HOLE) = {got}, QEMU's map says {want}"
    for whence in (os.SEEK_DATA, os.SEEK_HOLE):
        with pytest.raises(OSError) as raised:
            disk.seek(size, whence)
        assert raised.value.errno == errno.ENXIO


@pytest.mark.parametrize("name", NORMAL)
def test_seek_data_hole_matches_qemu_map(name: str, matrix: Callable[[str], MatrixImage]) -> None:
    m = matrix(name)
    with qcowfs.open(m.image) as image:
        assert_seeks_match_map(image.disk, qemu_map(m.image), name)


def test_seek_after_writes(tmp_path: Path) -> None:
    """Data written through the API into holes (and zeros written over data) move
    SEEK_DATA / SEEK_HOLE as QEMU's map then shows."""
    subject = build_subject(tmp_path / "img", Layout(size=8 * MiB, backing_size=4 * MiB, seed=17))
    with open_rw(subject) as image:
        write(subject, image.disk, 5 * MiB + 7, make_data("random", 100_000, 1))
        write(subject, image.disk, 0, bytes(200_000))
        write(subject, image.disk, 7 * MiB, make_data("text", 64 * KiB, 2))
        positions = {p: (seek_or_enxio(image.disk, p, os.SEEK_DATA), seek_or_enxio(image.disk, p, os.SEEK_HOLE))
                     for p in range(0, 8 * MiB, 64 * KiB)}
    theirs = qemu_map(subject.image)
    for p, got in positions.items():
        assert got == expected_seek(theirs, 8 * MiB, p), f"at {p:#x}: {got}, QEMU: {expected_seek(theirs, 8 * MiB, p)}"
    with qcowfs.open(subject.image) as image:
        assert_seeks_match_map(image.disk, theirs, "after writes")
    subject.judge()


@pytest.mark.parametrize("layout", [
    Layout(size=4 * MiB, prefill=True, seed=18),
    Layout(size=4 * MiB, cluster_size=4 * KiB, backing_size=8 * MiB, prefill=True, seed=19),
    Layout(size=3 * MiB, compat="0.10", cluster_size=512, prefill=True, seed=20),
    Layout(size=4 * MiB, extended_l2=True, snapshots=1, prefill=True, seed=21),
], ids=["v3", "over-larger-backing", "v2-c512", "extl2-snapshot"])
def test_truncate_grows(layout: Layout, tmp_path: Path) -> None:
    """`disk.truncate(size)` grows the disk (the new area reads zeros, even over a larger
    backing file); `truncate()` grows to the position; `Image.resize` too. QEMU then
    shows the new size, checks clean, and reads the model."""
    subject = build_subject(tmp_path / "img", layout)
    old = subject.model.size
    with open_rw(subject) as image:
        disk = image.disk
        disk.seek(1000)
        assert disk.truncate(old + 3 * MiB + 512) == old + 3 * MiB + 512
        assert disk.tell() == 1000
        subject.model.resize(old + 3 * MiB + 512)
        assert disk.size == image.virtual_size == subject.model.size
        assert disk.pread(old, 3 * MiB + 512) == bytes(3 * MiB + 512)
        write(subject, disk, subject.model.size - 1000, make_data("random", 1000, 3))
        disk.seek(subject.model.size + MiB)
        assert disk.truncate() == subject.model.size + MiB
        subject.model.resize(subject.model.size + MiB)
        image.resize(subject.model.size + 512)
        subject.model.resize(subject.model.size + 512)
        assert disk.truncate(subject.model.size) == subject.model.size   # the same size: nothing to do
        write(subject, disk, subject.model.size - 7, b"the end")
    assert qemu_info(subject.image)["virtual-size"] == subject.model.size
    subject.judge()


def test_truncate_refusals(tmp_path: Path) -> None:
    """Shrinking raises ResizeError (EINVAL) and changes nothing; read-only raises
    ReadOnlyError. A v2 image with internal snapshots cannot grow (QEMU: "Can't resize a
    v2 image which has snapshots"): qcowfs refuses too."""
    subject = build_subject(tmp_path / "a", Layout(size=4 * MiB, prefill=True, seed=22))
    with open_rw(subject) as image:
        with pytest.raises(qcowfs.ResizeError) as e:
            image.disk.truncate(4 * MiB - 512)
        assert e.value.errno == errno.EINVAL and isinstance(e.value, qcowfs.QcowError)
        with pytest.raises(qcowfs.ResizeError):
            image.resize(MiB)
        assert image.disk.size == 4 * MiB
    with qcowfs.open(subject.image) as image, pytest.raises(qcowfs.ReadOnlyError):
        image.disk.truncate(8 * MiB)
    subject.judge()

    v2 = build_subject(tmp_path / "v2", Layout(size=4 * MiB, compat="0.10", snapshots=1, seed=24))
    copy = tmp_path / "v2-copy.qcow2"
    shutil.copy(v2.image, copy)
    assert qemu("qemu-img", "resize", copy, 8 * MiB).returncode != 0, "QEMU grew a v2 image with snapshots"
    with open_rw(v2) as image:
        with pytest.raises(qcowfs.ResizeError):
            image.disk.truncate(8 * MiB)
        assert image.virtual_size == 4 * MiB
    v2.judge()


# --------------------------------------------------------------------------
# 4. snapshots, bitmaps, checkpoints, map, info, check

def snapshot_fields(s: dict[str, Any]) -> dict[str, Any]:
    """A snapshot's `qemu-img info` fields other than icount (see test_snapshot_records_match_qemu_info)."""
    return {k: v for k, v in s.items() if k != "icount"}


def test_create_and_delete_snapshots(tmp_path: Path) -> None:
    """create_snapshot: `qemu-img snapshot -l` lists it and `convert -l` of it is what the
    disk was; it reads so through the API while the disk changes; delete_snapshot drops it;
    a taken name raises NameTakenError."""
    subject = build_subject(tmp_path / "img", Layout(size=8 * MiB, cluster_size=4 * KiB, prefill=True,
                                                     compressed=3, seed=30))
    plan = write_plan(subject, seed=30)
    with open_rw(subject) as image:
        for off, data in plan[:10]:
            write(subject, image.disk, off, data)
        before = image.create_snapshot("before")
        at_before = take_expected_snapshot(subject, before)
        assert [s.name for s in image.snapshots] == ["before"] and before.name == "before"
        for off, data in plan[10:]:
            write(subject, image.disk, off, data)
        assert_disk_reads(image.snapshot("before"), at_before, "snapshot 'before' after later writes")
        doomed = image.create_snapshot("doomed")
        after = image.create_snapshot("after")
        take_expected_snapshot(subject, after)
        with pytest.raises(qcowfs.NameTakenError) as e:
            image.create_snapshot("after")
        assert e.value.errno == errno.EEXIST
        image.delete_snapshot("doomed")
        with pytest.raises(qcowfs.NotFoundError):
            image.snapshot("doomed")
        write(subject, image.disk, 0, make_data("random", 70_000, 31))
        records = image.snapshots
    listing = must("qemu-img", "snapshot", "-l", subject.image)
    assert "before" in listing and "after" in listing and "doomed" not in listing, listing
    theirs = qemu_info(subject.image)["snapshots"]
    assert [snapshot_fields(s) for s in theirs] == [snapshot_fields(s.json()) for s in records]
    assert doomed.id not in [s["id"] for s in theirs]
    assert_same_bytes(qemu_snapshot_raw(subject.image, "before", tmp_path / "b.raw"), at_before.read_bytes(),
                      "qemu-img convert -l snapshot.name=before")
    subject.judge()


def test_snapshot_records_match_qemu_info(tmp_path: Path) -> None:
    """The Snapshot records (and `info()["snapshots"]`) of snapshots made through the API
    are what `qemu-img info --output=json` lists, every key: QEMU leaves out "icount"
    when the snapshot has none (stored as -1)."""
    subject = build_subject(tmp_path / "img", Layout(size=2 * MiB, prefill=True, snapshots=1, seed=32))
    with open_rw(subject) as image:
        made = image.create_snapshot("api")
    theirs = qemu_info(subject.image)["snapshots"]
    with qcowfs.open(subject.image) as image:
        ours = image.info()["snapshots"]
        records = [s.json() for s in image.snapshots]
    assert ours == theirs, f"info()['snapshots'] {ours}\nqemu-img info {theirs}"
    assert records == theirs
    assert made.json() == theirs[-1]


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_a_snapshot_is_listed_as_qemu_img_lists_its_own(tmp_path: Path, compat: str) -> None:
    """`qcowfs snapshot create` and `qemu-img snapshot -c` on two copies of one
    image: `qemu-img info` lists the same keys and values for both snapshots
    but their dates, "icount": 0 included (v2 and v3 store the same extra data)."""
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    must("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"compat={compat}", ours, "3M")
    must("qemu-io", "-f", "qcow2", "-c", "write -P 7 0 1M", ours)
    shutil.copy(ours, theirs)
    must(QCOWFS, "snapshot", "create", ours, "s")
    must("qemu-img", "snapshot", "-c", "s", theirs)

    def listed(image: Path) -> dict[str, Any]:
        (snap,) = qemu_info(image)["snapshots"]
        return {k: v for k, v in snap.items() if k not in ("date-sec", "date-nsec")}

    assert listed(ours) == listed(theirs)
    assert listed(ours)["icount"] == 0


def track_bitmap(subject: Subject, name: str, enabled: bool, granularity: int) -> None:
    """Expect a bitmap made through the API to start empty and follow writes while ENABLED."""
    subject.bitmaps[name] = ExpectedBitmap(name, enabled, granularity,
                                           np.zeros(nbits(subject.model.size, granularity), bool))


def bitmap_flags(image: Path) -> dict[str, tuple[int, list[str]]]:
    """{name: (granularity, flags)} as `qemu-img info --output=json` lists the bitmaps."""
    data = qemu_info(image)["format-specific"]["data"]
    return {b["name"]: (b["granularity"], b["flags"]) for b in data.get("bitmaps", [])}


def test_bitmap_dirty_extents_match_nbd(tmp_path: Path) -> None:
    """add_bitmap + writes: `image.dirty_extents(name)` (open "r+", and reopened "r") is
    exactly `qemu-nbd -B NAME` + `nbdinfo --map=qemu:dirty-bitmap:NAME --json`, for bitmaps
    QEMU made (enabled and disabled) and ones made through the API."""
    subject = build_subject(tmp_path / "img", Layout(size=8 * MiB, prefill=True, compressed=2, seed=33, bitmaps=(
        BitmapSpec("qemu-auto"), BitmapSpec("qemu-off", auto=False, granularity=128 * KiB))))
    plan = write_plan(subject, seed=33)
    with open_rw(subject) as image:
        image.add_bitmap("api-4k", granularity=4 * KiB)
        track_bitmap(subject, "api-4k", True, 4 * KiB)
        image.add_bitmap("api-default")
        track_bitmap(subject, "api-default", True, 64 * KiB)   # QEMU's default: the cluster size
        image.add_bitmap("api-off", granularity=256 * KiB, enabled=False)
        track_bitmap(subject, "api-off", False, 256 * KiB)
        for off, data in plan:
            write(subject, image.disk, off, data)
        ours = {b.name: image.dirty_extents(b.name) for b in image.bitmaps}
        assert {b.name: b.enabled for b in image.bitmaps} == {n: b.auto for n, b in subject.bitmaps.items()}
    assert set(ours) == set(subject.bitmaps)
    with qcowfs.open(subject.image) as image:
        again = {b.name: image.dirty_extents(b.name) for b in image.bitmaps}
        records = [b.json() for b in image.bitmaps]
    assert records == qemu_info(subject.image)["format-specific"]["data"]["bitmaps"]
    for name, extents in ours.items():
        theirs = nbd_dirty_map(subject.image, name)
        assert extents == theirs, f"bitmap {name}: dirty_extents {extents}\nnbdinfo {theirs}"
        assert again[name] == theirs, f"bitmap {name} after reopening read-only"
    assert any(e["type"] == 1 for e in ours["api-4k"]) and all(e["type"] == 0 for e in ours["api-off"])
    subject.judge()


def test_bitmap_changes_judged_by_qemu(tmp_path: Path) -> None:
    """disable, enable, merge, clear, remove, each then seen by `qemu-img info` (flags,
    presence) and by qemu-nbd (bits)."""
    subject = build_subject(tmp_path / "img", Layout(size=8 * MiB, cluster_size=4 * KiB, prefill=True, seed=34))
    with open_rw(subject) as image:
        image.add_bitmap("x", granularity=4 * KiB)
        track_bitmap(subject, "x", True, 4 * KiB)
        image.add_bitmap("y", granularity=64 * KiB, enabled=False)
        track_bitmap(subject, "y", False, 64 * KiB)
        image.add_bitmap("z")
        write(subject, image.disk, 100_000, make_data("random", 50_000, 1))          # x only
        image.disable_bitmap("x")
        subject.bitmaps["x"].auto = False
        image.enable_bitmap("y")
        subject.bitmaps["y"].auto = True
        write(subject, image.disk, 3 * MiB + 5, make_data("pattern", 300_000, 2))    # y only
        image.merge_bitmaps("y", "x")
        y, x = subject.bitmaps["y"], subject.bitmaps["x"]
        for i in np.flatnonzero(x.bits).tolist():
            y.bits[i * x.granularity // y.granularity: ((i + 1) * x.granularity - 1) // y.granularity + 1] = True
        merged = image.dirty_extents("y")
        image.add_bitmap("w", granularity=4 * KiB)
        track_bitmap(subject, "w", True, 4 * KiB)
        write(subject, image.disk, 6 * MiB, make_data("random", 10_000, 3))         # y and w
        image.clear_bitmap("w")
        subject.bitmaps["w"].bits[:] = False
        image.remove_bitmap("z")
        with pytest.raises(qcowfs.NotFoundError):
            image.dirty_extents("z")
        for change in (image.remove_bitmap, image.clear_bitmap, image.enable_bitmap, image.disable_bitmap):
            with pytest.raises(qcowfs.NotFoundError):
                change("z")
        with pytest.raises(qcowfs.NameTakenError):
            image.add_bitmap("x")
        final = {b.name: image.dirty_extents(b.name) for b in image.bitmaps}
    flags = bitmap_flags(subject.image)
    assert flags == {"x": (4 * KiB, []), "y": (64 * KiB, ["auto"]), "w": (4 * KiB, ["auto"])}, flags
    for name, extents in final.items():
        assert nbd_dirty_map(subject.image, name) == extents, name
    # y's bits are the merge (x's first write) plus the write after it
    assert merged != final["y"] and all(e["type"] == 0 for e in final["w"])
    subject.judge()


def test_checkpoint(tmp_path: Path) -> None:
    """checkpoint(NAME) makes, at one instant, snapshot NAME, a frozen copy B@NAME of each
    enabled bitmap B and a new enabled bitmap NAME: QEMU sees all of them, the snapshot
    holds the disk of that instant, B@NAME the bits B had, NAME only the later writes."""
    subject = build_subject(tmp_path / "img", Layout(size=8 * MiB, prefill=True, seed=35, bitmaps=(
        BitmapSpec("b0"), BitmapSpec("b1", auto=False, granularity=128 * KiB))))
    plan = write_plan(subject, seed=35)
    with open_rw(subject) as image:
        for off, data in plan[:12]:
            write(subject, image.disk, off, data)
        b0_then = image.dirty_extents("b0")
        cp = image.checkpoint("cp1")
        assert cp.snapshot.name == "cp1"
        assert set(cp.bitmaps) == {"b0", "b1", "b0@cp1", "cp1"}, cp.bitmaps
        take_expected_snapshot(subject, cp.snapshot)
        b0 = subject.bitmaps["b0"]
        subject.bitmaps["b0@cp1"] = ExpectedBitmap("b0@cp1", False, b0.granularity, b0.bits.copy())
        track_bitmap(subject, "cp1", True, b0.granularity)
        for off, data in plan[12:]:
            write(subject, image.disk, off, data)
        ours = {b.name: image.dirty_extents(b.name) for b in image.bitmaps}
    assert ours["b0@cp1"] == b0_then
    assert [s["name"] for s in qemu_info(subject.image)["snapshots"]] == ["cp1"]
    flags = bitmap_flags(subject.image)
    assert flags == {"b0": (64 * KiB, ["auto"]), "b1": (128 * KiB, []), "b0@cp1": (64 * KiB, []),
                     "cp1": (64 * KiB, ["auto"])}, flags
    for name in ("b0@cp1", "cp1"):
        assert nbd_dirty_map(subject.image, name) == ours[name], name
    assert_same_bytes(qemu_snapshot_raw(subject.image, "cp1", tmp_path / "cp1.raw"),
                      subject.snapshots[cp.snapshot.id].read_bytes(), "snapshot cp1")
    subject.judge()


@pytest.mark.parametrize("name", NORMAL)
def test_map_matches_qemu(name: str, matrix: Callable[[str], MatrixImage]) -> None:
    """`image.map()` is `qemu-img map --output=json`, entry for entry (backing chains,
    external data files, zero clusters, compressed clusters...)."""
    m = matrix(name)
    with qcowfs.open(m.image) as image:
        ours = image.map()
    assert ours == qemu_map(m.image)


@pytest.mark.parametrize("name", NORMAL)
def test_map_of_a_range_matches_qemu(name: str, matrix: Callable[[str], MatrixImage]) -> None:
    """`image.map(start=, length=)` is `qemu-img map --start-offset --max-length`:
    ranges at unaligned offsets, cut at the end of the disk, past it, empty."""
    m = matrix(name)
    with qcowfs.open(m.image) as image:
        size = image.virtual_size
        ranges = [(size // 3 + 1000, size // 4), (4095, 70000), (size - 1, 10), (size + 5, None), (512, 0),
                  (0, size // 2 + 512)]
        ours = [image.map(start=start, length=length) for start, length in ranges]
    for (start, length), got in zip(ranges, ours):
        bounds = [f"--start-offset={start}"] + ([f"--max-length={length}"] if length is not None else [])
        want = qemu_json("qemu-img", "map", "--output=json", *bounds, m.image, image=m.image)
        assert got == want, (start, length)


@pytest.mark.parametrize("name", NORMAL)
def test_human_map_is_qemu_imgs(name: str, matrix: Callable[[str], MatrixImage]) -> None:
    """`qcowfs map IMAGE` prints what `qemu-img map IMAGE` prints: the runs of
    data with their offsets and the file of their layer, named as qemu-img
    names it; where qemu-img refuses (compressed or encrypted data), one line
    and exit 1 too."""
    m = matrix(name)
    # (QEMU asks the host file about each run of data too, and calls zeros
    # what SEEK_DATA calls a hole: an unwritten extent of its COW's zeroing
    # is one until its pages are in the host's page cache; read, they are data)
    for f in m.image.parent.iterdir():
        if f.is_file():
            f.read_bytes()
    q = qemu("qemu-img", "map", m.image.name, cwd=m.image.parent)
    p = subprocess.run([QCOWFS, "map", m.image.name], capture_output=True, text=True, cwd=m.image.parent,
                       timeout=120)
    assert p.returncode == q.returncode, (p.stderr, q.stderr)
    if q.returncode == 0:
        assert p.stdout == q.stdout
    else:
        assert p.stderr == "qcowfs: File contains external, encrypted or compressed clusters.\n", p.stderr


@pytest.mark.parametrize("name", sorted(SNAPSHOTS))
def test_snapshot_map_matches_qemu(name: str, matrix: Callable[[str], MatrixImage], tmp_path: Path) -> None:
    """`image.map(snapshot)`: QEMU has no map of a snapshot, but `qemu-img snapshot -a`
    makes a copy's active disk that snapshot (same tables, same data offsets)."""
    m = matrix(name)
    with qcowfs.open(m.image) as image:
        maps = {s.name: image.map(s.name) for s in image.snapshots}
    for i, (snap, ours) in enumerate(maps.items()):
        copy = tmp_path / f"applied-{i}.qcow2"     # (these images name no other file)
        shutil.copy(m.image, copy)
        must("qemu-img", "snapshot", "-a", snap, copy)
        assert ours == qemu_map(copy), f"{name}: map of snapshot {snap!r}"


def assert_info_agrees(ours: dict[str, Any], theirs: dict[str, Any], what: str, path: str = "") -> None:
    """Every key `qemu-img info` prints is in ours with the same value (nested objects
    compared the same way); ours may say more (backing-chain, data.dirty...)."""
    missing = sorted(set(theirs) - set(ours))
    assert not missing, f"{what}: info(){path} lacks {missing}"
    for key, value in theirs.items():
        if isinstance(value, dict) and isinstance(ours[key], dict):
            assert_info_agrees(ours[key], value, what, f"{path}[{key!r}]")
        else:
            assert ours[key] == value, f"{what}: info(){path}[{key!r}] = {ours[key]!r}, qemu-img: {value!r}"


@pytest.mark.parametrize("name", NORMAL)
def test_info_matches_qemu(name: str, matrix: Callable[[str], MatrixImage]) -> None:
    m = matrix(name)
    theirs = qemu_info(m.image)
    with qcowfs.open(m.image) as image:
        ours = image.info()
        assert image.virtual_size == theirs["virtual-size"] and image.cluster_size == theirs["cluster-size"]
    assert_info_agrees(ours, theirs, name)


def assert_check_agrees(result: qcowfs.CheckResult, image: Path, what: str) -> None:
    """A CheckResult against `qemu-img check`: exit code, counts, JSON keys, message count."""
    rc, theirs, lines = qemu_check(image)
    assert result.returncode == rc, f"{what}: returncode {result.returncode}, qemu-img check exited {rc}"
    got = (result.corruptions, result.leaks, result.check_errors)
    want = (theirs.get("corruptions", 0), theirs.get("leaks", 0), theirs.get("check-errors", 0))
    assert got == want, f"{what}: (corruptions, leaks, check-errors) {got}, qemu-img {want}"
    for key, value in theirs.items():
        assert result.json.get(key) == value, f"{what}: json[{key!r}] = {result.json.get(key)!r}, qemu-img {value!r}"
    assert len(result.messages) == min(len(lines), 100), f"{what}: {len(result.messages)} messages, qemu-img " \
                                                        f"{len(lines)}:\n{result.messages[:5]}\n{lines[:5]}"


@pytest.mark.parametrize("name", NORMAL)
def test_check_matches_qemu(name: str, matrix: Callable[[str], MatrixImage]) -> None:
    """`image.check()` (open "r") and `qcowfs.check(path)` say what `qemu-img check` says,
    on every image of the matrix (the dirty one has stale refcounts: corruptions)."""
    m = matrix(name)
    before = file_state(m.root)
    with qcowfs.open(m.image) as image:
        assert_check_agrees(image.check(), m.image, f"{name}: Image.check")
    assert_check_agrees(qcowfs.check(m.image), m.image, f"{name}: qcowfs.check")
    assert file_state(m.root) == before


@pytest.mark.parametrize("damage", ["leak", "leak-free-cluster", "corruption"])
def test_check_damaged_image_and_repair(damage: str, tmp_path: Path) -> None:
    """A raised refcount (leak, exit 3) or a lowered one (corruption, exit 2), made with a
    hex edit: `check()` agrees with qemu-img; `qcowfs.check(path, repair=True)` leaves an
    image QEMU checks clean, with the same bytes; repair needs "r+"."""
    img = make_check_image("default", tmp_path / "img")
    data = oracle(img, tmp_path / "data.raw")
    rc = Refcounts(img)
    if damage == "leak":
        rc.set(0, rc.get(0) + 1)
    elif damage == "leak-free-cluster":
        end = -(-img.stat().st_size // rc.cs) * rc.cs
        os.truncate(img, end + rc.cs)
        rc.set(end, 1)
    else:
        host = data_clusters(img)[0][1]
        rc.set(host, rc.get(host) - 1)
    with qcowfs.open(img) as image:
        result = image.check()
        with pytest.raises(qcowfs.ReadOnlyError):
            image.check(repair=True)
    assert result.returncode == (2 if damage == "corruption" else 3)
    assert_check_agrees(result, img, damage)
    assert_check_agrees(qcowfs.check(img), img, f"{damage}: qcowfs.check")
    repaired = qcowfs.check(img, repair=True)
    assert repaired.fixed is not None and sum(repaired.fixed) >= 1, repaired
    p = qemu("qemu-img", "check", img)
    assert p.returncode == 0, f"after repair: {p.stdout}{p.stderr}"
    p = qemu("qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, data)
    assert p.returncode == 0, f"repair changed the data: {p.stdout}"
    assert_check_agrees(qcowfs.check(img), img, "after repair")


def test_check_repair_through_open_image(tmp_path: Path) -> None:
    """`Image.check(repair=True)` in "r+" repairs a leak as `qemu-img check -r all` would."""
    img = make_check_image("refcount2-c4k", tmp_path / "img")
    data = oracle(img, tmp_path / "data.raw")
    rc = Refcounts(img)
    rc.set(0, rc.get(0) + 1)
    with qcowfs.open(img, "r+") as image:
        result = image.check(repair=True)
    assert result.fixed is not None and result.fixed[0] >= 1, result
    assert qemu("qemu-img", "check", img).returncode == 0
    assert qemu("qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, data).returncode == 0


# --------------------------------------------------------------------------
# 5. errors

def test_open_errors_are_qcow_errors(tmp_path: Path) -> None:
    """What is not a qcow2 image raises InvalidImageError; every failure to open is a
    QcowError (the docstring's promise: one readable line each, never a bare OSError)."""
    raw = tmp_path / "disk.raw"
    raw.write_bytes(random.Random(1).randbytes(MiB))
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    empty = tmp_path / "empty"
    empty.touch()
    must("qemu-img", "create", "-q", "-f", "raw", tmp_path / "qemu.raw", "1M")
    for path in (raw, text, empty, tmp_path / "qemu.raw"):
        with pytest.raises(qcowfs.InvalidImageError) as e:
            qcowfs.open(path)
        assert isinstance(e.value, qcowfs.QcowError) and "\n" not in str(e.value)
    for path in (tmp_path / "missing.qcow2", tmp_path):
        with pytest.raises(qcowfs.QcowError) as e2:
            qcowfs.open(path)
        assert "\n" not in str(e2.value)
    img = build_subject(tmp_path / "img", Layout(size=MiB, seed=40)).image
    with pytest.raises(qcowfs.UsageError):
        qcowfs.open(img, "w")  # type: ignore[arg-type]
    with pytest.raises(qcowfs.UsageError):
        qcowfs.open(img, "r+", force_share=True)


def test_read_only_errors(tmp_path: Path) -> None:
    """In mode "r" every change raises ReadOnlyError (errno EROFS), before touching the
    file; a snapshot's disk is never writable; missing names raise NotFoundError (ENOENT)."""
    subject = build_subject(tmp_path / "img", Layout(size=4 * MiB, prefill=True, snapshots=1,
                                                     bitmaps=(BitmapSpec("b"),), seed=41))
    before = file_state(subject.directory)
    with qcowfs.open(subject.image) as image:
        disk = image.disk
        assert not disk.writable()
        changes: list[Callable[[], object]] = [
            lambda: disk.write(b"x"), lambda: disk.pwrite(b"x", 4096), lambda: disk.truncate(8 * MiB),
            lambda: image.create_snapshot("n"), lambda: image.delete_snapshot("snap1"),
            lambda: image.add_bitmap("n"), lambda: image.remove_bitmap("b"), lambda: image.clear_bitmap("b"),
            lambda: image.disable_bitmap("b"), lambda: image.checkpoint("n"), lambda: image.resize(8 * MiB)]
        for change in changes:
            with pytest.raises(qcowfs.ReadOnlyError) as e:
                change()
            assert e.value.errno == errno.EROFS
        with pytest.raises(qcowfs.NotFoundError) as e2:
            image.snapshot("no such snapshot")
        assert e2.value.errno == errno.ENOENT
        with pytest.raises(qcowfs.NotFoundError):
            image.map("no such snapshot")
        with pytest.raises(qcowfs.NotFoundError):
            image.dirty_extents("no such bitmap")
    assert file_state(subject.directory) == before
    with open_rw(subject) as image:
        snap = image.snapshot("snap1")
        assert not snap.writable()
        with pytest.raises(qcowfs.ReadOnlyError) as e:
            snap.write(b"x")
        assert e.value.errno == errno.EROFS
        with pytest.raises(qcowfs.ReadOnlyError):
            snap.truncate(8 * MiB)
        with pytest.raises(qcowfs.NotFoundError):
            image.delete_snapshot("no such snapshot")
    subject.judge()


def test_closed_image_and_unsupported_requests(tmp_path: Path) -> None:
    """After close, the image and its disk raise ValueError (as closed Python files do).
    An image with an external data file cannot hold internal snapshots, as in QEMU."""
    subject = build_subject(tmp_path / "img", Layout(size=MiB, seed=42))
    with open_rw(subject) as image:
        disk = image.disk
    assert image.closed
    for call in (lambda: disk.read(1), lambda: disk.pwrite(b"x", 0), lambda: image.info(), lambda: disk.seek(0)):
        with pytest.raises(ValueError):
            call()
    d = tmp_path / "df"
    d.mkdir()
    p = qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=disk.data", "disk.qcow2", "1M", cwd=d)
    assert p.returncode == 0, p.stderr
    assert qemu("qemu-img", "snapshot", "-c", "s", d / "disk.qcow2", cwd=d).returncode != 0
    with qcowfs.open(d / "disk.qcow2", "r+") as image, pytest.raises(qcowfs.UnsupportedFeatureError):
        image.create_snapshot("s")
    assert qemu("qemu-img", "check", d / "disk.qcow2", cwd=d).returncode == 0


def test_a_data_file_qemu_img_made_in_its_working_directory(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """`qemu-img create -o data_file=NAME vm/disk.qcow2` makes NAME in its working
    directory, and QEMU opens it from there: so does qcowfs, where the image's own
    directory has no such file (a data file beside the image comes first)."""
    (tmp_path / "vm").mkdir()
    p = qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=disk.data,data_file_raw=on",
             "vm/disk.qcow2", "1M", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "disk.data").exists() and not (tmp_path / "vm" / "disk.data").exists()
    assert qemu("qemu-io", "-c", "write -P 7 0 64k", "vm/disk.qcow2", cwd=tmp_path).returncode == 0
    monkeypatch.chdir(tmp_path)
    with qcowfs.open("vm/disk.qcow2", "r+") as image:
        assert image.disk.read(64 * KiB) == b"\x07" * (64 * KiB)
        image.disk.pwrite(b"\x08" * 512, 64 * KiB)
    p = qemu("qemu-io", "-c", "read -P 8 64k 512", "vm/disk.qcow2", cwd=tmp_path)
    assert p.returncode == 0 and "fail" not in p.stdout, p.stdout + p.stderr
    assert qemu("qemu-img", "check", "vm/disk.qcow2", cwd=tmp_path).returncode == 0
    monkeypatch.chdir(tmp_path / "vm")  # from elsewhere: not found, one clear error (QEMU: the same)
    with pytest.raises(qcowfs.QcowError, match="cannot open external data file"):
        qcowfs.open("disk.qcow2")


def consistent_read_locked(image: Path) -> bool:
    """Whether someone holds QEMU's "consistent read" lock byte (100) of IMAGE: every QEMU
    reader and writer does, so this says qemu-io has the image open (asked with F_OFD_GETLK,
    which takes no lock and so cannot race with qemu-io's start)."""
    fd = os.open(image, os.O_RDONLY)
    try:
        probe = struct.pack("hhxxxxqqixxxx", fcntl.F_WRLCK, os.SEEK_SET, 100, 1, 0)
        return struct.unpack("hhxxxxqqixxxx", fcntl.fcntl(fd, fcntl.F_OFD_GETLK, probe))[0] != fcntl.F_UNLCK
    finally:
        os.close(fd)


@contextlib.contextmanager
def qemu_io_holding(image: Path, *args: str) -> Iterator[subprocess.Popen[str]]:
    """qemu-io with IMAGE open (its stdin kept open so it stays), until the block ends."""
    proc = subprocess.Popen(["qemu-io", "-f", "qcow2", *args, str(image)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not consistent_read_locked(image):
            assert proc.poll() is None, f"qemu-io exited: {proc.stderr.read() if proc.stderr else ''}"
            assert time.monotonic() < deadline, "qemu-io did not take the image"
            time.sleep(0.02)
        yield proc
    finally:
        try:
            proc.communicate("quit\n", timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_locks_against_qemu(tmp_path: Path) -> None:
    """An image a qemu-io writer holds: open "r" and "r+" raise ImageLockedError (EBUSY);
    force_share reads it. Conversely, "r+" keeps QEMU's readers and writers out and "r"
    keeps its writers out but lets its readers in."""
    subject = build_subject(tmp_path / "img", Layout(size=4 * MiB, prefill=True, seed=43))
    img = subject.image
    with qemu_io_holding(img):
        for mode in ("r", "r+"):
            with pytest.raises(qcowfs.ImageLockedError) as e:
                qcowfs.open(img, mode)
            assert e.value.errno == errno.EBUSY
        with qcowfs.open(img, force_share=True) as image:
            assert_disk_reads(image.disk, subject.model.path, "force_share")
    with open_rw(subject):
        assert qemu("qemu-io", "-f", "qcow2", "-c", "read 0 1", img).returncode != 0
        assert qemu("qemu-io", "-r", "-f", "qcow2", "-c", "read 0 1", img).returncode != 0
        assert qemu("qemu-img", "info", img).returncode != 0
    with qcowfs.open(img):
        assert qemu("qemu-io", "-f", "qcow2", "-c", "read 0 1", img).returncode != 0
        assert qemu("qemu-io", "-r", "-f", "qcow2", "-c", "read 0 1", img).returncode == 0
    subject.judge()


# --------------------------------------------------------------------------
# 6. the async twin, under trio

@pytest.mark.parametrize("name", ["v3-c64k", "backing-chain4", "extl2-c64k-backing", "convert-c-zstd-c4k",
                                  "snapshots", "datafile"])
async def test_aio_reads_match_qemu(name: str, matrix: Callable[[str], MatrixImage], tmp_path: Path) -> None:
    """`async with qcowfs.aio.open(...)`: disk reads (1 MiB at a time, and readinto), the
    snapshots, the map and the info are QEMU's."""
    m = matrix(name)
    expected = oracle(m.image, tmp_path / "expected.raw").read_bytes()
    async with qcowfs.aio.open(m.image) as image:
        disk = image.disk
        assert disk.size == len(expected) and not disk.writable
        for off in range(0, disk.size, MiB):
            assert_same_bytes(bytes(await disk.read(off, MiB)), expected[off:off + MiB], f"{name} aio read", off)
        buf = bytearray(100_000)
        n = await disk.readinto(buf, 54_321)
        assert_same_bytes(bytes(buf[:n]), expected[54_321:154_321], f"{name} aio readinto", 54_321)
        assert await disk.read(disk.size, 10) == b""
        for s in image.snapshots:
            want = qemu_snapshot_raw(m.image, s.name, tmp_path / "snap.raw")
            got = await image.snapshot(s.name).read(0, len(want))
            assert_same_bytes(bytes(got), want[:len(got)], f"{name} aio snapshot {s.name}")
        assert await image.map() == qemu_map(m.image)
        assert_info_agrees(await image.info(), qemu_info(m.image), f"{name} (aio)")


@pytest.mark.parametrize("name", ["backing-chain4", "backing-shorter", "backing-raw-shorter", "extl2-c16k-backing",
                                  "zero-over-backing", "backing-chain3-shrinking"])
async def test_aio_nowait_reads_through_the_chain(name: str, matrix: Callable[[str], MatrixImage],
                                                  tmp_path: Path) -> None:
    """Once the tables are cached, `Disk.read_nowait` serves reads of every
    layer of a backing chain (raw, shorter, subclusters, zeros over backing
    data) without awaiting, and what it serves is QEMU's; where it declines
    (None), read() serves the same bytes."""
    m = matrix(name)
    expected = oracle(m.image, tmp_path / "expected.raw").read_bytes()
    rng = random.Random(name)
    async with qcowfs.aio.open(m.image) as image:
        disk = image.disk
        for off in range(0, disk.size, MiB):  # loads every table
            await disk.read(off, MiB)
        served = 0
        pairs = [(rng.randrange(disk.size), rng.choice([1, 512, 4096, 65537, 300_000])) for _ in range(200)]
        for off, ln in pairs:
            got = disk.read_nowait(off, ln)
            if got is None:
                got = await disk.read(off, ln)
            else:
                served += 1
            assert_same_bytes(bytes(got), expected[off:off + ln], f"{name} read_nowait({off}, {ln})", off)
        assert served >= len(pairs) // 2, f"{name}: only {served} of {len(pairs)} reads served without awaiting"


async def test_aio_concurrent_writes_snapshot_bitmap(tmp_path: Path) -> None:
    """Disjoint writes in flight at once in a nursery (allocation must serialise), a
    snapshot and a bitmap in between: QEMU then judges all of it."""
    subject = build_subject(tmp_path / "img", Layout(size=16 * MiB, cluster_size=16 * KiB, backing_size=8 * MiB,
                                                     prefill=True, compressed=4, seed=50))

    async def one(disk: qcowfs.aio.Disk, off: int, data: bytes) -> None:
        assert await disk.write(off, data) == len(data)

    rng = random.Random(50)
    async with qcowfs.aio.open(subject.image, "r+") as image:
        for round_ in range(3):
            writes = []
            for slot in range(8):
                ln = rng.randint(1, 2 * MiB - 1)
                off = slot * 2 * MiB + rng.randrange(0, 2 * MiB - ln)
                writes.append((off, make_data(KINDS[slot % 4], ln, round_ * 10 + slot)))
            async with trio.open_nursery() as nursery:
                for off, data in writes:
                    nursery.start_soon(one, image.disk, off, data)
            for off, data in writes:
                subject.model.write(off, data)
                for bm in subject.bitmaps.values():
                    bm.mark(off, len(data))
            if round_ == 0:
                take_expected_snapshot(subject, await image.create_snapshot("aio-snap"))
                await image.add_bitmap("aio-bm", 64 * KiB)
                track_bitmap(subject, "aio-bm", True, 64 * KiB)
        await image.disk.flush()
        for off in range(0, subject.model.size, 4 * MiB):
            assert_same_bytes(bytes(await image.disk.read(off, 4 * MiB)), subject.model.read(off, 4 * MiB),
                              "aio read back", off)
        extents = await image.dirty_extents("aio-bm")
        data_at = await image.disk.find(0, True)
    assert extents == nbd_dirty_map(subject.image, "aio-bm")
    assert data_at == expected_seek(qemu_map(subject.image), subject.model.size, 0)[0]
    subject.judge()


async def test_aio_errors_check_and_await_open(tmp_path: Path) -> None:
    """`image = await qcowfs.aio.open(...)` then `await image.close()`; the same errors as
    the synchronous API; `await qcowfs.aio.check(path)` is qemu-img check's verdict."""
    subject = build_subject(tmp_path / "img", Layout(size=4 * MiB, prefill=True, snapshots=1, seed=51))
    image = await qcowfs.aio.open(subject.image)
    try:
        with pytest.raises(qcowfs.ReadOnlyError):
            await image.disk.write(0, b"x")
        snap = image.snapshot("snap1")
        assert not snap.writable and snap.snapshot is not None and snap.snapshot.name == "snap1"
        with pytest.raises(qcowfs.ReadOnlyError):
            await snap.write(0, b"x")
        with pytest.raises(qcowfs.NotFoundError):
            image.snapshot("nope")
        with pytest.raises(qcowfs.ReadOnlyError):
            await image.create_snapshot("n")
        assert_check_agrees(await image.check(), subject.image, "aio Image.check")
    finally:
        await image.close()
    assert_check_agrees(await qcowfs.aio.check(subject.image), subject.image, "qcowfs.aio.check")
    junk = tmp_path / "junk"
    junk.write_bytes(bytes(MiB))
    with pytest.raises(qcowfs.InvalidImageError):
        async with qcowfs.aio.open(junk):
            pass
    async with qcowfs.aio.open(subject.image, "r+") as image:
        with pytest.raises(qcowfs.ResizeError):
            await image.disk.truncate(MiB)
        assert await image.disk.truncate(8 * MiB) == 8 * MiB
        subject.model.resize(8 * MiB)
    assert qemu_info(subject.image)["virtual-size"] == 8 * MiB
    subject.judge()


# --------------------------------------------------------------------------
# 7. no pyfuse3

def python_without_pyfuse3(code: str, *args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run CODE in a fresh interpreter where `import pyfuse3` raises ImportError (a None
    entry in sys.modules), with this work tree first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    prelude = "import sys; sys.modules['pyfuse3'] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + code, *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env, cwd=cwd)


NO_FUSE_SCRIPT = r"""
import json, os
import qcowfs
img, out = sys.argv[1], sys.argv[2]
res = {"root": qcowfs.__file__}
with qcowfs.open(img, "r+") as image:
    image.disk.pwrite(b"no fuse here", 12345)
    res["read"] = image.disk.pread(12345, 12).decode()
    image.create_snapshot("nofuse")
    image.disk.pwrite(b"after snap!!", 12345)
    image.add_bitmap("nofuse-bm")
    image.disk.pwrite(b"dirty", 3 << 20)
    image.disk.flush()
    res["snapshot"] = image.snapshot("nofuse").pread(12345, 12).decode()
    res["info"] = image.info()
    res["map"] = image.map()
    res["check"] = image.check().returncode
    res["extents"] = image.dirty_extents("nofuse-bm")
    res["seek"] = image.disk.seek(0, os.SEEK_DATA)
res["module_check"] = qcowfs.check(img).returncode
import trio, qcowfs.aio
async def main():
    async with qcowfs.aio.open(img) as image:
        return bytes(await image.disk.read(12345, 12)).decode()
res["aio"] = trio.run(main)
try:
    import pyfuse3
    res["pyfuse3_importable"] = True
except ImportError:
    res["pyfuse3_importable"] = False
res["pyfuse3_modules"] = sorted(m for m, v in sys.modules.items() if "pyfuse3" in m and v is not None)
json.dump(res, open(out, "w"))
"""


def test_api_without_pyfuse3(tmp_path: Path) -> None:
    """The library needs no FUSE: with pyfuse3 unimportable, open, read, write, snapshot,
    bitmap, info, check, map, seek and the aio twin all work, pyfuse3 is never loaded,
    and QEMU sees the result."""
    subject = build_subject(tmp_path / "img", Layout(size=4 * MiB, prefill=True, seed=60))
    out = tmp_path / "out.json"
    p = python_without_pyfuse3(NO_FUSE_SCRIPT, subject.image, out, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    assert Path(res["root"]).resolve().parent.parent == ROOT, f"imported qcowfs from {res['root']}, not {ROOT}"
    assert res["pyfuse3_importable"] is False and res["pyfuse3_modules"] == [], res
    assert (res["read"], res["snapshot"], res["aio"]) == ("no fuse here", "no fuse here", "after snap!!")
    assert res["check"] == res["module_check"] == 0
    assert res["info"]["virtual-size"] == 4 * MiB and [s["name"] for s in res["info"]["snapshots"]] == ["nofuse"]
    assert res["seek"] == expected_seek(qemu_map(subject.image), subject.model.size, 0)[0]
    with qcowfs.open(subject.image) as image:
        assert res["map"] == image.map() == qemu_map(subject.image)
    assert [s["name"] for s in qemu_info(subject.image)["snapshots"]] == ["nofuse"]
    assert "nofuse-bm" in bitmap_flags(subject.image)
    assert res["extents"] == nbd_dirty_map(subject.image, "nofuse-bm")
    assert qemu("qemu-img", "check", subject.image).returncode == 0
    subject.model.write(12345, b"after snap!!")
    subject.model.write(3 << 20, b"dirty")
    p2 = qemu("qemu-img", "compare", "-f", "qcow2", "-F", "raw", subject.image, subject.model.path)
    assert p2.returncode == 0, p2.stdout


def test_mount_without_pyfuse3_says_so(tmp_path: Path) -> None:
    """`qcowfs mount` without pyfuse3: one line on stderr naming pyfuse3, a non-zero exit,
    nothing mounted (through the console script's entry point, qcowfs.cli:main)."""
    img = build_subject(tmp_path / "img", Layout(size=MiB, seed=61)).image
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = python_without_pyfuse3("from qcowfs.cli import main; sys.exit(main(['mount', sys.argv[1], sys.argv[2]]))",
                               img, mnt, cwd=tmp_path)
    try:
        lines = p.stderr.strip().splitlines()
        assert p.returncode != 0, f"exit 0 without pyfuse3: {p.stdout}{p.stderr}"
        assert len(lines) == 1 and "pyfuse3" in lines[0], f"stderr: {p.stderr!r}"
        assert "Traceback" not in p.stderr
    finally:
        assert not is_mounted(mnt), "something was mounted without pyfuse3"
