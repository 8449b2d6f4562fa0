"""`qcowfs create` / `qcowfs.create` against `qemu-img create` as the oracle:
for every option, the image qcowfs makes shows what qemu-img's shows in
`qemu-img info` (the fields that do not depend on time, randomness or the
host), is clean in `qemu-img check`, and QEMU writes and reads it back."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import luks

REPO = Path(__file__).resolve().parent.parent
QCOWFS = [str(Path(sys.executable).parent / "qcowfs")]
KEY = "create-test-passphrase"
MiB = 1 << 20


def run(args: list, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def qcowfs(cwd: Path, *args: object) -> subprocess.CompletedProcess[str]:
    return run([*QCOWFS, *args], cwd)


def info(image: Path, encrypted: bool = False) -> dict:
    """qemu-img info's fields that two creations with the same options share."""
    p = run(["qemu-img", "info", "--output=json", image.name], image.parent)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    for k in ("filename", "actual-size", "children"):
        d.pop(k, None)
    enc = d.get("format-specific", {}).get("data", {}).get("encrypt")
    if enc:
        enc.pop("uuid")
        enc.pop("master-key-iters")
        for slot in enc["slots"]:
            slot.pop("iters", None)
    return d


def check(image: Path, encrypted: bool = False) -> None:
    if encrypted:
        p = luks.check(image, KEY)
    else:
        p = run(["qemu-img", "check", image.name], image.parent)
    assert p.returncode == 0, p.stdout + p.stderr


def qemu_writes(image: Path, encrypted: bool = False) -> None:
    """QEMU writes the new image and reads back what it wrote."""
    cmds = ["write -P 0xa5 0 128k", "write -P 0x5a 1M 4k", "read -P 0xa5 0 128k", "read -P 0x5a 1M 4k",
            "read -P 0 2M 64k"]
    if encrypted:
        luks.qemu_io(image, *cmds, secret=KEY)
        return
    args: list = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    p = run([*args, image.name], image.parent)
    assert p.returncode == 0 and "fail" not in p.stdout and "error" not in p.stdout.lower(), p.stdout + p.stderr


def map_shape(image: Path, keys: tuple[str, ...] = ("present", "zero", "data", "depth")) -> list:
    """qemu-img map without host offsets, extents of the same kind merged
    (where data lies differs, what is allocated must not)."""
    p = run(["qemu-img", "map", "--output=json", image.name], image.parent)
    assert p.returncode == 0, p.stderr
    out: list[list] = []
    for e in json.loads(p.stdout):
        kind = [e[k] for k in keys]
        if out and out[-1][2] == kind and out[-1][0] + out[-1][1] == e["start"]:
            out[-1][1] += e["length"]
        else:
            out.append([e["start"], e["length"], kind])
    return out


CASES = [
    ("", "1G"),
    ("cluster_size=512", "64M"),
    ("cluster_size=4k", "1G"),
    ("cluster_size=2M", "1G"),
    ("compat=0.10", "1G"),
    ("compat=0.10,cluster_size=4k", "100M"),
    ("compat=1.1,refcount_bits=1", "1G"),
    ("refcount_bits=2,cluster_size=4k", "64M"),
    ("refcount_bits=8", "1G"),
    ("refcount_bits=64", "1G"),
    ("lazy_refcounts=on", "1G"),
    ("extended_l2=on", "1G"),
    ("extended_l2=on,cluster_size=16k", "1G"),
    ("compression_type=zstd", "1G"),
    ("compression_type=zlib,cluster_size=128k", "5G"),
    ("preallocation=off", "1000"),
    ("preallocation=metadata", "16M"),
    ("preallocation=metadata,cluster_size=4k", "16M"),
    ("preallocation=falloc", "16M"),
    ("preallocation=full", "16M"),
    ("preallocation=metadata,extended_l2=on", "16M"),
    ("data_file=data.raw", "64M"),
    ("data_file=data.raw,data_file_raw=on", "64M"),
    ("data_file=data.raw,preallocation=falloc", "16M"),
    ("encrypt.format=luks,encrypt.iter-time=10", "1G"),
    ("encrypt.format=luks,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,"
     "encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha1,encrypt.iter-time=10", "64M"),
    ("encrypt.format=luks,encrypt.cipher-alg=aes-192,encrypt.cipher-mode=xts,encrypt.ivgen-alg=plain,"
     "encrypt.hash-alg=sha512,encrypt.iter-time=10", "64M"),
    ("encrypt.format=luks,encrypt.iter-time=10,compat=0.10", "64M"),
]


