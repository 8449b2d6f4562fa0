"""Our patches to dependencies (patches/, built by scripts/build-patched.sh)
on their own: the installed pyfuse3 and trio are the patched builds; a tiny
filesystem (tests/tinyfs.py) mounted for real gets fallocate(2) and
lseek(SEEK_DATA/SEEK_HOLE), or the kernel's fallbacks when it does not define
them (the ENOSYS defaults); trio loads OpenSSL only when TLS is used."""
from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from conftest import ROOT, fuse_server
from qcowfs.host.hostfile import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, fallocate


@contextlib.contextmanager
def tinyfs(mnt: Path, kind: str) -> Iterator[Path]:
    mnt.mkdir()
    with fuse_server([sys.executable, str(ROOT / "tests" / "tinyfs.py"), str(mnt), kind], mnt):
        yield mnt / "f"


def test_installed_pyfuse3_and_trio_are_the_patched_builds() -> None:
    import pyfuse3

    p = subprocess.run(["sh", str(ROOT / "scripts" / "build-patched.sh"), "--check", str(Path(sys.prefix))],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert hasattr(pyfuse3.Operations, "fallocate") and hasattr(pyfuse3.Operations, "lseek")


TRIO_TLS = """
import sys
import trio
print("ssl" in sys.modules, "hmac" in sys.modules, "SSLStream" in dir(trio))
from trio import SSLStream
print("ssl" in sys.modules, SSLStream.__module__, trio.DTLSEndpoint.__module__,
      trio.open_ssl_over_tcp_stream.__module__, trio.NeedHandshakeError is trio._ssl.NeedHandshakeError)
try:
    trio.no_such_name
except AttributeError as e:
    print(e)
"""


def test_trio_imports_tls_on_first_use_only() -> None:
    """A fresh `import trio` loads neither ssl nor hmac (OpenSSL); the TLS
    and DTLS names are still there, listed, and load their module when
    asked for, under trio's public name, as the eager import gave them."""
    out = subprocess.run([sys.executable, "-c", TRIO_TLS], capture_output=True, text=True, check=True,
                         timeout=60).stdout.splitlines()
    assert out == ["False False True", "True trio trio trio True", "module 'trio' has no attribute 'no_such_name'"]


async def test_defaults_raise_enosys() -> None:
    import pyfuse3

    ops = pyfuse3.Operations()
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.fallocate(1, 0, 0, 1)
    assert e.value.errno == errno.ENOSYS
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.lseek(1, 0, os.SEEK_DATA)
    assert e.value.errno == errno.ENOSYS


def test_fallocate_and_lseek_reach_the_filesystem(tmp_path: Path) -> None:
    with tinyfs(tmp_path / "mnt", "sparse") as f:
        fd = os.open(f, os.O_RDWR)
        try:
            assert os.lseek(fd, 0, os.SEEK_DATA) == 64 << 10
            assert os.lseek(fd, 70 << 10, os.SEEK_DATA) == 70 << 10
            assert os.lseek(fd, 70 << 10, os.SEEK_HOLE) == 128 << 10
            assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
            for off in (128 << 10, 1 << 20, 5 << 20):
                with pytest.raises(OSError) as e:
                    os.lseek(fd, off, os.SEEK_DATA)
                assert e.value.errno == errno.ENXIO
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, 8192)
            os.posix_fallocate(fd, 0, 512)
            with pytest.raises(OSError) as e:
                fallocate(fd, FALLOC_FL_ZERO_RANGE, 0, 4096)
            assert e.value.errno == errno.EOPNOTSUPP
        finally:
            os.close(fd)
        assert os.getxattr(f, "user.calls").decode().split("\n") == [
            f"{FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE},4096,8192", "0,0,512"]


def test_without_the_methods_the_kernel_falls_back(tmp_path: Path) -> None:
    with tinyfs(tmp_path / "mnt", "plain") as f:
        fd = os.open(f, os.O_RDWR)
        try:
            # Generic lseek: everything is data, the hole is at the end.
            assert os.lseek(fd, 0, os.SEEK_DATA) == 0
            assert os.lseek(fd, 0, os.SEEK_HOLE) == 1 << 20
            for _ in range(2):  # the second call is answered by the kernel alone
                with pytest.raises(OSError) as e:
                    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096)
                assert e.value.errno == errno.EOPNOTSUPP
        finally:
            os.close(fd)


def test_share_session_lets_processes_serve_one_mount(tmp_path: Path) -> None:
    """share_session(), then fork: every process answers requests of the one
    mount (user.pid says which answered), and an unmount ends them all."""
    import concurrent.futures

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with fuse_server([sys.executable, str(ROOT / "tests" / "tinyfs.py"), str(mnt), "shared", "3"], mnt) as proc:
        assert proc.stdout is not None
        others = [int(pid) for pid in proc.stdout.readline().split()]
        assert len(others) == 2

        def ask(_: int) -> int:
            return int(os.getxattr(mnt / "f", "user.pid"))

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answered = set(pool.map(ask, range(3000)))
        assert answered == {proc.pid, *others}
        fd = os.open(mnt / "f", os.O_RDONLY | os.O_DIRECT)
        try:
            assert os.pread(fd, 128 << 10, 0) == bytes(64 << 10) + b"\x5a" * (64 << 10)
        finally:
            os.close(fd)
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
        assert proc.wait(30) == 0  # (it waits for the others first)
        for pid in others:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
