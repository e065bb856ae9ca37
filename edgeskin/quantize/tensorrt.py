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

def _weight_axis(op: str, node: Any, onnx: Any) -> int | None:
    """The output-channel axis of the weight input of ``node``: 0 for Conv (and Gemm with
    transB=1), 1 for ConvTranspose (C_in, C_out/groups, ...), MatMul (K, N) and Gemm without
    transB (TensorRT's developer guide, explicit quantization: per-channel weights are quantized
    along the output channels)."""
    if op == "Conv":
        return 0
    if op in ("ConvTranspose", "MatMul"):
        return 1
    if op == "Gemm":
        trans_b = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return None


WEIGHT_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def to_tensorrt_int8(model: Any) -> tuple[Any, dict[str, Any]]:
    """Return a copy of the QDQ ``model`` in TensorRT's form and a record of the changes.

    Each UINT8 activation quantizer (zero point z, scale s, real range [-z*s, (255-z)*s])
    becomes a signed INT8 quantizer with zero point 0 and scale max(|lo|, |hi|) / 127: the same
    range, symmetric (for z = 0 the scale grows by 255/127, one bit of resolution less on
    post-ReLU activations, which is what TensorRT's own INT8 does). Signed quantizers with a
    non-zero zero point are widened to symmetric the same way. A quantizer without a zero point
    (UINT8 by the ONNX spec) gets an INT8 zero one.

    Every new scale is computed from the original one exactly once per (scale, zero point)
    pair: a scale shared by two zero points of different values is split into one tensor each,
    never rescaled twice. Weights (constant integers behind a DequantizeLinear) are kept as they
    are when already signed INT8 with zero point 0; otherwise their integer values are rewritten
    together with the scale (so the real weights stay the same) and clipped to [-127, 127].
    """
    onnx = require("onnx", extra="compress", purpose="converting a QDQ graph for TensorRT")
    from onnx import numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    orig = {n: numpy_helper.to_array(t) for n, t in inits.items()}  # values before any change

    def add_init(arr: np.ndarray, name: str) -> str:
        if name in inits:
            inits[name].CopyFrom(numpy_helper.from_array(arr, name))
        else:
            t = numpy_helper.from_array(arr, name)
            g.initializer.append(t)
            inits[name] = t
        return name

    # (scale name, zero-point name or "") -> (new scale name, new zero-point name)
    plan: dict[tuple[str, str], tuple[str, str]] = {}
    scale_users: dict[str, set[bytes]] = {}
    values: dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    rewritten: set[str] = set()
    converted, added_zp, weights_rewritten, split = 0, 0, 0, 0
    for node in g.node:
        if node.op_type not in (Q, DQ) or len(node.input) < 2 or node.input[1] not in inits:
            continue
        s_name = node.input[1]
        z_name = node.input[2] if len(node.input) > 2 else ""
        if z_name and z_name not in inits:
            continue
        zp = orig[z_name] if z_name else np.zeros(orig[s_name].shape, np.uint8)
        if zp.dtype == np.int8 and not zp.any():  # already TensorRT's form: its scale must stay
            users = scale_users.setdefault(s_name, set())
            sig = orig[s_name].tobytes()
            if users and sig not in users:  # the shared scale was rescaled for another zero point
                keep = f"{s_name}_orig"
                if keep not in inits:
                    add_init(orig[s_name], keep)
                    split += 1
                node.input[1] = keep
            else:
                users.add(sig)
            continue
        if zp.dtype not in (np.uint8, np.int8):
            raise TensorRTFormError(f"{node.name}: zero point of type {zp.dtype} cannot be made INT8",
                                    "quantize to 8 bits")
        key = (s_name, z_name)
        if key not in plan:
            scale = orig[s_name].astype(np.float64)
            qmin, qmax = (0.0, 255.0) if zp.dtype == np.uint8 else (-128.0, 127.0)
            z = zp.astype(np.float64)
            new_scale = (np.maximum(np.abs((qmin - z) * scale), np.abs((qmax - z) * scale)) / 127.0)
            new_scale = new_scale.astype(orig[s_name].dtype)
            sig = new_scale.tobytes()
            users = scale_users.setdefault(s_name, set())
            if not users or sig in users:  # first user of this scale, or the same result again
                s_new = s_name
            else:  # a shared scale needing another value: its own tensor, not a second rescale
                s_new = f"{s_name}_trt{len(users)}"
                split += 1
            users.add(sig)
            add_init(new_scale, s_new)
            z_new = z_name or f"{s_name}_trt_zero_point"
            if not z_name:
                added_zp += 1
            plan[key] = (s_new, z_new)
            values[key] = (scale, z, new_scale.astype(np.float64))
            add_init(np.zeros(zp.shape, np.int8), z_new)
            converted += 1
        # a weight behind this dequantizer: rewrite its integers with the scale, once
        if node.op_type == DQ and node.input[0] in inits and node.input[0] not in rewritten:
            scale, z, new_scale = values[key]
            w = orig[node.input[0]].astype(np.float64)
            axis = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * w.ndim
            if scale.ndim == 1 and scale.size > 1:
                shape[axis] = scale.size
            real = (w - z.reshape(shape if z.size > 1 else [1] * w.ndim)) * scale.reshape(shape)
            q = np.clip(np.round(real / new_scale.reshape(shape)), -127, 127).astype(np.int8)
            add_init(q, node.input[0])
            rewritten.add(node.input[0])
            weights_rewritten += 1
        s_new, z_new = plan[key]
        node.input[1] = s_new
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = z_new
    # element types of quantized tensors changed: drop the stale value_info and re-infer it
    del g.value_info[:]
    m = onnx.shape_inference.infer_shapes(m)
    return m, {"form": "tensorrt explicit quantization (signed INT8, zero point 0)",
               "quantizers_converted": converted, "zero_points_added": added_zp,
               "weights_rewritten": weights_rewritten, "shared_scales_split": split}


