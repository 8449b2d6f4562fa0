"""The offline commands against qemu-img, on random chains: a seeded generator
of small backing chains (1-3 layers of mixed cluster sizes, v2 and v3, data,
zeros, snapshots, bitmaps, layers shorter and longer than the top) and of one
command each (resize, snapshot, bitmap, commit, rebase, convert with its
options, amend, dd; map and info, whose output must be qemu-img's), run by
qcowfs and by qemu-img on two copies.

The judge: both tools succeed or both refuse; where both succeed, the images
have the same shape (size, snapshots, bitmaps, backing file) and the same
content; rebase and convert are judged by what they must keep (the disk
reads as before; the copy reads as its source), since qemu-img 7.2 gets two
of them wrong (a v2 rebase of an image with no backing file lets the new base
show through; `convert -c -B -S 1k` can drop a sector); and every image
qcowfs leaves is clean in `qemu-img check` where qemu-img's is.

    python tests/differential.py --cases 200 --start 1     # a soak (make soak runs it)
    python tests/differential.py --seed 788392424           # one case, verbosely

It found, on first runs: commit -b through a shorter layer, safe rebase where
the old chain ends, snapshot ids, -q, -o help (docs/design.md)."""
from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

QCOWFS = str(Path(sys.executable).parent / "qcowfs")


def sh(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=300)


def shape(d: Path, img: str) -> dict[str, object]:
    """What `qemu-img info` says of IMG that both tools must leave alike."""
    p = sh(["qemu-img", "info", "-U", "--output=json", img], d)
    j = json.loads(p.stdout or "{}")
    data = j.get("format-specific", {}).get("data", {})
    return {"size": j.get("virtual-size"), "snapshots": sorted(s["name"] for s in j.get("snapshots", [])),
            "bitmaps": sorted((b["name"], tuple(sorted(b["flags"])), b["granularity"]) for b in data.get("bitmaps", [])),
            "backing": j.get("backing-filename"), "backing-format": j.get("backing-filename-format"),
            "options": {k: data.get(k) for k in ("compat", "refcount-bits", "lazy-refcounts", "compression-type")}}


def same_content(a: Path, b: Path, fmt_a: str = "qcow2", fmt_b: str = "qcow2") -> bool:
    return sh(["qemu-img", "compare", "-f", fmt_a, "-F", fmt_b, str(a), str(b)], a.parent).returncode == 0


def clean(d: Path, img: str) -> bool:
    return sh(["qemu-img", "check", img], d).returncode == 0


