"""Plain records the public API returns: what `qemu-img info`, `qemu-img
check` and `qemu-img snapshot -l` show, as frozen dataclasses.

They hold values only (no reference to an open image), so they stay valid
after the image is closed and compare and print as data.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from .engine import EXIT_CLEAN, EXIT_CORRUPT, EXIT_FAILED, EXIT_LEAKS
from .engine.info import snapshot_info

__all__ = ["Snapshot", "Bitmap", "CheckResult", "Checkpoint", "Comparison",
           "EXIT_CLEAN", "EXIT_FAILED", "EXIT_CORRUPT", "EXIT_LEAKS"]


@dataclass(frozen=True)
class Snapshot:
    """An internal snapshot, with the fields `qemu-img info` lists."""

    id: str
    name: str
    vm_state_size: int
    date_sec: int
    date_nsec: int
    vm_clock_sec: int
    vm_clock_nsec: int
    # The instruction counter QEMU records with record/replay; None if absent.
    icount: int | None = None

    @classmethod
    def from_entry(cls, entry: Any) -> "Snapshot":
        """The record of a snapshot table entry (qcowfs.format.SnapshotEntry)."""
        d = snapshot_info(entry)
        return cls(id=d["id"], name=d["name"], vm_state_size=d["vm-state-size"],
                   date_sec=d["date-sec"], date_nsec=d["date-nsec"],
                   vm_clock_sec=d["vm-clock-sec"], vm_clock_nsec=d["vm-clock-nsec"],
                   icount=d.get("icount"))

    def json(self) -> dict[str, Any]:
        """The object `qemu-img info --output=json` lists under "snapshots"."""
        d: dict[str, Any] = {"id": self.id, "name": self.name, "vm-state-size": self.vm_state_size,
                             "date-sec": self.date_sec, "date-nsec": self.date_nsec,
                             "vm-clock-sec": self.vm_clock_sec, "vm-clock-nsec": self.vm_clock_nsec}
        if self.icount is not None:
            d["icount"] = self.icount
        return d


@dataclass(frozen=True)
class Bitmap:
    """A persistent dirty bitmap, as `qemu-img info` lists it."""

    name: str
    granularity: int
    # QEMU's flag names: "auto" (enabled: tracks writes), "in-use", ...
    flags: tuple[str, ...] = ()
    # Why the bitmap cannot be used (in use by a crashed writer, unknown
    # extra data...), or None.
    problem: str | None = None

    @property
    def enabled(self) -> bool:
        """Whether it tracks writes (QEMU's "auto" flag)."""
        return "auto" in self.flags

    def json(self) -> dict[str, Any]:
        """The object `qemu-img info --output=json` lists under "bitmaps"."""
        return {"name": self.name, "granularity": self.granularity, "flags": list(self.flags)}


@dataclass(frozen=True)
class Checkpoint:
    """What `Image.checkpoint(name)` made in one commit: the snapshot, and the
    bitmaps that exist afterwards (the frozen copies B@NAME and the new NAME)."""

    snapshot: Snapshot
    bitmaps: tuple[str, ...]


@dataclass(frozen=True)
class CheckResult:
    """What `qemu-img check` reports; `returncode` is its exit code."""

    corruptions: int
    leaks: int
    check_errors: int
    # qemu-img check's exit code: 0 clean, 1 check failed, 2 corruptions, 3 leaks only.
    returncode: int
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    image_end_offset: int = 0
    # (leaks fixed, corruptions fixed) after check(repair=True), else None.
    fixed: tuple[int, int] | None = None
    # What qemu-img prints on stderr: one line per error or leak (the first 100).
    messages: tuple[str, ...] = field(default=(), repr=False)
    # Lines left out of MESSAGES.
    unsaid: int = field(default=0, repr=False)
    # The `qemu-img check --output=json` object.
    json: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def of(cls, result: Any, filename: str) -> "CheckResult":
        """The record of the engine's check result (engine.check.CheckResult)
        of the image at FILENAME: the same fields, frozen."""
        values = {f.name: getattr(result, f.name) for f in fields(cls) if f.name != "json"}
        values["messages"] = tuple(values["messages"])
        return cls(**values, json=result.json(filename))


@dataclass(frozen=True)
class Comparison:
    """What `qemu-img compare` finds (`qcowfs.compare`)."""

    identical: bool
    # The two disks' sizes (different: the shorter was compared as if it
    # read zeros past its end; in the strict mode that alone is a difference).
    sizes: tuple[int, int]
    # Where the first difference is: a 512-byte sector's start for content,
    # a range's start for allocation (strict mode); None if identical or
    # the strict sizes differ.
    offset: int | None = None
    # The difference is of allocation, not content (strict mode).
    allocation: bool = False

    @property
    def size_mismatch(self) -> bool:
        return self.sizes[0] != self.sizes[1]
