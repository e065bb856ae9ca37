"""Calibration sets: deterministic, class-stratified, drawn from the training split only.

A calibration set is a manifest (``calibration/NAME.json``): image ids with the sha256 of each
file, class counts, and how it was drawn — never "the first N files". Loading it checks every
hash and refuses any image from the validation or test split (a leak), unless it was forced
explicitly when made, which the manifest then records.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .data import Dataset, Split
from .errors import DataError
from .fileio import sha256_file, write_json
from .labels import HAM10000_CODES

FORMAT = "edgeskin-calibration"
MIN_IMAGES = 300


@dataclass(frozen=True)
class CalibrationSet:
    name: str
    image_ids: tuple[str, ...]
    manifest: dict[str, Any]
    path: Path | None = None

    @property
    def sha256(self) -> str:
        return str(self.manifest["sha256"])

    def summary(self) -> dict[str, Any]:
        return {"id": self.name, "sha256": self.sha256, "size": len(self.image_ids),
                "forced": self.manifest.get("forced", False), "source_split": self.manifest.get("source_split")}


def _content_hash(images: list[dict[str, str]]) -> str:
    h = hashlib.sha256()
    for im in images:
        h.update(f"{im['image_id']},{im['sha256']}\n".encode())
    return h.hexdigest()


def make_calibration_set(
    dataset: Dataset,
    split: Split,
    *,
    size: int = 512,
    seed: int = 0,
    name: str | None = None,
    source_split: str = "train",
    force: bool = False,
) -> CalibrationSet:
    """Draw ``size`` images from ``source_split`` (train), proportional to class frequency
    (largest remainder), every present class at least once, reproducibly from ``seed``."""
    problems = []
    if size < MIN_IMAGES:
        problems.append(f"{size} images is fewer than the {MIN_IMAGES} a reliable INT8 calibration needs")
    if source_split != "train":
        problems.append(f"drawing from the {source_split!r} split leaks evaluation images into calibration")
    pool = split.apply(dataset, source_split).samples
    by_class: dict[str, list] = {c: [] for c in HAM10000_CODES}
    for s in pool:
        by_class[s.dx].append(s)
    empty = [c for c, ss in by_class.items() if not ss]
    if empty:
        problems.append(f"class(es) {', '.join(empty)} have no image in the {source_split} split")
    if size > len(pool):
        raise DataError(f"asked for {size} calibration images but the {source_split} split has {len(pool)}",
                        "ask for fewer images")
    if problems and not force:
        raise DataError("; ".join(problems), "fix the request, or pass --force (the manifest records that it was forced)")
    present = [c for c in HAM10000_CODES if by_class[c]]
    total = sum(len(by_class[c]) for c in present)
    exact = {c: size * len(by_class[c]) / total for c in present}
    quota = {c: max(1, int(np.floor(exact[c]))) for c in present}
    rest = size - sum(quota.values())
    for c in sorted(present, key=lambda c: (-(exact[c] - np.floor(exact[c])), c))[: max(0, rest)]:
        quota[c] += 1
    while sum(quota.values()) > size:  # the at-least-one rule can overshoot for tiny sizes
        c = max(quota, key=lambda c: quota[c])
        quota[c] -= 1
    rng = np.random.default_rng(seed)
    chosen = []
    for c in present:
        ss = sorted(by_class[c], key=lambda s: s.image_id)
        idx = sorted(rng.choice(len(ss), size=min(quota[c], len(ss)), replace=False))
        chosen += [ss[i] for i in idx]
    images = [{"image_id": s.image_id, "dx": s.dx, "sha256": sha256_file(s.path)} for s in chosen]
    digest = _content_hash(images)
    name = name or f"{source_split}-{len(images)}-seed{seed}-{digest[:8]}"
    manifest = {
        "format": FORMAT, "name": name, "sha256": digest, "size": len(images), "seed": seed,
        "source_split": source_split, "split_sha256": split.sha256(), "data": dataset.source,
        "rule": "class-stratified (proportional, largest remainder, >= 1 per class), uniform within class",
        "class_counts": {c: sum(1 for s in chosen if s.dx == c) for c in HAM10000_CODES},
        "forced": bool(problems), "forced_reasons": problems, "images": images,
    }
    return CalibrationSet(name, tuple(i["image_id"] for i in images), manifest)


def write_calibration_set(cal: CalibrationSet, directory: str | os.PathLike = "calibration") -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out = d / f"{cal.name}.json"
    write_json(out, cal.manifest, indent=1)
    return out


def read_calibration_set(path: str | os.PathLike) -> CalibrationSet:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: calibration manifest not found", "make one with `edgeskin calib make`")
    try:
        m = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{p}: not valid JSON ({exc})", "re-make it with `edgeskin calib make`") from None
    if m.get("format") != FORMAT:
        raise DataError(f"{p}: not an edgeskin calibration manifest", "make one with `edgeskin calib make`")
    if _content_hash(m["images"]) != m["sha256"]:
        raise DataError(f"{p}: the image list does not match its sha256 (edited by hand?)",
                        "re-make it with `edgeskin calib make`")
    return CalibrationSet(m["name"], tuple(i["image_id"] for i in m["images"]), m, p)


def resolve_calibration_images(cal: CalibrationSet, dataset: Dataset, split: Split | None) -> Dataset:
    """The calibration images of ``dataset``, after checking file hashes and leaks."""
    index = dataset.by_id()
    where = str(cal.path or cal.name)
    missing = [i for i in cal.image_ids if i not in index]
    if missing:
        raise DataError(f"{where}: {len(missing)} calibration image(s) not in {dataset.source} (e.g. {missing[0]})",
                        "use the data set the calibration set was drawn from")
    # Only a set explicitly forced to draw from a non-train split may hold val/test images; a set
    # forced for another reason (too small, a missing class) is still checked for leaks.
    leak_accepted = bool(cal.manifest.get("forced")) and cal.manifest.get("source_split", "train") != "train"
    if split is not None and not leak_accepted:
        leaked = [i for i in cal.image_ids if split.assignment.get(i) in ("val", "test")]
        if leaked:
            raise DataError(
                f"{where}: {len(leaked)} calibration image(s) are in the validation/test split (e.g. {leaked[0]})",
                "calibrate on training images only: re-make the set with `edgeskin calib make`",
            )
    for im in cal.manifest["images"]:
        path = index[im["image_id"]].path
        if sha256_file(path) != im["sha256"]:
            raise DataError(f"{path}: file changed since the calibration set {cal.name} was made",
                            "re-make the calibration set")
    return Dataset([index[i] for i in cal.image_ids], dataset.source, dataset.layout, dataset.lesion_grouped)
