"""Unit tests of qcowfs.format: pure parsing and packing of qcow2 structures.

Real headers come from `qemu-img create` and are checked against
`qemu-img info --output=json`; the rest are hand-built buffers and
hypothesis properties.
"""
from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcowfs.errors import CorruptionError, InvalidImageError
from qcowfs.format import (
    OFLAG_ZERO,
    SubclusterType,
    cluster_type,
    extended_problem,
    subcluster_type,
    AUTOCLEAR_BITMAPS,
    BME_AUTO,
    BME_EXTRA_DATA_COMPATIBLE,
    BME_IN_USE,
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_NAMES,
    COMPRESSION_ZLIB,
    COMPRESSION_ZSTD,
    EXT_BACKING_FORMAT,
    EXT_BITMAPS,
    EXT_DATA_FILE,
    EXT_FEATURE_TABLE,
    FEATURE_NAMES_BUILTIN,
    FEATURE_TYPE_AUTOCLEAR,
    FEATURE_TYPE_COMPAT,
    FEATURE_TYPE_INCOMPAT,
    INCOMPAT_COMPRESSION,
    INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE,
    INCOMPAT_DIRTY,
    INCOMPAT_EXTL2,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    QCOW_MAGIC,
    BitmapDirEntry,
    BitmapsExtension,
    CompressedDescriptor,
    Geometry,
    Header,
    HeaderExtension,
    SnapshotEntry,
    compressed_shift,
    decode_compressed,
    encode_compressed,
    refcount_get,
    refcount_set,

)
from qcowfs.format.bulk import cluster_types, encode_refcount_block, refcount_array, refcount_store, refcount_values
from qcowfs.format.compression import compress_cluster, decompress_cluster

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- helpers -------------------------------------------------------------------

def make_header(version: int = 3, cluster_bits: int = 16, **kw) -> Header:
    fields = dict(
        version=version, backing_file_offset=0, backing_file_size=0, cluster_bits=cluster_bits,
        size=1 << 30, crypt_method=0, l1_size=2, l1_table_offset=3 << cluster_bits,
        refcount_table_offset=1 << cluster_bits, refcount_table_clusters=1, nb_snapshots=0,
        snapshots_offset=0)
    if version == 3:
        fields.update(header_length=112, refcount_order=4)
    fields.update(kw)
    return Header(**fields)


def raw_v2(**kw) -> bytearray:
    """A valid v2 header's 72 bytes, with fields overridden by name."""
    f = dict(magic=QCOW_MAGIC, version=2, bfo=0, bfs=0, cluster_bits=16, size=1 << 20, crypt=0,
             l1_size=1, l1_off=0x30000, rt_off=0x10000, rt_clusters=1, nb_snap=0, snap_off=0)
    f.update(kw)
    return bytearray(struct.pack(">4sIQIIQIIQQIIQ", *f.values()))


def raw_v3(header_length: int = 112, refcount_order: int = 4, incompat: int = 0,
           compression_type: int = 0, **kw) -> bytearray:
    kw.setdefault("version", 3)
    buf = raw_v2(**kw) + struct.pack(">QQQII", incompat, 0, 0, refcount_order, header_length)
    buf += bytes(max(0, header_length - len(buf)))
    if header_length > 104:
        buf[104] = compression_type
    return buf


def end_marker() -> bytes:
    return bytes(8)


def ext(ext_type: int, data: bytes) -> bytes:
    return struct.pack(">II", ext_type, len(data)) + data + bytes(-len(data) % 8)


def feature_entry(ftype: int, bit: int, name: bytes) -> bytes:
    assert len(name) <= 46
    return bytes([ftype, bit]) + name + bytes(46 - len(name))


# ---- Header: hand-built round trips ----------------------------------------------

def test_v2_header_pack_fields_is_72_bytes_and_round_trips():
    h = make_header(version=2, cluster_bits=12, size=123456789, l1_size=7, nb_snapshots=3,
                    snapshots_offset=0x5000)
    fields = h.pack_fields()
    assert len(fields) == 72
    assert fields[:4] == QCOW_MAGIC
    assert struct.unpack_from(">I", fields, 4)[0] == 2
    assert struct.unpack_from(">I", fields, 20)[0] == 12          # cluster_bits
    assert struct.unpack_from(">Q", fields, 24)[0] == 123456789   # size
    assert struct.unpack_from(">I", fields, 36)[0] == 7           # l1_size
    assert struct.unpack_from(">I", fields, 60)[0] == 3           # nb_snapshots
    assert struct.unpack_from(">Q", fields, 64)[0] == 0x5000      # snapshots_offset
    packed = h.pack()
    assert packed == fields + end_marker()
    back = Header.parse(packed + bytes(4096 - len(packed)))
    assert back == h
    assert back.header_length == 72 and back.refcount_order == 4
    assert back.compression_type == COMPRESSION_ZLIB and back.extensions == []


def test_v3_header_pack_fields_layout():
    h = make_header(incompatible_features=INCOMPAT_EXTL2 | INCOMPAT_COMPRESSION,
                    compatible_features=COMPAT_LAZY_REFCOUNTS, autoclear_features=AUTOCLEAR_BITMAPS,
                    refcount_order=6, header_length=112, compression_type=COMPRESSION_ZSTD)
    fields = h.pack_fields()
    assert len(fields) == 112
    inc, comp, auto, order, hl = struct.unpack_from(">QQQII", fields, 72)
    assert (inc, comp, auto, order, hl) == (INCOMPAT_EXTL2 | INCOMPAT_COMPRESSION, COMPAT_LAZY_REFCOUNTS,
                                             AUTOCLEAR_BITMAPS, 6, 112)
    assert fields[104] == COMPRESSION_ZSTD
    assert fields[105:] == bytes(7)
    back = Header.parse(h.pack())
    assert back == h
    assert back.extended_l2 and back.l2_entry_size == 16 and back.l2_entries == 4096
    assert back.refcount_bits == 64 and back.cluster_size == 65536


