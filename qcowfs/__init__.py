"""qcowfs: qcow2 disk images as plain files (a FUSE mount) and as a Python library.

    import qcowfs

    with qcowfs.open("disk.qcow2") as image:          # "r+" to write
        print(image.virtual_size, image.snapshots, image.bitmaps)
        head = image.disk.read(512)                   # a seekable raw file
        old = image.snapshot("monday").read(512)      # a snapshot's disk
        print(image.info()["format-specific"], image.check().returncode)

The same API for trio programs, as coroutines: `qcowfs.aio`. No FUSE is
needed for any of it (only `qcowfs mount` uses pyfuse3). The image format
is implemented here in Python; QEMU is never called.

Layers, bottom up (each imports only those below it):

- `qcowfs.format`: the on-disk structures, pure parsing and packing;
- `qcowfs.host`: host files, QEMU-compatible locks, the mount table, passphrases;
- `qcowfs.engine`: the qcow2 engine (QEMU's block/qcow2*.c);
- `qcowfs.aio`, `qcowfs.api` (re-exported here): the public API;
- `qcowfs.fs`: the files of a mount, and the FUSE operations;
- `qcowfs.service`: the daemon, the control socket, mount options;
- `qcowfs.cli`: the `qcowfs` command.

Names are loaded on first use, so `import qcowfs` costs next to nothing.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (CorruptionError, ImageLockedError, InUseError, InvalidImageError, NameTakenError,
                     NoSpaceError, NotFoundError, PassphraseError, QcowError, ReadOnlyError, RequestError,
                     ResizeError, UnsupportedFeatureError, UsageError)

__version__ = "0.1.0"

__all__ = [
    "open", "info", "map", "check", "resize", "dd", "compare", "create", "convert", "measure", "commit", "rebase", "amend",
    "Image", "Disk", "Snapshot",
    "Bitmap", "Checkpoint", "CheckResult", "Comparison", "Keyring", "aio",
    "QcowError", "InvalidImageError", "UnsupportedFeatureError", "CorruptionError", "ReadOnlyError",
    "ImageLockedError", "NoSpaceError", "ResizeError", "UsageError", "PassphraseError", "RequestError",
    "NameTakenError", "NotFoundError", "InUseError", "__version__",
]

_LAZY = {"open": "api", "info": "api", "map": "api", "check": "api", "resize": "api", "dd": "api", "compare": "api",
         "create": "api", "convert": "api", "measure": "api",
         "commit": "api", "rebase": "api", "amend": "api",
         "Image": "api", "Disk": "api",
         "Snapshot": "records", "Bitmap": "records", "Checkpoint": "records", "CheckResult": "records",
         "Comparison": "records",
         "Keyring": "host.secret"}

if TYPE_CHECKING:
    from . import aio
    from .api import (Disk, Image, amend, check, commit, compare, convert, create, dd, info, map, measure,
                      open, rebase, resize)
    from .host.secret import Keyring
    from .records import Bitmap, CheckResult, Checkpoint, Comparison, Snapshot


def __getattr__(name: str) -> Any:
    import importlib

    if name == "aio":
        return importlib.import_module(".aio", __name__)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qcowfs' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
