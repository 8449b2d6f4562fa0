"""Image locks as QEMU understands them, tested against real qemu-img / qemu-io processes."""
from __future__ import annotations

import fcntl
import hashlib
import os
import struct
import subprocess
import time
from pathlib import Path

import pytest

from conftest import QCOWFS
from images import MiB, create, qio
from test_write import assert_clean, in_proc_mounts, lazy_unmount, qcowfs_mount, sha_file

LOCK_WORDS = ("lock", "in use", "busy")


def q(*args: str | os.PathLike, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60, cwd=cwd)


def refused_for_lock(p: subprocess.CompletedProcess) -> bool:
    return p.returncode != 0 and "lock" in (p.stdout + p.stderr).lower()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    img = create(tmp_path / "disk.qcow2", 16 * MiB)
    qio(img, "write -P 0x61 0 1M")
    return img.resolve()


def test_rw_mount_locks_out_qemu_writers_and_readers(image: Path, tmp_path: Path) -> None:
    with qcowfs_mount(image, tmp_path / "mnt") as mnt:
        p = q("qemu-img", "info", image)
        assert refused_for_lock(p), f"qemu-img info on an image mounted rw: {p.returncode} {p.stderr}"
        p = q("qemu-img", "info", "-U", image)
        assert p.returncode == 0, p.stderr
        p = q("qemu-io", "-f", "qcow2", "-c", "write -P 0xee 0 4k", image)
        assert refused_for_lock(p), f"qemu-io write: {p.returncode} {p.stdout}{p.stderr}"
        p = q("qemu-img", "check", image)
        assert refused_for_lock(p), f"qemu-img check: {p.returncode} {p.stdout}{p.stderr}"
        p = q("qemu-img", "resize", image, "32M")
        assert refused_for_lock(p), f"qemu-img resize: {p.returncode} {p.stderr}"
        p = q("qemu-img", "snapshot", "-c", "x", image)
        assert refused_for_lock(p), f"qemu-img snapshot -c: {p.returncode} {p.stderr}"
        p = q("qemu-img", "check", "-r", "all", image)
        assert refused_for_lock(p), f"qemu-img check -r all: {p.returncode} {p.stderr}"
        # a force-shared reader still works and sees what the mount wrote
        fd = os.open(mnt / "disk.raw", os.O_RDWR)
        try:
            os.pwrite(fd, b"\x7e" * 4096, 8192)
            os.fsync(fd)
        finally:
            os.close(fd)
        p = q("qemu-io", "-r", "-U", "-f", "qcow2", "-c", "read -P 0x7e 8192 4k", image)
        assert p.returncode == 0 and "Pattern verification failed" not in p.stdout, p.stdout + p.stderr
        # a second qcowfs mount of the same image, read-write or read-only, is refused
        for extra in ((), ("--read-only",)):
            m2 = tmp_path / f"mnt2{len(extra)}"
            m2.mkdir()
            p = q(QCOWFS, "mount", image, m2, *extra)
            try:
                assert p.returncode != 0, f"second qcowfs mount {extra} of an image mounted rw succeeded"
                assert any(w in p.stderr.lower() for w in LOCK_WORDS), p.stderr
            finally:
                lazy_unmount(m2)
            assert not in_proc_mounts(m2)
        # the write got through untouched by the refused openers
    assert_clean(image)
    p = q("qemu-io", "-f", "qcow2", "-c", "read -P 0x7e 8192 4k", "-c", "read -P 0x61 0 8192", image)
    assert p.returncode == 0 and "Pattern verification failed" not in p.stdout, p.stdout


def test_ro_mount_lets_readers_in_keeps_writers_out(image: Path, tmp_path: Path) -> None:
    before = sha_file(image)
    with qcowfs_mount(image, tmp_path / "mnt", read_only=True):
        p = q("qemu-img", "info", image)
        assert p.returncode == 0, f"qemu-img info on a read-only mount: {p.stderr}"
        p = q("qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0x61 0 4k", image)
        assert p.returncode == 0 and "verification failed" not in p.stdout, p.stdout + p.stderr
        p = q("qemu-io", "-f", "qcow2", "-c", "write -P 0xee 0 4k", image)
        assert refused_for_lock(p), f"qemu-io write on a read-only mount: {p.returncode} {p.stdout}{p.stderr}"
        p = q("qemu-img", "resize", image, "32M")
        assert refused_for_lock(p), f"qemu-img resize on a read-only mount: {p.returncode} {p.stderr}"
        # a second read-only qcowfs mount is a second reader: allowed
        with qcowfs_mount(image, tmp_path / "mnt-b", read_only=True) as m2:
            assert (m2 / "disk.raw").stat().st_size == 16 * MiB
    assert sha_file(image) == before


def _byte_locked(image: Path, offset: int) -> bool:
    fd = os.open(image, os.O_RDONLY)
    try:
        res = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, struct.pack("hhxxxxqqixxxx", fcntl.F_WRLCK, 0, offset, 1, 0))
        return struct.unpack("hhxxxxqqixxxx", res)[0] != fcntl.F_UNLCK
    finally:
        os.close(fd)


def _hold(image: Path, *args: str) -> subprocess.Popen:
    """qemu-io with the image open, stdin kept open so it stays."""
    proc = subprocess.Popen(["qemu-io", "-f", "qcow2", *args, str(image)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        # QEMU's readers and writers all hold "consistent read": a shared OFD lock on byte 100
        if _byte_locked(image, 100):
            return proc
        assert proc.poll() is None, f"qemu-io exited: {proc.stderr.read()}"
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("qemu-io did not lock the image")


def _release(proc: subprocess.Popen) -> None:
    try:
        proc.communicate("quit\n", timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("holder", ["qemu-io-rw", "qemu-io-ro"])
@pytest.mark.parametrize("ro_mount", [False, True], ids=["rw-mount", "ro-mount"])
def test_mount_refused_while_qemu_holds_image(holder: str, ro_mount: bool, image: Path, tmp_path: Path) -> None:
    proc = _hold(image, *(["-r"] if holder == "qemu-io-ro" else []))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        args = [QCOWFS, "mount", str(image), str(mnt)] + (["--read-only"] if ro_mount else [])
        p = q(*args)
        mounted_now = in_proc_mounts(mnt)
        lazy_unmount(mnt)
        # qemu writer: shares neither write nor a consistent read with a new writer; a qemu reader
        # does not share write: only a read-only mount next to a qemu reader may succeed
        if holder == "qemu-io-ro" and ro_mount:
            assert p.returncode == 0, f"read-only mount next to a qemu reader refused: {p.stderr}"
            assert mounted_now
            subprocess.run([QCOWFS, "umount", str(mnt)], capture_output=True, timeout=60)
            return
        assert p.returncode != 0, f"qcowfs mount {'-r ' if ro_mount else ''}succeeded while {holder} holds the image"
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1, f"expected one line on stderr: {p.stderr!r}"
        assert any(w in lines[0].lower() for w in LOCK_WORDS), lines[0]
        assert "Traceback" not in p.stderr
        assert not mounted_now, "something was left mounted"
    finally:
        lazy_unmount(mnt)
        _release(proc)
    # the holder is gone: the mount works now
    with qcowfs_mount(image, tmp_path / "mnt2", read_only=ro_mount) as m:
        assert hashlib.sha256((m / "disk.raw").read_bytes()[:MiB]).digest() == hashlib.sha256(b"\x61" * MiB).digest()
