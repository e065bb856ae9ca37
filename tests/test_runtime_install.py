"""`pip install edgeskin[runtime]` in a fresh virtual environment brings no torch, and the
runtime predicts from a bundle there. Slow (it builds a wheel and installs from the registry)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


@pytest.mark.slow
def test_runtime_extra_installs_without_torch(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    r = subprocess.run([str(py), "-m", "pip", "install", "--quiet", f"{REPO}[runtime]"],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    freeze = subprocess.run([str(py), "-m", "pip", "freeze"], capture_output=True, text=True, env=env).stdout.lower()
    for heavy in ("torch", "torchvision", "onnx==", "nncf", "tensorflow"):
        assert heavy not in freeze, f"{heavy} was installed by edgeskin[runtime]:\n{freeze}"
    assert "onnxruntime" in freeze
    code = ("import edgeskin.runtime, sys\n"
            "assert 'torch' not in sys.modules\n"
            "import importlib.util as u\n"
            "assert u.find_spec('torch') is None\n"
            "print('ok')")
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    size_mb = _du(venv) / 1e6
    print(f"\nedgeskin[runtime] venv size: {size_mb:.0f} MB")
    assert size_mb < 400, f"runtime venv is {size_mb:.0f} MB"
