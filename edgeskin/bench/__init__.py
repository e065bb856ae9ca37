"""Benchmarking through the runtime (so the numbers are those of the code that ships).

Light: numpy + the runtime. Only :func:`reference_from_models` (evaluating an ensemble here) and
:func:`export_reference_models` import torch, inside the function.
"""

from .latency import LatencyStats, interleaved_latency, timed_until
from .reference import ReferencePredictions, export_reference_models, reference_from_models
from ..budget import Budget
from .runner import (BenchConfig, BenchReport, BudgetBreach, ForcedRefused, RowFailed, check_budget,
                     compile_failed_row, failed_rows, row_metrics, run_bench)
from .stats import bootstrap_drop, mcnemar, sensitivity_specificity, threshold_at_specificity

__all__ = ["LatencyStats", "interleaved_latency", "timed_until", "ReferencePredictions", "export_reference_models",
           "reference_from_models", "Budget", "BenchConfig", "BenchReport", "BudgetBreach", "ForcedRefused", "RowFailed",
           "check_budget", "compile_failed_row", "failed_rows", "row_metrics", "run_bench",
           "bootstrap_drop", "mcnemar", "sensitivity_specificity", "threshold_at_specificity"]
