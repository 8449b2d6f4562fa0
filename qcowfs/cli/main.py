"""The `qcowfs` command line: the parser and the dispatch.

Every failure ends as one line on stderr and a non-zero exit, never a
traceback. `qcowfs IMAGE MOUNTPOINT -o OPTS` (no subcommand) is the form
mount.fuse3 uses for `mount -t fuse.qcowfs`. The commands themselves:
mount.py (mount, umount) and commands.py (everything on an image or a
mount point). mount.py and the mount options are imported by the mount
commands alone: the daemon's logging and options are no part of another
command's start (docs/speed.md).
"""
from __future__ import annotations

import argparse
import functools
import os
import re
import signal
import sys
from typing import Any, Callable, NoReturn, Sequence, TypeAlias

from .. import __version__
from ..errors import QcowError
from ..host.logs import hold
from .commands import (asks_option_help, cmd_bitmap, cmd_check, cmd_checkpoint, cmd_compare, cmd_convert, cmd_create,
                       cmd_dd,
                       cmd_info, cmd_map, cmd_measure, cmd_snapshot, die, print_option_help)
from .lifecycle import (amend_parser, check_cache_flags, cmd_amend, cmd_commit, cmd_rebase, cmd_resize, commit_parser,
                        object_flag, qemu_img_flags, rebase_parser, resize_parser)


# ---- argument parsing -------------------------------------------------------------

