"""``edgeskin bench``: every bundle against the full-precision ensemble (and the FP32 student).

Accuracy is measured through the runtime, each bundle in a process of its own (a crash or an
error becomes that row's status, and a failed row fails the command). Latency is batch 1 in
that process, two ways: model only, and end to end from an encoded image file in memory through
decoding, preprocessing and the model, as a device pays for every image; runs continue until
both have :data:`~edgeskin.bench.latency.P99_MIN_SAMPLES` samples and 10 seconds have passed
(configurable). The ensemble and the FP32 student are timed the same way, exported to ONNX
Runtime FP32 (the runtime they would ship in), never in torch eager. A host-proxy row (a
TensorRT-form graph run in ONNX Runtime) keeps its accuracy but its latency is not a device's,
so it is shown as "proxy". Drops (positive: worse) come with paired bootstrap intervals and flips
with McNemar's test. The melanoma operating points are fitted on the validation split and
applied to the reported one. Budgets (points of drop against the FP32 student, or the ensemble
when there is none, and a p90 latency ceiling) turn the bench into a release gate. numpy + the
runtime: no torch unless the reference is an ensemble to evaluate here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..budget import Budget
from ..bundle import BundleReader
from ..data import Dataset, decode_dataset, eval_tensors
from ..errors import ConfigError, DataError, EdgeskinError
from ..labels import MALIGNANT_CODES
from ..metrics import classification_report, drops_points, paired_bootstrap_drops
from ..progress import NullReporter, Reporter
from .reference import ReferencePredictions
from .stats import mcnemar, sensitivity_specificity, threshold_at_specificity



class BudgetBreach(EdgeskinError):
    """At least one row misses the bench budget (exit code 4)."""

    exit_code = 4


class ForcedRefused(EdgeskinError):
    """A bundle written past its compile budget was refused (exit code 5)."""

    exit_code = 5


class RowFailed(EdgeskinError):
    """At least one row could not be compiled, loaded or run (exit code 3)."""

    exit_code = 3


@dataclass(frozen=True)
class BenchConfig:
    """``min_samples`` / ``min_seconds``: batch-1 timing runs until both hold (MLPerf-style);
    ``max_seconds`` caps a very slow row. ``e2e_images``: how many real images of the bench
    split feed the end-to-end timing (their encoded files, read into memory first)."""

    threads: int | None = None
    min_samples: int = 1000
    min_seconds: float = 10.0
    max_seconds: float = 600.0
    warmup: int = 10
    e2e_images: int = 32
    batch_sizes: tuple[int, ...] = (8,)
    n_boot: int = 1000
    seed: int = 0
    specificity: float = 0.90
    engine: str = "auto"
    timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        checks = [("min_samples", self.min_samples >= 1, "at least 1"),
                  ("min_seconds", self.min_seconds >= 0, "0 or more"),
                  ("max_seconds", self.max_seconds > 0, "more than 0"),
                  ("warmup", self.warmup >= 0, "0 or more"), ("e2e_images", self.e2e_images >= 1, "at least 1"),
                  ("threads", self.threads is None or self.threads >= 1, "at least 1"),
                  ("specificity", 0 < self.specificity < 1, "between 0 and 1")]
        for name, ok, want in checks:
            if not ok:
                raise ConfigError(f"bench {name} = {getattr(self, name)!r} is out of range",
                                  f"{name.replace('_', '-')} must be {want}")
        if self.engine not in ("auto", "tensorrt", "onnxruntime"):
            raise ConfigError(f"bench engine {self.engine!r}", "choose auto, tensorrt or onnxruntime")


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
                n_boot: int, seed: int, mel_threshold: float | None = None,
                thresholds_from: str = "val") -> dict[str, Any]:
    """Everything a bench row reports about accuracy, against the ensemble (and the student).

    ``mel_threshold``: this row's threshold on P(mel) for ``specificity``, fitted on validation
    (None: fitted on ``probs`` itself, which ``thresholds_from`` then says)."""
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
        "drops_vs_ensemble": drops_points(ens, rep, ("top1", "top2", "top3", "balanced", "mel_recall")),
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
        out["drops_vs_student"] = drops_points(st, rep)

    # one bootstrap engine for the bench and the compile check (edgeskin.metrics): the same draws
    # as a loop over rounds, vectorised, with the melanoma-recall drop's interval too
    mel = codes.index("mel") if "mel" in codes else None

    def ci(reference: np.ndarray) -> dict[str, Any]:
        d = paired_bootstrap_drops(reference, probs, y, positive=mel, n_boot=n_boot, seed=seed)
        return {k: {**v, "n_boot": n_boot, "level": 0.95} for k, v in d.items() if v is not None}

    out["ci_vs_ensemble"] = ci(ensemble)
    if student is not None:
        out["ci_vs_student"] = ci(student)
    if "mel" in codes:
        k = codes.index("mel")
        is_mel = y == k
        if mel_threshold_ens is not None:
            s, sp = sensitivity_specificity(probs[:, k], is_mel, mel_threshold_ens)
            out["mel_at_ensemble_operating_point"] = {"threshold": mel_threshold_ens, "sensitivity": s,
                                                      "specificity": sp}
        t = mel_threshold if mel_threshold is not None else threshold_at_specificity(probs[:, k], is_mel, specificity)
        s, sp = sensitivity_specificity(probs[:, k], is_mel, t)
        out["mel_at_fixed_specificity"] = {"target_specificity": specificity, "threshold": t, "sensitivity": s,
                                           "specificity": sp, "fitted_on": thresholds_from}
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


def bench_inputs(dataset: Dataset, ref: ReferencePredictions, which: str = "bench") -> Dataset:
    """The data set's samples for the reference's images (``which="val"``: its validation images),
    in the reference's order, with the labels checked against it."""
    ids, targets = (ref.image_ids, ref.targets) if which == "bench" else (ref.val["image_ids"], ref.val["targets"])
    by_id = {s.image_id: s for s in dataset.samples}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise DataError(f"{len(missing)} reference image(s) are not in {dataset.source} (e.g. {missing[0]})",
                        "pass the --data the reference predictions were made on")
    samples = [by_id[i] for i in ids]
    wrong = [s.image_id for s, t in zip(samples, targets) if s.dx != ref.codes[int(t)]]
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
    budget: Budget = Budget(),
    config: BenchConfig = BenchConfig(),
    extra_rows: Sequence[dict[str, Any]] = (),
    gated: Sequence[str | os.PathLike] | None = None,
    reporter: Reporter | None = None,
    workdir: str | os.PathLike | None = None,
    reference_models: Mapping[str, dict[str, Any]] | None = None,
) -> BenchReport:
    """Bench ``bundles`` against ``reference`` on the reference's images of ``dataset``.

    ``extra_rows`` are rows made elsewhere (e.g. a target that failed to compile) added as
    they are. ``gated``: the bundles the budget applies to (default: all). Budgets against the
    student apply to bundles made from the student; any other bundle is held to the ensemble.
    ``reference_models``: the ensemble and the student exported to ONNX (``{row: {"path",
    "preprocess", "output"}}``, see :func:`~edgeskin.bench.reference.export_reference_models`):
    their rows are timed like the bundles. Without them (a predictions file, e.g. on a device)
    the reference rows carry no latency here; what the build machine measured stays in the
    report's JSON under ``build_machine_latency``.
    Returns the report; budget breaches and failed rows are listed in it (the CLI turns them into
    a non-zero exit).
    """
    reporter = reporter or NullReporter()
    codes = list(reference.codes)
    y = reference.targets
    ens = reference.probs["ensemble"]
    student = reference.probs.get("student")
    val = reference.val
    val_samples = None
    thresholds_from = "the reported split itself (no validation predictions)"
    if val is not None:
        try:
            val_samples = bench_inputs(dataset, reference, which="val")
            thresholds_from = "val"
        except DataError:  # e.g. a device holding only the bench images
            val = None
            thresholds_from = "the reported split itself (the validation images are not in --data)"
    mel = codes.index("mel") if "mel" in codes else None

    def fitted(p_val: np.ndarray | None, p_test: np.ndarray) -> float | None:
        if mel is None:
            return None
        if val is not None and p_val is not None:
            return threshold_at_specificity(p_val[:, mel], val["targets"] == mel, config.specificity)
        return threshold_at_specificity(p_test[:, mel], y == mel, config.specificity)

    t_ens = fitted(val["probs"].get("ensemble") if val else None, ens)
    common = dict(ensemble=ens, student=student, mel_threshold_ens=t_ens, specificity=config.specificity,
                  n_boot=config.n_boot, seed=config.seed, thresholds_from="val" if val is not None else "reported")
    samples = bench_inputs(dataset, reference)
    e2e = samples.samples[: config.e2e_images]
    tmp = tempfile.TemporaryDirectory(prefix="edgeskin-bench-", dir=workdir)
    inputs: dict[str, tuple[Path, Path | None]] = {}
    rows: list[dict[str, Any]] = []
    try:
        ctx = _Ctx(samples, val_samples, [s.path for s in e2e], inputs, Path(tmp.name), codes, y, config, common,
                   reporter, val["targets"] if val is not None else None, fitted)
        for name, p in reference.probs.items():
            info = reference.info.get("rows", {}).get(name, {})
            row: dict[str, Any] = {"row": name if name != "student" else "student/fp32", "kind": "reference",
                                   "status": "ok", **{k: v for k, v in info.items() if k in ("size_bytes",)}}
            if info.get("latency_batch1"):
                row["build_machine_latency"] = {k: info.get(k) for k in ("latency_batch1", "engine", "threads")}
            model = (reference_models or {}).get(name)
            if model is not None:
                from ..preprocess import PreprocessConfig

                pre = PreprocessConfig.from_dict(model["preprocess"])
                res = _measure(ctx, {"kind": "onnx", **model}, pre, json.dumps(pre.to_dict(), sort_keys=True),
                               len(rows), row)
                if res.get("status") == "ok":
                    onnx_probs = res.pop("probs")
                    res.pop("val_probs", None)
                    # the exported graph must compute what was evaluated (a wrong export fails the row)
                    res["onnx_max_abs_diff"] = float(np.max(np.abs(onnx_probs - p))) if len(p) else 0.0
                    res["latency_engine"] = f"{res.get('engine')} {res.get('engine_version')} fp32 (exported)"
                    if res["onnx_max_abs_diff"] > 1e-3:
                        res = {"status": "failed", "error": f"the ONNX export of {name} differs from it by "
                                                            f"{res['onnx_max_abs_diff']:.2e} in probability"}
                row.update(res)
            if row["status"] == "ok":
                p_val = val["probs"].get(name) if val is not None else None
                row.update(row_metrics(p, y, codes, **{**common, "mel_threshold": fitted(p_val, p)}))
            rows.append(row)
        for i, b in enumerate(bundles):
            rows.append(_bench_bundle(Path(b), 100 + i, ctx))
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
    return BenchReport(rows, {**asdict(config), "n_images": len(y), "split": reference.split,
                              "thresholds_fitted_on": thresholds_from, "e2e_images": describe_images(e2e),
                              "cpu": _cpu(), "device_mode": reference_models is None},
                       {**asdict(budget), "applied_against": against}, breaches,
                       {"sha256": reference.sha256(), "rows": sorted(reference.probs), **reference.info})


