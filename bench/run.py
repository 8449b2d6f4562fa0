#!/usr/bin/env python3
"""qcowfs benchmark: qcowfs against qemu-storage-daemon, qcowmount and a bare
pyfuse3 passthrough, on the same qcow2 image, with fio; and qcowfs's Python API
against dissect.hypervisor and pyqcow (libqcow), each reading the same images.

    bench/run.py [--quick] [--no-writes] [--runs N] [--only NAME,...] ...

See bench/README.md. Exit status: 0 when every contender ran (whatever the
speed), 1 when a contender failed to run (qcowfs's read-write mount being
unavailable is reported as n/a and does not count as a failure), 130 on
Ctrl-C. Everything it mounts or starts is unmounted / stopped on the way out.
"""

import argparse
import contextlib
import datetime
import json
import mmap
import os
import platform
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
from qcowfs.host import mounts  # noqa: E402  (the one mount-table parser)
WORK = HERE / "work"
MIB = 1 << 20
GIB = 1 << 30

# --------------------------------------------------------------------------
# Benchmarks. To add one: append a Bench. `kind` decides how it mounts and
# which contenders take part ("read": `image` mounted read-only; "write": a
# fresh scratch image per run, mounted read-write; "sparse", "start": their
# own image, read-only). `image` names the image they mount (bench_images).
# `prepare` names how the scratch image is made ("empty" or "copy").
# `job` is what runs on the mounted disk: fio with `fio`, or the users' real
# job, ext4 on a loop device over disk.raw ("ext4_write": copy a tree of
# files in, through umount; "ext4_read": read it all back with cold caches;
# "first_file": time from the mount command to the end of reading a file).
# How fio reaches the disk: `direct` (O_DIRECT opens of the disk file),
# `loop` (a direct-I/O loop device over it), `cgroup` (daemon and fio in a
# memory cgroup far smaller than the image: its limit set before the mount,
# after it, or in the middle of fio; or a cgroup that holds the part of the
# disk fio reads, shared with a process streaming a large file).
# job "api": the library rows, no fio and no mount for the libraries: a
# process of its own (api_child) reads the whole disk or writes it, in 1 MiB
# requests, through a library (Library contenders: qcowfs.open(...).disk,
# dissect.hypervisor, pyqcow) or through a mount's disk file (the mount peer
# of the write row). Their subject, the numerator of the ratios, is qcowfs-api.


@dataclass
class Bench:
    key: str
    title: str
    kind: str  # "read" | "write" | "sparse" (its own 100 GiB image, read-only)
    unit: str  # "MiB/s" | "IOPS"
    fio: list
    time_based: bool = False
    prepare: str = ""  # write benches: "empty" | "copy"
    job: str = "fio"  # "fio" | "ext4_write" | "ext4_read" | "ext4_trim" | "cp_sparse" | "first_file" | "api"
    encrypted: bool = False  # on the LUKS twin of the image (contenders that can_luks)
    only: tuple = ()  # the contenders that take part (empty: all that can)
    image: str = "random"  # what a read-only row mounts (bench_images)
    direct: bool = False  # fio --direct=1 on the disk file (O_DIRECT opens)
    loop: bool = False  # fio --direct=1 on `losetup --direct-io=on --read-only` over the disk file
    # Daemon and fio in a memory cgroup: "before" (limited to cgroup_limit(image
    # size) before the mount), "after" (limited after the mount, before fio),
    # "during" (limited in the middle of fio, which counts from then on),
    # "stream" (see STREAM_*).
    cgroup: str = ""
    lower_is_better: bool = False  # a time, not a speed (ratios and aims are maxima)
    cold: bool = False  # api rows: image files evicted from the host page cache, not read once
    subject: str = "qcowfs"  # the contender whose ratios to the others are reported

    def classes(self):
        """What AIMS may name this bench by, most specific first."""
        return ([self.key] + (["*api"] if self.job == "api" else [])
                + (["*direct"] if self.direct else []) + ["*" + self.kind])


LIBRARIES = ("qcowfs-api", "dissect", "pyqcow")  # the readers of the library rows
API_GROUP = "api"  # what --bench calls all the rows of job "api"
MAKERS_GROUP = "makers"  # --bench makers: create, convert, commit and rebase against qemu-img (bench/ops.py)


def api_read(key, title, image, cold=False):
    """A library row: the whole disk of IMAGE read in 1 MiB requests by each library."""
    return Bench(key, title, "read", "MiB/s", [], job="api", only=LIBRARIES, image=image,
                 cold=cold, subject="qcowfs-api")


BENCHES = [
    Bench("seq_read", "seq read 1M", "read", "MiB/s",
          ["--rw=read", "--bs=1M"]),
    Bench("rand_read_1", "rand read 4k, 1 job", "read", "IOPS",
          ["--rw=randread", "--bs=4k", "--numjobs=1"], time_based=True),
    Bench("rand_read_4", "rand read 4k, 4 jobs", "read", "IOPS",
          ["--rw=randread", "--bs=4k", "--numjobs=4", "--group_reporting"],
          time_based=True),
    Bench("seq_write", "seq write 1M (empty)", "write", "MiB/s",
          ["--rw=write", "--bs=1M", "--end_fsync=1"], prepare="empty"),
    Bench("rand_write_1", "rand write 4k +fsync", "write", "IOPS",
          ["--rw=randwrite", "--bs=4k", "--numjobs=1", "--end_fsync=1"],
          time_based=True, prepare="copy"),
    Bench("ext4_write", "ext4 on loop: copy", "write", "MiB/s", [],
          prepare="empty", job="ext4_write"),
    Bench("ext4_read", "ext4 on loop: read", "write", "MiB/s", [],
          prepare="empty", job="ext4_read"),
    # The same image encrypted with LUKS (qemu-img's default aes-256-xts-plain64),
    # qcowfs against qemu-storage-daemon given the same secret.
    Bench("luks_seq_read", "LUKS seq read 1M", "read", "MiB/s",
          ["--rw=read", "--bs=1M"], encrypted=True),
    Bench("luks_rand_read_1", "LUKS rand read 4k", "read", "IOPS",
          ["--rw=randread", "--bs=4k", "--numjobs=1"], time_based=True, encrypted=True),
    Bench("luks_seq_write", "LUKS seq write 1M", "write", "MiB/s",
          ["--rw=write", "--bs=1M", "--end_fsync=1"], prepare="empty", encrypted=True),
    Bench("luks_rand_write_1", "LUKS rand write 4k+fsync", "write", "IOPS",
          ["--rw=randwrite", "--bs=4k", "--numjobs=1", "--end_fsync=1"],
          time_based=True, prepare="copy", encrypted=True),
    # fallocate PUNCH_HOLE through the loop device: MiB of deleted files
    # trimmed per second (peers without fallocate cannot take part).
    Bench("ext4_trim", "ext4 on loop: fstrim", "write", "MiB/s", [],
          prepare="empty", job="ext4_trim", only=("qcowfs", "qsd")),
    # SEEK_DATA/SEEK_HOLE: a 100 GiB disk holding 1 GiB, copied sparse;
    # GiB of disk (not of data) per second.
    Bench("cp_sparse", "cp --sparse 100G (1G)", "sparse", "GiB/s", [],
          job="cp_sparse", only=("qcowfs", "qsd"), image="sparse"),
    # Where the page cache does not help (issue 13): the daemon's own cost.
    # O_DIRECT opens of the disk file (a VM with cache=none, dd iflag=direct).
    Bench("direct_read_1", "direct rand 4k, 1 job", "read", "IOPS",
          ["--rw=randread", "--bs=4k", "--numjobs=1"], time_based=True, direct=True),
    Bench("direct_read_4", "direct rand 4k, 4 jobs", "read", "IOPS",
          ["--rw=randread", "--bs=4k", "--numjobs=4", "--group_reporting"],
          time_based=True, direct=True),
    # Buffered reads by a reader allowed far less page cache than the image.
    Bench("cgroup_read_1", "cgroup rand 4k, 1 job", "read", "IOPS",
          ["--rw=randread", "--bs=4k", "--numjobs=1"], time_based=True, cgroup="before"),
    Bench("cgroup_after_read_1", "cgroup set after mount", "read", "IOPS",
          ["--rw=randread", "--bs=4k", "--numjobs=1"], time_based=True, cgroup="after"),
    Bench("cgroup_during_read_1", "cgroup set during fio", "read", "IOPS",
          ["--rw=randread", "--bs=4k", "--numjobs=1"], time_based=True, cgroup="during"),
    Bench("cgroup_stream_read_1", "cgroup + streaming cat", "read", "IOPS",
          ["--rw=randread", "--bs=4k", "--numjobs=1"], time_based=True, cgroup="stream"),
    # A loop device with --direct-io=on over the disk file.
    Bench("loop_seq_read", "loop dio: seq read 1M", "read", "MiB/s",
          ["--rw=read", "--bs=1M"], loop=True),
    Bench("loop_rand_read", "loop dio: rand 4k", "read", "IOPS",
          ["--rw=randread", "--bs=4k", "--numjobs=1"], time_based=True, loop=True),
    # Compressed clusters (zlib, zstd) and a 4-deep backing chain.
    Bench("zlib_seq_read", "zlib seq read 1M", "read", "MiB/s",
          ["--rw=read", "--bs=1M"], image="compressed-zlib"),
    Bench("zlib_rand_read", "zlib rand read 4k", "read", "IOPS",
          ["--rw=randread", "--bs=4k", "--numjobs=1"], time_based=True, image="compressed-zlib"),
    Bench("zlib_rand_read_4", "zlib rand read 4k, 4 jobs", "read", "IOPS",
          ["--rw=randread", "--bs=4k", "--numjobs=4", "--group_reporting"], time_based=True,
          image="compressed-zlib"),
    Bench("zstd_seq_read", "zstd seq read 1M", "read", "MiB/s",
          ["--rw=read", "--bs=1M"], image="compressed-zstd"),
    Bench("zstd_rand_read", "zstd rand read 4k", "read", "IOPS",
          ["--rw=randread", "--bs=4k", "--numjobs=1"], time_based=True, image="compressed-zstd"),
    Bench("chain_seq_read", "chain-4 seq read 1M", "read", "MiB/s",
          ["--rw=read", "--bs=1M"], image="chain"),
    Bench("chain_rand_read", "chain-4 rand read 4k", "read", "IOPS",
          ["--rw=randread", "--bs=4k", "--numjobs=1"], time_based=True, image="chain"),
    Bench("chain_rand_read_4", "chain-4 rand read 4k, 4 jobs", "read", "IOPS",
          ["--rw=randread", "--bs=4k", "--numjobs=4", "--group_reporting"],
          time_based=True, image="chain"),
    # Cold caches, from the mount command to the last byte of a file in the
    # ext4 on the disk (mount, losetup, mount the ext4, read its largest file).
    Bench("first_file", "time to first file", "start", "s", [],
          job="first_file", image="ext4", lower_is_better=True),
    # The library rows (--bench api): qcowfs.open(IMG).disk against
    # dissect.hypervisor's QCow2 stream and pyqcow, with the image files in the
    # host page cache (as every row above) and evicted from it ("cold").
    api_read("api_read", "api read 1M", "random"),
    api_read("api_read_cold", "api read 1M cold", "random", cold=True),
    api_read("api_zlib_read", "api zlib read 1M", "compressed-zlib"),
    api_read("api_zlib_read_cold", "api zlib read 1M cold", "compressed-zlib", cold=True),
    api_read("api_zstd_read", "api zstd read 1M", "compressed-zstd"),
    api_read("api_zstd_read_cold", "api zstd read 1M cold", "compressed-zstd", cold=True),
    api_read("api_chain_read", "api chain read 1M", "chain"),
    api_read("api_chain_read_cold", "api chain read 1M cold", "chain", cold=True),
    # Writes into a fresh empty image through the API and through a mount.
    Bench("api_write", "api seq write 1M", "write", "MiB/s", [], prepare="empty",
          job="api", only=("qcowfs-api", "qcowfs"), subject="qcowfs-api"),
]

