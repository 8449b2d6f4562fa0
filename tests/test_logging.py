"""Daemon logs: syslog when there is one, else a file the user can find,
`-o log_file=PATH` to choose; the reason a daemon died is never lost; `-d`
prints each line with one prefix.

The "no /dev/log" and "a syslog listening" cases run for real, each in a
private mount namespace (`unshare -m`) where /dev/log is hidden or is our
own listening socket and /var/log is a scratch directory, so the host's
/dev and /var/log are left alone. Whatever a namespace still runs at the
end (a daemon) is killed by pid in teardown; its mounts die with it.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import QCOWFS, force_unmount
from test_service import daemon_pids, foreground, make_image, qemu_img_check

TIMEOUT = 60
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (unshare -m, mount)")

# Mounts, reads, then makes the daemon fail after readiness (Image.close
# raises): the reason must be in the log.
FAIL_AT_CLOSE = r"""
import sys
import qcowfs.engine.image
from qcowfs.cli.main import main
from qcowfs.errors import QcowError

real_close = qcowfs.engine.image.Image.close

async def close(self):
    await real_close(self)
    raise QcowError("injected: the image could not be closed")

if sys.argv[1] == "fail":
    qcowfs.engine.image.Image.close = close
sys.exit(main(sys.argv[2:]))
"""

IN_NAMESPACE = r"""
set -eu
# hide the host's syslog socket (if any) and its /var/log
if [ -n "${SYSLOG_SOCK:-}" ]; then
    mkdir -p "$WORK/dev"
    mount --rbind /dev "$WORK/dev"
    mount -t tmpfs tmpfs /dev
    for n in null zero fuse urandom; do touch /dev/$n; mount --bind "$WORK/dev/$n" /dev/$n; done
    touch /dev/log
    mount --bind "$SYSLOG_SOCK" /dev/log
elif [ -e /dev/log ] || [ -L /dev/log ]; then
    mount --bind "$WORK/not-a-socket" /dev/log
