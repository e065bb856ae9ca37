"""Compile-side preparation shared by targets: pick the model, export it, score FP32 on val."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

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
    #: the checkpoint's JSON (edgeskin checkpoints; None for imported graphs)
    path: Path | None = None

    def provenance(self, split: Split) -> dict[str, Any]:
        return {**model_provenance(self.name, self.arch, self.sha256, self.config, split), "export": self.export}

    def close(self) -> None:
        self.workdir.cleanup()


def model_provenance(name: str, arch: str, sha256: str, config: dict[str, Any], split: Split) -> dict[str, Any]:
    """What every bundle manifest says of the model it was made from: its hash, its teacher
    (for a distilled student), the recipe that trained it and the licence of the data it was trained
    on (``data_licence``: HAM10000's CC BY-NC 4.0 travels from the checkpoint into the bundle)."""
    recipe = config.get("recipe", {})
    return {
        **({"data_licence": recipe["data_licence"]} if recipe.get("data_licence") else {}),
        "model": {"name": name, "arch": arch, "sha256": sha256},
        "teacher": config.get("teacher") or recipe.get("teacher"),
        "recipe": {k: recipe.get(k) for k in ("kind", "loss", "temperature", "alpha", "config_digest", "initialisation",
                                              "initial_weights_sha256", "compute", "best_epoch",
                                              "best_val_balanced_accuracy", "split_sha256") if k in recipe},
        "split_sha256": split.sha256(),
    }


def select_member(model: str | os.PathLike, member: str | None, *, target: str | None = None):  # noqa: ANN201
    """The one member a bundle is made from. ``target="tflite"``: LiteRT converts torch models
    only, so an imported ONNX (or Keras) member, or one whose classes must be mapped, is refused
    with the route that works (distil it into a student first)."""
    ck = _select_member(model, member)
    if target == "tflite" and ck.source != "edgeskin" and not (
            getattr(ck, "model", None) is not None and ck.class_map.is_identity):
        raise CheckpointError(
            f"{model}: member {ck.name} is an imported {ck.source} model; tflite bundles are converted from "
            "torch models (litert-torch), and no maintained converter takes this member to LiteRT",
            f"distil the ensemble into a student first (edgeskin distill --teacher {model} ...), then compile the "
            "student for tflite; cpu and jetson take the member as it is")
    return ck


def _select_member(model: str | os.PathLike, member: str | None):  # noqa: ANN202
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

    reporter = reporter or NullReporter()
    ck = select_member(model, member)
    pre, labels = ck.preprocess, ck.labels
    val, x, y = load_eval_set(split.apply(dataset, "val"), pre, labels, what="validation", reporter=reporter,
                              skip_bad=skip_bad)
    work = tempfile.TemporaryDirectory(prefix="edgeskin-compile-")
    onnx_path = Path(work.name) / "fp32.onnx"
    if ck.source != "edgeskin":
        try:
            export = _imported_graph(ck, onnx_path, opset, x, reporter)
        except BaseException:
            work.cleanup()
            raise
        return _finish(ck, onnx_path, export, x, y, val, work, threads, reporter)
    reporter.message(f"exporting {ck.name} to ONNX (opset {opset})")
    res = export_onnx(ck.model, onnx_path, size=pre.size, opset=opset, check_inputs=x[:8])
    return _finish(ck, onnx_path, {"opset": res.opset, "max_abs_logit_diff_vs_torch": res.max_abs_diff,
                                   "checked_inputs": res.checked_inputs, "exporter": "torch.onnx (legacy)"},
                   x, y, val, work, threads, reporter)


def _imported_graph(ck: Any, onnx_path: Path, opset: int, x: np.ndarray, reporter: Reporter) -> dict[str, Any]:
    """An imported member's graph for a bundle: ONNX is already the intermediate form (converted
    down to ``opset`` where onnx's converter can); timm/torchvision members are exported first.
    Checked against the member itself on validation images."""
    import onnx

    from ..members.onnx import bundle_graph
    from ..runtime.numerics import softmax

    if ck.config.get("runner") == "onnx":
        src, outputs, out_name, how = ck.weights_path, ck.outputs, ck.output_name, f"imported {ck.source} graph"
    else:
        from ..export import export_onnx

        src = onnx_path.with_name("exported.onnx")
        reporter.message(f"exporting {ck.name} to ONNX (opset {opset})")
        export_onnx(ck.model, src, size=ck.preprocess.size, opset=opset, check_inputs=x[:8])
        outputs, out_name, how = "logits", None, "torch.onnx (legacy)"
    reporter.message(f"taking {ck.name}'s ONNX graph to the bundle (opset <= {opset})")
    proto, record = bundle_graph(src, outputs=outputs, class_map=ck.class_map, opset=opset, where=str(ck.path),
                                 output_name=out_name)
    onnx.save_model(proto, str(onnx_path))
    from ..runtime.backends import OnnxRuntimeBackend

    check = x[:8]
    try:
        got = softmax(OnnxRuntimeBackend(onnx_path.read_bytes()).run(check))
    except Exception as exc:  # noqa: BLE001 - ORT's own exception types
        raise CheckpointError(f"{ck.path}: the member's graph does not run on a batch of {len(check)} images ({exc})",
                              "re-export the model with a dynamic batch axis and import it again") from None
    want = ck.probs(check)
    diff = float(np.max(np.abs(got - want))) if len(check) else 0.0
    if diff > 1e-3:
        raise CheckpointError(f"{ck.path}: the bundle's graph differs from the member by {diff:.3g} on validation images",
                              "re-export the model at the target's opset and import it again")
    return {**record, "exporter": how, "max_abs_prob_diff_vs_member": diff, "checked_inputs": int(len(check))}


def _finish(ck: Any, onnx_path: Path, export: dict[str, Any], x: np.ndarray, y: np.ndarray, val: Any,
            work: tempfile.TemporaryDirectory, threads: int | None, reporter: Reporter) -> Prepared:
    from ..runtime.backends import OnnxRuntimeBackend
    from ..runtime.numerics import softmax

    backend = OnnxRuntimeBackend(onnx_path.read_bytes(), threads=threads)
    reporter.start("FP32 reference on the validation split", len(x))
    logits = []
    for s in range(0, len(x), 16):
        logits.append(backend.run(x[s : s + 16]))
        reporter.advance(len(x[s : s + 16]))
    reporter.stop()
    probs = softmax(np.concatenate(logits))
    return Prepared(ck.name, ck.config["arch"], ck.sha256, ck.labels, ck.preprocess, ck.config, onnx_path, export,
                    x, y, [s.image_id for s in val.samples], probs, work,
                    Path(ck.path) if ck.source == "edgeskin" else None)


def trained_form(name: str, config: dict[str, Any], path: Path | None, sha256: str, target: str, *,
                 off: bool, misfit: Callable[[dict[str, Any]], str | None],
                 reporter: Reporter) -> tuple[Path, dict[str, Any]] | None:
    """The file and record of the INT8 form that quantization-aware training made of a checkpoint
    (``config``, read from ``path``, hash ``sha256``) for ``target``, checked against the hash the
    checkpoint records; None when it has none for this target, or the compile step turned it
    ``off``, or ``misfit(record)`` names compile options the form was not trained with."""
    trained = config.get("qat") or {}
    if not trained or path is None or off:
        return None
    qat = trained.get(target)
    if not qat:
        reporter.message(f"{name} was trained quantization-aware for {', '.join(sorted(trained))}, not "
                         f"{target}: calibrating afresh")
        return None
    if qat.get("student_sha256") != sha256:
        reporter.message(f"{name}'s quantization-aware graph was made from other weights: calibrating afresh")
        return None
    why = misfit(qat)
    if why:
        reporter.message(f"{name}'s quantization-aware graph {why}: calibrating afresh (--qat off says so)")
        return None
    from ..fileio import sha256_file
    from ..train.qat import qat_artefact_key

    entry = qat.get(qat_artefact_key(target)) or {}
    file = path.parent / str(entry.get("file"))
    if not file.is_file():
        raise CheckpointError(f"{file}: the quantization-aware INT8 graph of {name} is missing",
                              "copy it beside the checkpoint, or compile with --qat off")
    if sha256_file(file) != entry.get("sha256"):
        raise CheckpointError(f"{file}: does not match the hash {path.name} records for it",
                              "restore the file written with the checkpoint, or compile with --qat off")
    return file, qat


def qat_record(qat: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """What a bundle's provenance says of the quantization-aware form it was compiled from."""
    return {"tool": qat.get("tool", "nncf"), "nncf_version": qat.get("nncf_version"), "mode": "quantization-aware",
            "qat": {k: qat.get(k) for k in ("target", "preset", "quantizer", "observer", "float_modules", "config",
                                           "steps", "val_agreement_before", "val_agreement_after", "onnx", "pt2")
                    if k in qat},
            "options": options}


def qat_graph(prep: Prepared, target: str, options: Any, reporter: Reporter) -> tuple[Any, dict[str, Any]] | None:
    """The INT8 graph a student trained quantization-aware for ``target`` carries (its learned
    ranges and weights), checked against the hash its checkpoint records; None when it has none
    for this target, or ``options.qat`` is off, or the compile options ask for other float layers."""

    def misfit(qat: dict[str, Any]) -> str | None:
        trained_fcf = bool(qat.get("config", {}).get("first_conv_float", True))
        if trained_fcf != bool(options.first_conv_float) or options.ignored or not options.keep_head_float \
                or options.max_drop is not None or options.fallback_agreement is not None:
            return (f"keeps {'the first convolution and ' if trained_fcf else ''}the classifier in float; these "
                    "compile options ask for another float set")
        return None

    found = trained_form(prep.name, prep.config, prep.path, prep.sha256, target,
                         off=getattr(options, "qat", "auto") == "off", misfit=misfit, reporter=reporter)
    if found is None:
        return None
    import onnx

    path, qat = found
    return onnx.load(str(path)), qat_record(qat, options.to_dict())


def calibration_inputs(cal, dataset: Dataset, split: Split, pre: PreprocessConfig,  # noqa: ANN001
                       reporter: Reporter) -> list[np.ndarray]:
    from ..calibration import resolve_calibration_images

    images = resolve_calibration_images(cal, dataset, split)
    _, arrays = decode_with_progress(images, pre, what="calibration", reporter=reporter)
    x = eval_tensors(arrays, pre)
    return [x[i : i + 1] for i in range(len(x))]
