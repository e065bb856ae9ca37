"""Keras members: ``.keras`` and legacy ``.h5`` files, loaded through Keras 3 on the torch backend
(no TensorFlow) and converted once, at import, to ONNX with Keras' own exporter. The member then
runs in ONNX Runtime like any ONNX member (no Keras needed afterwards); the import records how far
the ONNX graph is from Keras' own ``predict`` on the check images."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, ConfigError, require


def _keras() -> Any:
    backend = os.environ.get("KERAS_BACKEND")
    if backend not in (None, "torch"):
        raise ConfigError(f"KERAS_BACKEND is {backend!r}; edgeskin loads Keras models on the torch backend",
                          "unset KERAS_BACKEND or set it to torch")
    os.environ["KERAS_BACKEND"] = "torch"
    keras = require("keras", extra="keras", purpose="importing a Keras model")
    if keras.backend.backend() != "torch":
        raise ConfigError(f"Keras was already loaded with the {keras.backend.backend()!r} backend",
                          "run the import in a fresh process with KERAS_BACKEND=torch")
    return keras


def load_keras(path: Path) -> Any:
    keras = _keras()
    try:
        return keras.models.load_model(str(path), compile=False)
    except Exception as exc:  # noqa: BLE001 - zip, HDF5 and deserialisation errors all land here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: Keras cannot load the model ({first})",
                              "pass an intact .keras or .h5 file saved by model.save(); custom layers "
                              "must be importable") from None


def input_shape(model: Any) -> list[int | None]:
    shape = list(model.inputs[0].shape) if getattr(model, "inputs", None) else list(model.input_shape)
    return [None if d is None else int(d) for d in shape]


def export_onnx(model: Any, out: Path, size: int) -> None:
    """Keras' own ONNX export (``model.export(format="onnx")``; through torch.onnx on this backend).
    A freshly loaded model is called once first: Keras exports only models that have run."""
    model.predict(np.zeros((1, size, size, 3), np.float32), verbose=0)
    try:
        model.export(str(out), format="onnx", verbose=False)
    except TypeError:
        model.export(str(out), format="onnx")
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"Keras could not export the model to ONNX ({type(exc).__name__}: {exc})",
                              "export it to ONNX yourself (tf2onnx or model.export) and import the .onnx") from None


def predict(model: Any, x: np.ndarray) -> np.ndarray:
    return np.asarray(model.predict(x, verbose=0, batch_size=16), dtype=np.float64)