def failed_rows(report: BenchReport) -> list[str]:
    """``row: error`` for every row that could not be compiled, loaded or run."""
    return [f"{r['row']}: {r.get('error', r.get('status'))}" for r in report.rows if r.get("status") == "failed"]


def _cpu() -> str:
    from .worker import cpu_model

    return cpu_model()


def describe_images(samples: Sequence[Any]) -> dict[str, Any]:
    """What the end-to-end timing decodes: how many files, their most common resolution and sizes."""
    from collections import Counter

    from PIL import Image

    sizes, res = [], Counter()
    for s in samples:
        try:
            sizes.append(os.path.getsize(s.path))
            with Image.open(s.path) as im:
                res[f"{im.width}x{im.height}"] += 1
        except OSError:
            continue
    return {"n": len(samples), "resolution": res.most_common(1)[0][0] if res else None,
            "resolutions": dict(res), "mean_kb": (sum(sizes) / len(sizes) / 1024) if sizes else None,
            "format": Path(samples[0].path).suffix.lstrip(".").upper() if samples else None}


@dataclass
class _Ctx:
    samples: Dataset
    val_samples: Dataset | None
    e2e_paths: list[str]
    inputs: dict[str, tuple[Path, Path | None]]
    tmp: Path
    codes: list[str]
    y: np.ndarray
    config: BenchConfig
    common: dict[str, Any]
    reporter: Reporter
    val_y: np.ndarray | None
    fitted: Any


