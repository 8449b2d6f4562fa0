"""extents.dirty against the obvious bit-by-bit reading, on random and edge-case bitmaps."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from qcowfs.engine.extents import dirty


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
@given(st.integers(1, 3000), st.sampled_from((512, 4096, 65536)), st.data())
def test_dirty_extents(nsectors: int, g: int, data: st.DataObject) -> None:
    size = nsectors * 512
    nbits = -(-size // g)
    fill = data.draw(st.sampled_from(("random", "zeros", "ones", "sparse")))
    n = -(-nbits // 8)
    if fill == "random":
        bits = data.draw(st.binary(min_size=n, max_size=n))
    elif fill == "sparse":
        b = bytearray(n)
        for i in data.draw(st.lists(st.integers(0, nbits - 1), max_size=5)):
            b[i // 8] |= 1 << (i % 8)
        bits = bytes(b)
    else:
        bits = (b"\xff" if fill == "ones" else b"\0") * n
    # bits past the end of the disk never count
    assert dirty(bits, g, size) == naive(bits, g, size)