@pytest.mark.parametrize("opts,size", CASES, ids=[c[0] or "defaults" for c in CASES])
def test_create_matches_qemu_img(tmp_path: Path, opts: str, size: str):
    encrypted = "encrypt.format" in opts
    theirs_dir, ours_dir = tmp_path / "qemu", tmp_path / "qcowfs"
    theirs_dir.mkdir()
    ours_dir.mkdir()
    (ours_dir / "key").write_text(KEY)
    if encrypted:
        said = luks.create_encrypted("qemu-img", "create", "-f", "qcow2", *luks.secret_object(KEY),
                                     "-o", f"{opts},encrypt.key-secret=sec0", theirs_dir / "disk.qcow2", size)
        # (qcowfs takes the passphrase from --key-file, not a secret object)
        said = said.replace(str(theirs_dir / "disk.qcow2"), "disk.qcow2").replace(" encrypt.key-secret=sec0", "")
    else:
        p = run(["qemu-img", "create", "-f", "qcow2", "-o", opts, "disk.qcow2", size] if opts else
                ["qemu-img", "create", "-f", "qcow2", "disk.qcow2", size], theirs_dir)
        assert p.returncode == 0, p.stderr
        said = p.stdout
    args = ["create", *(["-o", opts] if opts else []), "disk.qcow2", size]
    if encrypted:
        args[1:1] = ["--key-file", "key"]
    p = qcowfs(ours_dir, *args)
    assert p.returncode == 0 and not p.stderr, p.stderr
    assert p.stdout == said  # qemu-img's "Formatting ..." line
    ours, theirs = ours_dir / "disk.qcow2", theirs_dir / "disk.qcow2"
    assert info(ours) == info(theirs)
    check(ours, encrypted)
    if "preallocation" in opts or "data_file_raw" in opts:
        # (with a data file, "zero" is what the host says of the data file's blocks)
        keys = ("present", "data", "depth") if "data_file" in opts else ("present", "zero", "data", "depth")
        assert map_shape(ours, keys) == map_shape(theirs, keys)
    if "data_file" in opts:
        assert (ours_dir / "data.raw").stat().st_size == (theirs_dir / "data.raw").stat().st_size
    if "falloc" in opts or "full" in opts:
        target = "data.raw" if "data_file" in opts else "disk.qcow2"
        assert (ours_dir / target).stat().st_blocks * 512 >= 16 << 20
    assert not [f for f in os.listdir(ours_dir) if f.startswith(".")]
    if info(ours)["virtual-size"] >= 4 << 20:
        qemu_writes(ours, encrypted)
        check(ours, encrypted)


@pytest.mark.parametrize("opts", ["preallocation=metadata", "preallocation=full,cluster_size=4k",
                                  "data_file=data.raw,data_file_raw=on", "preallocation=metadata,extended_l2=on"])
