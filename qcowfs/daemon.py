"""The serving process: FUSE session, readiness, signals, clean shutdown.

Readiness is reported only once the mount answers a stat (to the parent of a
daemonized mount through a pipe, to systemd through NOTIFY_SOCKET). SIGTERM
and SIGINT end the session; then every cache is flushed and the image closed
before the process exits, whichever way the mount went away.
"""
from __future__ import annotations

import ctypes
import gc
import logging
import os
import signal
import socket
import subprocess
import tempfile
from typing import TYPE_CHECKING

import pyfuse3
import trio

from .errors import QcowError
from .fs import Access, Operations
from .image import Image
from .views import build_tree

if TYPE_CHECKING:
    from .cli import MountOptions

log = logging.getLogger("qcowfs")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


READAHEAD_KB = 1024


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


def _report(ready_fd: int | None, text: str) -> None:
    if ready_fd is None:
        return
    try:
        os.write(ready_fd, text.encode())
    finally:
        os.close(ready_fd)


def _write_pidfile(mountpoint: str) -> str | None:
    from .cli import _mountinfo, _pidfile

    for dev, mp, _fstype, _src in _mountinfo():
        if mp == mountpoint:
            path = _pidfile(dev)
            with open(path, "w") as f:
                f.write(f"{os.getpid()}\n")
            return path
    return None


def serve(image: Image, mountpoint: str, opts: "MountOptions", fuse_options: set[str],
          ready_fd: int | None) -> int:
    """Mount, serve until unmounted or signalled, flush, exit code."""
    ops = Operations(build_tree(image, opts.page_cache), Access(opts.uid, opts.gid, opts.umask),
                     debug=opts.debug, read_around=opts.read_around)
    # From the mount on, a signal must not kill us (that leaves a dead mount,
    # or a half-flushed image): until _watch_signals listens, and after it
    # stopped listening (while flushing), signals are only remembered.
    pending: list[int] = []
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda n, _frame: pending.append(n))
    try:
        _init_fuse(ops, mountpoint, fuse_options)
    except (RuntimeError, OSError) as e:
        if ready_fd is None:
            log.error("cannot mount on %s: %s", mountpoint, e)
        _report(ready_fd, f"cannot mount on {mountpoint}: {e}\n")
        trio.run(image.close)
        return 1
    state = {"unmount": False, "ready": False}
    pidfile: str | None = None

    async def main() -> None:
        nonlocal pidfile
        if not image.read_only:
            await image.prepare_writes()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, state, pending)
            nursery.start_soon(_run_fuse, nursery.cancel_scope)
            if opts.read_around:
                for _ in range(2):
                    nursery.start_soon(ops.push_worker)
            # abandon_on_cancel: a signal before the stat is answered ends the
            # FUSE loop, and the stat (then never answered) must not hold us.
            st = await trio.to_thread.run_sync(os.stat, mountpoint, abandon_on_cancel=True)
            _raise_readahead(st.st_dev)
            pidfile = _write_pidfile(mountpoint)
            if ready_fd is not None:
                _detach_stdio()
            _report(ready_fd, "OK\n")
            state["ready"] = True
            sd_notify("READY=1")
            log.info("serving %s on %s%s", image.path, mountpoint, " (read-only)" if opts.read_only else "")
        sd_notify("STOPPING=1")
        await _shutdown(image)

    # Everything alive now lives as long as the mount: keep it out of the
    # collector's way, so collections stay cheap on the request path.
    gc.collect()
    gc.freeze()
    _keep_big_buffers()
    code = 0
    try:
        trio.run(main)
    except QcowError as e:
        code = _failed(state, ready_fd, str(e))
    except BaseException as e:  # noqa: BLE001 - the exit must stay clean
        code = _failed(state, ready_fd, f"daemon failed: {type(e).__name__}: {e}")
    finally:
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
            if state["unmount"]:
                subprocess.run(["umount", "-l", mountpoint] if os.geteuid() == 0
                               else ["fusermount3", "-uz", mountpoint], capture_output=True)
            logging.shutdown()
            os._exit(code)
        pyfuse3.close(unmount=state["unmount"])
    return code


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


def _failed(state: dict[str, bool], ready_fd: int | None, msg: str) -> int:
    """An error ends the daemon: unmount whatever is still mounted; before
    readiness the error goes to the waiting parent, which prints it as its
    one line."""
    state["unmount"] = True
    if ready_fd is not None and not state["ready"]:
        _report(ready_fd, msg + "\n")
    else:
        log.error("%s", msg)
    return 1


def _init_fuse(ops: Operations, mountpoint: str, fuse_options: set[str]) -> None:
    """pyfuse3.init, with what libfuse and fusermount3 print on stderr made
    part of the one error line instead of extra lines of their own."""
    with tempfile.TemporaryFile() as captured:
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            pyfuse3.init(ops, mountpoint, fuse_options)
            error = None
        except (RuntimeError, OSError) as e:
            error = e
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        text = captured.read().decode("utf-8", "replace").strip()
    if error is not None:
        raise RuntimeError(text.splitlines()[-1] if text else str(error))
    if text:
        log.warning("%s", text)


async def _run_fuse(scope: trio.CancelScope) -> None:
    """Serve requests; returns when the mount goes away (umount, fusermount3 -u)."""
    await pyfuse3.main(min_tasks=1, max_tasks=16)
    scope.cancel()


async def _watch_signals(state: dict[str, bool], pending: list[int]) -> None:
    """SIGTERM/SIGINT/SIGHUP: let requests in flight finish, then unmount."""
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        if not pending:
            async for signum in signals:
                pending.append(signum)
                break
        log.info("received %s: unmounting", signal.Signals(pending[0]).name)
        state["unmount"] = True
        pyfuse3.terminate()


async def _shutdown(image: Image) -> None:
    with trio.CancelScope(shield=True):
        await image.close()
        log.info("image closed cleanly")


def _detach_stdio() -> None:
    fd = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(fd, target)
    os.close(fd)
