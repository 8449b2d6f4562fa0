"""The commands that change an image's size, its options or its place in a
backing chain: resize, amend, commit, rebase (qemu-img's names and options). Clients of the
public API; every argument is checked before the image is touched."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..errors import ImageLockedError, UsageError
from ..service.options import parse_size


def resize_parser(sub: Any) -> None:
    r = sub.add_parser("resize", help="grow or shrink the virtual disk (qemu-img resize)",
                       description="Set the virtual disk of IMAGE to SIZE, or change it by +SIZE / -SIZE "
                                   "(suffixes k, M, G, T, P, E). A grown area reads zeros. Shrinking drops "
                                   "what lies past the new end and needs --shrink.")
    r.add_argument("--shrink", action="store_true", help="allow a smaller size (data past the new end is lost)")
    r.add_argument("-f", dest="format", choices=("qcow2", "raw"),
                   help="IMAGE's format (default: probed as qemu-img probes: qcow2 if it starts with the "
                        "qcow2 magic, else raw)")
    r.add_argument("--preallocation", choices=("off", "metadata", "falloc", "full"), default="off",
                   help="a raw file's grown tail: a hole (off), reserved (falloc) or written with zeros "
                        "(full); a qcow2 image's grown area stays unallocated")
    r.add_argument("image", metavar="IMAGE")
    r.add_argument("size", metavar="[+|-]SIZE")


def amend_parser(sub: Any) -> None:
    m = sub.add_parser("amend", help="change the options of an existing image (qemu-img amend)",
                       description="Change what IMAGE's header says, as qemu-img amend -o: compat (0.10 or "
                                   "1.1: a downgrade or an upgrade), lazy_refcounts, refcount_bits, size, "
                                   "data_file (a new name), data_file_raw (off only); LUKS key slots with "
                                   "encrypt.state=active (a new passphrase from --new-key-file, into "
                                   "encrypt.keyslot or the first free slot, PBKDF2 timed to "
                                   "encrypt.iter-time ms) or encrypt.state=inactive (erase encrypt.keyslot, "
                                   "or every slot --old-key-file's passphrase opens). Everything is checked "
                                   "before the image is touched.")
    m.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="NAME=VALUE,... (may be repeated): compat, lazy_refcounts, refcount_bits, size, "
                        "data_file, data_file_raw, backing_file / backing_fmt (only as they are: use rebase), "
                        "encrypt.state, encrypt.keyslot, encrypt.iter-time")
    m.add_argument("-f", dest="format", metavar="FMT", help="format of IMAGE (qcow2 only)")
    m.add_argument("-p", dest="progress", action="store_true",
                   help="qemu-img's progress: accepted, no effect")
    m.add_argument("-t", dest="cache", metavar="CACHE",
                   help="qemu-img's cache mode (writeback, writethrough, none, directsync, unsafe): accepted, "
                        "no effect (every step of an amend is flushed before the next)")
    m.add_argument("--force", action="store_true",
                   help="overwrite an active key slot, erase an inactive one, or erase the last active one "
                        "(the data is then lost for good), as qemu-img --force")
    object_flag(m)
    m.add_argument("--key-file", metavar="FILE", action="append",
                   help="passphrase of an encrypted IMAGE (every byte of FILE; else asked on a terminal)")
    m.add_argument("--new-key-file", metavar="FILE",
                   help="the new passphrase of encrypt.state=active (else asked on a terminal)")
    m.add_argument("--old-key-file", metavar="FILE",
                   help="encrypt.state=inactive: erase every key slot this passphrase opens (with "
                        "encrypt.keyslot: that slot, which it must open)")
    m.add_argument("image", metavar="IMAGE")


def qemu_img_flags(p: Any, what: str, fmt: tuple[str, ...] = ("qcow2",), cache: bool = False,
                   source_cache: bool = False) -> None:
    """qemu-img's -f (the image's format: one of FMT), -t and -T (cache
    modes) on a command that takes them, so a qemu-img command line runs
    as it is: the format is checked (tuning_checks), the cache modes are
    checked and change nothing (every change here is flushed before the
    command ends)."""
    p.add_argument("-f", dest="format", choices=fmt, help=f"format of {what} (qemu-img's -f)")
    if cache:
        p.add_argument("-t", dest="cache", metavar="CACHE",
                       help="qemu-img's cache mode (writeback, writethrough, none, directsync, unsafe): "
                            "checked, no effect (the change is flushed before the command ends)")
    if source_cache:
        p.add_argument("-T", dest="source_cache", metavar="CACHE",
                       help="qemu-img's cache mode of the images read: checked, no effect")


def object_flag(p: Any) -> None:
    """qemu-img's --object, for secrets: a command line that gives its
    passphrases so runs as it is."""
    p.add_argument("--object", dest="objects", metavar="OBJECTDEF", action="append",
                   help="qemu-img's secret: secret,id=ID,data=PASSPHRASE or secret,id=ID,file=FILE "
                        "(format=base64 too); tried on encrypted images as a --key-file is, and named by "
                        "-o encrypt.key-secret=ID (and amend's encrypt.new-secret, encrypt.old-secret)")


def check_cache_flags(a: argparse.Namespace) -> None:
    """The cache modes given with qemu_img_flags' -t and -T, checked as qemu-img checks them."""
    from ..aio import check_cache_mode

    for dest, flag in (("cache", "-t"), ("source_cache", "-T")):
        if getattr(a, dest, None) is not None:
            check_cache_mode(getattr(a, dest), flag)