@functools.cache
def _help_width() -> int:
    """The width argparse gives help and usage: the terminal's (COLUMNS, else
    standard output's, else 80), less 2, as argparse takes it."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return (columns or 80) - 2


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help, as wide as the terminal, found without shutil:
    argparse asks shutil for the width of every formatter it makes (one per
    add_argument), and importing shutil loads bz2, lzma and fnmatch, some
    4 ms of every command's start (docs/speed.md)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position, _help_width() if width is None else width)


class RawDescriptionHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """argparse's RawDescriptionHelpFormatter, with HelpFormatter's width."""


class Parser(argparse.ArgumentParser):
    """The parser of `qcowfs` and of each command (a command's parser is
    made of its parent's class): HelpFormatter unless told otherwise."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The `qcowfs` parser with every command, or with the command ONLY
    alone: what `qcowfs COMMAND ...` needs (the other thirteen parsers cost some
    8 ms of every start, a sixth of a one-shot command; docs/speed.md)."""
    p = Parser(
        prog="qcowfs",
        description="Mount a qcow2 disk image as plain files: disk.raw (the virtual disk), "
                    "snapshots/NAME.raw (internal snapshots) and bitmaps/NAME (dirty bitmaps).",
        epilog="`qcowfs IMAGE MOUNTPOINT -o OPTS` (no subcommand) mounts too: that is how "
               "`mount -t fuse.qcowfs` and /etc/fstab call it.")
    p.add_argument("--version", action=_Version, nargs=0, help="show the version (and a word on pyfuse3 when "
                                                                "mounts cannot have everything) and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands",
                           description="`qcowfs COMMAND --help` describes each one")
    for name, add in COMMAND_PARSERS.items():
        if only is None or name == only:
            add(sub)
            if name in QUIET_COMMANDS:
                sub.choices[name].add_argument("-q", "--quiet", action="store_true",
                                               help="print nothing but errors and warnings (qemu-img's -q)")
    return p


# The commands that take qemu-img's -q (scripts written for qemu-img pass it).
QUIET_COMMANDS = ("check", "snapshot", "bitmap", "checkpoint", "create", "convert", "compare", "resize", "amend",
                  "commit", "rebase")


# One function per command, each adding that command's parser to SUB.
Sub: TypeAlias = "argparse._SubParsersAction[Parser]"
# What snapshot, bitmap and checkpoint act on.
TARGET = ("an image file, or the mount point of a read-write mount (then the daemon does it "
          "at one instant while the disk stays in use)")


def _mount_parser(sub: Sub) -> None:
    m = sub.add_parser("mount", help="mount an image (returns once the mount is ready)",
                       description="Mount IMAGE on MOUNTPOINT. Returns once the mount is ready; "
                                   "the daemon keeps serving until unmounted.",
                       epilog=mount_options_text(), formatter_class=RawDescriptionHelpFormatter)
    m.add_argument("image", metavar="IMAGE", help="the qcow2 image file")
    m.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing directory")
    _mount_args(m)


def _umount_parser(sub: Sub) -> None:
    u = sub.add_parser("umount", help="unmount, flushing everything, and wait for the daemon",
                       description="Unmount MOUNTPOINT; returns once the daemon has flushed "
                                   "everything to the image and exited.")
    u.add_argument("mountpoint", metavar="MOUNTPOINT", help="where a qcowfs mount is")
    u.add_argument("--force", action="store_true",
                   help="detach even if files are open or a loop device uses disk.raw "
                        "(the daemon flushes first; whatever still uses the mount gets errors)")


def _info_parser(sub: Sub) -> None:
    i = sub.add_parser("info", help="show what qemu-img info shows",
                       description="Show the image's format, sizes, features, backing chain, "
                                   "snapshots and bitmaps. IMAGE may be the mount point of a qcowfs "
                                   "mount: then the daemon describes the image it serves, as it is now.")
    i.add_argument("image", metavar="IMAGE", help="an image file, or the mount point of a qcowfs mount")
    i.add_argument("-f", dest="format", choices=("qcow2", "raw"),
                   help="IMAGE's format (default: probed as qemu-img probes: qcow2 if it starts with the "
                        "qcow2 magic, else raw)")
    i.add_argument("--json", action="store_true", help="machine-readable output (qemu-img's keys)")
    i.add_argument("--output", choices=("human", "json"), help="qemu-img's spelling: --output=json is --json")
    i.add_argument("--backing-chain", action="store_true",
                   help="every layer of the backing chain, top first, each named as qemu-img names it "
                        "(JSON: a list)")
    i.add_argument("-U", "--force-share", action="store_true",
                   help="take no lock: inspect an image that a VM or a mount holds")


def _check_parser(sub: Sub) -> None:
    c = sub.add_parser("check", help="check refcounts and flags like qemu-img check",
                       description="Check the image's metadata. Exit codes as qemu-img check: "
                                   "0 clean, 1 check failed, 2 corruptions, 3 leaks only. IMAGE may "
                                   "be the mount point of a qcowfs mount: then the daemon checks the "
                                   "image it serves (writes wait meanwhile; --repair needs an unmounted "
                                   "image).")
    c.add_argument("image", metavar="IMAGE", help="an image file, or the mount point of a qcowfs mount")
    c.add_argument("--repair", action="store_true", help="fix leaks, refcounts and COPIED flags (-r all)")
    c.add_argument("-r", dest="repair_mode", choices=("leaks", "all"),
                   help="qemu-img's spelling: -r all is --repair; -r leaks repairs an image whose only "
                        "errors are leaks, and changes nothing on one with corruptions (they are repaired "
                        "by -r all)")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.add_argument("--output", choices=("human", "json"), help="qemu-img's spelling: --output=json is --json")
    c.add_argument("-U", "--force-share", action="store_true",
                   help="take no lock: check an image that a VM or a mount holds (results may be "
                        "inconsistent while it is written)")
    qemu_img_flags(c, "IMAGE (raw: nothing to check, exit 63)", fmt=("qcow2", "raw"), source_cache=True)


def _snapshot_parser(sub: Sub) -> None:
    sn = sub.add_parser("snapshot", help="create, delete, apply or list internal snapshots (qemu-img snapshot)",
                        description=f"Internal snapshots of TARGET: {TARGET}.")
    sn.add_argument("action", choices=("create", "delete", "apply", "list"),
                    help="apply: revert the disk to snapshot NAME, an id first as qemu-img snapshot -a "
                         "takes it (on a mount point only while disk.raw is not open); delete: a name, "
                         "else an id")
    sn.add_argument("target", metavar="TARGET")
    sn.add_argument("name", metavar="NAME", nargs="?")
    sn.add_argument("--json", action="store_true", help="list: machine-readable (qemu-img info's keys)")
    sn.add_argument("-U", "--force-share", action="store_true",
                    help="list: take no lock (an image that a VM holds)")


def _bitmap_parser(sub: Sub) -> None:
    bm = sub.add_parser("bitmap", help="add, remove, clear, enable, disable, merge or list "
                                       "persistent dirty bitmaps (qemu-img bitmap)",
                        description=f"Persistent dirty bitmaps of TARGET: {TARGET}. An enabled "
                                    "bitmap added to a mount tracks writes from that instant.")
    bm.add_argument("action", choices=("add", "remove", "clear", "enable", "disable", "merge", "list"))
    bm.add_argument("target", metavar="TARGET")
    bm.add_argument("name", metavar="NAME", nargs="?")
    bm.add_argument("sources", metavar="SOURCE", nargs="*", help="merge: bitmaps whose bits are added to NAME")
    bm.add_argument("-g", "--granularity", metavar="SIZE",
                    help="add: bytes per bit (default: the cluster size, clamped to 4K..64K, as QEMU)")
    bm.add_argument("--disable", action="store_true", help="add: a disabled bitmap (does not track writes)")
    bm.add_argument("--json", action="store_true", help="list: machine-readable")
    bm.add_argument("-U", "--force-share", action="store_true",
                    help="list: take no lock (an image that a VM holds)")
    bm.add_argument("-b", dest="source_file", metavar="SOURCE_FILE",
                    help="merge: the SOURCE bitmaps are those of this image (of a disk of TARGET's size), "
                         "as qemu-img bitmap --merge -b")
    bm.add_argument("-F", dest="source_format", choices=("qcow2",), help="merge: SOURCE_FILE's format")


def _checkpoint_parser(sub: Sub) -> None:
    cp = sub.add_parser("checkpoint", help="snapshot NAME + frozen copies B@NAME of every enabled "
                                           "bitmap + a new bitmap NAME, in one commit",
                        description=f"A backup checkpoint of TARGET ({TARGET}): at one instant, "
                                    "internal snapshot NAME, for every enabled bitmap B a disabled "
                                    "copy B@NAME holding B's bits, and a new enabled bitmap NAME.")
    cp.add_argument("target", metavar="TARGET")
    cp.add_argument("name", metavar="NAME")
    cp.add_argument("--json", action="store_true", help="print what was made")


def _map_parser(sub: Sub) -> None:
    mp = sub.add_parser("map", help="allocation map (qemu-img map) or a bitmap's dirty extents",
                        description="The allocation map of TARGET (an image, or a mount point: then "
                                    "the live state) in qemu-img map --output=json's shape, backing "
                                    "chain included; with --bitmap, the dirty map in nbdinfo "
                                    "--map=qemu:dirty-bitmap:NAME --json's shape.")
    mp.add_argument("target", metavar="TARGET")
    mp.add_argument("--snapshot", metavar="NAME", help="map of an internal snapshot")
    mp.add_argument("--bitmap", metavar="NAME", help="dirty extents of a persistent bitmap")
    mp.add_argument("--output", choices=("human", "json"), default="human")
    mp.add_argument("--start-offset", metavar="OFFSET",
                    help="map from this guest offset on (suffixes k, M, G, ...), as qemu-img map")
    mp.add_argument("--max-length", metavar="LENGTH",
                    help="map at most this many bytes (suffixes k, M, G, ...), as qemu-img map")
    mp.add_argument("-U", "--force-share", action="store_true",
                    help="take no lock: map an image that a VM holds (it may change meanwhile)")
    qemu_img_flags(mp, "TARGET", fmt=("qcow2", "raw"))


class _Version(argparse.Action):
    """`qcowfs --version`: the version, then one line when pyfuse3 is missing
    (no mounts) or the stock build (no discard, fallocate, SEEK_HOLE through
    mounts). pyfuse3 is imported only here, not for every command."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        print(f"qcowfs {__version__}")
        try:
            from ..fs.operations import STOCK_PYFUSE3_WARNING, pyfuse3_patched
        except ImportError:
            print("pyfuse3 is not installed: qcowfs mount cannot work (the library and the other "
                  "commands do); `make install` installs it")
        else:
            if not pyfuse3_patched():
                print(STOCK_PYFUSE3_WARNING)
        parser.exit()


def _create_parser(sub: Sub) -> None:
    """qemu-img's arguments and option names, as for convert."""
    cr = sub.add_parser("create", help="create a qcow2 image (qemu-img create)",
                        description="Create the qcow2 image IMAGE of SIZE bytes (K, M, G, T suffixes), or "
                                    "of its backing file's size. Options as qemu-img create -o: "
                                    "cluster_size, compat (0.10, 1.1), refcount_bits, lazy_refcounts, "
                                    "extended_l2, compression_type (zlib, zstd), preallocation (off, "
                                    "metadata, falloc, full), data_file, data_file_raw, encrypt.format=luks, "
                                    "encrypt.cipher-alg, encrypt.cipher-mode, encrypt.ivgen-alg, "
                                    "encrypt.ivgen-hash-alg, encrypt.hash-alg, encrypt.iter-time. Once "
                                    "it is made, prints qemu-img's \"Formatting 'IMAGE', fmt=qcow2 ...\" "
                                    "line (-q: nothing).")
    cr.add_argument("image", metavar="IMAGE")
    cr.add_argument("size", metavar="SIZE", nargs="?")
    cr.add_argument("-f", dest="format", default="qcow2", metavar="FMT",
                    help="qcow2 (the default), or raw (its one option: preallocation=off|falloc|full)")
    cr.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                    help="NAME=VALUE[,...] as qemu-img's")
    cr.add_argument("-b", dest="backing", metavar="BACKING", help="backing file (relative to IMAGE's directory)")
    cr.add_argument("-F", dest="backing_format", metavar="FMT", help="backing file format: qcow2 or raw")
    cr.add_argument("-u", dest="unsafe", action="store_true", help="do not open the backing file (SIZE needed)")
    object_flag(cr)
    cr.add_argument("--key-file", metavar="FILE", action="append",
                    help="LUKS passphrase (every byte of FILE; else asked on a terminal)")


