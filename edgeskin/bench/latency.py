"""Latency: warm-up, then repeated timed runs, interleaved across what is timed so that
background load hits all of it alike; medians and percentiles, threads recorded.

Two ways to decide how many runs:

- :func:`interleaved_latency`: a fixed number of rounds (quick comparisons, e.g. teacher vs
  student after distillation);
- :func:`timed_until`: MLPerf-style, rounds continue until every function has at least
  ``min_samples`` samples *and* at least ``min_seconds`` have passed (capped by ``max_seconds``).
  The bench uses it, so its tail percentiles rest on enough samples.

The 99th percentile is only reported from at least :data:`P99_MIN_SAMPLES` samples; below that
it is ``None`` (shown as "n/a"), since with fewer samples it is close to the maximum.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Mapping

import numpy as np

#: the fewest samples a reported p99 rests on
P99_MIN_SAMPLES = 1000


@dataclass(frozen=True)
class LatencyStats:
    runs: int
    batch: int
    p50_ms: float
    p90_ms: float
    p99_ms: float | None
    mean_ms: float
    min_ms: float
    seconds: float | None = None

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)

    @classmethod
    def of(cls, times_ms: list[float] | np.ndarray, batch: int, seconds: float | None = None) -> "LatencyStats":
        a = np.asarray(times_ms, dtype=np.float64)
        p99 = float(np.percentile(a, 99)) if len(a) >= P99_MIN_SAMPLES else None
        return cls(len(a), int(batch), float(np.median(a)), float(np.percentile(a, 90)), p99, float(a.mean()),
                   float(a.min()), seconds)


def interleaved_latency(
    fns: Mapping[str, Callable[[np.ndarray], object]],
    x: np.ndarray,
    *,
    runs: int = 50,
    warmup: int = 5,
) -> dict[str, LatencyStats]:
    """Time each ``fn(x)``: ``warmup`` untimed calls each, then ``runs`` rounds in which every
    function runs once, in an order rotated each round."""
    return timed_until({k: (lambda f=f: f(x)) for k, f in fns.items()}, min_samples=runs, min_seconds=0.0,
                       warmup=warmup, batch=int(x.shape[0]), max_samples=runs)


def timed_until(
    fns: Mapping[str, Callable[[], object]],
    *,
    min_samples: int = P99_MIN_SAMPLES,
    min_seconds: float = 10.0,
    max_seconds: float = 600.0,
    warmup: int = 10,
    batch: int = 1,
    max_samples: int | None = None,
) -> dict[str, LatencyStats]:
    """Time each ``fn()``: ``warmup`` untimed calls each, then rounds in which every function runs
    once (order rotated each round) until each has ``min_samples`` samples and ``min_seconds``
    have passed, or ``max_seconds`` have passed (or ``max_samples`` rounds were run)."""
    if min_samples < 1:
        raise ValueError(f"min_samples must be at least 1, got {min_samples}")
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    r = 0
    while True:
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append((time.perf_counter() - t0) * 1000.0)
        r += 1
        elapsed = time.perf_counter() - start
        if max_samples is not None and r >= max_samples:
            break
        if (r >= min_samples and elapsed >= min_seconds) or elapsed >= max_seconds:
            break
    elapsed = time.perf_counter() - start
    return {name: LatencyStats.of(ts, batch, elapsed) for name, ts in times.items()}
