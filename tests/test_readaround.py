"""Read-around: the windows pushed into the page cache around small reads,
and when they stop (qcowfs/readaround.py).

The policy alone, driven with a clock of its own (and, for what the room
does not show, a model of a page cache that drops its oldest pages); then
real mounts whose daemon and reader share a memory cgroup far smaller than
the disk, set before the mount or after it, where pushed windows cannot
stay and the daemon must stop reading whole windows for 4 KiB reads."""
from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

from conftest import daemon_pid, mounted, qemu_img, qemu_io, resident_pages

import pyfuse3
import pytest
import trio

from qcowfs.aio import Image
from qcowfs.fs.operations import Access, Operations
from qcowfs.fs.readaround import (BACKOFF_MAX, EPOCH_SECONDS, QUIET_EVERY, RACE_SECONDS, ROOM_PUSHES, ROOM_SECONDS,
                               ROOM_SHARE, SAMPLE_EVERY, ReadAround, page_cache_room)
from qcowfs.fs.views import build_tree

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


def _room(windows: int, window: int = WINDOW) -> Callable[[], int]:
    """A room() for pushes of WINDOWS windows (the policy uses a share of the room)."""
    return lambda: ROOM_SHARE * windows * window


PLENTY = _room(1 << 20)


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
    got = [_push(ra, 1, (10 + i) * WINDOW) for i in range(1000)]
    controls = [i for i, g in enumerate(got) if g is None]
    assert all(g == (10 + i) * WINDOW for i, g in enumerate(got) if g is not None)
    # One window in 2 * SAMPLE_EVERY is a control: not pushed, to see what pushes save.
    assert len(controls) == len(got) // (2 * SAMPLE_EVERY), controls
    assert ra.paying


def test_a_miss_soon_after_a_push_raced_it_later_is_pushed_again() -> None:
    clock = Clock()
    ra = _after_probe(ReadAround(WINDOW, clock, PLENTY))
    start = ra.miss(1, 0)
    assert start == 0
    ra.cancel(1, start)  # never queued
    assert ra.miss(1, 100) == 0 and ra.pushes == 1
    ra.done(1, 0)
    clock.now += RACE_SECONDS / 2
    assert ra.miss(1, 100) is None, "sent before the push landed"
    clock.now += RACE_SECONDS
    assert _push(ra, 1, 100) == 0, "lost after its push: pushed again while pushes pay"


def test_a_forgotten_file_starts_afresh() -> None:
    ra = _after_probe(ReadAround(WINDOW, Clock(), PLENTY))
    for i in range(4 * SAMPLE_EVERY):
        _push(ra, 5, i * WINDOW)
    assert ra._samples  # (white box: file 5's windows are followed)
    ra.forget(5)
    assert not ra._samples


PAGE = 4096


class Cache:
    """A model of the page cache over one file of WINDOWS windows of
    RA.window bytes: it holds CAPACITY pages and drops the oldest first. A
    reader reads pages at random; a page not held is a miss, told to RA,
    and the page (or the window RA pushes) is added."""

    def __init__(self, ra: ReadAround, clock: Clock, windows: int, capacity: int, seed: int) -> None:
        self.ra, self.clock, self.windows, self.capacity = ra, clock, windows, capacity
        self.per_window = ra.window // PAGE
        self.pages: dict[int, None] = {}
        self.rng = random.Random(seed)
        self.misses = 0

    def _add(self, page: int) -> None:
        self.pages.pop(page, None)
        self.pages[page] = None
        while len(self.pages) > self.capacity:
            del self.pages[next(iter(self.pages))]

    def read(self, seconds: float, rate: float) -> None:
        for _ in range(int(seconds * rate)):
            self.clock.now += 1 / rate
            page = self.rng.randrange(self.windows * self.per_window)
            if page in self.pages:
                continue
            self.misses += 1
            start = _push(self.ra, 1, page * PAGE, self.windows * self.ra.window)
            if start is None:
                self._add(page)
            else:
                first = start // PAGE
                for p in range(first, first + self.per_window):
                    self._add(p)


SMALL = 32 * KiB  # windows of 8 pages keep the model quick


