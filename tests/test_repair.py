"""`qcowfs check --repair` mends what `qemu-img check -r all` mends: the bounded
run of tests/repair_differential.py (see there for the rules).

PINNED are seeds of kinds of damage qcowfs's repair failed on or left
damaged where QEMU's ended clean (a differential run of 1000 seeds on
2026-12-07 found 21 such images of 16 kinds), one or two of each kind; the
others are a fixed block of the generator's seeds, every mutation family
among them. `make soak` runs hundreds more.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import hostile_write
import repair_differential

PINNED = {
    20003: "a refcount table entry moved past the end of the file",
    20080: "a refcount table entry added just past the end of the file",
    20526: "refcount_table_clusters 0",
    20548: "the refcount table past the end of the file",
    20021: "an L1 entry inside a cluster (its L2 table spans the next one)",
    20142: "an active L1 entry naming a snapshot's L2 table",
    20225: "a snapshot's L1 entry naming an active L2 table",
    20012: "a preallocated zero cluster at an unaligned offset, v2",
    20044: "a preallocated zero cluster at an unaligned offset, v3 with a backing file",
    20005: "a snapshot entry with too much extra data",
    20511: "a snapshot entry whose extra data runs past the table",
    20097: "nb_snapshots 1 and no snapshot table",
    20214: "a snapshot L1 table too large, in an image with bitmaps",
    20040: "a bitmap data cluster past the end of the file",
    20062: "a bitmap data cluster on the L1 table",
    20161: "a bitmap data cluster on the bitmap directory",
    20205: "a bitmap data cluster on the snapshot table",
    20259: "a bitmap table past the end of the file",
    20226: "the bitmaps autoclear bit cleared (the extension is stale)",
    20547: "the active L1 table past the end of the file (a flipped header bit)",
    20571: "a cluster referenced more often than 1-bit refcounts count",
    20709: "a snapshot id running over the table, in an image with bitmaps",
    20803: "a preallocated zero cluster at an unaligned offset, extended L2 and a data file",
    20517: "a data entry naming its own L2 table, with a snapshot and bitmaps",
    600550214: "a backing file name one byte too long (a NUL after it): a C string to QEMU",
}
CASES = int(os.environ.get("REPAIR_TEST_CASES", "24"))
SEED0 = int(os.environ.get("REPAIR_TEST_SEED0", "21000"))


@pytest.fixture(scope="session")
def base_cache(tmp_path_factory: pytest.TempPathFactory) -> hostile_write.BaseCache:
    return hostile_write.BaseCache(tmp_path_factory.mktemp("repair-bases"))


@pytest.mark.parametrize("seed", [*PINNED, *range(SEED0, SEED0 + CASES)])
def test_repair_mends_what_qemu_mends(seed: int, base_cache: hostile_write.BaseCache, tmp_path: Path) -> None:
    result = repair_differential.repair_case(seed, base_cache, tmp_path)
    if result.problems:
        pytest.fail(f"{PINNED.get(seed, '')}\n{result.report()}", pytrace=False)
