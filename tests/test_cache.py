"""Unit tests of qcowfs.engine.cache.TableCache on a real temporary file.

Tables here are small bytearrays at offsets that are multiples of TS; the
loader reads them from the file (after a checkpoint, so loads really await)
and the encoder is bytes().
"""
from __future__ import annotations

import pytest
import trio

from qcowfs.engine.cache import TableCache
from qcowfs.host.hostfile import HostFile

TS = 64          # table size in bytes
NTABLES = 32


def off(i: int) -> int:
    return i * TS


class Harness:
    """A host file, a log of loads/writes/syncs, and caches built over it."""

    def __init__(self, path, log: list | None = None, name: str = "f") -> None:
        with open(path, "wb") as f:
            f.write(b"".join(bytes([i]) * TS for i in range(NTABLES)))
        self.path = path
        self.file = HostFile(str(path), writable=True)
        self.log = log if log is not None else []
        self.name = name
        self.loads: list[int] = []
        orig_write, orig_sync = self.file.write_sync, self.file.sync

        def write_sync(data, offset):
            self.log.append(("write", self.name, offset))
            orig_write(data, offset)

        async def sync():
            self.log.append(("sync", self.name))
            await orig_sync()

        self.file.write_sync = write_sync
        self.file.sync = sync

    async def load(self, offset: int) -> bytearray:
        self.loads.append(offset)
        self.log.append(("load", self.name, offset))
        await trio.sleep(0)
        return bytearray(self.file.read_sync(offset, TS))

    def cache(self, capacity: int = 4, name: str | None = None) -> TableCache[bytearray]:
        return TableCache(name or self.name, self.file, capacity, self.load, bytes)

    def on_disk(self, offset: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(TS)

    def writes(self) -> list[int]:
        return [e[2] for e in self.log if e[0] == "write" and e[1] == self.name]


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path / "img")
    yield harness
    harness.file.close()


def cached(c: TableCache, *idx: int) -> list[bool]:
    return [off(i) in c for i in idx]


# ---- LRU ------------------------------------------------------------------

async def test_loads_table_and_counts_hits(h):
    c = h.cache()
    t = await c.get(off(3))
    assert t == bytearray([3]) * TS
    assert await c.get(off(3)) is t
    assert c.peek(off(3)) is t
    assert h.loads == [off(3)]
    assert (c.hits, c.misses) == (2, 1)
    assert c.peek(off(4)) is None
    assert not c.dirty


async def test_capacity_has_a_floor_of_four(h):
    assert h.cache(capacity=1).capacity == 4
    assert h.cache(capacity=9).capacity == 9


async def test_lru_eviction_order(h):
    c = h.cache(capacity=4)
    for i in range(4):
        await c.get(off(i))
    assert cached(c, 0, 1, 2, 3) == [True] * 4
    await c.get(off(0))              # 0 is now most recently used
    await c.get(off(4))              # evicts 1, the least recently used
    assert cached(c, 0, 1, 2, 3, 4) == [True, False, True, True, True]
    c.peek(off(2))                   # peek counts as a use too
    await c.get(off(5))              # evicts 3
    assert cached(c, 0, 1, 2, 3, 4, 5) == [True, False, True, False, True, True]
    await c.get(off(6))              # evicts 0
    assert cached(c, 0, 2, 4, 5, 6) == [False, True, True, True, True]
    assert len(c) == 4
    # An evicted table is loaded again on the next get.
    await c.get(off(1))
    assert h.loads == [off(i) for i in (0, 1, 2, 3, 4, 5, 6, 1)]


async def test_put_new_counts_as_recent_use(h):
    c = h.cache(capacity=4)
    for i in range(3):
        await c.get(off(i))
    c.put_new(off(10), bytearray(TS), dirty=False)
    await c.get(off(1))
    await c.get(off(11))             # evicts 0
    await c.get(off(12))             # evicts 2
    await c.get(off(13))             # evicts 10 (inserted after 0 and 2, before 1's use)
    assert cached(c, 0, 2, 10, 1, 11, 12, 13) == [False, False, False, True, True, True, True]


# ---- dirty tables and flush ------------------------------------------------------

