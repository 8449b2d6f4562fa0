"""`qcowfs measure` / `qcowfs.measure` against `qemu-img measure` as the oracle:
for every option that changes the numbers, and for sources qemu-img and
qemu-io make (sparse, with zero clusters, compressed, an overlay, a snapshot,
bitmaps, a raw sparse file), the human text and the JSON are byte for byte
qemu-img's, and bad input is one line and exit 1."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qcowfs
from qcowfs.cli.main import main
from tests import luks

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


def qemu_img(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    for attempt in range(40):
        p = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd)
        # (a LUKS output times PBKDF2 even for measure; on a loaded machine that fails at times:
        # try again a little later each time, as luks.create_encrypted; 5 quick tries failed once)
        if "Unable to get accurate CPU usage" not in p.stderr:
            break
        time.sleep(0.02 * attempt)
    return p


def must(*args: object) -> str:
    p = subprocess.run(list(map(str, args)), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def qcowfs_cli(*args: object, cwd: Path | None = None) -> tuple[int, str, str]:
    """`qcowfs ARGS` in this process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(old)
    return code, out.getvalue(), err.getvalue()


# qemu-img needs a secret object for a LUKS output (qcowfs needs none: nothing is encrypted).
LUKS_ARGS = [*luks.secret_object(), ]


def qemu_args(args: list[str]) -> list[str]:
    """ARGS as qemu-img takes them: a LUKS output names its secret (the
    header's size does not depend on its iteration counts)."""
    out = []
    for a in args:
        if "encrypt.format=luks" in a:
            # (a short iter-time: qemu-img times PBKDF2 for a header it then drops; 2 s a call by default)
            a += ",encrypt.key-secret=sec0,encrypt.iter-time=10"
            out = [*LUKS_ARGS, *out]
        out.append(a)
    return out


def same(args: list[str], cwd: Path | None = None, outputs: tuple[str, ...] = ("human", "json")) -> dict:
    """qcowfs measure ARGS prints what qemu-img measure prints, in both
    OUTPUTS (JSON last), and the library returns the JSON; the JSON, parsed."""
    for output in outputs:
        want = qemu_img("measure", f"--output={output}", *qemu_args(args), cwd=cwd)
        assert want.returncode == 0, want.stderr
        code, out, err = qcowfs_cli("measure", f"--output={output}", *args, cwd=cwd)
        assert (code, err) == (0, ""), err
        assert out == want.stdout, (args, output)
    return json.loads(want.stdout)


def o_options(o: dict) -> list[str]:
    return ["-o", ",".join(f"{k}={v}" for k, v in o.items())] if o else []


def library_keywords(o: dict) -> dict:
    return {k.replace(".", "_").replace("-", "_"): v for k, v in o.items()}


# ---- --size: the options -----------------------------------------------------------

OPTION_MATRIX = [
    {},
    {"cluster_size": 512}, {"cluster_size": 4096}, {"cluster_size": 2 * MiB},
    {"compat": "0.10"}, {"compat": "1.1"},
    {"refcount_bits": 1}, {"refcount_bits": 2}, {"refcount_bits": 8}, {"refcount_bits": 64},
    {"cluster_size": 512, "refcount_bits": 64},
    {"extended_l2": "on"}, {"extended_l2": "on", "cluster_size": 16384},
    {"preallocation": "metadata"}, {"preallocation": "falloc"}, {"preallocation": "full"},
    {"encrypt.format": "luks"}, {"encrypt.format": "luks", "encrypt.cipher-alg": "aes-128"},
    {"encrypt.format": "luks", "cluster_size": 2 * MiB},
    {"data_file": "x.raw"}, {"data_file": "x.raw", "data_file_raw": "on"},
    {"backing_file": "none.qcow2"}, {"lazy_refcounts": "on"}, {"compression_type": "zstd"},
]
SIZES = [0, 512, 1000, 64 * KiB + 1, 1 * GiB, 3 * TiB + 512]
# qemu-img's measure of a LUKS output times PBKDF2 for a header it drops (2.5 s
# a call, whatever iter-time says): two sizes, JSON only (the text is the
# same code as the other rows').
LUKS_SIZES = [1000, 3 * TiB + 512]


