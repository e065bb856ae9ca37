"""A file of reference predictions, so a device can bench a bundle without torch: the image ids,
their true classes, and the probabilities of the full-precision ensemble (and, optionally, of
the FP32 student) on one split. numpy + stdlib (an ``.npz`` with a JSON header inside)."""

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

    def __post_init__(self) -> None:
        n = len(self.image_ids)
        if len(self.targets) != n:
            raise ConfigError(f"{len(self.targets)} targets for {n} images")
        for k, p in self.probs.items():
            if p.shape != (n, len(self.codes)):
                raise ConfigError(f"reference {k!r} has shape {p.shape}, expected {(n, len(self.codes))}")

    def sha256(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([self.image_ids, list(self.codes)]).encode())
        h.update(np.ascontiguousarray(self.targets, dtype=np.int64).tobytes())
        for k in sorted(self.probs):
            h.update(k.encode())
            h.update(np.ascontiguousarray(self.probs[k], dtype=np.float64).tobytes())
        return h.hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        header = {"format": FORMAT, "version": 1, "image_ids": self.image_ids, "codes": list(self.codes),
                  "split": self.split, "rows": sorted(self.probs), "info": self.info}
        buf = io.BytesIO()
        np.savez_compressed(buf, header=np.array(json.dumps(header)), targets=self.targets.astype(np.int64),
                            **{f"probs__{k}": v.astype(np.float64) for k, v in self.probs.items()})
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
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(f"{p}: not a reference-predictions file ({exc})",
                            "make one with `edgeskin bench --reference ENSEMBLE --save-reference FILE`") from None
        return cls(list(header["image_ids"]), tuple(header["codes"]), targets, probs, header.get("split", "test"),
                   header.get("info", {}))


def reference_from_models(
    ensemble: str | os.PathLike,
    *,
    dataset: Any,
    split: Any,
    split_name: str = "test",
    student: str | os.PathLike | None = None,
    latency_runs: int = 30,
    threads: int | None = None,
    reporter: Any = None,
    compute: Any = None,
) -> ReferencePredictions:
    """Evaluate the ensemble (and the FP32 student) here with torch and keep their predictions,
    with their batch-1 torch latency, as a :class:`ReferencePredictions`. ``compute``: where the
    predictions are computed (fp32; default the CPU); latency is always timed on the host CPU."""
    import torch

    from ..evaluate import evaluate
    from ..models import Ensemble, inference_fn, load_ensemble
    from .latency import interleaved_latency

    if threads:
        torch.set_num_threads(threads)

    def weights_bytes(ms: Sequence[Any]) -> int:
        return sum((Path(m.path).parent / m.config["weights"]).stat().st_size for m in ms)

    members = load_ensemble(Path(ensemble))
    ev = evaluate(ensemble, dataset=dataset, split=split, split_name=split_name, reporter=reporter, members=members,
                  device=compute)
    probs = {"ensemble": ev.probs["ensemble"] if "ensemble" in ev.probs else next(iter(ev.probs.values()))}
    models: dict[str, Any] = {"ensemble": Ensemble([m.model for m in members])}
    sizes = {"ensemble": weights_bytes(members)}
    info: dict[str, Any] = {"ensemble": str(ensemble), "student": None if student is None else str(student),
                            "predictions_device": "cpu" if compute is None else str(getattr(compute, "device", compute)),
                            "student_sha256": None,
                            "members": [{"name": m.name, "sha256": m.sha256} for m in members], "rows": {}}
    if student is not None:
        smembers = load_ensemble(Path(student))
        sv = evaluate(student, dataset=dataset, split=split, split_name=split_name, reporter=reporter,
                      members=smembers, device=compute)
        if sv.image_ids != ev.image_ids:
            raise ConfigError("the student and the ensemble were scored on different images",
                              "use one data set and split for both")
        probs["student"] = next(iter(sv.probs.values()))
        models["student"] = smembers[0].model
        sizes["student"] = weights_bytes(smembers[:1])
        info["student_sha256"] = smembers[0].sha256
    if latency_runs > 0:
        size = members[0].preprocess.size
        x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
        stats = interleaved_latency({k: inference_fn(m) for k, m in models.items()}, x, runs=latency_runs, warmup=5)
        for k, s in stats.items():
            info["rows"][k] = {"latency_batch1": s.to_dict(), "engine": f"torch {torch.__version__} fp32",
                               "threads": torch.get_num_threads(), "size_bytes": sizes[k]}
    return ReferencePredictions(list(ev.image_ids), tuple(ev.labels.codes), np.asarray(ev.targets), probs,
                                split_name, info)