def test_a_new_encrypted_preallocated_disk_reads_zeros(tmp_path: Path, opts: str,
                                                      monkeypatch: pytest.MonkeyPatch):
    """Preallocated clusters of an encrypted image hold zeros or nothing on the host, which
    decrypt to noise: qemu-img's new disk reads that noise. qcowfs flags them zero (v3), so
    its new disk reads zeros; its `qemu-img info` is qemu-img's, and QEMU writes in place."""
    (tmp_path / "key").write_text(KEY)
    o = f"encrypt.format=luks,encrypt.iter-time=10,{opts}"
    p = qcowfs(tmp_path, "create", "--key-file", "key", "-o", o, "disk.qcow2", "4M")
    assert p.returncode == 0 and not p.stderr, p.stderr
    theirs = tmp_path / "qemu"
    theirs.mkdir()
    monkeypatch.chdir(theirs)  # (qemu-img creates a data file relative to its working directory)
    luks.create_encrypted("qemu-img", "create", "-q", "-f", "qcow2", *luks.secret_object(KEY),
                          "-o", f"{o},encrypt.key-secret=sec0", theirs / "disk.qcow2", "4M")
    ours = tmp_path / "disk.qcow2"
    assert info(ours) == info(theirs / "disk.qcow2")
    zeros = tmp_path / "zeros.raw"
    zeros.write_bytes(bytes(4 * MiB))
    p = luks.compare(ours, zeros, KEY)
    assert p.returncode == 0, p.stdout + p.stderr
    check(ours, True)
    qemu_writes(ours, True)
    check(ours, True)


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_backing_size_from_the_backing_file(tmp_path: Path, fmt: str):
    base = tmp_path / f"base.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, base, "10M"], check=True)
    subprocess.run(["qemu-io", "-f", fmt, "-c", "write -P 0x42 0 1M", base], check=True, capture_output=True)
    (tmp_path / "theirs").mkdir()
    q = run(["qemu-img", "create", "-f", "qcow2", "-b", f"../{base.name}", "-F", fmt, "ov.qcow2"],
            tmp_path / "theirs")
    assert q.returncode == 0, q.stderr
    (tmp_path / "ours").mkdir()
    p = qcowfs(tmp_path / "ours", "create", "-b", f"../{base.name}", "-F", fmt, "ov.qcow2")
    assert p.returncode == 0, p.stderr
    assert p.stdout == q.stdout and "size=10485760 " in p.stdout  # (the backing file's size)
    ours = tmp_path / "ours" / "ov.qcow2"
    assert info(ours) == info(tmp_path / "theirs" / "ov.qcow2")
    assert info(ours)["virtual-size"] == 10 << 20
    check(ours)
    cmp = run(["qemu-img", "compare", "-F", fmt, ours.name, f"../{base.name}"], ours.parent)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    qemu_writes(ours)
    check(ours)


def test_unsafe_backing_is_not_opened(tmp_path: Path):
    """(And -q prints nothing, as qemu-img's -q.)"""
    p = qcowfs(tmp_path, "create", "-q", "-u", "-b", "missing.qcow2", "-F", "qcow2", "ov.qcow2", "1G")
    assert p.returncode == 0 and p.stdout == "", p.stdout + p.stderr
    q = run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "missing.qcow2", "-F", "qcow2", "q.qcow2",
             "1G"], tmp_path)
    assert q.returncode == 0 and q.stdout == ""
    assert info(tmp_path / "ov.qcow2") == info(tmp_path / "q.qcow2")


REFUSED = [
    (["-o", "compat=0.10,lazy_refcounts=on"], "1G"),
    (["-o", "compat=0.10,extended_l2=on"], "1G"),
    (["-o", "compat=0.10,compression_type=zstd"], "1G"),
    (["-o", "compat=0.10,refcount_bits=8"], "1G"),
    (["-o", "extended_l2=on,cluster_size=4k"], "1G"),
    (["-o", "cluster_size=3000"], "1G"),
    (["-o", "cluster_size=4M"], "1G"),
    (["-o", "refcount_bits=3"], "1G"),
    (["-o", "refcount_bits=128"], "1G"),
    (["-o", "data_file_raw=on"], "1G"),
    (["-o", "preallocation=sometimes"], "1G"),
    (["-o", "compression_type=lz4"], "1G"),
    (["-o", "no_such_option=1"], "1G"),
    (["-b", "base.qcow2"], "1G"),
    (["-b", "base.qcow2", "-F", "qcow2", "-o", "preallocation=metadata"], "1G"),
    (["-u", "-b", "base.qcow2", "-F", "qcow2"], None),
    (["-b", "missing.qcow2", "-F", "qcow2"], None),
    (["-b", "base.qcow2"], None),
    ([], None),
]


@pytest.mark.parametrize("args,size", REFUSED, ids=[" ".join(a[0]) or "no-size" for a in REFUSED])
def test_refused_where_qemu_img_refuses(tmp_path: Path, args: list[str], size: str | None):
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", tmp_path / "base.qcow2", "1G"], check=True)
    tail = [size] if size else []
    q = run(["qemu-img", "create", "-q", "-f", "qcow2", *args, "theirs.qcow2", *tail], tmp_path)
    assert q.returncode != 0, "qemu-img accepts it"
    p = qcowfs(tmp_path, "create", *args, "ours.qcow2", *tail)
    assert p.returncode == 1, p.stdout + p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    assert sorted(os.listdir(tmp_path)) == ["base.qcow2"]


