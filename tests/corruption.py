"""Corruption scenarios of QEMU's qemu-iotests, with QEMU itself as the oracle.

QEMU's own suite (tests/qemu-iotests 060, 080, 112, 137, 138, 214, 039, 036,
061, 244, 271, 290, 261 and tests/qemu-img-bitmaps) pokes bytes into images
and records what QEMU does with them. Each scenario here re-expresses one such
case: it builds an image with qemu-img / qemu-io, corrupts it at offsets read
from the image's own header and tables (never at assumed offsets), and names
the operations to try on it.

`run_qemu` runs those operations with qemu-io (`overlap-check=all`) on one
copy and `run_qcowfs` with qcowfs's image object on another; both return an
`Outcome`, and tests/test_corruption.py holds qcowfs to at least QEMU's
safety. Nothing about QEMU's behaviour is written down here: it is asked at
run time, so the expectations follow the QEMU that is installed.

qcowfs runs in a forked child of the test process. A qcowfs that spins in a
loop without awaiting (a refcount-table entry of 0 once did exactly that)
cannot be stopped by trio.fail_after; a child can be killed. The fork costs
milliseconds, as every module is already imported.
"""
from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import re
import resource
import shutil
import struct
import subprocess
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from images import (EXT_BITMAPS, EXT_FEATURE_TABLE, MAGIC, Header, KiB, MiB, create, patch, qimg,
                    qio, read_u64, set_field, set_incompatible)

# How long one qcowfs session (open, every operation, close) may take before
# it counts as hung. Small images: a healthy session takes well under a second.
QCOWFS_TIMEOUT = float(os.environ.get("CORRUPTION_TIMEOUT", "10"))
QEMU_TIMEOUT = 60

OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO_FLAG = 1

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1


# --------------------------------------------------------------------------
# operations

@dataclass(frozen=True)
class Write:
    """A guest write of LENGTH bytes of PATTERN (or zeros, `write -z` for QEMU)."""

    offset: int
    length: int
    pattern: int = 0x2A
    zero: bool = False

    def qemu(self) -> str:
        if self.zero:
            return f"write -z {self.offset} {self.length}"
        return f"write -P {self.pattern:#x} {self.offset} {self.length}"

    def data(self) -> bytes:
        return bytes(self.length) if self.zero else bytes([self.pattern]) * self.length


@dataclass(frozen=True)
class Read:
    """A guest read of the active disk (disk.raw)."""

    offset: int
    length: int

    def qemu(self) -> str:
        return f"read -v {self.offset} {self.length}"


@dataclass(frozen=True)
class SnapRead:
    """A read of an internal snapshot's disk (snapshots/NAME.raw)."""

    snapshot_id: str
    offset: int
    length: int


Op = Write | Read | SnapRead


def describe(op: Op) -> str:
    if isinstance(op, SnapRead):
        return f"read of snapshot {op.snapshot_id} [{op.offset:#x}, +{op.length:#x})"
    if isinstance(op, Write):
        return f"{'zero ' if op.zero else ''}write [{op.offset:#x}, +{op.length:#x})"
    return f"read [{op.offset:#x}, +{op.length:#x})"


# --------------------------------------------------------------------------
# scenarios

# host ranges (offset, length, what) a scenario's operations must not change
Protect = Callable[[Path], list[tuple[int, int, str]]]


@dataclass
class Scenario:
    """One corruption case of an iotest.

    id: `<iotest>-<case>`. build(directory) makes the corrupted image and
    returns its path. writable: the image is opened read-write (qemu-io's
    default; read-only with `-r`). protect: host ranges, computed on the
    corrupted image before any operation, that qcowfs must leave as they
    were (or exactly as QEMU left them). snapshots: compare every snapshot's
    content (`qemu-img convert -l snapshot.id=`) before and after.
    keep_guest: guest ranges of the active disk whose content must survive
    when QEMU's run left them intact (always, with beyond_qemu: the few
    cases where issue 9 asks more of qcowfs than QEMU does). repair_ok:
    where QEMU refuses, qcowfs may instead repair the image and go on,
    provided `qemu-img check` then finds no corruption (leaks allowed, as
    after a crash: a repair that cannot know whether a cluster is in use
    counts it). issue9: the known-failure class of
    issue 9 this scenario pins down ("" if none).
    """

    id: str
    doc: str
    build: Callable[[Path], Path]
    ops: tuple[Op, ...]
    writable: bool = True
    protect: Protect | None = None
    snapshots: bool = False
    keep_guest: tuple[tuple[int, int], ...] = ()
    beyond_qemu: bool = False
    repair_ok: bool = False
    issue9: str = ""
    mount: bool = False
    extra_check: Callable[[Path, Path, Path], list[str]] | None = None

    @property
    def writes(self) -> bool:
        return any(isinstance(op, Write) for op in self.ops)


SCENARIOS: list[Scenario] = []


def scenario(*args: Any, **kw: Any) -> Scenario:
    s = Scenario(*args, **kw)
    assert s.id not in {x.id for x in SCENARIOS}, s.id
    assert s.writable or not s.writes, s.id
    SCENARIOS.append(s)
    return s


# --------------------------------------------------------------------------
# locating structures (always from the image itself)

def header(path: Path) -> Any:
    """The parsed header (images.Header sets its fields dynamically, hence Any)."""
    return Header(path)


def u64(path: Path, off: int) -> int:
    return read_u64(path, off)


def poke_u64(path: Path, off: int, value: int) -> None:
    patch(path, off, struct.pack(">Q", value))


def poke_u32(path: Path, off: int, value: int) -> None:
    patch(path, off, struct.pack(">I", value))


def reftable_entry_offset(path: Path, index: int = 0) -> int:
    return header(path).refcount_table_offset + 8 * index


def refblock_offset(path: Path, index: int = 0) -> int:
    return u64(path, reftable_entry_offset(path, index)) & ~0x1FF & ((1 << 63) - 1)


