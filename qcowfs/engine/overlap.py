"""Which host clusters hold live metadata: QEMU's pre-write overlap check.

Before any metadata structure is written, and before guest data goes to a
host cluster, the target range is checked against every other live
structure. A hit means the image's pointers are inconsistent (an L2 entry
that points into a refcount block, a refcount that calls an L2 table free):
writing would destroy metadata, so the write is refused with an
OverlapError, and the image is marked corrupt by its owner.

Kinds follow QEMU's QCOW2_OL_* names. The map is exact for everything but
the bitmap data clusters (QEMU does not track those either).
"""
from __future__ import annotations

import enum
from collections import Counter

from ..errors import CorruptionError


class Kind(enum.IntFlag):
    MAIN_HEADER = 1 << 0
    ACTIVE_L1 = 1 << 1
    ACTIVE_L2 = 1 << 2
    REFCOUNT_TABLE = 1 << 3
    REFCOUNT_BLOCK = 1 << 4
    SNAPSHOT_TABLE = 1 << 5
    INACTIVE_L1 = 1 << 6
    INACTIVE_L2 = 1 << 7
    BITMAP_DIRECTORY = 1 << 8
    BITMAP_TABLE = 1 << 9
    CRYPTO_HEADER = 1 << 10   # the LUKS header and key material (QEMU counts it, never frees it)


KIND_TEXT = {
    Kind.MAIN_HEADER: "the image header",
    Kind.ACTIVE_L1: "the active L1 table",
    Kind.ACTIVE_L2: "an active L2 table",
    Kind.REFCOUNT_TABLE: "the refcount table",
    Kind.REFCOUNT_BLOCK: "a refcount block",
    Kind.SNAPSHOT_TABLE: "the snapshot table",
    Kind.INACTIVE_L1: "a snapshot's L1 table",
    Kind.INACTIVE_L2: "a snapshot's L2 table",
    Kind.BITMAP_DIRECTORY: "the bitmap directory",
    Kind.BITMAP_TABLE: "a bitmap table",
    Kind.CRYPTO_HEADER: "the LUKS header",
}


class OverlapError(CorruptionError):
    """A write would land on live metadata of another structure."""


