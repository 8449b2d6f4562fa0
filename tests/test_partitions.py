"""partitions/N and snapshot-partitions/NAME/N: GPT and MBR tables made with
sfdisk through disk.raw; each partition file is the byte range QEMU's view
gives; the listing follows a rewritten table; fuse2fs mounts one as an
unprivileged user."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import QCOWFS, force_unmount, is_mounted, mounted, run, to_raw
from images import MiB, create, sh

GPT = "label: gpt\nsize=8M, type=L, name=boot\nsize=20M, type=L, name=\"root fs\"\nsize=+, type=S\n"
MBR = "label: dos\n,6M,83\n,10M,c\n,,5\n,5M,83\n,,82\n"


def sfdisk(disk: Path, script: str) -> dict:
    subprocess.run(["sfdisk", "-q", "--wipe", "always", str(disk)], input=script, text=True,
                   check=True, capture_output=True)
    return json.loads(run("sfdisk", "-J", disk).stdout)["partitiontable"]


def number(node: str) -> int:
    """The partition number of sfdisk's node name (FILE1, FILE5...)."""
    m = re.search(r"(\d+)$", node)
    assert m is not None, node
    return int(m.group(1))


def fill(mnt: Path, numbers: list[int]) -> dict[int, bytes]:
    """Distinct bytes at both ends and inside each partition, written through its file."""
    out = {}
    for n in numbers:
        p = mnt / "partitions" / str(n)
        size = p.stat().st_size
        data = bytes([n]) * 4096 + os.urandom(8192)
        with open(p, "r+b") as f:
            f.write(data)
            f.seek(size - 4096)
            f.write(b"E" * 4096)
        out[n] = data
    return out


def check_ranges(mnt: Path, raw: bytes, table: dict, numbers: list[int]) -> None:
    parts = {number(p["node"]): p for p in table["partitions"]}
    assert sorted(int(x) for x in os.listdir(mnt / "partitions")) == sorted(numbers)
    for n in numbers:
        start, length = parts[n]["start"] * 512, parts[n]["size"] * 512
        f = mnt / "partitions" / str(n)
        assert f.stat().st_size == length
        assert f.read_bytes() == raw[start : start + length], f"partition {n}"
        assert os.getxattr(f, "user.qcow2.partition.start") == str(start).encode()
        assert os.getxattr(f, "user.qcow2.partition.length") == str(length).encode()


def test_gpt(tmp_path: Path) -> None:
    img = create(tmp_path / "g.qcow2", 64 * MiB)
    with mounted(img, tmp_path / "m", read_only=False) as m:
        table = sfdisk(m / "disk.raw", GPT)
        written = fill(m, [1, 2, 3])
        for p in table["partitions"]:
            f = m / "partitions" / str(number(p["node"]))
            assert os.getxattr(f, "user.qcow2.partition.type_guid").decode() == p["type"].lower()
            assert os.getxattr(f, "user.qcow2.partition.uuid").decode() == p["uuid"].lower()
            assert os.getxattr(f, "user.qcow2.partition.name").decode() == p.get("name", "")
            assert os.getxattr(f, "user.qcow2.partition.table") == b"gpt"
    raw = to_raw(img, tmp_path / "g.raw").read_bytes()
    for p in table["partitions"]:
        start = p["start"] * 512
        n = number(p["node"])
        assert raw[start : start + len(written[n])] == written[n]
    with mounted(img, tmp_path / "m") as m:
        check_ranges(m, raw, table, [1, 2, 3])
        with pytest.raises(OSError) as e:
            open(m / "partitions" / "1", "r+b")
        assert e.value.errno in (errno.EROFS, errno.EACCES)


def test_mbr_with_logical_partitions_and_a_converted_image(tmp_path: Path) -> None:
    rawfile = tmp_path / "m.raw"
    with open(rawfile, "wb") as f:
        f.truncate(48 * MiB)
    table = sfdisk(rawfile, MBR)
    with open(rawfile, "r+b") as f:
        for p in table["partitions"]:
            if p["type"] != "5":  # (the extended one starts with the first EBR)
                f.seek(p["start"] * 512)
                f.write(os.urandom(65536))
    img = tmp_path / "m.qcow2"
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", rawfile, img)
    raw = to_raw(img, tmp_path / "back.raw").read_bytes()
    assert raw == rawfile.read_bytes()
    with mounted(img, tmp_path / "m") as m:
        check_ranges(m, raw, table, [1, 2, 3, 5, 6])
        assert os.getxattr(m / "partitions" / "2", "user.qcow2.partition.type") == b"0x0c"
        assert os.getxattr(m / "partitions" / "6", "user.qcow2.partition.type") == b"0x82"
        assert os.getxattr(m / "partitions" / "5", "user.qcow2.partition.table") == b"mbr"


