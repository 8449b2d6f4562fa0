"""`qcowfs convert` -n, --target-is-zero, --salvage, --bitmaps and
--skip-broken-bitmaps, each against `qemu-img convert` (QEMU 7.2) with the
same options on copies of the same input: equal in `qemu-img compare`, clean
in `qemu-img check`, the same bitmaps in `qemu-img info` with the same dirty
extents (read through qemu-nbd), as sparse; refusals where qemu-img refuses,
before anything is written. The few places where qcowfs does more than
qemu-img (docs/python.md) are pinned too."""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path

import pytest

import killing
from corruption import OFFSET_MASK, SCENARIOS, l2_entry_offset, patch, u64
from inproc import nbd_dirty_map
from tests import images, luks
from tests.test_convert import assert_clean, compressed_clusters, data_bytes, qcowfs, run

KiB, MiB = 1 << 10, 1 << 20


def qemu_img(*args: object, ok: bool = True) -> str:
    p = run(["qemu-img", *args])
    assert (p.returncode == 0) == ok, p.stdout + p.stderr
    return p.stdout + p.stderr


def same_content(a: Path, b: Path, fa: str = "qcow2", fb: str = "qcow2") -> bool:
    return run(["qemu-img", "compare", "-f", fa, "-F", fb, a, b]).returncode == 0


def info(image: Path) -> dict:
    return json.loads(qemu_img("info", "--output=json", image))


def bitmaps_of(image: Path) -> list[dict]:
    return info(image).get("format-specific", {}).get("data", {}).get("bitmaps", [])


def one_line_error(p, *words: str) -> None:
    assert p.returncode == 1, (p.returncode, p.stderr)
    assert len(p.stderr.splitlines()) == 1 and p.stderr.startswith("qcowfs: "), p.stderr
    assert "Traceback" not in p.stderr
    for w in words:
        assert w in p.stderr, p.stderr


def source(d: Path, size: int = 8 * MiB) -> Path:
    """Data, written zeros, discarded data and holes."""
    src = images.create(d / "src.qcow2", size)
    images.qio(src, "write -P 0x11 0 1M", "write -P 0x22 3M 64k", "write -z 5M 64k", "write -P 0x33 6M 128k",
               "discard 6M 64k", f"write -P 0x44 {size - 4096} 4096")
    return src


def twins(d: Path, make) -> tuple[Path, Path]:
    """The same target twice: ours (for qcowfs) and theirs (for qemu-img)."""
    ours, theirs = make(d / "ours"), make(d / "theirs")
    return ours, theirs


def old_qcow2(path: Path, size: int = 8 * MiB, **opts) -> Path:
    img = images.create(path.with_suffix(".qcow2"), size, **opts)
    images.qio(img, f"write -P 0x99 0 {size}")
    return img


