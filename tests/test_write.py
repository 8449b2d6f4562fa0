"""Read-write mount: random write workloads through MNT/disk.raw, mirrored into a raw reference.

After an fsync and a clean unmount, QEMU must see exactly the reference
(`qemu-img compare`), `qemu-img check` must find no error and no leak, and
every internal snapshot must read as before.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import subprocess
import zlib
from pathlib import Path
from typing import Iterable, Iterator

import pytest

from conftest import is_mounted, mounted
from images import (KiB, MiB, MATRIX, build, Header, create, first_difference, info, oracle, qimg, qio,
                    Sources, scatter_cmds)

# --------------------------------------------------------------------------
# helpers shared by the other read-write test files


def qcheck(img: Path) -> tuple[int, dict]:
    """`qemu-img check --output=json` -> (exit code, parsed report)."""
    img = Path(img).resolve()
    p = subprocess.run(["qemu-img", "check", "--output=json", str(img)], capture_output=True, text=True,
                       cwd=img.parent, timeout=120)
    try:
        report = json.loads(p.stdout) if p.stdout.strip() else {}
    except json.JSONDecodeError:
        report = {"raw": p.stdout}
    report["_stderr"] = p.stderr
    return p.returncode, report


def assert_clean(img: Path) -> None:
    rc, rep = qcheck(img)
    assert rc == 0 and not rep.get("leaks") and not rep.get("corruptions") and not rep.get("check-errors"), \
        f"qemu-img check {img}: exit {rc}: {rep}"


def qcompare(img: Path, ref: Path) -> subprocess.CompletedProcess:
    img = Path(img).resolve()
    return subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(img), str(Path(ref).resolve())],
                          capture_output=True, text=True, cwd=img.parent, timeout=120)


def assert_same(img: Path, ref: Path) -> None:
    p = qcompare(img, ref)
    assert p.returncode == 0, f"qemu-img compare {img} {ref}: exit {p.returncode}: {p.stdout}{p.stderr}"


def snapshot_ids(img: Path) -> list[str]:
    return [s["id"] for s in info(img).get("snapshots", [])]


def sha_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def in_proc_mounts(mnt: Path) -> bool:
    """Also true for a mount whose daemon died (mountpoint(1) fails on those)."""
    want = str(Path(mnt).absolute())
    with open("/proc/self/mounts") as f:
        for line in f:
            mp = line.split()[1].encode().decode("unicode_escape")
            if mp == want:
                return True
    return False


def lazy_unmount(mnt: Path) -> None:
    for cmd in (["fusermount3", "-uz"], ["umount", "-l"]):
        if not in_proc_mounts(mnt):
            return
        subprocess.run([*cmd, str(mnt)], capture_output=True, timeout=60)


@contextlib.contextmanager
def qcowfs_mount(image: Path, mnt: Path, *extra: str, read_only: bool = False) -> Iterator[Path]:
    """conftest.mounted (read-write by default), plus cleanup of a mount whose daemon died:
    that is reported as a failure, after the cleanup."""
    dead = False
    try:
        with mounted(Path(image).resolve(), Path(mnt), *extra, read_only=read_only) as m:
            yield m
    finally:
        if in_proc_mounts(mnt):
            dead = True
            lazy_unmount(mnt)
    assert not dead, f"the qcowfs mount on {mnt} was still listed after unmounting (daemon died?)"


def pwrite_all(fd: int, data: bytes, off: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, off)
        assert n > 0, f"pwrite returned {n} at {off}"
        view = view[n:]
        off += n


def mirror_writes(disk: Path, ref: Path, writes: Iterable[tuple[int, bytes]]) -> None:
    """Each (offset, data) written to DISK and to the reference raw REF; DISK fsync'd."""
    fd, rfd = os.open(disk, os.O_RDWR), os.open(ref, os.O_RDWR)
    try:
        for off, data in writes:
            pwrite_all(fd, data, off)
            pwrite_all(rfd, data, off)
        os.fsync(fd)
    finally:
        os.close(fd)
        os.close(rfd)


