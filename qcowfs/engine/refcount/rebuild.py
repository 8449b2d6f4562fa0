"""Rebuild: a whole new refcount structure computed from the references
(a dirty image with lazy refcounts, `qcowfs check --repair`)."""
from __future__ import annotations

from typing import Callable

import numpy as np

from ...errors import QcowError
from ...format.bulk import encode_refcount_block
from ..metadata import Metadata
from ..overlap import Kind
from ..references import count_references
from .copied import fix_copied


def check_width(meta: Metadata, order: int) -> None:
    """Refuse refcounts of 2^ORDER bits where a cluster has more references
    than they can count, before anything is written (an amend checks all it
    will do first: it would have upgraded the image by the time rebuild
    refused)."""
    counted = count_references(meta, lambda _msg: None, refcount_structure=False)
    _refuse_too_many(counted.counts, order, meta.geo.cluster_size)


def _refuse_too_many(counts: np.ndarray, order: int, cs: int) -> None:
    if counts.max(initial=0) > (1 << (1 << order)) - 1:
        worst = int(np.argmax(counts))
        raise QcowError(f"a cluster has more references than {1 << order}-bit refcounts can count (cluster "
                        f"{worst * cs:#x}: {int(counts[worst])})")


async def rebuild(meta: Metadata, external: bool, progress: Callable[[float], None] | None = None,
                  saturate: bool = False, order: int | None = None) -> None:
    """Replace the refcount structure by one computed from the references,
    then make every COPIED flag exact. Crash-safe: the new blocks and table
    go where nothing lives (free clusters, else after the end of the file)
    and the header switches to them only once they are on disk; until then
    the old structure stands as it was.
    (Inconsistent references are counted as they are; `qcowfs check` reports them.
    A cluster referenced more often than the refcount width counts refuses
    the rebuild, unless SATURATE (a repair: its count stays at the most the
    width holds, as QEMU's check leaves it, and check reports it).)"""
    counted = count_references(meta, lambda _msg: None, refcount_structure=False, progress=progress)
    counts = counted.counts
    geo, cs = meta.geo, meta.geo.cluster_size
    order = geo.refcount_order if order is None else order
    rpb, per_cluster = cs * 8 >> order, cs // 8
    most = (1 << (1 << order)) - 1
    if counts.max(initial=0) > most:
        if not saturate:
            _refuse_too_many(counts, order, cs)
        counts = np.minimum(counts, most)
    # Where a damaged refcount table names blocks (or itself lies) past the end
    # of the file there is nothing to keep: the new structure may go there
    # (QEMU's rebuild writes there too). What other damaged tables name past
    # the end stays out of its way (_place_after_end).
    meta.forget_past_end(Kind.REFCOUNT_TABLE | Kind.REFCOUNT_BLOCK)
    placed = _place_in_free_space(meta, counts, rpb) or _place_after_end(meta, counts, rpb)
    full, ranges, block_at, table_at, tclusters = placed
    table = np.zeros(tclusters * per_cluster, np.uint64)
    for r, at in zip(ranges, block_at):
        meta.write(at, encode_refcount_block(full[r * rpb : (r + 1) * rpb], order, cs),
                   "new refcount block")
        table[r] = at
    meta.write(table_at, table.astype(">u8").tobytes(), "new refcount table")
    await meta.file.sync()
    await meta.update(refcount_table_offset=table_at, refcount_table_clusters=tclusters, refcount_order=order)
    meta.replace_structures(Kind.REFCOUNT_TABLE, [(table_at, tclusters * cs)])
    meta.replace_structures(Kind.REFCOUNT_BLOCK, [(int(o), cs) for o in table[table != 0].tolist()])
    await fix_copied(meta, full, counted.active_tables, external)


# (refcounts, covered ranges, block offsets, table offset, table clusters)
Placement = tuple[np.ndarray, list[int], list[int], int, int]


