"""Running members: each image goes through each member's own preprocessing; an ensemble's
probabilities are the mean of its members'."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from ..data import Dataset, decode_with_progress, eval_tensors, labels_of
from ..labels import LabelSet
from ..preprocess import PreprocessConfig
from ..progress import NullReporter, Reporter
from .base import convert_view


def distinct(pres: Sequence[PreprocessConfig]) -> list[PreprocessConfig]:
    out: list[PreprocessConfig] = []
    for p in pres:
        if p not in out:
            out.append(p)
    return out


def eval_inputs(dataset: Dataset, pres: Sequence[PreprocessConfig], labels: LabelSet, *, what: str,
                reporter: Reporter | None = None, skip_bad: bool = False,
                ) -> tuple[Dataset, dict[PreprocessConfig, np.ndarray], np.ndarray]:
    """Decode ``dataset`` once per distinct resize rule and make the evaluation batch of every
    distinct preprocessing: (kept samples, {preprocessing: inputs}, class indices)."""
    reporter = reporter or NullReporter()
    decoded: dict[tuple[int, str], tuple[Dataset, list[np.ndarray]]] = {}
    inputs: dict[PreprocessConfig, np.ndarray] = {}
    kept = dataset
    for pre in distinct(pres):
        key = (pre.resize_size, pre.interpolation)
        if key not in decoded:
            decoded[key] = decode_with_progress(dataset, pre, what=what, reporter=reporter, skip_bad=skip_bad)
        kept, arrays = decoded[key]
        inputs[pre] = eval_tensors(arrays, pre)
    return kept, inputs, labels_of(kept, labels)


def member_probs(members: Sequence[Any], inputs: dict[PreprocessConfig, np.ndarray], *, batch_size: int = 64,
                 device: Any = None, reporter: Reporter | None = None) -> dict[str, np.ndarray]:
    """{member name: (N, C) probabilities}, each member on its own preprocessing's batch."""
    reporter = reporter or NullReporter()
    out: dict[str, np.ndarray] = {}
    for m in members:
        x = inputs[m.preprocess]
        reporter.start(f"evaluating {m.name}", len(x))
        try:
            out[m.name] = np.asarray(m.probs(x, batch_size=batch_size, device=device, progress=reporter.advance),
                                     dtype=np.float64)
        finally:
            if device is not None:
                m.release()
            reporter.stop()
    return out


def ensemble_fn(members: Sequence[Any], view: PreprocessConfig) -> Callable[[np.ndarray], np.ndarray]:
    """``f(x)``: the ensemble's probabilities for a batch made with ``view`` (each member gets the
    same view through its own preprocessing). What latency measurements time for an ensemble."""

    def f(x: np.ndarray) -> np.ndarray:
        return np.mean([m.probs(convert_view(x, view, m.preprocess), batch_size=max(1, len(x)))
                        for m in members], axis=0)

    return f
