#!/usr/bin/env python3
"""qcowfs benchmark: qcowfs against qemu-storage-daemon, qcowmount and a bare
pyfuse3 passthrough, on the same qcow2 image, with fio.

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
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
from qcowfs import mounts  # noqa: E402  (the one mount-table parser)
WORK = HERE / "work"
MIB = 1 << 20
GIB = 1 << 30

# --------------------------------------------------------------------------
# Benchmarks. To add one: append a Bench. `kind` decides which image it runs
# on and which contenders take part ("read": the random-data image mounted
# read-only; "write": a fresh scratch image per run, mounted read-write).
# `prepare` names how the scratch image is made ("empty" or "copy").
# `job` is what runs on the mounted disk: fio with `fio`, or the users' real
# job, ext4 on a loop device over disk.raw ("ext4_write": copy a tree of
# files in, through umount; "ext4_read": read it all back with cold caches).


@dataclass
class Bench:
    key: str
    title: str
    kind: str  # "read" | "write" | "sparse" (its own 100 GiB image, read-only)
    unit: str  # "MiB/s" | "IOPS"
    fio: list
    time_based: bool = False
    prepare: str = ""  # write benches: "empty" | "copy"
    job: str = "fio"  # "fio" | "ext4_write" | "ext4_read" | "ext4_trim" | "cp_sparse"
    encrypted: bool = False  # on the LUKS twin of the image (contenders that can_luks)
    only: tuple = ()  # the contenders that take part (empty: all that can)


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
          job="cp_sparse", only=("qcowfs", "qsd")),
]

# The passphrase of the LUKS images, given to every contender as a key file.
LUKS_SECRET = "qcowfs-bench"


# Aims: (bench key or "*read" for all read benches, peer) -> minimal ratio
# qcowfs / peer. Only reported, never enforced.
AIMS = {
    ("*read", "qsd"): 1.5,
    ("*read", "qcowmount"): 1.0,
    ("seq_read", "passthrough"): 0.9,
    ("seq_write", "qsd"): 1.5,
    ("rand_write_1", "qsd"): 1.5,
}

PEERS = ["qsd", "qcowmount", "passthrough"]  # ratio columns, in order


def aim_for(bench, peer):
    if (bench.key, peer) in AIMS:
        return AIMS[(bench.key, peer)]
    return AIMS.get(("*" + bench.kind, peer))


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
        err = (p.stderr.strip() or p.stdout.strip()).splitlines()
        raise ContenderError(f"{Path(str(cmd[0])).name} exited {p.returncode}: "
                             + (err[-1] if err else "(no output)"))
    return p


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
        time.sleep(0.05)
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


# Everything we mount / start is also registered here, swept at exit.
_MOUNTS = set()
_PIDS = set()


def sweep():
    for mp in list(_MOUNTS):
        with contextlib.suppress(Exception):
            if str(mp) == "/sys/fs/fuse/connections":
                subprocess.run(["umount", str(mp)], stderr=subprocess.DEVNULL, timeout=30)
            else:
                force_unmount(mp)
    with contextlib.suppress(Exception):
        stop_pids(list(_PIDS), grace=0)


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
# image (only the passthrough uses it).


class Contender:
    name = ""
    label = ""
    can_write = True
    can_luks = False  # mounts LUKS-encrypted qcow2 (mount(..., key=KEY FILE))

    def __init__(self, cfg):
        self.cfg = cfg
        self.mnt = WORK / "mnt" / self.name
        self.pids = []  # the serving processes of the current mount (memory)

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
        cmd = pin_prefix(self.cfg.daemon_cpus) + [self.exe(), "mount", qcow2, mnt] + (
            [] if writable else ["--read-only"]) + ([] if key is None else ["-o", f"key_file={key}"])
        _MOUNTS.add(mnt)
        pids = []
        try:
            try:
                p = run(cmd, timeout=120, check=False)
            except subprocess.TimeoutExpired:
                raise ContenderError("qcowfs mount: timed out after 120s")
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
        cmd = pin_prefix(self.cfg.daemon_cpus) + ["qemu-storage-daemon",
               "--blockdev", f"driver=file,node-name=file,filename={qcow2}",
               *([] if key is None else ["--object", f"secret,id=sec0,file={key}"]),
               "--blockdev", "driver=qcow2,node-name=qcow2,file=file"
               + ("" if key is None else ",encrypt.format=luks,encrypt.key-secret=sec0"),
               "--export", f"type=fuse,id=exp,node-name=qcow2,mountpoint={mnt},"
                           f"writable={'on' if writable else 'off'}",
               "--daemonize", "--pidfile", pidfile]
        _MOUNTS.add(mnt)
        pid = None
        try:
            run(cmd, timeout=60)  # --daemonize returns once the export is up
            pid = int(pidfile.read_text().strip())
            _PIDS.add(pid)
            self.pids = [pid]
            wait_for(lambda: mounted(mnt), 10, "qemu-storage-daemon")
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
            run(pin_prefix(self.cfg.daemon_cpus) + ["qcowmount", qcow2, mnt], timeout=60)  # daemonizes unless -v
            wait_for(lambda: mounted(mnt), 10, "qcowmount")
            pids = self.pids = pids_mentioning(mnt)
            _PIDS.update(pids)
            yield mnt / "qcow1"
        finally:
            force_unmount(mnt)
            stop_pids(pids or pids_mentioning(mnt))


class Passthrough(Contender):
    name = "passthrough"
    label = "pyfuse3 passthrough"

    def version(self):
        with contextlib.suppress(Exception):
            return "pyfuse3 " + run([sys.executable, "-c",
                                     "import pyfuse3;print(pyfuse3.__version__)"]).stdout.strip()
        return ""

    @contextlib.contextmanager
    def mount(self, qcow2, raw, writable, key=None):
        mnt = self._dir()
        cmd = pin_prefix(self.cfg.daemon_cpus) + [sys.executable, HERE / "passthrough.py", raw, mnt]
        if writable:
            cmd.append("--writable")
        _MOUNTS.add(mnt)
        errf = tempfile.TemporaryFile(mode="w+")
        proc = subprocess.Popen([str(c) for c in cmd], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=errf)
        _PIDS.add(proc.pid)
        self.pids = [proc.pid]
        try:
            try:
                wait_for(lambda: mounted(mnt), 20, "passthrough", proc)
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


CONTENDERS = [Qcowfs, Qsd, Qcowmount, Passthrough]


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
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", *luks_options(luks_key()), raw, tmp],
        timeout=1200)
    tmp.rename(luks)
    return luks


def scratch_images(bench, size, raw, qcow2):
    """Fresh per-run images for a write bench: (scratch qcow2, scratch raw)."""
    sq = WORK / "scratch.qcow2"
    sr = WORK / "scratch.raw"
    for p in (sq, sr):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    if bench.prepare == "empty":
        run(["qemu-img", "create", "-q", "-f", "qcow2", *(luks_options(luks_key()) if bench.encrypted else []),
             sq, str(size)])
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


def fio(bench, path, size, runtime, cpus=None):
    name = bench.key
    cmd = pin_prefix(cpus) + ["fio", f"--name={name}", f"--filename={path}", "--ioengine=psync",
           f"--size={size}", "--fallocate=none", "--output-format=json", *bench.fio]
    if bench.time_based:
        cmd += [f"--runtime={runtime}", "--time_based"]
    timeout = 600 if not bench.time_based else runtime + 300
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
    fs = WORK / "ext4"
    fs.mkdir(parents=True, exist_ok=True)
    dev = run(["losetup", "--find", "--show", disk]).stdout.strip()
    try:
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
    finally:
        if mounted(fs):
            subprocess.run(["umount", "-l", str(fs)], capture_output=True)
        for _ in range(50):
            if subprocess.run(["losetup", "-d", dev], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
    return {"value": nbytes / MIB / seconds, "seconds": seconds, "tree_mib": nbytes / MIB}


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
        for off in (0, (size // 2 + 12345) & ~4095):
            if os.pread(a.fileno(), MIB, off) != os.pread(b.fileno(), MIB, off):
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


def peak_rss_mib(pids):
    """Peak resident memory (VmHWM) of the serving processes, summed, in MiB."""
    total_kb = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total_kb += int(line.split()[1])
    return total_kb / 1024 if total_kb else None


def one_run(bench, cont, cfg, raw, qcow2):
    key = None
    if bench.encrypted:
        qcow2, key = build_luks_image(raw, qcow2), luks_key()
    if bench.kind == "read":
        img_q, img_r = qcow2, raw
    elif bench.kind == "sparse":
        img_q = img_r = sparse_image()
    else:
        img_q, img_r = scratch_images(bench, cfg.size, raw, qcow2)
    warm_target = img_r if isinstance(cont, Passthrough) else img_q
    try:
        with cont.mount(img_q, img_r, writable=(bench.kind == "write"), key=key) as path:
            if bench.kind == "read" and cfg.verify:
                check_data(path, raw, cfg.size)
            fuse_tune(path, cfg.read_ahead_kb, cfg.max_background)
            if bench.job == "fio":
                drop_caches()
                warm(warm_target)
                r = fio(bench, path, cfg.size, cfg.runtime, cfg.fio_cpus)
            elif bench.job == "cp_sparse":
                r = cp_sparse_job(path, warm_target)
            else:
                r = ext4_job(bench, path, warm_target, cfg.size)
            r["peak_rss_mib"] = peak_rss_mib(cont.pids)
            return r
    finally:
        if bench.kind == "write":
            for p in (img_q, img_r):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()


def measure(cfg, benches, contenders, raw, qcow2):
    results = {b.key: {c.name: Cell() for c in contenders
                       if (b.kind != "write" or c.can_write) and (c.can_luks or not b.encrypted)
                       and (not b.only or c.name in b.only)}
               for b in benches}
    for b in benches:
        for i in range(cfg.runs):
            for c in contenders:
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
    return f"{v:.0f}" if unit == "IOPS" or v >= 100 else f"{v:.1f}"


def ratios(bench, row):
    out = {}
    q = row.get("qcowfs")
    qv = q.median if q else None
    for peer in PEERS:
        cell = row.get(peer)
        if cell is None:
            continue
        pv = cell.median
        ratio = qv / pv if (qv is not None and pv) else None
        aim = aim_for(bench, peer)
        out[peer] = {"ratio": ratio, "aim": aim,
                     "met": (ratio >= aim) if (ratio is not None and aim is not None) else None}
    return out


def report(cfg, benches, contenders, results):
    names = [c.name for c in contenders]
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
    peers = [p for p in PEERS if p in names] if "qcowfs" in names else []
    if not peers:
        return "\n".join(lines)
    cw = 26
    head = f"{'qcowfs / peer':<28} " + " ".join(f"{p:<{cw}}" for p in peers).rstrip()
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
                    verdict = "" if r["met"] is None else (" met" if r["met"] else " NOT met")
                    s = f"{s:<6} aim >={r['aim']:.1f}{verdict}"
            parts.append(f"{s:<{cw}}")
        lines.append((f"{b.title:<28} " + " ".join(parts)).rstrip())
    return "\n".join(lines + [""] + memory_report(benches, names, peers, results))


def memory_report(benches, names, peers, results):
    """Peak RSS of each daemon (max over runs) and qcowfs / peer (lower is better)."""
    w = 11
    head = f"{'peak RSS (MiB)':<28} " + " ".join(f"{n:>{w}}" for n in names)
    head += "   qcowfs / " + ", ".join(peers) + " (lower is better)"
    lines = [head, "-" * len(head)]
    for b in benches:
        row = results[b.key]
        rss = {n: row[n].peak_rss if n in row else None for n in names}
        cells = " ".join(f"{'' if rss[n] is None else f'{rss[n]:.0f}':>{w}}" for n in names)
        q = rss.get("qcowfs")
        rs = ", ".join("-" if not (q and rss.get(p)) else f"{q / rss[p]:.2f}x" for p in peers)
        lines.append(f"{b.title:<28} {cells}   {rs}")
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
            "results": {n: {"median": c.median, "peak_rss_mib": c.peak_rss, "runs": c.runs,
                            "status": "n/a" if c.na else ("failed" if c.error else "ok"),
                            "error": c.error or None}
                        for n, c in row.items()},
            "ratios": ratios(b, row) if "qcowfs" in row else {},
        }
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
    ap.add_argument("--bench", help="comma-separated benchmarks: "
                    + ",".join(b.key for b in BENCHES))
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


def main(argv=None):
    cfg = parse_args(argv)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    contenders = [c(cfg) for c in CONTENDERS]
    if cfg.only:
        want = cfg.only.split(",")
        bad = set(want) - {c.name for c in contenders}
        if bad:
            sys.exit(f"unknown contender(s): {','.join(sorted(bad))}")
        contenders = [c for c in contenders if c.name in want]
    benches = [b for b in BENCHES if cfg.writes or b.kind != "write"]
    if cfg.bench:
        want = cfg.bench.split(",")
        bad = set(want) - {b.key for b in BENCHES}
        if bad:
            sys.exit(f"unknown benchmark(s): {','.join(sorted(bad))}")
        benches = [b for b in benches if b.key in want]
    missing = [t for t in ("fio", "taskset", "qemu-img", "qemu-storage-daemon", "qcowmount", "fusermount3",
                         "losetup", "mkfs.ext4")
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
        if cfg.ops:
            import ops  # bench/ops.py: snapshot and dirty-map timings against QEMU's tools
            log("metadata operations (bench/ops.py) ...")
            ops_text, ops_rows = ops.run_all(qcow2, cfg.runs)
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
    print(f"qcowfs benchmark: {cfg.size // MIB} MiB image of random data, fio psync, "
          f"median of {cfg.runs}, warm host cache, cold FUSE page cache, "
          f"daemons on CPU {cfg.daemon_cpus or 'any'}, fio on CPU {cfg.fio_cpus or 'any'}")
    print(report(cfg, benches, contenders, results))
    print("(higher is better; 'n/a': not available yet; '!': some runs failed; "
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
    sys.exit(main())
