"""Reading a recipe file: its sections, keys and values are checked when it is read, with the
file and key named in every error, so a mistake fails at once and not after an hour of training."""

from __future__ import annotations

import difflib
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError


def _sections() -> dict[str, set[str]]:
    """The keys allowed in each section: the training and bench settings come from
    :mod:`edgeskin.settings`, compile options from :mod:`edgeskin.targets.options`."""
    return {k: set(v) for k, v in _tables()[0].items()}


@functools.lru_cache(maxsize=1)
def _tables() -> tuple[dict[str, frozenset[str]], dict[str, dict[str, Any]]]:
    from .. import settings as S
    from ..targets.options import OPTIONS as COMPILE_OPTIONS
    from ..validate import Bool, Int, ListOf, Num, Str, choices

    text = Str()
    points = Num(-100, 100)
    specs: dict[str, dict[str, Any]] = {
        "": {"name": text, "description": Str(), "out": text},
        "data": {"path": text, "images": ListOf(text), "skip_bad": Bool()},
        "split": {"file": text, "seed": Int(0, 2**63 - 1), "fractions": ListOf(Num(0, 1), 3)},
        "ensemble": {**S.recipe_specs(S.training(), S.ensemble()), "load": text},
        "student": {**S.recipe_specs(S.training(), S.student()), "load": text},
        "calibration": {"file": text, "size": Int(1, 10**6), "seed": Int(0, 2**63 - 1),
                        "force": Bool()},
        "budgets.compile": {"top1": points, "balanced": points, "mel_recall": points, "min_agreement": Num(0, 1),
                            "on_miss": choices(("fail", "keep"))},
        "budgets.bench": {"top1": points, "balanced": points, "mel_recall": points,
                          "max_latency_ms": Num(0, 10**7, lo_open=True),
                          "against": choices(("auto", "student", "ensemble")), "device": text},
        "bench": {**S.recipe_specs(S.bench_timing()), "on": choices(("test", "val")), "runs": Int(1, 10**7)},
        "targets": {"target": text, "precision": text, "name": text},
    }
    keys = {sec: frozenset(spec) for sec, spec in specs.items()}
    keys = {**keys, "": frozenset({"name", "description", "out", "data", "split", "ensemble", "student",
                                   "calibration", "targets", "budgets", "bench"}),
            "budgets": frozenset({"compile", "bench"}),
            "targets": frozenset({"target", "precision", "name", *COMPILE_OPTIONS})}  # plus every compile option
    return keys, specs


def _value_specs() -> dict[str, dict[str, Any]]:
    """What every recipe value may be (type and range), per section: checked when the recipe is
    read (``--dry-run`` included), so a wrong value fails at once with its file and key named."""
    return _tables()[1]


def _check_values(table: dict[str, Any], section: str, where: Path) -> None:
    from ..validate import check_table

    check_table(table, _value_specs()[section], where=str(where), prefix=f"[{section}] " if section else "")


def _check_keys(table: dict[str, Any], section: str, where: Path) -> None:
    allowed = _sections()[section]
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            label = f"[{section}]" if section else "the top level"
            raise ConfigError(f"{where}: unknown key {key!r} in {label}" + (f"; did you mean {close[0]!r}?" if close else ""),
                              f"keys allowed there: {', '.join(sorted(allowed))}")


@dataclass
class Recipe:
    """A parsed, checked recipe. ``raw`` is the TOML as read; paths are resolved."""

    path: Path
    name: str
    out: Path
    raw: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)
    split: dict[str, Any] = field(default_factory=dict)
    ensemble: dict[str, Any] = field(default_factory=dict)
    student: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)
    compile_budget: dict[str, Any] = field(default_factory=dict)
    bench_budget: dict[str, Any] = field(default_factory=dict)
    bench: dict[str, Any] = field(default_factory=dict)

    def target_names(self) -> list[str]:
        return [t["name"] for t in self.targets]


