#!/usr/bin/env python
"""The whole comparison: the reference ensemble, its distilled student and every bundle made from
that student (cpu fp32/int8, jetson int8 through the host proxy, tflite fp16/int8), benched on
the test split by `edgeskin bench`'s machinery; writes benchmarks/results/bench/ (report.json,
report.md, plots) and, with --extra, also benches bundles the target benchmarks left in runs/.

Student: --student (default runs/distill/resnet18, made by benchmarks/distill_reference.py).
Compile options are the ones the target benchmarks chose on the validation split
(first convolution in float; LiteRT mean_minmax ranges). Budgets: the generic-cpu profile's,
against the FP32 student (the cost of compression). Target: under 15 minutes on this CPU.

Usage:
    python benchmarks/bench_reference.py [--student runs/distill/resnet18] [--extra]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from _common import HERE, REF, SHARED, calibration_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("EDGESKIN_DATA", SHARED / "data" / "ham10000")))
    ap.add_argument("--reference", type=Path, default=REF)
    ap.add_argument("--student", type=Path, default=Path("runs/distill/resnet18"))
    ap.add_argument("--calib", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-all"))
    ap.add_argument("--results", type=Path, default=HERE / "results" / "bench")
    ap.add_argument("--device", default="generic-cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--min-samples", type=int, default=1000, help="batch-1 timing: at least this many runs per row")
    ap.add_argument("--min-seconds", type=float, default=10.0, help="and at least this many seconds")
    ap.add_argument("--extra", action="store_true", help="also bench the member2 bundles in runs/bench-*/")
    args = ap.parse_args()

    from edgeskin.bench import (Budget, BenchConfig, ReferencePredictions, export_reference_models,
                                reference_from_models, run_bench)
    from edgeskin.bench.report import rich_table, write_reports
    from edgeskin.calibration import read_calibration_set
    from edgeskin.data import load_dataset, read_split
    from edgeskin.profiles import get_profile
    from edgeskin.progress import RichReporter
    from edgeskin.quantize import QuantizeOptions
    from edgeskin.targets import get_target

    t0 = time.time()
    rep = RichReporter()
    ds = load_dataset(args.data)
    split = read_split(args.reference / "split.csv")
    calib = calibration_file(args.calib)
    cal = read_calibration_set(calib)
    args.out.mkdir(parents=True, exist_ok=True)
    ref_path = args.out / "reference-test.npz"
    if ref_path.is_file():
        ref = ReferencePredictions.load(ref_path)
    else:
        ref = reference_from_models(Path(os.path.relpath(args.reference)), dataset=ds, split=split, split_name="test", student=args.student,
                                    threads=args.threads, reporter=rep)
        ref.save(ref_path)
    fc = QuantizeOptions(first_conv_float=True)
    plan = [("cpu", "fp32", {}), ("cpu", "int8", {"quantize": fc}), ("jetson", "int8", {"quantize": fc}),
            ("tflite", "fp16", {}), ("tflite", "int8", {"first_conv_float": True})]
    bundles, extra_rows, compile_s = [], [], {}
    for target, precision, kw in plan:
        dest = args.out / f"student-{target}-{precision}.edgeskin"
        t1 = time.time()
        if not (dest / "manifest.json").is_file():
            try:
                get_target(target).compile(args.student, precision=precision, dataset=ds, split=split, out=dest,
                                           calibration=cal if precision == "int8" else None, force=True,
                                           overwrite=True, threads=2, reporter=rep, **kw)
            except Exception as exc:  # noqa: BLE001 - a failed compile is a row
                extra_rows.append({"row": f"{target}/{precision}", "kind": "bundle", "status": "failed",
                                   "error": f"compile: {exc}"})
                continue
        compile_s[f"{target}/{precision}"] = round(time.time() - t1, 1)
        bundles.append(dest)
    student_bundles = list(bundles)
    if args.extra:
        for folder in ("bench-cpu", "bench-jetson", "bench-tflite"):
            bundles += sorted(p for p in Path("runs", folder).glob("*.edgeskin") if (p / "manifest.json").is_file())
    budget = Budget.parse(None, against="student", profile=get_profile(args.device))
    with tempfile.TemporaryDirectory(prefix="edgeskin-reference-") as exports:
        models = export_reference_models(Path(os.path.relpath(args.reference)), args.student, exports)
        report = run_bench(ref, bundles, dataset=ds, budget=budget, gated=student_bundles,
                           config=BenchConfig(threads=args.threads, min_samples=args.min_samples,
                                              min_seconds=args.min_seconds),
                           extra_rows=extra_rows, reporter=rep, reference_models=models)
    report.config["compile_seconds"] = compile_s
    report.config["total_seconds"] = round(time.time() - t0)
    report.config["student"] = os.path.relpath(args.student, HERE.parent)
    report.config["device_profile"] = args.device
    rep.console.print(rich_table(report))
    if args.results.exists():
        shutil.rmtree(args.results)
    files = write_reports(report, args.results)
    print(f"wrote {files}; {report.config['total_seconds']} s in all; breaches: {report.breaches or 'none'}")


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--render"]:  # re-render report.md and the plots from the committed JSON
        from edgeskin.bench.report import load_report, write_reports

        folder = HERE / "results" / "bench"
        write_reports(load_report(folder / "report.json"), folder)
    else:
        main()
