"""Packaging: every third-party module edgeskin imports is declared in pyproject.toml, the extra a
``require(module, extra=...)`` names really holds it, and the wheel ships the typing marker and the
licence. Static (ast + the TOML file), so it takes well under a second and needs nothing installed."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "edgeskin"

#: import name -> distribution name, where they differ beyond "_" vs "-"
DISTRIBUTION = {
    "PIL": "pillow",
    "yaml": "pyyaml",
    "cv2": "opencv-python",
    "sklearn": "scikit-learn",
    "skimage": "scikit-image",
}

#: imported, deliberately not declared: what the device's own system provides, never pip here
NOT_FROM_PIP = {
    "tensorrt": "TensorRT comes with JetPack on the Jetson (python3-libnvinfer); its PyPI wheels cannot be "
                "installed from our index (docs/jetson.md)",
    "cuda": "cuda-python must match the JetPack's CUDA, so its pin is per JetPack release (docs/jetson.md), "
            "not one line of an extra",
    "tflite_runtime": "legacy LiteRT interpreter, tried only when ai-edge-litert is missing (runtime/backends.py); "
                      "it needs numpy<2, so no extra can hold it beside the others",
}

#: the distribution name at the start of a requirement string
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*")


def _dist(module: str) -> str:
    return DISTRIBUTION.get(module, module).lower().replace("_", "-")


def _requirement_name(req: str) -> str:
    m = _NAME.match(req.strip())
    assert m, req
    return m.group(0).lower().replace("_", "-")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _declared() -> dict[str, set[str]]:
    """{"core": {dists}, extra: {dists}, ...} from pyproject.toml."""
    project = _pyproject()["project"]
    out = {"core": {_requirement_name(r) for r in project.get("dependencies", [])}}
    for extra, reqs in project.get("optional-dependencies", {}).items():
        out[extra] = {_requirement_name(r) for r in reqs}
    return out


def _stdlib() -> frozenset[str]:
    names = set(sys.stdlib_module_names) if hasattr(sys, "stdlib_module_names") else set(sys.builtin_module_names)
    return frozenset(names | {"__future__"})


def scan(package: Path) -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """Third-party top-level modules imported anywhere in ``package`` (module level or inside a
    function: both are real dependencies) -> the files importing them; and every
    ``require("module", extra="x")`` call as (module, extra, file)."""
    std = _stdlib()
    imports: dict[str, set[str]] = {}
    requires: list[tuple[str, str, str]] = []
    for path in sorted(package.rglob("*.py")):
        rel = str(path.relative_to(package.parent))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), rel)):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "require"
                  and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                extra = next((k.value.value for k in node.keywords
                              if k.arg == "extra" and isinstance(k.value, ast.Constant)), None)
                if extra:
                    requires.append((node.args[0].value, str(extra), rel))
                names = [node.args[0].value]
            for name in names:
                top = name.split(".")[0]
                if top and top not in std and top != package.name:
                    imports.setdefault(top, set()).add(rel)
    return imports, requires


def undeclared(imports: dict[str, set[str]], declared: dict[str, set[str]]) -> list[str]:
    every = set().union(*declared.values())
    return [f"{m} (imported in {', '.join(sorted(files))}): declare '{_dist(m)}' in pyproject.toml "
            "(the core dependencies or the extra whose feature imports it)"
            for m, files in sorted(imports.items()) if m not in NOT_FROM_PIP and _dist(m) not in every]


def wrong_extra(requires: list[tuple[str, str, str]], declared: dict[str, set[str]]) -> list[str]:
    out = []
    for module, extra, rel in requires:
        top = module.split(".")[0]
        if top in NOT_FROM_PIP:
            continue
        if extra not in declared:
            out.append(f"{rel}: require({module!r}, extra={extra!r}) names an extra pyproject.toml does not have")
        elif _dist(top) not in declared[extra] | declared["core"]:
            out.append(f"{rel}: require({module!r}, extra={extra!r}) tells users to install "
                       f"edgeskin[{extra}], which does not list '{_dist(top)}'")
    return out


def test_every_imported_third_party_module_is_declared():
    imports, _ = scan(PACKAGE)
    assert "numpy" in imports and "torch" in imports  # the scan sees module-level and lazy imports
    problems = undeclared(imports, _declared())
    assert not problems, "\n".join(problems)


def test_every_require_names_an_extra_that_holds_the_module():
    _, requires = scan(PACKAGE)
    assert any(m == "onnxruntime" for m, _, _ in requires)
    problems = wrong_extra(requires, _declared())
    assert not problems, "\n".join(problems)


def test_the_scan_catches_an_undeclared_import(tmp_path):
    pkg = tmp_path / "edgeskin"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "sub" / "m.py").write_text(
        "import os\nfrom . import x\nfrom edgeskin import y\n"
        "def f():\n    import yaml\n    from PIL import Image\n    require('nncf.quantization', extra='runtime')\n")
    imports, requires = scan(pkg)
    assert set(imports) == {"yaml", "PIL", "nncf"}
    declared = {"core": {"pillow"}, "runtime": {"onnxruntime"}, "compress": {"nncf"}}
    problems = undeclared(imports, declared)
    assert len(problems) == 1 and "declare 'pyyaml'" in problems[0] and "edgeskin/sub/m.py" in problems[0]
    assert wrong_extra(requires, declared) == [
        "edgeskin/sub/m.py: require('nncf.quantization', extra='runtime') tells users to install "
        "edgeskin[runtime], which does not list 'nncf'"]


def test_licence_and_typing_marker_are_shipped():
    pyproject = _pyproject()
    project = pyproject["project"]
    assert project["license"] == "Apache-2.0"  # an SPDX string: no setuptools deprecation warning
    for pattern in project.get("license-files", []):
        assert list(ROOT.glob(pattern)), f"license-files lists {pattern!r}, which matches no file"
    requires = pyproject["build-system"]["requires"]
    floor = next((r for r in requires if _requirement_name(r) == "setuptools"), "")
    m = re.search(r">=\s*(\d+)", floor)
    assert m and int(m.group(1)) >= 77, f"build-system.requires {floor!r}: the SPDX license string needs setuptools>=77"
    assert (PACKAGE / "py.typed").is_file()
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["edgeskin"]


@pytest.mark.parametrize("module,dist", [("PIL", "pillow"), ("ai_edge_litert", "ai-edge-litert"),
                                         ("onnx_graphsurgeon", "onnx-graphsurgeon"), ("yaml", "pyyaml")])
def test_import_names_map_to_distributions(module, dist):
    assert _dist(module) == dist
