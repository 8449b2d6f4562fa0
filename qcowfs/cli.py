"""Command line: mount (daemonizing once ready), umount, info, check.

Every failure ends as one line on stderr and a non-zero exit, never a
traceback. `qcowfs IMAGE MOUNTPOINT -o OPTS` (no subcommand) is the form
mount.fuse3 uses for `mount -t fuse.qcowfs`.
"""
from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import os
import signal
import stat
import sys
import time
from dataclasses import dataclass, field
from typing import NoReturn, Sequence

from . import __version__
from .errors import QcowError
from .image import DEFAULT_L2_CACHE_BYTES, Image, OpenOptions

log = logging.getLogger("qcowfs")
SUBCOMMANDS = ("mount", "umount", "info", "check")
# Options mount(8) and systemd pass along that mean nothing to us.
GENERIC_OPTIONS = {"rw", "ro", "dev", "suid", "atime", "auto", "nofail", "_netdev",
                   "defaults", "relatime", "strictatime", "lazytime", "user", "users", "owner",
                   "diratime", "async", "sync"}
DEFAULT_READ_AROUND = 256 << 10
RUN_DIR_CANDIDATES = ("/run/qcowfs", f"/tmp/qcowfs-{os.getuid()}")


class UsageError(QcowError):
    pass


def die(msg: str, code: int = 1) -> NoReturn:
    print(f"qcowfs: {msg}", file=sys.stderr)
    sys.exit(code)


def parse_size(text: str) -> int:
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    suffix = t[-1:] if t[-1:] in units and not t[-1:].isdigit() else ""
    try:
        value = int(float(t[: len(t) - len(suffix)]) * units[suffix])
    except ValueError:
        raise UsageError(f"invalid size '{text}'") from None
    if value <= 0:
        raise UsageError(f"invalid size '{text}'")
    return value


@dataclass
class MountOptions:
    read_only: bool = False
    allow_other: bool = False
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    umask: int = 0o022
    l2_cache_bytes: int = DEFAULT_L2_CACHE_BYTES
    read_around: int = DEFAULT_READ_AROUND
    page_cache: bool = False
    noexec: bool = False
    debug: bool = False

    def apply(self, opts: str) -> None:
        for opt in filter(None, opts.split(",")):
            key, _, value = opt.partition("=")
            if key == "ro":
                self.read_only = True
            elif key == "rw":
                self.read_only = False
            elif key == "allow_other":
                self.allow_other = True
            elif key in ("default_permissions", "fsname", "subtype"):
                pass
            elif key in ("uid", "gid", "umask"):
                try:
                    setattr(self, key, int(value, 8 if key == "umask" else 10))
                except ValueError:
                    raise UsageError(f"invalid value for option {key}: '{value}'") from None
            elif key in ("l2_cache_size", "l2-cache-size"):
                self.l2_cache_bytes = parse_size(value)
            elif key == "read_around":
                self.read_around = 0 if value.strip() in ("0", "off") else parse_size(value)
                if self.read_around & (self.read_around - 1) or self.read_around % 4096:
                    raise UsageError("read_around must be 0 or a power of two of at least 4K")
            elif key in ("exec", "noexec"):
                self.noexec = key == "noexec"
            elif key == "page_cache":
                self.page_cache = True
            elif key == "debug":
                self.debug = True
            elif (key in GENERIC_OPTIONS or key.startswith("no") and key[2:] in GENERIC_OPTIONS
                  or key.startswith("x-systemd.") or key.startswith("x-") or key == "noatime"):
                pass
            else:
                raise UsageError(f"unknown mount option '{opt}'")


# ---- mount --------------------------------------------------------------------

