#!/usr/bin/env python
"""Where the ONNX Runtime / TensorRT INT8 forms lose agreement with FP32: a measured ablation on
the validation split only (the test split is not read). Writes a JSON record and prints a table.

Variants (NNCF post-training quantization of the same exported graph, same calibration images):
  fast_bc_fcf   the default before: NNCF fast bias correction on, first conv in float
  no_bc_fcf     bias correction off, first conv in float (the default now)
  no_bc         bias correction off, every conv quantized
  fast_bc_adds  fast bias correction, residual additions kept in float
and, for the first two: the same QDQ graph run by ONNX Runtime with graph optimisations off (the
QDQ arithmetic emulated in float, no integer kernels); weights-only (every activation
Quantize/Dequantize pair removed); and the TensorRT form (edgeskin.quantize.tensorrt: symmetric
INT8 activations, zero point 0), fused and emulated.

Usage:
    python benchmarks/int8_ablation.py [--run runs/quick] [--model DIR --member NAME --split CSV --calib JSON]
        [--variants fast_bc_fcf,no_bc_fcf,...] [--out benchmarks/results/int8_ablation.json]
Defaults: the quick recipe's student, split and calibration set under runs/quick.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import time
from pathlib import Path

import numpy as np

VARIANTS = ("fast_bc_fcf", "no_bc_fcf", "no_bc", "fast_bc_adds")


def _strip_activation_qdq(proto):  # noqa: ANN001, ANN202
    """Diagnostic: the graph with every activation Q/DQ pair removed (weights stay INT8)."""
    m = copy.deepcopy(proto)
    g = m.graph
    inits = {i.name for i in g.initializer}
    rename, keep = {}, []
    for n in g.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits:
            dq = [d for d in g.node if d.op_type == "DequantizeLinear" and d.input[0] == n.output[0]]
            rename[dq[0].output[0]] = n.input[0]
            continue
        keep.append(n)
    keep = [n for n in keep if not (n.op_type == "DequantizeLinear" and n.output[0] in rename)]
    for n in keep:
        for i, x in enumerate(n.input):
            if x in rename:
                n.input[i] = rename[x]
    del g.node[:]
    g.node.extend(keep)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("runs/quick"))
    ap.add_argument("--model", type=Path)
    ap.add_argument("--member")
    ap.add_argument("--split", type=Path)
    ap.add_argument("--calib", type=Path)
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("EDGESKIN_DATA", "../shared/data/ham10000")))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/int8_ablation.json"))
    a = ap.parse_args()

    import onnx
    import onnxruntime as ort

    from edgeskin.calibration import read_calibration_set
    from edgeskin.data import load_dataset, read_split
    from edgeskin.progress import NullReporter
    from edgeskin.quantize import QuantizeOptions, quantize_onnx
    from edgeskin.quantize.tensorrt import to_tensorrt_int8
    from edgeskin.runtime.backends import OnnxRuntimeBackend
    from edgeskin.targets.prepare import calibration_inputs, prepare

    ds = load_dataset(a.data)
    split = read_split(a.split or a.run / "split.csv")
    cal_path = a.calib or Path(sorted(glob.glob(str(a.run / "calibration" / "*.json")))[0])
    cal = read_calibration_set(cal_path)
    model = a.model or a.run / "student"
    prep = prepare(model, member=a.member, dataset=ds, split=split, opset=17, threads=a.threads)
    calx = calibration_inputs(cal, ds, split, prep.preprocess, NullReporter())
    ref = prep.fp32_probs.argmax(1)
    base = onnx.load(prep.onnx_path)

    def agreement(proto, emulate: bool = False) -> float:  # noqa: ANN001
        if emulate:
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            so.intra_op_num_threads = a.threads
            s = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
            run = lambda x: s.run(None, {s.get_inputs()[0].name: x})[0]  # noqa: E731
        else:
            run = OnnxRuntimeBackend(proto.SerializeToString(), threads=a.threads).run
        x = prep.val_inputs
        top1 = np.concatenate([run(x[i : i + 32]).argmax(1) for i in range(0, len(x), 32)])
        return float(np.mean(top1 == ref))

    options = {
        "fast_bc_fcf": QuantizeOptions(bias_correction="fast", first_conv_float=True),
        "no_bc_fcf": QuantizeOptions(bias_correction="none", first_conv_float=True),
        "no_bc": QuantizeOptions(bias_correction="none"),
        "fast_bc_adds": QuantizeOptions(bias_correction="fast", first_conv_float=True, ignored=("type:Add",)),
    }
    rows = {}
    for v in a.variants.split(","):
        t = time.perf_counter()
        q, _ = quantize_onnx(base, calx, options[v])
        r = {"onnxruntime": agreement(q)}
        if v in ("fast_bc_fcf", "no_bc_fcf"):
            r["emulated_qdq"] = agreement(q, emulate=True)
            r["weights_only"] = agreement(_strip_activation_qdq(q))
            trt, _ = to_tensorrt_int8(q)
            r["tensorrt_form"] = agreement(trt)
            r["tensorrt_form_emulated"] = agreement(trt, emulate=True)
        rows[v] = r
        print(v, {k: f"{100 * x:.2f}%" for k, x in r.items()}, f"({time.perf_counter() - t:.0f} s)", flush=True)
    record = {"model": str(model), "member": prep.name, "arch": prep.arch, "split": str(a.split or a.run / "split.csv"),
              "calibration": str(cal_path), "val_images": int(len(ref)),
              "measure": "top-1 agreement with the FP32 model on the validation split", "variants": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(record, indent=2) + "\n")
    prep.close()


if __name__ == "__main__":
    main()
