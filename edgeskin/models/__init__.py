"""Models (torch): architectures with the published head, ensembles, checkpoints."""

from .arch import ARCHS, build_model, set_trainable
from .checkpoint import Checkpoint, load_checkpoint, load_ensemble, save_checkpoint
from .ensemble import Ensemble, predict_probs

__all__ = [
    "ARCHS", "build_model", "set_trainable", "Checkpoint", "load_checkpoint", "load_ensemble",
    "save_checkpoint", "Ensemble", "predict_probs",
]
