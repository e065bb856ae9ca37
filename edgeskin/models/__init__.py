"""Models (torch): architectures with the published head, ensembles, checkpoints."""

from .arch import ARCHS, build_model, set_trainable
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .ensemble import Ensemble, inference_fn, predict_probs


def load_ensemble(path):  # noqa: ANN001, ANN201
    """Load every member of an ensemble folder (or a single member file): edgeskin checkpoints,
    imported members (``edgeskin import``), both mixed, or the shared reference layout. Members
    keep their own preprocessing; see :func:`edgeskin.members.loader.load_members` (which reads
    edgeskin checkpoints through :mod:`edgeskin.models.checkpoint`, one layer below it)."""
    from ..members.loader import load_members

    return load_members(path)


__all__ = [
    "ARCHS", "build_model", "set_trainable", "Checkpoint", "load_checkpoint", "load_ensemble",
    "save_checkpoint", "Ensemble", "inference_fn", "predict_probs",
]
