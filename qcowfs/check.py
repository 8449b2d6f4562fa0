"""`qcowfs check`: count every reference (references.py), compare with the
refcounts, check COPIED flags; repair by rebuilding the refcount structure
from the counts (refcount.py).

Exit codes follow qemu-img check: 0 clean, 1 check failed, 2 corruptions,
3 leaks only.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .errors import QcowError
from .format import INCOMPAT_CORRUPT, INCOMPAT_DIRTY, L1E_OFFSET_MASK, L2E_OFFSET_MASK, refcount_array
from .image import Image, OpenOptions
from .references import count_references, read_entries, refcount_table
from .refcount import copied_errors, stored_refcount

EXIT_CLEAN, EXIT_FAILED, EXIT_CORRUPT, EXIT_LEAKS = 0, 1, 2, 3
MAX_MESSAGES = 100


@dataclass
class CheckResult:
    corruptions: int = 0
    leaks: int = 0
    messages: list[str] = field(default_factory=list)
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    image_end_offset: int = 0
    unsaid: int = 0

    def say(self, msg: str) -> None:
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(msg)
        else:
            self.unsaid += 1


def refcounts(image: Image, nclusters: int) -> np.ndarray:
    """The stored refcount of clusters 0..nclusters-1."""
    geo = image.geo
    rpb, cs = geo.refcounts_per_block, geo.cluster_size
    out = np.zeros(nclusters, np.int64)
    for r, off in enumerate(refcount_table(image.file, image.header)):
        if not off or r * rpb >= nclusters or off % cs:
            continue
        raw = image.file.read_sync(off, cs)
        if len(raw) < cs:
            continue
        # 64-bit refcounts beyond int64 are still "more than referenced" (a leak).
        vals = refcount_array(raw, geo.refcount_order)
        if geo.refcount_order == 6:
            vals = np.minimum(vals, np.uint64(1 << 62))
        vals = vals.astype(np.int64)
        n = min(rpb, nclusters - r * rpb)
        out[r * rpb : r * rpb + n] = vals[:n]
    return out


def check_image(image: Image, progress: Callable[[float], None] | None = None) -> CheckResult:
    """Count every reference and compare with the stored refcounts and flags."""
    result = CheckResult()

    def corruption(msg: str) -> None:
        result.corruptions += 1
        result.say(msg)

    counted = count_references(image.meta, corruption, progress=progress)
    cs = image.geo.cluster_size
    n = max(len(counted.counts), -(-image.file.known_size // cs))
    stored = refcounts(image, n)
    want = np.zeros(n, np.int64)
    want[: len(counted.counts)] = counted.counts
    for c in np.flatnonzero(stored < want).tolist():
        corruption(f"ERROR cluster {c} refcount={stored[c]} reference={want[c]}")
    for c in np.flatnonzero(stored > want).tolist():
        result.leaks += 1
        result.say(f"Leaked cluster {c} refcount={stored[c]} reference={want[c]}")
    bad_l1, bad_l2 = copied_errors(image.meta, stored, counted.active_tables, image.external_data)
    l1 = read_entries(image.file, image.header.l1_table_offset, image.header.l1_size)
    step = 2 if image.geo.extended_l2 else 1

    def rc(off: int) -> int:
        return stored_refcount(stored, off, cs)

    for i in bad_l1:
        e = int(l1[i])
        corruption(f"ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} "
                   f"refcount={rc(e & L1E_OFFSET_MASK)}")
    for off, ks in bad_l2.items():
        for k in ks:
            e = int(counted.active_tables[off][k * step])
            corruption(f"ERROR OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc(e & L2E_OFFSET_MASK)}")
    # As qemu-img: the highest cluster that is referenced or has a refcount.
    nz = np.flatnonzero((stored > 0) | (want > 0))
    result.image_end_offset = int((nz[-1] + 1) * cs) if len(nz) else cs
    result.total_clusters = -(-image.size // cs)
    result.allocated_clusters = counted.allocated_clusters
    result.fragmented_clusters = counted.fragmented_clusters
    result.compressed_clusters = counted.compressed_clusters
    return result


# ---- the command ----------------------------------------------------------------

def _progress_printer() -> Callable[[float], None] | None:
    if not sys.stderr.isatty():
        return None

    def show(frac: float) -> None:
        print(f"\r    ({frac * 100:6.2f}/100%)", end="", file=sys.stderr, flush=True)
    return show


def _report(path: str, r: CheckResult, as_json: bool, fixed: tuple[int, int] | None) -> None:
    if as_json:
        d = {"image-end-offset": r.image_end_offset, "total-clusters": r.total_clusters,
             "check-errors": 0, "leaks": r.leaks, "corruptions": r.corruptions, "filename": path,
             "format": "qcow2", "allocated-clusters": r.allocated_clusters,
             "fragmented-clusters": r.fragmented_clusters,
             "compressed-clusters": r.compressed_clusters}
        if fixed is not None:
            d["leaks-fixed"], d["corruptions-fixed"] = fixed
        print(json.dumps(d, indent=4))
        return
    # Like qemu-img: what is wrong on stderr, the summary on stdout.
    for m in r.messages:
        print(m, file=sys.stderr)
    if r.unsaid:
        print(f"({r.unsaid} more messages like these are not shown)", file=sys.stderr)
    if fixed is not None and any(fixed):
        print(f"The following inconsistencies were found and repaired:\n\n"
              f"    {fixed[0]} leaked clusters\n    {fixed[1]} corruptions\n")
    if r.corruptions:
        print(f"\n{r.corruptions} errors were found on the image.\n"
              "Data may be corrupted, or further writes to the image may corrupt it.")
    if r.leaks:
        print(f"\n{r.leaks} leaked clusters were found on the image.\n"
              "This means waste of disk space, but no harm to data.")
    if not r.corruptions and not r.leaks:
        print("No errors were found on the image.")
    if r.total_clusters:
        alloc = max(1, r.allocated_clusters)
        print(f"{r.allocated_clusters}/{r.total_clusters} = "
              f"{100 * r.allocated_clusters / r.total_clusters:.2f}% allocated, "
              f"{100 * r.fragmented_clusters / alloc:.2f}% fragmented, "
              f"{100 * r.compressed_clusters / alloc:.2f}% compressed clusters")
    print(f"Image end offset: {r.image_end_offset}")


def run_check(path: str, repair: bool, as_json: bool, force_share: bool = False) -> int:
    import trio

    progress = _progress_printer()

    async def main() -> int:
        image = Image(path, OpenOptions(read_only=not repair, repair=repair, force_share=force_share))
        if image.warnings:  # a part of the image it cannot read: no verdict
            await image.close()
            raise QcowError(image.warnings[0])
        try:
            result = check_image(image, progress)
            fixed = None
            dirty = bool(image.header.incompatible_features & INCOMPAT_DIRTY)
            if repair and (result.corruptions or result.leaks or dirty):
                await image.rebuild_refcounts()
                if dirty:
                    await image.meta.update(incompatible_features=lambda bits: bits & ~INCOMPAT_DIRTY)
                before = result
                result = check_image(image)
                fixed = (before.leaks - result.leaks, before.corruptions - result.corruptions)
                if not result.corruptions and image.header.incompatible_features & INCOMPAT_CORRUPT:
                    await image.meta.update(incompatible_features=lambda bits: bits & ~INCOMPAT_CORRUPT)
            if progress:
                print("\r", end="", file=sys.stderr)
            _report(path, result, as_json, fixed)
        finally:
            await image.close()
        if result.corruptions:
            return EXIT_CORRUPT
        return EXIT_LEAKS if result.leaks else EXIT_CLEAN

    try:
        return trio.run(main)
    except (QcowError, OSError) as e:
        print(f"qcowfs: check failed: {e}", file=sys.stderr)
        return EXIT_FAILED
