"""Corrupted and hostile images.

Header-level problems: `qcowfs mount` and `qcowfs info` fail with exactly one line on stderr,
no traceback, nothing mounted, image untouched.
Table-level problems found at read time: the mount works, the damaged range reads as EIO, the
rest of the disk reads correctly and the daemon keeps serving.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import struct
import subprocess
from pathlib import Path
from typing import Callable, Iterator

import pytest

import luks
from conftest import QCOWFS, files_equal, force_unmount, is_mounted, to_raw
from images import (EXT_FEATURE_TABLE, KiB, MiB, TiB, Header, create, file_state,
                    oracle, patch, qimg, qio, read_u64, set_field, set_incompatible, sh)

TIMEOUT = 60
FEATURE_NAME = "qcowfs-test-frobnicator"


# --------------------------------------------------------------------------
# helpers

def good_image(d: Path, name: str = "disk.qcow2", size: int = 4 * MiB, **opts) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    img = create(d / name, size, **opts)
    qio(img, "write -P 0x61 0 100000", "write -P 0x62 1M 4097", f"write -P 0x63 {size - 1000} 1000")
    return img


def with_header(field: str, value: int, **opts) -> Callable[[Path], Path]:
    def fn(d: Path) -> Path:
        img = good_image(d, **opts)
        set_field(img, field, value)
        return img
    return fn


def truncated(length: int) -> Callable[[Path], Path]:
    def fn(d: Path) -> Path:
        img = good_image(d)
        os.truncate(img, length)
        return img
    return fn


def unknown_incompatible_named(d: Path) -> Path:
    """Incompatible bit 10 set, and qemu's feature name table entry for bit 4 rewritten to name bit 10."""
    img = good_image(d)
    h = Header(img)
    _, _, data, ln = h.ext(EXT_FEATURE_TABLE)
    for pos in range(data, data + ln, 48):
        ftype, bit = h.raw[pos], h.raw[pos + 1]
        if (ftype, bit) == (0, 4):
            patch(img, pos, struct.pack(">BB46s", 0, 10, FEATURE_NAME.encode()))
            break
    else:
        raise AssertionError("qemu wrote no feature name entry for incompatible bit 4")
    set_incompatible(img, 1 << 10)
    return img


def unknown_incompatible_unnamed(d: Path) -> Path:
    img = good_image(d)
    h = Header(img)
    _, typepos, _, _ = h.ext(EXT_FEATURE_TABLE)
    patch(img, typepos, struct.pack(">I", 0x0BADF00D))     # table gone (unknown extension, skipped)
    set_incompatible(img, 1 << 40)
    return img


