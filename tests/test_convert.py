"""`qcowfs convert` / `qcowfs.convert` against qemu-img as the oracle: from
several read-matrix layouts (and encrypted and raw sources) to qcow2 (plain,
compressed zlib and zstd, -B) and raw, each result equal in `qemu-img
compare`, clean in `qemu-img check`, as sparse as `qemu-img convert`'s;
refusals before anything is touched; a kill -9 loop (DST absent, or
complete and clean, never a mix)."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import killing
from tests import images, luks

REPO = Path(__file__).resolve().parent.parent
QCOWFS = str(Path(sys.executable).parent / "qcowfs")
KEY = luks.SECRET


def run(args: list, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def qcowfs(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return run([QCOWFS, *args], cwd)


def data_bytes(image: Path, fmt: str) -> int:
    """Bytes qemu-img map calls data (allocated, not zero)."""
    p = run(["qemu-img", "map", "-f", fmt, "--output=json", image])
    assert p.returncode == 0, p.stderr
    return sum(e["length"] for e in json.loads(p.stdout) if e["data"] and not e["zero"])


def compressed_clusters(image: Path) -> int:
    p = run(["qemu-img", "check", "--output=json", image])
    assert p.returncode == 0, p.stdout + p.stderr
    return json.loads(p.stdout).get("compressed-clusters", 0)


def assert_clean(image: Path) -> None:
    p = run(["qemu-img", "check", image])
    assert p.returncode == 0, p.stdout + p.stderr


SOURCES = ["v3-c64k", "v2-c4k", "v3-c512", "convert-c-zlib-c64k", "qemu-io-c-zstd", "extl2-c64k",
           "extl2-c16k-backing", "backing-chain4", "refcount1", "zero-over-backing", "datafile-raw"]
TARGETS = {
    "qcow2": ["-O", "qcow2"],
    "qcow2-c-zlib": ["-O", "qcow2", "-c"],
    "qcow2-c-zstd": ["-O", "qcow2", "-c", "-o", "compression_type=zstd"],
    "qcow2-4k-extl2-off": ["-O", "qcow2", "-o", "cluster_size=4k,compat=0.10"],
    "raw": ["-O", "raw"],
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("sources")
    return {name: images.build(name, base / name) for name in SOURCES}


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("source", SOURCES)
def test_convert_matrix(sources: dict[str, Path], tmp_path: Path, source: str, target: str):
    src = sources[source]
    ours, theirs = tmp_path / "ours.img", tmp_path / "theirs.img"
    args = TARGETS[target]
    p = qcowfs("convert", *args, src, ours)
    assert p.returncode == 0 and not p.stderr, p.stderr
    out_fmt = args[1]
    cmp = run(["qemu-img", "compare", "-f", "qcow2", "-F", out_fmt, src, ours], cwd=src.parent)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    q = run(["qemu-img", "convert", *args, src, theirs], cwd=src.parent)
    assert q.returncode == 0, q.stderr
    if out_fmt == "qcow2":
        assert_clean(ours)
        if "-c" in args:
            assert compressed_clusters(ours) > 0
        else:
            # as sparse as qemu-img's copy: the same bytes allocated as data
            assert data_bytes(ours, "qcow2") == data_bytes(theirs, "qcow2")
    else:
        assert ours.stat().st_size == theirs.stat().st_size
        assert ours.stat().st_blocks <= theirs.stat().st_blocks + 8
    # QEMU writes the result, overwriting (compressed) clusters: still clean
    if out_fmt == "qcow2":
        w = run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x77 0 100k", ours])
        assert w.returncode == 0 and "fail" not in w.stdout, w.stdout + w.stderr
        assert_clean(ours)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_snapshot_source(tmp_path: Path):
    src = images.build("snapshots", tmp_path / "src")
    snaps = json.loads(run(["qemu-img", "info", "--output=json", src]).stdout)["snapshots"]
    for s in snaps[:2]:
        for spec in (s["name"], f"snapshot.id={s['id']}"):
            out = tmp_path / "out.qcow2"
            p = qcowfs("convert", "-O", "qcow2", "-l", spec, src, out)
            assert p.returncode == 0, p.stderr
            ref = tmp_path / "ref.raw"
            run(["qemu-img", "convert", "-O", "raw", "-l", f"snapshot.id={s['id']}", src, ref])
            cmp = run(["qemu-img", "compare", "-F", "raw", out, ref])
            assert cmp.returncode == 0, cmp.stdout
            assert_clean(out)
            out.unlink()


def test_raw_source_keeps_holes(tmp_path: Path):
    raw = tmp_path / "src.raw"
    with open(raw, "wb") as f:
        f.truncate(64 << 20)
        rnd = random.Random(5)
        for off in (0, 5 << 20, 33 << 20, (64 << 20) - 4096):
            f.seek(off)
            f.write(rnd.randbytes(4096 * rnd.randint(1, 40)))
        f.seek(40 << 20)
        f.write(bytes(1 << 20))  # written zeros: allocated on the host, still a hole in the copy
    for target, cache in (("qcow2", "unsafe"), ("raw", "writeback")):
        out = tmp_path / f"out.{target}"
        p = qcowfs("convert", "-f", "raw", "-O", target, "-t", cache, raw, out)
        assert p.returncode == 0, p.stderr
        cmp = run(["qemu-img", "compare", "-f", "raw", "-F", target, raw, out])
        assert cmp.returncode == 0, cmp.stdout
        ref = tmp_path / f"ref.{target}"
        run(["qemu-img", "convert", "-f", "raw", "-O", target, raw, ref])
        assert data_bytes(out, target) <= data_bytes(ref, target)
    p = qcowfs("convert", "-f", "raw", "-O", "raw", "-S", "0", raw, tmp_path / "full.raw")
    assert p.returncode == 0
    assert files_equal(raw, tmp_path / "full.raw")


def files_equal(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


def test_encrypted_source_and_target(tmp_path: Path):
    src = luks.create(tmp_path / "enc.qcow2", 16 << 20)
    luks.qemu_io(src, "write -P 0x3c 0 1M", "write -P 0x4d 7M 64k")
    key = tmp_path / "key"
    key.write_text(KEY)
    out = tmp_path / "plain.qcow2"
    p = qcowfs("convert", "-O", "qcow2", "--key-file", key, src, out)
    assert p.returncode == 0, p.stderr
    ref = luks.to_raw(src, tmp_path / "ref.raw")
    assert run(["qemu-img", "compare", "-F", "raw", out, ref]).returncode == 0
    enc = tmp_path / "again.qcow2"
    p = qcowfs("convert", "-O", "qcow2", "-o", "encrypt.format=luks,encrypt.iter-time=10",
               "--target-key-file", key, out, enc)
    assert p.returncode == 0, p.stderr
    assert luks.compare(enc, ref).returncode == 0
    assert luks.check(enc).returncode == 0
    # A wrong passphrase: refused, nothing left behind
    key.write_text("wrong")
    p = qcowfs("convert", "-O", "qcow2", "--key-file", key, src, tmp_path / "never.qcow2")
    assert p.returncode == 1 and len(p.stderr.splitlines()) == 1, p.stderr
    assert not (tmp_path / "never.qcow2").exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


@pytest.mark.parametrize("opts", ["compat=0.10,preallocation=metadata", "compat=0.10,preallocation=full",
                                  "preallocation=metadata"])
def test_encrypted_preallocated_target_reads_the_source(tmp_path: Path, opts: str):
    """The source's holes and zeros are not written: an encrypted v2 target's preallocated
    clusters, which no zero flag can mark, read the noise the host's zeros decrypt to. There
    convert says every byte (zeros too); v3 targets are flagged zero by create."""
    src = images.create(tmp_path / "src.qcow2", 8 << 20)
    images.qio(src, "write -P 0x3c 1M 1M", "write -z 4M 64k")
    ref = tmp_path / "ref.raw"
    run(["qemu-img", "convert", "-O", "raw", src, ref])
    key = tmp_path / "key"
    key.write_text(KEY)
    out = tmp_path / "out.qcow2"
    p = qcowfs("convert", "-O", "qcow2", "--target-key-file", key, "-o",
               f"encrypt.format=luks,encrypt.iter-time=10,{opts}", src, out)
    assert p.returncode == 0, p.stderr
    p = luks.compare(out, ref)
    assert p.returncode == 0, p.stdout + p.stderr
    assert luks.check(out).returncode == 0


def test_backing_option_writes_only_differences(tmp_path: Path):
    base = images.create(tmp_path / "base.qcow2", 16 << 20)
    images.qio(base, "write -P 0x11 0 4M", "write -P 0x22 8M 2M")
    src = tmp_path / "src.qcow2"
    run(["qemu-img", "convert", "-O", "qcow2", base, src])
    images.qio(src, "write -P 0x33 1M 64k", "write -z 8M 1M", "write -P 0x44 14M 64k")
    out = tmp_path / "out.qcow2"
    p = qcowfs("convert", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", src, out)
    assert p.returncode == 0, p.stderr
    assert run(["qemu-img", "compare", out, src]).returncode == 0
    assert_clean(out)
    info = json.loads(run(["qemu-img", "info", "--output=json", out]).stdout)
    assert info["backing-filename"] == "base.qcow2"
    top = [e for e in json.loads(run(["qemu-img", "map", "--output=json", out]).stdout) if e["depth"] == 0
           and e["present"]]
    written = sum(e["length"] for e in top)
    assert written == 64 * 1024 + (1 << 20) + 64 * 1024, top
    c = tmp_path / "c.qcow2"
    p = qcowfs("convert", "-O", "qcow2", "-c", "-B", "base.qcow2", src, c)
    assert p.returncode == 0, p.stderr
    assert run(["qemu-img", "compare", c, src]).returncode == 0
    assert_clean(c)


def test_backing_as_a_create_option(tmp_path: Path):
    """-o backing_file=/backing_fmt= say what -B/-F say; where both are given, -B wins,
    as in qemu-img."""
    base = images.create(tmp_path / "base.qcow2", 4 << 20)
    images.qio(base, "write -P 0x11 0 2M")
    src = tmp_path / "src.qcow2"
    run(["qemu-img", "convert", "-O", "qcow2", base, src])
    images.qio(src, "write -P 0x33 1M 64k")
    out = tmp_path / "out.qcow2"
    p = qcowfs("convert", "-O", "qcow2", "-o", "backing_file=base.qcow2,backing_fmt=qcow2", src, out)
    assert p.returncode == 0, p.stderr
    assert json.loads(run(["qemu-img", "info", "--output=json", out]).stdout)["backing-filename"] == "base.qcow2"
    assert run(["qemu-img", "compare", out, src]).returncode == 0
    assert_clean(out)
    both = tmp_path / "both.qcow2"
    p = qcowfs("convert", "-O", "qcow2", "-B", "base.qcow2", "-o", "backing_file=src.qcow2", src, both)
    assert p.returncode == 0, p.stderr
    assert json.loads(run(["qemu-img", "info", "--output=json", both]).stdout)["backing-filename"] == "base.qcow2"


def test_backing_option_over_an_encrypted_backing_file(tmp_path: Path):
    """An encrypted source over its encrypted backing file, converted with -B that same
    file: the source's passphrase opens it (it opened the source's chain already)."""
    base = luks.create(tmp_path / "base.qcow2", 8 << 20, cluster_size=4096)
    luks.qemu_io(base, "write -P 0x11 0 4M")
    src = luks.create(tmp_path / "src.qcow2", 8 << 20, backing_file="base.qcow2", backing_fmt="qcow2")
    opts = f"{luks.image_opts(src)},backing.encrypt.key-secret=sec0"
    p = run(["qemu-io", *luks.secret_object(), "--image-opts", "-c", "write -P 0x22 1M 64k",
             "-c", "write -z 2M 64k", opts])
    assert p.returncode == 0 and "fail" not in p.stdout, p.stdout + p.stderr
    ref = tmp_path / "ref.raw"
    run(["qemu-img", "convert", *luks.secret_object(), "--image-opts", opts, "-O", "raw", ref])
    key = tmp_path / "key"
    key.write_text(KEY)
    out = tmp_path / "out.qcow2"
    p = qcowfs("convert", "-O", "qcow2", "--key-file", key, "-B", "base.qcow2", "-F", "qcow2", src, out)
    assert p.returncode == 0, p.stderr
    p = run(["qemu-img", "compare", *luks.secret_object(), "--image-opts",
             f"driver=qcow2,file.filename={out},backing.encrypt.key-secret=sec0", f"driver=raw,file.filename={ref}"])
    assert p.returncode == 0, p.stdout + p.stderr
    top = [e for e in json.loads(run(["qemu-img", "map", "--output=json", "-U", *luks.secret_object(), "--image-opts",
                                      f"driver=qcow2,file.filename={out},backing.encrypt.key-secret=sec0"]).stdout)
           if e["depth"] == 0 and e["present"]]
    assert sum(e["length"] for e in top) == 2 * (64 << 10), top  # only what differs from the base


REFUSED = [
    (["-O", "raw", "-c"], "need"),
    (["-O", "vmdk"], "invalid choice"),
    (["-O", "qcow2", "-o", "cluster_size=1000"], "cluster size"),
    (["-O", "qcow2", "-o", "nope=1"], "invalid parameter"),
    (["-O", "qcow2", "-S", "1000"], "multiple of 512"),
    (["-O", "qcow2", "-l", "nosuch"], "snapshot"),
    (["-O", "qcow2", "-c", "-o", "encrypt.format=luks"], "compress"),
    (["-O", "qcow2", "-c", "-o", "preallocation=metadata"], "preallocation"),
    (["-O", "qcow2", "-t", "sometimes"], "cache mode"),
]


@pytest.mark.parametrize("args,why", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_bad_arguments_touch_nothing(tmp_path: Path, args: list[str], why: str):
    src = images.create(tmp_path / "src.qcow2", 4 << 20)
    dst = tmp_path / "dst.img"
    dst.write_bytes(b"precious")
    p = qcowfs("convert", *args, src, dst)
    assert p.returncode in (1, 2) and "Traceback" not in p.stderr, p.stderr
    assert why in p.stderr.lower() or why in p.stderr, p.stderr
    assert dst.read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path)) == ["dst.img", "src.qcow2"]


def test_missing_and_same_file(tmp_path: Path):
    src = images.create(tmp_path / "src.qcow2", 4 << 20)
    p = qcowfs("convert", "-O", "qcow2", tmp_path / "missing.qcow2", tmp_path / "x.qcow2")
    assert p.returncode == 1 and len(p.stderr.splitlines()) == 1
    p = qcowfs("convert", "-O", "qcow2", src, src)
    assert p.returncode == 1 and "same" in p.stderr
    # A pipe cannot be read at offsets (it said "Illegal seek" and named nothing).
    p = subprocess.run([QCOWFS, "convert", "-f", "raw", "-O", "qcow2", "/dev/stdin", tmp_path / "x.qcow2"],
                       input=b"x" * 4096, capture_output=True, timeout=60)
    assert p.returncode == 1 and p.stderr.decode().strip() == "qcowfs: cannot read /dev/stdin: Illegal seek"
    # A raw backing file that is a directory opens, then every read fails: it
    # said "qcowfs: Is a directory" halfway through the copy.
    (tmp_path / "dir").mkdir()
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "dir", "-F", "raw", tmp_path / "ov.qcow2", "4M"])
    p = qcowfs("convert", "-O", "raw", tmp_path / "ov.qcow2", tmp_path / "x.raw")
    assert p.returncode == 1 and p.stderr.strip().endswith(f"cannot read {tmp_path / 'dir'}: Is a directory"), p.stderr
    assert sorted(os.listdir(tmp_path)) == ["dir", "ov.qcow2", "src.qcow2"]


def test_source_held_by_a_writer(tmp_path: Path):
    import qcowfs as lib

    src = images.create(tmp_path / "src.qcow2", 4 << 20)
    images.qio(src, "write -P 0x5e 0 64k")
    with lib.open(src, "r+"):
        p = qcowfs("convert", "-O", "qcow2", src, tmp_path / "out.qcow2")
        assert p.returncode == 1 and "in use" in p.stderr, p.stderr
        assert not (tmp_path / "out.qcow2").exists()
        p = qcowfs("convert", "-U", "-O", "qcow2", src, tmp_path / "out.qcow2")
        assert p.returncode == 0, p.stderr
    # and a destination another program holds is not replaced
    dst = tmp_path / "out.qcow2"
    before = dst.read_bytes()
    with lib.open(dst, "r+"):
        p = qcowfs("convert", "-O", "qcow2", src, dst)
        assert p.returncode == 1 and "in use" in p.stderr, p.stderr
    assert dst.read_bytes() == before


def test_library_convert_and_compress_option(tmp_path: Path):
    import trio

    import qcowfs
    import qcowfs.aio

    src = images.create(tmp_path / "src.qcow2", 8 << 20)
    images.qio(src, "write -P 0x61 0 2M", "write -P 0x62 5M 100k")
    seen: list[float] = []
    qcowfs.convert(src, tmp_path / "a.qcow2", compress=True, compression_type="zstd", progress=seen.append)
    assert seen and seen[-1] == 1.0
    trio.run(lambda: qcowfs.aio.convert(src, tmp_path / "b.raw", out_format="raw"))
    for out, fmt in ((tmp_path / "a.qcow2", "qcow2"), (tmp_path / "b.raw", "raw")):
        assert run(["qemu-img", "compare", "-F", fmt, src, out]).returncode == 0
    assert compressed_clusters(tmp_path / "a.qcow2") >= 32
    # Image.disk with compress=True (QEMU's compress filter), then plain overwrites
    img = qcowfs.create(tmp_path / "c.qcow2", 4 << 20) or tmp_path / "c.qcow2"
    pattern = b"compressible " * 50000
    with qcowfs.open(img, "r+", compress=True) as image:
        image.disk.seek(1000)
        image.disk.write(pattern)
    assert compressed_clusters(img) >= 8
    with qcowfs.open(img, "r+") as image:
        image.disk.pwrite(b"\xee" * 5000, 70000)
    assert_clean(img)
    expected = bytearray(4 << 20)
    expected[1000 : 1000 + len(pattern)] = pattern
    expected[70000:75000] = b"\xee" * 5000
    ref = tmp_path / "expected.raw"
    ref.write_bytes(expected)
    assert run(["qemu-img", "compare", "-F", "raw", img, ref]).returncode == 0


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_compression_threads_make_the_same_image(tmp_path: Path, ctype: str):
    """-c with 1 and with 3 worker threads: byte for byte the same file, equal
    to the source for qemu-img and clean. The source spans more chunks than
    are queued at once (buffers are reused), mixes clusters that shrink with
    random ones (written plainly, cutting the compressed runs) and zeros, and
    ends inside a cluster."""
    import qcowfs

    rnd = random.Random(7)
    size = 40 * (1 << 20) + 1536
    raw = bytearray(size)
    for base in range(0, size, 3 << 20):
        raw[base : base + 300_000] = rnd.randbytes(300_000)
        text = b" ".join(rnd.choice([b"qcow2", b"zero", b"cluster"]) for _ in range(120_000))
        raw[base + 400_000 : base + 400_000 + 700_000] = text[:700_000]
    raw[size - 1000 :] = b"tail" * 250
    src = tmp_path / "src.raw"
    src.write_bytes(raw[:size])
    outs = []
    for threads in (1, 3):
        out = tmp_path / f"t{threads}.qcow2"
        qcowfs.convert(src, out, compress=True, compression_type=ctype, compress_threads=threads)
        assert run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", src, out]).returncode == 0
        assert_clean(out)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    assert compressed_clusters(tmp_path / "t3.qcow2") >= 100
    assert data_bytes(tmp_path / "t3.qcow2", "qcow2") < size * 0.8   # the zeros stayed holes
    with pytest.raises(qcowfs.QcowError):
        qcowfs.convert(src, tmp_path / "none.qcow2", compress=True, compress_threads=0)
    assert not (tmp_path / "none.qcow2").exists()


def test_kill_loop_leaves_nothing_or_everything(tmp_path: Path):
    """kill -9 at writes spread over a whole convert (the first and the last
    included): DST is absent, since the copy is made under another name and
    renamed when whole; run to the end, it equals the source and is clean."""
    src = images.create(tmp_path / "src.qcow2", 64 << 20)
    rnd = random.Random(7)
    cmds = [f"write -P {rnd.randint(1, 255)} {i << 20} {rnd.choice([64, 512, 1024])}k" for i in range(0, 64, 2)]
    images.qio(src, *cmds)
    dst = tmp_path / "dst.qcow2"
    args: list[object] = ["convert", "-O", "qcow2", "-c", src, dst]
    total = killing.writes(args)
    assert run(["qemu-img", "compare", src, dst]).returncode == 0
    assert_clean(dst)
    for n in killing.points(total, 6):
        dst.unlink(missing_ok=True)
        killing.killed_at(args, n)
        assert not dst.exists(), f"a convert killed at write {n} of {total} left {dst.name}"
        leftovers = list(tmp_path.glob(".*dst.qcow2.qcowfs-*"))
        assert leftovers, f"write {n} of {total}: the killed convert wrote no temporary copy"
        for leftover in leftovers:
            leftover.unlink()


def test_chunks_are_read_ahead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """convert reads the source's next chunk on a worker thread while the
    caller's thread writes the chunk before (engine.convert.Lane): the first
    chunk is read by the caller's thread, every later one by the read lane,
    in order; every chunk is written by the caller's thread, in order; the
    images are still exact."""
    import threading

    import qcowfs
    from qcowfs.engine import convert as engine_convert

    chunk = engine_convert.CHUNK
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        for i in range(5):   # 5 chunks of data with holes between them
            f.seek(i * 2 * chunk)
            f.write(bytes([i + 1]) * chunk)
    reads: list[tuple[int, str]] = []
    writes: list[tuple[int, str]] = []
    readinto, write = engine_convert.RawDisk.readinto, engine_convert.RawTarget.write

    async def read_recorded(self: engine_convert.RawDisk, buf: memoryview, offset: int) -> int:
        reads.append((offset, threading.current_thread().name))
        return await readinto(self, buf, offset)

    async def write_recorded(self: engine_convert.RawTarget, offset: int, data: memoryview) -> int:
        writes.append((offset, threading.current_thread().name))
        return await write(self, offset, data)

    monkeypatch.setattr(engine_convert.RawDisk, "readinto", read_recorded)
    monkeypatch.setattr(engine_convert.RawTarget, "write", write_recorded)
    for out, fmt in ((tmp_path / "out.qcow2", "qcow2"), (tmp_path / "out.raw", "raw")):
        reads.clear()
        qcowfs.convert(src, out, out_format=fmt)
        assert [o for o, _ in reads] == [i * 2 * chunk for i in range(5)]
        assert reads[0][1] == threading.current_thread().name
        assert all(name.startswith("qcowfs-read") for _, name in reads[1:]), reads
        assert run(["qemu-img", "compare", "-f", "raw", "-F", fmt, src, out]).returncode == 0
    assert_clean(tmp_path / "out.qcow2")
    assert [o for o, _ in writes] == [i * 2 * chunk for i in range(5)]
    assert all(name == threading.current_thread().name for _, name in writes), writes


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 6 MiB tmpfs: a target that runs out of space."""
    d = tmp_path / "small"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6M", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=True)


