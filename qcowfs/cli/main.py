"""Command line: mount (daemonizing once ready), umount, info, check.

Every failure ends as one line on stderr and a non-zero exit, never a
traceback. `qcowfs IMAGE MOUNTPOINT -o OPTS` (no subcommand) is the form
mount.fuse3 uses for `mount -t fuse.qcowfs`.
"""
from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import re
import signal
import stat
import sys
import time
from typing import TYPE_CHECKING, Any, NoReturn, Sequence

from .. import __version__
from ..host import mounts
from ..errors import QcowError, UsageError
from ..service.options import FORCE_SHARE_WARNING, MountOptions, parse_size

if TYPE_CHECKING:
    from ..engine.image import Image, OpenOptions

log = logging.getLogger("qcowfs")
SUBCOMMANDS = ("mount", "umount", "info", "check", "snapshot", "bitmap", "checkpoint", "map")
# What the daemon logs to when there is no syslog (no /dev/log) and no -o log_file=.
ROOT_LOG_FILE = "/var/log/qcowfs.log"
def die(msg: str, code: int = 1) -> NoReturn:
    print(f"qcowfs: {msg}", file=sys.stderr)
    sys.exit(code)


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


def cmd_mount(image_arg: str, mountpoint_arg: str, opts: MountOptions, foreground: bool) -> int:
    from ..service.daemon import Readiness, serve  # pyfuse3 is only needed here

    image_path = os.path.abspath(image_arg)
    mountpoint = os.path.abspath(mountpoint_arg)
    _check_mountpoint(image_path, mountpoint)
    from ..engine.image import OpenOptions
    from ..host.secret import passphrase_source

    image = open_image(image_arg, OpenOptions(
        read_only=opts.image_read_only, l2_cache_bytes=opts.l2_cache_bytes, force_share=opts.force_share,
        passphrase=passphrase_source(image_arg, opts.key_file, opts.key_credential)))
    if opts.force_share and not foreground:
        print(f"qcowfs: warning: {image_arg}: {FORCE_SHARE_WARNING}", file=sys.stderr)
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


def open_image(image_arg: str, options: "OpenOptions") -> "Image":
    """Open IMAGE; errors about its contents name the file; what a read-only
    open left out (a damaged snapshot table...) is one warning line each.
    (The image code is imported here: commands that talk to a daemon start fast.)"""
    from ..engine.image import Image

    try:
        image = Image(os.path.abspath(image_arg), options)
    except QcowError as e:
        msg = str(e)
        if image_arg not in msg and os.path.abspath(image_arg) not in msg:
            msg = f"{image_arg}: {msg}"
        raise type(e)(msg) from None
    for warning in image.warnings:
        print(f"qcowfs: warning: {image_arg}: {warning}", file=sys.stderr)
    return image


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


# ---- info and check -------------------------------------------------------------

def cmd_info(image_arg: str, as_json: bool, force_share: bool = False) -> int:
    """FORCE_SHARE (-U) takes no image lock, as qemu-img -U: to inspect an
    image a VM or a mount holds."""
    import trio

    from ..engine.info import describe, render

    from ..engine.image import OpenOptions

    image = open_image(image_arg, OpenOptions(read_only=True, force_share=force_share))
    try:
        d = describe(image)
    finally:
        trio.run(image.close)
    d["filename"] = image_arg
    print(json.dumps(d, indent=4) if as_json else render(d))
    return 0


def cmd_check(image_arg: str, repair: bool, as_json: bool, force_share: bool = False) -> int:
    from ..engine.check import run_check

    if force_share and repair:
        raise UsageError("-U (force share) cannot be used with --repair: a repair must own the image")
    return run_check(os.path.abspath(image_arg), repair=repair, as_json=as_json, force_share=force_share)


# ---- snapshots, bitmaps, checkpoints -----------------------------------------------