def test_v3_header_length_104_has_no_compression_type_byte():
    h = make_header(header_length=104)
    fields = h.pack_fields()
    assert len(fields) == 104
    back = Header.parse(h.pack())
    assert back == h and back.compression_type == 0
    # An odd longer header (120) keeps its length and zero padding.
    h2 = make_header(header_length=120, compression_type=COMPRESSION_ZSTD)
    f2 = h2.pack_fields()
    assert len(f2) == 120 and f2[104] == 1 and f2[105:] == bytes(15)
    assert Header.parse(h2.pack()) == h2


def test_v3_header_with_all_extensions_and_backing_round_trips():
    cs = 1 << 16
    table = (feature_entry(FEATURE_TYPE_INCOMPAT, 0, b"dirty bit")
             + feature_entry(FEATURE_TYPE_INCOMPAT, 7, b"time travel")
             + feature_entry(FEATURE_TYPE_AUTOCLEAR, 0, b"bitmaps"))
    bitmaps = BitmapsExtension(nb_bitmaps=3, directory_size=200, directory_offset=0x50000).pack()
    exts = [
        HeaderExtension(EXT_BACKING_FORMAT, b"qcow2"),
        HeaderExtension(EXT_FEATURE_TABLE, table),
        HeaderExtension(EXT_BITMAPS, bitmaps),
        HeaderExtension(EXT_DATA_FILE, b"data.raw"),
        HeaderExtension(0x12345678, b"\x01\x02\x03"),         # unknown: kept as is
        HeaderExtension(0xDEADBEEF, b""),
    ]
    h = make_header(extensions=[HeaderExtension(e.type, e.data) for e in exts],
                    backing_file="../base images/b\u00e4se.qcow2",
                    incompatible_features=INCOMPAT_DATA_FILE, autoclear_features=AUTOCLEAR_BITMAPS)
    packed = h.pack()
    # Layout: fields, each extension padded to 8, end marker, then the name.
    expected = h.pack_fields() + b"".join(ext(e.type, e.data) for e in exts) + end_marker()
    name = "../base images/b\u00e4se.qcow2".encode()
    assert packed == expected[:8] + struct.pack(">QI", len(expected), len(name)) + expected[20:] + name
    assert h.backing_file_offset == len(expected) and h.backing_file_size == len(name)
    back = Header.parse(packed + bytes(cs - len(packed)))
    assert back == h
    assert back.extensions == exts
    assert back.backing_file == "../base images/b\u00e4se.qcow2"
    assert back.extension(EXT_BACKING_FORMAT) == b"qcow2"
    assert back.extension(EXT_DATA_FILE) == b"data.raw"
    assert back.extension(0x12345678) == b"\x01\x02\x03"
    assert back.extension(0xDEADBEEF) == b""
    assert back.extension(0x0BADF00D) is None
    assert BitmapsExtension.parse(back.extension(EXT_BITMAPS)) == BitmapsExtension(3, 200, 0x50000)
    # Packing what was parsed gives the same bytes again.
    assert back.pack() == packed


def test_v2_header_with_backing_format_and_name_round_trips():
    h = make_header(version=2, extensions=[HeaderExtension(EXT_BACKING_FORMAT, b"raw")],
                    backing_file="base.raw")
    packed = h.pack()
    assert packed[72:80] == struct.pack(">II", EXT_BACKING_FORMAT, 3)
    assert packed[80:88] == b"raw\0\0\0\0\0"
    assert packed[88:96] == end_marker()
    assert packed[96:] == b"base.raw"
    assert struct.unpack_from(">QI", packed, 8) == (96, 8)
    back = Header.parse(packed)
    assert back.backing_file == "base.raw"
    assert back.extension(EXT_BACKING_FORMAT) == b"raw"
    assert back == h


def test_set_extension_replaces_appends_and_drops_in_order():
    h = make_header(extensions=[HeaderExtension(1, b"a"), HeaderExtension(2, b"b"),
                                HeaderExtension(3, b"c")])
    h.set_extension(2, b"BB")
    assert [(e.type, e.data) for e in h.extensions] == [(1, b"a"), (2, b"BB"), (3, b"c")]
    h.set_extension(4, b"d")
    assert [e.type for e in h.extensions] == [1, 2, 3, 4]
    h.set_extension(1, None)
    assert [e.type for e in h.extensions] == [2, 3, 4]
    h.set_extension(99, None)
    assert [e.type for e in h.extensions] == [2, 3, 4]
    assert Header.parse(h.pack()).extensions == h.extensions


ext_types = st.integers(1, 0xFFFFFFFF)
names = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\0"), max_size=40)


