"""Internal snapshots: MOUNT/snapshots/NAME.raw against QEMU's view of every snapshot.

Images are made with `qemu-img snapshot -c` between `qemu-io` writes (v2 and v3, duplicate names,
names that are no usable file name, a disk grown after some snapshots, compressed clusters,
extended L2), then every snapshot file is compared with
`qemu-img convert -O raw -l snapshot.id=ID` and its metadata with `qemu-img info` / our own
parse of the snapshot table. Writes through a read-write mount must never change a snapshot.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import stat
import struct
import subprocess
import threading
from datetime import datetime
from pathlib import Path

import pytest

from conftest import QCOWFS, is_mounted, loop_device, mounted
from images import KiB, MiB, Header, Sources, create, info, oracle, patch, qimg, qio, sh

XATTRS = ("user.qcow2.id", "user.qcow2.name", "user.qcow2.date", "user.qcow2.vm_clock_ns",
          "user.qcow2.vm_state_size", "user.qcow2.disk_size")


# --------------------------------------------------------------------------
# the snapshot table, parsed independently of qcowfs

def snapshot_table(img: Path) -> list[dict]:
    """Entries of the snapshot table: id, name, date, vm clock, vm state size, disk size, file offset."""
    h = Header(img)
    out = []
    with open(img, "rb") as f:
        f.seek(h.snapshots_offset)
        buf = f.read(64 * KiB * max(1, h.nb_snapshots))
    pos = 0
    for _ in range(h.nb_snapshots):
        (l1_off, l1_size, id_len, name_len, dsec, dnsec, vmclock, vmstate32,
         extra_len) = struct.unpack_from(">QIHHIIQII", buf, pos)
        extra = buf[pos + 40: pos + 40 + extra_len]
        p = pos + 40 + extra_len
        sid = buf[p: p + id_len].decode()
        name = buf[p + id_len: p + id_len + name_len].decode()
        vmstate = struct.unpack_from(">Q", extra, 0)[0] if extra_len >= 8 else vmstate32
        disk = struct.unpack_from(">Q", extra, 8)[0] if extra_len >= 16 else h.size
        out.append(dict(id=sid, name=name, date_sec=dsec, date_nsec=dnsec, vm_clock_ns=vmclock,
                        vm_state_size=vmstate, disk_size=disk, entry_offset=h.snapshots_offset + pos,
                        extra_len=extra_len))
        pos = (p + id_len + name_len + 7) // 8 * 8
    return out


def file_name(snap: dict, snaps: list[dict]) -> str:
    name = snap["name"]
    unique = sum(1 for s in snaps if s["name"] == name) == 1
    usable = name not in ("", ".", "..") and "/" not in name and "\0" not in name
    fits = len(name.encode()) + len(".json") <= 255  # (maps/snapshots/NAME.json too; NAME_MAX)
    return f"{name}.raw" if unique and usable and fits else f"id-{snap['id']}.raw"


def patch_snapshot_meta(img: Path, index: int, *, date_sec: int, date_nsec: int, vm_clock_ns: int,
                        vm_state_size: int) -> None:
    """Give snapshot INDEX distinctive metadata (qemu-img snapshot -c always writes 'now' and zeros)."""
    e = snapshot_table(img)[index]
    off = e["entry_offset"]
    patch(img, off + 16, struct.pack(">IIQI", date_sec, date_nsec, vm_clock_ns, vm_state_size & 0xFFFFFFFF))
    if e["extra_len"] >= 8:
        patch(img, off + 40, struct.pack(">Q", vm_state_size))


def strip_extra_data(img: Path) -> None:
    """Rewrite the snapshot table (in place, shorter) with no extra data in any entry, as old v2
    writers did: the snapshot's disk size is then the header's size."""
    h = Header(img)
    snaps = snapshot_table(img)
    with open(img, "rb") as f:
        f.seek(h.snapshots_offset)
        old = f.read(snaps[-1]["entry_offset"] - h.snapshots_offset + 4096)
    new = b""
    for s in snaps:
        rel = s["entry_offset"] - h.snapshots_offset
        l1_off, l1_size = struct.unpack_from(">QI", old, rel)
        ent = struct.pack(">QIHHIIQII", l1_off, l1_size, len(s["id"].encode()), len(s["name"].encode()),
                          s["date_sec"], s["date_nsec"], s["vm_clock_ns"], s["vm_state_size"], 0)
        ent += s["id"].encode() + s["name"].encode()
        new += ent + b"\0" * (-len(ent) % 8)
    end = snaps[-1]["entry_offset"] - h.snapshots_offset + 40 + snaps[-1]["extra_len"] + 64
    patch(img, h.snapshots_offset, new + b"\0" * max(0, end - len(new)))


# --------------------------------------------------------------------------
# images

def snap(img: Path, name: str) -> None:
    qimg("snapshot", "-c", name, img)


def build_v3(d: Path) -> Path:
    """v3, 4k clusters: compressed and zero clusters, duplicate names, '/', '.', unicode, a disk grown
    after most snapshots, and writes after the last snapshot."""
    d.mkdir(parents=True, exist_ok=True)
    img = create(d / "disk.qcow2", 4 * MiB, cluster_size=4096)
    src = Sources(d, seed=101)
    qio(img, f"write -c -s {src.txt(64 * KiB)} 2M 64k", f"write -s {src.rnd(MiB)} 0 1M",
        "write -P 0x11 3000001 12345")
    snap(img, "base")
    qio(img, f"write -s {src.rnd()} 1000 5000", "write -z 2M 4096", "write -P 0x22 3M 4096",
        f"write -P 0x23 {2 * MiB + 20000} 100")              # into a compressed cluster
    snap(img, "dup")
    qio(img, "write -P 0x33 500000 100000", "write -z -u 0 64k")
    snap(img, "dup")
    qio(img, f"write -s {src.rnd()} 700001 40000")
    snap(img, "a/b")
    snap(img, ".")
    snap(img, "été 2024")
    snap(img, "m" * 250)   # NAME.json is 255 bytes, the longest file name
    snap(img, "l" * 251)   # one more: a file name no Linux filesystem passes
    qimg("resize", "-q", img, str(6 * MiB + 512))
    qio(img, f"write -P 0x44 {5 * MiB} 100000", f"write -s {src.rnd()} {MiB} 300000",
        f"write -P 0x45 {6 * MiB - 100} 612")
    snap(img, "grown")
    qio(img, "write -P 0x55 0 1536k", f"write -s {src.rnd()} {4 * MiB - 3} 200000")
    return img


def build_v2(d: Path) -> Path:
    """compat=0.10, 512-byte clusters."""
    d.mkdir(parents=True, exist_ok=True)
    img = create(d / "disk.qcow2", 2 * MiB, compat="0.10", cluster_size=512)
    src = Sources(d, seed=102)
    qio(img, f"write -s {src.rnd()} 0 300000", f"write -c -s {src.txt(512)} 1M 512",
        f"write -s {src.txt()} {MiB + 4097} 70000")
    snap(img, "s1")
    qio(img, "write -P 0x18 1000 100000", "write -z 1M 4096")
    snap(img, "twice")
    qio(img, f"write -s {src.rnd()} 150001 300000")
    snap(img, "twice")
    snap(img, "x/y")
    qio(img, "write -P 0x19 0 2M")
    snap(img, "")
    qio(img, f"write -s {src.rnd()} 777 77777")
    return img


def build_v2_noextra(d: Path) -> Path:
    img = build_v2(d)
    strip_extra_data(img)
    assert all(s["extra_len"] == 0 for s in snapshot_table(img))
    assert len(info(img)["snapshots"]) == 5
    return img


def mixed_raw(path: Path, size: int, seed: int) -> Path:
    rng = random.Random(seed)
    buf = bytearray(size)
    pos = 0
    while pos < size:
        ln = min(rng.randint(4 * KiB, 300 * KiB), size - pos)
        kind = rng.randrange(3)
        if kind == 0:
            buf[pos:pos + ln] = rng.randbytes(ln)
        elif kind == 1:
            buf[pos:pos + ln] = (b"compressible %d " % pos * (ln // 10 + 1))[:ln]
        # kind 2: zeros (left unallocated by convert)
        pos += ln
    path.write_bytes(bytes(buf))
    return path


def build_compressed(d: Path) -> Path:
    """`qemu-img convert -c` (zstd, 64k clusters), snapshots between overwrites of compressed clusters."""
    d.mkdir(parents=True, exist_ok=True)
    raw = mixed_raw(d / "src.raw", 6 * MiB, seed=103)
    img = d / "disk.qcow2"
    qimg("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd", raw, img)
    raw.unlink()
    src = Sources(d, seed=103)
    snap(img, "packed")
    qio(img, "write -P 0x61 100000 3000", f"write -s {src.rnd()} {2 * MiB - 5} 150000",
        "write -z 3M 64k")
    snap(img, "touched")
    qio(img, "write -P 0x62 0 6M")
    snap(img, "flat")
    qio(img, f"write -s {src.rnd()} 4000000 300000")
    return img


def build_extl2(d: Path) -> Path:
    """Extended L2 (64k clusters, 2k subclusters): subcluster writes and zeroes around snapshots."""
    d.mkdir(parents=True, exist_ok=True)
    img = create(d / "disk.qcow2", 4 * MiB, extended_l2="on")
    src = Sources(d, seed=104)
    qio(img, "write -P 0x71 2048 2048", f"write -s {src.rnd()} 70000 5000",
        f"write -c -s {src.txt(64 * KiB)} 1M 64k", f"write -s {src.rnd()} 2M 200000")
    snap(img, "sub1")
    qio(img, "write -P 0x72 6144 2048", "write -P 0x73 66000 100", "write -z 2101248 4096",
        f"write -P 0x74 {MiB + 3000} 10")
    snap(img, "sub2")
    qio(img, "write -P 0x75 0 128k", "write -z -u 2M 64k", f"write -s {src.rnd()} {3 * MiB + 1} 4000")
    snap(img, "sub3")
    qio(img, "write -P 0x76 4096 1")
    return img


BUILDERS = {"v3": build_v3, "v2": build_v2, "v2-noextra": build_v2_noextra,
            "compressed": build_compressed, "extl2": build_extl2}


# --------------------------------------------------------------------------
# helpers

def unmount(mnt: Path) -> None:
    p = subprocess.run([QCOWFS, "umount", str(mnt)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"qcowfs umount {mnt}: {p.returncode} {p.stderr.strip()}"
    assert not is_mounted(mnt)


def expected_snapshot(img: Path, s: dict, tmp: Path) -> bytes:
    """QEMU's bytes of snapshot S, cut to the snapshot's own size.

    qemu-img convert -l gives the *current* disk size when the disk was resized afterwards; whatever
    lies past the snapshot's size must then be zeros."""
    size = s["disk_size"] // 512 * 512
    out = oracle(img, tmp / f"_snap{s['id']}.raw", snapshot_id=s["id"])
    data = out.read_bytes()
    out.unlink()
    assert len(data) >= size, f"qemu-img gave {len(data)} bytes for snapshot {s['id']} of size {size}"
    assert data[size:].count(0) == len(data) - size, f"qemu-img gave data past snapshot {s['id']}'s end"
    return data[:size]


