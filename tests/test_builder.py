"""The image convert builds front to back (engine.builder: a new plain
qcow2 image) against `qemu-img convert` of the same source with the same
options: for random geometries (cluster sizes from 512 bytes, extended L2,
compat 0.10, refcount widths from 1 to 64 bits, so several refcount blocks,
refcount table clusters and L2 tables) and random sources (data, blocks of
zeros written as data, holes, a disk size that is no multiple of the
cluster), the image reads as the source (`qemu-img compare`), is clean with
no leak (`qemu-img check`), holds data exactly where qemu-img's copy does
(`qemu-img map`), shows qemu-img's `info`, and QEMU writes into it."""
from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qcowfs

KiB, MiB = 1 << 10, 1 << 20


def run(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120)


def data_map(image: Path) -> list[tuple[int, int]]:
    """(start, length) of every range qemu-img map calls data, merged."""
    p = run("qemu-img", "map", "-f", "qcow2", "--output=json", image)
    assert p.returncode == 0, p.stderr
    out: list[tuple[int, int]] = []
    for e in json.loads(p.stdout):
        if e["data"] and not e["zero"]:
            if out and out[-1][0] + out[-1][1] == e["start"]:
                out[-1] = (out[-1][0], out[-1][1] + e["length"])
            else:
                out.append((e["start"], e["length"]))
    return out


def clusters(runs: list[tuple[int, int]], cluster_size: int) -> set[int]:
    """The clusters RUNS touch."""
    return {c for start, n in runs for c in range(start // cluster_size, -(-(start + n) // cluster_size))}


def info(image: Path) -> dict:
    p = run("qemu-img", "info", "-f", "qcow2", "--output=json", image)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    for k in ("filename", "actual-size"):
        d.pop(k)
    return d


@st.composite
def geometries(draw: st.DrawFn) -> dict[str, object]:
    compat = draw(st.sampled_from(["0.10", "1.1"]))
    cluster_bits = draw(st.integers(9, 17))
    o: dict[str, object] = {"cluster_size": 1 << cluster_bits, "compat": compat}
    if compat == "1.1":
        o["refcount_bits"] = draw(st.sampled_from([1, 2, 4, 8, 16, 32, 64]))
        if cluster_bits >= 14 and draw(st.booleans()):
            o["extended_l2"] = True
        if draw(st.booleans()):
            o["lazy_refcounts"] = True
        if draw(st.booleans()):
            o["compression_type"] = "zstd"
    return o


def qemu_options(o: dict[str, object]) -> str:
    return ",".join(f"{k}={'on' if v is True else v}" for k, v in o.items())


def write_source(path: Path, size: int, pieces: list[tuple[str, int]], rnd: random.Random) -> None:
    """A raw file of SIZE bytes: PIECES of data, zeros written as data, and
    holes, one after another (the rest a hole)."""
    with open(path, "wb") as f:
        f.truncate(size)
        pos = 0
        for kind, n in pieces:
            n = min(n, size - pos)
            if kind == "data":
                f.seek(pos)
                f.write(rnd.randbytes(n))
            elif kind == "zeros":
                f.seek(pos)
                f.write(bytes(n))
            pos += n


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(o=geometries(), size=st.integers(1, 6 * MiB),
       pieces=st.lists(st.tuples(st.sampled_from(["data", "zeros", "hole"]), st.integers(1, 700 * KiB)),
                       min_size=1, max_size=12),
       seed=st.integers(0, 2**32 - 1))
def test_built_images_are_qemu_img_s(tmp_path: Path, o: dict[str, object], size: int,
                                     pieces: list[tuple[str, int]], seed: int) -> None:
    src, ours, theirs = tmp_path / "src.raw", tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    for f in (ours, theirs):
        f.unlink(missing_ok=True)
    write_source(src, size, pieces, random.Random(seed))
    qcowfs.convert(src, ours, src_format="raw", out_format="qcow2", **o)
    p = run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", qemu_options(o), src, theirs)
    assert p.returncode == 0, p.stderr
    p = run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", src, ours)
    assert p.returncode == 0, p.stdout + p.stderr
    p = run("qemu-img", "check", ours)
    assert p.returncode == 0 and "leaked" not in p.stdout, p.stdout + p.stderr
    # The same clusters hold data (with extended L2, a hole of the source
    # inside a cluster with data is left out by the subcluster in qemu-img's
    # copy, and written as zeros in ours: the same host space)
    cs = int(o["cluster_size"])  # type: ignore[call-overload]
    if cs >= 4 * KiB:
        assert clusters(data_map(ours), cs) == clusters(data_map(theirs), cs)
    else:
        # (qemu-img leaves a run of zeros after data unallocated only from
        # 4 KiB on, its -S default: in smaller clusters it writes more zeros)
        assert clusters(data_map(ours), cs) <= clusters(data_map(theirs), cs)
    assert info(ours) == info(theirs)
    disk = -(-size // 512) * 512
    head, mid = min(64 * KiB, disk), disk // 1024 * 512
    p = run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x6b 0 {head}", "-c", f"write -P 0x6c {mid} 512",
            "-c", f"read -P 0x6c {mid} 512", ours)
    assert p.returncode == 0 and "fail" not in p.stdout, p.stdout + p.stderr
    p = run("qemu-img", "check", ours)
    assert p.returncode == 0, p.stdout + p.stderr


def test_writes_out_of_order_are_refused(tmp_path: Path) -> None:
    """The builder appends: a write behind the copy, or of part of a cluster
    inside the disk, is an error of its caller (the copy never makes one)."""
    import trio

    from qcowfs.engine.builder import ImageBuilder
    from qcowfs.engine.create import create_options

    async def go() -> None:
        path = tmp_path / "b.qcow2"
        path.touch()
        b = ImageBuilder(str(path), create_options(1 * MiB), flushes=False)
        await b.write(128 * KiB, bytes(64 * KiB))
        with pytest.raises(ValueError, match="in order"):
            await b.write(0, bytes(64 * KiB))
        with pytest.raises(ValueError, match="in order"):
            await b.write(256 * KiB, bytes(512))
        await b.close()

    trio.run(go)


def test_a_filesystem_without_fallocate_is_asked_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The builder allocates each run before writing it (HostFile.allocate);
    a filesystem that has no fallocate is asked once, and the image is the
    same (the writes alone)."""
    import errno

    from qcowfs.host import hostfile

    calls: list[int] = []

    def unsupported(fd: int, mode: int, offset: int, length: int) -> None:
        calls.append(offset)
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    src = tmp_path / "src.raw"
    write_source(src, 8 * MiB, [("data", 3 * MiB), ("hole", MiB), ("data", 3 * MiB)], random.Random(5))
    monkeypatch.setattr(hostfile, "fallocate", unsupported)
    qcowfs.convert(src, tmp_path / "ours.qcow2", src_format="raw", out_format="qcow2")
    assert len(calls) == 1
    p = run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", src, tmp_path / "ours.qcow2")
    assert p.returncode == 0, p.stdout + p.stderr
    assert run("qemu-img", "check", tmp_path / "ours.qcow2").returncode == 0
