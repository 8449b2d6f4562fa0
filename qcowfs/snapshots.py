"""Internal snapshots: file names, sizes and metadata of each snapshot's view."""
from __future__ import annotations

import datetime as dt
from collections import Counter

from .format import SnapshotEntry


def usable_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\0" not in name and name not in (".", "..")


def snapshot_file_names(entries: list[SnapshotEntry]) -> list[str]:
    """NAME.raw when the name is unique and usable as a file name, else id-ID.raw
    (also when NAME.raw would take the id-ID.raw name of another snapshot)."""
    counts = Counter(e.name for e in entries)
    by_id = [f"id-{e.id_str}.raw" for e in entries]
    taken = set(by_id)
    return [f"{e.name}.raw" if counts[e.name] == 1 and usable_name(e.name)
            and (f"{e.name}.raw" not in taken or f"{e.name}.raw" == i) else i
            for e, i in zip(entries, by_id)]


def snapshot_disk_size(entry: SnapshotEntry, header_size: int) -> int:
    """The snapshot's own virtual size; v2 entries without it use the header's."""
    size = entry.disk_size if entry.disk_size is not None else header_size
    return size & ~511  # QEMU counts whole sectors


def snapshot_xattrs(entry: SnapshotEntry, disk_size: int) -> dict[str, bytes]:
    date = dt.datetime.fromtimestamp(entry.date_sec + entry.date_nsec / 1e9, dt.timezone.utc)
    return {
        "user.qcow2.id": entry.id_str.encode(),
        "user.qcow2.name": entry.name.encode(),
        "user.qcow2.date": date.isoformat().encode(),
        "user.qcow2.vm_clock_ns": str(entry.vm_clock_nsec).encode(),
        "user.qcow2.vm_state_size": str(entry.state_size).encode(),
        "user.qcow2.disk_size": str(disk_size).encode(),
    }
