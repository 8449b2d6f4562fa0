"""Several processes serving one read-only mount (-o workers=N,
service/workers.py): each one answers reads, together they read what QEMU
reads (disk, snapshot, partitions, compressed clusters), a worker killed
with kill -9 ends the connection with an error for its readers instead of a
hang, and an unmount or a stop signal to the whole group leaves no process."""
from __future__ import annotations

import concurrent.futures
import errno
import mmap
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import QCOWFS, daemon_pid, force_unmount, is_mounted, mounted, qemu_img, qemu_io, to_raw
from qcowfs.host import mounts

MiB = 1 << 20
CHUNK = 64 << 10


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def read_direct(path: Path, threads: int = 4) -> bytes:
    """The whole file in CHUNK-sized O_DIRECT reads, THREADS at a time (every
    read reaches the mount's processes: no page cache in between)."""
    size = path.stat().st_size
    out = bytearray(size)

    def part(k: int) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, CHUNK)  # (page-aligned, as O_DIRECT wants)
        try:
            for off in range(k * CHUNK, size, threads * CHUNK):
                n = os.preadv(fd, [buf], off)
                out[off : off + n] = buf[:n]
        finally:
            os.close(fd)
            buf.close()

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(part, range(threads)))
    return bytes(out)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A zlib-compressed image with an MBR table of two partitions and a
    snapshot that differs from the disk; (image, its raw disk, the snapshot's)."""
    d = tmp_path_factory.mktemp("workers")
    raw = d / "src.raw"
    raw.write_bytes(os.urandom(24 * MiB))
    subprocess.run(["sfdisk", "-q", str(raw)], input="label: dos\n,8M,83\n,,83\n", text=True, check=True,
                   capture_output=True)
    img = d / "img.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(img))
    qemu_img("snapshot", "-c", "s1", str(img))
    qemu_io(img, "write -P 0x5a 2M 3M", "write -z 12M 1M")
    return img, to_raw(img, d / "disk.raw"), to_raw(img, d / "s1.raw", "1")


def partition(raw: bytes, n: int) -> bytes:
    """Partition N of the test table (MBR: 1 MiB alignment, the first 8 MiB)."""
    return raw[MiB : 9 * MiB] if n == 1 else raw[9 * MiB :]


def log_lines(log: Path, pattern: str) -> list[re.Match[str]]:
    return [m for line in log.read_text().splitlines() if (m := re.search(pattern, line))]


def test_each_worker_serves_and_all_read_what_qemu_reads(image: tuple[Path, Path, Path], tmp_path: Path) -> None:
    img, disk_raw, snap_raw = image
    log = tmp_path / "log"
    mnt = tmp_path / "mnt"
    with mounted(img, mnt, "-o", f"workers=3,log_file={log}"):
        daemon = daemon_pid(mnt)
        workers = children(daemon)
        assert len(workers) == 2
        raw, snap = disk_raw.read_bytes(), snap_raw.read_bytes()
        assert read_direct(mnt / "disk.raw") == raw
        assert read_direct(mnt / "snapshots" / "s1.raw") == snap
        for n in (1, 2):
            assert read_direct(mnt / "partitions" / str(n)) == partition(raw, n)
            assert read_direct(mnt / "snapshot-partitions" / "s1" / str(n)) == partition(snap, n)
        # One open handle, asked by whichever process takes each request.
        fd = os.open(mnt / "disk.raw", os.O_RDONLY)
        try:
            for _ in range(100):
                assert os.lseek(fd, 0, os.SEEK_HOLE) == 12 * MiB
                assert os.lseek(fd, 12 * MiB, os.SEEK_DATA) == 13 * MiB
        finally:
            os.close(fd)
        subprocess.run([QCOWFS, "umount", str(mnt)], check=True, timeout=120)
        for pid in (daemon, *workers):
            assert not mounts.alive(pid)
    # Each process answered reads (what each logs at its end).
    served = {int(m[1]): int(m[2]) for m in log_lines(log, r"worker (\d+) served (\d+) reads")}
    assert sorted(served) == [1, 2] and min(served.values()) > 0, log.read_text()
    assert [int(m[1]) for m in log_lines(log, r"this process served (\d+) reads")][0] > 0
    assert log_lines(log, r"3 processes \(workers: pids (\d+) (\d+)\)")
    assert "image closed cleanly" in log.read_text()


READER = """
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)
buf = mmap.mmap(-1, 4096)
size = os.fstat(fd).st_size
n = 0
while True:
    try:
        os.preadv(fd, [buf], (n * 7919 * 4096) % size)
    except OSError as e:
        print("error", e.errno, flush=True)
        sys.exit(3)
    n += 1
    if n == 200:
        print("reading", flush=True)
"""


def test_a_killed_worker_ends_the_connection_instead_of_hanging_readers(
        image: tuple[Path, Path, Path], tmp_path: Path) -> None:
    img = image[0]
    log = tmp_path / "log"
    mnt = tmp_path / "mnt"
    with mounted(img, mnt, "-o", f"workers=2,log_file={log}"):
        daemon = daemon_pid(mnt)
        [worker] = children(daemon)
        readers = [subprocess.Popen([sys.executable, "-c", READER, str(mnt / "disk.raw")], stdout=subprocess.PIPE,
                                    text=True) for _ in range(3)]
        try:
            for r in readers:
                assert r.stdout is not None and r.stdout.readline() == "reading\n"
            os.kill(worker, signal.SIGKILL)
            for r in readers:
                assert r.wait(60) == 3  # an error, not a hang
                assert r.stdout is not None
                assert r.stdout.read().split() in (["error", str(errno.ECONNABORTED)],
                                                   ["error", str(errno.ENOTCONN)])
        finally:
            for r in readers:
                r.kill()
                r.wait()
        deadline = time.monotonic() + 60
        while (mounts.alive(daemon) or is_mounted(mnt)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not mounts.alive(daemon) and not is_mounted(mnt)
    assert log_lines(log, rf"worker 1 \(pid {worker}\) was killed by SIGKILL while serving .*: the requests "
                          r"it had read would never be answered; ending the FUSE connection"), log.read_text()


def test_stop_signals_are_the_daemons(image: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """SIGTERM to the whole process group (a systemd stop, a Ctrl-C in the
    foreground): the workers keep serving, the daemon unmounts, all exit."""
    img = image[0]
    log = tmp_path / "log"
    mnt = tmp_path / "mnt"
    with mounted(img, mnt, "-o", f"workers=3,log_file={log}"):
        daemon = daemon_pid(mnt)
        workers = children(daemon)
        os.killpg(os.getpgid(daemon), signal.SIGTERM)
        deadline = time.monotonic() + 60
        while any(mounts.alive(p) for p in (daemon, *workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(mounts.alive(p) for p in (daemon, *workers))
        assert not is_mounted(mnt)
    text = log.read_text()
    assert "image closed cleanly" in text and "killed" not in text, text


def test_how_many_processes(image: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """Read-only: one per CPU by default; writable: one, and workers= refused."""
    img = image[0]
    with mounted(img, tmp_path / "a") as mnt:
        assert len(children(daemon_pid(mnt))) == len(os.sched_getaffinity(0)) - 1
    with mounted(img, tmp_path / "b", "-o", "workers=1") as mnt:
        assert children(daemon_pid(mnt)) == []
    copy = tmp_path / "rw.qcow2"
    qemu_img("create", "-f", "qcow2", str(copy), "16M")
    with mounted(copy, tmp_path / "c", read_only=False) as mnt:
        assert children(daemon_pid(mnt)) == []
    (tmp_path / "d").mkdir()
    for extra, why in ((["-o", "workers=2"], "needs a read-only mount"),
                       (["-r", "-o", "workers=2,force_share"], "needs a read-only mount without force_share"),
                       (["-r", "-o", "workers=0"], "invalid value for option workers")):
        p = subprocess.run([QCOWFS, "mount", str(copy), str(tmp_path / "d"), *extra], capture_output=True,
                           text=True, timeout=60)
        force_unmount(tmp_path / "d")
        assert p.returncode != 0 and why in p.stderr and len(p.stderr.splitlines()) == 1, p.stderr
