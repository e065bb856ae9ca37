"""Training configuration (frozen dataclass; recorded in every checkpoint)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..augment import AugmentConfig
from ..errors import ConfigError
from ..preprocess import PreprocessConfig
from .losses import LOSSES


@dataclass(frozen=True)
class TrainConfig:
    """One member's recipe. Defaults follow the published ResNet50 transfer-learning work.

    ``freeze_epochs``: epochs with the backbone frozen (only the head trains); ``None`` means
    2 when ImageNet weights were loaded and 0 when starting from random initialisation.
    ``finetune_stages``: after that warm-up, how many of the last stages train with the head
    (``"auto"``: 2 when pretrained, all otherwise; ``"all"``; or a number).
    """

    arch: str = "resnet50"
    labels: str = "ham10000"
    size: int = 224
    resize: int | None = None
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    loss: str = "wce"
    focal_gamma: float = 2.0
    dropout: float = 0.3
    pretrained: str | None = "auto"
    freeze_epochs: int | None = None
    finetune_stages: str = "auto"
    warmup_epochs: float = 1.0
    patience: int | None = 8
    seed: int = 0
    bf16: str = "auto"
    channels_last: bool = True
    steps_per_epoch: int | None = None
    eval_batch_size: int = 64
    #: ``None`` turns augmentation off: every step sees the evaluation view (centre crop)
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown loss {self.loss!r}", f"choose one of: {', '.join(LOSSES)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs and batch size must be at least 1")
        if self.bf16 not in ("auto", "on", "off"):
            raise ConfigError(f"bf16 must be auto, on or off, not {self.bf16!r}")
        if self.finetune_stages not in ("auto", "all") and not str(self.finetune_stages).isdigit():
            raise ConfigError(f"finetune_stages must be auto, all or a number, not {self.finetune_stages!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig(size=self.size, resize=self.resize)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["augment"] = None if self.augment is None else self.augment.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        kw = dict(d)
        if isinstance(kw.get("augment"), dict):
            kw["augment"] = AugmentConfig.from_dict(kw["augment"])
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in kw.items() if k in known})

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def with_(self, **changes: Any) -> "TrainConfig":
        return replace(self, **changes)


#: Presets for the CLI: a tiny smoke run, a quick run for a 2-core CPU, and the published setup.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"size": 64, "epochs": 1, "steps_per_epoch": 4, "batch_size": 8, "arch": "resnet18"},
    "quick": {"size": 112, "epochs": 3, "batch_size": 32},
    "reference": {"size": 112, "epochs": 15, "batch_size": 32},
    "published": {"size": 224, "epochs": 30, "batch_size": 32, "pretrained": "imagenet"},
}

#: presets whose method is ImageNet transfer learning: ``--pretrained auto`` falling back to random
#: initialisation is warned about loudly there
TRANSFER_PRESETS = frozenset({"published"})


def preset_settings(preset: str, **overrides: Any) -> dict[str, Any]:
    """A preset's settings with the given overrides on top (``None``: not given). Shared by the
    ``train`` and ``distill`` commands and by recipes."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}", f"choose one of: {', '.join(PRESETS)}")
    kw: dict[str, Any] = dict(PRESETS[preset])
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return kw
