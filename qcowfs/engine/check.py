"""qemu-img check: count every reference (references.py), compare with the
refcounts, check COPIED flags; repair by rebuilding the refcount structure
from the counts (refcount/rebuild.py).

Return codes follow qemu-img check: 0 clean, 1 check failed, 2 corruptions,
3 leaks only.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import QcowError
from ..format import (INCOMPAT_CORRUPT, INCOMPAT_DIRTY, L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED,
                      OFLAG_ZERO, SC_ALL)
from . import EXIT_CLEAN, EXIT_CORRUPT, EXIT_FAILED, EXIT_LEAKS
from .image import Image
from .metadata import Metadata
from .overlap import Kind
from .references import L2Refs, count_references, read_entries, stored_refcounts, walk
from .refcount import copied_errors, stored_refcount

MAX_MESSAGES = 100


@dataclass
class CheckResult:
    """What `qemu-img check --output=json` reports, and its messages (stderr)."""

    corruptions: int = 0
    leaks: int = 0
    # Errors that kept the check from finishing (qemu-img's check-errors).
    check_errors: int = 0
    messages: list[str] = field(default_factory=list)
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    image_end_offset: int = 0
    unsaid: int = 0

    # After a repair: (leaks fixed, corruptions fixed); None without one.
    fixed: tuple[int, int] | None = None

    @property
    def returncode(self) -> int:
        """qemu-img check's exit code: 1 check failed, 2 corruptions, 3 leaks only, 0 clean."""
        if self.check_errors:
            return EXIT_FAILED
        if self.corruptions:
            return EXIT_CORRUPT
        return EXIT_LEAKS if self.leaks else EXIT_CLEAN

    def json(self, filename: str) -> dict[str, object]:
        """The object `qemu-img check --output=json` prints."""
        d: dict[str, object] = {
            "image-end-offset": self.image_end_offset, "total-clusters": self.total_clusters,
            "check-errors": self.check_errors, "leaks": self.leaks, "corruptions": self.corruptions,
            "filename": filename, "format": "qcow2", "allocated-clusters": self.allocated_clusters,
            "fragmented-clusters": self.fragmented_clusters, "compressed-clusters": self.compressed_clusters}
        if self.fixed is not None:
            d["leaks-fixed"], d["corruptions-fixed"] = self.fixed
        return d

    def say(self, msg: str) -> None:
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(msg)
        else:
            self.unsaid += 1


def refcounts(image: Image, nclusters: int) -> np.ndarray:
    """The stored refcount of clusters 0..nclusters-1."""
    return stored_refcounts(image.file, image.header, image.geo, nclusters)


def check_image(image: Image, progress: Callable[[float], None] | None = None) -> CheckResult:
    """Count every reference and compare with the stored refcounts and flags."""
    result = CheckResult()

    def corruption(msg: str) -> None:
        result.corruptions += 1
        result.say(msg)

    counted = count_references(image.meta, corruption, progress=progress)
    # A bitmap QEMU refuses the image for (qemu-img check cannot open it):
    # damage, though the references below may all be right.
    for bm in image.bitmaps:
        if bm.damaged:
            corruption(f"ERROR bitmap '{bm.name}' is damaged: {bm.problem}")
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
            count = 1 if image.external_data else rc(e & L2E_OFFSET_MASK)  # (copied.py)
            corruption(f"ERROR OFLAG_COPIED data cluster: l2_entry={e:x} refcount={count}")
    # As qemu-img: the highest cluster that is referenced or has a refcount.
    nz = np.flatnonzero((stored > 0) | (want > 0))
    result.image_end_offset = int((nz[-1] + 1) * cs) if len(nz) else cs
    result.total_clusters = -(-image.size // cs)
    result.allocated_clusters = counted.allocated_clusters
    result.fragmented_clusters = counted.fragmented_clusters
    result.compressed_clusters = counted.compressed_clusters
    return result


async def mend_l2_entries(meta: Metadata) -> list[str]:
    """`check --repair`, before the rebuild: a preallocated zero cluster (an
    entry that reads zeros but names a host cluster) at an offset inside a
    cluster becomes a plain zero cluster, as qemu-img check -r all makes it;
    v2 has no zero flag, so there it becomes unallocated (it read zeros only
    through the flag v2 does not have). Data clusters at such offsets are
    left as they are (their data cannot be found): check reports them.
    In every L2 table, active or a snapshot's; one line per entry."""
    geo, cs = meta.geo, meta.geo.cluster_size
    done: list[str] = []
    seen: set[int] = set()
    for ref in walk(meta, refcount_structure=False):
        if not isinstance(ref, L2Refs) or ref.offset in seen:
            continue
        seen.add(ref.offset)
        host = ref.words & np.uint64(L2E_OFFSET_MASK)
        odd = ((ref.words & np.uint64(OFLAG_COMPRESSED)) == 0) & (host % np.uint64(cs) != 0)
        if ref.bitmaps is None:
            odd &= (ref.words & np.uint64(OFLAG_ZERO)) != 0
        else:
            odd &= (ref.bitmaps & np.uint64(SC_ALL)) == 0
        for k in np.flatnonzero(odd).tolist():
            if ref.bitmaps is None:
                entry = struct.pack(">Q", OFLAG_ZERO if meta.header.version >= 3 else 0)
            else:
                entry = struct.pack(">QQ", 0, int(ref.bitmaps[k]) & ~SC_ALL)
            meta.write(ref.offset + k * len(entry), entry, "L2 entry", ignore=Kind.ACTIVE_L2 | Kind.INACTIVE_L2)
            done.append(f"Repairing offset={int(host[k]):x}: Preallocated cluster is not properly aligned; "
                        "L2 entry corrupted.")
    if done:
        await meta.file.sync()
    return done


async def check(image: Image, repair: bool = False,
                progress: Callable[[float], None] | None = None) -> CheckResult:
    """Check IMAGE; with REPAIR (an image opened for repair) rebuild its
    refcounts when anything is wrong or it is dirty, check again, and clear
    the corrupt bit once no corruption is left."""
    if image.left_out:  # a part of the image it cannot read: no verdict
        raise QcowError(image.left_out[0])
    result = check_image(image, progress)
    dirty = bool(image.header.incompatible_features & INCOMPAT_DIRTY)
    if not repair or not (result.corruptions or result.leaks or dirty):
        return result
    mended = await image.mend_snapshots()
    mended += await image.mend_bitmaps()
    mended += await mend_l2_entries(image.meta)
    await image.rebuild_refcounts()
    if dirty:
        await image.meta.update(incompatible_features=lambda bits: bits & ~INCOMPAT_DIRTY)
    before = result
    result = check_image(image)
    for line in mended:
        result.say(line)
    result.fixed = (before.leaks - result.leaks, before.corruptions - result.corruptions)
    if not result.corruptions and image.header.incompatible_features & INCOMPAT_CORRUPT:
        await image.meta.update(incompatible_features=lambda bits: bits & ~INCOMPAT_CORRUPT)
    return result
