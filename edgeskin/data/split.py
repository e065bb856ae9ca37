"""Lesion-disjoint, class-stratified train/val/test splits, deterministic from a seed.

Images of one lesion always land in the same split. Within each diagnosis, the lesions are
shuffled with the seed and cut by the requested fractions, so every split keeps the class mix.
The split file (``image_id,lesion_id,dx,split``) is written once and reused by every command.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..fileio import atomic_write_bytes
from ..labels import HAM10000_CODES
from .readers import Dataset

SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    """image id -> split name, plus each image's lesion and diagnosis."""

    assignment: dict[str, str]
    lesion_of: dict[str, str]
    dx_of: dict[str, str]
    source: str = ""

    def ids(self, name: str) -> list[str]:
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}", f"choose one of: {', '.join(SPLITS)}")
        return [i for i, s in self.assignment.items() if s == name]

    def counts(self) -> dict[str, dict[str, int]]:
        out = {s: {c: 0 for c in HAM10000_CODES} for s in SPLITS}
        for i, s in self.assignment.items():
            out[s][self.dx_of[i]] += 1
        return out

    def check_disjoint(self) -> None:
        """Raise if one lesion has images in two splits."""
        where: dict[str, str] = {}
        for image_id, split in self.assignment.items():
            lesion = self.lesion_of[image_id]
            prev = where.setdefault(lesion, split)
            if prev != split:
                raise DataError(
                    f"{self.source or 'split'}: lesion {lesion} is in both {prev!r} and {split!r} "
                    f"(image {image_id})",
                    "a lesion's images must all be in one split; regenerate it with `edgeskin split`",
                )

    def apply(self, dataset: Dataset, name: str) -> Dataset:
        """The samples of ``dataset`` in split ``name`` (in the data set's order)."""
        index = dataset.by_id()
        wanted = set(self.ids(name))
        missing = sorted(wanted - set(index))
        if missing:
            raise DataError(
                f"{self.source or 'split'}: {len(missing)} image(s) of the {name!r} split are not "
                f"in the data set {dataset.source} (e.g. {', '.join(missing[:3])})",
                "use the split file that was made for this data set, or make a new one",
            )
        for i in wanted:
            if index[i].lesion_id != self.lesion_of[i] and dataset.lesion_grouped:
                raise DataError(
                    f"{self.source}: image {i} has lesion {self.lesion_of[i]} in the split file but "
                    f"{index[i].lesion_id} in {dataset.source}",
                    "the split file does not belong to this data set",
                )
        return Dataset(
            [s for s in dataset.samples if s.image_id in wanted],
            dataset.source, dataset.layout, dataset.lesion_grouped, [],
        )

    def sha256(self) -> str:
        h = hashlib.sha256()
        for i in sorted(self.assignment):
            h.update(f"{i},{self.lesion_of[i]},{self.dx_of[i]},{self.assignment[i]}\n".encode())
        return h.hexdigest()


def make_split(
    dataset: Dataset,
    *,
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    seed: int = 0,
) -> Split:
    """Cut ``dataset`` into train/val/test by lesion, per diagnosis, reproducibly from ``seed``."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise DataError(f"split fractions {fractions} must be three non-negative numbers summing to 1",
                        "e.g. --fractions 0.7,0.1,0.2")
    # A lesion's class is its most frequent diagnosis (HAM10000 lesions have exactly one).
    lesion_dx: dict[str, Counter] = defaultdict(Counter)
    for s in dataset.samples:
        lesion_dx[s.lesion_id][s.dx] += 1
    by_class: dict[str, list[str]] = defaultdict(list)
    for lesion in sorted(lesion_dx):
        dx = max(sorted(lesion_dx[lesion]), key=lambda c: lesion_dx[lesion][c])
        by_class[dx].append(lesion)
    rng = np.random.default_rng(seed)
    lesion_split: dict[str, str] = {}
    for dx in HAM10000_CODES:
        lesions = by_class.get(dx, [])
        if not lesions:
            continue
        order = [lesions[i] for i in rng.permutation(len(lesions))]
        n = len(order)
        n_val = int(round(n * fractions[1]))
        n_test = int(round(n * fractions[2]))
        # Keep every class present in every split it is asked for, when there are lesions enough.
        if n >= 3:
            n_val = max(n_val, 1) if fractions[1] > 0 else 0
            n_test = max(n_test, 1) if fractions[2] > 0 else 0
        n_train = n - n_val - n_test
        for i, lesion in enumerate(order):
            lesion_split[lesion] = "train" if i < n_train else ("val" if i < n_train + n_val else "test")
    assignment = {s.image_id: lesion_split[s.lesion_id] for s in dataset.samples}
    split = Split(
        assignment,
        {s.image_id: s.lesion_id for s in dataset.samples},
        {s.image_id: s.dx for s in dataset.samples},
        source=f"split(seed={seed})",
    )
    split.check_disjoint()
    return split


def write_split(split: Split, path: str | os.PathLike) -> Path:
    """Write ``image_id,lesion_id,dx,split`` atomically (temporary file, then rename)."""
    out = Path(path)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image_id", "lesion_id", "dx", "split"])
    for image_id in sorted(split.assignment):
        w.writerow([image_id, split.lesion_of[image_id], split.dx_of[image_id], split.assignment[image_id]])
    atomic_write_bytes(out, buf.getvalue().encode())
    return out


def read_split(path: str | os.PathLike) -> Split:
    """Read a split file and check it: known split names and labels, no lesion in two splits."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: split file not found", "make one with `edgeskin split --data DIR --out FILE`")
    with open(p, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not {"image_id", "lesion_id", "dx", "split"} <= set(reader.fieldnames or []):
            raise DataError(f"{p}: expected columns image_id,lesion_id,dx,split",
                            "make one with `edgeskin split`")
        assignment, lesion_of, dx_of = {}, {}, {}
        for line, row in enumerate(reader, start=2):
            i, sp, dx = row["image_id"].strip(), row["split"].strip(), row["dx"].strip().lower()
            if sp not in SPLITS:
                raise DataError(f"{p}:{line}: unknown split {sp!r}", f"use one of {', '.join(SPLITS)}")
            if dx not in HAM10000_CODES:
                raise DataError(f"{p}:{line}: unknown label {dx!r}", f"use one of {', '.join(HAM10000_CODES)}")
            if i in assignment:
                raise DataError(f"{p}:{line}: duplicate image id {i!r}", "remove the repeated row")
            assignment[i], lesion_of[i], dx_of[i] = sp, row["lesion_id"].strip(), dx
    split = Split(assignment, lesion_of, dx_of, source=str(p))
    split.check_disjoint()
    return split
