"""torchvision backbones with the published classification head.

ResNet50 (default), ResNet18 and MobileNetV3-Large. The head is global pooling -> dropout ->
fully connected (``fc = Sequential(Dropout(p), Linear(in, classes))``, keys ``fc.1.*``), the
layout of the published modified ResNet50 and of the shared reference ensemble.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from .weights import WeightsFile

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchSpec:
    name: str
    #: stage name -> parameter name prefixes, from the input side to the output side
    stages: tuple[tuple[str, tuple[str, ...]], ...]
    head_prefix: str


ARCHS: dict[str, ArchSpec] = {
    "resnet50": ArchSpec(
        "resnet50",
        (("stem", ("conv1.", "bn1.")), ("layer1", ("layer1.",)), ("layer2", ("layer2.",)),
         ("layer3", ("layer3.",)), ("layer4", ("layer4.",))),
        "fc.",
    ),
    "resnet18": ArchSpec(
        "resnet18",
        (("stem", ("conv1.", "bn1.")), ("layer1", ("layer1.",)), ("layer2", ("layer2.",)),
         ("layer3", ("layer3.",)), ("layer4", ("layer4.",))),
        "fc.",
    ),
    "mobilenet_v3_large": ArchSpec(
        "mobilenet_v3_large",
        (("stage1", tuple(f"features.{i}." for i in range(0, 4))),
         ("stage2", tuple(f"features.{i}." for i in range(4, 7))),
         ("stage3", tuple(f"features.{i}." for i in range(7, 13))),
         ("stage4", tuple(f"features.{i}." for i in range(13, 17)))),
        "classifier.",
    ),
}


def arch_spec(name: str) -> ArchSpec:
    try:
        return ARCHS[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, list(ARCHS), n=1)
        raise ConfigError(
            f"unknown architecture {name!r}" + (f"; did you mean {close[0]!r}?" if close else ""),
            f"choose one of: {', '.join(ARCHS)}",
        ) from None


def _replace_head(model: nn.Module, name: str, num_classes: int, dropout: float) -> None:
    if name.startswith("resnet"):
        in_features = model.fc.in_features
        model.fc = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(in_features, num_classes))
    elif name == "mobilenet_v3_large":
        model.classifier[2] = nn.Dropout(p=dropout)
        model.classifier[3] = nn.Linear(model.classifier[3].in_features, num_classes)
    else:  # pragma: no cover - guarded by arch_spec
        raise ConfigError(f"no head rule for {name}")


def build_model(
    arch: str = "resnet50",
    num_classes: int = 7,
    *,
    dropout: float = 0.3,
    pretrained: "str | os.PathLike | WeightsFile | None" = "auto",
) -> tuple[nn.Module, str | None]:
    """Build ``arch`` with the published head.

    ``pretrained``: ``"auto"`` loads ImageNet weights from torchvision's cache when present,
    ``"imagenet"`` downloads them when missing, a URL or a path loads that file, ``None`` /
    ``"none"`` starts from random initialisation (see :mod:`edgeskin.models.weights`), or an
    already resolved :class:`~edgeskin.models.weights.WeightsFile`. Returns the model and a
    description of the weights it started from (``None`` for random initialisation).
    """
    import torchvision

    from .weights import WeightsFile, resolve_pretrained

    arch_spec(arch)
    model = torchvision.models.get_model(arch, weights=None)
    wf = pretrained if isinstance(pretrained, WeightsFile) else resolve_pretrained(arch, pretrained)
    source: str | None = None
    if wf is not None:
        path = wf.path
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{path}: cannot read weights ({exc})",
                                  "pass a torchvision state_dict file") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        missing, unexpected = model.load_state_dict(state, strict=False)
        if len(missing) > 0 or len(unexpected) > 0:
            raise CheckpointError(
                f"{path}: does not match {arch} (missing {len(missing)}, unexpected {len(unexpected)} keys)",
                f"pass ImageNet weights made for torchvision's {arch}",
            )
        source = wf.source
    _replace_head(model, arch, num_classes, dropout)
    return model, source


def set_trainable(model: nn.Module, arch: str, last_stages: int | None) -> list[str]:
    """Train the head plus the last ``last_stages`` stages (``None``: everything).

    Frozen parameters get ``requires_grad=False``. Returns the names of the trainable stages.
    """
    spec = arch_spec(arch)
    module = getattr(model, "module", model)
    if last_stages is None or last_stages >= len(spec.stages):
        for p in module.parameters():
            p.requires_grad_(True)
        return [s for s, _ in spec.stages] + ["head"]
    if last_stages < 0:
        raise ConfigError(f"last_stages must be >= 0, got {last_stages}")
    chosen = spec.stages[len(spec.stages) - last_stages:] if last_stages else ()
    prefixes = tuple(pfx for _, pfxs in chosen for pfx in pfxs) + (spec.head_prefix,)
    for name, p in module.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
    return [s for s, _ in chosen] + ["head"]


def frozen_bn_to_eval(model: nn.Module) -> None:
    """Keep BatchNorm layers whose parameters are frozen in eval mode (statistics fixed)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.weight is not None and not m.weight.requires_grad:
                m.eval()
