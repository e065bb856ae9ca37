"""Typed, ranged values at the edge: every recipe value and compile option is checked when it is
read, so a wrong value fails in a second with its file and key named, not after an hour of
training. Standard library only.

A spec says what a value may be; :func:`check` returns the value (ints widened to float where
a number is asked) or raises :class:`~edgeskin.errors.ConfigError` naming where and what.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from .errors import ConfigError


@dataclass(frozen=True)
class Int:
    lo: int | None = None
    hi: int | None = None

    def describe(self) -> str:
        return _range("an integer", self.lo, self.hi)


@dataclass(frozen=True)
class Num:
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False

    def describe(self) -> str:
        if self.lo_open and self.lo is not None:
            return f"a number above {self.lo:g}" + (f" and at most {self.hi:g}" if self.hi is not None else "")
        return _range("a number", self.lo, self.hi)


@dataclass(frozen=True)
class Bool:
    def describe(self) -> str:
        return "true or false"


@dataclass(frozen=True)
class Str:
    choices: tuple[str, ...] | None = None

    def describe(self) -> str:
        return "one of: " + ", ".join(repr(c) for c in self.choices) if self.choices else "a string"


@dataclass(frozen=True)
class ListOf:
    item: Any
    length: int | None = None

    def describe(self) -> str:
        n = f"{self.length} " if self.length else ""
        return f"a list of {n}values, each {self.item.describe()}"


@dataclass(frozen=True)
class AnyOf:
    options: tuple[Any, ...]

    def describe(self) -> str:
        return " or ".join(o.describe() for o in self.options)


def _range(what: str, lo: Any, hi: Any) -> str:
    if lo is not None and hi is not None:
        return f"{what} from {lo:g} to {hi:g}"
    if lo is not None:
        return f"{what} of at least {lo:g}"
    if hi is not None:
        return f"{what} of at most {hi:g}"
    return what


def _ok(value: Any, spec: Any) -> Any:
    """The value if it fits ``spec``; raises ValueError otherwise."""
    if isinstance(spec, AnyOf):
        for option in spec.options:
            try:
                return _ok(value, option)
            except ValueError:
                continue
        raise ValueError
    if isinstance(spec, Bool):
        if isinstance(value, bool):
            return value
        raise ValueError
    if isinstance(spec, Int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError
        if (spec.lo is not None and value < spec.lo) or (spec.hi is not None and value > spec.hi):
            raise ValueError
        return value
    if isinstance(spec, Num):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError
        if spec.lo is not None and (value <= spec.lo if spec.lo_open else value < spec.lo):
            raise ValueError
        if spec.hi is not None and value > spec.hi:
            raise ValueError
        return float(value)
    if isinstance(spec, Str):
        if not isinstance(value, str) or (spec.choices and value not in spec.choices) or not value:
            raise ValueError
        return value
    if isinstance(spec, ListOf):
        if not isinstance(value, (list, tuple)) or (spec.length is not None and len(value) != spec.length):
            raise ValueError
        return [_ok(v, spec.item) for v in value]
    raise TypeError(f"unknown spec {spec!r}")  # pragma: no cover - a bug in a spec table


def check(value: Any, spec: Any, *, key: str, where: str) -> Any:
    """``value`` checked against ``spec``; a ConfigError naming ``where`` and ``key`` otherwise."""
    try:
        return _ok(value, spec)
    except ValueError:
        shown = repr(value) if not isinstance(value, (dict, list)) or len(repr(value)) < 60 else type(value).__name__
        raise ConfigError(f"{where}: {key} = {shown} is not valid", f"{key} must be {spec.describe()}") from None


def check_table(table: dict[str, Any], specs: dict[str, Any], *, where: str, prefix: str = "") -> None:
    """Every key of ``table`` that has a spec, checked (other keys are the caller's to refuse)."""
    for k, v in table.items():
        if k in specs:
            check(v, specs[k], key=f"{prefix}{k}", where=where)


def choices(values: Sequence[str]) -> Str:
    return Str(tuple(values))