# The passphrase of the LUKS images, given to every contender as a key file.
LUKS_SECRET = "qcowfs-bench"


# Aims (issue 13): (a name of the bench in Bench.classes(): its key, "*direct"
# for the O_DIRECT rows, "*read" for all read rows; peer) -> the ratio qcowfs /
# peer must reach: at least that, or at most that for lower_is_better rows.
# CPU_AIMS: daemon CPU seconds per GiB of every fio row, qcowfs / peer at most.
# Only reported, never enforced.
AIMS = {
    ("*read", "qsd"): 1.0,
    ("*read", "qcowmount"): 1.0,
    ("*direct", "passthrough"): 0.8,
    ("seq_read", "passthrough"): 0.9,
    ("seq_write", "qsd"): 1.2,
    ("rand_write_1", "qsd"): 1.0,
    ("first_file", "qsd"): 4.0,
    # The default against read_around=0 where pushes cannot pay.
    ("*direct", "qcowfs-ra0"): 1.0,
    ("cgroup_read_1", "qcowfs-ra0"): 1.0,
    # The default number of serving processes against one (issue 24).
    ("direct_read_4", "qcowfs-w1"): 1.0,
    ("zlib_rand_read_4", "qcowfs-w1"): 1.0,
    ("cgroup_after_read_1", "qcowfs-ra0"): 1.0,
    ("cgroup_during_read_1", "qcowfs-ra0"): 1.0,
    ("cgroup_stream_read_1", "qcowfs-ra0"): 1.0,
    # The library rows (subject qcowfs-api): at least 2x the faster of the
    # two other readers (so 2x each), writes at least as fast as through a mount.
    ("*api", "dissect"): 2.0,
    ("*api", "pyqcow"): 2.0,
    ("api_write", "qcowfs"): 1.0,
}
CPU_AIMS = {"qsd": 1.0}
# Aims against qcowfs-ra0 compare two settings of the same daemon, where
# read-around pushes nothing: the two then differ by less than the runs of
# either differ among themselves (an A/A run of two identical daemons, 5
# alternating runs a row, gave 0.97x and 1.03x; the O_DIRECT rows, the same
# code path in both, 0.94x and 1.03x in full runs). "At least as fast, within
# noise, alternating runs" (issue 24) is a sign test over the rounds: the
# subject is slower beyond noise when it is below the aim in every one of
# NOISE_RUNS alternating rounds (one chance in 32 if the two were the same),
# and within noise otherwise.
NOISE_PEERS = {"qcowfs-ra0"}
NOISE_RUNS = 5

# Ratio columns, in order (those of a table's contenders, its subject left out).
PEERS = ["qsd", "qcowmount", "passthrough", "passthrough-w2", "qcowfs-ra0", "qcowfs-w1", "qcowfs-w2", "qcowfs-w4", "dissect",
         "pyqcow", "qcowfs"]


def aim_for(bench, peer):
    for name in bench.classes():
        if (name, peer) in AIMS:
            return AIMS[(name, peer)]
    return None


def compare(qv, pv, aim, lower_is_better, pairs=None):
    """qcowfs's value against a peer's: ratio qcowfs / peer, the aim, met.
    PAIRS: the (qcowfs, peer) values of alternating rounds, for an aim
    within noise (NOISE_PEERS): a miss counts only if every round misses."""
    ratio = qv / pv if (qv is not None and pv) else None
    met = None
    misses = None
    if ratio is not None and aim is not None:
        met = ratio <= aim if lower_is_better else ratio >= aim
        if not met and pairs:
            misses = sum((q > aim * p) if lower_is_better else (q < aim * p) for q, p in pairs)
            met = misses < len(pairs)
    return {"ratio": ratio, "aim": aim, "met": met, "rounds": len(pairs or ()), "misses": misses}


def aim_text(r, lower_is_better):
    """'aim >=1.0 met' / 'aim <=4.0 NOT met' / 'aim >=1.0 met within
    noise (below in 4 of 5 rounds)' (empty without an aim)."""
    if r["aim"] is None:
        return ""
    verdict = "" if r["met"] is None else (" met" if r["met"] else " NOT met")
    if r.get("misses") is not None:
        verdict += f" within noise ({_rounds(r)})" if r["met"] else f" ({_rounds(r)})"
    return f"aim {'<=' if lower_is_better else '>='}{r['aim']:.1f}{verdict}"


# --------------------------------------------------------------------------
# Small helpers


class ContenderError(Exception):
    """A contender could not be mounted or a run on it failed."""


class Unavailable(ContenderError):
    """Not a failure: the contender cannot do this yet (printed as n/a)."""


def pin_prefix(cpus):
    """taskset prefix for a command (empty when not pinning)."""
    return ["taskset", "-c", cpus] if cpus else []


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run(cmd, timeout=120, check=True):
    p = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise command_error(cmd, p)
    return p


def command_error(cmd, p):
    """The ContenderError of command CMD that ended as P: its last line of output."""
    err = (p.stderr.strip() or p.stdout.strip()).splitlines()
    return ContenderError(f"{Path(str(cmd[0])).name} exited {p.returncode}: "
                          + (err[-1] if err else "(no output)"))


def mounted(path):
    """True if `path` (a directory or, for FUSE exports, a file) is a mount point."""
    return mounts.is_mounted(path)


def wait_for(pred, timeout, what, proc=None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise ContenderError(f"{what}: process exited {proc.returncode} before mounting")
        time.sleep(0.005)  # fine enough for the mount times of first_file
    raise ContenderError(f"{what}: not mounted after {timeout}s")


def pids_mentioning(path):
    """Pids of live processes whose argv contains `path` (our unique mountpoint)."""
    out = []
    needle = os.fsencode(os.path.abspath(path))
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{d}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(a == needle or a.endswith(b"=" + needle) for a in argv):
            out.append(int(d))
    return out


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_pids(pids, grace=10.0):
    """SIGTERM, wait, SIGKILL: only the given pids (processes we started)."""
    pids = [p for p in pids if alive(p)]
    end = time.monotonic() + grace
    while pids and time.monotonic() < end:
        pids = [p for p in pids if alive(p)]
        time.sleep(0.05)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not pids:
            return
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, sig)
        end = time.monotonic() + 5
        while pids and time.monotonic() < end:
            pids = [p for p in pids if alive(p)]
            time.sleep(0.05)


