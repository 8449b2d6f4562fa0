"""An ext4 filesystem inside a compressed qcow2: loop-mount MOUNT/disk.raw and read the files back."""
from __future__ import annotations

import hashlib
import os
import random
import subprocess
from pathlib import Path

import pytest

from conftest import is_mounted, loop_device, verify_tree
from images import KiB, MiB, qimg, sh

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for losetup/mount")


def umount_dir(path: Path) -> None:
    for args in (["umount", str(path)], ["umount", "-l", str(path)]):
        if not is_mounted(path):
            return
        subprocess.run(args, capture_output=True, timeout=60)


def make_tree(root: Path, seed: int) -> dict[str, str]:
    """A tree of files with varied sizes and contents; returns {relative path: sha256}."""
    rng = random.Random(seed)
    sums: dict[str, str] = {}
    sizes = [0, 1, 511, 512, 4095, 4096, 4097, 65536 + 3, 1 * MiB + 17, 3 * MiB + 1]
    sizes += [rng.randint(1, 300 * KiB) for _ in range(30)]
    for i, size in enumerate(sizes):
        sub = root / f"d{i % 4}" / (f"e{i % 3}" if i % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        kind = i % 3
        if kind == 0:
            data = rng.randbytes(size)                                 # incompressible
        elif kind == 1:
            data = (f"file {i} line ".encode() * (size // 12 + 1))[:size]  # compressible
        else:
            data = bytes([i]) * (size // 2) + rng.randbytes(size - size // 2)
        p = sub / f"f{i}.bin"
        p.write_bytes(data)
        sums[str(p.relative_to(root))] = hashlib.sha256(data).hexdigest()
    (root / "empty-dir").mkdir()
    return sums


def build_ext4_raw(tmp: Path, seed: int, size: int = 64 * MiB) -> tuple[Path, dict[str, str]]:
    raw = tmp / "fs.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
    sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", raw)
    mnt = tmp / "ext4-rw"
    mnt.mkdir()
    with loop_device(raw, read_only=False) as dev:
        sh("mount", dev, mnt)
        try:
            sums = make_tree(mnt, seed)
            subprocess.run(["sync", "-f", str(mnt)], timeout=60)
        finally:
            umount_dir(mnt)
    assert not is_mounted(mnt)
    return raw, sums


@pytest.mark.parametrize("variant", [
    ("zlib", ["-c", "-o", "cluster_size=65536"]),
    ("zstd-4k", ["-c", "-o", "compression_type=zstd,cluster_size=4096"]),
    ("v2-plain-512", ["-o", "compat=0.10,cluster_size=512"]),
], ids=lambda v: v[0])
def test_ext4_in_qcow2_via_loop(variant, tmp_path: Path, mount) -> None:
    name, convert_args = variant
    raw, sums = build_ext4_raw(tmp_path, seed=len(name))
    img = tmp_path / "fs.qcow2"
    qimg("convert", "-q", "-f", "raw", "-O", "qcow2", *convert_args, raw, img)
    if "-c" in convert_args:
        assert img.stat().st_size < raw.stat().st_size // 2, "convert -c did not compress"
    raw.unlink()

    qmnt = mount(img)
    disk = qmnt / "disk.raw"
    assert os.stat(disk).st_size == 64 * MiB
    ext4 = tmp_path / "ext4-ro"
    ext4.mkdir()
    with loop_device(disk, read_only=True) as dev:
        try:
            p = subprocess.run(["mount", "-o", "ro", dev, str(ext4)], capture_output=True, text=True, timeout=60)
            assert p.returncode == 0, f"mount -o ro {dev} failed: {p.stderr.strip()}"
            errors = verify_tree(ext4, sums)
            assert not errors, "\n".join(errors[:20])
        finally:
            umount_dir(ext4)
            assert not is_mounted(ext4)
        # every block of the filesystem, through qcowfs: e2fsck must find it clean (exit 0)
        fsck = subprocess.run(["e2fsck", "-n", "-f", dev], capture_output=True, text=True, timeout=120)
        assert fsck.returncode == 0, f"e2fsck -n -f: {fsck.returncode}\n{fsck.stdout}{fsck.stderr}"
    # loop device detached here, before the qcowfs fixture unmounts
