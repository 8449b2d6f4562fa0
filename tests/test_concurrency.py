"""Concurrent writers on one read-write mount: fio with verification, and Python threads."""
from __future__ import annotations

import json
import os
import random
import subprocess
import threading
from pathlib import Path

import pytest

from images import KiB, MiB, create, oracle, qimg, qio
from test_write import assert_clean, assert_same, pwrite_all, qcowfs_mount

FIO_JOBS = """
[global]
filename={disk}
ioengine=psync
verify=crc32c
verify_fatal=1
do_verify=1
verify_dump=0
randrepeat=1
{extra}

# four jobs on disjoint regions, random sizes, random order
[disjoint]
rw=randwrite
bsrange=4k-256k
numjobs=4
offset=0
size=6M
offset_increment=6M

# four jobs interleaved 4k by 4k: they allocate the same (64k) clusters at the same time
"""

STRIDED = """
[strided{i}]
rw=write
bs=4k
offset={off}
size=16M
io_size=3M
zonemode=strided
zonesize=4k
zoneskip=12k
"""

# unaligned and odd sizes interleaved inside the same clusters
ODD = """
[odd{i}]
rw=randwrite
bsrange=1k-9k
bs_unaligned=1
offset={off}
size=1M
"""


def fio_job(disk: Path, extra: str = "") -> str:
    text = FIO_JOBS.format(disk=disk, extra=extra)
    for i in range(4):
        text += STRIDED.format(i=i, off=24 * MiB + 4 * KiB * i)
    for i in range(2):
        text += ODD.format(i=i, off=44 * MiB + i * MiB)
    return text


def run_fio(job: Path) -> list[dict]:
    # cwd: fio leaves its verify state files there
    p = subprocess.run(["fio", "--output-format=json", str(job)], capture_output=True, text=True, timeout=180,
                       cwd=job.parent)
    out = p.stdout
    assert "{" in out, f"fio produced no report (exit {p.returncode}): {p.stderr}"
    report = json.loads(out[out.index("{"):])
    assert p.returncode == 0, f"fio exit {p.returncode}: {p.stderr}"
    return report["jobs"]


@pytest.mark.parametrize("layout", ["empty-c64k", "backing-c4k"])
def test_fio_verify(layout: str, tmp_path: Path) -> None:
    if layout == "empty-c64k":
        img = create(tmp_path / "disk.qcow2", 64 * MiB)
    else:
        base = create(tmp_path / "base.qcow2", 64 * MiB)
        qio(base, "write -P 0x99 0 64M")
        img = create(tmp_path / "disk.qcow2", 64 * MiB, backing="base.qcow2", backing_fmt="qcow2", cwd=tmp_path,
                     cluster_size=4096)
    img = img.resolve()
    job = tmp_path / "job.fio"
    with qcowfs_mount(img, tmp_path / "mnt") as mnt:
        job.write_text(fio_job(mnt / "disk.raw"))
        jobs = run_fio(job)
        assert len(jobs) == 10
        for j in jobs:
            assert j["error"] == 0, f"fio job {j['jobname']}: error {j['error']}"
            assert j["write"]["io_bytes"] > 0 and j["read"]["io_bytes"] == j["write"]["io_bytes"], \
                f"fio job {j['jobname']} did not write and verify everything: {j['write']['io_bytes']} " \
                f"written, {j['read']['io_bytes']} verified"
    assert_clean(img)
    # the same jobs, verify only, on a fresh mount: the data survived the unmount
    with qcowfs_mount(img, tmp_path / "mnt2") as mnt:
        job.write_text(fio_job(mnt / "disk.raw", extra="verify_only=1"))
        for j in run_fio(job):
            assert j["error"] == 0, f"fio verify_only after remount, job {j['jobname']}: error {j['error']}"
    assert_clean(img)


