"""What every target shares: budgets, and the compile pipeline's verification step.

Every compile checks what it made before it ships it: the compiled artefact runs through the
device runtime on the validation split; its top-1 agreement with the FP32 model and its drops in
top-1, balanced accuracy and melanoma recall go into the manifest, with 95 % intervals (Wilson
score for the agreement, a paired bootstrap over the images for the drops) and the number of
images. A split too small for the budget to mean much (one flipped image worth more than a
budgeted drop, or fewer than three images' worth) is warned about and recorded. When they miss
the budget, compile raises :class:`CompileError` and writes no bundle, unless forced (then the
manifest says so).
"""

from __future__ import annotations

import io
import logging
import platform
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import numpy as np

from .. import __version__
from ..budget import METRICS, Budget
from ..bundle import Manifest, write_bundle
from ..errors import ConfigError, EdgeskinError
from ..metrics import budget_steps, classification_report, drops_points, paired_bootstrap_drops, wilson_interval

log = logging.getLogger(__name__)

#: the compile check's intervals: level, bootstrap resamples and seed (fixed, so a check repeats)
INTERVAL_LEVEL, N_BOOT, BOOT_SEED = 0.95, 1000, 0


class CompileError(EdgeskinError):
    """The compiled artefact missed its accuracy budget (or could not be made)."""

    exit_code = 3


def compare(probs: np.ndarray, reference: np.ndarray, labels: np.ndarray, codes: tuple[str, ...],
            budget: Budget) -> dict[str, Any]:
    """Compiled vs FP32 on the same images: agreement, drops (points), pass/fail per metric, 95 %
    intervals, and warnings where the split is too small for the budget."""
    ours = classification_report(probs, labels, codes)
    ref = classification_report(reference, labels, codes)
    same = int(np.sum(probs.argmax(1) == reference.argmax(1)))
    agreement = same / len(labels) if len(labels) else float("nan")
    pos = f"{ref['positive_class']}_sensitivity" if ref.get("positive_class") else "malignant_sensitivity"
    drops = drops_points(ref, ours)
    positive = list(codes).index(ref["positive_class"]) if ref.get("positive_class") else None
    boot = paired_bootstrap_drops(reference, probs, labels, positive=positive, n_boot=N_BOOT, seed=BOOT_SEED,
                                  level=INTERVAL_LEVEL)
    steps = budget_steps(labels, codes)
    failures = budget.drop_failures(drops)
    if budget.min_agreement is not None and agreement < budget.min_agreement:
        failures.append(f"top-1 agreement {100 * agreement:.2f}% < {100 * budget.min_agreement:.1f}%")
    return {
        "n": int(len(labels)),
        "top1_agreement": agreement,
        "compiled": {k: ours[k] for k in ("top1", "top2", "top3", "balanced_accuracy", pos, "ece")},
        "fp32": {k: ref[k] for k in ("top1", "top2", "top3", "balanced_accuracy", pos, "ece")},
        "drops_points": drops,
        "intervals": {
            "level": INTERVAL_LEVEL,
            "top1_agreement": list(wilson_interval(same, len(labels), INTERVAL_LEVEL)),
            "drops_points": {k: ([boot[k]["low"], boot[k]["high"]] if boot.get(k) and drops.get(k) is not None
                                 else None) for k in METRICS},
            "method": {"top1_agreement": "Wilson score interval on the n images",
                       "drops_points": f"paired bootstrap percentile interval: {N_BOOT} resamples of the n images "
                                       f"with replacement, both models scored on each, seed {BOOT_SEED}"},
        },
        "resolution_points": steps,
        "warnings": budget.resolution_warnings(steps),
        "max_abs_prob_diff": float(np.abs(probs - reference).max()) if len(probs) else 0.0,
        "budget": {k: v for k, v in budget.to_dict().items() if k in (*METRICS, "min_agreement")},
        "passed": not failures,
        "failures": failures,
    }


@dataclass
class CompileResult:
    bundle: Path | None
    manifest: Manifest
    check: dict[str, Any]
    forced: bool = False
    timings: dict[str, float] = field(default_factory=dict)


