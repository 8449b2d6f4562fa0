"""Read-around: the windows pushed into the page cache around small reads,
and when they stop (qcowfs/readaround.py).

The policy alone, driven with a clock of its own; then a real mount whose
daemon and reader share a memory cgroup far smaller than the disk, where
pushed windows cannot stay and the daemon must stop reading whole windows
for 4 KiB reads."""
from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

from conftest import daemon_pid, mounted, qemu_img, qemu_io

from qcowfs.readaround import DECAY_SECONDS, THRASHING, ReadAround

KiB, MiB = 1 << 10, 1 << 20
WINDOW = 256 * KiB


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _push(ra: ReadAround, key: int, off: int) -> int | None:
    start = ra.miss(key, off)
    if start is not None:
        ra.done(key, start)
    return start


def test_fresh_misses_push_their_window_once_in_flight() -> None:
    ra = ReadAround(WINDOW, Clock())
    assert ra.miss(1, WINDOW + 5000) == WINDOW
    assert ra.miss(1, WINDOW + 9000) is None, "a window queued is pushed again"
    assert ra.miss(2, WINDOW + 9000) == WINDOW, "files are apart"
    ra.done(1, WINDOW)
    for i in range(1000):  # a cache that keeps every push: only fresh misses
        assert _push(ra, 1, (10 + i) * WINDOW) == (10 + i) * WINDOW
    assert ra.score == 0 and not ra.thrashing


def test_a_push_never_queued_counts_as_never_pushed_one_that_failed_as_pushed() -> None:
    ra = ReadAround(WINDOW, Clock())
    start = ra.miss(1, 0)
    assert start == 0
    ra.cancel(1, start)
    assert ra.miss(1, 100) == 0 and ra.re_misses == 0 and ra.pushes == 1
    ra.done(1, 0)  # failed or not, the kernel does not hold it now: a re-miss
    assert ra.miss(1, 100) == 0 and ra.re_misses == 1


def test_a_forgotten_file_starts_afresh() -> None:
    ra = ReadAround(WINDOW, Clock())
    _push(ra, 5, 0)
    _push(ra, 5, 0)
    assert ra.re_misses == 1
    ra.forget(5)
    _push(ra, 5, 0)
    assert ra.re_misses == 1 and ra.fresh == 2


def test_pushes_stop_when_the_cache_drops_them_and_probe_again() -> None:
    """A reader at random over 1024 windows with room for 64 of them: misses
    soon land in windows pushed before, pushes stop within a few hundred
    misses, and the decay lets a few probes through a second, not more."""
    clock = Clock()
    ra = ReadAround(WINDOW, clock)
    rng = random.Random(1)
    cache: list[int] = []  # the windows the page cache holds, oldest first
    pushes_before = None
    for n in range(20000):
        clock.now = n * 0.0001  # 10k reads a second
        w = rng.randrange(1024)
        if w in cache:
            continue  # a page-cache hit never reaches the daemon
        start = _push(ra, 7, w * WINDOW + rng.randrange(WINDOW))
        if start is not None:
            cache.append(w)
            del cache[:-64]
        if n == 2000:
            assert ra.thrashing, (ra.score, ra.pushes, ra.re_misses)
            pushes_before = ra.pushes
    assert pushes_before is not None and pushes_before < 600, pushes_before
    probes = ra.pushes - pushes_before
    seconds = 18000 * 0.0001
    assert probes <= 2 * (seconds / DECAY_SECONDS + 1) * THRASHING // 2, probes


def test_read_around_comes_back_when_the_reader_fits_again() -> None:
    clock = Clock()
    ra = ReadAround(WINDOW, clock)
    for i in range(200):  # thrash on windows 0..9
        _push(ra, 1, (i % 10) * WINDOW)
    assert ra.thrashing
    # The reader moves to a new region: fresh misses, pushes start again.
    got = [_push(ra, 1, (1000 + i) * WINDOW) for i in range(THRASHING)]
    assert got[-1] == (1000 + THRASHING - 1) * WINDOW and not ra.thrashing
    # And without fresh misses, time alone lets probes through.
    for i in range(200):
        _push(ra, 1, (i % 10) * WINDOW)
    assert ra.thrashing and ra.miss(1, 0) is None
    clock.now += DECAY_SECONDS
    assert ra.miss(1, 3 * WINDOW) == 3 * WINDOW


# ---- a mount in a memory cgroup ------------------------------------------------------------

@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[Callable[[], None]]:
    """A memory cgroup of LIMIT bytes (v2's memory.max, else v1's
    memory.limit_in_bytes); yields a preexec function that moves the calling
    process into it. Removed afterwards (its processes are gone by then)."""
    name = f"qcowfs-test-{os.getpid()}"
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        d, knob = Path("/sys/fs/cgroup") / name, "memory.max"
    else:
        d, knob = Path("/sys/fs/cgroup/memory") / name, "memory.limit_in_bytes"
    d.mkdir()
    try:
        (d / knob).write_text(f"{limit}\n")
        procs = str(d / "cgroup.procs")

        def join() -> None:
            with open(procs, "w") as f:
                f.write(f"{os.getpid()}\n")

        yield join
    finally:
        for p in (d / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(p), 9)
        with contextlib.suppress(OSError):
            d.rmdir()


READER = """
import os, random, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
rng = random.Random(3)
for _ in range(int(sys.argv[2])):
    os.pread(fd, 4096, rng.randrange(size // 4096) * 4096)
"""


def _bytes_read(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/PID/io")


def test_no_window_pushes_when_the_cache_cannot_keep_them(tmp_path: Path) -> None:
    """256 MiB of disk read at random by a reader whose cgroup (shared with
    the daemon, which itself uses some 40 MiB) holds 96 MiB: after the first pushes the daemon
    reads about what is asked for, not 64 times as much (read_around=0 is
    the floor, a push per miss the ceiling)."""
    img = tmp_path / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "256M")
    qemu_io(img, "write -P 0x3c 0 256M")
    reads = 20000
    with memory_cgroup(96 * MiB) as join, \
            mounted(img, tmp_path / "mnt", preexec_fn=join) as mnt:
        pid = daemon_pid(mnt)
        before = _bytes_read(pid)
        subprocess.run([sys.executable, "-c", READER, str(mnt / "disk.raw"), str(reads)],
                       check=True, timeout=300, preexec_fn=join)
        per_read = (_bytes_read(pid) - before) / reads
    # A push per miss reads 256 KiB; the first pushes (before the re-misses
    # show) are bounded by the 1024 windows of the disk: 12 KiB a read.
    assert per_read < 32 * KiB, f"the daemon read {per_read / KiB:.0f} KiB per 4 KiB read"
