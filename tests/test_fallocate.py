"""fallocate(2) and lseek(SEEK_DATA/SEEK_HOLE) on a real mount, against
qemu-storage-daemon's FUSE export of a copy of the same image (it implements
both) and `qemu-img map`.

Where they differ, on purpose (docs/mounting.md, "Discard, zeroing and holes"):
- a PUNCH_HOLE that covers part of a cluster: QEMU's discard leaves that part
  as it was (fallocate(2) promises zeros); qcowfs writes zeros there;
- mode 0 (or KEEP_SIZE alone) inside the disk: QEMU answers EOPNOTSUPP,
  qcowfs succeeds (every cluster can already be written: nothing to reserve).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from conftest import fuse_server, mounted, qemu_img, qemu_io, run
from qcowfs.host.hostfile import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, fallocate

KiB, MiB = 1 << 10, 1 << 20
PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
FALLOC_FL_COLLAPSE_RANGE = 0x08


@contextlib.contextmanager
def qsd_export(image: Path, export: Path, fmt: str = "qcow2") -> Iterator[Path]:
    """IMAGE exported writable by qemu-storage-daemon on the regular file EXPORT."""
    export.touch()
    with fuse_server(["qemu-storage-daemon",
                      "--blockdev", f"driver=file,node-name=file,filename={image},discard=unmap",
                      "--blockdev", f"driver={fmt},node-name=fmt,file=file,discard=unmap",
                      "--export", f"type=fuse,id=exp,node-name=fmt,mountpoint={export},writable=on"],
                     export):
        yield export


def call(fn: Callable[[], int | None]) -> int | str:
    """FN's result, or the errno name of its OSError (to compare two files' answers)."""
    try:
        r = fn()
        return 0 if r is None else r
    except OSError as e:
        return errno.errorcode[e.errno]


def seeks(fd: int, offsets: list[int]) -> list[tuple[int, int | str, int | str]]:
    return [(o, call(lambda: os.lseek(fd, o, os.SEEK_DATA)), call(lambda: os.lseek(fd, o, os.SEEK_HOLE)))
            for o in offsets]


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def zero_data_runs(image: Path) -> list[tuple[int, int, bool, bool]]:
    """`qemu-img map`: (start, length, zero, data) with neighbours of the same kind merged
    (whether a zero range is a zero cluster or unallocated is QEMU's choice or ours)."""
    out: list[tuple[int, int, bool, bool]] = []
    for r in json.loads(qemu_img("map", "--output=json", image)):
        kind = (r["zero"], r["data"])
        if out and out[-1][2:] == kind and out[-1][0] + out[-1][1] == r["start"]:
            out[-1] = (out[-1][0], out[-1][1] + r["length"], *kind)
        else:
            out.append((r["start"], r["length"], *kind))
    return out


def _plain(d: Path) -> Path:
    img = d / "plain.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "64M")
    qemu_io(img, "write -P 0x11 0 4M", "write -z 8M 1M", "write -P 0x22 16M 64k", "write -P 0x33 40M 3M")
    return img


def _backing(d: Path) -> Path:
    base = d / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "64M")
    qemu_io(base, "write -P 0x44 2M 6M", "write -P 0x45 30M 1M")
    img = d / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", img, "64M")
    qemu_io(img, "write -P 0x11 0 3M", "write -z 5M 1M", "write -P 0x22 40M 128k")
    return img


def _raw_backing(d: Path) -> Path:
    """Over a sparse raw backing file: its holes are the host filesystem's."""
    base = d / "base.raw"
    with open(base, "wb") as f:
        f.truncate(48 * MiB)
        for off, byte in ((2 * MiB, 0x66), (30 * MiB, 0x67)):
            f.seek(off)
            f.write(bytes([byte]) * (1 * MiB))
    img = d / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "raw", img, "64M")
    qemu_io(img, "write -P 0x11 0 1M", "write -z 31M 64k", "write -P 0x22 40M 128k")
    return img


def _compressed_extended(d: Path) -> Path:
    img = d / "ext.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=128k", img, "32M")
    qemu_io(img, "write -c -P 0x55 0 128k", "write -c -P 0x56 1M 128k", "write -P 0x57 4M 40k",
            "write -P 0x58 8M 2M", "write -z 8M 32k")
    return img


LAYOUTS = {"plain": _plain, "backing": _backing, "raw-backing": _raw_backing,
           "compressed+extended-l2": _compressed_extended}
