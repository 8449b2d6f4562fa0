#!/usr/bin/env python3
"""Metadata operations of incremental backup, timed against QEMU's tools.

    bench/ops.py [--image QCOW2] [--runs N]     (also run by bench/run.py)

- snapshot create / delete on a fully allocated image: `qcowfs snapshot
  create|delete MOUNTPOINT` while mounted read-write, against `qemu-img
  snapshot -c|-d` on the unmounted image (what a user does without qcowfs);
- snapshot apply on a fully allocated image with a snapshot and a
  diverged disk: `qcowfs snapshot apply IMAGE` against `qemu-img snapshot
  -a` (both offline; the aim is within 2x of qemu-img, start-up included);
- the dirty-extent list of a bitmap on a 1 TiB sparse image: `qcowfs map
  --bitmap` (offline, and from a mount's maps/bitmaps/NAME.json), against
  `qemu-nbd -B NAME` + `nbdinfo --map=qemu:dirty-bitmap:NAME --json`.

Times are wall-clock medians, whole commands included (process start too);
the ratio is the peer's time over qcowfs's: above 1.0, qcowfs is faster.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
QCOWFS = str(Path(sys.executable).parent / "qcowfs")
GIB, TIB = 1 << 30, 1 << 40


def sh(*args: object, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True,
                          timeout=600, **kw)  # type: ignore[call-overload]


def timed(*args: object) -> float:
    t = time.monotonic()
    sh(*args)
    return time.monotonic() - t


def snapshot_times(image: Path, work: Path, runs: int) -> dict[str, dict[str, float]]:
    """Median seconds of create and delete, qcowfs (mounted) and qemu-img (unmounted)."""
    copy = work / "snap.qcow2"
    out: dict[str, list[float]] = {k: [] for k in ("qcowfs create", "qcowfs delete", "qemu-img create",
                                                   "qemu-img delete")}
    for i in range(runs):
        shutil.copyfile(image, copy)
        sh("sync")  # the copy's dirty pages are not the operation's cost
        t = timed("qemu-img", "snapshot", "-c", f"s{i}", copy)
        out["qemu-img create"].append(t)
        out["qemu-img delete"].append(timed("qemu-img", "snapshot", "-d", f"s{i}", copy))
        mnt = work / "mnt"
        mnt.mkdir(exist_ok=True)
        sh(QCOWFS, "mount", copy, mnt)
        try:
            out["qcowfs create"].append(timed(QCOWFS, "snapshot", "create", mnt, f"s{i}"))
            out["qcowfs delete"].append(timed(QCOWFS, "snapshot", "delete", mnt, f"s{i}"))
        finally:
            sh(QCOWFS, "umount", mnt)
        sh("qemu-img", "check", copy)
    copy.unlink()
    med = {k: statistics.median(v) for k, v in out.items()}
    return {"snapshot create": {"qcowfs": med["qcowfs create"], "qemu-img": med["qemu-img create"]},
            "snapshot delete": {"qcowfs": med["qcowfs delete"], "qemu-img": med["qemu-img delete"]}}


def apply_times(image: Path, work: Path, runs: int) -> dict[str, dict[str, float]]:
    """Median seconds of `snapshot apply` and `qemu-img snapshot -a`, each on
    its own copy of IMAGE with snapshot s taken and 64 MiB rewritten since."""
    base = work / "apply-base.qcow2"
    shutil.copyfile(image, base)
    sh("qemu-img", "snapshot", "-c", "s", base)
    sh("qemu-io", "-c", "write -P 0x33 0 64M", base)
    ours, theirs = [], []
    for _ in range(runs):
        for who, times in (("qemu-img", theirs), ("qcowfs", ours)):
            copy = work / f"apply-{who}.qcow2"
            shutil.copyfile(base, copy)
            sh("sync")
            if who == "qcowfs":
                times.append(timed(QCOWFS, "snapshot", "apply", copy, "s"))
            else:
                times.append(timed("qemu-img", "snapshot", "-a", "s", copy))
            sh("qemu-img", "check", copy)
    sh("qemu-img", "compare", work / "apply-qcowfs.qcow2", work / "apply-qemu-img.qcow2")
    for f in ("apply-base", "apply-qcowfs", "apply-qemu-img"):
        (work / f"{f}.qcow2").unlink()
    return {"snapshot apply": {"qcowfs": statistics.median(ours), "qemu-img": statistics.median(theirs)}}


# The least peer/qcowfs ratio each row aims at (1.0 unless named here).
AIMS = {"snapshot apply": 0.5}


def dirty_map_times(work: Path, runs: int) -> dict[str, dict[str, float]]:
    img = work / "sparse.qcow2"
    img.unlink(missing_ok=True)
    sh("qemu-img", "create", "-q", "-f", "qcow2", img, "1T")
    sh("qemu-img", "bitmap", "--add", "-g", "64K", img, "b")
    cmds = []
    for k in range(64):   # scattered writes all over the terabyte
        cmds += ["-c", f"write -P {k + 1} {k * (TIB // 64) + k * 4096} 1M"]
    sh("qemu-io", *cmds, img)
    ours, mounted, theirs = [], [], []
    sock = work / "nbd.sock"
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    for _ in range(runs):
        t = time.monotonic()
        a = json.loads(sh(QCOWFS, "map", img, "--bitmap", "b", "--output=json").stdout)
        ours.append(time.monotonic() - t)
        sh(QCOWFS, "mount", img, mnt, "--read-only")
        try:
            t = time.monotonic()
            m = json.loads((mnt / "maps" / "bitmaps" / "b.json").read_bytes())
            mounted.append(time.monotonic() - t)
        finally:
            sh(QCOWFS, "umount", mnt)
        t = time.monotonic()
        nbd = subprocess.Popen(["qemu-nbd", "-r", "-t", "-k", str(sock), "-f", "qcow2", "-B", "b", str(img)])
        try:
            while not sock.exists():
                time.sleep(0.001)
            b = json.loads(sh("nbdinfo", "--map=qemu:dirty-bitmap:b", "--json",
                              f"nbd+unix:///?socket={sock}").stdout)
            theirs.append(time.monotonic() - t)
        finally:
            nbd.terminate()
            nbd.wait()
            sock.unlink(missing_ok=True)
        if not a == m == b:
            raise SystemExit("dirty maps differ between qcowfs and qemu-nbd + nbdinfo")
    img.unlink()
    return {"dirty map 1T (offline)": {"qcowfs": statistics.median(ours),
                                       "qemu-nbd+nbdinfo": statistics.median(theirs)},
            "dirty map 1T (mounted)": {"qcowfs": statistics.median(mounted),
                                       "qemu-nbd+nbdinfo": statistics.median(theirs)}}


def report(rows: dict[str, dict[str, float]]) -> str:
    lines = [f"{'operation':<26} {'qcowfs':>10} {'peer':>10}  {'peer/qcowfs':<12} peer",
             "-" * 78]
    for name, r in rows.items():
        peer = next(k for k in r if k != "qcowfs")
        ratio = r[peer] / r["qcowfs"] if r["qcowfs"] else float("inf")
        verdict = "met" if ratio >= AIMS.get(name, 1.0) else "NOT met"
        lines.append(f"{name:<26} {r['qcowfs'] * 1000:>8.0f}ms {r[peer] * 1000:>8.0f}ms  "
                     f"{ratio:>5.2f}x {verdict:<7} {peer}")
    return "\n".join(lines)


def run_all(image: Path, runs: int) -> tuple[str, dict[str, dict[str, float]]]:
    with tempfile.TemporaryDirectory(dir=HERE / "work") as d:
        rows = {**snapshot_times(image, Path(d), runs), **apply_times(image, Path(d), runs),
                **dirty_map_times(Path(d), runs)}
    return report(rows), rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", type=Path, default=HERE / "work" / "random-1024M.qcow2",
                   help="a fully allocated qcow2 (bench/run.py builds bench/work/random-1024M.qcow2)")
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args()
    if not a.image.exists():
        (HERE / "work").mkdir(exist_ok=True)
        sh("qemu-img", "create", "-q", "-f", "qcow2", a.image, "1G")
        sh("qemu-io", "-c", "write -P 0x5a 0 1G", a.image)
    (HERE / "work").mkdir(exist_ok=True)
    text, _ = run_all(a.image, a.runs)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
