"""Hostile images written to (issue 23): the bounded run of tests/hostile_write.py.

Each test is one seed: a base layout, one structure-aware mutation of its header,
L1/L2 tables, compressed descriptors, extended-L2 bitmaps, refcount table or
blocks, snapshot table, bitmap directory or bitmap tables, then the same session
of writes and flushes by QEMU (copy A) and by qcowfs (copy B), and a read-only
qcowfs open of copy C. qcowfs must never leave the image worse than it was
(see tests/hostile_write.py for the rules); a failure names the rule broken,
the chunk, the old / expected / actual bytes and the writes over them, and the
command that reproduces it.

The seeds are fixed (0 .. HOSTILE_WRITE_CASES-1, from HOSTILE_WRITE_SEED0): the
mutation family is the seed modulo the number of families, so every family is
covered. `make soak` runs thousands (`python tests/hostile_write.py --cases N`).
HOSTILE_WRITE_DATA_FILE_CASES seeds (default 12) draw only the layouts with an
external data file (`--layout data-file`), HOSTILE_WRITE_DATA_FILE_MOUNT_CASES
(default 2) of them through a mount.
A further HOSTILE_WRITE_MOUNT_CASES seeds (default 16) run qcowfs's session
through a real writable FUSE mount (`--mount`); the soak runs hundreds.

What QEMU's own session on a copy breaks the same way ("QEMU too": two L2
entries both claiming one cluster as their own, refcounts of another width)
is damage only a full scan could see before writing; the issue's rule is
"never worse than QEMU leaves it", so such a violation alone does not fail
the test (the soak counts them apart). Every other one does.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import hostile_write

CASES = int(os.environ.get("HOSTILE_WRITE_CASES", "100"))
SEED0 = int(os.environ.get("HOSTILE_WRITE_SEED0", "0"))


@pytest.fixture(scope="session")
def base_cache(tmp_path_factory: pytest.TempPathFactory) -> hostile_write.BaseCache:
    """The base images, built once per test process (per xdist worker)."""
    return hostile_write.BaseCache(tmp_path_factory.mktemp("hostile-write-bases"))


@pytest.mark.parametrize("seed", range(SEED0, SEED0 + CASES))
def test_never_worse_than_it_was(seed: int, base_cache: hostile_write.BaseCache, tmp_path: Path) -> None:
    result = hostile_write.run_case(seed, base_cache, tmp_path)
    if any(not p.qemu_too for p in result.problems):
        pytest.fail(result.report(), pytrace=False)


MOUNT_CASES = int(os.environ.get("HOSTILE_WRITE_MOUNT_CASES", "16"))


@pytest.mark.parametrize("seed", range(SEED0 + 50_000, SEED0 + 50_000 + MOUNT_CASES))
def test_never_worse_through_a_mount(seed: int, base_cache: hostile_write.BaseCache, tmp_path: Path) -> None:
    """The same judge, with qcowfs's session through a real writable FUSE mount
    (`qcowfs mount`, pwrite / fallocate / fsync on disk.raw, `qcowfs umount`):
    what the kernel splits, caches and retries is in the path too."""
    result = hostile_write.run_case(seed, base_cache, tmp_path, mount=True)
    if any(not p.qemu_too for p in result.problems):
        pytest.fail(result.report(), pytrace=False)


DATA_FILE_CASES = int(os.environ.get("HOSTILE_WRITE_DATA_FILE_CASES", "12"))
DATA_FILE_MOUNT_CASES = int(os.environ.get("HOSTILE_WRITE_DATA_FILE_MOUNT_CASES", "2"))


@pytest.mark.parametrize("seed", range(SEED0 + 90_000, SEED0 + 90_000 + DATA_FILE_CASES))
def test_never_worse_with_a_data_file(seed: int, base_cache: hostile_write.BaseCache, tmp_path: Path) -> None:
    """Layouts with an external data file (`--layout data-file`: data_file, data_file_raw;
    with bitmaps, extended L2, lazy refcounts, zero clusters, a backing file): L2 entries
    point into the data file, and the data-file family damages the qcow2 file's account
    of it (feature bits, the name extension). Twelve seeds: every family that applies."""
    result = hostile_write.run_case(seed, base_cache, tmp_path, only="data-file")
    if any(not p.qemu_too for p in result.problems):
        pytest.fail(result.report(), pytrace=False)


@pytest.mark.parametrize("seed", range(SEED0 + 95_000, SEED0 + 95_000 + DATA_FILE_MOUNT_CASES))
def test_never_worse_with_a_data_file_through_a_mount(seed: int, base_cache: hostile_write.BaseCache,
                                                     tmp_path: Path) -> None:
    result = hostile_write.run_case(seed, base_cache, tmp_path, mount=True, only="data-file")
    if any(not p.qemu_too for p in result.problems):
        pytest.fail(result.report(), pytrace=False)