def commit_parser(sub: Any) -> None:
    c = sub.add_parser("commit", help="write an overlay's data into its backing file (qemu-img commit)",
                       description="Write what OVERLAY holds into its backing file (or into BASE further "
                                   "down the chain, qcow2 or raw), then empty OVERLAY (not with -d or -b).")
    c.add_argument("-b", dest="base", metavar="BASE",
                   help="commit into BASE, an image of OVERLAY's backing chain (implies -d, as qemu-img)")
    c.add_argument("-d", dest="drop", action="store_true", help="do not empty OVERLAY afterwards")
    c.add_argument("-p", dest="progress", action="store_true", help="show progress")
    c.add_argument("-r", dest="rate_limit", metavar="RATE",
                   help="write at most RATE bytes of data a second (suffixes k, M, G...), as qemu-img -r")
    qemu_img_flags(c, "OVERLAY", cache=True)
    object_flag(c)
    c.add_argument("--key-file", metavar="FILE", action="append",
                   help="passphrase of encrypted images of the chain (every byte of FILE; else asked on a "
                        "terminal); again for layers with other keys: each is tried in order")
    c.add_argument("overlay", metavar="OVERLAY")


def rebase_parser(sub: Any) -> None:
    b = sub.add_parser("rebase", help="change the backing file of an image (qemu-img rebase)",
                       description="Make NEW the backing file of IMAGE. Safe mode first copies into IMAGE "
                                   "what differs between the old and the new backing file, so the disk "
                                   "stays the same; -u only changes the pointer. -b \"\" removes the "
                                   "backing file (the image holds everything afterwards).")
    b.add_argument("-u", dest="unsafe", action="store_true", help="unsafe: only change the backing file name")
    b.add_argument("-b", dest="backing", metavar="NEW", required=True,
                   help="the new backing file (stored as given: relative to IMAGE's directory); \"\" for none")
    b.add_argument("-F", dest="backing_fmt", metavar="FMT", choices=("qcow2", "raw"), help="format of NEW")
    b.add_argument("-p", dest="progress", action="store_true", help="show progress")
    b.add_argument("-U", "--force-share", action="store_true",
                   help="open NEW without locks (as qemu-img -U)")
    qemu_img_flags(b, "IMAGE", cache=True, source_cache=True)
    object_flag(b)
    b.add_argument("--key-file", metavar="FILE", action="append",
                   help="passphrase of encrypted images (every byte of FILE; else asked on a terminal); "
                        "again for images with other keys (old and new backing files): each is tried in order")
    b.add_argument("image", metavar="IMAGE")


