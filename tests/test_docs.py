"""Every example of docs/python.md runs, in order, on an image qemu-img made,
and what it leaves is judged by qemu-img (check clean, the written bytes there)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGE = REPO / "docs" / "python.md"


def examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)


def make_image(directory: Path) -> Path:
    """The image the page's examples expect: 64 MiB, data, snapshot monday, bitmap daily."""
    img = directory / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "64M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x11 1M 2M", "-c", "write -P 0x22 20M 64k", img],
                   check=True, capture_output=True)
    subprocess.run(["qemu-img", "snapshot", "-c", "monday", img], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", img, "daily"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x33 30M 64k", img], check=True, capture_output=True)
    return img


def test_the_page_has_examples():
    assert len(examples()) >= 6


def test_examples_run_in_order(tmp_path: Path):
    """Each example runs in a fresh interpreter (as a reader would paste it),
    in the same directory, one after the other."""
    img = make_image(tmp_path)
    for i, code in enumerate(examples()):
        p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                           timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
        assert p.returncode == 0, f"example {i + 1} failed:\n{code}\n{p.stderr}"
    check = subprocess.run(["qemu-img", "check", img], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    snaps = subprocess.run(["qemu-img", "snapshot", "-l", img], capture_output=True, text=True).stdout
    assert "after-hello" in snaps and "tuesday" in snaps
    raw = tmp_path / "check.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", img, raw], check=True)
    with open(raw, "rb") as f:
        f.seek(8 << 20)
        assert f.read(12) == b"!ello, qcow2"
    # The sparse copy of the second example is the disk as it was then.
    assert (tmp_path / "disk.raw").stat().st_size == 64 << 20


@pytest.mark.parametrize("module", ["qcowfs", "qcowfs.aio", "qcowfs.api"])
def test_public_names_have_docstrings(module: str):
    """The API reference is made from docstrings: every public name has one."""
    import importlib

    mod = importlib.import_module(module)
    names = getattr(mod, "__all__", [n for n in dir(mod) if not n.startswith("_")])
    missing = []
    for name in names:
        obj = getattr(mod, name)
        if callable(obj) and not (obj.__doc__ or "").strip():
            missing.append(name)
        for attr, member in vars(obj).items() if isinstance(obj, type) else []:
            if not attr.startswith("_") and callable(member) and not (member.__doc__ or "").strip():
                missing.append(f"{name}.{attr}")
    assert not missing, missing


def test_api_reference_builds(tmp_path: Path):
    """`make docs`' command: pdoc writes a page per module, the public names in it."""
    makefile = (REPO / "Makefile").read_text().replace("\\\n", " ")
    modules = re.search(r"^DOC_MODULES := (.*)$", makefile, re.M).group(1).split()  # type: ignore[union-attr]
    p = subprocess.run([sys.executable, "-m", "pdoc", "--docformat", "markdown", "-o", tmp_path, *modules],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stderr
    aio = (tmp_path / "qcowfs" / "aio.html").read_text()
    assert "dirty_extents" in aio and "create_snapshot" in aio
    assert (tmp_path / "qcowfs" / "engine" / "refcount" / "transaction.html").exists()
