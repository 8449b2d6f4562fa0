"""`qcowfs check`: count every reference, compare with the refcounts, check
COPIED flags; repair by writing a fresh refcount structure from the counts.

Exit codes follow qemu-img check: 0 clean, 1 check failed, 2 corruptions,
3 leaks only.
"""
from __future__ import annotations

import json
import struct
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .errors import QcowError
from .format import (EXT_BITMAPS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, L1E_OFFSET_MASK, L2E_OFFSET_MASK,
                     OFLAG_COMPRESSED, OFLAG_COPIED, REFT_OFFSET_MASK, BitmapsExtension,
                     compressed_shift, encode_refcount_block, refcount_array)
from .image import Image, OpenOptions

EXIT_CLEAN, EXIT_FAILED, EXIT_CORRUPT, EXIT_LEAKS = 0, 1, 2, 3
MAX_MESSAGES = 100


@dataclass
class CheckResult:
    corruptions: int = 0
    leaks: int = 0
    messages: list[str] = field(default_factory=list)
    total_clusters: int = 0
    allocated_clusters: int = 0
    compressed_clusters: int = 0
    image_end_offset: int = 0

    def say(self, msg: str) -> None:
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(msg)


class References:
    """How many times each host cluster of the image file is referenced."""

    def __init__(self, image: Image, result: CheckResult) -> None:
        self.image = image
        self.cs = image.geo.cluster_size
        self.result = result
        self.counts = np.zeros(max(1, -(-image.file.known_size // self.cs)), np.int64)

    def add(self, offset: int, length: int, what: str, times: int = 1) -> None:
        if length <= 0:
            return
        first, last = offset // self.cs, (offset + length - 1) // self.cs
        if last >= len(self.counts):
            self.result.corruptions += 1
            self.result.say(f"ERROR {what} at {offset:#x} lies past the end of the image file")
            return
        self.counts[first : last + 1] += times

    def add_clusters(self, offsets: np.ndarray, what: str, times: int = 1) -> None:
        idx = (offsets // np.uint64(self.cs)).astype(np.int64)
        bad = idx >= len(self.counts)
        if bad.any():
            self.result.corruptions += int(bad.sum())
            self.result.say(f"ERROR {what} at {int(offsets[bad][0]):#x} lies past the end of the image file")
            idx = idx[~bad]
        np.add.at(self.counts, idx, times)


def _read(image: Image, offset: int, length: int) -> bytes:
    return image.file.read_sync(offset, length)


def _l1_entries(image: Image, offset: int, size: int) -> np.ndarray:
    raw = _read(image, offset, size * 8)
    return np.frombuffer(raw.ljust(size * 8, b"\0"), ">u8").astype(np.uint64)


def count_references(image: Image, result: CheckResult,
                     progress: Callable[[float], None] | None = None,
                     refcount_structure: bool = True) -> tuple[References, dict[int, np.ndarray]]:
    """Every reference of the image (without the refcount table and blocks when
    REFCOUNT_STRUCTURE is false); also the active L2 tables (for COPIED checks)."""
    h, geo = image.header, image.geo
    cs = geo.cluster_size
    refs = References(image, result)
    refs.add(0, cs, "header")
    refs.add(h.l1_table_offset, h.l1_size * 8, "active L1 table")
    if refcount_structure:
        refs.add(h.refcount_table_offset, h.refcount_table_clusters * cs, "refcount table")
    for off in _refcount_table(image) if refcount_structure else []:
        if off:
            if off % cs:
                result.corruptions += 1
                result.say(f"ERROR refcount block offset {off:#x} is not cluster aligned")
            else:
                refs.add(off, cs, "refcount block")
    if h.nb_snapshots:
        refs.add(h.snapshots_offset, sum(len(s.pack()) for s in image.snapshots), "snapshot table")
    l1s = [(h.l1_table_offset, h.l1_size, True)]
    for s in image.snapshots:
        refs.add(s.l1_table_offset, s.l1_size * 8, f"snapshot {s.id_str} L1 table")
        l1s.append((s.l1_table_offset, s.l1_size, False))
    _count_bitmaps(image, refs)
    l2_refs: Counter[int] = Counter()
    active: set[int] = set()
    for offset, size, is_active in l1s:
        if not size or offset % cs:
            continue
        offs = (_l1_entries(image, offset, size) & np.uint64(L1E_OFFSET_MASK))
        for off in offs[offs != 0].tolist():
            l2_refs[off] += 1
            if is_active:
                active.add(off)
    active_tables: dict[int, np.ndarray] = {}
    x = compressed_shift(geo.cluster_bits)
    for n, (off, times) in enumerate(sorted(l2_refs.items())):
        if progress:
            progress(n / max(1, len(l2_refs)))
        if off % cs:
            result.corruptions += 1
            result.say(f"ERROR L2 table offset {off:#x} is not cluster aligned")
            continue
        refs.add(off, cs, "L2 table", times)
        raw = _read(image, off, cs)
        if len(raw) < cs:
            continue
        table = np.frombuffer(raw, ">u8").astype(np.uint64)
        if off in active:
            active_tables[off] = table
        words = table[0::2] if geo.extended_l2 else table
        comp = (words & np.uint64(OFLAG_COMPRESSED)) != 0
        std = words[~comp]
        data = std & np.uint64(L2E_OFFSET_MASK)
        if image.data_file is None:
            data = data[data != 0]
            bad = data % np.uint64(cs) != 0
            if bad.any():
                result.corruptions += int(bad.sum())
                result.say(f"ERROR data cluster offset {int(data[bad][0]):#x} is not cluster aligned")
                data = data[~bad]
            refs.add_clusters(data, "data cluster", times)
            result.allocated_clusters += len(data)
        for e in words[comp].tolist():
            host = e & ((1 << x) - 1)
            sectors = (e >> x) & ((1 << (62 - x)) - 1)
            start = host & ~511
            refs.add(start, (sectors + 1) * 512, "compressed cluster", times)
            result.compressed_clusters += 1
            result.allocated_clusters += 1
    return refs, active_tables


def _refcount_table(image: Image) -> list[int]:
    h = image.header
    raw = _read(image, h.refcount_table_offset, h.refcount_table_clusters * image.geo.cluster_size)
    return [e & REFT_OFFSET_MASK for e in struct.unpack(f">{len(raw) // 8}Q", raw)]


def _count_bitmaps(image: Image, refs: References) -> None:
    data = image.header.extension(EXT_BITMAPS)
    if data is None:
        return
    ext = BitmapsExtension.parse(data)
    refs.add(ext.directory_offset, ext.directory_size, "bitmap directory")
    cs = image.geo.cluster_size
    for bm in image.bitmaps:
        e = bm.entry
        refs.add(e.bitmap_table_offset, e.bitmap_table_size * 8, f"bitmap '{bm.name}' table")
        raw = _read(image, e.bitmap_table_offset, e.bitmap_table_size * 8)
        for entry in struct.unpack(f">{len(raw) // 8}Q", raw):
            off = entry & L2E_OFFSET_MASK
            if off:
                refs.add(off, cs, f"bitmap '{bm.name}' data")


def refcounts(image: Image, nclusters: int) -> np.ndarray:
    """The stored refcount of clusters 0..nclusters-1."""
    geo = image.geo
    rpb, cs = geo.refcounts_per_block, geo.cluster_size
    out = np.zeros(nclusters, np.int64)
    for r, off in enumerate(_refcount_table(image)):
        if not off or r * rpb >= nclusters or off % cs:
            continue
        raw = _read(image, off, cs)
        if len(raw) < cs:
            continue
        vals = refcount_array(raw, geo.refcount_order).astype(np.int64)
        n = min(rpb, nclusters - r * rpb)
        out[r * rpb : r * rpb + n] = vals[:n]
    return out


def check_image(image: Image, progress: Callable[[float], None] | None = None) -> tuple[CheckResult, References, np.ndarray, dict[int, np.ndarray]]:
    result = CheckResult()
    refs, active_tables = count_references(image, result, progress)
    cs = image.geo.cluster_size
    n = max(len(refs.counts), -(-image.file.known_size // cs))
    stored = refcounts(image, n)
    want = np.zeros(n, np.int64)
    want[: len(refs.counts)] = refs.counts
    for c in np.flatnonzero(stored < want).tolist():
        result.corruptions += 1
        result.say(f"ERROR cluster {c} refcount={stored[c]} reference={want[c]}")
    for c in np.flatnonzero(stored > want).tolist():
        result.leaks += 1
        result.say(f"Leaked cluster {c} refcount={stored[c]} reference={want[c]}")
    _check_copied(image, stored, active_tables, result)
    nz = np.flatnonzero(stored)
    result.image_end_offset = int((nz[-1] + 1) * cs) if len(nz) else cs
    result.total_clusters = -(-image.size // cs)
    return result, refs, stored, active_tables


def _copied_errors(image: Image, stored: np.ndarray, active_tables: dict[int, np.ndarray]) -> tuple[list[int], dict[int, list[int]]]:
    """Active L1 indexes and L2 entry indexes whose COPIED flag is wrong."""
    h, geo = image.header, image.geo
    cs = geo.cluster_size
    bad_l1: list[int] = []
    bad_l2: dict[int, list[int]] = {}
    if not h.l1_size:
        return bad_l1, bad_l2

    def rc(off: int) -> int:
        c = off // cs
        return int(stored[c]) if c < len(stored) else 0

    l1 = _l1_entries(image, h.l1_table_offset, h.l1_size)
    for i, e in enumerate(l1.tolist()):
        off = e & L1E_OFFSET_MASK
        if off and (rc(off) == 1) != bool(e & OFLAG_COPIED):
            bad_l1.append(i)
    step = 2 if geo.extended_l2 else 1
    for off, table in active_tables.items():
        wrong = []
        for k, e in enumerate(table[::step].tolist()):
            if e & OFLAG_COMPRESSED:
                if e & OFLAG_COPIED:
                    wrong.append(k)
                continue
            host = e & L2E_OFFSET_MASK
            if not host or image.data_file is not None:
                continue
            if (rc(host) == 1) != bool(e & OFLAG_COPIED):
                wrong.append(k)
        if wrong:
            bad_l2[off] = wrong
    return bad_l1, bad_l2


def _check_copied(image: Image, stored: np.ndarray, active_tables: dict[int, np.ndarray], result: CheckResult) -> None:
    bad_l1, bad_l2 = _copied_errors(image, stored, active_tables)
    for i in bad_l1:
        result.corruptions += 1
        result.say(f"ERROR OFLAG_COPIED L2 cluster: l1_index={i}")
    for off, ks in bad_l2.items():
        result.corruptions += len(ks)
        result.say(f"ERROR OFLAG_COPIED data cluster: l2_table={off:#x} entries={ks[:8]}")


# ---- repair -----------------------------------------------------------------

async def rebuild_refcounts(image: Image, progress: Callable[[float], None] | None = None) -> None:
    """Replace the refcount structure by one computed from the references,
    then make every COPIED flag exact. Crash-safe: the header switches to the
    new structure only once it is on disk."""
    result = CheckResult()
    refs, active_tables = count_references(image, result, progress, refcount_structure=False)
    counts = refs.counts
    geo, cs = image.geo, image.geo.cluster_size
    rpb, per_cluster = geo.refcounts_per_block, cs // 8
    if counts.max(initial=0) > (1 << (1 << geo.refcount_order)) - 1:
        raise QcowError("a cluster has more references than the refcount width can count")
    # The new blocks and table go right after everything else, and count themselves.
    area = max(len(counts), -(-image.file.known_size // cs))
    used = set((np.flatnonzero(counts) // rpb).tolist())
    nblocks, tclusters = len(used) + 1, 1
    while True:
        end = area + nblocks + tclusters
        ranges = sorted(used | set(range(area // rpb, (end - 1) // rpb + 1)))
        t = -(-(-(-end // rpb)) // per_cluster)
        if (len(ranges), t) == (nblocks, tclusters):
            break
        nblocks, tclusters = len(ranges), t
    full = np.zeros(ranges[-1] * rpb + rpb, np.int64)
    full[: len(counts)] = counts
    full[area:end] = 1
    table = np.zeros(tclusters * per_cluster, np.uint64)
    for j, r in enumerate(ranges):
        at = (area + j) * cs
        image.file.write_sync(encode_refcount_block(full[r * rpb : (r + 1) * rpb], geo.refcount_order, cs), at)
        table[r] = at
    table_at = (area + len(ranges)) * cs
    image.file.write_sync(table.astype(">u8").tobytes(), table_at)
    await image.file.sync()
    h = image.header
    h.refcount_table_offset, h.refcount_table_clusters = table_at, tclusters
    await image.write_header_fields()
    await _fix_copied(image, full, active_tables)
    image.reload_refcounts()


async def _fix_copied(image: Image, stored: np.ndarray, active_tables: dict[int, np.ndarray]) -> None:
    bad_l1, bad_l2 = _copied_errors(image, stored, active_tables)
    h, geo = image.header, image.geo
    step = 2 if geo.extended_l2 else 1
    for off, ks in bad_l2.items():
        table = active_tables[off].copy()
        for k in ks:
            e = int(table[k * step])
            host = e & L2E_OFFSET_MASK
            want = not e & OFLAG_COMPRESSED and stored[host // geo.cluster_size] == 1
            table[k * step] = (e | OFLAG_COPIED) if want else (e & ~OFLAG_COPIED)
        image.file.write_sync(table.astype(">u8").tobytes(), off)
    if bad_l2:
        await image.file.sync()
    for i in bad_l1:
        raw = image.file.read_sync(h.l1_table_offset + i * 8, 8)
        e = struct.unpack(">Q", raw)[0]
        c = (e & L1E_OFFSET_MASK) // geo.cluster_size
        e = (e | OFLAG_COPIED) if stored[c] == 1 else (e & ~OFLAG_COPIED)
        image.file.write_sync(struct.pack(">Q", e), h.l1_table_offset + i * 8)
    if bad_l1:
        await image.file.sync()


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
             "compressed-clusters": r.compressed_clusters}
        if fixed is not None:
            d["leaks-fixed"], d["corruptions-fixed"] = fixed
        print(json.dumps(d, indent=4))
        return
    for m in r.messages:
        print(m)
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
        print(f"{r.allocated_clusters}/{r.total_clusters} = "
              f"{100 * r.allocated_clusters / r.total_clusters:.2f}% allocated, "
              f"{100 * r.compressed_clusters / max(1, r.allocated_clusters):.2f}% compressed clusters")
    print(f"Image end offset: {r.image_end_offset}")


def run_check(path: str, repair: bool, as_json: bool) -> int:
    import trio

    progress = _progress_printer()

    async def main() -> int:
        image = Image(path, OpenOptions(read_only=not repair, repair=repair))
        try:
            result, *_ = check_image(image, progress)
            fixed = None
            dirty = bool(image.header.incompatible_features & INCOMPAT_DIRTY)
            if repair and (result.corruptions or result.leaks or dirty):
                await rebuild_refcounts(image)
                if dirty:
                    image.header.incompatible_features &= ~INCOMPAT_DIRTY
                    await image.write_header_fields()
                before = result
                result, *_ = check_image(image)
                fixed = (before.leaks - result.leaks, before.corruptions - result.corruptions)
                if not result.corruptions and image.header.incompatible_features & INCOMPAT_CORRUPT:
                    image.header.incompatible_features &= ~INCOMPAT_CORRUPT
                    await image.write_header_fields()
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
