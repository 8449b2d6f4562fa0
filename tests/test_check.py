"""`qcowfs check [--repair] [--json]` against `qemu-img check` on clean, leaking and corrupted images.

Damage is made by patching copies of images made by qemu-img: a raised
refcount is a leak (exit 3), a lowered one or a cleared COPIED flag is a
corruption (exit 2). `--repair` must leave `qemu-img check` clean with the
data unchanged.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

import qcowfs

from conftest import QCOWFS
from images import MiB, Header, build, create, oracle, qimg, qio, read_u64, patch
from test_write import assert_clean, assert_same, qcheck, sha_file


def qcowfs_check(img: Path, *args: str) -> subprocess.CompletedProcess:
    img = Path(img).resolve()
    return subprocess.run([QCOWFS, "check", *args, str(img)], capture_output=True, text=True, timeout=120,
                          cwd=img.parent)


# --------------------------------------------------------------------------
# refcount patching


class Refcounts:
    def __init__(self, img: Path):
        self.img = img
        self.h = Header(img)
        self.cs = self.h.cluster_size
        self.width = 1 << self.h.refcount_order
        self.per_block = self.cs * 8 // self.width

    def _where(self, host: int) -> tuple[int, int]:
        """(file offset of the byte(s) holding the entry, bit shift within the byte for widths < 8)."""
        c = host // self.cs
        rt_index, k = divmod(c, self.per_block)
        block = read_u64(self.img, self.h.refcount_table_offset + 8 * rt_index) & ~0x1FF
        assert block, f"no refcount block for host cluster {c}"
        bit = k * self.width
        return block + bit // 8, bit % 8

    def get(self, host: int) -> int:
        off, shift = self._where(host)
        nbytes = max(1, self.width // 8)
        with open(self.img, "rb") as f:
            f.seek(off)
            raw = f.read(nbytes)
        if self.width < 8:
            return (raw[0] >> shift) & ((1 << self.width) - 1)
        return int.from_bytes(raw, "big")

    def set(self, host: int, value: int) -> None:
        off, shift = self._where(host)
        assert 0 <= value < (1 << self.width)
        if self.width < 8:
            with open(self.img, "rb") as f:
                f.seek(off)
                b = f.read(1)[0]
            mask = ((1 << self.width) - 1) << shift
            patch(self.img, off, bytes([(b & ~mask) | (value << shift)]))
        else:
            patch(self.img, off, value.to_bytes(self.width // 8, "big"))


def data_clusters(img: Path) -> list[tuple[int, int]]:
    """[(guest offset, host offset)] of allocated data clusters, from qemu-img map."""
    cs = Header(img).cluster_size
    out = []
    for e in json.loads(qimg("map", "--output=json", img)):
        if e.get("data") and "offset" in e and e.get("depth", 0) == 0 and not e.get("compressed"):
            for i in range(0, e["length"], cs):
                out.append((e["start"] + i, e["offset"] + i))
    return out


# --------------------------------------------------------------------------
# layouts


def _plain(d: Path, **opts) -> Path:
    img = create(d / "disk.qcow2", 8 * MiB, **opts)
    cs = Header(img).cluster_size
    qio(img, "write -P 0x31 0 1M", f"write -P 0x32 {3 * MiB + 7} 300k", f"write -c -P 0x33 {6 * MiB} {cs}")
    return img


LAYOUTS = {
    "default": lambda d: _plain(d),
    "v2-c4k": lambda d: _plain(d, compat="0.10", cluster_size=4096),
    "refcount1-c512": lambda d: _plain(d, refcount_bits=1, cluster_size=512),
    "refcount2-c4k": lambda d: _plain(d, refcount_bits=2, cluster_size=4096),
    "refcount8-c64k": lambda d: _plain(d, refcount_bits=8),
    "refcount64-c4k": lambda d: _plain(d, refcount_bits=64, cluster_size=4096),
    "extl2": lambda d: _plain(d, extended_l2="on"),
}

# images of the shared matrix that must check clean
CLEAN = ["v3-c512", "refcount32", "qemu-io-c-zstd", "extl2-c16k-backing", "datafile", "snapshots", "bitmaps",
         "backing-chain4"]


def make(name: str, d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    if name in LAYOUTS:
        return LAYOUTS[name](d).resolve()
    return build(name, d).resolve()


def same_verdict(img: Path) -> int:
    rc, rep = qcheck(img)
    before = sha_file(img)
    p = qcowfs_check(img)
    assert p.returncode == rc, f"qcowfs check exit {p.returncode}, qemu-img check exit {rc} ({rep})\n" \
                               f"{p.stdout}{p.stderr}"
    assert "Traceback" not in p.stderr
    assert sha_file(img) == before, "qcowfs check without --repair changed the image"
    return rc


def repair_and_verify(img: Path, data: Path) -> None:
    p = qcowfs_check(img, "--repair")
    assert p.returncode == 0, f"qcowfs check --repair exit {p.returncode}: {p.stdout}{p.stderr}"
    assert_clean(img)
    assert_same(img, data)
    p = qcowfs_check(img)
    assert p.returncode == 0, f"qcowfs check after --repair: exit {p.returncode}: {p.stdout}{p.stderr}"


@pytest.mark.parametrize("name", list(LAYOUTS) + CLEAN)
def test_clean_images(name: str, tmp_path: Path) -> None:
    img = make(name, tmp_path / "img")
    assert same_verdict(img) == 0


@pytest.mark.parametrize("name", ["default", "v2-c4k", "refcount2-c4k", "refcount64-c4k", "extl2", "snapshots"])
def test_raised_refcount_is_a_leak(name: str, tmp_path: Path) -> None:
    """Raise the refcount of a cluster that no COPIED flag describes (the header's; a data cluster
    shared with a snapshot): one more than its references is a leak, nothing else."""
    img = make(name, tmp_path / "img")
    data = oracle(img, tmp_path / "data.raw")
    rc = Refcounts(img)
    host = 0
    if name == "snapshots":
        host = next(h for _, h in data_clusters(img) if rc.get(h) == 2)
    v = rc.get(host)
    assert 1 <= v < (1 << rc.width) - 1
    rc.set(host, v + 1)
    assert rc.get(host) == v + 1
    assert same_verdict(img) == 3
    repair_and_verify(img, data)


@pytest.mark.parametrize("name", ["default", "refcount1-c512", "refcount64-c4k"])
def test_refcount_of_free_cluster_is_a_leak(name: str, tmp_path: Path) -> None:
    """A refcount on a cluster nothing uses, inside the file."""
    img = make(name, tmp_path / "img")
    data = oracle(img, tmp_path / "data.raw")
    rc = Refcounts(img)
    size = img.stat().st_size
    used = {h // rc.cs for _, h in data_clusters(img)}
    # a cluster covered by the first refcount block that has refcount 0
    for c in range(rc.per_block):
        if c * rc.cs < size and c not in used and rc.get(c * rc.cs) == 0:
            break
    else:
        # none free inside the file: append one
        with open(img, "ab") as f:
            f.truncate((size + rc.cs - 1) // rc.cs * rc.cs + rc.cs)
        c = (size + rc.cs - 1) // rc.cs
        assert c < rc.per_block
    rc.set(c * rc.cs, 1)
    assert same_verdict(img) == 3
    repair_and_verify(img, data)


@pytest.mark.parametrize("name", ["default", "v2-c4k", "refcount1-c512", "refcount64-c4k", "snapshots"])
def test_lowered_refcount_is_corruption(name: str, tmp_path: Path) -> None:
    img = make(name, tmp_path / "img")
    data = oracle(img, tmp_path / "data.raw")
    rc = Refcounts(img)
    guest, host = data_clusters(img)[0]
    v = rc.get(host)
    assert v >= 1
    rc.set(host, v - 1)
    assert same_verdict(img) == 2
    repair_and_verify(img, data)


@pytest.mark.parametrize("name", ["default", "refcount1-c512", "extl2", "datafile"])
def test_cleared_copied_flag_is_corruption(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry without the COPIED flag its refcount of 1 asks for is an error,
    with qemu-img's messages, and --repair sets it. A cluster of an external
    data file has no refcount: QEMU counts it as 1 (qcowfs found no error
    there, and its --repair left what qemu-img check still called 4 errors:
    found by a differential run of check and repair on the hostile
    generator's images)."""
    img = make(name, tmp_path / "img")
    monkeypatch.chdir(img.parent)  # (qemu-img 7.2 finds the data file "disk.data" from there)
    data = oracle(img, tmp_path / "data.raw")
    h = Header(img)
    guest, _ = data_clusters(img)[1]
    off = h.l2_entry_offset(guest)
    e = read_u64(img, off)
    assert e & (1 << 63), f"L2 entry {e:#x} has no COPIED flag to clear"
    patch(img, off, struct.pack(">Q", e & ~(1 << 63)))
    assert same_verdict(img) == 2
    q = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True, timeout=120)
    p = qcowfs_check(img)
    assert p.stderr.splitlines() == q.stderr.splitlines(), f"qcowfs:\n{p.stderr}\nqemu-img:\n{q.stderr}"
    repair_and_verify(img, data)


