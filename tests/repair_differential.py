"""`qcowfs check --repair` against `qemu-img check -r all` on damaged images.

Each seed is a case of the hostile generator (tests/hostile_write.py: a base
layout and one structure-aware mutation). Two copies of the damaged image are
repaired, one by each tool, in their own directories; the judge then asks
qemu-img of both. The rules:

- qcowfs's repair ends in one line or in its report: never an internal error,
  a hang or a signal; and it is not refused (exit 1) where QEMU's ran (and
  kept the snapshots: see below);
- where qemu-img check calls QEMU's repaired copy clean (and QEMU reads all of
  it, keeping the snapshots qcowfs keeps), it calls qcowfs's
  clean too (what QEMU can mend, qcowfs mends);
- where both repaired copies are clean, hold the same snapshots and QEMU
  reads its own, the two disks are equal (`qemu-img compare`): a repair
  mends metadata, it does not move guest data. (qemu-img 7.2's `check -r`
  deletes every internal snapshot of an image that also has persistent
  bitmaps, undamaged ones too, and frees their clusters: its disk then
  differs where guest data shows metadata.)

QEMU's repair is not the judge of what it leaves damaged: qcowfs may end
cleaner (it deletes a snapshot whose table cannot be found, mends a bitmap
whose data lies past the end of the file). `make soak` runs hundreds of
seeds: `python tests/repair_differential.py --cases N [--start S]`.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hostile_write as hw  # noqa: E402

QCOWFS = str(Path(sys.executable).parent / "qcowfs")


@dataclass
class RepairResult:
    seed: int
    layout: str
    mutation: str
    before: str
    qemu_after: str
    ours_after: str
    ours_output: str
    problems: list[str] = field(default_factory=list)

    def report(self) -> str:
        return (f"seed {self.seed}: {self.layout} {self.mutation}\n  before: {self.before}\n"
                f"  after qemu-img check -r all: {self.qemu_after}\n  after qcowfs check --repair: {self.ours_after}\n"
                f"  qcowfs said: {self.ours_output[-600:]}\n  " + "\n  ".join(self.problems)
                + f"\n  again: python tests/repair_differential.py --seed {self.seed}")


def repair_case(seed: int, cache: hw.BaseCache, work: Path) -> RepairResult:
    """Repair copies of SEED's damaged image with both tools and judge them."""
    case = hw.make_case(seed, cache)
    m = cache.get(case.layout)
    d = (work / f"repair{seed}").resolve()
    if d.exists():
        shutil.rmtree(d)
    orig = hw._copy_case_dir(m.path.parent, d / "damaged")
    with open(orig, "r+b") as f:
        for off, data in case.mutation.patches:
            f.seek(off)
            f.write(data)
    theirs, ours = (hw._copy_case_dir(orig.parent, d / n) for n in ("qemu", "qcowfs"))
    before = hw.qemu_check(orig)
    q = hw.qemu_run(["qemu-img", "check", "-r", "all", theirs], theirs, capture_output=True, timeout=300)
    res = RepairResult(seed, case.layout, case.mutation.name, before.show(), "", "", "")
    try:
        p = subprocess.run([QCOWFS, "check", "--repair", str(ours)], cwd=ours.parent, capture_output=True,
                           text=True, timeout=300)
        res.ours_output = p.stderr.strip()
        if p.returncode not in (0, 1, 2, 3) or "internal error" in p.stderr or "Traceback" in p.stderr:
            res.problems.append(f"qcowfs check --repair ended badly (exit {p.returncode})")
        elif p.returncode == 1 and q.returncode in (0, 2, 3) and _snapshots(theirs) == _snapshots(ours):
            # (qemu-img check's 63: not a format it checks, a flipped magic: nothing ran)
            res.problems.append("qcowfs refused the repair where QEMU's ran to its end")
    except subprocess.TimeoutExpired:
        res.problems.append("qcowfs check --repair hung (300 s)")
    q_after, o_after = hw.qemu_check(theirs), hw.qemu_check(ours)
    res.qemu_after, res.ours_after = q_after.show(), o_after.show()
    if q_after.rc == 0 and _yardstick(theirs, ours):
        if o_after.rc != 0:
            res.problems.append("QEMU's repair leaves the image clean, qcowfs's does not")
        else:
            c = hw.qemu_run(["qemu-img", "compare", theirs, ours], theirs, capture_output=True, text=True,
                            timeout=300)
            if c.returncode != 0:
                res.problems.append(f"the disks differ after the two repairs: {(c.stdout + c.stderr).strip()[:300]}")
    shutil.rmtree(d)
    return res


def _yardstick(theirs: Path, ours: Path) -> bool:
    """Whether qemu-img check's "clean" for QEMU's repaired copy THEIRS says
    what a repair can reach: QEMU reads its whole disk, and it kept every
    snapshot qcowfs's repair kept in OURS. (QEMU's rebuild can grow the file
    over a cluster a damaged entry names just past its end: the count is
    then clean and the read fails. And its `check -r` deletes the snapshots
    of any image that also has persistent bitmaps.)"""
    whole = hw.qemu_run(["qemu-img", "compare", theirs, theirs], theirs, capture_output=True, timeout=300)
    kept = _snapshots(ours)
    return whole.returncode == 0 and (kept is None or _snapshots(theirs) == kept)


def _snapshots(img: Path) -> list[tuple[str, str]] | None:
    """(id, name) of IMG's snapshots as qemu-img sees them; None if it cannot tell."""
    p = hw.qemu_run(["qemu-img", "info", "-U", "--output=json", img], img, capture_output=True, text=True,
                    timeout=300)
    if p.returncode:
        return None
    return [(s["id"], s["name"]) for s in json.loads(p.stdout).get("snapshots", [])]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=100)
    ap.add_argument("--start", type=int, default=20000)
    ap.add_argument("--seed", type=int, help="one seed, its report whatever the outcome")
    ap.add_argument("--work", type=Path, default=Path("/tmp/qcowfs-repair-differential"))
    a = ap.parse_args()
    cache = hw.BaseCache(a.work / "bases")
    seeds = [a.seed] if a.seed is not None else list(range(a.start, a.start + a.cases))
    bad, t0 = 0, time.monotonic()
    for seed in seeds:
        r = repair_case(seed, cache, a.work)
        if r.problems or a.seed is not None:
            print(r.report(), flush=True)
        bad += bool(r.problems)
    print(f"{len(seeds)} cases, {bad} with problems, {time.monotonic() - t0:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