def cmd_manage(target: str, request: dict[str, Any], writes: bool) -> dict[str, Any]:
    """Run REQUEST on TARGET: through the daemon if it is a qcowfs mount point,
    else on the image file TARGET, opened here (for writing if WRITES)."""
    from ..service import control

    if control.mounted(target) is not None:
        return control.request(target, **request)
    if os.path.isdir(target):
        raise UsageError(f"{target} is not a qcowfs mount point")
    import trio

    from ..service.manage import Manager

    from ..engine.image import OpenOptions

    image = _open_unmounted(target, OpenOptions(read_only=not writes))

    async def run() -> dict[str, Any]:
        try:
            return await Manager(image).handle(request)
        finally:
            await image.close()
    return trio.run(run)


def _open_unmounted(image_arg: str, options: "OpenOptions") -> "Image":
    """open_image, saying where the image is mounted if a qcowfs mount holds it."""
    from ..errors import ImageLockedError

    try:
        return open_image(image_arg, options)
    except ImageLockedError as e:
        source = mounts.fsname(os.path.abspath(image_arg))
        where = [m.mountpoint for m in mounts.mounts() if m.fstype == mounts.FSTYPE and m.source == source]
        if where:
            raise ImageLockedError(f"{image_arg} is mounted on {where[0]}: give the mount point "
                                   f"instead (qcowfs ... {where[0]})") from None
        raise e from None


def _print_snapshots(reply: dict[str, Any], as_json: bool) -> None:
    from .text import render_snapshots

    if as_json:
        print(json.dumps(reply["snapshots"], indent=4))
    elif reply["snapshots"]:
        print("\n".join(render_snapshots(reply["snapshots"])))


def cmd_snapshot(a: argparse.Namespace) -> int:
    if a.action == "list":
        _print_snapshots(cmd_manage(a.target, {"op": "snapshot-list"}, writes=False), a.json)
        return 0
    if a.name is None:
        raise UsageError(f"snapshot {a.action} needs a NAME")
    cmd_manage(a.target, {"op": f"snapshot-{a.action}", "name": a.name}, writes=True)
    return 0


def cmd_bitmap(a: argparse.Namespace) -> int:
    if a.action == "list":
        reply = cmd_manage(a.target, {"op": "bitmap-list"}, writes=False)
        if a.json:
            print(json.dumps(reply["bitmaps"], indent=4))
        for b in [] if a.json else reply["bitmaps"]:
            print(f"{b['name']}\tgranularity {b['granularity']}\tflags {','.join(b['flags']) or '-'}"
                  + (f"\tunusable: {b['problem']}" if b.get("problem") else ""))
        return 0
    if a.name is None:
        raise UsageError(f"bitmap {a.action} needs a NAME")
    request: dict[str, Any] = {"op": f"bitmap-{a.action}", "name": a.name}
    if a.action == "add":
        request.update(granularity=parse_size(a.granularity) if a.granularity else None,
                       enabled=not a.disable)
    elif a.sources and a.action != "merge":
        raise UsageError(f"bitmap {a.action} takes one NAME")
    if a.action == "merge":
        if not a.sources:
            raise UsageError("bitmap merge needs NAME and at least one SOURCE bitmap to merge into it")
        request["sources"] = a.sources
    cmd_manage(a.target, request, writes=True)
    return 0


def cmd_checkpoint(a: argparse.Namespace) -> int:
    reply = cmd_manage(a.target, {"op": "checkpoint", "name": a.name}, writes=True)
    if a.json:
        print(json.dumps(reply, indent=4))
    return 0