@pytest.mark.parametrize("out_format", ["qcow2", "raw"])
def test_a_full_target_fails_the_copy(tmp_path: Path, small_fs: Path, out_format: str):
    """A write that fails while a read is in flight on the read lane (the
    target's file system is full after a chunk or two) fails the convert in
    one line, and leaves neither the destination nor its temporary file;
    the source unchanged."""
    src = images.create(tmp_path / "src.qcow2", 64 << 20)
    images.qio(src, *[f"write -P {i + 1} {i * 4}M 3M" for i in range(16)])
    before = src.read_bytes()
    p = qcowfs("convert", "-O", out_format, src, small_fs / f"dst.{out_format}")
    assert p.returncode != 0
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "No space left" in p.stderr, p.stderr
    assert list(small_fs.iterdir()) == []
    assert src.read_bytes() == before


@pytest.mark.parametrize("out_format", ["qcow2", "raw"])
def test_a_failing_read_ahead_fails_the_copy(tmp_path: Path, out_format: str):
    """A read that fails on the read-ahead thread (a data cluster offset not
    cluster aligned, in the source's fourth chunk) fails the convert as a
    failing read of the first chunk does: one line naming the corruption,
    no destination left behind, the source unchanged; through the library
    (sync and under trio) the same QcowError."""
    import trio

    import qcowfs as library
    from qcowfs import aio
    from qcowfs.engine.convert import CHUNK

    from corruption import COPIED, OFFSET_MASK, l2_entry_offset, poke_u64, u64

    src = images.create(tmp_path / "src.qcow2", 8 * CHUNK)
    images.qio(src, *[f"write -P {i + 1} {i * CHUNK} 1M" for i in range(8)])
    bad = 3 * CHUNK
    entry = l2_entry_offset(src, bad)
    poke_u64(src, entry, COPIED | ((u64(src, entry) & OFFSET_MASK) + 0x2A00))
    before = src.read_bytes()
    dst = tmp_path / f"dst.{out_format}"
    p = qcowfs("convert", "-O", out_format, src, dst)
    assert p.returncode != 0
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "corrupt" in p.stderr.lower() or "align" in p.stderr.lower(), p.stderr
    assert not dst.exists() and [f.name for f in tmp_path.iterdir() if f.name.startswith(".")] == []
    with pytest.raises(library.QcowError):
        library.convert(src, dst, out_format=out_format)
    with pytest.raises(library.QcowError):
        trio.run(lambda: aio.convert(src, dst, out_format=out_format))
    assert not dst.exists()
    assert src.read_bytes() == before