def test_an_image_in_use_is_not_replaced(tmp_path: Path):
    import qcowfs

    img = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "64M"], check=True)
    before = img.read_bytes()
    with qcowfs.open(img, "r+"):
        p = qcowfs_cli(tmp_path, "create", "disk.qcow2", "1G")
        assert p.returncode == 1 and "in use" in p.stderr, p.stderr
    assert img.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["disk.qcow2"]
    # Not in use: replaced, as qemu-img create replaces it.
    p = qcowfs_cli(tmp_path, "create", "disk.qcow2", "1G")
    assert p.returncode == 0, p.stderr
    assert info(img)["virtual-size"] == 1 << 30


qcowfs_cli = qcowfs


# Commands that would make an image its own backing file (directly or
# through its chain) or its own data file, or put its data file over a file of
# its backing chain. disk.qcow2 holds data; top.qcow2's backing file is
# disk.qcow2. QEMU_REFUSES: qemu-img refuses the same command line (it
# compares the backing file's name as given with the image's, and the rest
# fail on its own locks); the others it carries out, leaving an image no
# program opens, or a backing file overwritten by the data file.
SELF_REFERENCES = [
    (["create", "-f", "qcow2", "-b", "disk.qcow2", "-F", "qcow2", "disk.qcow2"], True),
    (["create", "-f", "qcow2", "-b", "./disk.qcow2", "-F", "qcow2", "disk.qcow2", "1G"], False),
    (["create", "-f", "qcow2", "-u", "-b", "disk.qcow2", "-F", "qcow2", "disk.qcow2", "1G"], True),
    (["create", "-f", "qcow2", "-b", "top.qcow2", "-F", "qcow2", "disk.qcow2"], False),
    (["create", "-f", "qcow2", "-o", "data_file=disk.qcow2", "disk.qcow2", "64M"], True),
    (["create", "-f", "qcow2", "-o", "data_file=new.qcow2", "new.qcow2", "64M"], True),
    (["create", "-f", "qcow2", "-o", "data_file=disk.qcow2", "-b", "top.qcow2", "-F", "qcow2", "new.qcow2"], False),
    (["convert", "-O", "qcow2", "-B", "top.qcow2", "-F", "qcow2", "src.qcow2", "disk.qcow2"], True),
    (["convert", "-O", "qcow2", "-o", "data_file=new.qcow2", "src.qcow2", "new.qcow2"], True),
    (["rebase", "-u", "-b", "top.qcow2", "-F", "qcow2", "disk.qcow2"], False),
    (["rebase", "-b", "top.qcow2", "-F", "qcow2", "disk.qcow2"], True),
    (["convert", "-O", "qcow2", "top.qcow2", "disk.qcow2"], True),
    (["convert", "-O", "raw", "top.qcow2", "./disk.qcow2"], True),
]


@pytest.mark.parametrize("args,qemu_refuses", SELF_REFERENCES, ids=[" ".join(a[0]) for a in SELF_REFERENCES])
def test_an_image_is_never_its_own_backing_or_data_file(tmp_path: Path, args: list[str], qemu_refuses: bool):
    """Refused with one line before anything is touched: every file stays as
    it was and none is added. (qcowfs replaced disk.qcow2 with an image
    whose backing file was itself: the data was gone, and qemu-img check
    of the result ran until killed.)"""
    def make() -> dict[str, bytes]:
        for f in tmp_path.iterdir():
            f.unlink()
        for name, extra in (("disk.qcow2", []), ("src.qcow2", [])):
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *extra, tmp_path / name, "64M"], check=True)
        subprocess.run(["qemu-io", "-c", "write -P 0x5c 0 1M", tmp_path / "disk.qcow2"], check=True,
                       capture_output=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "disk.qcow2", "-F", "qcow2",
                        tmp_path / "top.qcow2"], check=True)
        return {f.name: f.read_bytes() for f in tmp_path.iterdir()}

    before = make()
    q = run(["timeout", "30", "qemu-img", *args], tmp_path)
    assert (q.returncode != 0) == qemu_refuses, q.stdout + q.stderr
    assert make() == before
    p = qcowfs(tmp_path, *args)
    assert p.returncode == 1, p.stdout + p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "in use" not in p.stderr, p.stderr  # (our own lock is no explanation)
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before


@pytest.mark.parametrize("args", [["create", "-f", "qcow2", "{}", "128M"],
                                  ["convert", "-O", "qcow2", "src.qcow2", "{}"],
                                  ["convert", "-O", "raw", "src.qcow2", "{}"]], ids=lambda a: " ".join(a[:3]))
