"""The package's type hints hold: mypy over qcowfs/ finds nothing."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_is_clean(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache")],
                       cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr


def test_no_import_cycles() -> None:
    """The layers of DESIGN.md: no module imports (even for typing) one that
    imports it back."""
    import ast

    pkg = Path(__file__).resolve().parent.parent / "qcowfs"
    deps: dict[str, set[str]] = {}
    for f in pkg.glob("*.py"):
        deps[f.stem] = set()
        for n in ast.walk(ast.parse(f.read_text())):
            if isinstance(n, ast.ImportFrom) and n.level == 1:
                deps[f.stem] |= {n.module.split(".")[0]} if n.module else {a.name for a in n.names}
    cycles = []

    def visit(mod: str, path: list[str]) -> None:
        for d in sorted(deps.get(mod, ())):
            if d in path:
                cycles.append(path[path.index(d):] + [d])
            else:
                visit(d, path + [d])

    for m in sorted(deps):
        visit(m, [m])
    assert not cycles, f"import cycles: {cycles[:5]}"
