"""Tables as the engine holds them (format.entries.Table: array.array of
native words), and the two ways their entries are classified: one by one in
Python (reads, the map of a small disk) and in numpy passes (long spans,
bulk work). Both must give the same runs, entry for entry."""
from __future__ import annotations

import struct
import subprocess
from typing import Iterator

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcowfs.engine import extents
from qcowfs.engine.image import Image, OpenOptions
from qcowfs.format import OFLAG_COPIED, OFLAG_ZERO, Table, decode_table, encode_compressed, encode_table

CS = 65536
FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@given(st.lists(st.integers(0, (1 << 64) - 1), max_size=64))
def test_table_round_trip(words: list[int]) -> None:
    """decode_table reads big-endian words as they are stored; encode_table
    gives back the same bytes and leaves the table as it was."""
    raw = struct.pack(f">{len(words)}Q", *words)
    table = decode_table(raw)
    assert list(table) == words
    assert encode_table(table) == raw
    assert list(table) == words


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Image]:
    """An image whose Mapper classifies the synthetic tables (v3, 64 KiB clusters)."""
    path = tmp_path_factory.mktemp("tables") / "img.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1G"], check=True)
    img = Image(str(path), OpenOptions(read_only=True))
    yield img
    trio.run(img.close)


# Entries, each drawn as what follows the previous one: unallocated, data
# continuing the previous data cluster, data elsewhere, zero (plain or with a
# cluster), compressed.
KINDS = st.sampled_from(["unalloc", "next", "jump", "zero", "zero-alloc", "compressed"])


def _table(kinds: list[str], jumps: list[int]) -> Table:
    words, host = [], 16 * CS
    for i, kind in enumerate(kinds):
        jump = (jumps[i % len(jumps)] + 1) * CS
        if kind == "unalloc":
            words.append(0)
        elif kind == "next":
            host += CS
            words.append(host | OFLAG_COPIED)
        elif kind == "jump":
            host += jump
            words.append(host | OFLAG_COPIED)
        elif kind == "zero":
            words.append(OFLAG_ZERO)
        elif kind == "zero-alloc":
            words.append(jump | OFLAG_ZERO)
        else:
            words.append(encode_compressed(host + 4096 + i * 100, 3000, 16))
    return decode_table(struct.pack(f">{len(words)}Q", *words))


@FAST
@given(st.lists(KINDS, min_size=1, max_size=300), st.lists(st.integers(0, 3), min_size=1, max_size=8),
       st.integers(0, CS - 1), st.integers(1, CS))
def test_python_and_numpy_map_alike(image: Image, kinds: list[str], jumps: list[int], head: int, tail: int) -> None:
    """Mapper._map_table_entries and _map_table_numpy: the same runs for any
    span of standard entries (unaligned ends included), and so do the map's
    _pieces in Python and in numpy."""
    table = _table(kinds, jumps)
    base, first, last = 5 * (CS << 13), 0, len(kinds) - 1
    start, end = base + head, base + (last << 16) + tail
    if end <= start:
        return
    by_entry: list[tuple[int, int, int, int]] = []
    by_numpy: list[tuple[int, int, int, int]] = []
    image.mapper._map_table_entries(table, base, first, last, start, end, by_entry)
    image.mapper._map_table_numpy(table, base, first, last, start, end, by_numpy)
    assert by_entry == by_numpy
    assert sum(r[2] for r in by_entry) == end - start
    assert (extents._pieces(image.mapper, table, base, first, last, bulk=False)
            == extents._pieces_numpy(image.mapper, table, base, first, last))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 40), max_size=60))
def test_unique_inverse_is_np_unique(values: list[int]) -> None:
    """format.bulk.unique_inverse (numpy 2's np.unique imports numpy.ma) gives
    what np.unique(..., return_inverse=True) gives."""
    import numpy as np

    from qcowfs.format.bulk import unique_inverse

    a = np.array(values, np.int64)
    want_values, want_inverse = np.unique(a, return_inverse=True)
    got_values, got_inverse = unique_inverse(a)
    assert got_values.tolist() == want_values.tolist()
    assert got_inverse.tolist() == want_inverse.tolist()


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 6), st.integers(9, 13), st.data())
def test_refcount_block_of_ones_is_the_bulk_encoding(order: int, cluster_bits: int, data: st.DataObject) -> None:
    """entries.refcount_block_of_ones (what create writes without numpy) is
    format.bulk.encode_refcount_block of COUNT ones, for every refcount width."""
    import numpy as np

    from qcowfs.format import refcount_block_of_ones
    from qcowfs.format.bulk import encode_refcount_block

    cs = 1 << cluster_bits
    count = data.draw(st.integers(0, (cs * 8) >> order))
    assert refcount_block_of_ones(count, order, cs) == encode_refcount_block(np.ones(count, np.uint64), order, cs)