def _refcount_location(path: Path, cluster: int) -> tuple[int, int, int]:
    """(byte offset, bit shift within the big-endian word, width in bits) of CLUSTER's refcount."""
    h = header(path)
    bits = 1 << h.refcount_order
    per_block = h.cluster_size * 8 // bits
    block = refblock_offset(path, cluster // per_block)
    assert block, f"cluster {cluster} has no refcount block"
    index = cluster % per_block
    if bits >= 8:
        return block + index * bits // 8, 0, bits
    return block + index * bits // 8, (index * bits) % 8, bits


def refcount(path: Path, cluster: int) -> int:
    off, shift, bits = _refcount_location(path, cluster)
    n = max(1, bits // 8)
    with open(path, "rb") as f:
        f.seek(off)
        v = int.from_bytes(f.read(n), "big")
    return (v >> shift) & ((1 << bits) - 1) if bits < 8 else v


def set_refcount(path: Path, cluster: int, value: int) -> None:
    off, shift, bits = _refcount_location(path, cluster)
    if bits >= 8:
        patch(path, off, value.to_bytes(bits // 8, "big"))
        return
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(1)[0]
        mask = ((1 << bits) - 1) << shift
        f.seek(off)
        f.write(bytes([(b & ~mask) | ((value << shift) & mask)]))


def l2_table_offset(path: Path, guest: int) -> int:
    return header(path).l1_entry(guest) & OFFSET_MASK


def l2_entry_offset(path: Path, guest: int) -> int:
    return header(path).l2_entry_offset(guest)


def cluster_of(path: Path, off: int) -> int:
    return off // header(path).cluster_size


@dataclass
class SnapshotEntryInfo:
    entry_offset: int
    l1_table_offset: int
    l1_size: int
    extra_len: int
    id: str
    name: str
    length: int       # padded length of the whole entry


def snapshot_entries(path: Path) -> list[SnapshotEntryInfo]:
    h = header(path)
    out: list[SnapshotEntryInfo] = []
    with open(path, "rb") as f:
        pos = h.snapshots_offset
        for _ in range(h.nb_snapshots):
            f.seek(pos)
            l1_off, l1_size, id_len, name_len = struct.unpack(">QIHH", f.read(16))
            f.seek(pos + 36)
            extra_len = struct.unpack(">I", f.read(4))[0]
            f.seek(pos + 40 + extra_len)
            ident = f.read(id_len).decode()
            name = f.read(name_len).decode(errors="replace")
            ln = (40 + extra_len + id_len + name_len + 7) // 8 * 8
            out.append(SnapshotEntryInfo(pos, l1_off, l1_size, extra_len, ident, name, ln))
            pos += ln
    return out


def bitmap_directory(path: Path) -> tuple[int, int]:
    """(offset, size) of the bitmap directory."""
    h = header(path)
    _, _, data, _ = h.ext(EXT_BITMAPS)
    _nb, _res, size, off = struct.unpack_from(">IIQQ", h.raw, data)
    return off, size


def cluster_range(path: Path, off: int, what: str) -> tuple[int, int, str]:
    cs = header(path).cluster_size
    return off // cs * cs, cs, what


def header_range(path: Path) -> tuple[int, int, str]:
    """The header cluster without the feature words QEMU itself changes (bytes 72-96)."""
    return (0, 72, "header fields")


# --------------------------------------------------------------------------
# outcomes

@dataclass
class OpResult:
    ok: bool
    data: bytes | None = None
    error: str = ""


@dataclass
class Outcome:
    """What one implementation did with a scenario."""

    opened: bool = True
    open_error: str = ""
    results: list[OpResult] = field(default_factory=list)
    crashed: str = ""        # a non-QcowError exception, with its traceback
    timed_out: bool = False
    close_error: str = ""
    log: str = ""
    # What a read-only open left out (a damaged snapshot table...): issue 10
    # wants such a mount to serve the active disk anyway, with a warning.
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.timed_out:
            return f"hung (no answer within {QCOWFS_TIMEOUT:g}s)"
        if self.crashed:
            return "crashed: " + self.crashed.strip().splitlines()[-1]
        if not self.opened:
            return f"refused to open ({self.open_error.strip()[:100]})"
        parts = []
        for r in self.results:
            parts.append("ok" if r.ok else f"EIO({r.error.strip()[:80]})")
        return "; ".join(parts) or "opened"


@dataclass
class ImageState:
    """The state of an image file after a run."""

    magic_ok: bool
    corrupt_bit: bool
    dirty_bit: bool
    version: int
    check_rc: int
    check: dict[str, Any]
    check_text: str


def image_state(path: Path) -> ImageState:
    raw = read_range(path, 0, 104)   # never the whole file: a QEMU write at 1 TiB makes it sparse-huge
    magic_ok = len(raw) >= 4 and struct.unpack(">I", raw[:4])[0] == MAGIC
    version = struct.unpack(">I", raw[4:8])[0] if len(raw) >= 8 else 0
    incompat = struct.unpack(">Q", raw[72:80])[0] if version >= 3 and len(raw) >= 80 else 0
    rc, js, text = qemu_check(path)
    return ImageState(magic_ok, bool(incompat & INCOMPAT_CORRUPT), bool(incompat & INCOMPAT_DIRTY),
                      version, rc, js, text)


def qemu_check(path: Path) -> tuple[int, dict[str, Any], str]:
    """`qemu-img check --output=json`: exit code, parsed report ({} if none), raw output."""
    p = subprocess.run(["qemu-img", "check", "--output=json", str(path)], capture_output=True,
                       text=True, timeout=QEMU_TIMEOUT, cwd=path.parent)
    try:
        js = json.loads(p.stdout) if p.stdout.strip() else {}
    except json.JSONDecodeError:
        js = {}
    return p.returncode, js, p.stdout + p.stderr


SEVERITY = {0: 0, 3: 1, 2: 2, 1: 3}


def severity(rc: int) -> int:
    """How bad a `qemu-img check` exit code is: clean < leaks < corruption < cannot check."""
    return SEVERITY.get(rc, 3)


# --------------------------------------------------------------------------
# QEMU, the oracle

_HEX = re.compile(r"^[0-9a-f]{8}:  ((?:[0-9a-f]{2} ){1,16})")
_OK = re.compile(r"^(wrote|read) \d+/\d+ bytes at offset")
_FAIL = re.compile(r"^(write|read) failed: (.*)$")


def _qemu_session(img: Path, ops: Sequence[Write | Read], writable: bool) -> tuple[bool, str, list[OpResult], str]:
    opts = f"driver=qcow2,file.filename={str(img).replace(',', ',,')}"
    if writable:
        opts += ",overlap-check=all"
    args = ["qemu-io", "--image-opts"]
    if not writable:
        args.append("-r")
    for op in ops:
        args += ["-c", op.qemu()]
    args.append(opts)
    # cwd: QEMU 7.2 opens a relative external data file name relative to the working directory
    p = subprocess.run(args, capture_output=True, text=True, timeout=QEMU_TIMEOUT, cwd=img.parent)
    out = p.stdout
    results: list[OpResult] = []
    buf = bytearray()
    for line in out.splitlines():
        m = _HEX.match(line)
        if m:
            buf += bytes.fromhex(m.group(1).replace(" ", ""))
            continue
        if _OK.match(line):
            current = ops[len(results)] if len(results) < len(ops) else None
            data = bytes(buf) if isinstance(current, Read) else None
            results.append(OpResult(True, data))
            buf = bytearray()
            continue
        m = _FAIL.match(line)
        if m:
            results.append(OpResult(False, None, m.group(2)))
            buf = bytearray()
    opened = not (not results and p.returncode != 0)
    if opened and len(results) != len(ops):
        raise AssertionError(f"cannot parse qemu-io output for {ops}:\n{out}\n{p.stderr}")
    if not opened:
        results = [OpResult(False, None, p.stderr.strip()) for _ in ops]
    return opened, p.stderr.strip(), results, out + p.stderr


def _qemu_snapshot_read(img: Path, op: SnapRead, scratch: Path) -> OpResult:
    out = scratch / f"snap-{op.snapshot_id}.raw"
    p = subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", "-l", f"snapshot.id={op.snapshot_id}",
                        str(img), str(out)], capture_output=True, text=True, timeout=QEMU_TIMEOUT,
                       cwd=img.parent)
    if p.returncode != 0:
        return OpResult(False, None, p.stderr.strip())
    with open(out, "rb") as f:
        f.seek(op.offset)
        data = f.read(op.length)
    out.unlink()
    return OpResult(True, data.ljust(op.length, b"\0"))


def run_qemu(img: Path, sc: Scenario, scratch: Path) -> Outcome:
    """Run SC's operations with QEMU on IMG (changed in place)."""
    o = Outcome()
    pending: list[Write | Read] = []
    logs: list[str] = []

    def flush_session() -> None:
        if not pending:
            return
        opened, err, results, text = _qemu_session(img, pending, sc.writable)
        if not opened and not o.results:
            o.opened, o.open_error = False, err
        o.results.extend(results)
        logs.append(text)
        pending.clear()

    for op in sc.ops:
        if isinstance(op, SnapRead):
            flush_session()
            o.results.append(_qemu_snapshot_read(img, op, scratch))
        else:
            pending.append(op)
    flush_session()
    o.log = "\n".join(logs)
    return o


# --------------------------------------------------------------------------
# qcowfs, in a forked child

# Imported here, in the parent, so that every forked child has them already (an import
# of numpy and trio per child would cost more than the scenario). A qcowfs that does not
# import is reported by the child, scenario by scenario.
with contextlib.suppress(Exception):
    import trio  # noqa: F401
    import qcowfs.aio  # noqa: F401
    import qcowfs.cli.commands  # noqa: F401
    import qcowfs.fs.views  # noqa: F401

# Address space a child may add to what it inherits: an absurd table size in an image must
# end as a MemoryError in the child, not as gigabytes taken from a shared machine.
CHILD_EXTRA_MEMORY = 1 << 30


def _limit_memory() -> None:
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + CHILD_EXTRA_MEMORY, resource.RLIM_INFINITY))


def in_child(fn: Callable[[], Any], timeout: float = QCOWFS_TIMEOUT) -> tuple[str, Any]:
    """Run FN in a forked child: ("ok", value), ("crash", traceback text) or ("timeout", None)."""
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)

    def main() -> None:
        try:
            _limit_memory()
            value = fn()
            send.send(("ok", value))
        except BaseException:
            send.send(("crash", traceback.format_exc()))
        finally:
            send.close()

    proc = ctx.Process(target=main, daemon=True)
    proc.start()
    send.close()
    try:
        if recv.poll(timeout):
            try:
                result = recv.recv()
            except EOFError:
                result = ("crash", f"child exited with code {proc.exitcode} before answering")
        else:
            proc.kill()
            result = ("timeout", None)
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
        recv.close()
    return result


