"""Discard through a loop device over a read-write MNT/disk.raw (the loop
driver turns discard into fallocate PUNCH_HOLE and write-zeroes into
ZERO_RANGE/PUNCH_HOLE): fstrim of a filled-then-emptied ext4, mkfs's own
discard, blkdiscard; and `cp --sparse=always` of a big sparse disk.raw. QEMU
judges afterwards: `qemu-img check` clean, `qemu-img map` shows the holes."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import loop_device, mounted, run, verify_tree
from images import MiB, GiB, qimg, qio, sh
from test_write_ext4 import fs_mounted, make_tree

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for losetup/mount")


def data_bytes(image: Path) -> int:
    """Guest bytes `qemu-img map` shows as data (allocated, not zero)."""
    return sum(r["length"] for r in json.loads(qimg("map", "--output=json", image)) if r["data"])


def disk_usage(image: Path) -> int:
    """Host bytes the image file occupies (`qemu-img info`'s disk size)."""
    return int(json.loads(qimg("info", "--output=json", image))["actual-size"])


def check_clean(image: Path) -> None:
    p = run("qemu-img", "check", image, check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def discard_max_bytes(dev: str) -> int:
    return int(Path(f"/sys/block/{Path(dev).name}/queue/discard_max_bytes").read_text())


def test_fstrim_frees_what_ext4_deleted(tmp_path: Path) -> None:
    img = tmp_path / "fs.qcow2"
    qimg("create", "-q", "-f", "qcow2", img, "256M")
    with mounted(img, tmp_path / "q", read_only=False) as q:
        with loop_device(q / "disk.raw", read_only=False) as dev:
            assert discard_max_bytes(dev) > 0  # the loop driver saw fallocate work
            sh("mkfs.ext4", "-q", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", dev)
            with fs_mounted(dev, tmp_path / "fs") as fs:
                keep = make_tree(fs / "keep", seed=1, total=4 * MiB)
                make_tree(fs / "gone", seed=2, total=48 * MiB)
                sh("sync", "-f", str(fs))
            with fs_mounted(dev, tmp_path / "fs") as fs:
                sh("rm", "-rf", str(fs / "gone"))
                sh("sync", "-f", str(fs))
                p = sh("fstrim", "-v", str(fs))
                assert "trimmed" in p.stdout, p.stdout
                full = img.stat().st_blocks * 512
                sh("sync", "-f", str(fs))  # a flush: the freed clusters reach refcount 0, punched
                assert img.stat().st_blocks * 512 < full - 32 * MiB, (full, img.stat().st_blocks * 512)
            assert discard_max_bytes(dev) > 0
    check_clean(img)
    used = data_bytes(img)
    assert used < 24 * MiB, used  # 4 MiB kept + ext4's metadata; the 48 MiB deleted are holes
    assert disk_usage(img) < 32 * MiB, disk_usage(img)  # punched out of the image file at once
    with mounted(img, tmp_path / "q2") as q:
        with loop_device(q / "disk.raw") as dev:
            with fs_mounted(dev, tmp_path / "fs2", "-o", "ro") as fs:
                errors = verify_tree(fs / "keep", keep)
                assert not errors, errors[:10]
            fsck = subprocess.run(["e2fsck", "-n", "-f", dev], capture_output=True, text=True, timeout=120)
            assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_mkfs_discard_and_blkdiscard(tmp_path: Path) -> None:
    img = tmp_path / "d.qcow2"
    qimg("create", "-q", "-f", "qcow2", img, "128M")
    qio(img, "write -P 0x77 0 128M")
    with mounted(img, tmp_path / "q", read_only=False) as q:
        with loop_device(q / "disk.raw", read_only=False) as dev:
            sh("mkfs.ext4", "-q", "-E", "discard", dev)  # mkfs discards the whole device first
    check_clean(img)
    assert data_bytes(img) < 16 * MiB
    with mounted(img, tmp_path / "q", read_only=False) as q:
        with loop_device(q / "disk.raw", read_only=False) as dev:
            sh("blkdiscard", dev)
            assert data_bytes_after_sync(dev) == 0
            with open(dev, "r+b") as f:
                f.write(b"\x99" * (4 * MiB))
                f.flush()
                os.fsync(f.fileno())
            sh("blkdiscard", "-z", "-o", str(1 * MiB), "-l", str(2 * MiB), dev)  # write-zeroes
            with open(dev, "rb") as f:
                got = f.read(4 * MiB)
            assert got == b"\x99" * MiB + bytes(2 * MiB) + b"\x99" * MiB
    check_clean(img)
    runs = json.loads(qimg("map", "--output=json", img))
    assert [(r["start"], r["length"]) for r in runs if r["data"]] == [(0, 1 * MiB), (3 * MiB, 1 * MiB)], runs


def data_bytes_after_sync(dev: str) -> int:
    """Whole device read as zeros (the image itself is locked while mounted)."""
    with open(dev, "rb") as f:
        while chunk := f.read(8 * MiB):
            if chunk.count(0) != len(chunk):
                return 1
    return 0


def test_cp_sparse_of_a_100g_disk_takes_seconds(tmp_path: Path) -> None:
    img = tmp_path / "big.qcow2"
    qimg("create", "-q", "-f", "qcow2", img, "100G")
    qio(img, "write -P 0x31 0 1M", "write -P 0x32 33G 3M", "write -z 50G 1M", "write -P 0x33 99G 64k")
    want = tmp_path / "want.raw"
    qimg("convert", "-O", "raw", img, want)
    got = tmp_path / "got.raw"
    with mounted(img, tmp_path / "q") as q:
        t0 = time.monotonic()
        sh("cp", "--sparse=always", q / "disk.raw", got)
        took = time.monotonic() - t0
    assert took < 20, took
    assert got.stat().st_size == 100 * GiB
    assert got.stat().st_blocks * 512 < 64 * MiB  # sparse: holes stayed holes
    p = run("qemu-img", "compare", "-f", "raw", "-F", "raw", got, want, check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def test_ext4_mounted_with_discard_frees_at_once(tmp_path: Path) -> None:
    """`mount -o discard`: ext4 discards freed blocks as files are deleted."""
    img = tmp_path / "od.qcow2"
    qimg("create", "-q", "-f", "qcow2", img, "128M")
    with mounted(img, tmp_path / "q", read_only=False) as q:
        with loop_device(q / "disk.raw", read_only=False) as dev:
            sh("mkfs.ext4", "-q", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", dev)
            with fs_mounted(dev, tmp_path / "fs", "-o", "discard") as fs:
                (fs / "big").write_bytes(os.urandom(32 * MiB))
                sh("sync", "-f", str(fs))
                (fs / "big").unlink()
                sh("sync", "-f", str(fs))
    check_clean(img)
    assert data_bytes(img) < 16 * MiB, data_bytes(img)
