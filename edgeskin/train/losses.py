"""Losses of the published work: class-weighted cross-entropy and focal loss; and distillation."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

LOSSES = ("wce", "ce", "focal")


def class_weights(counts: Sequence[int]) -> np.ndarray:
    """Inverse class frequency, normalised to mean 1 (classes with no sample get weight 0)."""
    c = np.asarray(counts, dtype=np.float64)
    w = np.where(c > 0, 1.0 / np.maximum(c, 1), 0.0)
    present = w > 0
    if not present.any():
        raise ConfigError("no training samples in any class", "check the training split")
    w = w / w[present].mean()
    return w


class FocalLoss(nn.Module):
    """Focal loss: mean of ``-alpha_y * (1 - p_y)^gamma * log p_y``.

    With ``gamma=0`` it is exactly (weighted) cross-entropy. ``alpha`` is a per-class weight
    (or ``None``); the mean is normalised by the summed alpha of the batch, like PyTorch's
    weighted cross-entropy, so gamma=0 and ``F.cross_entropy(weight=alpha)`` agree.
    """

    def __init__(self, gamma: float = 2.0, alpha: Sequence[float] | torch.Tensor | None = None) -> None:
        super().__init__()
        if gamma < 0:
            raise ConfigError(f"focal gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.register_buffer(
            "alpha", None if alpha is None else torch.as_tensor(alpha, dtype=torch.float32)
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits.float(), dim=1)
        logp_y = logp.gather(1, target[:, None]).squeeze(1)
        loss = -logp_y
        if self.gamma > 0:
            loss = loss * (1.0 - logp_y.exp()).clamp(min=0).pow(self.gamma)
        if self.alpha is None:
            return loss.mean()
        a = self.alpha.to(logits.device)[target]
        return (a * loss).sum() / a.sum().clamp(min=1e-12)


def make_loss(name: str, weights: np.ndarray | None, *, gamma: float = 2.0) -> nn.Module:
    """``wce``: class-weighted cross-entropy; ``ce``: plain; ``focal``: focal loss with
    the class weights as per-class alpha."""
    w = None if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    if name == "wce":
        return nn.CrossEntropyLoss(weight=w)
    if name == "ce":
        return nn.CrossEntropyLoss()
    if name == "focal":
        return FocalLoss(gamma=gamma, alpha=w)
    raise ConfigError(f"unknown loss {name!r}", f"choose one of: {', '.join(LOSSES)}")


def distillation_kl(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher_T || student_T), batch mean; the teacher's probabilities are softened
    by ``temperature`` (renormalised p^(1/T)), matching softmax(logits / T)."""
    t = float(temperature)
    log_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_teacher = torch.log(teacher_probs.float().clamp_min(1e-12)) / t
    log_teacher = log_teacher - torch.logsumexp(log_teacher, dim=1, keepdim=True)
    kl = (log_teacher.exp() * (log_teacher - log_s)).sum(dim=1).mean()
    return kl * (t * t)
