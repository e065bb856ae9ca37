"""Benchmarking through the runtime (so the numbers are those of the code that ships)."""

from .latency import LatencyStats, interleaved_latency

__all__ = ["LatencyStats", "interleaved_latency"]
