"""What a mount loads at start-up: only what its image needs (issue 13's
time to first file). The daemon's memory map tells which libraries it loaded."""
from __future__ import annotations

from pathlib import Path

import luks
from conftest import daemon_pid, mounted, qemu_img

MiB = 1 << 20


def _libraries(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_a_plain_image_mounts_without_the_cipher_library(tmp_path: Path) -> None:
    """cryptography (some 50 ms of imports) is loaded for an encrypted image only."""
    plain = tmp_path / "plain.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", plain, "16M")
    enc = luks.create(tmp_path / "enc.qcow2", 16 * MiB)
    key = tmp_path / "key"
    key.write_text(luks.SECRET)
    with mounted(plain, tmp_path / "m1") as mnt:
        pid = daemon_pid(mnt)
        assert "cryptography" not in _libraries(pid)
    with mounted(enc, tmp_path / "m2", "-o", f"key_file={key}") as mnt:
        assert "cryptography" in _libraries(daemon_pid(mnt)), "the check cannot see the library"
