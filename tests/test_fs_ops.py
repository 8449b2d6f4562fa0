"""Plain filesystem calls on a mount: access(2), chdir, listing, statfs."""
from __future__ import annotations

import mmap
import os
import subprocess
import time
from pathlib import Path

from conftest import mounted, qemu_img, qemu_io, resident_pages


def _image(tmp_path: Path) -> Path:
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "8M")
    qemu_io(img, "write -P 0x42 0 64k")
    qemu_img("snapshot", "-c", "s1", img)
    return img


def test_access_and_chdir_keep_the_daemon_serving(tmp_path: Path) -> None:
    img = _image(tmp_path)
    for read_only in (True, False):
        with mounted(img, tmp_path / f"mnt{read_only}", read_only=read_only) as mnt:
            # A shell's `cd` and `test -w` use chdir(2) and access(2).
            p = subprocess.run(["sh", "-c", f"cd '{mnt}' && ls && test -r disk.raw && test -w disk.raw"],
                               capture_output=True, text=True, timeout=30)
            assert "disk.raw" in p.stdout, p.stderr
            assert (p.returncode == 0) is (not read_only), p.stderr
            assert os.access(mnt / "disk.raw", os.R_OK)
            assert os.access(mnt / "disk.raw", os.W_OK) is (not read_only)
            assert not os.access(mnt / "snapshots" / "s1.raw", os.W_OK)
            assert os.access(mnt / "snapshots", os.X_OK)
            st = os.statvfs(mnt)
            assert st.f_bsize > 0
            with open(mnt / "disk.raw", "rb") as f:
                assert f.read(4) == b"\x42" * 4


def test_read_around_window_sizes_give_the_same_bytes(tmp_path: Path) -> None:
    """Random small reads (which push windows into the kernel's cache) read
    exactly QEMU's bytes, whatever the window; a bad window is refused."""
    import random

    from conftest import QCOWFS, to_raw

    img = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", img, "16M")
    qemu_io(img, "write -P 0x11 0 3M", "write -P 0x22 5M 1M", "write -z 1M 64k")
    want = to_raw(img, tmp_path / "want.raw").read_bytes()
    rng = random.Random(7)
    for window in ("0", "64K", "1M"):
        with mounted(img, tmp_path / f"m{window}", "-o", f"read_around={window}") as mnt:
            with open(mnt / "disk.raw", "rb", buffering=0) as f:
                for _ in range(400):
                    off = rng.randrange(0, len(want) - 4096)
                    f.seek(off)
                    assert f.read(4096) == want[off:off + 4096], (window, off)
    p = subprocess.run([QCOWFS, "mount", str(img), str(tmp_path / "bad"), "-o", "read_around=3000"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode != 0 and "read_around" in p.stderr


def test_corruption_found_while_writing_marks_image_and_stops_writes(tmp_path: Path) -> None:
    """An L2 entry pointing past the end of the file: the write fails with EIO,
    the image gets the corrupt bit, later writes fail too, reads elsewhere work."""
    import errno
    import struct

    import pytest

    img = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "8M")
    qemu_io(img, "write -P 0x33 0 128k")
    raw = bytearray(img.read_bytes())
    l1_off = struct.unpack_from(">Q", raw, 40)[0]
    l2_off = struct.unpack_from(">Q", raw, l1_off)[0] & 0x00FFFFFFFFFFFE00
    entry = struct.unpack_from(">Q", raw, l2_off + 8)[0]   # guest cluster 1
    struct.pack_into(">Q", raw, l2_off + 8, (entry & ~0x00FFFFFFFFFFFE00) | (1 << 40))
    img.write_bytes(raw)
    with mounted(img, tmp_path / "m", read_only=False) as mnt:
        fd = os.open(mnt / "disk.raw", os.O_RDWR)
        try:
            with pytest.raises(OSError) as e:
                os.pwrite(fd, b"x" * 512, 65536 + 512)
            assert e.value.errno == errno.EIO
            with pytest.raises(OSError):
                os.pwrite(fd, b"y" * 512, 0)          # the mount is read-only now
            assert os.pread(fd, 4, 0) == b"\x33" * 4  # reads elsewhere still work
        finally:
            os.close(fd)
    flags = struct.unpack_from(">Q", img.read_bytes(), 72)[0]
    assert flags & 2, "corrupt bit not set"


def test_writable_disk_is_direct_io_unless_page_cache(tmp_path: Path) -> None:
    """docs/speed.md's trade: a writable disk.raw bypasses the kernel page cache,
    so shared mmap is refused (ENODEV); -o page_cache and read-only mounts
    allow it."""
    import errno
    import mmap
    img = _image(tmp_path)
    for extra, read_only, mappable in ((), False, False), (("-o", "page_cache"), False, True), ((), True, True):
        with mounted(img, tmp_path / "mnt", *extra, read_only=read_only) as mnt:
            fd = os.open(mnt / "disk.raw", os.O_RDONLY)
            try:
                if mappable:
                    with mmap.mmap(fd, 4096, prot=mmap.PROT_READ) as mm:
                        assert mm[:4] == b"\x42" * 4
                else:
                    try:
                        mmap.mmap(fd, 4096, prot=mmap.PROT_READ).close()
                    except OSError as e:
                        assert e.errno == errno.ENODEV
                    else:
                        raise AssertionError("shared mmap of a direct I/O disk.raw worked")
                assert os.pread(fd, 4, 0) == b"\x42" * 4
            finally:
                os.close(fd)


def test_no_read_around_for_o_direct(tmp_path: Path) -> None:
    """Small O_DIRECT reads of a read-only file push nothing into the page cache (the kernel
    would never use those pages); the same reads buffered do (read-around)."""
    img = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "64M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 64M", str(img)], check=True, capture_output=True)
    offsets = [i * (1 << 20) + 4096 for i in range(0, 64, 4)]
    with mounted(img, tmp_path / "mnt") as mnt:
        disk = mnt / "disk.raw"
        buf = mmap.mmap(-1, 4096)
        fd = os.open(disk, os.O_RDONLY | os.O_DIRECT)
        try:
            for off in offsets:
                assert os.preadv(fd, [buf], off) == 4096 and buf[:1] == b"\x5a"
        finally:
            os.close(fd)
        time.sleep(0.3)
        direct = resident_pages(disk)
        fd = os.open(disk, os.O_RDONLY)
        try:
            for off in offsets:
                os.pread(fd, 4096, off)
        finally:
            os.close(fd)
        time.sleep(0.3)
        buffered = resident_pages(disk)
    assert direct == 0, f"{direct} pages pushed for O_DIRECT reads"
    assert buffered > len(offsets) * 8, f"only {buffered} pages cached after buffered reads: no read-around?"


