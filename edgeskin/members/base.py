"""What every member is: its own preprocessing plus ``probs(batch)``, in edgeskin's class order.

A member's manifest (``NAME.json``, ``format: edgeskin-member``) says where its weights are and
their sha256, the source format, the input the model takes, the declared preprocessing (a
:class:`~edgeskin.preprocess.PreprocessConfig`), what the model outputs (logits or
probabilities) and how its classes map onto ours. Only numpy + stdlib here: an ONNX member runs
without torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from ..errors import CheckpointError, ConfigError
from ..labels import LabelSet, get_label_set
from ..preprocess import PreprocessConfig
from ..runtime.numerics import softmax  # the one softmax, shared with the runtime

MEMBER_FORMAT = "edgeskin-member"
MEMBER_FORMAT_VERSION = 1
OUTPUTS = ("logits", "probs")


@runtime_checkable
class Member(Protocol):
    """Anything that turns preprocessed images into probabilities over ``labels.codes``.

    ``probs(x)`` takes a batch made with ``preprocess`` (numpy float32) and returns (N, classes)
    float64 probabilities. ``model`` is the torch module for members that are one (else None).
    """

    name: str
    sha256: str
    path: Path
    config: dict[str, Any]

    @property
    def labels(self) -> LabelSet: ...

    @property
    def preprocess(self) -> PreprocessConfig: ...

    @property
    def source(self) -> str: ...

    def probs(self, x: np.ndarray, *, batch_size: int = 64, device: Any = None,
              progress: Any = None) -> np.ndarray: ...


# ---------------------------------------------------------------- class order

@dataclass(frozen=True)
class ClassMap:
    """How a member's outputs (its own class names, in its order) become our classes.

    ``targets[j]`` is our class code that member output ``j`` feeds, or None when it is dropped.
    Several outputs may feed one class only through ``merge`` (added to it). Dropping renormalises
    the remaining probabilities to sum to 1.
    """

    member_classes: tuple[str, ...]
    targets: tuple[str | None, ...]
    codes: tuple[str, ...]

    @property
    def dropped(self) -> list[str]:
        return [c for c, t in zip(self.member_classes, self.targets) if t is None]

    @property
    def renormalise(self) -> bool:
        return bool(self.dropped)

    @property
    def is_identity(self) -> bool:
        return self.member_classes == self.codes and self.targets == self.codes

    def matrix(self) -> np.ndarray:
        m = np.zeros((len(self.member_classes), len(self.codes)))
        for j, t in enumerate(self.targets):
            if t is not None:
                m[j, self.codes.index(t)] = 1.0
        return m

    def apply(self, p: np.ndarray) -> np.ndarray:
        if self.is_identity:
            return p
        q = p @ self.matrix()
        if self.renormalise:
            q = q / np.clip(q.sum(axis=1, keepdims=True), 1e-12, None)
        return q

    def to_dict(self) -> dict[str, Any]:
        merged = {c: t for c, t in zip(self.member_classes, self.targets)
                  if t is not None and self.targets.count(t) > 1}
        return {"member_classes": list(self.member_classes), "targets": list(self.targets),
                "dropped": self.dropped, "merged": merged, "renormalise": self.renormalise,
                "rule": "probabilities of outputs mapped to one class are added; dropped outputs are "
                        "removed and the rest renormalised to sum to 1" if self.renormalise else
                        "probabilities of outputs mapped to one class are added"}

    @classmethod
    def from_dict(cls, d: dict[str, Any], codes: Sequence[str]) -> "ClassMap":
        return cls(tuple(d["member_classes"]), tuple(d["targets"]), tuple(codes))


def build_class_map(member_classes: Sequence[str], labels: LabelSet, *,
                    rename: dict[str, str] | None = None, extra: dict[str, str] | None = None,
                    where: str = "member") -> ClassMap:
    """Map a member's class names onto ``labels``.

    A name matches our code case-insensitively, or through ``rename`` (``{their name: our
    code}``). ``extra`` says what becomes of a class we do not have: ``drop`` (removed,
    the rest renormalised) or one of our codes (merged into it). Refused: a duplicated name, one
    of our classes with no output, two outputs renamed onto one class, an extra class with no rule.
    """
    rename = {k.lower(): v for k, v in (rename or {}).items()}
    extra = {k.lower(): v for k, v in (extra or {}).items()}
    codes = tuple(labels.codes)
    names = [str(c) for c in member_classes]
    lowered = [n.lower() for n in names]
    dups = sorted({n for n in names if lowered.count(n.lower()) > 1})
    if dups:
        raise ConfigError(f"{where}: class {', '.join(dups)} appears more than once in the member's class list {names}",
                          "list each of the model's outputs once, in the model's output order")
    for k, v in list(rename.items()) + [(k, v) for k, v in extra.items() if v != "drop"]:
        if v not in codes:
            raise ConfigError(f"{where}: {k} is mapped to {v!r}, which is not one of our classes",
                              f"our classes: {', '.join(codes)}")
    direct: dict[str, str] = {}
    targets: list[str | None] = []
    unmapped = []
    for n, low in zip(names, lowered):
        if low in rename:
            t: str | None = rename[low]
        elif low in codes:
            t = low
        elif low in extra:
            t = None if extra[low] == "drop" else extra[low]
            targets.append(t)
            continue
        else:
            unmapped.append(n)
            continue
        if t in direct:
            raise ConfigError(f"{where}: {direct[t]} and {n} both map to our class {t!r}",
                              f"map one of them with --extra {n}=CLASS (merge) or --extra {n}=drop")
        direct[t] = n  # type: ignore[index]
        targets.append(t)
    if unmapped:
        raise ConfigError(
            f"{where}: the member has classes we do not have: {', '.join(unmapped)}",
            f"say what becomes of each: --extra {unmapped[0]}=drop (removed, the rest renormalised) or "
            f"--extra {unmapped[0]}=CLASS (merged into one of {', '.join(codes)}); or rename it with "
            f"--labels ...,{unmapped[0]}=CLASS,...")
    missing = [c for c in codes if c not in direct]
    if missing:
        raise ConfigError(f"{where}: none of the member's classes {names} is our {', '.join(missing)}",
                          "pass the model's class names in its output order with --labels, renaming "
                          "where they differ (e.g. --labels AK=akiec,BCC,BKL,DF,MEL,NV,VASC)")
    return ClassMap(tuple(names), tuple(targets), codes)


# ---------------------------------------------------------------- view conversion

def pixels_from(x: Any, pre: PreprocessConfig) -> Any:
    """A batch made with ``pre`` back to RGB pixels in 0-255, NHWC (numpy or torch alike)."""
    mod = _module_of(x)
    if pre.layout == "NCHW":
        x = x.permute(0, 2, 3, 1) if mod == "torch" else x.transpose(0, 2, 3, 1)
    mean = _const(x, pre.mean)
    std = _const(x, pre.std)
    p = x * std + mean
    if pre.input_range == 1.0:
        p = p * 255.0
    if pre.channel_order == "BGR":
        p = p.flip(-1) if mod == "torch" else p[..., ::-1]
    return p


def pixels_to(p: Any, pre: PreprocessConfig) -> Any:
    """RGB pixels in 0-255, NHWC (float) -> a batch as ``pre`` makes it, resized to ``pre.size``
    (bilinear, antialiased) when the view has another size."""
    mod = _module_of(p)
    if p.shape[1] != pre.size or p.shape[2] != pre.size:
        p = _resize(p, pre.size, pre.interpolation)
    if pre.channel_order == "BGR":
        p = p.flip(-1) if mod == "torch" else p[..., ::-1]
    if pre.input_range == 1.0:
        p = p / 255.0
    x = (p - _const(p, pre.mean)) / _const(p, pre.std)
    if pre.layout == "NCHW":
        x = x.permute(0, 3, 1, 2) if mod == "torch" else x.transpose(0, 3, 1, 2)
    if mod == "torch":
        return x.contiguous().float()
    return np.ascontiguousarray(x, dtype=np.float32)


def convert_view(x: Any, src: PreprocessConfig, dst: PreprocessConfig) -> Any:
    """The same view (the same crop of the same image) as ``dst`` expects it."""
    if src == dst:
        return x
    return pixels_to(pixels_from(x, src), dst)


def _module_of(x: Any) -> str:
    return "numpy" if isinstance(x, np.ndarray) else "torch"


def _const(x: Any, values: Sequence[float]) -> Any:
    if isinstance(x, np.ndarray):
        return np.asarray(values, dtype=np.float32)
    import torch

    return torch.tensor(list(values), dtype=x.dtype, device=x.device)


def _resize(p: Any, size: int, interpolation: str) -> Any:
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(p)) if isinstance(p, np.ndarray) else p
    mode = "bicubic" if interpolation == "bicubic" else "nearest" if interpolation == "nearest" else "bilinear"
    kw = {} if mode == "nearest" else {"align_corners": False, "antialias": True}
    r = F.interpolate(t.permute(0, 3, 1, 2).float(), size=(size, size), mode=mode, **kw).permute(0, 2, 3, 1)
    return r.numpy() if isinstance(p, np.ndarray) else r


# ---------------------------------------------------------------- shared bits of foreign members

class ForeignMember:
    """Shared part of imported members: the manifest, the class map and the output transform."""

    def __init__(self, config: dict[str, Any], path: Path) -> None:
        self.config = config
        self.path = path
        self.name = str(config["name"])
        self.sha256 = str(config["sha256"])
        self.model = None
        lab = config.get("labels", {})
        self._labels = get_label_set(lab.get("name", "ham10000"))
        if list(lab.get("codes", self._labels.codes)) != list(self._labels.codes):
            raise CheckpointError(f"{path}: class order {lab.get('codes')} does not match label set {self._labels.name}",
                                  "re-import the member")
        self._pre = PreprocessConfig.from_dict(config["preprocess"])
        self.class_map = ClassMap.from_dict(config["class_map"], self._labels.codes)
        self.outputs = str(config.get("outputs", "logits"))

    @property
    def labels(self) -> LabelSet:
        return self._labels

    @property
    def preprocess(self) -> PreprocessConfig:
        return self._pre

    @property
    def source(self) -> str:
        return str(self.config.get("source", {}).get("format", "?"))

    @property
    def weights_path(self) -> Path:
        return self.path.parent / str(self.config["weights"])

    def raw(self, x: np.ndarray, *, device: Any = None) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def member_probs(self, x: np.ndarray, *, batch_size: int = 64, device: Any = None,
                     progress: Any = None) -> np.ndarray:
        """Probabilities over the member's own classes (after the declared output transform)."""
        out = []
        for s in range(0, len(x), batch_size):
            y = np.asarray(self.raw(np.ascontiguousarray(x[s : s + batch_size], dtype=np.float32), device=device),
                           dtype=np.float64)
            out.append(softmax(y) if self.outputs == "logits" else y)
            if progress is not None:
                progress(len(y))
        if not out:
            return np.zeros((0, len(self.class_map.member_classes)))
        return np.concatenate(out)

    def probs(self, x: np.ndarray, *, batch_size: int = 64, device: Any = None, progress: Any = None) -> np.ndarray:
        return self.class_map.apply(self.member_probs(x, batch_size=batch_size, device=device, progress=progress))

    def release(self) -> None:
        """Give back what ``probs`` holds on an accelerator (nothing by default)."""


def display(path: str | os.PathLike) -> str:
    """A path as the user would write it: relative to the working directory when inside it."""
    p = Path(path)
    try:
        return os.path.relpath(p)
    except ValueError:
        return str(p)
