"""extents.dirty (and its set_runs) against the obvious bit-by-bit reading, on random and
edge-case bitmaps; extents.allocation against qemu-img map on fragmented backing chains."""
from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qcowfs
from qcowfs.engine import extents
from qcowfs.engine.blocks import zero_word_runs
from qcowfs.engine.extents import dirty, set_runs


def naive(bits: bytes, g: int, size: int) -> list[dict[str, object]]:
    nbits = -(-size // g)
    out: list[dict[str, object]] = []
    for i in range(nbits):
        d = bool(bits[i // 8] >> (i % 8) & 1)
        lo, hi = i * g, min(size, (i + 1) * g)
        if out and out[-1]["type"] == int(d):
            out[-1]["length"] = hi - int(out[-1]["offset"])  # type: ignore[call-overload]
        else:
            out.append({"offset": lo, "length": hi - lo, "type": int(d),
                        "description": "dirty" if d else "clean"})
    return out


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 40000), st.sampled_from((512, 4096, 65536)), st.data())
def test_dirty_extents(nsectors: int, g: int, data: st.DataObject) -> None:
    """Bitmaps of up to 5000 bytes (the walk takes 256 bytes at a time: runs
    cross those pieces), random, empty, full, a few bits, alternating bits,
    long runs; bits of the last byte past the disk, and bytes after it."""
    size = nsectors * 512
    nbits = -(-size // g)
    fill = data.draw(st.sampled_from(("random", "zeros", "ones", "sparse", "alternating", "runs")))
    n = -(-nbits // 8)
    if fill == "random":
        bits = data.draw(st.binary(min_size=n, max_size=n))
    elif fill in ("sparse", "runs"):
        b = bytearray(n)
        for i in data.draw(st.lists(st.integers(0, nbits - 1), max_size=5)):
            for k in range(i, min(nbits, i + (data.draw(st.integers(1, 3000)) if fill == "runs" else 1))):
                b[k // 8] |= 1 << (k % 8)
        bits = bytes(b)
    elif fill == "alternating":
        bits = data.draw(st.sampled_from((b"\x55", b"\xaa", b"\x0f"))) * n
    else:
        bits = (b"\xff" if fill == "ones" else b"\0") * n
    bits += data.draw(st.sampled_from((b"", b"\xff" * 8)))
    # bits past the end of the disk never count
    assert dirty(bits, g, size) == naive(bits, g, size)
    assert all(0 <= lo < hi <= nbits for lo, hi in set_runs(bits, nbits))


def test_set_runs_across_the_pieces_of_a_large_bitmap() -> None:
    """A bitmap longer than the MAX_BUFFER bytes the walk takes at a time (a
    512-byte granularity over 8 GiB and more): a run across the boundary is one run."""
    from qcowfs.engine.blocks import MAX_BUFFER

    bits = bytearray(MAX_BUFFER + 8192)
    bits[MAX_BUFFER - 2 : MAX_BUFFER + 1] = b"\xf0\xff\x07"   # bits 4..19 of those three bytes
    bits[-1] = 0x80
    lo = (MAX_BUFFER - 2) * 8 + 4
    nbits = len(bits) * 8
    assert set_runs(bytes(bits), nbits) == [(lo, lo + 15), (nbits - 1, nbits)]
    assert set_runs(bytes(bits), nbits - 1) == [(lo, lo + 15)]


@given(st.sampled_from((8, 16)), st.lists(st.sampled_from((0, 0, 0, 1, 1 << 9, 1 << 63, 0x8000_0000_0005_0000)), max_size=300))
def test_zero_word_runs_are_the_zero_entries(unit: int, values: list[int]) -> None:
    """blocks.zero_word_runs over table entries (the zero bytes of allocated
    entries next to each other never make a zero entry) against a test per entry."""
    buf = b"".join(v.to_bytes(8, "little") for v in values)
    n = len(buf) // unit
    naive = [i for i in range(n) if not any(buf[i * unit : (i + 1) * unit])]
    assert [i for a, b in zero_word_runs(buf, unit) for i in range(a, b)] == naive


# ---- qemu-img map of a fragmented backing chain ------------------------------------

KiB, MiB = 1024, 1024 * 1024


def _qemu_map(image: Path) -> list[dict[str, object]]:
    out = subprocess.run(["qemu-img", "map", "--output=json", str(image)], capture_output=True,
                         text=True, check=True, cwd=image.parent).stdout
    return json.loads(out)


@st.composite
def _layer_ops(draw: st.DrawFn, size: int, cluster_size: int, compressed: bool) -> list[str]:
    """qemu-io commands scattering compressed clusters, then small writes, zero
    writes and discards over a disk of SIZE (a fragmented layer). (QEMU writes
    compressed clusters only where nothing is allocated yet: they come first,
    and only if COMPRESSED: not in a preallocated image.)"""
    cmds = []
    for k in sorted(draw(st.sets(st.integers(0, size // cluster_size - 1), max_size=6 if compressed else 0))):
        cmds += ["-c", f"write -c -P {k % 250 + 1} {k * cluster_size} {cluster_size}"]
    for i in range(draw(st.integers(0, 40))):
        n = draw(st.integers(1, 3)) * (cluster_size if draw(st.booleans()) else 512)
        off = draw(st.integers(0, max(0, size - n) // 512)) * 512
        n = min(n, size - off)
        kind = draw(st.sampled_from(("write", "write", "zero", "discard")))
        if kind == "zero":
            cmds += ["-c", f"write -z{' -u' if draw(st.booleans()) else ''} {off} {n}"]
        elif kind == "discard":
            cmds += ["-c", f"discard {off} {n}"]
        else:
            cmds += ["-c", f"write -P {i % 250 + 1} {off} {n}"]
    return cmds


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_map_of_a_fragmented_chain_matches_qemu(tmp_path: Path, data: st.DataObject) -> None:
    """`Image.map` of the top of a chain of up to five layers, each scattered
    with writes, zero writes (plain and allocated), discards and compressed
    clusters, of its own cluster size (extended L2 too), its own disk size
    (a backing file shorter or longer than its overlay), some preallocated
    (metadata), maybe over a sparse raw base: entry for entry what `qemu-img
    map` says. With and without the numpy pass over long spans of an L2 table."""
    d = Path(tempfile.mkdtemp(dir=tmp_path))
    depth = data.draw(st.integers(1, 4), label="overlays")
    below: Path | None = None
    if data.draw(st.booleans(), label="raw base"):
        below = d / "base.raw"
        with open(below, "wb") as f:
            size = data.draw(st.integers(1, 32), label="raw size") * 256 * KiB
            f.truncate(size)
            for _ in range(data.draw(st.integers(0, 12))):
                off = data.draw(st.integers(0, size // 4096 - 1)) * 4096
                f.seek(off)
                f.write(b"\x5a" * min(size - off, data.draw(st.integers(1, 40)) * 4096))
    for i in range(depth + (below is None)):
        cs = data.draw(st.sampled_from((512, 4 * KiB, 16 * KiB, 64 * KiB)), label="cluster size")
        extl2 = cs >= 16 * KiB and data.draw(st.booleans(), label="extended_l2")
        size = data.draw(st.integers(1, 32), label="size") * 256 * KiB
        image = d / f"l{i}.qcow2"
        opts = f"cluster_size={cs},extended_l2={'on' if extl2 else 'off'}"
        # (QEMU preallocates over a backing file only with extended L2)
        prealloc = (below is None or extl2) and data.draw(st.integers(0, 4), label="preallocated") == 0
        if prealloc:
            opts += ",preallocation=metadata"  # (data runs then ask the host file: holes map as zeros)
        cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(image), str(size)]
        if below is not None:
            cmd[-2:-2] = ["-b", below.name, "-F", "raw" if below.suffix == ".raw" else "qcow2"]
        subprocess.run(cmd, check=True, cwd=d)
        ops = data.draw(_layer_ops(size, cs, not prealloc), label=f"ops of l{i}")
        if ops:
            subprocess.run(["qemu-io", "-f", "qcow2", str(image), *ops], check=True, cwd=d,
                           stdout=subprocess.DEVNULL)
        below = image
    assert below is not None
    bulk = data.draw(st.booleans(), label="numpy pass")
    saved = extents.MAP_PYTHON_CLUSTERS, extents.NUMPY_THRESHOLD
    if bulk:
        extents.MAP_PYTHON_CLUSTERS, extents.NUMPY_THRESHOLD = 0, 0
    try:
        with qcowfs.open(below) as image:
            ours = image.map()
    finally:
        extents.MAP_PYTHON_CLUSTERS, extents.NUMPY_THRESHOLD = saved
    assert ours == _qemu_map(below)