def test_read_around_through_a_backing_chain(tmp_path: Path) -> None:
    """A small read whose cluster lies in a lower layer of a backing chain
    (or in a raw base) pushes its window, read through every layer at once,
    and those pages are QEMU's bytes."""
    from conftest import to_raw

    base = tmp_path / "base.raw"
    base.write_bytes(bytes(range(256)) * (24 << 12))  # 24 MiB: shorter than the 32 MiB overlays
    mid, top = tmp_path / "mid.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "raw", mid, "32M")
    qemu_io(mid, *[f"write -P 0x{0x30 + i % 64:02x} {i * 192}k 64k" for i in range(0, 160)])
    qemu_img("create", "-q", "-f", "qcow2", "-b", mid.name, "-F", "qcow2", top, "32M")
    qemu_io(top, *[f"write -P 0x{0x80 + i % 64:02x} {i * 320 + 128}k 64k" for i in range(0, 100)])
    want = to_raw(top, tmp_path / "want.raw").read_bytes()
    # Offsets whose own cluster neither overlay holds: read from the raw base.
    offsets = [o for o in range(4096, 24 << 20, 1000 << 10)
               if (o // 65536) % 3 and ((o // 1024) - 128) % 320 >= 64][:8]
    assert len(offsets) >= 6
    with mounted(top, tmp_path / "mnt") as mnt:
        disk = mnt / "disk.raw"
        fd = os.open(disk, os.O_RDONLY)
        try:
            for off in offsets:
                assert os.pread(fd, 4096, off) == want[off:off + 4096], off
            time.sleep(0.3)
            pushed = resident_pages(disk)
            for off in range(0, len(want), 1 << 20):
                assert os.pread(fd, 1 << 20, off) == want[off:off + (1 << 20)], off
        finally:
            os.close(fd)
    assert pushed > len(offsets) * 16, f"only {pushed} pages cached after {len(offsets)} reads: no read-around?"


def test_read_around_pushes_a_compressed_cluster_a_small_read_inflated(tmp_path: Path) -> None:
    """A small read of a compressed cluster inflates all of it: the rest of
    the cluster is pushed into the page cache (a copy, no second inflate),
    and those pages are QEMU's bytes; with read_around=0 nothing is."""
    import random

    from conftest import to_raw

    raw = tmp_path / "src.raw"
    rng = random.Random(3)
    raw.write_bytes(b"".join(bytes([rng.randrange(1, 256)]) * 300 + rng.randbytes(100) for _ in range(40960)))
    img = tmp_path / "c.qcow2"
    for ctype in ("zlib", "zstd"):
        img.unlink(missing_ok=True)
        qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", f"compression_type={ctype}", raw, img)
        want = to_raw(img, tmp_path / "want.raw").read_bytes()
        offsets = [c * 65536 + 8192 for c in range(0, 60, 7)]
        cached = {}
        for window in ("256K", "0"):
            with mounted(img, tmp_path / f"m{ctype}{window}", "-o", f"read_around={window}") as mnt:
                disk = mnt / "disk.raw"
                fd = os.open(disk, os.O_RDONLY)
                try:
                    for off in offsets:
                        assert os.pread(fd, 4096, off) == want[off:off + 4096], (ctype, off)
                    time.sleep(0.3)
                    cached[window] = resident_pages(disk)
                    for off in offsets:  # the pushed pages are QEMU's bytes
                        c = off // 65536 * 65536
                        assert os.pread(fd, 65536, c) == want[c:c + 65536], (ctype, c)
                finally:
                    os.close(fd)
        # 16 pages a cluster when pushed; one read (and the kernel's read-ahead of it) when not.
        assert cached["256K"] >= len(offsets) * 16, (ctype, cached)
        assert cached["0"] < len(offsets) * 16, (ctype, cached)