@pytest.mark.parametrize("o", OPTION_MATRIX, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_size_matrix(o: dict) -> None:
    luks_output = "encrypt.format" in o
    for size in LUKS_SIZES if luks_output else SIZES:
        if o.get("cluster_size") == 512 and size > GiB:
            continue   # (too large for 512-byte clusters: tested below)
        args = ["-O", "qcow2", *o_options(o), "--size", str(size)]
        d = same(args, outputs=("json",) if luks_output else ("human", "json"))
        assert qcowfs.measure(size=size, **library_keywords(o)) == d


@pytest.mark.parametrize("size", SIZES + [5 * TiB])
def test_size_raw(size: int) -> None:
    assert qcowfs.measure(size=size, out_format="raw") == same(["-O", "raw", "--size", str(size)])
    same(["--size", str(size)])   # (-O raw is the default)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cluster_bits=st.integers(9, 21), refcount_order=st.integers(0, 6), extended_l2=st.booleans(),
       compat=st.sampled_from(["0.10", "1.1"]), prealloc=st.sampled_from(["off", "metadata", "falloc", "full"]),
       size=st.integers(0, 16 * TiB))
def test_size_any_options(cluster_bits: int, refcount_order: int, extended_l2: bool, compat: str, prealloc: str,
                          size: int) -> None:
    """Any combination qemu-img takes gives its numbers; one it refuses is
    refused. (A LUKS output: test_size_matrix.)"""
    o = {"cluster_size": 1 << cluster_bits, "refcount_bits": 1 << refcount_order, "compat": compat,
         "extended_l2": "on" if extended_l2 else "off", "preallocation": prealloc}
    args = ["-O", "qcow2", *o_options(o), "--size", str(size), "--output=json"]
    want = qemu_img("measure", *qemu_args(args))
    code, out, err = qcowfs_cli("measure", *args)
    if want.returncode != 0:
        assert code == 1 and err.startswith("qcowfs: ") and err.count("\n") == 1, (want.stderr, err)
        with pytest.raises(qcowfs.UsageError):
            qcowfs.measure(size=size, **library_keywords(o))
        return
    assert (code, out) == (0, want.stdout), (args, err)


# ---- sources ---------------------------------------------------------------------------

def qemu_io(image: Path, *commands: str, fmt: str = "qcow2") -> None:
    args = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    must(*args, image)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("measure")
    # sparse, data not cluster-aligned, zero clusters (plain and allocated), a size not cluster-aligned
    must("qemu-img", "create", "-q", "-f", "qcow2", d / "sparse.qcow2", str(100 * MiB + 512))
    qemu_io(d / "sparse.qcow2", "write -P 1 0 4k", "write -P 2 1M 70k", "write -z 5M 1M", "write -P 3 10M 512",
            "write -P 4 20M 64k", "write -z 20M 64k", "write -P 5 100M 512")
    # small clusters: the target's clusters are larger than the source's
    must("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", d / "small.qcow2", str(8 * MiB))
    qemu_io(d / "small.qcow2", "write -P 1 512 512", "write -P 2 70k 1k", "write -P 3 3M 300k")
    # compressed
    must("qemu-img", "create", "-q", "-f", "qcow2", d / "plain.qcow2", str(32 * MiB))
    qemu_io(d / "plain.qcow2", "write -P 7 0 3M", "write -P 8 9M 1M")
    must("qemu-img", "convert", "-c", "-O", "qcow2", d / "plain.qcow2", d / "compressed.qcow2")
    # an overlay over a backing file with data (both count) and a zero cluster hiding some
    must("qemu-img", "create", "-q", "-f", "qcow2", "-b", "plain.qcow2", "-F", "qcow2", d / "overlay.qcow2")
    qemu_io(d / "overlay.qcow2", "write -P 9 16M 128k", "write -z 0 64k")
    # a snapshot, then more data
    must("qemu-img", "create", "-q", "-f", "qcow2", d / "snap.qcow2", str(64 * MiB))
    qemu_io(d / "snap.qcow2", "write -P 1 0 1M")
    must("qemu-img", "snapshot", "-c", "first", d / "snap.qcow2")
    qemu_io(d / "snap.qcow2", "write -P 2 32M 5M")
    must("qemu-img", "resize", "-q", d / "snap.qcow2", str(96 * MiB))
    # bitmaps (one with a long name, one fine-grained, one disabled)
    must("qemu-img", "create", "-q", "-f", "qcow2", d / "bitmaps.qcow2", str(3 * GiB))
    qemu_io(d / "bitmaps.qcow2", "write -P 1 1G 2M")
    must("qemu-img", "bitmap", "--add", d / "bitmaps.qcow2", "b0")
    must("qemu-img", "bitmap", "--add", "-g", "512", d / "bitmaps.qcow2", "a-rather-long-bitmap-name-" + "x" * 40)
    must("qemu-img", "bitmap", "--add", "--disable", "-g", "2M", d / "bitmaps.qcow2", "off")
    # version 2
    must("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", d / "v2.qcow2", str(10 * MiB))
    qemu_io(d / "v2.qcow2", "write -P 1 0 100k")
    # metadata preallocation: data clusters that are holes in the file map as zeros
    must("qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", d / "meta.qcow2", str(20 * MiB))
    qemu_io(d / "meta.qcow2", "write -P 1 1M 64k")
    # extended L2 with subclusters written
    must("qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", d / "ext.qcow2", str(20 * MiB))
    qemu_io(d / "ext.qcow2", "write -P 1 4k 2k", "write -P 2 3M 1k")
    # raw, sparse, its size not a multiple of 512
    with open(d / "sparse.raw", "wb") as f:
        f.truncate(50 * MiB + 100)
        for at in (0, 3 * MiB + 10, 20 * MiB, 50 * MiB + 50):
            f.seek(at)
            f.write(b"\x01" * 5000)
    # empty
    must("qemu-img", "create", "-q", "-f", "qcow2", d / "empty.qcow2", str(GiB))
    return d


