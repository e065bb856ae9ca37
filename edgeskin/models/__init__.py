"""Models (torch): architectures with the published head, ensembles, checkpoints."""

from .arch import ARCHS, build_model, set_trainable
from .checkpoint import Checkpoint, load_checkpoint, load_ensemble, save_checkpoint
from .ensemble import Ensemble, inference_fn, predict_probs

__all__ = [
    "ARCHS", "build_model", "set_trainable", "Checkpoint", "load_checkpoint", "load_ensemble",
    "save_checkpoint", "Ensemble", "inference_fn", "predict_probs",
]