def diff_at(a: bytes, b: bytes) -> str:
    if len(a) != len(b):
        return f"length {len(a)} != {len(b)}"
    i = next(k for k in range(len(a)) if a[k] != b[k])
    return f"first difference at {i:#x}: got {a[i:i + 16].hex()} expected {b[i:i + 16].hex()}"


def check_snapshot_files(img: Path, mnt: Path, tmp: Path) -> dict[str, bytes]:
    """Everything about MNT/snapshots/ against the image; returns {id: expected bytes}."""
    snaps = snapshot_table(img)
    qsnaps = {s["id"]: s for s in info(img).get("snapshots", [])}
    assert sorted(qsnaps) == sorted(s["id"] for s in snaps)
    errors: list[str] = []
    listed = sorted(os.listdir(mnt / "snapshots"))
    want = sorted(file_name(s, snaps) for s in snaps)
    if listed != want:
        errors.append(f"listing {listed} != {want}")
    expected: dict[str, bytes] = {}
    for s in snaps:
        q = qsnaps[s["id"]]
        assert q["name"] == s["name"] and q["date-sec"] == s["date_sec"] and q["vm-state-size"] == s["vm_state_size"]
        exp = expected[s["id"]] = expected_snapshot(img, s, tmp)
        f = mnt / "snapshots" / file_name(s, snaps)
        tag = f"snapshot {s['id']} {s['name']!r} ({f.name})"
        try:
            st = os.stat(f)
        except OSError as e:
            errors.append(f"{tag}: stat: {e}")
            continue
        if st.st_size != len(exp):
            errors.append(f"{tag}: size {st.st_size} != {len(exp)}")
        if not stat.S_ISREG(st.st_mode) or stat.S_IMODE(st.st_mode) != 0o444:
            errors.append(f"{tag}: mode {oct(st.st_mode)} (want regular file 0444)")
        date_ns = q["date-sec"] * 10**9 + q["date-nsec"]
        if st.st_mtime_ns != date_ns:
            errors.append(f"{tag}: mtime {st.st_mtime_ns} != snapshot date {date_ns}")
        got = f.read_bytes()
        if got != exp:
            errors.append(f"{tag}: content: {diff_at(got, exp)}")
        # extended attributes
        try:
            names = set(os.listxattr(f))
        except OSError as e:
            errors.append(f"{tag}: listxattr: {e}")
            continue
        missing = [x for x in XATTRS if x not in names]
        if missing:
            errors.append(f"{tag}: xattrs missing {missing} (have {sorted(names)})")
            continue
        x = {k: os.getxattr(f, k).decode() for k in XATTRS}
        want_x = {"user.qcow2.id": q["id"], "user.qcow2.name": q["name"],
                  "user.qcow2.vm_clock_ns": str(q["vm-clock-sec"] * 10**9 + q["vm-clock-nsec"]),
                  "user.qcow2.vm_state_size": str(q["vm-state-size"]),
                  "user.qcow2.disk_size": str(s["disk_size"])}
        for k, v in want_x.items():
            if x[k] != v:
                errors.append(f"{tag}: {k} = {x[k]!r}, want {v!r}")
        try:
            dt = datetime.fromisoformat(x["user.qcow2.date"])
            if dt.tzinfo is None:
                errors.append(f"{tag}: user.qcow2.date {x['user.qcow2.date']!r} has no UTC offset")
            elif abs(dt.timestamp() * 10**6 - date_ns / 1000) >= 1.0:
                errors.append(f"{tag}: user.qcow2.date {x['user.qcow2.date']!r} != {date_ns} ns since epoch")
        except ValueError:
            errors.append(f"{tag}: user.qcow2.date {x['user.qcow2.date']!r} is not ISO 8601")
        # the command-line tool sees the same
        p = sh("getfattr", "--absolute-names", "-d", "-m", "^user\\.qcow2\\.", "-e", "text", f, check=False)
        if f'user.qcow2.id="{q["id"]}"' not in p.stdout or "user.qcow2.vm_state_size=" not in p.stdout:
            errors.append(f"{tag}: getfattr -d: {p.stdout!r} {p.stderr!r}")
    assert not errors, f"{img}:\n  " + "\n  ".join(errors)
    return expected


