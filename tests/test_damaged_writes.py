"""Writes to damaged images never make them worse (issue 23's rule), on the two
reproductions that once broke it and their classes: compressed descriptors
whose size or offset is out of range (qemu-iotests 214) or whose sectors are a
data cluster's (a hostile-image soak seed), and every invalid
extended-L2 subcluster combination (qemu-iotests 271).

A session of pattern writes, each followed by a flush (fsync), runs through
qcowfs' public API on one copy of the damaged image and through QEMU on
another. Then, judged by QEMU:

- `qemu-img check` of qcowfs' copy counts no more corruptions than before or
  than QEMU's own session left on its copy;
- every 64 KiB chunk QEMU read before, QEMU still reads;
- what it reads is the old content with the acknowledged writes over it (a
  write is acknowledged when it and the flush after it returned); a write
  that failed may have landed or not, in its own range only.
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import trio

import qcowfs
import qcowfs.aio
from images import Header, qimg, read_u64
from corruption import (EXT_CASES, _ext_l2, base, guest_bytes, l2_entry_offset, patch, poke_u64, qemu_check,
                        refblock_offset, reftable_entry_offset, set_refcount, severity)

KiB, MiB = 1 << 10, 1 << 20
OFLAG_COPIED = 1 << 63
CHUNK = 64 * KiB


@dataclass(frozen=True)
class Case:
    build: Callable[[Path], Path]
    size: int
    writes: tuple[tuple[int, int, int], ...]  # (guest offset, length, byte or ZERO)


ZERO = -1  # a write of zeros: qemu-io write -z, Disk.zero without unmap (fallocate ZERO_RANGE)


def _compressed(poke: Callable[[Path], None]) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        img = base(d, "8M", "write -c -P 0x11 0 2M", "write -c -P 0x11 2M 2M", "write -P 0x33 6M 64k",
                   cluster_size=2 * MiB)
        poke(img)
        return img
    return build


def _sectors(count: int, which: tuple[int, ...] = (0, 2 * MiB)) -> Callable[[Path], None]:
    """The sector-count field of compressed descriptors: 2 MiB clusters put it
    in bits 49-61 (the top two bytes hold 0x40 | its high bits)."""
    def poke(img: Path) -> None:
        for guest in which:
            off = l2_entry_offset(img, guest)
            entry = struct.unpack(">Q", img.read_bytes()[off:off + 8])[0]
            x = 62 - (21 - 8)
            entry = (entry & ~(((1 << (62 - x)) - 1) << x)) | (count << x)
            patch(img, off, struct.pack(">Q", entry))
    return poke


def _offset_past_eof(img: Path) -> None:
    off = l2_entry_offset(img, 0)
    entry = struct.unpack(">Q", img.read_bytes()[off:off + 8])[0]
    x = 62 - (21 - 8)
    entry = (entry & ~((1 << x) - 1)) | (1 << 40)  # 1 TiB: past the end of the file
    patch(img, off, struct.pack(">Q", entry))


def _shared_l2_entry(d: Path) -> Path:
    """Guest 1M's L2 entry flipped onto guest 0's cluster, without COPIED (it
    claims a second reference the refcount of 1 does not have): a write there
    copies the cluster away and must not free (or punch) guest 0's data."""
    img = base(d, "4M", "write -P 0x11 0 64k", "write -P 0x12 1M 64k")
    owner = read_u64(img, l2_entry_offset(img, 0))
    patch(img, l2_entry_offset(img, 1 * MiB), struct.pack(">Q", owner & ~OFLAG_COPIED))
    return img


def _shared_l2_table(d: Path) -> Path:
    """L1 entry 2 (4 KiB clusters: 2 MiB per L2 table) flipped onto entry 0's
    L2 table without COPIED: a write under it copies the table away and must
    not free the table L1 entry 0 still uses."""
    img = base(d, "8M", "write -P 0x11 0 64k", "write -P 0x12 4M 64k", cluster_size=4 * KiB)
    h = Header(img)
    patch(img, h.l1_entry_offset(4 * MiB), struct.pack(">Q", h.l1_entry(0) & ~OFLAG_COPIED))
    return img