def test_a_symbolic_link_is_written_through(tmp_path: Path, args: list[str]):
    """An image made at a symbolic link replaces the file the link leads to,
    and the link stays, as qemu-img does it (qcowfs renamed its new file
    over the link, leaving the old image where the link had led)."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", tmp_path / "src.qcow2", "128M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x42 0 64k", tmp_path / "src.qcow2"], check=True,
                   capture_output=True)
    (tmp_path / "real").mkdir()
    results = []
    for tool, name in ((["qemu-img"], "theirs"), (QCOWFS, "ours")):
        real = tmp_path / "real" / f"{name}.img"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", real, "1M"], check=True)
        (tmp_path / f"{name}.link").symlink_to(f"real/{name}.img")
        p = run([*tool, *[a.format(f"{name}.link") for a in args]], tmp_path)
        assert p.returncode == 0, p.stderr
        assert (tmp_path / f"{name}.link").is_symlink()
        results.append(run(["qemu-img", "info", "--output=json", real], tmp_path).stdout)
    theirs, ours = (json.loads(r) for r in results)
    assert (ours["format"], ours["virtual-size"]) == (theirs["format"], theirs["virtual-size"]) != ("qcow2", 1 << 20)
    assert sorted(os.listdir(tmp_path / "real")) == ["ours.img", "theirs.img"]


FILE_SIZE_LIMIT = 1 << 20
TOO_LARGE = [
    (["create", "-f", "qcow2", "-o", "preallocation=full", "new.qcow2", "64M"], "cannot create", "new.qcow2"),
    (["create", "-f", "qcow2", "-o", "preallocation=metadata,cluster_size=512", "new.qcow2", "64M"],
     "cannot create", "new.qcow2"),
    (["convert", "-O", "qcow2", "disk.qcow2", "new.qcow2"], "cannot write", "new.qcow2"),
    (["convert", "-O", "raw", "disk.qcow2", "new.raw"], "cannot write", "new.raw"),
    (["resize", "disk.qcow2", "64G"], "", "disk.qcow2"),
    (["snapshot", "create", "disk.qcow2", "s1"], "", "disk.qcow2"),
]


@pytest.mark.parametrize("args,what,name", TOO_LARGE, ids=[" ".join(a[:4]) for a, _, _ in TOO_LARGE])
def test_a_file_the_host_will_not_hold_is_one_line(tmp_path: Path, args: list[str], what: str, name: str):
    """A write the host refuses (here RLIMIT_FSIZE: EFBIG, as ext4 refuses a
    file over 16 TiB, or a full disk) is one line naming the file the user
    named: a new file is not left behind, an image stays clean. (It said
    "qcowfs: File too large", or named convert's hidden temporary file.)"""
    import resource
    import signal

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))

    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", disk, "4M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x61 0 2M", disk], check=True, capture_output=True)
    assert disk.stat().st_size > FILE_SIZE_LIMIT  # (the limit refuses writes past it, and every new cluster lies there)
    before = disk.read_bytes()
    p = subprocess.run([*QCOWFS, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60, preexec_fn=limit)
    assert p.returncode == 1, p.stdout + p.stderr
    assert p.stderr == f"qcowfs: {what + ' ' if what else ''}{tmp_path / name}: File too large\n", p.stderr
    assert os.listdir(tmp_path) == ["disk.qcow2"]
    check(disk)
    assert disk.read_bytes() == before or args[0] != "convert"


def test_an_image_that_names_itself_as_its_data_file_is_not_written(tmp_path: Path):
    """Guest data written there would land on the image's own metadata:
    a writable open is refused with one line; a read-only one reads."""
    import qcowfs

    img = tmp_path / "img.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=dat.qcow2", img, "64M"],
                   check=True, cwd=tmp_path)
    raw = img.read_bytes()
    assert raw.count(b"dat.qcow2") == 1
    img.write_bytes(raw.replace(b"dat.qcow2", b"img.qcow2"))
    before = img.read_bytes()
    with pytest.raises(qcowfs.InvalidImageError, match="data file is the image file itself"):
        qcowfs.open(img, "r+")
    with qcowfs.open(img) as image:
        assert len(image.disk.read(4096)) == 4096
    assert img.read_bytes() == before


