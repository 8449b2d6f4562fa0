"""`qcowfs compare` against `qemu-img compare`: the same lines and exit code
for pairs of images qemu-img makes (qcow2 of several cluster sizes, v2 and
v3, over a backing file, with zero and compressed clusters; raw files) that
differ by a few bytes here and there, or not at all, or in size."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qcowfs
from conftest import QCOWFS
from images import create, qio

KiB, MiB = 1024, 1024 * 1024


def run(*args: object) -> tuple[str, int]:
    p = subprocess.run([*map(str, args)], capture_output=True, text=True, timeout=120)
    return p.stdout, p.returncode


# One image: (size, cluster size, compat, backing?, raw?, writes), a write
# being (offset, length, pattern; pattern 0 as `write -z`, -1 compressed).
writes = st.lists(st.tuples(st.integers(0, 3 * MiB), st.integers(1, 200 * KiB),
                            st.sampled_from([0, 1, 2, 0x55, -1])), max_size=4)
image = st.tuples(st.sampled_from([3 * MiB, 4 * MiB, 4 * MiB + 512]), st.sampled_from([512, 4 * KiB, 64 * KiB]),
                  st.sampled_from(["1.1", "0.10"]), st.booleans(), st.booleans(), writes)


def make(path: Path, spec: tuple, base: Path) -> tuple[Path, str]:
    """The image SPEC describes at PATH (over BASE when it says so); its format."""
    size, cs, compat, backed, raw, todo = spec
    if raw:
        path = path.with_suffix(".raw")
        with open(path, "wb") as f:
            f.truncate(size)
        fmt = "raw"
    else:
        create(path, size, backing=str(base) if backed else None, backing_fmt="qcow2" if backed else None,
               cluster_size=cs, compat=compat)
        fmt = "qcow2"
    cmds = []
    for off, n, pat in todo:
        n = min(n, size - off) if off < size else 0
        if n <= 0:
            continue
        if pat == 0:
            cmds.append(f"write -z {off} {n}")
        elif pat == -1 and fmt == "qcow2" and off % cs == 0 and n >= cs:
            cmds.append(f"write -c -P 7 {off} {n // cs * cs}")
        else:
            cmds.append(f"write -P {max(pat, 3)} {off} {n}")
    if cmds:
        qio(path, *cmds, fmt=fmt)
    return path, fmt


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=image, second=image, same=st.booleans(), tweak=st.tuples(st.integers(0, 4 * MiB), st.integers(1, 255)))
def test_compare_says_what_qemu_img_says(tmp_path_factory: pytest.TempPathFactory, first: tuple, second: tuple,
                                         same: bool, tweak: tuple[int, int]) -> None:
    d = tmp_path_factory.mktemp("compare")
    base = d / "base.qcow2"
    create(base, 4 * MiB, cluster_size=64 * KiB)
    qio(base, "write -P 9 1M 1M")
    if same:  # (the second a copy of the first, maybe with one byte changed)
        second = first[:5] + (first[5] + [(tweak[0], 1, tweak[1])] if tweak[1] > 128 else first[5],)
    a, fa = make(d / "a.qcow2", first, base)
    b, fb = make(d / "b.qcow2", second, base)
    for x, y, fx, fy in ((a, b, fa, fb), (b, a, fb, fa)):
        theirs = run("qemu-img", "compare", "-f", fx, "-F", fy, x, y)
        ours = run(QCOWFS, "compare", "-f", fx, "-F", fy, x, y)
        assert ours == theirs, f"{x.name} {y.name}: qemu-img {theirs}, qcowfs {ours}"


def test_strict_mode(tmp_path: Path) -> None:
    """-s: a size mismatch alone, and a range allocated differently that
    reads the same (here a zero cluster against nothing), are differences,
    as in qemu-img (both images end in data, where qemu-img's block status
    of the last run agrees: see qcowfs.aio.compare)."""
    a, b, c = (create(tmp_path / f"{n}.qcow2", 4 * MiB) for n in "abc")
    for img in (a, b):
        qio(img, "write -P 1 0 64k", "write -P 2 4032k 64k")
    qio(b, "write -z 1M 64k")
    create(c, 5 * MiB)
    for args in ((a, a), (a, b), (b, a), (a, c)):
        theirs = run("qemu-img", "compare", "-s", *args)
        assert run(QCOWFS, "compare", "-s", *args) == theirs, (args, theirs)
    assert run(QCOWFS, "compare", a, b) == ("Images are identical.\n", 0)


def test_library_and_errors(tmp_path: Path) -> None:
    a, b = (create(tmp_path / f"{n}.qcow2", 1 * MiB) for n in "ab")
    qio(b, "write -P 5 4097 1")
    found = qcowfs.compare(a, b)
    assert (found.identical, found.offset, found.sizes) == (False, 4096, (MiB, MiB))
    assert qcowfs.compare(a, a).identical
    p = subprocess.run([QCOWFS, "compare", a, tmp_path / "missing"], capture_output=True, text=True)
    assert (p.returncode, p.stdout, len(p.stderr.splitlines())) == (2, "", 1), p.stderr
    assert "missing" in p.stderr
    p = subprocess.run([QCOWFS, "compare", "-q", a, b], capture_output=True, text=True)
    assert (p.returncode, p.stdout, p.stderr) == (1, "", "")
