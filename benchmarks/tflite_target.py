#!/usr/bin/env python
"""Compile the reference model to LiteRT fp32, fp16 and int8 bundles and measure them on the
test split through the runtime; writes benchmarks/results/tflite_target.{md,json}.

Model: --model (default: the best member, by validation balanced accuracy, of the shared
reference ensemble). Calibration: the committed calibration/train-512-seed0-*.json set (the
other targets'). INT8 options (--observer, --int8-adds, --subset-size, --first-conv-float) are
chosen on the validation split only (`--val-only` compiles and prints the validation check
without reading the test split); the test split is read once, for the table. Latency: batch 1
through edgeskin.runtime (LiteRT with XNNPACK), all bundles interleaved in one run, warm-up
then --runs timed runs each, medians; at 1 and 2 threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import numpy as np

from _common import HERE, load_inputs, metric_cells, model_args, pct, run_or_render, test_predictions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(ap)
    ap.add_argument("--observer", default="mean_minmax")
    ap.add_argument("--subset-size", type=int, default=512)
    ap.add_argument("--int8-adds", action="store_true")
    ap.add_argument("--first-conv-float", action="store_true")
    ap.add_argument("--layout", default="NHWC")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--val-only", action="store_true", help="compile int8 only and print the validation check")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-tflite"))
    ap.add_argument("--results", type=Path, default=HERE / "results")
    args = ap.parse_args()

    from edgeskin.bench import interleaved_latency
    from edgeskin.fileio import atomic_write_bytes, write_json
    from edgeskin.metrics import classification_report
    from edgeskin.progress import RichReporter
    from edgeskin.runtime import load
    from edgeskin.targets import get_target

    rep = RichReporter()
    member, calib, cal, ds, split = load_inputs(args)
    phone = get_target("tflite")
    int8_opts = dict(observer=args.observer, subset_size=args.subset_size, int8_adds=args.int8_adds,
                     first_conv_float=args.first_conv_float)
    bundles, checks = {}, {}
    for precision in (("int8",) if args.val_only else ("fp32", "fp16", "int8")):
        res = phone.compile(args.model, member=member, precision=precision, dataset=ds, split=split,
                            out=args.out / f"{precision}.edgeskin", calibration=cal, layout=args.layout,
                            force=True, overwrite=True, threads=2, reporter=rep,
                            **(int8_opts if precision == "int8" else {}))
        bundles[precision], checks[precision] = res.bundle, res.check
    if args.val_only:
        c = checks["int8"]
        print(json.dumps({"options": int8_opts, "val_top1_agreement": c["top1_agreement"],
                          "val_drops_points": c["drops_points"]}, indent=1))
        return

    preds, x, y, probs = test_predictions(bundles, ds, split, threads=2)
    codes = preds["fp32"].labels
    reports = {p: classification_report(pr, y, codes) for p, pr in probs.items()}
    agreement = {p: float(np.mean(probs[p].argmax(1) == probs["fp32"].argmax(1))) for p in probs}
    lat_by_threads = {}
    for th in (1, 2):
        runners = {p: load(b, threads=th).logits for p, b in bundles.items()}
        lat_by_threads[th] = interleaved_latency(runners, x[:1], runs=args.runs, warmup=10)
    sizes = {p: (Path(b) / "model.tflite").stat().st_size for p, b in bundles.items()}
    m8 = preds["int8"].manifest
    record = {
        "model": os.path.relpath(args.model, HERE.parent), "member": member,
        "split": os.path.relpath(args.split, HERE.parent), "calibration": str(Path(calib).relative_to(HERE.parent)),
        "layout": args.layout, "int8_options": int8_opts, "conversion": m8.provenance["conversion"],
        "int8_io": {"input": {"dtype": m8.input.dtype, "scale": m8.input.scale, "zero_point": m8.input.zero_point},
                    "output": m8.output},
        "validation_checks": checks,
        "test": {p: {k: r[k] for k in ("n", "top1", "top2", "top3", "balanced_accuracy", "mel_sensitivity", "ece")}
                 for p, r in reports.items()},
        "test_top1_agreement_vs_fp32": agreement, "model_bytes": sizes,
        "latency_ms_by_threads": {str(th): {p: s.to_dict() for p, s in v.items()} for th, v in lat_by_threads.items()},
        "fp32_over_int8_p50_by_threads": {str(th): v["fp32"].p50_ms / v["int8"].p50_ms
                                          for th, v in lat_by_threads.items()},
        "runtime": {"package": preds["int8"].backend.package, "version": preds["int8"].backend.version},
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor(), "platform": platform.platform()},
    }
    args.results.mkdir(parents=True, exist_ok=True)
    write_json(args.results / "tflite_target.json", record)
    atomic_write_bytes(args.results / "tflite_target.md", markdown(record).encode())
    print(markdown(record))


def markdown(r: dict) -> str:
    t, a = r["test"], r["test_top1_agreement_vs_fp32"]
    lines = [
        "# tflite target: LiteRT FP32 / FP16 / INT8 on the reference model",
        "",
        f"Model: `{r['model']}` {r['member'] or ''}; split `{r['split']}`; calibration `{r['calibration']}`; "
        f"input layout {r['layout']}. INT8 options (chosen on the validation split): "
        f"`{json.dumps(r['int8_options'])}`. Produced by `benchmarks/tflite_target.py`; measured through "
        f"edgeskin.runtime ({r['runtime']['package']} {r['runtime']['version']}, XNNPACK).",
        "",
        f"## Test split ({t['int8']['n']} images), in %",
        "",
        "| bundle | top-1 | top-2 | top-3 | balanced acc. | mel recall | ECE | top-1 agreement with FP32 | model file |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in ("fp32", "fp16", "int8"):
        lines.append(f"| tflite/{p} | {metric_cells(t[p])} | "
                     f"{'-' if p == 'fp32' else pct(a[p])} | {r['model_bytes'][p] / 1e6:.1f} MB |")
    d = {k: 100 * (t['fp32'][k] - t['int8'][k]) for k in ("top1", "balanced_accuracy", "mel_sensitivity")}
    io = r["int8_io"]
    lines += [
        "",
        f"INT8 vs FP32 on test: top-1 drop {d['top1']:.2f} points, balanced-accuracy drop "
        f"{d['balanced_accuracy']:.2f}, melanoma-recall drop {d['mel_sensitivity']:.2f}; top-1 agreement "
        f"**{pct(a['int8'])} %**; INT8 file {r['model_bytes']['int8'] / 1e6:.1f} MB.",
        "",
        f"INT8 I/O: input {io['input']['dtype']}"
        + (f" (scale {io['input']['scale']:.6g}, zero point {io['input']['zero_point']})"
           if io["input"]["scale"] is not None else " (the first convolution runs in float)")
        + f", output {io['output'].get('dtype', 'float32')} logits.",
        "",
        f"Validation split (compile-time check): INT8 agreement {pct(r['validation_checks']['int8']['top1_agreement'])} %.",
        "",
        "## Latency (batch 1, medians of interleaved runs, ms)",
        "",
        "| threads | fp32 p50 | fp16 p50 | int8 p50 | fp32 / int8 |",
        "|---|---|---|---|---|",
    ]
    for th, v in r["latency_ms_by_threads"].items():
        lines.append(f"| {th} | {v['fp32']['p50_ms']:.2f} | {v['fp16']['p50_ms']:.2f} | {v['int8']['p50_ms']:.2f} | "
                     f"{r['fp32_over_int8_p50_by_threads'][th]:.2f}x |")
    lines += ["", f"CPU: {r['machine']['processor'] or r['machine']['platform']}, {r['machine']['cpus']} cores.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    run_or_render("tflite_target", main, markdown)