fi
mount --bind "$WORK/varlog" /var/log
"$PYTHON" -c "$WRAPPER" "$MODE" mount "$IMG" "$MNT" $EXTRA
head -c 65536 "$MNT/disk.raw" | od -A n -t x1 | head -1
"$QCOWFS" umount "$MNT" || true
# the daemon is gone once umount returns; give a failing close a moment to log
sleep 0.2
"""


def in_namespace(tmp_path: Path, mode: str, extra: str = "", syslog_sock: Path | None = None
                 ) -> subprocess.CompletedProcess:
    img = make_image(tmp_path / "disk.qcow2")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (tmp_path / "varlog").mkdir()
    (tmp_path / "not-a-socket").write_text("")
    env = dict(os.environ, WORK=str(tmp_path), IMG=str(img), MNT=str(mnt), MODE=mode, EXTRA=extra,
               PYTHON=sys.executable, WRAPPER=FAIL_AT_CLOSE, QCOWFS=QCOWFS,
               SYSLOG_SOCK=str(syslog_sock or ""))
    try:
        return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", IN_NAMESPACE],
                              env=env, capture_output=True, text=True, timeout=TIMEOUT)
    finally:
        for pid in daemon_pids(mnt):
            os.kill(pid, signal.SIGKILL)


def test_no_dev_log_logs_to_var_log_file(tmp_path: Path):
    """No syslog: root's daemon logs to /var/log/qcowfs.log (here the namespace's)."""
    p = in_namespace(tmp_path, "ok")
    assert p.returncode == 0, p.stderr
    assert "5a 5a 5a" in p.stdout, p.stdout
    log = (tmp_path / "varlog" / "qcowfs.log").read_text()
    pid_lines = re.findall(r"^\S+ \S+ qcowfs\[(\d+)\]: serving .*disk\.qcow2 on .*mnt$", log, re.M)
    assert len(pid_lines) == 1, log
    assert "image closed cleanly" in log, log


def test_no_dev_log_the_reason_a_daemon_died_is_in_the_log(tmp_path: Path):
    p = in_namespace(tmp_path, "fail")
    assert "5a 5a 5a" in p.stdout, p.stdout + p.stderr
    log = (tmp_path / "varlog" / "qcowfs.log").read_text()
    assert "injected: the image could not be closed" in log, log
    assert "Traceback" not in log


def test_log_file_option(tmp_path: Path):
    """-o log_file=PATH wins over syslog and the default file."""
    chosen = tmp_path / "chosen" / "my.log"
    p = in_namespace(tmp_path, "fail", f"-o log_file={chosen}")
    assert "5a 5a 5a" in p.stdout, p.stdout + p.stderr
    log = chosen.read_text()
    assert "serving" in log and "injected: the image could not be closed" in log, log
    assert not (tmp_path / "varlog" / "qcowfs.log").exists()


def test_log_file_that_cannot_be_written_is_the_mount_error(tmp_path: Path):
    img = make_image(tmp_path / "disk.qcow2")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (tmp_path / "afile").write_text("")
    p = subprocess.run([QCOWFS, "mount", str(img), str(mnt), "-o", f"log_file={tmp_path}/afile/x.log"],
                       capture_output=True, text=True, timeout=TIMEOUT)
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(lines) == 1 and "log file" in lines[0], p.stderr
    assert not os.path.ismount(mnt)


@pytest.mark.parametrize("which", ["the image", "its backing file", "its data file"])
def test_a_log_file_that_is_a_file_of_the_image_is_refused(tmp_path: Path, which: str):
    """The daemon appends its lines to the log file: -o log_file= naming the
    image, a file of its backing chain or its data file is refused, and
    nothing changes (the daemon wrote its lines into disk.qcow2)."""
    base = make_image(tmp_path / "base.qcow2")
    img = tmp_path / "disk.qcow2"
    opts = ["-b", "base.qcow2", "-F", "qcow2"] if which != "its data file" else ["-o", "data_file=disk.data"]
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *opts, img, "64M"], check=True, cwd=tmp_path)
    log = {"the image": img, "its backing file": base, "its data file": tmp_path / "disk.data"}[which]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir() if f.is_file()}
    try:
        p = subprocess.run([QCOWFS, "mount", str(img), str(mnt), "-o", f"log_file={log}"],
                           capture_output=True, text=True, timeout=TIMEOUT)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 1 and lines == [f"qcowfs: log_file {log} is a file of the image: the log would "
                                               "be written into it"], p.stderr
        assert not os.path.ismount(mnt)
    finally:
        force_unmount(mnt)
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir() if f.is_file()} == before


def test_syslog_when_there_is_one(tmp_path: Path):
    """A syslog socket at /dev/log (ours, in the namespace): the daemon's lines go there
    as "<facility.prio>qcowfs[PID]: message"; no log file is written."""
    sock_path = tmp_path / "syslog.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    try:
        p = in_namespace(tmp_path, "fail", syslog_sock=sock_path)
        assert "5a 5a 5a" in p.stdout, p.stdout + p.stderr
        sock.setblocking(False)
        got = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                got.append(sock.recv(65536).decode("utf-8", "replace"))
            except BlockingIOError:
                if any("injected" in g for g in got):
                    break
                time.sleep(0.05)
    finally:
        sock.close()
    assert any(re.match(r"<\d+>qcowfs\[\d+\]: serving .*disk\.qcow2", g) for g in got), got
    assert any("injected: the image could not be closed" in g and g.startswith("<27>") for g in got), got
    assert not (tmp_path / "varlog" / "qcowfs.log").exists()


def test_debug_lines_have_one_prefix(tmp_path: Path):
    img = make_image(tmp_path / "disk.qcow2")
    mnt = tmp_path / "mnt"
    with foreground(img, mnt, "-d", logdir=tmp_path) as fg:
        (mnt / "disk.raw").stat()
        assert fg.stop(signal.SIGTERM) == 0
        log = fg.stderr()
    assert "qcowfs: qcowfs:" not in log, log
    assert re.search(r"^qcowfs: Initializing pyfuse3$", log, re.M), log
    assert all(line.startswith("qcowfs: ") for line in log.splitlines()), log
    qemu_img_check(img)
