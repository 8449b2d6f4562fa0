"""Human-readable output shared by `qcowfs info` and the snapshot commands.

No qcow2 code is imported here, so a command that only prints what a
daemon answered starts fast."""
from __future__ import annotations

import time
from typing import Any


def human_size(n: int) -> str:
    """N bytes as qemu-img prints sizes (1 KiB = 1024 B, three digits)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def render_snapshots(snaps: list[dict[str, Any]]) -> list[str]:
    """The "Snapshot list:" table of qemu-img info and qemu-img snapshot -l."""
    lines = ["Snapshot list:", f"{'ID':<8}{'TAG':<24}{'VM SIZE':>10} {'DATE':<20}{'VM CLOCK':>16}"]
    for s in snaps:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["date-sec"]))
        secs = s["vm-clock-sec"]
        clock = f"{secs // 3600:04d}:{secs // 60 % 60:02d}:{secs % 60:02d}.{s['vm-clock-nsec'] // 10**6:03d}"
        lines.append(f"{s['id']:<8}{s['name']:<24}{human_size(s['vm-state-size']):>10} {date:<20}{clock:>16}")
    return lines
