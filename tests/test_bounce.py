"""Reads into a buffer that starts 1-63 bytes past its source modulo a page
go through host/hostfile.py's bounce buffer (the kernel's copy is five times
slower there: docs/speed.md). Whatever way a read takes, it must read QEMU's
bytes: into buffers at every kind of page offset, across several pieces of
the bounce buffer, through a backing chain, up to the end of the disk, and
with the bounce buffer held by another thread."""
from __future__ import annotations

import mmap
import threading
from pathlib import Path

import pytest

import qcowfs
from images import create, oracle, qio
from qcowfs.host import hostfile

MiB = 1 << 20
PAGE = hostfile.PAGE
SIZE = 3 * MiB + 64 * 1024  # more than BOUNCE_BYTES: a read of it takes several pieces


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """An overlay over a qcow2 base (64 KiB clusters), data in both layers
    and holes, and QEMU's bytes of its disk."""
    d = tmp_path_factory.mktemp("bounce")
    base = create(d / "base.qcow2", SIZE)
    qio(base, f"write -P 0x5a 0 {SIZE}", "write -z 1M 256k")
    top = create(d / "top.qcow2", SIZE, backing="base.qcow2", backing_fmt="qcow2", cwd=d)
    qio(top, "write -P 0xc3 64k 1M", "write -P 0x11 2M 4k", "write -z 3M 64k", cwd=d)
    return top, oracle(top, d / "top.raw").read_bytes()


def buffer_at(page_offset: int, length: int) -> memoryview:
    """LENGTH writable bytes starting PAGE_OFFSET bytes into a page."""
    return memoryview(mmap.mmap(-1, length + 2 * PAGE, flags=mmap.MAP_PRIVATE))[page_offset:page_offset + length]


@pytest.mark.parametrize("page_offset", [0, 16, 63, 64, 1552, 2048, PAGE - 16])
@pytest.mark.parametrize("offset", [0, 64 * 1024, 1536, SIZE - 3 * MiB])
def test_reads_into_any_buffer_read_qemus_bytes(chain: tuple[Path, bytes], page_offset: int, offset: int) -> None:
    top, want = chain
    length = SIZE - offset  # to the end of the disk
    buf = buffer_at(page_offset, length + 4096)  # longer than what is left: a short read
    with qcowfs.open(top) as image:
        # (the tables first: loading one reads 64 KiB into a buffer of its own)
        assert image.disk.preadinto(buffer_at(0, SIZE), 0) == SIZE
        before = hostfile.bounced_reads
        assert image.disk.preadinto(buf, offset) == length
        after = hostfile.bounced_reads
    assert bytes(buf[:length]) == want[offset:]
    # The host reads start where the guest offset's cluster piece starts: 16 and 63
    # bytes into a page meet aliasing for a cluster-aligned read, 0 and 64 do not.
    aliased = 0 < (page_offset - offset) % PAGE < hostfile.ALIASED_DISTANCE
    assert (after > before) == aliased


def test_a_held_bounce_buffer_reads_directly(chain: tuple[Path, bytes]) -> None:
    top, want = chain
    buf = buffer_at(16, SIZE)
    with qcowfs.open(top) as image:
        assert image.disk.preadinto(buffer_at(0, SIZE), 0) == SIZE  # (the tables first)
        before = hostfile.bounced_reads
        with hostfile.bounce_lock:  # another thread's bounce in progress
            assert image.disk.preadinto(buf, 0) == SIZE
        assert hostfile.bounced_reads == before
        assert image.disk.preadinto(buffer_at(16, SIZE), 0) == SIZE  # free again: bounced
        assert hostfile.bounced_reads > before
    assert bytes(buf) == want


def test_threads_reading_at_once_each_read_their_bytes(chain: tuple[Path, bytes], tmp_path: Path) -> None:
    """hostfile.preadv from four threads at once, as a mount's worker threads
    read: one holds the bounce buffer, the others read directly, and no read
    gets another's bytes."""
    raw = tmp_path / "disk.raw"
    raw.write_bytes(chain[1])
    want = chain[1]
    errors: list[str] = []
    host = hostfile.HostFile(str(raw))
    start = threading.Barrier(4)

    def reader(k: int) -> None:
        buf = buffer_at(16 + 8 * k, 512 * 1024)
        start.wait()
        for i in range(50):
            offset = ((k * 7 + i) % 12) * 256 * 1024
            n = hostfile.preadv(host.fd, buf, offset)
            if bytes(buf[:n]) != want[offset:offset + n] or n != min(len(buf), len(want) - offset):
                errors.append(f"thread {k}: read {i} at {offset}")
    before = hostfile.bounced_reads
    try:
        threads = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        host.close()
    assert not errors
    assert hostfile.bounced_reads > before
