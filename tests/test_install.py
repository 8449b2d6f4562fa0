"""Installed like a real tool: `make install` puts `qcowfs` on every user's PATH
and where mount(8) looks, on a venv built from Debian's /usr/bin/python3.

Run for real: the install script itself (into a scratch prefix, so the
host's /usr/local/bin is left alone unless the session fixture of
test_service installs it there), a non-root user with an ordinary PATH, and
mount(8) with a minimal environment.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import QCOWFS, is_mounted
from test_service import (NOBODY, cleanup_mount, daemon_pids, make_image, public_dir, qemu_img_check,  # noqa: F401
                          qcowfs_on_default_path,
                          sh, wait_gone)

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ROOT / "scripts" / "install.sh"
MiB = 1 << 20

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (setpriv, mount(8))")


def as_user(*args, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                           "env", "-i", *[f"{k}={v}" for k, v in env.items()], *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def test_venv_is_built_on_debian_python():
    assert (ROOT / ".venv" / "bin" / "python").resolve() == Path("/usr/bin/python3").resolve()
    p = sh("sh", INSTALL, "--venv-status")
    assert p.stdout.strip() == "current", p.stdout


def test_venv_made_from_another_python_is_rebuilt(tmp_path: Path):
    """The check install.sh makes: a venv whose python is not $PYTHON is rebuilt."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(INSTALL, repo / "scripts" / "install.sh")
    other = tmp_path / "otherpython"
    other.mkdir()
    (other / "python3").symlink_to("/bin/sh")  # any other interpreter
    venv = repo / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(other / "python3")
    (venv / "pyvenv.cfg").write_text(f"home = {other}\nversion = 3.11.7\n")
    p = sh("sh", repo / "scripts" / "install.sh", "--venv-status")
    assert p.stdout.startswith("rebuild: made from /"), p.stdout
    assert "/usr/bin/python3" in p.stdout
    # and with that python asked for, it is current
    p = sh("sh", repo / "scripts" / "install.sh", "--venv-status", env=dict(os.environ, PYTHON=str(other / "python3")))
    assert p.stdout.strip() == "current", p.stdout


def test_system_entry_point_runs_for_any_user():
    """install.sh --system (what `make install` runs), into a scratch prefix: a user
    other than root, with a PATH like /usr/local/bin:/usr/bin:/bin, runs `qcowfs`."""
    prefix = public_dir()
    try:
        p = sh("sh", INSTALL, "--system", "--prefix", prefix)
        assert p.returncode == 0, p.stderr
        entry = prefix / "bin" / "qcowfs"
        assert entry.is_symlink() and entry.samefile(QCOWFS)
        env = {"PATH": f"{prefix / 'bin'}:/usr/bin:/bin", "HOME": "/nonexistent"}
        p = as_user("qcowfs", "--version", env=env)
        assert p.returncode == 0, p.stderr
        assert p.stdout.startswith("qcowfs "), p.stdout
        p = as_user("qcowfs", "info", ROOT / "no-such-image.qcow2", env=env)
        assert p.returncode == 1 and p.stderr.startswith("qcowfs: ") and "Traceback" not in p.stderr, p.stderr
        sh("sh", INSTALL, "--uninstall", "--prefix", prefix)
        assert not os.path.lexists(entry)
    finally:
        shutil.rmtree(prefix, ignore_errors=True)


@pytest.mark.usefixtures("qcowfs_on_default_path")
@pytest.mark.parametrize("env", [{"PATH": "/usr/bin:/bin"}, {}], ids=["minimal-PATH", "no-PATH"])
def test_mount_t_fuse_qcowfs_after_install(tmp_path: Path, env: dict[str, str]):
    """`mount -t fuse.qcowfs IMAGE DIR -o ro` as root with nothing of the venv in the
    environment: mount.fuse3 finds the installed /usr/local/bin/qcowfs."""
    img = make_image(tmp_path / "disk.qcow2")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with cleanup_mount(mnt):
        p = subprocess.run(["/usr/bin/mount", "-t", "fuse.qcowfs", str(img), str(mnt), "-o", "ro"],
                           capture_output=True, text=True, timeout=60, env=env)
        assert p.returncode == 0, p.stderr
        with open(mnt / "disk.raw", "rb") as f:
            assert f.read(MiB) == b"\x5a" * MiB
        pids = daemon_pids(mnt)
        assert sh("/usr/bin/umount", mnt, check=False, env=env).returncode == 0
        wait_gone(pids)
        assert not is_mounted(mnt)
    qemu_img_check(img)