def _descriptor_into_data(d: Path) -> Path:
    """Guest 64K's unallocated L2 entry turned into a compressed descriptor
    (two sectors) over guest 0's data cluster (refcount 1, so QEMU's check
    counts it referenced twice), as the soak's seed 3100592321 did. With
    512-byte clusters the two entries lie in different L2 tables, so the
    writer has not seen guest 0's. The write that replaces the descriptor
    must not free guest 0's cluster: the descriptor does not decode, so its
    sectors are kept (a leak at most)."""
    img = base(d, "1M", "write -P 0x11 0 4k", "write -P 0x13 80k 4k", "write -c -P 0x12 512k 4k",
               cluster_size=512)
    host = read_u64(img, l2_entry_offset(img, 0)) & ((1 << 56) - 1) & ~0x1FF
    patch(img, l2_entry_offset(img, 64 * KiB), struct.pack(">Q", (1 << 62) | (1 << 61) | host))
    return img


def _entry_onto_l2_table(d: Path) -> Path:
    """Guest 1M's L2 entry (COPIED) pointed at the L2 table it lies in (soak
    seed 3100592344): guest 1M then reads that table, and every allocation
    under it changes those bytes. A ZERO_RANGE over guest 1M flags the entry
    zero and keeps its cluster, as QEMU does (nothing is written there); a
    later write to it in place is refused by the overlap check."""
    img = base(d, "2M", "write -P 0x11 0 64k", "write -P 0x12 1M 4k", cluster_size=4 * KiB)
    table = Header(img).l1_entry(0) & 0x00FFFFFFFFFFFE00
    patch(img, l2_entry_offset(img, 1 * MiB), struct.pack(">Q", table | OFLAG_COPIED))
    return img


def _shared_compressed_refcount_one(d: Path) -> Path:
    """A host cluster of compressed clusters that an internal snapshot shares
    with the disk (its refcount counts both), with its refcount set to 1 (the
    soak's seed 7600049): the write that replaces one of the disk's compressed
    clusters must not free it, the snapshot and the disk's other compressed
    clusters still live there."""
    img = base(d, "4M", "write -c -P 0x11 0 1M")
    qimg("snapshot", "-c", "s1", img)
    host = read_u64(img, l2_entry_offset(img, 0)) & ((1 << 54) - 1)
    set_refcount(img, host >> 16, 1)
    return img


def _reftable_entry_onto_data(d: Path) -> Path:
    """Refcount table entry 0 pointed at a data cluster of the disk (the
    hostile soak's seed 11000775), refcount_bits=1: read as counts, the
    guest's bytes 0x2b call the old refcount block's cluster (2) free. A write
    that allocates must not set that cluster's bit in the guest's data: the
    refcount block is a cluster an L2 table references (QEMU, with lazy
    refcounts, had written no refcount block yet when it found the damage)."""
    img = base(d, "4M", "write -P 0x2b 1M 64k", "write -P 0x11 0 64k", refcount_bits=1)
    data = read_u64(img, l2_entry_offset(img, 1 * MiB)) & ((1 << 56) - 1) & ~0xFFFF
    patch(img, reftable_entry_offset(img, 0), struct.pack(">Q", data))
    return img


def _reftable_entry_zeroed_under_compressed(d: Path) -> Path:
    """Refcount table entry 0 zeroed (the hostile soak's seed 11003393) under
    eight compressed clusters that share one host cluster. The block made
    again for that range can only guess 1 for it; an overwrite of one
    compressed cluster drops a reference, and that drop must not free the
    host cluster: the next allocation wrote over the other seven, which QEMU
    then could not read. (The first write allocates, so that block exists
    when the overwrite drops its reference, as in the soak.)"""
    img = base(d, "4M", *(f"write -c -P 0x{0x31 + i:x} {i * 64}k 64k" for i in range(8)))
    patch(img, reftable_entry_offset(img, 0), struct.pack(">Q", 0))
    return img


