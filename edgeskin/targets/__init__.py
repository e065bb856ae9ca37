"""Compile targets: one module per target, registered by name (``cpu``, ``jetson``, ``tflite``).

The package loads lazily: importing :mod:`edgeskin.targets.options` (the option table the
command line is built from) loads no target; the first use of a name below loads and registers
every target."""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {"Budget": "base", "CompileResult": "base", "Target": "base", "CompileError": "base",
          "available_targets": "registry", "get_target": "registry", "register": "registry"}

__all__ = list(_NAMES)


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    for target in ("cpu", "jetson", "tflite"):  # each registers itself on import
        importlib.import_module(f".{target}", __name__)
    return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