@FAST
@given(
    version=st.sampled_from([2, 3]),
    cluster_bits=st.integers(12, 21),
    size=st.integers(0, (1 << 61)),
    l1_size=st.integers(0, 0xFFFFFFFF),
    l1_off=st.integers(0, (1 << 64) - 1),
    rt_off=st.integers(0, (1 << 64) - 1),
    nb_snap=st.integers(0, 0xFFFFFFFF),
    incompat=st.integers(0, (1 << 64) - 1),
    compat=st.integers(0, (1 << 64) - 1),
    autoclear=st.integers(0, (1 << 64) - 1),
    order=st.integers(0, 6),
    extra_len=st.sampled_from([0, 8, 16]),
    compression=st.integers(0, 255),
    extensions=st.lists(st.tuples(ext_types, st.binary(max_size=70)), max_size=5),
    # (a backing name is a C string to QEMU: an empty one is none, Header.parse)
    backing=st.none() | names.filter(bool),
)
def test_header_round_trip_property(version, cluster_bits, size, l1_size, l1_off, rt_off, nb_snap,
                                    incompat, compat, autoclear, order, extra_len, compression,
                                    extensions, backing):
    kw = dict(size=size, l1_size=l1_size, l1_table_offset=l1_off, refcount_table_offset=rt_off,
              nb_snapshots=nb_snap, extensions=[HeaderExtension(t, d) for t, d in extensions],
              backing_file=backing)
    if version == 3:
        kw.update(incompatible_features=incompat, compatible_features=compat,
                  autoclear_features=autoclear, refcount_order=order,
                  header_length=104 + extra_len, compression_type=compression if extra_len else 0)
    h = make_header(version=version, cluster_bits=cluster_bits, **kw)
    packed = h.pack()
    assert len(h.pack_fields()) == (72 if version == 2 else 104 + extra_len)
    back = Header.parse(packed + bytes(64))
    assert back == h
    assert back.pack() == packed


# ---- Header: real images from qemu-img -------------------------------------------

def qemu_img(*args) -> str:
    return subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True,
                          text=True).stdout


IMAGES = {
    # name: (create options, extra steps)
    "v2-64k": "compat=0.10",
    "v2-512": "compat=0.10,cluster_size=512",
    "v2-2m": "compat=0.10,cluster_size=2M",
    "v3-default": "compat=1.1",
    "v3-512-rc1": "compat=1.1,cluster_size=512,refcount_bits=1",
    "v3-4k-rc2": "compat=1.1,cluster_size=4096,refcount_bits=2",
    "v3-8k-rc4": "compat=1.1,cluster_size=8192,refcount_bits=4",
    "v3-32k-rc8": "compat=1.1,cluster_size=32768,refcount_bits=8",
    "v3-2m-rc64": "compat=1.1,cluster_size=2M,refcount_bits=64",
    "v3-zstd": "compat=1.1,compression_type=zstd",
    "v3-extl2": "compat=1.1,extended_l2=on,cluster_size=16384",
    "v3-extl2-zstd-2m": "compat=1.1,extended_l2=on,compression_type=zstd,cluster_size=2M,refcount_bits=32",
    "v3-lazy": "compat=1.1,lazy_refcounts=on",
    "v3-backing": "compat=1.1,backing_file=base.qcow2,backing_fmt=qcow2",
    "v2-backing-raw": "compat=0.10,backing_file=base.raw,backing_fmt=raw",
    "v3-datafile": "compat=1.1,data_file=ext.raw,data_file_raw=on",
}


