"""The commands that change an image's size or its place in a backing chain:
resize, commit, rebase (qemu-img's names and options). Clients of the
public API; every argument is checked before the image is touched."""
from __future__ import annotations

import argparse
import os
from typing import Any

from ..errors import ImageLockedError, UsageError
from ..service.options import parse_size


def resize_parser(sub: Any) -> None:
    r = sub.add_parser("resize", help="grow or shrink the virtual disk (qemu-img resize)",
                       description="Set the virtual disk of IMAGE to SIZE, or change it by +SIZE / -SIZE "
                                   "(suffixes k, M, G, T, P, E). A grown area reads zeros. Shrinking drops "
                                   "what lies past the new end and needs --shrink.")
    r.add_argument("--shrink", action="store_true", help="allow a smaller size (data past the new end is lost)")
    r.add_argument("image", metavar="IMAGE")
    r.add_argument("size", metavar="[+|-]SIZE")


def commit_parser(sub: Any) -> None:
    c = sub.add_parser("commit", help="write an overlay's data into its backing file (qemu-img commit)",
                       description="Write what OVERLAY holds into its backing file (or into BASE further "
                                   "down the chain, qcow2 or raw), then empty OVERLAY (not with -d or -b).")
    c.add_argument("-b", dest="base", metavar="BASE",
                   help="commit into BASE, an image of OVERLAY's backing chain (implies -d, as qemu-img)")
    c.add_argument("-d", dest="drop", action="store_true", help="do not empty OVERLAY afterwards")
    c.add_argument("-p", dest="progress", action="store_true", help="show progress")
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
    b.add_argument("--key-file", metavar="FILE", action="append",
                   help="passphrase of encrypted images (every byte of FILE; else asked on a terminal); "
                        "again for images with other keys (old and new backing files): each is tried in order")
    b.add_argument("image", metavar="IMAGE")


def cmd_resize(a: argparse.Namespace) -> int:
    from ..host.waiting import drive
    from .commands import _open_unmounted

    text = a.size.strip()
    sign = text[0] if text[:1] in "+-" else ""
    amount = parse_size(text[1:] if sign else text, zero=True)
    if os.path.isdir(a.image):
        raise UsageError(f"{a.image} is a directory: resize takes an image file (on a mount, "
                         "truncate MOUNTPOINT/disk.raw grows the disk)")
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
            size = current + amount if sign == "+" else current - amount if sign == "-" else amount
            if size <= 0:
                raise UsageError("the new size must be positive")
            if size < current and not a.shrink:
                raise UsageError(f"{size} is smaller than the disk ({current}): use --shrink to shrink it "
                                 "(what lies past the new end is lost)")
            await image.resize(size, shrink=a.shrink)
    drive(main())
    print("Image resized.")
    return 0


def cmd_commit(a: argparse.Namespace) -> int:
    from .. import api
    from .commands import key_source, progress_printer

    with progress_printer(a.progress) as progress:
        api.commit(a.overlay, a.base, drop=a.drop, progress=progress,
                   passphrase=key_source(a.key_file))
    print("Image committed.")
    return 0


def cmd_rebase(a: argparse.Namespace) -> int:
    from .. import api
    from .commands import key_source, progress_printer

    with progress_printer(a.progress) as progress:
        api.rebase(a.image, a.backing, backing_format=a.backing_fmt, unsafe=a.unsafe, progress=progress,
                   force_share=a.force_share, passphrase=key_source(a.key_file))
    return 0