def _prepared(ctx: _Ctx, pre: Any, key: str) -> tuple[Path, Path | None]:
    """The bench (and validation) images preprocessed once per input spec, as .npy files."""
    if key not in ctx.inputs:
        paths = []
        for what, ds in (("bench", ctx.samples), ("validation", ctx.val_samples)):
            if ds is None:
                paths.append(None)
                continue
            ctx.reporter.start(f"preprocessing {len(ds)} {what} images ({pre.size} px, {pre.layout})", len(ds))
            _, arrays = decode_dataset(ds, pre, progress=ctx.reporter.advance)
            ctx.reporter.stop()
            path = ctx.tmp / f"inputs-{len(ctx.inputs)}-{what}.npy"
            np.save(path, eval_tensors(arrays, pre))
            paths.append(path)
        ctx.inputs[key] = (paths[0], paths[1])
    return ctx.inputs[key]


def _measure(ctx: _Ctx, model: dict[str, Any], pre: Any, key: str, i: int, row: dict[str, Any]) -> dict[str, Any]:
    """Run the worker on one model (``model``: the worker's JSON spec of it; ``pre``: its
    preprocessing, whose inputs are prepared once per ``key``); returns its result with
    ``probs`` (and ``val_probs``) loaded, or ``status: failed``."""
    cfg = ctx.config
    try:
        test_npy, val_npy = _prepared(ctx, pre, key)
        spec = {"model": model, "inputs": str(test_npy), "threads": cfg.threads, "min_samples": cfg.min_samples,
                "min_seconds": cfg.min_seconds, "max_seconds": cfg.max_seconds, "warmup": cfg.warmup,
                "batch_sizes": list(cfg.batch_sizes), "engine": cfg.engine, "images": ctx.e2e_paths,
                "out_probs": str(ctx.tmp / f"probs-{i}.npy"), "result": str(ctx.tmp / f"result-{i}.json")}
        if val_npy is not None:
            spec.update(val_inputs=str(val_npy), out_val_probs=str(ctx.tmp / f"val-probs-{i}.npy"))
        spec_path = ctx.tmp / f"spec-{i}.json"
        spec_path.write_text(json.dumps(spec))
        ctx.reporter.message(f"benching {row['row']} (batch-1 latency: at least {cfg.min_samples} runs and "
                             f"{cfg.min_seconds:g} s, model only and end to end)")
        proc = subprocess.run([sys.executable, "-m", "edgeskin.bench.worker", str(spec_path)], capture_output=True,
                              text=True, timeout=cfg.timeout_s)
        result_path = Path(spec["result"])
        if not result_path.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
            raise EdgeskinError(f"the engine process died (exit {proc.returncode}): {tail[0][:300]}")
        res = json.loads(result_path.read_text())
        if res["status"] != "ok":
            raise EdgeskinError(res.get("error", "failed"))
        res["probs"] = np.load(res["probs"])
        if "val_probs" in res:
            res["val_probs"] = np.load(res["val_probs"])
        return res
    except subprocess.TimeoutExpired:
        return {"status": "failed", "error": f"timed out after {cfg.timeout_s:.0f} s"}
    except EdgeskinError as exc:
        return {"status": "failed", "error": exc.message}
    except Exception as exc:  # noqa: BLE001 - one bad model must not stop the bench
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}


