"""Inference engines behind the runtime, one class each, imported lazily."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ..errors import ConfigError, require


class Backend(Protocol):
    name: str
    version: str

    def run(self, x: np.ndarray) -> np.ndarray: ...


class OnnxRuntimeBackend:
    """ONNX Runtime on the CPU (or another provider the installed build offers)."""

    name = "onnxruntime"

    def __init__(self, model: bytes, *, threads: int | None = None, providers: list[str] | None = None,
                 input_name: str = "input") -> None:
        ort = require("onnxruntime", extra="runtime", purpose="running an ONNX bundle")
        self.version = ort.__version__
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.threads = threads
        self.session = ort.InferenceSession(model, opts, providers=providers or ["CPUExecutionProvider"])
        self.input_name = input_name

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]


def make_backend(engine: str, model: bytes, *, threads: int | None, input_name: str) -> Backend:
    if engine in ("onnxruntime", "ort", "onnx"):
        return OnnxRuntimeBackend(model, threads=threads, input_name=input_name)
    raise ConfigError(f"this runtime has no backend for engine {engine!r}",
                      "install the edgeskin release that supports it, or compile for another target")
