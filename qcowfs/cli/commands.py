"""The commands on an image file or a mount point: info, check, snapshot,
bitmap, checkpoint, map; and the offline image makers create and convert.

On an image file they are clients of the public API (`qcowfs.open`,
`qcowfs.aio`); on a mount point they ask the daemon over the control socket,
which runs the same request against the image it serves (service/manage.py).
The API is imported inside the functions: a command that only talks to a
daemon starts without loading the engine.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import TYPE_CHECKING, Any, Callable, Iterator, NoReturn

from ..errors import ImageLockedError, QcowError, UsageError
from ..service.options import parse_size
from .text import json_text, qemu_order, render_check, render_info, render_snapshots

if TYPE_CHECKING:
    from ..aio import Image
    from ..host.secret import Keyring
    from ..records import CheckResult


def die(msg: str, code: int = 1) -> NoReturn:
    print(f"qcowfs: {msg}", file=sys.stderr)
    sys.exit(code)


def open_image(image_arg: str, mode: str = "r", **kwargs: Any) -> "Image":
    """Open IMAGE (qcowfs.aio.Image, no trio loop needed; its errors name
    the file); what a read-only open left out (a damaged snapshot table...)
    is one warning line each."""
    from ..aio import Image

    image = Image(image_arg, mode, **kwargs)  # type: ignore[arg-type]
    for warning in image.warnings:
        print(f"qcowfs: warning: {image_arg}: {warning}", file=sys.stderr)
    return image


def _open_unmounted(image_arg: str, mode: str = "r", **kwargs: Any) -> "Image":
    """open_image, saying where the image is mounted if a qcowfs mount holds it."""
    try:
        return open_image(image_arg, mode, **kwargs)
    except ImageLockedError as e:
        from ..host import mounts

        source = mounts.fsname(os.path.abspath(image_arg))
        where = [m.mountpoint for m in mounts.mounts() if m.fstype == mounts.FSTYPE and m.source == source]
        if where:
            raise ImageLockedError(f"{image_arg} is mounted on {where[0]}: give the mount point "
                                   f"instead (qcowfs ... {where[0]})") from None
        raise e from None


def _run(image: "Image", work: Callable[["Image"], Any], prepare: bool = True) -> Any:
    """Run the coroutine WORK(image) to its end on this thread (host.waiting:
    a command needs no loop), then close IMAGE. PREPARE false: WORK checks
    its arguments before the image's preparation for writing (every change
    does that preparation itself)."""
    from ..host.waiting import drive

    async def main() -> Any:
        async with image:
            if prepare:
                await image.prepare()
            return await work(image)
    return drive(main())


# ---- info and check -------------------------------------------------------------

def _live(target: str) -> bool:
    """TARGET is a qcowfs mount point (then the daemon serving it answers);
    a directory that is none is an error here, a file is an image (and
    the control module, with socket, is not loaded for it)."""
    if not os.path.isdir(target):
        return False
    from ..service import control

    if control.mounted(target) is not None:
        return True
    raise UsageError(f"{target} is a directory, not an image nor a qcowfs mount point")


def cmd_info(image_arg: str, as_json: bool, force_share: bool = False, backing_chain: bool = False,
             fmt: str | None = None) -> int:
    """FORCE_SHARE (-U) takes no image lock, as qemu-img -U: to inspect an
    image a VM or a mount holds. On a mount point: the served image, now.
    FMT (-f): IMAGE's format, else probed (a raw file is shown as qemu-img
    shows it).
    BACKING_CHAIN (qemu-img's --backing-chain): every layer, top first, each
    named as qemu-img names it (its backing file name joined to the
    directory of the name above: qemu-img's path_combine)."""
    if _live(image_arg):
        if backing_chain or fmt is not None:
            raise UsageError("--backing-chain and -f need an image file (the daemon describes the image it serves)")
        from ..service import control

        live = control.request(image_arg, "info")["info"]
        print(json_text(qemu_order(live)) if as_json else render_info(live))
        return 0
    layers: list[dict[str, Any]] = []
    for d in chain_info(image_arg, force_share, fmt):
        if backing_chain:
            d.pop("backing-chain", None)  # (qcowfs's own list of the layers below: each is shown here)
        layers.append(d)
        if not backing_chain:
            break
    if as_json:
        print(json_text(qemu_order(layers if backing_chain else layers[0])))
    else:
        print("\n\n".join(render_info(d) for d in layers))
    return 0


def chain_info(image_arg: str, force_share: bool, fmt: str | None = None) -> Iterator[dict[str, Any]]:
    """The info of IMAGE_ARG (FMT, else probed) and of each layer below it,
    top first, as the caller asks for them; each named ("filename", and the
    "full-backing-filename" of the one above) as qemu-img names it: its
    backing file name joined to the directory of the name above (qemu-img's
    path_combine)."""
    name: str = image_arg
    path: str | None = image_arg
    while path is not None:
        d = _layer_info(path, force_share, fmt)
        d["filename"] = name
        if "backing-filename" in d and "full-backing-filename" in d:
            # (the format the header names, else probed as qemu-img probes a backing file)
            fmt = d.get("backing-filename-format")
            path = d["full-backing-filename"]
            d["full-backing-filename"] = name = qemu_path_combine(name, d["backing-filename"])
        else:
            path = None
        yield d


def _qcow2_info(path: str, force_share: bool) -> dict[str, Any]:
    d: dict[str, Any] = _run(open_image(path, force_share=force_share, require_backing=False),
                             lambda image: image.info())
    return d


def _layer_info(path: str, force_share: bool, fmt: str | None = None) -> dict[str, Any]:
    """A layer's info: a qcow2 image's (its warnings printed), or a raw
    file's as qemu-img shows it; FMT, else probed."""
    from .. import aio
    from ..host.waiting import drive

    if (fmt if fmt is not None else aio.probe_format(path)) == "qcow2":
        return _qcow2_info(path, force_share)
    d: dict[str, Any] = drive(aio.info(path, format="raw", force_share=force_share))
    return d


def qemu_path_combine(base: str, name: str) -> str:
    """NAME as qemu-img names a backing file of the image it knows as BASE:
    NAME if absolute, else NAME beside BASE (QEMU's path_combine)."""
    if os.path.isabs(name) or "/" not in base:
        return name
    return base[: base.rindex("/") + 1] + name


@contextlib.contextmanager
def progress_printer(wanted: bool = True, end: str = "\n") -> Iterator[Callable[[float], None] | None]:
    """qemu-img's -p: the fraction done, redrawn in place on stderr, and END
    after it once the command is over; nothing at all when stderr is not a
    terminal (a log or a pipe gets no carriage returns), as qemu-img."""
    if not wanted or not sys.stderr.isatty():
        yield None
        return
    shown = False

    def show(frac: float) -> None:
        nonlocal shown
        shown = True
        print(f"\r    ({frac * 100:6.2f}/100%)", end="", file=sys.stderr, flush=True)
    try:
        yield show
    finally:
        if shown:
            print(end, end="", file=sys.stderr, flush=True)


# qemu-img check's exit code for an image whose format has no checks (a raw file).
CHECK_UNSUPPORTED = 63


def cmd_check(image_arg: str, repair: str | None, as_json: bool, force_share: bool = False,
              fmt: str | None = None) -> int:
    """Exit codes as qemu-img check; a check that cannot run is one line and 1.
    REPAIR: None, "all" (qemu-img -r all: rebuild what is wrong) or "leaks"
    (-r leaks: qcowfs's repair rebuilds the refcounts whole, so it runs only
    where leaks are all there is to repair; with corruptions, where qemu-img
    would mend the leaks alone or fail for want of a rebuild, the image is
    left as it is, and the check's verdict and one line say so)."""
    from .. import aio

    if force_share and repair:
        raise UsageError("-U (force share) cannot be used with --repair: a repair must own the image")
    after = None  # (a last line, after the check's own)
    if _live(image_arg):
        if repair:
            raise UsageError(f"--repair needs the image to itself: unmount {image_arg} first "
                             "(qcowfs umount), then repair the image file")
        from ..service import control

        result = _check_result(control.request(image_arg, "check")["check"])
        filename = result.json.get("filename", image_arg)
    else:
        from ..host.waiting import drive

        if (fmt or probe_quietly(image_arg)) == "raw":  # (qemu-img's exit code for a format without checks)
            print(f"qcowfs: {image_arg} is a raw image: it has no metadata to check", file=sys.stderr)
            return CHECK_UNSUPPORTED
        try:
            with progress_printer(end="\r") as progress:
                result = drive(aio.check(image_arg, repair == "all", force_share=force_share, progress=progress))
            if repair == "leaks" and result.corruptions:
                after = ("qcowfs: -r leaks: the image has corruptions, which only -r all repairs: "
                         "nothing was changed")
            elif repair == "leaks" and result.leaks:
                with progress_printer(end="\r") as progress:
                    result = drive(aio.check(image_arg, True, progress=progress))
        except (QcowError, OSError) as e:
            print(f"qcowfs: check failed: {e}", file=sys.stderr)
            return 1
        filename = os.path.abspath(image_arg)
    if as_json:
        print(json_text(qemu_order(result.json | {"filename": filename})))
    else:
        out, err = render_check(result)
        for line in err:
            print(line, file=sys.stderr)
        print("\n".join(out))
    if after is not None:
        print(after, file=sys.stderr)
    return result.returncode


def probe_quietly(path: str) -> str | None:
    """PATH's format as qemu-img probes it ("qcow2" or "raw"); None where it
    cannot be read (opening it then says why)."""
    from ..aio import probe_format

    try:
        return probe_format(path)
    except OSError:
        return None


def _check_result(reply: dict[str, Any]) -> "CheckResult":
    """The daemon's check (its fields as JSON) as the record again."""
    from ..records import CheckResult

    return CheckResult(**reply | {"messages": tuple(reply["messages"]),
                                  "fixed": tuple(reply["fixed"]) if reply["fixed"] is not None else None})


# ---- snapshots, bitmaps, checkpoints -----------------------------------------------

def cmd_manage(target: str, request: dict[str, Any], writes: bool, force_share: bool = False) -> dict[str, Any]:
    """Run REQUEST on TARGET: through the daemon if it is a qcowfs mount point,
    else on the image file TARGET, opened here (for writing if WRITES;
    without a lock if FORCE_SHARE)."""
    from ..service import control

    if control.mounted(target) is not None:
        return control.request(target, **request)
    if os.path.isdir(target):
        raise UsageError(f"{target} is not a qcowfs mount point")
    from ..service.manage import Manager

    image = _open_unmounted(target, "r+" if writes else "r", force_share=force_share)
    return _run(image, lambda image: Manager(image).handle(request), prepare=False)


def _list_only_force_share(a: argparse.Namespace) -> bool:
    """-U is for list only (as qemu-img's: a change needs the lock)."""
    if a.force_share and a.action != "list":
        raise UsageError(f"-U (force share) is only for {a.command} list: {a.command} {a.action} "
                         "changes the image, which needs its lock")
    return bool(a.force_share)


def _print_snapshots(reply: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json_text(reply["snapshots"]))
    elif reply["snapshots"]:
        print("\n".join(render_snapshots(reply["snapshots"])))


def cmd_snapshot(a: argparse.Namespace) -> int:
    if a.action == "list":
        if a.name is not None:
            raise UsageError("snapshot list takes no NAME")
        reply = cmd_manage(a.target, {"op": "snapshot-list"}, writes=False, force_share=_list_only_force_share(a))
        _print_snapshots(reply, a.json)
        return 0
    _list_only_force_share(a)
    if a.name is None:
        raise UsageError(f"snapshot {a.action} needs a NAME")
    cmd_manage(a.target, {"op": f"snapshot-{a.action}", "name": a.name}, writes=True)
    return 0


def cmd_bitmap(a: argparse.Namespace) -> int:
    if a.action == "list" and (a.name is not None or a.sources):
        raise UsageError("bitmap list takes no NAME")
    if a.sources and a.action != "merge":
        raise UsageError(f"bitmap {a.action} takes one NAME")
    if a.action == "list":
        reply = cmd_manage(a.target, {"op": "bitmap-list"}, writes=False, force_share=_list_only_force_share(a))
        if a.json:
            print(json_text(reply["bitmaps"]))
        for b in [] if a.json else reply["bitmaps"]:
            print(f"{b['name']}\tgranularity {b['granularity']}\tflags {','.join(b['flags']) or '-'}"
                  + (f"\tunusable: {b['problem']}" if b.get("problem") else ""))
        return 0
    _list_only_force_share(a)
    if a.name is None:
        raise UsageError(f"bitmap {a.action} needs a NAME")
    request: dict[str, Any] = {"op": f"bitmap-{a.action}", "name": a.name}
    if a.action == "add":
        request.update(granularity=parse_size(a.granularity) if a.granularity else None,
                       enabled=not a.disable)
    if (a.source_file is not None or a.source_format is not None) and a.action != "merge":
        raise UsageError("-b and -F name the image of merge's SOURCE bitmaps")
    if a.action == "merge":
        if not a.sources:
            raise UsageError("bitmap merge needs NAME and at least one SOURCE bitmap to merge into it")
        request["sources"] = a.sources
        if a.source_file is not None:  # (absolute: a mount's daemon opens it from its own directory)
            request["source_image"] = os.path.abspath(a.source_file)
    cmd_manage(a.target, request, writes=True)
    return 0


def cmd_checkpoint(a: argparse.Namespace) -> int:
    reply = cmd_manage(a.target, {"op": "checkpoint", "name": a.name}, writes=True)
    if a.json:
        print(json_text(reply))
    return 0


# ---- maps ----------------------------------------------------------------------------

def cmd_map(a: argparse.Namespace) -> int:
    """The allocation map (qemu-img map's JSON), or with --bitmap the dirty map
    (nbdinfo's qemu:dirty-bitmap JSON). On a mount point it is read from the
    mount's maps/ files, so it shows the live state."""
    if a.snapshot and a.bitmap:
        raise UsageError("--snapshot and --bitmap cannot be combined (a bitmap tracks the active disk)")
    start = _map_bound(a.start_offset, "start offset") if a.start_offset is not None else 0
    length = _map_bound(a.max_length, "max length") if a.max_length is not None else None
    if a.bitmap and (a.start_offset is not None or length is not None):
        raise UsageError("--start-offset and --max-length are for the allocation map, not --bitmap")
    names: list[str] | None = None  # (the files of the layers by depth, where known already)
    if os.path.isdir(a.target):
        if a.start_offset is not None or length is not None:
            raise UsageError("--start-offset and --max-length need an image file (a mount's maps/ files "
                             "are the whole disk)")
        from ..service import control  # (a file is an image: the control module is not loaded for it)

        if control.mounted(a.target) is None:
            raise UsageError(f"{a.target} is not a qcowfs mount point")
        entries = _map_from_mount(a.target, a.snapshot, a.bitmap)
    elif (a.format or probe_quietly(a.target)) == "raw":
        from .. import aio
        from ..host.waiting import drive

        if a.bitmap is not None or a.snapshot is not None:
            raise UsageError(f"{a.target} is a raw image: it has no {'bitmaps' if a.bitmap else 'snapshots'}")
        entries = drive(aio.map(a.target, format="raw", start=start, length=length, force_share=a.force_share))
        names = [a.target]
    else:
        image = _open_unmounted(a.target, force_share=a.force_share)
        entries = _run(image, lambda image: image.dirty_extents(a.bitmap) if a.bitmap is not None
                       else image.map(a.snapshot, start=start, length=length))
    if a.output == "json":
        from ..engine.extents import map_text

        sys.stdout.write(map_text(entries))
    elif a.bitmap:
        for e in entries:
            print(f"{e['offset']:>14} {e['length']:>14} {e['type']:>4}  {e['description']}")
    else:
        sys.stdout.write(_human_map(entries, names if names is not None else _layer_names(a.target, a.force_share)))
    return 0


def _human_map(entries: list[dict[str, Any]], names: list[str]) -> str:
    """`qemu-img map`'s human output of ENTRIES: each run of data with the
    offset it has in the file of its layer (NAMES by depth); zeros and holes
    are left out, and a run whose data has no offset in a file (compressed,
    encrypted) is qemu-img's error."""
    def hex_c(n: int) -> str:  # (C's %#x: 0 without the 0x)
        return f"{n:#x}" if n else "0"

    lines = [f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File"]
    for e in entries:
        if e["data"] and "offset" not in e:
            raise QcowError("File contains external, encrypted or compressed clusters.")
        if e["data"] and not e["zero"]:
            lines.append(f"{hex_c(e['start']):<16}{hex_c(e['length']):<16}{hex_c(e['offset']):<16}"
                         f"{names[e['depth']] if e['depth'] < len(names) else ''}")
    return "\n".join(lines) + "\n"


def _layer_names(target: str, force_share: bool) -> list[str]:
    """The file that holds the data of each layer of TARGET's chain, by depth,
    as qemu-img map names it: the layer, or its external data file (a mount
    point: the served image and its layers, as the daemon names them)."""
    if os.path.isdir(target):
        from ..service import control

        live = control.request(target, "info")["info"]
        return [live.get("filename", target), *live.get("backing-chain", [])]
    names = []
    for d in chain_info(target, force_share):
        data_file = d.get("format-specific", {}).get("data", {}).get("data-file")
        # (a layer's data lies in its external data file, named beside it)
        names.append(qemu_path_combine(d["filename"], data_file) if data_file else d["filename"])
    return names


def _map_bound(text: str, what: str) -> int:
    """qemu-img map's --start-offset / --max-length: a size from 0 to 2^63 - 1."""
    try:
        n = parse_size(text, zero=True)
    except UsageError:
        n = -1
    if not 0 <= n < 2**63:
        raise UsageError(f"invalid {what} '{text}' (a number of bytes from 0 to {2**63 - 1}, with an optional "
                         "suffix k, M, G, T, P or E)")
    return n


def _map_from_mount(mountpoint: str, snapshot: str | None, bitmap: str | None) -> list[dict[str, Any]]:
    import json

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


# ---- create and convert ------------------------------------------------------------

# What `-o help` says of each option create and convert take (qemu-img lists
# its own the same way; the kinds come from the library's CREATE_OPTIONS).
OPTION_HELP = {
    "size": "virtual disk size",
    "cluster_size": "qcow2 cluster size",
    "compat": "compatibility level (v2 [0.10] or v3 [1.1])",
    "refcount_bits": "width of a reference count entry in bits",
    "lazy_refcounts": "postpone refcount updates",
    "extended_l2": "extended L2 tables: 32 subclusters per cluster",
    "compression_type": "compression method of compressed clusters (zlib, zstd)",
    "preallocation": "preallocation mode (off, metadata, falloc, full)",
    "data_file": "file name of an external data file",
    "data_file_raw": "the external data file is kept a raw image",
    "backing_file": "file name of a base image",
    "backing_fmt": "image format of the base image (qcow2, raw)",
    "encrypt.format": "encryption data format (luks)",
    "encrypt.cipher-alg": "cipher algorithm (aes-128, aes-192, aes-256)",
    "encrypt.cipher-mode": "cipher mode (xts, cbc, ecb, ctr)",
    "encrypt.ivgen-alg": "initialization vector generator (plain, plain64, essiv)",
    "encrypt.ivgen-hash-alg": "hash of the essiv generator",
    "encrypt.hash-alg": "hash of the key derivation (PBKDF2)",
    "encrypt.iter-time": "time the key derivation takes, in milliseconds",
    "encrypt.key-secret": "id of the --object secret holding the passphrase",
    # (amend's)
    "encrypt.state": "the new state of the key slots it selects (active, inactive)",
    "encrypt.keyslot": "the one key slot to change",
    "encrypt.new-secret": "id of the --object secret holding the new passphrase",
    "encrypt.old-secret": "id of the --object secret: the slots it opens are erased",
}
# A raw image's options (qemu-img lists size; preallocation is its file protocol's).
RAW_OPTIONS = {"size": ("size", "virtual disk size"),
               "preallocation": ("str", "preallocation mode (off, falloc, full)")}


def asks_option_help(command: str, argv: list[str]) -> bool:
    """`create`/`convert`/`amend` with `-o help` or `-o ?` among its -o values:
    what qemu-img answers with the list of options (no image needed)."""
    if command not in ("create", "convert", "amend"):
        return False
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-o"]
    values += [a[2:] for a in argv if a.startswith("-o") and len(a) > 2]
    return any(part in ("help", "?") for v in values for part in v.split(","))


def print_option_help(command: str, argv: list[str]) -> int:
    """The options of COMMAND's target format (-f of create, -O of convert:
    qcow2 or raw; amend's for qcow2), a line each, as qemu-img lists them."""
    from .. import aio

    flag = {"create": "-f", "convert": "-O"}.get(command)
    fmt = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag), "qcow2") if flag else "qcow2"
    if command == "convert" and flag not in argv:
        fmt = "raw"  # (qemu-img convert's default output format)
    if fmt == "raw":
        title, shown = "Supported raw options:", {f"{n}=<{k}>": text for n, (k, text) in RAW_OPTIONS.items()}
    else:
        table = aio.AMEND_OPTIONS if command == "amend" else aio.CREATE_OPTIONS
        names = sorted([*table, "encrypt.new-secret", "encrypt.old-secret"]) if command == "amend" else \
            [*table, "encrypt.key-secret"]
        title = "Amend options for 'qcow2':" if command == "amend" else "Supported qcow2 options:"
        shown = {f"{n}=<{table.get(n, 'str')}>": OPTION_HELP[n] for n in names}
    print(title)
    width = max(map(len, shown))
    for left, text in shown.items():
        print(f"  {left:<{width}} - {text}")
    return 0


def parse_qemu_options(texts: list[str]) -> dict[str, str]:
    """-o OPTIONS as qemu-img reads them: NAME=VALUE pairs split at commas,
    ",," a literal comma; several -o add up (a later value wins)."""
    out: dict[str, str] = {}
    for text in texts:
        parts, cur, i = [], "", 0
        while i < len(text):
            if text[i] == ",":
                if text[i + 1 : i + 2] == ",":
                    cur += ","
                    i += 2
                    continue
                parts.append(cur)
                cur = ""
            else:
                cur += text[i]
            i += 1
        parts.append(cur)
        for part in parts:
            if not part:
                continue
            name, sep, value = part.partition("=")
            if not sep:
                raise UsageError(f"invalid option '{part}' (expected NAME=VALUE)")
            out[name] = value
    return out


def create_keywords(options: dict[str, str]) -> dict[str, Any]:
    """qemu-img -o options as the library's keyword arguments: sizes with
    their suffixes as numbers, the rest as text the library checks."""
    from ..aio import CREATE_OPTIONS

    out: dict[str, Any] = {}
    for name, value in options.items():
        if name == "encrypt.key-secret":
            raise UsageError("encrypt.key-secret: qcowfs takes the passphrase from --key-file or a prompt")
        if name not in CREATE_OPTIONS:
            raise UsageError(f"invalid parameter '{name}' for qcow2 (known: {', '.join(CREATE_OPTIONS)})")
        out[name.replace(".", "_").replace("-", "_")] = (parse_size(value) if CREATE_OPTIONS[name] == "size"
                                                          else value)
    return out


# qemu-img's -o option naming the new image's passphrase by the id of a --object secret.
KEY_SECRET = "encrypt.key-secret"


def secrets(objects: list[str] | None) -> dict[str, bytes]:
    """The passphrases of a command's --object secret,... options, by id."""
    from ..host.secret import secret_object

    return dict(secret_object(spec) for spec in objects or ())


def secret_named(objects: list[str] | None, option: str, ident: str) -> bytes:
    """The passphrase -o OPTION=IDENT names (qemu-img's encrypt.key-secret=...):
    the --object secret of that id."""
    given = secrets(objects)
    if ident not in given:
        raise UsageError(f"{option}={ident}: no secret with id '{ident}' (give it with "
                         f"--object secret,id={ident},file=FILE)")
    return given[ident]


def new_image_key(given: dict[str, str], key_files: list[str] | None, key_flag: str,
                  objects: list[str] | None) -> "Keyring | bytes":
    """The passphrase of a new encrypted image: the --object secret that -o
    encrypt.key-secret names (GIVEN: the -o options), else KEY_FILES (or a
    prompt); both at once is refused."""
    if KEY_SECRET not in given:
        return key_source(key_files)
    if key_files:
        raise UsageError(f"give the new image's passphrase once: {KEY_SECRET} or {key_flag}")
    return secret_named(objects, KEY_SECRET, given[KEY_SECRET])


def key_source(key_files: list[str] | None, objects: list[str] | None = None) -> Keyring:
    """The passphrases of the images a command opens: its --object secrets
    and --key-file FILEs (each tried in order on each encrypted image), else a
    prompt on a terminal."""
    from ..host.secret import Keyring, passphrase_source

    keys = list(secrets(objects).values())
    if keys:
        return Keyring(passphrases=keys, key_files=key_files or (),
                       missing="{image} is encrypted and none of the passphrases given opens it")
    return passphrase_source(key_files or (), options="--key-file FILE")


def cmd_create(a: argparse.Namespace) -> int:
    """qemu-img create -f qcow2."""
    import qcowfs

    if a.format not in ("qcow2", "raw"):
        raise UsageError(f"qcowfs creates qcow2 and raw images, not '{a.format}'")
    from ..aio import CREATE_OPTIONS
    from .text import formatting_line

    given = parse_qemu_options(a.options)
    kw = create_keywords({k: v for k, v in given.items() if k != KEY_SECRET})
    new_key = new_image_key(given, a.key_file, "--key-file", a.objects)
    if a.backing is not None:
        kw["backing_file"] = given["backing_file"] = a.backing
    if a.backing_format is not None:
        kw["backing_fmt"] = given["backing_fmt"] = a.backing_format
    size = parse_size(a.size, zero=True) if a.size is not None else None
    if "size" in kw:
        if size is not None:
            raise UsageError("give the size either as SIZE or as -o size=..., not both")
        size = kw.pop("size")
    if a.format == "raw":
        if a.key_file:
            raise UsageError("a raw image is not encrypted: --key-file has no use")
        qcowfs.create(a.image, size, format="raw", **kw)
    else:
        qcowfs.create(a.image, size, passphrase=new_key, unsafe=a.unsafe, **kw)
    shown = {name: str(parse_size(value)) if CREATE_OPTIONS.get(name) == "size" else value
             for name, value in given.items()}
    # (without SIZE, the backing file's size: read back from the new image)
    shown["size"] = str(size if size is not None else _qcow2_info(a.image, False)["virtual-size"])
    print(formatting_line(a.image, a.format, shown))
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    """qemu-img convert: everything checked before anything is written."""
    from .. import aio
    from ..host.waiting import drive

    if a.skip_create and a.options:  # (before -o's backing_file= becomes -B's)
        raise UsageError("-o has no effect when skipping image creation (-n), as in qemu-img")
    given = parse_qemu_options(a.options)
    options = {k: v for k, v in given.items() if k != KEY_SECRET}
    # (a raw target's one option, preallocation, is checked by the library)
    kw = dict(options) if a.output_format == "raw" else create_keywords(options)
    if "size" in kw:
        raise UsageError("convert takes the size of SRC (-o size= is not an option here)")
    # -o backing_file=/backing_fmt= say what -B/-F say; -B/-F win, as in qemu-img (and create)
    o_backing, o_format = kw.pop("backing_file", None), kw.pop("backing_fmt", None)
    backing = a.backing if a.backing is not None else o_backing
    backing_format = a.backing_format if a.backing_format is not None else o_format
    if a.output_format == "raw" and (a.compress or backing):
        raise UsageError("-c and -B need -O qcow2")
    if a.copy_offload and a.sparse is not None:
        raise UsageError("copy offloading (-C) cannot be used with -S, as in qemu-img")
    sparse = parse_size(a.sparse if a.sparse is not None else "4k", zero=True)
    # (qemu-img's tuning options: checked as it checks them, then of no effect here)
    if a.coroutines is not None and not 1 <= a.coroutines <= 16:
        raise UsageError("-m: the number of requests must be between 1 and 16 (as in qemu-img)")
    if a.source_cache is not None:
        aio.check_cache_mode(a.source_cache, "-T")
    source_key = key_source(a.key_file, a.objects)
    # (a new encrypted image's passphrase, or -n's existing target's)
    target_key = (new_image_key(given, a.target_key_file, "--target-key-file", a.objects)
                  if kw.get("encrypt_format") or a.skip_create or KEY_SECRET in given else None)
    with progress_printer(a.progress) as progress:
        drive(aio.convert(
            a.src, a.dst, src_format=a.format, out_format=a.output_format, compress=a.compress,
            snapshot=a.snapshot, backing_file=backing, backing_fmt=backing_format, sparse_size=sparse,
            force_share=a.force_share, passphrase=source_key, target_passphrase=target_key, progress=progress,
            cache=a.cache, skip_create=a.skip_create, target_is_zero=a.target_is_zero, salvage=a.salvage,
            bitmaps=a.bitmaps, skip_broken_bitmaps=a.skip_broken_bitmaps,
            rate_limit=parse_size(a.rate_limit, zero=True) if a.rate_limit is not None else 0,
            copy_offload=a.copy_offload, **kw))
    return 0


def cmd_dd(a: argparse.Namespace) -> int:
    """qemu-img dd: its operands (if=, of=, bs=, count=, skip=), its refusals."""
    from .. import aio
    from ..host.waiting import drive

    ops: dict[str, str] = {}
    for operand in a.operands:
        key, eq, value = operand.partition("=")
        if not eq or key not in ("if", "of", "bs", "count", "skip"):
            raise UsageError(f"unrecognized operand {operand} (if=, of=, bs=, count=, skip=, as qemu-img dd)")
        ops[key] = value
    if not ops.get("if") or not ops.get("of"):
        raise UsageError("give both the input and the output: if=INPUT of=OUTPUT")
    block_size = parse_size(ops["bs"], zero=True) if "bs" in ops else 512
    drive(aio.dd(ops["if"], ops["of"], block_size=block_size,
                 count=parse_size(ops["count"], zero=True) if "count" in ops else None,
                 skip=parse_size(ops["skip"], zero=True) if "skip" in ops else 0,
                 src_format=a.format, out_format=a.output_format, force_share=a.force_share,
                 passphrase=key_source(a.key_file, a.objects)))
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    """qemu-img compare: its lines and exit codes (0 identical, 1 different,
    2 an error, one line)."""
    from .. import aio
    from ..host.waiting import drive

    try:
        if a.source_cache is not None:
            aio.check_cache_mode(a.source_cache, "-T")
        with progress_printer(a.progress) as progress:
            found = drive(aio.compare(a.first, a.second, first_format=a.first_format,
                                      second_format=a.second_format, strict=a.strict,
                                      force_share=a.force_share, passphrase=key_source(a.key_file, a.objects),
                                      progress=progress))
    except (QcowError, OSError) as e:
        print(f"qcowfs: {e if isinstance(e, QcowError) else (e.strerror or e)}", file=sys.stderr)
        return 2
    if found.size_mismatch and (found.offset is None or found.offset >= min(found.sizes)):
        # (as qemu-img: said once the common part compared equal, before the tail's verdict)
        print("Strict mode: Image size mismatch!" if a.strict else "Warning: Image size mismatch!")
    if found.allocation:
        print(f"Strict mode: Offset {found.offset} block status mismatch!")
    elif found.offset is not None:
        print(f"Content mismatch at offset {found.offset}!")
    elif found.identical:
        print("Images are identical.")
    return 0 if found.identical else 1


def cmd_measure(a: argparse.Namespace) -> int:
    """qemu-img measure: its lines, or its JSON (same keys, same order)."""
    from .. import aio
    from ..host.waiting import drive

    if a.output not in ("human", "json"):
        raise UsageError("--output must be used with human or json as argument")
    if a.filename is not None and a.size is not None:
        raise UsageError("--size N cannot be used together with a filename")
    if a.filename is None and a.size is None:
        raise UsageError("either --size N or one filename must be specified")
    if a.filename is None and (a.format is not None or a.snapshot is not None):
        raise UsageError("-f and -l require a filename argument")
    if a.size is not None and a.size.strip().startswith("-"):
        raise UsageError(f"invalid size '{a.size}' (it must not be negative)")
    kw = create_keywords(parse_qemu_options(a.options))
    kw.pop("size", None)   # (-o size= gives way to --size or FILENAME's size, as in qemu-img)
    size = parse_size(a.size, zero=True) if a.size is not None else None
    keys = key_source(a.key_file) if a.key_file else None
    result = drive(aio.measure(a.filename, size=size, out_format=a.output_format, src_format=a.format,
                               snapshot=a.snapshot, force_share=a.force_share, passphrase=keys, **kw))
    if a.output == "json":
        print(json_text(qemu_order(result)))
    else:
        print(f"required size: {result['required']}\nfully allocated size: {result['fully-allocated']}")
        if "bitmaps" in result:
            print(f"bitmaps size: {result['bitmaps']}")
    return 0
