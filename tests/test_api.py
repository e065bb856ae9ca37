"""The public API: every name in __all__ resolves, and importing edgeskin stays light."""

import subprocess
import sys

import edgeskin


def test_every_public_name_resolves():
    for name in edgeskin.__all__:
        assert getattr(edgeskin, name) is not None, name
    assert callable(edgeskin.preprocess_image) and callable(edgeskin.evaluate_model)


def test_import_is_light():
    code = ("import sys, edgeskin, edgeskin.preprocess, edgeskin.data, edgeskin.metrics, edgeskin.cli\n"
            "heavy = [m for m in ('torch', 'torchvision', 'onnx', 'onnxruntime') if m in sys.modules]\n"
            "assert not heavy, heavy")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