def _convert_parser(sub: Sub) -> None:
    """qemu-img's arguments and option names."""
    cv = sub.add_parser("convert", help="copy an image into a new qcow2 or raw image (qemu-img convert)",
                        description="Copy the disk of SRC (qcow2 or raw) into the new image DST, leaving "
                                    "zero and unallocated ranges unallocated. DST appears complete or "
                                    "not at all; with -n, DST is an existing image written in place (a "
                                    "failure midway leaves it partly written, as qemu-img -n does).")
    cv.add_argument("src", metavar="SRC")
    cv.add_argument("dst", metavar="DST")
    cv.add_argument("-f", dest="format", choices=("qcow2", "raw"), help="SRC's format (default: probed)")
    cv.add_argument("-O", dest="output_format", choices=("qcow2", "raw"), default="raw",
                    help="DST's format (default raw, as qemu-img)")
    cv.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                    help="create options of a qcow2 DST (as qcowfs create -o)")
    cv.add_argument("-c", dest="compress", action="store_true",
                    help="compressed clusters (zlib, or zstd with -o compression_type=zstd)")
    cv.add_argument("-l", dest="snapshot", metavar="SNAPSHOT",
                    help="copy an internal snapshot (ID or NAME, an id first as in qemu-img; "
                         "snapshot.id=ID or snapshot.name=NAME)")
    cv.add_argument("-B", dest="backing", metavar="BACKING",
                    help="DST gets this backing file and holds only what differs from it")
    cv.add_argument("-F", dest="backing_format", metavar="FMT", help="format of -B's file (qcow2 or raw)")
    cv.add_argument("-S", dest="sparse", metavar="SIZE",
                    help="zeros of at least SIZE stay holes (default 4k; 0: write every byte)")
    cv.add_argument("-C", dest="copy_offload", action="store_true",
                    help="copy offloading, as qemu-img -C: the kernel copies what SRC's file holds as the disk "
                         "reads into a raw DST (copy_file_range: a reflink on XFS or btrfs); the rest as usual, "
                         "data not searched for zeros (not with -c, -S or --salvage)")
    cv.add_argument("-p", dest="progress", action="store_true", help="show progress (on a terminal)")
    cv.add_argument("-r", dest="rate_limit", metavar="RATE",
                    help="copy at most RATE bytes of data a second (suffixes k, M, G...), as qemu-img -r")
    cv.add_argument("-t", dest="cache", default="unsafe", metavar="CACHE",
                    help="unsafe (default, as qemu-img: no flush) or writeback (DST durable before it "
                         "appears; also none, writethrough, directsync)")
    cv.add_argument("-T", dest="source_cache", metavar="CACHE",
                    help="SRC's cache mode, as qemu-img takes it: accepted, no effect (reads go through "
                         "the host page cache)")
    cv.add_argument("-W", dest="out_of_order", action="store_true",
                    help="qemu-img's out-of-order writes: accepted, no effect (DST is written in order)")
    cv.add_argument("-m", dest="coroutines", type=int, metavar="N",
                    help="qemu-img's parallel requests (1-16): accepted, no effect (-c compresses on "
                         "every core)")
    cv.add_argument("-U", "--force-share", action="store_true",
                    help="read SRC whatever holds it (as qemu-img -U)")
    object_flag(cv)
    cv.add_argument("--key-file", metavar="FILE", action="append",
                    help="passphrase of an encrypted SRC, its backing files and -B's file (else asked); "
                         "again for those with other keys: each is tried in order")
    cv.add_argument("--target-key-file", metavar="FILE", action="append",
                    help="passphrase of DST with -o encrypt.format=luks, or of an encrypted DST with -n "
                         "(else asked)")
    cv.add_argument("-n", dest="skip_create", action="store_true",
                    help="skip the target's creation: write into the existing image DST (of -O's format, at "
                         "least SRC's size; -o is refused); ranges of SRC that read zeros are zeroed in DST")
    cv.add_argument("--target-is-zero", action="store_true",
                    help="with -n: DST reads zeros already, so ranges of zeros are not written (as qemu-img)")
    cv.add_argument("--salvage", action="store_true",
                    help="read errors of SRC do not stop the copy: the failing range is read again in "
                         "smaller pieces, down to 512-byte sectors; sectors that still fail are written as "
                         "zeros, one warning per run of them")
    cv.add_argument("--bitmaps", action="store_true",
                    help="copy SRC's persistent bitmaps (name, granularity, enabled or not, dirty bits) into "
                         "DST (qcow2 to qcow2); an inconsistent (in-use) one is refused")
    cv.add_argument("--skip-broken-bitmaps", action="store_true",
                    help="with --bitmaps: leave inconsistent bitmaps out, with a warning, instead of refusing")