def to_fp16_tensors(model: Any) -> tuple[Any, dict[str, Any]]:
    """Return a copy of ``model`` whose float tensors are FP16, with FP32 input and output.

    For TensorRT's strongly typed networks (10.12+, and 11.x without precision flags), which run
    every float layer in its tensors' own type: float initializers (weights, biases, Q/DQ scales)
    and float constants become FP16, Casts to FP32 become Casts to FP16, a Cast follows each
    FP32 graph input and precedes each FP32 graph output. Q/DQ scales in FP16 need opset 19.
    """
    onnx = require("onnx", extra="compress", purpose="storing a graph's float tensors in FP16")
    from onnx import TensorProto, helper, numpy_helper

    if _opset(model) < 19 and any(n.op_type in (Q, DQ) for n in model.graph.node):
        raise TensorRTFormError(f"opset {_opset(model)} cannot give a Q/DQ graph FP16 scales",
                                "export at opset 19 or higher for a strongly typed TensorRT build")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    F, H = TensorProto.FLOAT, TensorProto.FLOAT16
    inits = 0
    for t in g.initializer:
        if t.data_type == F:
            arr = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array(np.clip(arr, -65504, 65504).astype(np.float16), t.name))
            inits += 1
    for node in g.node:
        for a in node.attribute:
            if node.op_type == "Constant" and a.name == "value" and a.t.data_type == F:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16), a.t.name))
            if node.op_type == "Cast" and a.name == "to" and a.i == F:
                a.i = H
    init_names = {t.name for t in g.initializer}
    head, tail = [], []
    for inp in g.input:
        if inp.name in init_names or inp.type.tensor_type.elem_type != F:
            continue
        new = f"{inp.name}_fp16"
        _rename_tensor(g, inp.name, new)
        head.append(helper.make_node("Cast", [inp.name], [new], to=H, name=f"{inp.name}_to_fp16"))
    for out in g.output:
        if out.type.tensor_type.elem_type != F:
            continue
        new = f"{out.name}_fp16"
        _rename_tensor(g, out.name, new)
        tail.append(helper.make_node("Cast", [new], [out.name], to=F, name=f"{out.name}_to_fp32"))
    nodes = head + list(g.node) + tail
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    m = onnx.shape_inference.infer_shapes(m)
    onnx.checker.check_model(m, full_check=True)
    return m, {"float_tensors": "float16", "initializers_converted": inits, "io": "float32 (cast at the edges)"}