@pytest.fixture(scope="module")
def qemu_images(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    d = tmp_path_factory.mktemp("qemu-images")
    qemu_img("create", "-f", "qcow2", d / "base.qcow2", "3M")
    qemu_img("create", "-f", "raw", d / "base.raw", "5M")
    out = {}
    for name, opts in IMAGES.items():
        img = d / f"{name}.qcow2"
        subprocess.run(["qemu-img", "create", "-f", "qcow2", "-o", opts, str(img), "7M"], check=True,
                       capture_output=True, cwd=d)
        out[name] = img
    # Snapshots and bitmaps, for the tables the header points to.
    snap = d / "snap.qcow2"
    qemu_img("create", "-f", "qcow2", snap, "1G")
    qemu_img("snapshot", "-c", "first", snap)
    qemu_img("snapshot", "-c", "zweiter \u00fcberblick", snap)
    out["snap"] = snap
    bm = d / "bitmaps.qcow2"
    qemu_img("create", "-f", "qcow2", bm, "1G")
    qemu_img("bitmap", "--add", "--granularity", "64K", bm, "b0")
    qemu_img("bitmap", "--add", "--granularity", "1M", "--disable", bm, "second-bitmap")
    out["bitmaps"] = bm
    return {k: (p, json.loads(qemu_img("info", "--output=json", p))) for k, p in out.items()}


def read_head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(1 << 21)


@pytest.mark.parametrize("name", list(IMAGES) + ["snap", "bitmaps"])
def test_parse_qemu_image_header_matches_qemu_img_info(qemu_images, name):
    path, info = qemu_images[name]
    head = read_head(path)
    h = Header.parse(head)
    data = info["format-specific"]["data"]
    assert h.cluster_size == info["cluster-size"]
    assert h.size == info["virtual-size"]
    assert h.version == {"0.10": 2, "1.1": 3}[data["compat"]]
    assert h.refcount_bits == data["refcount-bits"]
    assert COMPRESSION_NAMES[h.compression_type] == data["compression-type"]
    assert h.extended_l2 == data.get("extended-l2", False)
    assert bool(h.compatible_features & COMPAT_LAZY_REFCOUNTS) == data.get("lazy-refcounts", False)
    assert bool(h.incompatible_features & INCOMPAT_CORRUPT) == data.get("corrupt", False)
    assert bool(h.incompatible_features & INCOMPAT_DIRTY) == info["dirty-flag"]
    assert h.crypt_method == 0
    if h.version == 3:
        assert h.header_length == 112
    else:
        assert h.header_length == 72
    assert h.backing_file == info.get("backing-filename")
    fmt = h.extension(EXT_BACKING_FORMAT)
    assert (fmt.decode() if fmt is not None else None) == info.get("backing-filename-format")
    df = h.extension(EXT_DATA_FILE)
    assert (df.decode() if df is not None else None) == data.get("data-file")
    assert bool(h.incompatible_features & INCOMPAT_DATA_FILE) == ("data-file" in data)
    assert h.nb_snapshots == len(info.get("snapshots", []))
    # The geometry QEMU chose for the L1 table is the one we compute.
    geo = Geometry.from_header(h)
    assert geo.l1_entries_needed(h.size) == h.l1_size
    assert geo.zero_flag == (h.version == 3)
    assert geo.l2_entries == h.l2_entries
    # Packing the parsed header reproduces QEMU's first bytes exactly.
    packed = h.pack()
    assert head[: len(packed)] == packed


def test_qemu_backing_header_offsets(qemu_images):
    path, _ = qemu_images["v3-backing"]
    head = read_head(path)
    h = Header.parse(head)
    assert h.backing_file == "base.qcow2"
    assert head[h.backing_file_offset : h.backing_file_offset + h.backing_file_size] == b"base.qcow2"
    assert h.extension(EXT_BACKING_FORMAT) == b"qcow2"


def test_qemu_feature_name_table(qemu_images):
    h = Header.parse(read_head(qemu_images["v3-default"][0]))
    names = h.feature_names()
    assert names[(FEATURE_TYPE_INCOMPAT, 0)] == "dirty bit"
    assert names[(FEATURE_TYPE_INCOMPAT, 4)] == "extended L2 entries"
    assert names[(FEATURE_TYPE_COMPAT, 0)] == "lazy refcounts"
    assert names[(FEATURE_TYPE_AUTOCLEAR, 1)] == "raw external data"


def test_qemu_snapshot_table_parses(qemu_images):
    path, info = qemu_images["snap"]
    h = Header.parse(read_head(path))
    with open(path, "rb") as f:
        f.seek(h.snapshots_offset)
        buf = f.read(1 << 16)
    entries = SnapshotEntry.parse_table(buf, h.nb_snapshots)
    assert [(e.id_str, e.name) for e in entries] == [(s["id"], s["name"]) for s in info["snapshots"]]
    for e, s in zip(entries, info["snapshots"]):
        assert e.date_sec == s["date-sec"] and e.date_nsec == s["date-nsec"]
        assert e.state_size == s["vm-state-size"]
        assert e.disk_size == h.size
        assert e.l1_size == h.l1_size
        assert len(e.extra) >= 16
    # Repacking gives QEMU's bytes (QEMU does not pad the last entry).
    last = entries[-1]
    packed = b"".join(e.pack() for e in entries)
    unpadded = len(packed) - len(last.pack()) + 40 + len(last.extra) + len(last.id_str.encode()) \
        + len(last.name.encode())
    assert packed[:unpadded] == buf[:unpadded]
    assert packed[unpadded:] == bytes(len(packed) - unpadded)
    # And the unpadded table alone parses too.
    assert SnapshotEntry.parse_table(buf[:unpadded], 2)[1].name == "zweiter \u00fcberblick"


def test_qemu_bitmap_directory_parses(qemu_images):
    path, info = qemu_images["bitmaps"]
    h = Header.parse(read_head(path))
    assert h.autoclear_features & AUTOCLEAR_BITMAPS
    bext = BitmapsExtension.parse(h.extension(EXT_BITMAPS))
    qbm = info["format-specific"]["data"]["bitmaps"]
    assert bext.nb_bitmaps == len(qbm) == 2
    with open(path, "rb") as f:
        f.seek(bext.directory_offset)
        buf = f.read(bext.directory_size)
    entries = BitmapDirEntry.parse_directory(buf, bext.nb_bitmaps)
    assert sum(len(e.pack()) for e in entries) == bext.directory_size
    by_name = {b["name"]: b for b in qbm}
    assert {e.name for e in entries} == set(by_name)
    for e in entries:
        assert e.granularity == by_name[e.name]["granularity"]
        assert sorted(e.flag_names) == sorted(by_name[e.name]["flags"])
        assert e.type == 1
    assert b"".join(e.pack() for e in entries) == buf


# ---- Header.parse errors ------------------------------------------------------------

def bad(buf) -> None:
    with pytest.raises(InvalidImageError):
        Header.parse(bytes(buf))


def test_parse_sanity_of_raw_builders():
    # The error tests below only mean something if the unmodified buffers parse.
    Header.parse(bytes(raw_v2() + end_marker()))
    Header.parse(bytes(raw_v3() + end_marker()))
    Header.parse(bytes(raw_v3(header_length=104) + end_marker()))


def test_parse_bad_magic():
    bad(raw_v2(magic=b"QFI\xfa") + end_marker())
    bad(raw_v3(magic=b"\0\0\0\0") + end_marker())
    bad(bytes(4096))


@pytest.mark.parametrize("version", [0, 1, 4, 0xFFFFFFFF])
def test_parse_bad_version(version):
    bad(raw_v3(version=version) + end_marker())


@pytest.mark.parametrize("cluster_bits", [0, 8, 22, 31, 63])
def test_parse_cluster_bits_out_of_range(cluster_bits):
    bad(raw_v2(cluster_bits=cluster_bits) + end_marker() + bytes(4096))
    bad(raw_v3(cluster_bits=cluster_bits) + end_marker() + bytes(4096))


@pytest.mark.parametrize("cluster_bits", [9, 21])
def test_parse_cluster_bits_limits_accepted(cluster_bits):
    assert Header.parse(bytes(raw_v3(cluster_bits=cluster_bits) + end_marker())).cluster_bits == cluster_bits


def test_parse_too_short():
    bad(b"")
    bad(QCOW_MAGIC)
    bad(raw_v2()[:71])
    v3 = raw_v3()
    bad(v3[:72])
    bad(v3[:103])
    bad(v3[:104])        # header_length 112 needs the compression type byte


@pytest.mark.parametrize("header_length", [105, 108, 111, 113, 116])
def test_parse_header_length_not_multiple_of_8(header_length):
    buf = raw_v3(header_length=112)
    struct.pack_into(">I", buf, 100, header_length)
    bad(buf + bytes(16))


@pytest.mark.parametrize("header_length", [0, 72, 96])
def test_parse_header_length_too_small(header_length):
    buf = raw_v3(header_length=112)
    struct.pack_into(">I", buf, 100, header_length)
    bad(buf + bytes(16))


def test_parse_header_longer_than_cluster():
    bad(raw_v3(cluster_bits=9, header_length=520) + end_marker())


def test_parse_refcount_order_too_large():
    bad(raw_v3(refcount_order=7) + end_marker())


def test_parse_extension_runs_past_cluster():
    cs = 512
    head = raw_v3(cluster_bits=9)
    # Length points past the cluster even though the buffer goes on.
    buf = head + struct.pack(">II", 0x1234, cs) + bytes(2 * cs)
    bad(buf)
    # Exactly filling the cluster but with no end marker.
    fill = cs - len(head) - 8
    buf = head + struct.pack(">II", 0x1234, fill) + bytes(fill) + struct.pack(">II", 0x99, 0) + bytes(cs)
    bad(buf)
    # A last extension that ends at the cluster end with no room for the end marker.
    buf = head + struct.pack(">II", 0x1234, fill) + bytes(fill)
    bad(buf)
    # The same extension one slot shorter (room for the end marker) parses.
    ok = head + struct.pack(">II", 0x1234, fill - 8) + bytes(fill - 8) + end_marker()
    assert len(ok) == cs
    assert Header.parse(bytes(ok) + bytes(cs)).extension(0x1234) == bytes(fill - 8)


def test_parse_extension_runs_past_short_buffer():
    head = raw_v3()
    bad(head + struct.pack(">II", EXT_FEATURE_TABLE, 96) + bytes(40))
    bad(head)   # no end marker at all


def test_parse_backing_name_outside_cluster():
    buf = raw_v2(cluster_bits=9, bfo=500, bfs=20) + end_marker()
    bad(buf + bytes(1024))
    buf = raw_v2(cluster_bits=16, bfo=80, bfs=1024) + end_marker()
    bad(buf + bytes(4096))
    buf = raw_v2(cluster_bits=16, bfo=80, bfs=10) + end_marker()
    bad(buf)    # the name is past the end of the buffer
    buf = raw_v2(cluster_bits=16, bfo=80, bfs=2) + end_marker() + b"\xff\xfe"
    bad(buf)    # not UTF-8


# ---- feature names --------------------------------------------------------------

def test_feature_names_from_table_override_builtin():
    table = (feature_entry(FEATURE_TYPE_INCOMPAT, 0, b"custom dirty")
             + feature_entry(FEATURE_TYPE_INCOMPAT, 9, b"warp drive")
             + feature_entry(FEATURE_TYPE_COMPAT, 5, b"x" * 46)       # no NUL terminator
             + feature_entry(FEATURE_TYPE_AUTOCLEAR, 63, b"caf\xc3\xa9"))
    h = make_header(extensions=[HeaderExtension(EXT_FEATURE_TABLE, table + b"\x01\x02")])
    h = Header.parse(h.pack())
    names = h.feature_names()
    assert names[(FEATURE_TYPE_INCOMPAT, 0)] == "custom dirty"
    assert names[(FEATURE_TYPE_INCOMPAT, 9)] == "warp drive"
    assert names[(FEATURE_TYPE_COMPAT, 5)] == "x" * 46
    assert names[(FEATURE_TYPE_AUTOCLEAR, 63)] == "caf\u00e9"
    # Built-in names not in the table are kept.
    assert names[(FEATURE_TYPE_INCOMPAT, 4)] == "extended L2 entries"
    assert names[(FEATURE_TYPE_AUTOCLEAR, 1)] == "raw external data"
    # The trailing partial entry is ignored.
    assert len(names) == len(FEATURE_NAMES_BUILTIN) + 3


def test_feature_names_without_table_are_builtin():
    assert make_header().feature_names() == FEATURE_NAMES_BUILTIN
    assert make_header().feature_names() is not FEATURE_NAMES_BUILTIN


# ---- compressed L2 entries --------------------------------------------------------

@st.composite
def compressed_args(draw):
    cb = draw(st.integers(9, 21))
    x = compressed_shift(cb)
    length = draw(st.integers(1, 1 << cb))
    offset = draw(st.integers(0, (1 << x) - 1 - length))
    return cb, offset, length


@settings(max_examples=300, deadline=None)
@given(compressed_args())
def test_compressed_round_trip(args):
    cb, offset, length = args
    entry = encode_compressed(offset, length, cb)
    assert entry & OFLAG_COMPRESSED
    assert not entry & OFLAG_COPIED
    assert 0 <= entry < 1 << 63
    d = decode_compressed(entry, cb)
    assert d.host_offset == offset
    end = offset + length
    dend = d.host_offset + d.length
    assert dend >= end                         # covers the encoded range
    assert dend % 512 == 0                     # ends on a sector boundary ...
    assert (dend - 1) // 512 == (end - 1) // 512   # ... the sector the data ends in
    # The sector count field: sectors touched beyond the first.
    x = compressed_shift(cb)
    assert (entry >> x) & ((1 << (cb - 8)) - 1) == (end - 1) // 512 - offset // 512
    # Flags above bit 61 do not disturb decoding.
    assert decode_compressed(entry | OFLAG_COPIED, cb) == d


def test_compressed_known_values():
    # cluster_bits 16: x = 54; 3 extra sectors at offset 0x12345.
    assert compressed_shift(16) == 54
    assert compressed_shift(9) == 61
    assert compressed_shift(21) == 49
    entry = OFLAG_COMPRESSED | (3 << 54) | 0x12345
    assert decode_compressed(entry, 16) == CompressedDescriptor(0x12345, 4 * 512 - 0x145)
    assert encode_compressed(0x12345, 4 * 512 - 0x145, 16) == entry
    # Aligned, one sector exactly.
    assert encode_compressed(0x10000, 512, 16) == OFLAG_COMPRESSED | 0x10000
    assert encode_compressed(0x10000, 513, 16) == OFLAG_COMPRESSED | (1 << 54) | 0x10000
    # cluster_bits 9 has one bit of sector count.
    assert decode_compressed(OFLAG_COMPRESSED | (1 << 61) | 0x201, 9) == CompressedDescriptor(0x201, 1023)


# ---- refcounts ------------------------------------------------------------------

CS = 512


@st.composite
def refcount_case(draw):
    order = draw(st.integers(0, 6))
    bits = 1 << order
    n = (CS * 8) >> order
    block = bytearray(draw(st.binary(min_size=CS, max_size=CS)))
    index = draw(st.integers(0, n - 1))
    value = draw(st.integers(0, (1 << bits) - 1))
    return order, block, index, value


@settings(max_examples=300, deadline=None)
@given(refcount_case())
def test_refcount_set_then_get(case):
    order, block, index, value = case
    bits = 1 << order
    n = (CS * 8) >> order
    before = bytes(block)
    neighbours = {i: refcount_get(block, i, order) for i in (index - 1, index + 1) if 0 <= i < n}
    refcount_set(block, index, order, value)
    assert len(block) == CS
    assert refcount_get(block, index, order) == value
    for i, v in neighbours.items():
        assert refcount_get(block, i, order) == v
    # Only the bits of this entry changed: compare every bit.
    a = np.unpackbits(np.frombuffer(before, np.uint8), bitorder="little" if order < 3 else "big")
    b = np.unpackbits(np.frombuffer(bytes(block), np.uint8), bitorder="little" if order < 3 else "big")
    changed = np.nonzero(a != b)[0]
    assert all(index * bits <= c < (index + 1) * bits for c in changed)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 6), st.data())