class Target:
    """A compile target. Subclasses set the class attributes and implement ``build``."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    precisions: ClassVar[tuple[str, ...]] = ()
    needs_calibration: ClassVar[tuple[str, ...]] = ()
    extras: ClassVar[tuple[str, ...]] = ()
    engine: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def check_precision(self, precision: str) -> None:
        if precision not in self.precisions:
            raise ConfigError(f"target {self.name!r} cannot make {precision!r}",
                              f"choose one of: {', '.join(self.precisions)}")

    def check_device_precision(self, profile: Any, precision: str) -> None:
        if precision not in profile.precisions:
            raise ConfigError(f"device {profile.name} does not run {precision}",
                              f"choose one of: {', '.join(profile.precisions)}")


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def golden_npz(inputs: np.ndarray, probs: np.ndarray, ids: list[str]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, inputs=inputs.astype(np.float32), probs=probs.astype(np.float64), ids=np.array(ids))
    return buf.getvalue()


def verify_and_write(
    *,
    manifest: Manifest,
    files: Mapping[str, bytes],
    val_inputs: np.ndarray,
    val_labels: np.ndarray,
    val_ids: list[str],
    reference_probs: np.ndarray,
    budget: Budget,
    out: Path,
    force: bool,
    overwrite: bool,
    golden_n: int,
    golden_tolerance: float,
    threads: int | None,
    progress: Callable[[int], None] | None = None,
) -> CompileResult:
    """Write a scratch bundle, run it through the runtime on the validation inputs, compare with
    the FP32 reference, then write the real bundle (with accuracy and golden set) or refuse."""
    from ..runtime import load

    out.parent.mkdir(parents=True, exist_ok=True)  # --out may name a folder that does not exist yet
    with tempfile.TemporaryDirectory(prefix=".edgeskin-check-", dir=out.parent) as scratch:
        path = write_bundle(Path(scratch) / "b.edgeskin", manifest, files)
        pred = load(path, threads=threads)
        probs = []
        for s in range(0, len(val_inputs), 16):
            probs.append(pred.probabilities(val_inputs[s : s + 16]))
            if progress:
                progress(len(val_inputs[s : s + 16]))
        probs_arr = np.concatenate(probs) if probs else np.zeros((0, len(manifest.labels)))
        runtime_version = pred.backend.version
        del pred
    check = compare(probs_arr, reference_probs, val_labels, manifest.labels, budget)
    check["split"] = "val"
    check["reference"] = "FP32 model (ONNX Runtime) on the same images"
    if check["warnings"]:
        log.warning("validation split small for the compile budget: %s", "; ".join(check["warnings"]))
    forced = False
    if not check["passed"]:
        if not force:
            raise CompileError(
                f"the compiled {manifest.target}/{manifest.precision} model misses its budget on the validation "
                f"split: {'; '.join(check['failures'])}",
                "no bundle was written; try --range-estimator auto (cpu, jetson), --float-fallback 0.98, "
                "accuracy-controlled quantization (--max-drop-int8 with --range-estimator mean_minmax), more "
                "calibration images, or pass --force to ship it anyway (the manifest will say so)",
            )
        forced = True
    check["forced"] = forced
    n = min(golden_n, len(val_inputs))
    files = dict(files)
    files["golden.npz"] = golden_npz(val_inputs[:n], probs_arr[:n], val_ids[:n])
    final = manifest.with_(
        accuracy=check,
        golden={"file": "golden.npz", "n": n, "tolerance": golden_tolerance,
                "metric": "max absolute difference of class probabilities",
                "recorded_with": {"engine": manifest.engine.get("name"), "version": runtime_version,
                                  "machine": platform.machine(), "processor": platform.processor()}},
    )
    bundle = write_bundle(out, final, files, overwrite=overwrite)
    from ..bundle import BundleReader

    return CompileResult(bundle, BundleReader(bundle).manifest, check, forced)


def labels_txt(codes: tuple[str, ...]) -> bytes:
    return ("\n".join(codes) + "\n").encode()


def base_manifest(**kw: Any) -> Manifest:
    return Manifest(created=now_iso(), edgeskin_version=__version__, **kw)


__all__ = ["Budget", "CompileError", "CompileResult", "Target", "compare", "verify_and_write",
           "labels_txt", "base_manifest"]