# --------------------------------------------------------------------------
# read-only: names, sizes, content, metadata

@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_snapshot_files(kind: str, tmp_path: Path, mount) -> None:
    img = BUILDERS[kind](tmp_path / "img")
    if kind == "v3":
        # distinctive metadata: a date in the past, a VM clock, a VM state size above 4 GiB
        patch_snapshot_meta(img, 1, date_sec=1_000_000_000, date_nsec=123_456_789,
                            vm_clock_ns=3_723_000_000_042, vm_state_size=5 * (1 << 30) + 4096)
        q = info(img)["snapshots"][1]
        assert (q["date-sec"], q["date-nsec"], q["vm-state-size"]) == (1_000_000_000, 123_456_789, 5 * (1 << 30) + 4096)
        sizes = {s["disk_size"] for s in snapshot_table(img)}
        assert sizes == {4 * MiB, 6 * MiB + 512}, sizes
    before = hashlib.sha256(img.read_bytes()).hexdigest()
    mnt = mount(img)
    check_snapshot_files(img, mnt, tmp_path)
    unmount(mnt)
    assert hashlib.sha256(img.read_bytes()).hexdigest() == before, "read-only mount changed the image"


def test_no_snapshots_empty_dir(tmp_path: Path, mount) -> None:
    img = create(tmp_path / "disk.qcow2", MiB)
    mnt = mount(img)
    assert os.listdir(mnt / "snapshots") == []
    assert stat.S_ISDIR(os.stat(mnt / "snapshots").st_mode)