def test_pushes_stop_when_the_cache_loses_them_before_the_reader_comes_back() -> None:
    """Pressure the room does not show: the cache keeps a quarter of what
    the reader reads at random (128 windows of 512, so a pushed window lives
    through 128 later pushes). The trials miss about as often as the
    controls: pushes stop within a few seconds. The rounds that ask again
    see a trial among few pushes kept longer, and say yes; the round that
    pushes says no, and the back-off doubles: over a minute, under one push
    for twenty misses."""
    clock = Clock()
    ra = _after_probe(ReadAround(SMALL, clock, _room(1 << 20, SMALL)))
    cache = Cache(ra, clock, 512, 128 * SMALL // PAGE, seed=1)
    cache.read(3, 5000)
    assert not ra.paying and ra.rounds >= 1, (ra.rounds, ra.pushes, ra.refaults)
    pushes, misses = ra.pushes, cache.misses
    cache.read(60, 5000)
    assert ra.pushes - pushes < (cache.misses - misses) / 20, (ra.pushes - pushes, cache.misses - misses)


def test_pushes_go_on_where_the_cache_holds_them_and_the_reader_drops_it_each_pass() -> None:
    """fio drops a file's page cache at the start of each pass over it: the
    trials miss once then, as every window does, and the controls many
    times: the pushes go on, and every pass ends with the file cached."""
    clock = Clock()
    ra = _after_probe(ReadAround(SMALL, clock, _room(1 << 20, SMALL)))
    cache = Cache(ra, clock, 256, 1 << 20, seed=2)
    for _ in range(6):
        cache.pages.clear()
        cache.read(1.5, 20000)
        assert ra.paying and len(cache.pages) > 0.95 * 256 * SMALL // PAGE, (ra.rounds, len(cache.pages))
    assert ra.rounds >= 1


def test_read_around_comes_back_when_the_cache_holds_the_reader_again() -> None:
    clock = Clock()
    ra = _after_probe(ReadAround(SMALL, clock, _room(1 << 20, SMALL)))
    cache = Cache(ra, clock, 512, 64 * SMALL // PAGE, seed=3)
    cache.read(10, 5000)
    assert not ra.paying
    cache.capacity = 1 << 20  # the pressure is gone: passes of a second, cache dropped before each
    for _ in range(int(BACKOFF_MAX) + 2):
        cache.pages.clear()
        cache.read(1, 5000)
        if ra.paying:
            break
    assert ra.paying, "a round after the back-off tells"
    pushes = ra.pushes
    cache.pages.clear()
    cache.read(1, 5000)
    assert ra.pushes - pushes > 400, "the windows missed in are pushed again"


def test_a_limit_set_after_the_mount_stops_pushes_within_a_second() -> None:
    clock = Clock()
    rooms = [_room(1 << 20)()]
    ra = _after_probe(ReadAround(WINDOW, clock, lambda: rooms[0]))
    got = [_push(ra, 1, i * WINDOW) for i in range(500)]
    assert sum(g is not None for g in got) > 450
    rooms[0] = _room(100)()
    clock.now += ROOM_SECONDS
    assert _push(ra, 1, 600 * WINDOW) is None and ra.over_room and ra.room_windows == 100
    rooms[0] = _room(1 << 20)()  # raised again: a new epoch at the next reading
    clock.now += ROOM_SECONDS
    assert ra.miss(0, 0) is None and not ra.over_room and ra.probe_left
    _after_probe(ra)
    assert _push(ra, 1, 700 * WINDOW) == 700 * WINDOW
    # A reader fast enough to push ROOM_PUSHES windows before ROOM_SECONDS
    # pass: the room is read again after that many pushes.
    rooms[0] = _room(100)()
    got = [_push(ra, 1, (1000 + i) * WINDOW) for i in range(2 * ROOM_PUSHES)]
    assert ra.over_room and sum(g is not None for g in got) <= ROOM_PUSHES


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
    room = [_room(100)()]
    ra = ReadAround(WINDOW, clock, lambda: room[0])
    assert ra.room_windows == 100
    while ra.probe_left:
        ra.miss(1, ra.probe_left % 8 * WINDOW)
    got = [_push(ra, 1, (8 + i) * WINDOW) for i in range(1000)]
    assert 100 - 8 - 100 // SAMPLE_EVERY <= sum(g is not None for g in got) <= 100 - 8 and ra.over_room
    room[0] = _room(5000)()
    clock.now += EPOCH_SECONDS
    assert ra.miss(0, 0) is None and ra.probe_left, "the first miss of an epoch starts its probe"
    _after_probe(ra)
    got = [_push(ra, 1, (2000 + i) * WINDOW) for i in range(1000)]
    assert sum(g is None for g in got) <= 1000 // SAMPLE_EVERY and ra.room_windows == 5000


async def _disk_handle(image: Image) -> tuple[Operations, ReadAround, int, int]:
    """In process, no mount: the filesystem of IMAGE with read-around, its
    policy, disk.raw's inode and a handle of it."""
    ops = Operations(build_tree(image), Access(os.getuid(), os.getgid()), read_around=WINDOW)
    assert ops.around is not None
    ctx = pyfuse3.RequestContext()
    ino = (await ops.lookup(pyfuse3.ROOT_INODE, b"disk.raw", ctx)).st_ino
    return ops, ops.around, ino, (await ops.open(ino, os.O_RDONLY, ctx)).fh


def test_a_quiet_policy_is_asked_at_every_few_hundredth_small_read_only(tmp_path: Path) -> None:
    """In process, no mount: the read path asks the policy at every small
    read of a file pushes could serve; once the reader outgrew the room,
    nothing is pushed until the clock brings a new epoch, and only every
    QUIET_EVERY-th read asks (a call per read was 2-4% of the daemon's CPU
    where nothing is pushed). O_DIRECT handles and large reads never ask."""
    img = tmp_path / "d.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "16M")
    qemu_io(img, "write -P 0x3c 0 16M")

    async def main() -> None:
        image = Image(img, "r")
        try:
            ops, policy, ino, fh = await _disk_handle(image)
            asked: list[int] = []
            miss = policy.miss
            policy.miss = lambda key, off, size=None: asked.append(off) or miss(key, off, size)  # type: ignore[method-assign]
            direct = (await ops.open(ino, os.O_RDONLY | os.O_DIRECT, pyfuse3.RequestContext())).fh

            async def reads(handle: int, n: int, size: int = 4096) -> int:
                asked.clear()
                for i in range(n):
                    assert await ops.read(handle, i * 4096 % (16 * MiB), size) == b"\x3c" * size
                return len(asked)

            assert await reads(fh, 100) == 100
            assert await reads(direct, 100) == 0 and await reads(fh, 100, 64 * KiB) == 0
            # A reader spanning a file far larger than the room: the probe sees no window twice.
            i = 0
            while not policy.over_room:
                assert policy.miss(7, i * WINDOW, 1 << 50) is None
                i += 1
            pushes = policy.pushes
            assert await reads(fh, 4 * QUIET_EVERY) == 4, "asked while quiet"
            assert policy.over_room and policy.pushes == pushes
        finally:
            await image.close()

    trio.run(main)


@pytest.mark.parametrize("held", [None, 1 << 20])
def test_a_compressed_cluster_is_pushed_with_the_bytes_its_read_inflated(held: int | None, tmp_path: Path,
                                                                         monkeypatch) -> None:
    """In process, no mount: a small read of a compressed cluster inflates it,
    and the window pushed around it carries those bytes, taken before the
    reply. The pushes wait here until 32 clusters were read (what the push
    queue holds), twice as many as the decompressed-cluster cache keeps (16
    of 64 KiB): none is inflated twice, and every push is QEMU's bytes of
    exactly that cluster (when the push read the cache only later, each
    evicted cluster was inflated again). With HELD, the bytes the queued
    pushes may hold: the first 16 clusters are held, the others read when
    their push comes, from the cache that still has them."""
    import qcowfs.engine.mapper as mapper_module
    import qcowfs.fs.operations as operations_module
    from qcowfs.fs.operations import READ_AROUND_QUEUE

    if held is not None:
        monkeypatch.setattr(operations_module, "READ_AROUND_HELD", held)

    from conftest import to_raw

    raw = tmp_path / "src.raw"
    rng = random.Random(5)
    raw.write_bytes(b"".join(bytes([rng.randrange(1, 256)]) * 200 + rng.randbytes(56) for _ in range(40 * 1024)))
    img = tmp_path / "z.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", raw, img)
    want = to_raw(img, tmp_path / "want.raw").read_bytes()
    assert mapper_module.DECOMPRESSED_BYTES // 65536 < READ_AROUND_QUEUE
    inflated: list[int] = []
    decompress = mapper_module.decompress_cluster
    monkeypatch.setattr(mapper_module, "decompress_cluster",
                        lambda *a: inflated.append(len(a[0])) or decompress(*a))
    pushed: list[tuple[int, bytes]] = []
    monkeypatch.setattr(pyfuse3, "notify_store", lambda ino, off, data: pushed.append((off, bytes(data))))

    async def main() -> None:
        image = Image(img, "r")
        try:
            ops, policy, _, fh = await _disk_handle(image)
            policy.miss = lambda key, off, size=None: off // WINDOW * WINDOW  # type: ignore[method-assign]
            clusters = [4 * i for i in range(READ_AROUND_QUEUE)]  # one a window: a window is one cluster
            for c in clusters:
                off = c * 65536 + 8192
                assert await ops.read(fh, off, 4096) == want[off:off + 4096]
            assert len(inflated) == len(clusters)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ops.push_worker)
                with trio.fail_after(60):
                    while len(pushed) < len(clusters):
                        await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
            assert len(inflated) == len(clusters), "a cluster was inflated again for its push"
            assert sorted(pushed) == [(c * 65536, want[c * 65536:(c + 1) * 65536]) for c in clusters]
        finally:
            await image.close()

    trio.run(main)


