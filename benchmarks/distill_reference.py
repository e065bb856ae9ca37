#!/usr/bin/env python
"""Distil the reference ensemble into one ResNet50 and one small student; writes
benchmarks/results/distill.{md,json}.

Teacher: the shared reference ensemble (3 x ResNet50, 112 px, mean of softmax) and its
split. Students are trained on the train split, early-stopped on the validation split's
balanced accuracy, and the test split is read once, for the final report. Loss:
alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * class-weighted cross-entropy,
the teacher running online on each augmented view.

Default settings (chosen to fit a 2-core CPU in well under an hour):
  resnet50: initialised from the best teacher member (by validation balanced accuracy),
            all stages trained, 8 epochs, AdamW peak lr 3.3e-4, T 4, alpha 0.7
  resnet18: no ImageNet weights here, so random initialisation, 15 epochs, lr 1e-3

Usage:
    python benchmarks/distill_reference.py [--data DIR] [--teacher DIR] [--out runs/distill]
        [--students resnet50,resnet18] [--epochs-r50 8] [--epochs-small 15]
Weights stay in --out (not committed); the tables go to benchmarks/results/. Re-running skips
students already trained and only re-renders the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"

TARGET_TOP1, TARGET_BAL, TARGET_LAT = 1.0, 2.0, 1 / 3


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def render(record: dict) -> str:
    lines = [
        "# Distillation of the reference ensemble",
        "",
        f"Teacher: `{record['teacher']}` (3 x ResNet50, 112 px, mean of softmax). Test split of its "
        f"split.csv ({record['n_test']} images), read once after training; students early-stopped "
        "on the validation split. Produced by `benchmarks/distill_reference.py`.",
        "",
        "| model | init | epochs (best) | top-1 | top-2 | top-3 | bal. acc. | mel sens. | agreement | "
        "ORT p50 ms (x teacher) | torch p50 ms (x teacher) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def lat(r: dict, who: str, engine: str) -> str:
        v = r.get("latency", {}).get(engine, {})
        if who not in v:
            return "-"
        return f"{v[who]['p50_ms']:.1f} ({v[who]['p50_ms'] / v['teacher']['p50_ms']:.2f})"

    first = record["students"][0]["report"]
    t = first["teacher"]
    lines.append(f"| teacher (ensemble) | - | - | {_pct(t['top1'])} | {_pct(t['top2'])} | {_pct(t['top3'])} | "
                 f"{_pct(t['balanced_accuracy'])} | {_pct(t['mel_sensitivity'])} | - | "
                 f"{lat(first, 'teacher', 'onnxruntime')} | {lat(first, 'teacher', 'torch')} |")
    for s in record["students"]:
        r = s["report"]
        m = r["student"]
        lines.append(
            f"| {s['arch']} student | {s['init']} | {s['epochs_run']} ({s['best_epoch']}) | {_pct(m['top1'])} | "
            f"{_pct(m['top2'])} | {_pct(m['top3'])} | {_pct(m['balanced_accuracy'])} | "
            f"{_pct(m['mel_sensitivity'])} | {_pct(r['top1_agreement'])} | "
            f"{lat(r, 'student', 'onnxruntime')} | {lat(r, 'student', 'torch')} |")
    lines += ["", "Latency: batch 1 on this CPU, FP32, median of interleaved runs (teacher and student "
              "alternating in one run per engine). ORT = ONNX Runtime, the engine the host bundle runs; "
              "the teacher is one ONNX graph holding its 3 members and their mean softmax.", ""]
    lines += ["## Targets (resnet50 student)", ""]
    for s in record["students"]:
        if s["arch"] != "resnet50":
            continue
        d = s["report"]["drops_points"]
        ratio = s["report"].get("latency", {}).get("onnxruntime", {}).get("student_over_teacher")
        lines += [
            f"- top-1 within {TARGET_TOP1} point of the ensemble: drop {d['top1']:.2f} -> "
            f"{'met' if d['top1'] <= TARGET_TOP1 else 'NOT met'}",
            f"- balanced accuracy within {TARGET_BAL} points: drop {d['balanced']:.2f} -> "
            f"{'met' if d['balanced'] <= TARGET_BAL else 'NOT met'}",
            f"- ONNX Runtime latency at most one third of the ensemble's: {ratio:.3f} -> "
            f"{'met' if ratio is not None and ratio <= TARGET_LAT else 'NOT met'}" if ratio else "- latency: not measured",
        ]
    lines += ["", "## Settings", ""]
    for s in record["students"]:
        lines.append(f"- {s['arch']}: {json.dumps(s['settings'])}; {s['train_seconds']} s of training")
    lines += ["", f"Machine: {record['machine']['cpus']} CPUs, {record['machine']['platform']}, "
              f"torch {record['machine']['torch']}.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path,
                    default=Path(os.environ.get("EDGESKIN_DATA", SHARED / "data" / "ham10000")))
    ap.add_argument("--teacher", type=Path, default=SHARED / "models" / "ham10000-r50x3-112")
    ap.add_argument("--out", type=Path, default=Path("runs/distill"))
    ap.add_argument("--students", default="resnet50,resnet18")
    ap.add_argument("--epochs-r50", type=int, default=8)
    ap.add_argument("--epochs-small", type=int, default=15)
    ap.add_argument("--lr-r50", type=float, default=1e-3 / 3)
    ap.add_argument("--lr-small", type=float, default=1e-3)
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--alpha", type=float, default=0.7)
    ap.add_argument("--latency-runs", type=int, default=50)
    ap.add_argument("--results", type=Path, default=HERE / "results")
    args = ap.parse_args()

    import torch

    from edgeskin.data import load_dataset, read_split
    from edgeskin.fileio import atomic_write_bytes, write_json
    from edgeskin.progress import RichReporter
    from edgeskin.train import DistillConfig, TrainConfig, distill

    reporter = RichReporter()
    ds = load_dataset(args.data)
    split = read_split(args.teacher / "split.csv")
    students = []
    for arch in [a.strip() for a in args.students.split(",") if a.strip()]:
        r50 = arch == "resnet50"
        settings = {"init": "member" if r50 else "auto", "epochs": args.epochs_r50 if r50 else args.epochs_small,
                    "lr": args.lr_r50 if r50 else args.lr_small, "temperature": args.temperature,
                    "alpha": args.alpha, "hard_loss": "wce", "batch_size": 32, "augment": True}
        tcfg = TrainConfig(arch=arch, epochs=settings["epochs"], lr=settings["lr"], batch_size=32, loss="wce",
                           patience=8, seed=0)
        cfg = DistillConfig(train=tcfg, temperature=args.temperature, alpha=args.alpha, init=settings["init"])
        res = distill(args.teacher, cfg, dataset=ds, split=split, out_dir=args.out / arch,
                      latency_runs=args.latency_runs, reporter=reporter)
        meta = json.loads(res.checkpoint.read_text())
        students.append({
            "arch": arch, "init": res.initialisation.split(":")[0] + (
                f" ({res.initialisation.split(':')[1]})" if res.initialisation.startswith("member") else ""),
            "settings": settings, "best_epoch": res.best_epoch, "epochs_run": len(meta["recipe"]["history"]),
            "history": meta["recipe"]["history"],
            "train_seconds": round(sum(h["seconds"] for h in meta["recipe"]["history"])),
            "report": res.report,
        })
    record = {
        "what": "reference ensemble distilled by benchmarks/distill_reference.py",
        "teacher": os.path.relpath(args.teacher, HERE.parent), "data": os.path.relpath(args.data, HERE.parent),
        "split_sha256": split.sha256(), "n_test": students[0]["report"]["n"], "students": students,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
    }
    args.results.mkdir(parents=True, exist_ok=True)
    write_json(args.results / "distill.json", record)
    atomic_write_bytes(args.results / "distill.md", render(record).encode())
    print(render(record))


if __name__ == "__main__":
    main()
