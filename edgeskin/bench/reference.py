"""A file of reference predictions, so a device can bench a bundle without torch: the image ids,
their true classes, and the probabilities of the full-precision ensemble (and, optionally, of
the FP32 student) on one split, plus the same on the validation split when there is one (the
melanoma operating points are fitted there, so they travel with the file). numpy + stdlib (an
``.npz`` with a JSON header inside).

:func:`export_reference_models` exports the ensemble (one graph, mean of softmax) and the
student to ONNX so that the bench times them the way it times bundles: in ONNX Runtime FP32, in
the bench's worker process, model only and end to end."""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import ConfigError, DataError
from ..fileio import atomic_write_bytes

FORMAT = "edgeskin-reference-predictions"


@dataclass
class ReferencePredictions:
    """``probs`` maps a row name (``ensemble``, ``student``) to (N, C) probabilities in the order
    of ``image_ids``; ``targets`` are class indices in ``codes``' order."""

    image_ids: list[str]
    codes: tuple[str, ...]
    targets: np.ndarray
    probs: dict[str, np.ndarray]
    split: str = "test"
    info: dict[str, Any] = field(default_factory=dict)
    #: the same rows on the validation split: ``{"image_ids", "targets", "probs": {row: (M, C)}}``
    val: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        n = len(self.image_ids)
        if len(self.targets) != n:
            raise ConfigError(f"{len(self.targets)} targets for {n} images")
        for k, p in self.probs.items():
            if p.shape != (n, len(self.codes)):
                raise ConfigError(f"reference {k!r} has shape {p.shape}, expected {(n, len(self.codes))}")
        if self.val is not None:
            m = len(self.val["image_ids"])
            self.val["targets"] = np.asarray(self.val["targets"], dtype=np.int64)
            if len(self.val["targets"]) != m or any(p.shape != (m, len(self.codes)) for p in self.val["probs"].values()):
                raise ConfigError("reference validation predictions do not match their image list")

    def sha256(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([self.image_ids, list(self.codes)]).encode())
        h.update(np.ascontiguousarray(self.targets, dtype=np.int64).tobytes())
        for k in sorted(self.probs):
            h.update(k.encode())
            h.update(np.ascontiguousarray(self.probs[k], dtype=np.float64).tobytes())
        return h.hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        header = {"format": FORMAT, "version": 2, "image_ids": self.image_ids, "codes": list(self.codes),
                  "split": self.split, "rows": sorted(self.probs), "info": self.info,
                  "val": None if self.val is None else {"image_ids": list(self.val["image_ids"]),
                                                         "rows": sorted(self.val["probs"])}}
        extra = {} if self.val is None else {
            "val_targets": np.asarray(self.val["targets"], dtype=np.int64),
            **{f"val_probs__{k}": np.asarray(v, dtype=np.float64) for k, v in self.val["probs"].items()}}
        buf = io.BytesIO()
        np.savez_compressed(buf, header=np.array(json.dumps(header)), targets=self.targets.astype(np.int64),
                            **{f"probs__{k}": v.astype(np.float64) for k, v in self.probs.items()}, **extra)
        out = Path(path)
        atomic_write_bytes(out, buf.getvalue())
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ReferencePredictions":
        p = Path(path)
        if not p.is_file():
            raise DataError(f"{p}: reference predictions not found",
                            "make them with `edgeskin bench --reference ENSEMBLE --save-reference FILE`")
        try:
            with np.load(p, allow_pickle=False) as z:
                header = json.loads(str(z["header"]))
                if header.get("format") != FORMAT:
                    raise ValueError("not a reference-predictions file")
                probs = {k: z[f"probs__{k}"] for k in header["rows"]}
                targets = z["targets"]
                val = None
                if header.get("val"):  # version 2: validation predictions for the operating points
                    val = {"image_ids": header["val"]["image_ids"], "targets": z["val_targets"],
                           "probs": {k: z[f"val_probs__{k}"] for k in header["val"]["rows"]}}
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(f"{p}: not a reference-predictions file ({exc})",
                            "make one with `edgeskin bench --reference ENSEMBLE --save-reference FILE`") from None
        return cls(list(header["image_ids"]), tuple(header["codes"]), targets, probs, header.get("split", "test"),
                   header.get("info", {}), val)


