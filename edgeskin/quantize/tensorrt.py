"""TensorRT's explicit-quantization form of a QDQ ONNX graph: conversion and a validator.

TensorRT builds an INT8 engine from QuantizeLinear/DequantizeLinear pairs when they are
signed INT8 with zero point 0 everywhere, weights quantized per output channel (axis 0), the
bias left in float, and no Q/DQ pair between a convolution and the ReLU that TensorRT fuses
into it. NNCF's output (made for ONNX Runtime's CPU kernels) keeps activations after a ReLU
as UINT8; :func:`to_tensorrt_int8` rewrites each such quantizer to the signed form with the
same real range, and :func:`validate_tensorrt_onnx` checks every rule, naming the nodes that
break one. onnx + numpy only (no torch, no TensorRT).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EdgeskinError, require

Q, DQ = "QuantizeLinear", "DequantizeLinear"


class TensorRTFormError(EdgeskinError):
    """A graph TensorRT's explicit quantization would reject or misread."""


# ---------------------------------------------------------------- conversion

def to_tensorrt_int8(model: Any) -> tuple[Any, dict[str, Any]]:
    """Return a copy of the QDQ ``model`` in TensorRT's form and a record of the changes.

    Each UINT8 quantizer (zero point z, scale s, real range [-z*s, (255-z)*s]) becomes a
    signed INT8 quantizer with zero point 0 and scale max(|lo|, |hi|) / 127: the same range,
    symmetric (for z = 0 the scale grows by 255/127, one bit of resolution less on
    post-ReLU activations, which is what TensorRT's own INT8 does). Signed quantizers with a
    non-zero zero point are widened to symmetric the same way. Weights (constant INT8 +
    per-channel DequantizeLinear) are kept as they are.
    """
    onnx = require("onnx", extra="compress", purpose="converting a QDQ graph for TensorRT")
    from onnx import numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    done: set[tuple[str, str]] = set()
    converted, added_zp = 0, 0
    for node in g.node:
        if node.op_type not in (Q, DQ):
            continue
        if len(node.input) < 3 or not node.input[2]:
            if node.op_type == Q:  # no zero point: ONNX means UINT8 with zero point 0
                scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
                name = f"{node.input[1]}_trt_zero_point"
                if name not in inits:
                    t = numpy_helper.from_array(np.zeros(scale.shape, np.int8), name)
                    g.initializer.append(t)
                    inits[name] = t
                    new_scale = numpy_helper.from_array((scale * 255.0 / 127.0).astype(np.float32), node.input[1])
                    inits[node.input[1]].CopyFrom(new_scale)
                    added_zp += 1
                while len(node.input) < 3:
                    node.input.append("")
                node.input[2] = name
            continue
        key = (node.input[1], node.input[2])
        if key in done or node.input[2] not in inits or node.input[1] not in inits:
            continue
        zp_t = inits[node.input[2]]
        zp = numpy_helper.to_array(zp_t)
        if zp.dtype == np.int8 and not zp.any():
            done.add(key)
            continue
        if zp.dtype == np.uint8:
            qmin, qmax = 0.0, 255.0
        elif zp.dtype == np.int8:
            qmin, qmax = -128.0, 127.0
        else:
            raise TensorRTFormError(f"{node.name}: zero point of type {zp.dtype} cannot be made INT8",
                                    "quantize to 8 bits")
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        z = zp.astype(np.float64)
        lo, hi = (qmin - z) * scale, (qmax - z) * scale
        new_scale = np.maximum(np.abs(lo), np.abs(hi)) / 127.0
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(new_scale.astype(np.float32), node.input[1]))
        zp_t.CopyFrom(numpy_helper.from_array(np.zeros(zp.shape, np.int8), node.input[2]))
        done.add(key)
        converted += 1
    # element types of quantized tensors changed: drop the stale value_info and re-infer it
    del g.value_info[:]
    m = onnx.shape_inference.infer_shapes(m)
    return m, {"form": "tensorrt explicit quantization (signed INT8, zero point 0)",
               "quantizers_converted": converted, "zero_points_added": added_zp}


# ---------------------------------------------------------------- validation

