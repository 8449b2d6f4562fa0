"""A new qcow2 image written front to back: convert's target where the
image it makes needs nothing but data (`qemu-img convert -O qcow2` of a
plain image).

Copying into a new image only ever appends: the copy comes in guest
order, writes each cluster once and frees nothing. So the image is laid
out as the copy goes, with no refcount bookkeeping at all:

    cluster 0          the header (written last: until then no image)
    clusters 1..       the L1 table (written at the end)
    then               the data clusters in guest order, each L2 table
                       right after the data it maps
    at the end         the refcount blocks, then the refcount table

Every cluster below the refcount blocks is used exactly once, so every
refcount is 1 and the blocks are written once, at the end
(create.refcount_metadata_clusters sizes them to count themselves).

Why not the engine's writer, which every other write goes through: it
allocates through the refcount engine, and so imports numpy (some 60 ms)
and runs a refcount transaction per chunk, for a copy that qemu-img makes
in 0.15 s a GiB (docs/speed.md). What the builder cannot make goes to the
writer as before (`fits`): encryption, an external data file,
preallocation, a backing file (whose data the copy must zero over, -B),
compressed clusters (which share host clusters), bitmaps to copy.
"""
from __future__ import annotations

from ..format import OFLAG_COPIED, Table, encode_table, zero_table
from ..host.hostfile import HostFile
from .create import CreateOptions, Layout, build_header, refcount_metadata_clusters, refcount_structures


def fits(o: CreateOptions) -> bool:
    """Whether a new image with options O can be built front to back."""
    return (o.encrypt is None and not o.data_file and o.preallocation == "off" and o.backing_file is None)


class ImageBuilder:
    """A new image at PATH (an empty file) with options O, written as a
    copy's target (engine.convert.TargetDisk): whole clusters, in guest
    order; `finish` writes the tables and the header. FLUSHES: finish
    makes the file durable (fsync) too."""

    def __init__(self, path: str, o: CreateOptions, flushes: bool) -> None:
        if not fits(o):
            raise ValueError("this image is not built front to back (builder.fits)")
        self._o = o
        self._geo = geo = o.geometry
        self._file = HostFile(path, writable=True)
        self._file.flushes = flushes
        self._l1 = zero_table(geo.l1_entries_needed(o.size))
        self._l1_clusters = -(-len(self._l1) * 8 // geo.cluster_size)
        self._next = 1 + self._l1_clusters       # the next free host cluster
        self._guest = 0                          # the first guest cluster not yet written
        self._l1_index = -1                      # the L2 table being filled
        self._l2: Table = zero_table(0)
        self._words = 2 if geo.extended_l2 else 1    # words per L2 entry

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Write DATA at guest OFFSET: a whole number of clusters (the last
        cluster of the disk may be cut at its end) past every cluster
        written so far."""
        cs = self._geo.cluster_size
        n = len(data)
        first = offset // cs
        if offset % cs or first < self._guest or (n % cs and offset + n < self._o.size) or offset + n > self._o.size:
            raise ValueError(f"the builder writes whole clusters in order: {n} bytes at {offset}")
        view = memoryview(data)
        per_table = self._geo.l2_entries
        done = 0
        while done < n:
            g = first + done // cs
            if g // per_table != self._l1_index:
                self._close_table()
                self._l1_index = g // per_table
                self._l2 = zero_table(per_table * self._words)
            # the clusters of this write that this L2 table maps
            k = min(-(-(n - done) // cs), (self._l1_index + 1) * per_table - g)
            piece = view[done : min(n, done + k * cs)]
            self._file.allocate(self._next * cs, len(piece))
            self._file.write_sync(piece, self._next * cs)
            for j in range(k):
                at = (g + j - self._l1_index * per_table) * self._words
                self._l2[at] = ((self._next + j) * cs) | OFLAG_COPIED
                if self._words == 2:
                    # (its allocation bits: the subclusters written, all but at the disk's end)
                    written = min(cs, len(piece) - j * cs)
                    self._l2[at + 1] = (1 << -(-written // self._geo.subcluster_size)) - 1
            self._next += k
            done += len(piece)
        self._guest = first + -(-n // cs)
        return n

    async def zero(self, offset: int, length: int, unmap: bool = True) -> None:
        """Nothing: a new image without a backing file reads zeros where
        nothing is written."""

    def _close_table(self) -> None:
        """Append the L2 table being filled (after the data it maps)."""
        if self._l1_index < 0:
            return
        cs = self._geo.cluster_size
        self._file.write_sync(encode_table(self._l2), self._next * cs)
        self._l1[self._l1_index] = (self._next * cs) | OFLAG_COPIED
        self._next += 1
        self._l1_index = -1

    async def finish(self) -> None:
        """The refcount blocks and table, the L1 table and the header; the
        file durable if it flushes. The builder is closed after it."""
        self._close_table()
        geo, cs = self._geo, self._geo.cluster_size
        used = self._next
        nblocks, table_clusters = refcount_metadata_clusters(used, cs, geo.refcount_order)
        blocks, table = refcount_structures(geo, used + nblocks + table_clusters, used, nblocks, table_clusters)
        for j, block in enumerate(blocks):
            self._file.write_sync(block, (used + j) * cs)
        self._file.write_sync(table, (used + nblocks) * cs)
        self._file.write_sync(encode_table(self._l1), cs)
        self._file.write_sync(self._layout(used, nblocks, table_clusters), 0)
        await self._file.sync()
        await self.close()

    def _layout(self, used: int, nblocks: int, table_clusters: int) -> bytes:
        """The header of the image whose refcount blocks (NBLOCKS of them)
        and table follow its USED clusters."""
        body = 1 + self._l1_clusters
        lay = Layout(reftable=used + nblocks, reftable_clusters=table_clusters, refblocks=used, nblocks=nblocks,
                     l1=1, l1_entries=len(self._l1), crypto=0, crypto_clusters=0, l2=body, nl2=0, data=body,
                     ndata=0)
        return build_header(self._o, lay, 0).pack()

    async def close(self) -> None:
        """Close the file (a builder that did not finish leaves no image)."""
        self._file.close()