def _qcowfs_session(path: Path, sc: Scenario) -> Outcome:
    import trio

    from qcowfs.aio import Image
    from qcowfs.errors import QcowError
    from qcowfs.fs import views

    o = Outcome()

    async def session() -> None:
        try:
            image = Image(str(path), "r+" if sc.writable else "r")
        except QcowError as e:
            o.opened, o.open_error = False, str(e)
            o.results = [OpResult(False, None, str(e)) for _ in sc.ops]
            return
        o.warnings = list(getattr(image, "warnings", ()))
        try:
            prepare_error = ""
            if sc.writable:
                try:
                    await image.prepare()
                except QcowError as e:
                    prepare_error = f"prepare_writes: {e}"
            disk = views.DiskView(image)
            snaps = {d.snapshot.id: d for d in image.snapshot_disks() if d.snapshot is not None}
            for op in sc.ops:
                if prepare_error:
                    o.results.append(OpResult(False, None, prepare_error))
                    continue
                try:
                    if isinstance(op, Write):
                        await _write(disk, op.offset, op.data())
                        o.results.append(OpResult(True))
                    elif isinstance(op, Read):
                        o.results.append(OpResult(True, bytes(await _read(disk, op.offset, op.length))))
                    else:
                        snap = snaps.get(op.snapshot_id)
                        if snap is None:
                            o.results.append(OpResult(False, None, f"no snapshot {op.snapshot_id}"))
                            continue
                        view = views.SnapshotView(image, snap)
                        o.results.append(OpResult(True, bytes(await _read(view, op.offset, op.length))))
                except QcowError as e:
                    o.results.append(OpResult(False, None, f"{type(e).__name__}: {e}"))
            if sc.writable:
                try:
                    await image.flush()
                except QcowError as e:
                    o.close_error = f"flush: {e}"
        finally:
            try:
                await image.close()
            except QcowError as e:
                o.close_error += f" close: {e}"

    async def bounded() -> None:
        with trio.fail_after(QCOWFS_TIMEOUT):
            await session()

    trio.run(bounded)
    return o


async def _read(view: Any, offset: int, length: int) -> bytes | bytearray:
    """A read as the FUSE layer does it: the no-await fast path first, then the general one."""
    data = view.read_cached(offset, length)
    if data is None:
        data = await view.read(offset, length)
    return data


async def _write(view: Any, offset: int, data: bytes) -> None:
    """A write as the FUSE layer does it."""
    await view.write(offset, data)


def run_qcowfs(img: Path, sc: Scenario) -> Outcome:
    """Run SC's operations with qcowfs's image object on IMG (changed in place)."""
    status, value = in_child(lambda: _qcowfs_session(img, sc))
    if status == "ok":
        return value
    if status == "timeout":
        return Outcome(timed_out=True)
    return Outcome(crashed=value)


@dataclass
class CheckRun:
    rc: int | None           # None: hung
    report: dict[str, Any]
    stdout: str
    stderr: str
    crashed: str = ""


def qcowfs_check(img: Path) -> CheckRun:
    """`qcowfs check --json IMG`, in a forked child (in-process code, killable)."""
    def fn() -> tuple[int, str, str]:
        from qcowfs.cli.commands import cmd_check
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cmd_check(str(img), False, True)
        return rc, out.getvalue(), err.getvalue()

    status, value = in_child(fn)
    if status == "timeout":
        return CheckRun(None, {}, "", "")
    if status == "crash":
        return CheckRun(1, {}, "", "", crashed=value)
    rc, out, err = value
    try:
        report = json.loads(out) if out.strip() else {}
    except json.JSONDecodeError:
        report = {}
    return CheckRun(rc, report, out, err)


def copy_image(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


def snapshot_ids(img: Path) -> list[str]:
    try:
        return [e.id for e in snapshot_entries(img)]
    except (struct.error, UnicodeDecodeError, OSError):
        return []


def snapshot_contents(img: Path, scratch: Path, ids: Sequence[str]) -> dict[str, bytes | None]:
    """Snapshots IDS' disks as QEMU reads them (None where QEMU cannot)."""
    out: dict[str, bytes | None] = {}
    for ident in ids:
        dest = scratch / f"_snap_{ident}.raw"
        p = subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", "-l", f"snapshot.id={ident}",
                            str(img), str(dest)], capture_output=True, timeout=QEMU_TIMEOUT, cwd=img.parent)
        out[ident] = dest.read_bytes() if p.returncode == 0 else None
        dest.unlink(missing_ok=True)
    return out


def guest_bytes(img: Path, off: int, length: int) -> bytes | None:
    """[off, off+length) of the active disk as QEMU reads it (None where QEMU cannot)."""
    p = subprocess.run(["qemu-io", "-U", "-r", "-f", "qcow2", "-c", f"read -v {off} {length}", str(img)],
                       capture_output=True, text=True, timeout=QEMU_TIMEOUT, cwd=img.parent)
    buf = bytearray()
    for line in p.stdout.splitlines():
        m = _HEX.match(line)
        if m:
            buf += bytes.fromhex(m.group(1).replace(" ", ""))
    return bytes(buf) if len(buf) == length and "failed" not in p.stdout else None


