"""The serving process: FUSE session, readiness, signals, clean shutdown.

Readiness is reported only once the mount answers a stat (to the parent of a
daemonized mount through a pipe, to systemd through NOTIFY_SOCKET).

Stopping never loses data. SIGTERM, SIGINT and SIGHUP flush everything to
the image at once, then unmount -- but only if nothing holds the mount: the
unmount is an ordinary umount(2), which the kernel refuses while files are
open or a loop device sits on disk.raw. A busy mount is never detached
lazily (that is what turned a loop device's pending writes into I/O errors
and an ext4 on top into a damaged one). While busy the daemon keeps serving,
logs one line naming what holds the mount, flushes every second, and
unmounts and exits as soon as the mount is released. The explicit way to
detach anyway is a second stop signal within FORCE_WINDOW seconds, or
SIGUSR1 (`qcowfs umount --force`): then, after one more flush, the session
ends and the mount is detached, and whatever still uses it gets errors.

Whichever way the session ends, every cache is flushed and the image closed
before the process exits.

A read-only mount is served by several processes (-o workers=N): this one
and N-1 forked workers (service/workers.py says how they share the FUSE
connection and end). Signals, the control socket and the unmount stay here.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING

import pyfuse3
import trio

from . import control
from ..host import mounts
from ..errors import QcowError
from ..fs.operations import STOCK_PYFUSE3_WARNING, Access, Operations, pyfuse3_patched
from ..aio import Image
from .manage import Hooks, Manager
from .workers import Worker, Workers
from ..fs.partitions import add_partitions
from ..fs.scratch import Scratch, overlay_tree
from ..fs.views import (BitmapView, DirNode, FileNode, SnapshotView, bitmap_map_nodes, bitmap_nodes, build_tree,
                    snapshot_map_nodes, snapshot_nodes)
from ..host.secret import lock_memory
from ..host.logs import logger

from .options import FORCE_SHARE_WARNING

if TYPE_CHECKING:
    from .options import MountOptions

log = logger()
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
FORCE_SIGNAL = signal.SIGUSR1
# A second stop signal this soon after the first detaches a busy mount.
FORCE_WINDOW = 5.0
# How often a busy mount is flushed and tried again.
BUSY_POLL = 1.0
# An unmount refused right after the signal may only be a request in flight
# (our own readiness stat, a process between two syscalls): retry quickly a
# few times before calling the mount busy.
QUICK_RETRIES = (0.02, 0.05, 0.1, 0.2)

READAHEAD_KB = 1024
# force_share: how old the table entries a read goes through may be, at most.
REVALIDATE_EVERY = 0.1


def _raise_readahead(dev: int) -> None:
    """Let the kernel read ahead 1 MiB at a time (FUSE's default is 128K): a
    sequential reader then costs a quarter of the round trips. Needs root;
    without it the default stays."""
    path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
    try:
        with open(path, "r+") as f:
            if int(f.read().strip() or 0) < READAHEAD_KB:
                f.seek(0)
                f.write(str(READAHEAD_KB))
    except (OSError, ValueError) as e:
        log.debug("cannot raise read-ahead (%s): %s", path, e)


def sd_notify(message: str) -> None:
    """Send MESSAGE to systemd's notify socket, if we run under one."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(message.encode())
    except OSError as e:
        log.warning("cannot notify systemd: %s", e)


class Readiness:
    """The pipe to the parent of a daemonized mount, which waits on it and
    prints what comes as its one line ("OK" once ready). In the foreground
    there is no pipe and errors are logged instead. Whatever ends the daemon
    before readiness, the parent gets one line saying why."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    @property
    def waiting(self) -> bool:
        """A parent still waits for the outcome."""
        return self.fd is not None

    def send(self, text: str) -> None:
        """Tell the parent TEXT (once; later calls do nothing)."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.write(fd, text.rstrip("\n").encode("utf-8", "surrogateescape") + b"\n")
        except OSError:
            pass
        finally:
            os.close(fd)

    def close(self) -> None:
        """Report nothing (a forked worker: the daemon reports)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def fail(self, msg: str) -> None:
        """Report MSG to the parent, or log it when no parent waits."""
        if self.waiting:
            self.send(msg)
        else:
            log.error("%s", msg)


class Session:
    """What the signal handling and the shutdown share."""

    def __init__(self, image: Image, mountpoint: str, workers: Workers) -> None:
        self.image = image
        self.mountpoint = mountpoint
        self.workers = workers  # the other processes serving the mount (read-only mounts)
        self.dev: str | None = None  # "major:minor" of our mount, once known
        self.detach = False  # end with a lazy detach (forced, or after an error)
        self.ready = False
        self.stopping = False  # a stop signal came: we are trying to unmount
        self.busy_since: float | None = None


def serve(image: Image, mountpoint: str, opts: "MountOptions", fuse_options: set[str],
          ready: Readiness) -> int:
    """Mount, serve until unmounted or signalled, flush, exit code."""
    # From the mount on, a signal must not kill us (that leaves a dead mount,
    # or a half-flushed image): until _watch_signals listens, and after it
    # stopped listening (while flushing), signals are only remembered.
    pending: list[int] = []
    # (On an encrypted image the window is pushed only where its cipher
    # decrypts in batches: Mapper.cheap.)
    read_around = opts.read_around
    for signum in (*STOP_SIGNALS, FORCE_SIGNAL):
        signal.signal(signum, lambda n, _frame: pending.append(n))
    scratch: Scratch | None = None
    processes = opts.serving_processes if pyfuse3_patched() else 1
    mounted = False
    if opts.force_share:
        log.warning("%s: %s", image.path, FORCE_SHARE_WARNING)
    if not pyfuse3_patched():
        log.warning("%s", STOCK_PYFUSE3_WARNING)
    try:
        root = build_tree(image, opts.page_cache)
        if opts.scratch:
            scratch = Scratch(opts.scratch_dir, opts.scratch_size)
            overlay_tree(root, scratch)
        add_partitions(root)
        ops = Operations(root, Access(opts.uid, opts.gid, opts.umask),
                         debug=opts.debug, read_around=read_around, space_of=image.path,
                         space=scratch.space if scratch is not None else None)
        _init_fuse(ops, mountpoint, fuse_options)
        mounted = True
        if processes > 1:
            trio.run(ops.share)
            pyfuse3.share_session()
    except Exception as e:  # noqa: BLE001 - one line to the user, whatever it is
        text = str(e) if isinstance(e, (RuntimeError, OSError, QcowError)) else f"{type(e).__name__}: {e}"
        ready.fail(f"cannot mount on {mountpoint}: {text}")
        if mounted:
            pyfuse3.close(unmount=True)
        trio.run(image.close)
        return 1
    sess = Session(image, mountpoint, Workers())
    pidfile: str | None = None

    async def main() -> None:
        nonlocal pidfile
        await image.prepare()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, sess, pending)
            nursery.start_soon(_run_fuse, nursery.cancel_scope)
            if sess.workers.procs:
                nursery.start_soon(sess.workers.watch, functools.partial(_worker_died, sess))
            if opts.force_share:
                nursery.start_soon(_revalidate, image)
            if read_around:
                for _ in range(2):
                    nursery.start_soon(ops.push_worker)
            # abandon_on_cancel: a signal before the stat is answered ends the
            # FUSE loop, and the stat (then never answered) must not hold us.
            st = await trio.to_thread.run_sync(os.stat, mountpoint, abandon_on_cancel=True)
            sess.dev = mounts.dev_of(st.st_dev)
            _raise_readahead(st.st_dev)
            try:
                pidfile = mounts.write_pidfile(sess.dev)
            except OSError as e:
                log.warning("cannot write a pid file: %s", e)
            sock = mounts.control_socket(sess.dev)
            if sock is not None:
                manager = Manager(image, _tree_hooks(root, ops, image))
                nursery.start_soon(control.serve, sock, manager.handle)
            if ready.waiting:
                _detach_stdio()
            ready.send("OK")
            sess.ready = True
            sd_notify("READY=1")
            log.info("serving %s on %s%s%s", image.path, mountpoint,
                     " (read-only)" if opts.read_only else
                     f" (throwaway writes in {scratch.directory})" if scratch is not None else "",
                     f", {processes} processes (workers: pids "
                     f"{' '.join(str(w.pid) for w in sess.workers.procs)})" if sess.workers.procs else "")
        sd_notify("STOPPING=1")
        await _shutdown(image)

    # Everything alive now lives as long as the mount: keep it out of the
    # collector's way, so collections stay cheap on the request path.
    gc.collect()
    gc.freeze()
    _keep_big_buffers()
    _return_free_heap()
    if processes > 1:
        try:
            sess.workers.fork(processes - 1, functools.partial(_serve_worker, ops, read_around, ready,
                                                               image.encryption is not None),
                              ignore=(*STOP_SIGNALS, FORCE_SIGNAL))
        except OSError as e:  # (fork: EAGAIN, ENOMEM) the mount is up: serve it with fewer
            log.warning("%s: cannot start another serving process (%s): %d serve the mount",
                        mountpoint, e, 1 + len(sess.workers.procs))
    if image.encryption is not None:
        lock_memory()  # the master key lives here until the exit
    code = 0
    try:
        trio.run(main)
    except QcowError as e:
        code = _failed(sess, ready, str(e))
    except BaseException as e:  # noqa: BLE001 - the exit must stay clean
        code = _failed(sess, ready, f"daemon failed: {type(e).__name__}: {e}")
    finally:
        if sess.workers.procs:
            if sess.detach:
                sess.workers.kill()
            sess.workers.reap()
            log.info("%s: this process served %d reads", mountpoint, ops.reads)
            if sess.workers.lost is not None:
                code = 1
        if pidfile:
            try:
                os.unlink(pidfile)
            except OSError:
                pass
        if ops.pushing:
            # A read-around push still waits in the kernel for a page that a
            # request we will never answer holds: destroying the session under
            # it is unsafe. The image is closed already: detach the mount and
            # leave, letting the exit close the FUSE device.
            if sess.detach:
                subprocess.run(["umount", "-l", mountpoint] if os.geteuid() == 0
                               else ["fusermount3", "-uz", mountpoint], capture_output=True)
            logging.shutdown()
            os._exit(code)
        pyfuse3.close(unmount=sess.detach)
    if code == 0:
        log.info("%s: image closed cleanly, daemon exits", mountpoint)
    return code


def _serve_worker(ops: Operations, read_around: int, ready: Readiness, encrypted: bool, index: int) -> int:
    """The life of worker INDEX (service/workers.py), forked once the FUSE
    connection is shared: serve requests until the connection ends; the exit
    code (0: it ended)."""
    if ready.waiting:  # (the daemon reports readiness; a daemon has no stdio)
        ready.close()
        _detach_stdio()
    if encrypted:
        lock_memory()  # (mlockall is not inherited)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_run_fuse, nursery.cancel_scope)
            if read_around:
                for _ in range(2):
                    nursery.start_soon(ops.push_worker)

    try:
        trio.run(main)
    except BaseException as e:  # noqa: BLE001 - the daemon hears of it by the exit code
        log.error("worker %d failed: %s: %s", index, type(e).__name__, e)
        return 1
    log.info("worker %d served %d reads", index, ops.reads)
    return 0


def _worker_died(sess: Session, worker: Worker, how: str) -> None:
    """A worker died with the connection alive: the requests it had read will
    never be answered, so end the connection (service/workers.py says why)."""
    log.error("worker %d (pid %d) %s while serving %s: the requests it had read would never be "
              "answered; ending the FUSE connection (readers get errors) and detaching the mount",
              worker.index, worker.pid, how, sess.mountpoint)
    if sess.dev is not None:
        mounts.abort_connection(sess.dev)
    sess.workers.kill()
    sess.detach = True
    pyfuse3.terminate()


def _tree_hooks(root: DirNode, ops: Operations, image: Image) -> Hooks:
    """How commands on the control socket see and change the mounted tree."""
    snaps, bitmaps, maps = root.children["snapshots"], root.children["bitmaps"], root.children["maps"]
    assert isinstance(snaps, DirNode) and isinstance(bitmaps, DirNode) and isinstance(maps, DirNode)
    snap_maps, bitmap_maps = maps.children["snapshots"], maps.children["bitmaps"]
    assert isinstance(snap_maps, DirNode) and isinstance(bitmap_maps, DirNode)

    def snapshot_open(sid: str) -> bool:
        return any(isinstance(n, FileNode) and isinstance(n.view, SnapshotView)
                   and n.view.snapshot.id == sid and ops.is_open(n) for n in snaps.children.values())

    def bitmap_open(name: str) -> bool:
        return any(isinstance(n, FileNode) and isinstance(n.view, BitmapView) and n.view.bitmap.name == name
                   and ops.is_open(n) for n in bitmaps.children.values())

    def changed() -> None:
        ops.set_children(snaps, snapshot_nodes(image, snaps.children))
        ops.set_children(bitmaps, bitmap_nodes(image, bitmaps.children))
        ops.set_children(snap_maps, snapshot_map_nodes(image, snap_maps.children))
        ops.set_children(bitmap_maps, bitmap_map_nodes(image, bitmap_maps.children))

    def disk_files() -> list[FileNode]:
        """disk.raw and the files that show parts of it (partitions/N, maps/disk.json)."""
        out = [root.children["disk.raw"], maps.children["disk.json"]]
        parts = root.children.get("partitions")
        if isinstance(parts, DirNode):
            out += parts.children.values()
        return [n for n in out if isinstance(n, FileNode)]

    def disk_open() -> bool:
        return any(ops.is_open(n) for n in disk_files())

    async def disk_changed() -> None:
        for node in disk_files():
            await ops.drop_cached(node)

    return Hooks(snapshot_open=snapshot_open, bitmap_open=bitmap_open, changed=changed,
                 disk_open=disk_open, disk_changed=disk_changed)


async def _revalidate(image: Image) -> None:
    """force_share: drop what was read of the image's tables every
    REVALIDATE_EVERY seconds (the guarantee docs/mounting.md states)."""
    while True:
        await trio.sleep(REVALIDATE_EVERY)
        try:
            await image.revalidate()
        except (QcowError, OSError) as e:
            log.warning("%s: cannot re-read the image's header: %s", image.path, e)


# glibc mallopt() parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
BIG_BUFFER = 4 << 20


def _keep_big_buffers() -> None:
    """Every FUSE write brings a buffer of up to 1 MiB. glibc would mmap and
    munmap each one, a page fault on every page of it: serve them from the
    heap and keep a few freed ones (make bench: +15-40% sequential writes)."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # glibc only
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, BIG_BUFFER)
        mallopt(M_TRIM_THRESHOLD, 4 * BIG_BUFFER)