def cmd_map(a: argparse.Namespace) -> int:
    """The allocation map (qemu-img map's JSON), or with --bitmap the dirty map
    (nbdinfo's qemu:dirty-bitmap JSON). On a mount point it is read from the
    mount's maps/ files, so it shows the live state."""
    from ..service import control

    if a.snapshot and a.bitmap:
        raise UsageError("--snapshot and --bitmap cannot be combined (a bitmap tracks the active disk)")
    if control.mounted(a.target) is not None:
        entries = _map_from_mount(a.target, a.snapshot, a.bitmap)
    elif os.path.isdir(a.target):
        raise UsageError(f"{a.target} is not a qcowfs mount point")
    else:
        entries = _map_from_image(a.target, a.snapshot, a.bitmap, a.force_share)
    if a.output == "json":
        sys.stdout.write(("[" + ",\n".join(json.dumps(e) for e in entries) + "]\n"))
    elif a.bitmap:
        for e in entries:
            print(f"{e['offset']:>14} {e['length']:>14} {e['type']:>4}  {e['description']}")
    else:
        print(f"{'Offset':<16}{'Length':<16}{'Depth':<6}{'Kind':<12}Mapped to")
        for e in entries:
            kind = "data" if e["data"] else "zero" if e["present"] else "unallocated"
            print(f"{e['start']:<#16x}{e['length']:<#16x}{e['depth']:<6}{kind:<12}"
                  + (f"{e['offset']:#x}" if "offset" in e else "-"))
    return 0


def _map_from_mount(mountpoint: str, snapshot: str | None, bitmap: str | None) -> list[dict[str, Any]]:
    maps = os.path.join(mountpoint, "maps")
    if bitmap is not None:
        candidates = [os.path.join(maps, "bitmaps", f"{bitmap}.json")]
    elif snapshot is not None:
        candidates = [os.path.join(maps, "snapshots", f"{snapshot}.json"),
                      os.path.join(maps, "snapshots", f"id-{snapshot}.json")]
    else:
        candidates = [os.path.join(maps, "disk.json")]
    for path in candidates:
        try:
            with open(path, "rb") as f:
                return list(json.loads(f.read()))
        except FileNotFoundError:
            continue
    what = f"bitmap '{bitmap}'" if bitmap is not None else f"snapshot '{snapshot}'"
    raise UsageError(f"{mountpoint} has no {what}")


def _map_from_image(image_arg: str, snapshot: str | None, bitmap: str | None,
                    force_share: bool) -> list[dict[str, Any]]:
    import trio

    from ..engine import bitmap_ops, extents, snapshot_ops

    from ..engine.image import OpenOptions

    image = _open_unmounted(image_arg, OpenOptions(read_only=True, force_share=force_share))

    async def run() -> list[dict[str, Any]]:
        try:
            if bitmap is not None:
                return await extents.dirty_map(image.file, bitmap_ops.usable(bitmap_ops.find(image.bitmaps, bitmap)))
            entry = image.snapshots[snapshot_ops.find(image.meta, snapshot)] if snapshot is not None else None
            return await extents.disk_map(image, entry)
        finally:
            await image.close()
    return trio.run(run)


