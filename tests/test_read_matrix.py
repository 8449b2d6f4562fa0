"""Read path: every image of the matrix, mounted read-only, reads exactly what qemu-img reads."""
from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest

from conftest import QCOWFS, is_mounted
from images import (HUGE, MATRIX, SNAPSHOTS, build, file_state, first_difference, info, oracle,
                    oracle_range, qimg, snapshot_table)

NORMAL = sorted(set(MATRIX) - HUGE)


def unmount(mnt: Path) -> None:
    """Unmount explicitly (so the image can be checked afterwards); the fixture is the safety net."""
    p = subprocess.run([QCOWFS, "umount", str(mnt)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"qcowfs umount {mnt} failed ({p.returncode}): {p.stderr.strip()}"
    assert not is_mounted(mnt), f"{mnt} still mounted after qcowfs umount"


def describe_diff(actual: Path, expected: Path, off: int, cluster: int | None) -> str:
    with open(actual, "rb") as fa, open(expected, "rb") as fe:
        fa.seek(off)
        fe.seek(off)
        a, e = fa.read(16), fe.read(16)
    where = f"offset {off:#x}"
    if cluster:
        where += f" (cluster {off // cluster}, +{off % cluster:#x} into it)"
    return f"first difference at {where}: got {a.hex()} expected {e.hex()}"


def random_preads(fd: int, expected: bytes, rng: random.Random, n: int = 150) -> list[str]:
    """(offset, length) reads at odd places, including around and past the end."""
    size = len(expected)
    errors: list[str] = []
    pairs = []
    for _ in range(n):
        ln = rng.choice([1, 2, 3, 511, 512, 513, 4095, 4097, 65535, 65537, 131073, rng.randint(1, 300000)])
        off = rng.randint(0, max(0, size - 1))
        pairs.append((off, ln))
    pairs += [(0, 1), (size - 1, 1), (size - 1, 100), (max(0, size - 4097), 8192), (size, 1), (size, 65536),
              (size + 12345, 10)]
    for off, ln in pairs:
        try:
            got = os.pread(fd, ln, off)
        except OSError as e:
            errors.append(f"pread({ln}, {off:#x}) raised {e}")
            continue
        want = expected[off:off + ln]
        if got != want:
            i = next((k for k in range(min(len(got), len(want))) if got[k] != want[k]), min(len(got), len(want)))
            errors.append(f"pread({ln}, {off:#x}): {len(got)} bytes, expected {len(want)}; "
                          f"first difference at +{i:#x}")
        if len(errors) > 10:
            break
    return errors


def size_errors(disk: Path, vsize: int) -> list[str]:
    st = os.stat(disk)
    return [] if st.st_size == vsize else [f"st_size {st.st_size} != virtual size {vsize}"]


@pytest.mark.parametrize("name", NORMAL)
def test_disk_raw_matches_qemu(name: str, tmp_path: Path, mount) -> None:
    d = tmp_path / "img"
    img = build(name, d)
    meta = info(img)
    vsize = meta["virtual-size"]
    cluster = meta.get("cluster-size")
    expected = oracle(img, tmp_path / "expected.raw")
    assert expected.stat().st_size == vsize
    before = file_state(d)

    mnt = mount(img)
    disk = mnt / "disk.raw"
    errors = size_errors(disk, vsize)
    off = first_difference(disk, expected)
    if off is not None:
        errors.append("full read differs from qemu-img convert: " + describe_diff(disk, expected, off, cluster))
    fd = os.open(disk, os.O_RDONLY)
    try:
        errors += random_preads(fd, expected.read_bytes(), random.Random(name))
    finally:
        os.close(fd)
    unmount(mnt)

    after = file_state(d)
    for f in sorted(set(before) | set(after)):
        if before.get(f) != after.get(f):
            errors.append(f"read-only mount changed {f}: {before.get(f)} -> {after.get(f)}")
    assert not errors, f"{name}:\n  " + "\n  ".join(errors)


def snapshot_file_name(snap: dict, all_snaps: list[dict]) -> str:
    name = snap["name"]
    unique = sum(1 for s in all_snaps if s["name"] == name) == 1
    usable = name not in ("", ".", "..") and "/" not in name and "\0" not in name
    return f"{name}.raw" if unique and usable else f"id-{snap['id']}.raw"


@pytest.mark.parametrize("name", sorted(SNAPSHOTS))
def test_snapshot_files_match_qemu(name: str, tmp_path: Path, mount) -> None:
    img = build(name, tmp_path / "img")
    snaps = info(img)["snapshots"]
    assert snaps
    mnt = mount(img)
    listed = sorted(os.listdir(mnt / "snapshots"))
    want = sorted(snapshot_file_name(s, snaps) for s in snaps)
    assert listed == want
    table = {t["id"]: t for t in snapshot_table(img)}
    vsize = info(img)["virtual-size"]
    for s in snaps:
        expected = oracle(img, tmp_path / f"snap{s['id']}.raw", snapshot_id=s["id"])
        # qemu-img convert -l pads a snapshot smaller than the current disk with zeros up to the
        # current size; the file's size is the snapshot's own disk size
        size = table[s["id"]]["disk_size"] or vsize
        data = expected.read_bytes()
        assert data[size:] == bytes(len(data) - size)
        with open(expected, "r+b") as ef:
            ef.truncate(size)
        f = mnt / "snapshots" / snapshot_file_name(s, snaps)
        assert os.stat(f).st_size == size, f"snapshot {s['name']!r} size"
        off = first_difference(f, expected)
        assert off is None, f"snapshot {s['name']!r}: " + describe_diff(f, expected, off, None)


def probe_ranges(img: Path, vsize: int, rng: random.Random) -> list[tuple[int, int]]:
    """Ranges to compare on a huge disk: every data extent with some margin, plus zero areas."""
    extents = json.loads(qimg("map", "--output=json", img))
    ranges: list[tuple[int, int]] = []
    for e in extents:
        if e.get("data") or not e.get("zero"):
            a = max(0, e["start"] - 4096)
            b = min(vsize, e["start"] + e["length"] + 4096)
            # data extents are small in these images; cap to keep the test fast
            if b - a > 8 << 20:
                ranges += [(a, 1 << 20), (b - (1 << 20), 1 << 20)]
            else:
                ranges.append((a, b - a))
    assert len(ranges) >= 5, f"expected several data extents in {img}: {extents}"
    for _ in range(20):
        off = rng.randrange(0, vsize - 70000)
        ranges.append((off, rng.randint(1, 70000)))
    ranges += [(vsize - (1 << 20), 1 << 20), (0, 1 << 20), ((1 << 32) - 4096, 8192),
               ((1 << 41) - 4096, 8192), ((1 << 41) + 123, 4567)]
    return ranges


@pytest.mark.parametrize("name", sorted(HUGE))
def test_huge_sparse_disk(name: str, tmp_path: Path, mount) -> None:
    d = tmp_path / "img"
    img = build(name, d)
    vsize = info(img)["virtual-size"]
    ranges = probe_ranges(img, vsize, random.Random(name))
    expected = {r: oracle_range(img, *r) for r in ranges}
    before = file_state(d)

    mnt = mount(img)
    disk = mnt / "disk.raw"
    errors = size_errors(disk, vsize)
    fd = os.open(disk, os.O_RDONLY)
    try:
        for (off, ln), want in expected.items():
            assert len(want) == ln
            got = os.pread(fd, ln, off)
            if got != want:
                i = next((k for k in range(min(len(got), ln)) if got[k] != want[k]), min(len(got), ln))
                errors.append(f"[{off:#x}, +{ln:#x}): {len(got)} bytes; first difference at {off + i:#x}")
        if os.pread(fd, 100, vsize) != b"":
            errors.append("read at the end of the disk returned data")
        if os.pread(fd, 100, vsize - 10) != expected[(vsize - (1 << 20), 1 << 20)][-10:]:
            errors.append("read straddling the end of the disk is wrong")
    finally:
        os.close(fd)
    unmount(mnt)
    after = file_state(d)
    if before != after:
        errors.append("read-only mount changed the image files")
    assert not errors, f"{name}:\n  " + "\n  ".join(errors)


@pytest.mark.parametrize("name", ["convert-c-zstd-c512", "backing-chain4", "extl2-c64k-backing", "v2-c4k"])
def test_concurrent_random_reads(name: str, tmp_path: Path, mount) -> None:
    """Several threads reading at random places at once (cold cache) all get QEMU's bytes."""
    from concurrent.futures import ThreadPoolExecutor

    img = build(name, tmp_path / "img")
    expected = oracle(img, tmp_path / "expected.raw").read_bytes()
    mnt = mount(img)
    disk = mnt / "disk.raw"

    def worker(seed: int) -> list[str]:
        fd = os.open(disk, os.O_RDONLY)
        try:
            return random_preads(fd, expected, random.Random(f"{name}-{seed}"), n=60)
        finally:
            os.close(fd)

    with ThreadPoolExecutor(max_workers=6) as ex:
        results = list(ex.map(worker, range(6)))
    errors = [e for r in results for e in r]
    assert not errors, f"{name}:\n  " + "\n  ".join(errors[:20])
