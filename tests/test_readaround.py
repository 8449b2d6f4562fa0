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

from conftest import daemon_pid, mounted, qemu_img, qemu_io, resident_pages

from qcowfs.fs.readaround import (DECAY_SECONDS, EPOCH_SECONDS, RACE_SECONDS, RECENT_PUSHES, ROOM_SHARE,
                               ReadAround, page_cache_room)

KiB, MiB = 1 << 10, 1 << 20
WINDOW = 256 * KiB


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _push(ra: ReadAround, key: int, off: int, size: int | None = None) -> int | None:
    start = ra.miss(key, off, size)
    if start is not None:
        ra.done(key, start)
    return start


def _room(windows: int) -> Callable[[], int]:
    """A room() for pushes of WINDOWS windows (the policy uses a share of the room)."""
    return lambda: ROOM_SHARE * windows * WINDOW


PLENTY = _room(4096)


def _after_probe(ra: ReadAround) -> ReadAround:
    """RA past the probe of its epoch, told of a reader that fits (misses
    in one window of file 0, over and over)."""
    while ra.probe_left:
        assert ra.miss(0, 0) is None, "the probe pushes nothing"
    assert not ra.over_room
    return ra


def test_fresh_misses_push_their_window_once_in_flight() -> None:
    ra = _after_probe(ReadAround(WINDOW, Clock(), PLENTY))
    assert ra.miss(1, WINDOW + 5000) == WINDOW
    assert ra.miss(1, WINDOW + 9000) is None, "a window queued is pushed again"
    assert ra.miss(2, WINDOW + 9000) == WINDOW, "files are apart"
    ra.done(1, WINDOW)
    for i in range(1000):  # a cache that keeps every push: only fresh misses
        assert _push(ra, 1, (10 + i) * WINDOW) == (10 + i) * WINDOW
    assert ra.score == 0 and not ra.thrashing


def test_a_miss_soon_after_a_push_raced_it_later_is_a_loss_much_later_is_fresh() -> None:
    clock = Clock()
    ra = _after_probe(ReadAround(WINDOW, clock, PLENTY))
    fresh = ra.fresh
    start = ra.miss(1, 0)
    assert start == 0
    ra.cancel(1, start)  # never queued: a later miss there is fresh
    assert ra.miss(1, 100) == 0 and ra.re_misses == 0 and ra.pushes == 1
    ra.done(1, 0)  # failed or not, the kernel does not hold it now
    clock.now += RACE_SECONDS / 2
    assert ra.miss(1, 100) is None and ra.re_misses == 0, "sent before the push landed"
    clock.now += RACE_SECONDS
    assert _push(ra, 1, 100) == 0 and ra.re_misses == 1, "lost soon after its push"
    clock.now += RACE_SECONDS
    for i in range(RECENT_PUSHES):
        _push(ra, 1, (10 + i) * WINDOW)
    clock.now += RACE_SECONDS
    assert _push(ra, 1, 100) == 0 and ra.re_misses == 1 and ra.fresh == fresh + 3 + RECENT_PUSHES, \
        "a window the cache held while others came and let go is pushed again, no evidence"
    assert ra.miss(1, 100) is None and ra.re_misses == 1


def test_a_forgotten_file_starts_afresh() -> None:
    clock = Clock()
    ra = _after_probe(ReadAround(WINDOW, clock, PLENTY))
    fresh = ra.fresh
    _push(ra, 5, 0)
    clock.now += 0.5
    _push(ra, 5, 0)
    assert ra.re_misses == 1
    ra.forget(5)
    clock.now += 0.5
    _push(ra, 5, 0)
    assert ra.re_misses == 1 and ra.fresh == fresh + 2