# ---- argument parsing -------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qcowfs",
        description="Mount a qcow2 disk image as plain files: disk.raw (the virtual disk), "
                    "snapshots/NAME.raw (internal snapshots) and bitmaps/NAME (dirty bitmaps).",
        epilog="`qcowfs IMAGE MOUNTPOINT -o OPTS` (no subcommand) mounts too: that is how "
               "`mount -t fuse.qcowfs` and /etc/fstab call it.")
    p.add_argument("--version", action="version", version=f"qcowfs {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    m = sub.add_parser("mount", help="mount an image (returns once the mount is ready)",
                       description="Mount IMAGE on MOUNTPOINT. Returns once the mount is ready; "
                                   "the daemon keeps serving until unmounted.")
    m.add_argument("image", metavar="IMAGE")
    m.add_argument("mountpoint", metavar="MOUNTPOINT")
    _mount_args(m)

    u = sub.add_parser("umount", help="unmount, flushing everything, and wait for the daemon",
                       description="Unmount MOUNTPOINT; returns once the daemon has flushed "
                                   "everything to the image and exited.")
    u.add_argument("mountpoint", metavar="MOUNTPOINT")
    u.add_argument("--force", action="store_true",
                   help="detach even if files are open or a loop device uses disk.raw "
                        "(the daemon flushes first; whatever still uses the mount gets errors)")

    i = sub.add_parser("info", help="show what qemu-img info shows",
                       description="Show the image's format, sizes, features, backing chain, "
                                   "snapshots and bitmaps.")
    i.add_argument("image", metavar="IMAGE")
    i.add_argument("--json", action="store_true", help="machine-readable output (qemu-img's keys)")
    i.add_argument("-U", "--force-share", action="store_true",
                   help="take no lock: inspect an image that a VM or a mount holds")

    c = sub.add_parser("check", help="check refcounts and flags like qemu-img check",
                       description="Check the image's metadata. Exit codes as qemu-img check: "
                                   "0 clean, 1 check failed, 2 corruptions, 3 leaks only.")
    c.add_argument("image", metavar="IMAGE")
    c.add_argument("--repair", action="store_true", help="fix leaks, refcounts and COPIED flags")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.add_argument("-U", "--force-share", action="store_true",
                   help="take no lock: check an image that a VM or a mount holds (results may be "
                        "inconsistent while it is written)")

    target = "an image file, or the mount point of a read-write mount (then the daemon does it " \
             "at one instant while the disk stays in use)"
    sn = sub.add_parser("snapshot", help="create, delete or list internal snapshots (qemu-img snapshot)",
                        description=f"Internal snapshots of TARGET: {target}.")
    sn.add_argument("action", choices=("create", "delete", "list"))
    sn.add_argument("target", metavar="TARGET")
    sn.add_argument("name", metavar="NAME", nargs="?")
    sn.add_argument("--json", action="store_true", help="list: machine-readable (qemu-img info's keys)")

    bm = sub.add_parser("bitmap", help="add, remove, clear, enable, disable, merge or list "
                                       "persistent dirty bitmaps (qemu-img bitmap)",
                        description=f"Persistent dirty bitmaps of TARGET: {target}. An enabled "
                                    "bitmap added to a mount tracks writes from that instant.")
    bm.add_argument("action", choices=("add", "remove", "clear", "enable", "disable", "merge", "list"))
    bm.add_argument("target", metavar="TARGET")
    bm.add_argument("name", metavar="NAME", nargs="?")
    bm.add_argument("sources", metavar="SOURCE", nargs="*", help="merge: bitmaps whose bits are added to NAME")
    bm.add_argument("-g", "--granularity", metavar="SIZE",
                    help="add: bytes per bit (default: the cluster size, clamped to 4K..64K, as QEMU)")
    bm.add_argument("--disable", action="store_true", help="add: a disabled bitmap (does not track writes)")
    bm.add_argument("--json", action="store_true", help="list: machine-readable")

    cp = sub.add_parser("checkpoint", help="snapshot NAME + frozen copies B@NAME of every enabled "
                                           "bitmap + a new bitmap NAME, in one commit",
                        description=f"A backup checkpoint of TARGET ({target}): at one instant, "
                                    "internal snapshot NAME, for every enabled bitmap B a disabled "
                                    "copy B@NAME holding B's bits, and a new enabled bitmap NAME.")
    cp.add_argument("target", metavar="TARGET")
    cp.add_argument("name", metavar="NAME")
    cp.add_argument("--json", action="store_true", help="print what was made")

    mp = sub.add_parser("map", help="allocation map (qemu-img map) or a bitmap's dirty extents",
                        description="The allocation map of TARGET (an image, or a mount point: then "
                                    "the live state) in qemu-img map --output=json's shape, backing "
                                    "chain included; with --bitmap, the dirty map in nbdinfo "
                                    "--map=qemu:dirty-bitmap:NAME --json's shape.")
    mp.add_argument("target", metavar="TARGET")
    mp.add_argument("--snapshot", metavar="NAME", help="map of an internal snapshot")
    mp.add_argument("--bitmap", metavar="NAME", help="dirty extents of a persistent bitmap")
    mp.add_argument("--output", choices=("human", "json"), default="human")
    mp.add_argument("-U", "--force-share", action="store_true",
                    help="take no lock: map an image that a VM holds (it may change meanwhile)")
    return p


