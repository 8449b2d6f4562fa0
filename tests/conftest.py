"""Shared fixtures: real images made by qemu-img, real FUSE mounts, real loop devices.

Every mount and loop device made here is undone in teardown, even when the
test fails.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from qcowfs.host import mounts

ROOT = Path(__file__).resolve().parent.parent
QCOWFS = str(Path(sys.executable).parent / "qcowfs")


def run(*args: str | os.PathLike, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run a command, capture its output as text."""
    return subprocess.run([str(a) for a in args], check=check, capture_output=True, text=True, **kw)


def qemu_img(*args: str | os.PathLike) -> str:
    return run("qemu-img", *args).stdout


def qemu_io(image: str | os.PathLike, *cmds: str, fmt: str = "qcow2") -> None:
    args: list[str] = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    run(*args, str(image))


def to_raw(image: Path, dest: Path, snapshot_id: str | None = None) -> Path:
    """QEMU's view of an image as a raw file: the oracle every read is compared with."""
    args = ["convert", "-O", "raw"]
    if snapshot_id is not None:
        args += ["-l", f"snapshot.id={snapshot_id}"]
    qemu_img(*args, image, dest)
    return dest


def files_equal(a: Path, b: Path, chunk: int = 4 << 20) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True


def is_mounted(path: Path) -> bool:
    """True for live mounts and for dead ones (daemon gone: mountpoint(1) fails on those)."""
    return mounts.is_mounted(path)


def force_unmount(path: Path) -> None:
    """Last-resort cleanup: never leave a mount behind (dead ones included)."""
    cmds = [["fusermount3", "-u", str(path)], ["fusermount3", "-uz", str(path)]] + [["umount", "-l", str(path)]] * 3
    for cmd in cmds:
        if not is_mounted(path):
            return
        subprocess.run(cmd, capture_output=True)
        time.sleep(0.1)


@contextlib.contextmanager
def mounted(image: Path, mnt: Path, *extra: str, read_only: bool = True,
            preexec_fn: Callable[[], None] | None = None) -> Iterator[Path]:
    """Mount IMAGE on MNT with qcowfs (daemonized), always unmount afterwards.
    PREEXEC_FN runs in the mount command before it starts (the daemon is its child)."""
    mnt.mkdir(parents=True, exist_ok=True)
    args = [QCOWFS, "mount", str(image), str(mnt), *extra]
    if read_only:
        args.append("--read-only")
    p = subprocess.run(args, capture_output=True, text=True, timeout=60, preexec_fn=preexec_fn)
    if p.returncode != 0:
        force_unmount(mnt)
        raise AssertionError(f"qcowfs mount failed ({p.returncode}): {p.stderr.strip()}")
    try:
        yield mnt
    finally:
        unmount_and_wait(mnt)


def unmount_and_wait(mnt: Path) -> None:
    """`qcowfs umount MNT`, which returns once the daemon has flushed and
    exited, so what follows sees the image whole and unlocked. A loop device
    just detached can hold disk.raw a moment longer ("busy"): try again for
    5 s, then `umount --force` (the daemon flushes, detaches and exits)."""
    for _ in range(50):
        if not is_mounted(mnt):
            return
        p = subprocess.run([QCOWFS, "umount", str(mnt)], capture_output=True, text=True, timeout=120)
        if p.returncode == 0:
            return
        print(f"qcowfs umount {mnt}: {p.stderr.strip()}", file=sys.stderr)  # (shown if the test fails)
        if "busy" not in p.stderr:
            break
        time.sleep(0.1)
    if is_mounted(mnt):
        subprocess.run([QCOWFS, "umount", "--force", str(mnt)], capture_output=True, timeout=120)
    force_unmount(mnt)


def daemon_pid(mnt: Path) -> int:
    """The qcowfs daemon serving MNT, as `qcowfs umount` finds it (its pid file)."""
    m = mounts.find(mnt, mounts.FSTYPE)
    assert m is not None, f"{mnt} is not a qcowfs mount"
    pid = mounts.read_pid(m.dev)
    assert pid is not None, f"no pid file for the daemon of {mnt}"
    return pid


def resident_pages(path: Path) -> int:
    """How many pages of PATH the kernel's page cache holds (fincore)."""
    out = subprocess.run(["fincore", "--raw", "--noheadings", "--output", "PAGES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


@contextlib.contextmanager
def fuse_server(args: list[str], mountpoint: Path) -> Iterator[subprocess.Popen]:
    """Run a FUSE server in the foreground (ARGS) until MOUNTPOINT is mounted;
    afterwards stop it (SIGTERM, then SIGKILL) and never leave the mount behind."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not is_mounted(mountpoint):
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, f"{args[0]} did not mount {mountpoint}"
            time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        force_unmount(mountpoint)


@contextlib.contextmanager
def loop_device(path: Path, read_only: bool = True, direct_io: bool = False) -> Iterator[str]:
    """Attach PATH to a loop device, always detach afterwards."""
    args = ["losetup", "--find", "--show"]
    if read_only:
        args.append("-r")
    if direct_io:
        args.append("--direct-io=on")
    dev = run(*args, str(path)).stdout.strip()
    try:
        yield dev
    finally:
        for _ in range(50):
            if subprocess.run(["losetup", "-d", dev], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)


@pytest.fixture
def mount(tmp_path: Path):
    """mount(image, *opts, read_only=True) -> mountpoint; unmounted at teardown."""
    stack = contextlib.ExitStack()
    counter = iter(range(1000))

    def _mount(image: Path, *extra: str, read_only: bool = True) -> Path:
        mnt = tmp_path / f"mnt{next(counter)}"
        return stack.enter_context(mounted(image, mnt, *extra, read_only=read_only))

    with stack:
        yield _mount


def verify_tree(root: Path, sums: dict[str, str]) -> list[str]:
    """Differences between the *.bin files under ROOT and their expected sha256 SUMS."""
    errors = []
    for rel, want in sums.items():
        p = root / rel
        try:
            got = hashlib.sha256(p.read_bytes()).hexdigest()
        except OSError as e:
            errors.append(f"{rel}: {e}")
            continue
        if got != want:
            errors.append(f"{rel}: sha256 {got} != {want}")
    found = {str(p.relative_to(root)) for p in root.rglob("*.bin")}
    if found != set(sums):
        errors.append(f"file set differs: extra {sorted(found - set(sums))}, missing {sorted(set(sums) - found)}")
    return errors
