#!/usr/bin/env python
"""Compile the reference model to jetson int8 and fp16 bundles and measure them on the test
split through the host proxy (ONNX Runtime running the TensorRT-form graph); writes
benchmarks/results/jetson_target.{md,json}.

Model: --model (default: the best member, by validation balanced accuracy, of the shared
reference ensemble; pass a distilled student folder to measure that). Calibration: the
committed calibration/train-512-seed0-*.json set (the cpu target's). Device: --device /
--jetpack (default jetson-orin-nano with its default JetPack). The test split is read once.
TensorRT itself is not installed here: latency on the device comes from `edgeskin bench` on
the Jetson; this script measures what the host can: the accuracy of the exact graph TensorRT
will build from, the validator's verdict and the artefact sizes.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

from _common import HERE, load_inputs, metric_cells, model_args, pct, test_predictions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(ap)
    ap.add_argument("--device", default="jetson-orin-nano")
    ap.add_argument("--jetpack", default=None)
    ap.add_argument("--first-conv-float", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-jetson"))
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--name", default="jetson_target")
    args = ap.parse_args()

    from edgeskin.fileio import atomic_write_bytes, write_json
    from edgeskin.metrics import classification_report
    from edgeskin.progress import RichReporter
    from edgeskin.quantize import QuantizeOptions
    from edgeskin.targets import get_target

    rep = RichReporter()
    member, calib, cal, ds, split = load_inputs(args)
    q = QuantizeOptions(first_conv_float=args.first_conv_float)
    bundles, checks, seconds = {}, {}, {}
    jetson = get_target("jetson")
    for precision in ("fp16", "int8"):
        t0 = time.perf_counter()
        res = jetson.compile(args.model, member=member, precision=precision, dataset=ds, split=split,
                             out=args.out / f"{precision}.edgeskin", calibration=cal if precision == "int8" else None,
                             quantize=q, device=args.device, jetpack=args.jetpack, force=True, overwrite=True,
                             threads=args.threads, reporter=rep)
        seconds[precision] = round(time.perf_counter() - t0, 1)
        bundles[precision], checks[precision] = res.bundle, res.check
    cpu_int8 = get_target("cpu").compile(args.model, member=member, precision="int8", dataset=ds, split=split,
                                         out=args.out / "cpu-int8.edgeskin", calibration=cal, quantize=q,
                                         force=True, overwrite=True, threads=args.threads, reporter=rep)
    bundles["cpu-int8"] = cpu_int8.bundle

    preds, x, y, probs = test_predictions(bundles, ds, split, threads=args.threads)
    codes = preds["fp16"].labels
    reports = {p: classification_report(pr, y, codes) for p, pr in probs.items()}
    ref = probs["fp16"].argmax(1)  # the fp16 bundle's graph is the FP32 model (the host proxy runs FP32)
    m16 = preds["fp16"].manifest
    m8 = preds["int8"].manifest
    record = {
        "model": os.path.relpath(args.model, HERE.parent), "member": member,
        "split": os.path.relpath(args.split, HERE.parent), "calibration": str(Path(calib).relative_to(HERE.parent)),
        "device": m8.provenance.get("device"), "engine": {k: m8.engine[k] for k in ("tensorrt", "jetpack", "opset",
                                                                                    "precision_flags", "trtexec")},
        "quantization": q.to_dict(), "tensorrt_form": m8.provenance["quantization"].get("tensorrt_form"),
        "validator": {p: m.provenance["artefact_checks"]["tensorrt_form"] for p, m in (("fp16", m16), ("int8", m8))},
        "validation_checks": checks, "compile_seconds": seconds,
        "test": {p: {k: r[k] for k in ("n", "top1", "top2", "top3", "balanced_accuracy", "mel_sensitivity", "ece")}
                 for p, r in reports.items()},
        "test_top1_agreement_vs_fp32": {p: float(np.mean(probs[p].argmax(1) == ref)) for p in probs},
        "jetson_int8_vs_cpu_int8_agreement": float(np.mean(probs["int8"].argmax(1) == probs["cpu-int8"].argmax(1))),
        "model_bytes": {p: (Path(b) / "model.onnx").stat().st_size for p, b in bundles.items()},
        "host_proxy": {p: pr.host_proxy for p, pr in preds.items()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    args.results.mkdir(parents=True, exist_ok=True)
    write_json(args.results / f"{args.name}.json", record)
    atomic_write_bytes(args.results / f"{args.name}.md", markdown(record).encode())
    print(markdown(record))


def markdown(r: dict) -> str:
    t, a = r["test"], r["test_top1_agreement_vs_fp32"]
    e = r["engine"]
    lines = [
        "# jetson target on the host proxy: the TensorRT-form graphs measured on the test split",
        "",
        f"Model: `{r['model']}` {r['member'] or ''}; split `{r['split']}`; calibration `{r['calibration']}`; "
        f"device `{r['device']['profile']}`, JetPack {e['jetpack']} / TensorRT {e['tensorrt']}, opset {e['opset']}. "
        "Produced by `benchmarks/jetson_target.py`. Numbers come from ONNX Runtime running the exact graph in "
        "the bundle (the host proxy); TensorRT's INT8 kernels round differently, which the golden self-test "
        "after `edgeskin engine build` bounds on the device.",
        "",
        f"## Test split ({t['int8']['n']} images), in %",
        "",
        "| bundle | top-1 | top-2 | top-3 | balanced acc. | mel recall | ECE | top-1 agreement with FP32 | model file |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    names = {"fp16": "jetson/fp16 (FP32 graph; FP16 is a build flag)", "int8": "jetson/int8 (TensorRT Q/DQ form)",
             "cpu-int8": "cpu/int8 (same calibration, ORT form)"}
    for p in ("fp16", "int8", "cpu-int8"):
        lines.append(f"| {names[p]} | {metric_cells(t[p])} | "
                     f"{pct(a[p])} | {r['model_bytes'][p] / 1e6:.1f} MB |")
    d = {k: 100 * (t['fp16'][k] - t['int8'][k]) for k in ("top1", "balanced_accuracy", "mel_sensitivity")}
    lines += [
        "",
        f"jetson/int8 vs FP32: top-1 drop {d['top1']:.2f} points, balanced {d['balanced_accuracy']:.2f}, "
        f"melanoma recall {d['mel_sensitivity']:.2f}; agreement {pct(a['int8'])} %. jetson/int8 and cpu/int8 agree "
        f"on {pct(r['jetson_int8_vs_cpu_int8_agreement'])} % of test images (the signed form spends one bit less "
        "on post-ReLU activations).",
        "",
        f"Validator (onnx.checker, polygraphy lint, TensorRT rules): fp16 "
        f"{'passed' if r['validator']['fp16']['passed'] else 'FAILED'}, int8 "
        f"{'passed' if r['validator']['int8']['passed'] else 'FAILED'}; "
        f"{r['tensorrt_form']['quantizers_converted']} quantizers converted to signed INT8.",
        "",
        f"Engine build on the device: `{e['trtexec']}` (or `edgeskin engine build`).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
