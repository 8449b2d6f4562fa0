"""SIGKILL the qcowfs daemon in the middle of a write load.

A crash may leak clusters (`qemu-img check` exit 3) but never corrupt the
image (exit 2); every block acknowledged by an fsync must read back as
written, every block never written must be intact; the image mounts again.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import luks
from conftest import QCOWFS, daemon_pid
from images import KiB, MiB, create, oracle, qimg, qio
from test_write import (assert_clean, assert_same, in_proc_mounts, lazy_unmount, mirror_writes, qcheck,
                        qcowfs_mount, sha_file, snapshot_ids)

SLOT = 256 * KiB

CHILD = r"""
import ctypes, hashlib, os, random, sys
disk, init, seed, slot, nslots, every = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
discards = float(sys.argv[7])  # share of requests that are fallocate PUNCH_HOLE / ZERO_RANGE
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
rng = random.Random(seed)
fd = os.open(disk, os.O_RDWR)
initf = open(init, "rb")
slots, dirty, n = {}, set(), 0
def get(s):
    if s not in slots:
        initf.seek(s * slot)
        slots[s] = bytearray(initf.read(slot))
    return slots[s]
while True:
    s = rng.randrange(nslots)
    b = get(s)
    ln = rng.choice([1, rng.randint(1, 4096), rng.randint(4096, 65536), rng.randint(65536, slot)])
    off = rng.randrange(0, slot - ln + 1)
    discard = rng.random() < discards
    data = rng.randbytes(ln) if rng.random() < 0.85 and not discard else bytes(ln)
    print(f"W {s}", flush=True)
    try:
        if discard:  # PUNCH_HOLE|KEEP_SIZE (3) or ZERO_RANGE|KEEP_SIZE (0x11)
            if libc.fallocate(fd, rng.choice((3, 0x11)), s * slot + off, ln):
                raise OSError(ctypes.get_errno(), "fallocate")
        view, pos = memoryview(data), s * slot + off
        while view and not discard:
            k = os.pwrite(fd, view, pos)
            view, pos = view[k:], pos + k
    except OSError as e:
        print(f"E {e.errno}", flush=True)
        sys.exit(0)
    b[off:off + ln] = data
    dirty.add(s)
    n += 1
    if n % every == 0:
        try:
            os.fsync(fd)
        except OSError as e:
            print(f"E {e.errno}", flush=True)
            sys.exit(0)
        print("".join(f"A {d} {hashlib.sha256(slots[d]).hexdigest()}\n" for d in sorted(dirty)), end="", flush=True)
        dirty.clear()
"""


def make_image(d: Path, encrypted: bool = False) -> Path:
    """32 MiB, 4k clusters, some data shared with a snapshot (COW), some compressed;
    ENCRYPTED: LUKS, with the secret of tests/luks.py."""
    d.mkdir(parents=True, exist_ok=True)
    fill = ("write -P 0x5a 0 4M", "write -c -P 0x3c 8M 256k", "write -P 0x6b 20M 1M")
    if encrypted:
        img = luks.create(d / "disk.qcow2", 32 * MiB, cluster_size=4096)
        luks.qemu_io(img, *fill)
        luks.must("qemu-img", "snapshot", *luks.secret_object(), "--image-opts", "-c", "before",
                  luks.image_opts(img))
        luks.qemu_io(img, "write -P 0x7c 1M 64k")
        return img.resolve()
    img = create(d / "disk.qcow2", 32 * MiB, cluster_size=4096)
    qio(img, *fill)
    qimg("snapshot", "-c", "before", img)
    qio(img, "write -P 0x7c 1M 64k")
    return img.resolve()


def view(img: Path, dest: Path, snapshot_id: str | None = None, encrypted: bool = False) -> Path:
    """QEMU's view of the image as raw (with the secret for an encrypted one)."""
    if encrypted:
        return luks.to_raw(img, dest, snapshot_id)
    return oracle(img, dest, snapshot_id=snapshot_id)


def check(img: Path, encrypted: bool = False) -> tuple[int, dict]:
    if not encrypted:
        return qcheck(img)
    p = luks.run("qemu-img", "check", "--output=json", *luks.secret_object(), "--image-opts", luks.image_opts(img))
    return p.returncode, {"report": p.stdout, "_stderr": p.stderr}