def test_library_create(tmp_path: Path):
    """qcowfs.create with Python values; qcowfs.aio.create the same as a coroutine."""
    import trio

    import qcowfs
    import qcowfs.aio

    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qcowfs.create(a, 1 << 30, cluster_size=4096, lazy_refcounts=True, extended_l2=False,
                  compression_type="zstd")
    trio.run(lambda: qcowfs.aio.create(b, 1 << 30, cluster_size=4096, lazy_refcounts="on",
                                       compression_type="zstd"))
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    "cluster_size=4k,lazy_refcounts=on,compression_type=zstd", tmp_path / "c.qcow2", "1G"],
                   check=True)
    assert info(a) == info(b) == info(tmp_path / "c.qcow2")
    with qcowfs.open(a, "r+") as image:
        image.disk.write(b"x" * 10000)
    check(a)
    enc = tmp_path / "enc.qcow2"
    qcowfs.create(enc, 64 << 20, passphrase=KEY, encrypt_format="luks", encrypt_iter_time=10)
    with qcowfs.open(enc, "r+", passphrase=KEY) as image:
        image.disk.write(b"secret data" * 100)
    check(enc, encrypted=True)
    with pytest.raises(qcowfs.UsageError):
        qcowfs.create(tmp_path / "bad.qcow2", 1 << 20, cluster_size=1000)
    with pytest.raises(qcowfs.UsageError):
        qcowfs.create(tmp_path / "bad.qcow2", 1 << 20, encrypt_format="luks")  # no passphrase
    assert not (tmp_path / "bad.qcow2").exists()


# Sizes as users write them: qemu-img decides which are sizes and what they
# mean (one parser reads every size of the command line and the mount
# options: service/options.parse_size).
SIZES = ["1G", "1g", "1.5G", "512", "512b", "512B", "2M", "0.5k", "3.25m", "1T", "0", "0G",
         "+1G", "+0.5G", " 1G", "1.G", "01G", "3 M", "abc", "1X", ".5G", "1e3", "1.5", "1k5", "1GG",
         "++1G", "1,5G"]


@pytest.mark.parametrize("size", SIZES)
def test_a_size_means_what_it_means_to_qemu_img(tmp_path: Path, size: str):
    q = run(["qemu-img", "create", "-q", "-f", "qcow2", "theirs.qcow2", size], tmp_path)
    p = qcowfs(tmp_path, "create", "-f", "qcow2", "ours.qcow2", size)
    assert (p.returncode == 0) == (q.returncode == 0), (p.stderr, q.stderr)
    if q.returncode == 0:
        assert info(tmp_path / "ours.qcow2")["virtual-size"] == info(tmp_path / "theirs.qcow2")["virtual-size"]
    else:
        assert p.stderr.count("\n") == 1 and "invalid size" in p.stderr, p.stderr


def test_sizes_with_an_ib_or_b_ending_are_read_as_mount_options_always_read_them(tmp_path: Path):
    """The one liberty beyond qemu-img (docs: the mount options took them first)."""
    for size, want in (("64KiB", 64 << 10), ("64kb", 64 << 10), ("2MiB", 2 << 20)):
        assert qcowfs(tmp_path, "create", "-f", "qcow2", "ours.qcow2", size).returncode == 0
        assert info(tmp_path / "ours.qcow2")["virtual-size"] == want


def test_pbkdf2_counts_follow_cpu_time_under_load(tmp_path: Path):
    """A new LUKS slot's PBKDF2 count is timed in CPU time, as QEMU times it:
    with both cores busy, qcowfs's count for an iter-time stays near
    qemu-img's for the same iter-time (timed on the wall clock, it fell to
    half of it: a slot weaker than asked on a busy host)."""
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        (tmp_path / "key").write_text(KEY)
        p = qcowfs(tmp_path, "create", "--key-file", "key", "-o", "encrypt.format=luks,encrypt.iter-time=100",
                   "ours.qcow2", "1M")
        assert p.returncode == 0, p.stderr
        luks.create_encrypted("qemu-img", "create", "-q", "-f", "qcow2", *luks.secret_object(KEY), "-o",
                              "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=100",
                              tmp_path / "theirs.qcow2", "1M")
    finally:
        for b in burners:
            b.kill()
            b.wait()

    def iters(name: str) -> int:
        d = json.loads(run(["qemu-img", "info", "--output=json", name], tmp_path).stdout)
        return d["format-specific"]["data"]["encrypt"]["slots"][0]["iters"]

    assert iters("ours.qcow2") >= 0.7 * iters("theirs.qcow2"), (iters("ours.qcow2"), iters("theirs.qcow2"))


