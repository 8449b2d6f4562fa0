"""`qcowfs info`: human summary, and JSON mirroring `qemu-img info --output=json`."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import QCOWFS
from images import MATRIX, MiB, build, create, info, qimg, qio

TIMEOUT = 60

IMAGES = [
    "v2-c512", "v3-c64k", "v3-c2M", "refcount1", "refcount64", "convert-c-zstd-c4k", "convert-c-zlib-v2",
    "extl2-c64k-backing", "backing-relative", "backing-raw", "backing-chain4", "backing-no-format-ext",
    "datafile", "datafile-abs", "datafile-raw", "dirty-lazy-refcounts", "corrupt-bit", "snapshots",
    "snapshots-v2", "bitmaps", "huge-4T-c64k", "oddsize-c4k",
]

TOP_FIELDS = ["virtual-size", "cluster-size", "format", "backing-filename", "backing-filename-format"]
DATA_FIELDS = ["compat", "refcount-bits", "compression-type", "lazy-refcounts", "corrupt", "extended-l2",
               "data-file", "data-file-raw"]
SNAPSHOT_FIELDS = ["id", "name", "vm-state-size", "date-sec", "date-nsec", "vm-clock-sec", "vm-clock-nsec"]


def qcowfs(*args) -> subprocess.CompletedProcess:
    return subprocess.run([QCOWFS, *map(str, args)], capture_output=True, text=True, timeout=TIMEOUT)


def real(path: str, base: Path) -> str:
    return os.path.realpath(os.path.join(base, path))


def backing_chain(img: Path) -> list[str]:
    """Real paths of the backing files of IMG, nearest first, as qemu-img sees them."""
    chain = info(img, "--backing-chain")
    if isinstance(chain, dict):
        chain = [chain]
    return [real(c["filename"], img.parent) for c in chain[1:]]


@pytest.mark.parametrize("name", IMAGES)
def test_info_json_matches_qemu(name: str, tmp_path: Path) -> None:
    img = build(name, tmp_path / "img").resolve()
    want = info(img)
    p = qcowfs("info", "--json", img)
    assert p.returncode == 0, f"qcowfs info --json failed: {p.stderr.strip()}"
    assert "Traceback" not in p.stderr
    got = json.loads(p.stdout)
    errors: list[str] = []

    def cmp(key: str, g, w) -> None:
        if g != w:
            errors.append(f"{key}: qcowfs {g!r} != qemu-img {w!r}")

    for k in TOP_FIELDS:
        if k in want:
            cmp(k, got.get(k, "<missing>"), want[k])
    if "full-backing-filename" in want:
        g = got.get("full-backing-filename")
        if not isinstance(g, str):
            errors.append(f"full-backing-filename: {g!r}")
        else:
            cmp("full-backing-filename (resolved)", real(g, img.parent), real(want["full-backing-filename"], img.parent))

    fs = got.get("format-specific", {})
    cmp("format-specific.type", fs.get("type"), "qcow2")
    gdata, wdata = fs.get("data", {}), want["format-specific"]["data"]
    for k in DATA_FIELDS:
        if k in wdata:
            cmp(f"format-specific.data.{k}", gdata.get(k, "<missing>"), wdata[k])
    if "bitmaps" in wdata:
        norm = lambda bs: sorted((b["name"], b["granularity"], sorted(b["flags"])) for b in bs)  # noqa: E731
        try:
            cmp("bitmaps", norm(gdata.get("bitmaps", [])), norm(wdata["bitmaps"]))
        except (KeyError, TypeError) as e:
            errors.append(f"bitmaps malformed: {gdata.get('bitmaps')!r} ({e})")

    if "snapshots" in want:
        gs = got.get("snapshots")
        if not isinstance(gs, list) or len(gs) != len(want["snapshots"]):
            errors.append(f"snapshots: {gs!r} vs {want['snapshots']!r}")
        else:
            for i, (g, w) in enumerate(zip(gs, want["snapshots"])):
                for k in SNAPSHOT_FIELDS:
                    cmp(f"snapshots[{i}].{k}", g.get(k, "<missing>"), w[k])
    elif got.get("snapshots"):
        errors.append(f"qcowfs lists snapshots qemu-img does not: {got['snapshots']!r}")

    chain = got.get("backing-chain", "<missing>")
    if not isinstance(chain, list):
        errors.append(f"backing-chain: {chain!r}")
    else:
        resolved = [real(c, img.parent) for c in chain]
        # accept the list with or without the top image itself first
        if resolved and resolved[0] == str(img):
            resolved = resolved[1:]
        cmp("backing-chain", resolved, backing_chain(img))
    assert not errors, f"{name}:\n  " + "\n  ".join(errors)


# What qcowfs's JSON says beyond qemu-img's (docs/python.md): the layers below, the dirty bit.
OURS_ONLY = ("backing-chain", "dirty")


def _pairs(text: str, drop: tuple[str, ...] = ()) -> object:
    """JSON TEXT as nested lists of (key, value) pairs, in their order, without DROP's keys."""
    def walk(v: object) -> object:
        if isinstance(v, list) and v and isinstance(v[0], tuple):
            return [(k, walk(x)) for k, x in v if k not in drop]
        if isinstance(v, list):
            return [walk(x) for x in v]
        return v
    return walk(json.loads(text, object_pairs_hook=list))


