#!/usr/bin/env python
"""Where post-training INT8 flips come from, as a noise budget. Training and validation images
only: the test split is not read.

For one student and its split:

1. **Margins.** The FP32 margin of an image is its top-1 logit minus its top-2 logit. ``p0`` is
   the density of margins near zero (the fraction of images below 0.05, per logit unit).
2. **Noise.** For each calibration draw (``--seeds``: 512 images drawn from one half of the
   training split), NNCF post-training INT8 with the recipe's settings (first convolution and
   classifier in float, no bias correction, ``--estimator``), in the ONNX Runtime (cpu) and
   TensorRT (host proxy) forms. Measured on the other half of the training split and on the
   validation split: the flipped decisions and ``sigma``, the standard deviation of the INT8
   model's margin between FP32's top two classes minus the FP32 margin.
3. **Model.** With noise of standard deviation sigma on the margin and a margin density flat near
   zero, the expected flips are ``N * p0 * sigma / sqrt(2 pi)``; the script prints it beside the
   measured count, once with the standard deviation and once with a robust one (1.4826 times the
   median absolute deviation), with quantiles of the margin change: where a few images move by
   far more than the rest (clipped outlier activations), the standard deviation is theirs and
   the robust form is the one that describes the near-ties.
4. **Attribution** (first seed, ``--per-quantizer``): sigma with only the weights quantized, and
   with the weights and one activation quantizer at a time; the variance each quantizer adds.

Usage:
    python benchmarks/int8_noise.py [--run runs/quick] [--model DIR] [--split CSV]
        [--seeds 0,1,2,3] [--estimator minmax] [--per-quantizer] [--out benchmarks/results/int8_noise.json]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

from _common import MarginProbe, ort_logits, recipe_ptq_options, student_run_args, training_halves

#: margin band that estimates the density near zero (logit units)
BAND = 0.05


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    student_run_args(ap)
    ap.add_argument("--seeds", default="0,1,2,3", help="calibration draws")
    ap.add_argument("--estimator", default="minmax", help="NNCF activation range estimator")
    ap.add_argument("--per-quantizer", action="store_true", help="attribute the noise to each quantizer (the first of --seeds)")
    ap.add_argument("--member", help="one member of an ensemble folder (by name)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/int8_noise.json"))
    a = ap.parse_args()

    import onnx

    from edgeskin.fileio import write_json
    from edgeskin.quantize import quantize_onnx
    from edgeskin.quantize.fallback import activation_pairs, remove_pairs
    from edgeskin.quantize.tensorrt import to_tensorrt_int8

    model = a.model or a.run / "student"
    split_path = a.split or a.run / "split.csv"
    prep, xt, pool, held = training_halves(model, split_path, a.data, member=a.member, threads=a.threads)
    base = onnx.load(prep.onnx_path)

    def logits(proto, x: np.ndarray) -> np.ndarray:  # noqa: ANN001
        return ort_logits(proto.SerializeToString(), x, threads=a.threads)

    sets = {"train_heldout": xt[held], "val": prep.val_inputs}
    probe = MarginProbe({k: logits(base, x) for k, x in sets.items()})
    m0 = probe.gap0
    density = {k: float(np.mean(m < BAND) / BAND) for k, m in m0.items()}
    quant = {k: [float(np.quantile(m, q)) for q in (0.01, 0.05, 0.10, 0.50)] for k, m in m0.items()}
    print(f"{model}: margin density near 0 (per logit unit): "
          + ", ".join(f"{k} {density[k]:.2f} (n={len(m0[k])})" for k in sets), flush=True)

    def measure(proto) -> dict[str, dict[str, float]]:  # noqa: ANN001
        out = {}
        for k, x in sets.items():
            flips, delta, sigma, robust = probe.change(k, logits(proto, x))
            out[k] = {"flips": flips, "n": len(x), "sigma": sigma,
                      "predicted_flips": len(x) * density[k] * sigma / math.sqrt(2 * math.pi),
                      "sigma_robust": robust,
                      "predicted_flips_robust": len(x) * density[k] * robust / math.sqrt(2 * math.pi),
                      "abs_delta_50_90_99_max": [float(v) for v in np.quantile(np.abs(delta), [0.5, 0.9, 0.99, 1.0])]}
        return out

    opts = recipe_ptq_options(a.estimator)
    seeds = [int(s) for s in a.seeds.split(",")]
    draws, attribution = [], {}
    for j, seed in enumerate(seeds):
        t = time.perf_counter()
        idx = np.random.default_rng(seed).choice(pool, size=min(512, len(pool)), replace=False)
        q, _ = quantize_onnx(base, [xt[i : i + 1] for i in idx], opts)
        forms = {"cpu": q, "jetson": to_tensorrt_int8(q)[0]}
        row = {"seed": seed}
        for name, proto in forms.items():
            row[name] = measure(proto)
            r = row[name]
            print(f"seed {seed} {name}: " + "; ".join(
                f"{k} flips {r[k]['flips']}/{r[k]['n']} (model {r[k]['predicted_flips']:.1f}, robust "
                f"{r[k]['predicted_flips_robust']:.1f}), sigma {r[k]['sigma']:.4f} (robust {r[k]['sigma_robust']:.4f}), "
                f"|delta| 99 % {r[k]['abs_delta_50_90_99_max'][2]:.3f} max {r[k]['abs_delta_50_90_99_max'][3]:.3f}"
                for k in sets), flush=True)
        draws.append(row)
        if j == 0:
            for name, proto in forms.items():
                pairs = activation_pairs(proto)
                w = measure(remove_pairs(proto, pairs))["train_heldout"]["sigma"]
                att = {"weights_only_sigma": w, "all_sigma": row[name]["train_heldout"]["sigma"],
                       "activation_quantizers": len(pairs)}
                if a.per_quantizer:
                    added = {}
                    for p in pairs:
                        s = measure(remove_pairs(proto, [o for o in pairs if o is not p]))["train_heldout"]["sigma"]
                        added[p.tensor] = s * s - w * w
                    att["added_variance"] = dict(sorted(added.items(), key=lambda kv: -kv[1]))
                attribution[name] = att
                print(f"{name}: sigma weights only {w:.4f}, all {att['all_sigma']:.4f}, "
                      f"{len(pairs)} activation quantizers", flush=True)
        print(f"  ({time.perf_counter() - t:.0f} s)", flush=True)
    record = {"model": str(model), "split": str(split_path), "estimator": a.estimator, "band": BAND,
              "eval_sets": {k: len(x) for k, x in sets.items()}, "margin_density": density,
              "margin_quantiles_1_5_10_50": quant, "draws": draws, "attribution": attribution,
              "note": "test split not read; calibration drawn from the training half not evaluated"}
    write_json(a.out, record)
    prep.close()


if __name__ == "__main__":
    main()
