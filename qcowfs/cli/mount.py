"""`qcowfs mount` (daemonizing once ready), `qcowfs umount`, and the daemon's log.

A mount is a client of the public API: it opens `qcowfs.aio.Image` here,
before the fork, so that every error about the image is this command's one
line, and the daemon (service/daemon.py) serves that image's disks.
"""
from __future__ import annotations

import errno
import logging
import os
import signal
import stat
import sys
import time
from typing import Any

from ..errors import QcowError, UsageError
from ..host import mounts
from ..host.logs import logger
from ..service.options import FORCE_SHARE_WARNING, ROOT_LOG_FILE, MountOptions
from .commands import die, open_image

log = logger()


# ---- mount --------------------------------------------------------------------

def _check_mountpoint(image_path: str, mountpoint: str) -> None:
    try:
        st = os.stat(mountpoint)
    except FileNotFoundError:
        raise UsageError(f"mount point {mountpoint} does not exist") from None
    except OSError as e:
        raise UsageError(f"mount point {mountpoint}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"mount point {mountpoint} is not a directory")
    where, source = mounts.canonical(mountpoint), mounts.fsname(image_path)
    for m in mounts.mounts():
        if m.mountpoint == where and m.fstype.startswith("fuse") and m.source == source:
            raise UsageError(f"{image_path} is already mounted on {mountpoint}")
    on = mounts.find(where, mounts.FSTYPE)
    if on is not None:  # (mount(8) refuses to stack too: one mount per mount point)
        raise UsageError(f"{mountpoint} is already a qcowfs mount (of {mounts.fsname_decode(on.source)}): "
                         f"unmount it first (qcowfs umount {mountpoint})")


def _check_run_dir() -> None:
    """The daemon needs a private run directory for its pid file and control
    socket (umount waits by the one, snapshot/bitmap/info of the mount point
    talk through the other): refused here, before anything is mounted."""
    problem = mounts.run_dir_problem()
    if problem is not None:
        raise UsageError(f"no private run directory for the mount's daemon ({problem}): remove it, "
                         "or set XDG_RUNTIME_DIR to a directory of yours")


def _fuse_options(image_path: str, opts: MountOptions) -> set[str]:
    """The options for pyfuse3.init: ASCII only (see mounts.fsname), with
    libfuse's option escapes for backslash and comma."""
    name = mounts.fsname(image_path).replace("\\", "\\\\").replace(",", "\\,")
    s = {"fsname=" + name, "subtype=qcowfs", "noatime"}
    if opts.read_only:
        s.add("ro")
    if opts.noexec:
        s.add("noexec")  # nosuid and nodev: always, FUSE's own defaults
    if opts.allow_other:
        s |= {"allow_other", "default_permissions"}
    return s


def _daemon() -> tuple[Any, Any]:
    """The serving side, which needs pyfuse3 (only a mount does): one line
    saying so when it is missing, as everything else works without it."""
    try:
        from ..service.daemon import Readiness, serve
    except ImportError as e:
        if "pyfuse3" not in str(e):
            raise
        raise UsageError("qcowfs mount needs pyfuse3 and libfuse3, which are not installed "
                         "(`make install` installs both; the Python library works without them)") from None
    return Readiness, serve


def cmd_mount(image_arg: str, mountpoint_arg: str, opts: MountOptions, foreground: bool) -> int:
    Readiness, serve = _daemon()
    image_path = os.path.abspath(image_arg)
    mountpoint = os.path.abspath(mountpoint_arg)
    _check_mountpoint(image_path, mountpoint)
    _check_run_dir()
    from ..host.secret import passphrase_source

    mode = "r" if opts.image_read_only else "r+"
    try:
        image = open_image(image_arg, mode, l2_cache_size=opts.l2_cache_bytes, force_share=opts.force_share,
                           passphrase=passphrase_source(opts.key_files, opts.key_credentials))
    except (QcowError, OSError) as e:
        # (not a wrong passphrase, also EACCES: the image file itself)
        if (mode == "r+" and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
                and os.access(image_arg, os.R_OK) and not os.access(image_arg, os.W_OK)):
            why = "is on a read-only filesystem" if e.errno == errno.EROFS else "cannot be written by you"
            raise UsageError(f"{image_arg} {why}: open it read-only with -r (or -o ro), or with "
                             "-o scratch for throwaway writes") from None
        raise
    if not foreground:  # (a foreground daemon logs these to stderr itself)
        from ..fs.operations import STOCK_PYFUSE3_WARNING, pyfuse3_patched

        if opts.force_share:
            print(f"qcowfs: warning: {image_arg}: {FORCE_SHARE_WARNING}", file=sys.stderr)
        if not pyfuse3_patched():
            print(f"qcowfs: warning: {STOCK_PYFUSE3_WARNING}", file=sys.stderr)
    if opts.log_file is not None:
        _refuse_log_in_image(opts.log_file, image)
    fuse_options = _fuse_options(image_path, opts)
    if foreground:
        _setup_logging(opts, daemon=False)
        return serve(image, mountpoint, opts, fuse_options, Readiness(None))
    # The log is opened here, before the fork, so that a log file that cannot
    # be written is this command's error, not a silent daemon.
    _setup_logging(opts, daemon=True)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(r)
        ready = Readiness(w)
        code = 1
        try:
            os.setsid()
            code = serve(image, mountpoint, opts, fuse_options, ready)
        except BaseException as e:  # noqa: BLE001 - the parent must hear why
            ready.fail(f"daemon failed: {type(e).__name__}: {e}")
        finally:
            logging.shutdown()
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        msg = f.read().decode("utf-8", "replace")
    if msg.startswith("OK"):
        # Nothing is left to do here: skip the interpreter's teardown, which
        # with numpy and trio loaded adds a tenth of a second to every mount.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if not msg.strip():
        msg = (f"the daemon was killed by {signal.Signals(os.WTERMSIG(status)).name} before the mount was ready"
               if os.WIFSIGNALED(status) else
               f"the daemon exited ({os.WEXITSTATUS(status)}) before the mount was ready")
    die(msg.strip().splitlines()[-1])


def _refuse_log_in_image(log_file: str, image: Any) -> None:
    """The log is appended to its file: never one of the image's own files
    (the daemon appended its lines to disk.qcow2 itself)."""
    from ..host.hostfile import same_file
    from ..host.waiting import drive

    for f in image.files:
        if same_file(log_file, f):
            drive(image.close())
            raise UsageError(f"log_file {log_file} is a file of the image: the log would be written into it")


def default_log_files() -> list[str]:
    """Where a daemon logs when there is no syslog, first that can be written:
    /var/log/qcowfs.log for root; $XDG_STATE_HOME/qcowfs/qcowfs.log
    (~/.local/state/qcowfs/qcowfs.log) for others, else the run directory's
    qcowfs.log (/tmp/qcowfs-UID/, for users without a home)."""
    if os.geteuid() == 0:
        return [ROOT_LOG_FILE]
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    files = [os.path.join(state, "qcowfs", "qcowfs.log")]
    run = mounts.run_dir()
    if run is not None:
        files.append(os.path.join(run, "qcowfs.log"))
    return files


def _file_handler(path: str) -> logging.Handler:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8", errors="backslashreplace")
    handler.setFormatter(logging.Formatter("%(asctime)s qcowfs[%(process)d]: %(message)s"))
    return handler


def _syslog_handler() -> logging.Handler | None:
    """A handler for the local syslog socket, or None if there is none (no
    /dev/log, or nothing listens on it: containers, minimal hosts)."""
    import logging.handlers  # (only a mount needs it: other commands start faster)

    try:
        if not stat.S_ISSOCK(os.stat("/dev/log").st_mode):
            return None
        handler = logging.handlers.SysLogHandler(address="/dev/log",
                                                 facility=logging.handlers.SysLogHandler.LOG_DAEMON)
    except OSError:
        return None
    handler.setFormatter(logging.Formatter("qcowfs[%(process)d]: %(message)s"))
    return handler


def _setup_logging(opts: MountOptions, daemon: bool) -> None:
    """Foreground: stderr. Daemon: -o log_file=PATH if given, else syslog if
    there is one, else the first of default_log_files() that can be opened.
    A log file that cannot be opened is an error of the mount command (it is
    opened before the fork): a daemon never runs without a log."""
    level = logging.DEBUG if opts.debug else logging.INFO
    handler: logging.Handler | None = None
    if daemon and opts.log_file is None:
        handler = _syslog_handler()
    if daemon and handler is None:
        candidates = [opts.log_file] if opts.log_file else default_log_files()
        for path in candidates:
            try:
                handler = _file_handler(path)
                break
            except OSError as e:
                error = f"cannot open the log file {path}: {e.strerror}"
        else:
            raise QcowError(error)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("qcowfs: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("pyfuse3").setLevel(logging.DEBUG if opts.debug else logging.WARNING)


# ---- umount -------------------------------------------------------------------

def cmd_umount(mountpoint_arg: str, force: bool = False) -> int:
    """Unmount and wait for the daemon to have flushed and exited. A busy
    mount is refused (saying what holds it) unless FORCE: then the daemon
    flushes and detaches it anyway."""
    import subprocess

    mountpoint = os.path.abspath(mountpoint_arg)
    entry = mounts.find(mountpoint, mounts.FSTYPE)
    if entry is None:
        raise UsageError(f"{mountpoint} is not a qcowfs mount")
    owner = mounts.fuse_owner(entry)
    if os.geteuid() != 0 and owner is not None and owner != os.geteuid():
        raise UsageError(f"{mountpoint} was mounted by {mounts.user_name(owner)}: only that user "
                         "or root can unmount it")
    pid = mounts.read_pid(entry.dev)
    if force:
        if pid is not None:
            os.kill(pid, signal.SIGUSR1)
        else:  # no daemon we know of: detaching is all there is to do
            cmd = ["umount", "-l", mountpoint] if os.geteuid() == 0 else ["fusermount3", "-uz", mountpoint]
            subprocess.run(cmd, capture_output=True)
    else:
        cmd = ["umount", mountpoint] if os.geteuid() == 0 else ["fusermount3", "-u", mountpoint]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            err = (p.stderr.strip().splitlines() or [f"cannot unmount {mountpoint}"])[-1]
            if "busy" in err.lower():
                held = mounts.holders(mountpoint, exclude=(pid,) if pid else ())
                raise QcowError(f"{mountpoint} is busy ({'; '.join(held) or 'in use'}): not unmounted; "
                                "`qcowfs umount --force` flushes and detaches it anyway")
            raise QcowError(err)
    deadline = time.monotonic() + 600
    while pid and mounts.alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if pid and mounts.alive(pid):
        raise QcowError(f"daemon {pid} did not exit after the unmount")
    return 0



