"""`qcowfs amend` against `qemu-img amend` (QEMU 7.2) on twin copies of the
same images (the read matrix's layouts, made by qemu-img and qemu-io): the
same exit; where both amend, the same disk and the same snapshots (`qemu-img
compare`, `convert -l`), the same `qemu-img info` (options, features,
snapshots, bitmaps), the same allocation (`qemu-img map` without host
offsets), and ours clean in `qemu-img check` with no leak; where both refuse,
ours leaves every byte as it was. The LUKS key slot options are in
test_amend_keyslots.py; where qcowfs refuses what qemu-img does (the module
docstring of engine/amend.py) the refusal is pinned below."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import killing
from tests import images
from tests.test_convert import qcowfs, run

KiB, MiB = 1 << 10, 1 << 20

# (layout of the read matrix, amend options): each as a test
CASES = [
    # upgrades
    ("v2-c512", "compat=1.1"), ("v2-c64k", "compat=v3"), ("snapshots-v2", "compat=1.1"),
    ("zero-over-backing-v2", "compat=1.1"), ("zero-metadata-prealloc-v2", "compat=1.1"),
    ("convert-c-zlib-v2", "compat=1.1"), ("v2-c4k", "compat=1.1,lazy_refcounts=on,refcount_bits=4"),
    # downgrades: zero clusters (plain, preallocated, over a backing file, shared
    # with snapshots) become what version 2 can say
    ("v3-c4k", "compat=0.10"), ("snapshots", "compat=0.10"), ("zero-plain", "compat=0.10"),
    ("zero-prealloc", "compat=0.10"), ("zero-unmap", "compat=0.10"), ("zero-over-backing", "compat=0.10"),
    ("zero-metadata-prealloc-v3", "compat=0.10"), ("zero-falloc", "compat=0.10"), ("backing-chain4", "compat=0.10"),
    ("dirty-lazy-refcounts", "compat=0.10"), ("refcount8", "compat=0.10,refcount_bits=16"),
    ("convert-c-zlib-c4k", "compat=0.10"), ("qemu-io-c-zstd", "compat=0.10"),
    # downgrades both refuse
    ("extl2-c64k", "compat=0.10"), ("datafile", "compat=0.10"), ("refcount8", "compat=0.10"),
    ("convert-c-zstd-c4k", "compat=0.10"), ("corrupt-bit", "compat=0.10"),
    # lazy refcounts
    ("v3-c64k", "lazy_refcounts=on"), ("dirty-lazy-refcounts", "lazy_refcounts=off"), ("v2-c64k", "lazy_refcounts=on"),
    # the refcount width, up and down (the refcount table of 512-byte clusters grows)
    ("v3-c512", "refcount_bits=2"), ("refcount1", "refcount_bits=16"), ("refcount16", "refcount_bits=64"),
    ("snapshots", "refcount_bits=8"), ("snapshots", "refcount_bits=1"), ("v3-c4k", "refcount_bits=1"),
    ("v3-c4k", "refcount_bits=3"), ("v2-c4k", "refcount_bits=8"),
    # size: grow, shrink (QEMU's amend shrinks without asking), and its refusals
    ("v3-c64k", "size=16M"), ("zero-over-backing", "size=1M"), ("snapshots-v2", "size=64M"),
    ("snapshots-v2", "compat=1.1,size=16M"),  # (upgraded first: then a resize is allowed)
    ("bitmaps", "size=32M"),
    # the data file and backing options
    ("datafile", "data_file=other.data"), ("datafile-raw", "data_file_raw=off"), ("datafile", "data_file_raw=on"),
    ("v3-c64k", "data_file=x.data"), ("backing-qcow2", "backing_file=base.qcow2,backing_fmt=qcow2"),
    ("backing-qcow2", "backing_file=other.qcow2"), ("v3-c64k", "cluster_size=4k"), ("v3-c64k", "compat=2.0"),
]


def twins(tmp_path: Path, layout: str) -> tuple[Path, Path]:
    """The image of LAYOUT (with its backing and data files) twice, byte for byte."""
    made = images.build(layout, tmp_path / "src")
    out = []
    for who in ("theirs", "ours"):
        shutil.copytree(tmp_path / "src", tmp_path / who, symlinks=True)
        out.append(tmp_path / who / made.relative_to(tmp_path / "src"))
    return out[0], out[1]


def tree_bytes(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# Every qemu-img command runs in the image's directory on its name: qemu-img
# 7.2's amend (and compare across directories) looks for a relative data
# file name in the working directory, not beside the image.

def qemu(image: Path, *args: object) -> str:
    return images.qimg(*args, image.name, cwd=image.parent)


def described(image: Path) -> dict:
    """qemu-img info of IMAGE without what names its place or measures its file."""
    d = json.loads(qemu(image, "info", "--output=json"))
    for key in ("filename", "actual-size", "full-backing-filename", "backing-image"):
        d.pop(key, None)
    return d


def allocation(image: Path) -> list[dict]:
    """qemu-img map of IMAGE without host offsets."""
    return [{k: v for k, v in e.items() if k != "offset"} for e in json.loads(qemu(image, "map", "--output=json"))]


def disk(image: Path, snapshot: str | None = None) -> bytes:
    """The disk of IMAGE (or of one of its snapshots), read by qemu-img."""
    out = image.parent / "disk.out"
    images.qimg("convert", *(["-l", f"snapshot.name={snapshot}"] if snapshot else []), "-O", "raw", image.name,
                out.name, cwd=image.parent)
    data = out.read_bytes()
    out.unlink()
    return data


@pytest.mark.parametrize("layout,options", CASES, ids=[f"{a}:{b}" for a, b in CASES])
def test_amend_as_qemu_img(tmp_path: Path, layout: str, options: str):
    theirs, ours = twins(tmp_path, layout)
    before = tree_bytes(ours.parent)
    # (from the image's directory: qemu-img 7.2's amend looks for a relative
    # data file name there, not beside the image as its other commands do)
    q = run(["qemu-img", "amend", "-o", options, theirs.name], theirs.parent)
    p = qcowfs("amend", "-o", options, ours)
    assert p.returncode == (1 if q.returncode else 0), (q.stderr, p.stderr)
    if p.returncode:
        assert len(p.stderr.splitlines()) == 1 and p.stderr.startswith("qcowfs: "), p.stderr
        assert "Traceback" not in p.stderr
        assert tree_bytes(ours.parent) == before
        return
    assert not p.stdout and not p.stderr, p.stderr
    if "data_file=" in options:  # (the user moves the data file to its new name)
        for image in (theirs, ours):
            (image.parent / "disk.data").rename(image.parent / options.split("data_file=")[1])
    assert disk(ours) == disk(theirs)
    want = described(theirs)
    assert described(ours) == want
    assert allocation(ours) == allocation(theirs)
    for s in want.get("snapshots", []):
        assert disk(ours, s["name"]) == disk(theirs, s["name"])
    c = run(["qemu-img", "check", ours.name], ours.parent)
    assert c.returncode == 0 and "No errors were found" in c.stdout, c.stdout + c.stderr
    # QEMU writes to it afterwards, and reads it back
    images.qio(Path(ours.name), "write -P 0x5e 0 4096", "read -P 0x5e 0 4096", cwd=ours.parent)


def test_downgrade_of_an_image_with_bitmaps_is_refused(tmp_path: Path):
    """qemu-img 7.2 downgrades it: a version 2 header beside the bitmap
    directory, whose clusters its check then calls leaked, and a warning at
    every open. qcowfs refuses, naming the way out, and leaves the image as it was."""
    theirs, ours = twins(tmp_path, "bitmaps")
    before = ours.read_bytes()
    p = qcowfs("amend", "-o", "compat=0.10", ours)
    assert p.returncode == 1 and "persistent bitmaps" in p.stderr and len(p.stderr.splitlines()) == 1, p.stderr
    assert ours.read_bytes() == before
    run(["qemu-img", "amend", "-o", "compat=0.10", theirs])
    c = run(["qemu-img", "check", theirs])
    assert "leaked" in c.stdout + c.stderr  # (what qemu-img leaves: the reason for the refusal)
    for b in json.loads(images.qimg("info", "--output=json", ours))["format-specific"]["data"]["bitmaps"]:
        assert qcowfs("bitmap", "remove", ours, b["name"]).returncode == 0
    p = qcowfs("amend", "-o", "compat=0.10", ours)
    assert p.returncode == 0, p.stderr
    assert run(["qemu-img", "check", ours]).returncode == 0


def test_a_width_too_narrow_is_refused_before_the_upgrade(tmp_path: Path):
    """compat=1.1 with refcount_bits=1 on a version 2 image whose snapshot
    shares clusters (two references): qemu-img 7.2 upgrades, then refuses the
    width, and leaves a version 3 image; qcowfs counts the references first
    and refuses with the image as it was (found by the model test, seed
    3190627027)."""
    img = images.create(tmp_path / "v2.qcow2", 4 * MiB, compat="0.10", cluster_size=512)
    images.qio(img, "write -P 0x5a 0 64k")
    images.qimg("snapshot", "-c", "s1", img)
    twin = Path(shutil.copy(img, tmp_path / "twin.qcow2"))
    before = img.read_bytes()
    p = qcowfs("amend", "-o", "compat=1.1,refcount_bits=1,lazy_refcounts=on", img)
    assert p.returncode == 1 and "more references than 1-bit refcounts can count" in p.stderr, p.stderr
    assert len(p.stderr.splitlines()) == 1 and img.read_bytes() == before
    q = run(["qemu-img", "amend", "-o", "compat=1.1,refcount_bits=1,lazy_refcounts=on", twin])
    assert q.returncode != 0 and described(twin)["format-specific"]["data"]["compat"] == "1.1"


def test_zstd_clusters_in_a_snapshot_refuse_a_downgrade(tmp_path: Path):
    """QEMU 7.2 looks for compressed clusters in the active disk only: a zstd
    cluster that only a snapshot holds would then be read as zlib by a
    version 2 reader. qcowfs looks in every table."""
    img = images.create(tmp_path / "z.qcow2", 4 * MiB, compression_type="zstd")
    images.qio(img, "write -c -P 0x33 0 64k")
    images.qimg("snapshot", "-c", "s1", img)
    images.qio(img, "write -P 0x44 0 64k")
    before = img.read_bytes()
    p = qcowfs("amend", "-o", "compat=0.10", img)
    assert p.returncode == 1 and "zstd" in p.stderr, p.stderr
    assert img.read_bytes() == before


def test_the_library(tmp_path: Path):
    import qcowfs as lib

    img = images.create(tmp_path / "a.qcow2", 8 * MiB, compat="0.10")
    images.qio(img, "write -P 0x11 0 1M")
    assert qcowfs("amend", "-t", "none", "-p", "-q", "-o", "compat=1.1", img).returncode == 0  # (qemu-img's flags)
    lib.amend(img, lazy_refcounts=True, refcount_bits=8)
    d = described(img)["format-specific"]["data"]
    assert (d["compat"], d["lazy-refcounts"], d["refcount-bits"]) == ("1.1", True, 8)
    lib.amend(img, compat="0.10", refcount_bits=16, lazy_refcounts=False)
    assert described(img)["format-specific"]["data"]["compat"] == "0.10"
    with pytest.raises(lib.UsageError, match="refcount"):
        lib.amend(img, refcount_bits=8)
    images.qio(img, "read -P 0x11 0 1M")
    assert run(["qemu-img", "check", img]).returncode == 0


def test_refusals_of_the_command_line(tmp_path: Path):
    img = images.create(tmp_path / "a.qcow2", 8 * MiB)
    before = img.read_bytes()
    for args, says in ((["amend", img], "-o"), (["amend", "-f", "raw", "-o", "compat=1.1", img], "qcow2 images only"),
                       (["amend", "-o", "encrypt.new-secret=s", img], "no secret with id 's'"),
                       (["amend", "-o", "lazy_refcounts=maybe", img], "'on' or 'off'"),
                       (["amend", "-o", "compat", img], "NAME=VALUE"),
                       (["amend", "-o", "nonsense=1", img], "invalid parameter"),
                       (["amend", "-o", "encrypt.state=active", "--new-key-file", "/dev/null", img], "not encrypted"),
                       (["amend", "-o", "compat=1.1", tmp_path], "is a directory"),
                       (["amend", "-t", "sometimes", "-o", "compat=1.1", img], "-t must be one of")):
        p = qcowfs(*args)
        assert p.returncode in (1, 2) and says in p.stderr and len(p.stderr.splitlines()) == 1, (args, p.stderr)
    assert img.read_bytes() == before
    holder = subprocess.Popen(["qemu-io", "-c", "sleep 20000", str(img)], stdout=subprocess.DEVNULL)
    try:
        time.sleep(1)
        p = qcowfs("amend", "-o", "lazy_refcounts=on", img)
        assert p.returncode == 1 and "in use" in p.stderr, p.stderr
    finally:
        holder.kill()
        holder.wait()
    assert img.read_bytes() == before


@pytest.mark.parametrize("options", ["compat=0.10", "refcount_bits=2", "compat=1.1,refcount_bits=4"])
def test_a_kill_at_any_moment_leaves_the_old_image_or_the_new(tmp_path: Path, options: str):
    """kill -9 at points spread over the amend of an overlay of 512-byte
    clusters (a downgrade turns its thousands of zero clusters into clusters
    of zeros, over a backing file full of data; the refcount blocks of the
    others are all rewritten): qemu-img check finds no corruption (leaks
    allowed), and the disk reads as before whatever the version says."""
    base = images.create(tmp_path / "base.qcow2", 2 * MiB)
    images.qio(base, f"write -P 0x77 0 {2 * MiB}")
    src = tmp_path / "src.qcow2"
    compat = "0.10" if options.startswith("compat=1.1") else "1.1"
    images.create(src, 2 * MiB, backing="base.qcow2", backing_fmt="qcow2", cluster_size=512, compat=compat)
    zeros = [f"write -z {o}k 1k" for o in range(0, 2048, 3)] if compat == "1.1" else \
        [f"write -P 0x21 {o}k 1k" for o in range(0, 2048, 3)]
    images.qio(src, *zeros)
    ref = tmp_path / "ref.raw"
    images.qimg("convert", "-O", "raw", src, ref)
    # Killed exactly as it is about to make its Nth write, for N spread over
    # every write the amend makes, from a random phase each run.
    total = killing.writes(["amend", "-o", options, shutil.copy(src, tmp_path / "counted.qcow2")])
    assert total >= 3
    for n in killing.points(total, 26):
        img = Path(shutil.copy(src, tmp_path / "k.qcow2"))
        killing.killed_at(["amend", "-o", options, img], n)
        c = run(["qemu-img", "check", img])
        assert c.returncode in (0, 3), f"killed at write {n} of {total}: {c.stdout}{c.stderr}"
        assert run(["qemu-img", "compare", "-F", "raw", img, ref]).returncode == 0, f"write {n} of {total}"


@pytest.mark.parametrize("bits", [1, 8, 64])
def test_refcount_width_of_large_clusters(tmp_path: Path, bits: int):
    """qemu-img 7.2's amend never ends a change of the refcount width of an
    image of 512 KiB clusters or more (it spins; found by the model test):
    qcowfs's does, judged by qemu-img check and the disk as it was."""
    img = images.create(tmp_path / "big.qcow2", 15 * MiB, cluster_size="2M", refcount_bits=2)
    images.qio(img, "write -P 0x3a 0 3M", "write -P 0x3b 9M 1M")
    images.qimg("snapshot", "-c", "s1", img)
    images.qio(img, "write -P 0x3c 1M 64k")
    before, snap = disk(img), disk(img, "s1")
    p = qcowfs("amend", "-o", f"refcount_bits={bits}", img)
    if bits == 1:  # (the snapshot's clusters have two references)
        assert p.returncode == 1 and "1-bit refcounts" in p.stderr, p.stderr
        return
    assert p.returncode == 0 and not p.stderr, p.stderr
    assert described(img)["format-specific"]["data"]["refcount-bits"] == bits
    c = run(["qemu-img", "check", img])
    assert c.returncode == 0 and "No errors were found" in c.stdout, c.stdout + c.stderr
    assert disk(img) == before and disk(img, "s1") == snap
