#!/usr/bin/env python
"""Are a student's activation outliers in a few channels or in a few images? Training images
only: the test split is not read.

For every tensor that post-training INT8 quantizes (NNCF's placement with the recipe's settings:
first convolution and classifier in float), the FP32 model is run on ``--images`` training images
not used for calibration, and the script reports, per tensor:

- ``image_ratio``: the largest image's maximum |activation| over the median image's maximum. A
  large value means a few images drive the tensor far beyond its usual range; one per-tensor
  range then either clips them (``mean_minmax``) or spends its 256 steps on them (``minmax``).
- ``channel_ratio``: the largest channel's maximum over the median channel's, and
  ``top_over_second``: the largest over the second largest. Large values mean one or a few
  channels carry the outliers, which per-channel equalisation can move into the weights.

Usage:
    python benchmarks/int8_outliers.py --model runs/distill/resnet50 \\
        --split ../shared/models/ham10000-r50x3-112/split.csv [--images 400] \\
        [--out benchmarks/results/int8_outliers_r50.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from _common import data_arg, recipe_ptq_options, training_halves


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("runs/quick/student"))
    ap.add_argument("--split", type=Path, default=Path("runs/quick/split.csv"))
    data_arg(ap)
    ap.add_argument("--images", type=int, default=400, help="held-out training images to run")
    ap.add_argument("--member", help="one member of an ensemble folder (by name)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/int8_outliers.json"))
    a = ap.parse_args()

    import onnx
    import onnxruntime as ort

    from edgeskin.fileio import write_json
    from edgeskin.quantize import quantize_onnx
    from edgeskin.quantize.fallback import activation_pairs

    prep, xt, pool, held = training_halves(a.model, a.split, a.data, member=a.member, threads=a.threads)
    # quantized only to learn which tensors NNCF quantizes (the placement, not the ranges)
    idx = np.random.default_rng(0).choice(pool, size=min(64, len(pool)), replace=False)
    base = onnx.load(prep.onnx_path)
    q, _ = quantize_onnx(base, [xt[i : i + 1] for i in idx], recipe_ptq_options("mean_minmax"))
    tensors = [p.tensor for p in activation_pairs(q)]
    outputs = {v.name for v in base.graph.output}
    for t in tensors:
        if t not in outputs:
            base.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    sess = ort.InferenceSession(base.SerializeToString(), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    x = xt[held[: a.images]]
    chmax: dict[str, np.ndarray] = {}
    immax: dict[str, list[float]] = {t: [] for t in tensors}
    for i in range(0, len(x), 32):
        for t, o in zip(tensors, sess.run(tensors, {name: x[i : i + 32]})):
            v = np.abs(o)
            c = v.max(axis=(0, 2, 3)) if v.ndim == 4 else v.max(axis=0)
            chmax[t] = np.maximum(chmax[t], c) if t in chmax else c
            immax[t].extend(v.reshape(len(v), -1).max(1).tolist())
    rows = []
    for t in tensors:
        c, im = np.sort(chmax[t]), np.array(immax[t])
        rows.append({"tensor": t, "image_ratio": float(im.max() / max(np.median(im), 1e-12)),
                     "image_ratio_p99": float(np.quantile(im, 0.99) / max(np.median(im), 1e-12)),
                     "channel_ratio": float(c[-1] / max(np.median(c), 1e-12)),
                     "top_over_second": float(c[-1] / max(c[-2], 1e-12)) if len(c) > 1 else 1.0,
                     "channels": len(c)})
    rows.sort(key=lambda r: -r["image_ratio"])
    print(f"{'tensor':<48} image max/median (p99/median)  channel max/median  top/2nd")
    for r in rows[:15]:
        print(f"{r['tensor'][-48:]:<48} {r['image_ratio']:8.1f} ({r['image_ratio_p99']:5.1f})"
              f"  {r['channel_ratio']:8.1f}  {r['top_over_second']:6.2f}")
    write_json(a.out, {"model": str(a.model), "split": str(a.split), "images": len(x),
                       "note": "held-out training images; the test split is not read", "tensors": rows})
    prep.close()


if __name__ == "__main__":
    main()
