"""The salvage matrix (issue 23): images truncated at every metadata boundary
of several layouts, refcount blocks zeroed, the refcount table pointing past
the end, and a missing backing file, each read read-only by qcowfs chunk by
chunk and compared with what QEMU reads of the same file.

Wherever QEMU reads a chunk, qcowfs serves it identically; elsewhere it fails
with a QcowError (EIO through a mount), never a short read. `qcowfs info`
answers wherever `qemu-img info` does, `qcowfs check` exits and counts
corruptions and leaks as `qemu-img check` does, and nothing changes the file.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Callable

import pytest

import qcowfs
from conftest import QCOWFS
from corruption import guest_bytes
from images import create, qio, sh

KiB, MiB = 1 << 10, 1 << 20
CHUNK = 64 * KiB


def layout(name: str, d: Path) -> Path:
    """A 4 MiB disk with data in three places, a snapshot, a bitmap, as NAME says."""
    d.mkdir(parents=True, exist_ok=True)
    opts: dict[str, object] = {}
    if "c4k" in name:
        opts["cluster_size"] = 4096
    if "extl2" in name:
        opts.update(extended_l2="on", cluster_size=32768)
    img = create(d / "disk.qcow2", 4 * MiB, **opts)
    qio(img, "write -P 0x11 0 512k", "write -c -P 0x22 1M 128k" if "extl2" not in name else "write -P 0x22 1M 128k",
        "write -P 0x33 3M 256k")
    sh("qemu-img", "snapshot", "-c", "s1", img)
    qio(img, "write -P 0x44 64k 64k")
    sh("qemu-img", "bitmap", "--add", img, "b1")
    return img


def boundaries(img: Path) -> list[tuple[str, int]]:
    """(what, offset) of every metadata structure's start, and its middle."""
    raw = img.read_bytes()
    cs = 1 << struct.unpack(">I", raw[20:24])[0]
    l1_off, = struct.unpack(">Q", raw[40:48])
    l1_size, = struct.unpack(">I", raw[36:40])
    rt_off, = struct.unpack(">Q", raw[48:56])
    rt_clusters, = struct.unpack(">I", raw[56:60])
    snap_off, = struct.unpack(">Q", raw[64:72])
    out = [("L1 table", l1_off), ("refcount table", rt_off), ("snapshot table", snap_off)]
    for i in range(rt_clusters * cs // 8):
        e, = struct.unpack(">Q", raw[rt_off + 8 * i : rt_off + 8 * i + 8])
        if e:
            out.append((f"refcount block {i}", e & ~0x1FF))
    for i in range(l1_size):
        e, = struct.unpack(">Q", raw[l1_off + 8 * i : l1_off + 8 * i + 8])
        if e & 0x00FFFFFFFFFFFE00:
            out.append((f"L2 table {i}", e & 0x00FFFFFFFFFFFE00))
    out += [(f"middle of {what}", off + cs // 2) for what, off in list(out)]
    return sorted({(w, o) for w, o in out if 0 < o < len(raw)}, key=lambda x: x[1])


def qemu_rc(*args: object) -> int:
    return subprocess.run([str(a) for a in args], capture_output=True, timeout=120).returncode


def qcowfs_rc(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([QCOWFS, *map(str, args)], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def check_counts(argv: list) -> tuple[int, int | None, int | None]:
    """(exit status, corruptions, leaks) of a check with JSON output."""
    p = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL)
    try:
        out = json.loads(p.stdout)
    except ValueError:
        return p.returncode, None, None
    return p.returncode, out.get("corruptions", 0), out.get("leaks", 0)


def judge(img: Path) -> None:
    """The salvage rules on one damaged image (see the module docstring)."""
    before = img.read_bytes()
    info_q = qemu_rc("qemu-img", "info", img)
    p = qcowfs_rc("info", img)
    assert "Traceback" not in p.stderr, p.stderr
    if info_q == 0:
        assert p.returncode == 0, f"qemu-img info answers, qcowfs info: {p.stderr.strip()}"
    else:
        assert len(p.stderr.strip().splitlines()) >= 1
    if info_q == 0:
        size = int(subprocess.run(["qemu-img", "info", "--output=json", img], capture_output=True,
                                  text=True).stdout.split('"virtual-size":')[1].split(",")[0])
        try:
            image = qcowfs.open(img)
        except qcowfs.QcowError as e:
            image = None
            opened = str(e)
        if image is not None:
            with image:
                for off in range(0, size, CHUNK):
                    want = guest_bytes(img, off, min(CHUNK, size - off))
                    try:
                        got: bytes | None = image.disk.pread(off, min(CHUNK, size - off))
                    except qcowfs.QcowError:
                        got = None
                    if want is not None:
                        assert got == want, f"chunk {off:#x}: qcowfs {'fails' if got is None else 'differs'}"
                    elif got is not None:
                        assert len(got) == min(CHUNK, size - off)
        else:
            # QEMU opens it; qcowfs may refuse only with one clear line
            assert "\n" not in opened
    assert check_counts(["qemu-img", "check", "--output=json", img]) == \
        check_counts([QCOWFS, "check", "--json", img]), "qcowfs check and qemu-img check differ"
    assert img.read_bytes() == before, "the image changed"


LAYOUTS = ("c64k", "c4k", "extl2")


@pytest.mark.parametrize("name", LAYOUTS)
def test_truncated_at_every_metadata_boundary(name: str, tmp_path: Path) -> None:
    clean = layout(name, tmp_path / "clean")
    for what, off in boundaries(clean):
        img = tmp_path / "cut.qcow2"
        shutil.copy(clean, img)
        os.truncate(img, off)
        try:
            judge(img)
        except AssertionError as e:
            raise AssertionError(f"{name} cut at {what} ({off:#x}): {e}") from None


def _zero_refblocks(img: Path) -> None:
    raw = bytearray(img.read_bytes())
    cs = 1 << struct.unpack(">I", raw[20:24])[0]
    rt_off, = struct.unpack(">Q", raw[48:56])
    for i in range(cs // 8):
        e, = struct.unpack(">Q", raw[rt_off + 8 * i : rt_off + 8 * i + 8])
        if e:
            raw[e & ~0x1FF : (e & ~0x1FF) + cs] = bytes(cs)
    img.write_bytes(bytes(raw))


def _reftable_past_end(img: Path) -> None:
    with open(img, "r+b") as f:
        f.seek(48)
        f.write(struct.pack(">Q", 1 << 40))


def _backing_missing(img: Path) -> None:
    d = img.parent
    base = d / "base.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", base, "4M")
    qio(base, "write -P 0x55 0 1M")
    over = d / "over.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", over, cwd=d)
    qio(over, "write -P 0x66 2M 64k")
    base.unlink()
    over.replace(img)


DAMAGE: dict[str, Callable[[Path], None]] = {
    "refcount-blocks-zeroed": _zero_refblocks,
    "refcount-table-past-end": _reftable_past_end,
    "backing-missing": _backing_missing,
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_salvage(case: str, tmp_path: Path) -> None:
    img = layout("c64k", tmp_path / "img")
    DAMAGE[case](img)
    judge(img)


def test_a_warning_before_a_failure_is_not_a_second_line(tmp_path: Path) -> None:
    """A command that meets a file cut short logs a warning as it reads
    (data past the end reads as zeros, as in QEMU), then may fail on the
    same damage: its one error line is all it says (the warning came first,
    bare, from logging: two lines; found by running every command on the
    hostile generator's damaged images). A command that ends well says the
    warning, as a `qcowfs: warning:` line."""
    base = create(tmp_path / "base.qcow2", 4 * 1024 * 1024, cluster_size=4096)
    qio(base, "write -P 0x51 0 4M")
    top = create(tmp_path / "top.qcow2", 4 * 1024 * 1024, backing="base.qcow2", backing_fmt="qcow2",
                 cwd=tmp_path, cluster_size=4096)
    qio(top, "write -P 0x52 0 64k", "write -P 0x53 3M 64k")
    os.truncate(top, os.path.getsize(top) - 32 * 1024)  # (the last data clusters are gone)
    p = subprocess.run([QCOWFS, "convert", "-O", "raw", top, tmp_path / "out.raw"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stderr and all(line.startswith("qcowfs: warning: ") for line in p.stderr.splitlines()), p.stderr
    p = subprocess.run([QCOWFS, "commit", top], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and len(p.stderr.splitlines()) == 1, p.stderr
    assert "past the end of the image file" in p.stderr and "Traceback" not in p.stderr, p.stderr