class Workload:
    """Random writes into the mounted disk, mirrored into a reference raw file."""

    def __init__(self, disk: Path, ref: Path, vsize: int, cluster: int, seed: int):
        self.fd = os.open(disk, os.O_RDWR)
        self.ref = os.open(ref, os.O_RDWR)
        self.vsize = vsize
        self.cs = cluster
        self.rng = random.Random(seed)
        self.written: list[tuple[int, int]] = []
        self.log: list[str] = []

    def close(self) -> None:
        os.close(self.fd)
        os.close(self.ref)

    def write(self, off: int, data: bytes) -> None:
        off = max(0, min(off, self.vsize - len(data)))
        self.log.append(f"{off}+{len(data)}")
        pwrite_all(self.fd, data, off)
        pwrite_all(self.ref, data, off)
        self.written.append((off, len(data)))

    def content(self, n: int) -> bytes:
        r = self.rng.random()
        if r < 0.55:
            return self.rng.randbytes(n)
        if r < 0.75:
            return bytes([self.rng.randint(1, 255)]) * n
        if r < 0.85:
            return bytes(n)                                    # partial zero buffers
        half = self.rng.randint(0, n)                          # half zeros, half data
        return bytes(half) + self.rng.randbytes(n - half)

    def size(self) -> int:
        r = self.rng.random()
        if r < 0.15:
            return self.rng.randint(1, 16)
        if r < 0.45:
            return self.rng.randint(17, 4 * KiB)
        if r < 0.75:
            return self.rng.randint(4 * KiB, 64 * KiB)
        return self.rng.randint(64 * KiB, 300 * KiB)

    def step(self) -> int:
        rng, cs = self.rng, self.cs
        kind = rng.random()
        if kind < 0.12:
            # whole-cluster zero buffers, cluster aligned
            k = max(1, min(4, (256 * KiB) // cs)) if cs <= 256 * KiB else 1
            n = cs * rng.randint(1, k)
            n = min(n, self.vsize)
            off = rng.randrange(0, self.vsize - n + 1) // cs * cs
            self.write(off, bytes(n))
            return n
        n = self.size()
        if kind < 0.35 and self.written:
            # overwrite (partly) something written before
            o, ln = rng.choice(self.written)
            off = o + rng.randint(-min(o, 3000), ln)
        elif kind < 0.6:
            # across a cluster boundary, unaligned
            b = rng.randrange(1, max(2, self.vsize // cs)) * cs
            off = b - rng.randint(1, max(1, min(n - 1, cs))) if n > 1 else b - 1
        else:
            off = rng.randrange(0, self.vsize)
        self.write(off, self.content(n))
        return n

    def run(self, budget: int, first: list[tuple[int, int]] = ()) -> None:
        # fixed writes first: start, end, given hot spots
        self.write(0, self.rng.randbytes(3 * KiB + 5))
        self.write(self.vsize - 777, self.rng.randbytes(777))
        for off, n in first:
            self.write(off, self.content(n))
        done = 0
        while done < budget:
            done += self.step()

    def fsync(self) -> None:
        os.fsync(self.fd)
        os.fsync(self.ref)


def verify_live(mnt: Path, ref: Path) -> None:
    d = first_difference(mnt / "disk.raw", ref)
    assert d is None, f"disk.raw differs from the reference at byte {d} while mounted"


# --------------------------------------------------------------------------
# layouts


def _refcount_512(bits: int):
    def fn(d: Path) -> Path:
        img = create(d / "disk.qcow2", 16 * MiB, refcount_bits=bits, cluster_size=512)
        qio(img, "write -P 0x11 0 64k", f"write -P 0x22 {5 * MiB + 3} 100k")
        return img
    return fn


def _dirty_patched(d: Path) -> Path:
    img = create(d / "disk.qcow2", 8 * MiB, lazy_refcounts="on", cluster_size=4096)
    src = Sources(d, seed=99)
    qio(img, *scatter_cmds(src, 8 * MiB, 4096, seed=99))
    assert_clean(img)                         # refcounts are fine before the dirty bit is set
    with open(img, "r+b") as f:
        f.seek(72 + 7)
        b = f.read(1)[0]
        f.seek(72 + 7)
        f.write(bytes([b | 1]))
    assert info(img)["dirty-flag"] is True
    return img


def _snapshots_many_l2(d: Path) -> Path:
    """Small clusters so that L2 tables (not only data clusters) are shared with two snapshots."""
    img = create(d / "disk.qcow2", 8 * MiB, cluster_size=1024)
    src = Sources(d, seed=98)
    qio(img, f"write -s {src.rnd(2 * MiB)} 0 2M", f"write -c -s {src.txt()} 3M 64k")
    qimg("snapshot", "-c", "a", img)
    qio(img, "write -P 0x55 100000 3000")
    qimg("snapshot", "-c", "b", img)
    return img


def _backing_larger_overlay(d: Path) -> Path:
    """qcow2 backing of 3 MiB + 512 with 4k clusters under a 16 MiB overlay with 64k clusters."""
    src = Sources(d, seed=97)
    base = create(d / "base.qcow2", 3 * MiB + 512, cluster_size=4096)
    qio(base, f"write -s {src.rnd(3 * MiB)} 0 {3 * MiB + 512}")
    return create(d / "disk.qcow2", 16 * MiB, backing="base.qcow2", backing_fmt="qcow2", cwd=d)


LOCAL = {
    "refcount1-c512": _refcount_512(1),
    "refcount2-c512": _refcount_512(2),
    "refcount8-c512": _refcount_512(8),
    "refcount16-c512": _refcount_512(16),
    "refcount64-c512": _refcount_512(64),
    "dirty-patched": _dirty_patched,
    "snapshots-shared-l2": _snapshots_many_l2,
    "backing-larger-overlay": _backing_larger_overlay,
}

FROM_MATRIX = [
    "v2-c512", "v2-c64k", "v2-c2M", "v3-c512", "v3-c64k", "v3-c2M",
    "qemu-io-c-zlib", "qemu-io-c-zstd", "convert-c-zstd-c4k",
    "backing-qcow2", "backing-raw-shorter", "backing-shorter", "backing-chain4",
    "extl2-c64k", "extl2-c64k-backing", "extl2-c16k-backing",
    "datafile", "datafile-raw", "datafile-extl2",
    "snapshots", "snapshots-v2",
    "zero-prealloc", "zero-metadata-prealloc-v3",
    "dirty-lazy-refcounts",
]

CASES = FROM_MATRIX + list(LOCAL)


def build_case(name: str, d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    if name in LOCAL:
        return LOCAL[name](d)
    return MATRIX[name](d)


def budget_for(name: str) -> int:
    if name.startswith("refcount") and name.endswith("c512"):
        return 4 * MiB           # forces new refcount blocks and refcount table growth
    return 1536 * KiB


@pytest.mark.parametrize("name", CASES)
def test_random_writes(name: str, tmp_path: Path) -> None:
    random_writes(name, tmp_path)


@pytest.mark.parametrize("name", ["v3-c64k", "backing-qcow2", "extl2-c16k-backing", "refcount16-c512"])
def test_random_writes_page_cache(name: str, tmp_path: Path) -> None:
    """-o page_cache: the kernel's buffered write path (partial pages read first)."""
    random_writes(name, tmp_path, "-o", "page_cache")


def random_writes(name: str, tmp_path: Path, *mount_options: str) -> None:
    img = build_case(name, tmp_path / "img").resolve()
    vsize = info(img)["virtual-size"]
    cs = info(img)["cluster-size"]
    ref = oracle(img, tmp_path / "ref.raw")
    snaps = {sid: sha_file(oracle(img, tmp_path / f"snap-{sid}.raw", snapshot_id=sid)) for sid in snapshot_ids(img)}
    rt_clusters_before = Header(img).refcount_table_clusters

    with qcowfs_mount(img, tmp_path / "mnt", *mount_options) as mnt:
        disk = mnt / "disk.raw"
        assert disk.stat().st_size == vsize
        w = Workload(disk, ref, vsize, cs, seed=zlib.crc32(name.encode()))
        try:
            hot = [(MiB - 100, 5000), (2 * MiB + 7, 70000), (vsize // 2 - 1, 2), (vsize // 4, cs)]
            w.run(budget_for(name), first=[(o, n) for o, n in hot if o + n <= vsize])
            w.fsync()
        finally:
            w.close()
        verify_live(mnt, ref)
    assert not is_mounted(tmp_path / "mnt")

    assert_clean(img)
    assert_same(img, ref)
    for sid, want in snaps.items():
        got = sha_file(oracle(img, tmp_path / f"snap-{sid}-after.raw", snapshot_id=sid))
        assert got == want, f"snapshot {sid} changed by writes to the active disk"
    meta = info(img)
    assert meta["virtual-size"] == vsize
    assert meta.get("dirty-flag") in (False, None), f"dirty bit left set: {meta}"
    if name == "refcount64-c512":
        assert Header(img).refcount_table_clusters > rt_clusters_before, "workload did not grow the refcount table"
    if name == "datafile-raw":
        data = (img.parent / "disk.data").read_bytes()
        want = ref.read_bytes()
        assert len(data) <= vsize
        assert data == want[:len(data)] and not any(want[len(data):]), \
            "external raw data file differs from the reference"


# --------------------------------------------------------------------------
# resize


@pytest.mark.parametrize("case", ["empty-c64k", "data-c4k-v2", "backing-larger"])
def test_grow(case: str, tmp_path: Path) -> None:
    d = tmp_path / "img"
    d.mkdir()
    if case == "empty-c64k":
        img = create(d / "disk.qcow2", 16 * MiB)
    elif case == "data-c4k-v2":
        img = create(d / "disk.qcow2", 8 * MiB + 512, cluster_size=4096, compat="0.10")
        qio(img, f"write -P 0x33 {8 * MiB - 1000} 1512", "write -P 0x34 0 1M")
    else:
        # the backing file is larger than the overlay: the area made by growing must read zeros,
        # not the backing file's data (as QEMU does it)
        base = create(d / "base.qcow2", 12 * MiB)
        qio(base, "write -P 0x77 0 12M")
        img = create(d / "disk.qcow2", 4 * MiB, backing="base.qcow2", backing_fmt="qcow2", cwd=d)
        qio(img, "write -P 0x35 1M 4k")
    img = img.resolve()
    old = info(img)["virtual-size"]
    new = old + 5 * MiB + 3 * 512
    ref = oracle(img, tmp_path / "ref.raw")
    with qcowfs_mount(img, tmp_path / "mnt") as mnt:
        disk = mnt / "disk.raw"
        os.truncate(disk, new)
        assert disk.stat().st_size == new
        with open(disk, "rb") as f:
            f.seek(old)
            tail = f.read()
        assert len(tail) == new - old and not any(tail), "grown area does not read zeros"
        with open(ref, "r+b") as f:
            f.truncate(new)
        # write into the new area and across the old end
        mirror_writes(disk, ref, ((old - 100, b"\xab" * 300), (new - 4097, os.urandom(4097)),
                                  (old + MiB + 1, os.urandom(70000))))
        verify_live(mnt, ref)
    assert info(img)["virtual-size"] == new
    assert_clean(img)
    assert_same(img, ref)


def test_shrink_refused(tmp_path: Path) -> None:
    img = create(tmp_path / "disk.qcow2", 8 * MiB).resolve()
    qio(img, "write -P 0x41 0 8M")
    ref = oracle(img, tmp_path / "ref.raw")
    with qcowfs_mount(img, tmp_path / "mnt") as mnt:
        disk = mnt / "disk.raw"
        with pytest.raises(OSError) as e:
            os.truncate(disk, 4 * MiB)
        assert e.value.errno == errno.EINVAL, e.value
        with pytest.raises(OSError):
            with open(disk, "r+b") as f:
                f.truncate(0)
        assert disk.stat().st_size == 8 * MiB
        verify_live(mnt, ref)
    assert info(img)["virtual-size"] == 8 * MiB
    assert_clean(img)
    assert_same(img, ref)


def test_write_past_end(tmp_path: Path) -> None:
    vsize = 4 * MiB
    img = create(tmp_path / "disk.qcow2", vsize, cluster_size=4096).resolve()
    ref = oracle(img, tmp_path / "ref.raw")
    with qcowfs_mount(img, tmp_path / "mnt") as mnt:
        disk = mnt / "disk.raw"
        fd = os.open(disk, os.O_RDWR)
        try:
            for off in (vsize, vsize + 1, vsize + 10 * MiB):
                try:
                    n = os.pwrite(fd, b"x" * 1000, off)
                except OSError as e:
                    assert e.errno in (errno.ENOSPC, errno.EFBIG), e
                else:
                    assert n == 0, f"pwrite at {off} past the end wrote {n} bytes"
            # straddling the end: short write or error, never growing the disk
            data = os.urandom(3000)
            try:
                n = os.pwrite(fd, data, vsize - 1000)
            except OSError as e:
                assert e.errno in (errno.ENOSPC, errno.EFBIG), e
                n = 0
            assert n in (0, 1000), n
            if n:
                with open(ref, "r+b") as f:
                    f.seek(vsize - 1000)
                    f.write(data[:1000])
            os.fsync(fd)
        finally:
            os.close(fd)
        assert disk.stat().st_size == vsize
        verify_live(mnt, ref)
    assert info(img)["virtual-size"] == vsize
    assert_clean(img)
    assert_same(img, ref)


# --------------------------------------------------------------------------
# read-only mount


@pytest.mark.parametrize("how", [("--read-only",), ("-o", "ro")])
def test_read_only_mount_refuses_writes(how: tuple[str, ...], tmp_path: Path) -> None:
    img = build("snapshots", tmp_path / "img").resolve()
    before = sha_file(img)
    mtime = img.stat().st_mtime_ns
    with qcowfs_mount(img, tmp_path / "mnt", *how) as mnt:
        disk = mnt / "disk.raw"
        with pytest.raises(OSError) as e:
            os.open(disk, os.O_RDWR)
        assert e.value.errno in (errno.EROFS, errno.EACCES), e.value
        with pytest.raises(OSError) as e:
            os.open(disk, os.O_WRONLY)
        assert e.value.errno in (errno.EROFS, errno.EACCES), e.value
        with pytest.raises(OSError) as e:
            os.truncate(disk, 64 * MiB)
        assert e.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM), e.value
        for snap in (mnt / "snapshots").iterdir():
            with pytest.raises(OSError):
                os.open(snap, os.O_RDWR)
        with open(disk, "rb") as f:
            f.read(MiB)
    assert sha_file(img) == before, "a read-only mount changed the image"
    assert img.stat().st_mtime_ns == mtime


def test_snapshot_files_refuse_writes_on_rw_mount(tmp_path: Path) -> None:
    img = build("snapshots", tmp_path / "img").resolve()
    oracles = [oracle(img, tmp_path / f"s{sid}.raw", snapshot_id=sid).read_bytes() for sid in snapshot_ids(img)]
    with qcowfs_mount(img, tmp_path / "mnt") as mnt:
        snaps = sorted((mnt / "snapshots").iterdir())
        assert len(snaps) == len(oracles)
        before = {s.name: s.read_bytes() for s in snaps}
        # qemu-img convert -l pads a snapshot to the active disk's size: compare the snapshot's own size
        assert sorted(hashlib.sha256(o[:len(b)]).hexdigest() for o, b in zip(oracles, before.values())) == \
            sorted(hashlib.sha256(b).hexdigest() for b in before.values())
        for snap in snaps:
            with pytest.raises(OSError) as e:
                os.open(snap, os.O_RDWR)
            assert e.value.errno in (errno.EROFS, errno.EACCES), e.value
        fd = os.open(mnt / "disk.raw", os.O_RDWR)
        try:
            pwrite_all(fd, os.urandom(2 * MiB), 0)
            pwrite_all(fd, os.urandom(100000), 2 * MiB - 5)
            os.fsync(fd)
        finally:
            os.close(fd)
        for snap in snaps:
            assert snap.read_bytes() == before[snap.name], f"{snap.name} changed while the disk was written"
    assert_clean(img)