def _compare_parser(sub: Sub) -> None:
    c = sub.add_parser("compare", help="tell whether two disks read the same (qemu-img compare)",
                       description="Compare the disks of FIRST and SECOND (qcow2 with their backing "
                                   "chains, or raw), as qemu-img compare: exit 0 identical, 1 different "
                                   "(with the first sector that differs), 2 an error. Disks of different "
                                   "sizes compare as if the shorter read zeros past its end. Only what "
                                   "either image holds is read.")
    c.add_argument("first", metavar="FIRST")
    c.add_argument("second", metavar="SECOND")
    c.add_argument("-f", dest="first_format", choices=("qcow2", "raw"), help="FIRST's format (default: probed)")
    c.add_argument("-F", dest="second_format", choices=("qcow2", "raw"),
                   help="SECOND's format (default: probed)")
    c.add_argument("-s", "--strict", action="store_true",
                   help="strict: different sizes are a difference, and so is a range allocated differently "
                        "(data, a zero cluster, nothing) though it reads the same")
    c.add_argument("-p", dest="progress", action="store_true", help="show progress on a terminal")
    c.add_argument("-U", "--force-share", action="store_true",
                   help="take no lock: compare images that a VM or a mount holds")
    c.add_argument("-T", dest="source_cache", metavar="CACHE",
                   help="qemu-img's cache mode of the images: checked, no effect here")
    object_flag(c)
    c.add_argument("--key-file", metavar="FILE", action="append",
                   help="passphrase of an encrypted image or backing file (else asked); again for "
                        "those with other keys: each is tried in order")


