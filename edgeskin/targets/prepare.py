"""Compile-side preparation shared by targets: pick the model, export it, score FP32 on val."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data import Dataset, Split, decode_with_progress, eval_tensors, load_eval_set
from ..errors import CheckpointError
from ..labels import LabelSet
from ..preprocess import PreprocessConfig
from ..progress import NullReporter, Reporter


@dataclass
class Prepared:
    """One FP32 model ready for a target: its ONNX export, validation tensors and FP32 outputs."""

    name: str
    arch: str
    sha256: str
    labels: LabelSet
    preprocess: PreprocessConfig
    config: dict[str, Any]
    onnx_path: Path
    export: dict[str, Any]
    val_inputs: np.ndarray
    val_labels: np.ndarray
    val_ids: list[str]
    fp32_probs: np.ndarray
    workdir: tempfile.TemporaryDirectory = field(repr=False)

    def provenance(self, split: Split) -> dict[str, Any]:
        return {**model_provenance(self.name, self.arch, self.sha256, self.config, split), "export": self.export}

    def close(self) -> None:
        self.workdir.cleanup()


def model_provenance(name: str, arch: str, sha256: str, config: dict[str, Any], split: Split) -> dict[str, Any]:
    """What every bundle manifest says of the model it was made from: its hash, its teacher
    (for a distilled student) and the recipe that trained it."""
    recipe = config.get("recipe", {})
    return {
        "model": {"name": name, "arch": arch, "sha256": sha256},
        "teacher": config.get("teacher") or recipe.get("teacher"),
        "recipe": {k: recipe.get(k) for k in ("kind", "loss", "temperature", "alpha", "config_digest", "initialisation",
                                              "initial_weights_sha256", "compute", "best_epoch",
                                              "best_val_balanced_accuracy", "split_sha256") if k in recipe},
        "split_sha256": split.sha256(),
    }


def select_member(model: str | os.PathLike, member: str | None):  # noqa: ANN201
    from ..models import load_ensemble

    members = load_ensemble(Path(model))
    if member is not None:
        chosen = [m for m in members if m.name == member]
        if not chosen:
            raise CheckpointError(f"{model}: no member named {member!r}",
                                  f"members: {', '.join(m.name for m in members)}")
        return chosen[0]
    if len(members) > 1:
        raise CheckpointError(
            f"{model} holds {len(members)} members; a device bundle takes one model",
            f"distill the ensemble into one student, or pick a member with --member ({', '.join(m.name for m in members)})",
        )
    return members[0]


def prepare(
    model: str | os.PathLike,
    *,
    dataset: Dataset,
    split: Split,
    member: str | None = None,
    opset: int = 17,
    reporter: Reporter | None = None,
    threads: int | None = None,
    skip_bad: bool = False,
) -> Prepared:
    from ..export import export_onnx
    from ..runtime.backends import OnnxRuntimeBackend
    from ..runtime.predictor import softmax

    reporter = reporter or NullReporter()
    ck = select_member(model, member)
    pre, labels = ck.preprocess, ck.labels
    val, x, y = load_eval_set(split.apply(dataset, "val"), pre, labels, what="validation", reporter=reporter,
                              skip_bad=skip_bad)
    work = tempfile.TemporaryDirectory(prefix="edgeskin-compile-")
    onnx_path = Path(work.name) / "fp32.onnx"
    reporter.message(f"exporting {ck.name} to ONNX (opset {opset})")
    res = export_onnx(ck.model, onnx_path, size=pre.size, opset=opset, check_inputs=x[:8])
    backend = OnnxRuntimeBackend(onnx_path.read_bytes(), threads=threads)
    reporter.start("FP32 reference on the validation split", len(x))
    logits = []
    for s in range(0, len(x), 16):
        logits.append(backend.run(x[s : s + 16]))
        reporter.advance(len(x[s : s + 16]))
    reporter.stop()
    probs = softmax(np.concatenate(logits))
    return Prepared(ck.name, ck.config["arch"], ck.sha256, labels, pre, ck.config, onnx_path,
                    {"opset": res.opset, "max_abs_logit_diff_vs_torch": res.max_abs_diff,
                     "checked_inputs": res.checked_inputs, "exporter": "torch.onnx (legacy)"},
                    x, y, [s.image_id for s in val.samples], probs, work)


def calibration_inputs(cal, dataset: Dataset, split: Split, pre: PreprocessConfig,  # noqa: ANN001
                       reporter: Reporter) -> list[np.ndarray]:
    from ..calibration import resolve_calibration_images

    images = resolve_calibration_images(cal, dataset, split)
    _, arrays = decode_with_progress(images, pre, what="calibration", reporter=reporter)
    x = eval_tensors(arrays, pre)
    return [x[i : i + 1] for i in range(len(x))]