COMPRESSED_WRITES = ((0, 64 * KiB, 0x22), (3 * MiB, 64 * KiB, 0x44), (5 * MiB, 64 * KiB, 0x55),
                     (6 * MiB, 4 * KiB, 0x66))
CASES: dict[str, Case] = {
    "214-both-descriptors-max-sectors": Case(_compressed(_sectors(8191)), 8 * MiB, COMPRESSED_WRITES),
    "214-one-descriptor-max-sectors": Case(_compressed(_sectors(8191, (0,))), 8 * MiB, COMPRESSED_WRITES),
    "214-descriptor-offset-past-eof": Case(_compressed(_offset_past_eof), 8 * MiB, COMPRESSED_WRITES),
    "compressed-descriptor-over-a-data-cluster": Case(_descriptor_into_data, 1 * MiB,
                                                      ((64 * KiB, 4 * KiB, 0x44), (768 * KiB, 64 * KiB, 0x55),
                                                       (4 * KiB, 4 * KiB, 0x22))),
    "l2-entry-points-at-its-l2-table": Case(_entry_onto_l2_table, 2 * MiB,
                                            ((256 * KiB, 4 * KiB, 0x44), (1 * MiB - 8 * KiB, 16 * KiB, ZERO),
                                             (1 * MiB, 4 * KiB, 0x55), (512 * KiB, 4 * KiB, 0x66))),
    "shared-compressed-cluster-with-refcount-one": Case(_shared_compressed_refcount_one, 4 * MiB,
                                                        ((0, 64 * KiB, 0x44), (2 * MiB, 64 * KiB, 0x55),
                                                         (3 * MiB, 64 * KiB, 0x66))),
    "l2-entry-shares-a-cluster-without-copied": Case(_shared_l2_entry, 4 * MiB,
                                                     ((1 * MiB, 4 * KiB, 0x44), (2 * MiB, 64 * KiB, 0x55),
                                                      (0, 4 * KiB, 0x22))),
    "refcount-table-entry-points-at-a-data-cluster": Case(_reftable_entry_onto_data, 4 * MiB,
                                                         ((128 * KiB, 8 * KiB, 0x44), (3 * MiB, 64 * KiB, 0x55),
                                                          (0, 4 * KiB, 0x22))),
    "refcount-table-entry-zeroed-under-shared-compressed-clusters": Case(
        _reftable_entry_zeroed_under_compressed, 4 * MiB,
        ((2 * MiB, 64 * KiB, 0x55), (64 * KiB, 4 * KiB, 0x44), (3 * MiB, 4 * KiB, 0x66))),
    "l1-entry-shares-an-l2-table-without-copied": Case(_shared_l2_table, 8 * MiB,
                                                       ((4 * MiB, 4 * KiB, 0x44), (6 * MiB, 64 * KiB, 0x55),
                                                        (0, 4 * KiB, 0x22))),
}
# Every invalid extended-L2 combination of qemu-iotests 271, written around and over it.
for _name, _what, _cmds, _poke, _len, _i9 in EXT_CASES:
    CASES[f"271-{_name}"] = Case(_ext_l2(_cmds, _poke), 1 * MiB,
                                 ((512 * KiB, 4 * KiB, 0x77), (2 * KiB, 2 * KiB, 0x22), (64 * KiB, 8 * KiB, 0x33),
                                  (0, 64 * KiB, 0x44), (900 * KiB, 4 * KiB, 0x55)))


def chunks(img: Path, size: int) -> list[bytes | None]:
    """Each 64 KiB chunk of the disk as QEMU reads it (None: QEMU cannot)."""
    return [guest_bytes(img, off, min(CHUNK, size - off)) for off in range(0, size, CHUNK)]


def qemu_session(img: Path, writes: tuple[tuple[int, int, int], ...]) -> None:
    """The same writes by QEMU (overlap checks on), each with a flush."""
    for off, n, byte in writes:
        write = f"write -z {off} {n}" if byte == ZERO else f"write -P {byte:#x} {off} {n}"
        subprocess.run(["qemu-io", "--image-opts", "-c", write, "-c", "flush",
                        f"driver=qcow2,file.filename={img},overlap-check=all"],
                       capture_output=True, timeout=60, cwd=img.parent)


