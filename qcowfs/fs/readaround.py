"""When to push the window around a small read into the kernel's page cache.

A small read that reaches the daemon missed the page cache: a random access.
Pushing the aligned window around it (FUSE notify_store) turns the next
reads near it into page-cache hits, which is what makes a small image read
at random fast once it has been read a little. But a push costs the daemon
the whole window (64 times a 4 KiB read at the default 256 KiB), and it pays
only if the page cache keeps the pages until they are read. A push does not
raise the share of reads the cache can serve (that is the cache's size over
what the reader reads); it only fills the cache sooner. So it pays when
what the reader reads fits the cache, and is work thrown away when it does
not: the pushed pages evict each other (and the reader's own) unread.

Two checks, each against something the daemon can see:

* **Room.** The pages a push stores are charged to the daemon's memory
  cgroup, so what the pushes can keep is bounded by that cgroup's limit (and
  by the memory the machine has free). `room()` reads both, every
  `EPOCH_SECONDS`. Within an epoch, the windows the small reads missed in
  are counted (all files together); once they are more than an eighth of
  the room (`ROOM_SHARE`), the reader's working set will not stay cached
  beside everything else, and pushes stop until the next epoch. That
  decides a reader of an image larger than its memory cgroup within a few
  hundred misses, for a few MiB of pushes, instead of after thousands of
  pushes; the share is small because until the cache is full, pushes that
  will be thrown away look the same as pushes that will be read.
  Before the first push of an epoch a probe tells most such readers at
  once, for no push at all: K misses land in about K^2 / 2N windows missed
  before when the reader spans N windows (the birthday paradox). With
  K = 4 sqrt(R) for a room of R windows, a reader that fits (N <= R) shows
  8 such repeats or more, one spanning 32 rooms 0.25; under PROBE_REPEATS
  the epoch pushes nothing. Readers in between are left to the count. A
  file no larger than the room share fits whatever its reader does: its
  misses are pushed at once and take no part in the probe.

* **Thrashing**, for pressure the room does not show (other processes, a
  reclaim daemon). As the kernel's own mmap read-around does (filemap.c's
  mmap_miss), we watch which reads still reach us. A miss in one of the
  last `RECENT_PUSHES` windows pushed is a *re-miss*: the cache could not
  keep even that much of what we pushed (the kernel's workingset code calls
  it a short refault distance, counted here in pushes). A miss anywhere
  else is *fresh*, including one in a window pushed longer ago: the cache
  held it while others came, and then let it go, or the reader dropped the
  file's cache itself, as fio does at the start of every pass. That is
  worth pushing again; and since a drop loses the newest windows too, but
  only RECENT_PUSHES of the many that miss afterwards are recent, a drop
  does not look like thrashing unless the file is small. `score` goes up
  RE_MISS_WEIGHT for a re-miss and down 1 for a fresh one; at `THRASHING`
  pushes stop, and they start again once the score is down to half of it.
  While pushes are stopped every miss is fresh by construction, so only
  time brings the score down: it halves every `DECAY_SECONDS`, and a
  stopped read-around probes with a few pushes a second. (Age in seconds
  would not do: fio at 200k IOPS drops its file's cache every 1.3 s.)
  Moderate pressure the room does not show, a cache that keeps more than
  RECENT_PUSHES windows but less than the reader needs, is not caught:
  pushes go on there as they did before this policy.

A miss less than `RACE_SECONDS` after its window's push landed (or while the
push is queued or in flight) is a read that raced the push, the kernel sent
it before the pages were there: no evidence, and nothing to push.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

# The score at which pushes stop (filemap.c's MMAP_LOTSAMISS is 100 faults;
# our windows are bigger than pages).
THRASHING = 64
# A re-miss weighs this many fresh misses: the score climbs once more than
# one miss in 4 lands in one of the last RECENT_PUSHES windows pushed.
RE_MISS_WEIGHT = 3
# The score halves this often: while thrashing, a few probe pushes a second
# (until about (THRASHING / 2) / RE_MISS_WEIGHT of them missed again).
DECAY_SECONDS = 1.0
# A window lost before this many later pushes landed (8 MiB at the default
# window) was dropped by a cache that cannot keep what we push: thrashing.
RECENT_PUSHES = 32
# A miss this soon after its window's push landed was sent before it landed
# (it waited behind the push in the daemon's queue).
RACE_SECONDS = 0.01
# How often the room is read again and the working set counted afresh: a
# reader larger than the room costs 1/ROOM_SHARE of it in pushes each epoch.
EPOCH_SECONDS = 30.0
# The share of the room the pushed windows may fill: the rest is the
# reader's own pages, the daemon's, everything else in the cgroup.
ROOM_SHARE = 8
# The probe at the start of an epoch: PROBE_FACTOR * sqrt(room windows)
# misses, none pushed; fewer than PROBE_REPEATS of them in a window missed
# before means the reader spans far more windows than the room.
PROBE_FACTOR = 4
PROBE_REPEATS = 4
_KEY_SHIFT = 40  # window indexes below 2**40


def page_cache_room() -> int:
    """The bytes of page cache the daemon's pushes could hold: the machine's
    available memory, and no more than the limit of any memory cgroup the
    daemon is in (v2 memory.max, v1 memory.limit_in_bytes, the cgroup's and
    its parents')."""
    room = _meminfo_available()
    for limit in _cgroup_limits():
        room = min(room, limit)
    return room


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def _cgroup_limits() -> list[int]:
    """The memory limits on the path of the daemon's memory cgroup."""
    limits: list[int] = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return limits
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one hierarchy
            root, knob = Path("/sys/fs/cgroup"), "memory.max"
        elif "memory" in controllers.split(","):
            root, knob = Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"
        else:
            continue
        d = root / path.lstrip("/")
        while True:
            try:
                text = (d / knob).read_text().strip()
            except OSError:
                text = "max"
            if text.isdigit():
                limits.append(int(text))
            if d == root or root not in d.parents:
                break
            d = d.parent
    return limits


class ReadAround:
    """The push decisions for one mount, for windows of WINDOW bytes (a power
    of two). `miss` says which window to push around a small read that
    reached us; `done` that its push finished (or failed), `cancel` that it
    was never queued."""

    def __init__(self, window: int, clock: Callable[[], float] = time.monotonic,
                 room: Callable[[], int] = page_cache_room) -> None:
        self.window = window
        self._shift = window.bit_length() - 1
        self._clock = clock
        self._room = room
        # A window is named by one int, its file key above _KEY_SHIFT bits
        # of window index (ints take less memory than tuples, and a big
        # host's room holds tens of thousands of windows).
        self._in_flight: set[int] = set()
        # The last RECENT_PUSHES windows pushed -> when each landed, oldest first.
        self._landed: dict[int, float] = {}
        self.score = 0
        self.thrashing = False  # from a score of THRASHING until it is down to half
        self._decayed = clock()
        # The working set of this epoch: windows missed in, until it outgrows
        # the room; the probe that starts it (_new_epoch sets them all).
        self._seen: set[int] = set()
        self._epoch: float
        self.room_windows: int
        self.over_room: bool
        self.probe_left: int
        self._repeats: int
        self._new_epoch(self._decayed)
        # What happened (the tests read it).
        self.pushes = self.fresh = self.re_misses = 0

    def miss(self, key: int, offset: int, size: int | None = None) -> int | None:
        """A small read of file KEY (of SIZE bytes, if known) at OFFSET
        missed the page cache: the start of the window to push now, or None."""
        w = key << _KEY_SHIFT | offset >> self._shift
        if w in self._in_flight:
            return None
        now = self._clock()
        self._tick(now)
        landed = self._landed.get(w)
        if landed is not None and now - landed < RACE_SECONDS:
            return None
        if landed is not None:
            self.re_misses += 1
            self.score = min(self.score + RE_MISS_WEIGHT, THRASHING)
        else:
            self.fresh += 1
            if not self.thrashing:  # (while stopped, every miss is fresh: no evidence)
                self.score = max(self.score - 1, 0)
        if self.score >= THRASHING:
            self.thrashing = True
        if not self.over_room:
            repeat = w in self._seen
            self._seen.add(w)
            if len(self._seen) > self.room_windows:
                self.over_room = True
                self._seen.clear()
            if self.probe_left and (size is None or size >> self._shift > self.room_windows):
                self.probe_left -= 1
                self._repeats += repeat
                if not self.probe_left and self._repeats < PROBE_REPEATS:
                    self.over_room = True
                return None
        if self.thrashing or self.over_room:
            return None
        self._in_flight.add(w)
        self.pushes += 1
        return offset >> self._shift << self._shift

    def done(self, key: int, start: int) -> None:
        """The push of KEY's window at START is over. Whether the kernel
        took the pages or not (a push fails when memory is short), a miss
        there soon after counts as a re-miss: either way the cache does not
        hold it."""
        w = key << _KEY_SHIFT | start >> self._shift
        self._in_flight.discard(w)
        self._landed.pop(w, None)
        self._landed[w] = self._clock()
        if len(self._landed) > RECENT_PUSHES:
            del self._landed[next(iter(self._landed))]

    def cancel(self, key: int, start: int) -> None:
        """The push `miss` asked for was never queued: a later miss there is fresh."""
        self._in_flight.discard(key << _KEY_SHIFT | start >> self._shift)
        self.pushes -= 1

    def forget(self, key: int) -> None:
        """File KEY is gone (a deleted snapshot): drop what was pushed of it."""
        for w in [w for w in self._landed if w >> _KEY_SHIFT == key]:
            del self._landed[w]
        self._seen = {w for w in self._seen if w >> _KEY_SHIFT != key}

    def _new_epoch(self, now: float) -> None:
        """Read the room again, count the working set afresh, probe first."""
        self._epoch = now
        self._seen.clear()
        self.over_room = False
        self.room_windows = self._room() // ROOM_SHARE >> self._shift
        self.probe_left = PROBE_FACTOR * math.isqrt(self.room_windows)
        self._repeats = 0

    def _tick(self, now: float) -> None:
        """What time alone changes: the decay (the only thing that lowers the
        score while thrashing, so it alone ends it) and the epoch."""
        if now - self._decayed >= DECAY_SECONDS:
            periods = int((now - self._decayed) / DECAY_SECONDS)
            self.score >>= min(periods, 16)
            self._decayed += periods * DECAY_SECONDS
            if self.score <= THRASHING // 2:
                self.thrashing = False
        if now - self._epoch >= EPOCH_SECONDS:
            self._new_epoch(now)
