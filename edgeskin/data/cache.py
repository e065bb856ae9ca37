"""Decode a data set once into memory (shorter side resized), with a clear error per bad file."""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..errors import ImageError
from ..labels import LabelSet
from ..preprocess import PreprocessConfig, finish, load_resized
from ..progress import NullReporter, Reporter
from .readers import Dataset, SkippedItem


def decode_dataset(
    dataset: Dataset,
    pre: PreprocessConfig,
    *,
    skip_bad: bool = False,
    progress: Callable[[int], None] | None = None,
) -> tuple[Dataset, list[np.ndarray]]:
    """Decode and resize every image. Bad files raise :class:`ImageError` naming the file, or,
    with ``skip_bad``, are dropped and listed in the returned data set's ``skipped``."""
    kept, arrays, skipped = [], [], list(dataset.skipped)
    for s in dataset.samples:
        try:
            arrays.append(load_resized(s.path, pre))
            kept.append(s)
        except ImageError as exc:
            if not skip_bad:
                reason = exc.message.removeprefix(f"{s.path}: ")
                raise ImageError(s.path, reason, (exc.hint or "") + " (or pass --skip-bad to skip bad images)") from None
            skipped.append(SkippedItem(s.path, exc.message))
        if progress is not None:
            progress(1)
    out = Dataset(kept, dataset.source, dataset.layout, dataset.lesion_grouped, skipped)
    return out, arrays


def decode_with_progress(
    dataset: Dataset, pre: PreprocessConfig, *, what: str, reporter: Reporter | None = None,
    skip_bad: bool = False,
) -> tuple[Dataset, list[np.ndarray]]:
    """:func:`decode_dataset` with a progress bar named after ``what`` ("validation", ...)."""
    reporter = reporter or NullReporter()
    reporter.start(f"decoding {what} images", len(dataset))
    try:
        return decode_dataset(dataset, pre, skip_bad=skip_bad, progress=reporter.advance)
    finally:
        reporter.stop()


def labels_of(dataset: Dataset, labels: LabelSet) -> np.ndarray:
    """Class indices of the samples in ``labels``' order."""
    return np.array([labels.encode(s.dx) for s in dataset.samples], dtype=np.int64)


def eval_tensors(arrays: list[np.ndarray], pre: PreprocessConfig) -> np.ndarray:
    """Centre-cropped, normalised evaluation batch of decoded images."""
    if not arrays:
        shape = (0, 3, pre.size, pre.size) if pre.layout == "NCHW" else (0, pre.size, pre.size, 3)
        return np.zeros(shape, np.float32)
    return np.stack([finish(a, pre) for a in arrays])


def load_eval_set(
    dataset: Dataset, pre: PreprocessConfig, labels: LabelSet, *, what: str,
    reporter: Reporter | None = None, skip_bad: bool = False,
) -> tuple[Dataset, np.ndarray, np.ndarray]:
    """Decode ``dataset`` for evaluation: (kept samples, inputs (N, ...), class indices (N,))."""
    kept, arrays = decode_with_progress(dataset, pre, what=what, reporter=reporter, skip_bad=skip_bad)
    return kept, eval_tensors(arrays, pre), labels_of(kept, labels)