@pytest.mark.parametrize("name", ["v2-c512", "snapshots", "bitmaps", "backing-relative", "datafile-raw",
                                  "extl2-c64k-backing", "corrupt-bit"])
def test_json_text_is_qemu_imgs(name: str, tmp_path: Path) -> None:
    """`info --output=json` and `check --output=json` print qemu-img's keys in
    qemu-img's order, with its values (QEMU's QDict hash order: text
    comparisons of the two outputs see only qcowfs's own keys)."""
    img = build(name, tmp_path / "img")
    for cmd in ("info", "check"):
        q = subprocess.run(["qemu-img", cmd, "--output=json", img.name], capture_output=True, text=True,
                           cwd=img.parent)
        p = subprocess.run([QCOWFS, cmd, "--output=json", img.name], capture_output=True, text=True,
                           cwd=img.parent)
        assert p.returncode == q.returncode, p.stderr
        want = _pairs(q.stdout)
        got = _pairs(p.stdout, OURS_ONLY if cmd == "info" else ())
        if cmd == "check":  # (qcowfs also says the counts that are 0, and the absolute path)
            keys = [k for k, _ in want]  # type: ignore[union-attr]
            got = [(k, v) for k, v in got if k in keys and k != "filename"]  # type: ignore[union-attr]
            want = [(k, v) for k, v in want if k != "filename"]  # type: ignore[union-attr]
        assert got == want, f"{cmd}:\n{p.stdout}\n{q.stdout}"


@pytest.mark.parametrize("name", ["v3-c64k", "backing-relative", "snapshots", "bitmaps", "datafile-raw"])
def test_info_human(name: str, tmp_path: Path) -> None:
    img = build(name, tmp_path / "img").resolve()
    want = info(img)
    p = qcowfs("info", img)
    assert p.returncode == 0, f"qcowfs info failed: {p.stderr.strip()}"
    assert "Traceback" not in p.stderr
    out = p.stdout
    assert out.strip() and not out.lstrip().startswith("{"), f"not a human-readable summary:\n{out}"
    assert str(want["virtual-size"]) in out, f"virtual size in bytes missing:\n{out}"
    assert "qcow2" in out
    if "backing-filename" in want:
        assert want["backing-filename"] in out, f"backing file name missing:\n{out}"
    for s in want.get("snapshots", []):
        assert s["name"] in out, f"snapshot {s['name']!r} missing:\n{out}"
    for b in want["format-specific"]["data"].get("bitmaps", []):
        assert b["name"] in out, f"bitmap {b['name']!r} missing:\n{out}"


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_info_human_is_qemu_imgs(name: str, tmp_path: Path) -> None:
    """`qcowfs info IMAGE` prints what `qemu-img info IMAGE` prints, line for
    line, for every image of the read matrix (qcowfs adds a "backing chain
    [N]" line for each deeper layer). The snapshot table had an older QEMU's
    columns, bitmaps a form of their own, and a v2 image a "corrupt" line;
    the format-specific keys came in another order."""
    img = build(name, tmp_path / "img").resolve()
    q = subprocess.run(["qemu-img", "info", str(img)], capture_output=True, text=True, timeout=60)
    assert q.returncode == 0, q.stderr
    p = qcowfs("info", img)
    assert p.returncode == 0, p.stderr
    ours = [line for line in p.stdout.splitlines() if not line.startswith("backing chain [")]
    assert ours == q.stdout.splitlines(), f"qcowfs:\n{p.stdout}\nqemu-img:\n{q.stdout}"
    # and `map --output=json`, byte for byte (the objects opened with "{" where qemu-img writes "{ ").
    # Both ask the host file where its holes are ("zero" inside a data cluster): written back
    # first, so that the host filesystem's answer cannot change between the two (the fresh
    # clone's run of 2026-12-07 under load saw a hole of the 2 MiB-cluster image turn to data).
    # The fresh clone's run of 2026-12-07 14:30 (after the sync) saw it again: qemu-img is
    # asked before and after qcowfs, and only an answer it gives twice is compared (a
    # host that still changes its answer is asked again, up to five times).
    os.sync()

    def qemu_map() -> str:
        q = subprocess.run(["qemu-img", "map", "--output=json", str(img)], capture_output=True, text=True,
                           timeout=60, cwd=img.parent)  # (qemu-img 7.2 finds a data file from the working directory)
        assert q.returncode == 0, q.stderr
        return q.stdout

    for _ in range(5):
        before = qemu_map()
        p = qcowfs("map", "--output=json", img)
        assert p.returncode == 0, p.stderr
        if qemu_map() == before:
            break
        time.sleep(1)
    assert p.stdout == before, f"qcowfs:\n{p.stdout[:2000]}\nqemu-img:\n{before[:2000]}"