def test_refcount_ranges_match_single_entries(order, data):
    """refcount_values / refcount_store (one numpy pass over a range, what
    allocation uses) agree with refcount_get / refcount_set entry by entry,
    at every width, and change nothing outside the range."""
    bits = 1 << order
    n = (CS * 8) >> order
    block = bytearray(data.draw(st.binary(min_size=CS, max_size=CS)))
    lo = data.draw(st.integers(0, n - 1))
    hi = data.draw(st.integers(lo + 1, n))
    got = refcount_values(block, order, lo, hi)
    assert [int(v) for v in got] == [refcount_get(block, i, order) for i in range(lo, hi)]
    new = data.draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=hi - lo, max_size=hi - lo))
    values = np.array(new, dtype=object if order == 6 else np.int64)
    want = bytearray(block)
    for i, v in enumerate(new):
        refcount_set(want, lo + i, order, v)
    refcount_store(block, order, lo, values)
    assert block == want


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 6), st.data())
def test_refcount_overflow_raises(order, data):
    bits = 1 << order
    n = (CS * 8) >> order
    block = bytearray(data.draw(st.binary(min_size=CS, max_size=CS)))
    index = data.draw(st.integers(0, n - 1))
    value = data.draw(st.integers(1 << bits, 1 << 70) | st.integers(-(1 << 70), -1))
    before = bytes(block)
    with pytest.raises(ValueError):
        refcount_set(block, index, order, value)
    assert bytes(block) == before


