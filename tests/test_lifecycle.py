"""snapshot apply, resize, commit and rebase against qemu-img on copies of the same images.

Every case runs the qemu-img command on one copy and the qcowfs command on another, then
asks QEMU: `qemu-img compare` (every image of the chain), `qemu-img check` (clean),
`qemu-img snapshot -l` / `info` (snapshots, sizes, bitmaps, backing file), and qemu-io must
still write to the result. Refusals are asked of qemu-img too, and a refused command must
leave the image byte for byte as it was. A bounded kill -9 loop per command checks that a
crash leaves a clean image (leaks allowed) with the old content or the new.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

import qcowfs as qcowfs_lib

import killing
import luks
from conftest import QCOWFS, mounted
from images import KiB, MiB, create, info, qimg, qio, sh


def qcowfs(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([QCOWFS, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def compare(a: Path, b: Path) -> None:
    p = sh("qemu-img", "compare", a, b, check=False)
    assert p.returncode == 0, f"{a} and {b} differ: {p.stdout}{p.stderr}"


def clean(img: Path, leaks_ok: bool = False, cwd: Path | None = None) -> None:
    # (CWD: QEMU opens a data file the header names relative to its working directory)
    p = sh("qemu-img", "check", img, check=False, cwd=cwd)
    assert p.returncode in ((0, 3) if leaks_ok else (0,)), f"qemu-img check {img}: {p.returncode}\n{p.stdout}{p.stderr}"


def snapshot_list(img: Path) -> list[tuple[str, str, int]]:
    return [(s["id"], s["name"], s["vm-state-size"]) for s in info(img).get("snapshots", [])]


def bitmaps_of(img: Path) -> list[dict]:
    return info(img).get("format-specific", {}).get("data", {}).get("bitmaps", [])


def twins(tmp: Path, *names: str) -> Path:
    """A copy of TMP's files NAMES in TMP/q (where qemu-img works)."""
    q = tmp / "q"
    q.mkdir(exist_ok=True)
    for n in names:
        shutil.copy2(tmp / n, q / n)
    return q


def still_writable(img: Path) -> None:
    size = info(img)["virtual-size"]
    qio(img, f"write -P 0x5a 0 {min(size, 64 * KiB)}", *(["write -P 0x5b 100k 8k"] if size >= 108 * KiB else []))
    clean(img)


# --------------------------------------------------------------------------
# images with several snapshots

def snapshots_image(d: Path, **opts: object) -> Path:
    """Three snapshots between writes (data, zeros, discard), a resize in between."""
    img = create(d / "a.qcow2", 8 * MiB, **opts)
    v2 = opts.get("compat") == "0.10"
    qio(img, "write -P 1 0 1M", "write -P 2 3M 300k", "write -P 3 7M 1M")
    qimg("snapshot", "-c", "one", img)
    qio(img, "write -P 4 512k 1M", "discard 3M 64k" if not v2 else "write -P 9 3M 64k",
        "write -z 7M 64k")
    qimg("snapshot", "-c", "two", img)
    if not v2:
        qimg("resize", img, "12M")
    qio(img, "write -P 5 0 3M", "write -P 6 8M 1M" if not v2 else "write -P 6 6M 1M")
    qimg("snapshot", "-c", "three", img)
    qio(img, "write -P 7 100k 2M")
    return img


