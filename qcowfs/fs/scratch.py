"""Throwaway writes (-o scratch): every file of a read-only mount takes
writes, kept in an overlay outside the image and gone at unmount.

One mount has one Scratch: a sparse temporary file in scratch_dir, unlinked
before anything is written to it (O_TMPFILE, else create + unlink at once),
so a crash or a SIGKILL of the daemon leaves nothing behind and the image
file is never opened for writing. Each writable file of the mount gets its
own Overlay, which wraps the file's view: a map from BLOCK-sized blocks of
the file to slots of the scratch file. Slots are handed out in order and
never freed (the mount only grows its overlay), so the space used is the
number of slots times BLOCK, and `scratch_size` bounds it: a write that
would need more slots than are left fails whole with ENOSPC before any of
it is stored. A discard or zeroing (fallocate: mkfs, fstrim through a loop
device) marks whole blocks as zeros without a slot, and hands the slots
they had back (punched in the scratch file) for later writes.
"""
from __future__ import annotations

import bisect
import errno
import os
import tempfile
from typing import Sequence

import trio

from ..errors import NoSpaceError, QcowError, ReadOnlyError
from ..host.hostfile import HostFile
from .views import DirNode, FileNode, FileView

# The overlay's granularity: a filesystem block, so that an ext4 or XFS on
# the file (journal replay, fsck) costs no more overlay than it writes.
BLOCK = 4096
# An overlay block that reads as zeros (discarded or zeroed): no slot.
ZERO = -1


def default_dir() -> str:
    """$TMPDIR, else /tmp (what mktemp(1) uses)."""
    return os.environ.get("TMPDIR") or "/tmp"


class Scratch:
    """The temporary file and the space accounting shared by a mount's overlays."""

    def __init__(self, directory: str | None = None, limit: int | None = None) -> None:
        self.directory = os.path.abspath(directory or default_dir())
        self.limit = limit  # bytes; None: as much as the directory's filesystem has
        fd = _unlinked_file(self.directory)
        try:
            # HostFile owns positional I/O (how reads block); it opens by path,
            # and /proc/self/fd/N reopens the unlinked file.
            self.file = HostFile(f"/proc/self/fd/{fd}", writable=True)
        finally:
            os.close(fd)
        self._slots = 0
        self._free: list[int] = []  # slots handed back (punched), used again first

    @property
    def used(self) -> int:
        """Bytes of the scratch file holding written blocks (all files)."""
        return (self._slots - len(self._free)) * BLOCK

    def space(self) -> tuple[int, int]:
        """(total, free) bytes the overlays have: scratch_size, else what is
        used plus what the directory's filesystem has free."""
        if self.limit is not None:
            return self.limit, max(0, self.limit - self.used)
        st = os.statvfs(self.directory)
        free = st.f_bavail * st.f_frsize
        return self.used + free, free

    def allocate(self, count: int) -> list[int]:
        """COUNT slots (handed-back ones first, then new consecutive ones), or
        NoSpaceError when they would pass scratch_size."""
        new = max(0, count - len(self._free))
        if self.limit is not None and (self._slots + new) * BLOCK > self.limit:
            raise NoSpaceError(f"the scratch overlay is full ({self.used} of {self.limit} bytes used; "
                               "-o scratch_size= sets the limit)")
        reused = [self._free.pop() for _ in range(count - new)]
        first = self._slots
        self._slots += new
        return reused + list(range(first, first + new))

    def release(self, slots: list[int]) -> None:
        """SLOTS hold nothing any more: their space is punched out of the
        scratch file (where the filesystem can) and they are used again."""
        for slot in slots:
            self.file.zero_range(slot * BLOCK, BLOCK, punch=True)
        self._free += slots

    def close(self) -> None:
        self.file.close()


def _unlinked_file(directory: str) -> int:
    """A read-write file in DIRECTORY that has no name (one clear error if
    the directory cannot hold one)."""
    if not os.path.isdir(directory):
        raise QcowError(f"scratch_dir {directory} does not exist or is not a directory")
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise QcowError(f"scratch_dir {directory} cannot hold the overlay: {e.strerror}") from None
    # A filesystem without O_TMPFILE: a fresh name, unlinked at once.
    try:
        fd, path = tempfile.mkstemp(prefix=".qcowfs-scratch-", dir=directory)
    except OSError as e:
        raise QcowError(f"scratch_dir {directory} cannot hold the overlay: {e.strerror}") from None
    os.unlink(path)
    return fd


