"""A raw file's resize, as `qemu-img resize -f raw` (a new raw file is
made by create.create_raw; a raw file is read through opening.RawSource)."""
from __future__ import annotations

import os
import stat

from ..errors import QcowError, ResizeError, UsageError
from ..host.locking import lock_image
from ..format import whole_sectors
from .create import preallocate_data, raw_preallocation

# The largest file a host takes (off_t, as qemu-img says for sizes).
MAX_FILE_SIZE = 2**63 - 1


def resize_raw(path: str, size: int, shrink: bool = False, preallocation: str = "off") -> None:
    """Make the raw file PATH SIZE bytes long, as `qemu-img resize -f raw`:
    the file is cut or extended to exactly SIZE; a size below its disk
    (its size in whole sectors) needs SHRINK, as qemu-img's --shrink; a grown tail is a
    hole, or with PREALLOCATION "falloc" reserved, with "full" written with
    zeros. QEMU's writer lock is taken first: a file another program holds
    is refused, unchanged."""
    raw_preallocation(preallocation)
    if not 0 <= size <= MAX_FILE_SIZE:
        raise ResizeError(f"the new size must be between 0 and {MAX_FILE_SIZE} bytes")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise QcowError.from_os(f"cannot open {path}", e) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{path} is not a regular file: only a raw image file can be resized")
        lock_image(fd, path, writer=True)
        disk = whole_sectors(st.st_size)
        if size < disk and not shrink:
            raise ResizeError(f"{size} is smaller than the disk ({disk}): shrinking drops what lies past "
                              "the new end; pass shrink=True (--shrink) to do it")
        if size < disk and preallocation != "off":
            raise UsageError("preallocation can only be used for growing an image")
        try:
            os.ftruncate(fd, size)
            preallocate_data(fd, st.st_size, size - st.st_size, preallocation)
            os.fsync(fd)
        except OSError as e:
            raise QcowError.from_os(f"cannot resize {path}", e) from None
    finally:
        os.close(fd)
