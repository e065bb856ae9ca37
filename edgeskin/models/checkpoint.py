"""Checkpoints: a state_dict file plus a JSON config, written atomically and hash-checked.

A checkpoint ``NAME.json`` holds ``format: edgeskin-checkpoint``, the weights file name and its
sha256, architecture, head, class order, preprocessing, training recipe and metrics. An
ensemble is a directory of such members. The shared reference layout (``config.json`` +
``memberK.pt`` float16 state_dicts) loads too.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..fileio import atomic_path, sha256_file, write_json
from ..errors import CheckpointError
from ..labels import LabelSet, get_label_set
from ..preprocess import PreprocessConfig
from .arch import build_model

FORMAT = "edgeskin-checkpoint"
FORMAT_VERSION = 1


def atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


@dataclass
class Checkpoint:
    """A loaded member: the model (eval mode, float32) and its config."""

    model: nn.Module
    config: dict[str, Any]
    path: Path
    sha256: str

    @property
    def name(self) -> str:
        return str(self.config.get("name", self.path.stem))

    @property
    def labels(self) -> LabelSet:
        lab = self.config.get("labels", {})
        ls = get_label_set(lab.get("name", "ham10000"))
        if list(ls.codes) != list(lab.get("codes", ls.codes)):
            raise CheckpointError(f"{self.path}: class order {lab.get('codes')} does not match label set {ls.name}")
        return ls

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.config["preprocess"])

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(self.config.get("metrics", {}))

    @property
    def source(self) -> str:
        """The member's source format (see :mod:`edgeskin.members`)."""
        return "edgeskin"

    def probs(self, x: Any, *, batch_size: int = 64, device: Any = None, progress: Any = None) -> Any:
        """Softmax probabilities (N, classes) for a batch made with :attr:`preprocess`."""
        from .ensemble import predict_probs

        return predict_probs(self.model, x, batch_size=batch_size, device=getattr(device, "device", device),
                             progress=progress)

    def release(self) -> None:
        """Move the model back to the CPU after ``probs`` ran it on an accelerator."""
        self.model.cpu()


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    arch: str,
    labels: LabelSet,
    preprocess: PreprocessConfig,
    dropout: float,
    recipe: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    half: bool = False,
) -> Path:
    """Write ``NAME.pt`` and ``NAME.json`` (path may name either, or the stem). Returns the JSON path."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".pt", ".json") else p
    weights = stem.with_suffix(".pt")
    meta = stem.with_suffix(".json")
    module = getattr(model, "module", model)
    state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    if half:
        state = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
    atomic_torch_save(state, weights)
    config: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": stem.name,
        "weights": weights.name,
        "sha256": sha256_file(weights),
        "weights_dtype": "float16" if half else "float32",
        "arch": arch,
        "num_classes": labels.num_classes,
        "head": {"dropout": dropout, "layout": _head_layout(arch)},
        "labels": labels.to_dict(),
        "preprocess": preprocess.to_dict(),
        "recipe": recipe or {},
        "metrics": metrics or {},
        "torch_version": torch.__version__,
    }
    if extra:
        config.update(extra)
    write_json(meta, config)
    return meta


def _head_layout(arch: str) -> str:
    if arch.startswith("resnet"):
        return "fc = Sequential(Dropout(p), Linear(in_features, num_classes))"
    return "classifier[2] = Dropout(p); classifier[3] = Linear(1280, num_classes)"


def _load_state(weights: Path, expected_sha: str | None) -> tuple[dict, str]:
    if not weights.is_file():
        raise CheckpointError(f"{weights}: weights file not found", "copy the whole checkpoint folder")
    digest = sha256_file(weights)
    if expected_sha and digest != expected_sha:
        raise CheckpointError(
            f"{weights}: sha256 {digest[:12]}... does not match the config's {expected_sha[:12]}...",
            "the weights were changed or damaged; re-copy the checkpoint",
        )
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{weights}: cannot read weights ({exc})", "re-copy the checkpoint") from None
    return state, digest


def _build_and_load(config: dict, state: dict, where: Path) -> nn.Module:
    model, _ = build_model(
        config["arch"], int(config["num_classes"]),
        dropout=float(config.get("head", {}).get("dropout", 0.3)), pretrained=None,
    )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{where}: weights do not fit {config['arch']} with {config['num_classes']} classes",
            str(exc).splitlines()[0],
        ) from None
    return model.float().eval()


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Load one member from its ``.json`` (or ``.pt`` next to it)."""
    p = Path(path)
    meta = p.with_suffix(".json") if p.suffix == ".pt" else p
    if not meta.is_file():
        raise CheckpointError(f"{meta}: checkpoint config not found",
                              "pass the member's .json file or an ensemble folder")
    try:
        config = json.loads(meta.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta}: not valid JSON ({exc})", "re-copy the checkpoint") from None
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{meta}: not an edgeskin checkpoint", "pass a file written by `edgeskin train`")
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{meta}: checkpoint format {config['format_version']} is newer than this edgeskin",
                              "upgrade edgeskin")
    weights = meta.parent / config["weights"]
    state, digest = _load_state(weights, config.get("sha256"))
    return Checkpoint(_build_and_load(config, state, weights), config, meta, digest)


_REF_RESIZE = re.compile(r"shorter side to (\d+)")
_REF_DROPOUT = re.compile(r"Dropout\(p=([0-9.]+)\)")


def _load_reference_layout(directory: Path) -> list[Checkpoint]:
    """The shared reference layout: ``config.json`` + ``member*.pt`` (float16 state_dicts)."""
    cfg = json.loads((directory / "config.json").read_text())
    codes = list(cfg["class_order"])
    labels = get_label_set("ham10000" if len(codes) == 7 else "binary")
    if list(labels.codes) != codes:
        raise CheckpointError(f"{directory}/config.json: class order {codes} is not supported",
                              f"expected {list(labels.codes)}")
    size = int(cfg["input"]["size"][0])
    rule = cfg.get("eval_preprocessing", {}).get("rule", "")
    m = _REF_RESIZE.search(rule)
    pre = PreprocessConfig(
        size=size, resize=int(m.group(1)) if m else None,
        mean=tuple(cfg["input"].get("mean", (0.485, 0.456, 0.406))),
        std=tuple(cfg["input"].get("std", (0.229, 0.224, 0.225))),
    )
    d = _REF_DROPOUT.search(cfg.get("head", {}).get("layout", ""))
    dropout = float(d.group(1)) if d else 0.3
    arch = "resnet50" if "resnet50" in cfg.get("architecture", "resnet50") else cfg["architecture"]
    hashes = _reference_hashes(cfg)
    members = []
    for weights in sorted(directory.glob("member*.pt")):
        state, digest = _load_state(weights, hashes.get(weights.name))
        config = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "name": weights.stem,
            "weights": weights.name, "sha256": digest, "arch": arch, "num_classes": len(codes),
            "head": {"dropout": dropout}, "labels": labels.to_dict(), "preprocess": pre.to_dict(),
            "recipe": {"source": "reference layout", "config": str(directory / "config.json")},
            "metrics": {},
        }
        members.append(Checkpoint(_build_and_load(config, state, weights), config, weights, digest))
    return members


def _reference_hashes(cfg: dict) -> dict[str, str]:
    """``{file name: sha256}`` from the reference config's ``members`` list."""
    found: dict[str, str] = {}
    for m in cfg.get("members", []):
        if isinstance(m, dict) and m.get("file") and m.get("sha256"):
            found[str(m["file"])] = str(m["sha256"])
    return found


