"""COPIED flags: found wrong (check) and made exact (rebuild, repair).

The spec trusts OFLAG_COPIED only in the active tables: it is set exactly
when the refcount of the cluster the entry points to is 1. A cluster of an
external data file has no refcount: it counts as 1 (QEMU's
check_oflag_copied), so every entry that maps one must have the flag."""
from __future__ import annotations

import numpy as np

from ...format import L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED
from ..metadata import Metadata
from ..overlap import Kind
from ..references import BATCH_BYTES, read_entries


def stored_refcount(stored: np.ndarray, offset: int, cluster_size: int) -> int:
    """The refcount STORED gives the cluster at OFFSET (0 past its end)."""
    c = offset // cluster_size
    return int(stored[c]) if c < len(stored) else 0


def copied_errors(meta: Metadata, stored: np.ndarray, active_tables: dict[int, np.ndarray],
                  external: bool) -> tuple[list[int], dict[int, list[int]]]:
    """Active L1 indexes and L2 entry indexes whose COPIED flag disagrees with
    the refcounts STORED (COPIED is set iff the refcount is exactly 1)."""
    h, geo = meta.header, meta.geo
    cs = geo.cluster_size
    bad_l1: list[int] = []
    bad_l2: dict[int, list[int]] = {}
    if not h.l1_size:
        return bad_l1, bad_l2

    # References past the end of the file are errors of their own (counted
    # once, as qemu-img does), not COPIED errors too.
    end = meta.file.known_size
    l1 = read_entries(meta.file, h.l1_table_offset, h.l1_size)
    bad_l1 = np.flatnonzero(_copied_wrong(l1, l1 & np.uint64(L1E_OFFSET_MASK), stored, cs, end)).tolist()
    step = 2 if geo.extended_l2 else 1
    offsets = list(active_tables)
    # The tables in slices of 256 KiB (references.BATCH_BYTES says why).
    per_slice = max(1, BATCH_BYTES // cs)
    for first in range(0, len(offsets), per_slice):
        part = offsets[first : first + per_slice]
        e = np.concatenate([active_tables[off][::step] for off in part])
        width = len(e) // len(part)  # (entries a table)
        at = np.flatnonzero(e)  # (an entry of 0 is never wrong)
        if len(at) < len(e):
            e = e[at]
        comp = (e & np.uint64(OFLAG_COMPRESSED)) != 0
        copied = (e & np.uint64(OFLAG_COPIED)) != 0
        if external:
            # (an entry of offset 0 without the flag maps nothing: unallocated)
            mapped = (e & np.uint64(L2E_OFFSET_MASK)) != 0
            wrong = at[mapped & ~copied & ~comp]
        else:
            host = e & np.uint64(L2E_OFFSET_MASK)
            host[comp] = 0
            wrong = at[_copied_wrong(e, host, stored, cs, end) | (comp & copied)]
        for row, k in zip((wrong // width).tolist(), (wrong % width).tolist()):
            bad_l2.setdefault(part[row], []).append(k)
    return bad_l1, bad_l2


def _copied_wrong(entries: np.ndarray, host: np.ndarray, stored: np.ndarray, cs: int,
                  end: int) -> np.ndarray:
    """Where an entry pointing to HOST (0: to nothing it counts) has a COPIED
    flag that disagrees with the refcount STORED gives HOST (a refcount past
    the end of STORED is 0; a HOST past END is no COPIED error)."""
    # (host offsets are below 2**56: the cluster numbers view as int64; take
    # with clip, then the mask, is one gather where np.where twice was 15x slower)
    c = (host >> np.uint64(cs.bit_length() - 1)).view(np.int64)
    one = (stored.take(c, mode="clip") == 1) & (c < len(stored))
    copied = (entries & np.uint64(OFLAG_COPIED)) != 0
    return (host != 0) & (host < np.uint64(end)) & (one != copied)


async def fix_copied(meta: Metadata, stored: np.ndarray, active_tables: dict[int, np.ndarray],
                     external: bool) -> None:
    """Make every COPIED flag of the active tables agree with STORED."""
    bad_l1, bad_l2 = copied_errors(meta, stored, active_tables, external)
    geo = meta.geo
    step = 2 if geo.extended_l2 else 1
    for off, ks in bad_l2.items():
        table = active_tables[off].copy()
        for k in ks:
            e = int(table[k * step])
            host = e & L2E_OFFSET_MASK
            want = not e & OFLAG_COMPRESSED and (external or stored[host // geo.cluster_size] == 1)
            table[k * step] = (e | OFLAG_COPIED) if want else (e & ~OFLAG_COPIED)
        # (A snapshot may share the table, rightly or through damage: its
        # flags follow the same refcounts.)
        meta.write(off, table.astype(">u8").tobytes(), "L2 table", ignore=Kind.ACTIVE_L2 | Kind.INACTIVE_L2)
    if bad_l2:
        await meta.file.sync()
    l1 = meta.active_l1
    for i in bad_l1:
        e = await l1.get(i)
        c = (e & L1E_OFFSET_MASK) // geo.cluster_size
        await l1.set(i, (e | OFLAG_COPIED) if stored[c] == 1 else (e & ~OFLAG_COPIED))
    if bad_l1:
        await meta.file.sync()
