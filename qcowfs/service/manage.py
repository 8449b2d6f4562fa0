"""Snapshot, bitmap and checkpoint commands on an open image.

One dispatcher for both ways in: `qcowfs snapshot|bitmap|checkpoint IMAGE`
opens the image itself and runs the request here; the same command on a
MOUNTPOINT sends the request over the control socket, and the daemon runs
it here against the image it serves (then tells the file tree what
changed). So a command means the same whether the image is mounted or not.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from ..errors import InUseError, QcowError
from ..engine.image import Image
from ..engine.info import snapshot_info
from ..engine.snapshot_ops import find as find_snapshot


@dataclass
class Hooks:
    """What the daemon adds: whether a file is open, and what to refresh."""

    # snapshot_open(id_str): a snapshot's file is open (it must not be deleted)
    snapshot_open: Callable[[str], bool] = lambda _sid: False
    # bitmap_open(name): a bitmap's file is open (it must not be removed)
    bitmap_open: Callable[[str], bool] = lambda _name: False
    # changed(): the snapshot or bitmap list changed (rebuild those directories)
    changed: Callable[[], None] = lambda: None


@dataclass
class Manager:
    image: Image
    hooks: Hooks = field(default_factory=Hooks)

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = str(request.get("op", ""))
        handler = OPS.get(op)
        if handler is None:
            raise QcowError(f"unknown request '{op}'")
        args = {k: v for k, v in request.items() if k != "op"}
        return await handler(self, **args)

    # ---- snapshots -------------------------------------------------------------------

    async def snapshot_list(self) -> dict[str, Any]:
        return {"snapshots": [snapshot_info(s) for s in self.image.snapshots]}

    async def snapshot_create(self, name: str) -> dict[str, Any]:
        entry = await self.image.create_snapshot(str(name))
        self.hooks.changed()
        return {"snapshot": snapshot_info(entry)}

    async def snapshot_delete(self, name: str) -> dict[str, Any]:
        entry = self.image.snapshots[find_snapshot(self.image.meta, str(name))]
        if self.hooks.snapshot_open(entry.id_str):
            raise InUseError(f"snapshot '{entry.name}' is in use (its file is open): not deleted")
        await self.image.delete_snapshot(str(name))
        self.hooks.changed()
        return {}


    # ---- bitmaps ------------------------------------------------------------------------

    async def bitmap_list(self) -> dict[str, Any]:
        return {"bitmaps": [{"name": b.name, "granularity": b.granularity, "flags": b.flag_names,
                             **({"problem": b.problem} if b.problem else {})} for b in self.image.bitmaps]}

    async def bitmap_add(self, name: str, granularity: int | None = None, enabled: bool = True) -> dict[str, Any]:
        await self.image.add_bitmap(str(name), int(granularity) if granularity else None, bool(enabled))
        self.hooks.changed()
        return {}

    async def _bitmap(self, name: str, action: str, sources: list[str] | None = None) -> dict[str, Any]:
        await self.image.change_bitmap(str(name), action, [str(s) for s in sources or []])
        self.hooks.changed()
        return {}

    async def bitmap_remove(self, name: str) -> dict[str, Any]:
        if self.hooks.bitmap_open(str(name)):
            raise InUseError(f"bitmap '{name}' is in use (its file is open): not removed")
        return await self._bitmap(name, "remove")

    async def bitmap_clear(self, name: str) -> dict[str, Any]:
        return await self._bitmap(name, "clear")

    async def bitmap_enable(self, name: str) -> dict[str, Any]:
        return await self._bitmap(name, "enable")

    async def bitmap_disable(self, name: str) -> dict[str, Any]:
        return await self._bitmap(name, "disable")

    async def bitmap_merge(self, name: str, sources: list[str]) -> dict[str, Any]:
        return await self._bitmap(name, "merge", sources)

    # ---- checkpoints -----------------------------------------------------------------------

    async def checkpoint(self, name: str) -> dict[str, Any]:
        entry = await self.image.checkpoint(str(name))
        self.hooks.changed()
        return {"snapshot": snapshot_info(entry),
                "bitmaps": [b.name for b in self.image.bitmaps]}


OPS: dict[str, Callable[..., Awaitable[dict[str, Any]]]] = {
    "snapshot-list": Manager.snapshot_list,
    "snapshot-create": Manager.snapshot_create,
    "snapshot-delete": Manager.snapshot_delete,
    "bitmap-list": Manager.bitmap_list,
    "bitmap-add": Manager.bitmap_add,
    "bitmap-remove": Manager.bitmap_remove,
    "bitmap-clear": Manager.bitmap_clear,
    "bitmap-enable": Manager.bitmap_enable,
    "bitmap-disable": Manager.bitmap_disable,
    "bitmap-merge": Manager.bitmap_merge,
    "checkpoint": Manager.checkpoint,
}