def _resolve(base: Path, value: Any, key: str, where: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: {key} must be a path (a non-empty string)", f'e.g. {key} = "some/folder"')
    p = Path(os.path.expanduser(value))
    p = Path(os.path.normpath(p if p.is_absolute() else base / p))
    try:  # shown and recorded relative to the working directory when inside it (reports stay portable)
        return p.relative_to(Path.cwd())
    except ValueError:
        return p


def _check_target(t: dict[str, Any], where: Path) -> None:
    """Target, precision, device and options are checked when the recipe is read, not when its
    compile stage is reached after an hour of training."""
    from ..targets import get_target
    from ..targets.options import compile_kwargs

    label = f"{where} [[targets]] {t['name']}"
    try:
        tg = get_target(str(t["target"]))
        tg.check_precision(str(t["precision"]))
        kw = compile_kwargs(tg, str(t["target"]), target_options(t), where=label)
        if kw.get("device"):
            from ..profiles import get_profile

            profile = get_profile(kw["device"])
            if profile.target != tg.name:
                raise ConfigError(f"device {profile.name} is a {profile.target} device, not {tg.name}",
                                  "pick a device of this target (see `edgeskin devices`)")
            tg.check_device_precision(profile, str(t["precision"]))
    except ConfigError as exc:
        msg = exc.message if exc.message.startswith(str(where)) else f"{label}: {exc.message}"
        raise ConfigError(msg, exc.hint) from None


def load_recipe(path: str | os.PathLike, *, out: str | os.PathLike | None = None) -> Recipe:
    """Read and check a recipe file. Unknown keys, wrong types and impossible combinations are
    errors naming the file and the key. ``out`` overrides the recipe's output folder."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: recipe not found", "pass a recipe TOML file, e.g. recipes/quick.toml")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: not valid TOML ({exc})", "fix the line named above; see recipes/quick.toml") from None
    _check_keys(raw, "", p)
    _check_values({k: v for k, v in raw.items() if k in ("name", "description", "out")}, "", p)
    base = p.resolve().parent
    name = str(raw.get("name") or p.stem)
    for sec in ("data", "split", "ensemble", "student", "calibration", "budgets", "bench"):
        if sec in raw and not isinstance(raw[sec], dict):
            raise ConfigError(f"{p}: [{sec}] must be a table", f"write it as a [{sec}] section")
        _check_keys(raw.get(sec, {}), sec, p)
        if sec != "budgets":
            _check_values(raw.get(sec, {}), sec, p)
    budgets = raw.get("budgets", {})
    for sub in ("compile", "bench"):
        if sub in budgets and not isinstance(budgets[sub], dict):
            raise ConfigError(f"{p}: [budgets.{sub}] must be a table", f"write it as a [budgets.{sub}] section")
        _check_keys(budgets.get(sub, {}), f"budgets.{sub}", p)
        _check_values(budgets.get(sub, {}), f"budgets.{sub}", p)
    targets = raw.get("targets", [])
    if not isinstance(targets, list) or not targets:
        raise ConfigError(f"{p}: no [[targets]]", 'add at least one, e.g. [[targets]] target = "cpu" precision = "int8"')
    r = Recipe(path=p, name=name, raw=raw,
               out=Path(out) if out is not None else _resolve(base, raw.get("out", f"runs/{name}"), "out", p))
    r.data = dict(raw.get("data", {}))
    if "path" in r.data:
        r.data["path"] = _resolve(base, r.data["path"], "[data] path", p)
    r.data["images"] = [_resolve(base, d, "[data] images", p) for d in r.data.get("images", [])]
    r.split = dict(raw.get("split", {}))
    fr = r.split.get("fractions")
    if fr is not None and (abs(sum(fr) - 1) > 1e-6 or fr[1] <= 0):
        raise ConfigError(f"{p}: [split] fractions = {fr} must sum to 1 with a validation share above 0",
                          "training early-stops on the validation split; e.g. fractions = [0.7, 0.1, 0.2]")
    if "file" in r.split:
        r.split["file"] = _resolve(base, r.split["file"], "[split] file", p)
    r.ensemble = dict(raw.get("ensemble", {}))
    if "load" in r.ensemble:
        extra = set(r.ensemble) - {"load"}
        if extra:
            raise ConfigError(f"{p}: [ensemble] load = ... takes no training settings ({', '.join(sorted(extra))})",
                              "remove them, or remove load to train the ensemble")
        r.ensemble["load"] = _resolve(base, r.ensemble["load"], "[ensemble] load", p)
        if "file" not in r.split and not r.split and (r.ensemble["load"] / "split.csv").is_file():
            # a loaded ensemble was trained on its own split: any other would leak its training images
            r.split["file"] = r.ensemble["load"] / "split.csv"
    r.student = dict(raw.get("student", {}))
    if "load" in r.student:
        r.student["load"] = _resolve(base, r.student["load"], "[student] load", p)
    if r.student.get("report_on", "none") not in ("none", "val", "test"):
        raise ConfigError(f"{p}: [student] report_on must be none, val or test", "the bench reports on the test split")
    r.calibration = dict(raw.get("calibration", {}))
    if "file" in r.calibration:
        r.calibration["file"] = _resolve(base, r.calibration["file"], "[calibration] file", p)
    seen: set[str] = set()
    for i, t in enumerate(targets, 1):
        if not isinstance(t, dict):
            raise ConfigError(f"{p}: [[targets]] #{i} must be a table", 'e.g. [[targets]] target = "cpu"')
        _check_keys(t, "targets", p)
        _check_values(t, "targets", p)
        if "target" not in t:
            raise ConfigError(f"{p}: [[targets]] #{i} has no target", "set target = cpu | jetson | tflite")
        t = dict(t)
        t.setdefault("precision", "int8")
        t.setdefault("name", f"{t['target']}-{t['precision']}")
        if t["name"] in seen:
            raise ConfigError(f"{p}: two [[targets]] are named {t['name']!r}", "give one of them a different name = ...")
        seen.add(t["name"])
        _check_target(t, p)
        r.targets.append(t)
    r.compile_budget = dict(budgets.get("compile", {}))
    if r.compile_budget.get("on_miss", "fail") not in ("fail", "keep"):
        raise ConfigError(f"{p}: [budgets.compile] on_miss must be fail or keep",
                          "fail: a bundle that misses its budget is not written; keep: it is written marked FORCED")
    r.bench_budget = dict(budgets.get("bench", {}))
    r.bench = dict(raw.get("bench", {}))
    if r.bench.get("on", "test") not in ("test", "val"):
        raise ConfigError(f"{p}: [bench] on must be test or val", "report on test; tune on val")
    return r



def target_options(t: dict[str, Any]) -> dict[str, Any]:
    """A ``[[targets]]`` table's compile options (what is not its target, precision or name)."""
    return {k: v for k, v in t.items() if k not in ("target", "precision", "name")}