async def test_dirty_tables_are_not_evicted_unflushed(h):
    c = h.cache(capacity=4)
    t = await c.get(off(0))
    t[:] = b"\xaa" * TS
    c.mark_dirty(off(0))
    new = bytearray(b"\xbb" * TS)
    c.put_new(off(20), new)
    assert c.dirty
    for i in range(1, 12):
        await c.get(off(i))
    # The dirty tables survived the pressure; clean ones were evicted LRU.
    assert c.peek(off(0)) is t and c.peek(off(20)) is new
    assert len(c) == 4
    assert cached(c, 10, 11) == [True, True]
    assert h.on_disk(off(0)) == bytes([0]) * TS
    assert h.on_disk(off(20)) == bytes([20]) * TS
    await c.flush()
    assert h.on_disk(off(0)) == b"\xaa" * TS
    assert h.on_disk(off(20)) == b"\xbb" * TS
    assert not c.dirty
    # Once clean, they are ordinary eviction victims (the peeks above made
    # them the most recently used: 10 and 11 go first).
    await c.get(off(12))
    await c.get(off(13))
    assert cached(c, 10, 11, 0, 20) == [False, False, True, True]
    await c.get(off(14))
    await c.get(off(15))
    assert cached(c, 0, 20) == [False, False]


async def test_flush_writes_dirty_tables_in_offset_order(h):
    c = h.cache(capacity=8)
    for i in (7, 2, 5):
        c.put_new(off(i), bytearray([0x80 + i]) * TS)
    t = await c.get(off(3))
    t[0] = 0xEE
    c.mark_dirty(off(3))
    await c.get(off(4))              # clean: never written
    await c.flush()
    assert h.writes() == [off(2), off(3), off(5), off(7)]
    for i in (2, 5, 7):
        assert h.on_disk(off(i)) == bytes([0x80 + i]) * TS
    assert h.on_disk(off(3)) == b"\xee" + bytes([3]) * (TS - 1)
    assert h.on_disk(off(4)) == bytes([4]) * TS
    assert not c.dirty
    # Nothing dirty: a second flush writes nothing.
    await c.flush()
    assert h.writes() == [off(2), off(3), off(5), off(7)]
    # A table changed again after a flush is written again, and only it.
    t[1] = 0xDD
    c.mark_dirty(off(3))
    await c.flush()
    assert h.writes() == [off(2), off(3), off(5), off(7), off(3)]
    assert h.on_disk(off(3))[:2] == b"\xee\xdd"


async def test_flush_writes_current_contents(h):
    c = h.cache()
    t = bytearray(TS)
    c.put_new(off(1), t)
    t[:4] = b"late"                  # changed after put_new, before flush
    await c.flush()
    assert h.on_disk(off(1)) == b"late" + bytes(TS - 4)


async def test_put_new_clean_is_not_written(h):
    c = h.cache()
    c.put_new(off(1), bytearray(b"\x11" * TS), dirty=False)
    assert not c.dirty
    await c.flush()
    assert h.writes() == []
    assert c.peek(off(1)) == b"\x11" * TS


async def test_mark_dirty_needs_a_cached_table(h):
    c = h.cache()
    with pytest.raises(KeyError):
        c.mark_dirty(off(1))
    assert not c.dirty


async def test_discard_and_clear_drop_dirty_state(h):
    c = h.cache()
    c.put_new(off(1), bytearray(b"\x11" * TS))
    c.put_new(off(2), bytearray(b"\x22" * TS))
    c.discard(off(1))
    c.discard(off(9))                # not cached: no error
    assert c.peek(off(1)) is None
    await c.flush()
    assert h.writes() == [off(2)]
    assert h.on_disk(off(1)) == bytes([1]) * TS
    c.put_new(off(3), bytearray(b"\x33" * TS))
    c.clear()
    assert not c.dirty and c.peek(off(2)) is None and c.peek(off(3)) is None
    await c.flush()
    assert h.writes() == [off(2)]


# ---- dependencies -----------------------------------------------------------------

@pytest.fixture
def pair(tmp_path):
    log: list = []
    ref = Harness(tmp_path / "refcounts", log, "ref")
    l2 = Harness(tmp_path / "l2", log, "l2")
    yield ref, l2, log
    ref.file.close()
    l2.file.close()


async def test_flush_flushes_and_syncs_dependency_first(pair):
    ref, l2, log = pair
    rc, lc = ref.cache(), l2.cache()
    lc.depends_on = rc
    lc.put_new(off(4), bytearray(b"L" * TS))
    lc.put_new(off(1), bytearray(b"l" * TS))
    rc.put_new(off(3), bytearray(b"R" * TS))
    rc.put_new(off(2), bytearray(b"r" * TS))
    await lc.flush()
    assert log == [("write", "ref", off(2)), ("write", "ref", off(3)), ("sync", "ref"),
                   ("write", "l2", off(1)), ("write", "l2", off(4))]
    assert not rc.dirty and not lc.dirty
    assert ref.on_disk(off(2)) == b"r" * TS and ref.on_disk(off(3)) == b"R" * TS
    assert l2.on_disk(off(1)) == b"l" * TS and l2.on_disk(off(4)) == b"L" * TS
    # The cache itself does not sync its own file: that is the caller's job.
    assert ("sync", "l2") not in log


