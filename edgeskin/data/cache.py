"""Decode a data set once into memory (shorter side resized), with a clear error per bad file."""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..errors import ImageError
from ..preprocess import PreprocessConfig, load_resized
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
