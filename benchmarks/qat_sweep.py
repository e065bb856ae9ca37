#!/usr/bin/env python
"""Quantization-aware fine-tuning settings against post-training INT8, on the validation split only
(the test split is never read): for each setting, `edgeskin qat` on a copy of the student, then
`edgeskin compile` (which uses the trained INT8 graph) and the compile check's top-1 agreement with
the FP32 student on validation, in ONNX Runtime. Baselines: the same compile without QAT
(`--qat off`), with the ranges QAT starts from (minmax) and with the recipe's `auto`. A variant
names its objective (`objective=match|distill`; default distill, the objective of the sweep
committed on 2026-12-02); its lr defaults to the objective's own.

Usage:
    python benchmarks/qat_sweep.py --student runs/quick/student --calib runs/quick/calibration/NAME.json \\
        [--target cpu] [--epochs 1] [--variant "objective=match" ...] \\
        [--out runs/qat-sweep] [--results benchmarks/results/qat_sweep]
Writes RESULTS.json and RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_VARIANTS = (
    "objective=match",                     # the shipped default
    "lr=3e-6,consistency=1,agreement=0",   # the distill objective's defaults
    "lr=3e-6,consistency=1,agreement=1",
    "lr=1e-5,consistency=1,agreement=1",
    "lr=1e-5,consistency=0,agreement=1",
)


def _edgeskin() -> list[str]:
    exe = Path(sys.executable).with_name("edgeskin")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "edgeskin"]


def _run(cmd: list[str], log: Path) -> float:
    t = time.perf_counter()
    with log.open("a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"{cmd[1]} failed (exit {rc}); see {log}")
    return time.perf_counter() - t


def _compile(student: Path, target: str, calib: Path, out: Path, log: Path, *extra: str) -> dict:
    cmd = [*_edgeskin(), "compile", str(student), "--target", target, "--precision", "int8", "--calib", str(calib),
           "--first-conv-float", "--force", "--overwrite", "--out", str(out), *extra]
    from edgeskin.bundle import BundleReader

    secs = _run(cmd, log)
    acc = BundleReader(out).manifest.accuracy
    return {"agreement": acc["top1_agreement"], "flips": round((1 - acc["top1_agreement"]) * acc["n"]),
            "n": acc["n"], "drops_points": acc["drops_points"], "passed": acc["passed"], "seconds": round(secs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", type=Path, required=True, help="The student's folder (student.json inside).")
    ap.add_argument("--calib", type=Path, required=True)
    ap.add_argument("--target", default="cpu", choices=("cpu", "jetson"))
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--variant", action="append",
                    help="[objective=match|distill,]lr=..,consistency=..,agreement=..[,augment=1] (repeatable; "
                         "default: DEFAULT_VARIANTS)")
    ap.add_argument("--out", type=Path, default=Path("runs/qat-sweep"))
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results/qat_sweep"))
    a = ap.parse_args()
    from edgeskin.fileio import atomic_write_bytes, write_json

    os.environ.setdefault("EDGESKIN_DATA", "../shared/data/ham10000")
    a.out.mkdir(parents=True, exist_ok=True)
    log = a.out / "log.txt"
    student_json = a.student / "student.json"
    rows = []
    for label, extra in (("post-training, minmax (QAT's starting ranges)", ["--range-estimator", "minmax"]),
                         ("post-training, auto (the recipe's)", ["--range-estimator", "auto"])):
        r = _compile(student_json, a.target, a.calib, a.out / f"ptq-{extra[-1]}.edgeskin", log, "--qat", "off", *extra)
        rows.append({"setting": label, **r})
        print(rows[-1], flush=True)
    for i, v in enumerate(a.variant or DEFAULT_VARIANTS):
        kv = dict(p.split("=", 1) for p in v.split(","))
        copy = a.out / f"v{i}"
        if copy.exists():
            shutil.rmtree(copy)
        shutil.copytree(a.student, copy, ignore=shutil.ignore_patterns("*.qat-*.onnx"))
        meta = json.loads((copy / "student.json").read_text())
        meta.pop("qat", None)  # a fresh copy: no earlier QAT record
        write_json(copy / "student.json", meta)
        secs = _run([*_edgeskin(), "qat", str(copy / "student.json"), "--target", a.target, "--epochs", str(a.epochs),
                     "--objective", kv.get("objective", "distill"), *(["--lr", kv["lr"]] if "lr" in kv else []),
                     "--consistency", kv.get("consistency", "1"),
                     "--agreement", kv.get("agreement", "0"),
                     *(["--augment"] if kv.get("augment", "0") not in ("0", "false", "no") else [])], log)
        rec = json.loads((copy / "student.json").read_text())["qat"][a.target]
        r = _compile(copy / "student.json", a.target, a.calib, copy / f"{a.target}.edgeskin", log, "--qat", "auto")
        rows.append({"setting": f"QAT {a.epochs} epoch(s): {v}", **r, "qat_seconds": round(secs),
                     "simulated_before": rec.get("val_agreement_before"),
                     "simulated_after": rec.get("val_agreement_after")})
        print(rows[-1], flush=True)
    record = {"student": str(a.student), "target": a.target, "epochs": a.epochs, "rows": rows,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}
    a.results.parent.mkdir(parents=True, exist_ok=True)
    write_json(a.results.with_suffix(".json"), record)
    n = rows[0]["n"]
    lines = [f"# Quantization-aware fine-tuning vs post-training INT8 ({a.target}), validation split",
             "", f"Student `{a.student}`; {n} validation images; agreement = top-1 agreement of the compiled "
             "INT8 bundle with the FP32 student in ONNX Runtime (the compile check). Produced by "
             "`benchmarks/qat_sweep.py`; the test split is not read.", "",
             "| setting | agreement | flipped | top-1 drop | balanced drop | simulated before / after | QAT s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        sim = "-" if r.get("simulated_after") is None else \
            f"{100 * r['simulated_before']:.2f} / {100 * r['simulated_after']:.2f} %"
        d = r["drops_points"]
        lines.append(f"| {r['setting']} | {100 * r['agreement']:.2f} % | {r['flips']}/{r['n']} | "
                     f"{d.get('top1') or 0:+.2f} | {d.get('balanced') or 0:+.2f} | {sim} | "
                     f"{r.get('qat_seconds', '-')} |")
    lines += ["", f"Machine: {os.cpu_count()} CPUs, {platform.platform()}.", ""]
    atomic_write_bytes(a.results.with_suffix(".md"), "\n".join(lines).encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
