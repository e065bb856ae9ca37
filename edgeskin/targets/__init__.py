"""Compile targets: one module per target, registered by name (``cpu``, ``jetson``, ``tflite``)."""

from .base import Budget, CompileResult, Target, CompileError
from .registry import available_targets, get_target, register
from . import cpu as _cpu  # noqa: F401  (registers the target)
from . import jetson as _jetson  # noqa: F401
from . import tflite as _tflite  # noqa: F401

__all__ = ["Budget", "CompileResult", "Target", "CompileError", "available_targets", "get_target", "register"]
