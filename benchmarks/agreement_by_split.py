#!/usr/bin/env python
"""Top-1 agreement of INT8 ONNX graphs with their FP32 student on the training and validation
splits (never the test split): shows whether a quantization-aware graph lost agreement on the very
images it was fine-tuned on, or only on held-out ones.

Usage:
    python benchmarks/agreement_by_split.py --student runs/quick/student --split runs/quick/split.csv \\
        GRAPH.onnx [GRAPH.onnx ...]
GRAPH: a bundle's model.onnx (post-training INT8) or a student.qat-TARGET.onnx. Prints one line per
graph and split.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", type=Path, required=True)
    ap.add_argument("--split", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("EDGESKIN_DATA", "../shared/data/ham10000")))
    ap.add_argument("--on", default="train,val", help="Comma-separated: train, val (the test split is refused).")
    ap.add_argument("graphs", type=Path, nargs="+")
    a = ap.parse_args()
    splits = [s.strip() for s in a.on.split(",") if s.strip()]
    if "test" in splits:
        raise SystemExit("agreement_by_split.py reads no test images: tune and diagnose on train/val only")

    import torch

    from edgeskin.data import load_dataset, load_eval_set, read_split
    from edgeskin.models import load_ensemble
    from edgeskin.runtime.backends import OnnxRuntimeBackend

    torch.set_num_threads(2)
    ds = load_dataset(a.data)
    split = read_split(a.split)
    (ck,) = load_ensemble(a.student)
    model = ck.model.float().eval()
    for on in splits:
        _, x, _ = load_eval_set(split.apply(ds, on), ck.preprocess, ck.labels, what=on)
        with torch.no_grad():
            fp32 = np.concatenate([model(torch.from_numpy(x[s : s + 64])).numpy()
                                   for s in range(0, len(x), 64)]).argmax(1)
        for g in a.graphs:
            b = OnnxRuntimeBackend(g.read_bytes())
            q = np.concatenate([b.run(x[s : s + 64]) for s in range(0, len(x), 64)]).argmax(1)
            print(f"{on}\t{g}\t{100 * np.mean(q == fp32):.2f} % of {len(x)}", flush=True)


if __name__ == "__main__":
    main()
