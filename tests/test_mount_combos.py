"""Feature combinations through real FUSE mounts: a sample of the layouts the
model-based test (test_model.py) drives in-process, here written through
disk.raw of a `qcowfs mount`, grown with truncate, unmounted cleanly, and
judged by the same oracle (qemu-img check / compare, snapshots unchanged,
auto bitmaps covering every write, read back with qemu-nbd).
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from conftest import mounted
from inproc import KiB, MiB, BitmapSpec, Layout, Subject, build, make_data

LAYOUTS = {
    # issue 9's first reproduction, with a snapshot and a backing file on top
    "c512-bitmap-snapshot-backing": Layout(size=48 * MiB, cluster_size=512, snapshots=1,
                                           backing_size=8 * MiB, prefill=True,
                                           bitmaps=(BitmapSpec("b0", True, 4 * KiB),)),
    # issue 9's second: the refcount table grows, then the disk does
    "c512-refcount64-grow": Layout(size=32 * MiB, cluster_size=512, refcount_bits=64, prefill=True),
    "v2-c4k-backing-compressed-grow": Layout(size=24 * MiB, cluster_size=4 * KiB, compat="0.10",
                                             backing_size=16 * MiB, compressed=8, prefill=True),
    "extl2-c16k-zstd-lazy-bitmaps": Layout(size=32 * MiB, cluster_size=16 * KiB, extended_l2=True,
                                           compression_type="zstd", lazy_refcounts=True, compressed=4,
                                           bitmaps=(BitmapSpec("on", True, 16 * KiB),
                                                    BitmapSpec("off", False, 64 * KiB))),
    "c2m-refcount1": Layout(size=64 * MiB, cluster_size=2 * MiB, refcount_bits=1, prefill=True),
    # an external data file kept a raw image of the disk, through writes and a grow
    "data-file-raw-c4k-bitmap": Layout(size=24 * MiB, cluster_size=4 * KiB, data_file="raw", prefill=True,
                                       bitmaps=(BitmapSpec("b0", True, 64 * KiB),)),
    # preallocated over a backing file (extended L2: the subclusters read the backing file)
    "prealloc-extl2-backing": Layout(size=24 * MiB, cluster_size=32 * KiB, extended_l2=True,
                                     preallocation="metadata", backing_size=16 * MiB, prefill=True),
}


def write_session(subject: Subject, mnt: Path, rng: random.Random, total: int) -> None:
    """Random writes (1 B to 2 MiB, unaligned, some all-zero) and 1 MiB runs,
    mirrored into the model and the expected bitmaps; fsync at the end."""
    size = subject.model.size
    fd = os.open(mnt / "disk.raw", os.O_RDWR)
    try:
        done = 0
        while done < total:
            if rng.random() < 0.3:
                n = MiB
                off = rng.randrange(0, size - n + 1) & ~(MiB - 1)
            else:
                n = rng.choice([1, rng.randint(1, 4096), rng.randint(4096, 256 * KiB), rng.randint(1, 2 * MiB)])
                n = min(n, size)
                off = rng.randrange(0, size - n + 1)
            data = make_data(rng.choice(["random", "zeros", "pattern", "text"]), n, rng.randrange(1 << 16))
            assert os.pwrite(fd, data, off) == n
            subject.model.write(off, data)
            for bm in subject.bitmaps.values():
                bm.mark(off, n)
            done += n
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_combination_through_a_mount(name: str, tmp_path: Path) -> None:
    layout = LAYOUTS[name]
    subject = build(tmp_path / "img", layout)
    rng = random.Random(name)
    for session in range(2):
        with mounted(subject.image, tmp_path / f"mnt{session}", read_only=False) as mnt:
            write_session(subject, mnt, rng, 24 * MiB if layout.cluster_size == 512 else 12 * MiB)
            if session == 0 and subject.resize_refused() is None:
                new = subject.model.size + 8 * MiB
                os.truncate(mnt / "disk.raw", new)
                subject.resized(new)
                write_session(subject, mnt, rng, 2 * MiB)
            assert os.stat(mnt / "disk.raw").st_size == subject.model.size
        subject.judge()
