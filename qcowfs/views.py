"""The files a mount shows: what each one is, its size and rights, and where
its byte ranges go. The FUSE layer sees only this interface."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from .errors import ReadOnlyError
from .image import Image
from .mapper import L1Table


class FileView:
    """One file of the mount: a byte range source, maybe writable."""

    writable: bool = False
    # True when nothing but this mount changes the file, so the kernel may
    # keep its page cache across opens.
    keep_cache: bool = True
    mtime_ns: int = 0

    @property
    def size(self) -> int:
        raise NotImplementedError

    def xattrs(self) -> dict[str, bytes]:
        return {}

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        raise NotImplementedError

    async def write(self, offset: int, data: bytes) -> int:
        raise ReadOnlyError("file is read-only")

    async def truncate(self, size: int) -> None:
        raise ReadOnlyError("file is read-only")

    async def fsync(self) -> None:
        pass

    def clip(self, offset: int, length: int) -> int:
        """How many of LENGTH bytes at OFFSET lie inside the file."""
        return max(0, min(length, self.size - offset))


@dataclass
class DirNode:
    name: str
    children: dict[str, "DirNode | FileNode"] = field(default_factory=dict)
    mtime_ns: int = 0


@dataclass
class FileNode:
    name: str
    view: FileView


class DiskView(FileView):
    """disk.raw: the active virtual disk."""

    def __init__(self, image: Image) -> None:
        self.image = image
        self.writable = not image.read_only
        self.mtime_ns = os.stat(image.path).st_mtime_ns

    @property
    def size(self) -> int:
        return self.image.size

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        n = self.clip(offset, length)
        if n <= 0:
            return b""
        return await self.image.read(self.image.active_l1, offset, n)

    async def write(self, offset: int, data: bytes) -> int:
        if not self.writable:
            raise ReadOnlyError("the image is mounted read-only")
        return await self.image.write(offset, data)  # type: ignore[attr-defined]

    async def truncate(self, size: int) -> None:
        if not self.writable:
            raise ReadOnlyError("the image is mounted read-only")
        await self.image.resize(size)  # type: ignore[attr-defined]

    async def fsync(self) -> None:
        if self.writable:
            await self.image.flush()  # type: ignore[attr-defined]


def build_tree(image: Image) -> DirNode:
    """The directory tree of a mount of IMAGE."""
    mtime = os.stat(image.path).st_mtime_ns
    root = DirNode("", mtime_ns=mtime)
    root.children["disk.raw"] = FileNode("disk.raw", DiskView(image))
    root.children["snapshots"] = DirNode("snapshots", mtime_ns=mtime)
    root.children["bitmaps"] = DirNode("bitmaps", mtime_ns=mtime)
    return root


__all__ = ["FileView", "DirNode", "FileNode", "DiskView", "build_tree", "L1Table"]
