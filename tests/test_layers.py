"""The package's layering holds: each module imports only its own layer and
those below it, no module-level import cycles, and the layers above the
public API reach the engine only through it (docs/design.md, "Layout of the code")."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "qcowfs"

# Bottom up. A module may import its own layer and lower ones.
LAYERS = [("qcowfs.errors",), ("qcowfs.format",), ("qcowfs.host",), ("qcowfs.engine",),
          ("qcowfs.records",), ("qcowfs.aio",), ("qcowfs.api", "qcowfs"),
          ("qcowfs.fs",), ("qcowfs.service",), ("qcowfs.cli",)]
# What the layers above the API may still take from the engine: constants
# and pure helpers, no engine object.
ENGINE_NAMES_ABOVE_API = {("qcowfs.engine", "DEFAULT_L2_CACHE_BYTES"), ("qcowfs.engine.snapshots", "usable_name"),
                          ("qcowfs.engine.extents", "map_text")}


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(name: str) -> int:
    best = -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and (p != "qcowfs" or name == "qcowfs"):
                best = i
    assert best >= 0, name
    return best


def imports(path: Path, toplevel_only: bool) -> list[tuple[str, list[str]]]:
    """(module imported, names) for each qcowfs import of PATH."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    nodes = tree.body if toplevel_only else list(ast.walk(tree))
    out = []
    for node in nodes:
        if isinstance(node, ast.If) and toplevel_only:  # `if TYPE_CHECKING:` is not an import
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "qcowfs" or target.startswith("qcowfs."):
                names = [a.name for a in node.names]
                # `from . import x` imports modules when x is one
                for n in names:
                    sub = f"{target}.{n}"
                    if (PKG.parent / (sub.replace(".", "/") + ".py")).exists() or \
                            (PKG.parent / sub.replace(".", "/")).is_dir():
                        out.append((sub, []))
                    else:
                        out.append((target, [n]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("qcowfs")]
    return out


def modules() -> list[Path]:
    return sorted(PKG.rglob("*.py"))


def test_every_module_imports_only_its_layer_and_below():
    wrong = []
    for path in modules():
        me = module_name(path)
        for target, _names in imports(path, toplevel_only=False):
            if layer(target) > layer(me):
                wrong.append(f"{me} imports {target}")
    assert not wrong, wrong


def test_above_the_api_only_the_api():
    """fs, service and cli are clients of qcowfs.aio / qcowfs.api, not of the engine."""
    api = layer("qcowfs.api")
    wrong = []
    for path in modules():
        me = module_name(path)
        if layer(me) <= api:
            continue
        for target, names in imports(path, toplevel_only=False):
            if layer(target) == layer("qcowfs.engine"):
                if not names or any((target, n) not in ENGINE_NAMES_ABOVE_API for n in names):
                    wrong.append(f"{me} imports {target} {names}")
    assert not wrong, wrong


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    for path in modules():
        me = module_name(path)
        graph[me] = {t for t, _ in imports(path, toplevel_only=True) if t != me}
    seen: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state = seen.get(node, 0)
        if state == 1:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if state == 2:
            return
        seen[node] = 1
        for nxt in sorted(graph.get(node, ())):
            # a package's __init__ importing its own submodules is not a cycle
            if nxt.startswith(node + "."):
                continue
            visit(nxt, stack + [node])
        seen[node] = 2
    for m in sorted(graph):
        visit(m, [])
    assert not cycles, cycles


def test_engine_needs_no_fuse():
    """Nothing below the FUSE layer imports pyfuse3 (the library works without it)."""
    users = [module_name(p) for p in modules() if "pyfuse3" in p.read_text()
             and any(isinstance(n, (ast.Import, ast.ImportFrom)) and "pyfuse3" in ast.dump(n)
                     for n in ast.walk(ast.parse(p.read_text())))]
    assert all(layer(m) >= layer("qcowfs.fs") for m in users), users


def _imports_trio(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        if any(m == "trio" or m.startswith("trio.") for m in mods):
            return True
    return False


def test_below_the_mount_only_host_waiting_names_trio() -> None:
    """Commands and qcowfs.open drive the engine without a loop and load no
    trio (host/waiting.py; test_startup runs them): so below the mount's
    layers (fs, service) every wait goes through host/waiting.py, the one
    module there that imports trio, and only under a loop."""
    below = [p for p in sorted(PKG.rglob("*.py")) if layer(module_name(p)) < layer("qcowfs.fs")]
    named = [module_name(p) for p in below if _imports_trio(p)]
    assert named == ["qcowfs.host.waiting"], f"modules below the mount that import trio: {named}"