SOURCES = ["sparse.qcow2", "small.qcow2", "compressed.qcow2", "overlay.qcow2", "snap.qcow2", "bitmaps.qcow2",
           "v2.qcow2", "meta.qcow2", "ext.qcow2", "sparse.raw", "empty.qcow2"]
SOURCE_OPTIONS = [{}, {"cluster_size": 512}, {"cluster_size": 4096}, {"cluster_size": 2 * MiB},
                  {"compat": "0.10"}, {"refcount_bits": 1}, {"extended_l2": "on"},
                  {"preallocation": "full"}, {"preallocation": "metadata"},
                  {"backing_file": "plain.qcow2"}]


@pytest.mark.parametrize("name", SOURCES)
def test_source(sources: Path, name: str) -> None:
    for o in SOURCE_OPTIONS:
        d = same(["-O", "qcow2", *o_options(o), name], cwd=sources)
        assert qcowfs.measure(sources / name, **library_keywords(o)) == d
    d = same(["-O", "raw", name], cwd=sources)
    assert qcowfs.measure(sources / name, out_format="raw") == d
    same([name], cwd=sources)


@pytest.mark.parametrize("name", ["sparse.qcow2", "bitmaps.qcow2"])
def test_source_into_luks(sources: Path, name: str) -> None:
    """A LUKS output of a source's disk (JSON only: see LUKS_SIZES)."""
    o = {"encrypt.format": "luks"}
    d = same(["-O", "qcow2", *o_options(o), name], cwd=sources, outputs=("json",))
    assert qcowfs.measure(sources / name, **library_keywords(o)) == d


def test_bitmaps_line(sources: Path) -> None:
    """The bitmaps line is there for a version 3 qcow2 source and output
    (0 without bitmaps), and not for a raw or version 2 one."""
    assert qcowfs.measure(sources / "bitmaps.qcow2")["bitmaps"] > 0
    assert list(qcowfs.measure(sources / "empty.qcow2")) == ["bitmaps", "required", "fully-allocated"]
    assert "bitmaps" not in qcowfs.measure(sources / "v2.qcow2")
    assert "bitmaps" not in qcowfs.measure(sources / "sparse.raw")
    assert "bitmaps" not in qcowfs.measure(sources / "bitmaps.qcow2", compat="0.10")


@pytest.mark.parametrize("spec", ["first", "1", "snapshot.name=first", "snapshot.id=1"])
def test_snapshot(sources: Path, spec: str) -> None:
    for o in ({}, {"cluster_size": 4096}):
        d = same(["-O", "qcow2", *o_options(o), "-l", spec, "snap.qcow2"], cwd=sources)
        assert qcowfs.measure(sources / "snap.qcow2", snapshot=spec, **library_keywords(o)) == d
    same(["-O", "raw", "-l", spec, "snap.qcow2"], cwd=sources)
    assert d["required"] < qcowfs.measure(sources / "snap.qcow2", cluster_size=4096)["required"]   # (its clusters)


