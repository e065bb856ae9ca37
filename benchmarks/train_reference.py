#!/usr/bin/env python
"""Reference run: train a 3-member ResNet50 ensemble on the shared HAM10000 subset and
evaluate it on the test split; writes benchmarks/results/reference_ensemble.{md,json}.

Settings (chosen to finish within about an hour on a 2-core CPU): 112 px (resize 128, centre
crop 112), 15 epochs per member, batch 32, AdamW lr 1e-3 with one warm-up epoch then cosine,
members: class-weighted CE (seed 0), focal loss gamma 2 (seed 1), class-weighted CE (seed 2),
early stopping on validation balanced accuracy (patience 8). No ImageNet weights can be
downloaded here, so the members start from random initialisation unless torchvision's cache
holds them. The split is the shared reference ensemble's split.csv when present (so both
ensembles are scored on the same test images), else a new seed-0 split.

Usage:
    python benchmarks/train_reference.py [--data DIR] [--out runs/reference] [--epochs 15]
The weights stay in --out (not committed); the tables go to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path,
                    default=Path(os.environ.get("EDGESKIN_DATA", SHARED / "data" / "ham10000")))
    ap.add_argument("--split", type=Path, default=SHARED / "models" / "ham10000-r50x3-112" / "split.csv")
    ap.add_argument("--out", type=Path, default=Path("runs/reference"))
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--results", type=Path, default=HERE / "results")
    args = ap.parse_args()

    import torch

    from edgeskin.data import load_dataset, make_split, read_split, write_split
    from edgeskin.evaluate import evaluate
    from edgeskin.fileio import write_json
    from edgeskin.progress import RichReporter
    from edgeskin.train import TrainConfig, train_ensemble

    reporter = RichReporter()
    ds = load_dataset(args.data)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.split.is_file():
        split = read_split(args.split)
        split_note = f"shared reference split ({args.split.name})"
    else:
        split = make_split(ds, seed=0)
        split_note = "new lesion-disjoint split, seed 0"
    write_split(split, args.out / "split.csv")
    cfg = TrainConfig(arch="resnet50", size=args.size, epochs=args.epochs, batch_size=32, lr=1e-3,
                      patience=8, seed=0)
    t0 = time.time()
    results = train_ensemble(cfg, dataset=ds, split=split, out_dir=args.out, members=3,
                             seeds=[0, 1, 2], losses=["wce", "focal", "wce"], reporter=reporter)
    train_s = time.time() - t0
    ev = evaluate(args.out, dataset=ds, split=split, split_name="test", reporter=reporter)
    members_info = []
    for i, r in enumerate(results):
        meta = json.loads(Path(r.checkpoint).read_text())
        members_info.append({"member": f"member{i}", "loss": meta["recipe"]["loss"],
                             "seed": meta["recipe"]["config"]["seed"],
                             "initialisation": meta["recipe"]["initialisation"],
                             "best_epoch": r.best_epoch, "epochs_run": len(r.history),
                             "best_val_balanced_accuracy": r.best_score})
    record = {
        "what": "3 x ResNet50 reference ensemble trained by benchmarks/train_reference.py",
        "data": os.path.relpath(args.data, HERE.parent), "split": split_note, "split_sha256": split.sha256(),
        "config": cfg.to_dict(), "members": members_info, "train_seconds": round(train_s),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "test": ev.to_dict(),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    write_json(args.results / "reference_ensemble.json", record)
    (args.results / "reference_ensemble.md").write_text(markdown(record, ev.reports))
    print((args.results / "reference_ensemble.md").read_text())


def markdown(record: dict, reports: dict) -> str:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}"

    cfg = record["config"]
    lines = [
        "# Reference ensemble: 3 x ResNet50 on the shared HAM10000 subset",
        "",
        f"Produced by `benchmarks/train_reference.py`. Input {cfg['size']} px (resize "
        f"{round(cfg['size'] / 0.875)}, centre crop), up to {cfg['epochs']} epochs per member, batch "
        f"{cfg['batch_size']}, AdamW lr {cfg['lr']}, warm-up then cosine, early stopping on validation "
        f"balanced accuracy. Split: {record['split']}. Training took {record['train_seconds'] / 60:.0f} min "
        f"on {record['machine']['cpus']} CPU cores (torch {record['machine']['torch']}).",
        "",
        "| member | loss | seed | initialisation | best epoch | epochs run | best val bal. acc. |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in record["members"]:
        lines.append(f"| {m['member']} | {m['loss']} | {m['seed']} | {m['initialisation']} | {m['best_epoch']} "
                     f"| {m['epochs_run']} | {pct(m['best_val_balanced_accuracy'])} |")
    n = record["test"]["n"]
    lines += ["", f"## Test split ({n} images), in %", "",
              "| model | top-1 | top-2 | top-3 | balanced acc. | mel sensitivity | mel specificity | ECE |",
              "|---|---|---|---|---|---|---|---|"]
    for name, r in reports.items():
        lines.append(f"| {name} | {pct(r['top1'])} | {pct(r['top2'])} | {pct(r['top3'])} | "
                     f"{pct(r['balanced_accuracy'])} | {pct(r.get('mel_sensitivity'))} | "
                     f"{pct(r.get('mel_specificity'))} | {r['ece']:.3f} |")
    codes = next(iter(reports.values()))["class_order"]
    lines += ["", "Per-class recall (%):", "", "| model | " + " | ".join(codes) + " |",
              "|---|" + "---|" * len(codes)]
    for name, r in reports.items():
        lines.append(f"| {name} | " + " | ".join(pct(r["per_class"][c]["recall"]) for c in codes) + " |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