# (mode, offset, length): cluster-aligned, where QEMU and qcowfs must agree exactly.
OPS = [
    (PUNCH, 1 * MiB, 1 * MiB),                 # data -> hole
    (PUNCH, 2 * MiB + 512 * KiB, 1 * MiB),     # data and what lies below
    (FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 3 * MiB, 256 * KiB),
    (FALLOC_FL_ZERO_RANGE, 4 * MiB, 1 * MiB),
    (PUNCH, 0, 128 * KiB),                     # a compressed cluster, where there is one
    (PUNCH, 8 * MiB, 4 * MiB),                 # zero and unallocated clusters
    (FALLOC_FL_COLLAPSE_RANGE, 0, 128 * KiB),  # unsupported: EOPNOTSUPP from both
    (PUNCH, 30 * MiB, 2 * MiB),                # over a backing file's data
]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_fallocate_and_lseek_as_qemu_storage_daemon(tmp_path: Path, name: str) -> None:
    ours = LAYOUTS[name](tmp_path)
    theirs = tmp_path / f"qsd-{ours.name}"
    shutil.copy(ours, theirs)
    # (both over the same backing file: its name is relative to the image's directory)
    size = int(json.loads(qemu_img("info", "--output=json", ours))["virtual-size"])
    rng = random.Random(name)
    offsets = sorted({0, size - 1, *range(0, size, 512 * KiB), *(rng.randrange(size) for _ in range(60))})
    with mounted(ours, tmp_path / "mnt", read_only=False) as mnt, \
            qsd_export(theirs, tmp_path / "export") as export:
        disk = mnt / "disk.raw"
        a, b = os.open(disk, os.O_RDWR), os.open(export, os.O_RDWR)
        try:
            assert seeks(a, offsets) == seeks(b, offsets)
            for mode, off, length in OPS:
                if off + length > size:
                    continue
                got = call(lambda: fallocate(a, mode, off, length))
                want = call(lambda: fallocate(b, mode, off, length))
                assert got == want, (mode, off, length)
            # past the end: ZERO_RANGE without KEEP_SIZE grows the disk (as truncate)
            assert call(lambda: fallocate(a, FALLOC_FL_ZERO_RANGE, size - 64 * KiB, 1 * MiB)) == \
                call(lambda: fallocate(b, FALLOC_FL_ZERO_RANGE, size - 64 * KiB, 1 * MiB)) == 0
            assert os.fstat(a).st_size == os.fstat(b).st_size == size + 1 * MiB - 64 * KiB
            os.fsync(a)
            os.fsync(b)
            offsets.append(size + 512 * KiB)
            assert seeks(a, offsets) == seeks(b, offsets)
        finally:
            os.close(a)
            os.close(b)
        assert digest(disk) == digest(export)
    for img in (ours, theirs):
        assert run("qemu-img", "check", img, check=False).returncode == 0
    assert zero_data_runs(ours) == zero_data_runs(theirs)


def test_punch_hole_zeroes_partial_clusters_and_mode0_succeeds(tmp_path: Path) -> None:
    """The two differences from QEMU, and read-only files."""
    img = _plain(tmp_path)
    with mounted(img, tmp_path / "mnt", read_only=False) as mnt:
        disk = mnt / "disk.raw"
        fd = os.open(disk, os.O_RDWR)
        try:
            fallocate(fd, PUNCH, 100, 200 * KiB)          # partial clusters at both ends
            assert os.pread(fd, 200 * KiB + 200, 0) == b"\x11" * 100 + bytes(200 * KiB) + b"\x11" * 100
            fallocate(fd, 0, 0, 4096)                       # inside: nothing to do
            fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 100 * MiB)
            assert os.fstat(fd).st_size == 64 * MiB
            os.posix_fallocate(fd, 64 * MiB - 512, 1 * MiB)  # past the end: grows
            assert os.fstat(fd).st_size == 65 * MiB - 512
            assert os.lseek(fd, 64 * MiB, os.SEEK_HOLE) == 64 * MiB
            with pytest.raises(OSError) as e:
                os.lseek(fd, 64 * MiB, os.SEEK_DATA)
            assert e.value.errno == errno.ENXIO
        finally:
            os.close(fd)
    assert run("qemu-img", "check", img, check=False).returncode == 0
    with mounted(img, tmp_path / "ro") as mnt:
        with open(mnt / "disk.raw", "rb") as f:
            with pytest.raises(OSError) as e:
                fallocate(f.fileno(), PUNCH, 0, 4096)
            assert e.value.errno == errno.EBADF  # (the kernel refuses a read-only fd itself)