def _dd_parser(sub: Sub) -> None:
    d = sub.add_parser("dd", help="copy a range of a disk into a new image (qemu-img dd)",
                       description="A new image OUTPUT holding INPUT's disk from skip blocks on, up to count "
                                   "blocks from the start of the disk, as qemu-img dd (which counts count from "
                                   "the start, not from skip). Operands: if=INPUT of=OUTPUT [bs=SIZE] "
                                   "[count=N] [skip=N] (bs: 512 unless given; suffixes k, M, G...).")
    d.add_argument("operands", metavar="OPERAND", nargs="*", help="if=INPUT, of=OUTPUT, bs=, count=, skip=")
    d.add_argument("-f", dest="format", choices=("qcow2", "raw"), help="INPUT's format (default: probed)")
    d.add_argument("-O", dest="output_format", choices=("qcow2", "raw"), default="raw",
                   help="OUTPUT's format (default raw, as qemu-img's)")
    d.add_argument("-U", "--force-share", action="store_true", help="take no lock on INPUT")
    object_flag(d)
    d.add_argument("--key-file", metavar="FILE", action="append",
                   help="passphrase of an encrypted INPUT (else asked on a terminal)")


def _measure_parser(sub: Sub) -> None:
    """qemu-img measure's arguments."""
    me = sub.add_parser("measure", help="how large a file a new qcow2 or raw image needs (qemu-img measure)",
                        description="Print how large a file an image of -O's format needs: for a disk of "
                                    "--size bytes, or to hold the disk of FILENAME (qcow2 or raw; then "
                                    "its data clusters, backing chain included, count): \"required size\" "
                                    "(what it takes once the disk is copied in), \"fully allocated size\" "
                                    "(every cluster allocated), and for a version 3 qcow2 FILENAME and "
                                    "output \"bitmaps size\" (its persistent bitmaps, copied with convert "
                                    "--bitmaps). The numbers are qemu-img's, to the byte: size an LV or a "
                                    "file with them, then convert -n into it.")
    me.add_argument("filename", metavar="FILENAME", nargs="?", help="the image whose disk is measured")
    me.add_argument("--size", metavar="SIZE", help="measure a disk of SIZE bytes instead (K, M, G, T suffixes)")
    me.add_argument("-O", dest="output_format", default="raw", metavar="OUTPUT_FMT",
                    help="the new image's format: qcow2 or raw (default raw, as qemu-img)")
    me.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                    help="create options of a qcow2 image (as qcowfs create -o); cluster_size, compat, "
                         "refcount_bits, extended_l2, preallocation, encrypt.format=luks and backing_file "
                         "change the numbers (with backing_file every cluster counts, as in qemu-img)")
    me.add_argument("-f", dest="format", metavar="FMT", help="FILENAME's format: qcow2 or raw (default: probed)")
    me.add_argument("-l", dest="snapshot", metavar="SNAPSHOT",
                    help="measure an internal snapshot's disk (ID or NAME, snapshot.id=ID, snapshot.name=NAME)")
    me.add_argument("--output", default="human", metavar="FMT", help="human (default) or json (qemu-img's keys)")
    me.add_argument("-U", "--force-share", action="store_true",
                    help="read FILENAME whatever holds it (as qemu-img -U)")
    me.add_argument("--key-file", metavar="FILE", action="append",
                    help="passphrase of an encrypted FILENAME (not needed: its tables are not encrypted)")


