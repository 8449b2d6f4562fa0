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
  `ROOM_SECONDS`. Within an epoch (`EPOCH_SECONDS`), the windows the small reads missed in
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

* **Outcome**, for what the room does not show (other processes streaming
  files through the same cache, a reclaim daemon, a limit lowered while
  the reader fits): an experiment that runs beside the pushes. Every
  SAMPLE_EVERY-th window missed in for the first time in a while becomes a
  sample, alternately a *trial* (pushed, and pushed again at every miss
  in it, as every window is while pushes pay) or a *control* (never
  pushed), followed for SAMPLE_SECONDS (a control until SAMPLE_CAP misses
  landed in it: each costs a miss a push would have saved). The misses
  per second of following are a control's rate (what a window costs
  without pushes) and a trial's (with them; a miss there means the cache
  lost the push before the reader was done with it: a refault). Once
  EVIDENCE misses are counted, pushes pay if over HORIZON seconds a window
  costs less with them, a push weighing PUSH_COST misses:
  1 + control * HORIZON > (1 + PUSH_COST)(1 + trial * HORIZON). A cache
  that holds the pushes gives trials no misses and controls as many as
  the reader comes back (a slow reader too: rates, not counts); a cache
  that loses them before the reader comes back gives both about the
  same. A fio pass that drops the file's cache hits both groups alike. When
  pushes do not pay they stop, and after a back-off (BACKOFF_MIN seconds,
  doubled at every round that says no again, up to BACKOFF_MAX) a round of
  SAMPLES trials and SAMPLES controls asks again: while stopped, the
  trials are all that is pushed.

The room is read again every ROOM_SECONDS (a few small files, about 0.4 ms
on the loop) and after every ROOM_PUSHES pushes, so a limit set or lowered
while mounted stops the pushes within a quarter of a second and at most
64 MiB of pushes (the bench's limit-during-fio row); the working
set is counted afresh every EPOCH_SECONDS.

A miss less than `RACE_SECONDS` after its window's push landed (or while the
push is queued or in flight) is a read that raced the push, the kernel sent
it before the pages were there: no evidence, and nothing to push.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Callable

from ..host.logs import logger

