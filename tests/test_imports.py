"""No two edgeskin modules import each other (a cycle hides which one is the lower layer)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "edgeskin"


def _module(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The edgeskin modules ``path`` imports, anywhere in it (lazy imports included)."""
    mod = _module(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names]
            out |= {n for n in [target, *names] if n.startswith("edgeskin")}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("edgeskin")}
    return out


def test_no_two_modules_import_each_other():
    files = {_module(p): p for p in PKG.rglob("*.py")}
    graph = {m: {t for t in _imports(p) if t in files and t != m} for m, p in files.items()}
    packages = {m for m, p in files.items() if p.name == "__init__.py"}
    pairs = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps
                    if a in graph.get(b, set()) and a not in packages and b not in packages})
    assert not pairs, f"modules that import each other: {pairs}"