@dataclass
class RuleResult:
    rule: str
    passed: bool
    detail: str = ""
    nodes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "passed": self.passed, "detail": self.detail, "nodes": self.nodes[:50]}


@dataclass
class ValidationReport:
    results: list[RuleResult]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def failures(self) -> list[RuleResult]:
        return [r for r in self.results if not r.passed]

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "rules": [r.to_dict() for r in self.results]}

    def raise_if_failed(self, where: str) -> None:
        bad = self.failures()
        if bad:
            lines = "; ".join(
                f"{r.rule}: {r.detail}" + (f" (nodes: {', '.join(r.nodes[:8])}"
                                           + (f" and {len(r.nodes) - 8} more" if len(r.nodes) > 8 else "") + ")"
                                           if r.nodes else "")
                for r in bad)
            raise TensorRTFormError(f"{where}: not in TensorRT's explicit-quantization form: {lines}",
                                    "compile again with `edgeskin compile --target jetson` (it converts NNCF's "
                                    "output), or fix the graph")


def _opset(model: Any) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 0


def validate_tensorrt_onnx(model: Any, *, max_opset: int | None = None, lint: bool = True,
                           model_path: str | Path | None = None) -> ValidationReport:
    """Check ``model`` (a ModelProto) against the rules of TensorRT's explicit quantization.

    Rules: ``opset`` (at most the device profile's), ``onnx.checker`` (full check),
    ``polygraphy lint`` (when ``lint``), ``int8`` (no UINT8 quantizer), ``zero-point`` (all
    zero), ``weights-per-channel`` (convolution weights dequantized per output channel,
    axis 0), ``bias-float`` (no quantized bias) and ``conv-relu`` (no Q/DQ pair between a
    convolution and its ReLU). A graph without any quantizer (FP16/FP32) passes the Q/DQ rules.
    """
    onnx = require("onnx", extra="compress", purpose="validating a graph for TensorRT")
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    results: list[RuleResult] = []

    opset = _opset(model)
    if max_opset is not None:
        results.append(RuleResult("opset", opset <= max_opset,
                                  f"opset {opset}, the device's TensorRT parses at most {max_opset}"))
    try:
        onnx.checker.check_model(model, full_check=True)
        results.append(RuleResult("onnx.checker", True, "full check passed"))
    except Exception as exc:  # noqa: BLE001 - the checker's own message is the detail
        results.append(RuleResult("onnx.checker", False, str(exc).strip().splitlines()[0][:300]))
    if lint:
        results.append(polygraphy_lint(model, model_path=model_path))

    qdq = [n for n in g.node if n.op_type in (Q, DQ)]
    uint8, nonzero = [], []
    for n in qdq:
        name = n.name or n.output[0]
        if len(n.input) < 3 or not n.input[2]:
            if n.op_type == Q:
                uint8.append(name)  # no zero point: UINT8 output by the ONNX spec
            continue
        zp_t = inits.get(n.input[2])
        if zp_t is None:
            nonzero.append(name + " (zero point not constant)")
            continue
        zp = numpy_helper.to_array(zp_t)
        if zp.dtype == np.uint8:  # (an INT32 bias dequantizer is the bias-float rule's finding)
            uint8.append(name)
        if zp.any():
            nonzero.append(name)
    results.append(RuleResult("int8", not uint8, "every quantizer signed INT8" if not uint8 else
                              f"{len(uint8)} quantizer(s) are UINT8 (TensorRT takes signed INT8 only)", uint8))
    results.append(RuleResult("zero-point", not nonzero, "all zero points 0" if not nonzero else
                              f"{len(nonzero)} quantizer(s) have a non-zero zero point", nonzero))

    per_tensor, bias_q = [], []
    for conv in (n for n in g.node if n.op_type in ("Conv", "ConvTranspose")):
        cname = conv.name or conv.output[0]
        w_node = producer.get(conv.input[1]) if len(conv.input) > 1 else None
        if w_node is not None and w_node.op_type == DQ:
            scale = inits.get(w_node.input[1])
            axis = next((onnx.helper.get_attribute_value(a) for a in w_node.attribute if a.name == "axis"), 1)
            weight = inits.get(w_node.input[0])
            if weight is None:  # Q -> DQ on a float weight
                q_node = producer.get(w_node.input[0])
                weight = inits.get(q_node.input[0]) if q_node is not None else None
            out_ch = int(weight.dims[0]) if weight is not None and len(weight.dims) else None
            dims = list(scale.dims) if scale is not None else None
            ok = dims is not None and len(dims) == 1 and (out_ch is None or dims[0] == out_ch) and axis == 0 \
                and (out_ch is None or out_ch == 1 or dims[0] > 1)
            if not ok:
                per_tensor.append(f"{cname} (scale shape {dims}, axis {axis})")
        if len(conv.input) > 2 and conv.input[2]:
            b_node = producer.get(conv.input[2])
            if b_node is not None and b_node.op_type == DQ:
                bias_q.append(cname)
    results.append(RuleResult("weights-per-channel", not per_tensor,
                              "convolution weights per output channel on axis 0" if not per_tensor else
                              f"{len(per_tensor)} convolution(s) have per-tensor or wrong-axis weight scales",
                              per_tensor))
    results.append(RuleResult("bias-float", not bias_q, "no quantized bias" if not bias_q else
                              f"{len(bias_q)} convolution(s) take a quantized bias (TensorRT wants it in float)",
                              bias_q))

    between = []
    for q in (n for n in g.node if n.op_type == Q):
        src = producer.get(q.input[0])
        if src is None or src.op_type not in ("Conv", "ConvTranspose", "BatchNormalization"):
            continue
        for dq in consumers.get(q.output[0], []):
            if dq.op_type == DQ and any(c.op_type in ("Relu", "Clip", "LeakyRelu")
                                        for c in consumers.get(dq.output[0], [])):
                between.append(q.name or q.output[0])
    results.append(RuleResult("conv-relu", not between, "no Q/DQ pair between a convolution and its ReLU"
                              if not between else f"{len(between)} Q/DQ pair(s) sit between a convolution "
                              "and its ReLU (TensorRT fuses them; quantize after the ReLU)", between))
    return ValidationReport(results)