def force_unmount(path):
    if not mounted(path):
        return
    for args in (["-u"], ["-uz"]):
        subprocess.run(["fusermount3", *args, str(path)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=30)
        end = time.monotonic() + 3
        while mounted(path) and time.monotonic() < end:
            time.sleep(0.05)
        if not mounted(path):
            return
    subprocess.run(["umount", "-l", str(path)], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=30)


# Everything we mount / start / create is also registered here, swept at exit.
_MOUNTS = set()
_PIDS = set()
_LOOPS = set()
_CGROUPS = set()
EXT4_MNT = WORK / "ext4"  # where the ext4 jobs mount the filesystem on the loop device


def sweep():
    """Undo, innermost first: the ext4 on a loop device, loop devices, FUSE
    mounts, daemons, cgroups."""
    if mounted(EXT4_MNT):
        subprocess.run(["umount", "-l", str(EXT4_MNT)], capture_output=True, timeout=30)
    for dev in list(_LOOPS):
        with contextlib.suppress(Exception):
            detach_loop(dev)
    for mp in list(_MOUNTS):
        with contextlib.suppress(Exception):
            if str(mp) == "/sys/fs/fuse/connections":
                subprocess.run(["umount", str(mp)], stderr=subprocess.DEVNULL, timeout=30)
            else:
                force_unmount(mp)
    with contextlib.suppress(Exception):
        stop_pids(list(_PIDS), grace=0)
    for cg in list(_CGROUPS):
        with contextlib.suppress(Exception):
            remove_cgroup(cg)


@contextlib.contextmanager
def loop_device(path, *options):
    """losetup --find --show OPTIONS PATH; detached on the way out."""
    dev = run(["losetup", "--find", "--show", *options, path]).stdout.strip()
    _LOOPS.add(dev)
    try:
        yield dev
    finally:
        detach_loop(dev)


def detach_loop(dev):
    for _ in range(50):  # busy for a moment after the umount of a filesystem on it
        if subprocess.run(["losetup", "-d", dev], capture_output=True).returncode == 0:
            break
        time.sleep(0.1)
    _LOOPS.discard(dev)


def cgroup_limit(image_size):
    """The memory limit of the cgroup rows: a quarter of the image, at least
    128 MiB (what a daemon and fio need besides page cache)."""
    return max(image_size // 4, 128 * MIB)


# The streaming row: fio reads only the first STREAM_SPAN of the disk, in a
# cgroup of STREAM_LIMIT: room enough for that span and for read-around to
# fill it (an eighth of the room is read-around's share), were it not for a
# process in the same cgroup reading a sparse file of STREAM_FILE through the
# page cache from start to end, over and over, at STREAM_MIB_S.
STREAM_SPAN = 96 * MIB
STREAM_LIMIT = 1024 * MIB
STREAM_FILE = 8192 * MIB
STREAM_MIB_S = 256
STREAMER = """
import os, sys, time
path, rate = sys.argv[1], float(sys.argv[2])
buf = bytearray(1 << 20)
t0, n = time.monotonic(), 0
while True:
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            n += 1
            ahead = n / rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
"""


def cgroup_limit_of(bench, image_size):
    """The limit of BENCH's cgroup (the streaming row's, or cgroup_limit)."""
    return STREAM_LIMIT if bench.cgroup == "stream" else cgroup_limit(image_size)


@contextlib.contextmanager
def memory_cgroup(limit):
    """A memory cgroup of its own (cgroup v2 `memory.max`, else v1
    `memory.limit_in_bytes`) of LIMIT bytes (None: no limit yet), removed on
    the way out. Yields its directory."""
    root = Path("/sys/fs/cgroup")
    if (root / "cgroup.controllers").exists():
        parent = root
        ctl = root / "cgroup.subtree_control"
        if "memory" not in ctl.read_text().split():
            ctl.write_text("+memory\n")
    else:
        parent = root / "memory"
    cg = parent / f"qcowfs-bench-{os.getpid()}"
    cg.mkdir()
    _CGROUPS.add(cg)
    try:
        if limit is not None:
            set_cgroup_limit(cg, limit)
        yield cg
    finally:
        remove_cgroup(cg)


def set_cgroup_limit(cg, limit):
    """Limit cgroup CG to LIMIT bytes (the kernel reclaims down to it at once)."""
    v2 = (cg / "memory.max").exists()
    (cg / ("memory.max" if v2 else "memory.limit_in_bytes")).write_text(f"{limit}\n")


@contextlib.contextmanager
def streamer(cg):
    """A process in cgroup CG streaming a sparse file larger than the cgroup
    (made once, no disk blocks: its pages are zeros the page cache makes)."""
    path = WORK / f"stream-{STREAM_FILE // MIB}M.sparse"
    if not path.exists():
        with open(path, "wb") as f:
            f.truncate(STREAM_FILE)
    p = subprocess.Popen(in_cgroup(cg) + [sys.executable, "-c", STREAMER, str(path), str(STREAM_MIB_S)],
                         stdin=subprocess.DEVNULL)
    _PIDS.add(p.pid)
    try:
        yield
    finally:
        p.kill()
        p.wait()
        _PIDS.discard(p.pid)


def in_cgroup(cg):
    """Command prefix that starts a process in cgroup CG (its children stay in it)."""
    return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', cg]


def cgroup_peak_mib(cg):
    """The most memory the cgroup held (page cache included), MiB."""
    for name in ("memory.max_usage_in_bytes", "memory.peak"):  # v1, v2
        with contextlib.suppress(OSError, ValueError):
            return int((cg / name).read_text()) / MIB
    return None


def remove_cgroup(cg):
    """rmdir, once the processes in it are gone (stopped with their mount)."""
    for _ in range(100):
        try:
            cg.rmdir()
            break
        except FileNotFoundError:
            break
        except OSError:
            time.sleep(0.1)
    else:
        log(f"warning: cannot remove cgroup {cg}")
    _CGROUPS.discard(cg)


def drop_caches():
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        log(f"warning: cannot drop caches ({e}); results will be noisier")


def warm(path):
    """cat path > /dev/null"""
    buf = bytearray(8 * MIB)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def fuse_tune(file_path, read_ahead_kb=None, max_background=None):
    """Set the FUSE connection's readahead / max_background (as root)."""
    if read_ahead_kb is None and max_background is None:
        return
    st = os.stat(file_path)
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    if read_ahead_kb is not None:
        Path(f"/sys/class/bdi/{major}:{minor}/read_ahead_kb").write_text(f"{read_ahead_kb}\n")
    if max_background is not None:
        conns = Path("/sys/fs/fuse/connections")
        if not mounted(conns):  # fusectl is not always mounted (containers)
            run(["mount", "-t", "fusectl", "fusectl", conns])
            _MOUNTS.add(conns)
        Path(f"/sys/fs/fuse/connections/{st.st_dev}/max_background").write_text(
            f"{max_background}\n")


# --------------------------------------------------------------------------
# Contenders. mount(qcow2, raw, writable) is a context manager yielding the
# path of the file that shows the virtual disk. `raw` is the raw twin of the
# image (only the passthrough uses it). Library contenders (the api rows)
# mount nothing: open_disk(), in the process api_child() runs, opens the image.


class Contender:
    name = ""
    label = ""
    can_write = True
    can_luks = False  # mounts LUKS-encrypted qcow2 (mount(..., key=KEY FILE))
    unsupported = {}  # Bench.image -> why this contender cannot read it (n/a)
    benches = ()  # the benches it takes part in (empty: all it can)
    library = False  # a Python library reading the image in a process of its own (api rows only)

    def __init__(self, cfg):
        self.cfg = cfg
        self.mnt = WORK / "mnt" / self.name
        self.pids = []  # the serving processes of the current mount (memory, CPU)
        self.wrap = []  # command prefix of the daemon (the cgroup rows)
        self.mount_s = None  # seconds from the mount command to the mount being up

    def prefix(self):
        """What the daemon's command starts with: the cgroup, the CPU pinning."""
        return self.wrap + pin_prefix(self.cfg.daemon_cpus)

    def version(self):
        return ""

    @contextlib.contextmanager
    def mount(self, qcow2, raw, writable, key=None):
        raise NotImplementedError

    def _dir(self):
        if mounted(self.mnt):
            force_unmount(self.mnt)
        self.mnt.mkdir(parents=True, exist_ok=True)
        return self.mnt


class Qcowfs(Contender):
    name = label = "qcowfs"
    can_luks = True
    options: tuple = ()  # -o of the mount command

    def exe(self):
        p = shutil.which("qcowfs") or str(Path(sys.executable).parent / "qcowfs")
        return p

    def version(self):
        with contextlib.suppress(Exception):
            p = run([sys.executable, "-c", "import qcowfs;print(getattr(qcowfs,'__version__',''))"],
                    timeout=30, check=False)
            return p.stdout.strip()
        return ""

    @contextlib.contextmanager
    def mount(self, qcow2, raw, writable, key=None):
        mnt = self._dir()
        options = [*self.options, *([] if key is None else [f"key_file={key}"])]
        cmd = self.prefix() + [self.exe(), "mount", qcow2, mnt] + (
            [] if writable else ["--read-only"]) + (["-o", ",".join(options)] if options else [])
        _MOUNTS.add(mnt)
        pids = []
        try:
            t0 = time.monotonic()
            try:
                p = run(cmd, timeout=120, check=False)
            except subprocess.TimeoutExpired:
                raise ContenderError("qcowfs mount: timed out after 120s")
            self.mount_s = time.monotonic() - t0
            if p.returncode != 0 or not mounted(mnt):
                err = (p.stderr.strip() or p.stdout.strip()).splitlines()
                msg = (f"qcowfs mount{'' if writable else ' --read-only'} exited "
                       f"{p.returncode}: {err[-1] if err else '(no output)'}")
                raise (Unavailable if writable else ContenderError)(msg)
            pids = self.pids = pids_mentioning(mnt)
            _PIDS.update(pids)
            f = mnt / "disk.raw"
            if not f.exists():
                raise ContenderError("qcowfs: mounted but no disk.raw")
            yield f
        finally:
            if mounted(mnt):
                with contextlib.suppress(Exception):
                    run([self.exe(), "umount", mnt], timeout=120, check=False)
            force_unmount(mnt)
            stop_pids(pids or pids_mentioning(mnt))


class QcowfsNoReadAround(Qcowfs):
    """qcowfs without read-around: the floor the default must not fall
    below where pushes cannot pay (issue 13), and what read-around gains
    where they do."""
    name = "qcowfs-ra0"
    label = "qcowfs -o read_around=0"
    options = ("read_around=0",)
    benches = ("rand_read_1", "rand_read_4", "direct_read_1", "direct_read_4", "cgroup_read_1",
               "cgroup_after_read_1", "cgroup_during_read_1", "cgroup_stream_read_1", "luks_rand_read_1",
               "chain_rand_read", "chain_rand_read_4")


class QcowfsWorkers(Qcowfs):
    """qcowfs served by a fixed number of processes (-o workers=N): how the
    rows that one process's CPU bounds scale with them (the default is one
    per CPU)."""
    benches = ("direct_read_4", "zlib_rand_read_4")


class QcowfsOneWorker(QcowfsWorkers):
    name, label, options = "qcowfs-w1", "qcowfs -o workers=1", ("workers=1",)


class QcowfsTwoWorkers(QcowfsWorkers):
    name, label, options = "qcowfs-w2", "qcowfs -o workers=2", ("workers=2",)


class QcowfsFourWorkers(QcowfsWorkers):
    name, label, options = "qcowfs-w4", "qcowfs -o workers=4", ("workers=4",)


class Qsd(Contender):
    name = "qsd"
    label = "qemu-storage-daemon"
    can_luks = True

    def version(self):
        with contextlib.suppress(Exception):
            return run(["qemu-storage-daemon", "--version"]).stdout.splitlines()[0]
        return ""

    @contextlib.contextmanager
    def mount(self, qcow2, raw, writable, key=None):
        d = self._dir()
        mnt = d / "disk.raw"  # the FUSE export mounts on a regular file
        mnt.touch()
        pidfile = d / "qsd.pid"
        with contextlib.suppress(FileNotFoundError):
            pidfile.unlink()
        cmd = self.prefix() + ["qemu-storage-daemon",
               # discard=unmap on both nodes: qemu's default drops every
               # discard (fstrim would time a no-op), qcowfs frees the clusters.
               "--blockdev", f"driver=file,node-name=file,filename={qcow2},discard=unmap",
               *([] if key is None else ["--object", f"secret,id=sec0,file={key}"]),
               "--blockdev", "driver=qcow2,node-name=qcow2,file=file,discard=unmap"
               + ("" if key is None else ",encrypt.format=luks,encrypt.key-secret=sec0"),
               "--export", f"type=fuse,id=exp,node-name=qcow2,mountpoint={mnt},"
                           f"writable={'on' if writable else 'off'}",
               "--daemonize", "--pidfile", pidfile]
        _MOUNTS.add(mnt)
        pid = None
        try:
            t0 = time.monotonic()
            run(cmd, timeout=60)  # --daemonize returns once the export is up
            wait_for(lambda: mounted(mnt), 10, "qemu-storage-daemon")
            self.mount_s = time.monotonic() - t0
            pid = int(pidfile.read_text().strip())
            _PIDS.add(pid)
            self.pids = [pid]
            yield mnt
        finally:
            # qsd 7.2 leaves a dead mount behind on SIGTERM and keeps running
            # after fusermount3 -u: unmount first, then stop the daemon.
            force_unmount(mnt)
            if pid is None:
                with contextlib.suppress(Exception):
                    pid = int(pidfile.read_text().strip())
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                stop_pids([pid], grace=10)
            force_unmount(mnt)


class Qcowmount(Contender):
    name = label = "qcowmount"
    can_write = False  # libqcow is read-only
    unsupported = {  # libqcow 20201213 (Debian 12); both checked by hand
        "compressed-zstd": "libqcow refuses zstd images (incompatible feature 0x8)",
        "chain": "libqcow ignores the backing chain (shows the base image's data only)",
    }

    def version(self):
        with contextlib.suppress(Exception):
            return run(["qcowmount", "-V"], check=False).stdout.split("\n")[0].strip()
        return ""

    @contextlib.contextmanager
    def mount(self, qcow2, raw, writable, key=None):
        mnt = self._dir()
        _MOUNTS.add(mnt)
        pids = []
        try:
            t0 = time.monotonic()
            run(self.prefix() + ["qcowmount", qcow2, mnt], timeout=60)  # daemonizes unless -v
            wait_for(lambda: mounted(mnt), 10, "qcowmount")
            self.mount_s = time.monotonic() - t0
            pids = self.pids = pids_mentioning(mnt)
            _PIDS.update(pids)
            yield mnt / "qcow1"
        finally:
            force_unmount(mnt)
            stop_pids(pids or pids_mentioning(mnt))


class Passthrough(Contender):
    name = "passthrough"
    label = "pyfuse3 passthrough"
    workers = 1

    def version(self):
        with contextlib.suppress(Exception):
            return "pyfuse3 " + run([sys.executable, "-c",
                                     "import pyfuse3;print(pyfuse3.__version__)"]).stdout.strip()
        return ""

    @contextlib.contextmanager
    def mount(self, qcow2, raw, writable, key=None):
        mnt = self._dir()
        cmd = self.prefix() + [sys.executable, HERE / "passthrough.py", raw, mnt, "--workers", self.workers]
        if writable:
            cmd.append("--writable")
        _MOUNTS.add(mnt)
        errf = tempfile.TemporaryFile(mode="w+")
        t0 = time.monotonic()
        proc = subprocess.Popen([str(c) for c in cmd], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=errf)
        _PIDS.add(proc.pid)
        self.pids = [proc.pid]
        try:
            try:
                wait_for(lambda: mounted(mnt), 20, "passthrough", proc)
                self.mount_s = time.monotonic() - t0
                if self.workers > 1:  # (forked once the mount is up, with the same argv: wait for them all)
                    wait_for(lambda: len(pids_mentioning(mnt)) == self.workers, 20, "passthrough", proc)
                    self.pids = pids_mentioning(mnt)
            except ContenderError as e:
                errf.seek(0)
                tail = errf.read().strip().splitlines()
                raise ContenderError(f"{e}: {tail[-1] if tail else ''}")
            yield mnt / "disk.raw"
        finally:
            force_unmount(mnt)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            errf.close()
            force_unmount(mnt)


class PassthroughTwoWorkers(Passthrough):
    """The bare passthrough served by two processes (passthrough.py
    --workers): the ceiling of a Python FUSE filesystem on the rows a
    read-only qcowfs mount serves with its default two processes here."""
    name, label, workers = "passthrough-w2", "pyfuse3 passthrough, 2 processes", 2
    benches = ("direct_read_4", "direct_read_1", "rand_read_4")


class Library(Contender):
    """A qcow2 library, in a fresh interpreter per run (api_child): no mount,
    no daemon; the process that reads is the one measured."""
    library = True
    can_write = False
    distribution = ""  # a peer's PyPI name (its version shown; not installed: n/a)
    readinto = False  # reads into one preallocated buffer (else read(n) -> bytes)

    def version(self):
        import importlib.metadata

        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return f"{self.distribution} {importlib.metadata.version(self.distribution)}"
        return "not installed"

    @staticmethod
    def open_disk(layers, writable):
        """Context manager, in the measuring process: (file with read(n) or
        readinto(buf), write(b), seek(off); the disk's size; what makes the
        writes durable) of the disk of layers[0], whose backing chain is
        layers[1:] (top down). ImportError or Unavailable: n/a."""
        raise NotImplementedError


class QcowfsApi(Library):
    name = "qcowfs-api"
    label = "qcowfs.open(IMG).disk"
    can_write = True
    readinto = True
    version = Qcowfs.version

    @staticmethod
    @contextlib.contextmanager
    def open_disk(layers, writable):
        import qcowfs  # it follows the backing chain itself

        with qcowfs.open(layers[0], "r+" if writable else "r") as image:
            yield image.disk, image.disk.size, image.disk.flush


class Dissect(Library):
    name = "dissect"
    label = "dissect.hypervisor QCow2(fh).open()"
    distribution = "dissect.hypervisor"  # [full] for zstd (backports.zstd on Python < 3.14)

    @staticmethod
    @contextlib.contextmanager
    def open_disk(layers, writable):
        from dissect.hypervisor.disk import qcow2

        with contextlib.ExitStack() as stack:
            # Each layer given the stream of the one below: it looks for a
            # backing file by name only next to the image, not at an absolute path.
            stream = None
            for path in reversed(layers):
                try:
                    stream = qcow2.QCow2(stack.enter_context(open(path, "rb")),
                                         backing_file=stream).open()
                except RuntimeError as e:  # "zstandard module not available"
                    raise Unavailable(f"dissect.hypervisor without backports.zstd: {e}")
            # its readinto() is read() and a copy: read() is its fast path
            yield stream, stream.size, None


class Pyqcow(Library):
    name = "pyqcow"
    label = "pyqcow (libqcow-python)"
    distribution = "libqcow-python"
    unsupported = {  # libqcow-python 20260703, both checked by hand
        "compressed-zstd": "libqcow refuses zstd images (incompatible feature 0x8)",
        "compressed-zlib": "libqcow-python 20260703 reads zeros for about half of the "
                           "zlib clusters (wrong data; qcowmount 20201213 reads them right)",
    }

    @staticmethod
    @contextlib.contextmanager
    def open_disk(layers, writable):
        import pyqcow

        files = []
        try:
            for path in layers:  # the chain through set_parent (it opens no backing file)
                files.append(pyqcow.file())
                files[-1].open(str(path))
            for upper, lower in zip(files, files[1:]):
                upper.set_parent(lower)
            yield files[0], files[0].get_media_size(), None
        finally:
            for f in files:
                with contextlib.suppress(Exception):
                    f.close()


CONTENDERS = [Qcowfs, Qsd, Qcowmount, Passthrough, PassthroughTwoWorkers, QcowfsNoReadAround, QcowfsOneWorker, QcowfsTwoWorkers,
              QcowfsFourWorkers, QcowfsApi, Dissect, Pyqcow]


# --------------------------------------------------------------------------
# Images


def build_images(size, rebuild):
    tag = f"{size // MIB}M"
    raw = WORK / f"random-{tag}.raw"
    qcow2 = WORK / f"random-{tag}.qcow2"
    ok = (raw.exists() and raw.stat().st_size == size and qcow2.exists()
          and qcow2.stat().st_mtime >= raw.stat().st_mtime)
    if ok and not rebuild:
        return raw, qcow2
    log(f"building {tag} random image in {WORK} ...")
    WORK.mkdir(parents=True, exist_ok=True)
    for p in (raw, qcow2):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    tmp = raw.with_suffix(".raw.tmp")
    with open("/dev/urandom", "rb", buffering=0) as src, open(tmp, "wb") as dst:
        left = size
        while left:
            chunk = src.read(min(left, 4 * MIB))
            dst.write(chunk)
            left -= len(chunk)
    tmp.rename(raw)
    tmpq = qcow2.with_suffix(".qcow2.tmp")
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, tmpq], timeout=600)
    tmpq.rename(qcow2)
    return raw, qcow2


