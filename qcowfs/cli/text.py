"""Human-readable output shared by `qcowfs info` and the snapshot commands.

No qcow2 code is imported here, so a command that only prints what a
daemon answered starts fast."""
from __future__ import annotations

import time
from typing import Any


def json_text(value: Any, indent: int | None = 4) -> str:
    """VALUE as JSON text, as qemu-img's --output=json indents it (json is
    imported here: only the commands asked for JSON pay for it)."""
    import json

    return json.dumps(value, indent=indent)


# QEMU's QDict has this many hash buckets (qobject/qdict.c, QDICT_BUCKET_MAX).
QDICT_BUCKET_MAX = 512


def _qdict_bucket(key: str) -> int:
    """The bucket of KEY in a QEMU QDict: qdict.c's tdb_hash, modulo
    QDICT_BUCKET_MAX (32-bit arithmetic, as in C)."""
    raw = key.encode()
    value = 0x238F13AF * len(raw) & 0xFFFFFFFF
    for i, byte in enumerate(raw):
        value = value + (byte << (i * 5 % 24)) & 0xFFFFFFFF
    return (1103515243 * value + 12345 & 0xFFFFFFFF) % QDICT_BUCKET_MAX


def qemu_order(value: Any) -> Any:
    """VALUE with every object's keys in the order qemu-img's JSON output
    lists them: qobject_to_json walks a QDict bucket by bucket, and within a
    bucket the key put last comes first. So `qcowfs info --output=json` and
    `qemu-img info --output=json` print their common keys in one order (and
    check, measure), for whoever compares them as text."""
    if isinstance(value, dict):
        items = list(value.items())
        order = sorted(range(len(items)), key=lambda i: (_qdict_bucket(items[i][0]), -i))
        return {items[i][0]: qemu_order(items[i][1]) for i in order}
    if isinstance(value, list):
        return [qemu_order(v) for v in value]
    return value


# The options `qemu-img create` lists in its "Formatting" line, in its order
# (QEMU's list of creation options of the format, then of the file), and the
# defaults it lists when they are not given.
CREATE_LINE_ORDER = {
    "qcow2": ("encrypt.format", "encrypt.key-secret", "encrypt.cipher-alg", "encrypt.cipher-mode", "encrypt.ivgen-alg",
              "encrypt.ivgen-hash-alg", "encrypt.hash-alg", "encrypt.iter-time", "cluster_size", "extended_l2",
              "preallocation", "compression_type", "size", "compat", "backing_file", "backing_fmt", "data_file",
              "data_file_raw", "lazy_refcounts", "refcount_bits"),
    "raw": ("size", "preallocation"),
}
CREATE_LINE_DEFAULTS = {
    "qcow2": {"cluster_size": "65536", "extended_l2": "off", "compression_type": "zlib", "lazy_refcounts": "off",
              "refcount_bits": "16"},
    "raw": {},
}


def formatting_line(image: str, fmt: str, options: dict[str, str]) -> str:
    """What `qemu-img create -f FMT` prints for IMAGE (scripts written for it
    may read it; -q silences it): OPTIONS as given (sizes in bytes), then
    the format's defaults, in qemu-img's order."""
    values = {**CREATE_LINE_DEFAULTS[fmt], **options}
    shown = "".join(f" {name}={values[name]}" for name in CREATE_LINE_ORDER[fmt] if name in values)
    return f"Formatting '{image}', fmt={fmt}{shown}"


