"""Paths with any name: images and mount points whose names have non-ASCII
letters, spaces, commas and backslashes mount, read, refuse a second mount
and unmount; the mount table is parsed as the kernel escapes it; an
unexpected error before the mount is ready reaches the user as one line.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import QCOWFS, force_unmount, is_mounted
from qcowfs.host import mounts

MiB = 1 << 20
TIMEOUT = 60


def qcowfs(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([QCOWFS, *map(str, args)], capture_output=True, text=True, timeout=TIMEOUT, **kw)


def one_line_error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode != 0, p
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcowfs: "), p.stderr
    return lines[0]


# ---- the mount table and the source name, without mounting ---------------------------

def test_unescape_octal_and_utf8():
    assert mounts.unescape(rb"/mnt/caf\303\251") == "/mnt/café"  # escaped bytes
    assert mounts.unescape("/mnt/café".encode()) == "/mnt/café"  # raw bytes (what the kernel writes)
    assert mounts.unescape(rb"/a\040b\011c\012d\134e") == "/a b\tc\nd\\e"
    # bytes that are not UTF-8 come back as os.fsdecode gives them
    assert mounts.unescape(b"/mnt/\xff") == os.fsdecode(b"/mnt/\xff")
    # a backslash not followed by three octal digits stays
    assert mounts.unescape(rb"/a\9b") == "/a\\9b"


def test_mounts_parses_a_mountinfo_file(tmp_path: Path):
    info = tmp_path / "mountinfo"
    info.write_bytes(
        b"36 35 98:0 /mnt1 /mnt/parent\\040dir rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n"
        b"45 27 0:40 / /tmp/uni\\040t/caf\xc3\xa9\\040mnt rw,nosuid,nodev - fuse.qcowfs "
        b"/tmp/uni\\040t/%C3%A4\\040b.qcow2 rw,user_id=0,group_id=0\n")
    a, b = mounts.mounts(str(info))
    assert (a.mount_id, a.dev, a.root, a.mountpoint, a.fstype, a.source) == (
        36, "98:0", "/mnt1", "/mnt/parent dir", "ext3", "/dev/root")
    assert b.mountpoint == "/tmp/uni t/café mnt" and b.fstype == "fuse.qcowfs"
    assert mounts.fsname_decode(b.source) == "/tmp/uni t/ä b.qcow2"


@pytest.mark.parametrize("path", ["/srv/disk.qcow2", "/srv/ä b.qcow2", "/srv/100%.qcow2",
                                  "/srv/x,y\\z.qcow2", os.fsdecode(b"/srv/\xff\xfe.qcow2")])
def test_fsname_is_ascii_and_reversible(path: str):
    name = mounts.fsname(path)
    name.encode("ascii")
    assert mounts.fsname_decode(name) == path
    if path.isascii() and "%" not in path:
        assert name == path  # what df shows for an ordinary path: the path itself


# ---- for real ----------------------------------------------------------------------------

NAMES = [("ä b.qcow2", "café mnt"), ("x,y\\z ü.qcow2", "m,n\\o é")]


@pytest.mark.parametrize("image_name, mnt_name", NAMES, ids=["umlaut-space", "comma-backslash"])
def test_any_name_mounts_reads_refuses_twice_unmounts(tmp_path: Path, image_name: str, mnt_name: str):
    d = tmp_path / "dir ö"
    d.mkdir()
    img = d / image_name
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "16M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", str(img)], check=True,
                   capture_output=True)
    mnt = d / mnt_name
    mnt.mkdir()
    try:
        p = qcowfs("mount", img, mnt)
        assert p.returncode == 0, p.stderr
        assert is_mounted(mnt)
        with open(mnt / "disk.raw", "rb") as f:
            assert f.read(MiB) == b"\x5a" * MiB
        entry = mounts.find(mnt, mounts.FSTYPE)
        assert entry is not None and mounts.fsname_decode(entry.source) == str(img)
        # the already-mounted check sees it, in both command forms
        assert "already mounted" in one_line_error(qcowfs("mount", img, mnt, "--read-only"))
        assert "already mounted" in one_line_error(qcowfs(img, mnt, "-o", "ro"))
        pid = mounts.read_pid(entry.dev)
        assert pid is not None and mounts.alive(pid)
        p = qcowfs("umount", mnt)
        assert p.returncode == 0, p.stderr
        assert not is_mounted(mnt)
        assert not mounts.alive(pid)  # umount waited for the daemon
    finally:
        force_unmount(mnt)
    assert subprocess.run(["qemu-img", "check", "-q", str(img)]).returncode == 0


def test_umount_through_a_symlinked_parent(tmp_path: Path):
    """`qcowfs umount` finds the mount by the path the table shows (parents resolved)."""
    real = tmp_path / "réal"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    img = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "16M"], check=True)
    mnt = real / "mnt"
    mnt.mkdir()
    try:
        assert qcowfs("mount", img, tmp_path / "link" / "mnt", "-o", "ro").returncode == 0
        assert is_mounted(mnt) and is_mounted(tmp_path / "link" / "mnt")
        p = qcowfs("umount", tmp_path / "link" / "mnt")
        assert p.returncode == 0, p.stderr
        assert not is_mounted(mnt)
    finally:
        force_unmount(mnt)


FAIL_BEFORE_READY = r"""
import sys
import qcowfs.service.daemon
from qcowfs.cli.main import main

def broken(*args, **kw):
    raise ValueError("injected: something nobody expected")

qcowfs.service.daemon.build_tree = broken
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("fg", [False, True], ids=["daemon", "foreground"])
def test_unexpected_error_before_ready_is_one_line(tmp_path: Path, fg: bool):
    """Not a QcowError nor an OSError, before the FUSE mount exists: still one line
    with the reason (not "the daemon exited before the mount was ready")."""
    img = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "16M"], check=True)
    mnt = tmp_path / "mnt é"
    mnt.mkdir()
    try:
        p = subprocess.run([sys.executable, "-c", FAIL_BEFORE_READY, "mount", *(["-f"] if fg else []),
                            str(img), str(mnt)], capture_output=True, text=True, timeout=TIMEOUT)
        line = one_line_error(p)
        assert "injected: something nobody expected" in line and "ValueError" in line, line
        assert not is_mounted(mnt)
    finally:
        force_unmount(mnt)
