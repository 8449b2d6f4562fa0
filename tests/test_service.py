"""qcowfs as a system service: mount(8)/fstab through mount.fuse3, systemd units,
readiness notification, signals, clean shutdown with writes in flight, access.

Everything runs for real (root, /dev/fuse, mount(8), fusermount3, qemu-img).
Every mount is undone in teardown, and after each unmount the image must pass
`qemu-img check`.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import QCOWFS
from conftest import force_unmount, is_mounted

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "systemd"
VENV_BIN = Path(QCOWFS).parent
USR_LOCAL_QCOWFS = Path("/usr/local/bin/qcowfs")
NOBODY = 65534
MiB = 1 << 20
TIMEOUT = 60

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount(8), setpriv)")


# ---- helpers -------------------------------------------------------------------------

def sh(*args, check: bool = True, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("timeout", TIMEOUT)
    return subprocess.run([str(a) for a in args], check=check, capture_output=True, text=True, **kw)


def qemu_img_check(image: Path) -> subprocess.CompletedProcess:
    p = sh("qemu-img", "check", image, check=False)
    assert p.returncode == 0, f"qemu-img check {image}: {p.returncode}\n{p.stdout}{p.stderr}"
    return p


def make_image(path: Path, size: str = "32M", pattern: int = 0x5A, length: str = "1M") -> Path:
    sh("qemu-img", "create", "-q", "-f", "qcow2", path, size)
    sh("qemu-io", "-f", "qcow2", "-c", f"write -P {pattern:#x} 0 {length}", path)
    return path


def mount_env() -> dict[str, str]:
    """The brief's environment for mount(8): the venv's bin dir first on PATH.

    (mount(8) drops PATH before running mount.fuse3, whose /bin/sh then falls
    back to its default PATH: that is why /usr/local/bin/qcowfs is needed.)
    """
    return dict(os.environ, PATH=f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}")


def daemon_pids(mnt: Path) -> list[int]:
    """Processes running qcowfs (or a script using it) with MNT on their command line."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            argv = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(mnt).encode() in argv and any(b"qcowfs" in a for a in argv[:3]):
            pids.append(int(d))
    return pids


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, f"daemon {pids} still running"
        time.sleep(0.02)


