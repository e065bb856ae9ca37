"""Targets registered by name, with aliases; unknown names get the closest match."""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from .base import Target

_TARGETS: dict[str, "Target"] = {}
_ALIASES: dict[str, str] = {}


def register(target: "Target") -> "Target":
    for name in (target.name, *target.aliases):
        if name in _TARGETS or name in _ALIASES:
            raise ValueError(f"target name {name!r} is already registered")
    _TARGETS[target.name] = target
    for a in target.aliases:
        _ALIASES[a] = target.name
    return target


def get_target(name: str) -> "Target":
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key in _TARGETS:
        return _TARGETS[key]
    known = sorted([*_TARGETS, *_ALIASES])
    close = difflib.get_close_matches(key, known, n=1)
    raise ConfigError(
        f"unknown target {name!r}" + (f"; did you mean {close[0]!r}?" if close else ""),
        f"available targets: {', '.join(sorted(_TARGETS))} (aliases: {', '.join(sorted(_ALIASES))})",
    )


def available_targets() -> list["Target"]:
    return [_TARGETS[k] for k in sorted(_TARGETS)]
