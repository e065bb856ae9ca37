"""torch -> ONNX, the one intermediate form every target starts from (legacy exporter).

The export is checked against torch on real inputs: the largest absolute difference of the
logits is reported, and the export fails above ``tolerance`` (1e-3 by default).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import EdgeskinError, require
from .fileio import atomic_path

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


class ExportError(EdgeskinError):
    """The exported graph does not reproduce the torch model."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    opset: int
    max_abs_diff: float
    checked_inputs: int


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    size: int,
    opset: int = 17,
    dynamic_batch: bool = True,
    check_inputs: np.ndarray | None = None,
    tolerance: float = 1e-3,
) -> ExportResult:
    """Export ``model`` (eval mode, float32, outputs logits) to ONNX at ``opset``.

    ``check_inputs`` (N, 3, size, size) are run through torch and ONNX Runtime; without them
    a few seeded random inputs are used. Written to a temporary file and renamed.
    """
    onnx = require("onnx", extra="compress", purpose="ONNX export")
    ort = require("onnxruntime", extra="runtime", purpose="checking the ONNX export")
    out = Path(path)
    model = model.float().eval().to(memory_format=torch.contiguous_format)
    dummy = torch.zeros(1, 3, size, size)
    with atomic_path(out, suffix=".onnx") as tmp:
        with torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(
                model, (dummy,), str(tmp), opset_version=opset, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], do_constant_folding=True, dynamo=False,
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None,
            )
        proto = onnx.load(tmp)
        onnx.checker.check_model(proto, full_check=True)
        if check_inputs is None:
            check_inputs = np.random.default_rng(0).standard_normal((4, 3, size, size)).astype(np.float32)
        x = np.ascontiguousarray(check_inputs, dtype=np.float32)
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(tmp), opts, providers=["CPUExecutionProvider"])
        got = np.concatenate([sess.run(None, {INPUT_NAME: x[i : i + 1]})[0] for i in range(len(x))])
        diff = float(np.max(np.abs(got - want))) if len(x) else 0.0
        if not diff <= tolerance:
            raise ExportError(
                f"ONNX export of the model differs from torch by {diff:.3g} (> {tolerance:g}) in the logits",
                "report this model; try another --opset",
            )
    log.info("exported %s (opset %d), max |logit diff| vs torch %.2e", out, opset, diff)
    return ExportResult(out, opset, diff, len(x))