async def test_flush_of_dependency_alone_does_not_touch_dependent(pair):
    ref, l2, log = pair
    rc, lc = ref.cache(), l2.cache()
    lc.depends_on = rc
    rc.put_new(off(1), bytearray(b"r" * TS))
    lc.put_new(off(1), bytearray(b"l" * TS))
    await rc.flush()
    assert log == [("write", "ref", off(1))]
    assert lc.dirty


async def test_flush_with_clean_dependency_does_not_sync_it(pair):
    ref, l2, log = pair
    rc, lc = ref.cache(), l2.cache()
    lc.depends_on = rc
    await rc.get(off(1))             # cached but clean
    lc.put_new(off(2), bytearray(b"l" * TS))
    await lc.flush()
    assert log == [("load", "ref", off(1)), ("write", "l2", off(2))]


async def test_dependency_chain_flushes_deepest_first(tmp_path):
    log: list = []
    hs = [Harness(tmp_path / n, log, n) for n in ("a", "b", "c")]
    a, b, c = (x.cache() for x in hs)
    c.depends_on, b.depends_on = b, a
    for i, cache in enumerate((a, b, c)):
        cache.put_new(off(i), bytearray(TS))
    await c.flush()
    assert log == [("write", "a", off(0)), ("sync", "a"), ("write", "b", off(1)), ("sync", "b"),
                   ("write", "c", off(2))]
    for x in hs:
        x.file.close()


async def test_dependency_dirtied_during_its_sync_is_flushed_again(pair):
    """While the dependency's file syncs (an await), another task dirties it
    again: the dependent's tables are still written only after that too."""
    ref, l2, log = pair
    rc, lc = ref.cache(), l2.cache()
    lc.depends_on = rc
    rc.put_new(off(1), bytearray(b"1" * TS))
    lc.put_new(off(1), bytearray(b"l" * TS))
    orig_sync = ref.file.sync
    first = True

    async def sync():
        nonlocal first
        await orig_sync()
        if first:
            first = False
            rc.put_new(off(2), bytearray(b"2" * TS))

    ref.file.sync = sync
    await lc.flush()
    assert log == [("write", "ref", off(1)), ("sync", "ref"), ("write", "ref", off(2)),
                   ("sync", "ref"), ("write", "l2", off(1))]


# ---- pinning ---------------------------------------------------------------------

async def test_pinned_keeps_table_across_eviction_pressure(h):
    c = h.cache(capacity=4)
    t0 = await c.get(off(0))
    async with c.pinned(off(0)) as t:
        assert t is t0
        for i in range(1, 12):
            await c.get(off(i))
        assert c.peek(off(0)) is t
        # Nested pins are counted.
        async with c.pinned(off(0)) as again:
            assert again is t
        for i in range(12, 20):
            await c.get(off(i))
        assert c.peek(off(0)) is t
        t[0] = 0x99
        c.mark_dirty(off(0))
    assert h.loads.count(off(0)) == 1
    assert c._pins == {}
    await c.flush()
    assert h.on_disk(off(0))[0] == 0x99
    # Unpinned and clean again: evictable like any other.
    for i in range(20, 25):
        await c.get(off(i))
    assert c.peek(off(0)) is None


async def test_pinned_loads_uncached_table_and_keeps_it(h):
    c = h.cache(capacity=4)
    async with c.pinned(off(5)) as t:
        assert t == bytes([5]) * TS
        for i in range(6, 14):
            await c.get(off(i))
        assert c.peek(off(5)) is t
    assert h.loads.count(off(5)) == 1


async def test_everything_pinned_grows_past_capacity(h):
    """With every cached table pinned, pinning one more must grow the cache,
    not evict the table it just loaded (before the pin is counted)."""
    c = h.cache(capacity=4)
    async with c.pinned(off(0)), c.pinned(off(1)), c.pinned(off(2)), c.pinned(off(3)):
        async with c.pinned(off(4)) as t4:
            # Nothing evictable: the cache grows rather than dropping a pin.
            assert all(cached(c, 0, 1, 2, 3, 4))
            assert c.peek(off(4)) is t4


