"""host/waiting.py: the engine's waits under a trio loop (a mount, qcowfs.aio)
and driven on the caller's thread (commands, qcowfs.open)."""
from __future__ import annotations

import os
import signal
import threading
from typing import Iterator

import pytest
import trio

from qcowfs.api import _to_its_end
from qcowfs.host.waiting import Event, Lock, Suspended, drive, driven, in_thread


def test_driven_waits_are_made_in_place() -> None:
    lock, event = Lock(), Event()

    async def work() -> tuple[int, bool, bool]:
        async with lock:
            held = lock.locked()
            event.set()
            await event.wait()
        return await in_thread(threading.get_ident), held, driven()
    assert drive(work()) == (threading.get_ident(), True, True)
    assert not lock.locked() and not driven()


def test_a_driven_coroutine_that_would_wait_for_another_task_fails_cleanly() -> None:
    """No hang: a lock already held (no other task could release it) or an
    event never set is a Suspended error, and the coroutine is closed."""
    lock, cleaned = Lock(), []

    async def twice() -> None:
        try:
            async with lock:
                async with lock:
                    pass
        finally:
            cleaned.append(1)
    with pytest.raises(Suspended):
        drive(twice())
    assert cleaned == [1] and not lock.locked()
    with pytest.raises(Suspended):
        drive(Event().wait())


def test_under_trio_the_same_objects_let_other_tasks_run() -> None:
    lock, event, order = Lock(), Event(), []

    async def holder() -> None:
        async with lock:
            order.append("held")
            await event.wait()
            order.append("released")

    async def waiter() -> None:
        await trio.sleep(0.01)
        event.set()
        async with lock:
            order.append("waiter")
        order.append(await in_thread(threading.get_ident) != threading.get_ident())

    async def main() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(holder)
            n.start_soon(waiter)
    trio.run(main)
    assert order == ["held", "released", "waiter", True]


@pytest.fixture
def default_sigint() -> Iterator[None]:
    """SIGINT with Python's default handler and unblocked, as in a program
    run from a terminal (what _to_its_end defers). A suite started in the
    background by a shell without job control inherits SIGINT ignored (bash
    does that to `cmd &`), and Python then installs no handler: this test
    failed there. What was there comes back after."""
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    blocked = signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        signal.signal(signal.SIGINT, handler)


def test_a_change_of_the_library_runs_to_its_end_before_ctrl_c(default_sigint: None) -> None:
    """qcowfs.api: Ctrl-C during a change on an open image is raised once it is done."""
    steps = []
    with pytest.raises(KeyboardInterrupt):
        with _to_its_end():
            os.kill(os.getpid(), signal.SIGINT)
            steps.append("after the signal")
    assert steps == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