# The blocks of a chunk: all zeros, zeros but one byte (first, middle or last),
# random data, and data that starts with zeros.
_BLOCK_KINDS = ("zero", "zero", "last", "first", "middle", "data", "lead")
# The random bytes of those blocks: from a seed hypothesis draws. (st.randoms
# draws every byte from hypothesis's buffer: 40 blocks of 64 KiB exceeded its
# entropy budget, and its health check failed a fresh-clone run.)
_SEEDED = st.integers(0, 2**32 - 1).map(random.Random)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from((512, 4096, 65536)), st.lists(st.sampled_from(_BLOCK_KINDS), min_size=1, max_size=40),
       st.integers(0, 511), _SEEDED)
def test_zero_runs_are_the_blocks_of_zeros(unit: int, kinds: list[str], cut: int, rnd: random.Random):
    """convert's zero check (engine.blocks.zero_runs, strided first bytes and
    memcmp) against the obvious comparison of every block, on chunks mixing
    blocks of zeros, blocks with one non-zero byte anywhere, data, and data
    that begins with zeros; the chunk may end inside a block."""
    from qcowfs.engine.blocks import complement, index_runs, zero_runs

    block = {"zero": lambda: bytes(unit), "data": lambda: rnd.randbytes(unit),
             "first": lambda: b"\1" + bytes(unit - 1), "last": lambda: bytes(unit - 1) + b"\1",
             "middle": lambda: bytes(unit // 2) + b"\7" + bytes(unit - unit // 2 - 1),
             "lead": lambda: bytes(unit // 3) + rnd.randbytes(unit - unit // 3)}
    buf = bytearray(b"".join(block[k]() for k in kinds) + b"\xff" * 100)   # (bytes past N must not count)
    n = max(1, len(kinds) * unit - cut)
    count = -(-n // unit)
    zeros = [i for i in range(count) if not any(buf[i * unit : min(n, (i + 1) * unit)])]
    assert zero_runs(buf, n, unit) == index_runs(zeros)
    assert [i for a, b in complement(zero_runs(buf, n, unit), count) for i in range(a, b)] == \
        [i for i in range(count) if i not in zeros]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from((512, 4096, 65536)),
       st.lists(st.tuples(st.sampled_from(_BLOCK_KINDS), st.sampled_from(("same", "same", "data", "zero", "byte"))),
                min_size=1, max_size=40),
       st.integers(0, 511), _SEEDED)
def test_differing_runs_are_the_blocks_that_differ(unit: int, kinds: list[tuple[str, str]], cut: int,
                                                   rnd: random.Random):
    """The blocks convert -B and a safe rebase write (engine.blocks.differing_runs)
    against the obvious comparison of every block: a block differs from the
    other buffer's wholly, in one byte, or not at all, and is zeros or data."""
    from qcowfs.engine.blocks import differing_runs, index_runs

    block = {"zero": lambda: bytes(unit), "data": lambda: rnd.randbytes(unit),
             "first": lambda: b"\1" + bytes(unit - 1), "last": lambda: bytes(unit - 1) + b"\1",
             "middle": lambda: bytes(unit // 2) + b"\7" + bytes(unit - unit // 2 - 1),
             "lead": lambda: bytes(unit // 3) + rnd.randbytes(unit - unit // 3)}
    ours, theirs = bytearray(), bytearray()
    for kind, change in kinds:
        b = block[kind]()
        ours += b
        if change == "byte":
            i = rnd.randrange(unit)
            b = b[:i] + bytes([b[i] ^ 0x5A]) + b[i + 1:]
        theirs += {"same": b, "data": rnd.randbytes(unit), "zero": bytes(unit), "byte": b}[change]
    ours += b"\xff" * 100   # (bytes past N must not count)
    theirs += b"\0" * 100
    n = max(1, len(kinds) * unit - cut)
    count = -(-n // unit)
    differ = [i for i in range(count) if ours[i * unit : min(n, (i + 1) * unit)] != theirs[i * unit : min(n, (i + 1) * unit)]]
    zero = [i for i in differ if not any(ours[i * unit : min(n, (i + 1) * unit)])]
    assert differing_runs(ours, memoryview(theirs), n, unit) == \
        (index_runs(zero), index_runs([i for i in differ if i not in zero]))


def test_a_backing_file_that_does_not_open_is_named_as_given(tmp_path: Path) -> None:
    """`convert -B` with a backing file name that does not resolve from the
    destination's directory (it is relative to it, not to the working
    directory) fails before anything is made, naming the file as given: the
    message named the hidden temporary image the convert had made first."""
    (tmp_path / "a").mkdir()
    (tmp_path / "c").mkdir()
    run(["qemu-img", "create", "-q", "-f", "qcow2", "a/base.qcow2", "4M"], cwd=tmp_path)
    p = run([QCOWFS, "convert", "-O", "qcow2", "-B", "a/base.qcow2", "-F", "qcow2", "a/base.qcow2", "c/out.qcow2"],
            cwd=tmp_path)
    assert p.returncode == 1 and p.stderr == "qcowfs: could not open backing file a/base.qcow2: No such file or " \
        "directory\n", p.stderr
    assert os.listdir(tmp_path / "c") == []


def test_qemu_img_tuning_options_are_taken(tmp_path: Path) -> None:
    """`convert -W -m 16 -T none` (qemu-img's out-of-order writes, parallel
    requests, source cache): scripts pass them; qcowfs refused them as usage
    errors. They are checked as qemu-img checks them and change nothing."""
    run(["qemu-img", "create", "-q", "-f", "qcow2", "s.qcow2", "4M"], cwd=tmp_path)
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 1M 64k", "s.qcow2"], cwd=tmp_path)
    p = run([QCOWFS, "convert", "-W", "-m", "16", "-T", "none", "-O", "qcow2", "s.qcow2", "d.qcow2"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert run(["qemu-img", "compare", "s.qcow2", "d.qcow2"], cwd=tmp_path).returncode == 0
    for bad in (["-m", "17"], ["-m", "0"], ["-T", "bogus"]):
        p = run([QCOWFS, "convert", *bad, "-O", "qcow2", "s.qcow2", "e.qcow2"], cwd=tmp_path)
        assert p.returncode == 1 and len(p.stderr.splitlines()) == 1, p.stderr
        assert not (tmp_path / "e.qcow2").exists()
