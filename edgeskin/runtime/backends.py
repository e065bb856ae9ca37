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


def _litert_interpreter():  # noqa: ANN202
    """ai-edge-litert's interpreter, or tflite-runtime's when only that is installed."""
    try:
        from ai_edge_litert.interpreter import Interpreter
        import ai_edge_litert

        return Interpreter, "ai-edge-litert", getattr(ai_edge_litert, "__version__", "?")
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter  # type: ignore[import-not-found]
        import tflite_runtime  # type: ignore[import-not-found]

        return Interpreter, "tflite-runtime", getattr(tflite_runtime, "__version__", "?")
    except ImportError:
        require("ai_edge_litert", extra="tflite", purpose="running a LiteRT (.tflite) bundle")
        raise


def quant_params(detail: dict) -> tuple[float, int] | None:
    """(scale, zero_point) of a per-tensor quantized input/output, None for a float tensor. An
    integer tensor without quantization parameters holds plain integers, (1.0, 0): a phone
    bundle's uint8 input takes pixels 0-255 as they are."""
    if np.dtype(detail["dtype"]).kind == "f":
        return None
    scale, zero_point = detail.get("quantization", (0.0, 0))
    if not scale:
        qp = detail.get("quantization_parameters", {})
        scales, zps = qp.get("scales", []), qp.get("zero_points", [])
        if len(scales) == 0:
            return 1.0, 0
        if len(scales) != 1:
            raise ConfigError(f"tensor {detail.get('name')} is integer but not per-tensor quantized",
                              "re-compile the bundle")
        scale, zero_point = float(scales[0]), int(zps[0])
    return float(scale), int(zero_point)


class LiteRTBackend:
    """LiteRT (TFLite) interpreter with XNNPACK on the CPU. Integer inputs are quantized and
    integer outputs dequantized here, from the model's own parameters, so ``run`` takes and
    returns float32 like every backend. The model is converted at batch 1: a batch runs image
    by image."""

    name = "litert"
    handles_quantization = True

    def __init__(self, model: bytes, *, threads: int | None = None) -> None:
        from ..quiet import third_party_output

        Interpreter, self.package, self.version = _litert_interpreter()
        self.threads = threads
        with third_party_output(native=True):  # the delegate's INFO notice (C++, on stderr)
            self.interpreter = Interpreter(model_content=model, num_threads=threads or None)
            self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.input_quant = quant_params(self.input)
        self.output_quant = quant_params(self.output)

    def _quantize(self, x: np.ndarray) -> np.ndarray:
        if self.input_quant is None:
            return x.astype(self.input["dtype"], copy=False)
        scale, zp = self.input_quant
        info = np.iinfo(self.input["dtype"])
        return np.clip(np.round(x / scale) + zp, info.min, info.max).astype(self.input["dtype"])

    def _dequantize(self, y: np.ndarray) -> np.ndarray:
        if self.output_quant is None:
            return y.astype(np.float32, copy=False)
        scale, zp = self.output_quant
        return ((y.astype(np.float32) - zp) * scale).astype(np.float32)

    def run(self, x: np.ndarray) -> np.ndarray:
        outs = []
        for i in range(len(x)):
            self.interpreter.set_tensor(self.input["index"], self._quantize(x[i : i + 1]))
            self.interpreter.invoke()
            outs.append(self._dequantize(self.interpreter.get_tensor(self.output["index"])).copy())
        return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def make_backend(engine: str, model: bytes, *, threads: int | None, input_name: str) -> Backend:
    if engine in ("onnxruntime", "ort", "onnx"):
        return OnnxRuntimeBackend(model, threads=threads, input_name=input_name)
    if engine in ("litert", "tflite"):
        return LiteRTBackend(model, threads=threads)
    raise ConfigError(f"this runtime has no backend for engine {engine!r}",
                      "install the edgeskin release that supports it, or compile for another target")