def test_a_pbkdf2_count_qcowfs_cannot_derive_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A new slot's count past LUKS's 32 bits is refused as qemu-img refuses it;
    one past OpenSSL's C int (which qcowfs's PBKDF2 could not derive, to make
    the slot or to open it) is refused too, before anything is written."""
    from qcowfs.engine import create as engine_create
    from qcowfs.errors import UsageError

    (tmp_path / "key").write_text(KEY)
    p = qcowfs(tmp_path, "create", "--key-file", "key", "-o", "encrypt.format=luks,encrypt.iter-time=100000000",
               "disk.qcow2", "1M")
    assert p.returncode == 1 and "more than LUKS can store" in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert not list(tmp_path.glob("*disk.qcow2*"))
    monkeypatch.setattr(engine_create, "_iterations_per_second", lambda hash_name, length: 4_000_000)
    with pytest.raises(UsageError, match="more than OpenSSL's PBKDF2 takes"):
        engine_create.luks_iterations("sha256", 64, 600_000, engine_create.LUKS_MIN_SLOT_ITERS)
    assert engine_create.luks_iterations("sha256", 64, 500_000, engine_create.LUKS_MIN_SLOT_ITERS) == 2_000_000_000


RAW_CASES = [([], "1000"), ([], "1G"), ([], "0"), (["-o", "size=2M"], None), (["-o", "preallocation=off"], "1M"),
             (["-o", "preallocation=falloc"], "3M"), (["-o", "preallocation=full"], "3M")]


@pytest.mark.parametrize("args,size", RAW_CASES, ids=[" ".join(a) + f" {s}" for a, s in RAW_CASES])
def test_raw_as_qemu_img(tmp_path: Path, args: list[str], size: str | None):
    """`create -f raw`: qemu-img's line, the file's size (whole sectors), its
    zeros, and the host space preallocation asks for."""
    tail = [size] if size is not None else []
    q = run(["qemu-img", "create", "-f", "raw", *args, "theirs.raw", *tail], tmp_path)
    assert q.returncode == 0, q.stderr
    p = qcowfs(tmp_path, "create", "-f", "raw", *args, "ours.raw", *tail)
    assert p.returncode == 0 and not p.stderr, p.stderr
    assert p.stdout == q.stdout.replace("theirs.raw", "ours.raw")
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    assert ours.stat().st_size == theirs.stat().st_size
    assert ours.read_bytes() == bytes(ours.stat().st_size)
    if "falloc" in " ".join(args) or "full" in " ".join(args):
        assert ours.stat().st_blocks * 512 >= ours.stat().st_size
    else:
        assert ours.stat().st_blocks == 0
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


RAW_REFUSED = [["-o", "preallocation=metadata"], ["-o", "cluster_size=4k"], ["-b", "b.raw", "-F", "raw"], []]


@pytest.mark.parametrize("args", RAW_REFUSED, ids=[" ".join(a) or "no size" for a in RAW_REFUSED])
def test_raw_refused_where_qemu_img_refuses(tmp_path: Path, args: list[str]):
    (tmp_path / "b.raw").write_bytes(bytes(4096))
    tail = [] if not args else ["1M"]
    assert run(["qemu-img", "create", "-f", "raw", *args, "theirs.raw", *tail], tmp_path).returncode == 1
    p = qcowfs(tmp_path, "create", "-f", "raw", *args, "ours.raw", *tail)
    assert p.returncode == 1 and len(p.stderr.splitlines()) == 1 and not p.stdout, p.stdout + p.stderr
    assert not (tmp_path / "ours.raw").exists()


def test_library_creates_raw(tmp_path: Path):
    import qcowfs as lib

    lib.create(tmp_path / "a.raw", 5 << 20, format="raw", preallocation="falloc")
    assert (tmp_path / "a.raw").stat().st_size == 5 << 20 and (tmp_path / "a.raw").stat().st_blocks * 512 >= 5 << 20
    with pytest.raises(lib.QcowError, match="is not encrypted"):
        lib.create(tmp_path / "b.raw", 1 << 20, format="raw", passphrase="x")
    with pytest.raises(lib.QcowError, match="not 'vdi'"):
        lib.create(tmp_path / "b.vdi", 1 << 20, format="vdi")
    assert not (tmp_path / "b.raw").exists() and not (tmp_path / "b.vdi").exists()


@pytest.mark.parametrize("cluster", ["512", "4k", "8k", "64k"])
def test_the_feature_name_table_where_qemu_writes_it(tmp_path: Path, cluster: str):
    """QEMU writes its feature name table only for clusters over 4 KiB (eight
    names take 392 bytes of a 512-byte header cluster): qcowfs's create and
    its compat=1.1 amend give the header the extensions qemu-img's do; a
    512-byte cluster image with two snapshots, so upgraded, then takes a
    checkpoint (snapshot and bitmap: the bitmaps extension), as qemu-img
    takes a bitmap there (the soak's seed 2439188957 was refused: the
    header no longer fitted); and an older qcowfs image whose 512-byte
    header holds the table loses it at its next change, as QEMU's header
    rewrite drops it, so a bitmap fits."""
    import struct
    from tests.images import EXT_BITMAPS, EXT_FEATURE_TABLE, Header

    def exts(name: str) -> list[int]:
        return [e[0] for e in Header(tmp_path / name).extensions]

    assert run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", "q.qcow2", "1M"],
               tmp_path).returncode == 0
    assert qcowfs(tmp_path, "create", "-q", "-o", f"cluster_size={cluster}", "o.qcow2", "1M").returncode == 0
    assert exts("o.qcow2") == exts("q.qcow2")
    for who in ("q", "o"):
        assert run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster},compat=0.10",
                    f"{who}2.qcow2", "512"], tmp_path).returncode == 0
        for snap in ("s1", "s2"):
            assert run(["qemu-img", "snapshot", "-c", snap, f"{who}2.qcow2"], tmp_path).returncode == 0
    assert run(["qemu-img", "amend", "-o", "compat=1.1", "q2.qcow2"], tmp_path).returncode == 0
    assert qcowfs(tmp_path, "amend", "-o", "compat=1.1", "o2.qcow2").returncode == 0
    assert exts("o2.qcow2") == exts("q2.qcow2")
    assert run(["qemu-img", "bitmap", "--add", "q2.qcow2", "b"], tmp_path).returncode == 0
    p = qcowfs(tmp_path, "checkpoint", "o2.qcow2", "cp")
    assert p.returncode == 0, p.stderr
    check(tmp_path / "o2.qcow2")
    assert EXT_BITMAPS in exts("o2.qcow2")
    if cluster == "512":  # (an older qcowfs wrote the table wherever it fitted)
        h = Header(tmp_path / "o.qcow2")
        table = run([sys.executable, "-c", "from qcowfs.format import feature_table; "
                     "print(feature_table().data.hex())"], tmp_path)
        assert table.returncode == 0, table.stderr
        data = struct.pack(">II", EXT_FEATURE_TABLE, 384) + bytes.fromhex(table.stdout.strip())
        with open(tmp_path / "o.qcow2", "r+b") as f:
            f.seek(h.header_length)
            f.write(data + bytes(8))
        assert exts("o.qcow2") == [EXT_FEATURE_TABLE]
        check(tmp_path / "o.qcow2")
        p = qcowfs(tmp_path, "bitmap", "add", "o.qcow2", "b")
        assert p.returncode == 0, p.stderr
        assert exts("o.qcow2") == [EXT_BITMAPS]
        check(tmp_path / "o.qcow2")


def test_a_header_that_cannot_grow_is_refused_before_anything_is_written(tmp_path: Path):
    """A 512-byte header with a backing file name of 374 bytes has no room
    for the bitmaps extension: `bitmap add` and `checkpoint` are one line
    and the image is byte for byte as it was (qemu-img 7.2 says it lost the
    bitmap, exits 0 and leaves none)."""
    d = tmp_path.joinpath(*(["d" * 90] * 4))
    d.mkdir(parents=True)
    base = d / "base.qcow2"
    assert run(["qemu-img", "create", "-q", "-f", "qcow2", base, "1M"], tmp_path).returncode == 0
    name = str(base.relative_to(tmp_path))
    assert run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "-u", "-b", name, "-F",
                "qcow2", "top.qcow2", "1M"], tmp_path).returncode == 0
    before = (tmp_path / "top.qcow2").read_bytes()
    for args in (["bitmap", "add", "top.qcow2", "b"], ["checkpoint", "top.qcow2", "c"]):
        p = qcowfs(tmp_path, *args)
        assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
        assert "more than its cluster (512 bytes): nothing was changed" in p.stderr, p.stderr
        assert (tmp_path / "top.qcow2").read_bytes() == before