def public_dir() -> Path:
    """A directory other users can traverse (pytest's tmp_path is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="qcowfs-svc-", dir="/tmp"))
    d.chmod(0o755)
    return d


def as_nobody(*args) -> subprocess.CompletedProcess:
    return sh("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *args, check=False)


@contextlib.contextmanager
def cleanup_mount(mnt: Path) -> Iterator[None]:
    """Whatever happens, nothing stays mounted on MNT and its daemon is gone."""
    try:
        yield
    finally:
        pids = daemon_pids(mnt)
        if is_mounted(mnt):
            subprocess.run(["umount", str(mnt)], capture_output=True)
        force_unmount(mnt)
        try:
            wait_gone(pids, 30)
        finally:
            for p in pids:
                if alive(p):
                    os.kill(p, signal.SIGKILL)


@pytest.fixture(scope="session")
def qcowfs_on_default_path() -> Iterator[None]:
    """/usr/local/bin/qcowfs -> this checkout's qcowfs, as `make install` installs it.

    Created when missing, or pointed here for the session when it points to
    another checkout's qcowfs (a CI clone on a machine where `make demo` ran),
    and put back as it was by the last test session that uses it (a count
    under a lock: pytest-xdist workers share it).
    """
    if USR_LOCAL_QCOWFS.exists() and not USR_LOCAL_QCOWFS.is_symlink():
        pytest.fail(f"{USR_LOCAL_QCOWFS} is a file, not the symlink `make install` makes")
    lock = Path(tempfile.gettempdir()) / "qcowfs-tests-usr-local-bin.lock"

    def update(delta: int) -> None:
        with open(lock, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            # line 1: users; line 2: what to put back ("-": remove it, "": nothing)
            lines = f.read().split("\n")
            users = int(lines[0]) if lines[0].strip().isdigit() else 0
            restore = lines[1] if len(lines) > 1 else ""
            users = max(0, users + delta)
            if delta > 0 and not (os.path.lexists(USR_LOCAL_QCOWFS) and USR_LOCAL_QCOWFS.exists()
                                  and USR_LOCAL_QCOWFS.samefile(QCOWFS)):
                if not restore:
                    restore = os.readlink(USR_LOCAL_QCOWFS) if os.path.lexists(USR_LOCAL_QCOWFS) else "-"
                if os.path.lexists(USR_LOCAL_QCOWFS):
                    USR_LOCAL_QCOWFS.unlink()
                # what `make install` does
                sh(ROOT / "scripts" / "install.sh", "--system")
                assert USR_LOCAL_QCOWFS.samefile(QCOWFS)
            if users == 0 and restore:
                if USR_LOCAL_QCOWFS.is_symlink() and os.readlink(USR_LOCAL_QCOWFS) == QCOWFS:
                    USR_LOCAL_QCOWFS.unlink()
                    if restore != "-":
                        os.symlink(restore, USR_LOCAL_QCOWFS)
                restore = ""
            f.seek(0)
            f.truncate()
            f.write(f"{users}\n{restore}\n")

    update(+1)
    try:
        yield
    finally:
        update(-1)


# ---- readiness notification: a NOTIFY_SOCKET listener ------------------------------------

class Foreground:
    """`qcowfs mount --foreground ...` as systemd runs it, with a notify socket."""

    def __init__(self, args: list, mnt: Path, logdir: Path, env: dict[str, str] | None = None):
        self.mnt = mnt
        self.sockdir = tempfile.mkdtemp(prefix="qn-", dir="/tmp")  # short: sun_path is 108 bytes
        self.path = os.path.join(self.sockdir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[str] = []
        self.log_path = logdir / f"qcowfs-{len(list(logdir.glob('qcowfs-*.log')))}.log"
        self.log = open(self.log_path, "w+")
        self.proc = subprocess.Popen([str(a) for a in args], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self.log,
                                     env=dict(env or os.environ, NOTIFY_SOCKET=self.path))

    def stderr(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def wait_message(self, wanted: str, timeout: float = TIMEOUT) -> None:
        """Wait for the datagram line WANTED (e.g. READY=1); fail early if the process dies."""
        deadline = time.monotonic() + timeout
        self.sock.settimeout(0.1)
        while wanted not in self.messages:
            try:
                self.messages += self.sock.recv(4096).decode().splitlines()
                continue
            except socket.timeout:
                pass
            if self.proc.poll() is not None:
                # one last look: the datagram may have come just before the exit
                self.sock.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    while True:
                        self.messages += self.sock.recv(4096).decode().splitlines()
                if wanted in self.messages:
                    break
                raise AssertionError(f"qcowfs exited ({self.proc.returncode}) without {wanted}; "
                                     f"got {self.messages}; stderr:\n{self.stderr()}")
            assert time.monotonic() < deadline, f"no {wanted} after {timeout}s: {self.messages}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = TIMEOUT) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        force_unmount(self.mnt)
        self.sock.close()
        shutil.rmtree(self.sockdir, ignore_errors=True)
        self.log.close()


@contextlib.contextmanager
def foreground(image: Path, mnt: Path, *extra, logdir: Path, ready: bool = True,
               args: list | None = None, env: dict[str, str] | None = None) -> Iterator[Foreground]:
    mnt.mkdir(parents=True, exist_ok=True)
    fg = Foreground(args or [QCOWFS, "mount", "--foreground", image, mnt, *extra], mnt, logdir, env)
    try:
        if ready:
            fg.wait_message("READY=1")
        yield fg
    finally:
        fg.close()


def test_notify_ready_then_stopping(tmp_path: Path):
    img = make_image(tmp_path / "disk.qcow2")
    mnt = tmp_path / "mnt"
    with foreground(img, mnt, logdir=tmp_path, ready=False) as fg:
        fg.wait_message("READY=1")
        # At READY=1 the mount answers already: no sleep, no retry.
        assert os.stat(mnt / "disk.raw").st_size == 32 * MiB
        with open(mnt / "disk.raw", "rb") as f:
            assert f.read(MiB) == b"\x5a" * MiB
        assert is_mounted(mnt)
        assert "STOPPING=1" not in fg.messages
        assert fg.stop(signal.SIGTERM) == 0, fg.stderr()
        fg.wait_message("STOPPING=1", timeout=5)
        assert fg.messages.index("READY=1") < fg.messages.index("STOPPING=1")
        assert not is_mounted(mnt)
    qemu_img_check(img)


def test_notify_socket_abstract_and_missing(tmp_path: Path):
    """A NOTIFY_SOCKET nobody listens on must not stop the mount (a warning at most)."""
    img = make_image(tmp_path / "disk.qcow2")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "nobody-listens"))
    p = subprocess.Popen([QCOWFS, "mount", "--foreground", str(img), str(mnt)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not is_mounted(mnt) or not (mnt / "disk.raw").exists():
            assert p.poll() is None, p.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        assert p.wait(TIMEOUT) == 0
        assert "Traceback" not in p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        force_unmount(mnt)
    assert not is_mounted(mnt)


# ---- signals and unmounts ----------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_unmounts_cleanly(tmp_path: Path, sig: int):
    img = make_image(tmp_path / "disk.qcow2")
    mnt = tmp_path / "mnt"
    data = os.urandom(3 * 65536 + 123)
    with foreground(img, mnt, logdir=tmp_path) as fg:
        with open(mnt / "disk.raw", "r+b") as f:
            f.seek(5 * MiB + 17)
            f.write(data)
        assert fg.stop(sig) == 0, fg.stderr()
        assert not is_mounted(mnt)
        assert "Traceback" not in fg.stderr()
    qemu_img_check(img)
    out = tmp_path / "out.raw"
    sh("qemu-img", "convert", "-O", "raw", img, out)
    with open(out, "rb") as f:
        f.seek(5 * MiB + 17)
        assert f.read(len(data)) == data


def test_sigterm_during_startup(tmp_path: Path):
    """SIGTERM at any moment once the FUSE mount exists, even before the daemon is ready
    (systemctl stop right after start): no hang, no dead mount left, exit 0, image clean."""
    img = make_image(tmp_path / "disk.qcow2")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for delay in (0, 0, 0, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2):
        p = subprocess.Popen([QCOWFS, "mount", "--foreground", str(img), str(mnt)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + TIMEOUT
            while not is_mounted(mnt):
                assert p.poll() is None, p.stderr.read()
                assert time.monotonic() < deadline
                time.sleep(0.001)
            time.sleep(delay)
            p.send_signal(signal.SIGTERM)
            rc = p.wait(20)
            err = p.stderr.read()
            assert rc == 0, (delay, rc, err)
            assert "Traceback" not in err
            assert not is_mounted(mnt), f"mount left behind (SIGTERM {delay}s after the mount)"
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            force_unmount(mnt)
    qemu_img_check(img)


WRITER = r"""
import os, sys
path, slots = sys.argv[1], int(sys.argv[2])
fd = os.open(path, os.O_WRONLY)
i = 0
while True:
    try:
        os.pwrite(fd, bytes([1 + i % 251]) * 65536, (i % slots) * 65536)
    except OSError as e:
        print("ERR", e.errno, flush=True)
        break
    print(i, flush=True)
    i += 1
