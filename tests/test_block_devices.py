"""Disks and images on block devices (loop devices here; an LVM volume, a
USB stick or /dev/nbd0 are the same to the kernel), as qemu-img serves them:

- a block device as a raw source (convert from it, a raw backing file):
  its size comes from lseek, not stat (stat says 0, and convert made an
  empty image of it), and it is data throughout (SEEK_DATA says EINVAL);
- a qcow2 image on a block device: read (info, map, check, convert, a
  read-only mount) as qemu-img reads it; a writable open is refused with
  one line (clusters are placed past the end of the file, which a device
  does not have);
- `convert -O raw` onto a block device writes into it in place, zeroing
  what the source does not hold, as qemu-img does (it renamed a new file
  over the device node); a device too small is refused before any write,
  and an image is never made over any other file that is not a regular one.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import QCOWFS, loop_device, mounted
from images import MiB, qimg, qio

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for losetup")


def qcowfs(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([QCOWFS, *map(str, args)], capture_output=True, text=True, timeout=120)


def one_line_error(p: subprocess.CompletedProcess[str], says: str = "") -> None:
    assert p.returncode == 1, p.stdout + p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    assert says in p.stderr, p.stderr


def disk_image(d: Path) -> Path:
    """A 32 MiB qcow2 with data, zeros and unallocated ranges."""
    img = d / "disk.qcow2"
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", img, "32M")
    qio(img, "write -P 0x11 0 1M", "write -z 2M 1M", "write -P 0x22 5M 64k", "write -P 0x33 31M 1M")
    return img


def noise(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def test_a_block_device_as_a_raw_source(tmp_path: Path) -> None:
    backing = tmp_path / "dev.raw"
    data = noise(backing, 16 * MiB)
    with loop_device(backing) as dev:
        for fmt in ("qcow2", "raw"):
            out = tmp_path / f"out.{fmt}"
            p = qcowfs("convert", "-O", fmt, dev, out)
            assert p.returncode == 0, p.stderr
            assert qimg("compare", "-f", "raw", "-F", fmt, backing, out).startswith("Images are identical")
        # As a raw backing file: the overlay reads the device where it holds nothing.
        ov = tmp_path / "ov.qcow2"
        qimg("create", "-q", "-f", "qcow2", "-b", dev, "-F", "raw", ov)
        qio(ov, "write -P 0x5a 1M 64k")
        p = qcowfs("convert", "-O", "raw", ov, tmp_path / "ov.raw")
        assert p.returncode == 0, p.stderr
        want = bytearray(data)
        want[MiB:MiB + 65536] = b"\x5a" * 65536
        assert (tmp_path / "ov.raw").read_bytes() == bytes(want)


def test_a_qcow2_image_on_a_block_device(tmp_path: Path) -> None:
    img = disk_image(tmp_path)
    holder = tmp_path / "holder.raw"
    noise(holder, 48 * MiB)
    with loop_device(holder, read_only=False) as dev:
        qimg("convert", "-O", "qcow2", "-o", "cluster_size=4k", img, dev)
        before = holder.read_bytes()
        p = qcowfs("map", "--output=json", dev)
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout) == json.loads(qimg("map", "--output=json", dev))
        p = qcowfs("check", dev)
        assert p.returncode == 0, p.stdout + p.stderr
        p = qcowfs("info", dev)
        assert p.returncode == 0 and "virtual size: 32 MiB" in p.stdout, p.stdout + p.stderr
        out = tmp_path / "copy.qcow2"
        p = qcowfs("convert", "-O", "qcow2", dev, out)
        assert p.returncode == 0, p.stderr
        assert qimg("compare", img, out).startswith("Images are identical")
        with mounted(dev, tmp_path / "mnt") as mnt:  # (read-only)
            assert qimg("compare", "-f", "raw", mnt / "disk.raw", img).startswith("Images are identical")
        for args in (["resize", dev, "64M"], ["snapshot", "create", dev, "s1"], ["bitmap", "add", dev, "b1"]):
            one_line_error(qcowfs(*args), "read-only")
        p = subprocess.run([QCOWFS, "mount", dev, tmp_path / "mnt"], capture_output=True, text=True, timeout=60)
        one_line_error(p, "read-only")
        assert holder.read_bytes() == before


def test_convert_onto_a_block_device_writes_into_it(tmp_path: Path) -> None:
    img = disk_image(tmp_path)
    holder = tmp_path / "holder.raw"
    data = noise(holder, 48 * MiB)
    expected = tmp_path / "expected.raw"
    qimg("convert", "-O", "raw", img, expected)
    with loop_device(holder, read_only=False) as dev:
        p = qcowfs("convert", "-O", "raw", img, dev)
        assert p.returncode == 0, p.stderr
        assert stat.S_ISBLK(os.stat(dev).st_mode)
        with open(dev, "rb") as f:
            got = f.read()
    # The disk in place, its zeros and holes zeroed; past its end the device is untouched.
    assert got[:32 * MiB] == expected.read_bytes()
    assert got[32 * MiB:] == data[32 * MiB:]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_convert_n_onto_a_block_device_as_qemu_img(tmp_path: Path) -> None:
    """-n onto a device full of old data, beside qemu-img -n onto a twin device:
    the same bytes on both (the source's holes and zeros zeroed, the device past
    the disk untouched). With --target-is-zero onto a zeroed device as well; -n
    -O qcow2 onto a device is refused (a qcow2 image needs a file) and leaves it
    as it was."""
    img = disk_image(tmp_path)
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    data = noise(ours, 48 * MiB)
    theirs.write_bytes(data)
    for extra, fill in (([], None), (["--target-is-zero"], bytes(48 * MiB))):
        if fill is not None:
            ours.write_bytes(fill)
            theirs.write_bytes(fill)
        with loop_device(ours, read_only=False) as dev, loop_device(theirs, read_only=False) as twin:
            p = qcowfs("convert", "-n", *extra, "-O", "raw", img, dev)
            assert p.returncode == 0 and not p.stderr, p.stderr
            qimg("convert", "-n", *extra, "-O", "raw", img, twin)
        got = ours.read_bytes()
        assert got == theirs.read_bytes(), extra
        assert got[32 * MiB:] == (data if fill is None else fill)[32 * MiB:]
    expected = tmp_path / "expected.raw"
    qimg("convert", "-O", "raw", img, expected)
    assert ours.read_bytes()[:32 * MiB] == expected.read_bytes()
    before = ours.read_bytes()
    with loop_device(ours, read_only=False) as dev:
        one_line_error(qcowfs("convert", "-n", "-O", "qcow2", img, dev), "is a block device")
    assert ours.read_bytes() == before


def test_what_cannot_hold_the_target_is_left_alone(tmp_path: Path) -> None:
    img = disk_image(tmp_path)
    small = tmp_path / "small.raw"
    data = noise(small, 16 * MiB)
    with loop_device(small, read_only=False) as dev:
        # Too small for the disk: refused before any write.
        one_line_error(qcowfs("convert", "-O", "raw", img, dev), "too small")
        # A qcow2 image is made in a file only.
        one_line_error(qcowfs("convert", "-O", "qcow2", img, dev), "is a block device")
        one_line_error(qcowfs("create", "-f", "qcow2", dev, "1M"), "is a block device")
        assert stat.S_ISBLK(os.stat(dev).st_mode)
    assert small.read_bytes() == data
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for args in (["convert", "-O", "raw", img, fifo], ["create", "-f", "qcow2", fifo, "1M"]):
        one_line_error(qcowfs(*args), "not a regular file")
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.qcow2", "fifo", "small.raw"]


def test_commit_into_a_block_device(tmp_path: Path) -> None:
    """An overlay on a raw device commits into it in place; one larger than
    the device is refused with one line before anything is written (it said
    "qcowfs: Invalid argument")."""
    base = tmp_path / "base.raw"
    data = noise(base, 16 * MiB)
    with loop_device(base, read_only=False) as dev:
        fits, big = tmp_path / "fits.qcow2", tmp_path / "big.qcow2"
        qimg("create", "-q", "-f", "qcow2", "-b", dev, "-F", "raw", fits, "16M")
        qimg("create", "-q", "-f", "qcow2", "-b", dev, "-F", "raw", big, "32M")
        qio(fits, "write -P 0x5 1M 1M", "write -z 8M 64k")
        qio(big, "write -P 0x6 0 1M", "write -P 0x6 20M 1M")
        one_line_error(qcowfs("commit", big), f"{dev} is a block device of {16 * MiB} bytes: it cannot grow")
        assert base.read_bytes() == data
        p = qcowfs("commit", fits)
        assert p.returncode == 0, p.stderr
    want = bytearray(data)
    want[MiB:2 * MiB] = b"\x05" * MiB
    want[8 * MiB:8 * MiB + 65536] = bytes(65536)
    assert base.read_bytes() == bytes(want)