def luks_key():
    key = WORK / "luks.key"
    if not key.exists() or key.read_text() != LUKS_SECRET:
        WORK.mkdir(parents=True, exist_ok=True)
        key.write_text(LUKS_SECRET)
    return key


def run_luks(cmd, timeout=120):
    """run() of a qemu-img command that makes a LUKS image. qemu-img times
    PBKDF2 with the thread's CPU time, sampled per tick: on a busy machine it
    can measure 0 ms and give up ("Unable to get accurate CPU usage"), a
    flake of qemu-img and not of any contender, so try again."""
    for _ in range(10):
        p = run(cmd, timeout=timeout, check=False)
        if p.returncode == 0:
            return p
        if "accurate CPU usage" not in p.stderr:
            break
    raise command_error(cmd, p)


def luks_options(key):
    """qemu-img arguments that make a LUKS qcow2 (PBKDF2 timed to 100 ms,
    so that mounting is not what the rows measure)."""
    return ["--object", f"secret,id=sec0,file={key}", "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=100"]


def build_luks_image(raw, qcow2):
    """The LUKS twin of the random image (same guest data)."""
    luks = qcow2.with_name(qcow2.stem + "-luks.qcow2")
    if luks.exists() and luks.stat().st_mtime >= qcow2.stat().st_mtime:
        return luks
    log(f"building the LUKS twin {luks.name} ...")
    tmp = luks.with_suffix(".qcow2.tmp")
    run_luks(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", *luks_options(luks_key()), raw, tmp],
             timeout=1200)
    tmp.rename(luks)
    return luks


def compressible_raw(size):
    """Raw data that compresses about 2.5x: each 4 KiB block is 1.5 KiB of
    random bytes and 2.5 KiB of zeros (random data would stay uncompressed:
    qemu-img stores a cluster as is when compressing does not pay). Made once."""
    raw = WORK / f"compressible-{size // MIB}M.raw"
    if raw.exists() and raw.stat().st_size == size:
        return raw
    log(f"building {raw.name} ...")
    WORK.mkdir(parents=True, exist_ok=True)
    tmp = raw.with_suffix(".raw.tmp")
    with open(tmp, "wb") as f:
        for _ in range(size // (4 * MIB)):
            f.write(b"".join(os.urandom(1536) + bytes(2560) for _ in range(1024)))
    tmp.rename(raw)
    return raw


def build_compressed_image(size, ctype):
    """(qcow2 with every cluster compressed by CTYPE, "zlib" | "zstd"; its raw twin)."""
    raw = compressible_raw(size)
    qcow2 = raw.with_name(f"{raw.stem}-{ctype}.qcow2")
    if not (qcow2.exists() and qcow2.stat().st_mtime >= raw.stat().st_mtime):
        log(f"building {qcow2.name} ...")
        tmp = qcow2.with_suffix(".qcow2.tmp")
        run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
             f"compression_type={ctype}", raw, tmp], timeout=1200)
        tmp.rename(qcow2)
    return qcow2, raw


CHAIN_CLUSTER = 64 << 10


def build_chain_image(size, raw, qcow2):
    """A 4-deep backing chain: the random image as base and 3 overlays
    (`qemu-img create -b`), each holding about a quarter of the 64 KiB
    clusters (written by qemu-io at pseudo-random spread offsets, so reads
    walk to every depth). Returns (top overlay, its flattened raw). Made once."""
    tag = f"{size // MIB}M"
    layers = [qcow2] + [WORK / f"chain-{tag}-{i}.qcow2" for i in (1, 2, 3)]
    flat = WORK / f"chain-{tag}.raw"
    if flat.exists() and flat.stat().st_mtime >= qcow2.stat().st_mtime:
        return layers[-1], flat
    log(f"building the backing chain {layers[-1].name} ...")
    rng = random.Random(13)
    depth = [rng.randrange(4) for _ in range(size // CHAIN_CLUSTER)]  # 0: the base
    for i in (1, 2, 3):
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", layers[i - 1], "-F", "qcow2",
             layers[i], str(size)])
        cmds = []
        for c, d in enumerate(depth):
            if d == i:
                cmds += ["-c", f"write -P 0x{0x40 + i:02x} {c * CHAIN_CLUSTER} {CHAIN_CLUSTER}"]
        run(["qemu-io", "-f", "qcow2", *cmds, layers[i]], timeout=1200)
    tmp = flat.with_suffix(".raw.tmp")
    run(["qemu-img", "convert", "-O", "raw", layers[-1], tmp], timeout=1200)
    tmp.rename(flat)
    return layers[-1], flat


