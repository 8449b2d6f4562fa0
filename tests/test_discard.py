"""Discard and zeroing (fallocate PUNCH_HOLE / ZERO_RANGE) and the holes they
leave (SEEK_DATA / SEEK_HOLE), in-process over many layouts, QEMU as the judge:
the disk reads what the model says, `qemu-img check` is clean (no leak: freed
clusters reach refcount 0), snapshots and bitmaps are what they must be, and
`qemu-img map` shows the holes."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from inproc import BitmapSpec, KiB, Layout, MiB, Subject, build, make_data, must, run

LAYOUTS = {
    "v3": Layout(size=8 * MiB, prefill=True),
    "v3+snapshots+bitmaps": Layout(size=8 * MiB, cluster_size=4 * KiB, prefill=True, snapshots=2,
                                   bitmaps=(BitmapSpec("a", True, 4 * KiB), BitmapSpec("d", False, 64 * KiB))),
    "v2+backing+compressed": Layout(size=4 * MiB, compat="0.10", backing_size=3 * MiB, compressed=3,
                                    prefill=True),
    "v2+snapshot": Layout(size=4 * MiB, compat="0.10", snapshots=1, prefill=True),
    "extended-l2+backing": Layout(size=6 * MiB, cluster_size=32 * KiB, extended_l2=True,
                                  backing_size=8 * MiB, backing_cluster_size=4 * KiB, prefill=True),
    "extended-l2+compressed": Layout(size=4 * MiB, cluster_size=64 * KiB, extended_l2=True, compressed=4,
                                     prefill=True),
    "refcount1+512+compressed": Layout(size=2 * MiB + 512, cluster_size=512, refcount_bits=1,
                                       compressed=3, prefill=True),
    "zstd+compressed+snapshot+backing": Layout(size=4 * MiB, compression_type="zstd", compressed=4, snapshots=1,
                                               backing_size=5 * MiB),
    "data-file-raw+bitmaps": Layout(size=4 * MiB, cluster_size=4 * KiB, data_file="raw", prefill=True,
                                    bitmaps=(BitmapSpec("a", True, 4 * KiB),)),
    "data-file+extended-l2+backing": Layout(size=6 * MiB, cluster_size=32 * KiB, extended_l2=True,
                                            data_file="external", backing_size=8 * MiB, prefill=True),
}


def allocated_clusters(image: Path) -> int:
    """Host clusters in use, as `qemu-img check` counts them."""
    out = json.loads(must("qemu-img", "check", "--output=json", image))
    return int(out.get("allocated-clusters", 0))


async def _discard_session(s: Subject, seed: int) -> None:
    cs, size = s.layout.cluster_size, s.model.size
    sc = cs // 32 if s.layout.extended_l2 else cs
    async with s.session():
        for i, off in enumerate(range(0, size, size // 7)):
            await s.write(off, make_data("random", min(3 * cs + 777, size - off), seed + i))
        await s.flush()
        await s.zero(0, 2 * cs, unmap=True)                        # whole clusters
        await s.zero(size // 7 - 100, cs + 300, unmap=True)        # unaligned: partial ends written
        await s.zero(2 * (size // 7) + sc, 2 * sc, unmap=True)     # subclusters (or a partial cluster)
        await s.zero(3 * (size // 7), 2 * cs + 5, unmap=False)     # ZERO_RANGE keeps owned clusters
        await s.zero(4 * (size // 7) + 3 * sc, cs, unmap=False)
        await s.zero(size // 2, size // 4, unmap=True)             # a long range, unallocated parts too
        await s.zero(size - 3 * cs - 512, 4 * cs, unmap=True)      # runs past the end: clipped
        await s.write(cs // 2, make_data("text", cs, seed))        # writes into discarded clusters
        await s.read_back(0, size)
    s.judge()


@pytest.mark.parametrize("name", sorted(LAYOUTS))
async def test_discard_and_zero(tmp_path: Path, name: str) -> None:
    s = build(tmp_path, LAYOUTS[name])
    await _discard_session(s, seed=3)
    # and again over what the first session left (discarded areas discarded again)
    await _discard_session(s, seed=5)


async def test_discard_frees_clusters_and_map_shows_holes(tmp_path: Path) -> None:
    s = build(tmp_path, Layout(size=32 * MiB))
    async with s.session():
        await s.write(0, make_data("random", 16 * MiB, 1))
    before = allocated_clusters(s.image)
    async with s.session():
        await s.zero(1 * MiB, 14 * MiB, unmap=True)
    s.judge()
    after = allocated_clusters(s.image)
    assert before - after == 14 * MiB // (64 * KiB), (before, after)
    runs = json.loads(must("qemu-img", "map", "--output=json", s.image))
    holes = [r for r in runs if not r["data"] and r["start"] < 16 * MiB]
    assert [(r["start"], r["length"]) for r in holes] == [(1 * MiB, 14 * MiB)], runs
    # the freed host clusters were punched out of the image file
    assert os.stat(s.image).st_blocks * 512 < 4 * MiB, os.stat(s.image).st_blocks


async def test_discard_of_a_snapshot_shared_cluster_drops_one_reference(tmp_path: Path) -> None:
    s = build(tmp_path, Layout(size=4 * MiB, prefill=True))
    s.qemu_write(0, 2 * MiB, 0x5a)
    s.snapshot_create()
    before = os.stat(s.image).st_blocks * 512
    async with s.session():
        await s.zero(0, 2 * MiB, unmap=True)
        await s.read_back(0, 4 * MiB)
    s.judge()  # the snapshot still reads its 0x5a, refcounts are exact
    # no data cluster was freed (so none punched): the snapshot holds them
    assert os.stat(s.image).st_blocks * 512 >= before - 64 * KiB, (before, os.stat(s.image).st_blocks * 512)
    assert allocated_clusters(s.image) < 2 * MiB // (64 * KiB)  # the active disk no longer holds them


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
async def test_zero_range_keeps_the_host_cluster_as_qemu_does(tmp_path: Path, compat: str) -> None:
    """ZERO_RANGE (no unmap) over clusters the disk owns does what `qemu-io write -z`
    does on a copy: v3 keeps them as preallocated zero clusters; v2 has no zero
    flag, and with no backing file QEMU discards them instead (its
    qcow2_subcluster_zeroize), so does qcowfs."""
    s = build(tmp_path, Layout(size=4 * MiB, compat=compat))
    async with s.session():
        await s.write(0, make_data("random", 1 * MiB, 1))
    theirs = tmp_path / "qemu.qcow2"
    must("cp", s.image, theirs)
    must("qemu-io", "-f", "qcow2", "-c", f"write -z 0 {1 * MiB}", theirs)
    async with s.session():
        await s.zero(0, 1 * MiB, unmap=False)
    s.judge()

    def shape(image: Path) -> list[tuple[int, int, bool, bool, bool]]:
        runs = json.loads(must("qemu-img", "map", "--output=json", image))
        return [(r["start"], r["length"], r["zero"], r["data"], "offset" in r) for r in runs]

    ours = shape(s.image)
    assert ours == shape(theirs)
    if compat == "1.1":
        assert ours[0] == (0, 1 * MiB, True, False, True), ours  # zero-flagged, host clusters kept
    else:
        assert ours[0] == (0, 4 * MiB, True, False, False), ours  # discarded


@pytest.mark.parametrize("unmap", [False, True])
async def test_a_cluster_zero_range_frees_keeps_its_host_bytes(tmp_path: Path, unmap: bool) -> None:
    """Version 2, nothing below: ZERO_RANGE frees the cluster (as QEMU's
    discard does) but leaves its bytes in the file, as QEMU passes a freed
    cluster's discard to the file only when opened with unmap; only a discard
    (PUNCH_HOLE) punches it. A damaged image whose other entry still uses the
    cluster then reads what it did (hostile soak seed 1352998606)."""
    from corruption import l2_entry_offset, u64

    s = build(tmp_path, Layout(size=1 * MiB, compat="0.10"))
    async with s.session():
        await s.write(0, make_data("random", 64 * KiB, 3))
    host = u64(s.image, l2_entry_offset(s.image, 0)) & ((1 << 56) - 512)
    with open(s.image, "rb") as f:
        f.seek(host)
        old = f.read(64 * KiB)
    async with s.session():
        await s.zero(0, 64 * KiB, unmap=unmap)
    s.judge()
    with open(s.image, "rb") as f:
        f.seek(host)
        assert (f.read(64 * KiB) == old) != unmap
        assert (os.lseek(f.fileno(), host, os.SEEK_HOLE) == host) == unmap


async def test_read_only_image_refuses(tmp_path: Path) -> None:
    from qcowfs.errors import ReadOnlyError
    from qcowfs.engine.image import Image, OpenOptions

    s = build(tmp_path, Layout(size=1 * MiB))
    image = Image(str(s.image), OpenOptions(read_only=True))
    try:
        with pytest.raises(ReadOnlyError):
            await image.zero(0, 4096, unmap=True)
    finally:
        await image.close()


async def test_external_data_file(tmp_path: Path) -> None:
    """Guest offset == host offset: the data file itself reads zeros after a
    discard (data_file_raw keeps it a valid raw image) and its space is freed."""
    from qcowfs.engine.image import Image, OpenOptions

    img, data = tmp_path / "x.qcow2", tmp_path / "x.data"
    must("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={data},data_file_raw=on", img, "8M")
    must("qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 8M", img)
    image = Image(str(img), OpenOptions(read_only=False))
    try:
        await image.prepare_writes()
        await image.zero(1 * MiB, 2 * MiB, unmap=True)
        await image.zero(4 * MiB + 100, 1 * MiB, unmap=False)
        await image.zero(6 * MiB, 1 * MiB, unmap=False)
    finally:
        await image.close()
    assert run("qemu-img", "check", img).returncode == 0
    want = bytearray(b"\x61" * (8 * MiB))
    want[1 * MiB : 3 * MiB] = bytes(2 * MiB)
    want[4 * MiB + 100 : 5 * MiB + 100] = bytes(1 * MiB)
    want[6 * MiB : 7 * MiB] = bytes(1 * MiB)
    assert data.read_bytes() == want  # the raw data file
    out = tmp_path / "out.raw"
    must("qemu-img", "convert", "-O", "raw", img, out)
    assert out.read_bytes() == want


@pytest.mark.parametrize("unmap", [True, False])
async def test_discard_through_an_entry_pointing_into_metadata_keeps_the_metadata(tmp_path: Path,
                                                                                  unmap: bool) -> None:
    """An L2 entry that points at a refcount block (hostile soak seed 9700199):
    a discard, or a zero write of a v2 image, drops the entry, so the guest
    reads zeros as asked and the alias is gone, but not the reference it
    held: the block keeps its count, and the writes after it allocate around
    it (QEMU's discard decrements it, freeing the block for the next
    allocation). The image is then consistent but for the data cluster the
    damage orphaned: a leak."""
    from corruption import cluster_of, l2_entry_offset, poke_u64, refblock_offset, refcount
    from qcowfs.engine.image import Image, OpenOptions

    img = tmp_path / "c.qcow2"
    must("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"compat={'1.1' if unmap else '0.10'}", img, "4M")
    must("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", img)
    block = refblock_offset(img)
    poke_u64(img, l2_entry_offset(img, 64 * KiB), block | (1 << 63))
    before = refcount(img, cluster_of(img, block))
    image = Image(str(img), OpenOptions(read_only=False))
    try:
        await image.prepare_writes()
        await image.zero(0, 1 * MiB, unmap=unmap)
        await image.write(1 * MiB, b"\x22" * (2 * MiB))  # allocations after it
        await image.flush()
        assert not image.corrupt
    finally:
        await image.close()
    assert refcount(img, cluster_of(img, block)) == before
    report = json.loads(run("qemu-img", "check", "--output=json", img).stdout)
    assert (report.get("corruptions", 0), report.get("leaks", 0)) == (0, 1)
    out = tmp_path / "out.raw"
    must("qemu-img", "convert", "-O", "raw", img, out)
    assert out.read_bytes() == bytes(1 * MiB) + b"\x22" * (2 * MiB) + bytes(1 * MiB)


async def test_discards_and_writes_in_flight_at_once(tmp_path: Path) -> None:
    """As a loop device sends them: discards and writes of disjoint ranges
    (some sharing a cluster) at the same time, over a backing file."""
    import random

    import trio

    s = build(tmp_path, Layout(size=8 * MiB, cluster_size=16 * KiB, backing_size=8 * MiB, prefill=True,
                               snapshots=1))
    rng = random.Random(11)
    async with s.session():
        for round_ in range(4):
            cuts = sorted(rng.sample(range(1, 8 * MiB // 512), 15))
            spans = [(a * 512, b * 512) for a, b in zip([0] + cuts, cuts + [8 * MiB // 512])]
            async with trio.open_nursery() as nursery:
                for i, (a, b) in enumerate(spans):
                    if i % 3 == 0:
                        nursery.start_soon(s.write, a, make_data("random", b - a, round_ * 100 + i))
                    else:
                        nursery.start_soon(s.zero, a, b - a, i % 3 == 1)
            await s.read_back(0, 8 * MiB)
    s.judge()