def _layout(counts: np.ndarray, rpb: int, per_cluster: int, own: list[int]) -> tuple[np.ndarray, list[int], int]:
    """Refcounts with the new structure's own clusters OWN counted, the
    ranges that then need a block, and the table size in clusters."""
    full = np.zeros(max(len(counts), max(own, default=0) + 1), np.int64)
    full[: len(counts)] = counts
    full[own] = 1
    ranges = sorted(set((np.flatnonzero(full) // rpb).tolist()))
    covered = ranges[-1] * rpb + rpb  # past the last range everything is 0
    full = np.concatenate([full[:covered], np.zeros(max(0, covered - len(full)), np.int64)])
    return full, ranges, -(-(ranges[-1] + 1) // per_cluster)


def _place_in_free_space(meta: Metadata, counts: np.ndarray, rpb: int) -> Placement | None:
    """Put the new structure in clusters nothing references and the old
    refcount structure does not use (it must stay valid until the header
    switches), as QEMU's repair does: the file does not grow. None if the
    free space is too small or too scattered."""
    cs = meta.geo.cluster_size
    per_cluster = cs // 8
    nfile = -(-meta.file.known_size // cs)
    busy = np.zeros(nfile, bool)
    busy[0] = True
    busy[: min(nfile, len(counts))] |= counts[:nfile] > 0
    # Every cluster a live structure touches: the old refcount table and blocks
    # (the header switches away from them last), and what no reference counts:
    # an L2 table at an offset inside a cluster (L1 entry damaged) spans the
    # next one too, and the overlap check would refuse a block there.
    taken = [c for c in meta.overlap.clusters() if c < nfile]
    busy[taken] = True
    free = np.flatnonzero(~busy)
    nblocks, tclusters = len(set((np.flatnonzero(counts) // rpb).tolist())), 1
    for _ in range(8):
        table_c = _first_run(~busy, tclusters)
        if table_c < 0:
            return None
        blocks = [int(c) for c in free if not table_c <= c < table_c + tclusters][:nblocks]
        if len(blocks) < nblocks:
            return None
        own = blocks + list(range(table_c, table_c + tclusters))
        full, ranges, t = _layout(counts, rpb, per_cluster, own)
        if (len(ranges), t) == (nblocks, tclusters):
            return full, ranges, [c * cs for c in blocks], table_c * cs, tclusters
        nblocks, tclusters = len(ranges), t
    return None


def _first_run(free: np.ndarray, n: int) -> int:
    """Start of the first run of N True values, or -1."""
    edges = np.diff(np.concatenate(([0], free.astype(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    fits = np.flatnonzero(ends - starts >= n)
    return int(starts[fits[0]]) if len(fits) else -1


def _place_after_end(meta: Metadata, counts: np.ndarray, rpb: int) -> Placement:
    """The new blocks and table right after everything else, counting themselves."""
    cs = meta.geo.cluster_size
    per_cluster = cs // 8
    area = max(len(counts), -(-meta.file.known_size // cs))
    nblocks, tclusters = len(set((np.flatnonzero(counts) // rpb).tolist())) + 1, 1
    while True:
        at = _clear_run(meta, area, nblocks + tclusters)
        own = list(range(at, at + nblocks + tclusters))
        full, ranges, t = _layout(counts, rpb, per_cluster, own)
        if (len(ranges), t) == (nblocks, tclusters):
            return full, ranges, [(at + j) * cs for j in range(nblocks)], (at + nblocks) * cs, tclusters
        nblocks, tclusters = len(ranges), t


# How far past the end of the file a rebuild goes to keep clear of what damaged
# tables place there (clusters): beyond it the repair is refused, not the
# refcounts of a huge sparse file counted.
MAX_SKIP_PAST_END = 1 << 16


def _clear_run(meta: Metadata, area: int, n: int) -> int:
    """The first cluster from AREA (the end of the file) that starts N clusters
    on which no damaged table places a structure (an L2 table, a bitmap table
    past the end of the file: writing there would give them content)."""
    cs, at = meta.geo.cluster_size, area
    while (end := meta.overlap.far_end(at * cs, n * cs)) is not None:
        at = -(-end // cs)
        if at - area > MAX_SKIP_PAST_END:
            raise QcowError("damaged tables place structures past the end of the file where a new "
                            "refcount structure would go: cannot repair")
    return at