"""


def start_writer(tmp_path: Path, mnt: Path, slots: int) -> tuple[subprocess.Popen, Path]:
    """The WRITER on MNT/disk.raw; returns once it has acknowledged writes."""
    progress = tmp_path / "writer.out"
    with open(progress, "w") as out, open(tmp_path / "writer.err", "w") as err:
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(mnt / "disk.raw"), str(slots)],
                                  stdout=out, stderr=err)
    deadline = time.monotonic() + TIMEOUT
    while progress.stat().st_size == 0:
        assert writer.poll() is None, (tmp_path / "writer.err").read_text()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return writer, progress


def acknowledged_writes_survived(img: Path, tmp_path: Path, progress: Path, slots: int) -> list[int]:
    """Every write the writer printed as done is in the image (the last one, in flight
    when the mount went away, may or may not be)."""
    out = progress.read_text()
    done = [int(x) for x in out.splitlines() if x.isdigit()]
    assert len(done) > 10, out
    assert done == list(range(len(done)))
    qemu_img_check(img)
    raw = tmp_path / "out.raw"
    sh("qemu-img", "convert", "-O", "raw", img, raw)
    expect: dict[int, int] = {}
    for i in done:
        expect[i % slots] = 1 + i % 251
    expect.pop(len(done) % slots, None)
    with open(raw, "rb") as f:
        for slot, byte in expect.items():
            f.seek(slot * 65536)
            assert f.read(65536) == bytes([byte]) * 65536, f"slot {slot}"
    return done


def wait_for_log(fg: "Foreground", text: str) -> None:
    """Until the foreground daemon has logged TEXT (it must stay alive meanwhile)."""
    deadline = time.monotonic() + TIMEOUT
    while text not in fg.stderr():
        assert fg.proc.poll() is None, fg.stderr()
        assert time.monotonic() < deadline, fg.stderr()
        time.sleep(0.05)


def test_sigterm_with_writes_in_flight_waits_for_release(tmp_path: Path):
    """SIGTERM while a writer keeps disk.raw open and writing: the daemon flushes, says
    what holds the mount, keeps serving (the writer never sees an error), and unmounts
    and exits 0 as soon as the writer is gone; every acknowledged write is in the image."""
    img = tmp_path / "disk.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", img, "32M")
    mnt = tmp_path / "mnt"
    slots = 32 * MiB // 65536
    with foreground(img, mnt, logdir=tmp_path) as fg:
        writer, progress = start_writer(tmp_path, mnt, slots)
        try:
            time.sleep(0.5)
            fg.proc.send_signal(signal.SIGTERM)
            wait_for_log(fg, "is busy")
            busy = [line for line in fg.stderr().splitlines() if "is busy" in line]
            assert len(busy) == 1 and f"pid {writer.pid} (python" in busy[0] and "disk.raw" in busy[0], busy
            before = len(progress.read_text().splitlines())
            time.sleep(1.5)  # still serving: the writer goes on
            assert fg.proc.poll() is None and is_mounted(mnt)
            assert writer.poll() is None, (tmp_path / "writer.err").read_text()
            assert len(progress.read_text().splitlines()) > before + 10
            writer.send_signal(signal.SIGTERM)  # release the mount
            writer.wait(TIMEOUT)
            assert fg.proc.wait(TIMEOUT) == 0, fg.stderr()
        finally:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
        assert not is_mounted(mnt)
        log = fg.stderr()
        assert "released" in log and "Traceback" not in log, log
    assert "ERR" not in progress.read_text()
    acknowledged_writes_survived(img, tmp_path, progress, slots)


@pytest.mark.parametrize("how", ["second-SIGTERM", "umount-force"])
def test_busy_mount_detached_explicitly(tmp_path: Path, how: str):
    """A second stop signal within a few seconds, or `qcowfs umount --force`, detaches a
    busy mount anyway, after a flush: the writer then gets errors, but every write it was
    told had succeeded is in the image, and the image is clean."""
    img = tmp_path / "disk.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", img, "32M")
    mnt = tmp_path / "mnt"
    slots = 32 * MiB // 65536
    with foreground(img, mnt, logdir=tmp_path) as fg:
        writer, progress = start_writer(tmp_path, mnt, slots)
        try:
            time.sleep(0.5)
            fg.proc.send_signal(signal.SIGTERM)
            wait_for_log(fg, "is busy")
            assert fg.proc.poll() is None and is_mounted(mnt)
            if how == "second-SIGTERM":
                fg.proc.send_signal(signal.SIGTERM)
            else:
                p = sh(QCOWFS, "umount", "--force", mnt, check=False)
                assert p.returncode == 0, p.stderr
            assert fg.proc.wait(TIMEOUT) == 0, fg.stderr()
            writer.wait(TIMEOUT)
        finally:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
        assert not is_mounted(mnt)
        assert "detaching" in fg.stderr(), fg.stderr()
    assert "ERR" in progress.read_text()  # the writer saw the mount go away
    acknowledged_writes_survived(img, tmp_path, progress, slots)


def test_umount_force_without_a_pid_file(tmp_path: Path):
    """No pid file (removed, or written by another user): `qcowfs umount --force` still
    detaches; the daemon then sees its session end, flushes and exits, image clean."""
    from qcowfs.host import mounts

    img = make_image(tmp_path / "disk.qcow2")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with cleanup_mount(mnt):
        sh(QCOWFS, "mount", img, mnt)
        pids = daemon_pids(mnt)
        with open(mnt / "disk.raw", "r+b") as f:
            f.seek(3 * MiB)
            f.write(b"\x3c" * 70000)
        entry = mounts.find(mnt, mounts.FSTYPE)
        assert entry is not None
        for d in mounts.run_dirs():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(d, entry.dev.replace(":", "_") + ".pid"))
        assert mounts.read_pid(entry.dev) is None
        p = sh(QCOWFS, "umount", "--force", mnt, check=False)
        assert p.returncode == 0, p.stderr
        wait_gone(pids)
        assert not is_mounted(mnt)
    qemu_img_check(img)
    sh("qemu-io", "-f", "qcow2", "-c", f"read -P 0x3c {3 * MiB} 70000", img)


def test_umount_refuses_busy_mount_naming_the_holder(tmp_path: Path):
    img = make_image(tmp_path / "disk.qcow2")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with cleanup_mount(mnt):
        sh(QCOWFS, "mount", img, mnt)
        with open(mnt / "disk.raw", "rb"):
            p = sh(QCOWFS, "umount", mnt, check=False)
            assert p.returncode != 0
            lines = p.stderr.strip().splitlines()
            assert len(lines) == 1 and "busy" in lines[0] and f"pid {os.getpid()}" in lines[0], p.stderr
            assert "--force" in lines[0]
            assert is_mounted(mnt) and (mnt / "disk.raw").stat().st_size == 32 * MiB
        sh(QCOWFS, "umount", mnt)
        assert not is_mounted(mnt)
    qemu_img_check(img)


@pytest.mark.parametrize("how", ["fusermount3", "SIGTERM", "SIGINT", "SIGHUP", "qcowfs-umount"])
def test_daemonized_mount_ends_cleanly(tmp_path: Path, how: str):
    """Daemonized rw mount; `fusermount3 -u`, a signal to the daemon or `qcowfs umount`
    make it flush and exit, unmounted."""
    img = make_image(tmp_path / "disk.qcow2")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with cleanup_mount(mnt):
        p = sh(QCOWFS, "mount", img, mnt, check=False)
        assert p.returncode == 0, p.stderr
        pids = daemon_pids(mnt)
        assert len(pids) == 1, pids
        with open(mnt / "disk.raw", "r+b") as f:
            f.seek(7 * MiB)
            f.write(b"\xa7" * 200000)
        if how == "fusermount3":
            sh("fusermount3", "-u", mnt)
        elif how == "qcowfs-umount":
            sh(QCOWFS, "umount", mnt)
            assert not any(alive(x) for x in pids)  # it waited for the daemon
        else:
            os.kill(pids[0], getattr(signal, how))
        wait_gone(pids)
        assert not is_mounted(mnt)
    qemu_img_check(img)
    sh("qemu-io", "-f", "qcow2", "-c", f"read -P 0xa7 {7 * MiB} 200000", img)


def test_daemonized_mount_is_ready_on_return(tmp_path: Path):
    """`qcowfs mount` returns only once disk.raw can be read; the daemon is another process
    that let go of the caller's stdout/stderr (or capture_output would never return)."""
    img = make_image(tmp_path / "disk.qcow2")
    for i in range(3):
        mnt = tmp_path / f"mnt{i}"
        mnt.mkdir()
        with cleanup_mount(mnt):
            p = subprocess.run([QCOWFS, "mount", str(img), str(mnt), "--read-only"],
                               capture_output=True, text=True, timeout=TIMEOUT)
            assert p.returncode == 0, p.stderr
            with open(mnt / "disk.raw", "rb") as f:
                assert f.read(MiB) == b"\x5a" * MiB
            assert p.stdout == "" and p.stderr == ""
            pids = daemon_pids(mnt)
            assert len(pids) == len(os.sched_getaffinity(0))  # the daemon and its workers, one per CPU
            sh(QCOWFS, "umount", mnt)
            assert not any(alive(x) for x in pids)
            assert not is_mounted(mnt)
    qemu_img_check(img)


