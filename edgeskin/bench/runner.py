"""``edgeskin bench``: every bundle against the full-precision ensemble (and the FP32 student).

Accuracy is measured through the runtime, each bundle in a process of its own (a crash or an
error becomes that row's status); latency is batch 1 after warm-up, percentiles, threads
recorded, plus throughput at larger batches, peak memory and load time. Drops come with
paired bootstrap intervals and flips with McNemar's test. Budgets (points of drop against
the FP32 student, or the ensemble when there is none, and a p90 latency ceiling) turn the
bench into a release gate. numpy + the runtime: no torch unless the reference is an ensemble
to evaluate here.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..bundle import BundleReader
from ..data import Dataset, decode_dataset, eval_tensors
from ..errors import ConfigError, DataError, EdgeskinError
from ..labels import MALIGNANT_CODES
from ..metrics import classification_report
from ..progress import NullReporter, Reporter
from .reference import ReferencePredictions
from .stats import bootstrap_drop, mcnemar, sensitivity_specificity, threshold_at_specificity

METRICS = ("top1", "balanced", "mel_recall")


class BudgetBreach(EdgeskinError):
    """At least one row misses the bench budget (exit code 4)."""

    exit_code = 4


@dataclass(frozen=True)
class BenchBudget:
    """Largest drops in points (``None``: not checked) and the largest p90 batch-1 latency."""

    top1: float | None = None
    balanced: float | None = None
    mel_recall: float | None = None
    max_latency_ms: float | None = None
    against: str = "auto"  # student (FP32 student row), ensemble, or auto (student when present)

    @classmethod
    def parse(cls, max_drop: str | None, max_latency: float | None = None, *, against: str = "auto",
              profile: Any = None) -> "BenchBudget":
        kw: dict[str, Any] = {}
        if profile is not None:
            for k in METRICS:
                if k in profile.budget:
                    kw[k] = float(profile.budget[k])
            if profile.max_latency_ms is not None:
                kw["max_latency_ms"] = profile.max_latency_ms
        for part in filter(None, (max_drop or "").split(",")):
            key, _, value = part.partition("=")
            key = key.strip().replace("-", "_")
            if key not in METRICS or not value:
                raise ConfigError(f"bad budget entry {part!r}", "use e.g. --max-drop top1=0.5,balanced=1.5,mel_recall=2")
            try:
                kw[key] = float(value)
            except ValueError:
                raise ConfigError(f"bad budget value {part!r}", "numbers are percentage points") from None
            if not math.isfinite(kw[key]):
                raise ConfigError(f"bad budget value {part!r}", "use a finite number of percentage points")
        if max_latency is not None:
            kw["max_latency_ms"] = float(max_latency)
        if against not in ("auto", "student", "ensemble"):
            raise ConfigError(f"--against {against!r}", "choose auto, student or ensemble")
        return cls(against=against, **kw)

    def active(self) -> bool:
        return any(getattr(self, k) is not None for k in (*METRICS, "max_latency_ms"))


@dataclass(frozen=True)
class BenchConfig:
    threads: int | None = None
    runs: int = 50
    warmup: int = 10
    batch_sizes: tuple[int, ...] = (8,)
    n_boot: int = 1000
    seed: int = 0
    specificity: float = 0.90
    engine: str = "auto"
    timeout_s: float = 1800.0


@dataclass
class BenchReport:
    rows: list[dict[str, Any]]
    config: dict[str, Any]
    budget: dict[str, Any]
    breaches: list[str] = field(default_factory=list)
    reference: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "config": self.config, "budget": self.budget, "breaches": self.breaches,
                "reference": self.reference}


# ---------------------------------------------------------------- metrics of one row

def row_metrics(probs: np.ndarray, y: np.ndarray, codes: Sequence[str], *, ensemble: np.ndarray,
                student: np.ndarray | None, mel_threshold_ens: float | None, specificity: float,
                n_boot: int, seed: int) -> dict[str, Any]:
    """Everything a bench row reports about accuracy, against the ensemble (and the student)."""
    codes = list(codes)
    rep = classification_report(probs, y, codes)
    ens = classification_report(ensemble, y, codes)
    pos = rep.get("positive_class")
    sens_key = f"{pos}_sensitivity" if pos else None
    out: dict[str, Any] = {
        "n": rep["n"], "top1": rep["top1"], "top2": rep["top2"], "top3": rep["top3"],
        "balanced_accuracy": rep["balanced_accuracy"], "ece": rep["ece"],
        "per_class_recall": {c: rep["per_class"][c]["recall"] for c in codes},
        "positive_class": pos, "positive_sensitivity": rep.get(sens_key) if sens_key else None,
        "positive_specificity": rep.get(f"{pos}_specificity") if pos else None,
        "drops_vs_ensemble": {
            "top1": 100 * (ens["top1"] - rep["top1"]), "top2": 100 * (ens["top2"] - rep["top2"]),
            "top3": 100 * (ens["top3"] - rep["top3"]),
            "balanced": 100 * (ens["balanced_accuracy"] - rep["balanced_accuracy"]),
            "mel_recall": 100 * (ens[sens_key] - rep[sens_key]) if sens_key else None,
        },
        "per_class_recall_drop_vs_ensemble": {
            c: (None if rep["per_class"][c]["recall"] is None or ens["per_class"][c]["recall"] is None
                else 100 * (ens["per_class"][c]["recall"] - rep["per_class"][c]["recall"])) for c in codes},
    }
    pred, ens_pred = probs.argmax(1), ensemble.argmax(1)
    out["flips_vs_ensemble"] = int(np.sum(pred != ens_pred))
    out["mcnemar_vs_ensemble"] = mcnemar(ens_pred == y, pred == y)
    if student is not None:
        out["flips_vs_student"] = int(np.sum(pred != student.argmax(1)))
        out["mcnemar_vs_student"] = mcnemar(student.argmax(1) == y, pred == y)
        st = classification_report(student, y, codes)
        out["drops_vs_student"] = {
            "top1": 100 * (st["top1"] - rep["top1"]),
            "balanced": 100 * (st["balanced_accuracy"] - rep["balanced_accuracy"]),
            "mel_recall": 100 * (st[sens_key] - rep[sens_key]) if sens_key else None,
        }

    def top1(p: np.ndarray, t: np.ndarray) -> float:
        return 100 * float(np.mean(p.argmax(1) == t))

    def balanced(p: np.ndarray, t: np.ndarray) -> float:
        from ..metrics import balanced_accuracy

        return 100 * balanced_accuracy(p.argmax(1), t, len(codes))

    out["ci_vs_ensemble"] = {
        "top1": bootstrap_drop(top1, ensemble, probs, y, n_boot=n_boot, seed=seed),
        "balanced": bootstrap_drop(balanced, ensemble, probs, y, n_boot=n_boot, seed=seed),
    }
    if student is not None:
        out["ci_vs_student"] = {
            "top1": bootstrap_drop(top1, student, probs, y, n_boot=n_boot, seed=seed),
            "balanced": bootstrap_drop(balanced, student, probs, y, n_boot=n_boot, seed=seed),
        }
    if "mel" in codes:
        k = codes.index("mel")
        is_mel = y == k
        if mel_threshold_ens is not None:
            s, sp = sensitivity_specificity(probs[:, k], is_mel, mel_threshold_ens)
            out["mel_at_ensemble_operating_point"] = {"threshold": mel_threshold_ens, "sensitivity": s,
                                                      "specificity": sp}
        t = threshold_at_specificity(probs[:, k], is_mel, specificity)
        s, sp = sensitivity_specificity(probs[:, k], is_mel, t)
        out["mel_at_fixed_specificity"] = {"target_specificity": specificity, "threshold": t, "sensitivity": s,
                                           "specificity": sp}
    mal = [codes.index(c) for c in MALIGNANT_CODES if c in codes]
    if len(mal) == len(MALIGNANT_CODES):
        p_mal = probs[:, mal].sum(1)
        truth = np.isin(y, mal)
        s, sp = sensitivity_specificity(p_mal, truth, 0.5)
        out["malignant_vs_benign"] = {"rule": "P(mel)+P(bcc)+P(akiec) >= 0.5", "sensitivity": s, "specificity": sp}
    return out


# ---------------------------------------------------------------- inputs

def compile_failed_row(target: str, precision: str, message: str) -> dict[str, Any]:
    """The row of a target that could not be compiled (for ``run_bench(extra_rows=...)``)."""
    return {"row": f"{target}/{precision}", "kind": "bundle", "status": "failed", "error": f"compile: {message}"}


def bench_inputs(dataset: Dataset, ref: ReferencePredictions) -> Dataset:
    """The data set's samples for the reference's images, in the reference's order, with the
    labels checked against it."""
    by_id = {s.image_id: s for s in dataset.samples}
    missing = [i for i in ref.image_ids if i not in by_id]
    if missing:
        raise DataError(f"{len(missing)} reference image(s) are not in {dataset.source} (e.g. {missing[0]})",
                        "pass the --data the reference predictions were made on")
    samples = [by_id[i] for i in ref.image_ids]
    wrong = [s.image_id for s, t in zip(samples, ref.targets) if s.dx != ref.codes[int(t)]]
    if wrong:
        raise DataError(f"{len(wrong)} image(s) have another label in {dataset.source} than in the reference "
                        f"(e.g. {wrong[0]})", "the data set or the reference file changed; make the reference again")
    return Dataset(samples, dataset.source, dataset.layout, dataset.lesion_grouped, [])


def _spec_key(spec: Any) -> str:
    return json.dumps({k: v for k, v in asdict(spec).items() if k not in ("dtype", "scale", "zero_point", "name")},
                      sort_keys=True)


# ---------------------------------------------------------------- the bench

def run_bench(
    reference: ReferencePredictions,
    bundles: Sequence[str | os.PathLike],
    *,
    dataset: Dataset,
    budget: BenchBudget = BenchBudget(),
    config: BenchConfig = BenchConfig(),
    extra_rows: Sequence[dict[str, Any]] = (),
    gated: Sequence[str | os.PathLike] | None = None,
    reporter: Reporter | None = None,
    workdir: str | os.PathLike | None = None,
) -> BenchReport:
    """Bench ``bundles`` against ``reference`` on the reference's images of ``dataset``.

    ``extra_rows`` are rows made elsewhere (e.g. a target that failed to compile) added as
    they are. ``gated``: the bundles the budget applies to (default: all). Budgets against the
    student apply to bundles made from the student; any other bundle is held to the ensemble.
    Returns the report; budget breaches are listed in it (the CLI turns them into a non-zero
    exit).
    """
    reporter = reporter or NullReporter()
    codes = list(reference.codes)
    y = reference.targets
    ens = reference.probs["ensemble"]
    student = reference.probs.get("student")
    t_ens = None
    if "mel" in codes:
        t_ens = threshold_at_specificity(ens[:, codes.index("mel")], y == codes.index("mel"), config.specificity)
    common = dict(ensemble=ens, student=student, mel_threshold_ens=t_ens, specificity=config.specificity,
                  n_boot=config.n_boot, seed=config.seed)
    rows: list[dict[str, Any]] = []
    for name, p in reference.probs.items():
        info = reference.info.get("rows", {}).get(name, {})
        rows.append({"row": name if name != "student" else "student/fp32", "kind": "reference", "status": "ok",
                     **{k: v for k, v in info.items() if k in ("latency_batch1", "engine", "size_bytes", "threads")},
                     **row_metrics(p, y, codes, **common)})
    samples = bench_inputs(dataset, reference)
    tmp = tempfile.TemporaryDirectory(prefix="edgeskin-bench-", dir=workdir)
    inputs: dict[str, Path] = {}
    try:
        for i, b in enumerate(bundles):
            rows.append(_bench_bundle(Path(b), i, samples, inputs, Path(tmp.name), codes, y, config, common,
                                      reporter))
    finally:
        tmp.cleanup()
    rows.extend(extra_rows)
    gate = None if gated is None else {str(Path(g)) for g in gated}
    student_sha = (reference.info.get("student_sha256") if student is not None else None)
    for r in rows:
        if r.get("kind") == "bundle":
            r["gated"] = gate is None or str(Path(r.get("bundle", ""))) in gate
            r["from_student"] = student_sha is not None and r.get("source_sha256") == student_sha
    for r in rows:  # name bundle rows by their source model, and by folder when that is not enough
        if r.get("kind") == "bundle" and r.get("source_model"):
            r["row"] = f"{r['row']} [{r['source_model']}]"
    names = [r["row"] for r in rows]
    for r in rows:
        if names.count(r["row"]) > 1 and r.get("bundle"):
            r["row"] = f"{r['row'][:-1]}, {Path(r['bundle']).name.removesuffix('.edgeskin')}]"
    against = budget.against
    if against == "auto":
        against = "student" if student is not None else "ensemble"
    breaches = check_budget(rows, budget, against)
    return BenchReport(rows, {**asdict(config), "n_images": len(y), "split": reference.split},
                       {**asdict(budget), "applied_against": against}, breaches,
                       {"sha256": reference.sha256(), "rows": sorted(reference.probs), **reference.info})


def _bench_bundle(path: Path, i: int, samples: Dataset, inputs: dict[str, Path], tmp: Path, codes: list[str],
                  y: np.ndarray, config: BenchConfig, common: dict[str, Any], reporter: Reporter) -> dict[str, Any]:
    row: dict[str, Any] = {"row": path.name, "kind": "bundle", "bundle": str(path)}
    try:
        reader = BundleReader(path)
        m = reader.manifest
        reader.verify()
        reader.close()
        row.update(row=f"{m.target}/{m.precision}", target=m.target, precision=m.precision,
                   source_sha256=(m.provenance.get("model") or {}).get("sha256"),
                   source_model=(m.provenance.get("model") or {}).get("name"),
                   size_bytes=int(m.files.get(m.model_file, {}).get("bytes", 0)),
                   bundle_bytes=int(sum(f.get("bytes", 0) for f in m.files.values())))
        if list(m.labels) != codes:
            raise ConfigError(f"class order {list(m.labels)} differs from the reference's {codes}",
                              "bench bundles made from models of the reference's label set")
        key = _spec_key(m.input)
        if key not in inputs:
            pre = m.input.preprocess_config()
            reporter.start(f"preprocessing {len(samples)} images ({pre.size} px, {pre.layout})", len(samples))
            _, arrays = decode_dataset(samples, pre, progress=reporter.advance)
            reporter.stop()
            inputs[key] = tmp / f"inputs-{len(inputs)}.npy"
            np.save(inputs[key], eval_tensors(arrays, pre))
        spec = {"bundle": str(path), "inputs": str(inputs[key]), "threads": config.threads, "runs": config.runs,
                "warmup": config.warmup, "batch_sizes": list(config.batch_sizes), "engine": config.engine,
                "out_probs": str(tmp / f"probs-{i}.npy"), "result": str(tmp / f"result-{i}.json")}
        spec_path = tmp / f"spec-{i}.json"
        spec_path.write_text(json.dumps(spec))
        reporter.message(f"benching {row['row']} ({path})")
        proc = subprocess.run([sys.executable, "-m", "edgeskin.bench.worker", str(spec_path)], capture_output=True,
                              text=True, timeout=config.timeout_s)
        result_path = Path(spec["result"])
        if not result_path.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
            raise EdgeskinError(f"the engine process died (exit {proc.returncode}): {tail[0][:300]}")
        res = json.loads(result_path.read_text())
        if res["status"] != "ok":
            raise EdgeskinError(res.get("error", "failed"))
        probs = np.load(res.pop("probs"))
        row.update(res)
        row.update(row_metrics(probs, y, codes, **common))
    except subprocess.TimeoutExpired:
        row.update(status="failed", error=f"timed out after {config.timeout_s:.0f} s")
    except EdgeskinError as exc:
        row.update(status="failed", error=exc.message)
    except Exception as exc:  # noqa: BLE001 - one bad bundle must not stop the bench
        row.update(status="failed", error=f"{type(exc).__name__}: {exc}")
    return row


def check_budget(rows: list[dict[str, Any]], budget: BenchBudget, against: str) -> list[str]:
    """Messages naming the row and the metric for every breach (bundle rows only)."""
    if not budget.active():
        return []
    out = []
    for r in rows:
        if r.get("kind") != "bundle" or not r.get("gated", True):
            continue
        if r.get("status") != "ok":
            out.append(f"{r['row']}: {r.get('status')} ({r.get('error', '')})")
            continue
        vs = against
        if against == "student" and not r.get("from_student", True):
            vs = "ensemble"  # not made from this student: the ensemble is its reference
        r["budget_against"] = vs
        drops = r.get("drops_vs_student" if vs == "student" else "drops_vs_ensemble") or {}
        for k in METRICS:
            limit = getattr(budget, k)
            v = drops.get(k)
            if limit is not None and v is not None and v > limit + 1e-9:
                out.append(f"{r['row']}: {k} drop {v:.2f} points vs the {vs} > {limit:g}")
        lat = (r.get("latency_batch1") or {}).get("p90_ms")
        if budget.max_latency_ms is not None and lat is not None and lat > budget.max_latency_ms:
            out.append(f"{r['row']}: p90 latency {lat:.1f} ms > {budget.max_latency_ms:g} ms")
    return out
