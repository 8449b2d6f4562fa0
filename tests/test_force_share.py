"""-o force_share: mounting an image that a live QEMU writer holds.

The writer is a real qemu-io process with the image open read-write (it
holds QEMU's write locks), allocating and freeing clusters while the mount
reads. Regions the writer does not touch must read exactly; nothing may
crash or hang; without the option the mount is refused naming it.
"""
from __future__ import annotations

import contextlib
import errno
import os
import random
import subprocess
import time
from pathlib import Path
from typing import Iterator

from conftest import QCOWFS, force_unmount, mounted, to_raw
from images import MiB, create, qio, sh
from qcowfs.host import mounts


@contextlib.contextmanager
def qemu_writer(img: Path) -> Iterator[subprocess.Popen]:
    """qemu-io holding IMG open for writing (commands on its stdin)."""
    out = open(img.parent / "qemu-io.log", "w")  # what it said, if it dies
    # (line-buffered, so that the log shows each answer as it comes)
    w = subprocess.Popen(["stdbuf", "-oL", "qemu-io", "-f", "qcow2", "--discard=unmap", str(img)], stdin=subprocess.PIPE,
                         stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 10
        # It holds its locks once it prompts for commands (asking qemu-img
        # instead would race its open for the locks).
        while "qemu-io>" not in (img.parent / "qemu-io.log").read_text():
            assert w.poll() is None, (img.parent / "qemu-io.log").read_text()
            assert time.monotonic() < deadline, "qemu-io did not start"
            time.sleep(0.05)
        yield w
    finally:
        with contextlib.suppress(OSError):
            w.stdin.write("quit\n")  # type: ignore[union-attr]
            w.stdin.close()  # type: ignore[union-attr]
        try:
            w.wait(timeout=20)
        except subprocess.TimeoutExpired:
            w.kill()
            w.wait()
        out.close()


def send(w: subprocess.Popen, *cmds: str) -> None:
    assert w.poll() is None, f"qemu-io exited ({w.returncode}): see qemu-io.log"
    w.stdin.write("".join(c + "\n" for c in cmds))  # type: ignore[union-attr]
    w.stdin.flush()  # type: ignore[union-attr]


def make_image(d: Path) -> Path:
    img = create(d / "vm.qcow2", 64 * MiB, cluster_size=65536)
    qio(img, "write -P 0x33 0 8M", "write -P 0x44 16M 4M")
    sh("qemu-img", "snapshot", "-c", "s1", img)
    qio(img, "write -P 0x45 16M 1M")
    return img


def test_refused_without_the_option(tmp_path: Path) -> None:
    img = make_image(tmp_path)
    mnt = tmp_path / "m"
    mnt.mkdir()
    with qemu_writer(img):
        p = subprocess.run([QCOWFS, "mount", str(img), str(mnt), "--read-only"], capture_output=True,
                           text=True, timeout=60)
        force_unmount(mnt)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "qemu-io" in lines[0] and "-o force_share" in lines[0], p.stderr


def test_live_writer(tmp_path: Path) -> None:
    img = make_image(tmp_path)
    head = to_raw(img, tmp_path / "ref").read_bytes()[: 8 * MiB]
    snap = to_raw(img, tmp_path / "snap", "1").read_bytes()
    mnt = tmp_path / "m"
    mnt.mkdir()
    rng = random.Random(5)
    with qemu_writer(img) as w:
        p = subprocess.run([QCOWFS, "mount", str(img), str(mnt), "-o", "ro,force_share"],
                           capture_output=True, text=True, timeout=60)
        try:
            assert p.returncode == 0, p.stderr
            lines = p.stderr.strip().splitlines()
            assert len(lines) == 1 and "warning" in lines[0] and "inconsistent" in lines[0], p.stderr
            touched_errors = 0
            fd = os.open(mnt / "disk.raw", os.O_RDONLY)
            sfd = os.open(mnt / "snapshots" / "s1.raw", os.O_RDONLY)
            try:
                end = time.monotonic() + 12
                i = 0
                while time.monotonic() < end:
                    i += 1
                    o = rng.randrange(16, 60) * MiB + rng.randrange(0, 4) * 65536
                    n = rng.choice([65536, 1 * MiB, 3 * MiB])
                    send(w, f"write -P {i % 200 + 1} {o} {n}" if i % 3 else f"discard {o} {n}")
                    if i % 10 == 0:
                        send(w, "flush")
                    a = rng.randrange(0, 8 * MiB - 4096)
                    k = rng.randint(1, min(1 * MiB, 8 * MiB - a))
                    assert os.pread(fd, k, a) == head[a : a + k], f"untouched region differs at {a}"
                    s = rng.randrange(0, len(snap) - 65536)
                    assert os.pread(sfd, 65536, s) == snap[s : s + 65536], f"snapshot differs at {s}"
                    try:
                        os.pread(fd, 1 * MiB, rng.randrange(16, 63) * MiB)
                    except OSError as e:  # the writer's region may be caught mid-change
                        assert e.errno == errno.EIO
                        touched_errors += 1
                    time.sleep(0.01)
                # What the writer flushed shows within the revalidation interval.
                # (timed from when qemu-io has done it: the read after the
                # flushes answers once every command before it ran; qemu-io
                # takes one line per wake-up of its stdin, so lines that
                # arrived together wait for the next: more flushes nudge it)
                send(w, "write -P 0xa5 40M 64k", "flush", "read -P 0xa5 40M 64k")
                log, done = img.parent / "qemu-io.log", "read 65536/65536 bytes at offset 41943040"
                busy = time.monotonic() + 120
                while done not in log.read_text():
                    assert time.monotonic() < busy, "qemu-io did not finish its writes"
                    send(w, "flush")
                    time.sleep(0.1)
                deadline = time.monotonic() + 10
                while os.pread(fd, 4, 40 * MiB) != b"\xa5" * 4:
                    assert time.monotonic() < deadline, "a flushed write never showed"
                    time.sleep(0.05)
                assert os.pread(fd, 8 * MiB, 0) == head
            finally:
                os.close(fd)
                os.close(sfd)
            assert touched_errors < i // 2
        finally:
            if mounts.is_mounted(mnt):
                subprocess.run([QCOWFS, "umount", str(mnt)], capture_output=True, timeout=60)
            force_unmount(mnt)
    sh("qemu-img", "check", img)


def test_force_share_with_scratch(tmp_path: Path) -> None:
    """The safe way to look into a running guest: force-shared, throwaway writes."""
    img = make_image(tmp_path)
    head = to_raw(img, tmp_path / "ref").read_bytes()[: 8 * MiB]
    with qemu_writer(img) as w:
        with mounted(img, tmp_path / "m", "-o", "scratch,force_share", read_only=False) as m:
            with open(m / "disk.raw", "r+b", buffering=0) as f:
                f.seek(4096)
                f.write(b"overlay")
                send(w, "write -P 0x12 20M 2M", "flush")
                f.seek(0)
                got = f.read(8 * MiB)
            assert got[4096:4103] == b"overlay"
            assert got[:4096] == head[:4096] and got[4103:] == head[4103:]
            assert int(os.getxattr(m / "disk.raw", "user.qcow2.scratch_used")) == 4096


def test_writer_resizing_stops_disk_reads(tmp_path: Path) -> None:
    """A resize by the writer changes the header: disk.raw reads fail with EIO
    from then on (its L1 table may have moved and been reused), snapshot reads
    go on, and the mount stays up."""
    img = make_image(tmp_path)
    snap = to_raw(img, tmp_path / "snap", "1").read_bytes()
    with qemu_writer(img) as w:
        with mounted(img, tmp_path / "m", "-o", "ro,force_share") as m:
            fd = os.open(m / "disk.raw", os.O_RDONLY)
            try:
                assert os.pread(fd, 4, 0) == b"\x33" * 4
                send(w, "truncate 128M", "flush")
                deadline = time.monotonic() + 10
                while True:
                    try:
                        os.pread(fd, 4, 0)
                    except OSError as e:
                        assert e.errno == errno.EIO
                        break
                    assert time.monotonic() < deadline, "reads went on after the resize"
                    time.sleep(0.05)
            finally:
                os.close(fd)
            assert (m / "snapshots" / "s1.raw").read_bytes() == snap