def test_deleted_snapshot_disappears(tmp_path: Path, mount) -> None:
    """`qemu-img snapshot -d` of one of two snapshots named alike: the other gets its own name back."""
    img = create(tmp_path / "disk.qcow2", MiB)
    qio(img, "write -P 1 0 64k")
    snap(img, "same")
    qio(img, "write -P 2 0 64k")
    snap(img, "same")
    snap(img, "other")
    # qemu-img snapshot -d deletes the first snapshot of that name (id 1)
    sh("qemu-img", "snapshot", "-d", "same", img)
    assert [s["id"] for s in info(img)["snapshots"]] == ["2", "3"]
    mnt = mount(img)
    assert sorted(os.listdir(mnt / "snapshots")) == ["other.raw", "same.raw"]
    check_snapshot_files(img, mnt, tmp_path)


@pytest.mark.parametrize("read_only", [True, False], ids=["ro-mount", "rw-mount"])
def test_snapshot_files_refuse_writes(read_only: bool, tmp_path: Path, mount) -> None:
    img = build_v3(tmp_path / "img")
    snaps = snapshot_table(img)
    mnt = mount(img, read_only=read_only)
    f = mnt / "snapshots" / "base.raw"
    st0 = os.stat(f)
    data0 = f.read_bytes()
    errors: list[str] = []
    for flags, what in ((os.O_WRONLY, "O_WRONLY"), (os.O_RDWR, "O_RDWR"), (os.O_WRONLY | os.O_TRUNC, "O_TRUNC"),
                        (os.O_WRONLY | os.O_APPEND, "O_APPEND")):
        try:
            fd = os.open(f, flags)
        except OSError as e:
            if e.errno not in (errno.EROFS, errno.EACCES):
                errors.append(f"open {what}: errno {errno.errorcode.get(e.errno)} (want EROFS or EACCES)")
        else:
            try:
                os.write(fd, b"xx")
            except OSError:
                pass
            os.close(fd)
            errors.append(f"open {what} succeeded")
    for what, fn in (("truncate", lambda: os.truncate(f, 0)), ("truncate-grow", lambda: os.truncate(f, 10 * MiB)),
                     ("chmod", lambda: os.chmod(f, 0o666)), ("setxattr", lambda: os.setxattr(f, "user.x", b"1")),
                     ("removexattr", lambda: os.removexattr(f, "user.qcow2.id")),
                     ("unlink", lambda: os.unlink(f)), ("rename", lambda: os.rename(f, mnt / "snapshots" / "z.raw")),
                     ("create", lambda: open(mnt / "snapshots" / "new.raw", "wb").close()),
                     ("mkdir", lambda: os.mkdir(mnt / "snapshots" / "dir"))):
        try:
            fn()
        except OSError:
            pass
        else:
            errors.append(f"{what} succeeded")
    # writing through a read-only descriptor
    fd = os.open(f, os.O_RDONLY)
    try:
        os.pwrite(fd, b"x", 0)
        errors.append("pwrite on an O_RDONLY descriptor succeeded")
    except OSError:
        pass
    finally:
        os.close(fd)
    try:
        os.utime(f, (0, 0))
    except OSError:
        pass
    st1 = os.stat(f)
    if (st1.st_size, st1.st_mode, st1.st_mtime_ns) != (st0.st_size, st0.st_mode, st0.st_mtime_ns):
        errors.append(f"stat changed: {st0} -> {st1}")
    if f.read_bytes() != data0:
        errors.append("content changed")
    if sorted(os.listdir(mnt / "snapshots")) != sorted(file_name(s, snaps) for s in snaps):
        errors.append(f"listing changed: {os.listdir(mnt / 'snapshots')}")
    assert not errors, "\n  ".join(errors)


