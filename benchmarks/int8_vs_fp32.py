#!/usr/bin/env python
"""INT8 bundles against their FP32 student on one split (default: test, read once): agreement
(flipped decisions), top-1 drop, balanced-accuracy and melanoma-recall drops with 95 % paired
bootstrap intervals, per-class recall and ECE drops; and, when older bundles of the same targets
are given, the batch-1 latency of each new bundle over its old one from one interleaved run.

Usage:
    python benchmarks/int8_vs_fp32.py --student runs/quick/student --split runs/quick/split.csv \\
        --bundles runs/quick/bundles [--old OLD_BUNDLES_DIR] [--out benchmarks/results/int8_vs_fp32]
Writes OUT.json and OUT.md. The student is run in torch (FP32); each bundle through edgeskin's
runtime from the image files, as `edgeskin predict` does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np


def interleaved_ratio(new, old, x_new, x_old, *, rounds: int = 1000) -> dict:  # noqa: ANN001
    """Batch-1 latency of ``new`` over ``old`` from one interleaved run: one run of each per round,
    the order alternating. ``ratio``: the median over rounds of the paired ratio (a round's two runs
    see the same state of the host, so drifts cancel); ``ratio_of_medians`` the older summary."""
    for _ in range(20):
        new.probabilities(x_new)
        old.probabilities(x_old)
    tn, to = [], []
    for i in range(rounds):
        for pred, x, acc in ((new, x_new, tn), (old, x_old, to)) if i % 2 == 0 else ((old, x_old, to), (new, x_new, tn)):
            t = time.perf_counter()
            pred.probabilities(x)
            acc.append(time.perf_counter() - t)
    mn, mo = float(np.median(tn)) * 1e3, float(np.median(to)) * 1e3
    paired = np.asarray(tn) / np.asarray(to)
    return {"new_p50_ms": mn, "old_p50_ms": mo, "ratio": float(np.median(paired)),
            "ratio_iqr": [float(np.percentile(paired, 25)), float(np.percentile(paired, 75))],
            "ratio_of_medians": mn / mo, "rounds": rounds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", type=Path, required=True)
    ap.add_argument("--split", type=Path, required=True)
    ap.add_argument("--bundles", type=Path, required=True)
    ap.add_argument("--old", type=Path)
    ap.add_argument("--old-label", default="older bundles of the same targets",
                    help="What the --old bundles are, for the report.")
    ap.add_argument("--on", default="test")
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("EDGESKIN_DATA", "../shared/data/ham10000")))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--latency-threads", type=int, default=1,
                    help="Engine threads for the latency ratio. On the 2-core build machine two sessions of 2 "
                         "threads each, run in turns, measured a bundle against a copy of itself at 0.89 to 1.01; "
                         "at 1 thread 1.005 to 1.011.")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/int8_vs_fp32"))
    a = ap.parse_args()

    import torch

    from edgeskin.data import load_dataset, load_eval_set, read_split
    from edgeskin.metrics import classification_report, paired_bootstrap_drops
    from edgeskin.models import load_ensemble
    from edgeskin.runtime import load

    torch.set_num_threads(a.threads)
    ds = load_dataset(a.data)
    split = read_split(a.split)
    (ck,) = load_ensemble(a.student)
    kept, x, y = load_eval_set(split.apply(ds, a.on), ck.preprocess, ck.labels, what=a.on)
    codes = tuple(ck.labels.codes)
    with torch.no_grad():
        fp32 = np.concatenate([torch.softmax(ck.model.eval()(torch.from_numpy(x[s : s + 64])), 1).numpy()
                               for s in range(0, len(x), 64)])
    ref = classification_report(fp32, y, codes)
    mel = codes.index("mel") if "mel" in codes else None
    paths = [s.path for s in kept.samples]
    rows = []
    for b in sorted(a.bundles.glob("*.edgeskin")):
        pred = load(b, threads=a.threads)
        probs = np.concatenate([np.stack([p.probs for p in pred.predict(paths[s : s + 32], top_k=1)])
                                for s in range(0, len(paths), 32)])
        rep = classification_report(probs, y, codes)
        flips = int(np.sum(probs.argmax(1) != fp32.argmax(1)))
        ci = paired_bootstrap_drops(fp32, probs, y, positive=mel)
        row = {"bundle": b.name, "target": pred.manifest.target, "n": int(len(y)), "flipped": flips,
               "agreement": 1 - flips / len(y), "intervals": ci,
               "per_class_recall_drop": {c: 100 * ((ref["per_class"][c]["recall"] or 0.0)
                                                - (rep["per_class"][c]["recall"] or 0.0)) for c in codes},
               "ece": {"fp32": ref["ece"], "int8": rep["ece"], "drop": ref["ece"] - rep["ece"]},
               "forced": bool(pred.manifest.accuracy.get("forced")) if pred.manifest.accuracy else False}
        if a.old is not None and (a.old / b.name).is_dir():
            # both loaded afresh, with their own thread count (see --latency-threads)
            fresh, old = load(b, threads=a.latency_threads), load(a.old / b.name, threads=a.latency_threads)
            row["latency_vs_old"] = interleaved_ratio(fresh, old, fresh._tensor(paths[0])[None],
                                                      old._tensor(paths[0])[None])
            row["latency_vs_old"]["host_proxy"] = pred.manifest.target == "jetson"
        rows.append(row)
        print(b.name, f"agreement {100 * row['agreement']:.2f}% ({flips}/{len(y)} flipped)",
              {k: (None if v is None else round(v["point"], 2)) for k, v in ci.items()},
              row.get("latency_vs_old", {}).get("ratio"), flush=True)
    record = {"student": str(a.student), "split": str(a.split), "on": a.on, "n": int(len(y)),
              "fp32": {k: ref[k] for k in ("top1", "balanced_accuracy", "ece")}, "rows": rows,
              "old": None if a.old is None else a.old_label,
              "machine": f"{os.cpu_count()} CPUs, {platform.platform()}, threads {a.threads} (latency: "
                         f"{a.latency_threads})"}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(record, indent=2, default=float) + "\n")
    a.out.with_suffix(".md").write_text(render(record, codes))


def render(r: dict, codes: tuple[str, ...]) -> str:
    def iv(d: dict | None) -> str:
        return "-" if d is None else f"{d['point']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"

    lines = [f"# INT8 bundles against their FP32 student, {r['on']} split ({r['n']} images)", "",
             f"Student `{r['student']}`; FP32 top-1 {100 * r['fp32']['top1']:.1f}, balanced "
             f"{100 * r['fp32']['balanced_accuracy']:.1f}. Drops in points, positive = worse, with 95 % paired "
             "bootstrap intervals (1000 resamples). Produced by `benchmarks/int8_vs_fp32.py`.", "",
             "| bundle | agreement | flipped | top-1 drop | balanced drop | mel recall drop | ECE drop | "
             "batch-1 latency new/old |", "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lat = row.get("latency_vs_old")
        lat_s = "-" if lat is None else f"{lat['ratio']:.3f} ({lat['new_p50_ms']:.2f}/{lat['old_p50_ms']:.2f} ms" + (
            ", host proxy)" if lat["host_proxy"] else ")")
        ci = row["intervals"]
        lines.append(f"| {row['bundle']} | {100 * row['agreement']:.2f} % | {row['flipped']}/{row['n']} | "
                     f"{iv(ci['top1'])} | {iv(ci['balanced'])} | {iv(ci.get('mel_recall'))} | "
                     f"{row['ece']['drop']:+.4f} | {lat_s} |")
    if r.get("old"):
        lines += ["", f"Latency: batch 1 on this host, each bundle against its old one ({r['old']}) in one "
                  "interleaved run (both loaded afresh, one run of each per round, order alternating, 1000 rounds after "
                  "20 warm-up, engine threads as under Machine); "
                  "the ratio is the median of the per-round ratios, then the two medians in ms."]
    lines += ["", "Per-class recall drop (points, positive = worse):", "",
              "| bundle | " + " | ".join(codes) + " |", "|---|" + "---|" * len(codes)]
    for row in r["rows"]:
        lines.append(f"| {row['bundle']} | " + " | ".join(f"{row['per_class_recall_drop'][c]:+.2f}" for c in codes)
                     + " |")
    lines += ["", f"Machine: {r['machine']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
