"""Load an ensemble folder: edgeskin checkpoints, imported members, or both (a mixed ensemble),
or the shared reference layout. Members keep their own preprocessing; they must share the class
order (imported members were mapped onto ours when imported)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..fileio import sha256_file
from .base import MEMBER_FORMAT, MEMBER_FORMAT_VERSION

CHECKPOINT_FORMAT = "edgeskin-checkpoint"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None


def load_member(path: str | os.PathLike) -> Any:
    """One member from its manifest (``format: edgeskin-member``) or an edgeskin checkpoint."""
    p = Path(path)
    meta = p if p.suffix == ".json" else p.with_suffix(".json")
    head = _read_json(meta) if meta.is_file() else None
    if isinstance(head, dict) and head.get("format") == MEMBER_FORMAT:
        return _load_imported(head, meta)
    from ..models.checkpoint import load_checkpoint

    return load_checkpoint(p)


def _load_imported(config: dict[str, Any], meta: Path) -> Any:
    if int(config.get("format_version", 0)) > MEMBER_FORMAT_VERSION:
        raise CheckpointError(f"{meta}: member format {config['format_version']} is newer than this edgeskin",
                              "upgrade edgeskin")
    weights = meta.parent / str(config.get("weights", ""))
    if not weights.is_file():
        raise CheckpointError(f"{weights}: the member's model file is missing", "copy the whole ensemble folder")
    digest = sha256_file(weights)
    if digest != config.get("sha256"):
        raise CheckpointError(
            f"{weights}: sha256 {digest[:12]}... does not match the manifest's {str(config.get('sha256'))[:12]}...",
            "the file was changed or damaged; re-copy it or import the member again")
    kind = config.get("runner", "onnx")
    if kind == "onnx":
        from .onnx import load_onnx_member

        return load_onnx_member(config, meta)
    if kind == "torch":
        from .torchnet import load_torchnet_member

        return load_torchnet_member(config, meta)
    raise CheckpointError(f"{meta}: unknown member runner {kind!r}", "upgrade edgeskin or import the member again")


def load_members(path: str | os.PathLike) -> list[Any]:
    """Every member of an ensemble folder (or the one member a file names), in name order."""
    p = Path(path)
    if p.is_file():
        return [load_member(p)]
    if not p.is_dir():
        raise CheckpointError(f"{p}: model not found", "pass an ensemble folder or a member's .json")
    members = []
    for meta in sorted(p.glob("*.json")):
        head = _read_json(meta)
        if isinstance(head, dict) and head.get("format") == CHECKPOINT_FORMAT:
            from ..models.checkpoint import load_checkpoint

            members.append(load_checkpoint(meta))
        elif isinstance(head, dict) and head.get("format") == MEMBER_FORMAT:
            members.append(_load_imported(head, meta))
    if (p / "config.json").is_file() and any(p.glob("member*.pt")) and not any(
            m.source == "edgeskin" for m in members):
        from ..models.checkpoint import _load_reference_layout

        members = _load_reference_layout(p) + members  # members imported beside the reference layout too
    if not members:
        raise CheckpointError(f"{p}: no checkpoints or imported members found",
                              "pass a folder written by `edgeskin train` or `edgeskin import` "
                              "(member .json files beside their weights)")
    first = members[0]
    for m in members[1:]:
        if list(m.labels.codes) != list(first.labels.codes):
            raise CheckpointError(f"{m.path}: class order {list(m.labels.codes)} differs from {first.path}'s "
                                  f"{list(first.labels.codes)}",
                                  "an ensemble's members must share the class order; re-import with --labels")
    return members