FIRST_FILE = "largest.bin"  # the file first_file reads


def build_ext4_image():
    """A 128 MiB ext4 (`mkfs.ext4 -d`) holding 8 files of 1-4 MiB and a
    64 MiB one (random bytes), and its qcow2. Returns (qcow2, raw, tree). Made once."""
    tree = WORK / "first-file-tree"
    raw = WORK / "first-file-ext4.raw"
    qcow2 = WORK / "first-file-ext4.qcow2"
    if qcow2.exists():
        return qcow2, raw, tree
    log(f"building {qcow2.name} ...")
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    rng = random.Random(17)
    for i in range(8):
        (tree / f"file{i}.bin").write_bytes(os.urandom(rng.randint(1, 4) * MIB))
    (tree / FIRST_FILE).write_bytes(os.urandom(64 * MIB))
    with open(raw, "wb") as f:
        f.truncate(128 * MIB)
    run(["mkfs.ext4", "-q", "-F", "-d", tree, raw], timeout=300)
    tmp = qcow2.with_suffix(".qcow2.tmp")
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, tmp], timeout=300)
    tmp.rename(qcow2)
    return qcow2, raw, tree


def bench_images(bench, size, raw, qcow2):
    """(qcow2, raw twin) a read-only bench mounts (the passthrough serves
    the raw twin; check_data compares against it)."""
    if bench.image == "random":
        return qcow2, raw
    if bench.image.startswith("compressed-"):
        return build_compressed_image(size, bench.image.split("-", 1)[1])
    if bench.image == "chain":
        return build_chain_image(size, raw, qcow2)
    if bench.image == "ext4":
        return build_ext4_image()[:2]
    if bench.image == "sparse":
        img = sparse_image()
        return img, img
    raise ValueError(bench.image)


def scratch_images(bench, size, raw, qcow2):
    """Fresh per-run images for a write bench: (scratch qcow2, scratch raw)."""
    sq = WORK / "scratch.qcow2"
    sr = WORK / "scratch.raw"
    for p in (sq, sr):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    if bench.prepare == "empty":
        run_luks(["qemu-img", "create", "-q", "-f", "qcow2",
                  *(luks_options(luks_key()) if bench.encrypted else []), sq, str(size)])
        with open(sr, "wb") as f:
            f.truncate(size)
    elif bench.prepare == "copy":
        run(["cp", "--reflink=auto", qcow2, sq], timeout=600)
        run(["cp", "--reflink=auto", raw, sr], timeout=600)
    else:
        raise ValueError(bench.prepare)
    return sq, sr


# --------------------------------------------------------------------------
# Running


def fio(bench, path, size, runtime, prefix=(), ramp=0):
    """Run BENCH's fio job on PATH; RAMP seconds first that do not count."""
    name = bench.key
    cmd = [*prefix, "fio", f"--name={name}", f"--filename={path}", "--ioengine=psync",
           f"--size={size}", "--fallocate=none", "--output-format=json", *bench.fio]
    if bench.direct or bench.loop:
        cmd.append("--direct=1")
    if bench.time_based:
        cmd += [f"--runtime={runtime}", "--time_based"]
    if ramp:
        cmd.append(f"--ramp_time={ramp}")
    timeout = 600 if not bench.time_based else ramp + runtime + 300
    # --thread: jobs are threads of one process, so stopping fio stops them
    # all (fio's forked jobs call setsid() and would outlive a killed parent).
    cmd.append("--thread")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException as e:
        proc.terminate()  # fio stops its jobs and exits on SIGTERM
        try:
            proc.communicate(timeout=10)
        except BaseException:
            proc.kill()
            proc.wait()
        if isinstance(e, subprocess.TimeoutExpired):
            raise ContenderError(f"fio timed out after {timeout}s")
        raise
    p = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    try:
        data = json.loads(out[out.index("{"):])
    except ValueError:
        data = None
    if p.returncode != 0 or data is None:
        err = (p.stderr.strip() or out.strip()).splitlines()
        raise ContenderError(f"fio exited {p.returncode}: {err[-1] if err else '(no output)'}")
    job = data["jobs"][0]
    if job.get("error"):
        raise ContenderError(f"fio job error {job['error']}")
    ddir = "write" if bench.kind == "write" else "read"
    d = job[ddir]
    return {
        "value": d["bw_bytes"] / MIB if bench.unit == "MiB/s" else d["iops"],
        "bw_mib_s": d["bw_bytes"] / MIB,
        "iops": d["iops"],
        "io_mib": d["io_bytes"] / MIB,
        "runtime_ms": d["runtime"],
        "clat_mean_us": d.get("clat_ns", {}).get("mean", 0) / 1000,
    }


def ensure_tree(image_size):
    """A tree of files of mixed sizes (random bytes) to copy onto ext4: made
    once, a quarter of the image (at most 256 MiB). Returns (path, bytes)."""
    target = min(256 * MIB, image_size // 4)
    tree = WORK / f"tree-{target // MIB}M"
    done = tree / ".complete"
    if not done.exists():
        shutil.rmtree(tree, ignore_errors=True)
        rng = random.Random(7)
        total = i = 0
        while total < target:
            r = rng.random()
            n = rng.randint(1, 64 << 10) if r < 0.7 else (
                rng.randint(64 << 10, MIB) if r < 0.95 else rng.randint(MIB, 8 * MIB))
            n = min(n, target - total)
            d = tree / f"d{i // 100:03d}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"f{i:05d}").write_bytes(os.urandom(n))
            total, i = total + n, i + 1
        done.write_text(f"{total}\n")
    return tree, int(done.read_text())


def ext4_job(bench, disk, image_file, image_size):
    """ext4 on a loop device over DISK: time the copy of a tree in (through
    umount, which writes everything back) or reading it all back (caches
    dropped, image file warm like the fio runs)."""
    tree, nbytes = ensure_tree(image_size)
    fs = EXT4_MNT
    fs.mkdir(parents=True, exist_ok=True)
    with loop_device(disk) as dev:
        try:
            return _ext4_job(bench, dev, fs, tree, nbytes, image_file)
        finally:
            if mounted(fs):
                subprocess.run(["umount", "-l", str(fs)], capture_output=True)


def _ext4_job(bench, dev, fs, tree, nbytes, image_file):
    """ext4_job on the loop device DEV, mounting at FS."""
    run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev], timeout=300)

    def copy_in():
        run(["mount", dev, fs])
        run(["cp", "-a", tree, fs / "tree"], timeout=900)
        run(["umount", fs], timeout=300)

    if bench.job == "ext4_write":
        drop_caches()
        warm(image_file)
        run(["sh", "-c", f"tar cf - -C '{tree}' . | cat > /dev/null"], timeout=300)  # source warm
        t0 = time.monotonic()
        copy_in()
    elif bench.job == "ext4_trim":
        copy_in()
        run(["mount", dev, fs])
        run(["rm", "-rf", fs / "tree"], timeout=300)
        run(["sync", "-f", fs], timeout=300)
        t0 = time.monotonic()
        run(["fstrim", fs], timeout=900)
        seconds = time.monotonic() - t0
        run(["umount", fs], timeout=300)
        return {"value": nbytes / MIB / seconds, "seconds": seconds, "tree_mib": nbytes / MIB}
    else:
        copy_in()
        drop_caches()
        warm(image_file)
        t0 = time.monotonic()
        run(["mount", "-o", "ro", dev, fs])
        # through cat: GNU tar skips reading file data when writing to /dev/null
        run(["sh", "-c", f"tar cf - -C '{fs}' . | cat > /dev/null"], timeout=900)
        run(["umount", fs], timeout=300)
    seconds = time.monotonic() - t0
    return {"value": nbytes / MIB / seconds, "seconds": seconds, "tree_mib": nbytes / MIB}


def first_file_job(disk, mount_s):
    """The rest of time to first file, after the contender's mount (mount_s,
    timed by its mount()): losetup --read-only over the disk file, mount -o
    ro the ext4 on it, read its largest file whole. Teardown is not timed;
    the file is compared with its source afterwards."""
    fs = EXT4_MNT
    fs.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with loop_device(disk, "--read-only") as dev:
        run(["mount", "-o", "ro", dev, fs])
        try:
            warm(fs / FIRST_FILE)
            seconds = mount_s + time.monotonic() - t0
            run(["cmp", fs / FIRST_FILE, build_ext4_image()[2] / FIRST_FILE], timeout=300)
        finally:
            if subprocess.run(["umount", fs], capture_output=True, timeout=60).returncode:
                subprocess.run(["umount", "-l", str(fs)], capture_output=True)
    return {"value": seconds, "seconds": seconds, "mount_s": mount_s}


SPARSE_SIZE, SPARSE_DATA = 100 * GIB, 1 * GIB


def sparse_image():
    """A 100 GiB qcow2 holding 1 GiB of data in 16 pieces spread over the
    disk, made once (cp_sparse)."""
    img = WORK / "sparse-100g.qcow2"
    done = WORK / "sparse-100g.done"
    if not done.exists():
        WORK.mkdir(parents=True, exist_ok=True)
        run(["qemu-img", "create", "-q", "-f", "qcow2", img, str(SPARSE_SIZE)])
        piece = SPARSE_DATA // 16
        cmds = []
        for i in range(16):
            cmds += ["-c", f"write -P 0x{i + 0x21:02x} {i * (SPARSE_SIZE // 16)} {piece}"]
        run(["qemu-io", "-f", "qcow2", *cmds, img], timeout=600)
        done.touch()
    return img


def cp_sparse_job(disk, image_file):
    """cp --sparse=always of the whole disk (it seeks over the holes)."""
    out = WORK / "sparse-copy.raw"
    with contextlib.suppress(FileNotFoundError):
        out.unlink()
    drop_caches()
    warm(image_file)
    try:
        t0 = time.monotonic()
        run(["cp", "--sparse=always", disk, out], timeout=1800)
        seconds = time.monotonic() - t0
        st = os.stat(out)
        if st.st_size != SPARSE_SIZE or st.st_blocks * 512 < SPARSE_DATA:
            raise ContenderError(f"cp --sparse copied {st.st_size} bytes, {st.st_blocks * 512} allocated")
    finally:
        with contextlib.suppress(FileNotFoundError):
            out.unlink()
    return {"value": SPARSE_SIZE / GIB / seconds, "seconds": seconds}


def check_data(path, raw, size):
    """One cheap correctness guard: size and two 1 MiB chunks match the raw twin."""
    st = os.stat(path)
    if st.st_size != size:
        raise ContenderError(f"size {st.st_size} != {size}")
    with open(path, "rb", buffering=0) as a, open(raw, "rb", buffering=0) as b:
        check_chunks(lambda off: os.pread(a.fileno(), MIB, off),
                     lambda off: os.pread(b.fileno(), MIB, off), size)