def reference_from_models(
    ensemble: str | os.PathLike,
    *,
    dataset: Any,
    split: Any,
    split_name: str = "test",
    student: str | os.PathLike | None = None,
    threads: int | None = None,
    reporter: Any = None,
    compute: Any = None,
) -> ReferencePredictions:
    """Evaluate the ensemble (and the FP32 student) here with torch and keep their predictions on
    ``split_name`` and, when the split has one and it is not the reported split, on validation.
    ``compute``: where the predictions are computed (fp32; default the CPU). Latency is not
    measured here: :func:`export_reference_models` and the bench's worker time these models."""
    import torch

    from ..evaluate import evaluate
    from ..models import load_ensemble

    if threads:
        torch.set_num_threads(threads)

    def weights_bytes(ms: Sequence[Any]) -> int:
        return sum((Path(m.path).parent / m.config["weights"]).stat().st_size for m in ms)

    members = load_ensemble(Path(ensemble))
    smembers = load_ensemble(Path(student)) if student is not None else None

    def predictions(name: str) -> tuple[Any, dict[str, np.ndarray]]:
        ev = evaluate(ensemble, dataset=dataset, split=split, split_name=name, reporter=reporter, members=members,
                      device=compute)
        probs = {"ensemble": ev.probs["ensemble"] if "ensemble" in ev.probs else next(iter(ev.probs.values()))}
        if smembers is not None:
            sv = evaluate(student, dataset=dataset, split=split, split_name=name, reporter=reporter,
                          members=smembers, device=compute)
            if sv.image_ids != ev.image_ids:
                raise ConfigError("the student and the ensemble were scored on different images",
                                  "use one data set and split for both")
            probs["student"] = next(iter(sv.probs.values()))
        return ev, probs

    ev, probs = predictions(split_name)
    val = None
    if split is not None and split_name != "val" and split.ids("val"):
        vev, vprobs = predictions("val")
        val = {"image_ids": list(vev.image_ids), "targets": np.asarray(vev.targets), "probs": vprobs}
    info: dict[str, Any] = {"ensemble": str(ensemble), "student": None if student is None else str(student),
                            "predictions_device": "cpu" if compute is None else str(getattr(compute, "device", compute)),
                            "student_sha256": None if smembers is None else smembers[0].sha256,
                            "members": [{"name": m.name, "sha256": m.sha256} for m in members],
                            "rows": {"ensemble": {"size_bytes": weights_bytes(members)},
                                     **({"student": {"size_bytes": weights_bytes(smembers[:1])}}
                                        if smembers is not None else {})}}
    return ReferencePredictions(list(ev.image_ids), tuple(ev.labels.codes), np.asarray(ev.targets), probs,
                                split_name, info, val)


def export_reference_models(ensemble: str | os.PathLike, student: str | os.PathLike | None,
                            out_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The ensemble (its members and their mean softmax in one graph) and the FP32 student
    exported to ONNX FP32 in ``out_dir``, as the cpu fp32 bundle is: ``{row: {"path",
    "preprocess", "output"}}`` for :func:`~edgeskin.bench.runner.run_bench`."""
    from ..export import export_onnx
    from ..models import Ensemble, load_ensemble

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    members = load_ensemble(Path(ensemble))
    pre = members[0].preprocess
    x = np.random.default_rng(0).standard_normal((2, 3, pre.size, pre.size)).astype(np.float32)
    models: dict[str, dict[str, Any]] = {}
    # an ensemble with imported members (or members of several preprocessings) is not one torch
    # graph: its row carries no latency here, like a reference read from a predictions file
    if all(m.source == "edgeskin" and m.preprocess == pre for m in members):
        ens = Ensemble([m.model for m in members]).eval()
        export_onnx(ens, out / "ensemble.onnx", size=pre.size, check_inputs=x)
        models["ensemble"] = {"path": str(out / "ensemble.onnx"), "preprocess": pre.to_dict(), "output": "probs"}
    if student is not None:
        [s] = load_ensemble(Path(student))[:1]
        export_onnx(s.model, out / "student.onnx", size=s.preprocess.size, check_inputs=x)
        models["student"] = {"path": str(out / "student.onnx"), "preprocess": s.preprocess.to_dict(),
                             "output": "logits"}
    return models