def _mountinfo() -> list[tuple[str, str, str, str]]:
    """(major:minor, mount point, fstype, source) of every mount."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            a, b = left.split(), right.split()
            unescape = lambda s: s.encode().decode("unicode_escape")  # noqa: E731
            out.append((a[2], unescape(a[4]), b[0], unescape(b[1]) if len(b) > 1 else ""))
    return out


def _check_mountpoint(image_path: str, mountpoint: str) -> None:
    try:
        st = os.stat(mountpoint)
    except FileNotFoundError:
        raise UsageError(f"mount point {mountpoint} does not exist") from None
    except OSError as e:
        raise UsageError(f"mount point {mountpoint}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"mount point {mountpoint} is not a directory")
    for _dev, mp, fstype, source in _mountinfo():
        if mp == mountpoint and fstype.startswith("fuse") and source == image_path:
            raise UsageError(f"{image_path} is already mounted on {mountpoint}")


def _fuse_options(image_path: str, opts: MountOptions) -> set[str]:
    s = {"fsname=" + image_path.replace(",", "\\,"), "subtype=qcowfs", "noatime"}
    if opts.read_only:
        s.add("ro")
    if opts.noexec:
        s.add("noexec")  # nosuid and nodev: always, FUSE's own defaults
    if opts.allow_other:
        s |= {"allow_other", "default_permissions"}
    return s


def run_dir() -> str:
    for d in RUN_DIR_CANDIDATES:
        try:
            os.makedirs(d, mode=0o755, exist_ok=True)
            if os.access(d, os.W_OK):
                return d
        except OSError:
            continue
    return "/tmp"


def _pidfile(dev: str) -> str:
    return os.path.join(run_dir(), dev.replace(":", "_") + ".pid")


def cmd_mount(image_arg: str, mountpoint_arg: str, opts: MountOptions, foreground: bool) -> int:
    from .daemon import serve  # pyfuse3 is only needed here

    image_path = os.path.abspath(image_arg)
    mountpoint = os.path.abspath(mountpoint_arg)
    _check_mountpoint(image_path, mountpoint)
    image = open_image(image_arg, OpenOptions(read_only=opts.read_only, l2_cache_bytes=opts.l2_cache_bytes))
    if foreground:
        _setup_logging(opts.debug, daemon=False)
        return serve(image, mountpoint, opts, _fuse_options(image_path, opts), ready_fd=None)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(r)
        os.setsid()
        _setup_logging(opts.debug, daemon=True)
        code = 1
        try:
            code = serve(image, mountpoint, opts, _fuse_options(image_path, opts), ready_fd=w)
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        msg = f.read().decode("utf-8", "replace")
    if msg.startswith("OK"):
        return 0
    os.waitpid(pid, 0)
    die(msg.strip() or "the daemon exited before the mount was ready")


def open_image(image_arg: str, options: OpenOptions) -> Image:
    """Open IMAGE; errors about its contents name the file."""
    try:
        return Image(os.path.abspath(image_arg), options)
    except QcowError as e:
        msg = str(e)
        if image_arg not in msg and os.path.abspath(image_arg) not in msg:
            msg = f"{image_arg}: {msg}"
        raise type(e)(msg) from None


def _setup_logging(debug: bool, daemon: bool) -> None:
    level = logging.DEBUG if debug else logging.INFO
    handler: logging.Handler
    if daemon and os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter("qcowfs[%(process)d]: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("qcowfs: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("pyfuse3").setLevel(logging.DEBUG if debug else logging.WARNING)


# ---- umount -------------------------------------------------------------------

def cmd_umount(mountpoint_arg: str) -> int:
    import subprocess

    mountpoint = os.path.abspath(mountpoint_arg)
    entry = next((m for m in _mountinfo() if m[1] == mountpoint and m[2] == "fuse.qcowfs"), None)
    if entry is None:
        raise UsageError(f"{mountpoint} is not a qcowfs mount")
    pidfile = _pidfile(entry[0])
    try:
        with open(pidfile) as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        pid = 0
    cmd = ["umount", mountpoint] if os.geteuid() == 0 else ["fusermount3", "-u", mountpoint]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise QcowError((p.stderr.strip().splitlines() or [f"cannot unmount {mountpoint}"])[-1])
    deadline = time.monotonic() + 600
    while pid and _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if pid and _alive(pid):
        raise QcowError(f"daemon {pid} did not exit after the unmount")
    return 0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


# ---- info and check -------------------------------------------------------------

def cmd_info(image_arg: str, as_json: bool) -> int:
    import trio

    from .info import describe, render

    image = open_image(image_arg, OpenOptions(read_only=True))
    try:
        d = describe(image)
    finally:
        trio.run(image.close)
    d["filename"] = image_arg
    print(json.dumps(d, indent=4) if as_json else render(d))
    return 0


def cmd_check(image_arg: str, repair: bool, as_json: bool) -> int:
    from .check import run_check

    return run_check(os.path.abspath(image_arg), repair=repair, as_json=as_json)


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

    i = sub.add_parser("info", help="show what qemu-img info shows",
                       description="Show the image's format, sizes, features, backing chain, "
                                   "snapshots and bitmaps.")
    i.add_argument("image", metavar="IMAGE")
    i.add_argument("--json", action="store_true", help="machine-readable output (qemu-img's keys)")

    c = sub.add_parser("check", help="check refcounts and flags like qemu-img check",
                       description="Check the image's metadata. Exit codes as qemu-img check: "
                                   "0 clean, 1 check failed, 2 corruptions, 3 leaks only.")
    c.add_argument("image", metavar="IMAGE")
    c.add_argument("--repair", action="store_true", help="fix leaks, refcounts and COPIED flags")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _mount_args(m: argparse.ArgumentParser) -> None:
    m.add_argument("-r", "--read-only", action="store_true",
                   help="serve everything read-only; the image is never written")
    m.add_argument("-f", "--foreground", action="store_true",
                   help="stay attached (for systemd and debugging); logs go to stderr")
    m.add_argument("-d", "--debug", action="store_true", help="log every FUSE request")
    m.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]",
                   help="ro, rw, allow_other, uid=N, gid=N, umask=OCTAL, l2_cache_size=SIZE "
                        "(default 32M), read_around=SIZE (default 256K, 0 = off), page_cache, debug; "
                        "mount(8)/systemd generic options are accepted")


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
    return cmd_mount(a.image, a.mountpoint, opts, a.foreground)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        if argv and not argv[0].startswith("-") and argv[0] not in SUBCOMMANDS:
            return _mount_from_args(_helper_parser().parse_args(argv))
        a = build_parser().parse_args(argv)
        if a.command == "mount":
            return _mount_from_args(a)
        if a.command == "umount":
            return cmd_umount(a.mountpoint)
        if a.command == "info":
            return cmd_info(a.image, a.json)
        if a.command == "check":
            return cmd_check(a.image, a.repair, a.json)
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