def check_chunks(read_at, want_at, size):
    """Two 1 MiB chunks: read_at(offset) must equal want_at(offset) (bytes)."""
    for off in (0, (size // 2 + 12345) & ~4095):
        if read_at(off) != want_at(off):
            raise ContenderError(f"data mismatch at offset {off}")


@dataclass
class Cell:
    runs: list = field(default_factory=list)
    error: str = ""
    na: bool = False

    @property
    def median(self):
        vals = [r["value"] for r in self.runs]
        return statistics.median(vals) if vals else None

    @property
    def peak_rss(self):
        vals = [r["peak_rss_mib"] for r in self.runs if r.get("peak_rss_mib")]
        return max(vals) if vals else None

    @property
    def cpu(self):
        """Median daemon CPU seconds per GiB moved (fio rows)."""
        vals = [r["cpu_s_per_gib"] for r in self.runs if r.get("cpu_s_per_gib") is not None]
        return statistics.median(vals) if vals else None


def peak_rss_mib(pids):
    """Peak resident memory of the serving processes, in MiB: the largest one's
    peak (VmHWM), plus what each of the others holds privately (smaps_rollup's
    Private_Clean + Private_Dirty). Processes forked from one daemon (a
    read-only qcowfs mount's workers) share its pages copy-on-write: summing
    their RSS would count those pages once per process."""
    peaks, private = [], []
    for pid in pids:
        with contextlib.suppress(OSError, StopIteration):
            with open(f"/proc/{pid}/status") as f:
                peaks.append(int(next(line for line in f if line.startswith("VmHWM:")).split()[1]))
            with open(f"/proc/{pid}/smaps_rollup") as f:
                private.append(sum(int(line.split()[1]) for line in f if line.startswith("Private_")))
    if not peaks:
        return None
    first = peaks.index(max(peaks))
    others = sum(p for i, p in enumerate(private) if i != first) if len(private) == len(peaks) else \
        sum(peaks) - peaks[first]
    return (peaks[first] + others) / 1024


def cpu_seconds(pids):
    """utime + stime (fields 14, 15 of /proc/PID/stat) of the serving processes, summed."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # fields 14, 15 (1-based, after comm)
    return ticks / os.sysconf("SC_CLK_TCK")


def bytes_read(pids):
    """rchar (bytes read by read-like calls, /proc/PID/io) of the serving processes, summed."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{pid}/io").read_text().splitlines():
                if line.startswith("rchar:"):
                    total += int(line.split()[1])
    return total


def probe_direct(path):
    """Unavailable unless PATH opens with O_DIRECT and reads 4 KiB so."""
    buf = mmap.mmap(-1, 4096)  # page aligned
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            os.preadv(fd, [buf], 0)
        finally:
            os.close(fd)
    except OSError as e:
        raise Unavailable(f"O_DIRECT refused: {e.strerror}")


def one_run(bench, cont, cfg, raw, qcow2):
    key = None
    if bench.encrypted:  # the LUKS twin stands for the random image (also for "copy")
        qcow2, key = build_luks_image(raw, qcow2), luks_key()
    if bench.kind == "write":
        img_q, img_r = scratch_images(bench, cfg.size, raw, qcow2)
    else:
        img_q, img_r = bench_images(bench, cfg.size, raw, qcow2)
    warm_target = img_r if isinstance(cont, Passthrough) else img_q
    try:
        if bench.job == "api":
            return api_run(bench, cont, cfg, img_q, img_r)
        with contextlib.ExitStack() as stack:
            if bench.cgroup:
                limit = cgroup_limit_of(bench, cfg.size)
                cg = stack.enter_context(memory_cgroup(limit if bench.cgroup in ("before", "stream") else None))
                cont.wrap = in_cgroup(cg)
                stack.callback(setattr, cont, "wrap", [])
            if bench.job == "first_file":
                drop_caches()  # cold, from the mount command on
            path = stack.enter_context(
                cont.mount(img_q, img_r, writable=(bench.kind == "write"), key=key))
            if bench.kind == "read" and cfg.verify:
                check_data(path, img_r, cfg.size)
            if bench.direct:
                probe_direct(path)
            fuse_tune(path, cfg.read_ahead_kb, cfg.max_background)
            if bench.job == "fio":
                target = path
                if bench.loop:
                    target = stack.enter_context(loop_device(path, "--direct-io=on", "--read-only"))
                    dio = Path(f"/sys/block/{Path(target).name}/loop/dio").read_text().strip()
                    if dio != "1":
                        raise Unavailable("the loop device fell back to buffered I/O (dio=0)")
                if bench.cgroup == "after":
                    set_cgroup_limit(cg, limit)
                drop_caches()
                warm(warm_target)
                ramp, size, at_limit = 0, cfg.size, {}
                if bench.cgroup == "during":  # fio (and the bytes read) count from the limit on

                    def limit_now():
                        set_cgroup_limit(cg, limit)
                        at_limit["read"], at_limit["cpu"] = bytes_read(cont.pids), cpu_seconds(cont.pids)

                    ramp = cfg.runtime
                    timer = threading.Timer(ramp, limit_now)
                    timer.start()
                    stack.callback(timer.cancel)
                if bench.cgroup == "stream":
                    size = min(size, STREAM_SPAN)
                    stack.enter_context(streamer(cg))
                cpu0, read0 = cpu_seconds(cont.pids), bytes_read(cont.pids)
                r = fio(bench, target, size, cfg.runtime, cont.wrap + pin_prefix(cfg.fio_cpus), ramp)
                r["daemon_cpu_s"] = cpu_seconds(cont.pids) - at_limit.get("cpu", cpu0)
                # Bytes the daemon read per byte fio read: read-around's cost.
                read0 = at_limit.get("read", read0)
                r["daemon_read_ratio"] = ((bytes_read(cont.pids) - read0) / (r["io_mib"] * MIB)
                                          if r["io_mib"] else None)
                r["cpu_s_per_gib"] = (r["daemon_cpu_s"] / (r["io_mib"] / 1024)
                                      if r["io_mib"] else None)
            elif bench.job == "cp_sparse":
                r = cp_sparse_job(path, warm_target)
            elif bench.job == "first_file":
                r = first_file_job(path, cont.mount_s)
            else:
                r = ext4_job(bench, path, warm_target, cfg.size)
            r["peak_rss_mib"] = peak_rss_mib(cont.pids)
            if bench.cgroup:
                r["cgroup_limit_mib"] = limit / MIB
                r["cgroup_peak_mib"] = cgroup_peak_mib(cg)
            return r
    finally:
        if bench.kind == "write":
            for p in (img_q, img_r):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()


def backing_chain(qcow2):
    """The image files of QCOW2's disk, top down (qemu-img info --backing-chain)."""
    out = run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", qcow2]).stdout
    return [Path(layer["filename"]) for layer in json.loads(out)]


def evict(paths):
    """Drop the files from the host page cache (posix_fadvise DONTNEED, after a sync)."""
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@contextlib.contextmanager
def open_disk_file(layers, writable):
    """Library.open_disk() of a mount's disk file (layers[0]): unbuffered file
    I/O; fsync makes the writes durable."""
    with open(layers[0], "r+b" if writable else "rb", buffering=0) as f:
        yield f, os.fstat(f.fileno()).st_size, lambda: os.fsync(f.fileno())


API_CHILD = "--api-child"  # bench/run.py --api-child JSON: one run of an api row


def api_run(bench, cont, cfg, img_q, img_r):
    """One run of an api row: every file of the image read once (warm) or
    evicted from the host page cache (cold; write rows: a fresh image, as
    is), then api_child in a fresh interpreter on the image (a library) or
    on the disk file of a read-write mount (the mount peer of the write row)."""
    write = bench.kind == "write"
    layers = backing_chain(img_q)
    if bench.cold:
        evict(layers)
    elif not write:
        for layer in layers:
            warm(layer)
    spec = {"who": cont.name, "layers": [str(p) for p in layers], "raw": str(img_r), "write": write}
    if cont.library:
        return api_process(spec, cont.prefix())
    with cont.mount(img_q, img_r, writable=write) as path:
        cpu0 = cpu_seconds(cont.pids)
        r = api_process(dict(spec, who="file", layers=[str(path)]), pin_prefix(cfg.fio_cpus))
        r["daemon_cpu_s"] = cpu_seconds(cont.pids) - cpu0
        r["cpu_s_per_gib"] = (r["cpu_s"] + r["daemon_cpu_s"]) / (r["mib"] / 1024)
        r["peak_rss_mib"] = peak_rss_mib(cont.pids)  # the daemon's, as in the fio rows
        return r


def api_process(spec, prefix):
    """api_child(SPEC) in a process of its own: its result, or Unavailable / ContenderError."""
    cmd = [*prefix, sys.executable, Path(__file__).resolve(), API_CHILD, json.dumps(spec)]
    p = run(cmd, timeout=1800, check=False)
    try:
        r = json.loads(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise command_error(cmd, p)
    if "na" in r:
        raise Unavailable(r["na"])
    if "error" in r:
        raise ContenderError(r["error"])
    return r


def api_child(spec):
    """One run of an api row, in a fresh interpreter: open the disk (with
    library spec["who"], or "file": a mount's disk file), read it whole in
    1 MiB requests (into one buffer where the library can) or write it whole
    with a random 1 MiB block and make that durable (timed: from the open
    disk to the last byte, durable), check two chunks (against spec["raw"],
    or the block written), print the result as JSON (n/a when the library
    is missing or cannot read the image)."""
    lib = {c.name: c for c in CONTENDERS}.get(spec["who"])
    write = spec["write"]
    block = memoryview(os.urandom(MIB))
    buf = memoryview(bytearray(MIB))
    into = lib.readinto if lib else True
    try:
        t0 = time.perf_counter()
        with (lib.open_disk if lib else open_disk_file)(spec["layers"], write) as (f, size, sync):
            t1 = time.perf_counter()
            cpu0 = resource.getrusage(resource.RUSAGE_SELF)
            pos = 0
            while pos < size:
                n = min(MIB, size - pos)
                got = (f.write(block[:n]) if write else f.readinto(buf[:n]) if into
                       else len(f.read(n)))
                if got != n:
                    raise ContenderError(f"{'wrote' if write else 'read'} {got} of {n} bytes at {pos}")
                pos += n
            if write:
                sync()
            seconds = time.perf_counter() - t1
            cpu1 = resource.getrusage(resource.RUSAGE_SELF)

            def read_at(off):
                f.seek(off)
                return f.read(MIB)
            with open(spec["raw"], "rb", buffering=0) as raw:
                check_chunks(read_at, (lambda off: bytes(block[off % MIB:]) + bytes(block[:off % MIB]))
                             if write else (lambda off: os.pread(raw.fileno(), MIB, off)), size)
    except ImportError as e:
        if not (lib and lib.distribution):  # qcowfs itself: a failure
            raise
        print(json.dumps({"na": f"{lib.distribution} not installed ({e}; "
                                "scripts/install.sh --test installs it)"}))
        return 0
    except Unavailable as e:
        print(json.dumps({"na": str(e)}))
        return 0
    except ContenderError as e:
        print(json.dumps({"error": str(e)}))
        return 0
    cpu_s = sum(getattr(cpu1, k) - getattr(cpu0, k) for k in ("ru_utime", "ru_stime"))
    print(json.dumps({"value": size / MIB / seconds, "seconds": seconds, "open_s": t1 - t0,
                      "mib": size / MIB, "cpu_s": cpu_s, "cpu_s_per_gib": cpu_s / (size / GIB),
                      "peak_rss_mib": peak_rss_mib([os.getpid()])}))
    return 0


def measure(cfg, benches, contenders, raw, qcow2):
    results = {b.key: {c.name: (Cell(na=True, error=c.unsupported[b.image])
                                if b.image in c.unsupported else Cell())
                       for c in contenders
                       if (b.kind != "write" or c.can_write) and (c.can_luks or not b.encrypted)
                       and (not b.only or c.name in b.only)
                       and (not c.benches or b.key in c.benches)
                       and (b.job == "api" or not c.library)}
               for b in benches}
    for b in benches:
        for n, cell in results[b.key].items():
            if cell.na:
                log(f"  {b.title:<22} {n:<12} n/a ({cell.error})")
        taking = [c for c in contenders if c.name in results[b.key]]
        rounds = [taking] * cfg.runs
        # A row with an aim within noise (NOISE_PEERS) gets NOISE_RUNS runs of
        # its two contenders, alternating: three are too few to tell noise.
        pair = [c for c in taking if c.name == b.subject or (c.name in NOISE_PEERS and aim_for(b, c.name))]
        if len(pair) == 2 and not cfg.quick:
            rounds += [pair] * max(0, NOISE_RUNS - cfg.runs)
        for i, group in enumerate(rounds):
            # Each round starts with the next contender: a place in the order
            # (what ran just before, the caches it left) is no one's for good.
            shift = i % max(1, len(group))
            for c in group[shift:] + group[:shift]:
                cell = results[b.key].get(c.name)
                if cell is None or cell.error or cell.na:
                    continue
                t0 = time.monotonic()
                try:
                    r = one_run(b, c, cfg, raw, qcow2)
                except Unavailable as e:
                    cell.na, cell.error = True, str(e)
                    log(f"  {b.title:<22} {c.name:<12} run {i + 1}: n/a ({e})")
                    continue
                except (ContenderError, OSError, subprocess.SubprocessError) as e:
                    cell.error = str(e) or type(e).__name__
                    log(f"  {b.title:<22} {c.name:<12} run {i + 1}: FAILED: {cell.error}")
                    continue
                cell.runs.append(r)
                log(f"  {b.title:<22} {c.name:<12} run {i + 1}: "
                    f"{fmt(r['value'], b.unit):>9} {b.unit:<5} ({time.monotonic() - t0:.1f}s)")
    return results


# --------------------------------------------------------------------------
# Report


def fmt(v, unit):
    if v is None:
        return "-"
    if unit == "s":
        return f"{v:.3f}"
    return f"{v:.0f}" if unit == "IOPS" or v >= 100 else f"{v:.1f}"


def _rounds(r):
    """'below in K of N rounds', for a verdict of the sign test (compare)."""
    return f"below in {r['misses']} of {r['rounds']} rounds"


def ratios(bench, row):
    """subject (qcowfs) / peer of the bench's value, with its aims."""
    q = row.get(bench.subject)
    qv = q.median if q else None
    return {peer: compare(qv, row[peer].median, aim_for(bench, peer), bench.lower_is_better,
                          _pairs(q, row[peer]) if peer in NOISE_PEERS and q else None)
            for peer in PEERS if peer in row and peer != bench.subject}


def _pairs(a, b):
    """The values of cells A and B round by round (runs are kept in the
    order of the rounds; none if a run failed, which would misalign them)."""
    if len(a.runs) != len(b.runs):
        return None
    return [(x["value"], y["value"]) for x, y in zip(a.runs, b.runs)]


def cpu_ratios(bench, row):
    """qcowfs / peer of the daemon CPU seconds per GiB, with CPU_AIMS (fio rows)."""
    if bench.job != "fio":
        return {}
    q = row.get(bench.subject)
    qv = q.cpu if q else None
    return {peer: compare(qv, row[peer].cpu, CPU_AIMS.get(peer), True)
            for peer in PEERS if peer in row and peer != bench.subject}


def aim_verdicts(benches, results):
    """Every aim of the run: (what, met: True / False / None when not measured)."""
    out = []
    for b in benches:
        row = results[b.key]
        if b.subject not in row:
            continue
        for metric, rs, lower in (("", ratios(b, row), b.lower_is_better),
                                  (" cpu/GiB", cpu_ratios(b, row), True)):
            for peer, r in rs.items():
                if r["aim"] is not None:
                    ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}x"
                    rounds = f", {_rounds(r)}" if r.get("misses") is not None else ""
                    out.append((f"{b.key}{metric} vs {peer} {ratio} "
                                f"(aim {'<=' if lower else '>='}{r['aim']:.1f}{rounds})", r["met"]))
    return out


def aims_summary(verdicts):
    met = [w for w, m in verdicts if m]
    missed = [w for w, m in verdicts if m is False]
    unmeasured = [w for w, m in verdicts if m is None]
    line = f"aims: {len(met)} of {len(met) + len(missed)} met"
    if unmeasured:
        line += f" ({len(unmeasured)} not measured)"
    return line + ("; NOT met: " + ", ".join(missed) if missed else "")


def report(cfg, benches, contenders, results):
    """The tables of BENCHES (one group: the same subject), with the
    contenders that take part in them."""
    subject = benches[0].subject
    names = sorted((c.name for c in contenders if any(c.name in results[b.key] for b in benches)),
                   key=lambda n: n != subject)  # the subject first
    w = 11
    head = f"{'benchmark':<22} {'unit':<5} " + " ".join(f"{n:>{w}}" for n in names)
    lines = [head, "-" * len(head)]
    for b in benches:
        row = results[b.key]
        cells = []
        for n in names:
            cell = row.get(n)
            if cell is None:
                s = ""
            elif cell.na:
                s = "n/a"
            elif cell.error and not cell.runs:
                s = "FAILED"
            else:
                vals = [r["value"] for r in cell.runs]
                spread = len(vals) > 1 and min(vals) > 0 and max(vals) / min(vals) > 1.3
                s = fmt(cell.median, b.unit) + ("~" if spread else "") + (
                    "!" if cell.error else "")
            cells.append(f"{s:>{w}}")
        lines.append((f"{b.title:<22} {b.unit:<5} " + " ".join(cells)).rstrip())
    why = {}  # reason -> the rows it makes n/a, per contender
    for b in benches:
        for n, cell in results[b.key].items():
            if cell.na:
                why.setdefault((n, cell.error), []).append(b.key)
    lines += [f"n/a: {n} on {', '.join(keys)}: {reason}" for (n, reason), keys in why.items()]
    peers = [p for p in PEERS if p in names and p != subject] if subject in names else []
    if not peers:
        return "\n".join(lines)
    cw = 26
    head = f"{subject + ' / peer':<28} " + " ".join(f"{p:<{cw}}" for p in peers).rstrip()
    lines += ["", head, "-" * len(head.rstrip())]
    for b in benches:
        rs = ratios(b, results[b.key])
        parts = []
        for p in peers:
            r = rs.get(p)
            if r is None:
                s = ""
            else:
                s = "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}x"
                if r["aim"] is not None:
                    s = f"{s:<6} {aim_text(r, b.lower_is_better)}"
            parts.append(f"{s:<{cw}}")
        lines.append((f"{b.title:<28} " + " ".join(parts)).rstrip())
    cpu = cpu_report(benches, names, results)
    return "\n".join(lines + [""] + memory_report(benches, names, subject, peers, results)
                     + ([""] + cpu if len(cpu) > 2 else [])
                     + ["", aims_summary(aim_verdicts(benches, results))])


def memory_report(benches, names, subject, peers, results):
    """Peak RSS of each daemon (max over runs) and subject / peer (lower is better)."""
    w = 11
    head = f"{'peak RSS (MiB)':<28} " + " ".join(f"{n:>{w}}" for n in names)
    head += f"   {subject} / " + ", ".join(peers) + " (lower is better)"
    lines = [head, "-" * len(head)]
    for b in benches:
        row = results[b.key]
        rss = {n: row[n].peak_rss if n in row else None for n in names}
        cells = " ".join(f"{'' if rss[n] is None else f'{rss[n]:.0f}':>{w}}" for n in names)
        q = rss.get(subject)
        rs = ", ".join("-" if not (q and rss.get(p)) else f"{q / rss[p]:.2f}x" for p in peers)
        lines.append(f"{b.title:<28} {cells}   {rs}")
    return lines + [f"floor: peak RSS of the interpreter alone {import_floor_mib(''):.0f} MiB, with "
                    f"trio and pyfuse3 imported {import_floor_mib('trio, pyfuse3'):.0f} MiB (what a read-only "
                    "daemon on those libraries holds before its first request), with numpy too "
                    f"{import_floor_mib('numpy, trio, pyfuse3'):.0f} MiB (a writable one)"]


def import_floor_mib(modules):
    """Peak RSS in MiB of a fresh interpreter of the venv that imported MODULES."""
    # (VmHWM, not ru_maxrss: that one keeps the parent's peak across fork and exec)
    code = (f"import {modules}\n" if modules else "") + \
        "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout) / 1024


def cpu_report(benches, names, results):
    """Daemon CPU seconds per GiB fio moved (median over runs), qcowfs / qsd
    against CPU_AIMS (lower is better)."""
    w = 11
    head = f"{'daemon CPU s / GiB':<28} " + " ".join(f"{n:>{w}}" for n in names)
    head += "   qcowfs / qsd (lower is better)"
    lines = [head, "-" * len(head)]
    for b in benches:
        row = results[b.key]
        cpu = {n: row[n].cpu if n in row else None for n in names}
        if b.job != "fio" or all(v is None for v in cpu.values()):
            continue
        cells = " ".join(f"{'' if cpu[n] is None else f'{cpu[n]:.2f}':>{w}}" for n in names)
        r = cpu_ratios(b, row).get("qsd")
        rs = ""
        if r is not None:
            rs = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
            rs = f"{rs:<6} {aim_text(r, True)}"
        lines.append(f"{b.title:<28} {cells}   {rs}".rstrip())
    return lines


def to_json(cfg, benches, contenders, results, versions, elapsed):
    out = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": {"kernel": platform.release(), "cpus": os.cpu_count(),
                 "python": platform.python_version()},
        "config": {"image_size": cfg.size, "runs": cfg.runs, "runtime_s": cfg.runtime,
                   "quick": cfg.quick, "read_ahead_kb": cfg.read_ahead_kb,
                   "max_background": cfg.max_background, "pin": cfg.pin,
                   "daemon_cpus": cfg.daemon_cpus, "fio_cpus": cfg.fio_cpus},
        "contenders": {c.name: {"label": c.label, "version": versions.get(c.name, "")}
                       for c in contenders},
        "benchmarks": {},
        "elapsed_s": round(elapsed, 1),
    }
    for b in benches:
        row = results[b.key]
        out["benchmarks"][b.key] = {
            "title": b.title, "kind": b.kind, "unit": b.unit,
            "fio": b.fio + ([f"--runtime={cfg.runtime}", "--time_based"] if b.time_based else []),
            "lower_is_better": b.lower_is_better,
            "results": {n: {"median": c.median, "peak_rss_mib": c.peak_rss,
                            "cpu_s_per_gib": c.cpu, "runs": c.runs,
                            "status": "n/a" if c.na else ("failed" if c.error else "ok"),
                            "error": c.error or None}
                        for n, c in row.items()},
            "ratios": ratios(b, row) if b.subject in row else {},
            "cpu_ratios": cpu_ratios(b, row) if b.subject in row else {},
        }
    verdicts = aim_verdicts(benches, results)
    out["aims"] = {"met": [w for w, m in verdicts if m],
                   "not_met": [w for w, m in verdicts if m is False],
                   "not_measured": [w for w, m in verdicts if m is None],
                   "summary": aims_summary(verdicts)}
    return out


