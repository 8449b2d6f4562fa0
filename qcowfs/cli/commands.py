"""The commands on an image file or a mount point: info, check, snapshot,
bitmap, checkpoint, map.

On an image file they are clients of the public API (`qcowfs.open`,
`qcowfs.aio`); on a mount point they ask the daemon over the control socket,
which runs the same request against the image it serves (service/manage.py).
The API is imported inside the functions: a command that only talks to a
daemon starts without loading the engine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any, Callable, NoReturn

from ..errors import ImageLockedError, QcowError, UsageError
from ..host import mounts
from ..service.options import parse_size
from .text import render_check, render_info, render_snapshots

if TYPE_CHECKING:
    from ..aio import Image


def die(msg: str, code: int = 1) -> NoReturn:
    print(f"qcowfs: {msg}", file=sys.stderr)
    sys.exit(code)


def open_image(image_arg: str, mode: str = "r", **kwargs: Any) -> "Image":
    """Open IMAGE (qcowfs.aio.Image, no trio loop needed); errors about its
    contents name the file; what a read-only open left out (a damaged
    snapshot table...) is one warning line each."""
    from ..aio import Image

    try:
        image = Image(image_arg, mode, **kwargs)  # type: ignore[arg-type]
    except QcowError as e:
        msg = str(e)
        if image_arg not in msg and os.path.abspath(image_arg) not in msg:
            msg = f"{image_arg}: {msg}"
        raise type(e)(msg) from None
    for warning in image.warnings:
        print(f"qcowfs: warning: {image_arg}: {warning}", file=sys.stderr)
    return image


def _open_unmounted(image_arg: str, mode: str = "r", **kwargs: Any) -> "Image":
    """open_image, saying where the image is mounted if a qcowfs mount holds it."""
    try:
        return open_image(image_arg, mode, **kwargs)
    except ImageLockedError as e:
        source = mounts.fsname(os.path.abspath(image_arg))
        where = [m.mountpoint for m in mounts.mounts() if m.fstype == mounts.FSTYPE and m.source == source]
        if where:
            raise ImageLockedError(f"{image_arg} is mounted on {where[0]}: give the mount point "
                                   f"instead (qcowfs ... {where[0]})") from None
        raise e from None


def _run(image: "Image", work: Callable[["Image"], Any], prepare: bool = True) -> Any:
    """Run the coroutine WORK(image) on a trio loop of this command, then close
    IMAGE. PREPARE false: WORK checks its arguments before the image's
    preparation for writing (every change does that preparation itself)."""
    import trio

    async def main() -> Any:
        async with image:
            if prepare:
                await image.prepare()
            return await work(image)
    return trio.run(main)


# ---- info and check -------------------------------------------------------------

def cmd_info(image_arg: str, as_json: bool, force_share: bool = False) -> int:
    """FORCE_SHARE (-U) takes no image lock, as qemu-img -U: to inspect an
    image a VM or a mount holds."""
    d = _run(open_image(image_arg, force_share=force_share, require_backing=False), lambda image: image.info())
    d["filename"] = image_arg
    print(json.dumps(d, indent=4) if as_json else render_info(d))
    return 0


def _progress_printer() -> Callable[[float], None] | None:
    if not sys.stderr.isatty():
        return None

    def show(frac: float) -> None:
        print(f"\r    ({frac * 100:6.2f}/100%)", end="", file=sys.stderr, flush=True)
    return show


def cmd_check(image_arg: str, repair: bool, as_json: bool, force_share: bool = False) -> int:
    """Exit codes as qemu-img check; a check that cannot run is one line and 1."""
    from .. import aio

    if force_share and repair:
        raise UsageError("-U (force share) cannot be used with --repair: a repair must own the image")
    progress = _progress_printer()
    import trio

    try:
        result = trio.run(lambda: aio.check(image_arg, repair, force_share=force_share, progress=progress))
    except (QcowError, OSError) as e:
        print(f"qcowfs: check failed: {e}", file=sys.stderr)
        return 1
    if progress:
        print("\r", end="", file=sys.stderr)
    if as_json:
        print(json.dumps(result.json | {"filename": os.path.abspath(image_arg)}, indent=4))
    else:
        out, err = render_check(result)
        for line in err:
            print(line, file=sys.stderr)
        print("\n".join(out))
    return result.returncode


# ---- snapshots, bitmaps, checkpoints -----------------------------------------------

def cmd_manage(target: str, request: dict[str, Any], writes: bool) -> dict[str, Any]:
    """Run REQUEST on TARGET: through the daemon if it is a qcowfs mount point,
    else on the image file TARGET, opened here (for writing if WRITES)."""
    from ..service import control

    if control.mounted(target) is not None:
        return control.request(target, **request)
    if os.path.isdir(target):
        raise UsageError(f"{target} is not a qcowfs mount point")
    from ..service.manage import Manager

    return _run(_open_unmounted(target, "r+" if writes else "r"), lambda image: Manager(image).handle(request),
                prepare=False)


def _print_snapshots(reply: dict[str, Any], as_json: bool) -> None:
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


# ---- maps ----------------------------------------------------------------------------

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
        image = _open_unmounted(a.target, force_share=a.force_share)
        entries = _run(image, lambda image: image.dirty_extents(a.bitmap) if a.bitmap is not None
                       else image.map(a.snapshot))
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