def test_refcount_bit_order_known_values():
    b = bytearray(8)
    refcount_set(b, 0, 0, 1)
    assert b[0] == 0x01
    refcount_set(b, 7, 0, 1)
    assert b[0] == 0x81
    refcount_set(b, 9, 0, 1)
    assert b[1] == 0x02
    b = bytearray(8)
    refcount_set(b, 1, 1, 3)
    assert b[0] == 0b00001100
    refcount_set(b, 3, 1, 2)
    assert b[0] == 0b10001100
    b = bytearray(8)
    refcount_set(b, 1, 2, 0xA)
    refcount_set(b, 2, 2, 0x5)
    assert b[:2] == b"\xa0\x05"
    b = bytearray(8)
    refcount_set(b, 1, 4, 0x1234)
    assert b == b"\0\0\x12\x34\0\0\0\0"
    b = bytearray(16)
    refcount_set(b, 1, 6, (1 << 64) - 1)
    assert b == bytes(8) + b"\xff" * 8
    assert refcount_get(b, 1, 6) == (1 << 64) - 1
    b = bytearray(8)
    refcount_set(b, 1, 5, 0x01020304)
    assert b == b"\0\0\0\0\x01\x02\x03\x04"
    assert refcount_get(b"\x00\x80", 15, 0) == 1
    assert refcount_get(b"\x00\x80", 14, 0) == 0


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 6), st.sampled_from([512, 1024, 4096]), st.data())
def test_refcount_array_matches_get(order, cs, data):
    block = data.draw(st.binary(min_size=cs, max_size=cs))
    arr = refcount_array(block, order)
    n = (cs * 8) >> order
    assert len(arr) == n
    got = [int(v) for v in arr]
    assert got == [refcount_get(block, i, order) for i in range(n)]
    # And encoding the array gives the block back.
    assert encode_refcount_block(arr, order, cs) == block


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 6), st.sampled_from([512, 2048]), st.data())
def test_encode_refcount_block_matches_get(order, cs, data):
    bits = 1 << order
    n = (cs * 8) >> order
    values = data.draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=n))
    block = encode_refcount_block(np.array(values, dtype=np.uint64), order, cs)
    assert isinstance(block, bytes) and len(block) == cs
    for i in range(n):
        assert refcount_get(block, i, order) == (values[i] if i < len(values) else 0)
    # The same block built entry by entry with refcount_set.
    ref = bytearray(cs)
    for i, v in enumerate(values):
        refcount_set(ref, i, order, v)
    assert block == bytes(ref)