async def qcowfs_session(img: Path, writes: tuple[tuple[int, int, int], ...]) -> list[bool]:
    """The writes through the API; which were acknowledged (write and flush returned)."""
    acked: list[bool] = []
    try:
        image = await qcowfs.aio.open(img, "r+")
    except qcowfs.QcowError:
        return [False] * len(writes)
    try:
        for off, n, byte in writes:
            try:
                if byte == ZERO:
                    await image.disk.zero(off, n, unmap=False)
                else:
                    await image.disk.write(off, bytes([byte]) * n)
                await image.disk.flush()
                acked.append(True)
            except qcowfs.QcowError as e:
                assert "\n" not in str(e), repr(e)
                acked.append(False)
    finally:
        try:
            await image.close()
        except qcowfs.QcowError:
            pass
    return acked


@pytest.mark.parametrize("name", sorted(CASES))
def test_never_worse_than_it_was(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    orig = case.build(tmp_path / "img")
    theirs, ours = tmp_path / "qemu.qcow2", tmp_path / "qcowfs.qcow2"
    shutil.copy(orig, theirs)
    shutil.copy(orig, ours)
    before = chunks(orig, case.size)
    rc0, check0, _ = qemu_check(orig)
    qemu_session(theirs, case.writes)
    acked = trio.run(qcowfs_session, ours, case.writes)
    rc_q, check_q, _ = qemu_check(theirs)
    rc_f, check_f, out_f = qemu_check(ours)
    assert severity(rc_f) <= max(severity(rc0), severity(rc_q)), (rc_f, rc_q, rc0, out_f)
    if rc_f == 2:
        worst = max(check0.get("corruptions", 0), check_q.get("corruptions", 0))
        assert check_f.get("corruptions", 0) <= worst, (check_f, check_q, check0)
    after = chunks(ours, case.size)
    for i, (old, new) in enumerate(zip(before, after)):
        lo = i * CHUNK
        if old is None:
            continue
        assert new is not None, f"QEMU read chunk {lo:#x} before and cannot after qcowfs"
        want, maybe = bytearray(old), bytearray(old)
        for (off, n, byte), ok in zip(case.writes, acked):
            a, b = max(off, lo), min(off + n, lo + len(old))
            if a >= b:
                continue
            value = 0 if byte == ZERO else byte
            if ok:
                want[a - lo : b - lo] = bytes([value]) * (b - a)
            maybe[a - lo : b - lo] = bytes([value]) * (b - a)
        if new != want:
            # a failed write may have landed in its own range: old or new there, nothing else
            failed = [(off, n, max(byte, 0)) for (off, n, byte), ok in zip(case.writes, acked) if not ok]
            for j in range(len(new)):
                if new[j] in (want[j], maybe[j]) and (new[j] == want[j] or any(
                        off <= lo + j < off + n and new[j] == byte for off, n, byte in failed)):
                    continue
                raise AssertionError(f"chunk {lo:#x}: byte +{j:#x} reads {new[j]:#04x}, neither the old "
                                     f"{old[j]:#04x} nor an acknowledged write (acknowledged: {acked})")


def test_zero_range_over_an_entry_qemu_cannot_read_is_refused(tmp_path: Path) -> None:
    """A ZERO_RANGE over part of a cluster only flags subclusters zero and keeps the
    entry's host cluster; an entry QEMU cannot read (here an unaligned offset) must
    refuse it before anything changes: else the zeros are acknowledged, and QEMU
    reads that range as an error afterwards (hostile soak seed 8701179)."""
    img = base(tmp_path / "img", "1M", "write -P 0x11 0 64k", cluster_size=16 * KiB, extended_l2="on")
    patch(img, l2_entry_offset(img, 512 * KiB), struct.pack(">QQ", 0x2000, 0))
    before = img.read_bytes()

    async def zero() -> None:
        image = await qcowfs.aio.open(img, "r+")
        try:
            with pytest.raises(qcowfs.CorruptionError, match="unaligned"):
                await image.disk.zero(512 * KiB + 4 * KiB, 4 * KiB, unmap=False)
        finally:
            await image.close()
    trio.run(zero)
    # the image is marked corrupt (one header bit), nothing else changed
    after = img.read_bytes()
    assert [i for i in range(len(before)) if before[i] != after[i]] == [79], "more than the corrupt bit changed"


@pytest.mark.parametrize("then", ["write", "snapshot"])
def test_a_missing_refcount_block_hands_out_none_of_its_clusters(tmp_path: Path, then: str) -> None:
    """A refcount table entry of 0 for a range the file holds (hostile soak seed
    9900082): its clusters read as refcount 0, but tables this session never
    loads use them. New data goes elsewhere, and a block made for that range
    counts its clusters as used once, so a snapshot's increments give the
    counts QEMU expects."""
    # 512 B clusters, 16-bit refcounts: a block covers 256 clusters, 128 KiB of the file;
    # the data fills ranges 0-4, range 2 holds data of guest [~250K, ~380K) only.
    img = base(tmp_path / "img", "1M", "write -P 0x11 0 512k", cluster_size=512)
    assert refblock_offset(img, 2) and img.stat().st_size > 4 * 128 * KiB
    poke_u64(img, reftable_entry_offset(img, 2), 0)
    _, report, _ = qemu_check(img)
    corruptions = report["corruptions"]
    assert corruptions >= 200  # (the range's clusters: refcount 0, one reference each)

    async def session() -> None:
        image = await qcowfs.aio.open(img, "r+")
        try:
            if then == "write":
                await image.disk.write(640 * KiB, b"\x22" * (256 * KiB))
            else:
                await image.create_snapshot("s1")
            await image.disk.flush()
        finally:
            await image.close()
    trio.run(session)
    assert guest_bytes(img, 0, 512 * KiB) == b"\x11" * (512 * KiB)
    code, report, out = qemu_check(img)
    if then == "write":
        assert guest_bytes(img, 640 * KiB, 256 * KiB) == b"\x22" * (256 * KiB)
        assert report["corruptions"] == corruptions, out
    else:
        # every count of the range is right now (one reference from the active
        # table, one from the snapshot's); the one leak is the old block the
        # damage orphaned
        assert (report.get("corruptions", 0), report.get("leaks", 0)) == (0, 1), out
        assert qimg("snapshot", "-l", img).count("s1") == 1


def test_a_file_extended_by_truncate_is_free_space_past_its_counted_clusters(tmp_path: Path) -> None:
    """The control of the test above: a healthy image whose file was made
    longer (a hole past the last range a refcount block covers, as truncate
    leaves it) has nothing uncounted in use there. New clusters may go into
    that hole, and a clean session leaves `qemu-img check` with nothing at
    all to say (no leaks: nothing counted that no table uses)."""
    img = base(tmp_path / "img", "1M", "write -P 0x11 0 256k", cluster_size=512)
    size = img.stat().st_size
    os.truncate(img, size + 512 * KiB)
    assert qemu_check(img)[0] == 0

    async def session() -> None:
        image = await qcowfs.aio.open(img, "r+")
        try:
            await image.disk.write(512 * KiB, b"\x22" * (256 * KiB))
            await image.disk.flush()
        finally:
            await image.close()
    trio.run(session)
    code, _, out = qemu_check(img)
    assert code == 0, out
    assert guest_bytes(img, 0, 256 * KiB) == b"\x11" * (256 * KiB)
    assert guest_bytes(img, 512 * KiB, 256 * KiB) == b"\x22" * (256 * KiB)
    assert img.stat().st_size < size + 512 * KiB + 256 * KiB, "the hole was not used"


def test_damaged_bitmap_entry_refuses_writes(tmp_path: Path) -> None:
    """A bitmap directory entry QEMU refuses to open the image for (its
    directory offset pointed at the L1 table: type, name and sizes are then
    whatever the L1 table holds): a writable open is refused with one line and
    changes nothing; a read-only one still serves the disk as before."""
    img = base(tmp_path / "img", "16M", "write -P 0x5a 0 1M")
    subprocess.run(["qemu-img", "bitmap", "--add", img, "bm"], check=True)
    raw = bytearray(img.read_bytes())
    l1 = struct.unpack(">Q", raw[40:48])[0]
    pos = struct.unpack(">I", raw[100:104])[0]
    while True:
        ext, length = struct.unpack(">II", raw[pos:pos + 8])
        assert ext, "no bitmaps extension"
        if ext == 0x23852875:
            raw[pos + 8 + 16 : pos + 8 + 24] = struct.pack(">Q", l1)
            break
        pos += 8 + (length + 7) // 8 * 8
    img.write_bytes(bytes(raw))
    assert subprocess.run(["qemu-img", "info", img], capture_output=True).returncode != 0
    before = img.read_bytes()
    with pytest.raises(qcowfs.CorruptionError, match="read-only") as e:
        qcowfs.aio.Image(img, "r+")
    assert "\n" not in str(e.value)
    assert img.read_bytes() == before
    with qcowfs.open(img) as image:
        assert image.disk.pread(0, 1 << 20) == b"\x5a" * (1 << 20)
    assert img.read_bytes() == before


@pytest.mark.parametrize("extended_l2", [False, True], ids=["standard", "extended-l2"])
def test_data_file_entry_off_its_guest_offset_is_corruption(tmp_path: Path, extended_l2: bool) -> None:
    """With an external data file QEMU keeps each data cluster at its guest
    offset, and an L2 entry saying another one is corruption to it
    (qcow2_get_host_offset): qcowfs must neither read nor write through such an
    entry. It wrote through one and acknowledged writes QEMU could never read
    back (hostile soak seeds 243 and 303); a far offset made a raw OSError
    escape (seed 561). A read-only open refuses the range and changes nothing;
    a write is refused before anything changes, and the image marked corrupt."""
    d = tmp_path / "img"
    cs = 16 * KiB if extended_l2 else 64 * KiB
    img = base(d, "4M", f"write -P 0x11 0 {4 * cs}", cluster_size=cs, data_file=d / "disk.data",
               extended_l2="on" if extended_l2 else "off")
    where = l2_entry_offset(img, cs)
    old = read_u64(img, where)
    patch(img, where, struct.pack(">Q", (old & ~0x00FFFFFFFFFFFE00) | 3 * cs))   # another guest cluster's
    assert guest_bytes(img, cs, 512) is None and guest_bytes(img, 0, 512) == b"\x11" * 512
    before, data = img.read_bytes(), (d / "disk.data").read_bytes()
    with qcowfs.open(img) as image:
        with pytest.raises(qcowfs.CorruptionError, match="does not match guest cluster offset"):
            image.disk.pread(cs + 100, 512)
        assert image.disk.pread(0, 512) == b"\x11" * 512
        with pytest.raises(qcowfs.CorruptionError, match="does not match"):   # through a long read too
            image.disk.pread(0, 4 * cs)
    assert img.read_bytes() == before

    async def write(zero: bool) -> None:
        image = await qcowfs.aio.open(img, "r+")
        try:
            with pytest.raises(qcowfs.CorruptionError, match="does not match guest cluster offset"):
                if zero:   # (keeps the entry's offset, only flagging it zero: QEMU checks it there too)
                    await image.disk.zero(cs, cs, unmap=False)
                else:
                    await image.disk.write(cs + 512, b"\x22" * 4096)
        finally:
            await image.close()
    for zero in (False, True):
        if zero:
            img.write_bytes(before)
        trio.run(write, zero)
        after = img.read_bytes()
        assert [i for i in range(len(before)) if before[i] != after[i]] == [79], "more than the corrupt bit changed"
        assert (d / "disk.data").read_bytes() == data