def read_range(path: Path, off: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(length).ljust(length, b"\0")


# --------------------------------------------------------------------------
# image builders

def base(d: Path, size: str | int = "64M", *cmds: str, **opts: Any) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    img = create(d / "disk.qcow2", size, **opts)
    if cmds:
        qio(img, *cmds)
    return img


def overlap_base(d: Path, snapshot: bool = False, bitmap: bool = False) -> Path:
    """64 MiB, 64 KiB clusters: data at guest 0 and 1M (one L2 table); with a snapshot,
    guest 0 rewritten after it (the active L2 table is a copy, the snapshot keeps the old one)."""
    img = base(d, "64M", "write -P 0x11 0 64k", "write -P 0x12 1M 64k")
    if snapshot:
        qimg("snapshot", "-c", "foo", img)
        qio(img, "write -P 0x13 0 512")
    if bitmap:
        qimg("bitmap", "--add", img, "b0")
    return img


def metadata_target(img: Path, kind: str) -> int:
    """Host offset of one metadata structure of IMG."""
    h = header(img)
    if kind == "header":
        return 0
    if kind == "l1":
        return h.l1_table_offset
    if kind == "l2":
        return l2_table_offset(img, 0)
    if kind == "reftable":
        return h.refcount_table_offset
    if kind == "refblock":
        return refblock_offset(img, 0)
    if kind == "snapshot-table":
        return h.snapshots_offset
    if kind == "inactive-l1":
        return snapshot_entries(img)[0].l1_table_offset
    if kind == "inactive-l2":
        return u64(img, snapshot_entries(img)[0].l1_table_offset) & OFFSET_MASK
    if kind == "bitmap-directory":
        return bitmap_directory(img)[0] // h.cluster_size * h.cluster_size
    raise KeyError(kind)


def _protect_target(kind: str) -> Protect:
    def fn(img: Path) -> list[tuple[int, int, str]]:
        if kind == "header":
            return [header_range(img)]
        return [cluster_range(img, metadata_target(img, kind), kind)]
    return fn


def _needs(kind: str) -> dict[str, bool]:
    return {"snapshot": kind in ("snapshot-table", "inactive-l1", "inactive-l2"),
            "bitmap": kind == "bitmap-directory"}


# ---- 060: data clusters and L2 tables pointing into metadata --------------------

def _data_into(kind: str) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        img = overlap_base(d, **_needs(kind))
        target = metadata_target(img, kind)
        assert target % header(img).cluster_size == 0
        # COPIED set, so that the write goes in place instead of copying (as in 060)
        poke_u64(img, l2_entry_offset(img, 0), target | COPIED)
        return img
    return build


for _kind, _i9 in (("l1", ""), ("l2", ""), ("reftable", ""), ("refblock", "L2 entry into a refcount block"),
                   ("snapshot-table", ""), ("inactive-l1", ""),
                   ("inactive-l2", "L2 entry into an inactive (snapshot) L2 table"),
                   ("bitmap-directory", "")):
    scenario(f"060-data-into-{_kind}",
             f"An active L2 entry (COPIED) points at the {_kind}: a 512-byte guest write would "
             "overwrite that metadata. QEMU's overlap check refuses the write, marks the image corrupt.",
             _data_into(_kind), (Write(0, 512),), protect=_protect_target(_kind),
             snapshots=_needs(_kind)["snapshot"], issue9=_i9,
             mount=_kind == "refblock")


def _l2_into(kind: str) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        img = overlap_base(d, **_needs(kind))
        poke_u64(img, header(img).l1_entry_offset(0), metadata_target(img, kind) | COPIED)
        return img
    return build


for _kind in ("l1", "refblock", "reftable", "inactive-l2", "snapshot-table"):
    scenario(f"060-l2-into-{_kind}",
             f"The first L1 entry (COPIED) names the {_kind} as its L2 table (060 'L2 reference into "
             "L1' and kin): a write goes through that table and updates it in place, destroying "
             "the structure it really is.",
             _l2_into(_kind), (Write(0, 512),), protect=_protect_target(_kind),
             snapshots=_needs(_kind)["snapshot"])


# ---- 060 / 137: refcounts that call metadata free ---------------------------------

def _refcount_zero(kind: str) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        img = overlap_base(d, **_needs(kind))
        set_refcount(img, cluster_of(img, metadata_target(img, kind)), 0)
        return img
    return build


for _kind in ("header", "l1", "l2", "reftable", "refblock", "snapshot-table", "inactive-l1",
              "inactive-l2", "bitmap-directory"):
    scenario(f"060-refcount-zero-{_kind}",
             f"The refcount of the {_kind} is 0, so the allocator believes the cluster free. A write "
             "to an unallocated guest cluster allocates one cluster: the lowest free one, this one. "
             "QEMU's overlap check catches the data write into metadata.",
             _refcount_zero(_kind), (Write(2 * MiB, 64 * KiB, 0x33),), protect=_protect_target(_kind),
             snapshots=_needs(_kind)["snapshot"],
             issue9=("refcounts that call the header or an L2 table free"
                     if _kind in ("header", "l2") else ""))


def _header_free_1g(d: Path) -> Path:
    img = base(d, "1G", "write -P 0x11 0 64k")
    set_refcount(img, 0, 0)
    return img


scenario("060-refcount-zero-header-new-l2",
         "Header refcount 0 and a write past the first L2 table's 512 MiB, which needs a new L2 "
         "table: the table would be allocated over the header (the image would no longer be qcow2).",
         _header_free_1g, (Write(600 * MiB, 512),),
         protect=_protect_target("header"),
         issue9="refcounts that call the header or an L2 table free")


def _137_refblock_first(d: Path) -> Path:
    img = base(d, "64M", "write 0 64k")
    patch(img, refblock_offset(img), b"\0\0")        # the header's refcount, 2 bytes as in 137
    return img


scenario("137-refcount-zero-header",
         "137 'corruption detection cannot be disabled': the header's refcount cleared, then an "
         "allocating write. QEMU's overlap check (always on for the header) refuses it.",
         _137_refblock_first, (Write(64 * KiB, 64 * KiB),), protect=_protect_target("header"),
         issue9="refcounts that call the header or an L2 table free")


def _060_second_l2_free(d: Path) -> Path:
    img = base(d, "1G", "write 0 64k", "write 512M 64k", compat="0.10")
    set_refcount(img, cluster_of(img, l2_table_offset(img, 512 * MiB)), 0)
    return img


scenario("060-second-l2-refcount-zero",
         "060 'overlap while COW is in flight' (v2): the second L2 table's refcount is 0; a write to "
         "an unallocated cluster gets that cluster and would overwrite the live L2 table.",
         _060_second_l2_free, (Write(64 * KiB, 64 * KiB),),
         protect=lambda img: [cluster_range(img, l2_table_offset(img, 512 * MiB), "second L2 table")],
         issue9="refcounts that call the header or an L2 table free")


def _empty_reftable(after_write: bool) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        img = base(d, "64M", *(("write 0 64k",) if after_write else ()))
        poke_u64(img, reftable_entry_offset(img, 0), 0)
        return img
    return build


scenario("060-empty-reftable",
         "Refcount-table entry 0 cleared on a fresh image: every cluster looks uncounted, the first "
         "refcount block must be created somewhere. QEMU refuses the write (it would land on the "
         "header). qcowfs once spun at 100% CPU on a 512-byte write. Now it writes the block past "
         "the end of the file, counting the range's clusters below the file's end as used once "
         "(Allocator.uncounted_below), and the data after it: no corruption, the old block leaked.",
         _empty_reftable(False), (Write(0, 512),), protect=lambda img: [header_range(img)],
         issue9="refcount-table entry 0 cleared: write never returns", mount=True, repair_ok=True)
scenario("060-empty-reftable-valid-l2",
         "Refcount-table entry 0 cleared with valid L1/L2 tables; a 128 KiB write needs one more "
         "cluster (QEMU: allocation at an explicit offset, refcount block at offset 0). qcowfs: as "
         "in 060-empty-reftable.",
         _empty_reftable(True), (Write(0, 128 * KiB),), protect=lambda img: [header_range(img)],
         issue9="refcount-table entry 0 cleared: write never returns", repair_ok=True)


def _empty_refblock(prewrite: bool) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        img = base(d, "64M", *(("write 64k 64k",) if prewrite else ()))
        patch(img, refblock_offset(img), bytes(8))   # header, reftable, refblock, L1: all "free"
        return img
    return build


scenario("060-empty-refblock",
         "The first 8 bytes of the refcount block cleared: header, refcount table, refcount block "
         "and L1 table all look free to the allocator.",
         _empty_refblock(False), (Write(0, 64 * KiB),),
         protect=lambda img: [header_range(img), cluster_range(img, header(img).l1_table_offset, "L1"),
                              cluster_range(img, refblock_offset(img), "refcount block"),
                              cluster_range(img, header(img).refcount_table_offset, "refcount table")],
         issue9="refcounts that call the header or an L2 table free")
scenario("060-empty-refblock-with-l2",
         "As 060-empty-refblock, with an L2 table already allocated (060 'empty refcount block with "
         "compressed write', a plain write here): only a data cluster is allocated.",
         _empty_refblock(True), (Write(0, 64 * KiB),),
         protect=lambda img: [header_range(img), cluster_range(img, header(img).l1_table_offset, "L1"),
                              cluster_range(img, refblock_offset(img), "refcount block"),
                              cluster_range(img, header(img).refcount_table_offset, "refcount table")])


# ---- 060: unaligned entries ------------------------------------------------------

def _unaligned_l1(d: Path) -> Path:
    img = base(d, "64M", "write 0 64k")
    l2 = l2_table_offset(img, 0)
    poke_u64(img, header(img).l1_entry_offset(0), COPIED | (l2 + 0x2A00))
    return img


scenario("060-unaligned-l1-entry", "The L1 entry's L2 offset is not cluster aligned: reads must fail.",
         _unaligned_l1, (Read(0, 64 * KiB),), writable=False)
scenario("060-unaligned-l1-entry-write",
         "An unaligned L1 entry, opened read-write: a write through it must be refused.",
         _unaligned_l1, (Write(0, 512),),
         protect=lambda img: [(l2_table_offset(img, 0) // 65536 * 65536, 131072, "around the L2 table")])


def _unaligned_l2(entries: int = 1, zero: bool = False, offset: int | None = None,
                  discard_first: bool = False, size: str = "64M") -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        cmds = [f"write 0 {64 * entries}k"]
        if discard_first:
            cmds.append("discard 0 64k")
        img = base(d, size, *cmds)
        for i in range(entries):
            data = (u64(img, l2_entry_offset(img, 64 * KiB * i)) & OFFSET_MASK) or (5 + i) * 65536
            host = data + 0x2A00 if offset is None else offset
            poke_u64(img, l2_entry_offset(img, 64 * KiB * i), COPIED | host | (ZERO_FLAG if zero else 0))
        return img
    return build


scenario("060-unaligned-l2-entry", "A data cluster offset not cluster aligned: reads must fail.",
         _unaligned_l2(), (Read(0, 64 * KiB),), writable=False)
scenario("060-unaligned-l2-entry-write", "A write through an unaligned data cluster offset must be refused.",
         _unaligned_l2(), (Write(0, 512),),
         protect=lambda img: [cluster_range(img, u64(img, l2_entry_offset(img, 0)) & OFFSET_MASK, "data")])
scenario("060-unaligned-prealloc-zero",
         "A preallocated zero cluster whose offset is unaligned (060 zero cluster expansion): QEMU "
         "refuses the entry; serving zeros for it hides the corruption.",
         _unaligned_l2(zero=True), (Read(0, 64 * KiB),), writable=False,
         issue9="data served where QEMU refuses: unaligned preallocated zero cluster")
scenario("060-write-unaligned-prealloc-zero-in-header",
         "060 'writing to an unaligned preallocated zero cluster': the entry's offset 0x2a00 lies "
         "inside the header cluster. Reusing the preallocated cluster writes into the header.",
         _unaligned_l2(zero=True, offset=0x2A00, discard_first=True), (Write(0, 64 * KiB),),
         protect=lambda img: [(0, 64 * KiB, "header cluster")],
         issue9="unaligned preallocated zero cluster (write lands in the header)")


def _unaligned_reftable_entry(prewrite: bool, value: int | None = None) -> Callable[[Path], Path]:
    """Refcount-table entry 0 made unaligned: VALUE, or the refcount block's offset + 0x2a00."""
    def build(d: Path) -> Path:
        img = base(d, "64M", *(("write 0 128k",) if prewrite else ()))
        rb = refblock_offset(img)
        poke_u64(img, reftable_entry_offset(img, 0), rb + 0x2A00 if value is None else value)
        return img
    return build


scenario("060-unaligned-reftable-entry", "A refcount-table entry that is not cluster aligned; an "
         "allocating write must fail, not use it.",
         _unaligned_reftable_entry(False, 0x22A00), (Write(0, 64 * KiB),), protect=lambda img: [header_range(img)])
scenario("060-zero-write-unaligned-l2",
         "060 'non-fatal corruption on freeing': zeroing (QEMU: discard / write -z) a cluster whose "
         "L2 entry is unaligned frees a refcount that is not there.",
         _unaligned_l2(), (Write(0, 64 * KiB, zero=True),))
scenario("060-read-only-corruption-report", "Read-only: an unaligned L2 entry read twice must fail twice, "
         "nothing written.", _unaligned_l2(), (Read(0, 64 * KiB), Read(0, 64 * KiB)), writable=False)
scenario("060-nonfatal-then-fatal",
         "Two unaligned L2 entries: zeroing the first (non-fatal in QEMU), then reading the second.",
         _unaligned_l2(entries=2), (Write(0, 64 * KiB, zero=True), Read(64 * KiB, 64 * KiB)))
scenario("060-discard-unaligned-refblock",
         "060 'discarding with an unaligned refblock': refcount-table entry 0 made unaligned; zeroing "
         "64 KiB + 1 byte drops refcounts through it.",
         _unaligned_reftable_entry(True), (Write(0, 65537, zero=True),),
         protect=lambda img: [header_range(img)])


def _header_field(name: str, value: int, *cmds: str, **opts: Any) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        img = base(d, "64M", *cmds, **opts)
        set_field(img, name, value)
        return img
    return build


scenario("060-zero-reftable-size", "refcount_table_clusters = 0: no refcounts at all.",
         _header_field("refcount_table_clusters", 0), (Write(0, 64 * KiB),))
scenario("060-reftable-offset-zero", "refcount_table_offset = 0: the header would be the refcount table.",
         _header_field("refcount_table_offset", 0), (Write(0, 64 * KiB),),
         protect=lambda img: [(0, 48, "header fields")])


def _dirty_unaligned_refblock(d: Path) -> Path:
    img = base(d, "64M")
    poke_u64(img, reftable_entry_offset(img, 0), 0xFFFF2A00)
    set_incompatible(img, INCOMPAT_DIRTY)
    return img


scenario("060-dirty-unaligned-refblock",
         "Dirty bit set (refcounts to be rebuilt at open) and an unaligned refcount block. QEMU "
         "refuses to open it; a rebuild on open must not make it worse.",
         _dirty_unaligned_refblock, (Write(0, 512),), repair_ok=True)


def _l1_garbage(d: Path) -> Path:
    img = base(d, "64M", "write 0 64k")
    poke_u64(img, header(img).l1_entry_offset(0), 0x2A2A2A2A)
    return img


scenario("060-inactive-corrupt-read",
         "060 'incoming inactive corrupted image': an L1 entry 0x2a2a2a2a read read-only; the read "
         "fails, the image is not marked corrupt.", _l1_garbage, (Read(0, 512),), writable=False)


# ---- 080: input validation -----------------------------------------------------------

def _hdr(*fields: tuple[str, int], cmds: Sequence[str] = (), post: Callable[[Path], None] | None = None,
         **opts: Any) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        img = base(d, "64M", *cmds, **opts)
        if post:
            post(img)
        for name, value in fields:
            set_field(img, name, value)
        return img
    return build


def _ext_huge(backing_offset: int | None) -> Callable[[Path], None]:
    """The first header extension turned into an unknown one of 2 GiB; the backing file name
    at BACKING_OFFSET (None: inside that extension's length field, as in 080)."""
    def post(img: Path) -> None:
        h = header(img)
        poke_u32(img, h.header_length, 0x12345678)
        poke_u32(img, h.header_length + 4, 0x7FFFFFFF)
        set_field(img, "backing_file_offset", h.header_length + 4 if backing_offset is None
                  else backing_offset)
    return post


R0 = (Read(0, 512),)
for _id, _doc, _b in (
    ("080-huge-header-size", "header_length 0xffffffff.", _hdr(("header_length", 0xFFFFFFFF))),
    ("080-huge-header-size-2", "header_length 0x7fffffff.", _hdr(("header_length", 0x7FFFFFFF))),
    ("080-huge-extension", "An unknown extension claiming 2 GiB, backing file offset 2^64-1.",
     _hdr(post=_ext_huge(0xFFFFFFFFFFFFFFFF))),
    ("080-huge-extension-2", "An unknown extension claiming 2 GiB, the backing file offset inside it.",
     _hdr(post=_ext_huge(None))),
    ("080-huge-extension-3", "An unknown extension claiming 2 GiB, no backing file.", _hdr(post=_ext_huge(0))),
    ("080-huge-reftable-size", "refcount_table_clusters 0xffffffff.",
     _hdr(("refcount_table_clusters", 0xFFFFFFFF))),
    ("080-huge-reftable-size-2", "refcount_table_clusters 0x20001 (over QEMU's 8 MiB table limit).",
     _hdr(("refcount_table_clusters", 0x20001))),
    ("080-misaligned-reftable", "refcount_table_offset 0x1234567890abcdef.",
     _hdr(("refcount_table_offset", 0x1234567890ABCDEF))),
    ("080-huge-reftable-offset", "refcount_table_offset near 2^48, 127 clusters.",
     _hdr(("refcount_table_offset", 0xFFFFFFFFFFFF0000), ("refcount_table_clusters", 0x7F))),
    ("080-snapshots-nb-huge", "nb_snapshots 0xffffffff.", _hdr(("nb_snapshots", 0xFFFFFFFF))),
    ("080-snapshots-nb-huge-2", "nb_snapshots 0x7fffffff.", _hdr(("nb_snapshots", 0x7FFFFFFF))),
    ("080-snapshot-offset-near-2^64", "snapshots_offset 0xffffffffffff0000 with 65535 snapshots: "
     "offset + size overflows 64 bits (qcowfs once died with OverflowError).",
     _hdr(("snapshots_offset", 0xFFFFFFFFFFFF0000), ("nb_snapshots", 0xFFFF))),
    ("080-snapshot-offset-misaligned", "snapshots_offset 0x1234567890abcdef, no snapshots.",
     _hdr(("snapshots_offset", 0x1234567890ABCDEF), ("nb_snapshots", 0))),
    ("080-snapshot-table-past-eof", "080 'hitting snapshot table size limit': a snapshot table at 16 MiB, "
     "past the end of the file (080 names 65536 snapshots; 256 show the same, faster).",
     _hdr(("snapshots_offset", 0x1000000), ("nb_snapshots", 0x100))),
    ("080-l1-size-huge", "l1_size 0xffffffff.", _hdr(("l1_size", 0xFFFFFFFF))),
    ("080-l1-size-huge-2", "l1_size 0x7fffffff.", _hdr(("l1_size", 0x7FFFFFFF))),
    ("080-l1-offset-huge", "l1_table_offset 0x7fffffffffff0000, 65535 entries.",
     _hdr(("l1_table_offset", 0x7FFFFFFFFFFF0000), ("l1_size", 0xFFFF))),
    ("080-l1-offset-misaligned", "l1_table_offset 0x1234567890abcdef, one entry.",
     _hdr(("l1_table_offset", 0x1234567890ABCDEF), ("l1_size", 1))),
    ("080-backing-size-huge", "backing_file_offset 0x1000, backing_file_size 0xffffffff.",
     _hdr(("backing_file_offset", 0x1000), ("backing_file_size", 0xFFFFFFFF))),
):
    scenario(_id, "080 input validation: " + _doc + " The header must be refused (or survive) "
             "without a traceback.", _b, R0,
             issue9={"080-snapshot-offset-near-2^64": "snapshot table offset near 2^64: OverflowError",
                     "080-snapshot-offset-misaligned": "data served where QEMU refuses: misaligned "
                     "snapshot table"}.get(_id, ""),
             mount=_id == "080-snapshot-offset-near-2^64")


def _l1_zero_with_snapshot(d: Path) -> Path:
    img = base(d, "64M", "write -P 0x41 0 64k")
    qimg("snapshot", "-c", "foo", img)
    set_field(img, "l1_size", 0)
    return img


scenario("080-l1-size-zero-with-snapshot",
         "l1_size 0 on a 64 MiB disk that has a snapshot: the active L1 table is too small.",
         _l1_zero_with_snapshot, (Read(0, 512),), writable=False)


def _l2_entry(value: int) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        img = base(d, "64M", "write 0 512")
        poke_u64(img, l2_entry_offset(img, 0), value)
        return img
    return build


for _suffix, _value, _what in (("compressed", 0xBFFFFFFFFFFF0000, "a compressed entry at a huge offset"),
                               ("offset", 0x800000FFFFFF0000, "a data cluster at ~1 PiB")):
    scenario(f"080-l2-huge-{_suffix}-read", f"080 invalid L2 entry: {_what}; a read must fail.",
             _l2_entry(_value), (Read(0, 512),), writable=False)
    scenario(f"080-l2-huge-{_suffix}-write", f"080 invalid L2 entry: {_what}; a write must fail or "
             "go elsewhere, never to a huge file offset.", _l2_entry(_value), (Write(0, 512),))


def _snapshot_l1(offset: int | None = None, size: int | None = None) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        img = base(d, "64M", "write -P 0x51 0 512")
        qimg("snapshot", "-c", "test", img)
        e = snapshot_entries(img)[0]
        if offset is not None:
            poke_u64(img, e.entry_offset, offset)
        if size is not None:
            poke_u32(img, e.entry_offset + 8, size)
        return img
    return build


scenario("080-snapshot-l1-offset-unaligned",
         "A snapshot whose L1 table offset (0x400200) is unaligned: reading the snapshot must fail.",
         _snapshot_l1(offset=0x400200), (SnapRead("1", 0, 4096),), writable=False)
scenario("080-snapshot-l1-offset-unaligned-write",
         "Unaligned snapshot L1 offset, then a 4 KiB write to the active disk with every overlap "
         "check on (080 uses overlap-check.inactive-l2).",
         _snapshot_l1(offset=0x400200), (Write(0, 4096),), snapshots=True)
scenario("080-snapshot-l1-size-huge",
         "A snapshot whose L1 size is absurd (0x10000000 entries): reading the snapshot must fail.",
         _snapshot_l1(size=0x10000000), (SnapRead("1", 0, 4096),), writable=False,
         issue9="data served where QEMU refuses: snapshot with absurd L1 size")
scenario("080-snapshot-l1-size-huge-write",
         "Absurd snapshot L1 size, then a write to the active disk.",
         _snapshot_l1(size=0x10000000), (Write(0, 4096),), snapshots=True)


# ---- 112: refcount widths --------------------------------------------------------------

def _refcount64(value: int) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        img = base(d, "64M", "write 0 512", refcount_bits=64)
        data = u64(img, l2_entry_offset(img, 0)) & OFFSET_MASK
        set_refcount(img, cluster_of(img, data), value)
        poke_u64(img, l2_entry_offset(img, 0), data)          # COPIED cleared
        return img
    return build


scenario("112-refcount64-msb", "A 64-bit refcount with its MSb set (not negative!); a write to the "
         "cluster must copy it and decrement correctly.", _refcount64(1 << 63), (Write(0, 512),))
scenario("112-refcount64-max", "A 64-bit refcount at its maximum: a write to the shared cluster copies "
         "it; the refcount must not wrap.", _refcount64((1 << 64) - 1), (Write(0, 512),))


def _refcount1_two_refs(d: Path) -> Path:
    img = base(d, "64M", "write -P 0x61 0 64k", refcount_bits=1)
    data = u64(img, l2_entry_offset(img, 0)) & OFFSET_MASK
    poke_u64(img, l2_entry_offset(img, 64 * KiB), data | COPIED)
    return img


scenario("112-refcount1-two-references",
         "refcount_bits=1 and two L2 entries naming one cluster (reference count 2 cannot be stored): "
         "qemu-img check reports it; writes must not make it worse.",
         _refcount1_two_refs, (Write(64 * KiB, 512, 0x62), Read(0, 512)))


# ---- 138: huge data offset --------------------------------------------------------------

def _data_at_32pb(d: Path) -> Path:
    img = base(d, 512, "write 0 512", cluster_size=512)
    poke_u64(img, l2_entry_offset(img, 0), COPIED | (1 << 55))
    return img


scenario("138-data-at-32PB", "A data cluster at 32 PiB on a one-cluster disk: check must not try to "
         "count 2^46 clusters in memory, reads must fail.", _data_at_32pb, (Read(0, 512),),
         writable=False)
scenario("138-data-at-32PB-write", "A write through an L2 entry at 32 PiB must not grow the file to 32 PiB.",
         _data_at_32pb, (Write(0, 512),))


# ---- 214: compressed cluster sizes --------------------------------------------------------

def _compressed_size(poke: bytes, both: bool = False, grow: bool = False) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        img = base(d, "8M", "write -c -P 0x11 0 2M", "write -c -P 0x11 2M 2M", cluster_size=2 * MiB)
        patch(img, l2_entry_offset(img, 0), poke)
        if both:
            patch(img, l2_entry_offset(img, 2 * MiB), poke)
        if grow:
            qio(img, "write -P 0x22 4M 4M")
        return img
    return build


scenario("214-compressed-too-short",
         "The sector count of a compressed cluster reduced by one: the compressed stream is cut, "
         "decompression must fail, not return a partial cluster.",
         _compressed_size(b"\x40\x06"), (Read(0, 64 * KiB), Read(2 * MiB, 64 * KiB)), writable=False)
scenario("214-compressed-past-eof",
         "Compressed clusters claiming 8192 sectors, past the end of the file: QEMU reads what is "
         "there and stops once the cluster is complete.",
         _compressed_size(b"\x7f\xfe", both=True), (Read(0, 64 * KiB), Read(2 * MiB, 64 * KiB)),
         writable=False)
scenario("214-compressed-spills-grown",
         "Compressed clusters claiming 8192 sectors over clusters the file now has (data written "
         "after them): their refcounts are too low, qemu-img check reports it.",
         _compressed_size(b"\x7f\xfe", both=True, grow=True),
         (Read(0, 64 * KiB), Read(4 * MiB, 64 * KiB)), writable=False)


# ---- 039 / 061: dirty images ---------------------------------------------------------------

def _dirty(cmds: Sequence[str]) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        img = base(d, "128M", lazy_refcounts="on")
        p = qio(img, *cmds, "abort", check=False)
        assert p.returncode != 0
        assert header(img).incompatible_features & INCOMPAT_DIRTY
        return img
    return build


scenario("039-dirty-read-only", "039: lazy refcounts, killed after a write (dirty bit set). "
         "Read-only access still works and leaves the image as it was.",
         _dirty(["write -P 0x5a 0 512"]), (Read(0, 512),), writable=False)
scenario("039-dirty-write", "039: opening a dirty image read-write repairs the refcounts first, then "
         "writes.", _dirty(["write -P 0x5a 0 512"]), (Write(512, 512, 0x5b), Read(0, 1024)))
scenario("061-dirty-flush-abort", "061 'dirty version downgrade': 128 KiB written, flushed, aborted; "
         "a write after reopening.", _dirty(["write -P 0x2a 0 128k", "flush"]),
         (Write(1 * MiB, 64 * KiB, 0x2b), Read(0, 128 * KiB)))


# ---- 036 / 061: feature bits -----------------------------------------------------------------

def _feature_bits(incompat: int = 0, compat: int = 0, autoclear: int = 0, drop_table: bool = False,
                  name_bit: int | None = None) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        img = base(d, "64M", "write -P 0x71 0 64k")
        h = header(img)
        if drop_table or name_bit is not None:
            _, typepos, data, ln = h.ext(EXT_FEATURE_TABLE)
            if drop_table:
                poke_u32(img, typepos, 0x0BADF00D)
            else:
                patch(img, data, struct.pack(">BB46s", 0, name_bit, b"Test feature"))
        set_field(img, "incompatible_features", h.incompatible_features | incompat)
        set_field(img, "compatible_features", h.compatible_features | compat)
        set_field(img, "autoclear_features", h.autoclear_features | autoclear)
        return img
    return build


scenario("036-unknown-incompat-63", "036: unknown incompatible bit 63, no feature table: refuse.",
         _feature_bits(incompat=1 << 63, drop_table=True), (Read(0, 512),))
scenario("036-unknown-incompat-61-63-named", "036: incompatible bits 61-63, bit 63 named in the feature table.",
         _feature_bits(incompat=7 << 61, name_bit=63), (Read(0, 512),))
scenario("036-unknown-autoclear-63", "036: unknown autoclear bit 63 must be cleared before the first "
         "write, and the write must work.", _feature_bits(autoclear=1 << 63), (Write(0, 512), Read(0, 1024)))
scenario("061-unknown-compat-autoclear-42", "061: unknown compatible and autoclear bits 42.",
         _feature_bits(compat=1 << 42, autoclear=1 << 42), (Write(0, 512), Read(0, 1024)))


def _v2_zero_flag(d: Path) -> Path:
    img = base(d, "64M", "write -P 0x81 0 128k", compat="0.10")
    e = u64(img, l2_entry_offset(img, 0))
    poke_u64(img, l2_entry_offset(img, 0), e | ZERO_FLAG)
    return img


scenario("061-v2-zero-flag", "A v2 image has no zero flag; an L2 entry with bit 0 set is corrupt "
         "(QEMU: 'zero cluster entry found in pre-v3 image', EIO).", _v2_zero_flag, (Read(0, 64 * KiB),),
         writable=False, issue9="data served where QEMU refuses: zero flag in a v2 image")
scenario("061-v2-zero-flag-write", "A write through a v2 L2 entry with the zero flag set.",
         _v2_zero_flag, (Write(0, 512),))


# ---- 244: external data files ---------------------------------------------------------------------

def _data_file_no_name(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    img = create(d / "disk.qcow2", "64M", data_file="disk.data", cwd=d)
    qimg("amend", "-o", "data_file=", str(img), cwd=d)
    return img


scenario("244-data-file-required-no-name", "244: the image needs an external data file but names none.",
         _data_file_no_name, (Read(0, 512),), writable=False)


def _data_file_compressed_entry(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    img = create(d / "disk.qcow2", "64M", data_file="disk.data", cwd=d)
    qio(img, "write -P 0x91 0 64k", cwd=d)
    poke_u64(img, l2_entry_offset(img, 0), COMPRESSED | (1 << 54) | 0x10000)
    return img


scenario("244-compressed-entry-with-data-file", "244: compressed clusters are impossible with an external "
         "data file; such an L2 entry is corrupt.", _data_file_compressed_entry, (Read(0, 512),),
         writable=False)


# ---- 271: extended L2 entries -------------------------------------------------------------------------

def _ext_l2(cmds: Sequence[str], poke: Callable[[Path], None]) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        img = base(d, "1M", *cmds, extended_l2="on")
        poke(img)
        return img
    return build


def _bitmap_word(img: Path, cluster: int) -> int:
    return l2_table_offset(img, 0) + 16 * cluster + 8


def _p_zero_bit_std(img: Path) -> None:
    off = l2_table_offset(img, 0)
    patch(img, off + 7, bytes([read_range(img, off + 7, 1)[0] | 1]))


def _p_alloc_and_zero_c1(img: Path) -> None:
    poke_u32(img, _bitmap_word(img, 1), 1)                   # zero bit of subcluster 0 (alloc all set)


def _p_alloc_no_offset(img: Path) -> None:
    patch(img, _bitmap_word(img, 0) + 7, b"\x01")            # allocate subcluster 0, no host cluster


def _p_alloc_and_zero_no_offset(img: Path) -> None:
    poke_u64(img, _bitmap_word(img, 1), (1 << 32) | 1)


def _p_compressed_bitmap(img: Path) -> None:
    patch(img, _bitmap_word(img, 0) + 3, b"\x01\x80")        # zero sc 0, allocate sc 31


EXT_CASES: list[tuple[str, str, Sequence[str], Callable[[Path], None], int, str]] = [
    ("zero-bit-on-descriptor", "bit 0 of an allocated extended entry's first word (no meaning "
     "there: QEMU ignores it)", ["write -q -P 0x11 0 2k"], _p_zero_bit_std, 1024, ""),
    ("alloc-and-zero", "a subcluster both allocated and zero", ["write -q 32k 128k"],
     _p_alloc_and_zero_c1, 192 * KiB, "check exit 0 on extended L2 allocated-and-zero"),
    ("zero-bit-on-unallocated", "bit 0 of an unallocated extended entry", ["write -q 256k 1k"],
     _p_zero_bit_std, 1024, ""),
    ("alloc-without-offset", "an allocated subcluster with no host cluster", ["write -q 256k 1k"],
     _p_alloc_no_offset, 1024, "check exit 0 on allocated subclusters without host offset"),
    ("alloc-and-zero-without-offset", "allocated+zero subcluster with no host cluster",
     ["write -q 256k 1k"], _p_alloc_and_zero_no_offset, 192 * KiB,
     "check exit 0 on extended L2 allocated-and-zero"),
    ("compressed-with-bitmap", "a compressed cluster with a non-zero subcluster bitmap",
     ["write -q -P 11 -c 0 64k"], _p_compressed_bitmap, 64 * KiB,
     "check exit 0 on compressed cluster with subcluster bitmap"),
]

for _name, _what, _cmds, _poke, _len, _i9 in EXT_CASES:
    for _mode in ("read", "write"):
        scenario(f"271-{_name}-{_mode}", f"271 corrupted extended L2 entries: {_what}; a {_mode} over it.",
                 _ext_l2(_cmds, _poke),
                 (Read(0, _len),) if _mode == "read" else (Write(0, _len, 0x11),),
                 writable=_mode == "write", issue9=_i9, mount=(_name == "alloc-and-zero" and _mode == "read"))


def _ext_l2_unaligned(zeroed: bool) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        d.mkdir(parents=True, exist_ok=True)
        raw = d / "base.raw"
        qimg("create", "-q", "-f", "raw", raw, "128k")
        qio(raw, "write -q -P 0xff 0 128k", fmt="raw")
        img = create(d / "disk.qcow2", "128k", backing="base.raw", backing_fmt="raw", cwd=d, extended_l2="on")
        qio(img, "write -q -P 1 4k 2k", *(("write -q -z 4k 2k",) if zeroed else ()), cwd=d)
        patch(img, l2_table_offset(img, 0) + 6, b"\x02")
        return img
    return build


scenario("271-unaligned-allocated-subcluster", "271: an unaligned host offset with an allocated "
         "subcluster: unrepairable, reads fail.", _ext_l2_unaligned(False), (Read(0, 2048),), writable=False)
scenario("271-unaligned-no-allocated-subcluster", "271: an unaligned host offset, no subcluster "
         "allocated (only zero ones): the offset is never used for data.", _ext_l2_unaligned(True),
         (Read(0, 8192),), writable=False)


# ---- 290: discard / zero writes on v2 ------------------------------------------------------------------

def _v2_with_backing(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    b = create(d / "base.qcow2", "128k")
    qio(b, "write -P 0xff 0 128k")
    img = create(d / "disk.qcow2", "128k", backing="base.qcow2", backing_fmt="qcow2", cwd=d, compat="0.10")
    qio(img, "write -P 0x01 0 128k", cwd=d)
    return img


scenario("290-v2-zero-write-with-backing", "290 (control, no corruption): v2 with a backing file has no "
         "zero flag; zeroing must still read zeros, never the backing file's data.",
         _v2_with_backing, (Write(0, 128 * KiB, zero=True), Read(0, 128 * KiB)))


# ---- 261: snapshot tables -----------------------------------------------------------------------------

def _v3_without_extra(d: Path) -> Path:
    """261 'repair botched v3': a v2 image whose snapshot entry carries no extra data, then
    declared v3 (version 3, header_length 104, refcount_order 4), which requires 16 bytes."""
    img = base(d, "64M", "write -P 0xa1 0 64k", compat="0.10")
    qimg("snapshot", "-c", "sn0", img)
    assert read_range(img, 72, 40) == bytes(40), "v2 header extensions would turn into feature bits"
    e = snapshot_entries(img)[0]
    raw = read_range(img, e.entry_offset, e.length)
    names = raw[40 + e.extra_len: 40 + e.extra_len + len(e.id.encode()) + len(e.name.encode())]
    entry = raw[:36] + struct.pack(">I", 0) + names
    patch(img, e.entry_offset, entry + bytes(e.length - len(entry)))
    set_field(img, "version", 3)
    set_field(img, "header_length", 104)
    set_field(img, "refcount_order", 4)
    return img


scenario("261-v3-without-extra-data", "261 'repair botched v3': a v3 snapshot entry with less than the "
         "16 bytes of extra data v3 requires.", _v3_without_extra, (Read(0, 512), SnapRead("1", 0, 512)),
         writable=False)


def _too_much_extra(d: Path) -> Path:
    img = base(d, "64M", "write -P 0xa2 0 64k")
    for n in ("sn0", "sn1", "sn2", "sn3"):
        qimg("snapshot", "-c", n, img)
    e = snapshot_entries(img)[-1]
    poke_u32(img, e.entry_offset + 36, 0x10000)
    return img


scenario("261-too-much-extra-data", "261: 64 KiB of extra data in the last snapshot entry (QEMU's limit "
         "is 1 KiB); the entry now spills into the next cluster.", _too_much_extra,
         (Read(0, 512), SnapRead("1", 0, 512)), writable=False)


def _snapshot_table_too_big(d: Path) -> Path:
    img = base(d, "64M")
    sn = bytearray(40)
    struct.pack_into(">HH", sn, 12, 0xFFFF, 0xFFFF)
    struct.pack_into(">I", sn, 36, 1024)
    size = 40 + 1024 + 65535 + 65535 + 2
    offset, written, count = MiB, 0, 0
    with open(img, "r+b") as f:
        while written <= 64 * MiB:
            f.seek(offset)
            f.write(sn)
            offset += size
            written += size
            count += 1
        f.truncate(offset)
    set_field(img, "snapshots_offset", MiB)
    set_field(img, "nb_snapshots", count)
    return img


scenario("261-snapshot-table-too-big", "261: a snapshot table over 64 MiB (QEMU's limit).",
         _snapshot_table_too_big, (Read(0, 512),), writable=False)


def _too_many_snapshots(d: Path) -> Path:
    img = base(d, "64M", compat="0.10")
    set_field(img, "snapshots_offset", MiB)
    set_field(img, "nb_snapshots", 0x20000)
    os.truncate(img, MiB + 40 * 0x20000)
    return img


scenario("261-too-many-snapshots", "261: 131072 (all-zero, v2) snapshot entries, over QEMU's 65536.",
         _too_many_snapshots, (Read(0, 512),), writable=False)


def _misaligned_snapshot_table(d: Path) -> Path:
    img = base(d, "64M", "write -P 0xa3 0 64k")
    qimg("snapshot", "-c", "s", img)
    h = header(img)
    # the same table, 8 bytes further on, and the header pointing there
    table = read_range(img, h.snapshots_offset, 4096)
    patch(img, h.snapshots_offset + 8, table[:4088])
    set_field(img, "snapshots_offset", h.snapshots_offset + 8)
    return img


scenario("261-misaligned-snapshot-table", "A snapshot table offset that is not cluster aligned (8 bytes "
         "off): QEMU refuses to open the image.", _misaligned_snapshot_table,
         (Read(0, 512), SnapRead("1", 0, 512)), writable=False,
         issue9="data served where QEMU refuses: misaligned snapshot table")


# ---- qemu-img-bitmaps: inconsistent bitmaps -----------------------------------------------------------

def _in_use_bitmap(d: Path) -> Path:
    img = base(d, "10M", "write -P 0xb1 0 1M")
    qimg("bitmap", "--add", img, "b4")
    p = qio(img, "write -P 0xb2 2M 64k", "abort", check=False)
    assert p.returncode != 0
    return img


def bitmap_flags(img: Path) -> dict[str, list[str]]:
    data = json.loads(qimg("info", "-U", "--output=json", img))["format-specific"]["data"]
    return {b["name"]: sorted(b["flags"]) for b in data.get("bitmaps", [])}


def _in_use_kept(orig: Path, after_qemu: Path, after_qcowfs: Path) -> list[str]:
    want, got = bitmap_flags(after_qemu), bitmap_flags(after_qcowfs)
    problems = []
    for name, flags in want.items():
        if "in-use" in flags and "in-use" not in got.get(name, ["in-use"]):
            problems.append(f"bitmap '{name}' was in use (inconsistent) and QEMU kept it so; qcowfs "
                            f"cleared in-use (flags {got.get(name)}), so its stale bits now look valid")
    return problems


scenario("bitmaps-in-use", "qemu-img-bitmaps 'inconsistent bitmap': an auto bitmap left in_use by a "
         "crash. Its bits are unreliable: a write must not make it look consistent again.",
         _in_use_bitmap, (Write(3 * MiB, 64 * KiB, 0xb3), Read(0, 4096)), extra_check=_in_use_kept)


def _absurd_bitmap_table_size(d: Path) -> Path:
    img = base(d, "10M", "write -P 0xb1 0 1M")
    qimg("bitmap", "--add", img, "b5")
    directory, _ = bitmap_directory(img)
    poke_u32(img, directory + 8, 0x7FFFFFFF)  # bitmap_table_size: 16 GiB of entries
    return img


scenario("bitmap-table-size-absurd", "a bitmap directory entry whose table size (a u32) names 2**31 "
         "entries, far past the end of the file: QEMU refuses the image; check and every open must "
         "say so without reading 16 GiB of entries (check asked for them as zeros and was killed "
         "by the OOM killer: hostile seed 500046, from a differential run of check)",
         _absurd_bitmap_table_size, (Write(3 * MiB, 64 * KiB, 0xb3), Read(0, 4096)))


# ---- issue 9: an already inconsistent image is not made worse ----------------------------------------

def _data_refcount_zero(cluster_size: int, far: bool) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        img = base(d, "1G", "write -P 0xc1 0 1M", cluster_size=cluster_size)
        victim = u64(img, l2_entry_offset(img, 256 * KiB)) & OFFSET_MASK
        set_refcount(img, cluster_of(img, victim), 0)
        return img
    return build


for _cs, _far in ((64 * KiB, False), (64 * KiB, True), (4 * KiB, False), (4 * KiB, True)):
    # near: inside the first L2 table (it covers 2 MiB with 4 KiB clusters); far: a new L2 table
    _where = 512 * MiB + 64 * KiB if _far else MiB + 256 * KiB
    scenario(f"issue9-data-refcount-zero-c{_cs // KiB}k{'-new-l2' if _far else ''}",
             "Issue 9: a data cluster in use has refcount 0 (no corrupt bit; qemu-img check exit 2). "
             "One 128 KiB write elsewhere: the allocator must not hand out the live cluster "
             "(if QEMU's run leaves its data intact, qcowfs must too).",
             _data_refcount_zero(_cs, _far), (Write(_where, 128 * KiB, 0xc2),),
             keep_guest=((0, MiB),), issue9="already inconsistent image made worse",
             mount=(_cs, _far) == (64 * KiB, False))

scenario("issue9-data-refcount-zero-cached-l2",
         "Beyond QEMU (QEMU overwrites the data here): the live cluster with refcount 0 is referenced "
         "by an L2 table qcowfs has just read (cached), and a 64 KiB write elsewhere allocates one "
         "cluster. Issue 9 asks that a cluster referenced by a cached L2 table is never handed out.",
         _data_refcount_zero(64 * KiB, False), (Read(256 * KiB, 4096), Write(2 * MiB, 64 * KiB, 0xc3)),
         keep_guest=((0, MiB),), beyond_qemu=True, issue9="already inconsistent image made worse")
