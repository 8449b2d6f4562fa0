"""When to push the window around a small read into the kernel's page cache.

A small read that reaches the daemon missed the page cache: a random access.
Pushing the aligned window around it (FUSE notify_store) turns the next
reads near it into page-cache hits, which is what makes a small image read
at random fast once it has been read a little. But a push costs the daemon
the whole window (64 times a 4 KiB read at the default 256 KiB), and it pays
only if the page cache keeps the pages until they are read. When the reader
may use less page cache than it reads at random (a memory cgroup, an image
larger than memory) the pushed pages evict each other unread, and every
push is work thrown away.

So, as the kernel's own mmap read-around does (filemap.c's mmap_miss, which
stops read-around once faults outnumber page-cache hits), we watch the one
thing a FUSE daemon can see of the page cache: which reads still reach us.
Every pushed window is remembered (a bit per window and file). A miss in a
window pushed before is a *re-miss*: the cache dropped the push unread, or
it raced a push. A miss in a window never pushed is a *fresh* miss. `score`
goes up RE_MISS_WEIGHT for a re-miss and down 1 for a fresh miss; at
`THRASHING` pushes stop, and they start again once the score is down to
half of it. The score also halves every `DECAY_SECONDS`, so a stopped
read-around probes with a few pushes a second and comes back when the
reader turns to what the cache can hold (those pushes stay, their windows
stop missing, and fresh misses bring the score down). Windows queued or in
flight are not counted: a read racing its own push is no evidence.
"""
from __future__ import annotations

import time
from typing import Callable

# The score at which pushes stop (filemap.c's MMAP_LOTSAMISS is 100 faults;
# our windows are bigger than pages).
THRASHING = 64
# A re-miss weighs this many fresh misses: the score climbs once more than
# one miss in 8 lands in a window pushed before. That happens as soon as the
# cache is full and drops pushed windows unread; in a cache that holds what
# is pushed, re-misses are only reads that raced a push of long ago.
RE_MISS_WEIGHT = 7
# The score halves this often: while thrashing, a few probe pushes a second
# (until about (THRASHING / 2) / RE_MISS_WEIGHT of them missed again).
DECAY_SECONDS = 1.0


class ReadAround:
    """The push decisions for one mount, for windows of WINDOW bytes (a power
    of two). `miss` says which window to push around a small read that
    reached us; `done` that its push finished (or failed), `cancel` that it
    was never queued."""

    def __init__(self, window: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._shift = window.bit_length() - 1
        self._clock = clock
        self._pushed: dict[int, bytearray] = {}  # file key -> a bit per window pushed (size / window / 8 bytes at most)
        self._in_flight: set[tuple[int, int]] = set()
        self.score = 0
        self.thrashing = False  # from a score of THRASHING until it is down to half
        self._decayed = clock()
        # What happened, for logs and tests.
        self.pushes = self.fresh = self.re_misses = 0

    def miss(self, key: int, offset: int) -> int | None:
        """A small read of file KEY at OFFSET missed the page cache: the
        start of the window to push now, or None."""
        index = offset >> self._shift
        if (key, index) in self._in_flight:
            return None
        self._decay()
        if self.score <= THRASHING // 2:
            self.thrashing = False
        bits = self._pushed.setdefault(key, bytearray())
        byte, bit = index >> 3, 1 << (index & 7)
        if byte < len(bits) and bits[byte] & bit:
            self.re_misses += 1
            self.score = min(self.score + RE_MISS_WEIGHT, THRASHING)
        else:
            self.fresh += 1
            self.score = max(self.score - 1, 0)
        if self.score >= THRASHING:
            self.thrashing = True
        if self.thrashing:
            return None
        if byte >= len(bits):
            bits.extend(bytes(byte + 1 - len(bits)))
        bits[byte] |= bit
        self._in_flight.add((key, index))
        self.pushes += 1
        return index << self._shift

    def done(self, key: int, start: int) -> None:
        """The push of KEY's window at START is over. Whether the kernel
        took the pages or not (a push fails when memory is short), a later
        miss there counts as a re-miss: either way the cache does not hold it."""
        self._in_flight.discard((key, start >> self._shift))

    def cancel(self, key: int, start: int) -> None:
        """The push `miss` asked for was never queued: a later miss there is fresh."""
        index = start >> self._shift
        self._in_flight.discard((key, index))
        self.pushes -= 1
        self._pushed[key][index >> 3] &= ~(1 << (index & 7)) & 0xFF

    def forget(self, key: int) -> None:
        """File KEY is gone (a deleted snapshot): drop what was pushed of it."""
        self._pushed.pop(key, None)

    def _decay(self) -> None:
        now = self._clock()
        if now - self._decayed >= DECAY_SECONDS:
            periods = int((now - self._decayed) / DECAY_SECONDS)
            self.score >>= min(periods, 16)
            self._decayed += periods * DECAY_SECONDS
