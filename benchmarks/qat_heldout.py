#!/usr/bin/env python
"""Quantization-aware training against post-training quantization on images neither has seen,
through ONNX Runtime (cpu, jetson) and LiteRT (tflite), never on the test split.

The training split is cut into the fixed halves of int8_noise.py (``_common.training_halves``).
Post-training quantization (the quick recipe's settings: minmax ranges, first convolution and
classifier float, no bias correction) calibrates on 512 images of the first half; quantization-
aware training (``edgeskin.train.qat.train_qat``, the shipped code and defaults) starts from
``--calibration-size`` of those images (default QatConfig's, 512) and fits that half only, un-augmented. Every INT8 graph then runs in ONNX
Runtime on the second half and on the validation split, against the FP32 student. Reported per
graph: flipped top-1 decisions, and the spread of the INT8 change in the gap between the FP32
top two logits (the noise that flips near-ties): standard deviation and a robust one (1.4826 x
MAD), and |change| quantiles. The jetson forms are TensorRT's symmetric INT8 as compile writes
them (post-training: ``to_tensorrt_int8``; QAT: trained in that form), run in ONNX Runtime as the
host proxy runs them. The tflite forms are the tflite compile step's (its own post-training
function with the recipe's observer, ``mean_minmax``, and with ``minmax``, which QAT starts from;
QAT: the PT2E program, converted as compile converts it), with normalised NCHW input and logits
out, run in LiteRT.

Usage:
    python benchmarks/qat_heldout.py [--run runs/quick] [--targets cpu,jetson] [--seeds 0,1] \\
        [--epochs 3] [--out benchmarks/results/qat_heldout.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import heldout_study, litert_logits, ort_logits, recipe_ptq_options, student_run_args  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    student_run_args(ap)
    ap.add_argument("--member", help="one member of an ensemble folder (by name), e.g. the reference's member2")
    ap.add_argument("--targets", default="cpu,jetson")
    ap.add_argument("--seeds", default="0,1", help="draws: calibration images and the QAT batches' order")
    ap.add_argument("--epochs", type=int, default=3, help="QAT epochs over the fitted half")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=None, help="default: the objective's own (QatConfig)")
    ap.add_argument("--objective", default="match")
    ap.add_argument("--calibration-size", type=int, default=None,
                    help="images that set QAT's starting ranges (a subset of PTQ's 512); default: QatConfig's")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/qat_heldout.json"))
    a = ap.parse_args()

    import torch

    from edgeskin.fileio import write_json
    from edgeskin.models import load_ensemble
    from edgeskin.quantize import quantize_onnx
    from edgeskin.quantize.tensorrt import to_tensorrt_int8
    from edgeskin.targets.tflite import load_qat_program
    from edgeskin.train.qat import QatConfig, export_pt2, export_qdq, train_qat

    model, prep, xt, pool, held, base, sets, probe = heldout_study(a)
    split_path = a.split or a.run / "split.csv"
    ck = next(m for m in load_ensemble(model) if m.sha256 == prep.sha256)  # the member prepared
    size = int(xt.shape[-1])
    arch = ck.config["arch"]

    def measure(model_bytes: bytes, runner: object = ort_logits) -> dict[str, dict[str, float]]:
        out = {}
        for k, x in sets.items():
            flips, d, sigma, robust = probe.change(k, runner(model_bytes, x, threads=a.threads))
            out[k] = {"flips": flips, "n": len(x), "sigma": sigma, "sigma_robust": robust,
                      "abs_delta_50_90_99": [float(v) for v in np.quantile(np.abs(d), [0.5, 0.9, 0.99])]}
        return out

    class Half:  # QAT batches: the fitted half, un-augmented
        def batch(self, idx: np.ndarray, epoch: int) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(xt[pool[idx]]))

    opts = recipe_ptq_options("minmax")
    rows = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        cal_idx = np.random.default_rng(seed).choice(pool, size=min(512, len(pool)), replace=False)
        targets = [t.strip() for t in a.targets.split(",") if t.strip()]
        ptq = (quantize_onnx(base, [xt[i : i + 1] for i in cal_idx], opts)[0]
               if set(targets) - {"tflite"} else None)
        for target in targets:
            t0 = time.perf_counter()
            if target == "tflite":  # the recipe's observer, and minmax (QAT's start)
                row = {"seed": seed, "target": target,
                       "ptq": measure(tflite_ptq(ck.model, arch, xt, cal_idx, "mean_minmax", size), litert_logits),
                       "ptq_minmax": measure(tflite_ptq(ck.model, arch, xt, cal_idx, "minmax", size), litert_logits)}
            else:
                ptq_form = ptq if target == "cpu" else to_tensorrt_int8(ptq)[0]
                row = {"seed": seed, "target": target, "ptq": measure(ptq_form.SerializeToString())}
            cfg = QatConfig(epochs=a.epochs, target=target, objective=a.objective, lr=a.lr,
                            batch_size=a.batch_size, seed=seed,
                            **({} if a.calibration_size is None else {"calibration_size": a.calibration_size}))
            cal = torch.from_numpy(xt[np.sort(cal_idx[: cfg.calibration_size])])
            res = train_qat(ck.model.float().eval(), cfg, batches=Half(), n_train=len(pool),
                            teacher_probs=lambda x, idx: None, hard_loss=None, calibration=cal,
                            temperature=1.0, alpha=1.0)
            if target == "tflite":
                tmp = a.out.with_suffix(".tflite.tmp.pt2")
                export_pt2(res.model.cpu(), tmp, size=size)
                row["qat"] = measure(tflite_model(load_qat_program(tmp), size), litert_logits)
            else:
                tmp = a.out.with_suffix(f".{target}.tmp.onnx")
                export_qdq(res.model.cpu(), tmp, size=size)
                row["qat"] = measure(tmp.read_bytes())
            tmp.unlink()
            row["qat_config"] = cfg.to_dict()
            row["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(f"seed {seed} {target}: " + "; ".join(
                f"{k} flips PTQ {row['ptq'][k]['flips']} -> QAT {row['qat'][k]['flips']} of {row['ptq'][k]['n']}, "
                f"sigma {row['ptq'][k]['sigma']:.4f} -> {row['qat'][k]['sigma']:.4f} (robust "
                f"{row['ptq'][k]['sigma_robust']:.4f} -> {row['qat'][k]['sigma_robust']:.4f})"
                for k in sets) + ("; PTQ minmax " + ", ".join(f"{k} {row['ptq_minmax'][k]['flips']} flips" for k in sets)
                                  if "ptq_minmax" in row else "") + f"  ({row['seconds']:.0f} s)", flush=True)
    summary = {}
    for target in sorted({r["target"] for r in rows}):
        rs = [r for r in rows if r["target"] == target]
        summary[target] = {k: {"ptq_flips": sum(r["ptq"][k]["flips"] for r in rs),
                               "qat_flips": sum(r["qat"][k]["flips"] for r in rs),
                               "ptq_sigma_mean": float(np.mean([r["ptq"][k]["sigma"] for r in rs])),
                               "qat_sigma_mean": float(np.mean([r["qat"][k]["sigma"] for r in rs]))}
                           for k in sets}
        if all("ptq_minmax" in r for r in rs):
            for k in sets:
                summary[target][k].update(
                    ptq_minmax_flips=sum(r["ptq_minmax"][k]["flips"] for r in rs),
                    ptq_minmax_sigma_mean=float(np.mean([r["ptq_minmax"][k]["sigma"] for r in rs])))
    record = {"model": str(model), "member": a.member, "split": str(split_path), "eval_sets": {k: len(x) for k, x in sets.items()},
              "fitted_half": len(pool), "rows": rows, "summary": summary,
              "note": "test split not read; QAT fitted and PTQ calibrated on the training half not evaluated; "
                      "cpu and jetson graphs run in ONNX Runtime, tflite models in LiteRT"}
    write_json(a.out, record)
    print(json.dumps(summary, indent=1))
    if not math.isfinite(sum(s[k]["qat_sigma_mean"] for s in summary.values() for k in sets)):
        raise SystemExit("non-finite noise")


def _phone(net: object, size: int) -> object:
    """``net`` as the tflite compile step wraps it, taking the normalised NCHW tensor, logits out."""
    from edgeskin.targets.tflite import phone_io_module

    return phone_io_module(net, mean255=(0.0,) * 3, std255=(1.0,) * 3, bgr=False, input_type="normalized",
                           output_kind="logits", layout="NCHW", size=size)


def tflite_ptq(model: object, arch: str, xt: np.ndarray, cal_idx: np.ndarray, observer: str, size: int) -> bytes:
    """The tflite compile step's post-training INT8 (first convolution and classifier float)."""
    import litert_torch
    import torch

    from edgeskin.targets.tflite import STEMS, post_training_int8

    net = _phone(model.float().eval(), size)
    sample = (torch.from_numpy(np.ascontiguousarray(xt[cal_idx[:1]])),)
    return post_training_int8(litert_torch, net, sample, (xt[i : i + 1] for i in cal_idx), n=len(cal_idx),
                              int8_adds=False, observer=observer, float_modules=STEMS[arch])


def tflite_model(program: object, size: int) -> bytes:
    """A QAT program converted as the tflite compile step converts it."""
    import litert_torch
    import torch

    from edgeskin.targets.tflite import _static_int8

    return _static_int8(litert_torch, _phone(program, size), (torch.zeros(1, 3, size, size),))


if __name__ == "__main__":
    main()
