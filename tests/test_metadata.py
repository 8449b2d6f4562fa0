"""The metadata owner: header updates from memory, serialised, checked writes."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import trio

from qcowfs.errors import CorruptionError
from qcowfs.format import COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT
from qcowfs.engine.image import Image, OpenOptions
from qcowfs.engine.overlap import Kind


def make(tmp_path: Path, *opts: str) -> Path:
    img = tmp_path / "m.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *opts, str(img), "16M"], check=True)
    return img


def qinfo(img: Path) -> dict:
    return json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(img)], check=True,
                                     capture_output=True, text=True).stdout)


async def test_concurrent_header_updates_keep_each_other(tmp_path: Path) -> None:
    """Two updates in flight at once (each waits for its fsync): both changes
    reach the file and memory, none is written back over by the other."""
    img = make(tmp_path)
    image = Image(str(img), OpenOptions(read_only=False))
    try:
        async with trio.open_nursery() as n:
            n.start_soon(lambda: image.meta.update(compatible_features=lambda b: b | COMPAT_LAZY_REFCOUNTS))
            n.start_soon(lambda: image.meta.update(size=32 << 20))
            n.start_soon(lambda: image.meta.update(incompatible_features=lambda b: b & ~INCOMPAT_CORRUPT))
        assert image.header.size == 32 << 20
        assert image.header.compatible_features & COMPAT_LAZY_REFCOUNTS
    finally:
        await image.close()
    data = qinfo(img)
    assert data["virtual-size"] == 32 << 20
    assert data["format-specific"]["data"]["lazy-refcounts"] is True


async def test_metadata_write_onto_another_structure_is_refused(tmp_path: Path) -> None:
    """meta.write refuses a write over live metadata of another kind, and the
    file keeps its bytes."""
    img = make(tmp_path)
    image = Image(str(img), OpenOptions(read_only=False))
    try:
        h = image.header
        before = img.read_bytes()
        with pytest.raises(CorruptionError, match="refcount table"):
            image.meta.write(h.refcount_table_offset, b"\xff" * 512, "an L2 table", ignore=Kind.ACTIVE_L2)
        with pytest.raises(CorruptionError, match="header"):
            image.meta.check_data(0, 4096)
        assert img.read_bytes() == before
    finally:
        await image.close()