def test_pushes_stop_when_the_cache_drops_them_and_probe_again() -> None:
    """A reader at random over 64 windows in a cache with room for 16 of
    them (a pressure the room does not show): misses soon land in windows
    among the last pushed, pushes stop within a few hundred misses, and the
    decay lets a few probes through a second: under one miss in ten."""
    clock = Clock()
    ra = _after_probe(ReadAround(WINDOW, clock, PLENTY))
    rng = random.Random(1)
    cache: list[int] = []  # the windows the page cache holds, oldest first
    pushes_before = misses_before = None
    for n in range(30000):
        clock.now = n * 0.0005  # 2k reads a second
        if n == 5000:
            assert ra.thrashing, (ra.score, ra.pushes, ra.re_misses)
            pushes_before, misses_before = ra.pushes, ra.fresh + ra.re_misses
        w = rng.randrange(64)
        if w in cache:
            continue  # a page-cache hit never reaches the daemon
        start = _push(ra, 7, w * WINDOW + rng.randrange(WINDOW), 64 * WINDOW)
        if start is not None:
            cache.append(w)
            del cache[:-16]
    assert pushes_before is not None and pushes_before < 1000, pushes_before
    assert misses_before is not None
    probes, misses = ra.pushes - pushes_before, ra.fresh + ra.re_misses - misses_before
    assert probes < misses / 10, (probes, misses)


def test_read_around_comes_back_when_the_reader_fits_again() -> None:
    clock = Clock()
    ra = _after_probe(ReadAround(WINDOW, clock, PLENTY))
    for i in range(100):  # windows 0..19, each lost a moment after its push
        clock.now += RACE_SECONDS / 10
        _push(ra, 1, (i % 20) * WINDOW)
    assert ra.thrashing and ra.miss(1, 0) is None
    # Stopped, misses anywhere are no evidence: only time lets probes through.
    for i in range(1000):
        assert ra.miss(1, (1000 + i) * WINDOW) is None
    clock.now += DECAY_SECONDS
    assert _push(ra, 1, 3 * WINDOW + 1) == 3 * WINDOW
    # The reader has moved to what the cache holds: its pushes stay.
    got = [_push(ra, 1, (5000 + i) * WINDOW) for i in range(1000)]
    assert all(g is not None for g in got) and not ra.thrashing and ra.score == 0


def test_a_cache_dropped_whole_after_a_while_is_pushed_again() -> None:
    """fio drops a file's page cache at the start of each pass over it: every
    window was pushed before, most of them many pushes before; the next pass
    is pushed again at once, as the first was, not taken for thrashing."""
    clock = Clock()
    ra = _after_probe(ReadAround(WINDOW, clock, PLENTY))
    rng = random.Random(2)
    for _ in range(3):  # passes of 4 s over 256 windows, cache dropped between them
        cache: set[int] = set()
        pushed = 0
        for n in range(40000):
            clock.now += 0.0001
            w = rng.randrange(256)
            if w not in cache and _push(ra, 1, w * WINDOW + rng.randrange(WINDOW)) is not None:
                cache.add(w)
                pushed += 1
        assert len(cache) == 256 and pushed == 256 and not ra.thrashing, (pushed, ra.score)
    assert ra.re_misses <= 3 * RECENT_PUSHES, "only the newest windows lost count"


def test_the_probe_pushes_nothing_for_a_reader_spanning_far_more_than_the_room() -> None:
    clock = Clock()
    ra = ReadAround(WINDOW, clock, _room(100))
    rng = random.Random(5)
    got = [_push(ra, 1, rng.randrange(4096) * WINDOW) for _ in range(1000)]
    assert ra.over_room and not any(got), "pushed for a reader of 40 rooms"
    # The next epoch reads the room again: now the reader fits (and the probe says so).
    ra = ReadAround(WINDOW, clock, _room(8192))
    got = [_push(ra, 1, rng.randrange(4096) * WINDOW) for _ in range(3000)]
    assert not ra.over_room and sum(g is not None for g in got) > 1000


