"""Full-precision evaluation of a model or an ensemble on one split of a data set."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .data import Dataset, Split
from .labels import LabelSet
from .metrics import classification_report
from .progress import NullReporter, Reporter


@dataclass
class Evaluation:
    """Per-member and ensemble reports; ``probs`` keeps the raw predictions for later stages."""

    split: str
    labels: LabelSet
    image_ids: list[str]
    targets: np.ndarray
    reports: dict[str, dict[str, Any]]
    probs: dict[str, np.ndarray]
    skipped: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"split": self.split, "n": len(self.image_ids), "class_order": list(self.labels.codes),
                "results": self.reports, "skipped": self.skipped}


def evaluate(
    model: str | os.PathLike,
    *,
    dataset: Dataset,
    split: Split | None,
    split_name: str = "test",
    batch_size: int = 64,
    reporter: Reporter | None = None,
    skip_bad: bool = False,
    members: Sequence[Any] | None = None,
    device: Any = None,
) -> Evaluation:
    """Evaluate every member of ``model`` (an ensemble folder or one checkpoint; imported and mixed
    ensembles too) and, with more than one member, the ensemble (mean of the members'
    probabilities), on ``split_name`` of ``dataset``. Each member sees the images through its own
    preprocessing.

    ``members``: the members of ``model`` when the caller has loaded them already.
    ``device``: a torch device or a :class:`~edgeskin.models.compute.Compute` (default: the CPU);
    inference is fp32 there. The members are moved back to the CPU afterwards."""
    from .members import eval_inputs, load_members, member_probs

    reporter = reporter or NullReporter()
    members = list(members) if members is not None else load_members(Path(model))
    labels = members[0].labels
    subset = split.apply(dataset, split_name) if split is not None else dataset
    subset, inputs, y = eval_inputs(subset, [m.preprocess for m in members], labels, what=split_name,
                                    reporter=reporter, skip_bad=skip_bad)
    probs = member_probs(members, inputs, batch_size=batch_size, device=device, reporter=reporter)
    reports = {name: classification_report(p, y, labels.codes) for name, p in probs.items()}
    if len(members) > 1:
        ens = np.mean([probs[m.name] for m in members], axis=0)
        probs["ensemble"] = ens
        reports["ensemble"] = classification_report(ens, y, labels.codes)
    return Evaluation(split_name, labels, [s.image_id for s in subset.samples], y, reports, probs,
                      [f"{s.where}: {s.reason}" for s in subset.skipped])
