"""Encrypted test images, and the QEMU tools run with their secret.

qemu-img / qemu-io / qemu-nbd open an encrypted image only with a secret
object and `--image-opts driver=qcow2,file.filename=...,encrypt.key-secret=`;
these helpers build those command lines. QEMU is the oracle only.
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Callable

KiB, MiB = 1 << 10, 1 << 20
SECRET = "qcowfs-test-passphrase"
OTHER_SECRET = "qcowfs-other-passphrase"   # a backing file's own key
TIMEOUT = 300


def run(*args: object, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)


def must(*args: object) -> str:
    p = run(*args)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} exited {p.returncode}:\n{p.stdout}{p.stderr}")
    return p.stdout


def secret_object(secret: str = SECRET, ident: str = "sec0") -> list[str]:
    return ["--object", f"secret,id={ident},data={secret}"]


def image_opts(image: Path, ident: str = "sec0") -> str:
    return f"driver=qcow2,file.filename={str(image).replace(',', ',,')},encrypt.key-secret={ident}"


def passphrase(secret: str = SECRET) -> Callable[[], bytes]:
    """The passphrase as a function (the library's callable form)."""
    return lambda: secret.encode()


def create(path: Path, size: int, *, fmt: str = "luks", cipher_alg: str = "aes-256",
           cipher_mode: str = "xts", ivgen_alg: str = "plain64", hash_alg: str = "sha256",
           secret: str = SECRET, **opts: object) -> Path:
    """`qemu-img create` of an encrypted qcow2 (fast PBKDF2: iter-time 10 ms)."""
    o: dict[str, object] = {"encrypt.format": fmt, "encrypt.key-secret": "sec0"}
    if fmt == "luks":
        o.update({"encrypt.cipher-alg": cipher_alg, "encrypt.cipher-mode": cipher_mode,
                  "encrypt.ivgen-alg": ivgen_alg, "encrypt.hash-alg": hash_alg, "encrypt.iter-time": 10})
    o.update(opts)
    create_encrypted("qemu-img", "create", "-q", "-f", "qcow2", *secret_object(secret),
                     "-o", ",".join(f"{k}={v}" for k, v in o.items()), path, size)
    return path


def create_encrypted(*args: object) -> str:
    """Run ARGS, a `qemu-img create` (or convert, or amend of a key slot) of an
    encrypted image. qemu-img times PBKDF2 with the thread's CPU time, which the kernel samples per tick:
    on a busy machine a run can measure 0 ms and qemu-img gives up with "Unable
    to get accurate CPU usage". That is qemu-img's flake, not a property of the
    image, so try again, a little later each time (20 tries in a row failed
    once, with a model soak and the suite sharing the 2 cores). Returns what it printed."""
    for attempt in range(40):
        p = run(*args)
        if p.returncode == 0:
            return p.stdout
        if "accurate CPU usage" not in p.stderr:
            break
        time.sleep(0.02 * attempt)
    raise RuntimeError(f"{' '.join(map(str, args))} exited {p.returncode}: {p.stderr}")


def qemu_io(image: Path, *cmds: str, secret: str = SECRET) -> None:
    args: list[object] = ["qemu-io", *secret_object(secret), "--image-opts"]
    for c in cmds:
        args += ["-c", c]
    p = run(*args, image_opts(image))
    if p.returncode != 0 or "failed" in p.stdout or "error" in p.stdout.lower():
        raise RuntimeError(f"qemu-io {list(cmds)} on {image}: {p.stdout}{p.stderr}")


def to_raw(image: Path, dest: Path, snapshot_id: str | None = None, secret: str = SECRET) -> Path:
    args: list[object] = ["qemu-img", "convert", *secret_object(secret), "--image-opts"]
    if snapshot_id is not None:
        args += ["-l", f"snapshot.id={snapshot_id}"]
    must(*args, image_opts(image), "-O", "raw", dest)
    return dest


def compare(image: Path, raw: Path, secret: str = SECRET) -> subprocess.CompletedProcess[str]:
    """`qemu-img compare` of the decrypted image with a raw file."""
    return run("qemu-img", "compare", *secret_object(secret), "--image-opts", image_opts(image),
               f"driver=raw,file.filename={str(raw).replace(',', ',,')}")


def check(image: Path, secret: str = SECRET) -> subprocess.CompletedProcess[str]:
    return run("qemu-img", "check", *secret_object(secret), "--image-opts", image_opts(image))