def build(r: random.Random, d: Path) -> tuple[list[str], str]:
    """A chain l0 <- l1 <- ... in D; the names (bottom first) and the compat."""
    compat = r.choice(["0.10", "1.1", "1.1"])
    size = r.choice([1, 4, 8]) << 20
    names: list[str] = []
    for i in range(r.randint(1, 3)):
        name = f"l{i}.qcow2"
        cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-o",
               f"cluster_size={r.choice(['512', '4k', '64k'])},compat={compat}"]
        if names:
            cmd += ["-b", names[-1], "-F", "qcow2"]
        layer_size = r.choice([size, size // 2, size * 2])
        sh(cmd + [name, str(layer_size)], d).check_returncode()
        for _ in range(r.randint(0, 5)):
            off = r.randrange(layer_size // 512) * 512
            n = min(r.choice([512, 4096, 65536, 300000]) // 512 * 512, layer_size - off)
            zero = compat == "1.1" and r.random() < 0.25
            op = f"write -z {off} {n}" if zero else f"write -P {r.randint(1, 255)} {off} {n}"
            if n > 0:
                sh(["qemu-io", "-f", "qcow2", "-c", op, name], d).check_returncode()
        names.append(name)
    top = names[-1]
    for k in r.sample(range(4), r.randint(0, 2)):  # (distinct names: qemu-img allows twins, qcowfs refuses them)
        sh(["qemu-img", "snapshot", "-c", f"s{k}", top], d).check_returncode()
    if compat == "1.1":
        for k in r.sample(range(3), r.randint(0, 2)):
            sh(["qemu-img", "bitmap", "--add", top, f"b{k}"], d).check_returncode()
    return names, compat


def command(r: random.Random, names: list[str]) -> tuple[str, list[str]]:
    """A command line both tools take (qcowfs takes qemu-img's spellings)."""
    top = names[-1]
    kind = r.choice(["resize", "snapshot", "bitmap", "commit", "rebase", "rebase", "convert", "convert", "amend",
                     "map", "info", "dd"])
    if kind == "map":
        bounds = [f"--start-offset={r.choice([0, 512, 70000, 1 << 20])}"] * (r.random() < 0.5) + \
            [f"--max-length={r.choice([1, 4096, 3 << 20, 100 << 20])}"] * (r.random() < 0.5)
        return kind, ["map", *(["--output=json"] if r.random() < 0.5 else []), *bounds, top]
    if kind == "info":
        return kind, ["info", *(["--backing-chain"] if r.random() < 0.6 else []),
                      *(["--output=json"] if r.random() < 0.5 else []), top]
    if kind == "dd":
        ops = [f"bs={r.choice(['512', '1000', '64k', '1M'])}"] + [f"count={r.randint(0, 40)}"] * (r.random() < 0.6) + \
            [f"skip={r.randint(0, 6)}"] * (r.random() < 0.5)
        return kind, ["dd", "-O", r.choice(["raw", "qcow2"]), f"if={top}", "of=out.img", *ops]
    if kind == "amend":
        opts = [o for o, p in ((f"compat={r.choice(['0.10', '1.1'])}", 0.6),
                               (f"refcount_bits={r.choice([1, 2, 8, 16, 64])}", 0.4),
                               (f"lazy_refcounts={r.choice(['on', 'off'])}", 0.3),
                               (f"size={r.choice(['2M', '8M', '3000'])}", 0.2)) if r.random() < p]
        return kind, ["amend", "-o", ",".join(opts or ["compat=1.1"]), top]
    if kind == "resize":
        delta = r.choice(["+1M", "-1M", "+512", "-512", "2M", "16M", "1M", "3000"])
        return kind, ["resize", *(["--shrink"] if r.random() < 0.6 else []), top, delta]
    if kind == "snapshot":
        return kind, ["snapshot", r.choice(["-c", "-d", "-a"]), f"s{r.randint(0, 3)}", top]
    if kind == "bitmap":
        op = r.choice(["--add", "--remove", "--clear", "--enable", "--disable", "--merge"])
        return kind, ["bitmap", op, *([f"b{r.randint(0, 2)}"] if op == "--merge" else []), top, f"b{r.randint(0, 2)}"]
    if kind == "commit":
        extra = ["-b", names[0]] if len(names) > 2 and r.random() < 0.5 else (["-d"] if r.random() < 0.3 else [])
        return kind, ["commit", *extra, top]
    if kind == "rebase":
        new = r.choice(names[:-1] + ["", "other.qcow2"])
        unsafe = r.random() < 0.3 and new != "other.qcow2"
        return kind, ["rebase", *(["-u"] if unsafe else []), "-b", new, *(["-F", "qcow2"] if new else []), top]
    fmt = r.choice(["qcow2", "qcow2", "raw"])
    args = ["convert", "-O", fmt]
    if fmt == "raw" and r.random() < 0.2:
        args += ["-o", f"preallocation={r.choice(['off', 'falloc', 'full'])}"]
    if fmt == "qcow2":
        opts = [o for o, p in ((f"cluster_size={r.choice(['512', '4k', '64k', '2M'])}", 0.4),
                               (f"compression_type={r.choice(['zlib', 'zstd'])}", 0.3),
                               (f"compat={r.choice(['0.10', '1.1'])}", 0.3)) if r.random() < p]
        args += ["-c"] * (r.random() < 0.3) + (["-o", ",".join(opts)] if opts else [])
        if len(names) > 1 and r.random() < 0.4:
            args += ["-B", r.choice(names[:-1]), "-F", "qcow2"]
    if r.random() < 0.2:
        args += ["-S", r.choice(["0", "4k", "64k", "1k"])]
    return kind, args + [top, "out.img"]


def run_case(seed: int, work: Path, verbose: bool = False) -> list[str]:
    """The problems of case SEED (none: qcowfs did what qemu-img did)."""
    r = random.Random(seed)
    base = work / "base"
    shutil.rmtree(work, ignore_errors=True)
    base.mkdir(parents=True)
    names, compat = build(r, base)
    sh(["qemu-img", "create", "-q", "-f", "qcow2", "other.qcow2", "16M"], base).check_returncode()
    sh(["qemu-io", "-f", "qcow2", "-c", "write -P 165 0 16M", "other.qcow2"], base).check_returncode()
    kind, args = command(r, names)
    top = names[-1]
    sh(["qemu-img", "convert", "-O", "raw", top, "before.raw"], base).check_returncode()
    runs = {}
    for who, exe in (("qemu", "qemu-img"), ("ours", QCOWFS)):
        d = work / who
        shutil.copytree(base, d)
        for f in d.iterdir():  # (QEMU's map asks the host about holes: the same page cache for both)
            f.read_bytes()
        p = sh([exe, *args], d)
        runs[who] = (d, p)
    (q, qp), (o, op) = runs["qemu"], runs["ours"]
    what = f"seed {seed}: {' '.join(args)} | compat {compat}, chain {names}"
    if verbose:
        print(what, f"\n  qemu-img: {qp.returncode} {qp.stderr.strip()}\n  qcowfs:   {op.returncode} {op.stderr.strip()}")
    if qp.returncode == 0 and op.returncode == 1 and (
            kind == "amend" and "persistent bitmaps" in op.stderr       # (where qemu-img leaks them)
            or kind == "snapshot" and "exists already" in op.stderr):  # (QEMU allows twin names)
        return []  # qcowfs's documented refusals (docs/design.md, docs/backup.md)
    if kind == "dd" and qp.returncode == 0 and op.returncode == 1 and "cannot skip" in op.stderr:
        return []  # (qemu-img 7.2 says it cannot skip there, then makes an empty image; docs/design.md)
    if (qp.returncode == 0) != (op.returncode == 0):
        return [f"{what}: qemu-img exit {qp.returncode} ({qp.stderr.strip()[-150:]}), qcowfs exit "
                f"{op.returncode} ({op.stderr.strip()[-150:]})"]
    if qp.returncode != 0:
        return [f"{what}: qcowfs said {len(op.stderr.splitlines())} lines"] if len(op.stderr.splitlines()) != 1 else []
    problems = []
    if kind in ("map", "info"):
        ours, theirs = op.stdout, qp.stdout
        if kind == "info" and "--output=json" in args:   # (qcowfs's own keys beside qemu-img's)
            layers = json.loads(ours)
            for layer in layers if isinstance(layers, list) else [layers]:
                layer.pop("backing-chain", None)
                layer.get("format-specific", {}).get("data", {}).pop("dirty", None)
            ours, theirs = json.dumps(layers), json.dumps(json.loads(theirs))
        elif kind == "info":
            ours = "".join(line for line in ours.splitlines(True) if not line.startswith("backing chain ["))
        if ours != theirs:
            problems.append(f"{what}: qcowfs printed\n{op.stdout}qemu-img printed\n{qp.stdout}")
        return problems
    if kind == "dd":
        fmt = args[2]
        if shape(o, "out.img")["size"] != shape(q, "out.img")["size"] or \
                not same_content(o / "out.img", q / "out.img", fmt, fmt):
            problems.append(f"{what}: the copy differs from qemu-img's")
        return problems
    if kind == "convert":
        fmt = args[2]
        if not same_content(o / "out.img", o / top, fmt, "qcow2"):
            problems.append(f"{what}: the copy does not read as its source")
        if fmt == "qcow2" and not clean(o, "out.img"):
            problems.append(f"{what}: the copy is not clean")
        if fmt == "qcow2" and shape(o, "out.img")["backing"] != shape(q, "out.img")["backing"]:
            problems.append(f"{what}: backing file {shape(o, 'out.img')['backing']} where qemu-img wrote "
                            f"{shape(q, 'out.img')['backing']}")
        return problems
    if shape(o, top) != shape(q, top):
        problems.append(f"{what}: qcowfs left {shape(o, top)}, qemu-img {shape(q, top)}")
    if kind == "rebase" and "-u" not in args:
        if not same_content(o / top, o / "before.raw", "qcow2", "raw"):
            problems.append(f"{what}: the disk does not read as before the rebase")
    elif kind == "commit":
        target = args[args.index("-b") + 1] if "-b" in args else names[-2] if len(names) > 1 else None
        for img in filter(None, (top, target)):
            if not same_content(o / img, q / img):
                problems.append(f"{what}: {img} differs from qemu-img's")
    elif not same_content(o / top, q / top):
        problems.append(f"{what}: the disk differs from qemu-img's")
    for img in names:
        if clean(q, img) and not clean(o, img):
            problems.append(f"{what}: {img} is not clean after qcowfs (it is after qemu-img)")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=100)
    ap.add_argument("--start", type=int, default=1)
    ap.add_argument("--seed", type=int, help="run this case alone, verbosely")
    a = ap.parse_args()
    seeds = [a.seed] if a.seed is not None else range(a.start, a.start + a.cases)
    bad = 0
    with tempfile.TemporaryDirectory(prefix="qcowfs-differential-") as t:
        for seed in seeds:
            for problem in run_case(seed, Path(t) / "case", verbose=a.seed is not None):
                bad += 1
                print(f"MISMATCH {problem}\n  reproduce: python tests/differential.py --seed {seed}", flush=True)
    print(f"differential: {len(seeds)} cases, {bad} mismatches")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
