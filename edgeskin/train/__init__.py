"""Training (torch): losses, the shared fit loop, ensembles of members, DDP."""

from .config import PRESETS, TrainConfig, preset_settings
from .losses import FocalLoss, class_weights, distillation_kl, make_loss
from .loop import FitResult, fit, train_ensemble, train_member
from .distill import DistillConfig, DistillResult, distill, distillation_loss, qat_checkpoint

__all__ = [
    "PRESETS", "TrainConfig", "preset_settings", "FocalLoss", "class_weights", "distillation_kl", "make_loss",
    "FitResult", "fit", "train_ensemble", "train_member",
    "DistillConfig", "DistillResult", "distill", "distillation_loss", "qat_checkpoint",
]
