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

``--phone`` measures the phone form instead (on --model, e.g. the quick recipe's distilled
student, with its --split and --calib) and merges a ``phone`` section into the results: the
default form (uint8 pixels in, probabilities out) against the form recipes made before it
(normalised float input, logits out), both int8 with the recipe's options; MediaPipe's
ImageClassifier (created from model.tflite alone, as an app) against edgeskin's runtime on the
validation images, pre-cropped, with a centre region of interest and on the whole image; the
whole-image resize against edgeskin's crop (agreement, balanced accuracy); what folding the
per-channel normalisation into the first convolution would change at its zero-padded borders;
and model.tflite's latency on LiteRT XNNPACK, both forms interleaved, at 1 and 2 threads. Only
the validation split is read.
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
    ap.add_argument("--phone", action="store_true", help="measure the phone form (see above); validation only")
    ap.add_argument("--max-val", type=int, default=None, help="--phone: at most this many validation images")
    ap.add_argument("--note", default="", help="--phone: what the model is, for the results file")
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
    if args.phone:
        return phone_main(args, member, calib, cal, ds, split, rep)
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


def _fold_normalisation_check(model_dir: Path, member: str | None, x: np.ndarray) -> dict:
    """FP32 in torch on the validation tensors ``x``: the network as trained (normalise, then the
    first convolution zero-pads the normalised image) against the same network with the
    normalisation folded into the first convolution (which then zero-pads raw pixels, i.e. pads
    with -mean/std in normalised units)."""
    import copy

    import torch

    from edgeskin.targets.prepare import select_member
    from edgeskin.targets.tflite import pixels

    ck = select_member(model_dir, member, target="tflite")
    pre = ck.preprocess
    net = ck.model.float().eval()
    k = 255.0 if pre.input_range == 1.0 else 1.0
    mean = torch.tensor([k * m for m in pre.mean]).view(1, 3, 1, 1)
    std = torch.tensor([k * v for v in pre.std]).view(1, 3, 1, 1)
    folded = copy.deepcopy(net)
    conv = folded.conv1
    w = conv.weight.data
    new = torch.nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          bias=True)
    new.weight.data = w / std.view(1, 3, 1, 1)
    b = conv.bias.data if conv.bias is not None else torch.zeros(w.shape[0])
    new.bias.data = b - (w * (mean / std).view(1, 3, 1, 1)).sum((1, 2, 3))
    folded.conv1 = new
    px = torch.from_numpy(pixels(x, tuple(mean.flatten().tolist()), tuple(std.flatten().tolist()),
                                 pre.channel_order == "BGR"))
    with torch.inference_mode():
        ref = torch.cat([torch.softmax(net((px[i:i + 64] - mean) / std), 1) for i in range(0, len(px), 64)])
        fol = torch.cat([torch.softmax(folded(px[i:i + 64]), 1) for i in range(0, len(px), 64)])
    diff = (ref - fol).abs()
    return {"n": len(x), "first_conv": f"{tuple(conv.kernel_size)} kernel, padding {conv.padding}",
            "top1_agreement": float((ref.argmax(1) == fol.argmax(1)).float().mean()),
            "max_abs_prob_diff": float(diff.max()), "mean_abs_prob_diff": float(diff.mean())}


def _raw_latency(bundles: dict[str, Path], runs: int) -> dict[str, dict[str, dict]]:
    """model.tflite alone in LiteRT with XNNPACK (set input, invoke, read output), each model fed
    its own input type, all interleaved in one run; per thread count."""
    from edgeskin.bench.latency import timed_until
    from edgeskin.runtime.backends import _litert_interpreter

    Interpreter, _, _ = _litert_interpreter()
    out = {}
    for th in (1, 2):
        fns = {}
        for name, b in bundles.items():
            it = Interpreter(model_content=(Path(b) / "model.tflite").read_bytes(), num_threads=th)
            it.allocate_tensors()
            i, o = it.get_input_details()[0], it.get_output_details()[0]
            rng = np.random.default_rng(0)
            x = (rng.integers(0, 256, i["shape"]).astype(i["dtype"]) if i["dtype"] == np.uint8
                 else rng.normal(0, 1, i["shape"]).astype(i["dtype"]))

            def run(it=it, i=i, o=o, x=x) -> object:
                it.set_tensor(i["index"], x)
                it.invoke()
                return it.get_tensor(o["index"])

            fns[name] = run
        stats = timed_until(fns, min_samples=runs, min_seconds=0.0, warmup=20, max_samples=runs)
        out[str(th)] = {k: v.to_dict() for k, v in stats.items()}
    return out