def _mount_args(m: argparse.ArgumentParser) -> None:
    from ..service.options import MOUNT_OPTIONS

    m.add_argument("-r", "--read-only", action="store_true",
                   help="serve everything read-only; the image is never written")
    m.add_argument("-f", "--foreground", action="store_true",
                   help="stay attached (for systemd and debugging); logs go to stderr")
    m.add_argument("-d", "--debug", action="store_true", help="log every FUSE request")
    m.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]",
                   help="mount options, comma-separated (may be repeated): "
                        + ", ".join(o.name + (f"={o.value}" if o.value else "") for o in MOUNT_OPTIONS)
                        + " (each is described below); mount(8)/systemd generic options "
                          "(defaults, nofail, x-systemd.*...) are accepted and ignored")


COMMAND_PARSERS: dict[str, Callable[[Sub], None]] = {
    "mount": _mount_parser, "umount": _umount_parser, "info": _info_parser, "check": _check_parser,
    "snapshot": _snapshot_parser, "bitmap": _bitmap_parser, "checkpoint": _checkpoint_parser,
    "map": _map_parser, "create": _create_parser, "convert": _convert_parser, "compare": _compare_parser,
    "measure": _measure_parser, "dd": _dd_parser,
    "resize": resize_parser, "amend": amend_parser, "commit": commit_parser, "rebase": rebase_parser}