@pytest.mark.parametrize("fg", [False, True], ids=["daemon", "foreground"])
def test_daemon_side_failure_reported_by_parent(tmp_path: Path, fg: bool):
    """A failure in the daemon (after the fork) is the parent's exit status and one stderr line.

    Here: a non-root user asks for allow_other, which fusermount3 refuses
    without user_allow_other in /etc/fuse.conf (or, where /dev/fuse is
    0600, cannot mount at all). libfuse and fusermount3 print their own
    messages on stderr: they must end up in qcowfs's one line."""
    if re.search(r"^\s*user_allow_other", Path("/etc/fuse.conf").read_text(), re.M):
        pytest.skip("user_allow_other is set in /etc/fuse.conf")
    d = public_dir()
    try:
        img = make_image(d / "disk.qcow2")
        mnt = d / "mnt"
        mnt.mkdir()
        os.chown(img, NOBODY, NOBODY)
        os.chown(mnt, NOBODY, NOBODY)
        with cleanup_mount(mnt):
            p = as_nobody(QCOWFS, "mount", *(["--foreground"] if fg else []), img, mnt, "-o", "ro,allow_other")
            assert p.returncode != 0
            assert "Traceback" not in p.stderr
            lines = p.stderr.strip().splitlines()
            assert len(lines) == 1, p.stderr
            assert re.match(rf"qcowfs: cannot mount on {mnt}: .*(allow_other|/dev/fuse)", lines[0]), lines
            assert not is_mounted(mnt)
            assert daemon_pids(mnt) == []
    finally:
        shutil.rmtree(d, ignore_errors=True)