def _rename_tensor(g: Any, old: str, new: str) -> None:
    """Every node's reference to tensor ``old`` (as input or output) now names ``new``."""
    for node in g.node:
        for names in (node.input, node.output):
            for i, x in enumerate(names):
                if x == old:
                    names[i] = new


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
    zero), ``weights-per-channel`` (weights dequantized per output channel on its axis: Conv 0,
    ConvTranspose 1; MatMul/Gemm per tensor or on their output axis), ``weights-range`` (INT8
    weights in [-127, 127], TensorRT's developer guide on explicit quantization),
    ``scale-positive`` (every scale > 0), ``bias-float`` (no quantized bias) and ``conv-relu``
    (no Q/DQ pair between a convolution and its ReLU). A graph without any quantizer (FP16/FP32)
    passes the Q/DQ rules.
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

    per_tensor, bias_q, out_of_range, w_nodes = [], [], [], []
    for op_node in (n for n in g.node if n.op_type in WEIGHT_OPS):
        cname = op_node.name or op_node.output[0]
        w_node = producer.get(op_node.input[1]) if len(op_node.input) > 1 else None
        if w_node is not None and w_node.op_type == DQ:
            w_nodes.append(w_node)
            scale = inits.get(w_node.input[1])
            axis = next((onnx.helper.get_attribute_value(a) for a in w_node.attribute if a.name == "axis"), 1)
            weight = inits.get(w_node.input[0])
            if weight is not None and weight.data_type == onnx.TensorProto.INT8:
                w = numpy_helper.to_array(weight)
                if w.size and int(w.min()) < -127:
                    out_of_range.append(f"{cname} (min {int(w.min())})")
            if weight is None:  # Q -> DQ on a float weight
                q_node = producer.get(w_node.input[0])
                weight = inits.get(q_node.input[0]) if q_node is not None else None
            want = _weight_axis(op_node.op_type, op_node, onnx)
            rank = len(weight.dims) if weight is not None else 0
            out_ch = int(weight.dims[want]) if weight is not None and want is not None and rank > want else None
            if want is not None and axis < 0:
                axis += rank
            dims = list(scale.dims) if scale is not None else None
            per_channel = dims is not None and len(dims) == 1 and dims[0] > 1
            if op_node.op_type in ("Conv", "ConvTranspose"):  # per output channel, on its axis
                ok = dims is not None and len(dims) == 1 and (out_ch is None or dims[0] == out_ch) and axis == want \
                    and (out_ch is None or out_ch == 1 or dims[0] > 1)
            else:  # MatMul / Gemm: per-tensor, or per output channel on its axis
                ok = dims is not None and (not per_channel or (axis == want and (out_ch is None or dims[0] == out_ch)))
            if not ok:
                per_tensor.append(f"{cname} (scale shape {dims}, axis {axis}, want axis {want})")
        if op_node.op_type in ("Conv", "ConvTranspose", "Gemm") and len(op_node.input) > 2 and op_node.input[2]:
            b_node = producer.get(op_node.input[2])
            if b_node is not None and b_node.op_type == DQ:
                bias_q.append(cname)
    results.append(RuleResult("weights-per-channel", not per_tensor,
                              "weights per output channel on the right axis (Conv 0, ConvTranspose 1, MatMul 1, "
                              "Gemm 1 or 0 with transB)" if not per_tensor else
                              f"{len(per_tensor)} layer(s) have per-tensor or wrong-axis weight scales", per_tensor))
    results.append(RuleResult("weights-range", not out_of_range,
                              "INT8 weights within [-127, 127]" if not out_of_range else
                              f"{len(out_of_range)} layer(s) have INT8 weights of -128 (TensorRT's explicit "
                              "quantization takes [-127, 127])", out_of_range))
    bad_scale = []
    for n in qdq:
        t = inits.get(n.input[1]) if len(n.input) > 1 else None
        if t is None:
            continue
        v = numpy_helper.to_array(t).astype(np.float64)
        if not np.all(np.isfinite(v)) or not np.all(v > 0):
            bad_scale.append(n.name or n.output[0])
    results.append(RuleResult("scale-positive", not bad_scale, "every scale positive and finite" if not bad_scale
                              else f"{len(bad_scale)} quantizer(s) have a zero, negative or non-finite scale",
                              bad_scale))
    results.append(RuleResult("bias-float", not bias_q, "no quantized bias" if not bias_q else
                              f"{len(bias_q)} layer(s) take a quantized bias (TensorRT wants it in float)",
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
