"""edgeskin: take skin-lesion classifier ensembles to the edge.

Submodules share some names with functions (``edgeskin.preprocess`` is a module), so the
functions are exported as ``preprocess_image`` and ``evaluate_model``.
The public API is imported lazily, so ``import edgeskin`` (and ``edgeskin --help``) never
loads torch. Torch-backed names (training, models) import it on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    # light (numpy + Pillow)
    "EdgeskinError": "edgeskin.errors",
    "LabelSet": "edgeskin.labels",
    "get_label_set": "edgeskin.labels",
    "PreprocessConfig": "edgeskin.preprocess",
    "preprocess_image": "edgeskin.preprocess:preprocess",
    "open_image": "edgeskin.preprocess",
    "AugmentConfig": "edgeskin.augment",
    "load_dataset": "edgeskin.data",
    "make_split": "edgeskin.data",
    "read_split": "edgeskin.data",
    "write_split": "edgeskin.data",
    "classification_report": "edgeskin.metrics",
    # members trained anywhere (torch only for torch members)
    "load_members": "edgeskin.members",
    "import_members": "edgeskin.members.importer",
    "MemberDeclaration": "edgeskin.members.declare:Declaration",
    # torch
    "build_model": "edgeskin.models",
    "load_ensemble": "edgeskin.models",
    "load_checkpoint": "edgeskin.models",
    "Ensemble": "edgeskin.models",
    "TrainConfig": "edgeskin.train",
    "train_member": "edgeskin.train",
    "train_ensemble": "edgeskin.train",
    "DistillConfig": "edgeskin.train",
    "distill": "edgeskin.train",
    "evaluate_model": "edgeskin.evaluate:evaluate",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'edgeskin' has no attribute {name!r}")
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr or name)


def __dir__() -> list[str]:
    return sorted(__all__)