FAIL_AFTER_MOUNT = r"""
import sys
import qcowfs.engine.image
from qcowfs.cli.main import main
from qcowfs.errors import QcowError

async def fail(self):
    raise QcowError("injected failure while preparing the image for writes")

qcowfs.engine.image.Image.prepare_writes = fail
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("fg", [False, True], ids=["daemon", "foreground"])
def test_failure_after_fuse_mount_leaves_nothing_mounted(tmp_path: Path, fg: bool):
    """A failure once the FUSE mount exists but before it is ready (here injected into
    Image.prepare_writes, which a dirty image's refcount rebuild can fail in for real)
    unmounts, and is one stderr line naming the cause."""
    img = make_image(tmp_path / "disk.qcow2")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with cleanup_mount(mnt):
        p = sh(sys.executable, "-c", FAIL_AFTER_MOUNT, "mount", *(["--foreground"] if fg else []),
               img, mnt, check=False)
        assert p.returncode != 0
        assert "Traceback" not in p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "injected failure" in lines[0], p.stderr
        assert not is_mounted(mnt), "a dead FUSE mount was left behind"
        assert daemon_pids(mnt) == []
    qemu_img_check(img)


# ---- logs ---------------------------------------------------------------------------------

def test_foreground_logs_to_stderr(tmp_path: Path):
    img = make_image(tmp_path / "disk.qcow2")
    mnt = tmp_path / "mnt"
    with foreground(img, mnt, logdir=tmp_path) as fg:
        (mnt / "disk.raw").read_bytes()
        assert fg.stop(signal.SIGTERM) == 0
        log = fg.stderr()
    assert str(img) in log and str(mnt) in log, log
    assert "SIGTERM" in log, log
    assert "read(" not in log  # no request log without --debug
    assert "Traceback" not in log


def test_debug_logs_each_request(tmp_path: Path):
    img = make_image(tmp_path / "disk.qcow2")
    mnt = tmp_path / "mnt"
    with foreground(img, mnt, "--debug", "-o", "ro", logdir=tmp_path) as fg:
        os.listdir(mnt / "snapshots")
        with open(mnt / "disk.raw", "rb") as f:
            f.read(4096)
        assert fg.stop(signal.SIGTERM) == 0
        log = fg.stderr()
    for op in ("lookup", "getattr", "opendir", "readdir", "open", "read"):
        assert re.search(rf"^qcowfs: {op}\(", log, re.M), (op, log[-3000:])


# ---- access -------------------------------------------------------------------------------

@pytest.fixture
def pubdir() -> Iterator[Path]:
    d = public_dir()
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_access_default_only_mounting_user(pubdir: Path):
    img = make_image(pubdir / "disk.qcow2")
    mnt = pubdir / "mnt"
    mnt.mkdir()
    with cleanup_mount(mnt):
        sh(QCOWFS, "mount", img, mnt, "--read-only")
        assert (mnt / "disk.raw").stat().st_mode & 0o777 == 0o444
        p = as_nobody("cat", mnt / "disk.raw")
        assert p.returncode != 0 and "Permission denied" in p.stderr, p
        sh(QCOWFS, "umount", mnt)


@pytest.mark.parametrize("opts, reader_ok, writer_ok, mode, owner", [
    ("ro,allow_other", True, False, 0o444, 0),
    ("rw,allow_other", True, False, 0o644, 0),
    (f"rw,allow_other,uid={NOBODY},gid={NOBODY}", True, True, 0o644, NOBODY),
    ("rw,allow_other,umask=077", False, False, 0o600, 0),
    (f"rw,allow_other,uid={NOBODY},umask=027", True, True, 0o640, NOBODY),
], ids=["ro", "rw", "uid", "umask077", "uid-umask027"])
def test_access_allow_other(pubdir: Path, opts: str, reader_ok: bool, writer_ok: bool, mode: int,
                            owner: int):
    img = make_image(pubdir / "disk.qcow2")
    mnt = pubdir / "mnt"
    mnt.mkdir()
    with cleanup_mount(mnt):
        sh(QCOWFS, "mount", img, mnt, "-o", opts)
        st = (mnt / "disk.raw").stat()
        assert (st.st_mode & 0o777, st.st_uid) == (mode, owner)
        r = as_nobody("dd", f"if={mnt / 'disk.raw'}", "of=/dev/null", "bs=4096", "count=1")
        assert (r.returncode == 0) == reader_ok, r.stderr
        if not reader_ok:
            assert "Permission denied" in r.stderr
        w = as_nobody("dd", "if=/dev/zero", f"of={mnt / 'disk.raw'}", "bs=4096", "count=1",
                      "seek=100", "conv=notrunc")
        assert (w.returncode == 0) == writer_ok, w.stderr
        if not writer_ok:
            assert "Permission denied" in w.stderr or "Read-only" in w.stderr, w.stderr
        sh(QCOWFS, "umount", mnt)
    qemu_img_check(img)


# ---- mount(8), umount(8), fstab ----------------------------------------------------------

def mount8(*args) -> subprocess.CompletedProcess:
    return sh("mount", *args, check=False, env=mount_env())


@pytest.mark.usefixtures("qcowfs_on_default_path")
def test_mount8_read_only(tmp_path: Path):
    img = make_image(tmp_path / "disk.qcow2")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with cleanup_mount(mnt):
        p = mount8("-t", "fuse.qcowfs", img, mnt, "-o", "ro,allow_other")
        assert p.returncode == 0, p.stderr
        # mount(8) returned: the mount is ready
        with open(mnt / "disk.raw", "rb") as f:
            assert f.read(MiB) == b"\x5a" * MiB
        with pytest.raises(OSError):
            os.open(mnt / "disk.raw", os.O_WRONLY)
        entry = next(line.split() for line in open("/proc/mounts") if line.split()[1] == str(mnt))
        assert entry[0] == str(img) and entry[2] == "fuse.qcowfs"
        assert {"ro", "allow_other"} <= set(entry[3].split(","))
        pids = daemon_pids(mnt)
        assert len(pids) == len(os.sched_getaffinity(0))  # the daemon and its workers, one per CPU
        p = sh("umount", mnt, check=False)
        assert p.returncode == 0, p.stderr
        wait_gone(pids)
        assert not is_mounted(mnt)
    qemu_img_check(img)


@pytest.mark.usefixtures("qcowfs_on_default_path")
def test_mount8_read_write(tmp_path: Path):
    img = make_image(tmp_path / "disk.qcow2")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    data = os.urandom(MiB + 4097)
    with cleanup_mount(mnt):
        p = mount8("-t", "fuse.qcowfs", img, mnt)
        assert p.returncode == 0, p.stderr
        pids = daemon_pids(mnt)
        assert len(pids) == 1
        with open(mnt / "disk.raw", "r+b") as f:
            f.seek(9 * MiB + 512)
            f.write(data)
        p = sh("umount", mnt, check=False)
        assert p.returncode == 0, p.stderr
        wait_gone(pids)
        assert not is_mounted(mnt)
    qemu_img_check(img)
    out = tmp_path / "out.raw"
    sh("qemu-img", "convert", "-O", "raw", img, out)
    with open(out, "rb") as f:
        assert f.read(MiB) == b"\x5a" * MiB
        f.seek(9 * MiB + 512)
        assert f.read(len(data)) == data


def readme_fstab_options() -> str:
    text = (SYSTEMD / "README.md").read_text()
    m = re.search(r"^\s*\S+\s+\S+\s+fuse\.qcowfs\s+(\S+)\s+0\s+0\s*$", text, re.M)
    assert m, "systemd/README.md has no fstab line"
    return m.group(1)


def served_then_umounted(p: subprocess.CompletedProcess, mnt: Path) -> None:
    """mount(8) (P) worked, the disk is served, and umount(8) ends the daemon."""
    assert p.returncode == 0, p.stderr
    assert (mnt / "disk.raw").stat().st_size == 32 * MiB
    pids = daemon_pids(mnt)
    assert sh("umount", mnt, check=False).returncode == 0
    wait_gone(pids)


@pytest.mark.usefixtures("qcowfs_on_default_path")
def test_fstab_line(tmp_path: Path):
    """The fstab line of systemd/README.md, through `mount -T FSTAB MOUNTPOINT`."""
    img = make_image(tmp_path / "disk.qcow2")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(f"# test\n{img} {mnt} fuse.qcowfs {readme_fstab_options()} 0 0\n")
    with cleanup_mount(mnt):
        p = mount8("-T", fstab, mnt)
        served_then_umounted(p, mnt)
    qemu_img_check(img)


def unit_value(path: Path, key: str) -> str:
    m = re.search(rf"^{key}=(.*)$", path.read_text(), re.M)
    assert m, f"{path.name}: no {key}="
    return m.group(1).strip()


@pytest.mark.usefixtures("qcowfs_on_default_path")
def test_mount_unit_options(tmp_path: Path):
    """The example .mount unit's Type= and Options=, as systemd would run mount(8)."""
    unit = SYSTEMD / "mnt-img.mount"
    img = make_image(tmp_path / "disk.qcow2")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with cleanup_mount(mnt):
        p = mount8("-t", unit_value(unit, "Type"), img, mnt, "-o", unit_value(unit, "Options"))
        served_then_umounted(p, mnt)
    qemu_img_check(img)


# ---- systemd units ------------------------------------------------------------------------

UNITS = sorted(p.name for p in SYSTEMD.glob("*") if p.suffix in (".service", ".mount"))


def test_units_present():
    assert "qcowfs@.service" in UNITS
    assert any(u.endswith(".mount") for u in UNITS)


@pytest.mark.parametrize("name", UNITS)
def test_systemd_analyze_verify(tmp_path: Path, name: str):
    text = (SYSTEMD / name).read_text()
    assert "/usr/local/bin/qcowfs" in text or name.endswith(".mount")
    # The test copy runs the venv's qcowfs: verify checks that ExecStart= exists.
    text = text.replace("/usr/local/bin/qcowfs", QCOWFS)
    names = [name] + ([name.replace("@.", "@test.")] if "@." in name else [])
    for n in names:
        (tmp_path / n).write_text(text)
    # a unit that requires a qcowfs@ instance is verified with that instance there
    service = (SYSTEMD / "qcowfs@.service").read_text().replace("/usr/local/bin/qcowfs", QCOWFS)
    for inst in re.findall(r"^Requires=(qcowfs@\S+\.service)$", text, re.M):
        (tmp_path / inst).write_text(service)
    for n in names:
        p = sh("systemd-analyze", "verify", "--man=no", tmp_path / n, check=False, cwd=tmp_path)
        assert p.returncode == 0, p.stdout + p.stderr
        assert p.stderr.strip() == "", p.stderr


def test_mount_unit_matches_its_name():
    for name in UNITS:
        if name.endswith(".mount"):
            where = unit_value(SYSTEMD / name, "Where")
            esc = sh("systemd-escape", "--path", "--suffix=mount", where).stdout.strip()
            assert esc == name
            assert unit_value(SYSTEMD / name, "What").startswith("/")
    assert unit_value(SYSTEMD / "mnt-img.mount", "Type") == "fuse.qcowfs"


def test_filesystem_inside_is_ordered_to_stop_first():
    """The loop-mounted filesystem's unit stops before qcowfs@ (Requires= + After=), sets
    up its loop device with autoclear (`loop`), stays out of local-fs.target (`nofail`),
    and its fstab twin in systemd/README.md says the same."""
    unit = SYSTEMD / "mnt-fs.mount"
    assert unit_value(unit, "Requires") == unit_value(unit, "After") == "qcowfs@disk.service"
    assert {"loop", "nofail"} <= set(unit_value(unit, "Options").split(","))
    assert unit_value(unit, "What") == "/mnt/img/disk.raw"
    readme = (SYSTEMD / "README.md").read_text()
    assert re.search(r"^\s*/mnt/img/disk\.raw /mnt/fs ext4 \S*loop\S*,x-systemd\.requires=qcowfs@disk\.service",
                     readme, re.M)
    stop = unit_value(SYSTEMD / "qcowfs@.service", "TimeoutStopSec")
    assert stop.endswith("min") and 1 <= int(stop[:-3]) <= 15, stop


def test_service_template(tmp_path: Path):
    """qcowfs@.service run as systemd would: its EnvironmentFile, its ExecStart, Type=notify
    readiness, KillSignal= ending it cleanly, ExecStopPost= harmless afterwards."""
    unit = SYSTEMD / "qcowfs@.service"
    assert unit_value(unit, "Type") == "notify"
    assert unit_value(unit, "KillSignal") in ("SIGTERM", "TERM")
    envfile = unit_value(unit, "EnvironmentFile").lstrip("-")
    assert envfile == "/etc/qcowfs/%i.conf"
    img = make_image(tmp_path / "disk.qcow2")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    conf = tmp_path / "test.conf"
    conf.write_text(f"IMAGE={img}\nMOUNTPOINT={mnt}\nOPTIONS=rw,allow_other\n")

    env: dict[str, str] = {}
    for m in re.finditer(r"^Environment=(\w+)=(.*)$", unit.read_text(), re.M):
        env[m.group(1)] = m.group(2)
    for line in conf.read_text().splitlines():
        k, _, v = line.partition("=")
        env[k] = v

    def command(key: str) -> list[str]:
        words = unit_value(unit, key).lstrip("-").split()
        return [re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], w).replace(
            "/usr/local/bin/qcowfs", QCOWFS) for w in words]

    start = command("ExecStart")
    assert start[:3] == [QCOWFS, "mount", "--foreground"]
    with foreground(img, mnt, logdir=tmp_path, args=start) as fg:
        with open(mnt / "disk.raw", "r+b") as f:
            f.write(b"\x33" * 4096)
        assert {"rw", "allow_other"} <= set(
            next(line.split()[3] for line in open("/proc/mounts") if line.split()[1] == str(mnt)).split(","))
        assert fg.stop(signal.SIGTERM) == 0, fg.stderr()
        fg.wait_message("STOPPING=1", timeout=5)
    assert not is_mounted(mnt)
    post = sh(*command("ExecStopPost"), check=False)
    assert "Traceback" not in post.stderr
    qemu_img_check(img)
    sh("qemu-io", "-f", "qcow2", "-c", "read -P 0x33 0 4096", img)


