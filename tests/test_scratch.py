"""-o scratch: throwaway writes over a read-only image.

Every file of the mount takes writes into its own overlay; reads equal a
model of the writes over QEMU's view; the image's bytes never change, and
the overlay's temporary file has no name from the start (nothing is left
after unmount or a SIGKILL of the daemon).
"""
from __future__ import annotations

import errno
import hashlib
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import QCOWFS, force_unmount, loop_device, mounted, run, to_raw
from images import KiB, MiB, create, qio, sh
from qcowfs.host import mounts


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_image(d: Path) -> Path:
    """4 MiB of patterns, snapshot s1, then different data over part of it."""
    img = create(d / "a.qcow2", 8 * MiB, cluster_size=65536)
    qio(img, "write -P 0x11 0 4M", "write -P 0x5a 5M 300k")
    sh("qemu-img", "snapshot", "-c", "s1", img)
    qio(img, "write -P 0x22 64k 1M", "write -z 3M 512k")
    return img


def mount_scratch(img: Path, mnt: Path, *opts: str):
    return mounted(img, mnt, "-o", ",".join(("scratch", *opts)), read_only=False)


def read_all(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_random_writes_match_a_model(tmp_path: Path) -> None:
    img = make_image(tmp_path)
    before = sha256(img)
    disk_ref = bytearray(to_raw(img, tmp_path / "disk.ref").read_bytes())
    snap_ref = bytearray(to_raw(img, tmp_path / "snap.ref", "1").read_bytes())
    snap_orig = bytes(snap_ref)
    rng = random.Random(12)
    with mount_scratch(img, tmp_path / "m", f"scratch_dir={tmp_path}") as m:
        assert os.listdir(tmp_path / "m" / "snapshots") == ["s1.raw"]
        fd = os.open(m / "disk.raw", os.O_RDWR)
        try:
            for i in range(300):
                size = rng.choice([1, 511, 4096, 4097, rng.randint(1, 200 * KiB), 1 * MiB])
                off = rng.randrange(0, len(disk_ref) - size)
                if i % 7 == 0:
                    off -= off % 4096
                data = rng.randbytes(size)
                assert os.pwrite(fd, data, off) == size
                disk_ref[off : off + size] = data
                if i % 50 == 0:
                    n = rng.randint(1, 300 * KiB)
                    o = rng.randrange(0, len(disk_ref) - n)
                    assert os.pread(fd, n, o) == disk_ref[o : o + n]
        finally:
            os.close(fd)
        assert read_all(m / "disk.raw") == disk_ref
        # The snapshot file is its own: unchanged by disk.raw's writes, and its writes its own.
        assert read_all(m / "snapshots" / "s1.raw") == snap_orig
        with open(m / "snapshots" / "s1.raw", "r+b") as f:
            for _ in range(40):
                size = rng.randint(1, 70 * KiB)
                off = rng.randrange(0, len(snap_ref) - size)
                data = rng.randbytes(size)
                f.seek(off)
                f.write(data)
                snap_ref[off : off + size] = data
        assert read_all(m / "snapshots" / "s1.raw") == snap_ref
        assert read_all(m / "disk.raw") == disk_ref
        used = int(os.getxattr(m / "disk.raw", "user.qcow2.scratch_used"))
        total = int(os.getxattr(m / "disk.raw", "user.qcow2.scratch_mount_used"))
        assert 0 < used < total and total % 4096 == 0
        st = os.statvfs(m)
        assert (st.f_blocks - st.f_bfree) * st.f_frsize == total
        # Truncate is refused (sizes are fixed), with EROFS.
        with pytest.raises(OSError) as e:
            os.truncate(m / "disk.raw", 16 * MiB)
        assert e.value.errno == errno.EROFS
        # The bytes are never in a named file.
        assert sorted(os.listdir(tmp_path)) == sorted(["a.qcow2", "disk.ref", "snap.ref", "m"])
    assert sha256(img) == before
    with mounted(img, tmp_path / "m") as m:  # everything was thrown away
        assert read_all(m / "disk.raw") == (tmp_path / "disk.ref").read_bytes()


def test_enospc_at_the_limit(tmp_path: Path) -> None:
    img = make_image(tmp_path)
    with mount_scratch(img, tmp_path / "m", "scratch_size=64K") as m:
        assert os.getxattr(m / "disk.raw", "user.qcow2.scratch_size") == b"65536"
        st = os.statvfs(m)
        assert st.f_blocks * st.f_frsize == 64 * KiB and st.f_bfree == st.f_blocks
        fd = os.open(m / "disk.raw", os.O_RDWR)
        try:
            # 15 blocks in disk.raw (one write across a block boundary takes two).
            for b in range(13):
                os.pwrite(fd, b"A" * 4096, b * 8192)
            os.pwrite(fd, b"BB", 200 * 4096 - 1)
            with pytest.raises(OSError) as e:
                os.pwrite(fd, b"C" * 4096, 1 * MiB + 100)  # needs 2 blocks, 1 left: none taken
            assert e.value.errno == errno.ENOSPC
            with open(m / "snapshots" / "s1.raw", "r+b", buffering=0) as s:
                s.write(b"S" * 10)  # the last block, for another file
                with pytest.raises(OSError) as e:
                    s.write(b"T" * 4096)
                assert e.value.errno == errno.ENOSPC
            # Blocks already in the overlay still take writes.
            os.pwrite(fd, b"D" * 4096, 0)
            assert os.pread(fd, 4, 4094) == b"DD\x11\x11"
            assert os.pread(fd, 4, 200 * 4096 - 2) == b"\x22BB\x22"
            assert os.statvfs(m).f_bfree == 0
        finally:
            os.close(fd)
        assert int(os.getxattr(m / "disk.raw", "user.qcow2.scratch_mount_used")) == 64 * KiB
        assert int(os.getxattr(m / "snapshots" / "s1.raw", "user.qcow2.scratch_used")) == 4 * KiB


def daemon_of(mnt: Path) -> int:
    entry = mounts.find(str(mnt), mounts.FSTYPE)
    assert entry is not None
    pid = mounts.read_pid(entry.dev)
    assert pid is not None
    return pid


def test_overlay_has_no_name_and_dies_with_the_daemon(tmp_path: Path) -> None:
    img = make_image(tmp_path)
    before = sha256(img)
    sd = tmp_path / "scratch"
    sd.mkdir()
    mnt = tmp_path / "m"
    with mount_scratch(img, mnt, f"scratch_dir={sd}") as m:
        with open(m / "disk.raw", "r+b", buffering=0) as f:
            f.write(os.urandom(2 * MiB))
        pid = daemon_of(m)
        links = [os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")]
        held = [x for x in links if x.startswith(str(sd))]
        assert held and all(x.endswith("(deleted)") for x in held), links
        assert os.listdir(sd) == []
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            if not os.path.exists(f"/proc/{pid}"):
                break
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{pid}")
        force_unmount(mnt)
    assert os.listdir(sd) == []
    assert sha256(img) == before
    run("qemu-img", "check", img)


@pytest.mark.parametrize("opts,words", [
    (["scratch", "scratch_dir=/nonexistent/dir"], ["scratch_dir", "/nonexistent/dir", "does not exist"]),
    (["scratch", "scratch_dir=/sys"], ["scratch_dir", "/sys", "cannot hold"]),
    (["scratch", "ro"], ["scratch", "ro"]),
    (["scratch", "scratch_size=lots"], ["scratch_size", "lots"]),
    (["scratch_size=1G"], ["need -o scratch"]),
    (["force_share"], ["force_share", "read-only"]),
    (["force_share", "rw"], ["force_share", "read-only"]),
])
def test_bad_combinations_give_one_line(tmp_path: Path, opts: list[str], words: list[str]) -> None:
    img = make_image(tmp_path)
    before = sha256(img)
    mnt = tmp_path / "m"
    mnt.mkdir()
    p = subprocess.run([QCOWFS, "mount", str(img), str(mnt), "-o", ",".join(opts)],
                       capture_output=True, text=True, timeout=60)
    force_unmount(mnt)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert not mounts.is_mounted(mnt)
    assert sha256(img) == before


def test_rw_and_scratch_is_scratch(tmp_path: Path) -> None:
    """mount(8) passes rw by default: with scratch it still means throwaway writes."""
    img = make_image(tmp_path)
    before = sha256(img)
    with mounted(img, tmp_path / "m", "-o", "rw,scratch", read_only=False) as m:
        with open(m / "disk.raw", "r+b") as f:
            f.write(b"hello")
        assert read_all(m / "disk.raw")[:6] == b"hello\x11"
        # The image holds reader locks only: qemu-img may read it, not write it.
        assert subprocess.run(["qemu-img", "info", str(img)], capture_output=True).returncode == 0
        p = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write 0 512", str(img)],
                           capture_output=True, text=True)
        assert p.returncode != 0 or "lock" in (p.stdout + p.stderr).lower()
    assert sha256(img) == before


pytestmark_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for losetup/mount")


def fs_mount(dev: str, mnt: Path, *opts: str) -> None:
    mnt.mkdir(parents=True, exist_ok=True)
    sh("mount", *opts, dev, mnt)


def fs_umount(mnt: Path) -> None:
    for args in (["umount", str(mnt)], ["umount", "-l", str(mnt)]):
        if not mounts.is_mounted(mnt):
            return
        subprocess.run(args, capture_output=True, timeout=60)


@pytestmark_root
def test_ext4_with_a_dirty_journal_in_a_snapshot(tmp_path: Path) -> None:
    """A live snapshot of a mounted ext4 needs journal recovery: through
    scratch it mounts without noload, shows the synced files, and fsck -fy
    runs to the end; the image's bytes stay the same."""
    img = create(tmp_path / "vm.qcow2", 64 * MiB)
    files = {f"f{i}.bin": os.urandom(random.Random(i).randint(1, 300 * KiB)) for i in range(12)}
    fsdir = tmp_path / "fs"
    with mounted(img, tmp_path / "rw", read_only=False) as m:
        with loop_device(m / "disk.raw", read_only=False) as dev:
            sh("mkfs.ext4", "-q", "-F", dev)
            fs_mount(dev, fsdir)
            try:
                for name, data in files.items():
                    (fsdir / name).write_bytes(data)
                sh("sync")
                # Make the journal hold changes not yet in place: more writes, one more sync.
                (fsdir / "late.bin").write_bytes(b"L" * 100000)
                os.sync()
                run(QCOWFS, "snapshot", "create", m, "s1")
                (fsdir / "after.bin").write_bytes(b"A" * 5000)
            finally:
                fs_umount(fsdir)
    snap_raw = to_raw(img, tmp_path / "s1.ref", "1")
    dump = sh("dumpe2fs", "-h", snap_raw, check=False).stdout
    assert "needs_recovery" in dump, "the snapshot's ext4 should need journal recovery"
    snap_raw.unlink()
    before = sha256(img)
    with mount_scratch(img, tmp_path / "m") as m:
        with loop_device(m / "snapshots" / "s1.raw", read_only=False) as dev:
            fs_mount(dev, fsdir)  # no noload: the journal is replayed into the overlay
            try:
                for name, data in files.items():
                    assert (fsdir / name).read_bytes() == data, name
                assert (fsdir / "late.bin").read_bytes() == b"L" * 100000
                assert not (fsdir / "after.bin").exists()
            finally:
                fs_umount(fsdir)
        p = subprocess.run(["fsck.ext4", "-fy", str(m / "snapshots" / "s1.raw")],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode in (0, 1), p.stdout + p.stderr  # ran to the end
        assert int(os.getxattr(m / "snapshots" / "s1.raw", "user.qcow2.scratch_used")) > 0
        assert int(os.getxattr(m / "disk.raw", "user.qcow2.scratch_used")) == 0
    assert sha256(img) == before


def test_partition_files_write_into_the_disk_overlay(tmp_path: Path) -> None:
    """partitions/N of a scratch mount are windows of disk.raw's overlay."""
    rawfile = tmp_path / "p.raw"
    with open(rawfile, "wb") as f:
        f.truncate(16 * MiB)
    subprocess.run(["sfdisk", "-q", str(rawfile)], input="label: dos\n,4M,83\n,,83\n", text=True,
                   check=True, capture_output=True)
    img = tmp_path / "p.qcow2"
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", rawfile, img)
    before = sha256(img)
    with mount_scratch(img, tmp_path / "m") as m:
        part = m / "partitions" / "2"
        start = int(os.getxattr(part, "user.qcow2.partition.start"))
        with open(part, "r+b") as f:
            f.seek(5000)
            f.write(b"through the partition")
        with open(m / "disk.raw", "rb") as f:
            f.seek(start + 5000)
            assert f.read(21) == b"through the partition"
        assert int(os.getxattr(m / "disk.raw", "user.qcow2.scratch_used")) == 4096
    assert sha256(img) == before