# --------------------------------------------------------------------------
# read-write mount: writes to disk.raw never reach a snapshot

@pytest.mark.parametrize("kind", ["v3", "v2", "compressed", "extl2"])
def test_disk_writes_leave_snapshots_alone(kind: str, tmp_path: Path) -> None:
    img = BUILDERS[kind](tmp_path / "img")
    snaps = snapshot_table(img)
    expected = {s["id"]: expected_snapshot(img, s, tmp_path) for s in snaps}
    model = bytearray(oracle(img, tmp_path / "disk.raw").read_bytes())
    vsize = len(model)
    names = {s["id"]: file_name(s, snaps) for s in snaps}
    rng = random.Random(kind)
    mnt = tmp_path / "mnt"
    errors: list[str] = []

    def check_live(when: str) -> None:
        for sid, exp in expected.items():
            got = (mnt / "snapshots" / names[sid]).read_bytes()
            if got != exp:
                errors.append(f"{when}: snapshot {sid} ({names[sid]}): {diff_at(got, exp)}")
        got = (mnt / "disk.raw").read_bytes()
        if got != model:
            errors.append(f"{when}: disk.raw: {diff_at(got, bytes(model))}")

    with mounted(img, mnt, read_only=False):
        check_live("before writes")
        fd = os.open(mnt / "disk.raw", os.O_RDWR)
        try:
            # every cluster of the first MiB is shared with a snapshot; then random places
            writes = [(0, 1), (4095, 2), (65535, 3), (200000, 70000), (vsize - 1, 1)]
            writes += [(off, rng.randint(1, 150000)) for off in (rng.randrange(vsize) for _ in range(40))]
            for i, (off, ln) in enumerate(writes):
                ln = min(ln, vsize - off)
                data = rng.randbytes(ln) if i % 3 else bytes([i % 251 + 1]) * ln
                assert os.pwrite(fd, data, off) == ln
                model[off:off + ln] = data
                if i == 20:
                    os.fsync(fd)
                    check_live("after 21 writes")
            os.fsync(fd)
        finally:
            os.close(fd)
        check_live("after all writes")
        unmount(mnt)
    p = sh("qemu-img", "check", img, check=False)
    if p.returncode != 0:
        errors.append(f"qemu-img check: rc {p.returncode}: {p.stdout}{p.stderr}")
    assert [s["id"] for s in snapshot_table(img)] == list(expected)
    for s in snapshot_table(img):
        if expected_snapshot(img, s, tmp_path) != expected[s["id"]]:
            errors.append(f"after unmount, qemu-img sees snapshot {s['id']} changed")
    if oracle(img, tmp_path / "after.raw").read_bytes() != model:
        errors.append("after unmount, qemu-img sees a disk different from the writes made")
    assert not errors, f"{kind}:\n  " + "\n  ".join(errors)