class Overlay(FileView):
    """A file of the mount with throwaway writes over BASE's bytes.

    Reads take BASE's bytes and put the written blocks over them; a write
    fills the untouched part of each new block from BASE first, so every
    block in the overlay is whole. Writes are serialised per file (two
    writes must not both give a slot to one new block); a block's slot is
    recorded only once its bytes are in the scratch file, so a read never
    sees a slot before its data."""

    writable = True
    keep_cache = False
    # Reads go past the kernel's cache to us: the file changes, and a
    # read-around push could race a write.
    direct_io = True
    unchanging = False

    def __init__(self, base: FileView, scratch: Scratch) -> None:
        self.base = base
        self.scratch = scratch
        self.mtime_ns = base.mtime_ns
        self._slots: dict[int, int] = {}  # block number -> slot in the scratch file, or ZERO
        self._sorted: list[int] | None = None  # the block numbers in order (for seeks), when known
        self._lock = trio.Lock()

    @property
    def size(self) -> int:
        return self.base.size

    @property
    def used(self) -> int:
        """Bytes of this file in the overlay."""
        return sum(1 for s in self._slots.values() if s != ZERO) * BLOCK

    def xattrs(self) -> dict[str, bytes]:
        total, _ = self.scratch.space()
        return {**self.base.xattrs(),
                "user.qcow2.scratch_used": str(self.used).encode(),
                "user.qcow2.scratch_mount_used": str(self.scratch.used).encode(),
                "user.qcow2.scratch_size": str(total).encode()}

    def _touched(self, offset: int, length: int) -> bool:
        """Some block of the range is in the overlay."""
        if not self._slots:
            return False
        first, last = offset // BLOCK, (offset + length - 1) // BLOCK
        if last - first + 1 < len(self._slots):
            return any(b in self._slots for b in range(first, last + 1))
        return any(first <= b <= last for b in self._slots)

    def read_cached(self, offset: int, length: int) -> bytes | bytearray | None:
        n = self.clip(offset, length)
        if n > 0 and self._touched(offset, n):
            return None
        return self.base.read_cached(offset, length)

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        n = self.clip(offset, length)
        if n <= 0:
            return b""
        data = await self.base.read(offset, n)
        if not self._touched(offset, n):
            return data
        buf = bytearray(data)
        view = memoryview(buf)
        for b in range(offset // BLOCK, (offset + n - 1) // BLOCK + 1):
            slot = self._slots.get(b)
            if slot is None:
                continue
            lo, hi = max(offset, b * BLOCK), min(offset + n, (b + 1) * BLOCK)
            if slot == ZERO:
                view[lo - offset : hi - offset] = bytes(hi - lo)
            else:
                await self.scratch.file.read_into(view[lo - offset : hi - offset], slot * BLOCK + lo - b * BLOCK)
        return buf

    async def write(self, offset: int, data: bytes) -> int:
        n = self.clip(offset, len(data))
        if n <= 0:
            raise NoSpaceError("write past the end of the file")
        async with self._lock:
            first, last = offset // BLOCK, (offset + n - 1) // BLOCK
            new = [b for b in range(first, last + 1) if self._slots.get(b, ZERO) == ZERO]
            # Bytes of new blocks that this write does not cover come from
            # the base, or are zeros for a zeroed block (read before any slot
            # is taken: a failed read costs nothing).
            edges: dict[int, bytes] = {}
            for b in {first, last} & set(new):
                if b * BLOCK < offset or (b + 1) * BLOCK > offset + n:
                    edges[b] = bytes(BLOCK) if b in self._slots else await self._block_of_base(b)
            fresh = dict(zip(new, self.scratch.allocate(len(new)))) if new else {}
            src = memoryview(data)[:n]
            parts: list[tuple[int, Sequence[bytes | memoryview]]] = []
            for b in range(first, last + 1):
                lo, hi = max(offset, b * BLOCK), min(offset + n, (b + 1) * BLOCK)
                piece = src[lo - offset : hi - offset]
                if b in edges:
                    whole = edges[b]
                    start = lo - b * BLOCK
                    parts.append((fresh[b] * BLOCK, [whole[:start], piece, whole[start + len(piece):]]))
                else:
                    s = fresh.get(b, self._slots.get(b))
                    assert s is not None
                    parts.append((s * BLOCK + lo - b * BLOCK, [piece]))
            for at, pieces in _merged(sorted(parts, key=lambda part: part[0])):
                self.scratch.file.writev_sync(pieces, at)
            if any(b not in self._slots for b in fresh):
                self._sorted = None
            self._slots.update(fresh)
        return n

    async def zero(self, offset: int, length: int, unmap: bool) -> None:
        """Discard or zero a range (fallocate PUNCH_HOLE, ZERO_RANGE; both
        the same here): partial blocks at its ends are written with zeros,
        whole blocks become ZERO where the base has data (elsewhere the base
        reads as zeros already) and give their slots back."""
        n = self.clip(offset, length)
        if n <= 0:
            return
        end = offset + n
        lo, hi = -(-offset // BLOCK) * BLOCK, end // BLOCK * BLOCK
        if lo >= hi:
            await self.write(offset, bytes(n))
            return
        if offset < lo:
            await self.write(offset, bytes(lo - offset))
        if hi < end:
            await self.write(hi, bytes(end - hi))
        async with self._lock:
            # Where the base has data (asked first: the changes below then
            # happen without an await, so no read sees half of them).
            data: list[tuple[int, int]] = []
            pos = lo
            while pos < hi:
                start = await self.base.seek(pos, True)
                if start >= hi:
                    break
                stop = min(await self.base.seek(start, False), hi)
                data.append((start // BLOCK, -(-stop // BLOCK)))
                pos = stop
            first, last = lo // BLOCK, hi // BLOCK
            mine = (range(first, last) if last - first < len(self._slots)
                    else [b for b in self._slots if first <= b < last])
            freed = [self._slots.pop(b) for b in mine if b in self._slots]
            for b0, b1 in data:
                self._slots.update(dict.fromkeys(range(b0, b1), ZERO))
            self._sorted = None
            self.scratch.release([s for s in freed if s != ZERO])

    async def allocate(self, offset: int, length: int, keep_size: bool) -> None:
        """Every block can be written already: nothing to reserve; the file
        cannot grow (its size is the image's)."""
        if not keep_size and offset + length > self.size:
            raise NoSpaceError("the files of a scratch mount keep their size (the image is read-only)")

    async def seek(self, offset: int, data: bool) -> int:
        """The overlay's blocks (written: data, ZERO: hole) over the base's
        data and holes."""
        if not self._slots:
            return await self.base.seek(offset, data)
        if self._sorted is None:
            self._sorted = sorted(self._slots)
        blocks, size = self._sorted, self.size
        pos = offset
        while pos < size:
            b = pos // BLOCK
            slot = self._slots.get(b)
            if slot is not None:
                if (slot != ZERO) == data:
                    return pos
                pos = (b + 1) * BLOCK
                continue
            i = bisect.bisect_right(blocks, b)
            limit = min(blocks[i] * BLOCK, size) if i < len(blocks) else size
            found = await self.base.seek(pos, data)
            if found < limit:
                return found
            pos = limit
        return size

    async def _block_of_base(self, b: int) -> bytes:
        data = await self.base.read(b * BLOCK, BLOCK)
        return bytes(data) + bytes(BLOCK - len(data))

    async def truncate(self, size: int) -> None:
        raise ReadOnlyError("the files of a scratch mount keep their size (the image is read-only)")

    async def fsync(self) -> None:
        """Nothing to make durable: the overlay is thrown away at unmount."""


def _merged(parts: list[tuple[int, Sequence[bytes | memoryview]]]) -> list[tuple[int, list[bytes | memoryview]]]:
    """Writes at consecutive scratch offsets joined into one pwritev each."""
    out: list[tuple[int, list[bytes | memoryview]]] = []
    end = -1
    for at, pieces in parts:
        length = sum(len(p) for p in pieces)
        if out and at == end:
            out[-1][1].extend(pieces)
        else:
            out.append((at, list(pieces)))
        end = at + length
    return out


def overlay_tree(root: DirNode, scratch: Scratch) -> None:
    """Give disk.raw and every snapshots/NAME.raw of a freshly built tree its
    own overlay (bitmaps and maps stay as they are: they describe the image)."""
    nodes = [root.children.get("disk.raw")]
    snaps = root.children.get("snapshots")
    if isinstance(snaps, DirNode):
        nodes += list(snaps.children.values())
    for node in nodes:
        if isinstance(node, FileNode):
            node.view = Overlay(node.view, scratch)