def human_size(n: int) -> str:
    """N bytes as qemu-img prints sizes (1 KiB = 1024 B, three digits)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def render_snapshots(snaps: list[dict[str, Any]]) -> list[str]:
    """The "Snapshot list:" table of qemu-img info and qemu-img snapshot -l."""
    # (QEMU 7.2's bdrv_snapshot_dump: its columns, its clock, an ICOUNT column)
    lines = ["Snapshot list:", f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"]
    for s in snaps:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["date-sec"]))
        secs = s["vm-clock-sec"]
        clock = f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}.{s['vm-clock-nsec'] // 10**6:03d}"
        icount = str(s["icount"]) if "icount" in s else ""
        lines.append(f"{s['id']:<9} {s['name']:<16} {human_size(s['vm-state-size']):>8}{date:>20}{clock:>13}"
                     f"{icount:>11}")
    return lines


def _render_value(lines: list[str], key: str, value: Any, indent: str) -> None:
    """One key of format-specific data as qemu-img prints it: nested objects
    indented, lists as [N] entries."""
    name = key.replace("-", " ")
    if isinstance(value, dict):
        lines.append(f"{indent}{name}:")
        for k, v in value.items():
            _render_value(lines, k, v, indent + "    ")
    elif isinstance(value, list):
        lines.append(f"{indent}{name}:")
        for i, item in enumerate(value):
            _render_value(lines, f"[{i}]", item, indent + "    ")
    else:
        lines.append(f"{indent}{name}: {str(value).lower() if isinstance(value, bool) else value}")


def render_info(d: dict[str, Any]) -> str:
    """`qemu-img info`'s text of D (its JSON's keys): a qcow2 image's, or a
    raw backing layer's (--backing-chain)."""
    lines = [f"image: {d['filename']}", f"file format: {d['format']}",
             f"virtual size: {human_size(d['virtual-size'])} ({d['virtual-size']} bytes)",
             f"disk size: {human_size(d['actual-size'])}"]
    if d["format"] != "qcow2":
        return "\n".join(lines)
    if d.get("encrypted"):
        lines.append("encrypted: yes")
    lines.append(f"cluster_size: {d['cluster-size']}")
    if d.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if "backing-filename" in d:
        full = d.get("full-backing-filename")
        lines.append(f"backing file: {d['backing-filename']}"
                     + (" (cannot determine actual path)" if full is None else
                        f" (actual path: {full})" if full != d["backing-filename"] else ""))
        if "backing-filename-format" in d:
            lines.append(f"backing file format: {d['backing-filename-format']}")
        for i, p in enumerate(d.get("backing-chain", [])[1:], 2):
            lines.append(f"backing chain [{i}]: {p}")
    snaps = d.get("snapshots", [])
    if snaps:
        lines += render_snapshots(snaps)
    data = dict(d["format-specific"]["data"])
    if "bitmaps" in data:  # (each as QEMU's dump orders a bitmap's keys)
        data["bitmaps"] = [{k: b[k] for k in ("flags", "name", "granularity")} for b in data["bitmaps"]]
    lines.append("Format specific information:")
    for key in FORMAT_SPECIFIC_ORDER:
        if key in data:
            _render_value(lines, key, data[key], "    ")
    return "\n".join(lines)


# The order in which qemu-img 7.2 prints the qcow2 format-specific keys (its
# dump walks a hash table: the order is fixed, not the JSON's).
FORMAT_SPECIFIC_ORDER = ("compat", "compression-type", "lazy-refcounts", "bitmaps", "refcount-bits", "data-file",
                         "encrypt", "data-file-raw", "corrupt", "extended-l2")


def render_check(r: Any) -> tuple[list[str], list[str]]:
    """`qemu-img check`'s human output of a CheckResult: (stdout lines,
    stderr lines). Like qemu-img, what is wrong goes to stderr."""
    err = list(r.messages)
    if r.unsaid:
        err.append(f"({r.unsaid} more messages like these are not shown)")
    out: list[str] = []
    if r.fixed is not None and any(r.fixed):
        out.append(f"The following inconsistencies were found and repaired:\n\n"
                   f"    {r.fixed[0]} leaked clusters\n    {r.fixed[1]} corruptions\n")
    if r.corruptions:
        out.append(f"\n{r.corruptions} errors were found on the image.\n"
                   "Data may be corrupted, or further writes to the image may corrupt it.")
    if r.leaks:
        out.append(f"\n{r.leaks} leaked clusters were found on the image.\n"
                   "This means waste of disk space, but no harm to data.")
    if not r.corruptions and not r.leaks:
        out.append("No errors were found on the image.")
    if r.total_clusters:
        alloc = max(1, r.allocated_clusters)
        out.append(f"{r.allocated_clusters}/{r.total_clusters} = "
                   f"{100 * r.allocated_clusters / r.total_clusters:.2f}% allocated, "
                   f"{100 * r.fragmented_clusters / alloc:.2f}% fragmented, "
                   f"{100 * r.compressed_clusters / alloc:.2f}% compressed clusters")
    out.append(f"Image end offset: {r.image_end_offset}")
    return out, err