class OverlapMap:
    """Host cluster -> kinds of metadata living there.

    One dict lookup per cluster, so the data write path can afford it. A kind
    can be present more than once in a cluster (snapshots share L2 tables):
    the extra references are counted aside, so removing one keeps the rest."""

    def __init__(self, cluster_bits: int) -> None:
        self.cluster_bits = cluster_bits
        self._kinds: dict[int, int] = {}
        self._extra: Counter[tuple[int, int]] = Counter()
        # Structures a damaged header or table places past the end of the file,
        # as (start, end, kind) byte ranges: never a cluster each (they may be
        # huge), but the file may grow into them, and nothing may land there.
        self._far: list[tuple[int, int, int]] = []

    def add_far(self, offset: int, length: int, kind: Kind) -> None:
        """A structure (or its part) past the end of the file: see _far."""
        self._far.append((offset, offset + max(length, 1), int(kind)))

    def forget_far(self, kinds: int) -> None:
        """Forget what KINDS place past the end of the file (add_far)."""
        self._far = [f for f in self._far if not f[2] & kinds]

    def far_end(self, offset: int, length: int) -> int | None:
        """The end of the last structure past the end of the file (add_far)
        that [offset, offset+length) meets; None if it meets none."""
        end = offset + max(length, 1)
        ends = [e for s, e, _ in self._far if offset < e and s < end]
        return max(ends) if ends else None

    def clusters(self) -> list[int]:
        """Every cluster inside the file that holds metadata."""
        return list(self._kinds)

    def _far_kinds(self, offset: int, length: int) -> int:
        end = offset + max(length, 1)
        out = 0
        for s, e, k in self._far:
            if offset < e and s < end:
                out |= k
        return out

    def _clusters(self, offset: int, length: int) -> range:
        cb = self.cluster_bits
        return range(offset >> cb, (offset + max(length, 1) - 1 >> cb) + 1)

    def add(self, offset: int, length: int, kind: Kind) -> None:
        for c in self._clusters(offset, length):
            have = self._kinds.get(c, 0)
            if have & kind:
                self._extra[(c, kind)] += 1
            else:
                self._kinds[c] = have | kind

    def remove(self, offset: int, length: int, kind: Kind) -> None:
        if self._far:
            # The part of the structure past the end of the file (add_far) goes with it.
            cs = 1 << self.cluster_bits
            lo, hi = offset & ~(cs - 1), -(-(offset + max(length, 1)) // cs) * cs
            self._far = [f for f in self._far if not (f[2] & kind and f[0] < hi and lo < f[1])]
        for c in self._clusters(offset, length):
            if self._extra.get((c, kind)):
                self._extra[(c, kind)] -= 1
                if not self._extra[(c, kind)]:
                    del self._extra[(c, kind)]
                continue
            left = self._kinds.get(c, 0) & ~kind
            if left:
                self._kinds[c] = left
            else:
                self._kinds.pop(c, None)

    def remove_kind(self, kind: Kind) -> None:
        """Forget every structure of KIND (before it is rebuilt from scratch)."""
        for c in [c for c, k in self._kinds.items() if k & kind]:
            left = self._kinds[c] & ~kind
            if left:
                self._kinds[c] = left
            else:
                del self._kinds[c]
        for key in [key for key in self._extra if key[1] == kind]:
            del self._extra[key]
        self._far = [f for f in self._far if not f[2] & kind]

    def __eq__(self, other: object) -> bool:
        """The same structures in the same clusters (a map kept up to date
        equals one built afresh from the image)."""
        if not isinstance(other, OverlapMap):
            return NotImplemented
        # (Not the ranges past the end of the file: where they are cut depends
        # on the file's size when the map was built, which a growing file moves.)
        return (self.cluster_bits, self._kinds, +self._extra) == (other.cluster_bits, other._kinds, +other._extra)

    def differences(self, other: "OverlapMap") -> list[str]:
        """What differs from OTHER, for a test's message."""
        out = [f"cluster {c}: {self._kinds.get(c, 0)!r} / {other._kinds.get(c, 0)!r}"
               for c in sorted(set(self._kinds) | set(other._kinds)) if self._kinds.get(c) != other._kinds.get(c)]
        return out + [f"extra {k}: {self._extra.get(k)} / {other._extra.get(k)}"
                      for k in sorted(set(self._extra) | set(other._extra)) if self._extra.get(k) != other._extra.get(k)]

    __hash__ = None  # type: ignore[assignment]

    def kinds_at(self, offset: int, length: int) -> int:
        """The union of the kinds found in [offset, offset+length)."""
        kinds = self._kinds
        out = self._far_kinds(offset, length) if self._far else 0
        if not kinds:
            return out
        for c in self._clusters(offset, length):
            out |= kinds.get(c, 0)
        return out

    def check(self, offset: int, length: int, what: str, ignore: int = 0) -> None:
        """Raise OverlapError if [offset, offset+length) holds metadata other
        than the kinds in IGNORE (a structure is not checked against itself).
        (Written for the data write path: one dict lookup per cluster.)"""
        kinds, cb = self._kinds, self.cluster_bits
        first, last = offset >> cb, (offset + max(length, 1) - 1) >> cb
        if first == last:
            hit = kinds.get(first, 0) & ~ignore
        else:
            hit = 0
            for c in range(first, last + 1):
                hit |= kinds.get(c, 0)
            hit &= ~ignore
        if self._far:
            hit |= self._far_kinds(offset, length) & ~ignore
        if hit:
            first = next(k for k in Kind if hit & k)
            raise OverlapError(f"{what} at {offset:#x} would overwrite {KIND_TEXT[first]}")