async def test_pinned_table_stays_cached_when_all_others_are_dirty(h):
    """The read-modify-write pattern of refcount.change() and the writer:
    pin a table, change it, mark it dirty. With the cache full of dirty
    tables, the table just loaded must stay cached (dirty ones get flushed
    to make room), or the change is lost and mark_dirty() raises KeyError."""
    c = h.cache(capacity=4)
    for i in range(4):
        c.put_new(off(i), bytearray([0xD0 + i]) * TS)
    async with c.pinned(off(8)) as t:
        assert c.peek(off(8)) is t
        t[0] = 0x42
        c.mark_dirty(off(8))
    await c.flush()
    assert h.on_disk(off(8))[0] == 0x42
    for i in range(4):
        assert h.on_disk(off(i)) == bytes([0xD0 + i]) * TS


async def test_get_with_all_others_dirty_keeps_new_table(h):
    c = h.cache(capacity=4)
    for i in range(4):
        c.put_new(off(i), bytearray(TS))
    t = await c.get(off(8))
    assert c.peek(off(8)) is t
    assert await c.get(off(8)) is t
    assert h.loads == [off(8)]


# ---- concurrency -------------------------------------------------------------------

async def test_concurrent_get_of_same_offset_loads_once(h):
    c = h.cache()
    results = {}

    async def getter(name):
        results[name] = await c.get(off(7))

    async with trio.open_nursery() as n:
        n.start_soon(getter, "a")
        n.start_soon(getter, "b")
    assert h.loads == [off(7)]
    assert results["a"] is results["b"]
    assert results["a"] == bytes([7]) * TS
    assert c.misses == 1
    assert c._loading == {}


async def test_concurrent_get_of_different_offsets_load_in_parallel(h):
    c = h.cache()
    started = []
    release = trio.Event()

    async def load(offset):
        started.append(offset)
        await release.wait()
        return bytearray([offset // TS]) * TS

    c._load = load
    results = {}

    async def getter(i):
        results[i] = await c.get(off(i))

    async with trio.open_nursery() as n:
        for i in (1, 2, 1, 2):
            n.start_soon(getter, i)
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(started) == [off(1), off(2)]
        release.set()
    assert results[1] == bytes([1]) * TS and results[2] == bytes([2]) * TS
    assert sorted(started) == [off(1), off(2)]


async def test_failed_load_is_not_cached_and_waiter_retries(h):
    c = h.cache()
    calls = []

    async def load(offset):
        calls.append(offset)
        await trio.sleep(0)
        if len(calls) == 1:
            raise OSError("transient")
        return bytearray(b"\x77" * TS)

    c._load = load
    outcome = {}

    async def getter(name):
        try:
            outcome[name] = await c.get(off(1))
        except OSError as e:
            outcome[name] = e

    async with trio.open_nursery() as n:
        n.start_soon(getter, "first")
        n.start_soon(getter, "second")
    # Trio may start either task first: whichever loaded first got the error.
    errors = [v for v in outcome.values() if isinstance(v, OSError)]
    tables = [v for v in outcome.values() if not isinstance(v, OSError)]
    assert len(errors) == 1 and len(tables) == 1
    assert tables[0] == b"\x77" * TS
    assert calls == [off(1), off(1)]
    assert c._loading == {}
    assert c.peek(off(1)) is tables[0]


async def test_read_fast_path_keeps_hot_tables(tmp_path):
    """Mapper.read_cached_into (the per-request hot path) marks the L2 table it
    used as recently used: under read-mostly load the hottest table is never
    the one evicted (it once read the cache's dict directly)."""
    import subprocess

    from qcowfs.engine.image import Image, OpenOptions

    img = tmp_path / "many-l2.qcow2"
    # 4 KiB clusters: one L2 table covers 2 MiB; 12 tables, a cache of 4
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(img), "24M"],
                   check=True)
    cmds = [f"write -P {i + 1} {i * 2}M 4k" for i in range(12)]
    subprocess.run(["qemu-io", *sum((["-c", c] for c in cmds), []), str(img)], check=True, capture_output=True)
    image = Image(str(img), OpenOptions(read_only=True, l2_cache_bytes=4 * 4096))
    try:
        hot = image.active_l1
        assert await image.read(hot, 0, 4096) == b"\x01" * 4096   # loads table 0
        for i in range(1, 12):
            # a hit on the hot table through the fast path, then a miss elsewhere
            for _ in range(3):
                got = bytearray(4096)
                if image.mapper.read_cached_into(hot, memoryview(got), 0):
                    assert got == b"\x01" * 4096
            assert await image.read(hot, i * 2 * 1024 * 1024, 4096) == bytes([i + 1]) * 4096
        l2_of_hot = int(await hot.get(0)) & 0x00FFFFFFFFFFFE00
        assert l2_of_hot in image.l2_cache, "the hottest L2 table was evicted"
    finally:
        await image.close()
