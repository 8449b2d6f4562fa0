"""Test images built at test time with qemu-img / qemu-io.

Every builder takes a directory and returns the path of the top image it made
there (backing files, external data files, ... live next to it or in
subdirectories of that directory). Data is written at unaligned offsets with
varied content (random bytes, compressible counters, constant patterns) so that
a wrong guest->host mapping shows up as a byte difference.

Also: a tiny qcow2 header parser / patcher used to make hostile images.
"""
from __future__ import annotations

import json
import os
import random
import struct
import subprocess
from pathlib import Path
from typing import Callable, Iterable

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

TIMEOUT = 120


# --------------------------------------------------------------------------
# running qemu tools (always with a timeout)

def sh(*args, check: bool = True, cwd: Path | None = None, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def qimg(*args, cwd: Path | None = None) -> str:
    return sh("qemu-img", *args, cwd=cwd).stdout


def qio(image: Path, *cmds: str, fmt: str = "qcow2", check: bool = True, cwd: Path | None = None,
        extra: Iterable[str] = ()) -> subprocess.CompletedProcess:
    args: list[str] = ["qemu-io", "-f", fmt, *extra]
    for c in cmds:
        args += ["-c", c]
    p = sh(*args, str(image), check=check, cwd=cwd)
    # qemu-io reports I/O errors on stdout but still exits 0 for some of them
    if check and ("failed" in p.stdout or "error" in p.stdout.lower()):
        raise RuntimeError(f"qemu-io {cmds} on {image}: {p.stdout}{p.stderr}")
    return p


def create(path: Path, size: int | str, backing: str | None = None, backing_fmt: str | None = None,
           unsafe: bool = False, cwd: Path | None = None, **opts) -> Path:
    args: list[str] = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", ",".join(f"{k}={v}" for k, v in opts.items())]
    if backing is not None:
        args += ["-b", backing]
        if backing_fmt:
            args += ["-F", backing_fmt]
    if unsafe:
        args.append("-u")
    args += [str(path), str(size)]
    qimg(*args, cwd=cwd)
    return path


def info(image: Path, *extra: str) -> dict:
    """`qemu-img info --output=json`, run in the image's directory (see oracle())."""
    image = Path(image).resolve()
    return json.loads(qimg("info", "--output=json", *extra, image, cwd=image.parent))


def virtual_size(image: Path) -> int:
    return info(image)["virtual-size"]


# --------------------------------------------------------------------------
# source data for writes

class Sources:
    """Files of deterministic content for `qemu-io write -s FILE`.

    qemu-io always writes a source file from its start, so several files with
    different content are rotated through.
    """

    def __init__(self, directory: Path, seed: int = 1, size: int = 512 * KiB, n: int = 6):
        self.dir = directory / "_src"
        self.dir.mkdir(exist_ok=True)
        rng = random.Random(seed)
        self.random: list[Path] = []
        self.text: list[Path] = []
        for i in range(n):
            p = self.dir / f"rnd{i}"
            p.write_bytes(rng.randbytes(size))
            self.random.append(p)
            t = self.dir / f"txt{i}"
            t.write_bytes(counter_bytes(size, tag=seed * 100 + i))
            self.text.append(t)
        self._r = 0
        self._t = 0

    def rnd(self, need: int = 0) -> Path:
        """Next random-content file, at least NEED bytes long."""
        self._r = (self._r + 1) % len(self.random)
        p = self.random[self._r]
        if p.stat().st_size < need:
            p.write_bytes(random.Random(f"{p}{need}").randbytes(need))
        return p

    def txt(self, need: int = 0) -> Path:
        """Next compressible file, at least NEED bytes long."""
        self._t = (self._t + 1) % len(self.text)
        p = self.text[self._t]
        if p.stat().st_size < need:
            p.write_bytes(counter_bytes(need, tag=0x8000 + self._t))
        return p


def counter_bytes(size: int, tag: int = 0) -> bytes:
    """Compressible but position-dependent content: 16-byte records 'TTTTNNNNNNNNNNN\\n'."""
    out = bytearray()
    i = 0
    while len(out) < size:
        out += f"{tag:04x}{i:011x}\n".encode()
        i += 1
    return bytes(out[:size])


def scatter_cmds(src: Sources, vsize: int, cluster: int, seed: int, n_random: int = 8,
                 max_len: int = 200 * KiB) -> list[str]:
    """qemu-io commands writing varied data at unaligned offsets over the whole disk."""
    rng = random.Random(seed)
    cmds: list[str] = []
    big = min(2 * cluster + 333, max_len)
    cmds.append(f"write -s {src.rnd()} 1 {big}")                         # crosses cluster boundaries
    b = cluster if cluster < vsize else vsize // 2
    cmds.append(f"write -P 0xa5 {b - 3} 7")                               # tiny, straddles a boundary
    mid = (vsize // 2) | 1
    cmds.append(f"write -s {src.txt()} {mid} {min(cluster + 4097, max_len, vsize - mid)}")
    last = min(777, vsize)
    cmds.append(f"write -s {src.rnd()} {vsize - last} {last}")            # touches the last byte
    for _ in range(n_random):
        ln = rng.randint(1, min(max_len, vsize // 8))
        off = rng.randint(0, vsize - ln)
        if rng.random() < 0.5:
            cmds.append(f"write -s {src.rnd()} {off} {ln}")
        else:
            cmds.append(f"write -P 0x{rng.randint(1, 255):02x} {off} {ln}")
    # an unaligned zero write over data written above (qemu writes zeros into the cluster)
    cmds.append(f"write -z {b // 2 + 5} {min(b, 4 * KiB) + 11}")
    return cmds


# --------------------------------------------------------------------------
# the matrix

Builder = Callable[[Path], Path]
MATRIX: dict[str, Builder] = {}
HUGE: set[str] = set()        # images too big to compare in full
SNAPSHOTS: set[str] = set()   # images with internal snapshots


def image(name: str, *, huge: bool = False, snapshots: bool = False):
    def deco(fn: Builder) -> Builder:
        assert name not in MATRIX, name
        MATRIX[name] = fn
        if huge:
            HUGE.add(name)
        if snapshots:
            SNAPSHOTS.add(name)
        return fn
    return deco


def build(name: str, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return MATRIX[name](directory)


SIZES = {"512": 512, "4k": 4 * KiB, "64k": 64 * KiB, "2M": 2 * MiB}


def _version_cluster(compat: str, cs_name: str):
    cs = SIZES[cs_name]

    def fn(d: Path) -> Path:
        vsize = 8 * MiB if cs < 2 * MiB else 16 * MiB
        img = create(d / "disk.qcow2", vsize, compat=compat, cluster_size=cs)
        src = Sources(d, seed=cs)
        # one compressed cluster (compat=0.10 supports zlib compression too); compressed writes
        # only go to unallocated clusters, so first; scattered writes may then partly overwrite it
        comp_off = (vsize // 4) // cs * cs
        cmds = [f"write -c -s {src.txt(cs)} {comp_off} {cs}"]
        cmds += scatter_cmds(src, vsize, cs, seed=cs * 7 + len(compat))
        cmds.append(f"write -P 0xc3 {comp_off + cs // 3} 5")
        # a cluster-aligned zero write over data: zero flag on v3, zero data on v2
        cmds.append(f"write -s {src.rnd(cs)} {3 * vsize // 4 // cs * cs} {cs}")
        cmds.append(f"write -z {3 * vsize // 4 // cs * cs} {cs}")
        qio(img, *cmds)
        return img
    return fn


for _compat, _v in (("0.10", "v2"), ("1.1", "v3")):
    for _cs in SIZES:
        image(f"{_v}-c{_cs}")(_version_cluster(_compat, _cs))


def _refcount(bits: int):
    cs = {1: 512, 2: 4 * KiB, 4: 64 * KiB, 8: 4 * KiB, 16: 64 * KiB, 32: 512, 64: 4 * KiB}[bits]

    def fn(d: Path) -> Path:
        vsize = 4 * MiB
        img = create(d / "disk.qcow2", vsize, refcount_bits=bits, cluster_size=cs)
        src = Sources(d, seed=bits)
        cmds = [f"write -c -s {src.txt()} {cs * 9} {cs}"]
        cmds += scatter_cmds(src, vsize, cs, seed=bits)
        qio(img, *cmds)
        return img
    return fn


for _bits in (1, 2, 4, 8, 16, 32, 64):
    image(f"refcount{_bits}")(_refcount(_bits))


@image("zero-plain")
def _zero_plain(d: Path) -> Path:
    """Zero clusters without a host offset, next to data and unallocated clusters."""
    img = create(d / "disk.qcow2", 4 * MiB)
    src = Sources(d, seed=11)
    qio(img, f"write -s {src.rnd(1 * MiB)} 0 1M",
        "write -z 128k 192k",              # cluster-aligned zero over data: zero flag (no -u: keeps offset)
        "write -z 2M 128k",                # zero clusters where nothing was allocated
        f"write -s {src.rnd()} {2 * MiB + 100} 1000",  # partly overwrite a zero cluster
        "write -z 1000 3000")              # unaligned: zeros written into the data cluster
    assert_map(img, lambda e: e["zero"] and "offset" in e, "a preallocated zero cluster")
    assert_map(img, lambda e: e["zero"] and e["present"] and "offset" not in e, "a zero cluster without offset")
    return img


@image("zero-prealloc")
def _zero_prealloc(d: Path) -> Path:
    """Data then `write -z` without unmap: L2 entries keep their host offset and get the zero flag."""
    img = create(d / "disk.qcow2", 4 * MiB, cluster_size=4 * KiB)
    src = Sources(d, seed=12)
    qio(img, f"write -s {src.rnd(2 * MiB)} 0 2M", "write -z 64k 64k", "write -z 1M 512k",
        f"write -P 0x3c {MiB + 4096 * 3 + 17} 99")
    assert_map(img, lambda e: e["zero"] and "offset" in e, "a preallocated zero cluster")
    return img


def assert_map(img: Path, pred, what: str) -> None:
    """Check that qemu really produced the layout a builder is meant to produce."""
    m = json.loads(qimg("map", "--output=json", img))
    assert any(pred(e) for e in m), f"{img}: qemu-img map shows no {what}: {m}"


@image("zero-unmap")
def _zero_unmap(d: Path) -> Path:
    img = create(d / "disk.qcow2", 4 * MiB)
    src = Sources(d, seed=13)
    qio(img, f"write -s {src.rnd(2 * MiB)} 0 2M", "write -z -u 64k 192k", "write -z -u 1M 1M",
        f"write -P 0x77 {MiB + 12345} 4321")
    return img


@image("zero-metadata-prealloc-v3")
def _zero_meta_v3(d: Path) -> Path:
    img = create(d / "disk.qcow2", 3 * MiB + 512, preallocation="metadata")
    src = Sources(d, seed=14)
    qio(img, f"write -s {src.rnd()} 70000 200000", "write -P 0x5a 3145000 200")
    return img


@image("zero-metadata-prealloc-v2")
def _zero_meta_v2(d: Path) -> Path:
    img = create(d / "disk.qcow2", 3 * MiB, preallocation="metadata", compat="0.10", cluster_size=4096)
    src = Sources(d, seed=15)
    qio(img, f"write -s {src.rnd()} 70001 200000")
    return img


@image("zero-falloc")
def _zero_falloc(d: Path) -> Path:
    img = create(d / "disk.qcow2", 2 * MiB, preallocation="falloc")
    src = Sources(d, seed=16)
    qio(img, f"write -s {src.rnd()} 4095 100000")
    return img


@image("zero-over-backing")
def _zero_over_backing(d: Path) -> Path:
    """Zero clusters / subranges in an overlay must hide the backing file's data."""
    src = Sources(d, seed=17)
    base = create(d / "base.qcow2", 4 * MiB)
    qio(base, f"write -s {src.rnd(4 * MiB)} 0 4M")
    img = create(d / "disk.qcow2", 4 * MiB, backing="base.qcow2", backing_fmt="qcow2", cwd=d)
    qio(img, "write -z 64k 128k", "write -z -u 1M 64k", "write -z 2M 100", "write -P 0x11 3M 100",
        "write -z 3200000 70000")
    return img


@image("zero-over-backing-v2")
def _zero_over_backing_v2(d: Path) -> Path:
    src = Sources(d, seed=18)
    base = create(d / "base.qcow2", 2 * MiB, compat="0.10")
    qio(base, f"write -s {src.rnd(2 * MiB)} 0 2M")
    img = create(d / "disk.qcow2", 2 * MiB, backing="base.qcow2", backing_fmt="qcow2", cwd=d,
                 compat="0.10", cluster_size=4096)
    qio(img, "write -z 64k 128k", "write -z 1000000 3333")
    return img


def _mixed_raw(path: Path, size: int, seed: int) -> Path:
    """A raw file with compressible, incompressible, zero and pattern regions."""
    rng = random.Random(seed)
    buf = bytearray(size)
    pos = 0
    kinds = ["txt", "rnd", "zero", "pat", "txt", "txt"]
    while pos < size:
        ln = min(rng.randint(1, 300 * KiB), size - pos)
        k = rng.choice(kinds)
        if k == "txt":
            buf[pos:pos + ln] = counter_bytes(ln, tag=rng.randint(0, 0xffff))
        elif k == "rnd":
            buf[pos:pos + ln] = rng.randbytes(ln)
        elif k == "pat":
            buf[pos:pos + ln] = bytes([rng.randint(1, 255)]) * ln
        pos += ln
    buf[-5:] = b"LAST!"
    path.write_bytes(bytes(buf))
    return path


def _converted(ctype: str, cs: int, compat: str = "1.1", vsize: int = 6 * MiB + 1536):
    def fn(d: Path) -> Path:
        raw = _mixed_raw(d / "_src.raw", vsize, seed=cs + len(ctype))
        img = d / "disk.qcow2"
        opts = f"cluster_size={cs},compat={compat}"
        if compat != "0.10":
            opts += f",compression_type={ctype}"
        qimg("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, raw, img)
        raw.unlink()
        return img
    return fn


for _ct in ("zlib", "zstd"):
    for _cs in ("512", "4k", "64k", "2M"):
        image(f"convert-c-{_ct}-c{_cs}")(_converted(_ct, SIZES[_cs]))
image("convert-c-zlib-v2")(_converted("zlib", 64 * KiB, compat="0.10"))


def _qio_compressed(ctype: str):
    def fn(d: Path) -> Path:
        cs = 64 * KiB
        img = create(d / "disk.qcow2", 4 * MiB, compression_type=ctype)
        src = Sources(d, seed=21 + len(ctype))
        qio(img, f"write -c -s {src.txt()} 0 64k", f"write -c -s {src.txt()} 128k 256k",
            "write -c -P 0x42 1M 64k",
            f"write -c -s {src.rnd()} 2M 64k",          # incompressible: stored as a normal cluster
            f"write -s {src.rnd()} {160 * KiB + 7} 1000",  # partial overwrite of a compressed cluster
            f"write -c -s {src.txt()} {4 * MiB - cs} {cs}")  # last cluster
        return img
    return fn


image("qemu-io-c-zlib")(_qio_compressed("zlib"))
image("qemu-io-c-zstd")(_qio_compressed("zstd"))


def _extended_l2(cs: int, with_backing: bool, ctype: str = "zlib"):
    sub = cs // 32

    def fn(d: Path) -> Path:
        src = Sources(d, seed=cs // 512 + with_backing)
        vsize = max(8 * MiB, 12 * cs)
        if with_backing:
            base = create(d / "base.qcow2", vsize, cluster_size=64 * KiB)
            qio(base, f"write -s {src.rnd(vsize // 2)} 0 {vsize // 2}",
                f"write -s {src.rnd(vsize // 2)} {vsize // 2} {vsize // 2}")
            img = create(d / "disk.qcow2", vsize, backing="base.qcow2", backing_fmt="qcow2", cwd=d,
                         extended_l2="on", cluster_size=cs, compression_type=ctype)
        else:
            img = create(d / "disk.qcow2", vsize, extended_l2="on", cluster_size=cs, compression_type=ctype)
        c0 = cs * 3
        cmds = [
            f"write -c -s {src.txt(cs)} {cs * 9} {cs}",              # compressed cluster (no subclusters)
            f"write -s {src.txt()} {c0 + sub} {sub}",                # one subcluster allocated
            f"write -s {src.rnd()} {c0 + 5 * sub + 3} {2 * sub}",    # unaligned: 3 subclusters touched
            f"write -z {c0 + 10 * sub} {sub}",                       # zero subcluster
            f"write -z {c0 + 12 * sub} {3 * sub}",
            f"write -P 0x99 {c0 + 31 * sub + 1} {sub - 1}",          # last subcluster
            f"write -z -u {cs * 5 + 2 * sub} {4 * sub}",             # zero subclusters in unallocated cluster
            f"write -s {src.rnd(cs)} {cs * 7} {cs}",                   # whole cluster
            f"write -z {cs * 7 + 4 * sub} {sub}",                    # zero subcluster in allocated cluster
            f"write -P 0x9a {cs * 9 + sub + 7} 5",                   # turns the compressed cluster standard
            f"write -s {src.rnd()} {vsize - sub - 100} {sub + 100}",
        ]
        qio(img, *cmds)
        return img
    return fn


image("extl2-c16k")(_extended_l2(16 * KiB, False))
image("extl2-c64k")(_extended_l2(64 * KiB, False))
image("extl2-c64k-zstd")(_extended_l2(64 * KiB, False, "zstd"))
image("extl2-c2M")(_extended_l2(2 * MiB, False))
image("extl2-c64k-backing")(_extended_l2(64 * KiB, True))
image("extl2-c16k-backing")(_extended_l2(16 * KiB, True))


@image("backing-qcow2")
def _backing_qcow2(d: Path) -> Path:
    src = Sources(d, seed=31)
    base = create(d / "base.qcow2", 4 * MiB, cluster_size=4096)
    qio(base, f"write -c -s {src.txt()} 1M 64k", f"write -s {src.rnd(4 * MiB)} 0 1M",
        f"write -s {src.rnd(4 * MiB)} {MiB + 65536} 2M")
    img = create(d / "disk.qcow2", 4 * MiB, backing="base.qcow2", backing_fmt="qcow2", cwd=d)
    qio(img, f"write -s {src.rnd()} 100 1000", f"write -P 0x31 {MiB + 300} 5000",
        f"write -s {src.txt()} {3 * MiB - 1} 70000")
    return img


@image("backing-raw")
def _backing_raw(d: Path) -> Path:
    """A raw backing file whose first bytes look like a qcow2 header: must not be probed."""
    base = d / "base.img"
    data = bytearray(random.Random(32).randbytes(2 * MiB))
    hdr = bytearray(qcow2_header_bytes(d))
    data[:len(hdr)] = hdr
    base.write_bytes(bytes(data))
    img = create(d / "disk.qcow2", 2 * MiB, backing="base.img", backing_fmt="raw", cwd=d)
    qio(img, "write -P 0x44 65536 1000", "write -P 0x45 1500000 100000")
    return img


def qcow2_header_bytes(d: Path) -> bytes:
    tmp = d / "_hdr.qcow2"
    create(tmp, 64 * KiB)
    b = tmp.read_bytes()[:4096]
    tmp.unlink()
    return b


@image("backing-relative")
def _backing_relative(d: Path) -> Path:
    """Image in a subdirectory whose backing name is ../base.qcow2 (relative to the image's dir)."""
    src = Sources(d, seed=33)
    base = create(d / "base.qcow2", 2 * MiB)
    qio(base, f"write -s {src.rnd(2 * MiB)} 0 2M")
    (d / "sub").mkdir()
    img = create(d / "sub" / "disk.qcow2", 2 * MiB, backing="../base.qcow2", backing_fmt="qcow2", cwd=d / "sub")
    qio(img, "write -P 0x21 65537 70000", cwd=d / "sub")
    assert info(img)["backing-filename"] == "../base.qcow2"
    return img


@image("backing-shorter")
def _backing_shorter(d: Path) -> Path:
    """Backing file shorter (and not cluster aligned) than the overlay: zeros past its end."""
    src = Sources(d, seed=34)
    base = create(d / "base.qcow2", MiB + 1536)
    qio(base, f"write -s {src.rnd(MiB + 1536)} 0 {MiB + 1536}")
    img = create(d / "disk.qcow2", 4 * MiB, backing="base.qcow2", backing_fmt="qcow2", cwd=d)
    # a write straddling the backing file's end forces a COW fill from past its end
    qio(img, f"write -P 0x66 {MiB + 1000} 100", f"write -P 0x67 {3 * MiB} 100")
    return img


@image("backing-raw-shorter")
def _backing_raw_shorter(d: Path) -> Path:
    base = d / "base.raw"
    base.write_bytes(random.Random(35).randbytes(MiB + 777))
    img = create(d / "disk.qcow2", 3 * MiB, backing="base.raw", backing_fmt="raw", cwd=d)
    qio(img, f"write -P 0x68 {2 * MiB} 100")
    return img


@image("backing-chain4")
def _backing_chain4(d: Path) -> Path:
    """raw <- qcow2 v2 512B clusters <- qcow2 v3 2M clusters <- qcow2 v3 64k extended L2."""
    src = Sources(d, seed=36)
    vsize = 8 * MiB
    base = d / "l0.raw"
    base.write_bytes(random.Random(36).randbytes(vsize))
    l1 = create(d / "l1.qcow2", vsize, backing="l0.raw", backing_fmt="raw", cwd=d, compat="0.10", cluster_size=512)
    qio(l1, *scatter_cmds(src, vsize, 512, seed=1, n_random=4))
    (d / "a").mkdir()
    l2 = create(d / "a" / "l2.qcow2", vsize, backing="../l1.qcow2", backing_fmt="qcow2", cwd=d / "a",
                cluster_size=2 * MiB)
    qio(l2, *scatter_cmds(src, vsize, 2 * MiB, seed=2, n_random=4), cwd=d / "a")
    img = create(d / "a" / "top.qcow2", vsize, backing="l2.qcow2", backing_fmt="qcow2", cwd=d / "a",
                 extended_l2="on")
    qio(img, *scatter_cmds(src, vsize, 64 * KiB, seed=3, n_random=4), cwd=d / "a")
    return img


@image("backing-chain3-shrinking")
def _backing_chain3(d: Path) -> Path:
    src = Sources(d, seed=37)
    b0 = create(d / "b0.qcow2", 1 * MiB)
    qio(b0, f"write -s {src.rnd(1 * MiB)} 0 1M")
    b1 = create(d / "b1.qcow2", 2 * MiB + 512, backing="b0.qcow2", backing_fmt="qcow2", cwd=d, cluster_size=4096)
    qio(b1, f"write -s {src.rnd()} {MiB - 10} 20", f"write -s {src.txt()} {2 * MiB} 512")
    img = create(d / "disk.qcow2", 3 * MiB, backing="b1.qcow2", backing_fmt="qcow2", cwd=d)
    qio(img, "write -P 0x12 100 100")
    return img


@image("backing-no-format-ext")
def _backing_no_fmt(d: Path) -> Path:
    """Backing format extension removed (its type patched to an unknown one, which must be skipped):
    the backing file is probed, as QEMU does."""
    src = Sources(d, seed=38)
    base = create(d / "base.qcow2", 2 * MiB)
    qio(base, f"write -s {src.rnd(2 * MiB)} 0 2M")
    img = create(d / "disk.qcow2", 2 * MiB, backing="base.qcow2", backing_fmt="qcow2", cwd=d)
    qio(img, "write -P 0x13 1000 1000")
    h = Header(img)
    ext = [e for e in h.extensions if e[0] == EXT_BACKING_FORMAT]
    assert ext, h.extensions
    patch(img, ext[0][1], struct.pack(">I", 0x1234ABCD))
    assert "backing-filename-format" not in info(img)
    return img


@image("datafile")
def _datafile(d: Path) -> Path:
    src = Sources(d, seed=41)
    img = create(d / "disk.qcow2", 4 * MiB, data_file="disk.data", cwd=d)
    qio(img, *scatter_cmds(src, 4 * MiB, 64 * KiB, seed=41), cwd=d)
    return img


@image("datafile-abs")
def _datafile_abs(d: Path) -> Path:
    src = Sources(d, seed=40)
    img = create(d / "disk.qcow2", 3 * MiB, data_file=str(d / "abs.data"), cluster_size=4096)
    qio(img, *scatter_cmds(src, 3 * MiB, 4096, seed=40))
    return img


@image("datafile-raw")
def _datafile_raw(d: Path) -> Path:
    src = Sources(d, seed=42)
    img = create(d / "disk.qcow2", 4 * MiB, data_file="disk.data", data_file_raw="on", cwd=d)
    qio(img, *scatter_cmds(src, 4 * MiB, 64 * KiB, seed=42), cwd=d)
    return img


@image("datafile-extl2")
def _datafile_extl2(d: Path) -> Path:
    src = Sources(d, seed=43)
    (d / "data").mkdir()
    img = create(d / "disk.qcow2", 4 * MiB, data_file="data/disk.bin", extended_l2="on", cwd=d)
    qio(img, f"write -s {src.rnd()} 2049 10000", "write -z 65536 4096", cwd=d)
    return img


@image("dirty-lazy-refcounts")
def _dirty(d: Path) -> Path:
    """lazy_refcounts=on and a qemu-io that aborts before closing: dirty bit set, refcounts stale."""
    src = Sources(d, seed=44)
    img = create(d / "disk.qcow2", 4 * MiB, lazy_refcounts="on")
    qio(img, f"write -s {src.rnd()} 0 100000")
    p = qio(img, f"write -s {src.rnd()} 1000000 300000", "write -P 0x14 3M 5", "abort", check=False)
    assert p.returncode != 0
    assert info(img)["dirty-flag"] is True
    return img


@image("corrupt-bit")
def _corrupt(d: Path) -> Path:
    src = Sources(d, seed=45)
    img = create(d / "disk.qcow2", 2 * MiB)
    qio(img, *scatter_cmds(src, 2 * MiB, 64 * KiB, seed=45))
    set_incompatible(img, 1 << 1)
    assert info(img)["format-specific"]["data"]["corrupt"] is True
    return img


@image("snapshots", snapshots=True)
def _snapshots(d: Path) -> Path:
    src = Sources(d, seed=46)
    img = create(d / "disk.qcow2", 4 * MiB, cluster_size=4096)
    qio(img, f"write -c -s {src.txt()} 2M 64k", f"write -s {src.rnd(MiB)} 0 1M")
    qimg("snapshot", "-c", "first", img)
    qio(img, f"write -s {src.rnd()} 1000 5000", "write -z 2M 4096", "write -P 0x15 3M 4096")
    qimg("snapshot", "-c", "second snap", img)
    qio(img, "write -P 0x16 500000 100000", "write -z -u 0 64k")
    # grow the disk after the snapshots: snapshots keep their own (smaller) size
    qimg("resize", "-q", img, str(5 * MiB + 512))
    qio(img, f"write -P 0x17 {5 * MiB} 512")
    return img


@image("snapshots-v2", snapshots=True)
def _snapshots_v2(d: Path) -> Path:
    src = Sources(d, seed=47)
    img = create(d / "disk.qcow2", 2 * MiB, compat="0.10", cluster_size=512)
    qio(img, f"write -s {src.rnd()} 0 300000")
    qimg("snapshot", "-c", "s1", img)
    qio(img, "write -P 0x18 1000 100000")
    return img


@image("bitmaps")
def _bitmaps(d: Path) -> Path:
    src = Sources(d, seed=48)
    img = create(d / "disk.qcow2", 4 * MiB)
    qimg("bitmap", "--add", "--granularity", "64K", img, "b0")
    qimg("bitmap", "--add", "--granularity", "512K", "--disable", img, "b1")
    qio(img, f"write -s {src.rnd()} 12345 300000", "write -P 0x19 3M 1000")
    return img


def _odd_size(cs: int, compressed: bool = False):
    def fn(d: Path) -> Path:
        vsize = MiB + 1234
        if compressed:
            raw = _mixed_raw(d / "_src.raw", vsize, seed=cs)
            img = d / "disk.qcow2"
            qimg("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={cs}", raw, img)
            raw.unlink()
            return img
        img = create(d / "disk.qcow2", vsize, cluster_size=cs)
        src = Sources(d, seed=cs + 49)
        qio(img, *scatter_cmds(src, vsize, cs, seed=cs, n_random=5))
        return img
    return fn


image("oddsize-c4k")(_odd_size(4 * KiB))
image("oddsize-c64k")(_odd_size(64 * KiB))
image("oddsize-c2M")(_odd_size(2 * MiB))
image("oddsize-c64k-compressed")(_odd_size(64 * KiB, compressed=True))



def _huge(cs: int, vsize: int = 4 * TiB, extended: bool = False):
    def fn(d: Path) -> Path:
        opts = {"cluster_size": cs}
        if extended:
            opts["extended_l2"] = "on"
        img = create(d / "disk.qcow2", vsize, **opts)
        src = Sources(d, seed=50, size=128 * KiB, n=3)
        rng = random.Random(cs)
        cmds = [f"write -s {src.rnd()} 3 100000",
                f"write -s {src.rnd()} {vsize - 100000} 100000",           # up to the very end
                f"write -c -s {src.txt()} {vsize - 4 * cs} {cs}",          # compressed near the end
                f"write -P 0x20 {(1 << 32) * 512 - 77} 200",               # around the 2 TiB (2^32 sectors) mark
                f"write -P 0x21 {(1 << 32) - 5} 10",                       # around 4 GiB
                f"write -z {vsize - 100000 + 10} 1000"]
        for _ in range(6):
            off = rng.randrange(0, vsize - 65536)
            cmds.append(f"write -s {src.rnd()} {off} {rng.randint(1, 65536)}")
        qio(img, *cmds)
        return img
    return fn


image("huge-4T-c64k", huge=True)(_huge(64 * KiB))
image("huge-4T-c2M-extl2", huge=True)(_huge(2 * MiB, extended=True))


# --------------------------------------------------------------------------
# oracle and file-state helpers

def oracle(image: Path, dest: Path, snapshot_id: str | None = None) -> Path:
    """`qemu-img convert -O raw` of IMAGE, run in the image's directory (QEMU 7.2 opens relative
    external data file names relative to the working directory)."""
    args = ["convert", "-O", "raw"]
    if snapshot_id is not None:
        args += ["-l", f"snapshot.id={snapshot_id}"]
    qimg(*args, Path(image).resolve(), Path(dest).resolve(), cwd=Path(image).resolve().parent)
    return dest


def oracle_range(image: Path, off: int, length: int) -> bytes:
    """QEMU's view of [off, off+length) of a (huge) image without converting all of it."""
    a = off // 512 * 512
    b = (off + length + 511) // 512 * 512
    out = Path(image).resolve().parent.parent / f"_range_{os.getpid()}.raw"
    try:
        qimg("convert", "--image-opts",
             f"driver=raw,offset={a},size={b - a},file.driver=qcow2,file.file.filename={Path(image).resolve()}",
             "-O", "raw", out)
        data = out.read_bytes()
    finally:
        out.unlink(missing_ok=True)
    return data[off - a: off - a + length]


def file_state(root: Path) -> dict[str, tuple[str, int, int]]:
    """{relative path: (sha256, size, mtime_ns)} of every file under ROOT."""
    import hashlib
    state = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file() and not p.is_symlink():
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            st = p.stat()
            state[str(p.relative_to(root))] = (h.hexdigest(), st.st_size, st.st_mtime_ns)
    return state


def first_difference(a: Path, b: Path, chunk: int = 1 << 20) -> int | None:
    """Offset of the first differing byte of two files (or of the shorter one's end), None if equal."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        pos = 0
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                n = min(len(x), len(y))
                for i in range(n):
                    if x[i] != y[i]:
                        return pos + i
                return pos + n
            if not x:
                return None
            pos += len(x)


# --------------------------------------------------------------------------
# qcow2 header parsing / patching (for hostile images)

MAGIC = 0x514649FB
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_DATA_FILE = 0x44415441

# offset, struct format of header fields
FIELDS = {
    "magic": (0, ">I"), "version": (4, ">I"), "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"), "cluster_bits": (20, ">I"), "size": (24, ">Q"),
    "crypt_method": (32, ">I"), "l1_size": (36, ">I"), "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"), "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"), "snapshots_offset": (64, ">Q"),
    "incompatible_features": (72, ">Q"), "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"), "refcount_order": (96, ">I"), "header_length": (100, ">I"),
}


class Header:
    def __init__(self, path: Path):
        self.path = Path(path)
        raw = self.path.read_bytes()[:2 * MiB]
        self.raw = raw
        for name, (off, fmt) in FIELDS.items():
            if off + struct.calcsize(fmt) <= len(raw):
                setattr(self, name, struct.unpack_from(fmt, raw, off)[0])
            else:
                setattr(self, name, 0)
        if self.version == 2:
            self.incompatible_features = self.compatible_features = self.autoclear_features = 0
            self.header_length = 72
            self.refcount_order = 4
        self.cluster_size = 1 << self.cluster_bits
        # extensions: list of (type, file offset of the type field, data offset, length)
        self.extensions: list[tuple[int, int, int, int]] = []
        pos = self.header_length
        while pos + 8 <= len(raw):
            t, ln = struct.unpack_from(">II", raw, pos)
            if t == 0:
                break
            self.extensions.append((t, pos, pos + 8, ln))
            pos += 8 + (ln + 7) // 8 * 8

    def ext(self, etype: int) -> tuple[int, int, int, int]:
        for e in self.extensions:
            if e[0] == etype:
                return e
        raise KeyError(hex(etype))

    def l1_entry_offset(self, guest: int) -> int:
        l2_entry_bits = 4 if self.incompatible_features & (1 << 4) else 3
        l2_bits = self.cluster_bits - l2_entry_bits
        return self.l1_table_offset + 8 * (guest >> (self.cluster_bits + l2_bits))

    def l1_entry(self, guest: int) -> int:
        return read_u64(self.path, self.l1_entry_offset(guest))

    def l2_entry_offset(self, guest: int) -> int:
        ext = self.incompatible_features & (1 << 4)
        l2_entry_bits = 4 if ext else 3
        l2_bits = self.cluster_bits - l2_entry_bits
        l2 = self.l1_entry(guest) & 0x00FFFFFFFFFFFE00
        assert l2, f"no L2 table for guest offset {guest:#x}"
        idx = (guest >> self.cluster_bits) & ((1 << l2_bits) - 1)
        return l2 + (idx << l2_entry_bits)

    def l2_entry(self, guest: int) -> int:
        return read_u64(self.path, self.l2_entry_offset(guest))

    def compressed_extent(self, guest: int) -> tuple[int, int]:
        """(host offset, length in bytes) of the compressed data of the cluster at GUEST."""
        e = self.l2_entry(guest)
        assert e & (1 << 62), f"cluster at {guest:#x} is not compressed: {e:#x}"
        x = 62 - (self.cluster_bits - 8)
        off = e & ((1 << x) - 1)
        nsect = (e >> x) & ((1 << (62 - x)) - 1)
        return off, (nsect + 1) * 512 - (off % 512)


def read_u64(path: Path, off: int) -> int:
    with open(path, "rb") as f:
        f.seek(off)
        return struct.unpack(">Q", f.read(8))[0]


def patch(path: Path, off: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)


def set_field(path: Path, name: str, value: int) -> None:
    off, fmt = FIELDS[name]
    patch(path, off, struct.pack(fmt, value))


def set_incompatible(path: Path, bits: int) -> None:
    set_field(path, "incompatible_features", Header(path).incompatible_features | bits)


@image("oddsize-header-not-sector-multiple")
def _odd_header(d: Path) -> Path:
    """Header size field 1M+1234 (qemu-img always rounds to 512; QEMU reads size // 512 sectors)."""
    img = create(d / "disk.qcow2", MiB + 1536, cluster_size=4096)
    src = Sources(d, seed=51)
    qio(img, f"write -s {src.rnd(2 * MiB)} 1000 {MiB + 536}")
    set_field(img, "size", MiB + 1234)
    return img


def snapshot_table(path: Path) -> list[dict]:
    """The snapshot table as stored: id, name, l1 offset/size and the disk size from the extra data
    (None when the entry has no such field)."""
    h = Header(path)
    out = []
    with open(path, "rb") as f:
        pos = h.snapshots_offset
        for _ in range(h.nb_snapshots):
            f.seek(pos)
            fixed = f.read(40)
            (l1_off, l1_size, id_len, name_len, date_sec, date_nsec, clock_ns, vm_state,
             extra_len) = struct.unpack(">QIHHIIQII", fixed)
            extra = f.read(extra_len)
            ident = f.read(id_len).decode()
            name = f.read(name_len).decode(errors="replace")
            disk_size = struct.unpack(">Q", extra[8:16])[0] if extra_len >= 16 else None
            out.append({"id": ident, "name": name, "l1_table_offset": l1_off, "l1_size": l1_size,
                        "disk_size": disk_size})
            ln = 40 + extra_len + id_len + name_len
            pos += (ln + 7) // 8 * 8
    return out