def test_info_missing_file(tmp_path: Path) -> None:
    p = qcowfs("info", tmp_path / "nope.qcow2")
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.mark.parametrize("layout", ["relative", "absolute", "raw-base", "deep"])
def test_backing_chain_is_qemu_imgs(layout: str, tmp_path: Path) -> None:
    """`info --backing-chain` prints every layer as qemu-img does, each named
    as qemu-img names it (its backing file name beside the name above), and
    the backing file's "actual path" only where that differs from its name;
    JSON is the list qemu-img prints (qcowfs adds its "dirty" key). Run from
    the images' parent directory with a relative path, where the names qemu-img
    prints are relative too."""
    d = tmp_path / "vm"
    d.mkdir()
    if layout == "raw-base":
        with open(d / "base.img", "wb") as f:
            f.truncate(4 * MiB)
        base, fmt = "base.img", "raw"
    else:
        create(d / "base.qcow2", 4 * MiB, cluster_size=4096)
        qio(d / "base.qcow2", "write -P 1 0 64k")
        qimg("snapshot", "-c", "s1", d / "base.qcow2")
        base, fmt = "base.qcow2", "qcow2"
    if layout == "absolute":
        base = str(d / base)
    create(d / "mid.qcow2", 4 * MiB, backing=base, backing_fmt=fmt, cluster_size=16384)
    top = "mid.qcow2"
    if layout == "deep":
        create(d / "upper.qcow2", 4 * MiB, backing="mid.qcow2", backing_fmt="qcow2")
        qimg("bitmap", "--add", d / "upper.qcow2", "b1")
        top = "upper.qcow2"
    create(d / "top.qcow2", 4 * MiB, backing=top, backing_fmt="qcow2")
    for args in ([], ["--backing-chain"]):
        q = subprocess.run(["qemu-img", "info", *args, "vm/top.qcow2"], capture_output=True, text=True,
                           cwd=tmp_path, timeout=60)
        p = subprocess.run([QCOWFS, "info", *args, "vm/top.qcow2"], capture_output=True, text=True,
                           cwd=tmp_path, timeout=60)
        assert (p.returncode, p.stderr) == (0, "") and q.returncode == 0, p.stderr + q.stderr
        ours = [line for line in p.stdout.splitlines() if not line.startswith("backing chain [")]
        assert ours == q.stdout.splitlines(), f"qcowfs:\n{p.stdout}\nqemu-img:\n{q.stdout}"
    q = subprocess.run(["qemu-img", "info", "--backing-chain", "--output=json", "vm/top.qcow2"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=60)
    p = subprocess.run([QCOWFS, "info", "--backing-chain", "--output=json", "vm/top.qcow2"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=60)
    ours = json.loads(p.stdout)
    for layer in ours:
        layer.get("format-specific", {}).get("data", {}).pop("dirty", None)
    assert ours == json.loads(q.stdout)


def test_raw_files_are_shown_as_qemu_img_shows_them(tmp_path: Path) -> None:
    """`info` of a raw file (qcowfs creates and converts to raw too): probed
    as qemu-img probes, or named with -f, text and JSON as qemu-img's; the
    size in whole sectors, also for a raw backing file of --backing-chain.
    -f qcow2 on a raw file and -f on a mount point are one line each."""
    (tmp_path / "empty.img").write_bytes(b"")
    (tmp_path / "odd.img").write_bytes(b"hello")
    with open(tmp_path / "holes.img", "wb") as f:
        f.truncate(3 * MiB + 100)
        f.seek(MiB)
        f.write(b"x" * 70000)
    (tmp_path / "magic-only.img").write_bytes(b"QFI\xfb")  # (QEMU's probe wants a whole header: raw)
    create(tmp_path / "top.qcow2", 4 * MiB, backing="odd.img", backing_fmt="raw")
    cases = [["empty.img"], ["odd.img"], ["holes.img"], ["-f", "raw", "holes.img"], ["-f", "raw", "top.qcow2"],
             ["--backing-chain", "top.qcow2"]]
    for args in cases:
        for out in ([], ["--output=json"]):
            q = subprocess.run(["qemu-img", "info", *out, *args], capture_output=True, text=True, cwd=tmp_path,
                               timeout=60)
            p = subprocess.run([QCOWFS, "info", *out, *args], capture_output=True, text=True, cwd=tmp_path,
                               timeout=60)
            assert (p.returncode, p.stderr, q.returncode) == (0, "", 0), (args, p.stderr, q.stderr)
            if out:
                ours = json.loads(p.stdout)
                for layer in ours if isinstance(ours, list) else [ours]:
                    for key in OURS_ONLY:
                        layer.pop(key, None)
                        layer.get("format-specific", {}).get("data", {}).pop(key, None)
                assert ours == json.loads(q.stdout), args
            else:
                ours = [line for line in p.stdout.splitlines() if not line.startswith("backing chain [")]
                assert ours == q.stdout.splitlines(), (args, p.stdout, q.stdout)
    import qcowfs as lib
    assert lib.info(tmp_path / "odd.img") == {"virtual-size": 512, "filename": str(tmp_path / "odd.img"),
                                              "format": "raw", "actual-size": 4096, "dirty-flag": False}
    assert lib.info(tmp_path / "top.qcow2")["backing-filename"] == "odd.img"
    p = qcowfs("info", "-f", "qcow2", tmp_path / "holes.img")
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "not a qcow2 image" in p.stderr, p.stderr
    # qemu-img probes a file this short as raw (it wants a whole header); qcowfs says what is wrong
    p = qcowfs("info", tmp_path / "magic-only.img")
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "too short" in p.stderr, p.stderr


@pytest.mark.parametrize("damage", ["size-plus-one", "starts-with-nul"])
def test_backing_name_is_a_c_string(damage: str, tmp_path: Path) -> None:
    """A backing file name with a NUL byte in it (its size one too large, or a
    NUL first) is a C string to QEMU: the name ends at the NUL (none at all
    for a NUL first). qcowfs reads it so too (it refused the image), so
    info, the disk and check --repair agree with qemu-img's."""
    import struct

    base = create(tmp_path / "base.qcow2", 4 * MiB)
    qio(base, "write -P 7 0 1M")
    top = create(tmp_path / "top.qcow2", 4 * MiB, backing="base.qcow2", backing_fmt="qcow2")
    with open(top, "r+b") as f:
        offset, size = struct.unpack(">QI", f.read(20)[8:20])
        if damage == "size-plus-one":
            f.seek(16)
            f.write(struct.pack(">I", size + 1))
        else:
            f.seek(offset)
            f.write(b"\0")
    keys = ("backing-filename", "full-backing-filename", "backing-filename-format")
    want = {k: v for k, v in info(top).items() if k in keys}
    p = qcowfs("info", "--output=json", top)
    assert p.returncode == 0, p.stderr
    assert {k: v for k, v in json.loads(p.stdout).items() if k in keys} == want
    for tool in (["qemu-img"], [QCOWFS]):
        same = subprocess.run([*tool, "compare", top, base], capture_output=True, text=True).returncode
        assert same == (0 if damage == "size-plus-one" else 1), tool
    p = qcowfs("check", "--repair", top)
    assert p.returncode == 0, p.stdout + p.stderr
    assert {k: v for k, v in info(top).items() if k in keys} == want


def test_a_raw_backing_file_that_holds_a_qcow2_image(tmp_path: Path) -> None:
    """The header names the backing file's format (raw): a raw disk whose
    bytes start with the qcow2 magic (a qcow2 image stored in it) is shown
    as raw in --backing-chain and map, as qemu-img shows it (it was probed,
    and shown as the qcow2 image inside)."""
    create(tmp_path / "inner.qcow2", MiB)
    with open(tmp_path / "base.raw", "wb") as f:
        f.write((tmp_path / "inner.qcow2").read_bytes())
        f.truncate(2 * MiB)
    create(tmp_path / "top.qcow2", 2 * MiB, backing="base.raw", backing_fmt="raw")
    for args in (["info", "--backing-chain"], ["info", "--backing-chain", "--output=json"], ["map"]):
        q = subprocess.run(["qemu-img", *args, "top.qcow2"], capture_output=True, text=True, cwd=tmp_path,
                           timeout=60)
        p = subprocess.run([QCOWFS, *args, "top.qcow2"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
        assert (p.returncode, p.stderr) == (0, "") and q.returncode == 0, p.stderr
        ours = p.stdout
        if "--output=json" in args:
            layers = json.loads(ours)
            for layer in layers:
                layer.pop("backing-chain", None)
                layer.get("format-specific", {}).get("data", {}).pop("dirty", None)
            assert layers == json.loads(q.stdout)
        else:
            assert [line for line in ours.splitlines() if not line.startswith("backing chain [")] == \
                q.stdout.splitlines(), (args, ours, q.stdout)
