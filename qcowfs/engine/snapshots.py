"""Internal snapshots: names, sizes, and what makes an entry unusable."""
from __future__ import annotations


from ..errors import NameTakenError, NotFoundError, RequestError
from ..format import MAX_L1_BYTES, SNAPSHOT_HEADER_SIZE, SNAPSHOT_MIN_EXTRA_V3, SnapshotEntry


# The orders in which a key is tried as a snapshot's name or id. A name
# first: qcowfs's own lookups (qemu-img snapshot -d takes names alone). An id
# first: qemu-img snapshot -a and convert -l (QEMU's find_snapshot_by_id_or_name),
# so that "2" reverts to the snapshot with id 2 in both tools, not to one named "2".
BY_NAME = ("name", "id")
BY_ID = ("id", "name")


def find_snapshot(snapshots: list[SnapshotEntry], key: str, order: tuple[str, ...] = BY_NAME) -> int:
    """Index of the snapshot KEY names, tried as ORDER says ("name", "id")."""
    for field in order:
        for i, s in enumerate(snapshots):
            if (s.name if field == "name" else s.id_str) == key:
                return i
    raise NotFoundError(f"no snapshot '{key}'")


def usable_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\0" not in name and name not in (".", "..")


def check_new_name(what: str, name: str, names: list[str], max_bytes: int, max_count: int) -> None:
    """NAME may name a new WHAT ("snapshot", "bitmap") beside NAMES: usable as
    a file name (its file is NAME.raw or NAME), at most MAX_BYTES, unique, and
    the image holds fewer than MAX_COUNT of them."""
    if not usable_name(name) or len(name.encode()) > max_bytes:
        raise RequestError(f"'{name}' cannot be a {what} name (it must be usable as a file name: "
                           f"not empty, no '/', at most {max_bytes} bytes)")
    if name in names:
        raise NameTakenError(f"a {what} named '{name}' exists already")
    if len(names) >= max_count:
        raise RequestError(f"the image has {max_count} {what}s, the most qcow2 allows")


def snapshot_disk_size(entry: SnapshotEntry, header_size: int) -> int:
    """The snapshot's own virtual size; v2 entries without it use the header's."""
    size = entry.disk_size if entry.disk_size is not None else header_size
    return size & ~511  # QEMU counts whole sectors


# QEMU's limit on a snapshot entry's extra data (QCOW_MAX_SNAPSHOT_EXTRA_DATA).
MAX_SNAPSHOT_EXTRA = 1024


def counted_table_length(snapshots: list[SnapshotEntry], nb_snapshots: int) -> int:
    """The bytes of the snapshot table a header of NB_SNAPSHOTS names, as
    check counts and the overlap map holds them: its entries SNAPSHOTS, or
    (a table that could not be read) its first entry's header."""
    if not nb_snapshots:
        return 0
    return sum(len(s.pack()) for s in snapshots) or SNAPSHOT_HEADER_SIZE


def too_much_extra(entry: SnapshotEntry) -> bool:
    """More extra data than QEMU reads: it refuses the image, and its repair
    keeps what it knows of the extra data."""
    return len(entry.extra) > MAX_SNAPSHOT_EXTRA


def snapshot_problem(entry: SnapshotEntry, version: int, cluster_size: int,
                     file_size: int) -> tuple[str, bool] | None:
    """What is wrong with one snapshot entry, and whether its disk can still
    be read; None when nothing is. QEMU opens such an image and fails only
    the snapshot's own reads; qemu-img check counts each as a corruption."""
    if entry.l1_size * 8 > MAX_L1_BYTES:
        return f"snapshot {entry.id_str} L1 table is too large", False
    if entry.l1_size and (entry.l1_table_offset % cluster_size or entry.l1_table_offset < cluster_size
                          or entry.l1_table_offset + entry.l1_size * 8 > file_size):
        return f"snapshot {entry.id_str} L1 table offset is invalid", False
    if version >= 3 and len(entry.extra) < SNAPSHOT_MIN_EXTRA_V3:
        return f"snapshot {entry.id_str} has too little extra data", True
    if too_much_extra(entry):  # (read only by a repair: opening.read_snapshot_table)
        return f"snapshot {entry.id_str} has too much extra data", True
    return None
