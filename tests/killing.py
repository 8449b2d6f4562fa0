"""Kill a qcowfs command exactly as it is about to make its Nth write.

A kill after a delay depends on the machine's speed: on a fast one the
command ends first and nothing is tested (CI saw test_kill_rebase finish
inside 0.2 s). strace's fault injection (`inject=...:signal=SIGKILL:when=N`)
kills the process at its Nth write syscall instead, whatever the speed, so
every round tests a crash, and the rounds can be spread over the whole run.

qcowfs writes an image only through pwrite64 and pwritev (host/hostfile.py),
so those are the calls counted and interrupted.
"""
from __future__ import annotations

import random
import subprocess
from pathlib import Path

from conftest import QCOWFS

WRITES = "pwrite64,pwritev"


def syscalls(args: list[object], names: str, cwd: Path | None = None) -> dict[str, int]:
    """Run `qcowfs ARGS` under strace -c: how many calls of each of NAMES it made.
    The command must succeed."""
    p = subprocess.run(["strace", "-f", "-c", "-e", f"trace={names}", QCOWFS, *map(str, args)], cwd=cwd,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    counts = {}
    for line in p.stderr.splitlines():
        parts = line.split()
        if parts and parts[-1] in names.split(","):
            counts[parts[-1]] = int(parts[3])
    return counts


def writes(args: list[object], cwd: Path | None = None) -> int:
    """Run `qcowfs ARGS` to the end: how many writes it made."""
    return sum(syscalls(args, WRITES, cwd).values())


def points(total: int, rounds: int) -> list[int]:
    """ROUNDS-or-so write numbers spread over 1..TOTAL from a random phase,
    always with the first and the last write."""
    step = max(1, total // max(1, rounds - 2))
    phase = random.randrange(step)
    return sorted({1, total} | set(range(1 + phase, total, step)))


def killed_at(args: list[object], n: int, cwd: Path | None = None) -> None:
    """Run `qcowfs ARGS`, killed with SIGKILL as it is about to make write N."""
    p = subprocess.run(["strace", "-f", "-o", "/dev/null", "-e", f"trace={WRITES}",
                        "-e", f"inject={WRITES}:signal=SIGKILL:when={n}", QCOWFS, *map(str, args)], cwd=cwd,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode != 0, f"not killed at write {n}: {p.stderr}"