SUBCOMMANDS = tuple(COMMAND_PARSERS)


def mount_options_text() -> str:
    """The mount options, one per line with what it does (mount --help's
    epilog; qcowfs(1) has the same from MOUNT_OPTIONS)."""
    import textwrap

    from ..service.options import MOUNT_OPTIONS

    lines = ["mount options (-o):"]
    for o in MOUNT_OPTIONS:
        name = o.name + (f"={o.value}" if o.value else "")
        lines += textwrap.wrap(o.help, 78, initial_indent=f"  {name:<22}", subsequent_indent=" " * 24)
    return "\n".join(lines) + "\n"


def command_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parser of each COMMAND of PARSER (build_parser()'s), by name: for
    usage errors of one command, the man page and the shell completion."""
    for action in parser._actions:  # (argparse offers no public way to them)
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _helper_parser() -> argparse.ArgumentParser:
    p = Parser(prog="qcowfs", description="mount.fuse3 entry point")
    p.add_argument("image")
    p.add_argument("mountpoint")
    _mount_args(p)
    return p


def _mount_from_args(a: argparse.Namespace) -> int:
    from ..service.options import MountOptions
    from .mount import cmd_mount

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
    import difflib  # (here: only a mistyped command needs it)

    close = difflib.get_close_matches(word, SUBCOMMANDS + ("unmount",), n=1)
    hint = f" (did you mean '{'umount' if close == ['unmount'] else close[0]}'?)" if close else ""
    die(f"unknown command '{word}'{hint}; commands: {', '.join(SUBCOMMANDS)} "
        "(or IMAGE MOUNTPOINT -o OPTIONS, as mount.fuse3 calls it); see qcowfs --help", 2)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; a command other than mount holds the engine's
    warnings until it ends well (host.logs.hold): a failure is one line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    held = hold() if argv and argv[0] in SUBCOMMANDS and argv[0] != "mount" else []
    code = _main(argv)
    for level, line in held:
        print(f"qcowfs: {'warning: ' if level == 'warning' else ''}{line}", file=sys.stderr)
    return code


def _main(argv: list[str]) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    # qcowfs does no linear algebra: without this, importing numpy starts an
    # OpenBLAS thread per CPU (tens of ms of every mount's start, idle threads after).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        if argv and not argv[0].startswith("-") and argv[0] not in SUBCOMMANDS:
            if _looks_like_command(argv[0]):
                _unknown_command(argv[0])
            return _mount_from_args(_helper_parser().parse_args(argv))
        if (argv[:1] == ["resize"] and len(argv) > 2 and re.fullmatch(r"-[0-9.]+[a-zA-Z]*", argv[-1])
                and argv[-2] != "--"):
            argv[-1:-1] = ["--"]  # (a negative SIZE is not an option, as in qemu-img resize)
        if argv[:1] in (["snapshot"], ["bitmap"]):
            argv[1:] = _qemu_img_verbs(argv[0], argv[1:])
        if argv and asks_option_help(argv[0], argv[1:]):
            return print_option_help(argv[0], argv[1:])
        if argv and argv[0] in SUBCOMMANDS:
            # The command's own parser, options anywhere among the operands as
            # qemu-img's getopt takes them (`create IMAGE -o OPTS SIZE`); its
            # usage errors show its usage, not the top-level one.
            a = command_parsers(build_parser(argv[0]))[argv[0]].parse_intermixed_args(argv[1:])
            a.command = argv[0]
        else:
            a = build_parser().parse_args(argv)
        if getattr(a, "objects", None):  # (every --object checked before anything is done, as qemu-img)
            from .commands import secrets
            secrets(a.objects)
        if getattr(a, "quiet", False):
            import contextlib

            if getattr(a, "progress", False):
                a.progress = False  # (as in qemu-img, -q wins over -p)
            with open(os.devnull, "w") as nowhere, contextlib.redirect_stdout(nowhere):
                return _dispatch(a)
        return _dispatch(a)
    except QcowError as e:
        die(str(e))
    except KeyboardInterrupt:
        die("interrupted", 130)
    except OSError as e:
        die(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
    except Exception as e:  # noqa: BLE001 - one line, never a traceback
        die(f"internal error: {type(e).__name__}: {e}")


# qemu-img's spellings of the snapshot and bitmap actions: a flag (with the
# snapshot's name after it, or the merge's source) where qcowfs has a verb.
_QEMU_IMG_VERBS = {
    "snapshot": {"-l": ("list", 0), "-c": ("create", 1), "-d": ("delete", 1), "-a": ("apply", 1)},
    "bitmap": {"--add": ("add", 0), "--remove": ("remove", 0), "--clear": ("clear", 0),
               "--enable": ("enable", 0), "--disable": ("disable", 0), "--merge": ("merge", 1)},
}


def _qemu_img_verbs(command: str, args: list[str]) -> list[str]:
    """`snapshot -c NAME IMAGE` and `bitmap --merge SOURCE IMAGE NAME`, as
    qemu-img takes them: qcowfs's `snapshot create IMAGE NAME` and `bitmap
    merge IMAGE NAME SOURCE`. ARGS without such a flag are left as they are."""
    flags = _QEMU_IMG_VERBS[command]
    i = next((k for k, a in enumerate(args) if a in flags), None)
    verbs = {verb for verb, _ in flags.values()} | {"list"}
    if i is None or any(a in verbs for a in args[:i]):
        return args  # (qcowfs's own form: `bitmap add IMAGE NAME --disable` has a verb first)
    verb, takes = flags[args[i]]
    value = args[i + 1 : i + 1 + takes]
    return [verb, *args[:i], *args[i + 1 + takes :], *value]


def _dispatch(a: argparse.Namespace) -> int:
    """Run the command A parsed (its errors go to _main's one line)."""
    if a.command == "mount":
        return _mount_from_args(a)
    if a.command == "umount":
        from .mount import cmd_umount

        return cmd_umount(a.mountpoint, a.force)
    if a.command == "info":
        return cmd_info(a.image, a.json or a.output == "json", a.force_share, a.backing_chain, a.format)
    if a.command == "check":
        repair = "all" if a.repair else a.repair_mode
        check_cache_flags(a)
        return cmd_check(a.image, repair, a.json or a.output == "json", a.force_share, a.format)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "snapshot": cmd_snapshot, "bitmap": cmd_bitmap, "checkpoint": cmd_checkpoint, "map": cmd_map,
        "create": cmd_create, "convert": cmd_convert, "compare": cmd_compare, "measure": cmd_measure,
        "dd": cmd_dd,
        "commit": cmd_commit, "rebase": cmd_rebase,
        "resize": cmd_resize, "amend": cmd_amend}
    if a.command in handlers:
        return handlers[a.command](a)
    build_parser().print_help()
    return 2


def run() -> NoReturn:
    """The `qcowfs` program (the console script): main(), then leave without
    tearing the interpreter down. A command's work is done and flushed to its
    image when main returns; what is left is freeing the modules of numpy and
    trio one by one, some 15 ms of every one-shot command (docs/speed.md).
    Tests call main() and keep their interpreter."""
    try:
        code = main()
    except SystemExit as e:  # (argparse's errors, --help, die(): their text is printed)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    if "logging" in sys.modules:
        sys.modules["logging"].shutdown()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:  # (a reader that left early: as the SIGPIPE it would have had)
        code = code or 1
    os._exit(code)


if __name__ == "__main__":
    run()
