"""Latency: warm-up, then repeated timed runs, interleaved across models so that background
load hits all of them alike; medians and percentiles, threads recorded."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Mapping

import numpy as np


@dataclass(frozen=True)
class LatencyStats:
    runs: int
    batch: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def interleaved_latency(
    fns: Mapping[str, Callable[[np.ndarray], object]],
    x: np.ndarray,
    *,
    runs: int = 50,
    warmup: int = 5,
) -> dict[str, LatencyStats]:
    """Time each ``fn(x)``: ``warmup`` untimed calls each, then ``runs`` rounds in which every
    function runs once, in an order rotated each round."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name](x)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(runs):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            fns[name](x)
            times[name].append((time.perf_counter() - t0) * 1000.0)
    out = {}
    for name, ts in times.items():
        a = np.asarray(ts)
        out[name] = LatencyStats(runs, int(x.shape[0]), float(np.median(a)), float(np.percentile(a, 90)),
                                 float(np.percentile(a, 99)), float(a.mean()), float(a.min()))
    return out
