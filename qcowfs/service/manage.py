"""Snapshot, bitmap and checkpoint commands on an open image.

One dispatcher for both ways in: `qcowfs snapshot|bitmap|checkpoint IMAGE`
opens the image itself and runs the request here; the same command on a
MOUNTPOINT sends the request over the control socket, and the daemon runs
it here against the image it serves (then tells the file tree what
changed). So a command means the same whether the image is mounted or not.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field, fields
from typing import Any, Awaitable, Callable

from ..aio import Image
from ..errors import InUseError, RequestError


async def _nothing() -> None:
    return None


@dataclass
class Hooks:
    """What the daemon adds: whether a file is open, and what to refresh."""

    # snapshot_open(id_str): a snapshot's file is open (it must not be deleted)
    snapshot_open: Callable[[str], bool] = lambda _sid: False
    # bitmap_open(name): a bitmap's file is open (it must not be removed)
    bitmap_open: Callable[[str], bool] = lambda _name: False
    # changed(): the snapshot or bitmap list changed (rebuild those directories)
    changed: Callable[[], None] = lambda: None
    # disk_open(): disk.raw (or a file showing part of it) is open
    disk_open: Callable[[], bool] = lambda: False
    # disk_changed(): the disk's content changed under its files (drop what is cached)
    disk_changed: Callable[[], Awaitable[None]] = _nothing


@dataclass
class Manager:
    """What the control socket asks of a mounted image (info, check,
    snapshots, bitmaps, checkpoints), run on the daemon's image."""

    image: Image
    hooks: Hooks = field(default_factory=Hooks)

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """Run one request ({"op": ..., args}); a request that does not fit its
        operation is a RequestError before anything runs (so a TypeError from
        inside an operation is a bug, reported as one, never "bad request")."""
        if not isinstance(request, dict):
            raise RequestError("bad request: not a JSON object")
        op = str(request.get("op", ""))
        handler = OPS.get(op)
        if handler is None:
            raise RequestError(f"unknown request '{op}'")
        args = {k: v for k, v in request.items() if k != "op"}
        try:
            inspect.signature(handler).bind(self, **args)
        except TypeError as e:
            raise RequestError(f"bad request '{op}': {e}") from None
        return await handler(self, **args)

    # ---- what qemu-img info and check show --------------------------------------------

    async def info(self) -> dict[str, Any]:
        return {"info": await self.image.info()}

    async def check(self) -> dict[str, Any]:
        """A check of the image as it is now (never a repair: that needs the
        image to itself, unmounted)."""
        result = await self.image.check()
        return {"check": {f.name: getattr(result, f.name) for f in fields(result)}}

    # ---- snapshots -------------------------------------------------------------------

    async def snapshot_list(self) -> dict[str, Any]:
        return {"snapshots": [s.json() for s in self.image.snapshots]}

    async def snapshot_create(self, name: str) -> dict[str, Any]:
        snapshot = await self.image.create_snapshot(str(name))
        self.hooks.changed()
        return {"snapshot": snapshot.json()}

    async def snapshot_delete(self, name: str) -> dict[str, Any]:
        snapshot = self.image.snapshot(str(name)).snapshot
        assert snapshot is not None
        if self.hooks.snapshot_open(snapshot.id):
            raise InUseError(f"snapshot '{snapshot.name}' is in use (its file is open): not deleted")
        await self.image.delete_snapshot(str(name))
        self.hooks.changed()
        return {}

    async def snapshot_apply(self, name: str) -> dict[str, Any]:
        """Revert the disk to snapshot NAME. Refused while disk.raw is open: a
        program reading or writing it would see another disk under it."""
        if self.hooks.disk_open():
            raise InUseError("disk.raw (or a partition of it) is open: close it before applying a snapshot")
        await self.image.apply_snapshot(str(name))
        await self.hooks.disk_changed()
        self.hooks.changed()
        return {}

    # ---- bitmaps ------------------------------------------------------------------------

    async def bitmap_list(self) -> dict[str, Any]:
        return {"bitmaps": [b.json() | ({"problem": b.problem} if b.problem else {}) for b in self.image.bitmaps]}

    async def bitmap_add(self, name: str, granularity: int | None = None, enabled: bool = True) -> dict[str, Any]:
        await self.image.add_bitmap(str(name), int(granularity) if granularity else None, bool(enabled))
        self.hooks.changed()
        return {}

    async def _changed(self, change: Awaitable[None]) -> dict[str, Any]:
        await change
        self.hooks.changed()
        return {}

    async def bitmap_remove(self, name: str) -> dict[str, Any]:
        if self.hooks.bitmap_open(str(name)):
            raise InUseError(f"bitmap '{name}' is in use (its file is open): not removed")
        return await self._changed(self.image.remove_bitmap(str(name)))

    async def bitmap_clear(self, name: str) -> dict[str, Any]:
        return await self._changed(self.image.clear_bitmap(str(name)))

    async def bitmap_enable(self, name: str) -> dict[str, Any]:
        return await self._changed(self.image.enable_bitmap(str(name)))

    async def bitmap_disable(self, name: str) -> dict[str, Any]:
        return await self._changed(self.image.disable_bitmap(str(name)))

    async def bitmap_merge(self, name: str, sources: list[str], source_image: str | None = None) -> dict[str, Any]:
        if not isinstance(sources, list):
            raise RequestError("bad request 'bitmap-merge': sources must be a list")
        return await self._changed(self.image.merge_bitmaps(
            str(name), *[str(s) for s in sources], source_image=str(source_image) if source_image else None))

    # ---- checkpoints -----------------------------------------------------------------------

    async def checkpoint(self, name: str) -> dict[str, Any]:
        made = await self.image.checkpoint(str(name))
        self.hooks.changed()
        return {"snapshot": made.snapshot.json(), "bitmaps": list(made.bitmaps)}


OPS: dict[str, Callable[..., Awaitable[dict[str, Any]]]] = {
    "info": Manager.info,
    "check": Manager.check,
    "snapshot-list": Manager.snapshot_list,
    "snapshot-create": Manager.snapshot_create,
    "snapshot-delete": Manager.snapshot_delete,
    "snapshot-apply": Manager.snapshot_apply,
    "bitmap-list": Manager.bitmap_list,
    "bitmap-add": Manager.bitmap_add,
    "bitmap-remove": Manager.bitmap_remove,
    "bitmap-clear": Manager.bitmap_clear,
    "bitmap-enable": Manager.bitmap_enable,
    "bitmap-disable": Manager.bitmap_disable,
    "bitmap-merge": Manager.bitmap_merge,
    "checkpoint": Manager.checkpoint,
}
