"""How a member's input, preprocessing, outputs and classes are declared: presets for the common
cases, overridden by a small TOML file, overridden by command-line options."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..preprocess import IMAGENET_MEAN, IMAGENET_STD, NORMALIZATIONS, PreprocessConfig
from .base import OUTPUTS

#: The common conventions. ``keras-*``: Keras applications (NHWC, a softmax at the end);
#: ``torchvision``: torchvision's ImageNet recipe; ``timm``: timm's usual defaults (for a timm
#: checkpoint the model's own pretrained_cfg wins); ``edgeskin``: edgeskin's own pipeline.
PRESETS: dict[str, dict[str, Any]] = {
    "keras-resnet50": {"layout": "NHWC", "channel_order": "BGR", "normalization": "caffe", "size": 224,
                       "outputs": "probs"},
    "keras-tf": {"layout": "NHWC", "channel_order": "RGB", "normalization": "tf", "size": 224, "outputs": "probs"},
    "torchvision": {"layout": "NCHW", "channel_order": "RGB", "normalization": "meanstd", "input_range": 1.0,
                    "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "size": 224, "outputs": "logits",
                    "interpolation": "bilinear"},
    "timm": {"layout": "NCHW", "channel_order": "RGB", "normalization": "meanstd", "input_range": 1.0,
             "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "size": 224, "outputs": "logits",
             "interpolation": "bicubic"},
    "edgeskin": {"layout": "NCHW", "channel_order": "RGB", "normalization": "meanstd", "input_range": 1.0,
                 "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "outputs": "logits"},
}

_PRE_KEYS = ("size", "resize", "crop_fraction", "interpolation", "layout", "channel_order", "input_range",
             "normalization", "mean", "std")


@dataclass(frozen=True)
class Declaration:
    """Everything a user may declare about a member; None means "not said" (the preset, the model
    or the default decides)."""

    preset: str | None = None
    size: int | None = None
    resize: int | None = None
    crop_fraction: float | None = None
    interpolation: str | None = None
    layout: str | None = None
    channel_order: str | None = None
    input_range: float | None = None
    normalization: str | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    outputs: str | None = None
    labels: tuple[str, ...] | None = None  # the model's class names in output order, NAME or NAME=ourcode
    extra: dict[str, str] = field(default_factory=dict)  # their class -> "drop" or our code
    arch: str | None = None  # timm:NAME / torchvision:NAME for state_dicts
    format: str | None = None  # onnx | keras | timm | torchvision (default: from the file name)
    name: str | None = None

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}", f"choose one of: {', '.join(PRESETS)}")
        if self.outputs is not None and self.outputs not in OUTPUTS:
            raise ConfigError(f"unknown --outputs {self.outputs!r}", "choose logits or probs")
        if self.normalization is not None and self.normalization not in NORMALIZATIONS:
            raise ConfigError(f"unknown normalization {self.normalization!r}",
                              f"choose one of: {', '.join(NORMALIZATIONS)}")
        for k, v in self.extra.items():
            if not isinstance(v, str) or not v:
                raise ConfigError(f"extra class {k}: say 'drop' or one of our class codes", "e.g. --extra SCC=akiec")

    def over(self, base: "Declaration") -> "Declaration":
        """This declaration where it says something, ``base`` elsewhere."""
        kw = {}
        for f in fields(self):
            mine = getattr(self, f.name)
            kw[f.name] = ({**base.extra, **mine} if f.name == "extra"
                          else mine if mine is not None else getattr(base, f.name))
        return Declaration(**kw)

    def resolved(self, model_defaults: dict[str, Any] | None = None) -> dict[str, Any]:
        """Preset <- the model's own defaults (timm's pretrained_cfg) <- what was declared."""
        out: dict[str, Any] = dict(PRESETS.get(self.preset or "", {}))
        out.update(model_defaults or {})
        for k in _PRE_KEYS + ("outputs",):
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        mode = out.get("normalization") or "meanstd"
        if NORMALIZATIONS.get(mode) is not None:
            said = [k for k in ("mean", "std", "input_range") if getattr(self, k) is not None]
            if said:
                raise ConfigError(f"normalization {mode!r} fixes {', '.join(said)}; do not declare them too",
                                  "use --normalization meanstd with your own --mean/--std/--input-range")
        return out

    def rename_and_classes(self) -> tuple[list[str] | None, dict[str, str]]:
        """(the model's class names in output order, {their name: our code})."""
        if self.labels is None:
            return None, {}
        names, rename = [], {}
        for item in self.labels:
            name, _, ours = item.partition("=")
            name = name.strip()
            if not name:
                raise ConfigError(f"--labels has an empty class name ({', '.join(self.labels)})",
                                  "e.g. --labels AK=akiec,BCC=bcc,BKL=bkl,DF=df,MEL=mel,NV=nv,VASC=vasc")
            names.append(name)
            if ours.strip():
                rename[name] = ours.strip()
        return names, rename


def preprocess_from(values: dict[str, Any], *, where: str) -> PreprocessConfig:
    """A PreprocessConfig from resolved declaration values (``caffe``/``tf``/``none`` fill their numbers)."""
    if "size" not in values or values["size"] is None:
        raise ConfigError(f"{where}: no input size declared and the model does not fix one",
                          "pass --size (the square input side the model was trained at)")
    mode = values.get("normalization") or "meanstd"
    kw = {k: values[k] for k in ("size", "resize", "crop_fraction", "interpolation", "layout", "channel_order")
          if values.get(k) is not None}
    if NORMALIZATIONS[mode] is None:
        for k in ("mean", "std"):
            if values.get(k) is not None:
                kw[k] = tuple(float(v) for v in values[k])
        if values.get("input_range") is not None:
            kw["input_range"] = float(values["input_range"])
    try:
        return PreprocessConfig.with_normalization(mode, **kw)
    except TypeError as exc:
        raise ConfigError(f"{where}: bad preprocessing declaration ({exc})", "see docs/byo-ensemble.md") from None


def read_declaration(path: str | os.PathLike) -> Declaration:
    """A declaration from a small TOML file (top-level keys, or a ``[member]`` table)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: declaration file not found", "pass --spec FILE.toml")
    try:
        d = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: not valid TOML ({exc})", "fix the file") from None
    d = d.get("member", d)
    known = {f.name for f in fields(Declaration)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{p}: unknown key(s) {', '.join(unknown)}", f"known keys: {', '.join(sorted(known))}")
    kw = dict(d)
    for k in ("mean", "std"):
        if k in kw:
            kw[k] = tuple(float(v) for v in kw[k])
    if "labels" in kw:
        kw["labels"] = tuple(str(v) for v in (kw["labels"].split(",") if isinstance(kw["labels"], str) else kw["labels"]))
    if "extra" in kw:
        kw["extra"] = {str(k): str(v) for k, v in dict(kw["extra"]).items()}
    try:
        return Declaration(**kw)
    except TypeError as exc:
        raise ConfigError(f"{p}: bad value ({exc})", "see docs/byo-ensemble.md") from None
