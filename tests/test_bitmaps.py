"""Persistent dirty bitmaps: MOUNT/bitmaps/NAME against QEMU's own view of the bits.

QEMU's view: `qemu-nbd -B NAME` exports the bitmap as the NBD meta context qemu:dirty-bitmap:NAME,
and `qemu-img map` over that export with x-dirty-bitmap reports dirty areas as "data": false
(checked against known writes in every test that uses it).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import stat
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import QCOWFS, force_unmount, is_mounted, mounted
from images import (EXT_BITMAPS, GiB, KiB, MiB, TiB, Header, Sources, create, info, oracle, patch, qimg, qio,
                    set_field, sh)

FLAG_IN_USE, FLAG_AUTO = 1, 2


# --------------------------------------------------------------------------
# the bitmap directory, parsed independently of qcowfs

def bitmap_directory(img: Path) -> dict[str, dict]:
    h = Header(img)
    if not h.autoclear_features & 1:
        return {}
    _, _, data, _ = h.ext(EXT_BITMAPS)
    nb, _, dir_size, dir_off = struct.unpack_from(">IIQQ", h.raw, data)
    with open(img, "rb") as f:
        f.seek(dir_off)
        buf = f.read(dir_size)
    out = {}
    pos = 0
    for _ in range(nb):
        tab_off, tab_size, flags, typ, gbits, name_len, extra_len = struct.unpack_from(">QIIBBHI", buf, pos)
        name = buf[pos + 24 + extra_len: pos + 24 + extra_len + name_len].decode()
        out[name] = dict(table_offset=tab_off, table_size=tab_size, flags=flags, type=typ,
                         granularity=1 << gbits, entry_offset=dir_off + pos)
        pos = (pos + 24 + extra_len + name_len + 7) // 8 * 8
    return out


def set_flags(img: Path, name: str, flags: int) -> None:
    patch(img, bitmap_directory(img)[name]["entry_offset"] + 12, struct.pack(">I", flags))


def qemu_bitmaps(img: Path) -> dict[str, dict]:
    return {b["name"]: b for b in info(img)["format-specific"]["data"].get("bitmaps", [])}


# --------------------------------------------------------------------------
# bits

def nbytes(vsize: int, g: int) -> int:
    return ((vsize + g - 1) // g + 7) // 8


def set_bits(buf: bytearray, first: int, last: int) -> None:
    """Set bits [first, last) (bit k of byte n is bit 8n+k)."""
    while first < last and first % 8:
        buf[first // 8] |= 1 << (first % 8)
        first += 1
    while last > first and last % 8:
        last -= 1
        buf[last // 8] |= 1 << (last % 8)
    if first < last:
        buf[first // 8: last // 8] = b"\xff" * ((last - first) // 8)


def bits_for(ranges, vsize: int, g: int, base: bytes | None = None) -> bytes:
    buf = bytearray(base) if base is not None else bytearray(nbytes(vsize, g))
    for off, ln in ranges:
        if ln > 0:
            set_bits(buf, off // g, (off + ln + g - 1) // g)
    return bytes(buf)


def bit_list(data: bytes, limit: int = 12) -> str:
    out = []
    for n, b in enumerate(data):
        if b:
            out += [8 * n + k for k in range(8) if b >> k & 1]
        if len(out) > limit:
            break
    return str(out[:limit]) + ("..." if len(out) > limit else "")


def describe(got: bytes, want: bytes) -> str:
    if len(got) != len(want):
        return f"{len(got)} bytes, want {len(want)}"
    n = next(i for i in range(len(got)) if got[i] != want[i])
    extra = bytes(a & ~b & 0xFF for a, b in zip(got, want))
    missing = bytes(b & ~a & 0xFF for a, b in zip(got, want))
    return (f"first difference in byte {n}: got {got[n]:#04x} want {want[n]:#04x}; "
            f"bits set but not dirty {bit_list(extra)}, dirty bits missing {bit_list(missing)}")


def qemu_bits(img: Path, name: str) -> bytes:
    """QEMU's view of bitmap NAME, through qemu-nbd, as the bytes the bitmap file must hold."""
    meta = info(img)
    vsize = meta["virtual-size"]
    g = qemu_bitmaps(img)[name]["granularity"]
    # unix socket paths are limited to 108 bytes: a short private directory of our own
    with tempfile.TemporaryDirectory(prefix="qcowfs-nbd-", dir="/tmp") as d:
        sock = Path(d) / "s"
        p = subprocess.Popen(["qemu-nbd", "--read-only", "-f", "qcow2", "-B", name, "-k", str(sock),
                              "--persistent", str(img)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30  # generous: CI machines are busy
            while time.monotonic() < deadline:
                if sock.exists() or p.poll() is not None:
                    break
                time.sleep(0.025)
            if not sock.exists():
                p.kill()
                raise AssertionError(f"qemu-nbd -B {name} did not start: {p.communicate(timeout=10)[1]}")
            opts = f"driver=nbd,server.type=unix,server.path={sock},x-dirty-bitmap=qemu:dirty-bitmap:{name}"
            extents = json.loads(qimg("map", "--output=json", "--image-opts", opts))
        finally:
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
    pos = 0
    dirty = []
    for e in extents:
        assert e["start"] == pos, extents
        pos += e["length"]
        if not e["data"]:
            assert e["start"] % g == 0 and (e["length"] % g == 0 or pos == vsize), (g, e)
            dirty.append((e["start"], e["length"]))
    assert pos == vsize, extents
    return bits_for(dirty, vsize, g)


def read_file(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def unmount(mnt: Path) -> None:
    p = subprocess.run([QCOWFS, "umount", str(mnt)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"qcowfs umount {mnt}: {p.returncode} {p.stderr.strip()}"
    assert not is_mounted(mnt)


def assert_qemu_clean(img: Path) -> None:
    p = sh("qemu-img", "check", img, check=False)
    assert p.returncode == 0, f"qemu-img check rc {p.returncode}:\n{p.stdout}{p.stderr}"


# --------------------------------------------------------------------------
# images

SMALL = 4 * MiB + 1536          # a multiple of no granularity above 512: every bitmap has a tail


def build_small(d: Path) -> tuple[Path, list[tuple[int, int]]]:
    """Bitmaps of granularity 512, 4k, 64k, 1M, 2G; enabled, disabled with bits, disabled empty, and
    one whose bitmap table entry says 'all ones'. Returns the image and the ranges written."""
    d.mkdir(parents=True, exist_ok=True)
    img = create(d / "disk.qcow2", SMALL)
    src = Sources(d, seed=201)
    for name, g, disabled in (("g512", "512", False), ("g64k", "64K", False), ("g1m", "1M", False),
                              ("g2g", "2G", False), ("frozen", "64K", False), ("empty-off", "4K", True),
                              ("ones", "4K", True)):
        qimg("bitmap", "--add", "--granularity", g, *(["--disable"] if disabled else []), img, name)
    phase1 = [(12345, 300000), (3 * MiB, 1000), (SMALL - 1, 1), (2 * MiB - 1, 2)]
    qio(img, f"write -s {src.rnd()} 12345 300000", f"write -P 0x19 {3 * MiB} 1000",
        f"write -P 0x1a {SMALL - 1} 1", f"write -P 0x1b {2 * MiB - 1} 2")
    qimg("bitmap", "--disable", img, "frozen")
    phase2 = [(1 * MiB + 65536 * 3 + 7, 70000), (512 * 9, 512), (SMALL - 2000, 100)]
    qio(img, f"write -s {src.rnd()} {MiB + 65536 * 3 + 7} 70000", f"write -P 0x1c {512 * 9} 512",
        f"write -z {SMALL - 2000} 100")
    # 'ones': its only bitmap table entry (offset 0) gets the all-ones flag
    b = bitmap_directory(img)["ones"]
    assert b["table_size"] == 1
    patch(img, b["table_offset"], struct.pack(">Q", 1))
    flags = {n: q["flags"] for n, q in qemu_bitmaps(img).items()}
    assert flags == {"g512": ["auto"], "g64k": ["auto"], "g1m": ["auto"], "g2g": ["auto"], "frozen": [],
                     "empty-off": [], "ones": []}, flags
    return img, phase1 + phase2


def build_huge(d: Path) -> tuple[Path, list[tuple[int, int]]]:
    """A 4 TiB sparse disk with 64k, 1M (disabled) and 2G bitmaps."""
    d.mkdir(parents=True, exist_ok=True)
    vsize = 4 * TiB
    img = create(d / "disk.qcow2", vsize)
    for name, g in (("h64k", "64K"), ("h1m", "1M"), ("h2g", "2G")):
        qimg("bitmap", "--add", "--granularity", g, img, name)
    ranges = [(3, 100000), ((1 << 41) - 77, 200), ((1 << 32) - 5, 10), (vsize - 1000, 1000),
              (3 * TiB + 5 * GiB + 123, 65536)]
    qio(img, *(f"write -P 0x{i + 1:02x} {o} {n}" for i, (o, n) in enumerate(ranges[:3])))
    qimg("bitmap", "--disable", img, "h1m")
    qio(img, *(f"write -P 0x{i + 4:02x} {o} {n}" for i, (o, n) in enumerate(ranges[3:])))
    return img, ranges


def build_c512(d: Path) -> tuple[Path, list[tuple[int, int]]]:
    """512-byte clusters, 4-bit refcounts, an internal snapshot: bitmap tables of several clusters,
    bitmap data stored into newly allocated clusters at unmount."""
    d.mkdir(parents=True, exist_ok=True)
    img = create(d / "disk.qcow2", SMALL, cluster_size=512, refcount_bits=4)
    qimg("bitmap", "--add", "--granularity", "512", img, "c512")
    qimg("bitmap", "--add", "--granularity", "8K", img, "c8k")
    qimg("bitmap", "--add", "--granularity", "1K", img, "c1k-off")
    ranges = [(1000, 3000), (3 * MiB + 100, 50000)]
    qio(img, *(f"write -P 0x{i + 1:02x} {o} {n}" for i, (o, n) in enumerate(ranges)))
    qimg("bitmap", "--disable", img, "c1k-off")
    qimg("snapshot", "-c", "s", img)
    qio(img, f"write -P 0x33 {2 * MiB} 5000")
    assert bitmap_directory(img)["c512"]["table_size"] == 3
    return img, ranges + [(2 * MiB, 5000)]


def test_every_bitmap_has_a_file_it_can_be_opened_by(tmp_path: Path):
    """A bitmap whose name cannot be a file's name ('/'; longer than
    NAME_MAX with .json after it) is bitmap-INDEX, and so is one whose own
    name is another's bitmap-INDEX: the second "bitmap-0" hid the first, and
    a 260-byte name was listed but could not be opened."""
    img = create(tmp_path / "disk.qcow2", 8 * MiB)
    names = ["a/b", "bitmap-0", "y" * 251, "x" * 250]
    for i, name in enumerate(names):
        qimg("bitmap", "--add", img, name)
        qio(img, f"write -P 0x{i + 1:02x} {i * MiB} 64k")
    with mounted(img, tmp_path / "mnt") as mnt:
        assert sorted(os.listdir(mnt / "bitmaps")) == ["bitmap-0", "bitmap-1", "bitmap-2", "x" * 250]
        assert sorted(os.listdir(mnt / "maps" / "bitmaps")) == [
            "bitmap-0.json", "bitmap-1.json", "bitmap-2.json", "x" * 250 + ".json"]
        for file, name in zip(["bitmap-0", "bitmap-1", "bitmap-2", "x" * 250], names):
            assert read_file(mnt / "bitmaps" / file) == qemu_bits(img, name), name
            assert json.loads(read_file(mnt / "maps" / "bitmaps" / f"{file}.json"))


# --------------------------------------------------------------------------
# read-only: every bitmap file is QEMU's view

def check_bitmap_files(img: Path, mnt: Path) -> dict[str, bytes]:
    vsize = info(img)["virtual-size"]
    qb = qemu_bitmaps(img)
    errors: list[str] = []
    listed = sorted(os.listdir(mnt / "bitmaps"))
    if listed != sorted(qb):
        errors.append(f"listing {listed} != {sorted(qb)}")
    views = {}
    for name, q in qb.items():
        g = q["granularity"]
        want = views[name] = qemu_bits(img, name)
        f = mnt / "bitmaps" / name
        tag = f"bitmap {name} (granularity {g})"
        try:
            st = os.stat(f)
            got = read_file(f)
        except OSError as e:
            errors.append(f"{tag}: {e}")
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o222:
            errors.append(f"{tag}: mode {oct(st.st_mode)} (want a read-only regular file)")
        if st.st_size != nbytes(vsize, g):
            errors.append(f"{tag}: size {st.st_size} != {nbytes(vsize, g)}")
        if got != want:
            errors.append(f"{tag}: content: {describe(got, want)}")
        nbits = (vsize + g - 1) // g
        if got and nbits % 8 and got[-1] >> (nbits % 8):
            errors.append(f"{tag}: tail bits past the disk end set: last byte {got[-1]:#04x}")
        try:
            listed_x = set(os.listxattr(f))
            if not {"user.qcow2.granularity", "user.qcow2.flags", "user.qcow2.type"} <= listed_x:
                errors.append(f"{tag}: listxattr gives {sorted(listed_x)}")
            x = {k: os.getxattr(f, f"user.qcow2.{k}").decode() for k in ("granularity", "flags", "type")}
        except OSError as e:
            errors.append(f"{tag}: getxattr: {e}")
            continue
        if x["granularity"] != str(g):
            errors.append(f"{tag}: user.qcow2.granularity {x['granularity']!r}")
        got_flags = sorted(filter(None, x["flags"].split(",")))
        if got_flags != sorted(q["flags"]):
            errors.append(f"{tag}: user.qcow2.flags {x['flags']!r}, qemu-img info says {q['flags']}")
        if x["type"] != "dirty-tracking":
            errors.append(f"{tag}: user.qcow2.type {x['type']!r}")
    assert not errors, f"{img}:\n  " + "\n  ".join(errors)
    return views


def test_small_bitmaps_match_qemu(tmp_path: Path, mount) -> None:
    img, ranges = build_small(tmp_path / "img")
    # the oracle itself: dirty means "data": false
    assert qemu_bits(img, "g64k") == bits_for(ranges, SMALL, 64 * KiB)
    assert qemu_bits(img, "g512") == bits_for(ranges, SMALL, 512)
    ones = qemu_bits(img, "ones")
    assert ones == bits_for([(0, SMALL)], SMALL, 4096) and ones[-1] == 0x01, ones[-4:]
    assert set(qemu_bits(img, "empty-off")) == {0}
    assert qemu_bits(img, "frozen") == bits_for(ranges[:4], SMALL, 64 * KiB)
    before = hashlib.sha256(img.read_bytes()).hexdigest()
    mnt = mount(img)
    check_bitmap_files(img, mnt)
    # reads at odd offsets and lengths agree with the whole file
    f = mnt / "bitmaps" / "g512"
    whole = read_file(f)
    fd = os.open(f, os.O_RDONLY)
    try:
        for off, ln in ((0, 1), (1, 7), (100, 300), (len(whole) - 1, 10), (len(whole), 5), (len(whole) + 100, 5)):
            assert os.pread(fd, ln, off) == whole[off:off + ln], (off, ln)
    finally:
        os.close(fd)
    # not writable
    for flags in (os.O_WRONLY, os.O_RDWR):
        with pytest.raises(OSError) as e:
            os.close(os.open(f, flags))
        assert e.value.errno in (errno.EROFS, errno.EACCES)
    unmount(mnt)
    assert hashlib.sha256(img.read_bytes()).hexdigest() == before, "read-only mount changed the image"


def test_huge_disk_bitmaps_match_qemu(tmp_path: Path, mount) -> None:
    img, ranges = build_huge(tmp_path / "img")
    vsize = 4 * TiB
    assert qemu_bits(img, "h2g") == bits_for(ranges, vsize, 2 * GiB)
    mnt = mount(img)
    views = check_bitmap_files(img, mnt)
    assert len(views["h64k"]) == 8 * MiB and len(views["h2g"]) == 256


def test_no_bitmaps_empty_dir(tmp_path: Path, mount) -> None:
    img = create(tmp_path / "disk.qcow2", MiB)
    qio(img, "write -P 1 0 4k")
    mnt = mount(img)
    assert os.listdir(mnt / "bitmaps") == []


# --------------------------------------------------------------------------
# read-write: auto bitmaps track writes through disk.raw

@pytest.mark.parametrize("kind", ["small", "huge", "c512"])
def test_writes_tracked(kind: str, tmp_path: Path) -> None:
    img, _ = {"small": build_small, "huge": build_huge, "c512": build_c512}[kind](tmp_path / "img")
    vsize = info(img)["virtual-size"]
    qb = qemu_bitmaps(img)
    old = {n: qemu_bits(img, n) for n in qb}
    gran = {n: q["granularity"] for n, q in qb.items()}
    auto = {n for n, q in qb.items() if "auto" in q["flags"]}
    assert auto and set(qb) - auto
    rng = random.Random(kind)
    if kind != "huge":
        writes = [(0, 1), (65535, 2), (700000, 1), (MiB + 511, 513), (2 * MiB, 3 * 65536 + 1),
                  (vsize - 1, 1), (vsize - 3000, 700), (3 * MiB, 5)]
    else:
        writes = [(0, 1), ((1 << 41) + 65536 * 5 - 1, 2), (vsize - 1, 1), (vsize - 2 * GiB - 1, 2),
                  (123 * GiB + 4567, 100000), (2 * TiB + 7 * MiB, 1)]
    mnt = tmp_path / "mnt"
    errors: list[str] = []
    done: list[tuple[int, int]] = []
    data: dict[int, bytes] = {}
    with mounted(img, mnt, read_only=False):
        for n in qb:
            if read_file(mnt / "bitmaps" / n) != old[n]:
                errors.append(f"{n}: differs from QEMU's view right after a read-write mount")
        fd = os.open(mnt / "disk.raw", os.O_WRONLY)
        try:
            for i, (off, ln) in enumerate(writes):
                data[off] = rng.randbytes(ln)
                assert os.pwrite(fd, data[off], off) == ln
                done.append((off, ln))
                # no fsync: the bits show at once
                for n in qb:
                    want = bits_for(done, vsize, gran[n], old[n]) if n in auto else old[n]
                    got = read_file(mnt / "bitmaps" / n)
                    if got != want:
                        errors.append(f"after write {i} ({off:#x}, +{ln}): {n} "
                                      f"({'auto' if n in auto else 'disabled'}): {describe(got, want)}")
                if i == 0:
                    # while tracked in memory, an auto bitmap is marked in_use in the file
                    now = {b["name"]: b["flags"] for b in
                           info(img, "-U")["format-specific"]["data"].get("bitmaps", [])}
                    for n in auto:
                        if "in-use" not in now.get(n, []):
                            errors.append(f"while mounted, qemu-img info -U shows {n} flags {now.get(n)}")
        finally:
            os.close(fd)
        unmount(mnt)
    assert not errors, "\n  ".join(errors[:20])
    qb2 = qemu_bitmaps(img)
    assert {n: sorted(q["flags"]) for n, q in qb2.items()} == {n: sorted(q["flags"]) for n, q in qb.items()}, \
        f"flags after a clean unmount: {qb2}"
    assert {n: q["granularity"] for n, q in qb2.items()} == gran
    assert_qemu_clean(img)
    for n in qb:
        want = bits_for(writes, vsize, gran[n], old[n]) if n in auto else old[n]
        got = qemu_bits(img, n)
        if got != want:
            errors.append(f"after unmount, QEMU's view of {n}: {describe(got, want)}")
    assert not errors, "\n  ".join(errors)
    if kind != "huge":
        disk = oracle(img, tmp_path / "after.raw").read_bytes()
        for off, ln in writes:
            assert disk[off:off + ln] == data[off], f"write at {off:#x} not in the image"
    # a second mount shows what was stored
    with mounted(img, tmp_path / "mnt2") as m2:
        for n in qb:
            want = bits_for(writes, vsize, gran[n], old[n]) if n in auto else old[n]
            assert read_file(m2 / "bitmaps" / n) == want, f"{n} after remount"


def test_tracking_matches_qemu_tracking(tmp_path: Path) -> None:
    """The same writes made once by qemu-io and once through disk.raw give the same bitmaps."""
    a = create(tmp_path / "a.qcow2", SMALL)
    for name, g in (("b512", "512"), ("b64k", "64K"), ("b1m", "1M")):
        qimg("bitmap", "--add", "--granularity", g, a, name)
    b = tmp_path / "b.qcow2"
    sh("cp", a, b)
    rng = random.Random(5)
    writes = [(rng.randrange(SMALL - 70000), rng.randint(1, 70000)) for _ in range(25)] + [(SMALL - 1, 1)]
    qio(a, *(f"write -P 0x{i + 1:02x} {o} {n}" for i, (o, n) in enumerate(writes)))
    with mounted(b, tmp_path / "mnt", read_only=False) as m:
        fd = os.open(m / "disk.raw", os.O_WRONLY)
        try:
            for i, (o, n) in enumerate(writes):
                os.pwrite(fd, bytes([i + 1]) * n, o)
        finally:
            os.close(fd)
    assert_qemu_clean(b)
    for name in ("b512", "b64k", "b1m"):
        assert qemu_bits(b, name) == qemu_bits(a, name), name
    assert oracle(a, tmp_path / "a.raw").read_bytes() == oracle(b, tmp_path / "b.raw").read_bytes()


def test_mmap_writes_tracked(tmp_path: Path) -> None:
    import mmap
    img = create(tmp_path / "disk.qcow2", SMALL)
    qimg("bitmap", "--add", "--granularity", "4K", img, "b")
    with mounted(img, tmp_path / "mnt", "-o", "page_cache", read_only=False) as m:
        fd = os.open(m / "disk.raw", os.O_RDWR)
        try:
            mm = mmap.mmap(fd, SMALL)
            try:
                mm[MiB + 5: MiB + 9000] = b"\x5a" * 8995
                mm.flush()
            finally:
                mm.close()
        finally:
            os.close(fd)
        assert read_file(m / "bitmaps" / "b") == bits_for([(MiB + 5, 8995)], SMALL, 4096)
        unmount(m)
    assert qemu_bits(img, "b") == bits_for([(MiB + 5, 8995)], SMALL, 4096)
    assert qemu_bitmaps(img)["b"]["flags"] == ["auto"]


def test_write_straddling_disk_end_sets_no_tail_bits(tmp_path: Path) -> None:
    img = create(tmp_path / "disk.qcow2", SMALL)
    qimg("bitmap", "--add", "--granularity", "512", img, "b512")
    qimg("bitmap", "--add", "--granularity", "4K", img, "b4k")
    with mounted(img, tmp_path / "mnt", read_only=False) as m:
        fd = os.open(m / "disk.raw", os.O_WRONLY)
        try:
            assert os.pwrite(fd, b"x" * 100, SMALL - 10) == 10
            for off in (SMALL, SMALL + 5000):
                with pytest.raises(OSError):
                    os.pwrite(fd, b"x" * 10, off)
        finally:
            os.close(fd)
        assert os.stat(m / "disk.raw").st_size == SMALL
        for n, g in (("b512", 512), ("b4k", 4096)):
            assert read_file(m / "bitmaps" / n) == bits_for([(SMALL - 10, 10)], SMALL, g), n
        unmount(m)
    for n, g in (("b512", 512), ("b4k", 4096)):
        assert qemu_bits(img, n) == bits_for([(SMALL - 10, 10)], SMALL, g), n


@pytest.mark.parametrize("how", ["qcowfs-umount", "umount", "fusermount3", "SIGTERM"])
def test_clean_unmount_stores_bitmaps(how: str, tmp_path: Path) -> None:
    """Every clean way of unmounting stores the tracked bits and clears in_use."""
    img = create(tmp_path / "disk.qcow2", SMALL)
    qimg("bitmap", "--add", "--granularity", "64K", img, "b")
    mnt = tmp_path / "mnt"
    writes = [(3, 5), (2 * MiB + 70000, 200000)]
    with mounted(img, mnt, read_only=False):
        fd = os.open(mnt / "disk.raw", os.O_WRONLY)
        try:
            for off, ln in writes:
                os.pwrite(fd, b"\x33" * ln, off)
        finally:
            os.close(fd)
        pids = daemon_pids(img, mnt)
        assert len(pids) == 1, pids
        if how == "qcowfs-umount":
            unmount(mnt)
        elif how == "SIGTERM":
            os.kill(pids[0], signal.SIGTERM)
        else:
            cmd = ["umount", str(mnt)] if how == "umount" else ["fusermount3", "-u", str(mnt)]
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            assert p.returncode == 0, p.stderr
        for _ in range(400):
            if not daemon_pids(img, mnt):
                break
            time.sleep(0.05)
        assert not daemon_pids(img, mnt), f"daemon still running 20 s after {how}"
        assert not is_mounted(mnt), f"still mounted after {how}"
    assert qemu_bitmaps(img)["b"]["flags"] == ["auto"], qemu_bitmaps(img)
    assert_qemu_clean(img)
    assert qemu_bits(img, "b") == bits_for(writes, SMALL, 64 * KiB)


# --------------------------------------------------------------------------
# in_use: a daemon killed while tracking, bitmaps found in_use at mount time

def daemon_pids(img: Path, mnt: Path) -> list[int]:
    p = subprocess.run(["pgrep", "-f", f"qcowfs mount {img} {mnt}"], capture_output=True, text=True)
    return [int(x) for x in p.stdout.split()]


def test_killed_daemon_leaves_in_use(tmp_path: Path) -> None:
    img, _ = build_small(tmp_path / "img")
    qb = qemu_bitmaps(img)
    auto = {n for n, q in qb.items() if "auto" in q["flags"]}
    old = {n: qemu_bits(img, n) for n in set(qb) - auto}
    mnt = tmp_path / "mnt"
    with mounted(img, mnt, read_only=False):
        try:
            with open(mnt / "disk.raw", "r+b", buffering=0) as f:
                f.seek(MiB)
                f.write(b"\x42" * 100000)
            assert read_file(mnt / "bitmaps" / "g64k")[2] & 0x10, "write at 1 MiB not tracked in g64k"
            pids = daemon_pids(img, mnt)
            assert len(pids) == 1, f"expected one daemon, found {pids}"
            os.kill(pids[0], signal.SIGKILL)
            for _ in range(100):
                if not daemon_pids(img, mnt):
                    break
                time.sleep(0.05)
            assert not daemon_pids(img, mnt)
        finally:
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
            force_unmount(mnt)
    after = qemu_bitmaps(img)
    for n in auto:
        assert sorted(after[n]["flags"]) == ["auto", "in-use"], f"{n}: {after[n]['flags']}"
    # disabled bitmaps were not being changed: in_use (as QEMU does) or not, their bits are intact
    usable = {n for n in old if "in-use" not in after[n]["flags"]}
    for n in old:
        assert "auto" not in after[n]["flags"], f"{n}: {after[n]['flags']}"
        if n in usable:
            assert qemu_bits(img, n) == old[n], f"disabled bitmap {n} changed"
    # and qcowfs itself now refuses to use those bitmaps
    with mounted(img, tmp_path / "mnt2") as m2:
        assert sorted(os.listdir(m2 / "bitmaps")) == sorted(qb)
        for n in set(qb) - usable:
            with pytest.raises(OSError) as e:
                read_file(m2 / "bitmaps" / n)
            assert e.value.errno == errno.EIO, f"{n}: {e.value}"
        for n in usable:
            assert read_file(m2 / "bitmaps" / n) == old[n]


def test_untrusted_bitmaps_extension(tmp_path: Path) -> None:
    """Autoclear bit 0 clear (a program without bitmap support wrote the image): QEMU ignores the
    bitmaps; qcowfs must not serve their stale bits nor make them valid again."""
    img = create(tmp_path / "disk.qcow2", SMALL)
    qimg("bitmap", "--add", img, "stale")
    qio(img, "write -P 1 0 4k")
    set_field(img, "autoclear_features", Header(img).autoclear_features & ~1)
    assert qemu_bitmaps(img) == {}
    rc0 = sh("qemu-img", "check", img, check=False).returncode
    with mounted(img, tmp_path / "mnt", read_only=False) as m:
        for n in os.listdir(m / "bitmaps"):
            with pytest.raises(OSError) as e:
                read_file(m / "bitmaps" / n)
            assert e.value.errno == errno.EIO, n
        with open(m / "disk.raw", "r+b", buffering=0) as f:
            f.seek(2 * MiB)
            f.write(b"\x01" * 5000)
        unmount(m)
    assert qemu_bitmaps(img) == {}, "stale bitmaps came back as valid after a write"
    assert sh("qemu-img", "check", img, check=False).returncode == rc0


def make_in_use(how: str, d: Path) -> Path:
    """Image with bitmaps 'bad' (in_use, auto, with bits), 'good' (auto) and 'off' (disabled, with bits)."""
    d.mkdir(parents=True, exist_ok=True)
    img = create(d / "disk.qcow2", SMALL)
    qimg("bitmap", "--add", img, "bad")
    qimg("bitmap", "--add", "--granularity", "4K", img, "off")
    qio(img, "write -P 1 100000 5000", "write -P 2 3M 70000")
    qimg("bitmap", "--disable", img, "off")
    qimg("bitmap", "--add", "--granularity", "4K", img, "good")
    if how == "abort":
        p = qio(img, "write -P 3 2M 1000", "abort", check=False)
        assert p.returncode != 0
    else:
        qio(img, "write -P 3 2M 1000")
        bd = bitmap_directory(img)["bad"]
        set_flags(img, "bad", bd["flags"] | FLAG_IN_USE)
    flags = {n: sorted(q["flags"]) for n, q in qemu_bitmaps(img).items()}
    if how == "abort":
        # QEMU marks every bitmap in_use while the image is open read-write
        assert flags == {"bad": ["auto", "in-use"], "good": ["auto", "in-use"], "off": ["in-use"]}, flags
    else:
        assert flags == {"bad": ["auto", "in-use"], "good": ["auto"], "off": []}, flags
    return img


@pytest.mark.parametrize("how", ["patched", "abort"])
def test_in_use_at_mount(how: str, tmp_path: Path) -> None:
    img = make_in_use(how, tmp_path / "img")
    if how == "abort":
        # the abort left every bitmap in_use; keep 'good' and 'off' usable: clear their flag
        for n in ("good", "off"):
            set_flags(img, n, bitmap_directory(img)[n]["flags"] & ~FLAG_IN_USE)
    bad_entry = bitmap_directory(img)["bad"]
    bad_table = read_at(img, bad_entry["table_offset"], 8 * bad_entry["table_size"])
    bad_data = table_data(img, bad_table)
    old_off = qemu_bits(img, "off")
    old_good = qemu_bits(img, "good")
    with mounted(img, tmp_path / "ro") as m:
        assert sorted(os.listdir(m / "bitmaps")) == ["bad", "good", "off"]
        flags = os.getxattr(m / "bitmaps" / "bad", "user.qcow2.flags").decode().split(",")
        assert "in-use" in flags, flags
        with pytest.raises(OSError) as e:
            read_file(m / "bitmaps" / "bad")
        assert e.value.errno == errno.EIO
        assert read_file(m / "bitmaps" / "off") == old_off
        assert read_file(m / "bitmaps" / "good") == old_good
    writes = [(5000, 10), (MiB + 3, 8000)]
    with mounted(img, tmp_path / "rw", read_only=False) as m:
        fd = os.open(m / "disk.raw", os.O_WRONLY)
        try:
            for off, ln in writes:
                os.pwrite(fd, b"\x77" * ln, off)
        finally:
            os.close(fd)
        with pytest.raises(OSError) as e:
            read_file(m / "bitmaps" / "bad")
        assert e.value.errno == errno.EIO
        assert read_file(m / "bitmaps" / "good") == bits_for(writes, SMALL, 4096, old_good)
        unmount(m)
    assert_qemu_clean(img)
    flags = {n: sorted(q["flags"]) for n, q in qemu_bitmaps(img).items()}
    assert flags == {"bad": ["auto", "in-use"], "good": ["auto"], "off": []}, flags
    # the in_use bitmap is left as it was: same granularity, same bits
    now = bitmap_directory(img)["bad"]
    assert now["granularity"] == bad_entry["granularity"]
    assert table_data(img, read_at(img, now["table_offset"], 8 * now["table_size"])) == bad_data, \
        "the in_use bitmap's data changed"
    assert qemu_bits(img, "good") == bits_for(writes, SMALL, 4096, old_good)
    assert qemu_bits(img, "off") == old_off


def read_at(img: Path, off: int, ln: int) -> bytes:
    with open(img, "rb") as f:
        f.seek(off)
        return f.read(ln)


def table_data(img: Path, table: bytes) -> list:
    """The content a bitmap table points to: per entry, the cluster's bytes or the flag."""
    cs = info(img)["cluster-size"]
    out = []
    for (e,) in struct.iter_unpack(">Q", table):
        off = e & 0x00FFFFFFFFFFFE00
        out.append(read_at(img, off, cs) if off else e & 1)
    return out


# --------------------------------------------------------------------------
# qcowfs info

def test_info_lists_bitmaps(tmp_path: Path) -> None:
    img, _ = build_small(tmp_path / "img")
    want = qemu_bitmaps(img)
    p = subprocess.run([QCOWFS, "info", str(img)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    for n, q in want.items():
        assert any(n in ln for ln in p.stdout.splitlines()), f"bitmap {n} not listed:\n{p.stdout}"
    p = subprocess.run([QCOWFS, "info", "--json", str(img)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)["format-specific"]["data"].get("bitmaps", [])
    norm = lambda bs: sorted((b["name"], b["granularity"], tuple(sorted(b["flags"]))) for b in bs)
    assert norm(got) == norm(want.values())