def cmd_resize(a: argparse.Namespace) -> int:
    from ..host.waiting import drive
    from .commands import _open_unmounted, probe_quietly

    text = a.size.strip()
    sign = text[0] if text[:1] in "+-" else ""
    amount = parse_size(text[1:] if sign else text, zero=True)

    def new_size(current: int) -> int:  # (+SIZE, -SIZE: from the disk's size)
        return current + amount if sign == "+" else current - amount if sign == "-" else amount

    if os.path.isdir(a.image):
        raise UsageError(f"{a.image} is a directory: resize takes an image file (on a mount, "
                         "truncate MOUNTPOINT/disk.raw grows the disk)")
    if (a.format if a.format is not None else probe_quietly(a.image)) == "raw":
        from .. import aio

        size = new_size(drive(aio.info(a.image, format="raw"))["virtual-size"])
        if size < 0:
            raise UsageError("the new size must not be negative")
        drive(aio.resize(a.image, size, shrink=a.shrink, format="raw", preallocation=a.preallocation))
        print("Image resized.")
        return 0
    if a.preallocation != "off":
        raise UsageError(f"--preallocation={a.preallocation} is for raw images here: a qcow2 image's grown "
                         "area is left unallocated (it reads zeros)")
    try:
        image = _open_unmounted(a.image, "r+")
    except ImageLockedError as e:
        if "is mounted on" not in str(e):
            raise
        raise ImageLockedError(f"{str(e).split(':')[0]}: unmount it first, or grow the mounted disk "
                               "with truncate on its disk.raw") from None

    async def main() -> None:
        async with image:
            current = image.virtual_size
            size = new_size(current)
            if size <= 0:
                raise UsageError("the new size must be positive")
            if size < current and not a.shrink:
                raise UsageError(f"{size} is smaller than the disk ({current}): use --shrink to shrink it "
                                 "(what lies past the new end is lost)")
            await image.resize(size, shrink=a.shrink)
    drive(main())
    print("Image resized.")
    return 0


def cmd_amend(a: argparse.Namespace) -> int:
    """qemu-img amend -f qcow2 -o OPTIONS."""
    from .. import api, aio
    from .commands import key_source, parse_qemu_options, secret_named

    if a.format is not None and a.format != "qcow2":
        raise UsageError(f"qcowfs amends qcow2 images only, not '{a.format}'")
    if os.path.isdir(a.image):
        raise UsageError(f"{a.image} is a directory: amend takes an image file (unmount a mounted one first)")
    check_cache_flags(a)
    options = parse_qemu_options(a.options)
    if not options:
        raise UsageError("nothing to amend: give the options with -o (as qemu-img asks)")
    kw: dict[str, Any] = {}
    kinds = aio.AMEND_OPTIONS
    named = {name: secret_named(a.objects, name, options.pop(name))
             for name in ("encrypt.new-secret", "encrypt.old-secret", "encrypt.key-secret") if name in options}
    if "encrypt.new-secret" in named and a.new_key_file is not None \
            or "encrypt.old-secret" in named and a.old_key_file is not None:
        raise UsageError("give each passphrase once: a secret (-o encrypt.*-secret) or a key file")
    for name, value in options.items():
        kind = kinds.get(name)
        if kind is None:
            if name in aio.CREATE_OPTIONS:
                raise UsageError(f"invalid parameter '{name}': it can only be chosen when the image is created")
            raise UsageError(f"invalid parameter '{name}' for qcow2 (known: {', '.join(kinds)})")
        # (sizes with their suffixes as numbers; on/off and numbers as text the library checks)
        kw[name.replace(".", "_").replace("-", "_")] = parse_size(value) if kind == "size" else value
    new_passphrase = named.get("encrypt.new-secret")
    if kw.get("encrypt_state") == "active" and a.new_key_file is None and new_passphrase is None:
        if not sys.stdin.isatty():
            raise UsageError("encrypt.state=active needs the new passphrase: give it with --new-key-file FILE, "
                             "or run from a terminal to be asked")
        from ..host.secret import prompt_new
        new_passphrase = prompt_new(a.image)
    current = key_source(a.key_file, a.objects)
    if "encrypt.key-secret" in named:
        from ..host.secret import Keyring
        current = Keyring(passphrases=[named["encrypt.key-secret"]], key_files=a.key_file or ())
    api.amend(a.image, **kw, force=a.force, passphrase=current, new_passphrase=new_passphrase,
              new_key_file=a.new_key_file, old_key_file=a.old_key_file,
              **({"old_passphrase": named["encrypt.old-secret"]} if "encrypt.old-secret" in named else {}))
    return 0


def cmd_commit(a: argparse.Namespace) -> int:
    from .. import api
    from .commands import key_source, progress_printer

    check_cache_flags(a)
    rate = parse_size(a.rate_limit, zero=True) if a.rate_limit is not None else 0
    with progress_printer(a.progress) as progress:
        api.commit(a.overlay, a.base, drop=a.drop, progress=progress,
                   passphrase=key_source(a.key_file, a.objects), rate_limit=rate)
    print("Image committed.")
    return 0


def cmd_rebase(a: argparse.Namespace) -> int:
    from .. import api
    from .commands import key_source, progress_printer

    check_cache_flags(a)
    with progress_printer(a.progress) as progress:
        api.rebase(a.image, a.backing, backing_format=a.backing_fmt, unsafe=a.unsafe, progress=progress,
                   force_share=a.force_share, passphrase=key_source(a.key_file, a.objects))
    return 0
