"""One budget type and one parser for every gate: ``compile`` (each bundle against its FP32 model
on validation), ``bench`` (each row on the reported split) and recipes' ``[budgets.*]`` tables.

A budget is the largest drop in percentage points per metric (``top1``, ``balanced``,
``mel_recall``), the smallest top-1 agreement with the float model (a fraction), and the largest
batch-1 p90 latency. ``None``: not checked.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping

from .errors import ConfigError

METRICS = ("top1", "balanced", "mel_recall")

#: what `edgeskin compile` and a recipe's compile stage hold a bundle to unless told otherwise
COMPILE_DEFAULTS: dict[str, float] = {"top1": 0.5, "balanced": 1.5, "mel_recall": 2.0, "min_agreement": 0.97}

#: a budgeted drop worth fewer flipped images than this is decided by a handful of images: warned about
MIN_IMAGES = 3.0


def parse_drops(spec: str | Mapping[str, Any] | None, *, where: str = "--max-drop") -> dict[str, float]:
    """``top1=0.5,balanced=1.5,mel_recall=2`` (or a table of the same) as {metric: points}."""
    items: list[tuple[str, Any]]
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        items = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, sep, value = part.partition("=")
            if not sep or not value.strip():
                raise ConfigError(f"{where}: bad budget entry {part!r}", "use e.g. top1=0.5,balanced=1.5,mel_recall=2")
            items.append((key, value))
    out: dict[str, float] = {}
    for key, value in items:
        k = str(key).strip().replace("-", "_")
        if k not in METRICS:
            raise ConfigError(f"{where}: bad budget entry {key!r}", f"metrics: {', '.join(METRICS)}")
        try:
            v = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: bad budget value {key}={value!r}", "numbers are percentage points") from None
        if not math.isfinite(v):  # nan would silently disable the check
            raise ConfigError(f"{where}: bad budget value {key}={value!r}", "use a finite number of percentage points")
        out[k] = v
    return out


@dataclass(frozen=True)
class Budget:
    """Largest drops (points), smallest top-1 agreement (fraction), largest p90 latency (ms).
    ``against``: what a bench row is compared with (student, ensemble, or auto: the student when
    there is one). Compile checks compare with the bundle's own FP32 model."""

    top1: float | None = None
    balanced: float | None = None
    mel_recall: float | None = None
    min_agreement: float | None = None
    max_latency_ms: float | None = None
    against: str = "auto"

    @classmethod
    def parse(cls, drops: str | Mapping[str, Any] | None = None, *, min_agreement: float | None = None,
              max_latency_ms: float | None = None, against: str = "auto", profile: Any = None,
              defaults: Mapping[str, float] | None = None, where: str = "--max-drop") -> "Budget":
        """``defaults`` first, then a device ``profile``'s budget, then what was given."""
        kw: dict[str, Any] = dict(defaults or {})
        if profile is not None:
            kw.update({k: float(profile.budget[k]) for k in METRICS if k in profile.budget})
            if profile.max_latency_ms is not None:
                kw["max_latency_ms"] = float(profile.max_latency_ms)
        kw.update(parse_drops(drops, where=where))
        if min_agreement is not None:
            if not 0.0 <= float(min_agreement) <= 1.0:
                raise ConfigError(f"min_agreement {min_agreement} is not a fraction", "use e.g. 0.97")
            kw["min_agreement"] = float(min_agreement)
        if max_latency_ms is not None:
            kw["max_latency_ms"] = float(max_latency_ms)
        if against not in ("auto", "student", "ensemble"):
            raise ConfigError(f"against = {against!r}", "choose auto, student or ensemble")
        return cls(against=against, **kw)

    @classmethod
    def for_compile(cls, drops: str | Mapping[str, Any] | None = None, min_agreement: float | None = None, *,
                    where: str = "--max-drop") -> "Budget":
        """A compile budget: :data:`COMPILE_DEFAULTS` with what was given on top."""
        return cls.parse(drops, min_agreement=min_agreement, defaults=COMPILE_DEFAULTS, where=where)

    @classmethod
    def from_table(cls, table: Mapping[str, Any], *, where: str, compile_defaults: bool = True) -> "Budget":
        """A recipe's ``[budgets.compile]`` or ``[budgets.bench]`` table."""
        t = dict(table)
        drops = {k: t.pop(k) for k in METRICS if k in t}
        agreement = t.pop("min_agreement", None)
        latency = t.pop("max_latency_ms", None)
        against = t.pop("against", "auto")
        t.pop("device", None)
        t.pop("on_miss", None)
        if t:
            raise ConfigError(f"{where}: unknown budget key(s) {', '.join(sorted(t))}",
                              f"keys: {', '.join((*METRICS, 'min_agreement', 'max_latency_ms', 'against'))}")
        return cls.parse(drops, min_agreement=agreement, max_latency_ms=latency, against=against, where=where,
                         defaults=COMPILE_DEFAULTS if compile_defaults else None)

    def active(self) -> bool:
        return any(getattr(self, k) is not None for k in (*METRICS, "min_agreement", "max_latency_ms"))

    def drop_failures(self, drops: Mapping[str, float | None], vs: str = "") -> list[str]:
        """The metrics whose drop (points) is above this budget."""
        out = []
        for k in METRICS:
            limit, v = getattr(self, k), drops.get(k)
            if limit is not None and v is not None and v > limit + 1e-9:
                out.append(f"{k} drop {v:.2f}" + (f" points vs the {vs}" if vs else "") + f" > {limit:g}")
        return out

    def resolution_warnings(self, steps: Mapping[str, Mapping[str, Any] | None],
                            min_images: float = MIN_IMAGES) -> list[str]:
        """The budgeted drops a split is too small to judge: where one flipped image moves the metric
        by more than its budget, or the budget is worth fewer than ``min_images`` flipped images.
        ``steps``: :func:`edgeskin.metrics.budget_steps` of the split. One line per metric, naming
        the budget, the step and the images it is counted on."""
        out = []
        for k in METRICS:
            limit, s = getattr(self, k), steps.get(k)
            if limit is None or s is None:
                continue
            step, n = s.get("step_points"), s.get("images", 0)
            what = {"top1": f"{n} images", "balanced": f"smallest class {s.get('class')}: {n} images",
                    "mel_recall": f"{n} {s.get('class')} images"}[k]
            if not step:
                out.append(f"{k} budget {limit:g} points cannot be checked: {what}")
            elif step > limit + 1e-9:
                out.append(f"{k} budget {limit:g} points < one flipped image ({step:.2f} points; {what})")
            elif limit / step < min_images - 1e-9:
                out.append(f"{k} budget {limit:g} points = {limit / step:.1f} flipped images "
                           f"({step:.2f} points each; {what})")
        return out

    def with_(self, **changes: Any) -> "Budget":
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_summary(check: Mapping[str, Any]) -> str:
    """One line for a compile check record (a manifest's ``accuracy``): top-1 agreement with its
    95 % Wilson interval and image count, then each drop in points with its paired bootstrap
    interval. Records written before the intervals existed give what they have."""
    n = check.get("n", "?")
    iv = check.get("intervals") or {}
    ag = check.get("top1_agreement")
    parts = []
    if ag is not None:
        lo_hi = iv.get("top1_agreement")
        parts.append(f"agreement {100 * ag:.1f}%" + (f" [{100 * lo_hi[0]:.1f}, {100 * lo_hi[1]:.1f}]" if lo_hi else "")
                     + f" of {n} images")
    drops = []
    for k, v in (check.get("drops_points") or {}).items():
        if v is None:
            continue
        lo_hi = (iv.get("drops_points") or {}).get(k)
        drops.append(f"{k} {v:.2f}" + (f" [{lo_hi[0]:.2f}, {lo_hi[1]:.2f}]" if lo_hi else ""))
    if drops:
        parts.append("drop (points" + (f", {100 * iv['level']:g}% interval" if iv.get("level") else "") + "): "
                     + ", ".join(drops))
    return "; ".join(parts)