LAYOUTS = {
    "v3-64k": {},
    "v3-512": {"cluster_size": 512},
    "v3-16k-extl2": {"cluster_size": 16384, "extended_l2": "on"},
    "v2-4k": {"compat": "0.10", "cluster_size": 4096},
    "refcount64": {"refcount_bits": 64},
    "zstd-2M": {"cluster_size": 2 * MiB, "compression_type": "zstd"},
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("snap", ["one", "two", "3"])
def test_apply_matches_qemu(tmp_path: Path, layout: str, snap: str) -> None:
    img = snapshots_image(tmp_path, **LAYOUTS[layout])
    q = twins(tmp_path, "a.qcow2") / "a.qcow2"
    qimg("snapshot", "-a", snap, q)
    p = qcowfs("snapshot", "apply", img, snap)
    assert p.returncode == 0, p.stderr
    compare(img, q)
    clean(img)
    assert info(img)["virtual-size"] == info(q)["virtual-size"]
    assert snapshot_list(img) == snapshot_list(q)
    for s in ("1", "2", "3"):  # every snapshot is still what it was
        a, b = tmp_path / f"ours{s}.raw", tmp_path / f"q{s}.raw"
        qimg("convert", "-O", "raw", "-l", f"snapshot.id={s}", img, a)
        qimg("convert", "-O", "raw", "-l", f"snapshot.id={s}", q, b)
        assert digest(a) == digest(b)
    still_writable(img)
    # and applying again on top of the result
    qimg("snapshot", "-a", "one", q)
    assert qcowfs("snapshot", "apply", img, "one").returncode == 0
    compare(img, q)
    clean(img)


def test_an_id_is_taken_first_where_qemu_img_takes_it_first(tmp_path: Path) -> None:
    """Snapshot "2" has id 1, snapshot "x" id 2. `snapshot -a 2` and `convert
    -l 2` take the id first in qemu-img (find_snapshot_by_id_or_name): both
    mean "x". qcowfs took the name first and reverted to the other snapshot;
    `-l snapshot.id=2` even read snapshot "2" (the prefix was dropped, then
    the name tried first). `snapshot.name=` and `snapshot.id=` name one kind.
    Found by a differential run of the snapshot commands against qemu-img."""
    img = create(tmp_path / "c.qcow2", 4 * MiB)
    qio(img, "write -P 1 0 64k")
    qimg("snapshot", "-c", "2", img)
    qio(img, "write -P 2 0 64k")
    qimg("snapshot", "-c", "x", img)
    qio(img, "write -P 3 0 64k")
    for spec in ("2", "x", "1", "snapshot.id=2", "snapshot.name=2", "snapshot.id=1"):
        sh("qemu-img", "convert", "-O", "raw", "-l", spec, img, tmp_path / "q.raw")
        p = qcowfs("convert", "-O", "raw", "-l", spec, img, tmp_path / "o.raw")
        assert p.returncode == 0, p.stderr
        assert digest(tmp_path / "o.raw") == digest(tmp_path / "q.raw"), spec
    q = twins(tmp_path, "c.qcow2")
    sh("qemu-img", "snapshot", "-a", "2", "c.qcow2", cwd=q)
    p = qcowfs("snapshot", "apply", img, "2")
    assert p.returncode == 0, p.stderr
    compare(img, q / "c.qcow2")
    qio(img, "read -P 2 0 64k")


def test_apply_compressed_and_library(tmp_path: Path) -> None:
    import qcowfs as lib

    src = create(tmp_path / "src.qcow2", 4 * MiB)
    qio(src, "write -P 1 0 2M", "write -P 2 3M 64k")
    img = tmp_path / "a.qcow2"
    qimg("convert", "-c", "-O", "qcow2", src, img)
    qimg("snapshot", "-c", "packed", img)
    qio(img, "write -P 3 0 3M")
    q = twins(tmp_path, "a.qcow2") / "a.qcow2"
    qimg("snapshot", "-a", "packed", q)
    with lib.open(img, "r+") as image:
        image.apply_snapshot("packed")
        assert image.disk.pread(0, 4) == b"\x01" * 4
        image.disk.pwrite(b"\x09" * 4096, 0)  # COW out of the shared cluster
        image.apply_snapshot("1")
    compare(img, q)
    clean(img)


def test_apply_refusals_leave_the_image_as_it_was(tmp_path: Path) -> None:
    img = snapshots_image(tmp_path)
    before = digest(img)
    p = qcowfs("snapshot", "apply", img, "nothing")
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "nothing" in p.stderr
    assert digest(img) == before
    qimg("bitmap", "--add", img, "b0")
    qimg("bitmap", "--disable", img, "b0")
    before = digest(img)
    q = twins(tmp_path, "a.qcow2") / "a.qcow2"
    assert sh("qemu-img", "snapshot", "-a", "one", q, check=False).returncode != 0  # QEMU refuses too
    p = qcowfs("snapshot", "apply", img, "one")
    assert p.returncode == 1 and "bitmap" in p.stderr and "Traceback" not in p.stderr
    assert digest(img) == before


class Held:
    """qemu-io holding IMAGE open for writing (QEMU's locks) until closed."""

    def __init__(self, image: Path) -> None:
        self.p = subprocess.Popen(["qemu-io", "-f", "qcow2", str(image)], stdin=subprocess.PIPE,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60  # (a loaded machine starts qemu-io slowly)
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                raise AssertionError(f"qemu-io exited: {self.p.stderr.read() if self.p.stderr else ''}")
            if self._locked(image):
                return
            time.sleep(0.05)
        raise AssertionError("qemu-io never locked the image")

    @staticmethod
    def _locked(image: Path) -> bool:
        """Some process holds OFD locks on IMAGE (/proc/locks: asking qemu-img would take a
        lock of its own, and could make qemu-io's open fail)."""
        ino = os.stat(image).st_ino
        with open("/proc/locks") as f:
            return any(line.split()[5].endswith(f":{ino}") for line in f if "OFDLCK" in line)

    def close(self) -> None:
        assert self.p.stdin is not None
        self.p.stdin.close()
        self.p.wait(timeout=30)


def test_every_command_refuses_a_held_image(tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2", 4 * MiB)
    img = create(tmp_path / "a.qcow2", 4 * MiB, backing="base.qcow2", backing_fmt="qcow2", cwd=tmp_path)
    qio(img, "write -P 1 0 64k")
    qimg("snapshot", "-c", "s", img)
    before = digest(img), digest(base)
    held = Held(img)
    try:
        for args in (("snapshot", "apply", img, "s"), ("resize", img, "8M"), ("commit", img),
                     ("rebase", "-b", "", img), ("rebase", "-u", "-b", "", img)):
            p = qcowfs(*args)
            assert p.returncode == 1 and p.stderr.count("\n") == 1, (args, p.stderr)
            assert "lock" in p.stderr.lower() or "use" in p.stderr.lower(), p.stderr
    finally:
        held.close()
    held = Held(base)  # the base of a commit: QEMU's writer holds it
    try:
        assert qcowfs("commit", img).returncode == 1
    finally:
        held.close()
    assert (digest(img), digest(base)) == before


def test_apply_on_a_mount_point(tmp_path: Path) -> None:
    img = create(tmp_path / "a.qcow2", 4 * MiB)
    qio(img, "write -P 1 0 4M")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mounted(img, mnt, read_only=False):
        disk = mnt / "disk.raw"
        assert qcowfs("snapshot", "create", mnt, "s").returncode == 0
        with open(disk, "r+b") as f:
            f.seek(4096)
            f.write(b"\x02" * 8192)
            f.flush()
            os.fsync(f.fileno())
            # read it so the kernel (and read-around) caches the new content
            f.seek(0)
            assert f.read(16384)[4096:4100] == b"\x02" * 4
            p = qcowfs("snapshot", "apply", mnt, "s")
            assert p.returncode == 1 and p.stderr.count("\n") == 1 and "open" in p.stderr
        os.truncate(disk, 6 * MiB)  # the disk grows; apply brings back the snapshot's size
        assert disk.stat().st_size == 6 * MiB
        p = qcowfs("snapshot", "apply", mnt, "s")
        assert p.returncode == 0, p.stderr
        assert disk.stat().st_size == 4 * MiB
        with open(disk, "rb") as f:
            assert f.read(16384) == b"\x01" * 16384
        with open(mnt / "snapshots" / "s.raw", "rb") as f:
            assert f.read(16384) == b"\x01" * 16384
    clean(img)
    ref = tmp_path / "ref.raw"
    ref.write_bytes(b"\x01" * 4 * MiB)
    sh("qemu-img", "compare", "-F", "raw", img, ref)


# --------------------------------------------------------------------------
# resize

RESIZES = {
    "grow": ["+3M"],
    "grow-far": ["1G"],
    "shrink-partial": ["--shrink", "5000k"],
    "shrink-odd": ["--shrink", "1536"],
    "shrink-grow": ["--shrink", "-7M", "+7M"],  # the dropped tail must read zeros again
}


def resize_image(d: Path, kind: str) -> Path:
    if kind == "snapshots":
        return snapshots_image(d)
    if kind == "small-extl2":
        img = create(d / "a.qcow2", 8 * MiB, cluster_size=16384, extended_l2="on")
    else:
        img = create(d / "a.qcow2", 8 * MiB, cluster_size=512 if kind in ("512", "bitmaps-512") else 65536)
    qio(img, "write -P 1 0 1M", "write -P 2 4M 1234k", "write -z 6M 64k", "write -P 3 7M 1M")
    if kind.startswith("bitmaps"):
        # (with 512-byte clusters the bitmap tables span clusters and change length)
        qimg("bitmap", "--add", "-g", "512" if kind == "bitmaps-512" else "65536", img, "b0")
        qimg("bitmap", "--add", "-g", "4096", img, "b1")
        qimg("bitmap", "--disable", img, "b1")
        qio(img, "write -P 4 100k 10k", "write -P 4 7M 64k")
    return img


def run_resize(img: Path, steps: list[str], ours: bool) -> None:
    shrink = "--shrink" in steps
    for size in [s for s in steps if s != "--shrink"]:
        if ours:
            p = qcowfs("resize", *(["--shrink"] if shrink else []), img, size)
            assert p.returncode == 0, p.stderr
        else:
            args = ["resize", *(["--shrink"] if shrink else []), str(img)]
            sh("qemu-img", *args, "--", size) if size.startswith("-") else sh("qemu-img", *args, size)


@pytest.mark.parametrize("kind", ["64k", "512", "small-extl2", "snapshots", "bitmaps", "bitmaps-512"])
@pytest.mark.parametrize("steps", sorted(RESIZES))
def test_resize_matches_qemu(tmp_path: Path, kind: str, steps: str) -> None:
    img = resize_image(tmp_path, kind)
    q = twins(tmp_path, "a.qcow2") / "a.qcow2"
    run_resize(q, RESIZES[steps], ours=False)
    run_resize(img, RESIZES[steps], ours=True)
    assert info(img)["virtual-size"] == info(q)["virtual-size"]
    compare(img, q)
    clean(img)
    assert snapshot_list(img) == snapshot_list(q)
    assert bitmaps_of(img) == bitmaps_of(q)
    for bm in bitmaps_of(img):  # the bits themselves, as qcowfs reads both
        a = qcowfs("map", "--bitmap", bm["name"], "--output=json", img)
        b = qcowfs("map", "--bitmap", bm["name"], "--output=json", q)
        assert a.returncode == 0 and a.stdout == b.stdout, (a.stderr, b.stderr)
    still_writable(img)


def test_resize_over_a_larger_backing_file(tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2", 16 * MiB)
    qio(base, "write -P 7 0 16M")
    img = create(tmp_path / "a.qcow2", 4 * MiB, backing="base.qcow2", backing_fmt="qcow2", cwd=tmp_path)
    qio(img, "write -P 1 0 64k")
    q = twins(tmp_path, "a.qcow2", "base.qcow2") / "a.qcow2"
    qimg("resize", q, "12M")
    assert qcowfs("resize", img, "12M").returncode == 0
    compare(img, q)
    clean(img)


RAW_RESIZES = [  # (options, size), applied in turn to a raw file of 1001 bytes with data at its start
    ([], "+0"), ([], "1010"), (["--shrink"], "1010"), ([], "+1M"), (["--preallocation=falloc"], "+1M"),
    (["--preallocation=full"], "+1M"), (["--shrink"], "-1M"), (["--preallocation=full", "--shrink"], "1000"),
    (["--preallocation=metadata"], "+1M"), (["-f", "qcow2"], "+1M"), (["--shrink"], "1000"), ([], "+64k"),
    ([], "9E"),
]


def test_resize_of_a_raw_file_matches_qemu(tmp_path: Path) -> None:
    """`resize` of a raw file (probed, or -f raw), as qemu-img resize: the
    exit code, the file's size (relative sizes count from the disk, the
    file's size in whole sectors; the file is cut or extended to exactly the
    new size), its allocated blocks (--preallocation falloc and full), its
    bytes; what qemu-img refuses (a shrink without --shrink, preallocation
    on a shrink, metadata preallocation, -f qcow2) is one line and changes
    nothing. Also through the library: qcowfs.resize()."""
    data = os.urandom(1001)
    ours, theirs = tmp_path / "ours.img", tmp_path / "theirs.img"
    for f in (ours, theirs):
        f.write_bytes(data)
    for opts, size in RAW_RESIZES:
        q = subprocess.run(["qemu-img", "resize", *opts, str(theirs), *(["--"] if size[0] == "-" else []), size],
                           capture_output=True, text=True, timeout=60)
        before = ours.read_bytes()
        p = qcowfs("resize", *opts, ours, size)
        assert p.returncode == q.returncode, (opts, size, p.stderr, q.stderr)
        if p.returncode:
            assert len(p.stderr.splitlines()) == 1 and p.stderr.startswith("qcowfs: "), p.stderr
            assert ours.read_bytes() == before
        else:
            assert p.stdout == "Image resized.\n"
        assert ours.stat().st_size == theirs.stat().st_size, (opts, size)
        assert ours.stat().st_blocks == theirs.stat().st_blocks, (opts, size)
        assert ours.read_bytes() == theirs.read_bytes(), (opts, size)
    qcowfs_lib.resize(ours, 3 << 20, preallocation="falloc")
    assert ours.stat().st_size == 3 << 20 and ours.stat().st_blocks * 512 >= (3 << 20) - (1 << 20)
    with pytest.raises(qcowfs_lib.ResizeError):
        qcowfs_lib.resize(ours, 4096)


def test_resize_tail_of_an_earlier_shrink_reads_zeros(tmp_path: Path) -> None:
    """A shrink to the middle of a cluster keeps that cluster; growing again must not show
    what lay past the old end (QEMU 7.2 shows it: a deliberate difference, see README)."""
    img = create(tmp_path / "a.qcow2", 8 * MiB)
    qio(img, "write -P 1 0 8M")
    assert qcowfs("resize", "--shrink", img, "5000k").returncode == 0
    assert qcowfs("resize", img, "8M").returncode == 0
    want = tmp_path / "want.raw"
    want.write_bytes(b"\x01" * 5000 * KiB + bytes(8 * MiB - 5000 * KiB))
    sh("qemu-img", "compare", "-F", "raw", img, want)
    clean(img)
    q = tmp_path / "q.qcow2"  # what QEMU does with the same image
    img2 = create(tmp_path / "b.qcow2", 8 * MiB)
    qio(img2, "write -P 1 0 8M")
    shutil.copy2(img2, q)
    sh("qemu-img", "resize", "--shrink", q, "5000k")
    sh("qemu-img", "resize", q, "8M")
    assert sh("qemu-img", "compare", "-F", "raw", q, want, check=False).returncode == 1


@pytest.mark.parametrize("extl2", [False, True])
@pytest.mark.parametrize("steps", ["+3M", "1G", "--shrink -1M +2M"])
def test_resize_of_a_data_file_raw_image_matches_qemu(tmp_path: Path, extl2: bool, steps: str) -> None:
    """A grow maps the new clusters 1:1 onto the raw data file, as QEMU preallocates their
    metadata (`qemu-img map` the same, extended L2 entries with no subcluster allocated);
    the data file alone reads as the disk. Past the old end QEMU shows what a longer data
    file held there: qcowfs drops it first (docs/mounting.md)."""
    imgs = {}
    for who in ("ours", "qemu"):
        d = tmp_path / who
        d.mkdir()
        imgs[who] = create(d / "a.qcow2", 3 * MiB + 512, cluster_size=16384 if extl2 else 4096,
                           extended_l2="on" if extl2 else "off", data_file=str(d / "a.data"), data_file_raw="on")
        qio(imgs[who], "write -P 1 0 1M", "write -z 1M 64k", "write -P 2 2M 1M")
    run_resize(imgs["qemu"], steps.split(), ours=False)
    run_resize(imgs["ours"], steps.split(), ours=True)
    img = imgs["ours"]
    assert info(img)["virtual-size"] == info(imgs["qemu"])["virtual-size"]
    compare(img, imgs["qemu"])
    clean(img)
    assert json.loads(sh("qemu-img", "map", "--output=json", img).stdout) == \
        json.loads(sh("qemu-img", "map", "--output=json", imgs["qemu"]).stdout)
    sh("qemu-img", "compare", "-f", "raw", "-F", "qcow2", tmp_path / "ours" / "a.data", img)
    still_writable(img)


def test_resize_of_a_data_file_raw_image_drops_what_lay_past_the_end(tmp_path: Path) -> None:
    img = create(tmp_path / "a.qcow2", 1 * MiB, cluster_size=4096, data_file=str(tmp_path / "a.data"),
                 data_file_raw="on")
    with open(tmp_path / "a.data", "r+b") as f:  # a longer data file: 0x77 past the disk's end
        f.seek(1 * MiB)
        f.write(b"\x77" * MiB)
    assert qcowfs("resize", img, "3M").returncode == 0
    want = tmp_path / "want.raw"
    want.write_bytes(bytes(3 * MiB))
    sh("qemu-img", "compare", "-F", "raw", img, want)
    sh("qemu-img", "compare", "-f", "raw", "-F", "raw", tmp_path / "a.data", want)
    clean(img)


def test_resize_of_an_encrypted_data_file_raw_image_reads_zeros(tmp_path: Path) -> None:
    """An encrypted image's data file holds ciphertext: mapped 1:1, the zeros of a grown
    data file would decrypt to noise (QEMU shows that noise). qcowfs leaves the grown area
    unallocated, and it reads zeros; what was written stays."""
    import qcowfs

    img = luks.create(tmp_path / "a.qcow2", 1 * MiB + 512, cluster_size=4096,
                      data_file=str(tmp_path / "a.data"), data_file_raw="on")
    luks.qemu_io(img, "write -P 5 0 1M", "write -P 6 1M 512")
    with qcowfs.open(img, "r+", passphrase=luks.passphrase()) as image:
        image.resize(3 * MiB)
    want = tmp_path / "want.raw"
    want.write_bytes(b"\x05" * MiB + b"\x06" * 512 + bytes(2 * MiB - 512))
    p = luks.compare(img, want)
    assert p.returncode == 0, p.stdout + p.stderr
    p = luks.check(img)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
@pytest.mark.parametrize("extl2", [False, True])
def test_resize_over_larger_backing_matches_qemu(tmp_path: Path, fmt: str, extl2: bool) -> None:
    if fmt == "raw":
        sh("qemu-img", "create", "-q", "-f", "raw", tmp_path / "base", "40M")
    else:
        create(tmp_path / "base", 40 * MiB)
    qio(tmp_path / "base", "write -P 7 0 40M", fmt=fmt)
    opts = {"cluster_size": 16384, "extended_l2": "on"} if extl2 else {}
    img = create(tmp_path / "a.qcow2", 3 * MiB + 1536, backing="base", backing_fmt=fmt, cwd=tmp_path, **opts)
    qio(img, "write -P 1 0 64k", "write -P 2 3M 1k")
    q = twins(tmp_path, "a.qcow2", "base") / "a.qcow2"
    for size in ("20M", "+30M"):
        sh("qemu-img", "resize", q, size)
        assert qcowfs("resize", img, size).returncode == 0
        compare(img, q)
        clean(img)
    still_writable(img)


def _refusal_cases(d: Path) -> list[tuple[Path, list[str]]]:
    v2 = create(d / "v2.qcow2", 4 * MiB, compat="0.10")
    qimg("snapshot", "-c", "s", v2)
    plain = create(d / "plain.qcow2", 4 * MiB)
    inuse = create(d / "inuse.qcow2", 4 * MiB)
    qimg("bitmap", "--add", inuse, "b0")
    p = subprocess.Popen(["qemu-io", "-c", "write 0 64k", "-c", "sleep 100000", str(inuse)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.5)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert "in-use" in json.dumps(bitmaps_of(inuse))
    create(d / "big.qcow2", 16 * MiB, compat="0.10")
    v2b = create(d / "v2b.qcow2", 4 * MiB, backing="big.qcow2", backing_fmt="qcow2", cwd=d, compat="0.10")
    return [(v2b, ["8M"]), (v2, ["8M"]), (v2, ["--shrink", "2M"]), (plain, ["2M"]), (plain, ["1000001"]),
            (plain, ["--shrink", "0"]), (plain, ["--shrink", "-4M"]), (plain, ["3P"]), (inuse, ["8M"]),
            (inuse, ["--shrink", "2M"])]


def test_resize_refused_where_qemu_refuses(tmp_path: Path) -> None:
    for img, args in _refusal_cases(tmp_path):
        q = tmp_path / ("q-" + img.name)
        shutil.copy2(img, q)
        *flags, size = args
        qemu = sh("qemu-img", "resize", *flags, q, "--", size, check=False)
        before = digest(img)
        p = qcowfs("resize", *flags, img, size)
        assert qemu.returncode != 0, (img.name, args)
        assert p.returncode == 1 and p.stderr.count("\n") == 1, (img.name, args, p.stderr)
        assert digest(img) == before, (img.name, args)


def test_resize_library(tmp_path: Path) -> None:
    import qcowfs as lib

    img = resize_image(tmp_path, "64k")
    q = twins(tmp_path, "a.qcow2") / "a.qcow2"
    sh("qemu-img", "resize", "--shrink", q, "5M")
    with lib.open(img, "r+") as image:
        with pytest.raises(lib.ResizeError):
            image.resize(5 * MiB)
        image.resize(5 * MiB, shrink=True)
        assert image.virtual_size == 5 * MiB
    compare(img, q)
    clean(img)


# --------------------------------------------------------------------------
# commit

def chain(d: Path, base_fmt: str, cluster: int = 65536) -> None:
    """base (raw or qcow2) <- mid.qcow2 <- top.qcow2, each with its own data and zeros."""
    if base_fmt == "raw":
        sh("qemu-img", "create", "-q", "-f", "raw", d / "base", "8M")
    else:
        create(d / "base", 8 * MiB, cluster_size=cluster)
    qio(d / "base", "write -P 1 0 6M", fmt=base_fmt)
    create(d / "mid.qcow2", 8 * MiB, backing="base", backing_fmt=base_fmt, cwd=d, cluster_size=cluster)
    qio(d / "mid.qcow2", "write -P 2 1M 2M", "write -z 4M 64k", "write -P 3 6M 1M")
    create(d / "top.qcow2", 10 * MiB, backing="mid.qcow2", backing_fmt="qcow2", cwd=d, cluster_size=cluster)
    qio(d / "top.qcow2", "write -P 4 2M 1536k", "write -z 0 64k", "write -P 5 9M 1M", "write -P 6 5M 3k")


COMMITS = {"default": [], "drop": ["-d"], "base": ["-b", "base"]}


@pytest.mark.parametrize("base_fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("mode", sorted(COMMITS))
def test_commit_matches_qemu(tmp_path: Path, base_fmt: str, mode: str) -> None:
    chain(tmp_path, base_fmt)
    q = twins(tmp_path, "base", "mid.qcow2", "top.qcow2")
    sh("qemu-img", "commit", *COMMITS[mode], "top.qcow2", cwd=q)
    p = qcowfs("commit", *COMMITS[mode], "top.qcow2", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    for name in ("top.qcow2", "mid.qcow2"):
        compare(tmp_path / name, q / name)
        clean(tmp_path / name)
    if base_fmt == "raw":
        assert digest(tmp_path / "base") == digest(q / "base")
    else:
        compare(tmp_path / "base", q / "base")
        clean(tmp_path / "base")
    assert info(tmp_path / "top.qcow2").get("backing-filename") == info(q / "top.qcow2").get("backing-filename")
    still_writable(tmp_path / "top.qcow2")


@pytest.mark.parametrize("base_fmt", ["raw", "qcow2"])
def test_commit_through_a_shorter_layer_writes_its_zeros(tmp_path: Path, base_fmt: str) -> None:
    """base (4M of data) <- mid (2M) <- top (4M): past mid's end the top reads
    zeros, not base's data (a read stops at the layer that ends). `commit -b
    base` writes those zeros into base, as qemu-img does (base kept its data
    there: found by a differential run of the commands against qemu-img)."""
    if base_fmt == "raw":
        sh("qemu-img", "create", "-q", "-f", "raw", tmp_path / "base", "4M")
    else:
        create(tmp_path / "base", 4 * MiB, cluster_size=512)
    qio(tmp_path / "base", "write -P 1 0 4M", fmt=base_fmt)
    create(tmp_path / "mid.qcow2", 2 * MiB, backing="base", backing_fmt=base_fmt, cwd=tmp_path, cluster_size=4096)
    qio(tmp_path / "mid.qcow2", "write -P 2 1M 64k")
    create(tmp_path / "top.qcow2", 4 * MiB, backing="mid.qcow2", backing_fmt="qcow2", cwd=tmp_path)
    qio(tmp_path / "top.qcow2", "write -P 3 3M 64k")
    q = twins(tmp_path, "base", "mid.qcow2", "top.qcow2")
    sh("qemu-img", "commit", "-b", "base", "top.qcow2", cwd=q)
    p = qcowfs("commit", "-b", "base", "top.qcow2", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    if base_fmt == "raw":
        assert digest(tmp_path / "base") == digest(q / "base")
    else:
        compare(tmp_path / "base", q / "base")
        clean(tmp_path / "base")
    qio(tmp_path / "base", "read -P 0 2M 1M", "read -P 3 3M 64k", "read -P 1 0 1M", fmt=base_fmt)


@pytest.mark.parametrize("name", ["base", "d/base"])
def test_commit_base_named_as_the_chain_names_it(tmp_path: Path, name: str) -> None:
    """`commit -b base d/top.qcow2` from another directory: qemu-img reads a
    relative BASE from the directory of the image whose header names it, as
    backing file names are read (qcowfs read it from the working directory
    only, and refused: "not in the backing chain"). From the working
    directory ("d/base") is taken too."""
    d = tmp_path / "d"
    d.mkdir()
    chain(d, "qcow2")
    q = twins(d, "base", "mid.qcow2", "top.qcow2")
    sh("qemu-img", "commit", "-b", "base", "top.qcow2", cwd=q)
    p = qcowfs("commit", "-b", name, "d/top.qcow2", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    compare(d / "base", q / "base")
    clean(d / "base")


def test_commit_small_clusters_and_library(tmp_path: Path) -> None:
    import qcowfs as lib

    chain(tmp_path, "qcow2", cluster=512)
    q = twins(tmp_path, "base", "mid.qcow2", "top.qcow2")
    sh("qemu-img", "commit", "top.qcow2", cwd=q)
    lib.commit(tmp_path / "top.qcow2")
    for name in ("top.qcow2", "mid.qcow2", "base"):
        compare(tmp_path / name, q / name)
        clean(tmp_path / name)


@pytest.mark.parametrize("cluster", [512, 65536])
def test_commit_of_an_overlay_with_an_external_data_file(tmp_path: Path, cluster: int) -> None:
    """Emptying the overlay drops its L2 tables, not its data clusters: they live in the
    data file, which no refcount counts (they were counted as clusters of the image file
    at their guest offsets: a refcount went below zero, or another cluster lost one;
    found by the model test)."""
    d = {}
    for who in ("ours", "qemu"):
        d[who] = tmp_path / who
        d[who].mkdir()
        create(d[who] / "base.qcow2", 3 * MiB, cluster_size=cluster)
        qio(d[who] / "base.qcow2", "write -P 1 0 1M")
        create(d[who] / "top.qcow2", 4 * MiB, backing="base.qcow2", backing_fmt="qcow2", cwd=d[who],
               cluster_size=cluster, data_file="top.data")
        qio(d[who] / "top.qcow2", "write -P 2 100k 300k", "write -z 2M 64k", "write -P 3 3M 512k", cwd=d[who])
    sh("qemu-img", "commit", "-q", "top.qcow2", cwd=d["qemu"])
    p = qcowfs("commit", "top.qcow2", cwd=d["ours"])
    assert p.returncode == 0, p.stderr
    for name in ("top.qcow2", "base.qcow2"):
        sh("qemu-img", "compare", name, d["qemu"] / name, cwd=d["ours"])
        clean(d["ours"] / name, cwd=d["ours"])


def test_commit_refusals(tmp_path: Path) -> None:
    lone = create(tmp_path / "lone.qcow2", 1 * MiB)
    before = digest(lone)
    p = qcowfs("commit", lone)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and digest(lone) == before
    chain(tmp_path, "qcow2")
    files = {n: digest(tmp_path / n) for n in ("base", "mid.qcow2", "top.qcow2")}
    p = qcowfs("commit", "-b", lone, tmp_path / "top.qcow2")
    assert p.returncode == 1 and "not in the backing chain" in p.stderr
    assert {n: digest(tmp_path / n) for n in files} == files
    # A chain that loops (qemu-img rebase -u makes one): the walk down to
    # BASE stops where it comes back (it went round, opening images, until
    # the process ran out of file descriptors).
    qimg("rebase", "-u", "-b", "top.qcow2", "-F", "qcow2", tmp_path / "mid.qcow2")
    files = {n: digest(tmp_path / n) for n in files}
    p = qcowfs("commit", "-b", lone, tmp_path / "top.qcow2")
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "not in the backing chain" in p.stderr, p.stderr
    assert {n: digest(tmp_path / n) for n in files} == files


# --------------------------------------------------------------------------
# rebase

def rebase_images(d: Path, cluster: int = 4096, extended_l2: bool = False) -> None:
    create(d / "old.qcow2", 8 * MiB, cluster_size=cluster)
    qio(d / "old.qcow2", "write -P 1 0 3M", "write -P 7 5M 1M")
    sh("qemu-img", "create", "-q", "-f", "raw", d / "new.raw", "6M")
    # (new differs from old by one KiB at 4 KiB: a rebase writes that block alone)
    qio(d / "new.raw", "write -P 1 0 1M", "write -P 9 2M 1M", "write -P 8 4M 64k", "write -P 4 4096 1k", fmt="raw")
    create(d / "new.qcow2", 8 * MiB, cluster_size=cluster)
    qio(d / "new.qcow2", "write -P 1 0 2M", "write -P 7 5M 512k", "write -P 4 4096 1k")
    create(d / "img.qcow2", 8 * MiB, backing="old.qcow2", backing_fmt="qcow2", cwd=d, cluster_size=cluster,
           **({"extended_l2": "on"} if extended_l2 else {}))
    qio(d / "img.qcow2", "write -P 3 1M 1M", "write -z 5M 64k")


REBASES = {
    "safe-raw": ["-b", "new.raw", "-F", "raw"],
    "safe-qcow2": ["-b", "new.qcow2", "-F", "qcow2"],
    "flatten": ["-b", ""],
    "unsafe": ["-u", "-b", "new.qcow2", "-F", "qcow2"],
}


@pytest.mark.parametrize("cluster,extended_l2", [(512, False), (65536, False), (65536, True)])
@pytest.mark.parametrize("mode", sorted(REBASES))
def test_rebase_matches_qemu(tmp_path: Path, mode: str, cluster: int, extended_l2: bool) -> None:
    rebase_images(tmp_path, cluster, extended_l2)
    q = twins(tmp_path, "old.qcow2", "new.raw", "new.qcow2", "img.qcow2")
    sh("qemu-img", "rebase", *REBASES[mode], "img.qcow2", cwd=q)
    p = qcowfs("rebase", *REBASES[mode], "img.qcow2", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    compare(tmp_path / "img.qcow2", q / "img.qcow2")
    clean(tmp_path / "img.qcow2")
    ours, theirs = info(tmp_path / "img.qcow2"), info(q / "img.qcow2")
    for key in ("backing-filename", "backing-filename-format", "virtual-size"):
        assert ours.get(key) == theirs.get(key), key
    # Data is written only where qemu-img writes it: the blocks that differ
    # (qemu-img 7.2 writes 512-byte sectors, qcowfs whole subclusters; where
    # the old chain shows zeros qcowfs writes zero clusters, qemu-img data).
    written, theirs_written = top_data(tmp_path / "img.qcow2", cluster), top_data(q / "img.qcow2", cluster)
    assert written <= theirs_written, sorted(written - theirs_written)
    still_writable(tmp_path / "img.qcow2")


@pytest.mark.parametrize("old", ["none", "shorter"])
@pytest.mark.parametrize("layout", ["c512", "c64k", "extl2", "v2"])
def test_rebase_where_the_old_chain_ends_keeps_the_content(tmp_path: Path, old: str, layout: str) -> None:
    """A safe rebase onto a base full of data, of an image with holes where
    its old chain shows zeros: an image with no backing file, or past the
    end of a shorter backing file. The holes must stay zeros: a zero write
    there left the clusters unallocated (they read zeros before the
    switch), and the new base's data showed through after it. Found by a
    differential run of the commands against qemu-img."""
    opts = {"c512": {"cluster_size": 512}, "c64k": {}, "extl2": {"extended_l2": "on"},
            "v2": {"compat": "0.10"}}[layout]
    create(tmp_path / "new.qcow2", 8 * MiB, **opts)
    qio(tmp_path / "new.qcow2", "write -P 5 0 8M")
    backing = {}
    if old == "shorter":
        create(tmp_path / "old.qcow2", 2 * MiB, **opts)
        qio(tmp_path / "old.qcow2", "write -P 5 0 1M", "write -P 6 1M 1M")
        backing = {"backing": "old.qcow2", "backing_fmt": "qcow2", "cwd": tmp_path}
    create(tmp_path / "img.qcow2", 8 * MiB, **backing, **opts)
    qio(tmp_path / "img.qcow2", "write -P 7 1536k 64k", "write -P 8 3M 4k", "write -P 9 7M 1M")
    sh("qemu-img", "convert", "-O", "raw", tmp_path / "img.qcow2", tmp_path / "before.raw")
    q = twins(tmp_path, *(["old.qcow2"] if old == "shorter" else []), "new.qcow2", "img.qcow2")
    p = qcowfs("rebase", "-b", "new.qcow2", "-F", "qcow2", "img.qcow2", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    sh("qemu-img", "compare", "-f", "qcow2", "-F", "raw", tmp_path / "img.qcow2", tmp_path / "before.raw")
    clean(tmp_path / "img.qcow2")
    assert info(tmp_path / "img.qcow2")["backing-filename"] == "new.qcow2"
    if layout != "v2":  # (QEMU 7.2 on v2 zeroes by discarding: the new base shows through)
        sh("qemu-img", "rebase", "-b", "new.qcow2", "-F", "qcow2", "img.qcow2", cwd=q)
        compare(tmp_path / "img.qcow2", q / "img.qcow2")
    still_writable(tmp_path / "img.qcow2")


def test_rebase_of_a_sparse_terabyte_overlay(tmp_path: Path) -> None:
    """A safe rebase compares the two backing chains only where either has
    data: a 4 TiB overlay over a base with a few MiB, onto another base,
    keeps its content (against a copy of it before) and takes what differs
    (reading both chains whole, 8 TiB of zeros, did not end in the test's
    five minutes). The new base is smaller than the overlay: past its end it
    reads zeros, as the old base does there only where it has no data."""
    size = 4 << 40
    create(tmp_path / "old.qcow2", size)
    qio(tmp_path / "old.qcow2", "write -P 1 0 1M", f"write -P 2 {size // 2} 2M", f"write -P 3 {size - MiB} 1M")
    create(tmp_path / "new.qcow2", size // 2)
    qio(tmp_path / "new.qcow2", "write -P 1 0 1M", f"write -P 4 {size // 4} 1M")
    create(tmp_path / "img.qcow2", size, backing="old.qcow2", backing_fmt="qcow2", cwd=tmp_path)
    qio(tmp_path / "img.qcow2", f"write -P 5 {size // 2 + MiB} 64k")
    shutil.copy2(tmp_path / "img.qcow2", tmp_path / "before.qcow2")
    p = qcowfs("rebase", "-b", "new.qcow2", "-F", "qcow2", "img.qcow2", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    compare(tmp_path / "before.qcow2", tmp_path / "img.qcow2")
    clean(tmp_path / "img.qcow2")
    assert info(tmp_path / "img.qcow2")["backing-filename"] == "new.qcow2"
    # what the overlay holds now: its own 64k, the old base's 2M (less that 64k)
    # and last 1M, and zeros over the new base's data at size/4; not the first
    # MiB, where both bases show the same
    assert top_data(tmp_path / "img.qcow2", MiB) == {(size // 2) // MiB, (size // 2) // MiB + 1,
                                                     (size - MiB) // MiB}


def top_data(img: Path, cluster: int) -> set[int]:
    """The clusters that hold data in IMG itself (`qemu-img map`, depth 0)."""
    out: set[int] = set()
    for e in json.loads(sh("qemu-img", "map", "--output=json", img).stdout):
        if e["depth"] == 0 and e["data"]:
            out |= set(range(e["start"] // cluster, -(-(e["start"] + e["length"]) // cluster)))
    return out


def test_rebase_library_and_refusals(tmp_path: Path) -> None:
    import qcowfs as lib

    rebase_images(tmp_path)
    before = digest(tmp_path / "img.qcow2")
    p = qcowfs("rebase", "-b", "missing.qcow2", "-F", "qcow2", tmp_path / "img.qcow2")
    assert p.returncode == 1 and p.stderr.count("\n") == 1
    p = qcowfs("rebase", "-b", "img.qcow2", "-F", "qcow2", "img.qcow2", cwd=tmp_path)
    assert p.returncode == 1 and p.stderr.count("\n") == 1
    assert digest(tmp_path / "img.qcow2") == before
    q = twins(tmp_path, "old.qcow2", "new.raw", "img.qcow2")
    sh("qemu-img", "rebase", "-b", "new.raw", "-F", "raw", "img.qcow2", cwd=q)
    lib.rebase(tmp_path / "img.qcow2", "new.raw", backing_format="raw")
    compare(tmp_path / "img.qcow2", q / "img.qcow2")
    clean(tmp_path / "img.qcow2")


def test_rebase_force_share_as_qemu(tmp_path: Path) -> None:
    """-U: the new backing file, which another program holds, is opened without locks."""
    rebase_images(tmp_path)
    q = twins(tmp_path, "old.qcow2", "new.qcow2", "img.qcow2")
    for d in (tmp_path, q):
        held = Held(d / "new.qcow2")
        try:
            args = ["-b", "new.qcow2", "-F", "qcow2", "img.qcow2"]
            if d == q:
                assert sh("qemu-img", "rebase", *args, cwd=d, check=False).returncode != 0
                sh("qemu-img", "rebase", "-U", *args, cwd=d)
            else:
                before = digest(d / "img.qcow2")
                p = qcowfs("rebase", *args, cwd=d)
                assert p.returncode == 1 and digest(d / "img.qcow2") == before, p.stderr
                p = qcowfs("rebase", "-U", *args, cwd=d)
                assert p.returncode == 0, p.stderr
        finally:
            held.close()
    compare(tmp_path / "img.qcow2", q / "img.qcow2")
    clean(tmp_path / "img.qcow2")


# --------------------------------------------------------------------------
# encrypted chains: the passphrase as every command takes it (--key-file, else a prompt)

def _luks_opts(image: Path, depth: int) -> str:
    """qemu's --image-opts of IMAGE with the secret for it and DEPTH backing files below."""
    opts = luks.image_opts(image)
    for k in range(1, depth + 1):
        opts += "," + "backing." * k + "encrypt.key-secret=sec0"
    return opts


def _luks_raw(image: Path, depth: int, out: Path) -> str:
    """The disk of IMAGE (with DEPTH encrypted backing files) as qemu-img reads it."""
    luks.must("qemu-img", "convert", *luks.secret_object(), "--image-opts", _luks_opts(image, depth),
              "-O", "raw", out)
    return digest(out)


def _luks_clean(image: Path, depth: int) -> None:
    p = luks.run("qemu-img", "check", *luks.secret_object(), "--image-opts", _luks_opts(image, depth))
    assert p.returncode == 0, p.stdout + p.stderr


def _luks_chain(d: Path) -> None:
    """base <- top (both LUKS, one passphrase), and new (LUKS) to rebase onto."""
    luks.create(d / "base.qcow2", 8 * MiB)
    luks.qemu_io(d / "base.qcow2", "write -P 1 0 3M", "write -P 7 5M 1M")
    luks.create(d / "top.qcow2", 8 * MiB, backing_file="base.qcow2", backing_fmt="qcow2")
    p = luks.run("qemu-io", *luks.secret_object(), "--image-opts", "-c", "write -P 3 1M 1M",
                 "-c", "write -z 5M 64k", _luks_opts(d / "top.qcow2", 1))
    assert p.returncode == 0 and "error" not in p.stdout.lower(), p.stdout + p.stderr
    luks.create(d / "new.qcow2", 8 * MiB)
    luks.qemu_io(d / "new.qcow2", "write -P 1 0 2M", "write -P 9 6M 1M")
    (d / "key").write_text(luks.SECRET)


def test_commit_encrypted_chain_matches_qemu(tmp_path: Path) -> None:
    _luks_chain(tmp_path)
    q = twins(tmp_path, "base.qcow2", "top.qcow2")
    luks.must("qemu-img", "commit", *luks.secret_object(), "--image-opts", _luks_opts(q / "top.qcow2", 1))
    files = {n: digest(tmp_path / n) for n in ("base.qcow2", "top.qcow2")}
    p = qcowfs("commit", "top.qcow2", cwd=tmp_path)   # no key file, no terminal: refused, nothing changed
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "--key-file" in p.stderr, p.stderr
    assert {n: digest(tmp_path / n) for n in files} == files
    p = qcowfs("commit", "--key-file", "key", "top.qcow2", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    for name, depth in (("base.qcow2", 0), ("top.qcow2", 1)):
        assert _luks_raw(tmp_path / name, depth, tmp_path / "a.out") == _luks_raw(q / name, depth, tmp_path / "b.out")
        _luks_clean(tmp_path / name, depth)


def test_rebase_encrypted_chain_keeps_the_content(tmp_path: Path) -> None:
    """Safe rebase of an encrypted image from one encrypted backing file onto
    another: qemu-img reads the same disk before and after, through the new chain.
    (qemu-img rebase itself cannot give a secret to the new backing file.)"""
    import qcowfs as lib

    _luks_chain(tmp_path)
    before = _luks_raw(tmp_path / "top.qcow2", 1, tmp_path / "before.out")
    p = qcowfs("rebase", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2", cwd=tmp_path)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "--key-file" in p.stderr, p.stderr
    p = qcowfs("rebase", "--key-file", "key", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert info(tmp_path / "top.qcow2")["backing-filename"] == "new.qcow2"
    assert _luks_raw(tmp_path / "top.qcow2", 1, tmp_path / "after.out") == before
    _luks_clean(tmp_path / "top.qcow2", 1)
    lib.rebase(tmp_path / "top.qcow2", "", passphrase=luks.SECRET)   # flatten, through the library
    assert "backing-filename" not in info(tmp_path / "top.qcow2")
    assert _luks_raw(tmp_path / "top.qcow2", 0, tmp_path / "after.out") == before
    _luks_clean(tmp_path / "top.qcow2", 0)


# --------------------------------------------------------------------------
# a chain whose layers have different keys (QEMU gives each layer its own secret)

SECRET_BASE = "the-base-passphrase"


def _two_key_opts(image: Path) -> list[str]:
    """qemu's arguments for IMAGE (luks.SECRET) over its backing file (SECRET_BASE)."""
    return [*luks.secret_object(), *luks.secret_object(SECRET_BASE, "sec1"), "--image-opts",
            luks.image_opts(image) + ",backing.encrypt.key-secret=sec1"]


def _two_key_chain(d: Path) -> str:
    """base (SECRET_BASE) <- top (luks.SECRET), key files "key" and "base.key";
    the digest of the disk of top as qemu-img reads it."""
    luks.create(d / "base.qcow2", 8 * MiB, secret=SECRET_BASE)
    luks.qemu_io(d / "base.qcow2", "write -P 1 0 3M", "write -P 7 5M 1M", secret=SECRET_BASE)
    luks.create(d / "top.qcow2", 8 * MiB, backing_file="base.qcow2", backing_fmt="qcow2")
    p = luks.run("qemu-io", "-c", "write -P 3 1M 1M", "-c", "write -z 5M 64k", *_two_key_opts(d / "top.qcow2"))
    assert p.returncode == 0 and "error" not in p.stdout.lower(), p.stdout + p.stderr
    (d / "key").write_text(luks.SECRET)
    (d / "base.key").write_text(SECRET_BASE)
    luks.must("qemu-img", "convert", *_two_key_opts(d / "top.qcow2"), "-O", "raw", d / "qemu.raw")
    return digest(d / "qemu.raw")


def test_a_chain_with_a_key_per_layer_opens_with_both_keys(tmp_path: Path) -> None:
    """Every key file is tried in order on each encrypted layer, in either
    order; with one key missing, one line names the layer it did not open."""
    import qcowfs as lib

    want = _two_key_chain(tmp_path)
    files = {n: digest(tmp_path / n) for n in ("base.qcow2", "top.qcow2")}
    p = qcowfs("convert", "--key-file", "key", "top.qcow2", "out.raw", cwd=tmp_path)
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert "backing file" in p.stderr and "base.qcow2: no key slot matches this passphrase" in p.stderr, p.stderr
    p = qcowfs("convert", "--key-file", "base.key", "top.qcow2", "out.raw", cwd=tmp_path)
    # (the top image named: it was not, where the backing file was)
    assert p.returncode == 1 and p.stderr == f"qcowfs: {tmp_path / 'top.qcow2'}: no key slot matches this passphrase\n", \
        p.stderr
    p = qcowfs("convert", "--key-file", "key", "--key-file", "key", "top.qcow2", "out.raw", cwd=tmp_path)
    assert p.returncode == 1 and "no key slot matches any of the 2 passphrases given" in p.stderr, p.stderr
    assert not (tmp_path / "out.raw").exists()
    for order in (("key", "base.key"), ("base.key", "key")):
        out = tmp_path / f"out-{order[0]}.raw"
        p = qcowfs("convert", "-O", "raw", "--key-file", order[0], "--key-file", order[1], "top.qcow2", out,
                   cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        assert digest(out) == want
    # the library: a list of passphrases, or of key files
    for keys in ({"passphrase": [luks.SECRET, SECRET_BASE]},
                 {"key_file": [tmp_path / "base.key", tmp_path / "key"]},
                 {"passphrase": lib.Keyring([luks.SECRET.encode()], key_files=[str(tmp_path / "base.key")])}):
        with lib.open(tmp_path / "top.qcow2", **keys) as image:   # type: ignore[arg-type]
            assert hashlib.sha256(image.disk.read(8 * MiB)).hexdigest() == want
    with pytest.raises(lib.PassphraseError, match="base.qcow2: no key slot matches this passphrase"):
        lib.open(tmp_path / "top.qcow2", passphrase=luks.SECRET)
    # a mount: -o key_file= again for the backing file
    with mounted(tmp_path / "top.qcow2", tmp_path / "mnt", "-o",
                 f"key_file={tmp_path / 'key'},key_file={tmp_path / 'base.key'}") as mnt:
        assert digest(mnt / "disk.raw") == want
    assert {n: digest(tmp_path / n) for n in files} == files


def test_commit_and_rebase_across_layers_with_different_keys(tmp_path: Path) -> None:
    """commit decrypts with the overlay's key and encrypts with the base's,
    as qemu-img commit with a secret per layer; a safe rebase onto nothing
    (flatten) reads the base with its own key and writes the top with its."""
    want = _two_key_chain(tmp_path)
    q = twins(tmp_path, "base.qcow2", "top.qcow2")
    luks.must("qemu-img", "commit", *_two_key_opts(q / "top.qcow2"))
    p = qcowfs("commit", "--key-file", "key", "--key-file", "base.key", "top.qcow2", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    ours, theirs = (luks.to_raw(d / "base.qcow2", d / "base.raw", secret=SECRET_BASE) for d in (tmp_path, q))
    assert digest(ours) == digest(theirs) == want
    assert luks.check(tmp_path / "base.qcow2", secret=SECRET_BASE).returncode == 0
    for d in (tmp_path, q):   # the emptied overlay reads the base through it, with both keys
        luks.must("qemu-img", "convert", *_two_key_opts(d / "top.qcow2"), "-O", "raw", d / "top.raw")
        assert digest(d / "top.raw") == want
    # rebase -b "" of a fresh two-key chain: the top holds everything, under its own key
    (tmp_path / "again").mkdir()
    want = _two_key_chain(tmp_path / "again")
    p = qcowfs("rebase", "--key-file", "base.key", "--key-file", "key", "-b", "", "top.qcow2",
               cwd=tmp_path / "again")
    assert p.returncode == 0, p.stderr
    top = tmp_path / "again" / "top.qcow2"
    assert "backing-filename" not in info(top)
    assert digest(luks.to_raw(top, tmp_path / "flat.raw")) == want
    assert luks.check(top).returncode == 0


# --------------------------------------------------------------------------
# -p: progress on a terminal, nothing when stderr is not one

def on_terminal(args: list[str], cwd: Path, *answers: bytes) -> tuple[int, str]:
    """Run qcowfs ARGS with a pseudo-terminal as its controlling terminal and
    stdin/stdout/stderr; ANSWERS are typed, one each time a passphrase is asked."""
    import fcntl
    import pty
    import termios

    master, slave = pty.openpty()

    def own_terminal() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    p = subprocess.Popen([QCOWFS, *args], cwd=cwd, stdin=slave, stdout=slave, stderr=slave,
                         preexec_fn=own_terminal)
    os.close(slave)
    out = b""
    typed = 0
    try:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:   # EIO: the terminal's other side is closed
                break
            if not chunk:
                break
            out += chunk
            if out.count(b"Passphrase for") > typed < len(answers):
                os.write(master, answers[typed] + b"\n")
                typed += 1
    finally:
        os.close(master)
    return p.wait(timeout=300), out.decode(errors="replace")


PROGRESS = {
    "convert": (["convert", "-p", "-O", "qcow2", "top.qcow2", "out.qcow2"], None),
    "commit": (["commit", "-p", "top.qcow2"], "Image committed."),
    "rebase": (["rebase", "-p", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2"], None),
}


@pytest.mark.parametrize("command", sorted(PROGRESS))
def test_progress_only_on_a_terminal(tmp_path: Path, command: str) -> None:
    args, said = PROGRESS[command]
    for d in (tmp_path / "tty", tmp_path / "pipe"):
        d.mkdir()
        _big_chain(d)
    code, out = on_terminal(args, tmp_path / "tty")
    assert code == 0, out
    assert "(100.00/100%)" in out and "\r" in out, out
    assert out.rstrip("\r\n").endswith(said or "%)"), out   # the last line is not overwritten
    p = qcowfs(*args, cwd=tmp_path / "pipe")
    assert p.returncode == 0 and "%" not in p.stderr + p.stdout and "\r" not in p.stderr, p.stderr
    assert p.stdout.strip() == (said or "")
    compare(tmp_path / "tty" / "top.qcow2", tmp_path / "pipe" / "top.qcow2")


def test_commit_asks_the_passphrase_on_a_terminal(tmp_path: Path) -> None:
    _luks_chain(tmp_path)
    q = twins(tmp_path, "base.qcow2", "top.qcow2")
    luks.must("qemu-img", "commit", *luks.secret_object(), "--image-opts", _luks_opts(q / "top.qcow2", 1))
    code, out = on_terminal(["commit", "top.qcow2"], tmp_path, luks.SECRET.encode())
    assert code == 0 and "Passphrase for" in out and luks.SECRET not in out, out
    assert out.count("Passphrase for") == 1, out   # asked once for the whole chain
    assert _luks_raw(tmp_path / "base.qcow2", 0, tmp_path / "a.out") == _luks_raw(q / "base.qcow2", 0,
                                                                                  tmp_path / "b.out")


def test_a_terminal_is_asked_for_each_layer_the_last_answer_does_not_open(tmp_path: Path) -> None:
    want = _two_key_chain(tmp_path)
    code, out = on_terminal(["convert", "top.qcow2", "out.raw"], tmp_path, luks.SECRET.encode(),
                            SECRET_BASE.encode())
    assert code == 0 and luks.SECRET not in out and SECRET_BASE not in out, out
    asked = [line.strip() for line in out.splitlines() if "Passphrase for" in line]
    assert [a.split()[-1] for a in asked] == [str(tmp_path / "top.qcow2") + ":",
                                              str(tmp_path / "base.qcow2") + ":"], out
    assert digest(tmp_path / "out.raw") == want


# --------------------------------------------------------------------------
# kill -9 at any moment: a clean image (leaks allowed) with the old content or the new

def _raw(img: Path, out: Path, cwd: Path | None = None) -> str:
    sh("qemu-img", "convert", "-U", "-O", "raw", img, out, cwd=cwd)
    return digest(out)


def _kill_loop(tmp: Path, make, command: list[str], image: str, rounds: int = 6) -> None:
    """Run COMMAND (in TMP) on fresh copies, killed at about ROUNDS of its writes spread
    over the whole run: every image stays clean and IMAGE reads the old disk or the new."""
    work = tmp / "w"
    make(tmp)
    names = [p.name for p in tmp.iterdir() if p.is_file()]
    old = _raw(tmp / image, tmp / "old.out", cwd=tmp)
    shutil.copytree(tmp, work, ignore=shutil.ignore_patterns("w", "*.out"))
    total = killing.writes(command, cwd=work)
    new = _raw(work / image, tmp / "new.out", cwd=work)
    assert old != new
    for n in killing.points(total, rounds):
        shutil.rmtree(work)
        work.mkdir()
        for name in names:
            shutil.copy2(tmp / name, work / name)
        killing.killed_at(command, n, cwd=work)
        for name in names:
            if name.endswith(".qcow2"):
                clean(work / name, leaks_ok=True, cwd=work)
        assert _raw(work / image, tmp / "now.out", cwd=work) in (old, new), f"write {n} of {total}: a mix"


def _big_snapshots(d: Path) -> None:
    img = create(d / "a.qcow2", 256 * MiB, cluster_size=4096)
    qio(img, "write -P 1 0 96M")
    qimg("snapshot", "-c", "s", img)
    qio(img, "write -P 2 0 90M")


def _big_chain(d: Path) -> None:
    create(d / "base.qcow2", 256 * MiB, cluster_size=4096)
    qio(d / "base.qcow2", "write -P 1 0 64M")
    create(d / "top.qcow2", 256 * MiB, backing="base.qcow2", backing_fmt="qcow2", cwd=d, cluster_size=4096)
    qio(d / "top.qcow2", "write -P 2 32M 96M")
    create(d / "new.qcow2", 256 * MiB, cluster_size=4096)


def test_kill_apply(tmp_path: Path) -> None:
    _kill_loop(tmp_path, _big_snapshots, ["snapshot", "apply", "a.qcow2", "s"], "a.qcow2")


def test_kill_resize(tmp_path: Path) -> None:
    _kill_loop(tmp_path, _big_snapshots, ["resize", "--shrink", "a.qcow2", "1M"], "a.qcow2")


def test_kill_resize_of_a_data_file_raw_image(tmp_path: Path) -> None:
    """The grow's commit, then the 1:1 map of the grown area onto the data file (512 new
    L2 tables): killed anywhere, the image is clean and reads the old disk or the new."""
    _kill_loop(tmp_path, _raw_data_file_image, ["resize", "a.qcow2", "1G"], "a.qcow2")


def _raw_data_file_image(d: Path) -> None:
    img = create(d / "a.qcow2", 16 * MiB + 512, cluster_size=4096, data_file="a.data", data_file_raw="on", cwd=d)
    qio(img, "write -P 1 0 8M", "write -P 2 16M 512", cwd=d)


def _kill_keeping_the_disk(tmp: Path, command: list[str], names: list[str], rounds: int = 5) -> None:
    """Run COMMAND on fresh copies of the big chain, killed at about ROUNDS of its writes
    spread over the whole run: top.qcow2 reads as it did throughout, every image is clean."""
    _big_chain(tmp)
    want = _raw(tmp / "top.qcow2", tmp / "want.out")
    work = tmp / "w"
    work.mkdir()
    for name in names:
        shutil.copy2(tmp / name, work / name)
    total = killing.writes(command, cwd=work)
    for n in killing.points(total, rounds):
        shutil.rmtree(work)
        work.mkdir()
        for name in names:
            shutil.copy2(tmp / name, work / name)
        killing.killed_at(command, n, cwd=work)
        for name in names:
            clean(work / name, leaks_ok=True)
        assert _raw(work / "top.qcow2", tmp / "now.out") == want, f"write {n} of {total}"


def test_kill_rebase(tmp_path: Path) -> None:
    """The content stays the same throughout (old and new backing differ)."""
    _kill_keeping_the_disk(tmp_path, ["rebase", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2"],
                           ["base.qcow2", "top.qcow2", "new.qcow2"])


def test_kill_commit(tmp_path: Path) -> None:
    """The top's content never changes; the base stays clean."""
    _kill_keeping_the_disk(tmp_path, ["commit", "top.qcow2"], ["base.qcow2", "top.qcow2"])


def test_overlap_map_forgets_the_part_past_the_end_with_its_structure() -> None:
    """A snapshot table QEMU wrote ends inside its last cluster, at the end of the file, and
    qcowfs counts it padded to 8 bytes: those bytes are a structure 'past the end'. Once the
    table is replaced they must go with it, or the freed cluster is refused to every later
    allocation ("a cluster with refcount 0 would overwrite the snapshot table": found by
    the model test with the apply/commit/rebase rules, checkpoints after a QEMU snapshot)."""
    from qcowfs.engine.overlap import Kind, OverlapError, OverlapMap

    m = OverlapMap(9)
    m.add(0xE5000, 0x8E, Kind.SNAPSHOT_TABLE)
    m.add_far(0xE508E, 2, Kind.SNAPSHOT_TABLE)
    m.add_far(0x900000, 512, Kind.INACTIVE_L2)  # another structure's far part stays
    with pytest.raises(OverlapError):
        m.check(0xE5000, 512, "data")
    m.remove(0xE5000, 0x90, Kind.SNAPSHOT_TABLE)
    m.check(0xE5000, 512, "data")
    assert m.kinds_at(0x900000, 512) == Kind.INACTIVE_L2


def test_qemu_img_command_lines_run_as_they_are(tmp_path: Path) -> None:
    """qemu-img's -f, -t, -T on commit, rebase, check and map (a script's
    qemu-img line runs unchanged): the same exit codes and images as
    qemu-img's; a bad cache mode is one line, nothing changed. commit -r RATE
    writes at most RATE bytes a second: 6 MiB at 3 MiB/s takes at least two
    seconds (a lower bound: a loaded machine only makes it longer)."""
    def chain(d: Path) -> Path:
        d.mkdir()
        create(d / "base.qcow2", 8 * MiB)
        qio(d / "base.qcow2", "write -P 1 0 8M")
        create(d / "top.qcow2", 8 * MiB, backing="base.qcow2", backing_fmt="qcow2")
        qio(d / "top.qcow2", "write -P 2 1M 6M")
        return d / "top.qcow2"

    ours, theirs = chain(tmp_path / "ours"), chain(tmp_path / "theirs")
    lines = [["check", "-f", "qcow2", "-T", "none"], ["map", "-f", "qcow2", "--output=json"],
             ["rebase", "-f", "qcow2", "-t", "writeback", "-T", "none", "-u", "-b", "base.qcow2", "-F", "qcow2"],
             ["commit", "-f", "qcow2", "-t", "none", "-r", "3M", "-d"]]
    for line in lines:
        q = subprocess.run(["qemu-img", *line, "top.qcow2"], capture_output=True, text=True, cwd=theirs.parent,
                           timeout=120)
        start = time.monotonic()
        p = qcowfs(*line, "top.qcow2", cwd=ours.parent)
        took = time.monotonic() - start
        assert (p.returncode, p.stderr) == (q.returncode, ""), (line, p.stderr, q.stderr)
        if line[0] == "map":
            assert p.stdout == q.stdout
        if line[0] == "commit":
            assert took >= 1.9, took
    for d in (ours.parent, theirs.parent):
        clean(d / "base.qcow2")
        clean(d / "top.qcow2")
    sh("qemu-img", "compare", ours.parent / "base.qcow2", theirs.parent / "base.qcow2")
    before = ours.read_bytes()
    for line in (["commit", "-t", "bogus"], ["rebase", "-T", "bogus", "-u", "-b", "x.qcow2"], ["check", "-T", "x"]):
        p = qcowfs(*line, ours)
        assert p.returncode == 1 and p.stderr.count("\n") == 1 and f"not '{line[2]}'" in p.stderr, p.stderr
    assert ours.read_bytes() == before
