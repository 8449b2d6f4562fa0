"""The `qcowfs` command line: the parser and the dispatch.

Every failure ends as one line on stderr and a non-zero exit, never a
traceback. `qcowfs IMAGE MOUNTPOINT -o OPTS` (no subcommand) is the form
mount.fuse3 uses for `mount -t fuse.qcowfs`. The commands themselves:
mount.py (mount, umount) and commands.py (everything on an image or a
mount point).
"""
from __future__ import annotations

import argparse
import difflib
import os
import re
import signal
import sys
from typing import NoReturn, Sequence

from .. import __version__
from ..errors import QcowError
from ..service.options import MountOptions
from .commands import cmd_bitmap, cmd_check, cmd_checkpoint, cmd_info, cmd_map, cmd_snapshot, die
from .lifecycle import cmd_commit, cmd_rebase, cmd_resize, lifecycle_parsers
from .mount import ROOT_LOG_FILE, cmd_mount, cmd_umount

SUBCOMMANDS = ("mount", "umount", "info", "check", "snapshot", "bitmap", "checkpoint", "map",
               "commit", "rebase", "resize")


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
    sn = sub.add_parser("snapshot", help="create, delete, apply or list internal snapshots (qemu-img snapshot)",
                        description=f"Internal snapshots of TARGET: {target}.")
    sn.add_argument("action", choices=("create", "delete", "apply", "list"),
                    help="apply: revert the disk to snapshot NAME (qemu-img snapshot -a; on a mount "
                         "point only while disk.raw is not open)")
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
    lifecycle_parsers(sub)
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
        if argv[:1] == ["resize"] and len(argv) > 2 and re.fullmatch(r"-[0-9.]+[a-zA-Z]*", argv[-1]):
            argv[-1:-1] = ["--"]  # (a negative SIZE is not an option, as in qemu-img resize)
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
        if a.command == "commit":
            return cmd_commit(a)
        if a.command == "rebase":
            return cmd_rebase(a)
        if a.command == "resize":
            return cmd_resize(a)
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