# ---- snapshots ----------------------------------------------------------------

u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)
utf8 = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)


@st.composite
def snapshots(draw):
    extra_kind = draw(st.sampled_from([0, 16, 24, 16, 24, 32]))
    big = [draw(u64) for _ in range(extra_kind // 8)]
    extra = b"".join(struct.pack(">Q", v) for v in big)
    return SnapshotEntry(draw(u64), draw(u32), draw(utf8), draw(utf8), draw(u32), draw(u32),
                         draw(u64), draw(u32), extra), big


@FAST
@given(st.lists(snapshots(), min_size=1, max_size=5), st.binary(max_size=16))
def test_snapshot_table_round_trip(items, trailing):
    entries = [e for e, _ in items]
    packed = [e.pack() for e in entries]
    for e, p in zip(entries, packed):
        assert len(p) % 8 == 0
        ident, name = e.id_str.encode(), e.name.encode()
        assert len(p) - 40 - len(e.extra) - len(ident) - len(name) in range(8)
        assert struct.unpack_from(">HHI", p, 12)[:2] == (len(ident), len(name))
        assert struct.unpack_from(">I", p, 36)[0] == len(e.extra)
    buf = b"".join(packed) + trailing
    back = SnapshotEntry.parse_table(buf, len(entries))
    assert len(back) == len(entries)
    for b, (e, big) in zip(back, items):
        for f in ("l1_table_offset", "l1_size", "id_str", "name", "date_sec", "date_nsec",
                  "vm_clock_nsec", "vm_state_size", "extra"):
            assert getattr(b, f) == getattr(e, f), f
        assert b.vm_state_size_large == (big[0] if len(big) >= 1 else None)
        assert b.disk_size == (big[1] if len(big) >= 2 else None)
        assert b.icount == (big[2] if len(big) >= 3 else None)
        assert b.state_size == (big[0] if big else e.vm_state_size)
    assert b"".join(b.pack() for b in back) == b"".join(packed)
    # Fewer entries than present parse fine; more than present do not.
    assert len(SnapshotEntry.parse_table(buf, len(entries) - 1)) == len(entries) - 1
    with pytest.raises(InvalidImageError):
        SnapshotEntry.parse_table(b"".join(packed), len(entries) + 1)


def test_snapshot_truncated_entry():
    e = SnapshotEntry(0x10000, 2, "1", "name", 1, 2, 3, 4, bytes(16))
    p = e.pack()
    for cut in (10, 39, 40, 40 + 16 + 4):
        with pytest.raises(InvalidImageError):
            SnapshotEntry.parse_table(p[:cut], 1)
    assert SnapshotEntry.parse_table(p[: 40 + 16 + 5], 1)[0].name == "name"


# ---- bitmaps ------------------------------------------------------------------

@st.composite
def bitmap_entries(draw):
    return BitmapDirEntry(
        draw(u64), draw(u32), draw(u32), draw(st.integers(0, 255)), draw(st.integers(0, 255)),
        draw(st.text(st.characters(exclude_categories=("Cs",)), max_size=40)),
        draw(st.binary(max_size=20)))


@FAST
@given(st.lists(bitmap_entries(), min_size=1, max_size=5))
def test_bitmap_directory_round_trip(entries):
    packed = [e.pack() for e in entries]
    for e, p in zip(entries, packed):
        assert len(p) % 8 == 0
        name = e.name.encode()
        assert len(p) - 24 - len(e.extra) - len(name) in range(8)
        assert struct.unpack_from(">HI", p, 18) == (len(name), len(e.extra))
        assert p[16] == e.type and p[17] == e.granularity_bits
    buf = b"".join(packed)
    back = BitmapDirEntry.parse_directory(buf, len(entries))
    assert back == entries
    with pytest.raises(InvalidImageError):
        BitmapDirEntry.parse_directory(buf, len(entries) + 1)
    with pytest.raises(InvalidImageError):
        BitmapDirEntry.parse_directory(buf[: len(buf) - len(packed[-1]) + 24 + len(entries[-1].extra)
                                           + len(entries[-1].name.encode()) - 1], len(entries))


def test_bitmap_entry_properties():
    e = BitmapDirEntry(0x30000, 4, BME_IN_USE | BME_EXTRA_DATA_COMPATIBLE, 1, 16, "b")
    assert e.granularity == 65536
    assert e.flag_names == ["in-use", "extra-data-compatible"]
    assert BitmapDirEntry(0, 0, BME_AUTO, 1, 9, "x").flag_names == ["auto"]
    assert BitmapDirEntry(0, 0, 0, 1, 9, "x").flag_names == []


@FAST
@given(u32, u64, u64, st.binary(max_size=16))
def test_bitmaps_extension_round_trip(nb, size, offset, tail):
    ext_ = BitmapsExtension(nb, size, offset)
    p = ext_.pack()
    assert len(p) == 24
    assert struct.unpack(">IIQQ", p) == (nb, 0, size, offset)
    assert BitmapsExtension.parse(p + tail) == ext_


def test_bitmaps_extension_errors():
    with pytest.raises(InvalidImageError):
        BitmapsExtension.parse(bytes(23))
    with pytest.raises(InvalidImageError):
        BitmapsExtension.parse(struct.pack(">IIQQ", 1, 1, 8, 0x10000))


# ---- geometry -----------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.integers(9, 21), st.booleans(), st.integers(0, 6), st.integers(0, 1 << 62))
def test_geometry_derived_values(cb, ext_l2, order, vsize):
    g = Geometry(cb, ext_l2, True, COMPRESSION_ZLIB, order)
    cs = 1 << cb
    assert g.cluster_size == cs
    assert g.l2_entry_size == (16 if ext_l2 else 8)
    assert g.l2_entries == cs // g.l2_entry_size
    assert g.l2_span == g.l2_entries * cs
    assert g.subcluster_size == (cs // 32 if ext_l2 else cs)
    assert g.refcounts_per_block * (1 << order) == cs * 8
    n = g.l1_entries_needed(vsize)
    assert n * g.l2_span >= vsize
    assert n == 0 or (n - 1) * g.l2_span < vsize


def test_geometry_known_values():
    g = Geometry(16, False, True, COMPRESSION_ZLIB, 4)
    assert (g.l2_entries, g.l2_span, g.subcluster_size, g.refcounts_per_block) == (8192, 512 << 20, 65536, 32768)
    assert [g.l1_entries_needed(v) for v in (0, 1, 512 << 20, (512 << 20) + 1)] == [0, 1, 1, 2]
    x = Geometry(16, True, True, COMPRESSION_ZSTD, 0)
    assert (x.l2_entries, x.l2_span, x.subcluster_size, x.refcounts_per_block) == (4096, 256 << 20, 2048, 524288)
    s = Geometry(9, False, False, COMPRESSION_ZLIB, 6)
    assert (s.l2_entries, s.l2_span, s.subcluster_size, s.refcounts_per_block) == (64, 32768, 512, 64)


def test_geometry_from_header():
    h = make_header(cluster_bits=14, incompatible_features=INCOMPAT_EXTL2, refcount_order=2,
                    compression_type=COMPRESSION_ZSTD)
    assert Geometry.from_header(h) == Geometry(14, True, True, COMPRESSION_ZSTD, 2)
    h2 = make_header(version=2, cluster_bits=12)
    assert Geometry.from_header(h2) == Geometry(12, False, False, COMPRESSION_ZLIB, 4)


# ---- the one classifier of L2 entries ------------------------------------------

_ENTRY_BITS = st.sampled_from([0, OFLAG_COPIED, OFLAG_COMPRESSED, OFLAG_ZERO, OFLAG_COPIED | OFLAG_ZERO])


@given(st.lists(st.tuples(_ENTRY_BITS, st.sampled_from([0, 0x200, 0x10000, 0x123400, 0xFFFFFFFFFE00])),
                min_size=1, max_size=64), st.booleans())
def test_numpy_cluster_types_match_the_scalar_classifier(entries, external):
    """The vectorised path of the mapper classifies exactly as cluster_type does."""
    raw = [flags | off for flags, off in entries]
    got = cluster_types(np.array(raw, np.uint64), external).tolist()
    assert got == [int(cluster_type(e, False, external)) for e in raw]


@given(st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 64) - 1), st.integers(0, 31), st.booleans())
def test_subcluster_types_follow_qemu(entry, bitmap, sc, external):
    """QEMU's qcow2_get_subcluster_type for extended entries, restated."""
    t = subcluster_type(entry, bitmap, sc, True, external)
    alloc, zero = bitmap & 0xFFFFFFFF, bitmap >> 32
    if entry & OFLAG_COMPRESSED:
        assert t == SubclusterType.COMPRESSED
    elif cluster_type(entry, True, external) == SubclusterType.NORMAL:
        if alloc & zero:
            assert t == SubclusterType.INVALID
        elif zero >> sc & 1:
            assert t == SubclusterType.ZERO_ALLOC
        else:
            assert t == (SubclusterType.NORMAL if alloc >> sc & 1 else SubclusterType.UNALLOCATED_ALLOC)
    elif alloc:
        assert t == SubclusterType.INVALID
    else:
        assert t == (SubclusterType.ZERO_PLAIN if zero >> sc & 1 else SubclusterType.UNALLOCATED_PLAIN)
    assert (extended_problem(entry, bitmap, external) is not None) == (
        any(subcluster_type(entry, bitmap, s, True, external) == SubclusterType.INVALID for s in range(32)))


@pytest.mark.parametrize("ctype", [0, 1])  # COMPRESSION_ZLIB, COMPRESSION_ZSTD
def test_clusters_inflated_together_come_back_in_order_and_fail_as_one(ctype: int) -> None:
    """decompress_clusters splits the clusters between threads: the result
    is decompress_cluster of each, in order, whatever the count; a cluster
    that does not decode fails the whole call with CorruptionError."""
    from qcowfs.errors import CorruptionError
    from qcowfs.format.compression import compress_cluster, decompress_cluster, decompress_clusters

    cs = 4096
    clusters = [bytes([i]) * (cs // 2) + bytes(range(256)) * (cs // 512) for i in range(37)]
    raws = [compress_cluster(c, ctype) for c in clusters]
    assert all(r is not None for r in raws)
    for n in (1, 2, 3, 16, 37):
        assert decompress_clusters(raws[:n], cs, ctype) == clusters[:n]  # type: ignore[arg-type]
    assert decompress_cluster(raws[5], cs, ctype) == clusters[5]  # type: ignore[arg-type]
    with pytest.raises(CorruptionError):
        decompress_clusters(raws[:20] + [b"\xff" * 100] + raws[20:], cs, ctype)  # type: ignore[operator]


@pytest.mark.parametrize("ctype", [COMPRESSION_ZLIB, COMPRESSION_ZSTD])
def test_a_cluster_that_does_not_decode_is_corruption(ctype: int) -> None:
    """Garbage where a compressed cluster should be is a CorruptionError (EIO
    for the reader), for zstd too although its module is imported only at the
    first zstd cluster (format/compression.py); a good cluster round-trips."""
    data = bytes(range(256)) * 256
    packed = compress_cluster(data, ctype)
    assert packed is not None and decompress_cluster(packed, len(data), ctype) == data
    with pytest.raises(CorruptionError, match="does not decode"):
        decompress_cluster(b"\xff" * 512, len(data), ctype)