@pytest.mark.parametrize("damage", ["table-entry-reserved-bits", "granularity", "type"])
def test_a_damaged_bitmap_is_an_error(tmp_path: Path, damage: str) -> None:
    """A bitmap QEMU refuses the image for (qemu-img check cannot open it) is
    an error of check, whose references may all be right: qcowfs called
    such an image clean (found by a differential run of check on the hostile
    generator's images). --repair mends it, as QEMU cannot: a table entry
    QEMU refuses marks its range all dirty (a backup copies too much, never
    too little), and a bitmap whose directory entry QEMU refuses is removed.
    The disk is what it was, and qemu-img opens the image again."""
    from corruption import bitmap_directory
    img = make("default", tmp_path / "img")
    qimg("bitmap", "--add", img, "b1")
    qio(img, "write -P 0x34 0 64k")  # (the bitmap gets a data cluster, and a table entry naming it)
    undamaged = tmp_path / "undamaged.qcow2"
    shutil.copyfile(img, undamaged)
    directory, _ = bitmap_directory(img)
    table = read_u64(img, directory)
    if damage == "table-entry-reserved-bits":
        patch(img, table, struct.pack(">Q", read_u64(img, table) | 4))
    elif damage == "granularity":
        patch(img, directory + 17, b"\x3f")
    else:
        patch(img, directory + 16, b"\x07")
    q = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True, timeout=120)
    assert q.returncode == 1, q.stdout + q.stderr
    before = sha_file(img)
    p = qcowfs_check(img)
    assert p.returncode == 2, p.stdout + p.stderr
    assert [x for x in p.stderr.splitlines() if x.startswith("ERROR")] == \
        [next(x for x in p.stderr.splitlines() if x.startswith("ERROR bitmap 'b1' is damaged: "))]
    assert sha_file(img) == before
    p = qcowfs_check(img, "--repair")
    assert p.returncode == 0, p.stdout + p.stderr
    said = "Repaired bitmap 'b1': table entry 0" if damage == "table-entry-reserved-bits" else "Removed bitmap 'b1'"
    assert said in p.stderr, p.stderr
    q = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True, timeout=120)
    assert q.returncode == 0, q.stdout + q.stderr
    subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(undamaged), str(img)], check=True)
    bitmaps = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(img)], check=True,
                                        capture_output=True, text=True).stdout)["format-specific"]["data"].get("bitmaps", [])
    if damage == "table-entry-reserved-bits":
        assert [b["name"] for b in bitmaps] == ["b1"]
        with qcowfs.open(img) as image:
            bits = image.bitmap_bits("b1")
        assert bits[:-1] == b"\xff" * (len(bits) - 1) and bits[-1], "the damaged range is not all dirty"
    else:
        assert bitmaps == []