def old_raw(path: Path, size: int = 8 * MiB) -> Path:
    raw = path.with_suffix(".raw")
    raw.write_bytes(bytes(range(256)) * (size // 256))
    return raw


# ---- -n ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_n_writes_over_old_data(tmp_path: Path, fmt: str):
    """-n into a target full of old data: what the source holds is written, every
    range of it that reads zeros (holes, written zeros, discarded data) is zeroed, so
    the target reads as the source; as sparse as qemu-img's -n, clean."""
    src = source(tmp_path)
    ours, theirs = twins(tmp_path, old_qcow2 if fmt == "qcow2" else old_raw)
    p = qcowfs("convert", "-n", "-O", fmt, src, ours)
    assert p.returncode == 0 and not p.stderr, p.stderr
    qemu_img("convert", "-n", "-O", fmt, src, theirs)
    assert same_content(src, ours, "qcow2", fmt)
    assert same_content(ours, theirs, fmt, fmt)
    if fmt == "qcow2":
        assert_clean(ours)
        assert data_bytes(ours, "qcow2") == data_bytes(theirs, "qcow2")
        assert info(ours)["virtual-size"] == 8 * MiB
    else:
        assert ours.stat().st_size == theirs.stat().st_size == 8 * MiB
        assert ours.stat().st_blocks <= theirs.stat().st_blocks + 8


def test_n_keeps_what_lies_past_the_source_and_shows_no_backing_data(tmp_path: Path):
    """A larger target over a backing file full of data (without -B): the zeros of the
    source read zeros (not the backing file's data), the tail past the source's size
    keeps the target's old content; v2 and v3 targets; qemu-img -n does the same."""
    src = source(tmp_path)
    base = images.create(tmp_path / "base.qcow2", 12 * MiB)
    images.qio(base, f"write -P 0x55 0 {12 * MiB}")
    for compat in ("1.1", "0.10"):
        made = []
        for who in ("ours", "theirs"):
            t = images.create(tmp_path / f"{who}-{compat}.qcow2", 12 * MiB, backing="base.qcow2",
                              backing_fmt="qcow2", compat=compat)
            images.qio(t, "write -P 0x66 2M 1M", "write -P 0x77 10M 64k")
            made.append(t)
        ours, theirs = made
        p = qcowfs("convert", "-n", "-O", "qcow2", src, ours)
        assert p.returncode == 0, p.stderr
        qemu_img("convert", "-n", "-O", "qcow2", src, theirs)
        assert same_content(ours, theirs)
        assert_clean(ours)
        assert info(ours)["backing-filename"] == "base.qcow2"
        head = tmp_path / "head.raw"
        qemu_img("convert", "-O", "raw", ours, head)
        want = tmp_path / "want.raw"
        qemu_img("convert", "-O", "raw", src, want)
        got = head.read_bytes()
        assert got[: 8 * MiB] == want.read_bytes()
        assert got[10 * MiB : 10 * MiB + 64 * KiB] == b"\x77" * (64 * KiB)
        assert got[9 * MiB : 9 * MiB + 4096] == b"\x55" * 4096


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_n_with_target_is_zero(tmp_path: Path, fmt: str):
    """--target-is-zero: the target is taken to read zeros, so ranges of zeros are not
    written. Into an empty target: the source's copy; into one with stale data where
    the source reads zeros: that data stays, exactly as qemu-img leaves it."""
    src = source(tmp_path)

    def empty(p: Path) -> Path:
        if fmt == "qcow2":
            return images.create(p.with_suffix(".qcow2"), 8 * MiB)
        raw = p.with_suffix(".raw")
        with open(raw, "wb") as f:
            f.truncate(8 * MiB)
        return raw

    (tmp_path / "e").mkdir()
    ours, theirs = twins(tmp_path / "e", empty)
    p = qcowfs("convert", "-n", "--target-is-zero", "-O", fmt, src, ours)
    assert p.returncode == 0, p.stderr
    qemu_img("convert", "-n", "--target-is-zero", "-O", fmt, src, theirs)
    assert same_content(src, ours, "qcow2", fmt) and same_content(ours, theirs, fmt, fmt)
    if fmt == "qcow2":
        assert data_bytes(ours, "qcow2") == data_bytes(theirs, "qcow2")
    (tmp_path / "s").mkdir()
    stale = twins(tmp_path / "s", old_qcow2 if fmt == "qcow2" else old_raw)
    p = qcowfs("convert", "-n", "--target-is-zero", "-O", fmt, src, stale[0])
    assert p.returncode == 0, p.stderr
    qemu_img("convert", "-n", "--target-is-zero", "-O", fmt, src, stale[1])
    assert same_content(stale[0], stale[1], fmt, fmt)
    assert not same_content(src, stale[0], "qcow2", fmt)   # (the zeros were not written: the claim was false)


def test_n_with_backing_option(tmp_path: Path):
    """-n -B BASE: the target is taken to be an overlay of BASE already (its backing
    file is not changed); what differs from BASE is written. An overlay of BASE with
    old data where the source differs ends up reading as the source, as with qemu-img."""
    base = images.create(tmp_path / "base.qcow2", 8 * MiB)
    images.qio(base, "write -P 0x11 0 4M")
    src = images.create(tmp_path / "src.qcow2", 8 * MiB, backing="base.qcow2", backing_fmt="qcow2")
    images.qio(src, "write -P 0x33 1M 64k", "write -P 0x34 6M 64k")
    made = []
    for who in ("ours", "theirs"):
        t = images.create(tmp_path / f"{who}.qcow2", 8 * MiB, backing="base.qcow2", backing_fmt="qcow2")
        images.qio(t, "write -P 0x99 1M 64k", "write -P 0x98 6M 64k")
        made.append(t)
    ours, theirs = made
    p = qcowfs("convert", "-n", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", src, ours)
    assert p.returncode == 0, p.stderr
    qemu_img("convert", "-n", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", src, theirs)
    assert same_content(src, ours) and same_content(ours, theirs)
    assert_clean(ours)
    assert info(ours)["backing-filename"] == "base.qcow2"


def test_n_compressed_over_old_data(tmp_path: Path):
    """-n -c: compressed clusters. Into a new empty image both agree; over old data
    qemu-img 7.2 fails midway ("error while writing at byte 0": a compressed write
    cannot replace an allocated cluster there), qcowfs replaces it."""
    src = tmp_path / "src.raw"
    src.write_bytes(b"compressible text " * (4 * MiB // 18) + bytes(4 * MiB - 4 * MiB // 18 * 18))
    ours = images.create(tmp_path / "ours.qcow2", 4 * MiB)
    theirs = images.create(tmp_path / "theirs.qcow2", 4 * MiB)
    p = qcowfs("convert", "-n", "-c", "-f", "raw", "-O", "qcow2", src, ours)
    assert p.returncode == 0, p.stderr
    qemu_img("convert", "-n", "-c", "-f", "raw", "-O", "qcow2", src, theirs)
    assert same_content(ours, theirs) and compressed_clusters(ours) == compressed_clusters(theirs) > 0
    old = old_qcow2(tmp_path / "old", 4 * MiB)
    p = qcowfs("convert", "-n", "-c", "-f", "raw", "-O", "qcow2", src, old)
    assert p.returncode == 0, p.stderr
    assert same_content(src, old, "raw", "qcow2") and compressed_clusters(old) > 0
    assert_clean(old)
    qemu_old = old_qcow2(tmp_path / "qold", 4 * MiB)
    assert run(["qemu-img", "convert", "-n", "-c", "-f", "raw", "-O", "qcow2", src, qemu_old]).returncode == 1


def test_n_into_an_encrypted_target(tmp_path: Path):
    """-n into an existing LUKS-encrypted qcow2 full of old data, its passphrase from
    --target-key-file: it reads as the source (its zeros zeroed, not left as old
    ciphertext) and as qemu-img -n leaves its twin; clean and as large. A wrong
    passphrase is one line and leaves the target as it was."""
    src = source(tmp_path)
    made = []
    for who in ("ours", "theirs"):
        t = luks.create(tmp_path / f"{who}.qcow2", 8 * MiB)
        luks.qemu_io(t, f"write -P 0x99 0 {8 * MiB}")
        made.append(t)
    ours, theirs = made
    key = tmp_path / "key"
    key.write_text(luks.SECRET)
    p = qcowfs("convert", "-n", "-O", "qcow2", "--target-key-file", key, src, ours)
    assert p.returncode == 0 and not p.stderr, p.stderr
    qemu_img("convert", "-n", *luks.secret_object(), "--target-image-opts", src, luks.image_opts(theirs))
    got, want = luks.to_raw(ours, tmp_path / "ours.raw"), luks.to_raw(theirs, tmp_path / "theirs.raw")
    assert got.read_bytes() == want.read_bytes()
    assert same_content(src, got, "qcow2", "raw")
    assert luks.check(ours).returncode == 0
    assert ours.stat().st_size <= theirs.stat().st_size
    before = ours.read_bytes()
    key.write_text("not the passphrase")
    one_line_error(qcowfs("convert", "-n", "-O", "qcow2", "--target-key-file", key, src, ours),
                   "no key slot matches")
    assert ours.read_bytes() == before


# Refused by both, before qcowfs writes anything: (arguments, how the target is made
# (None: absent), words of qcowfs's line, words of qemu-img's).
def _small_qcow2(p: Path) -> Path:
    return images.create(p, 4 * MiB)


def _small_raw(p: Path) -> Path:
    p.write_bytes(b"\x5a" * (4 * MiB))
    return p


REFUSED = [
    ("smaller-qcow2", ["-n", "-O", "qcow2"], _small_qcow2, "too small", "smaller than input"),
    ("smaller-raw", ["-n", "-O", "raw"], _small_raw, "too small", "smaller than input"),
    ("missing", ["-n", "-O", "qcow2"], None, "No such file", "No such file"),
    ("not-qcow2", ["-n", "-O", "qcow2"], old_raw, "not a qcow2 image", "not in qcow2"),
    ("n-with-o", ["-n", "-O", "qcow2", "-o", "cluster_size=4k"], old_qcow2, "-o has no effect", "-o has no effect"),
    ("n-with-o-backing", ["-n", "-O", "qcow2", "-o", "backing_file=src.qcow2"], old_qcow2, "-o has no effect",
     "-o has no effect"),
    ("zero-without-n", ["--target-is-zero", "-O", "qcow2"], None, "needs -n", "requires use of -n"),
    ("skip-broken-without-bitmaps", ["--skip-broken-bitmaps", "-O", "qcow2"], None, "needs --bitmaps",
     "requires --bitmaps"),
    ("bitmaps-raw-target", ["--bitmaps", "-O", "raw"], None, "qcow2 target", "does not support bitmaps"),
    ("bitmaps-v2-target", ["--bitmaps", "-O", "qcow2", "-o", "compat=0.10"], None, "version 3",
     "does not support bitmaps"),
    ("bitmaps-n-v2-target", ["-n", "--bitmaps", "-O", "qcow2"], lambda p: old_qcow2(p, compat="0.10"),
     "version 2", "does not support bitmaps"),
    ("bitmaps-raw-source", ["--bitmaps", "-f", "raw", "-O", "qcow2"], None, "qcow2 source", "lacks bitmap support"),
]


@pytest.mark.parametrize("args,make,ours_says,qemu_says", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_refusals_touch_nothing(tmp_path: Path, args: list[str], make, ours_says: str, qemu_says: str):
    src = source(tmp_path)
    images.qio(src, "write -P 1 0 64k")
    run(["qemu-img", "bitmap", "--add", src, "b0"])   # (something for --bitmaps to copy)
    dst = tmp_path / "dst.img"
    if make is not None:
        made = make(dst)
        if made != dst:
            made.rename(dst)
    before = dst.read_bytes() if dst.exists() else None
    listing = sorted(x.name for x in tmp_path.iterdir())
    p = qcowfs("convert", *args, src, dst)
    one_line_error(p, ours_says)
    assert (dst.read_bytes() if dst.exists() else None) == before
    assert sorted(x.name for x in tmp_path.iterdir()) == listing
    q = run(["qemu-img", "convert", *args, src, tmp_path / "theirs.img"] if make is None else
            ["qemu-img", "convert", *args, src, dst])
    assert q.returncode == 1 and qemu_says in q.stderr, q.stderr


def test_bitmaps_of_a_version_2_source_are_refused(tmp_path: Path):
    """--bitmaps from a version 2 image (which cannot have any) and into one, without a
    bitmap to copy: refused as qemu-img refuses them, nothing made."""
    v2 = images.create(tmp_path / "v2.qcow2", MiB, compat="0.10")
    p = qcowfs("convert", "--bitmaps", "-O", "qcow2", v2, tmp_path / "out.qcow2")
    one_line_error(p, "version 2")
    q = run(["qemu-img", "convert", "--bitmaps", "-O", "qcow2", v2, tmp_path / "theirs.qcow2"])
    assert q.returncode == 1 and "lacks bitmap support" in q.stderr, q.stderr
    plain = images.create(tmp_path / "plain.qcow2", MiB)
    p = qcowfs("convert", "--bitmaps", "-O", "qcow2", "-o", "compat=0.10", plain, tmp_path / "out.qcow2")
    one_line_error(p, "version 3")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["plain.qcow2", "v2.qcow2"]


def test_n_target_held_by_another_program(tmp_path: Path):
    """-n into an image another program holds for writing (here qcowfs's own library,
    as a VM would): refused in one line, the target untouched, as qemu-img refuses it."""
    import qcowfs as library

    src = source(tmp_path)
    dst = old_qcow2(tmp_path / "dst")
    with library.open(dst, "r+"):
        before = dst.read_bytes()
        p = qcowfs("convert", "-n", "-O", "qcow2", src, dst)
        one_line_error(p, "in use")
        assert dst.read_bytes() == before
        q = run(["qemu-img", "convert", "-n", "-O", "qcow2", src, dst])
        assert q.returncode == 1 and "lock" in q.stderr, q.stderr


# ---- --salvage ---------------------------------------------------------------------------------

def _scenario(sid: str):
    return next(s for s in SCENARIOS if s.id == sid).build


def _compressed_short(d: Path) -> Path:
    """64 KiB clusters, compressed; cluster 1's compressed stream cut by a sector
    (QEMU's iotest 214 case with the default cluster size): it cannot be decompressed."""
    d.mkdir(parents=True, exist_ok=True)
    raw = d / "text.raw"
    words = [b"qcow2", b"cluster", b"salvage", b"sector", b"zero"]
    text = b" ".join(words[(i * 7 + i // 3) % 5] + str(i).encode() for i in range(200_000))
    raw.write_bytes(text[: 1 * MiB])
    img = d / "disk.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", raw, img)
    entry = l2_entry_offset(img, 64 * KiB)
    value = u64(img, entry)
    shift = 62 - (16 - 8)
    sectors = (value >> shift) & 0xFF
    assert sectors >= 1, hex(value)
    patch(img, entry, struct.pack(">Q", (value & ~(0xFF << shift)) | ((sectors - 1) << shift)))
    assert value & OFFSET_MASK   # (a compressed descriptor, not a plain cluster)
    return img


SALVAGE = {
    "unaligned-l2-entry": _scenario("060-unaligned-l2-entry"),   # one cluster's reads fail
    "unaligned-l1-entry": _scenario("060-unaligned-l1-entry"),   # the map fails, and every read
    "compressed-too-short": _compressed_short,                   # a compressed cluster does not decode
}


def failed_sectors(stderr: str, qemu: bool) -> set[int]:
    """The 512-byte sectors a salvaging convert said it could not read."""
    out: set[int] = set()
    if qemu:
        for m in re.finditer(r"warning: error while reading offset (\d+):", stderr):
            out.add(int(m.group(1)) // 512)
    else:
        for m in re.finditer(r"warning: error while reading offset (\d+) \((\d+) bytes\)", stderr):
            start, n = int(m.group(1)), int(m.group(2))
            out.update(range(start // 512, (start + n) // 512))
    return out


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
@pytest.mark.parametrize("case", list(SALVAGE))
def test_salvage(tmp_path: Path, case: str, fmt: str):
    """--salvage on a damaged image: without it both refuse; with it both succeed,
    the same sectors fail (written as zeros), and the copies are equal; qcowfs says
    each run of failed sectors in one warning line (qemu-img: one per sector)."""
    img = SALVAGE[case](tmp_path / "d")
    before = img.read_bytes()
    ours, theirs = tmp_path / f"ours.{fmt}", tmp_path / f"theirs.{fmt}"
    p = qcowfs("convert", "-O", fmt, img, ours)
    one_line_error(p)
    assert not ours.exists()
    q = run(["qemu-img", "convert", "-O", fmt, img, theirs])
    assert q.returncode == 1
    theirs.unlink(missing_ok=True)
    p = qcowfs("convert", "--salvage", "-O", fmt, img, ours)
    assert p.returncode == 0, p.stderr
    q = run(["qemu-img", "convert", "--salvage", "-O", fmt, img, theirs])
    assert q.returncode == 0, q.stderr[-2000:]
    assert same_content(ours, theirs, fmt, fmt)
    lost = failed_sectors(p.stderr, qemu=False)
    assert lost and lost == failed_sectors(q.stderr, qemu=True)
    lines = p.stderr.splitlines()
    assert all(line.startswith("qcowfs: warning: ") for line in lines) and len(lines) <= 3, lines
    if fmt == "qcow2":
        assert_clean(ours)
        assert data_bytes(ours, "qcow2") == data_bytes(theirs, "qcow2")
    assert img.read_bytes() == before


def test_salvage_through_the_library(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """qcowfs.convert(salvage=True): the same copy; the warnings go to the qcowfs logger."""
    import logging

    import qcowfs as library

    img = SALVAGE["unaligned-l2-entry"](tmp_path / "d")
    out = tmp_path / "out.qcow2"
    with pytest.raises(library.QcowError):
        library.convert(img, out)
    with caplog.at_level(logging.WARNING, logger="qcowfs"):
        library.convert(img, out, salvage=True)
    assert any("error while reading offset 0 (65536 bytes)" in r.getMessage() for r in caplog.records), \
        caplog.records
    theirs = tmp_path / "theirs.qcow2"
    run(["qemu-img", "convert", "--salvage", "-O", "qcow2", img, theirs])
    assert same_content(out, theirs)


# ---- --bitmaps ---------------------------------------------------------------------------------

def bitmap_source(d: Path, backing: bool = True) -> Path:
    """An overlay (over a base with data and a bitmap of its own) with three bitmaps:
    b0 enabled (default granularity), b1 disabled (128 KiB), b2 disabled and empty;
    writes before and after they were made, some dirtying two granules."""
    d.mkdir(parents=True, exist_ok=True)
    base = images.create(d / "base.qcow2", 16 * MiB)
    images.qio(base, "write -P 0x11 0 8M")
    qemu_img("bitmap", "--add", base, "base-only")
    src = (images.create(d / "src.qcow2", 16 * MiB, backing="base.qcow2", backing_fmt="qcow2") if backing
           else images.create(d / "src.qcow2", 16 * MiB))
    images.qio(src, "write -P 0x21 1M 64k")
    qemu_img("bitmap", "--add", src, "b0")
    qemu_img("bitmap", "--add", "-g", "128k", src, "b1")
    images.qio(src, "write -P 0x22 3M 100k", "write -P 0x23 9M 4k", "write -z 12M 64k")
    qemu_img("bitmap", "--disable", src, "b1")
    images.qio(src, "write -P 0x24 14M 8k")
    qemu_img("bitmap", "--add", "--disable", src, "b2")
    return src


def assert_same_bitmaps(ours: Path, theirs: Path, src: Path) -> None:
    """Names, granularities, flags (qemu-img info), and the dirty extents as QEMU reads
    them (qemu-nbd) and as qcowfs maps them, in both copies and in the source."""
    want = bitmaps_of(src)
    assert want and bitmaps_of(ours) == bitmaps_of(theirs) == want
    for b in want:
        theirs_map = nbd_dirty_map(theirs, b["name"])
        assert nbd_dirty_map(ours, b["name"]) == theirs_map == nbd_dirty_map(src, b["name"])
        p = qcowfs("map", "--bitmap", b["name"], "--output", "json", ours)
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout) == theirs_map


@pytest.mark.parametrize("extra", [[], ["-c"]], ids=["plain", "compressed"])
def test_bitmaps_of_an_overlay(tmp_path: Path, extra: list[str]):
    """--bitmaps from a source with a backing file (its own bitmaps only, not the base's),
    plainly and with -c: the same bitmaps as qemu-img's copy, the same dirty granules."""
    src = bitmap_source(tmp_path / "s")
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    p = qcowfs("convert", "--bitmaps", *extra, "-O", "qcow2", src, ours)
    assert p.returncode == 0 and not p.stderr, p.stderr
    qemu_img("convert", "--bitmaps", *extra, "-O", "qcow2", src, theirs)
    assert same_content(src, ours) and same_content(ours, theirs)
    assert_clean(ours)
    assert_same_bitmaps(ours, theirs, src)
    assert "base-only" not in [b["name"] for b in bitmaps_of(ours)]
    if extra:
        assert compressed_clusters(ours) > 0


def test_bitmaps_with_a_snapshot_as_the_source(tmp_path: Path):
    """--bitmaps -l SNAPSHOT: the disk is the snapshot's, the bitmaps are the image's
    (QEMU keeps bitmaps of the active layer only), as qemu-img copies them."""
    src = bitmap_source(tmp_path / "s", backing=False)
    qemu_img("snapshot", "-c", "s1", src)
    images.qio(src, "write -P 0x31 2M 256k", "write -P 0x32 15M 64k")
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    p = qcowfs("convert", "--bitmaps", "-l", "s1", "-O", "qcow2", src, ours)
    assert p.returncode == 0 and not p.stderr, p.stderr
    qemu_img("convert", "--bitmaps", "-l", "s1", "-O", "qcow2", src, theirs)
    assert same_content(ours, theirs) and not same_content(ours, src)
    assert_clean(ours)
    assert_same_bitmaps(ours, theirs, src)


def test_bitmaps_into_an_existing_image(tmp_path: Path):
    """-n --bitmaps: the source's bitmaps join the target's own (kept as they were);
    a name the target has already is refused before anything is written (qemu-img
    fails after the copy: "Bitmap already exists")."""
    src = bitmap_source(tmp_path / "s", backing=False)
    made = []
    for who in ("ours", "theirs"):
        t = old_qcow2(tmp_path / who, 16 * MiB)
        qemu_img("bitmap", "--add", "--disable", t, "t0")
        made.append(t)
    ours, theirs = made
    p = qcowfs("convert", "-n", "--bitmaps", "-O", "qcow2", src, ours)
    assert p.returncode == 0, p.stderr
    qemu_img("convert", "-n", "--bitmaps", "-O", "qcow2", src, theirs)
    assert same_content(src, ours) and same_content(ours, theirs)
    assert_clean(ours)
    names = sorted(b["name"] for b in bitmaps_of(ours))
    assert names == sorted(b["name"] for b in bitmaps_of(theirs)) == ["b0", "b1", "b2", "t0"]
    for b in ("b0", "b1", "b2"):
        assert nbd_dirty_map(ours, b) == nbd_dirty_map(theirs, b)
    clash = old_qcow2(tmp_path / "clash", 16 * MiB)
    qemu_img("bitmap", "--add", clash, "b1")
    before = clash.read_bytes()
    p = qcowfs("convert", "-n", "--bitmaps", "-O", "qcow2", src, clash)
    one_line_error(p, "b1")
    assert clash.read_bytes() == before
    q = run(["qemu-img", "convert", "-n", "--bitmaps", "-O", "qcow2", src, clash])
    assert q.returncode == 1 and "already exists" in q.stderr, q.stderr


def test_inconsistent_bitmaps(tmp_path: Path):
    """A bitmap left in use by a crash: --bitmaps refuses it (nothing made), as qemu-img;
    --skip-broken-bitmaps leaves it out with a warning naming it and copies the rest."""
    src = images.create(tmp_path / "src.qcow2", 10 * MiB)
    images.qio(src, "write -P 0xb1 0 1M")
    qemu_img("bitmap", "--add", src, "b4")
    assert run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xb2 2M 64k", "-c", "abort", src]).returncode != 0
    qemu_img("bitmap", "--add", src, "good")
    images.qio(src, "write -P 0xb3 4M 64k")
    flags = {b["name"]: b["flags"] for b in bitmaps_of(src)}
    assert "in-use" in flags["b4"] and "in-use" not in flags["good"], flags
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    p = qcowfs("convert", "--bitmaps", "-O", "qcow2", src, ours)
    one_line_error(p, "inconsistent bitmap 'b4'", "--skip-broken-bitmaps")
    assert not ours.exists() and not [f for f in tmp_path.iterdir() if f.name.startswith(".")]
    q = run(["qemu-img", "convert", "--bitmaps", "-O", "qcow2", src, theirs])
    assert q.returncode == 1 and "inconsistent bitmap 'b4'" in q.stderr and not theirs.exists()
    p = qcowfs("convert", "--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2", src, ours)
    assert p.returncode == 0, p.stderr
    assert p.stderr.splitlines() == [f"qcowfs: warning: skipping inconsistent bitmap 'b4' ({_problem(src, 'b4')})"]
    q = run(["qemu-img", "convert", "--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2", src, theirs])
    assert q.returncode == 0 and "Skipping inconsistent bitmap 'b4'" in q.stderr, q.stderr
    assert [b["name"] for b in bitmaps_of(ours)] == [b["name"] for b in bitmaps_of(theirs)] == ["good"]
    assert nbd_dirty_map(ours, "good") == nbd_dirty_map(theirs, "good")
    assert same_content(ours, theirs)
    assert_clean(ours)


def test_a_skipped_bitmap_is_named_when_none_is_copied(tmp_path: Path):
    """With no consistent bitmap left to copy, the new image is a plain one
    (written front to back): the skipped bitmap still gets its warning."""
    src = images.create(tmp_path / "src.qcow2", 10 * MiB)
    images.qio(src, "write -P 0xb1 0 1M")
    qemu_img("bitmap", "--add", src, "b4")
    assert run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xb2 2M 64k", "-c", "abort", src]).returncode != 0
    ours = tmp_path / "ours.qcow2"
    p = qcowfs("convert", "--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2", src, ours)
    assert p.returncode == 0, p.stderr
    assert p.stderr.splitlines() == [f"qcowfs: warning: skipping inconsistent bitmap 'b4' ({_problem(src, 'b4')})"]
    assert bitmaps_of(ours) == [] and same_content(src, ours)
    assert_clean(ours)


def _problem(img: Path, name: str) -> str:
    import qcowfs as library

    with library.open(img) as image:
        return next(b.problem for b in image.bitmaps if b.name == name)


def test_bitmaps_through_the_library(tmp_path: Path):
    """qcowfs.convert(bitmaps=True), and skip_create=True into a copy made before."""
    import qcowfs as library

    src = bitmap_source(tmp_path / "s", backing=False)
    out = tmp_path / "out.qcow2"
    library.convert(src, out, bitmaps=True)
    theirs = tmp_path / "theirs.qcow2"
    qemu_img("convert", "--bitmaps", "-O", "qcow2", src, theirs)
    assert_same_bitmaps(out, theirs, src)
    again = images.create(tmp_path / "again.qcow2", 16 * MiB)
    library.convert(src, again, skip_create=True, bitmaps=True)
    assert same_content(src, again) and bitmaps_of(again) == bitmaps_of(src)
    with pytest.raises(library.QcowError):
        library.convert(src, tmp_path / "x.qcow2", skip_create=True)
    with pytest.raises(library.QcowError):
        library.convert(src, tmp_path / "x.qcow2", target_is_zero=True)
    assert not (tmp_path / "x.qcow2").exists()
    shutil.rmtree(tmp_path / "s")


# ---- -r ---------------------------------------------------------------------------------------

def test_rate_limit(tmp_path: Path):
    """-r RATE: 8 MiB of data at 4 MiB a second takes at least two seconds (a
    lower bound: a loaded machine only makes it longer), and the copy is
    qemu-img -r's; a negative rate is refused by both, nothing made."""
    import time

    src = images.create(tmp_path / "src.qcow2", 16 * MiB)
    images.qio(src, f"write -P 0x3c 0 {8 * MiB}")
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    start = time.monotonic()
    p = qcowfs("convert", "-r", "4M", "-O", "raw", src, ours)
    took = time.monotonic() - start
    assert p.returncode == 0 and not p.stderr, p.stderr
    assert took >= 1.9, took
    qemu_img("convert", "-r", "4M", "-O", "raw", src, theirs)
    assert ours.read_bytes() == theirs.read_bytes()
    for args in (["-r", "-5"], ["-r", "fast"]):
        one_line_error(qcowfs("convert", *args, "-O", "raw", src, tmp_path / "never.raw"), "invalid")
        assert run(["qemu-img", "convert", *args, "-O", "raw", src, tmp_path / "never.raw"]).returncode == 1
        assert not (tmp_path / "never.raw").exists()


# ---- -C ---------------------------------------------------------------------------------------

def test_copy_offload(tmp_path: Path):
    """-C into a raw file: the kernel copies the data clusters of the image
    (copy_file_range, one call per chunk of them), the compressed cluster and
    what the backing file holds go the usual way; the bytes are qemu-img -C's.
    From a raw file too; into a qcow2 target -C changes nothing but speed."""
    base = images.create(tmp_path / "base.qcow2", 32 * MiB)
    images.qio(base, "write -P 0x0b 24M 1M")
    src = images.create(tmp_path / "src.qcow2", 32 * MiB, backing="base.qcow2", backing_fmt="qcow2")
    images.qio(src, "write -P 0x11 0 3M", "write -z 4M 1M", "write -c -P 0x22 8M 1M", "write -P 0x33 20M 64k")
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    calls = killing.syscalls(["convert", "-C", "-O", "raw", src, ours], "copy_file_range,pwrite64,pwritev")
    assert calls.get("copy_file_range", 0) >= 2 and calls.get("pwrite64", 0) + calls.get("pwritev", 0) >= 2, calls
    qemu_img("convert", "-C", "-O", "raw", src, theirs)
    assert ours.read_bytes() == theirs.read_bytes()
    raw = tmp_path / "noise.raw"
    raw.write_bytes(os.urandom(3 * MiB + 4096))
    copy = tmp_path / "copy.raw"
    assert killing.syscalls(["convert", "-C", "-f", "raw", "-O", "raw", raw, copy], "copy_file_range")["copy_file_range"]
    assert copy.read_bytes() == raw.read_bytes()
    q = tmp_path / "copy.qcow2"
    p = qcowfs("convert", "-C", "-O", "qcow2", src, q)
    assert p.returncode == 0 and not p.stderr, p.stderr
    assert same_content(src, q)
    assert_clean(q)


@pytest.mark.parametrize("extra,says", [(["-c", "-O", "qcow2"], "-c"), (["-S", "0"], "-S"), (["--salvage"], "--salvage")])
def test_copy_offload_refusals(tmp_path: Path, extra: list[str], says: str):
    src = source(tmp_path)
    one_line_error(qcowfs("convert", "-C", *extra, src, tmp_path / "never.img"), "copy offloading", says)
    assert run(["qemu-img", "convert", "-C", *extra, src, tmp_path / "never.img"]).returncode == 1
    assert not (tmp_path / "never.img").exists()


# ---- dd ---------------------------------------------------------------------------------------

DD_CASES = [["bs=64k", "count=4", "skip=2"], ["bs=64k", "skip=1"], ["count=3", "bs=1000"], [],
            ["bs=4k", "count=1"], ["bs=64k", "count=0"], ["bs=1M", "count=100"], ["skip=7", "bs=1k", "count=4k"]]


@pytest.mark.parametrize("out", ["raw", "qcow2"])
def test_dd_as_qemu_img(tmp_path: Path, out: str):
    """`qcowfs dd if= of= bs= count= skip= [-O fmt]` makes the image `qemu-img
    dd` makes of a qcow2 source with a backing file (the same size; the same
    bytes: qemu-img compare), counting count from the start of the disk as
    qemu-img 7.2 does; its refusals (no of=, bs=0, an operand it does not
    know) are one line and nothing is made; a skip past the end is refused
    (qemu-img 7.2 says so, then makes an empty image). The library: qcowfs.dd."""
    import qcowfs as lib

    base = images.create(tmp_path / "base.qcow2", 4 * MiB)
    images.qio(base, "write -P 3 0 4M")
    src = images.create(tmp_path / "src.qcow2", 4 * MiB, backing="base.qcow2", backing_fmt="qcow2")
    images.qio(src, "write -P 9 100k 300k", "write -z 2M 64k")
    for i, case in enumerate(DD_CASES):
        ours, theirs = tmp_path / f"o{i}.img", tmp_path / f"q{i}.img"
        p = qcowfs("dd", "-O", out, f"if={src}", f"of={ours}", *case)
        assert (p.returncode, p.stderr) == (0, ""), (case, p.stderr)
        qemu_img("dd", "-O", out, f"if={src}", f"of={theirs}", *case)
        assert info(ours)["virtual-size"] == info(theirs)["virtual-size"], case
        assert same_content(ours, theirs, out, out), case
        if out == "qcow2":
            assert_clean(ours)
    for case, words in ((["bs=64k"], ["of=OUTPUT"]), (["bs=0", "of=x.img"], ["bs"]),
                        (["conv=notrunc", "of=x.img"], ["unrecognized operand conv=notrunc"]),
                        (["bs=1M", "skip=5", "of=x.img"], ["cannot skip"])):
        one_line_error(qcowfs("dd", f"if={src}", *case, cwd=tmp_path), *words)
        assert not (tmp_path / "x.img").exists()
    lib.dd(src, tmp_path / "lib.img", block_size=512, count=1)
    assert (tmp_path / "lib.img").read_bytes() == bytes([3]) * 512


@pytest.mark.parametrize("mode", ["off", "falloc", "full"])
def test_raw_target_preallocation(tmp_path: Path, mode: str):
    """`convert -O raw -o preallocation=MODE` (qemu-img's one raw option): the
    same bytes as qemu-img's, and with falloc or full every block of the file
    allocated as in qemu-img's; another option, metadata, or -c are one line
    and nothing is made."""
    src = images.create(tmp_path / "src.qcow2", 8 * MiB)
    images.qio(src, "write -P 4 1M 64k", "write -P 5 7M 4k")
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    p = qcowfs("convert", "-O", "raw", "-o", f"preallocation={mode}", src, ours)
    assert (p.returncode, p.stderr) == (0, ""), p.stderr
    qemu_img("convert", "-O", "raw", "-o", f"preallocation={mode}", src, theirs)
    assert ours.read_bytes() == theirs.read_bytes()
    if mode != "off":
        assert ours.stat().st_blocks * 512 >= 8 * MiB and theirs.stat().st_blocks * 512 >= 8 * MiB
    for args, words in ((["-o", "foo=bar"], ["invalid parameter 'foo' for raw"]),
                        (["-o", "preallocation=metadata"], ["preallocation=metadata"]), (["-c"], ["-c"])):
        one_line_error(qcowfs("convert", "-O", "raw", *args, src, tmp_path / "never.raw"), *words)
        assert not (tmp_path / "never.raw").exists()
