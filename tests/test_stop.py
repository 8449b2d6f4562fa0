"""Stopping never loses data: SIGTERM to a daemon whose disk.raw carries a loop
device with a mounted ext4 that is being written.

What the issue reproduced: the daemon detached the busy FUSE mount, the loop
device's pending writes became I/O errors and the ext4 above was damaged.
Now: the signal flushes, the daemon says the loop device holds the mount and
keeps serving, the writer goes on without an error, and once the ext4 is
unmounted and the loop device detached the daemon unmounts and exits 0.
Then the image passes `qemu-img check`, the ext4 in it `e2fsck -fn`, and
every file the writer finished is there with its content.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import QCOWFS, force_unmount, is_mounted, loop_device, verify_tree
from qcowfs.host import mounts
from test_service import cleanup_mount, daemon_pids, foreground, qemu_img_check, sh

TIMEOUT = 60

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (losetup, mount)")

WRITER = r"""
import hashlib, os, random, sys
root, stop = sys.argv[1], sys.argv[2]
rng = random.Random(7)
i = 0
while not os.path.exists(stop):
    k = i % 150  # files are rewritten: the ext4 never fills up
    d = os.path.join(root, f"d{k % 7}")
    os.makedirs(d, exist_ok=True)
    data = rng.randbytes(rng.choice([4096, 65536, 300000, 1 << 20]))
    name = os.path.join(d, f"f{k}.bin")
    with open(name, "wb") as f:
        f.write(data)
    print(os.path.relpath(name, root), hashlib.sha256(data).hexdigest(), flush=True)
    i += 1
"""


@contextlib.contextmanager
def mounted_ext4(dev: str, where: Path) -> Iterator[Path]:
    where.mkdir(exist_ok=True)
    sh("mount", "-t", "ext4", dev, where)
    try:
        yield where
    finally:
        for _ in range(50):
            if not is_mounted(where) or subprocess.run(["umount", str(where)],
                                                       capture_output=True).returncode == 0:
                break
            time.sleep(0.1)


def wait_log(read, text: str, alive, timeout: float = TIMEOUT) -> str:
    deadline = time.monotonic() + timeout
    while text not in read():
        assert alive(), read()
        assert time.monotonic() < deadline, f"no '{text}' in the log after {timeout}s:\n{read()}"
        time.sleep(0.05)
    return read()


@pytest.mark.parametrize("mode", ["foreground", "daemon"])
def test_sigterm_under_a_loop_mounted_ext4_loses_nothing(tmp_path: Path, mode: str):
    img = tmp_path / "disk.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", img, "256M")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    logfile = tmp_path / "daemon.log"
    stop = tmp_path / "stop-writer"
    out = tmp_path / "writer.out"
    with contextlib.ExitStack() as stack:
        if mode == "foreground":
            fg = stack.enter_context(foreground(img, mnt, logdir=tmp_path))
            read_log, signal_daemon = fg.stderr, fg.proc.send_signal

            def daemon_alive() -> bool:
                return fg.proc.poll() is None

            def daemon_exit() -> int:
                return fg.proc.wait(TIMEOUT)
        else:
            stack.enter_context(cleanup_mount(mnt))
            sh(QCOWFS, "mount", img, mnt, "-o", f"log_file={logfile}")
            (pid,) = daemon_pids(mnt)
            read_log = logfile.read_text

            def signal_daemon(sig: int) -> None:
                os.kill(pid, sig)

            def daemon_alive() -> bool:
                return mounts.alive(pid)

            def daemon_exit() -> int:
                deadline = time.monotonic() + TIMEOUT
                while mounts.alive(pid):
                    assert time.monotonic() < deadline, read_log()
                    time.sleep(0.05)
                return 0 if "image closed cleanly" in read_log() else 1

        with loop_device(mnt / "disk.raw", read_only=False) as dev:
            sh("mkfs.ext4", "-q", "-F", dev)
            with mounted_ext4(dev, tmp_path / "ext4") as ext4:
                with open(out, "w") as o:
                    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(ext4), str(stop)], stdout=o)
                try:
                    deadline = time.monotonic() + TIMEOUT
                    while len(out.read_text().splitlines()) < 20:
                        assert writer.poll() is None and time.monotonic() < deadline
                        time.sleep(0.05)
                    signal_daemon(signal.SIGTERM)
                    log = wait_log(read_log, "is busy", daemon_alive)
                    busy = [line for line in log.splitlines() if "is busy" in line]
                    assert len(busy) == 1 and f"{dev} over disk.raw" in busy[0], busy
                    assert "flushed" in log
                    # still serving: the writer goes on, ext4 stays writable
                    n = len(out.read_text().splitlines())
                    time.sleep(2)
                    assert daemon_alive() and is_mounted(mnt)
                    assert writer.poll() is None
                    assert len(out.read_text().splitlines()) > n
                    stop.touch()
                    assert writer.wait(TIMEOUT) == 0
                finally:
                    stop.touch()
                    if writer.poll() is None:
                        writer.kill()
                        writer.wait()
                assert daemon_alive() and is_mounted(mnt)  # the loop device still holds it
        # ext4 unmounted, loop device detached: released; the daemon leaves by itself
        assert daemon_exit() == 0, read_log()
        assert not is_mounted(mnt)
        log = read_log()
        assert "released" in log and "Traceback" not in log and "I/O error" not in log, log
    force_unmount(mnt)
    qemu_img_check(img)
    raw = tmp_path / "disk.raw"
    sh("qemu-img", "convert", "-O", "raw", img, raw)
    fsck = sh("e2fsck", "-fn", raw, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    sums = dict(line.split() for line in out.read_text().splitlines())
    assert len(sums) >= 20
    check = tmp_path / "check"
    check.mkdir()
    with loop_device(raw, read_only=True) as dev:
        sh("mount", "-o", "ro,noload", dev, check)
        try:
            assert verify_tree(check, sums) == []
        finally:
            sh("umount", check)
