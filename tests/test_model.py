"""Model-based test across feature combinations (issue 9): hypothesis drives qcowfs' Image.

Every example builds one image with qemu-img / qemu-io from a drawn `Layout`
(cluster size 512 B - 2 MiB, refcount width 1-64, v2/v3, extended L2, lazy
refcounts (possibly left dirty), zlib/zstd, a qcow2 backing file with data,
compressed clusters, internal snapshots, auto and disabled persistent bitmaps,
LUKS encryption, an external data file, with or without data_file_raw, preallocation),
then runs sessions on it in-process: writes of 1 byte to several MiB (unaligned,
all-zero, and sequential runs long enough to grow the refcount table), discards
and zero-range (fallocate), SEEK_DATA/SEEK_HOLE checks, disk growth (which grows
the L1 table), flushes, concurrent writes, read-backs, snapshot apply (the disk
becomes the snapshot's; refused while the image has bitmaps, as QEMU). Between
sessions, while the image is closed, QEMU changes it: snapshot create/delete,
bitmap add/remove/clear, resize, writes; and qcowfs commits the image into its
backing file or rebases it onto a (changed) copy of it, after which the disk must
read the same. After every session the whole oracle of
tests/inproc.py must hold: `qemu-img check` exit 0, `qemu-img compare` identical
to the raw model, every snapshot unchanged, every bitmap exactly as expected.

The two reproductions of issue 9 are explicit tests in test_inproc.py (hypothesis
`@example` does not apply to state machines); the layout strategy below draws
their shape (512-byte clusters with a bitmap, or with a resize after the refcount
table grew) often.

Knobs (environment): QCOWFS_MODEL_EXAMPLES (examples per run), QCOWFS_MODEL_STEPS
(steps per example), QCOWFS_MODEL_BUDGET_MB (bytes written through qcowfs per
example), QCOWFS_MODEL_STATS (a file that gets one JSON line per example: used by
`make soak` to count examples and layouts), QCOWFS_MODEL_SHRINK=0 (report the
first failing example without shrinking it).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from functools import wraps
from pathlib import Path
from typing import Any, Callable, TypeVar

import pytest
from hypothesis import HealthCheck, Phase, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, precondition, rule,
                                 run_state_machine_as_test)

from inproc import (GiB, KiB, MiB, BitmapSpec, Layout, Subject, TrioThread, build, make_data,
                    snapshot_fits)

EXAMPLES = int(os.environ.get("QCOWFS_MODEL_EXAMPLES", "40"))
STEPS = int(os.environ.get("QCOWFS_MODEL_STEPS", "16"))
BUDGET = int(os.environ.get("QCOWFS_MODEL_BUDGET_MB", "16")) * MiB
STATS = os.environ.get("QCOWFS_MODEL_STATS")
SHRINK = os.environ.get("QCOWFS_MODEL_SHRINK", "1") != "0"
# the whole run, shrinking included (hypothesis stops shrinking after 300 s by itself)
TIMEOUT = int(os.environ.get("QCOWFS_MODEL_TIMEOUT", "900"))
MAX_SIZE = 1 * GiB          # grown disks stay below this (the model is a sparse file)
KINDS = ("random", "random", "zeros", "pattern", "text")

F = TypeVar("F", bound=Callable[..., Any])
RUNS: list[dict[str, Any]] = []     # one entry per example run by this process


# --------------------------------------------------------------------------
# layouts

GRANULARITIES = (512, 4 * KiB, 64 * KiB, 1 * MiB)


@st.composite
def bitmap_specs(draw: st.DrawFn, cluster_size: int, names: list[str]) -> tuple[BitmapSpec, ...]:
    n = draw(st.integers(0, 3))
    return tuple(BitmapSpec(names[i], draw(st.booleans()),
                            draw(st.sampled_from(GRANULARITIES + (cluster_size,))))
                 for i in range(n))


@st.composite
def layouts(draw: st.DrawFn) -> Layout:
    """Any buildable layout; half of them the shapes of issue 9 (512-byte clusters, a bitmap
    or none, wide refcounts, a disk big enough that a write run grows the refcount table),
    as the class of bug found there needs several steps to show: grow, then rewrite the
    header (store bitmaps at close, resize)."""
    seed = draw(st.integers(0, 2**16))
    profile = draw(st.sampled_from(("general", "issue9")))
    if profile == "issue9":
        shape = draw(st.sampled_from(((), (BitmapSpec("bm0", True, 4 * KiB),),
                                      (BitmapSpec("bm0", True, 512), BitmapSpec("off", False, 64 * KiB)))))
        return Layout(size=draw(st.integers(16, 64)) * MiB, cluster_size=512,
                      refcount_bits=draw(st.sampled_from((16, 32, 64, 64))), bitmaps=shape,
                      prefill=draw(st.booleans()), snapshots=draw(st.integers(0, 1)), seed=seed)

    cluster_size = 1 << draw(st.sampled_from((9, 9, 9, 10, 11, 12, 12, 14, 15, 16, 16, 17, 19, 21)))
    v3 = draw(st.sampled_from((True, True, True, False)))
    refcount_bits = draw(st.sampled_from((1, 2, 4, 8, 16, 16, 32, 64))) if v3 else 16
    extended_l2 = v3 and cluster_size >= 16 * KiB and draw(st.booleans())
    lazy = v3 and draw(st.booleans())
    dirty = lazy and draw(st.booleans())
    compression = draw(st.sampled_from(("zlib", "zstd"))) if v3 else "zlib"
    # small disks for big clusters: a 2 MiB-cluster disk of 24 MiB has 12 clusters
    top = 40 * MiB if cluster_size <= 4 * KiB else 64 * MiB if cluster_size <= 128 * KiB else 24 * MiB
    sectors = draw(st.one_of(st.integers(1, 4 * MiB // 512), st.integers(1, top // 512)))
    size = sectors * 512
    backing_size = 0
    backing_cs = 64 * KiB
    if draw(st.integers(0, 3)) == 0:
        backing_size = max(512, draw(st.integers(size // 2, size * 3 // 2)) // 512 * 512)
        backing_cs = 1 << draw(st.sampled_from((9, 12, 16, 21)))
    # The backing file LUKS-encrypted too (half of them), with the image's key or its own:
    # every passphrase is tried on every layer (host/secret.py's Keyring).
    backing_key = draw(st.sampled_from(("", "", "same", "other"))) if backing_size else ""
    # An external data file (a sixth of v3 layouts; data_file_raw in half of those, where
    # no backing file is): QEMU puts neither compressed clusters nor snapshots there.
    data_file = draw(st.sampled_from(("", "", "", "", "external", "raw"))) if v3 else ""
    if data_file == "raw" and (backing_size or dirty):
        data_file = "external"
    # Preallocated (a quarter of layouts): QEMU allows it over a backing file only with
    # extended L2, compresses into unallocated clusters only, and a write into a
    # preallocated cluster allocates nothing (so lazy refcounts are never left dirty).
    preallocation = draw(st.sampled_from(("off",) * 9 + ("metadata", "falloc", "full")))
    if dirty or (backing_size and not extended_l2):
        preallocation = "off"
    compressed = 0 if data_file or preallocation != "off" else draw(st.integers(0, 4)) if draw(st.booleans()) else 0
    snapshots = 0 if dirty or data_file else draw(st.integers(0, 2))
    while snapshots and not snapshot_fits(refcount_bits, snapshots, compressed):
        snapshots -= 1
    bitmaps: tuple[BitmapSpec, ...] = ()
    if v3 and not dirty:
        bitmaps = draw(bitmap_specs(cluster_size, ["b0", "b1", "b2"]))
    return Layout(size=size, cluster_size=cluster_size, refcount_bits=refcount_bits,
                  compat="1.1" if v3 else "0.10", extended_l2=extended_l2, lazy_refcounts=lazy,
                  dirty=dirty, compression_type=compression, backing_size=backing_size,
                  backing_cluster_size=backing_cs, prefill=draw(st.booleans()), compressed=compressed,
                  snapshots=snapshots, bitmaps=bitmaps, encrypted=draw(st.integers(0, 5)) == 0,
                  data_file=data_file, preallocation=preallocation, backing_key=backing_key, seed=seed)


# --------------------------------------------------------------------------
# the machine

def step(fn: F) -> F:
    """Remember that a step failed: teardown must then only release the image, not judge it
    (a second error would hide the first). Hypothesis' own control flow (StopTest when an
    example runs out of data, a BaseException) is no failure: draws come before any I/O."""
    @wraps(fn)
    def wrapper(self: "ImageMachine", *args: Any, **kw: Any) -> Any:
        self.steps += 1
        try:
            return fn(self, *args, **kw)
        except Exception:
            self.failed = True
            raise
    return wrapper  # type: ignore[return-value]


class ImageMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="qcowfs-model-"))
        self.trio = TrioThread()
        self.s: Subject | None = None
        self.steps = 0
        self.failed = False
        self.started = time.monotonic()
        self.bitmap_names = 0

    # ---- helpers ----------------------------------------------------------------

    @property
    def subject(self) -> Subject:
        assert self.s is not None
        return self.s

    def is_open(self) -> bool:
        return self.s is not None and self.s.open_image is not None

    def is_closed(self) -> bool:
        return self.s is not None and self.s.open_image is None

    def budget_left(self) -> int:
        return BUDGET - self.subject.written

    def draw_range(self, data: st.DataObject, max_len: int) -> tuple[int, int]:
        """An (offset, length) inside the disk: tiny, cluster-sized, or MiB-sized; unaligned,
        cluster-aligned, or at the very end."""
        size, cs = self.subject.model.size, self.subject.layout.cluster_size
        max_len = max(1, min(max_len, size))
        length = data.draw(st.one_of(st.integers(1, 600), st.integers(1, 4 * cs + 1),
                                     st.integers(1, 4).map(lambda k: k * cs), st.integers(1, 6 * MiB))
                           .map(lambda n: min(n, max_len)), label="length")
        top = size - length
        offset = data.draw(st.one_of(st.integers(0, top), st.integers(0, top // cs).map(lambda i: i * cs),
                                     st.just(top)), label="offset")
        return offset, length

    # ---- build ----------------------------------------------------------------------

    @initialize(layout=layouts())
    @step
    def build_and_open(self, layout: Layout) -> None:
        """The first session opens the image as QEMU left it (a dirty one included: qcowfs
        must rebuild its refcounts before anyone else writes it)."""
        note(layout.describe())
        self.s = build(self.tmp / "img", layout)
        self.trio.run(self.subject.open)

    # ---- in a session ---------------------------------------------------------------

    @precondition(lambda self: self.is_open() and self.budget_left() > 0)
    @rule(data=st.data())
    @step
    def write(self, data: st.DataObject) -> None:
        offset, length = self.draw_range(data, self.budget_left())
        kind = data.draw(st.sampled_from(KINDS), label="kind")
        seed = data.draw(st.integers(0, 2**16), label="seed")
        self.trio.run(self.subject.write, offset, make_data(kind, length, seed))

    @precondition(lambda self: self.is_open() and self.budget_left() >= MiB)
    @rule(data=st.data())
    @step
    def write_run(self, data: st.DataObject) -> None:
        """Sequential 1 MiB writes (dd's pattern): on small clusters this is what grows the
        refcount table, many times over with wide refcounts."""
        size = self.subject.model.size
        most = max(1, min(self.budget_left(), size) // MiB)
        count = min(most, data.draw(st.sampled_from((1, 2, 4, 8, 12, 16, 24, 32, 48)), label="MiB"))
        start = data.draw(st.integers(0, max(0, size - count * MiB)), label="start")
        start = start // 512 * 512 if data.draw(st.booleans(), label="sector aligned") else start
        kind = data.draw(st.sampled_from(("random", "random", "text", "zeros")), label="kind")

        async def run() -> None:
            for i in range(count):
                off = start + i * MiB
                n = min(MiB, size - off)
                if n <= 0:
                    break
                await self.subject.write(off, make_data(kind, n, i))
        self.trio.run(run)

    @precondition(lambda self: self.is_open() and self.budget_left() > 0)
    @rule(data=st.data())
    @step
    def write_concurrently(self, data: st.DataObject) -> None:
        """A few disjoint writes in flight at once."""
        size = self.subject.model.size
        n = data.draw(st.integers(2, 6), label="writes")
        slot = size // n
        if slot < 2:
            return
        writes = []
        for i in range(n):
            length = data.draw(st.integers(1, max(1, min(slot, 512 * KiB, self.budget_left() // n))))
            off = i * slot + data.draw(st.integers(0, slot - length))
            writes.append((off, make_data(data.draw(st.sampled_from(KINDS)), length, i)))
        self.trio.run(self.subject.write_concurrently, writes)

    @precondition(lambda self: self.is_open())
    @rule(data=st.data())
    @step
    def discard(self, data: st.DataObject) -> None:
        """fallocate PUNCH_HOLE (unmap) or ZERO_RANGE: reads zeros after, freed clusters
        reach refcount 0 (check finds no leak), shared ones stay for the snapshots."""
        offset, length = self.draw_range(data, 8 * MiB)
        unmap = data.draw(st.booleans(), label="unmap")
        self.trio.run(self.subject.zero, offset, length, unmap)

    @precondition(lambda self: self.is_open())
    @rule(data=st.data())
    @step
    def seek(self, data: st.DataObject) -> None:
        """SEEK_DATA / SEEK_HOLE answers are consistent with what reads show: a hole reads
        zeros up to the next data."""
        offset, _ = self.draw_range(data, 1)
        self.trio.run(self.subject.check_seek, offset)

    @precondition(lambda self: self.is_open())
    @rule(data=st.data())
    @step
    def read_back(self, data: st.DataObject) -> None:
        offset, length = self.draw_range(data, 8 * MiB)
        self.trio.run(self.subject.read_back, offset, length)

    @precondition(lambda self: self.is_open() and self.subject.model.size < MAX_SIZE)
    @rule(data=st.data())
    @step
    def grow(self, data: st.DataObject) -> None:
        """Grow the disk through qcowfs; where QEMU refuses (bitmaps; v2 with snapshots), the
        refusal is what is checked."""
        new = self.new_size(data)
        self.trio.run(self.subject.resize, new)

    def new_size(self, data: st.DataObject) -> int:
        """A larger size: a few sectors more, a few MiB more, or past the end of what the L1
        table covers now (so it has to grow, when that stays below MAX_SIZE)."""
        size, cs = self.subject.model.size, self.subject.layout.cluster_size
        per_l1 = cs * (cs // (16 if self.subject.layout.extended_l2 else 8))
        past_l1 = (size // per_l1 + 1) * per_l1 + 512 * data.draw(st.integers(0, 64), label="sectors past L1")
        options = [size + 512 * data.draw(st.integers(1, 2 * cs // 512 + 8), label="sectors"),
                   size + 512 * data.draw(st.integers(1, 16 * MiB // 512), label="more sectors")]
        if past_l1 < MAX_SIZE:
            options.append(past_l1)
        return min(MAX_SIZE, data.draw(st.sampled_from(options), label="new size"))

    @precondition(lambda self: self.is_open())
    @rule()
    @step
    def flush(self) -> None:
        self.trio.run(self.subject.flush)

    @precondition(lambda self: self.is_open())
    @rule()
    @step
    def close_and_judge(self) -> None:
        """The session boundary: close, then QEMU judges everything."""
        self.trio.run(self.subject.close)
        self.subject.judge()

    @precondition(lambda self: self.is_open())
    @rule()
    @step
    def live_snapshot_create(self) -> None:
        """A snapshot while the disk is in use (refused where the refcounts are too narrow)."""
        self.trio.run(self.subject.live_snapshot_create)

    @precondition(lambda self: self.is_open() and bool(self.subject.snapshots))
    @rule(data=st.data())
    @step
    def live_snapshot_delete(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(self.subject.snapshots)), label="id")
        self.trio.run(self.subject.live_snapshot_delete, sid)

    @precondition(lambda self: self.is_open() and bool(self.subject.snapshots))
    @rule(data=st.data())
    @step
    def live_snapshot_apply(self, data: st.DataObject) -> None:
        """Revert the disk to a snapshot (qemu-img snapshot -a), in the open session."""
        sid = data.draw(st.sampled_from(sorted(self.subject.snapshots)), label="id")
        self.trio.run(self.subject.live_snapshot_apply, sid)

    @precondition(lambda self: self.is_open() and len(self.subject.bitmaps) < 4)
    @rule(data=st.data())
    @step
    def live_bitmap_add(self, data: st.DataObject) -> None:
        self.bitmap_names += 1
        gran = data.draw(st.sampled_from(GRANULARITIES + (self.subject.layout.cluster_size,)), label="gran")
        self.trio.run(self.subject.live_bitmap_add, f"live{self.bitmap_names}",
                      data.draw(st.booleans(), label="auto"), gran)

    @precondition(lambda self: self.is_open() and bool(self.subject.bitmaps))
    @rule(data=st.data())
    @step
    def live_bitmap_change(self, data: st.DataObject) -> None:
        names = sorted(self.subject.bitmaps)
        name = data.draw(st.sampled_from(names), label="bitmap")
        action = data.draw(st.sampled_from(("remove", "clear", "enable", "disable", "merge")), label="action")
        source = data.draw(st.sampled_from(names), label="source") if action == "merge" else None
        self.trio.run(self.subject.live_bitmap_change, name, action, source)

    @precondition(lambda self: self.is_open() and len(self.subject.bitmaps) < 6)
    @rule()
    @step
    def live_checkpoint(self) -> None:
        self.trio.run(self.subject.live_checkpoint)

    # ---- between sessions (QEMU changes the closed image) ---------------------------

    @precondition(lambda self: self.is_closed())
    @rule()
    @step
    def reopen(self) -> None:
        self.trio.run(self.subject.open)

    @precondition(lambda self: self.is_closed() and not self.subject.layout.data_file and snapshot_fits(
        self.subject.layout.refcount_bits, len(self.subject.snapshots) + 1, self.subject.layout.compressed))
    @rule()
    @step
    def snapshot_create(self) -> None:
        self.subject.snapshot_create()

    @precondition(lambda self: self.is_closed() and bool(self.subject.layout.backing_size)
                  and not self.subject.snapshots)
    @rule()
    @step
    def commit(self) -> None:
        """qcowfs commit into the backing file: the disk reads the same (QEMU judges)."""
        self.trio.run(self.subject.commit_offline)

    @precondition(lambda self: self.is_closed() and bool(self.subject.layout.backing_size))
    @rule(data=st.data())
    @step
    def rebase(self, data: st.DataObject) -> None:
        """qcowfs rebase onto a changed copy of the backing file: the disk reads the same."""
        size = self.subject.layout.backing_size
        offset = data.draw(st.integers(0, size - 1), label="offset")
        length = data.draw(st.integers(1, min(size - offset, 256 * 1024)), label="length")
        self.trio.run(self.subject.rebase_offline, offset, length, data.draw(st.integers(1, 255), label="byte"),
                      data.draw(st.sampled_from([0, 0xa5]), label="past_end"))

    @precondition(lambda self: self.is_closed() and not self.subject.layout.backing_size
                  and not self.subject.layout.data_file and not self.subject.snapshots
                  and not self.subject.bitmaps)
    @rule(byte=st.integers(1, 255))
    @step
    def rebase_standalone(self, byte: int) -> None:
        """qcowfs rebase of an image with no backing file onto a base full of data:
        the disk reads the same (its holes stay zeros)."""
        self.trio.run(self.subject.rebase_standalone_offline, byte)

    @precondition(lambda self: self.is_closed())
    @rule(data=st.data())
    @step
    def convert(self, data: st.DataObject) -> None:
        """qcowfs convert of the disk or of a snapshot, to qcow2 (plain or compressed)
        or raw: it reads as the model, and the new image is clean."""
        out_format = data.draw(st.sampled_from(("qcow2", "raw")), label="out_format")
        compress = None
        if out_format == "qcow2":
            compress = data.draw(st.sampled_from((None, "zlib", "zstd")), label="compress")
        snapshot = None
        if self.subject.snapshots and data.draw(st.booleans(), label="of a snapshot"):
            snapshot = data.draw(st.sampled_from(sorted(self.subject.snapshots)), label="snapshot id")
        self.trio.run(self.subject.convert_offline, out_format, compress, snapshot)

    @precondition(lambda self: self.is_closed() and bool(self.subject.snapshots))
    @rule(data=st.data())
    @step
    def snapshot_delete(self, data: st.DataObject) -> None:
        self.subject.snapshot_delete(data.draw(st.sampled_from(sorted(self.subject.snapshots)), label="id"))

    @precondition(lambda self: self.is_closed() and self.subject.layout.v3 and len(self.subject.bitmaps) < 3)
    @rule(data=st.data())
    @step
    def bitmap_add(self, data: st.DataObject) -> None:
        self.bitmap_names += 1
        gran = data.draw(st.sampled_from(GRANULARITIES + (self.subject.layout.cluster_size,)), label="gran")
        self.subject.bitmap_add(f"new{self.bitmap_names}", data.draw(st.booleans(), label="auto"), gran)

    @precondition(lambda self: self.is_closed() and bool(self.subject.bitmaps))
    @rule(data=st.data())
    @step
    def bitmap_remove(self, data: st.DataObject) -> None:
        self.subject.bitmap_remove(data.draw(st.sampled_from(sorted(self.subject.bitmaps)), label="bitmap"))

    @precondition(lambda self: self.is_closed() and bool(self.subject.bitmaps))
    @rule(data=st.data())
    @step
    def bitmap_clear(self, data: st.DataObject) -> None:
        self.subject.bitmap_clear(data.draw(st.sampled_from(sorted(self.subject.bitmaps)), label="bitmap"))

    @precondition(lambda self: self.is_closed() and self.subject.offline_resize_refused() is None
                  and self.subject.model.size < MAX_SIZE)
    @rule(data=st.data())
    @step
    def resize_offline(self, data: st.DataObject) -> None:
        self.subject.resize_offline(self.new_size(data))

    @precondition(lambda self: self.is_closed())
    @rule(data=st.data())
    @step
    def amend(self, data: st.DataObject) -> None:
        """qcowfs amend beside qemu-img amend: a version change (a downgrade expands
        the zero clusters of every table), a refcount width, lazy refcounts."""
        lay = self.subject.layout
        choices: list[dict[str, Any]] = [{"compat": "0.10" if lay.v3 else "1.1"}]
        widths = st.sampled_from((1, 2, 4, 8, 16, 32, 64))
        if lay.v3:
            choices += [{"refcount_bits": data.draw(widths, label="bits")}, {"lazy_refcounts": not lay.lazy_refcounts},
                        {"compat": "0.10", "refcount_bits": 16}]
        else:
            choices += [{"compat": "1.1", "refcount_bits": data.draw(widths, label="bits"), "lazy_refcounts": True}]
        self.subject.amend_offline(data.draw(st.sampled_from(choices), label="options"))

    @precondition(lambda self: self.is_closed())
    @rule(data=st.data())
    @step
    def qemu_write(self, data: st.DataObject) -> None:
        offset, length = self.draw_range(data, 256 * KiB)
        self.subject.qemu_write(offset, length, data.draw(st.integers(0, 255), label="byte"))

    # ---- end ----------------------------------------------------------------------------

    def teardown(self) -> None:
        try:
            if self.s is not None and self.is_open():
                if self.failed:
                    self.trio.run(self.subject.abandon)
                else:
                    self.close_and_judge()
        finally:
            self.trio.close()
            if self.s is not None:
                entry = {"layout": self.s.layout.describe(), "features": self.s.layout.features(),
                         "steps": self.steps, "sessions": self.s.sessions, "written": self.s.written,
                         "seconds": round(time.monotonic() - self.started, 2), "failed": self.failed}
                RUNS.append(entry)
                if STATS:
                    with open(STATS, "a") as f:
                        f.write(json.dumps(entry) + "\n")
            shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def _report(request: pytest.FixtureRequest) -> Any:
    """Say how many examples and distinct layouts ran (soak and CI logs read this)."""
    yield
    if RUNS:
        tr = request.config.pluginmanager.getplugin("terminalreporter")
        line = (f"test_model: {len(RUNS)} examples, {len({r['layout'] for r in RUNS})} distinct layouts, "
                f"{len({r['features'] for r in RUNS})} feature combinations, "
                f"{sum(r['written'] for r in RUNS) / MiB:.0f} MiB written, {sum(r['sessions'] for r in RUNS)} sessions")
        capture = request.config.pluginmanager.getplugin("capturemanager")
        if tr is not None and capture is not None:
            with capture.global_and_fixture_disabled():
                tr.write_line(line)


@pytest.mark.timeout(TIMEOUT)
def test_model() -> None:
    phases = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target] + ([Phase.shrink] if SHRINK else [])
    run_state_machine_as_test(ImageMachine, settings=settings(
        max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, database=None, phases=phases,
        suppress_health_check=list(HealthCheck), print_blob=True))
