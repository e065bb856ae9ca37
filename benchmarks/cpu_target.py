#!/usr/bin/env python
"""Compile the reference model to cpu fp32 and int8 bundles and measure them on the test split.

Model: --model (default: the member of ../shared/models/ham10000-r50x3-112 with the best
*validation* balanced accuracy; a distilled student once one exists). Calibration: 512
class-stratified training images (seed 0), manifest written to calibration/. Quantization
options are chosen on the validation split only (see the flags); the test split is read once,
for the table. Latency: batch 1 through edgeskin.runtime, fp32 and int8 interleaved in one
run, warm-up then --runs timed runs each, medians reported.

Writes benchmarks/results/cpu_target.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import numpy as np

from _common import HERE, best_reference_member, metric_cells, model_args, pct, run_or_render, test_predictions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(ap)  # --calib is ignored: this benchmark draws (and commits) its calibration set
    ap.add_argument("--out", type=Path, default=Path("runs/bench-cpu"))
    ap.add_argument("--calib-size", type=int, default=512)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--range-estimator", default="mean_minmax")
    ap.add_argument("--preset", default="performance")
    ap.add_argument("--ignore", action="append", default=[])
    ap.add_argument("--max-drop-int8", type=float, default=None)
    ap.add_argument("--control-metric", default="agreement")
    ap.add_argument("--float-fallback", type=float, default=None)
    ap.add_argument("--fallback-max-layers", type=int, default=12)
    ap.add_argument("--first-conv-float", action="store_true")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    args = ap.parse_args()

    from edgeskin.bench import interleaved_latency
    from edgeskin.calibration import make_calibration_set, write_calibration_set
    from edgeskin.data import load_dataset, read_split
    from edgeskin.metrics import classification_report
    from edgeskin.fileio import write_json
    from edgeskin.progress import RichReporter
    from edgeskin.quantize import QuantizeOptions
    from edgeskin.runtime import load
    from edgeskin.targets import get_target

    rep = RichReporter()
    member = best_reference_member(args.model, args.member)
    ds = load_dataset(args.data)
    split = read_split(args.split)
    cal = make_calibration_set(ds, split, size=args.calib_size, seed=0)
    cal.manifest["data"] = os.path.relpath(cal.manifest["data"], HERE.parent)  # no machine paths in git
    cal_path = write_calibration_set(cal, HERE.parent / "calibration")
    args.out.mkdir(parents=True, exist_ok=True)
    cpu = get_target("cpu")
    q = QuantizeOptions(range_estimator=args.range_estimator, preset=args.preset, ignored=tuple(args.ignore), first_conv_float=args.first_conv_float,
                        max_drop=args.max_drop_int8, control_metric=args.control_metric,
                        fallback_agreement=args.float_fallback, fallback_max_layers=args.fallback_max_layers)
    bundles, checks = {}, {}
    for precision in ("fp32", "int8"):
        res = cpu.compile(args.model, member=member, precision=precision, dataset=ds, split=split,
                          out=args.out / f"{precision}.edgeskin", calibration=cal if precision == "int8" else None,
                          quantize=q, force=True, overwrite=True, threads=args.threads, reporter=rep)
        bundles[precision], checks[precision] = res.bundle, res.check

    preds, x, y, probs = test_predictions(bundles, ds, split, threads=args.threads)
    codes = preds["fp32"].labels
    reports = {p: classification_report(pr, y, codes) for p, pr in probs.items()}
    agreement = float(np.mean(probs["int8"].argmax(1) == probs["fp32"].argmax(1)))
    # batch-1 latency with 1 and 2 intra-op threads (on a 2-core machine a single thread is
    # often faster at batch 1); each thread count interleaves fp32 and int8 in one run
    lat_by_threads = {}
    for th in (1, 2):
        runners = {p: load(b, threads=th).logits for p, b in bundles.items()}
        lat_by_threads[th] = interleaved_latency(runners, x[:1], runs=args.runs, warmup=10)
    lat = lat_by_threads[args.threads]
    sizes = {p: (Path(b) / "model.onnx").stat().st_size for p, b in bundles.items()}
    record = {
        "model": os.path.relpath(args.model, HERE.parent), "member": member,
        "split": os.path.relpath(args.split, HERE.parent), "calibration": cal.summary(),
        "calibration_manifest": str(cal_path.relative_to(HERE.parent)), "quantization": q.to_dict(),
        "validation_checks": checks, "test": {p: {k: r[k] for k in ("n", "top1", "top2", "top3", "balanced_accuracy",
                                                                    "mel_sensitivity", "ece")} for p, r in reports.items()},
        "test_top1_agreement": agreement, "latency_ms": {p: s.to_dict() for p, s in lat.items()},
        "fp32_over_int8_p50": lat["fp32"].p50_ms / lat["int8"].p50_ms, "model_bytes": sizes,
        "latency_ms_by_threads": {str(th): {p: s.to_dict() for p, s in v.items()} for th, v in lat_by_threads.items()},
        "fp32_over_int8_p50_by_threads": {str(th): v["fp32"].p50_ms / v["int8"].p50_ms for th, v in lat_by_threads.items()},
        "threads": args.threads, "machine": {"cpus": os.cpu_count(), "processor": platform.processor(),
                                             "platform": platform.platform()},
    }
    args.results.mkdir(parents=True, exist_ok=True)
    write_json(args.results / "cpu_target.json", record)
    (args.results / "cpu_target.md").write_text(markdown(record))
    print((args.results / "cpu_target.md").read_text())


def markdown(r: dict) -> str:
    t = r["test"]
    lines = [
        "# cpu target: FP32 vs INT8 (ONNX Runtime) on the reference model",
        "",
        f"Model: `{r['model']}` {r['member'] or ''}; split `{r['split']}`; calibration "
        f"`{r['calibration_manifest']}` ({r['calibration']['size']} training images). Quantization options "
        f"(chosen on the validation split): `{json.dumps(r['quantization'])}`. Produced by `benchmarks/cpu_target.py`.",
        "",
        f"## Test split ({t['fp32']['n']} images), in %",
        "",
        "| bundle | top-1 | top-2 | top-3 | balanced acc. | mel recall | ECE | model file |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in ("fp32", "int8"):
        lines.append(f"| cpu/{p} | {metric_cells(t[p])} | "
                     f"{r['model_bytes'][p] / 1e6:.1f} MB |")
    d = {k: 100 * (t['fp32'][k] - t['int8'][k]) for k in ("top1", "balanced_accuracy", "mel_sensitivity")}
    lines += [
        "",
        f"INT8 vs FP32 on test: top-1 drop {d['top1']:.2f} points, balanced-accuracy drop "
        f"{d['balanced_accuracy']:.2f}, melanoma-recall drop {d['mel_sensitivity']:.2f}; top-1 agreement "
        f"**{pct(r['test_top1_agreement'])} %**.",
        "",
        f"Validation split (used for the compile-time check): agreement "
        f"{pct(r['validation_checks']['int8']['top1_agreement'])} %, drops "
        + ", ".join(f"{k} {v:.2f}" for k, v in r['validation_checks']['int8']['drops_points'].items()) + ".",
        "",
        f"## Latency (batch 1, {r['threads']} threads, {r['latency_ms']['fp32']['runs']} interleaved runs each, ms)",
        "",
        "| bundle | p50 | p90 | p99 | mean |",
        "|---|---|---|---|---|",
    ]
    for p in ("fp32", "int8"):
        s = r["latency_ms"][p]
        lines.append(f"| cpu/{p} | {s['p50_ms']:.2f} | {s['p90_ms']:.2f} | {s['p99_ms']:.2f} | {s['mean_ms']:.2f} |")
    lines += ["", f"FP32 / INT8 median latency: **{r['fp32_over_int8_p50']:.2f}x** "
              f"(CPU: {r['machine']['processor'] or r['machine']['platform']}, {r['machine']['cpus']} cores).", ""]
    if "latency_ms_by_threads" in r:
        lines += ["By intra-op thread count (batch 1, medians of interleaved runs, ms):", "",
                  "| threads | fp32 p50 | int8 p50 | fp32 / int8 |", "|---|---|---|---|"]
        for th, v in r["latency_ms_by_threads"].items():
            lines.append(f"| {th} | {v['fp32']['p50_ms']:.2f} | {v['int8']['p50_ms']:.2f} | "
                         f"{r['fp32_over_int8_p50_by_threads'][th]:.2f}x |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    run_or_render("cpu_target", main, markdown)
