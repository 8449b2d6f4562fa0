"""Byte I/O on host files: the one place that decides how reads block.

A pread served from the host page cache costs a few microseconds, a worker
thread tens: so each read is first tried on the event loop with RWF_NOWAIT
(never blocks), and only what would block goes to a worker thread. Writes of
metadata and data are buffered pwrites (they land in the page cache); fsync
always runs in a thread. A command that drives the engine without a loop
(host.waiting) reads and syncs in place.
"""
from __future__ import annotations

import errno
import functools
import mmap
import os
import stat
import threading
from collections.abc import Callable, Sequence

from .waiting import driven, in_thread

_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
# The largest offset of a host file (off_t).
_MAX_OFFSET = (1 << 63) - 1
# fallocate(2) modes (linux/falloc.h); os has only posix_fallocate (mode 0).
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
# A read whose buffer starts 1 to 63 bytes past its source modulo a page is
# copied out of the page cache at a fifth of the speed on the bench's CPUs
# (2.6 against 13-14 GB/s, AMD EPYC: the kernel copies with `rep movsb`, which
# meets 4K aliasing at such a distance; glibc's memcpy does the same for the
# sizes it copies with `rep movsb`, up to some 512 KiB here). A buffer that
# malloc maps for itself starts 16 bytes into a page, so the first large
# bytearray a program makes (`bytearray(1 << 20)` for readinto, convert's
# chunks) is such a buffer for every cluster-aligned read. Those reads go
# through a bounce buffer placed half a page from both the source and the
# destination, and a memcpy (docs/speed.md, "Reads into a buffer 16 bytes
# into a page").
PAGE = 4096
ALIASED_DISTANCE = 64
BOUNCE_MIN = 64 * 1024  # below it the slow copy costs less than finding the address
BOUNCE_BYTES = 1 << 20
bounce_lock = threading.Lock()  # held while a read uses the bounce buffer
bounced_reads = 0  # reads that went through it, in this process
# ctypes (libc's fallocate, a buffer's address) is imported by the first call
# that needs it: a command that only reads small tables never does (1.3 ms of
# its start; docs/speed.md).


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with any MODE; OSError on failure."""
    import ctypes

    if _libc_fallocate()(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


@functools.cache
def _libc_fallocate() -> Callable[[int, int, int, int], int]:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return libc.fallocate


def _aliased(buf: bytearray | memoryview, offset: int) -> bool:
    """Whether the kernel's copy of OFFSET's bytes into BUF meets 4K aliasing."""
    import ctypes

    address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    return 0 < (address - offset) % PAGE < ALIASED_DISTANCE


@functools.cache
def _bounce_buffer() -> memoryview:
    """The bounce buffer, made by the first aliased read: private, so a
    forked serving process gets its own copy."""
    return memoryview(mmap.mmap(-1, BOUNCE_BYTES + PAGE, flags=mmap.MAP_PRIVATE))


def preadv(fd: int, buf: bytearray | memoryview, offset: int, flags: int = 0) -> int:
    """os.preadv (preadv2 with FLAGS) of BUF at OFFSET: bytes read, fewer only
    where preadv itself would stop. An aliased read (above) goes through the
    bounce buffer in pieces, unless another thread holds it (then directly:
    the same bytes, copied slower)."""
    global bounced_reads
    if len(buf) < BOUNCE_MIN or not _aliased(buf, offset) or not bounce_lock.acquire(blocking=False):
        return os.preadv(fd, [buf], offset, flags)
    try:
        start = (offset + PAGE // 2) % PAGE
        bounce, done = _bounce_buffer()[start:start + BOUNCE_BYTES], 0
        bounced_reads += 1
        while done < len(buf):
            piece = bounce[:len(buf) - done]
            try:
                n = os.preadv(fd, [piece], offset + done, flags)
            except BlockingIOError:
                if done:
                    break  # (RWF_NOWAIT: what is cached so far, as preadv2 returns it)
                raise
            buf[done:done + n] = piece[:n]
            done += n
            if n < len(piece):
                break
        return done
    finally:
        bounce_lock.release()


def same_file(a: str, b: str) -> bool:
    """A and B name one file: the same path once links are resolved (also
    for files not made yet), or the same inode."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class HostFile:
    """An open image, backing or data file, with async positional I/O."""

    def __init__(self, path: str, writable: bool = False) -> None:
        self.path = path
        self.writable = writable
        self.fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        if stat.S_ISDIR(os.fstat(self.fd).st_mode):  # (opens read-only, then every read fails)
            os.close(self.fd)
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        self._nowait = bool(_NOWAIT)
        # Size as far as this process knows: grows with our own writes.
        self.known_size = self.size()
        # Reads served from the page cache / sent to a worker thread.
        self.cached_reads = self.thread_reads = 0
        # Off: sync() does nothing, as QEMU's cache=unsafe ignores flushes
        # (qemu-img convert's default: the new image is not made durable).
        self.flushes = True
        # Whether allocate() asks the filesystem (off once it says it cannot).
        self.allocates = True

    def size(self) -> int:
        # (lseek, not fstat: a block device's st_size is 0; reads and writes
        # are positional, so the file position does not matter)
        return os.lseek(self.fd, 0, os.SEEK_END)

    def is_block_device(self) -> bool:
        return stat.S_ISBLK(os.fstat(self.fd).st_mode)

    def refresh_size(self) -> None:
        """known_size from the file as it is now: for a file another program
        grows while we read it (a force-shared image)."""
        self.known_size = self.size()

    def seek(self, offset: int, data: bool) -> int | None:
        """lseek SEEK_DATA (DATA) or SEEK_HOLE from OFFSET: where the next data
        or hole starts, None if there is none (ENXIO). A file that cannot tell
        is data up to its end: a filesystem without SEEK_DATA (the kernel's
        fallback), a block device (EINVAL)."""
        try:
            return os.lseek(self.fd, offset, os.SEEK_DATA if data else os.SEEK_HOLE)
        except OSError as e:
            if e.errno == errno.EINVAL:
                end = self.size()
                return (offset if offset < end else None) if data else max(offset, end)
            if e.errno != errno.ENXIO:
                raise
            return None

    def data_runs(self, start: int, end: int) -> list[tuple[int, int, bool]]:
        """[START, END) of the file as runs (offset, length, holds data), as
        SEEK_DATA and SEEK_HOLE tell them: past the end of the file is a hole."""
        out: list[tuple[int, int, bool]] = []
        pos = start
        while pos < end:
            data = self.seek(pos, data=True)
            if data is None or data > pos:
                stop = end if data is None else min(data, end)
                out.append((pos, stop - pos, False))
            else:
                hole = self.seek(pos, data=False)
                stop = end if hole is None else min(hole, end)
                out.append((pos, stop - pos, True))
            pos = stop
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def read_sync(self, offset: int, length: int) -> bytes:
        """Blocking read for open-time parsing (before any request is served).
        An offset no file can reach reads nothing, as past the end of the file."""
        if offset + length > _MAX_OFFSET:
            return b"" if offset > _MAX_OFFSET else os.pread(self.fd, _MAX_OFFSET - offset, offset)
        return os.pread(self.fd, length, offset)

    def read_nowait(self, buf: bytearray | memoryview, offset: int) -> int:
        """Read from the page cache only: bytes read, 0 if it would block."""
        if not self._nowait:
            return 0
        try:
            n = preadv(self.fd, buf, offset, _NOWAIT)
            self.cached_reads += 1
            return n
        except BlockingIOError:
            return 0
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            self._nowait = False
            return 0

    async def read_into(self, buf: memoryview, offset: int) -> int:
        """Fill BUF from OFFSET; returns bytes read (short only at end of file).
        Driven (host.waiting), one blocking read on this thread, no await at all."""
        if driven():
            return self._read_blocking(buf, offset)
        done, want = self.read_nowait(buf, offset), len(buf)
        while done < want:
            self.thread_reads += 1
            n = await in_thread(preadv, self.fd, buf[done:], offset + done)
            if n == 0:
                break
            done += n
        return done

    def _read_blocking(self, buf: memoryview, offset: int) -> int:
        done, want = 0, len(buf)
        while done < want:
            n = preadv(self.fd, buf[done:], offset + done)
            if n == 0:
                break
            done += n
        return done

    async def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        n = await self.read_into(memoryview(buf), offset)
        return bytes(buf[:n]) if n < length else bytes(buf)

    async def write(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        self.write_sync(data, offset)

    def write_sync(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        """A buffered pwrite: lands in the page cache, ordered by sync()."""
        view = memoryview(data)
        end = offset + len(view)
        try:
            while len(view):
                n = os.pwrite(self.fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as e:
            self._name(e)
            raise
        if end > self.known_size:
            self.known_size = end

    def writev_sync(self, parts: Sequence[bytes | bytearray | memoryview], offset: int) -> None:
        """write_sync of the concatenated PARTS, without concatenating them
        (unless the kernel writes short, which write_sync then finishes)."""
        try:
            n = os.pwritev(self.fd, parts, offset)
        except OSError as e:
            self._name(e)
            raise
        total = sum(len(p) for p in parts)
        rest = memoryview(b"".join(parts))[n:] if n < total else memoryview(b"")
        self.write_sync(rest, offset + n)

    def allocate(self, offset: int, length: int) -> None:
        """Allocate host space for [OFFSET, OFFSET+LENGTH), which is about to
        be written and holds nothing yet (a new cluster, a copy's target):
        one fallocate for the range. The page cache write then costs less:
        ext4 otherwise reserves each page's block as it is written (delayed
        allocation), 512 MiB in 2 MiB writes took 0.104 s against 0.073 with
        each range allocated first (docs/speed.md). Best effort: where the
        filesystem cannot (asked once) or the space is short, the write
        alone decides."""
        if not self.allocates:
            return
        try:
            fallocate(self.fd, 0, offset, length)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
                self.allocates = False

    def zero_range(self, offset: int, length: int, punch: bool) -> bool:
        """Make host bytes read as zeros without writing them: PUNCH frees
        the space (PUNCH_HOLE), else it stays allocated (ZERO_RANGE); the
        file size is kept. False if the host filesystem cannot (then nothing
        changed). Synchronous: callers use it where no other task may touch
        the range in between (no await)."""
        mode = FALLOC_FL_KEEP_SIZE | (FALLOC_FL_PUNCH_HOLE if punch else FALLOC_FL_ZERO_RANGE)
        try:
            fallocate(self.fd, mode, offset, length)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return False
            raise
        return True

    async def sync(self) -> None:
        """fdatasync, unless FLUSHES is off (QEMU's cache=unsafe)."""
        if self.flushes:
            try:
                await in_thread(os.fdatasync, self.fd)
            except OSError as e:
                self._name(e)
                raise

    def truncate(self, size: int) -> None:
        try:
            os.ftruncate(self.fd, size)
        except OSError as e:
            self._name(e)
            raise
        self.known_size = size

    def _name(self, e: OSError) -> None:
        """Make E name this file: the command line's one line then says
        which file the host refused ("disk.qcow2: No space left on device")."""
        if e.filename is None:
            e.filename = self.path
