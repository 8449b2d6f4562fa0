"""Writes to images with extended L2 entries allocate subclusters as QEMU does
(calculate_l2_meta): only the written subclusters of a new or kept cluster,
plus the allocated ones a copied cluster carries along; the others stay
unallocated (reading from the backing file) or zero. Judged against QEMU
doing the same writes on a copy: the L2 bitmaps are equal, the disks compare
equal and both images check clean."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import qcowfs
from images import KiB, Header, create, qimg, qio, read_u64

# (guest offset, length, byte) sessions; 64 KiB clusters, 2 KiB subclusters.
SESSIONS = {
    "fresh-cluster": [(6 * KiB, 4 * KiB, 0x22)],
    "unaligned-in-subcluster": [(6 * KiB + 100, 300, 0x23)],
    "grow-a-kept-cluster": [(6 * KiB, 4 * KiB, 0x22), (40 * KiB + 512, 1 * KiB, 0x24),
                            (2 * KiB, 1 * KiB, 0x25)],
    "across-clusters": [(60 * KiB, 72 * KiB, 0x26)],
    "over-zero-subclusters": [(0, 64 * KiB, 0x27), ("zero", 8 * KiB, 16 * KiB), (12 * KiB, 2 * KiB, 0x28)],
    "after-a-snapshot": [(6 * KiB, 4 * KiB, 0x22), ("snapshot",), (30 * KiB, 2 * KiB, 0x29)],
    "over-compressed": [("compressed", 0, 64 * KiB, 0x2a), (10 * KiB, 1 * KiB, 0x2b)],
}
GUESTS = (0, 64 * KiB, 128 * KiB)


def _image(d: Path) -> Path:
    backing = create(d / "base.qcow2", "1M")
    qio(backing, "write -P 0x11 0 1M")
    return create(d / "a.qcow2", "1M", backing=str(backing), backing_fmt="qcow2", extended_l2="on",
                  cluster_size="64k")


def _qemu(img: Path, session: list) -> None:
    for op in session:
        if op[0] == "zero":
            qio(img, f"write -z {op[1]} {op[2]}")
        elif op[0] == "snapshot":
            qimg("snapshot", "-c", "s1", str(img))
        elif op[0] == "compressed":
            qio(img, f"write -c -P {op[3]:#x} {op[1]} {op[2]}")
        else:
            qio(img, f"write -P {op[2]:#x} {op[0]} {op[1]}")


def _qcowfs(img: Path, session: list) -> None:
    for op in session:
        if op[0] in ("snapshot", "compressed"):
            _qemu(img, [op])  # (set-up steps, not what is judged)
            continue
        with qcowfs.open(img, "r+") as image:
            if op[0] == "zero":
                image.disk.zero(op[1], op[2], unmap=False)
            else:
                image.disk.pwrite(bytes([op[2]]) * op[1], op[0])


def _bitmaps(img: Path) -> list[int | None]:
    h = Header(img)
    out: list[int | None] = []
    for g in GUESTS:
        try:
            out.append(read_u64(img, h.l2_entry_offset(g) + 8))
        except AssertionError:
            out.append(None)
    return out


@pytest.mark.parametrize("name", sorted(SESSIONS))
def test_subclusters_as_qemu(name: str, tmp_path: Path) -> None:
    ours = _image(tmp_path)
    theirs = tmp_path / "b.qcow2"
    shutil.copy(ours, theirs)
    _qcowfs(ours, SESSIONS[name])
    _qemu(theirs, SESSIONS[name])
    assert [hex(b) if b is not None else b for b in _bitmaps(ours)] == \
        [hex(b) if b is not None else b for b in _bitmaps(theirs)]
    assert subprocess.run(["qemu-img", "compare", "-q", ours, theirs]).returncode == 0
    for img in (ours, theirs):
        assert subprocess.run(["qemu-img", "check", "-q", img]).returncode == 0