# ---- Dockerfile -----------------------------------------------------------------------------

def test_dockerfile_uses_install_script():
    text = (ROOT / "Dockerfile").read_text()
    instructions = [line.strip() for line in re.sub(r"\\\n", " ", text).splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
    assert re.match(r"FROM debian:12\b", instructions[0]), instructions[0]
    runs = [i for i in instructions if i.startswith("RUN ")]
    assert any("python3" in r for r in runs)
    assert any(re.search(r"(^|[\s;&])(\./)?scripts/install\.sh\b", r[4:]) for r in runs), runs
    assert any(re.match(r"COPY \. ", i) for i in instructions)
    entry = [i for i in instructions if re.match(r"(ENTRYPOINT|CMD) ", i)]
    assert any("qcowfs" in i for i in entry), entry
    # what the image needs is not excluded by .dockerignore
    # multi-stage: the final stage copies the built venv and installs nothing to build with
    froms = [i for i, x in enumerate(instructions) if x.startswith("FROM ")]
    assert len(froms) >= 2, "the Dockerfile is not multi-stage"
    final = instructions[froms[-1]:]
    assert any(re.match(r"COPY --from=\S+ /opt/qcowfs", i) for i in final), final
    final_installs = " ".join(i for i in final if i.startswith("RUN ") and "apt-get install" in i)
    assert "python3" in final_installs and "fuse3" in final_installs, final_installs
    assert not re.search(r"\bgcc\b|-dev\b|pkg-config", final_installs), final_installs
    ignored = (ROOT / ".dockerignore").read_text().split()
    for needed in ("scripts", "scripts/install.sh", "pyproject.toml", "qcowfs", "README.md"):
        assert needed not in ignored
    assert ".venv" in ignored  # the host's venv must not leak into the image
