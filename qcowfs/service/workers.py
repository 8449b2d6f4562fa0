"""Several processes serving one read-only mount (-o workers=N).

One Python thread bounds what one process can serve: with several readers
at once, the daemon's CPU is the limit long before the disk. A read-only
mount has no shared mutable state: its tree and inode numbers are fixed
before the fork, its file handles say what was opened (Operations.share),
and everything else a process keeps (L2 tables, decompressed clusters,
read-around) is only a cache of an image that cannot change. So after the
kernel's FUSE INIT is answered (pyfuse3.share_session, our patch) the daemon
forks N-1 workers; each runs its own trio loop over the inherited FUSE
device, and each request goes to whichever process reads it first, which
answers it. The daemon serves too, and alone has the rest: the control
socket, the stop signals, the pid file, the unmount. Writable mounts keep
one process (one owner of the image's metadata).

Ending. An unmount ends the connection: every loop ends, each worker exits
0 and the daemon reaps them all before it exits itself. Workers ignore the
stop signals (a systemd stop or a Ctrl-C reaches the whole process group,
and a busy mount must keep serving until the daemon says otherwise), and
die with the daemon (PR_SET_PDEATHSIG).

A worker that dies otherwise (killed, crashed) took the requests it had read
with it: the kernel waits for their answers forever, and so would their
readers. Nobody else can answer them (no other process knows them; a
restarted worker would not either), so the daemon ends the connection: one
log line, the connection aborted (/sys/fs/fuse/connections/N/abort, where
fusectl is mounted), the other workers killed and the daemon's own device
closed (the last close of the FUSE device aborts the connection too), the
mount detached. Every waiting reader gets an error (ECONNABORTED), never a
hang; the image must be mounted again.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Callable

import trio

from ..host.logs import logger

log = logger()
PR_SET_PDEATHSIG = 1  # prctl(2)
# How long workers may take to see the end of the connection before they are killed.
REAP_WAIT = 10.0


def describe(status: int) -> str:
    """A wait status as the end of a sentence ("was killed by SIGKILL")."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"was killed by {name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


@dataclass
class Worker:
    """One forked serving process of a mount."""

    index: int  # 1..N-1 (the daemon is 0)
    pid: int
    pidfd: int
    status: int | None = None  # the wait status, once reaped


class Workers:
    """The forked workers of one mount, as the daemon sees them."""

    def __init__(self) -> None:
        self.procs: list[Worker] = []
        self.ending = False  # the daemon ends them: deaths from now on are expected
        self.lost: Worker | None = None  # one that died while the connection lived

    def fork(self, count: int, serve: Callable[[int], int], ignore: tuple[int, ...]) -> None:
        """Fork COUNT workers; worker i runs SERVE(i) and exits with what it
        returns. The signals IGNORE are the daemon's to act on: workers
        ignore them. Call before any trio loop or thread of this process runs."""
        daemon = os.getpid()
        for index in range(1, count + 1):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    _become_worker(daemon, ignore)
                    code = serve(index)
                finally:
                    logging.shutdown()
                    os._exit(code)
            self.procs.append(Worker(index, pid, os.pidfd_open(pid)))

    async def watch(self, died: Callable[[Worker, str], None]) -> None:
        """Reap workers as they end; DIED(worker, how) for one that ends
        unexpectedly: killed, or failed, while the connection still lived (a
        worker exits 0 only once the connection is over)."""
        async with trio.open_nursery() as nursery:
            for w in self.procs:
                nursery.start_soon(self._watch_one, w, died)

    async def _watch_one(self, w: Worker, died: Callable[[Worker, str], None]) -> None:
        await trio.lowlevel.wait_readable(w.pidfd)
        if self._reap(w, os.WNOHANG) and w.status != 0 and not self.ending:
            assert w.status is not None
            self.lost = w
            died(w, describe(w.status))

    def _reap(self, w: Worker, flags: int = 0) -> bool:
        if w.status is None:
            try:
                pid, status = os.waitpid(w.pid, flags)
            except ChildProcessError:
                pid, status = w.pid, 0
            if pid == 0:
                return False
            w.status = status
            os.close(w.pidfd)
        return True

    def kill(self) -> None:
        """Kill every worker still alive (their requests in flight end with the
        connection, which the daemon ends)."""
        self.ending = True
        for w in self.procs:
            if w.status is None:
                try:
                    os.kill(w.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def reap(self, wait: float = REAP_WAIT) -> None:
        """Wait for every worker to end (they do once the connection is over),
        killing those still there after WAIT seconds."""
        self.ending = True
        deadline = time.monotonic() + wait
        while not all(self._reap(w, os.WNOHANG) for w in self.procs):
            if time.monotonic() > deadline:
                log.warning("workers still running %gs after the end of the connection: killing them", wait)
                self.kill()
                for w in self.procs:
                    self._reap(w)
                break
            time.sleep(0.01)


def _become_worker(daemon: int, ignore: tuple[int, ...]) -> None:
    """What makes a forked process a worker: the signals IGNORE are the
    daemon's, and the worker ends with the daemon."""
    for signum in ignore:
        signal.signal(signum, signal.SIG_IGN)
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != daemon:  # the daemon died before prctl: nothing to serve for
        os._exit(1)
