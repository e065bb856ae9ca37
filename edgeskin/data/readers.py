"""Readers that turn a data set on disk into a list of samples (image id, lesion id, diagnosis, path).

Three layouts are understood:

* the official HAM10000 release: ``HAM10000_metadata.csv`` (``lesion_id,image_id,dx,...``)
  with images under one or several folders (``HAM10000_images_part_1``, ``_part_2``);
* ISIC 2018 Task 3 ground truth: ``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC`` (one-hot), with the
  optional lesion-grouping CSV (``image,lesion_id,...``) for lesion-disjoint splits;
* a folder per class (``ROOT/mel/*.jpg``, ``ROOT/nv/*.jpg``, ...).
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import DataError
from ..labels import HAM10000_CODES

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
ISIC_COLUMNS = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
METADATA_NAMES = ("HAM10000_metadata.csv", "HAM10000_metadata", "metadata.csv")


@dataclass(frozen=True)
class Sample:
    image_id: str
    lesion_id: str
    dx: str
    path: str


@dataclass(frozen=True)
class SkippedItem:
    where: str
    reason: str


@dataclass
class Dataset:
    """Samples in a stable order (the metadata's order), plus what was skipped and why."""

    samples: list[Sample]
    source: str
    layout: str
    lesion_grouped: bool = True
    skipped: list[SkippedItem] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    def by_id(self) -> dict[str, Sample]:
        return {s.image_id: s for s in self.samples}

    def class_counts(self) -> dict[str, int]:
        counts = {c: 0 for c in HAM10000_CODES}
        for s in self.samples:
            counts[s.dx] += 1
        return counts

    def subset(self, ids: Iterable[str]) -> "Dataset":
        index = self.by_id()
        return Dataset(
            [index[i] for i in ids], self.source, self.layout, self.lesion_grouped, []
        )


class _Problems:
    """Collects bad items: raises at once, or records them when ``skip_bad`` is set."""

    def __init__(self, skip_bad: bool) -> None:
        self.skip_bad = skip_bad
        self.items: list[SkippedItem] = []

    def __call__(self, where: str, reason: str, hint: str) -> None:
        if not self.skip_bad:
            raise DataError(f"{where}: {reason}", f"{hint} (or pass --skip-bad to skip such items)")
        self.items.append(SkippedItem(where, reason))


def index_images(dirs: Sequence[Path], problems: _Problems) -> dict[str, Path]:
    """Map image id (file stem) -> path for every image file below ``dirs``."""
    found: dict[str, Path] = {}
    for d in dirs:
        if not d.is_dir():
            raise DataError(f"{d}: image folder not found", "pass the folder that holds the images")
        for root, dirnames, files in os.walk(d):
            dirnames.sort()
            for name in sorted(files):
                stem, ext = os.path.splitext(name)
                if ext.lower() not in IMAGE_EXTENSIONS:
                    continue
                path = Path(root) / name
                if stem in found and found[stem] != path:
                    problems(
                        str(path),
                        f"duplicate image id {stem!r} (also {found[stem]})",
                        "keep one copy of each image",
                    )
                    continue
                found[stem] = path
    return found


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            return list(reader.fieldnames or []), rows
    except FileNotFoundError:
        raise DataError(f"{path}: file not found", "check the path") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc})", "pass a UTF-8 CSV") from None


def _default_image_dirs(csv_path: Path) -> list[Path]:
    parent = csv_path.parent
    parts = sorted(p for p in parent.iterdir() if p.is_dir() and p.name.startswith("HAM10000_images"))
    if parts:
        return parts
    if (parent / "images").is_dir():
        return [parent / "images"]
    return [parent]


def read_ham10000(
    metadata: str | os.PathLike,
    image_dirs: Sequence[str | os.PathLike] | None = None,
    *,
    skip_bad: bool = False,
) -> Dataset:
    """Read the official HAM10000 metadata and locate each image under ``image_dirs``."""
    meta = Path(metadata)
    fields, rows = _read_csv(meta)
    needed = {"lesion_id", "image_id", "dx"}
    if not needed <= set(fields):
        raise DataError(
            f"{meta}: missing columns {sorted(needed - set(fields))}",
            "expected the HAM10000 header lesion_id,image_id,dx,dx_type,age,sex,localization",
        )
    dirs = [Path(d) for d in image_dirs] if image_dirs else _default_image_dirs(meta)
    problems = _Problems(skip_bad)
    images = index_images(dirs, problems)
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        image_id = (row.get("image_id") or "").strip()
        lesion_id = (row.get("lesion_id") or "").strip()
        dx = (row.get("dx") or "").strip().lower()
        where = f"{meta}:{line}"
        if not image_id or not lesion_id:
            problems(where, "empty image_id or lesion_id", "fill in both columns")
            continue
        if image_id in seen:
            problems(where, f"duplicate image id {image_id!r} (first on line {seen[image_id]})",
                     "remove the repeated row")
            continue
        if dx not in HAM10000_CODES:
            problems(where, f"unknown label {dx!r} for {image_id}",
                     f"dx must be one of {', '.join(HAM10000_CODES)}")
            continue
        path = images.get(image_id)
        if path is None:
            problems(where, f"image {image_id} not found under {', '.join(map(str, dirs))}",
                     "pass the image folders with --images, or remove the row")
            continue
        seen[image_id] = line
        samples.append(Sample(image_id, lesion_id, dx, str(path)))
    if not samples:
        raise DataError(f"{meta}: no usable images", "check the metadata file and image folders")
    return Dataset(samples, str(meta), "ham10000", True, problems.items)