def _mount_args(m: argparse.ArgumentParser) -> None:
    m.add_argument("-r", "--read-only", action="store_true",
                   help="serve everything read-only; the image is never written")
    m.add_argument("-f", "--foreground", action="store_true",
                   help="stay attached (for systemd and debugging); logs go to stderr")
    m.add_argument("-d", "--debug", action="store_true", help="log every FUSE request")
    m.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]",
                   help="ro, rw, allow_other, uid=USER, gid=GROUP (names or numbers), umask=OCTAL, "
                        "l2_cache_size=SIZE (default 32M), read_around=SIZE (default 256K, 0 = off), "
                        "page_cache, log_file=PATH (daemon log; default syslog, else "
                        f"{ROOT_LOG_FILE} for root), key_file=PATH or key_credential=NAME (passphrase "
                        "of an encrypted image; else asked on a terminal), debug, scratch (throwaway "
                        "writes; scratch_dir=DIR, scratch_size=SIZE), force_share (read-only: an image "
                        "another program writes); mount(8)/systemd generic options are accepted")


def _helper_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qcowfs", description="mount.fuse3 entry point")
    p.add_argument("image")
    p.add_argument("mountpoint")
    _mount_args(p)
    return p


def _mount_from_args(a: argparse.Namespace) -> int:
    opts = MountOptions()
    for o in a.options:
        opts.apply(o)
    if a.read_only:
        opts.read_only = True
    if a.debug:
        opts.debug = True
    opts.check()
    return cmd_mount(a.image, a.mountpoint, opts, a.foreground)


def _looks_like_command(word: str) -> bool:
    """`qcowfs WORD ...` without a known subcommand is mount.fuse3's form
    (WORD is the image) unless WORD looks like a mistyped command: a bare
    lowercase word that names no file."""
    return bool(re.fullmatch(r"[a-z][a-z-]*", word)) and not os.path.lexists(word)


def _unknown_command(word: str) -> NoReturn:
    close = difflib.get_close_matches(word, SUBCOMMANDS + ("unmount",), n=1)
    hint = f" (did you mean '{'umount' if close == ['unmount'] else close[0]}'?)" if close else ""
    die(f"unknown command '{word}'{hint}; commands: {', '.join(SUBCOMMANDS)} "
        "(or IMAGE MOUNTPOINT -o OPTIONS, as mount.fuse3 calls it); see qcowfs --help", 2)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    # qcowfs does no linear algebra: without this, importing numpy starts an
    # OpenBLAS thread per CPU (tens of ms of every mount's start, idle threads after).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        if argv and not argv[0].startswith("-") and argv[0] not in SUBCOMMANDS:
            if _looks_like_command(argv[0]):
                _unknown_command(argv[0])
            return _mount_from_args(_helper_parser().parse_args(argv))
        a = build_parser().parse_args(argv)
        if a.command == "mount":
            return _mount_from_args(a)
        if a.command == "umount":
            return cmd_umount(a.mountpoint, a.force)
        if a.command == "info":
            return cmd_info(a.image, a.json, a.force_share)
        if a.command == "check":
            return cmd_check(a.image, a.repair, a.json, a.force_share)
        if a.command == "snapshot":
            return cmd_snapshot(a)
        if a.command == "bitmap":
            return cmd_bitmap(a)
        if a.command == "checkpoint":
            return cmd_checkpoint(a)
        if a.command == "map":
            return cmd_map(a)
        build_parser().print_help()
        return 2
    except QcowError as e:
        die(str(e))
    except KeyboardInterrupt:
        die("interrupted", 130)
    except OSError as e:
        die(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
    except Exception as e:  # noqa: BLE001 - one line, never a traceback
        die(f"internal error: {type(e).__name__}: {e}")


if __name__ == "__main__":
    sys.exit(main())
