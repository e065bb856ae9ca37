#!/usr/bin/env python
"""Activation range estimators against each other, on images no estimator saw: training images
and validation only (the test split is not read).

As in int8_noise.py, 512 calibration images are drawn (one draw per seed) from one fixed half of
the training split; each estimator quantizes the FP32 model with the quick recipe's settings
(first convolution and classifier in float, no bias correction) and the INT8 graph's top-1
decisions are compared with FP32's on the other half (``train_heldout``) and on validation.
Targets: ``cpu`` (NNCF's ONNX Runtime form), ``jetson`` (the same graph in TensorRT's symmetric
form, run by ONNX Runtime on the host) and ``tflite`` (the tflite compile step's own post-training
INT8, run in LiteRT, with its observers of the same names).

Usage:
    python benchmarks/int8_ranges.py [--run runs/quick] [--model DIR] [--member NAME] [--split CSV]
        [--seeds 0,1] [--estimators max_p95,minmax,mean_minmax] [--targets cpu,jetson,tflite]
        [--out benchmarks/results/int8_ranges.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from _common import heldout_study, litert_logits, ort_logits, recipe_ptq_options, student_run_args


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    student_run_args(ap)
    ap.add_argument("--member", help="one member of an ensemble folder (by name)")
    ap.add_argument("--seeds", default="0,1", help="calibration draws")
    ap.add_argument("--estimators", default="max_p95,minmax,mean_minmax")
    ap.add_argument("--targets", default="cpu,jetson")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/int8_ranges.json"))
    a = ap.parse_args()

    from edgeskin.fileio import write_json
    from edgeskin.models import load_ensemble
    from edgeskin.quantize import quantize_onnx
    from edgeskin.quantize.tensorrt import to_tensorrt_int8

    model, prep, xt, pool, held, base, sets, probe = heldout_study(a)
    targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    ck = next(m for m in load_ensemble(model) if m.sha256 == prep.sha256) if "tflite" in targets else None

    def flips(runner, model_bytes: bytes) -> dict[str, int]:  # noqa: ANN001
        return {k: probe.change(k, runner(model_bytes, x, threads=a.threads))[0] for k, x in sets.items()}

    rows = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        cal = np.random.default_rng(seed).choice(pool, size=min(512, len(pool)), replace=False)
        for est in [e.strip() for e in a.estimators.split(",") if e.strip()]:
            row: dict = {"seed": seed, "estimator": est}
            if {"cpu", "jetson"} & set(targets):
                q, _ = quantize_onnx(base, [xt[i : i + 1] for i in cal], recipe_ptq_options(est))
                if "cpu" in targets:
                    row["cpu"] = flips(ort_logits, q.SerializeToString())
                if "jetson" in targets:
                    row["jetson"] = flips(ort_logits, to_tensorrt_int8(q)[0].SerializeToString())
            if "tflite" in targets:
                from qat_heldout import tflite_ptq

                row["tflite"] = flips(litert_logits, tflite_ptq(ck.model, ck.config["arch"], xt, cal, est,
                                                                int(xt.shape[-1])))
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_json(a.out, {"model": str(model), "member": a.member, "split": str(a.split or a.run / "split.csv"),
                       "eval_sets": {k: len(x) for k, x in sets.items()}, "calibration_images": 512, "rows": rows,
                       "note": "flipped top-1 decisions against FP32; test split not read; calibration drawn from "
                               "the training half not evaluated"})


if __name__ == "__main__":
    main()
