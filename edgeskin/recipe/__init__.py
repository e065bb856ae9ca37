"""Recipes: the whole pipeline from one versioned TOML file, re-run only where inputs changed.

A recipe names the data, the split, the ensemble (trained or loaded), the student, the
calibration set, the targets with their devices and precisions, and the budgets. :func:`run`
executes the stages in order::

    split -> ensemble -> student -> calibration -> compile:<target> ... -> bench

Every stage has a *key*: the sha256 of its own settings and of the keys of the stages it reads
(the data enters through a fingerprint of its metadata and image files). ``OUT/.recipe/state.json``
records each stage's key and status. A stage whose key matches a finished record is skipped; a
stage whose key changed starts again from an empty folder; a stage that was interrupted (status
``running`` with the same key) resumes, since training and distillation resume from their own
checkpoints. Bundles go to ``OUT/bundles/``, the bench report to ``OUT/bench/``.

Relative paths in a recipe are relative to the recipe file.

The parts: :mod:`.schema` reads and checks the file, :mod:`.stages` is the table of stages,
:mod:`.state` keeps keys, fingerprints and the run lock, :mod:`.runner` walks the table.
"""

from __future__ import annotations

from .runner import RunResult, StageOutcome, plan, run
from .schema import Recipe, _value_specs, load_recipe  # noqa: F401  (_value_specs: the recipe fuzz tests read it)
from .stages import Stage, bench_budget, bench_config, compile_budget, stage_names, stages
from .state import STATE_VERSION, RunLock, data_fingerprint, folder_fingerprint

_Lock = RunLock  # the name tests and older code use

__all__ = ["Recipe", "RunResult", "Stage", "StageOutcome", "STATE_VERSION", "RunLock", "bench_budget", "bench_config",
           "compile_budget", "data_fingerprint", "folder_fingerprint", "load_recipe", "plan", "run", "stage_names",
           "stages"]