def test_concurrent_snapshot_and_disk_io(tmp_path: Path) -> None:
    """Threads reading snapshot files at random while another writes to disk.raw and another reads
    the part of disk.raw the writer does not touch."""
    img = build_v3(tmp_path / "img")
    snaps = snapshot_table(img)
    expected = {file_name(s, snaps): expected_snapshot(img, s, tmp_path) for s in snaps}
    disk0 = oracle(img, tmp_path / "disk.raw").read_bytes()
    vsize = len(disk0)
    half = vsize // 2
    mnt = tmp_path / "mnt"
    errors: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def report(msg: str) -> None:
        with lock:
            errors.append(msg)

    def snap_reader(seed: int) -> None:
        rng = random.Random(seed)
        fds = {n: os.open(mnt / "snapshots" / n, os.O_RDONLY) for n in expected}
        try:
            for _ in range(150):
                n = rng.choice(sorted(expected))
                exp = expected[n]
                off = rng.randrange(len(exp))
                ln = rng.choice([1, 511, 4096, 4097, 65536, 200001])
                got = os.pread(fds[n], ln, off)
                if got != exp[off:off + ln]:
                    report(f"{n}: pread({ln}, {off:#x}) wrong")
        except OSError as e:
            report(f"snapshot reader: {e}")
        finally:
            for fd in fds.values():
                os.close(fd)

    def disk_reader() -> None:
        rng = random.Random(7)
        fd = os.open(mnt / "disk.raw", os.O_RDONLY)
        try:
            while not stop.is_set():
                off = rng.randrange(half, vsize)
                ln = rng.randint(1, 100000)
                got = os.pread(fd, ln, off)
                if got != disk0[off:off + ln]:
                    report(f"disk.raw: pread({ln}, {off:#x}) in the untouched half wrong")
        except OSError as e:
            report(f"disk reader: {e}")
        finally:
            os.close(fd)

    def writer() -> None:
        rng = random.Random(8)
        fd = os.open(mnt / "disk.raw", os.O_WRONLY)
        try:
            while not stop.is_set():
                ln = rng.randint(1, 64 * KiB)
                off = rng.randrange(0, half - ln)
                os.pwrite(fd, rng.randbytes(ln), off)
        except OSError as e:
            report(f"writer: {e}")
        finally:
            os.close(fd)

    with mounted(img, mnt, read_only=False):
        bg = [threading.Thread(target=writer), threading.Thread(target=disk_reader)]
        readers = [threading.Thread(target=snap_reader, args=(i,)) for i in range(4)]
        for t in bg + readers:
            t.start()
        for t in readers:
            t.join(timeout=120)
        stop.set()
        for t in bg:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in bg + readers), "I/O threads hung"
        unmount(mnt)
    assert sh("qemu-img", "check", img, check=False).returncode == 0
    for s in snapshot_table(img):
        assert expected_snapshot(img, s, tmp_path) == expected[file_name(s, snaps)], f"snapshot {s['id']} changed"
    assert not errors, "\n  ".join(errors[:20])