# --------------------------------------------------------------------------


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 256 MiB image, 1 run each, 2 s random runs")
    ap.add_argument("--writes", action=argparse.BooleanOptionalAction, default=True,
                    help="also run the write benchmarks (default: on)")
    ap.add_argument("--runs", type=int, help="runs per benchmark (default 3, quick 1)")
    ap.add_argument("--runtime", type=int, help="seconds per random run (default 5, quick 2)")
    ap.add_argument("--size-mib", type=int, help="image size (default 1024, quick 256)")
    ap.add_argument("--only", help="comma-separated contenders: "
                    + ",".join(c.name for c in CONTENDERS))
    ap.add_argument("--bench", help="comma-separated benchmarks (api: all the library rows; makers: "
                    "create, convert, commit and rebase against qemu-img, with their own images): "
                    + ",".join(b.key for b in BENCHES))
    ap.add_argument("--api", action=argparse.BooleanOptionalAction, default=True,
                    help="also run the library rows, qcowfs.open() against dissect and pyqcow "
                    "(default: on)")
    ap.add_argument("--read-ahead-kb", type=int,
                    help="set the FUSE bdi read_ahead_kb of every mount (tuning experiments)")
    ap.add_argument("--max-background", type=int,
                    help="set the FUSE connection's max_background of every mount")
    ap.add_argument("--pin", choices=["none", "split", "same"], default="none",
                    help="CPU placement: none = the scheduler's choice (default); "
                    "split = daemons on the first CPU, fio on the others; "
                    "same = daemons and fio on the first CPU")
    ap.add_argument("--no-verify", dest="verify", action="store_false",
                    help="skip the data check of each read mount")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the random image")
    ap.add_argument("--ops", action=argparse.BooleanOptionalAction, default=True,
                    help="also time snapshot create/delete and dirty maps (bench/ops.py)")
    ap.add_argument("--json", type=Path, default=WORK / "results.json")
    ap.add_argument("--report", type=Path, metavar="JSON",
                    help="measure nothing: print the tables of an earlier run's results JSON again, "
                         "with this version's aims and verdicts")
    cfg = ap.parse_args(argv)
    cfg.runs = cfg.runs or (1 if cfg.quick else 3)
    cfg.runtime = cfg.runtime or (2 if cfg.quick else 5)
    ncpu = len(os.sched_getaffinity(0))
    cpus = sorted(os.sched_getaffinity(0))
    if cfg.pin == "split" and ncpu >= 2:
        cfg.daemon_cpus = str(cpus[0])
        cfg.fio_cpus = ",".join(str(c) for c in cpus[1:])
    elif cfg.pin == "same" or (cfg.pin == "split" and ncpu < 2):
        cfg.daemon_cpus = cfg.fio_cpus = str(cpus[0])
    else:
        cfg.daemon_cpus = cfg.fio_cpus = None
    cfg.size = (cfg.size_mib or (256 if cfg.quick else 1024)) * MIB
    return cfg