@pytest.mark.parametrize("under", ["backing", "snapshot"])
def test_threads_disjoint_and_overlapping(under: str, tmp_path: Path) -> None:
    """Every write lands on clusters that must be filled from a backing file or copied away from a
    snapshot first, by 8 threads at once, several of them inside the same cluster."""
    cs = 64 * KiB
    vsize = 48 * MiB
    if under == "backing":
        base = create(tmp_path / "base.qcow2", vsize, cluster_size=4096)
        qio(base, f"write -P 0x42 0 {vsize}")
        img = create(tmp_path / "disk.qcow2", vsize, backing="base.qcow2", backing_fmt="qcow2", cwd=tmp_path,
                     cluster_size=cs).resolve()
    else:
        img = create(tmp_path / "disk.qcow2", vsize, cluster_size=cs).resolve()
        qio(img, f"write -P 0x42 0 {vsize}")
        qimg("snapshot", "-c", "all42", img)
    nthreads = 8
    piece = cs // nthreads
    shared_clusters = list(range(0, 64))              # [0, 4M): every thread writes its piece of each cluster
    region = 8 * MiB                                  # [8M, 40M): one private 4M region per thread
    hot = 40 * MiB                                    # [40M, 40M + 256k): all threads overwrite the same blocks
    hot_blocks = 64
    payloads: dict[tuple[int, int, int], bytes] = {}   # (thread, block, seq) -> data
    private: list[list[tuple[int, bytes]]] = [[] for _ in range(nthreads)]
    errors: list[str] = []

    def hot_payload(t: int, blk: int, seq: int) -> bytes:
        head = f"t{t} b{blk} s{seq} ".encode()
        return (head * (4096 // len(head) + 1))[:4096]

    def worker(t: int, disk: Path) -> None:
        rng = random.Random(t)
        fd = os.open(disk, os.O_RDWR)
        try:
            order = shared_clusters[:]
            rng.shuffle(order)
            seq = 0
            for i, c in enumerate(order):
                pwrite_all(fd, bytes([t + 1]) * piece, c * cs + t * piece)
                # private region: random unaligned writes
                n = rng.randint(1, 100 * KiB)
                off = rng.randrange(0, 4 * MiB - n)
                data = rng.randbytes(n)
                pwrite_all(fd, data, region + t * 4 * MiB + off)
                private[t].append((off, data))
                # hot blocks: everybody overwrites the same 4k blocks
                blk = rng.randrange(hot_blocks)
                seq += 1
                pwrite_all(fd, hot_payload(t, blk, seq), hot + blk * 4096)
                payloads[(t, blk, seq)] = b""
        except Exception as e:  # noqa: BLE001
            errors.append(f"thread {t}: {e!r}")
        finally:
            os.close(fd)

    with qcowfs_mount(img, tmp_path / "mnt") as mnt:
        disk = mnt / "disk.raw"
        threads = [threading.Thread(target=worker, args=(t, disk)) for t in range(nthreads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=120)
        assert not any(th.is_alive() for th in threads), "writer threads hung"
        assert not errors, errors
        fd = os.open(disk, os.O_RDWR)
        os.fsync(fd)
        os.close(fd)
        live = disk.read_bytes()
    problems = []
    for c in shared_clusters:
        for t in range(nthreads):
            got = live[c * cs + t * piece: c * cs + (t + 1) * piece]
            if got != bytes([t + 1]) * piece:
                problems.append(f"cluster {c}: piece of thread {t} lost")
    assert live[4 * MiB:region] == b"\x42" * (region - 4 * MiB), "backing data outside the writes changed"
    # private regions: replay each thread's writes in order
    for t in range(nthreads):
        buf = bytearray(b"\x42" * (4 * MiB))
        for off, data in private[t]:
            buf[off:off + len(data)] = data
        if live[region + t * 4 * MiB: region + (t + 1) * 4 * MiB] != bytes(buf):
            problems.append(f"private region of thread {t} differs")
    candidates: dict[int, set[bytes]] = {}
    for (t, blk, seq) in payloads:
        candidates.setdefault(blk, set()).add(hot_payload(t, blk, seq))
    for blk in range(hot_blocks):
        got = live[hot + blk * 4096: hot + (blk + 1) * 4096]
        cands = candidates.get(blk, set()) | {b"\x42" * 4096} if blk not in candidates else candidates[blk]
        for s in range(8):
            sector = got[s * 512:(s + 1) * 512]
            if not any(sector == c[s * 512:(s + 1) * 512] for c in cands):
                problems.append(f"hot block {blk} sector {s} is none of the written payloads")
                break
    assert not problems, problems[:10]
    assert_clean(img)
    want = tmp_path / "live.raw"
    want.write_bytes(live)
    assert_same(img, want)
    if under == "snapshot":
        snap = oracle(img, tmp_path / "snap.raw", snapshot_id="1")
        with open(snap, "rb") as f:
            for chunk in iter(lambda: f.read(4 * MiB), b""):
                assert chunk == b"\x42" * len(chunk), "the snapshot changed"
