"""An ensemble is N members whose prediction is the mean of their softmax probabilities."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn


class Ensemble(nn.Module):
    """Mean of the members' softmax. ``forward`` returns probabilities, not logits."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def member_probs(self, x: torch.Tensor) -> torch.Tensor:
        """(members, N, C) softmax probabilities."""
        return torch.stack([torch.softmax(m(x).float(), dim=1) for m in self.members])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.member_probs(x).mean(dim=0)


def inference_fn(model: nn.Module) -> Callable[[np.ndarray], torch.Tensor]:
    """``f(x)``: one eval-mode, gradient-free forward pass of ``model`` on a numpy batch (what
    latency measurements time)."""
    model.eval()

    def f(x: np.ndarray) -> torch.Tensor:
        with torch.inference_mode():
            return model(torch.from_numpy(x))

    return f


def predict_probs(
    model: nn.Module,
    inputs: np.ndarray | Sequence[np.ndarray],
    *,
    batch_size: int = 64,
    outputs: str = "logits",
    progress: Callable[[int], None] | None = None,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Run ``model`` in eval mode over preprocessed inputs (N, C, H, W) -> (N, classes) probs.

    ``outputs`` says what the model returns: ``"logits"`` (softmax applied here) or
    ``"probs"`` (an :class:`Ensemble`). ``device``: where to run (the model is moved there and
    stays); default: where the model is. Always fp32 (on CUDA with cuDNN's TF32 convolutions,
    PyTorch's default), the precision every measurement uses.
    """
    model.eval()
    if device is not None:
        model.to(device)
    dev = next(model.parameters()).device
    n = len(inputs)
    out = []
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            chunk = torch.from_numpy(np.stack(list(inputs[start : start + batch_size])))
            if dev.type != "cpu":
                chunk = chunk.pin_memory().to(dev, non_blocking=True)
            y = model(chunk).float()
            if outputs == "logits":
                y = torch.softmax(y, dim=1)
            out.append(y.cpu().numpy().astype(np.float64))
            if progress is not None:
                progress(len(chunk))
    if not out:
        return np.zeros((0, 0))
    return np.concatenate(out)