def test_a_file_that_fits_the_room_is_pushed_to_at_once_and_takes_no_part_in_the_probe() -> None:
    ra = ReadAround(WINDOW, Clock(), _room(100))
    probe = ra.probe_left
    assert ra.miss(1, 5 * WINDOW, 100 * WINDOW) == 5 * WINDOW
    assert ra.probe_left == probe
    assert ra.miss(2, 5 * WINDOW, 101 * WINDOW) is None and ra.probe_left == probe - 1


def test_no_pushes_once_the_reader_outgrows_the_room_until_the_next_epoch() -> None:
    """A reader that passed the probe (its first misses repeat windows) but
    goes on to miss in more windows than a share of the room holds: the
    pushes stop after that many, though the cache (here) kept them all, and
    the next epoch reads the room again."""
    clock = Clock()
    rooms = [_room(100)(), _room(5000)()]
    ra = ReadAround(WINDOW, clock, lambda: rooms.pop(0))
    assert ra.room_windows == 100
    while ra.probe_left:
        ra.miss(1, ra.probe_left % 8 * WINDOW)
    got = [_push(ra, 1, (8 + i) * WINDOW) for i in range(1000)]
    assert sum(g is not None for g in got) == 100 - 8 and ra.over_room and not ra.thrashing
    clock.now += EPOCH_SECONDS
    assert ra.miss(0, 0) is None and ra.probe_left, "the first miss of an epoch starts its probe"
    _after_probe(ra)
    got = [_push(ra, 1, (2000 + i) * WINDOW) for i in range(1000)]
    assert all(g is not None for g in got) and ra.room_windows == 5000


def test_the_room_is_the_daemons_memory_cgroup_limit() -> None:
    with memory_cgroup(64 * MiB) as join:
        out = subprocess.run(
            [sys.executable, "-c", "from qcowfs.fs.readaround import page_cache_room; print(page_cache_room())"],
            check=True, capture_output=True, text=True, preexec_fn=join).stdout
    assert int(out) == 64 * MiB
    assert page_cache_room() > 64 * MiB  # (this runner is in no such cgroup)


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
    the daemon, which itself uses some 40 MiB) holds 96 MiB: the daemon
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
    # The pushes stop once the misses span an eighth of the cgroup's 96 MiB:
    # 12 MiB of pushes, 0.6 KiB a read on top of the 4 KiB read.
    assert per_read < 6 * KiB, f"the daemon read {per_read / KiB:.1f} KiB per 4 KiB read"


DROPPER = """
import os, random, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
rng = random.Random(4)
for p in range(2):
    for _ in range(int(sys.argv[2])):
        os.pread(fd, 4096, rng.randrange(size // 4096) * 4096)
    print(flush=True)  # (the test reads what the cache holds)
    sys.stdin.readline()
    if p == 0:
        time.sleep(float(sys.argv[3]))
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
"""


def test_a_reader_that_drops_the_cache_after_a_while_is_pushed_to_again(tmp_path: Path) -> None:
    """fio drops a file's page cache at the start of every pass over it. The
    windows pushed in the first pass then miss again, most of them many
    pushes after their own: the second pass is pushed to as the first was
    (the cache ends up holding the disk), not taken for thrashing (it would
    hold little more than the pages read)."""
    img = tmp_path / "d.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "64M")
    qemu_io(img, "write -P 0x3c 0 64M")
    pages, reads = 64 * MiB // 4096, 3000  # 3000 reads: 17 MiB of the 64 without pushes
    with mounted(img, tmp_path / "mnt") as mnt:
        disk = mnt / "disk.raw"
        reader = subprocess.Popen([sys.executable, "-c", DROPPER, str(disk), str(reads),
                                   str(10 * RACE_SECONDS)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            held = []
            for _ in range(2):
                assert reader.stdout is not None and reader.stdin is not None
                reader.stdout.readline()
                held.append(resident_pages(disk))
                reader.stdin.write("\n")
                reader.stdin.flush()
            assert reader.wait(timeout=60) == 0
        finally:
            reader.kill()
    assert all(h > pages * 3 // 4 for h in held), f"pages held after each pass: {held} of {pages}"
