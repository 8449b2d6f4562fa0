"""Cancellation of every change made through `qcowfs.aio`, at every await.

A trio program cancels what it started (a timeout, a nursery that fails, a
server that stops). A change that is cancelled must leave the image as if
it had not been asked for, or done whole, and clean in `qemu-img check`
after the image is closed: never a header that points past the end of the
file. (A snapshot create cancelled while its header update waited for its
fsync left the new header on disk, the refcount transaction then truncated
the file under it: 5 errors in qemu-img check.)

Each case runs the change once per point: a watcher task passes N
checkpoints, then cancels the change's scope; N grows until the change
finishes before the watcher gets there. Fsyncs run in worker threads, so
where a cancel lands also depends on them; the sweep covers each await
several times over.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
import trio

import qcowfs
import qcowfs.aio

MiB = 1 << 20

Change = Callable[[qcowfs.aio.Image], Awaitable[Any]]
CHANGES: dict[str, Change] = {
    "snapshot create": lambda im: im.create_snapshot("new"),
    "snapshot delete": lambda im: im.delete_snapshot("old"),
    "snapshot apply": lambda im: im.apply_snapshot("old"),  # (on an image without bitmaps, as QEMU)
    "bitmap add": lambda im: im.add_bitmap("b-new"),
    "bitmap remove": lambda im: im.remove_bitmap("b-old"),
    "bitmap merge": lambda im: im.merge_bitmaps("b-old", "b-off"),
    "checkpoint": lambda im: im.checkpoint("cp"),
    "resize": lambda im: im.resize(40 * MiB),
    "write": lambda im: im.disk.write(3 * MiB + 100, b"\x77" * (3 * MiB)),
    "zero": lambda im: im.disk.zero(0, 2 * MiB + 512, True),
}


def qemu(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    """4 KiB clusters (so a change allocates refcount blocks and tables),
    data, a snapshot; with an enabled and a disabled bitmap, and without
    (a snapshot is applied only to an image without bitmaps, as in QEMU)."""
    out = {}
    for bitmaps in (True, False):
        img = tmp_path_factory.mktemp("cancel") / "base.qcow2"
        qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", img, "32M")
        assert qemu("qemu-io", "-c", "write -P 0x11 0 4M", "-c", "write -P 0x12 8M 1M", img).returncode == 0
        assert qemu("qemu-img", "snapshot", "-c", "old", img).returncode == 0
        if bitmaps:
            assert qemu("qemu-img", "bitmap", "--add", img, "b-old").returncode == 0
            assert qemu("qemu-img", "bitmap", "--add", "--disable", img, "b-off").returncode == 0
        assert qemu("qemu-io", "-c", "write -P 0x13 1M 64k", img).returncode == 0
        out[bitmaps] = img
    return out


async def cancelled_after(change: Change, img: Path, checkpoints: int) -> bool:
    """Run CHANGE on IMG, cancelled once a watcher has passed CHECKPOINTS
    checkpoints; whether the change finished first."""
    finished = False
    async with qcowfs.aio.open(img, "r+") as image:
        await image.prepare()
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                async def watcher() -> None:
                    for _ in range(checkpoints):
                        await trio.lowlevel.checkpoint()
                    scope.cancel()

                nursery.start_soon(watcher)
                await change(image)
                finished = True
                nursery.cancel_scope.cancel()
    return finished


@pytest.mark.parametrize("name", list(CHANGES))
def test_a_cancelled_change_leaves_a_clean_image(tmp_path: Path, bases: dict[bool, Path], name: str) -> None:
    base = bases[name != "snapshot apply"]
    img = tmp_path / "disk.qcow2"
    finished, n = False, 0
    while not finished:
        assert n < 400, "the change never finished"
        shutil.copy(base, img)
        finished = trio.run(cancelled_after, CHANGES[name], img, n)
        p = qemu("qemu-img", "check", img)
        assert p.returncode == 0, f"cancelled after {n} checkpoints: {p.stdout}{p.stderr}"
        with qcowfs.open(img) as image:  # and it opens, and says what it holds
            names = [s.name for s in image.snapshots]
            assert names.count("old") in (0, 1) and names.count("new") in (0, 1), names
            if name == "write":  # whole or not at all, and the bitmap knows
                got = image.disk.pread(3 * MiB + 100, 3 * MiB)
                with qcowfs.open(base) as before:
                    old = before.disk.pread(3 * MiB + 100, 3 * MiB)
                assert got in (b"\x77" * (3 * MiB), old), f"cancelled after {n} checkpoints"
                dirty = [(e["offset"], e["offset"] + e["length"]) for e in image.dirty_extents("b-old")
                         if e["type"] == 1]
                written = got[0] == 0x77
                assert written == any(a <= 3 * MiB + 100 < b for a, b in dirty), (n, dirty)
        n += 1


def test_a_close_in_a_cancelled_scope_still_closes(tmp_path: Path, bases: dict[bool, Path]) -> None:
    """`async with qcowfs.aio.open(...)` left because a timeout cancelled
    its scope: the close runs whole (it flushed nothing: the writes it had
    acknowledged were lost, 4 clusters leaked, the bitmap stayed in-use)."""
    img = tmp_path / "disk.qcow2"
    shutil.copy(bases[True], img)

    async def main() -> None:
        with trio.move_on_after(30) as scope:
            async with qcowfs.aio.open(img, "r+") as image:
                await image.disk.write(5 * MiB, b"\x78" * 200000)
                scope.cancel()
                await trio.sleep(10)
        assert scope.cancelled_caught
    trio.run(main)
    p = qemu("qemu-img", "check", img)
    assert p.returncode == 0 and "leaked" not in p.stdout, p.stdout + p.stderr
    p = qemu("qemu-io", "-c", "read -P 0x78 5M 200000", img)
    assert p.returncode == 0 and "verification failed" not in p.stdout and "read 200000/200000" in p.stdout, p.stdout
    with qcowfs.open(img) as image:
        bitmap = next(b for b in image.bitmaps if b.name == "b-old")
        assert "in-use" not in bitmap.flags, bitmap


def test_cancelled_concurrent_changes(tmp_path: Path, bases: dict[bool, Path]) -> None:
    """Writes, zeros and a snapshot running together in one nursery,
    cancelled at a random moment (seeded): clean, no leak, whatever was
    cut off. (A flush cancelled while it held the pending refcount
    decreases aside lost them: leaked clusters, in 3 of 100 runs.)"""
    import random

    img = tmp_path / "disk.qcow2"

    async def run(seed: int) -> None:
        rng = random.Random(seed)
        async with qcowfs.aio.open(img, "r+") as image:
            disk = image.disk
            with trio.move_on_after(rng.uniform(0.001, 0.05)):
                async with trio.open_nursery() as nursery:
                    for k in range(20):
                        offset = rng.randrange(0, disk.size - 300000)
                        if k % 5 == 0:
                            nursery.start_soon(disk.zero, offset, rng.randrange(1, 300000))
                        elif k == 7:
                            nursery.start_soon(image.create_snapshot, "new")
                        else:
                            nursery.start_soon(disk.write, offset, bytes([k]) * rng.randrange(1, 300000))

    for seed in range(120):
        shutil.copy(bases[True], img)
        trio.run(run, seed)
        p = qemu("qemu-img", "check", img)
        assert p.returncode == 0, f"seed {seed}: {p.stdout}{p.stderr}"