def test_the_room_is_the_daemons_memory_cgroup_limit() -> None:
    with memory_cgroup(64 * MiB) as cg:
        out = subprocess.run(
            [sys.executable, "-c", "from qcowfs.fs.readaround import page_cache_room; print(page_cache_room())"],
            check=True, capture_output=True, text=True, preexec_fn=cg.join).stdout
    assert int(out) == 64 * MiB
    assert page_cache_room() > 64 * MiB  # (this runner is in no such cgroup)


# ---- a mount in a memory cgroup ------------------------------------------------------------

class Cgroup:
    """A memory cgroup: `join` is a preexec function that moves the calling
    process into it, `limit` sets its limit (v2's memory.max, else v1's
    memory.limit_in_bytes)."""

    def __init__(self, d: Path, knob: str) -> None:
        self.dir, self._knob = d, knob
        self._procs = str(d / "cgroup.procs")

    def join(self) -> None:
        with open(self._procs, "w") as f:
            f.write(f"{os.getpid()}\n")

    def limit(self, nbytes: int) -> None:
        (self.dir / self._knob).write_text(f"{nbytes}\n")


@contextlib.contextmanager
def memory_cgroup(limit: int | None) -> Iterator[Cgroup]:
    """A memory cgroup of LIMIT bytes (None: no limit yet). Removed
    afterwards (its processes are gone by then)."""
    name = f"qcowfs-test-{os.getpid()}-{os.urandom(4).hex()}"
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        d, knob = Path("/sys/fs/cgroup") / name, "memory.max"
    else:
        d, knob = Path("/sys/fs/cgroup/memory") / name, "memory.limit_in_bytes"
    d.mkdir()
    try:
        cg = Cgroup(d, knob)
        if limit is not None:
            cg.limit(limit)
        yield cg
    finally:
        for p in (d / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(p), 9)
        # A killed process leaves its cgroup a moment later: until then the
        # directory cannot go (it once stayed behind, and a later test
        # process with the same pid found it there).
        deadline = time.monotonic() + 10
        while True:
            try:
                d.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


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


