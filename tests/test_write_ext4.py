"""mkfs.ext4 and a file tree written through a loop device on a read-write MNT/disk.raw.

QEMU's view afterwards (`qemu-img convert -O raw`) must be a clean ext4 with
exactly the files that were copied.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import random
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from conftest import is_mounted, loop_device, run, verify_tree
from images import KiB, MiB, create, oracle, sh
from test_write import assert_clean, qcowfs_mount

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for losetup/mount")


def loop_rw(path: Path, direct_io: bool):
    return loop_device(path, read_only=False, direct_io=direct_io)


@contextlib.contextmanager
def fs_mounted(dev: str, mnt: Path, *opts: str) -> Iterator[Path]:
    mnt.mkdir(parents=True, exist_ok=True)
    sh("mount", *opts, dev, mnt)
    try:
        yield mnt
    finally:
        for args in (["umount", str(mnt)], ["umount", "-l", str(mnt)]):
            if not is_mounted(mnt):
                break
            subprocess.run(args, capture_output=True, timeout=60)


def make_tree(root: Path, seed: int, total: int = 6 * MiB) -> dict[str, str]:
    rng = random.Random(seed)
    sums: dict[str, str] = {}
    done, i = 0, 0
    while done < total:
        size = rng.choice([0, 1, 4095, 4096, 4097, rng.randint(1, 64 * KiB), rng.randint(64 * KiB, 900 * KiB)])
        sub = root / f"d{i % 3}" / (f"e{i % 5}" if i % 2 else "") / ("deep/er" if i % 7 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        data = rng.randbytes(size) if i % 3 else (f"line {i} ".encode() * (size // 7 + 1))[:size]
        p = sub / f"f{i}.bin"
        p.write_bytes(data)
        sums[str(p.relative_to(root))] = hashlib.sha256(data).hexdigest()
        done += size
        i += 1
    return sums


@pytest.mark.parametrize("direct_io", [False, True], ids=["buffered", "direct-io"])
def test_ext4_through_rw_mount(direct_io: bool, tmp_path: Path) -> None:
    img = create(tmp_path / "disk.qcow2", 128 * MiB).resolve()
    with qcowfs_mount(img, tmp_path / "mnt") as mnt:
        with loop_rw(mnt / "disk.raw", direct_io) as dev:
            dio = run("losetup", "-n", "-l", "-O", "DIO", dev).stdout.strip()
            assert dio == ("1" if direct_io else "0"), f"loop device direct I/O is {dio}"
            sh("mkfs.ext4", "-q", "-F", dev)
            with fs_mounted(dev, tmp_path / "ext4") as root:
                sums = make_tree(root, seed=7 + direct_io)
                subprocess.run(["sync", "-f", str(root)], timeout=120, check=True)
                # read back while still mounted, through the page cache and the loop device
                assert verify_tree(root, sums) == []
            assert not is_mounted(tmp_path / "ext4")
            # the data is on disk.raw: the loop device reads it back clean
            p = subprocess.run(["fsck.ext4", "-fn", dev], capture_output=True, text=True, timeout=120)
            assert p.returncode == 0, f"fsck through the live mount: {p.stdout}{p.stderr}"
    assert not is_mounted(tmp_path / "mnt")

    assert_clean(img)
    raw = oracle(img, tmp_path / "qemu-view.raw")
    p = subprocess.run(["fsck.ext4", "-fn", str(raw)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"fsck.ext4 on QEMU's view: {p.stdout}{p.stderr}"
    with loop_device(raw, read_only=True) as dev:
        with fs_mounted(dev, tmp_path / "check", "-o", "ro,noload") as root:
            errors = verify_tree(root, sums)
    assert errors == [], errors[:10]