def phone_main(args: argparse.Namespace, member: str | None, calib: Path, cal, ds, split, rep) -> None:  # noqa: ANN001
    import time

    from edgeskin.data import load_eval_set
    from edgeskin.fileio import atomic_write_bytes, write_json
    from edgeskin.metrics import balanced_accuracy
    from edgeskin.preprocess import center_crop, load_resized, open_image
    from edgeskin.runtime import load
    from edgeskin.targets import get_target
    from edgeskin.targets.phone import centre_roi, mediapipe_scores
    from edgeskin.targets.prepare import select_member

    phone = get_target("tflite")
    opts = dict(first_conv_float=args.first_conv_float, observer=args.observer, subset_size=args.subset_size,
                int8_adds=args.int8_adds)
    forms = {"int8 uint8-in/probs-out (default)": dict(precision="int8", **opts),
             "int8 float-in/logits-out (before)": dict(precision="int8", input_type="normalized",
                                                       output_kind="logits", **opts),
             "fp32 uint8-in/probs-out (default)": dict(precision="fp32"),
             "fp32 float-in/logits-out (before)": dict(precision="fp32", input_type="normalized",
                                                       output_kind="logits")}
    bundles, checks, seconds = {}, {}, {}
    for i, (name, kw) in enumerate(forms.items()):
        t0 = time.perf_counter()
        res = phone.compile(args.model, member=member, dataset=ds, split=split, out=args.out / f"phone{i}.edgeskin",
                            calibration=cal, force=True, overwrite=True, threads=2, reporter=rep, **kw)
        bundles[name], checks[name], seconds[name] = res.bundle, res.check, time.perf_counter() - t0
    default, before = list(forms)[0], list(forms)[1]

    # MediaPipe against edgeskin's runtime, validation images
    ck = select_member(args.model, member, target="tflite")
    val = split.apply(ds, "val")
    samples = val.samples[: args.max_val] if args.max_val else val.samples
    codes = list(ck.labels.codes)
    y = np.array([codes.index(s.dx) for s in samples])
    mp: dict[str, dict] = {}
    for name in (default, list(forms)[2]):
        with load(bundles[name]) as pred:
            ours = np.stack([p.probs for p in pred.predict([s.path for s in samples], batch_size=32)])
            cfg = pred.preprocess_config
        full = [np.asarray(open_image(s.path), dtype=np.uint8) for s in samples]
        cropped = [center_crop(load_resized(s.path, cfg), cfg.size) for s in samples]
        model = Path(bundles[name]) / "model.tflite"
        ways = {"pre-cropped": mediapipe_scores(model, cropped),
                "centre ROI": mediapipe_scores(model, full, rois=[centre_roi(a.shape[1], a.shape[0], size=cfg.size,
                                                                            resize=cfg.resize_size) for a in full]),
                "whole image": mediapipe_scores(model, full)}
        del full, cropped
        mp[name] = {"n": len(y), "edgeskin_balanced_accuracy": balanced_accuracy(ours.argmax(1), y, len(codes)),
                    "ways": {w: {"top1_agreement_with_edgeskin": float(np.mean(v.argmax(1) == ours.argmax(1))),
                                 "max_abs_score_diff": float(np.abs(v - ours).max()),
                                 "balanced_accuracy": balanced_accuracy(v.argmax(1), y, len(codes))}
                             for w, v in ways.items()}}
    # folding the normalisation into the first convolution (FP32, torch)
    _, vx, _ = load_eval_set(val, ck.preprocess, ck.labels, what="validation")
    fold = _fold_normalisation_check(args.model, member, vx[: args.max_val] if args.max_val else vx)
    # each precision's two forms in their own interleaved run: timed in one loop with the fp32 pair, an
    # int8 model ran right after a 15 ms fp32 invoke whose XNNPACK threads still held the 2 cores
    lat = {th: {**a, **b} for (th, a), b in zip(
        _raw_latency({"default": bundles[default], "before": bundles[before]}, args.runs).items(),
        _raw_latency({"fp32 default": bundles[list(forms)[2]], "fp32 before": bundles[list(forms)[3]]},
                     args.runs).values())}
    rec = {
        "model": str(args.model), "note": args.note, "member": member, "split": str(args.split),
        "calibration": str(calib), "options": opts, "compile_seconds": seconds,
        "forms": {n: {"input": load(b).manifest.input.dtype, "output": load(b).manifest.output["kind"],
                      "val_check": {k: checks[n][k] for k in ("n", "top1_agreement", "drops_points", "passed")},
                      "app_preprocessing": load(b).manifest.extra.get("app_preprocessing"),
                      "model_bytes": (Path(b) / "model.tflite").stat().st_size}
                  for n, b in bundles.items()},
        "mediapipe": mp, "fold_normalisation": fold, "latency_ms_by_threads": lat,
        "default_over_before_p50": {th: v["default"]["p50_ms"] / v["before"]["p50_ms"] for th, v in lat.items()},
        "fp32_default_over_before_p50": {th: v["fp32 default"]["p50_ms"] / v["fp32 before"]["p50_ms"]
                                         for th, v in lat.items()},
        "versions": {"mediapipe": _version("mediapipe"), "ai-edge-litert": _version("ai-edge-litert")},
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor(), "platform": platform.platform()},
    }
    path = args.results / "tflite_target.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    record["phone"] = rec
    write_json(path, record)
    atomic_write_bytes(args.results / "tflite_target.md", markdown(record).encode())
    print(phone_markdown(rec))


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def phone_markdown(p: dict) -> str:
    d = "int8 uint8-in/probs-out (default)"
    f = p["forms"]
    app = f[d]["app_preprocessing"]
    lines = [
        "## Phone form: uint8 pixels in, probabilities out (validation split)",
        "",
        f"Model: `{p['model']}`{' (' + p['note'] + ')' if p.get('note') else ''}; split `{p['split']}`; INT8 options "
        f"`{json.dumps(p['options'])}`; mediapipe {p['versions']['mediapipe']}, ai-edge-litert "
        f"{p['versions']['ai-edge-litert']}. Produced by `benchmarks/tflite_target.py --phone`.",
        "",
        "| bundle | input | output | val agreement with FP32 | top-1 / balanced / mel drop (points) | model file |",
        "|---|---|---|---|---|---|",
    ]
    for n, v in f.items():
        c = v["val_check"]
        dp = c["drops_points"]
        lines.append(f"| {n} | {v['input']} | {v['output']} | {pct(c['top1_agreement'])} % | "
                     f"{dp.get('top1') or 0:.2f} / {dp.get('balanced') or 0:.2f} / "
                     f"{dp.get('mel_recall') or 0:.2f} | {v['model_bytes'] / 1e6:.1f} MB |")
    lines += ["", f"### MediaPipe ImageClassifier against edgeskin's runtime ({p['mediapipe'][d]['n']} validation images)",
              "", "MediaPipe is created from `model.tflite` alone (its metadata), as an app creates it.", "",
              "| bundle | MediaPipe fed | top-1 agreement | max abs score diff | balanced acc. (edgeskin: crop) |",
              "|---|---|---|---|---|"]
    for n, m in p["mediapipe"].items():
        for w, v in m["ways"].items():
            lines.append(f"| {n} | {w} | {pct(v['top1_agreement_with_edgeskin'])} % | {v['max_abs_score_diff']:.1e} | "
                         f"{pct(v['balanced_accuracy'])} ({pct(m['edgeskin_balanced_accuracy'])}) |")
    lines += ["", "Pre-cropped: the app applies edgeskin's resize-shorter-side and centre crop and passes the "
              "crop. Centre ROI: the full image with the centre square as region of interest (docs/phone.md). "
              "Whole image: MediaPipe's default, the whole image squeezed to the input size.", "",
              "### Whole-image resize against edgeskin's centre crop (the bundle's own report)", "",
              f"`manifest.extra.app_preprocessing` of the default int8 bundle, {app['n']} validation images: top-1 "
              f"agreement **{pct(app['top1_agreement'])} %**, balanced accuracy {pct(app['balanced_accuracy_centre_crop'])} "
              f"% with the crop and {pct(app['balanced_accuracy_whole_image'])} % with the whole image (drop "
              f"**{app['balanced_accuracy_drop_points']:.1f} points**). The bundle emulates MediaPipe's resize "
              "(bilinear, no antialiasing); the MediaPipe whole-image row above is the real one.", ""]
    fo = p["fold_normalisation"]
    lines += ["### Normalisation folded into the first convolution?", "",
              f"FP32 in torch, {fo['n']} validation images, first convolution {fo['first_conv']}: folding would "
              f"zero-pad raw pixels instead of the normalised image. Top-1 agreement with the unfolded network "
              f"{pct(fo['top1_agreement'])} %, largest probability change {fo['max_abs_prob_diff']:.3f} (mean "
              f"{fo['mean_abs_prob_diff']:.4f}). So the bundles normalise explicitly, before the first convolution: "
              "its weights take the per-channel 1/std factor (exact: a zero stays a zero when scaled), and the "
              "input gets a cast and one add of -mean.", "",
              "### Latency of model.tflite, LiteRT XNNPACK, batch 1 (medians of one interleaved run, ms)", "",
              "This host (x86, shared cores) is not a phone: trust the ratios, not the milliseconds.", "",
              "Each precision's two forms are timed in one interleaved run of their own.", "",
              "| threads | int8 default | int8 before | default / before | fp32 default | fp32 before | default / before |",
              "|---|---|---|---|---|---|---|"]
    for th, v in p["latency_ms_by_threads"].items():
        lines.append(f"| {th} | {v['default']['p50_ms']:.2f} | {v['before']['p50_ms']:.2f} | "
                     f"{p['default_over_before_p50'][th]:.3f} | {v['fp32 default']['p50_ms']:.2f} | "
                     f"{v['fp32 before']['p50_ms']:.2f} | {p['fp32_default_over_before_p50'][th]:.3f} |")
    lines += ["", "The default's uint8 input is a quarter of the bytes of the float input the app would otherwise "
              "fill, and the app no longer normalises; the model adds a cast and an add on the input (one per image "
              "row: broadcasting the 3 channel constants over every pixel instead cost about 9 % at 1 thread, "
              "0.2 ms) and a softmax on 7 outputs.", ""]
    return "\n".join(lines)


def markdown(r: dict) -> str:
    if "test" not in r:
        return "# tflite target\n\n" + phone_markdown(r["phone"]) if "phone" in r else ""
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
    if "phone" in r:
        lines += [phone_markdown(r["phone"])]
    return "\n".join(lines)


if __name__ == "__main__":
    run_or_render("tflite_target", main, markdown)
