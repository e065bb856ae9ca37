"""Target ``jetson`` (aliases ``trt``, ``tensorrt``): NVIDIA Jetson through TensorRT.

The bundle carries an ONNX graph TensorRT builds an engine from on the device itself (engines
are tied to the GPU and TensorRT version that built them): for int8, the NNCF calibration of
the cpu target rewritten to TensorRT's explicit-quantization form (signed INT8 Q/DQ, zero
point 0, per-channel weights on axis 0, float bias, nothing between a Conv and its ReLU); for
fp16, the FP32 graph plus the FP16 build flag. The graph is exported at the device profile's
opset and validated (onnx.checker, polygraphy lint, every TensorRT rule) before it ships.
On a machine without TensorRT the runtime runs the same graph through ONNX Runtime as a host
proxy, so accuracy is measured here; ``edgeskin engine build`` makes the engine on the device.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..quantize.tensorrt import to_fp16_tensors, to_tensorrt_int8, validate_tensorrt_onnx
from ..runtime.tensorrt import precision_flags, strongly_typed
from .base import CompileError
from .cpu import OnnxTarget, toolchain_versions
from .registry import register

#: dynamic-batch optimisation profile written into every jetson bundle
BATCH = {"min": 1, "opt": 1, "max": 8}


def trtexec_command(*, model_file: str, engine_file: str, precision: str, input_name: str, size: int,
                    layout: str, workspace_mb: int, dla_core: int | None = None,
                    timing_cache: str = "timing.cache", tensorrt: str | None = None) -> str:
    """The ``trtexec`` line that builds the same engine as ``edgeskin engine build`` with
    TensorRT ``tensorrt``: precision flags before 10.12, ``--stronglyTyped`` from 10.12 (weak
    typing deprecated) and in 11.x (precision flags removed); static shapes on the DLA."""

    def shape(b: int) -> str:
        dims = (b, 3, size, size) if layout == "NCHW" else (b, size, size, 3)
        return f"{input_name}:{'x'.join(map(str, dims))}"

    parts = ["trtexec", f"--onnx={model_file}", f"--saveEngine={engine_file}"]
    if tensorrt is not None and strongly_typed(tensorrt):
        parts.append("--stronglyTyped")
    else:
        parts += precision_flags_cli(precision, tensorrt=tensorrt)
    lo, opt, hi = BATCH["min"], BATCH["opt"], BATCH["max"]
    if dla_core is not None:  # the DLA takes static shapes only
        lo = hi = opt
    parts += [f"--minShapes={shape(lo)}", f"--optShapes={shape(opt)}", f"--maxShapes={shape(hi)}"]
    parts.append(f"--memPoolSize=workspace:{workspace_mb}M")
    if dla_core is not None:
        parts += [f"--useDLACore={dla_core}", "--allowGPUFallback"]
    parts.append(f"--timingCacheFile={timing_cache}")
    return " ".join(parts)


def precision_flags_cli(precision: str, *, tensorrt: str | None = None) -> list[str]:
    return [f"--{f.lower()}" for f in precision_flags(precision, tensorrt=tensorrt)]


class JetsonTarget(OnnxTarget):
    name = "jetson"
    aliases = ("trt", "tensorrt")
    precisions = ("int8", "fp16", "fp32")
    needs_calibration = ("int8",)
    extras = ("compress", "jetson")
    engine = "tensorrt"
    description = ("NVIDIA Jetson via TensorRT: QDQ ONNX in TensorRT's explicit-INT8 form (or FP16), "
                   "engine built on the device; ONNX Runtime host proxy here")
    default_device = "jetson-orin-nano"

    def resolve_opset(self, opset: int | None, device: Any) -> int:
        profile, jp = device
        if jp.typing == "strong" and opset is not None and opset < 19:
            raise ConfigError(f"JetPack {jp.version} (TensorRT {jp.tensorrt}) builds strongly typed networks, whose "
                              "FP16 graphs need FP16 Q/DQ scales: opset 19 or higher",
                              f"pass --opset 19 to {jp.max_opset}, or leave --opset out")
        if opset is None:
            return jp.max_opset
        if opset > jp.max_opset:
            raise ConfigError(f"opset {opset} is above what TensorRT {jp.tensorrt} (JetPack {jp.version}) on "
                              f"{profile.name} parses ({jp.max_opset})",
                              f"pass --opset {jp.max_opset} or lower, or another --jetpack")
        if opset < 13:
            raise ConfigError(f"opset {opset} cannot express per-channel INT8 quantization", "use --opset 13 or higher")
        return int(opset)

    def engine_record(self, precision: str, opset: int, device: Any, input_spec: Any) -> dict[str, Any]:
        profile, jp = device
        float_tensors = jp.float_tensors if precision != "fp32" else "float32"
        return {
            "name": "tensorrt", "format": "onnx-qdq" if precision == "int8" else "onnx", "opset": opset,
            "precision_flags": precision_flags(precision, tensorrt=jp.tensorrt),
            # strong typing (TensorRT 10.12+): no precision flags, the graph's tensors carry FP16
            "typing": jp.typing, "float_tensors": float_tensors,
            "device": profile.name, "jetpack": jp.version, "tensorrt": jp.tensorrt, "cuda": jp.cuda,
            "python": jp.python, "cuda_python": jp.cuda_python,
            "dla_cores": profile.dla_cores if jp.dla else 0, "dla": bool(jp.dla and profile.dla_cores),
            "workspace_mb": profile.workspace_mb, "batch": dict(BATCH),
            "host_proxy": {"engine": "onnxruntime",
                           "note": "without TensorRT the runtime runs this graph in ONNX Runtime: "
                                   "numerically close to TensorRT INT8, not its speed"
                                   + ("; fp16 runs as FP32 there" if precision == "fp16" else "")},
            "engines": [],
            "trtexec": trtexec_command(model_file="model.onnx", engine_file="model.plan", precision=precision,
                                       input_name=input_spec.name, size=input_spec.size, layout=input_spec.layout,
                                       workspace_mb=profile.workspace_mb, tensorrt=jp.tensorrt),
        }

    def finish(self, proto: Any, precision: str, record: dict[str, Any], device: Any) -> tuple[Any, dict | None]:
        profile, jp = device
        if precision == "int8":
            proto, conv = to_tensorrt_int8(proto)
            record["tensorrt_form"] = conv
        half = None
        if precision != "fp32" and jp.float_tensors == "float16":
            # strongly typed builds run float layers in the graph's own precision: store FP16
            proto, half = to_fp16_tensors(proto)
            record["float_tensors"] = half
        report = validate_tensorrt_onnx(proto, max_opset=jp.max_opset, lint=True)
        if not report.passed:
            bad = "; ".join(f"{r.rule}: {r.detail}" + (f" ({', '.join(r.nodes[:5])})" if r.nodes else "")
                            for r in report.failures())
            raise CompileError(f"the jetson/{precision} graph is not one TensorRT {jp.tensorrt} takes: {bad}",
                               "no bundle was written; report this model (the conversion should have fixed it)")
        return proto, {"tensorrt_form": report.to_dict(), **({"float_tensors": half} if half else {})}

    def golden_tolerance(self, precision: str) -> float:
        # the golden outputs come from the host proxy; TensorRT's kernels round differently
        return {"int8": 5e-2, "fp16": 2e-2, "fp32": 1e-3}[precision]

    def toolchain(self) -> dict[str, str]:
        return toolchain_versions("torch", "onnx", "onnxruntime", "nncf", "polygraphy", "numpy")


register(JetsonTarget())