@pytest.mark.parametrize("args", [["-f", "raw", "sparse.qcow2"], ["-f", "raw", "-O", "qcow2", "sparse.qcow2"],
                                  ["-f", "qcow2", "-O", "qcow2", "sparse.qcow2"], ["-U", "-O", "qcow2", "sparse.qcow2"]])
def test_source_format_and_share(sources: Path, args: list[str]) -> None:
    same(args, cwd=sources)


def test_encrypted_source(tmp_path: Path) -> None:
    """An encrypted source is measured from its tables: no passphrase needed."""
    image = tmp_path / "enc.qcow2"
    luks.create_encrypted("qemu-img", "create", "-q", "-f", "qcow2", *luks.secret_object(), "-o",
                          "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", image, str(16 * MiB))
    must("qemu-io", *luks.secret_object(), "--image-opts", luks.image_opts(image), "-c", "write -P 1 1M 200k")
    want = qemu_img("measure", "--output=json", *luks.secret_object(), "-O", "qcow2", "--image-opts",
                    luks.image_opts(image))
    assert want.returncode == 0, want.stderr
    assert qcowfs.measure(image) == json.loads(want.stdout)


# ---- bad input ---------------------------------------------------------------------------

BAD = [
    ["--size", "1G", "sparse.qcow2"],
    ["-O", "qcow2"],
    [],
    ["-O", "foo", "--size", "1G"],
    ["-O", "vmdk", "--size", "1G"],
    ["--size", "-5", "-O", "qcow2"],
    ["--size", "1x"],
    ["--size", "8E"],
    ["missing.qcow2"],
    ["-O", "qcow2", "-o", "cluster_size=1000", "--size", "1G"],
    ["-O", "qcow2", "-o", "refcount_bits=3", "--size", "1G"],
    ["-O", "qcow2", "-o", "compat=0.10,refcount_bits=8", "--size", "1G"],
    ["-O", "qcow2", "-o", "compat=2", "--size", "1G"],
    ["-O", "qcow2", "-o", "preallocation=foo", "--size", "1G"],
    ["-O", "qcow2", "-o", "foo=bar", "--size", "1G"],
    ["-O", "qcow2", "-o", "extended_l2=foo", "--size", "1G"],
    ["-O", "qcow2", "-o", "extended_l2=on,cluster_size=4k", "--size", "1G"],
    ["-O", "qcow2", "-o", "cluster_size=512", "--size", "100T"],
    ["-O", "raw", "-o", "cluster_size=4k", "--size", "1G"],
    ["-l", "first", "--size", "1G"],
    ["-f", "qcow2", "--size", "1G"],
    ["--output=jsonx", "--size", "1G"],
    ["-O", "qcow2", "-l", "nosuch", "snap.qcow2"],
]


@pytest.mark.parametrize("args", BAD, ids=lambda a: " ".join(a) or "nothing")
def test_bad_input(sources: Path, args: list[str]) -> None:
    """What qemu-img measure refuses is refused: one line, exit 1."""
    assert qemu_img("measure", *args, cwd=sources).returncode == 1
    code, out, err = qcowfs_cli("measure", *args, cwd=sources)
    assert (code, out) == (1, ""), err
    assert err.startswith("qcowfs: ") and err.count("\n") == 1, err


def test_library_errors(sources: Path) -> None:
    with pytest.raises(qcowfs.UsageError):
        qcowfs.measure()
    with pytest.raises(qcowfs.UsageError):
        qcowfs.measure(sources / "sparse.qcow2", size=GiB)
    with pytest.raises(qcowfs.UsageError):
        qcowfs.measure(size=-1)
    with pytest.raises(qcowfs.UsageError):
        qcowfs.measure(size=GiB, out_format="vmdk")
    with pytest.raises(qcowfs.UsageError):
        qcowfs.measure(size=GiB, cluster_size=1000)
    with pytest.raises(qcowfs.QcowError):
        qcowfs.measure(sources / "missing.qcow2")


def test_fits(sources: Path, tmp_path: Path) -> None:
    """What measure says is enough: convert into a file of that size fits
    (qcowfs convert's image is no larger than required)."""
    for name in ("sparse.qcow2", "compressed.qcow2", "overlay.qcow2"):
        need = qcowfs.measure(sources / name)["required"]
        qcowfs.convert(sources / name, tmp_path / "out.qcow2")
        assert os.path.getsize(tmp_path / "out.qcow2") <= need, name