@pytest.mark.parametrize("damage", ["misaligned", "past-the-end", "huge"])
def test_repair_deletes_a_snapshot_whose_l1_table_cannot_be_read(tmp_path: Path, damage: str) -> None:
    """A snapshot whose L1 table cannot be read (its entry names an offset
    inside a cluster, past the end of the file, or more entries than QEMU
    allows) is deleted by --repair, as qemu-img check -r all deletes it; the
    other snapshot and the active disk stay whole, and the image checks
    clean. qcowfs refused the repair (the image opened read-only only):
    found by a differential run of check and repair on the hostile
    generator's images."""
    from corruption import poke_u32, poke_u64, snapshot_entries
    img = create(tmp_path / "disk.qcow2", 8 * MiB, cluster_size=4096)
    qio(img, "write -P 0x41 0 1M")
    qimg("snapshot", "-c", "s0", img)
    qio(img, "write -P 0x42 512k 1M")
    qimg("snapshot", "-c", "s1", img)
    qio(img, "write -P 0x43 3M 64k")
    s1 = tmp_path / "s1.raw"
    qimg("convert", "-O", "raw", "-l", "snapshot.name=s1", img, s1)
    active = oracle(img, tmp_path / "active.raw")
    e = snapshot_entries(img)[0]
    if damage == "misaligned":
        poke_u64(img, e.entry_offset, e.l1_table_offset + 512)
    elif damage == "past-the-end":
        poke_u64(img, e.entry_offset, (os.path.getsize(img) // 4096 + 64) * 4096)
    else:
        poke_u32(img, e.entry_offset + 8, 0x7FFFFFFF)
    assert same_verdict(img) == 2
    p = qcowfs_check(img, "--repair")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Deleted snapshot 1 (s0)" in p.stderr, p.stderr
    assert_clean(img)
    assert_same(img, active)
    assert [s["name"] for s in json.loads(qimg("info", "--output=json", img))["snapshots"]] == ["s1"]
    got = tmp_path / "s1-after.raw"
    qimg("convert", "-O", "raw", "-l", "snapshot.name=s1", img, got)
    assert sha_file(got) == sha_file(s1)


def test_cleared_l1_copied_flag_is_corruption(tmp_path: Path) -> None:
    img = make("default", tmp_path / "img")
    data = oracle(img, tmp_path / "data.raw")
    h = Header(img)
    off = h.l1_entry_offset(0)
    e = read_u64(img, off)
    assert e & (1 << 63)
    patch(img, off, struct.pack(">Q", e & ~(1 << 63)))
    assert same_verdict(img) == 2
    repair_and_verify(img, data)


def test_dirty_image_verdict_and_repair(tmp_path: Path) -> None:
    """lazy_refcounts and an aborted qemu-io: stale refcounts, as qemu-img check sees them."""
    img = make("dirty-lazy-refcounts", tmp_path / "img")
    data = oracle(img, tmp_path / "data.raw")
    same_verdict(img)
    repair_and_verify(img, data)
    assert Header(img).incompatible_features & 1 == 0, "dirty bit left set after --repair"


@pytest.mark.parametrize("damage", ["clean", "leak", "corruption"])
def test_json_matches_qemu(damage: str, tmp_path: Path) -> None:
    img = make("default", tmp_path / "img")
    if damage != "clean":
        rc = Refcounts(img)
        host = 0 if damage == "leak" else data_clusters(img)[0][1]
        rc.set(host, rc.get(host) + (1 if damage == "leak" else -1))
    code, want = qcheck(img)
    p = qcowfs_check(img, "--json")
    assert p.returncode == code, p.stderr
    got = json.loads(p.stdout)
    for key in ("leaks", "corruptions", "check-errors", "allocated-clusters", "image-end-offset", "total-clusters"):
        assert got.get(key, 0) == want.get(key, 0), f"{key}: qcowfs {got.get(key)} qemu-img {want.get(key)}"


def test_check_after_rw_mount_writes(tmp_path: Path) -> None:
    """An image written through qcowfs checks clean with both tools."""
    from test_write import Workload, qcowfs_mount
    img = make("refcount2-c4k", tmp_path / "img")
    ref = oracle(img, tmp_path / "ref.raw")
    with qcowfs_mount(img, tmp_path / "mnt") as mnt:
        w = Workload(mnt / "disk.raw", ref, 8 * MiB, 4096, seed=3)
        try:
            w.run(MiB)
            w.fsync()
        finally:
            w.close()
    assert same_verdict(img) == 0
    assert_same(img, ref)


def test_missing_image_is_check_failure(tmp_path: Path) -> None:
    p = qcowfs_check(tmp_path / "nope.qcow2")
    assert p.returncode == 1, f"exit {p.returncode}: {p.stderr}"
    assert p.stderr.strip() and "Traceback" not in p.stderr


def test_repair_refused_on_mounted_image(tmp_path: Path) -> None:
    """--repair on an image a qcowfs daemon is writing would fight the daemon: it must be refused
    (like `qemu-img check -r` is, by the image lock), and change nothing."""
    from test_write import qcowfs_mount
    img = make("default", tmp_path / "img")
    rc = Refcounts(img)
    rc.set(0, rc.get(0) + 1)                   # a leak to repair
    with qcowfs_mount(img, tmp_path / "mnt") as mnt:
        with open(mnt / "disk.raw", "r+b") as f:
            f.write(b"\x55" * 4096)
            f.flush()
            os.fsync(f.fileno())
        before = sha_file(img)
        p = qcowfs_check(img, "--repair")
        assert p.returncode != 0, f"qcowfs check --repair ran on a mounted image: {p.stdout}{p.stderr}"
        assert "lock" in p.stderr.lower() or "in use" in p.stderr.lower(), p.stderr
        assert sha_file(img) == before, "qcowfs check --repair changed a mounted image"
        assert (mnt / "disk.raw").read_bytes()[:4096] == b"\x55" * 4096


# --------------------------------------------------------------------------
# the output, as qemu-img check prints it


def _truncated(d: Path) -> Path:
    img = create(d / "disk.qcow2", 16 * MiB)
    qio(img, "write -P 0x41 0 8M")
    os.truncate(img, 4 * MiB)
    return img


def _fragmented(d: Path) -> Path:
    """Interleaved writes, compressed clusters and a snapshot: fragmentation
    and allocation statistics that only count the active disk."""
    img = create(d / "disk.qcow2", 16 * MiB, cluster_size=4096)
    qio(img, "write -P 1 0 64k", "write -P 2 8M 64k", "write -P 3 64k 64k", "write -c -P 4 12M 16k")
    qimg("snapshot", "-c", "s", img)
    qio(img, "write -P 5 4k 8k")
    return img


def _leaky(d: Path) -> Path:
    img = make("default", d)
    rc = Refcounts(img)
    host = data_clusters(img)[0][1]
    rc.set(host, rc.get(host) + 1)
    return img


def _corrupt(d: Path) -> Path:
    img = make("default", d)
    rc = Refcounts(img)
    host = data_clusters(img)[0][1]
    rc.set(host, 0)
    return img


def _damaged_tables(d: Path, mib: int = 32, damaged: tuple[int, ...] = (2, 12)) -> Path:
    """MIB/2 L2 tables (4 KiB clusters), the first half of them shared with
    a snapshot, most clean and a few damaged: reserved bits in the tables
    DAMAGED (shared or the active disk's own), a lowered and a raised
    refcount in others. check counts the
    clean tables all at once and the damaged ones one by one; the verdict,
    the counts and the statistics are qemu-img's."""
    img = create(d / "disk.qcow2", mib * MiB, cluster_size=4096)
    half = mib // 2
    qio(img, f"write -P 1 0 {mib}M")
    qimg("snapshot", "-c", "s", img)
    qio(img, f"write -P 2 {half}M {half}M", "write -P 3 3M 8k")
    h = Header(img)
    l1 = [read_u64(img, h.l1_table_offset + 8 * i) & 0x00FFFFFFFFFFFE00 for i in range(h.l1_size)]
    for table in damaged:
        at = l1[table] + 8 * (10 if table < half // 2 else 500)
        patch(img, at, struct.pack(">Q", read_u64(img, at) | 1 << 1))
    rc = Refcounts(img)
    hosts = dict(data_clusters(img))
    rc.set(hosts[5 * MiB + 4096], 0)
    rc.set(hosts[(half + 4) * MiB], rc.get(hosts[(half + 4) * MiB]) + 1)
    return img


OUTPUT_CASES = {
    "damaged tables": _damaged_tables,
    # 192 tables: three of check's batches (references.BATCH_BYTES), damage in each
    "damaged tables in batches": lambda d: _damaged_tables(d, 384, (2, 70, 100, 130, 190)),
    "truncated": _truncated,
    "fragmented": _fragmented,
    "leaky": _leaky,
    "corrupt": _corrupt,
    "dirty": lambda d: build("dirty-lazy-refcounts", d),
}


@pytest.mark.parametrize("case", sorted(OUTPUT_CASES))
def test_output_matches_qemu(case: str, tmp_path: Path) -> None:
    """Counts, image end offset and the statistics line are qemu-img's; the
    messages go to stderr as qemu-img's do, the summary to stdout."""
    d = tmp_path / "img"
    d.mkdir()
    img = Path(OUTPUT_CASES[case](d)).resolve()
    q = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True, timeout=120)
    p = qcowfs_check(img)
    assert p.returncode == q.returncode, f"qcowfs {p.returncode}, qemu-img {q.returncode}: {p.stdout}{p.stderr}"
    assert p.stdout.splitlines()[-2:] == q.stdout.splitlines()[-2:], f"qcowfs:\n{p.stdout}\nqemu-img:\n{q.stdout}"
    for what in ("errors were found", "leaked clusters were found"):
        qline = next((x for x in q.stdout.splitlines() if what in x), None)
        pline = next((x for x in p.stdout.splitlines() if what in x), None)
        assert pline == qline, f"{what}: qcowfs {pline!r}, qemu-img {qline!r}"
    qn, pn = len(q.stderr.splitlines()), len(p.stderr.splitlines())
    assert pn == min(qn, 100) + (qn > 100), f"qcowfs printed {pn} messages, qemu-img {qn}:\n{p.stderr[:2000]}"
    if qn > 100:
        assert f"{qn - 100} more" in p.stderr.splitlines()[-1]
    code, want = qcheck(img)
    got = json.loads(qcowfs_check(img, "--json").stdout)
    for key in ("leaks", "corruptions", "allocated-clusters", "fragmented-clusters",
                "compressed-clusters", "image-end-offset", "total-clusters"):
        assert got.get(key, 0) == want.get(key, 0), f"{key}: qcowfs {got.get(key)} qemu-img {want.get(key)}"


def test_repair_does_not_grow_the_file_when_there_is_room(tmp_path: Path) -> None:
    """Free clusters inside the file (discarded data) take the new refcount
    structure; the file keeps its size, as qemu-img check -r all does."""
    d = tmp_path / "img"
    d.mkdir()
    img = create(d / "disk.qcow2", 32 * MiB).resolve()
    qio(img, "write -P 0x11 0 8M", "discard 1M 4M", "write -P 0x12 16M 1M")
    data = oracle(img, tmp_path / "data.raw")
    rc = Refcounts(img)
    host = data_clusters(img)[0][1]
    rc.set(host, 0)
    theirs = tmp_path / "theirs.qcow2"
    theirs.write_bytes(img.read_bytes())
    subprocess.run(["qemu-img", "check", "-r", "all", str(theirs)], capture_output=True, timeout=120)
    size = img.stat().st_size
    p = qcowfs_check(img, "--repair")
    assert p.returncode == 0, p.stdout + p.stderr
    assert img.stat().st_size == size, f"repair grew the file from {size} to {img.stat().st_size}"
    assert img.stat().st_size <= theirs.stat().st_size
    assert_clean(img)
    assert_same(img, data)


def test_repair_with_free_tail(tmp_path: Path) -> None:
    """512-byte clusters: many refcount ranges, free clusters after the last
    referenced one (the file extended by a crash, say), and a leak: the
    rebuild places itself and covers exactly what is referenced."""
    d = tmp_path / "img"
    d.mkdir()
    img = create(d / "disk.qcow2", 8 * MiB, cluster_size=512).resolve()
    qio(img, "write -P 0x21 0 2M")
    os.truncate(img, img.stat().st_size + MiB)
    data = oracle(img, tmp_path / "data.raw")
    rc = Refcounts(img)
    host = data_clusters(img)[0][1]
    rc.set(host, rc.get(host) + 1)
    p = qcowfs_check(img, "--repair")
    assert p.returncode == 0, p.stdout + p.stderr
    assert_clean(img)
    assert_same(img, data)


@pytest.mark.parametrize("damage", ["leak", "leak+corruption", "dirty"])
def test_repair_spelled_as_qemu_img(damage: str, tmp_path: Path) -> None:
    """qemu-img's -r all is --repair; -r leaks repairs an image whose only
    errors are leaks, as qemu-img's does. qcowfs's repair rebuilds the
    refcounts whole, so an image with corruptions is left as it is (exit 2,
    one line) where qemu-img's -r leaks mends the leaks alone (exit 2) or
    fails for want of a rebuild (exit 1: a dirty image, a referenced cluster
    with refcount 0); -r all then repairs it."""
    layout = {"leak": "default", "leak+corruption": "snapshots", "dirty": "dirty-lazy-refcounts"}[damage]
    img = make(layout, tmp_path / "img")
    data = oracle(img, tmp_path / "data.raw")
    rc = Refcounts(img)
    if damage != "dirty":
        rc.set(0, rc.get(0) + 1)  # (the header's cluster: no COPIED flag describes it)
    if damage == "leak+corruption":  # (a cluster a snapshot shares: 2 references, refcount 1)
        host = next(h for _, h in data_clusters(img) if rc.get(h) == 2)
        rc.set(host, 1)
    theirs = tmp_path / "theirs.qcow2"
    shutil.copyfile(img, theirs)
    q = subprocess.run(["qemu-img", "check", "-r", "leaks", theirs], capture_output=True, text=True, timeout=120)
    before = sha_file(img)
    p = qcowfs_check(img, "-r", "leaks")
    assert "Traceback" not in p.stderr
    if damage == "leak":
        assert p.returncode == q.returncode == 0, (p.stdout, p.stderr, q.stdout, q.stderr)
        assert "1 leaked clusters" in p.stdout
    else:
        assert (p.returncode, q.returncode) == (2, 2 if damage == "leak+corruption" else 1), (p.stderr, q.stderr)
        assert sha_file(img) == before, "-r leaks changed an image with corruptions"
        assert p.stderr.splitlines()[-1] == ("qcowfs: -r leaks: the image has corruptions, which only -r all "
                                             "repairs: nothing was changed")
        p = qcowfs_check(img, "-r", "all")
        assert p.returncode == 0, p.stdout + p.stderr
    assert_clean(img)
    assert_same(img, data)


def test_raw_image_has_no_checks(tmp_path: Path) -> None:
    """A raw file: qemu-img check's exit code 63 ("this image format does not
    support checks"), one line, with or without a repair asked for."""
    raw = tmp_path / "disk.img"
    raw.write_bytes(b"\1" * 4096)
    for args in ([], ["-r", "all"], ["--repair"]):
        q = subprocess.run(["qemu-img", "check", *(["-r", "all"] if args else []), raw], capture_output=True,
                           text=True, timeout=60)
        p = qcowfs_check(raw, *args)
        assert p.returncode == q.returncode == 63, (p.stderr, q.stderr)
        assert p.stderr == f"qcowfs: {raw} is a raw image: it has no metadata to check\n"
    assert raw.read_bytes() == b"\1" * 4096