def test_lseek_on_snapshots_and_a_huge_sparse_disk(tmp_path: Path) -> None:
    """Snapshot files answer from their own L1 table; a 16 TiB disk with two
    data clusters is answered at once (L1 ranges skipped by entry)."""
    img = tmp_path / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "16T")
    qemu_io(img, "write -P 0x61 1G 64k", "write -P 0x62 15T 64k")
    qemu_img("snapshot", "-c", "s1", img)
    qemu_io(img, "write -P 0x63 8T 64k", "write -z 1G 64k")
    with mounted(img, tmp_path / "mnt") as mnt:
        t0 = time.monotonic()
        with open(mnt / "disk.raw", "rb") as f:
            fd = f.fileno()
            assert os.lseek(fd, 0, os.SEEK_DATA) == 8 << 40
            assert os.lseek(fd, 8 << 40, os.SEEK_HOLE) == (8 << 40) + 64 * KiB
            assert os.lseek(fd, (8 << 40) + 64 * KiB, os.SEEK_DATA) == 15 << 40
            assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
        with open(mnt / "snapshots" / "s1.raw", "rb") as f:
            fd = f.fileno()
            assert os.lseek(fd, 0, os.SEEK_DATA) == 1 << 30
            assert os.lseek(fd, (1 << 30) + 64 * KiB, os.SEEK_DATA) == 15 << 40
            with pytest.raises(OSError) as e:
                os.lseek(fd, (15 << 40) + 64 * KiB, os.SEEK_DATA)
            assert e.value.errno == errno.ENXIO
        assert time.monotonic() - t0 < 5


def test_discard_and_zero_range_mark_dirty_bitmaps(tmp_path: Path) -> None:
    """A discarded or zeroed range changed the disk: an auto bitmap counts it
    as written, live in bitmaps/NAME and stored at unmount (QEMU's view)."""
    img = _plain(tmp_path)
    qemu_img("bitmap", "--add", "-g", "64k", img, "b0")
    with mounted(img, tmp_path / "mnt", read_only=False) as mnt:
        fd = os.open(mnt / "disk.raw", os.O_RDWR)
        try:
            fallocate(fd, PUNCH, 1 * MiB, 128 * KiB)                            # granules 16, 17
            fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 40 * MiB + 1, 10)  # granule 640
        finally:
            os.close(fd)
        bits = (mnt / "bitmaps" / "b0").read_bytes()
    dirty = {i for i in range(len(bits) * 8) if bits[i >> 3] >> (i & 7) & 1}
    assert dirty == {16, 17, 640}, sorted(dirty)
    info = json.loads(qemu_img("info", "--output=json", img))
    flags = info["format-specific"]["data"]["bitmaps"][0]["flags"]
    assert "in-use" not in flags, flags


def test_data_runs_tile_a_sparse_file_and_call_past_its_end_a_hole(tmp_path: Path) -> None:
    """HostFile.data_runs, the one walk of a host file's data and holes (map's
    preallocated runs, a raw backing file's block status, convert's raw
    source): runs that tile the range asked, data exactly where blocks were
    written (ext4 keeps 4 KiB blocks), holes between them and past the end."""
    from qcowfs.host.hostfile import HostFile

    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.truncate(MiB)
        f.seek(64 * KiB)
        f.write(b"x" * 8 * KiB)
        f.seek(512 * KiB)
        f.write(b"y" * 4 * KiB)
    file = HostFile(str(path))
    try:
        runs = file.data_runs(0, 2 * MiB)
        assert [(pos, n) for pos, n, has_data in runs if has_data] == [(64 * KiB, 8 * KiB), (512 * KiB, 4 * KiB)]
        assert runs[0][0] == 0 and all(a[0] + a[1] == b[0] for a, b in zip(runs, runs[1:]))
        assert runs[-1] == (516 * KiB, 2 * MiB - 516 * KiB, False)
        assert all(a[2] != b[2] for a, b in zip(runs, runs[1:]))
        assert file.data_runs(68 * KiB, 514 * KiB) == [(68 * KiB, 4 * KiB, True), (72 * KiB, 440 * KiB, False),
                                                       (512 * KiB, 2 * KiB, True)]
        assert file.data_runs(MiB, 2 * MiB) == [(MiB, MiB, False)]
    finally:
        file.close()