# The outcome experiment. Every SAMPLE_EVERY-th first miss in a window is a
# sample (trials and controls alternate), followed for SAMPLE_SECONDS (a
# control until SAMPLE_CAP misses landed in it), no more than MAX_SAMPLES at
# once; EVIDENCE misses in samples decide, or a round's samples all done.
SAMPLE_EVERY = 16
SAMPLE_SECONDS = 10.0
SAMPLE_CAP = 8
MAX_SAMPLES = 4096
EVIDENCE = 256
# Rounds while stopped: SAMPLES trials and SAMPLES controls.
SAMPLES = 16
# What a push is worth is judged over this long (a cache that holds it
# keeps it longer; one that loses it, loses it sooner).
HORIZON = 10.0
# What a push costs in misses' worth of daemon time: reading 256 KiB from
# the host cache and copying it into 64 new pages is about one FUSE round
# trip of Python (the bench's cgroup row: pushing at every miss halved the
# reads a second while the share of hits stayed the same).
PUSH_COST = 1
# The pause after a round that says pushes do not pay, doubled at every
# such round in a row.
BACKOFF_MIN = 1.0
BACKOFF_MAX = 32.0
# A miss this soon after its window's push landed was sent before it landed
# (it waited behind the push in the daemon's queue).
RACE_SECONDS = 0.01
# The landing times kept for that check.
RECENT_PUSHES = 32
# How often the room is read again (0.2% of a core at 0.4 ms a reading),
# and after how many pushes (64 MiB at the default window) at the latest.
ROOM_SECONDS = 0.25
ROOM_PUSHES = 256
# How often the working set is counted afresh: a reader larger than the
# room costs 1/ROOM_SHARE of it in pushes each epoch.
EPOCH_SECONDS = 30.0
# The share of the room the pushed windows may fill: the rest is the
# reader's own pages, the daemon's, everything else in the cgroup.
ROOM_SHARE = 8
# The probe at the start of an epoch: PROBE_FACTOR * sqrt(room windows)
# misses, none pushed; fewer than PROBE_REPEATS of them in a window missed
# before means the reader spans far more windows than the room.
PROBE_FACTOR = 4
PROBE_REPEATS = 4
# While the reader outgrew the room (`over_room`), nothing is pushed until a
# new epoch or a larger room, which only the clock brings: `ask_every` then
# tells the read path to ask `miss` at every QUIET_EVERY-th small read only
# (an attribute, so that a read not asking costs no call). (Asked at every read,
# the call cost 1.3 us in the daemon, whose caches the kernel's work between
# requests leaves cold: 2-4% of its CPU in the bench's cgroup rows, where
# nothing is pushed and read_around=0 does without it.)
QUIET_EVERY = 256
_KEY_SHIFT = 40  # window indexes below 2**40
log = logger()


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
        # The outcome experiment: window -> [since, misses in it, trial?,
        # followed from (this round)], oldest first. Per group (controls,
        # trials): samples followed now, sample-seconds (of samples done) and
        # misses this round, samples started this round.
        self.paying = True  # what the last round said (the first assumes so)
        self._confirmed = True  # and the round before, pushing
        self._samples: dict[int, list] = {}
        self._live = [0, 0]
        self._exposure = [0.0, 0.0]
        self._events = [0, 0]
        self._started = [0, 0]
        self._births = 0
        self._backoff = BACKOFF_MIN
        self._next_round = 0.0
        # The working set of this epoch: windows missed in, until it outgrows
        # the room; the probe that starts it (_new_epoch sets them all).
        self._seen: set[int] = set()
        self._epoch: float
        self._room_read: float
        self._due: float  # when _tick has something to do
        self.room_windows: int
        self.over_room: bool
        self.ask_every: int  # the read path calls miss() at every ask_every-th small read
        self.probe_left: int
        self._repeats: int
        self._new_epoch(clock())
        # What happened (the tests read it).
        self.pushes = self.fresh = self.refaults = self.rounds = 0

    def miss(self, key: int, offset: int, size: int | None = None) -> int | None:
        """A small read of file KEY (of SIZE bytes, if known) at OFFSET
        missed the page cache: the start of the window to push now, or None."""
        w = key << _KEY_SHIFT | offset >> self._shift
        if w in self._in_flight:
            return None
        now = self._clock()
        if now >= self._due:
            self._tick(now)
        if self.over_room:
            return None
        landed = self._landed.get(w)
        if landed is not None and now - landed < RACE_SECONDS:
            return None
        sample = self._samples.get(w)
        if sample is not None:  # a later miss in a sample: what it is measured by
            trial = sample[2]
            sample[1] += 1
            self._events[trial] += 1
            self.refaults += trial
            if not trial and sample[1] >= SAMPLE_CAP:
                self._finish(w, now)
            self._maybe_decide(now)
        else:
            self.fresh += 1
        repeat = w in self._seen
        self._seen.add(w)
        if len(self._seen) > self.room_windows:
            self._stop_for_room()
            return None
        if self.probe_left and (size is None or size >> self._shift > self.room_windows):
            self.probe_left -= 1
            self._repeats += repeat
            if not self.probe_left and self._repeats < PROBE_REPEATS:
                self._stop_for_room()
            return None
        if sample is not None:
            return self._push(w, offset) if sample[2] else None
        trial = self._sample(w, now)
        if trial is not None:
            return self._push(w, offset) if trial else None
        return self._push(w, offset) if self.paying else None

    def done(self, key: int, start: int) -> None:
        """The push of KEY's window at START is over. Whether the kernel
        took the pages or not (a push fails when memory is short), a miss
        there later counts against it: either way the cache does not hold it."""
        w = key << _KEY_SHIFT | start >> self._shift
        self._in_flight.discard(w)
        self._landed.pop(w, None)
        self._landed[w] = self._clock()
        if len(self._landed) > RECENT_PUSHES:
            del self._landed[next(iter(self._landed))]

    def cancel(self, key: int, start: int) -> None:
        """The push `miss` asked for was never queued: a later miss there is
        fresh, and a trial that was not pushed is no trial."""
        w = key << _KEY_SHIFT | start >> self._shift
        self._in_flight.discard(w)
        self.pushes -= 1
        sample = self._samples.get(w)
        if sample is not None and sample[2] and not sample[1]:
            self._finish(w, self._clock())
            self._started[1] -= 1

    def forget(self, key: int) -> None:
        """File KEY is gone (a deleted snapshot): drop what was pushed of it."""
        for w in [w for w in self._landed if w >> _KEY_SHIFT == key]:
            del self._landed[w]
        now = self._clock()
        for w in [w for w in self._samples if w >> _KEY_SHIFT == key]:
            self._finish(w, now)
        self._seen = {w for w in self._seen if w >> _KEY_SHIFT != key}

    def _push(self, w: int, offset: int) -> int:
        self._in_flight.add(w)
        self.pushes += 1
        if not self.pushes % ROOM_PUSHES:  # a fast reader: the room again at the next miss
            self._room_read = self._due = -ROOM_SECONDS
        return offset >> self._shift << self._shift

    def _sample(self, w: int, now: float) -> bool | None:
        """Maybe make window W, missed in for the first time in a while, a
        sample: True for a trial, False for a control, None if not. While
        pushes pay, every SAMPLE_EVERY-th such window; while they do not,
        only in a round (after the back-off), and SAMPLES of each."""
        if not self.paying and (now < self._next_round or min(self._started) >= SAMPLES):
            return None
        self._births += 1
        if self._births % SAMPLE_EVERY or len(self._samples) >= MAX_SAMPLES:
            return None
        trial = self._births // SAMPLE_EVERY % 2 == 1
        if not self.paying and self._started[trial] >= SAMPLES:
            return None
        self._started[trial] += 1
        self._live[trial] += 1
        self._samples[w] = [now, 0, trial, now]
        self._due = min(self._due, now + SAMPLE_SECONDS)
        return trial

    def _finish(self, w: int, now: float) -> None:
        """Sample W is no longer followed: its time counts."""
        _, _, trial, since = self._samples.pop(w)
        self._live[trial] -= 1
        self._exposure[trial] += now - since

    def _maybe_decide(self, now: float) -> None:
        """Once EVIDENCE misses landed in samples (or a round's samples are
        all done), say whether pushes pay, and start the next round."""
        ec, et = self._events
        if ec + et < EVIDENCE and (self.paying or any(self._live) or min(self._started) < SAMPLES):
            return
        for sample in self._samples.values():  # (the time of those still followed, so far)
            self._exposure[sample[2]] += now - sample[3]
            sample[3] = now
        xc, xt = self._exposure
        if xc <= 0 or xt <= 0:
            return
        control, trial = ec / xc * HORIZON, et / xt * HORIZON  # misses per window over HORIZON
        pays = 1 + control > (1 + PUSH_COST) * (1 + trial)
        self.rounds += 1
        log.log(logging.INFO if pays != self.paying else logging.DEBUG,
                "read-around: pushes %s: a window missed in %.1f times in %gs unpushed, %.1f pushed",
                "pay" if pays else "do not pay", control, HORIZON, trial)
        # A round while stopped sees trials among few pushes, which the cache
        # keeps longer than it would keep every window pushed: its yes is
        # confirmed by the next round, pushing; a no then doubles the back-off.
        if not pays:
            confirmed = self.paying and self._confirmed
            self._backoff = BACKOFF_MIN if confirmed else min(2 * self._backoff, BACKOFF_MAX)
            self._next_round = now + self._backoff
            self._samples.clear()  # (trials are pushed at every miss while followed)
            self._live = [0, 0]
        self._confirmed = pays and self.paying
        self.paying = pays
        self._events = [0, 0]
        self._exposure = [0.0, 0.0]
        self._started = [0, 0]

    def _stop_for_room(self) -> None:
        """The reader outgrew the room: no pushes, and no experiment, until
        the next epoch."""
        self.over_room = True
        self.ask_every = QUIET_EVERY
        self._seen.clear()
        self._samples.clear()
        self._live = [0, 0]
        self._events = [0, 0]
        self._exposure = [0.0, 0.0]
        self._started = [0, 0]

    def _new_epoch(self, now: float) -> None:
        """Read the room again, count the working set afresh, probe first."""
        self._epoch = self._room_read = now
        self._due = now + ROOM_SECONDS
        self._seen.clear()
        self.over_room = False
        self.ask_every = 1
        self.room_windows = self._room() // ROOM_SHARE >> self._shift
        self.probe_left = PROBE_FACTOR * math.isqrt(self.room_windows)
        self._repeats = 0

    def _tick(self, now: float) -> None:
        """What time alone changes (when it is due): samples followed long
        enough, the room read again (a new epoch if it grew more than twice),
        the epoch."""
        while self._samples:
            w, sample = next(iter(self._samples.items()))
            if now - sample[0] < SAMPLE_SECONDS:
                break
            self._finish(w, now)
        self._maybe_decide(now)
        if now - self._epoch >= EPOCH_SECONDS:
            self._new_epoch(now)
        elif now - self._room_read >= ROOM_SECONDS:
            self._room_read = now
            windows = self._room() // ROOM_SHARE >> self._shift
            if windows > 2 * self.room_windows:
                self._new_epoch(now)
            else:
                self.room_windows = windows
                if not self.over_room and len(self._seen) > windows:
                    self._stop_for_room()
        self._due = self._room_read + ROOM_SECONDS
        if self._samples:
            self._due = min(self._due, next(iter(self._samples.values()))[0] + SAMPLE_SECONDS)