def _bench_bundle(path: Path, i: int, ctx: _Ctx) -> dict[str, Any]:
    row: dict[str, Any] = {"row": path.name, "kind": "bundle", "bundle": str(path)}
    try:
        reader = BundleReader(path)
        m = reader.manifest
        reader.verify()
        reader.close()
        row.update(row=f"{m.target}/{m.precision}", target=m.target, precision=m.precision,
                   source_sha256=(m.provenance.get("model") or {}).get("sha256"),
                   source_model=(m.provenance.get("model") or {}).get("name"),
                   forced=bool(m.accuracy.get("forced")),
                   size_bytes=int(m.files.get(m.model_file, {}).get("bytes", 0)),
                   bundle_bytes=int(sum(f.get("bytes", 0) for f in m.files.values())))
        if list(m.labels) != ctx.codes:
            raise ConfigError(f"class order {list(m.labels)} differs from the reference's {ctx.codes}",
                              "bench bundles made from models of the reference's label set")
        res = _measure(ctx, {"kind": "bundle", "path": str(path)}, m.input.preprocess_config(), _spec_key(m.input),
                       i, row)
        if res.get("status") != "ok":
            row.update(status="failed", error=res.get("error", "failed"))
            return row
        probs = res.pop("probs")
        val_probs = res.pop("val_probs", None)
        row.update(res)
        row.update(row_metrics(probs, ctx.y, ctx.codes,
                               **{**ctx.common, "mel_threshold": ctx.fitted(val_probs, probs)}))
    except EdgeskinError as exc:
        row.update(status="failed", error=exc.message)
    except Exception as exc:  # noqa: BLE001 - one bad bundle must not stop the bench
        row.update(status="failed", error=f"{type(exc).__name__}: {exc}")
    return row


def check_budget(rows: list[dict[str, Any]], budget: Budget, against: str) -> list[str]:
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
        out += [f"{r['row']}: {msg}" for msg in budget.drop_failures(drops, vs)]
        timed = r.get("latency_e2e") or r.get("latency_batch1") or {}
        lat = timed.get("p90_ms")
        if budget.max_latency_ms is not None and lat is not None and not r.get("host_proxy") \
                and lat > budget.max_latency_ms:
            kind = "end-to-end" if r.get("latency_e2e") else "model-only"
            out.append(f"{r['row']}: p90 {kind} latency {lat:.1f} ms > {budget.max_latency_ms:g} ms")
    return out
