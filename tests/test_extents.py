"""extents.dirty (and its set_runs) against the obvious bit-by-bit reading, on random and edge-case bitmaps."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

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
    """A bitmap longer than the 4 MiB the walk takes at a time (a 512-byte
    granularity over 16 GiB): a run across the boundary is one run."""
    from qcowfs.engine.blocks import MAX_BUFFER

    bits = bytearray(MAX_BUFFER + 8192)
    bits[MAX_BUFFER - 2 : MAX_BUFFER + 1] = b"\xf0\xff\x07"   # bits 4..19 of those three bytes
    bits[-1] = 0x80
    lo = (MAX_BUFFER - 2) * 8 + 4
    nbits = len(bits) * 8
    assert set_runs(bytes(bits), nbits) == [(lo, lo + 15), (nbits - 1, nbits)]
    assert set_runs(bytes(bits), nbits - 1) == [(lo, lo + 15)]
