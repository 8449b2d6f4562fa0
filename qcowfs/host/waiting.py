"""How the engine waits: on trio in a mount, in place in a command.

The engine is written as coroutines, as QEMU's block layer is: a mount
serves many requests on one trio loop, and a request that must wait (a
host read that is not in the page cache, an fsync, the metadata lock another
request holds) lets the others run meanwhile. A command or a script has one
request and no one to let run: it drives the same coroutines to their end
on its own thread with `drive`, and each wait below is then done in place
(the read or the fsync blocks the thread; a lock is free, since there is no
other task to hold it). Why not `trio.run` for them too: importing trio
costs a one-shot command some 60 ms and 14 MiB, a third of `qcowfs info`,
and a call through a loop in another thread (the old portal of qcowfs.api)
some 60 us.

This is the one module of the engine's stack that names trio, and it
imports it only when a trio loop is running the engine (a mount, a program
of qcowfs.aio): `drive` never loads it.
"""
from __future__ import annotations

import contextlib
import contextvars
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable, Coroutine, Iterator, TypeVar

if TYPE_CHECKING:
    import trio

T = TypeVar("T")

# Set while `drive` runs a coroutine on this thread (no trio loop).
_DRIVEN: contextvars.ContextVar[bool] = contextvars.ContextVar("qcowfs_driven", default=False)
# How many blocking calls the engine runs at once in trio's worker threads.
THREADS = 16
_limiter: "trio.CapacityLimiter | None" = None


class Suspended(RuntimeError):
    """A coroutine run by `drive` had to wait for something only a trio loop
    can give (another task holding a lock): a bug of the engine."""


def driven() -> bool:
    """True while `drive` runs the engine on this thread, without a loop:
    blocking calls are then made in place."""
    return _DRIVEN.get()


def drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run CORO to its end on this thread, without a trio loop: every wait
    of the engine is done in place (see the module's docstring). Raises
    Suspended (CORO closed) should it ever wait for another task."""
    token = _DRIVEN.set(True)
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    finally:
        _DRIVEN.reset(token)
    coro.close()
    raise Suspended("an engine coroutine waited for another task outside a trio loop")


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """FN(*ARGS), a call that may block (a read from the disk, fsync): in a
    worker thread under a trio loop, so other requests go on; in place when
    driven."""
    if _DRIVEN.get():
        return fn(*args)
    import trio

    global _limiter
    if _limiter is None:
        _limiter = trio.CapacityLimiter(THREADS)
    return await trio.to_thread.run_sync(fn, *args, limiter=_limiter)


class Lock:
    """An async lock: a trio.Lock under a trio loop (made at first use there);
    when driven, a flag, since there is only one task.

    A free lock is taken without the scheduler pass trio.Lock.acquire makes
    even then (a sequential writer allocates on every request, and every
    metadata change takes two locks): a free trio.Lock has no waiters
    (release hands it to the first), so this is as fair as its acquire()."""

    __slots__ = ("_held", "_trio")

    def __init__(self) -> None:
        self._held = False  # taken by a driven coroutine
        self._trio: "trio.Lock | None" = None

    def locked(self) -> bool:
        return self._held or (self._trio is not None and self._trio.locked())

    async def acquire(self) -> None:
        if _DRIVEN.get():
            if self.locked():
                raise Suspended("an engine lock is held by another task outside a trio loop")
            self._held = True
            return
        import trio

        if self._trio is None:
            self._trio = trio.Lock()
        try:
            self._trio.acquire_nowait()
        except trio.WouldBlock:
            await self._trio.acquire()

    def release(self) -> None:
        if self._held:
            self._held = False
        else:
            assert self._trio is not None, "release of a lock that is not held"
            self._trio.release()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.release()


class Event:
    """An async event: a trio.Event under a trio loop (made when a task first
    waits for it); when driven, set() is all that can happen before a wait,
    since there is only one task."""

    __slots__ = ("_set", "_trio")

    def __init__(self) -> None:
        self._set = False
        self._trio: "trio.Event | None" = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        if self._trio is not None:
            self._trio.set()

    async def wait(self) -> None:
        if self._set:
            return
        if _DRIVEN.get():
            raise Suspended("an engine event waited for another task outside a trio loop")
        import trio

        if self._trio is None:
            self._trio = trio.Event()
        await self._trio.wait()


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Cleanup that must run to its end even when the caller is cancelled
    (trio's shielded cancel scope); nothing to shield when driven."""
    if _DRIVEN.get():
        yield
        return
    import trio

    with trio.CancelScope(shield=True):
        yield


class Pace:
    """qemu-img's -r (convert, commit): the copy waits after each piece
    until its data has taken at least a second per RATE bytes since the
    start (holes cost nothing; RATE 0: no wait). The waits are short
    slices, so a cancel is heard soon."""

    SLICE = 0.25  # seconds: the longest a cancel waits

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.start = time.monotonic()
        self.done = 0

    async def copied(self, n: int) -> None:
        if not self.rate:
            return
        self.done += n
        due = self.start + self.done / self.rate
        while (left := due - time.monotonic()) > 0:
            await in_thread(time.sleep, min(self.SLICE, left))