def crash_once(img: Path, mnt: Path, init: Path, seed: int, kill_after: float,
               extra: tuple[str, ...] = (), discards: float = 0.0) -> tuple[list[str], float]:
    """Mount, run the writer child (DISCARDS: the share of its requests that are
    fallocate discards / zero-ranges), SIGKILL the daemon after KILL_AFTER s;
    returns the child's lines."""
    with qcowfs_mount(img, mnt, *extra) as m:
        pid = daemon_pid(mnt)
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(m / "disk.raw"), str(init), str(seed), str(SLOT),
                                  str(32 * MiB // SLOT), str(random.Random(seed).randint(3, 12)), str(discards)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(kill_after)
            assert child.poll() is None, f"writer died early: {child.stderr.read()}"
            os.kill(pid, signal.SIGKILL)
            out, err = child.communicate(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            # the daemon is gone: the mount is dead, clean it up like a user would
            for _ in range(100):
                if not os.path.exists(f"/proc/{pid}"):
                    break
                time.sleep(0.05)
            lazy_unmount(mnt)
    assert not in_proc_mounts(mnt)
    return out.splitlines(), kill_after


def verify(img: Path, init: Path, lines: list[str], tmp: Path, encrypted: bool = False) -> tuple[int, int]:
    """Check acknowledged and untouched slots against QEMU's view; returns (#acked, #untouched) checked."""
    last_w: dict[int, int] = {}
    last_a: dict[int, tuple[int, str]] = {}
    for i, line in enumerate(lines):
        parts = line.split()
        if parts[0] == "W":
            last_w[int(parts[1])] = i
        elif parts[0] == "A":
            last_a[int(parts[1])] = (i, parts[2])
    now = view(img, tmp / "now.raw", encrypted=encrypted)
    errors = []
    acked = untouched = 0
    with open(now, "rb") as fn, open(init, "rb") as fi:
        for s in range(32 * MiB // SLOT):
            fn.seek(s * SLOT)
            got = fn.read(SLOT)
            if s not in last_w:
                fi.seek(s * SLOT)
                if got != fi.read(SLOT):
                    errors.append(f"slot {s} (never written) changed")
                untouched += 1
            elif s in last_a and last_a[s][0] > last_w[s]:
                if hashlib.sha256(got).hexdigest() != last_a[s][1]:
                    errors.append(f"slot {s} (offset {s * SLOT}) lost fsync-acknowledged data")
                acked += 1
    now.unlink()
    assert not errors, errors
    return acked, untouched


@pytest.mark.parametrize("bitmap,encrypted", [(False, False), (True, False), (True, True)],
                         ids=["plain", "auto-bitmap", "luks+auto-bitmap"])
def test_crash_loop(tmp_path: Path, bitmap: bool, encrypted: bool) -> None:
    """4 KiB clusters, an internal snapshot (COW under the kill: decrypt and
    encrypt again on a LUKS image), compressed clusters, and with BITMAP an
    auto bitmap tracked while writing; a fifth of the requests are discards
    (PUNCH_HOLE) or ZERO_RANGEs."""
    img = make_image(tmp_path / "img", encrypted)
    extra: tuple[str, ...] = ()
    if encrypted:
        key = tmp_path / "key"
        key.write_text(luks.SECRET)
        extra = ("-o", f"key_file={key}")
        luks.must("qemu-img", "bitmap", *luks.secret_object(), "--image-opts", "--add", luks.image_opts(img), "b0")
    elif bitmap:
        qimg("bitmap", "--add", img, "b0")
    snap = {sid: sha_file(view(img, tmp_path / f"snap{sid}.raw", sid, encrypted)) for sid in snapshot_ids(img)}
    rng = random.Random(20240601)
    total_acked = 0
    history = []
    for it in range(5):
        init = view(img, tmp_path / "init.raw", encrypted=encrypted)
        kill_after = rng.uniform(0.4, 2.0)
        lines, _ = crash_once(img, tmp_path / f"mnt{it}", init, seed=1000 + it, kill_after=kill_after, extra=extra,
                              discards=0.2)
        nw = sum(1 for x in lines if x.startswith("W"))
        history.append(f"iteration {it}: killed after {kill_after:.2f}s, {nw} writes")
        assert nw > 0, history
        rc, rep = check(img, encrypted)
        assert rc in (0, 3), f"{history}: qemu-img check exit {rc} after a crash: {rep}"
        acked, _ = verify(img, init, lines, tmp_path, encrypted)
        total_acked += acked
        history[-1] += f", check exit {rc}, {acked} acknowledged slots verified"
        if bitmap:
            flags = bitmap_flags(img)
            assert "in-use" in flags, f"{history}: a crash must leave the tracked bitmap in use: {flags}"
    print("\n".join(history))
    assert total_acked > 0, f"no fsync was acknowledged before any kill: {history}"
    for sid, want in snap.items():
        assert sha_file(view(img, tmp_path / f"snap{sid}-after.raw", sid, encrypted)) == want, \
            f"snapshot {sid} changed"


def bitmap_flags(img: Path) -> list[str]:
    data = json.loads(qimg("info", "--output=json", "-U", img))
    return data["format-specific"]["data"]["bitmaps"][0]["flags"]


def test_kill_while_storing_bitmaps_at_unmount(tmp_path: Path) -> None:
    """SIGKILL while a clean unmount flushes and stores the bitmap (512-byte
    clusters: storing allocates many clusters and grows the refcount table)."""
    d = tmp_path / "img"
    d.mkdir()
    img = create(d / "disk.qcow2", 16 * MiB, cluster_size=512).resolve()
    qimg("bitmap", "--add", img, "b0")
    qimg("snapshot", "-c", "s0", img)
    rng = random.Random(77)
    results = []
    for it in range(4):
        mnt = tmp_path / f"mnt{it}"
        with qcowfs_mount(img, mnt) as m:
            pid = daemon_pid(mnt)
            with open(m / "disk.raw", "r+b") as f:
                for _ in range(40):
                    f.seek(rng.randrange(0, 16 * MiB - 65536))
                    f.write(rng.randbytes(rng.randint(1, 65536)))
            umount = subprocess.Popen([QCOWFS, "umount", str(mnt)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.0, 0.15))
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            umount.wait(timeout=60)
            for _ in range(100):
                if not os.path.exists(f"/proc/{pid}"):
                    break
                time.sleep(0.05)
            lazy_unmount(mnt)
        rc, rep = qcheck(img)
        results.append(rc)
        assert rc in (0, 3), f"qemu-img check exit {rc} after a kill during unmount: {rep}"
    print(results)


def test_remount_and_write_after_kill(tmp_path: Path) -> None:
    img = make_image(tmp_path / "img")
    init = oracle(img, tmp_path / "init.raw")
    lines, _ = crash_once(img, tmp_path / "mnt0", init, seed=7, kill_after=1.0)
    rc, rep = qcheck(img)
    assert rc in (0, 3), rep
    verify(img, init, lines, tmp_path)
    ref = oracle(img, tmp_path / "ref.raw")
    rng = random.Random(8)
    with qcowfs_mount(img, tmp_path / "mnt1") as mnt:
        writes = []
        for _ in range(200):
            n = rng.randint(1, 200 * KiB)
            writes.append((rng.randrange(0, 32 * MiB - n), rng.randbytes(n)))
        mirror_writes(mnt / "disk.raw", ref, writes)
    rc, rep = qcheck(img)
    assert rc in (0, 3), f"qemu-img check exit {rc} after remount and writes: {rep}"
    assert_same(img, ref)


def test_crash_then_check_repair(tmp_path: Path) -> None:
    img = make_image(tmp_path / "img")
    init = oracle(img, tmp_path / "init.raw")
    # leaks are likely when the kill lands in the middle of allocations; try a few moments
    for i, t in enumerate((0.8, 1.5, 0.5, 2.2)):
        crash_once(img, tmp_path / f"mnt{i}", init, seed=50 + i, kill_after=t)
        rc, rep = qcheck(img)
        assert rc in (0, 3), rep
        print(f"kill after {t}s: qemu-img check exit {rc}")
        if rc == 3:
            break
        init = oracle(img, tmp_path / "init.raw")
    before = oracle(img, tmp_path / "before-repair.raw")
    p = subprocess.run([QCOWFS, "check", str(img)], capture_output=True, text=True, timeout=120)
    assert p.returncode == rc, f"qcowfs check exit {p.returncode}, qemu-img check exit {rc}: {p.stdout}{p.stderr}"
    p = subprocess.run([QCOWFS, "check", "--repair", str(img)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"qcowfs check --repair exit {p.returncode}: {p.stdout}{p.stderr}"
    assert_clean(img)
    assert_same(img, before)


def test_crash_during_refcount_table_growth(tmp_path: Path) -> None:
    """512-byte clusters and 64-bit refcounts: a refcount block covers 32 KiB and the first refcount
    table 2 MiB, so the writer keeps adding refcount blocks and growing the table when it is killed."""
    d = tmp_path / "img"
    d.mkdir()
    img = create(d / "disk.qcow2", 32 * MiB, cluster_size=512, refcount_bits=64).resolve()
    qio(img, "write -P 0x21 0 1M")
    history = []
    for it, t in enumerate((0.7, 1.6, 1.1)):
        init = oracle(img, tmp_path / "init.raw")
        lines, _ = crash_once(img, tmp_path / f"mnt{it}", init, seed=300 + it, kill_after=t)
        rc, rep = qcheck(img)
        history.append(f"kill after {t}s: {sum(1 for x in lines if x.startswith('W'))} writes, check exit {rc}")
        assert rc in (0, 3), f"{history}: {rep}"
        verify(img, init, lines, tmp_path)
    print("\n".join(history))
    from images import Header
    assert Header(img).refcount_table_clusters > 1, "the load never grew the refcount table"