def report_again(cfg):
    """--report: the tables of the results JSON CFG.report, judged by this
    version's aims (the runs are kept in their rounds' order, so the
    within-noise rule can pair them)."""
    data = json.loads(cfg.report.read_text())
    conf = data["config"]
    cfg.size, cfg.runs, cfg.quick = conf["image_size"], conf["runs"], conf["quick"]
    cfg.daemon_cpus, cfg.fio_cpus = conf.get("daemon_cpus"), conf.get("fio_cpus")
    benches = [b for b in BENCHES if b.key in data["benchmarks"]]
    results = {b.key: {name: Cell(runs=r["runs"], error=r.get("error") or "", na=r["status"] == "n/a")
                       for name, r in data["benchmarks"][b.key]["results"].items()}
               for b in benches}
    contenders = [c(cfg) for c in CONTENDERS if c.name in data["contenders"]]
    print(f"(the run of {data['date']}, from {cfg.report})")
    print_tables(cfg, benches, contenders, results)
    return 0


def print_tables(cfg, benches, contenders, results):
    """The mount tables and the library tables of a run."""
    mount_rows = [b for b in benches if b.job != "api"]
    api_rows = [b for b in benches if b.job == "api"]
    if mount_rows:
        print(f"qcowfs benchmark: {cfg.size // MIB} MiB image of random data, fio psync, "
              f"median of {cfg.runs}"
              f"{f' ({NOISE_RUNS} against {sorted(NOISE_PEERS)[0]})' if NOISE_RUNS > cfg.runs and not cfg.quick else ''}"
              f", warm host cache, cold FUSE page cache, "
              f"daemons on CPU {cfg.daemon_cpus or 'any'}, fio on CPU {cfg.fio_cpus or 'any'}")
        print(report(cfg, mount_rows, contenders, results))
    if api_rows:
        print(("\n" if mount_rows else "")
              + f"qcowfs library API: the whole {cfg.size // MIB} MiB disk in 1 MiB requests, "
              f"one fresh process per run, median of {cfg.runs}; qcowfs-api = qcowfs.open(IMG).disk, "
              "dissect = dissect.hypervisor QCow2 stream, pyqcow = libqcow-python, "
              "qcowfs = the writes through a read-write mount's disk.raw (+fsync); "
              "host cache warm, or cold (posix_fadvise DONTNEED)")
        print(report(cfg, api_rows, contenders, results))


def main(argv=None):
    cfg = parse_args(argv)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    if cfg.report:
        return report_again(cfg)
    contenders = [c(cfg) for c in CONTENDERS]
    if cfg.only:
        want = cfg.only.split(",")
        bad = set(want) - {c.name for c in contenders}
        if bad:
            sys.exit(f"unknown contender(s): {','.join(sorted(bad))}")
        contenders = [c for c in contenders if c.name in want]
    benches = [b for b in BENCHES
               if (cfg.writes or b.kind != "write") and (cfg.api or b.job != "api")]
    if cfg.bench:
        want = cfg.bench.split(",")
        bad = set(want) - {b.key for b in BENCHES} - {API_GROUP, MAKERS_GROUP}
        if bad:
            sys.exit(f"unknown benchmark(s): {','.join(sorted(bad))}")
        benches = [b for b in benches if b.key in want or (API_GROUP in want and b.job == "api")]
    missing = [t for t in ("fio", "taskset", "qemu-img", "qemu-io", "qemu-storage-daemon", "qcowmount",
                         "fusermount3", "losetup", "mkfs.ext4", "cmp")
               if shutil.which(t) is None]
    if missing:
        sys.exit(f"bench: missing tools: {' '.join(missing)} (run scripts/install.sh --test)")
    if os.geteuid() != 0:
        log("warning: not root: caches cannot be dropped, qsd/qcowmount may need allow_other")

    load_start = os.getloadavg()[0]
    if load_start > 0.5 * (os.cpu_count() or 1):
        log(f"warning: machine busy (load {load_start:.1f} on {os.cpu_count()} CPUs): "
            "numbers will be noisy")
    t0 = time.monotonic()
    results = None
    try:
        raw, qcow2 = build_images(cfg.size, cfg.rebuild)
        versions = {c.name: c.version() for c in contenders}
        log(f"image {qcow2.name}: {cfg.size // MIB} MiB, {cfg.runs} run(s) each, "
            f"random runs {cfg.runtime}s")
        results = measure(cfg, benches, contenders, raw, qcow2)
        ops_text = None
        makers_only = bool(cfg.bench) and cfg.bench.split(",") == [MAKERS_GROUP]
        if cfg.ops or makers_only:
            import ops  # bench/ops.py: snapshot, dirty-map, create and convert timings against QEMU's tools
            log("metadata operations (bench/ops.py) ...")
            ops_text, ops_rows = ops.run_makers(cfg.runs) if makers_only else ops.run_all(qcow2, cfg.runs)
    except KeyboardInterrupt:
        log("interrupted, cleaning up")
        return 130
    finally:
        sweep()
        for p in (WORK / "scratch.qcow2", WORK / "scratch.raw"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    elapsed = time.monotonic() - t0
    sys.stderr.flush()
    print(flush=True)
    print_tables(cfg, benches, contenders, results)
    print("(higher is better, except rows in s; 'n/a': not available; '!': some runs failed; "
          "'~': runs differ by >30%, see results.json; "
          f"qsd = qemu-storage-daemon FUSE export; total {elapsed:.0f}s)")
    load_end = os.getloadavg()[0]
    if max(load_start, load_end) > 0.5 * (os.cpu_count() or 1):
        print(f"WARNING: other load on the machine (load average {load_start:.1f} at start, "
              f"{load_end:.1f} at end, {os.cpu_count()} CPUs): numbers are noisy")
    if ops_text:
        print()
        print(ops_text)
    data = to_json(cfg, benches, contenders, results, versions, elapsed)
    if ops_text:
        data["operations"] = ops_rows
    data["host"]["loadavg_start"] = round(load_start, 2)
    data["host"]["loadavg_end"] = round(load_end, 2)
    cfg.json.parent.mkdir(parents=True, exist_ok=True)
    cfg.json.write_text(json.dumps(data, indent=2) + "\n")
    print(f"results: {cfg.json}")
    failed = [f"{b.key}/{n}: {c.error}" for b in benches
              for n, c in results[b.key].items() if c.error and not c.na]
    if failed:
        print("contenders that failed to run:", *failed, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == [API_CHILD]:
        sys.exit(api_child(json.loads(sys.argv[2])))
    sys.exit(main())