def test_table_rewritten_while_mounted_and_snapshots(tmp_path: Path) -> None:
    img = create(tmp_path / "t.qcow2", 64 * MiB)
    with mounted(img, tmp_path / "m", read_only=False) as m:
        assert os.listdir(m / "partitions") == []
        sfdisk(m / "disk.raw", GPT)
        assert sorted(os.listdir(m / "partitions")) == ["1", "2", "3"]
        fill(m, [2])
        run(QCOWFS, "snapshot", "create", m, "before")
        snap_table = json.loads(run("sfdisk", "-J", m / "snapshots" / "before.raw").stdout)["partitiontable"]
        table = sfdisk(m / "disk.raw", MBR)
        assert sorted(os.listdir(m / "partitions")) == ["1", "2", "3", "5", "6"]
        assert (m / "partitions" / "1").stat().st_size == 6 * MiB
        raw = (m / "disk.raw").read_bytes()
        check_ranges(m, raw, table, [1, 2, 3, 5, 6])
        # The snapshot keeps the old table, read-only.
        sp = m / "snapshot-partitions" / "before"
        assert os.listdir(m / "snapshot-partitions") == ["before"]
        assert sorted(os.listdir(sp)) == ["1", "2", "3"]
        snap_raw = (m / "snapshots" / "before.raw").read_bytes()
        for p in snap_table["partitions"]:
            start, length = p["start"] * 512, p["size"] * 512
            assert (sp / str(number(p["node"]))).read_bytes() == snap_raw[start : start + length]
        with pytest.raises(OSError) as e:
            open(sp / "2", "r+b")
        assert e.value.errno in (errno.EROFS, errno.EACCES)
        # A wiped table: no partitions at the next listing.
        with open(m / "disk.raw", "r+b") as f:
            f.write(bytes(1 << 20))
        assert os.listdir(m / "partitions") == []


@contextlib.contextmanager
def shared_dir() -> Iterator[Path]:
    """A directory an unprivileged user may enter (pytest's tmp_path is root's, 0700)."""
    d = Path(tempfile.mkdtemp(prefix="qcowfs-part-"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_fuse2fs_on_a_partition_file(tmp_path: Path) -> None:
    img = create(tmp_path / "f.qcow2", 64 * MiB)
    with mounted(img, tmp_path / "m", read_only=False) as m:
        sfdisk(m / "disk.raw", GPT)
        sh("mkfs.ext4", "-q", "-F", m / "partitions" / "2")
        sh("debugfs", "-w", "-R", "write /etc/os-release hello", m / "partitions" / "2")
    # fuse2fs runs as nobody where other users may open /dev/fuse (Debian's
    # default 0666); where the machine made it 0600 (this container), only
    # root can run any FUSE filesystem, so it runs as root: what qcowfs
    # shows is the same, and nobody still reads the partition file itself.
    nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]
    as_nobody = nobody if os.stat("/dev/fuse").st_mode & 0o006 == 0o006 else []
    with shared_dir() as d:
        with mounted(img, d / "q", "-o", "allow_other") as q:
            head = subprocess.run([*nobody, "head", "-c", "4096", str(q / "partitions" / "2")],
                                  capture_output=True, timeout=30)
            assert head.returncode == 0 and len(head.stdout) == 4096, head.stderr
            fsdir = d / "fs"
            fsdir.mkdir()
            os.chown(fsdir, 65534, 65534)
            p = subprocess.run([*as_nobody, "fuse2fs", "-o", "ro,fakeroot", str(q / "partitions" / "2"),
                                str(fsdir)], capture_output=True, text=True, timeout=60)
            try:
                assert p.returncode == 0, p.stdout + p.stderr
                deadline = time.monotonic() + 10
                while not is_mounted(fsdir):
                    assert time.monotonic() < deadline, "fuse2fs did not mount"
                    time.sleep(0.05)
                got = subprocess.run([*as_nobody, "cat", str(fsdir / "hello")], capture_output=True,
                                     timeout=30)
                assert got.returncode == 0, got.stderr
                assert got.stdout == Path("/etc/os-release").read_bytes()
            finally:
                subprocess.run([*as_nobody, "fusermount3", "-u", str(fsdir)], capture_output=True)
                force_unmount(fsdir)