def polygraphy_lint(model: Any, *, model_path: str | Path | None = None, timeout: float = 600) -> RuleResult:
    """``polygraphy check lint`` on the model (ONNX-side checks, run with ONNX Runtime)."""
    exe = shutil.which("polygraphy") or (str(Path(sys.executable).parent / "polygraphy")
                                         if (Path(sys.executable).parent / "polygraphy").exists() else None)
    if exe is None:
        return RuleResult("polygraphy lint", False, "polygraphy is not installed: pip install 'edgeskin[jetson]'")
    with tempfile.TemporaryDirectory(prefix="edgeskin-lint-") as tmp:
        path = Path(model_path) if model_path is not None else Path(tmp) / "model.onnx"
        if model_path is None:
            path.write_bytes(model.SerializeToString())
        report = Path(tmp) / "lint.json"
        proc = subprocess.run([exe, "check", "lint", str(path), "-o", str(report)], capture_output=True,
                              text=True, timeout=timeout)
        data: dict[str, Any] = {}
        if report.is_file():
            try:
                data = json.loads(report.read_text())
            except json.JSONDecodeError:
                data = {}
    lint_items = data.get("lint_entries", []) if isinstance(data, dict) else []
    errors = [e for e in lint_items if str(e.get("level", "")).lower() in ("exception", "error")]
    if errors:
        nodes = [str(n) for e in errors for n in (e.get("nodes") or [])]
        msg = "; ".join(str(e.get("message", ""))[:200] for e in errors[:3])
        return RuleResult("polygraphy lint", False, f"{len(errors)} error(s): {msg}", nodes)
    if proc.returncode != 0 and not data:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return RuleResult("polygraphy lint", False, f"polygraphy failed (exit {proc.returncode}): {tail[0][:300]}")
    warnings = [e for e in lint_items if str(e.get("level", "")).lower() == "warning"]
    return RuleResult("polygraphy lint", True, f"no errors ({len(warnings)} warning(s))")