def read_isic2018(
    ground_truth: str | os.PathLike,
    image_dirs: Sequence[str | os.PathLike] | None = None,
    *,
    groupings: str | os.PathLike | None = None,
    skip_bad: bool = False,
) -> Dataset:
    """Read ISIC 2018 Task 3 ground truth (one-hot ``image,MEL,NV,...``).

    Without a lesion-grouping CSV every image counts as its own lesion, and a warning says
    that splits cannot then be lesion-disjoint.
    """
    gt = Path(ground_truth)
    fields, rows = _read_csv(gt)
    if "image" not in fields or not set(ISIC_COLUMNS) <= set(fields):
        raise DataError(
            f"{gt}: not an ISIC 2018 Task 3 ground-truth file",
            "expected the header image,MEL,NV,BCC,AKIEC,BKL,DF,VASC",
        )
    if groupings is None:
        cands = sorted(gt.parent.glob("*LesionGroupings*.csv"))
        groupings = cands[0] if cands else None
    lesion_of: dict[str, str] = {}
    if groupings is not None:
        gfields, grows = _read_csv(Path(groupings))
        if not {"image", "lesion_id"} <= set(gfields):
            raise DataError(f"{groupings}: expected columns image,lesion_id", "pass the ISIC lesion groupings CSV")
        lesion_of = {r["image"].strip(): r["lesion_id"].strip() for r in grows}
    else:
        log.warning("%s: no lesion groupings; each image counts as its own lesion, so splits "
                    "cannot be lesion-disjoint", gt)
    dirs = [Path(d) for d in image_dirs] if image_dirs else [gt.parent]
    problems = _Problems(skip_bad)
    images = index_images(dirs, problems)
    samples: list[Sample] = []
    seen: set[str] = set()
    for line, row in enumerate(rows, start=2):
        where = f"{gt}:{line}"
        image_id = (row.get("image") or "").strip()
        try:
            hot = [float(row[c]) for c in ISIC_COLUMNS]
        except (TypeError, ValueError):
            problems(where, f"non-numeric label columns for {image_id}", "labels must be 0 or 1")
            continue
        if sorted(hot) != [0.0] * 6 + [1.0]:
            problems(where, f"{image_id} has not exactly one label set", "one-hot: exactly one 1.0 per row")
            continue
        if image_id in seen:
            problems(where, f"duplicate image id {image_id!r}", "remove the repeated row")
            continue
        path = images.get(image_id)
        if path is None:
            problems(where, f"image {image_id} not found under {', '.join(map(str, dirs))}",
                     "pass the image folders, or remove the row")
            continue
        seen.add(image_id)
        dx = ISIC_COLUMNS[hot.index(1.0)].lower()
        samples.append(Sample(image_id, lesion_of.get(image_id, image_id), dx, str(path)))
    if not samples:
        raise DataError(f"{gt}: no usable images", "check the ground-truth file and image folders")
    return Dataset(samples, str(gt), "isic2018", bool(lesion_of), problems.items)


def read_folder(root: str | os.PathLike, *, skip_bad: bool = False) -> Dataset:
    """A folder per class: ``ROOT/<class code>/<image id>.<ext>``. Each image is its own lesion."""
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"{base}: folder not found", "pass the folder whose subfolders are the classes")
    problems = _Problems(skip_bad)
    samples: list[Sample] = []
    seen: dict[str, Path] = {}
    subdirs = sorted(p for p in base.iterdir() if p.is_dir())
    for d in subdirs:
        dx = d.name.lower()
        if dx not in HAM10000_CODES:
            problems(str(d), f"unknown label folder {d.name!r}",
                     f"class folders must be named {', '.join(HAM10000_CODES)}")
            continue
        for p in sorted(d.rglob("*")):
            if p.suffix.lower() not in IMAGE_EXTENSIONS or not p.is_file():
                continue
            if p.stem in seen:
                problems(str(p), f"duplicate image id {p.stem!r} (also {seen[p.stem]})",
                         "keep one copy of each image")
                continue
            seen[p.stem] = p
            samples.append(Sample(p.stem, p.stem, dx, str(p)))
    if not samples:
        raise DataError(f"{base}: no images found in class folders",
                        f"expected subfolders named {', '.join(HAM10000_CODES)}")
    log.warning("%s: folder layout has no lesion ids; each image counts as its own lesion", base)
    return Dataset(samples, str(base), "folder", False, problems.items)


def load_dataset(
    path: str | os.PathLike,
    *,
    image_dirs: Sequence[str | os.PathLike] | None = None,
    skip_bad: bool = False,
) -> Dataset:
    """Detect the layout of ``path`` (a metadata/ground-truth CSV or a folder) and read it."""
    p = Path(path)
    if not p.exists():
        raise DataError(
            f"{p}: data not found",
            "pass --data DIR (a HAM10000 release, an ISIC 2018 ground-truth CSV or a folder "
            "per class), or set EDGESKIN_DATA",
        )
    if p.is_dir():
        for name in METADATA_NAMES:
            if (p / name).is_file():
                return read_ham10000(p / name, image_dirs, skip_bad=skip_bad)
        for cand in sorted(p.glob("*.csv")):
            with open(cand, encoding="utf-8-sig") as f:
                header = f.readline()
            if header.startswith("image,") and "MEL" in header:
                return read_isic2018(cand, image_dirs, skip_bad=skip_bad)
        return read_folder(p, skip_bad=skip_bad)
    with open(p, encoding="utf-8-sig") as f:
        header = f.readline()
    if "lesion_id" in header and "dx" in header:
        return read_ham10000(p, image_dirs, skip_bad=skip_bad)
    if header.startswith("image,") and "MEL" in header:
        return read_isic2018(p, image_dirs, skip_bad=skip_bad)
    raise DataError(
        f"{p}: unknown data layout",
        "pass a HAM10000 metadata CSV, an ISIC 2018 Task 3 ground-truth CSV or a folder per class",
    )