def encrypted_luks(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    img = d / "disk.qcow2"
    luks.create_encrypted("qemu-img", "create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=abc",
                          "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=200", img, "1M")
    return img


def encrypted_aes_header(d: Path) -> Path:
    img = good_image(d)
    set_field(img, "crypt_method", 1)
    return img


def backing_named(name: str, fmt: str = "qcow2") -> Callable[[Path], Path]:
    def fn(d: Path) -> Path:
        d.mkdir(parents=True, exist_ok=True)
        return create(d / "disk.qcow2", MiB, backing=name, backing_fmt=fmt, unsafe=True, cwd=d)
    return fn


def backing_cycle(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    create(d / "b.qcow2", MiB, backing="a.qcow2", backing_fmt="qcow2", unsafe=True, cwd=d)
    return create(d / "a.qcow2", MiB, backing="b.qcow2", backing_fmt="qcow2", unsafe=True, cwd=d)


def backing_cycle3_patched(d: Path) -> Path:
    """a -> b -> c -> a, the last link made by patching c's backing name (same length)."""
    d.mkdir(parents=True, exist_ok=True)
    create(d / "x.qcow2", MiB)
    create(d / "c.qcow2", MiB, backing="x.qcow2", backing_fmt="qcow2", cwd=d)
    create(d / "b.qcow2", MiB, backing="c.qcow2", backing_fmt="qcow2", cwd=d)
    a = create(d / "a.qcow2", MiB, backing="b.qcow2", backing_fmt="qcow2", cwd=d)
    h = Header(d / "c.qcow2")
    patch(d / "c.qcow2", h.backing_file_offset, b"a.qcow2")
    (d / "x.qcow2").unlink()
    return a


def backing_self(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    return create(d / "a.qcow2", MiB, backing="a.qcow2", backing_fmt="qcow2", unsafe=True, cwd=d)


def backing_self_dotted(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "s").mkdir()
    return create(d / "s" / "a.qcow2", MiB, backing="../s/./a.qcow2", backing_fmt="qcow2", unsafe=True, cwd=d / "s")


def backing_missing(d: Path) -> Path:
    return backing_named("does-not-exist.qcow2")(d)


def backing_name_past_cluster(d: Path) -> Path:
    img = good_image(d, cluster_size=512)
    set_field(img, "backing_file_offset", 400)
    set_field(img, "backing_file_size", 1000)       # runs past the end of the header cluster
    return img


def extension_overflow(d: Path) -> Path:
    img = good_image(d)
    h = Header(img)
    _, typepos, _, _ = h.ext(EXT_FEATURE_TABLE)
    patch(img, typepos + 4, struct.pack(">I", 0x7FFFFF00))   # extension length far past the cluster
    return img


def snapshot_table_past_eof(img: Path) -> None:
    set_field(img, "nb_snapshots", 1)
    set_field(img, "snapshots_offset", TiB)


HEADER_CASES: dict[str, Callable[[Path], Path]] = {
    "empty-file": truncated(0),
    "half-header": truncated(52),
    "header-only": truncated(112),
    "bad-magic": with_header("magic", 0x514649FC),
    "version-1": with_header("version", 1),
    "version-4": with_header("version", 4),
    "cluster-bits-8": with_header("cluster_bits", 8),
    "cluster-bits-22": with_header("cluster_bits", 22),
    "cluster-bits-63": with_header("cluster_bits", 63),
    "size-2^63": with_header("size", 1 << 63),
    "size-2^64-1": with_header("size", (1 << 64) - 1),
    "l1-size-too-small": with_header("l1_size", 0),
    "l1-size-absurd": with_header("l1_size", 0xFFFFFFFF),
    "l1-offset-misaligned": with_header("l1_table_offset", 3 * 64 * KiB + 8),
    "l1-offset-in-header-cluster": with_header("l1_table_offset", 0),
    "refcount-table-misaligned": with_header("refcount_table_offset", 64 * KiB + 512),
    "refcount-order-7": with_header("refcount_order", 7),
    "header-length-too-small": with_header("header_length", 50),
    "header-length-past-cluster": with_header("header_length", 70000),
    "extension-length-overflow": extension_overflow,
    "unknown-incompatible-named": unknown_incompatible_named,
    "unknown-incompatible-unnamed": unknown_incompatible_unnamed,
    "backing-name-past-cluster": backing_name_past_cluster,
}

# problems that `qemu-img info` itself does not refuse: `qcowfs info` may describe the image,
# but mounting must fail cleanly
OPEN_CASES: dict[str, Callable[[Path], Path]] = {
    "encrypted-luks": encrypted_luks,
    "encrypted-aes-header": encrypted_aes_header,
    "backing-json": backing_named('json:{"driver":"qcow2","file":{"driver":"file","filename":"/etc/hostname"}}'),
    "backing-nbd": backing_named("nbd://host.invalid:10809/x", fmt="raw"),
    "backing-missing": backing_missing,
    "backing-cycle": backing_cycle,
    "backing-cycle3": backing_cycle3_patched,
    "backing-self": backing_self,
    "backing-self-dotted": backing_self_dotted,
}


def qcowfs(*args: str | os.PathLike) -> subprocess.CompletedProcess:
    # stdin is never a terminal here: an encrypted image must not prompt
    return subprocess.run([QCOWFS, *map(str, args)], capture_output=True, text=True, timeout=TIMEOUT,
                          stdin=subprocess.DEVNULL)


def one_line_failure(p: subprocess.CompletedProcess, what: str) -> str:
    assert p.returncode != 0, f"{what} succeeded (stdout: {p.stdout[:300]!r})"
    assert "Traceback" not in p.stderr, f"{what}: traceback:\n{p.stderr}"
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, f"{what}: expected exactly one line on stderr, got {len(lines)}:\n{p.stderr}"
    assert lines[0].strip(), f"{what}: empty error line"
    return lines[0]


def attempt_mount(img: Path, mnt: Path) -> subprocess.CompletedProcess:
    mnt.mkdir(exist_ok=True)
    try:
        return qcowfs("mount", img, mnt, "--read-only")
    finally:
        was_mounted = is_mounted(mnt)
        force_unmount(mnt)
        assert not was_mounted, f"{mnt} was left mounted"
        assert str(mnt) not in Path("/proc/mounts").read_text()


def check_refused(img: Path, tmp_path: Path, info_must_fail: bool) -> str:
    before = file_state(tmp_path / "img")
    line = one_line_failure(attempt_mount(img, tmp_path / "mnt"), "qcowfs mount")
    assert list((tmp_path / "mnt").iterdir()) == []
    p = qcowfs("info", img)
    if info_must_fail:
        one_line_failure(p, "qcowfs info")
        one_line_failure(qcowfs("info", "--json", img), "qcowfs info --json")
    else:
        assert "Traceback" not in p.stderr, p.stderr
        if p.returncode == 0:
            assert p.stdout.strip(), "qcowfs info succeeded but printed nothing"
        else:
            one_line_failure(p, "qcowfs info")
    assert file_state(tmp_path / "img") == before, "refused image was modified"
    return line


def bitmap_directory_past_eof(img: Path) -> None:
    """Point the bitmaps extension's directory past the end of the file."""
    raw = bytearray(img.read_bytes()[: 64 * KiB])
    pos = raw.find(struct.pack(">I", 0x23852875))
    assert pos > 0, "no bitmaps extension"
    struct.pack_into(">Q", raw, pos + 8 + 16, TiB)
    with open(img, "r+b") as f:
        f.write(raw[: pos + 8 + 24])


DAMAGED_PARTS: dict[str, Callable[[Path], None]] = {
    "snapshot-table-past-eof": snapshot_table_past_eof,
    "bitmap-directory-past-eof": bitmap_directory_past_eof,
}


@contextlib.contextmanager
def read_only_mount(img: Path, mnt: Path, want: Path, word: str) -> Iterator[Path]:
    """A read-only mount of the damaged IMG on MNT that must succeed with one
    stderr line containing WORD and serve the disk WANT holds (unmounted after)."""
    mnt.mkdir()
    p = qcowfs("mount", img, mnt, "--read-only")
    try:
        assert p.returncode == 0, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and word in lines[0], p.stderr
        assert files_equal(mnt / "disk.raw", want)
        yield mnt
    finally:
        if is_mounted(mnt):
            qcowfs("umount", mnt)
        force_unmount(mnt)


@pytest.mark.parametrize("case", sorted(DAMAGED_PARTS))
def test_damaged_part_left_out_of_a_read_only_mount(case: str, tmp_path: Path, mount) -> None:
    """A damaged snapshot table or bitmap directory: a read-only mount still
    serves disk.raw (the active layer is intact), says so in one line and
    shows no snapshots / bitmaps; a writable mount is refused; nothing changes."""
    d = tmp_path / "img"
    img = good_image(d)
    qimg("bitmap", "--add", img, "b0")
    want = to_raw(img, tmp_path / "want.raw")
    DAMAGED_PARTS[case](img)
    before = file_state(d)
    with read_only_mount(img, tmp_path / "mnt", want, "damaged") as mnt:
        shown = "snapshots" if case.startswith("snapshot") else "bitmaps"
        assert list((mnt / shown).iterdir()) == []
    one_line_failure(attempt_mount_rw(img, tmp_path / "mnt-rw"), "writable qcowfs mount")
    assert file_state(d) == before, "a damaged image was modified"


def test_data_file_raw_without_a_data_file(tmp_path: Path, mount) -> None:
    """The autoclear bit data_file_raw set in an image without an external data
    file (a flipped header bit of the hostile-image soak, seed 7300149): QEMU
    refuses the image whole, so a write acknowledged into it would never be
    found. A writable mount and open are refused with one line and change
    nothing; a read-only mount serves the disk (reading needs no data file)
    and says in one line what is wrong."""
    d = tmp_path / "img"
    img = good_image(d)
    want = to_raw(img, tmp_path / "want.raw")
    set_field(img, "autoclear_features", Header(img).autoclear_features | (1 << 1))
    before = file_state(d)
    line = one_line_failure(attempt_mount_rw(img, tmp_path / "mnt-rw"), "writable qcowfs mount")
    assert "data_file_raw" in line, line
    with read_only_mount(img, tmp_path / "mnt", want, "data_file_raw"):
        pass
    assert file_state(d) == before, "a damaged image was modified"


def attempt_mount_rw(img: Path, mnt: Path) -> subprocess.CompletedProcess:
    mnt.mkdir(exist_ok=True)
    try:
        return qcowfs("mount", img, mnt)
    finally:
        force_unmount(mnt)


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_header_problem_refused(case: str, tmp_path: Path) -> None:
    img = HEADER_CASES[case](tmp_path / "img")
    # (a file without the qcow2 magic is a raw image to qemu-img info, and so to qcowfs info)
    raw = case in ("bad-magic", "empty-file")
    line = check_refused(img, tmp_path, info_must_fail=not raw)
    if raw:
        p = qcowfs("info", "--output=json", img)
        assert p.returncode == 0 and json.loads(p.stdout)["format"] == "raw", p.stderr
    if case == "unknown-incompatible-named":
        assert FEATURE_NAME in line, f"error does not name the feature: {line!r}"


@pytest.mark.parametrize("case", sorted(OPEN_CASES))
def test_unusable_image_refused(case: str, tmp_path: Path) -> None:
    img = OPEN_CASES[case](tmp_path / "img")
    check_refused(img, tmp_path, info_must_fail=False)


# --------------------------------------------------------------------------
# tolerated oddities: the mount must work and read what qemu reads

def unknown_compatible_and_autoclear(d: Path) -> Path:
    img = good_image(d)
    h = Header(img)
    set_field(img, "compatible_features", h.compatible_features | (1 << 17))
    set_field(img, "autoclear_features", h.autoclear_features | (1 << 33))
    return img


def unknown_extension(d: Path) -> Path:
    img = good_image(d, size=2 * MiB)
    h = Header(img)
    _, typepos, _, _ = h.ext(EXT_FEATURE_TABLE)
    patch(img, typepos, struct.pack(">I", 0x0BADF00D))
    return img


@pytest.mark.parametrize("case", ["unknown-compatible-autoclear", "unknown-extension"])
def test_tolerated_oddities(case: str, tmp_path: Path, mount) -> None:
    build = {"unknown-compatible-autoclear": unknown_compatible_and_autoclear,
             "unknown-extension": unknown_extension}[case]
    img = build(tmp_path / "img")
    expected = oracle(img, tmp_path / "expected.raw")
    before = file_state(tmp_path / "img")
    mnt = mount(img)
    assert (mnt / "disk.raw").read_bytes() == expected.read_bytes()
    sh(QCOWFS, "umount", mnt, timeout=TIMEOUT)
    assert file_state(tmp_path / "img") == before


# --------------------------------------------------------------------------
# table-level damage found at read time

CS = 4 * KiB            # one L2 table covers 2 MiB: an L1 entry can be damaged alone
VSIZE = 16 * MiB
BAD = 1 * MiB + 64 * KiB  # guest offset of the damaged cluster (aligned for 4k and 16k clusters)
GOOD = 12 * MiB         # another L1 entry's range, far from the damage (and from readahead)
COPIED = 1 << 63


def table_image(d: Path, compress: str | None = None, extended: bool = False) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    opts: dict = {"cluster_size": CS if not extended else 16 * KiB}
    if compress:
        opts["compression_type"] = compress
    if extended:
        opts["extended_l2"] = "on"
    img = create(d / "disk.qcow2", VSIZE, **opts)
    cs = opts["cluster_size"]
    src = d / "_src"
    src.write_bytes(bytes((i * 7 + i // 4096) & 0xFF for i in range(256 * KiB)))
    cmds = []
    if compress:
        cmds.append(f"write -c -s {src} {BAD} {CS}")
    else:
        cmds.append(f"write -s {src} {BAD} {cs}")
    cmds += [f"write -s {src} {BAD - 200 * KiB} 100000", f"write -s {src} {GOOD + 3} 200000",
             "write -P 0x71 100 1000"]
    qio(img, *cmds)
    return img


def damage_l2_past_eof(img: Path) -> None:
    h = Header(img)
    patch(img, h.l2_entry_offset(BAD), struct.pack(">Q", COPIED | TiB))


def damage_l2_misaligned(img: Path) -> None:
    h = Header(img)
    e = h.l2_entry(BAD)
    patch(img, h.l2_entry_offset(BAD), struct.pack(">Q", e + 512))


def damage_l1_misaligned(img: Path) -> None:
    h = Header(img)
    patch(img, h.l1_entry_offset(BAD), struct.pack(">Q", h.l1_entry(BAD) + 512))


def damage_l1_into_header(img: Path) -> None:
    h = Header(img)
    patch(img, h.l1_entry_offset(BAD), struct.pack(">Q", COPIED | 0x200))


def damage_l1_past_eof(img: Path) -> None:
    h = Header(img)
    patch(img, h.l1_entry_offset(BAD), struct.pack(">Q", COPIED | TiB))


def damage_compressed_garbage(img: Path) -> None:
    off, ln = Header(img).compressed_extent(BAD)
    patch(img, off, b"\xff" * ln)


def damage_compressed_short(img: Path) -> None:
    """A valid stream that decompresses to less than one cluster."""
    import zlib
    h = Header(img)
    off, ln = h.compressed_extent(BAD)
    if h.raw[104] == 1:
        import zstandard
        stream = zstandard.ZstdCompressor().compress(b"x" * 100)
    else:
        c = zlib.compressobj(wbits=-15)
        stream = c.compress(b"x" * 100) + c.flush()
    assert len(stream) <= ln
    patch(img, off, stream + b"\0" * (ln - len(stream)))


def damage_compressed_past_eof(img: Path) -> None:
    h = Header(img)
    e = h.l2_entry(BAD)
    x = 62 - (h.cluster_bits - 8)
    e = (e & ~((1 << x) - 1)) | (TiB + 100)
    patch(img, h.l2_entry_offset(BAD), struct.pack(">Q", e))


def damage_extl2_alloc_and_zero(img: Path) -> None:
    h = Header(img)
    pos = h.l2_entry_offset(BAD) + 8
    bitmap = read_u64(img, pos)
    assert bitmap & 1, f"expected subcluster 0 allocated: {bitmap:#x}"
    patch(img, pos, struct.pack(">Q", bitmap | (1 << 32)))      # allocated and zero: invalid


TABLE_CASES = {
    "l2-entry-misaligned": (None, False, damage_l2_misaligned),
    "l1-entry-misaligned": (None, False, damage_l1_misaligned),
    "l1-entry-into-header": (None, False, damage_l1_into_header),
    "compressed-garbage-zlib": ("zlib", False, damage_compressed_garbage),
    "compressed-garbage-zstd": ("zstd", False, damage_compressed_garbage),
    "compressed-short-zlib": ("zlib", False, damage_compressed_short),
    "compressed-short-zstd": ("zstd", False, damage_compressed_short),
    "compressed-past-eof": ("zlib", False, damage_compressed_past_eof),
    "extl2-allocated-and-zero": (None, True, damage_extl2_alloc_and_zero),
}


def expect_eio(fd: int, length: int, off: int) -> None:
    with pytest.raises(OSError) as ei:
        got = os.pread(fd, length, off)
        pytest.fail(f"pread({length}, {off:#x}) of a damaged range returned {len(got)} bytes")
    assert ei.value.errno == errno.EIO, f"pread({length}, {off:#x}): {ei.value!r}, expected EIO"


@pytest.mark.parametrize("case", sorted(TABLE_CASES))
def test_damaged_table_reads_eio(case: str, tmp_path: Path, mount) -> None:
    compress, extended, damage = TABLE_CASES[case]
    d = tmp_path / "img"
    img = table_image(d, compress, extended)
    good = oracle(img, tmp_path / "good.raw").read_bytes()
    damage(img)
    before = file_state(d)

    mnt = mount(img)
    fd = os.open(mnt / "disk.raw", os.O_RDONLY)
    try:
        assert os.fstat(fd).st_size == VSIZE
        for _ in range(2):
            expect_eio(fd, 4096, BAD)
            expect_eio(fd, 100, BAD + 1001)
            for off, ln in ((GOOD, 300000), (GOOD - 4096 + 7, 5000), (VSIZE - 65536, 65536)):
                got = os.pread(fd, ln, off)
                assert got == good[off:off + ln], f"undamaged range [{off:#x}, +{ln:#x}) reads wrong"
    finally:
        os.close(fd)
    # the daemon is still alive and serving: a fresh open and read
    with open(mnt / "disk.raw", "rb") as f:
        f.seek(GOOD + 3)
        assert f.read(1000) == good[GOOD + 3:GOOD + 1003]
    sh(QCOWFS, "umount", mnt, timeout=TIMEOUT)
    assert not is_mounted(mnt)
    assert file_state(d) == before, "image changed by a read-only mount"


# --------------------------------------------------------------------------
# truncated images: salvaged read-only as QEMU reads them (zeros past the end
# of the file), refused for writing, described by info, counted by check

def cut_inside_data(d: Path) -> Path:
    """20 MiB written at 0 and at 30 MiB, the file cut at two thirds: data
    clusters (and maybe tables) now lie past the end."""
    d.mkdir(parents=True, exist_ok=True)
    img = create(d / "disk.qcow2", 64 * MiB)
    qio(img, "write -P 0x11 0 20M", "write -P 0x22 30M 20M")
    os.truncate(img, img.stat().st_size * 2 // 3)
    return img


def cut_before_tables(d: Path) -> Path:
    """A snapshot taken after the data moved the L1 and refcount tables and the
    snapshot table to the end of the file; the file is then cut before them."""
    d.mkdir(parents=True, exist_ok=True)
    img = create(d / "disk.qcow2", 64 * MiB)
    qio(img, "write -P 0x11 0 20M", "write -P 0x22 30M 20M")
    sh(QCOWFS, "snapshot", "create", img, "s1")
    os.truncate(img, 40 * MiB)
    return img


SALVAGE_CASES: dict[str, Callable[[Path], Path]] = {
    "first-cluster-only": truncated(64 * KiB),
    "l1-offset-past-eof": with_header("l1_table_offset", TiB),
    "refcount-table-past-eof": with_header("refcount_table_offset", TiB),
    "cut-inside-data": cut_inside_data,
    "cut-before-tables": cut_before_tables,
}


def qemu_check_rc(img: Path) -> int:
    return subprocess.run(["qemu-img", "check", "-f", "qcow2", img], capture_output=True,
                          timeout=TIMEOUT).returncode


@pytest.mark.parametrize("case", sorted(SALVAGE_CASES))
def test_truncated_image_salvaged(case: str, tmp_path: Path, mount) -> None:
    """Where qemu-img info answers and qemu-img convert reads, qcowfs info
    answers, a read-only mount serves every byte QEMU reads (never a short
    read), a writable mount is refused with one line, and qcowfs check exits
    as qemu-img check does. Nothing changes the file."""
    img = SALVAGE_CASES[case](tmp_path / "img")
    before = file_state(tmp_path / "img")
    assert subprocess.run(["qemu-img", "info", img], capture_output=True).returncode == 0
    want = oracle(img, tmp_path / "qemu.raw").read_bytes()
    p = qcowfs("info", img)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    assert all(line.startswith("qcowfs: warning: ") for line in p.stderr.splitlines()), p.stderr
    if case != "cut-inside-data":  # (only data is cut there: nothing to see until it is read)
        assert p.stderr.strip(), "no warning names the damage"
    if case != "cut-inside-data":  # (its tables are whole: QEMU writes to it, and so may qcowfs)
        line = one_line_failure(attempt_mount_rw(img, tmp_path / "rw"), "writable qcowfs mount")
        assert "read-only" in line, line
    mnt = mount(img)
    with open(mnt / "disk.raw", "rb") as f:
        got = f.read()
    assert len(got) == len(want), f"disk.raw read {len(got)} bytes of {len(want)} (a short read)"
    assert got == want, "disk.raw differs from what qemu-img convert reads"
    sh(QCOWFS, "umount", mnt, timeout=TIMEOUT)
    rc = qcowfs("check", img).returncode
    assert rc == qemu_check_rc(img), f"qcowfs check exits {rc}, qemu-img check {qemu_check_rc(img)}"
    assert file_state(tmp_path / "img") == before, "the image changed"


TABLE_SALVAGE: dict[str, Callable[[Path], None]] = {
    "l2-entry-past-eof": damage_l2_past_eof,
    "l1-entry-past-eof": damage_l1_past_eof,
}


@pytest.mark.parametrize("case", sorted(TABLE_SALVAGE))
def test_table_past_eof_reads_as_qemu(case: str, tmp_path: Path, mount) -> None:
    """An L1 or L2 entry pointing past the end of the file: QEMU reads zeros
    there (and the rest as usual); a read-only mount serves the same bytes."""
    d = tmp_path / "img"
    img = table_image(d)
    TABLE_SALVAGE[case](img)
    want = oracle(img, tmp_path / "qemu.raw").read_bytes()
    mnt = mount(img)
    with open(mnt / "disk.raw", "rb") as f:
        assert f.read() == want
    sh(QCOWFS, "umount", mnt, timeout=TIMEOUT)