# --------------------------------------------------------------------------
# a snapshot holding an ext4 filesystem, loop-mounted next to the live disk

def tree(root: Path, seed: int) -> dict[str, str]:
    rng = random.Random(seed)
    sums = {}
    for i, size in enumerate([0, 1, 4095, 4097, 100000, 1 * MiB + 3] + [rng.randint(1, 200000) for _ in range(10)]):
        p = root / f"dir{i % 3}" / f"file{seed}-{i}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        data = rng.randbytes(size) if i % 2 else (b"line %d\n" % i * (size // 7 + 1))[:size]
        p.write_bytes(data)
        sums[str(p.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return sums


def sums_of(root: Path, names) -> dict[str, str]:
    return {n: hashlib.sha256((root / n).read_bytes()).hexdigest() for n in names}


def umount_dir(path: Path) -> None:
    for args in (["umount", str(path)], ["umount", "-l", str(path)]):
        if not is_mounted(path):
            return
        subprocess.run(args, capture_output=True, timeout=60)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for losetup/mount")
def test_loop_mount_snapshot_next_to_live_disk(tmp_path: Path) -> None:
    size = 32 * MiB
    fs1, fs2 = tmp_path / "fs1.raw", tmp_path / "fs2.raw"
    src1, src2 = tmp_path / "src1", tmp_path / "src2"
    sums1, sums2 = tree(src1, 1), tree(src2, 2)
    for raw, src in ((fs1, src1), (fs2, src2)):
        with open(raw, "wb") as f:
            f.truncate(size)
        sh("mkfs.ext4", "-q", "-F", "-d", src, raw)
    img = tmp_path / "disk.qcow2"
    qimg("convert", "-q", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=16384", fs1, img)
    snap(img, "pristine")
    # replace the whole disk by the second filesystem: every cluster of the snapshot gets shadowed
    qio(img, f"write -s {fs2} 0 {size}")
    fs1.unlink()
    fs2.unlink()

    mnt = tmp_path / "mnt"
    smnt, dmnt = tmp_path / "snapfs", tmp_path / "diskfs"
    smnt.mkdir()
    dmnt.mkdir()
    with mounted(img, mnt, read_only=False):
        try:
            with loop_device(mnt / "snapshots" / "pristine.raw", read_only=True) as sdev, \
                    loop_device(mnt / "disk.raw", read_only=False) as ddev:
                sh("mount", "-t", "ext4", "-o", "ro", sdev, smnt)
                sh("mount", "-t", "ext4", ddev, dmnt)
                assert sums_of(smnt, sums1) == sums1, "snapshot filesystem content"
                assert sums_of(dmnt, sums2) == sums2, "live filesystem content"
                # change the live filesystem while the snapshot is mounted
                rng = random.Random(3)
                for n in list(sums2)[:6]:
                    (dmnt / n).write_bytes(rng.randbytes(150000))
                (dmnt / "new").write_bytes(rng.randbytes(2 * MiB))
                subprocess.run(["sync", "-f", str(dmnt)], timeout=60)
                # Forget what the snapshot's stack cached, so that it is read
                # from the daemon again: its files' pages, the loop device's
                # buffers and the pages of the file under it. (Not the global
                # drop_caches: it would also empty the caches of tests running
                # beside this one, such as those read-around pushed into.)
                for path in [smnt / n for n in sums1] + [mnt / "snapshots" / "pristine.raw"]:
                    sh("dd", f"if={path}", "iflag=nocache", "count=0", "status=none")  # (the whole file)
                sh("blockdev", "--flushbufs", sdev)
                assert sums_of(smnt, sums1) == sums1, "snapshot filesystem changed while the disk was written"
                umount_dir(smnt)
                umount_dir(dmnt)
                sh("e2fsck", "-fn", sdev)
                sh("e2fsck", "-fn", ddev)
        finally:
            umount_dir(smnt)
            umount_dir(dmnt)
        unmount(mnt)
    assert sh("qemu-img", "check", img, check=False).returncode == 0
    # and QEMU still sees the pristine filesystem in the snapshot
    out = oracle(img, tmp_path / "snap.raw", snapshot_id="1")
    with loop_device(out, read_only=True) as dev:
        sh("mount", "-t", "ext4", "-o", "ro", dev, smnt)
        try:
            assert sums_of(smnt, sums1) == sums1
        finally:
            umount_dir(smnt)


# --------------------------------------------------------------------------
# qcowfs info

def test_info_lists_snapshots(tmp_path: Path) -> None:
    img = build_v3(tmp_path / "img")
    want = info(img)["snapshots"]
    p = subprocess.run([QCOWFS, "info", str(img)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    for s in want:
        # one line per snapshot starting with its id and naming it, as `qemu-img info` does
        hit = [ln for ln in lines if ln.split() and ln.split()[0] == s["id"] and s["name"] in ln]
        assert hit, f"snapshot {s['id']} {s['name']!r} not listed:\n{p.stdout}"
    p = subprocess.run([QCOWFS, "info", "--json", str(img)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout).get("snapshots")
    keys = ("id", "name", "date-sec", "date-nsec", "vm-clock-sec", "vm-clock-nsec", "vm-state-size")
    assert [{k: s.get(k) for k in keys} for s in got] == [{k: s[k] for k in keys} for s in want]