def _return_free_heap() -> None:
    """Give the pages of the heap's free chunks back to the system, once
    start-up is over (and before workers are forked, which would each map
    them). Start-up frees a lot (every imported module's code was read into
    a buffer, the command line's parser, the collection just made) and
    glibc keeps it resident: malloc_trim(0) releases every free page, not
    only the top of the heap (about 1 MiB of a read-only mount's 27, and of
    the peak that make bench measures)."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only
    if trim is not None:
        trim(0)


def _failed(sess: Session, ready: Readiness, msg: str) -> int:
    """An error ends the daemon: unmount whatever is still mounted; before
    readiness the error goes to the waiting parent, which prints it as its
    one line; after it, to the log (never lost: see cli._setup_logging)."""
    sess.detach = True
    ready.fail(msg)
    return 1


def _init_fuse(ops: Operations, mountpoint: str, fuse_options: set[str]) -> None:
    """pyfuse3.init, with what libfuse and fusermount3 print on stderr made
    part of the one error line instead of extra lines of their own. Our own
    log lines written meanwhile (pyfuse3 logs through `logging`) still go to
    the real stderr, not into what is captured."""
    with tempfile.TemporaryFile() as captured:
        saved = os.dup(2)
        real_stderr = os.fdopen(os.dup(saved), "w", buffering=1)
        redirected = [h for h in logging.getLogger().handlers
                      if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is sys.stderr]
        for h in redirected:
            h.setStream(real_stderr)
        os.dup2(captured.fileno(), 2)
        try:
            pyfuse3.init(ops, mountpoint, fuse_options)
            error = None
        except (RuntimeError, OSError) as e:
            error = e
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            for h in redirected:
                h.setStream(sys.stderr)
            real_stderr.close()
        captured.seek(0)
        text = captured.read().decode("utf-8", "replace").strip()
    if error is not None:
        raise RuntimeError(text.splitlines()[-1] if text else str(error))
    if text:
        log.warning("%s", " / ".join(text.splitlines()))


async def _run_fuse(scope: trio.CancelScope) -> None:
    """Serve requests; returns when the mount goes away (umount, fusermount3 -u)."""
    await pyfuse3.main(min_tasks=1, max_tasks=16)
    scope.cancel()


# ---- stopping ---------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _umount2(path: str) -> int:
    """umount2(PATH, 0): 0, or the errno. Never MNT_DETACH."""
    if _libc.umount2(os.fsencode(path), 0) == 0:
        return 0
    return ctypes.get_errno()


async def _try_unmount(sess: Session) -> bool:
    """One non-lazy unmount attempt; True if the mount is gone (the FUSE loop
    then ends by itself)."""
    top = mounts.find(sess.mountpoint)
    if top is None or (sess.dev is not None and top.dev != sess.dev):
        if top is not None:
            log.warning("%s: another filesystem is mounted on top of ours: not unmounting it",
                        sess.mountpoint)
            return False
        return True
    if os.geteuid() == 0:
        err = await trio.to_thread.run_sync(_umount2, sess.mountpoint)
        if err in (0, errno.EINVAL, errno.ENOENT):
            return True
        if err != errno.EBUSY:
            log.warning("cannot unmount %s: %s", sess.mountpoint, os.strerror(err))
        return False
    p = await trio.run_process(["fusermount3", "-u", sess.mountpoint], capture_stdout=True,
                               capture_stderr=True, check=False)
    if p.returncode == 0:
        return True
    text = p.stderr.decode("utf-8", "replace").strip()
    if "busy" not in text.lower():
        log.warning("cannot unmount %s: %s", sess.mountpoint, text or f"fusermount3 exit {p.returncode}")
    return False


async def _flush(image: Image) -> None:
    """Everything written so far durable in the image (shielded: a flush is
    never left half done)."""
    with trio.CancelScope(shield=True):
        await image.flush()


async def _stop(sess: Session) -> None:
    """Flush, then unmount when nothing holds the mount; keep serving until then."""
    t0 = time.monotonic()
    await _flush(sess.image)
    log.info("everything written is flushed to %s (%.2fs); unmounting %s",
             sess.image.path, time.monotonic() - t0, sess.mountpoint)
    if await _try_unmount(sess):
        return
    for delay in QUICK_RETRIES:
        await trio.sleep(delay)
        if await _try_unmount(sess):
            return
    sess.busy_since = time.monotonic()
    held_by = await trio.to_thread.run_sync(mounts.holders, sess.mountpoint)
    log.warning("%s is busy (%s): still serving; it is unmounted and the daemon exits as soon "
                "as it is released (a second signal within %gs, or `qcowfs umount --force`, "
                "detaches it anyway)", sess.mountpoint,
                "; ".join(held_by) or "held by something this process cannot see", FORCE_WINDOW)
    while True:
        await trio.sleep(BUSY_POLL)
        await _flush(sess.image)
        if await _try_unmount(sess):
            log.info("%s was released after %.1fs: unmounted", sess.mountpoint,
                     time.monotonic() - sess.busy_since)
            return


async def _force(sess: Session, why: str) -> None:
    """Detach anyway, after a flush: the explicit, lossy-for-the-holders way."""
    await _flush(sess.image)
    held_by = mounts.holders(sess.mountpoint)
    log.warning("%s: flushed; detaching %s%s", why, sess.mountpoint,
                f" although it is still in use ({'; '.join(held_by)})" if held_by else "")
    sess.detach = True
    sess.workers.kill()
    pyfuse3.terminate()


async def _watch_signals(sess: Session, pending: list[int]) -> None:
    """SIGTERM/SIGINT/SIGHUP: flush and unmount when free (see the module
    docstring); a second one within FORCE_WINDOW, or SIGUSR1: detach anyway."""
    last_stop: float | None = None
    force: str | None = None
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(*STOP_SIGNALS, FORCE_SIGNAL) as signals:
            while force is None:
                if pending:
                    signum = pending.pop(0)
                else:
                    async for signum in signals:
                        break
                name = signal.Signals(signum).name
                now = time.monotonic()
                if signum == FORCE_SIGNAL:
                    force = f"received {name} (qcowfs umount --force)"
                elif last_stop is not None and now - last_stop < FORCE_WINDOW:
                    force = f"received a second stop signal ({name}) within {FORCE_WINDOW:g}s"
                else:
                    last_stop = now
                    if not sess.stopping:
                        sess.stopping = True
                        log.info("received %s: flushing, then unmounting", name)
                        nursery.start_soon(_stop, sess)
            nursery.cancel_scope.cancel()
    await _force(sess, force)


async def _shutdown(image: Image) -> None:
    with trio.CancelScope(shield=True):
        await image.close()


def _detach_stdio() -> None:
    fd = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(fd, target)
    os.close(fd)
