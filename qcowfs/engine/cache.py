"""LRU caches of metadata tables (L2 tables, refcount blocks) with dirty tracking.

Modelled on QEMU's Qcow2Cache: a cache may depend on another one, and its
dirty tables are only written once everything in the cache it depends on is
on disk (written and fsync'd). The L2 cache depends on the refcount cache,
so a new reference never reaches the disk before the refcount that covers it.
"""
from __future__ import annotations

from collections import OrderedDict
from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable, Generic, TypeVar

from ..host.hostfile import HostFile
from ..host.waiting import Event, Lock

T = TypeVar("T")


class TableCache(Generic[T]):
    """Cluster-sized tables keyed by host offset, decoded once, evicted LRU."""

    def __init__(self, name: str, file: HostFile, capacity: int,
                 load: Callable[[int], Awaitable[T]], encode: Callable[[T], bytes],
                 write: Callable[[int, bytes], None] | None = None) -> None:
        self.name = name
        self.file = file
        # How a dirty table reaches the file: the metadata owner's checked write.
        self._write = write or (lambda offset, data: file.write_sync(data, offset))
        self.capacity = max(4, capacity)
        self._load = load
        self._encode = encode
        self._tables: OrderedDict[int, T] = OrderedDict()
        self._dirty: set[int] = set()
        self._pins: dict[int, int] = {}
        self._loading: dict[int, Event] = {}
        self._flush_lock = Lock()
        self.depends_on: TableCache | None = None
        self.hits = self.misses = 0
        # Flushes that wrote tables, and how many of them an fsync covers.
        self.write_gen = self.synced_gen = 0

    @property
    def dirty(self) -> bool:
        return bool(self._dirty)

    def __len__(self) -> int:
        return len(self._tables)

    def __contains__(self, offset: int) -> bool:
        return offset in self._tables

    def peek(self, offset: int) -> T | None:
        """The table if cached (no I/O, no await): the hot path's first try."""
        table = self._tables.get(offset)
        if table is not None:
            self._tables.move_to_end(offset)
            self.hits += 1
        return table

    async def get(self, offset: int) -> T:
        table = self.peek(offset)
        if table is not None:
            return table
        while offset in self._loading:
            await self._loading[offset].wait()
            table = self.peek(offset)
            if table is not None:
                return table
        self.misses += 1
        done = self._loading[offset] = Event()
        try:
            table = await self._load(offset)
            self._tables[offset] = table
        finally:
            del self._loading[offset]
            done.set()
        # The table just loaded is what the caller wants: never the victim.
        self._pins[offset] = self._pins.get(offset, 0) + 1
        try:
            await self._evict()
        finally:
            self._unpin(offset)
        return table

    def _unpin(self, offset: int) -> None:
        n = self._pins[offset] - 1
        if n:
            self._pins[offset] = n
        else:
            del self._pins[offset]

    def put_new(self, offset: int, table: T, dirty: bool = True) -> None:
        """Insert a table we made (newly allocated): dirty unless already written."""
        self._tables[offset] = table
        self._tables.move_to_end(offset)
        if dirty:
            self._dirty.add(offset)

    def mark_dirty(self, offset: int) -> None:
        if offset not in self._tables:
            raise KeyError(f"{self.name} table at {offset:#x} is not cached")
        self._dirty.add(offset)

    def discard(self, offset: int) -> None:
        """Forget a table whose cluster was freed (its contents no longer matter)."""
        self._tables.pop(offset, None)
        self._dirty.discard(offset)

    def clear(self) -> None:
        self._tables.clear()
        self._dirty.clear()

    @asynccontextmanager
    async def pinned(self, offset: int) -> AsyncIterator[T]:
        """Hold a table in the cache across awaits (for read-modify-write)."""
        table = await self.get(offset)
        self._pins[offset] = self._pins.get(offset, 0) + 1
        try:
            yield table
        finally:
            self._unpin(offset)

    async def _evict(self) -> None:
        while len(self._tables) > self.capacity:
            victim = next((off for off in self._tables
                           if off not in self._dirty and off not in self._pins), None)
            if victim is None:
                if not self._dirty:
                    return  # everything pinned: grow past capacity for now
                await self.flush()
                continue
            del self._tables[victim]

    async def flush(self) -> None:
        """Write every dirty table, after the cache this one depends on is durable."""
        async with self._flush_lock:
            if not self._dirty:
                return
            dep = self.depends_on
            # The dependency must be written *and* fsync'd (also what an
            # eviction wrote earlier without a sync).
            while dep is not None and (dep.dirty or dep.write_gen > dep.synced_gen):
                await dep.flush()
                gen = dep.write_gen
                await dep.file.sync()
                dep.synced_gen = max(dep.synced_gen, gen)
            # No await from the check above to the end: nothing can dirty the
            # dependency again before these tables are written.
            for offset in sorted(self._dirty):
                self._write(offset, self._encode(self._tables[offset]))
                self._dirty.discard(offset)
            self.write_gen += 1