def _read_in(cg: Cgroup, disk: Path, pid: int, reads: int) -> float:
    """Bytes the daemon PID read per 4 KiB read of READS random reads of DISK
    by a reader in CG."""
    before = _bytes_read(pid)
    subprocess.run([sys.executable, "-c", READER, str(disk), str(reads)],
                   check=True, timeout=300, preexec_fn=cg.join)
    return (_bytes_read(pid) - before) / reads


def _random_disk(tmp_path: Path) -> Path:
    img = tmp_path / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "256M")
    qemu_io(img, "write -P 0x3c 0 256M")
    return img


def test_no_window_pushes_when_the_cache_cannot_keep_them(tmp_path: Path) -> None:
    """256 MiB of disk read at random by a reader whose cgroup (shared with
    the daemon, which itself uses some 40 MiB) holds 96 MiB: the daemon
    reads about what is asked for, not 64 times as much (read_around=0 is
    the floor, a push per miss the ceiling)."""
    with memory_cgroup(96 * MiB) as cg, \
            mounted(_random_disk(tmp_path), tmp_path / "mnt", preexec_fn=cg.join) as mnt:
        per_read = _read_in(cg, mnt / "disk.raw", daemon_pid(mnt), 20000)
    # The pushes stop once the misses span an eighth of the cgroup's 96 MiB:
    # 12 MiB of pushes, 0.6 KiB a read on top of the 4 KiB read.
    assert per_read < 6 * KiB, f"the daemon read {per_read / KiB:.1f} KiB per 4 KiB read"


def test_a_limit_set_while_mounted_stops_the_pushes(tmp_path: Path) -> None:
    """The same cgroup, limited only after the mount and after a first
    reader, which the pushes served (the cache held the disk): once the
    limit is there (the daemon reads the room every ROOM_SECONDS), the next
    reader costs the daemon about what it asks for again."""
    with memory_cgroup(None) as cg, \
            mounted(_random_disk(tmp_path), tmp_path / "mnt", preexec_fn=cg.join) as mnt:
        disk, pid = mnt / "disk.raw", daemon_pid(mnt)
        first = _read_in(cg, disk, pid, 3000)
        cg.limit(96 * MiB)
        time.sleep(ROOM_SECONDS)
        per_read = _read_in(cg, disk, pid, 20000)
    # Without pushes a read costs 4 KiB; with them 20-60 KiB here, the least
    # on a loaded machine (the full suite on 2 cores once gave 22.5).
    assert first > 12 * KiB, f"no pushes before the limit: {first / KiB:.1f} KiB per read"
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
