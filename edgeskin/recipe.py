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
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import ConfigError, EdgeskinError
from .fileio import sha256_file, write_json
from .progress import NullReporter, Reporter
from .targets.options import OPTIONS as COMPILE_OPTIONS

STATE_VERSION = 1

# ----------------------------------------------------------------------------- the recipe file

_SECTIONS: dict[str, set[str]] = {
    "": {"name", "description", "out", "data", "split", "ensemble", "student", "calibration", "targets",
         "budgets", "bench"},
    "data": {"path", "images", "skip_bad"},
    "split": {"file", "seed", "fractions"},
    "ensemble": {"load", "preset", "members", "arch", "labels", "size", "epochs", "batch_size", "lr", "losses",
                 "focal_gamma", "pretrained", "freeze_epochs", "finetune_stages", "patience", "seed", "bf16",
                 "steps_per_epoch", "threads", "compute_device", "deterministic"},
    "student": {"load", "arch", "preset", "epochs", "batch_size", "lr", "temperature", "alpha", "loss",
                "focal_gamma", "init", "member", "augment", "pretrained", "patience", "seed", "bf16",
                "steps_per_epoch", "report_on", "latency_runs", "threads", "compute_device", "deterministic"},
    "calibration": {"file", "size", "seed", "force"},
    "targets": {"target", "precision", "name", *COMPILE_OPTIONS},  # plus every option `compile` takes
    "budgets": {"compile", "bench"},
    "budgets.compile": {"top1", "balanced", "mel_recall", "min_agreement", "on_miss"},
    "budgets.bench": {"top1", "balanced", "mel_recall", "max_latency_ms", "against", "device"},
    "bench": {"on", "runs", "min_samples", "min_seconds", "threads", "engine", "compute_device"},
}


@functools.lru_cache(maxsize=1)
def _value_specs() -> dict[str, dict[str, Any]]:
    """What every recipe value may be (type and range), per section: checked when the recipe is
    read (``--dry-run`` included), so a wrong value fails at once with its file and key named."""
    from .labels import LABEL_SETS
    from .models.arch import ARCHS
    from .train.config import PRESETS
    from .train.distill import INITS
    from .train.losses import LOSSES
    from .validate import AnyOf, Bool, Int, ListOf, Num, Str, choices

    text, flag = Str(), Bool()
    training = {
        "preset": choices(PRESETS), "arch": choices(ARCHS), "labels": choices(LABEL_SETS), "size": Int(32, 4096),
        "epochs": Int(1, 100_000), "batch_size": Int(1, 65_536), "lr": Num(0, 10), "focal_gamma": Num(0, 100),
        "pretrained": text, "freeze_epochs": Int(0, 100_000), "finetune_stages": AnyOf((choices(("auto", "all")), Int(0, 100))),
        "patience": Int(1, 100_000), "seed": Int(0, 2**63 - 1), "bf16": choices(("auto", "on", "off")),
        "steps_per_epoch": Int(1, 10**9), "threads": Int(1, 4096), "compute_device": text, "deterministic": flag,
    }
    points = Num(-100, 100)
    return {
        "": {"name": text, "description": Str(), "out": text},
        "data": {"path": text, "images": ListOf(text), "skip_bad": flag},
        "split": {"file": text, "seed": Int(0, 2**63 - 1), "fractions": ListOf(Num(0, 1), 3)},
        "ensemble": {**training, "load": text, "members": Int(1, 1000),
                     "losses": AnyOf((choices(LOSSES), ListOf(choices(LOSSES))))},
        "student": {**training, "load": text, "loss": choices(LOSSES), "temperature": Num(0, 1000, lo_open=True),
                    "alpha": Num(0, 1), "init": choices(INITS), "member": text, "augment": flag,
                    "report_on": choices(("none", "val", "test")), "latency_runs": Int(0, 10**6)},
        "calibration": {"file": text, "size": Int(1, 10**6), "seed": Int(0, 2**63 - 1), "force": flag},
        "budgets.compile": {"top1": points, "balanced": points, "mel_recall": points, "min_agreement": Num(0, 1),
                            "on_miss": choices(("fail", "keep"))},
        "budgets.bench": {"top1": points, "balanced": points, "mel_recall": points,
                          "max_latency_ms": Num(0, 10**7, lo_open=True), "against": choices(("auto", "student", "ensemble")),
                          "device": text},
        "bench": {"on": choices(("test", "val")), "runs": Int(1, 10**7), "min_samples": Int(1, 10**7),
                  "min_seconds": Num(0, 86_400), "threads": Int(1, 4096),
                  "engine": choices(("auto", "tensorrt", "onnxruntime")), "compute_device": text},
        "targets": {"target": text, "precision": text, "name": text},
    }


def _check_values(table: dict[str, Any], section: str, where: Path) -> None:
    from .validate import check_table

    check_table(table, _value_specs()[section], where=str(where), prefix=f"[{section}] " if section else "")


def _check_keys(table: dict[str, Any], section: str, where: Path) -> None:
    allowed = _SECTIONS[section]
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
    from .targets import get_target
    from .targets.options import compile_kwargs

    label = f"{where} [[targets]] {t['name']}"
    try:
        tg = get_target(str(t["target"]))
        tg.check_precision(str(t["precision"]))
        kw = compile_kwargs(tg, str(t["target"]), _target_options(t), where=label)
        if kw.get("device"):
            from .profiles import get_profile

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


# ----------------------------------------------------------------------------- keys and state

def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def data_fingerprint(dataset: Any) -> str:
    """Content of the data set as the pipeline sees it: every sample's id, lesion, label and
    image file size. Moving the folder keeps the fingerprint; editing a label or an image changes it."""
    h = hashlib.sha256()
    for s in sorted(dataset.samples, key=lambda s: s.image_id):
        h.update(f"{s.image_id},{s.lesion_id},{s.dx},{os.path.getsize(s.path)}\n".encode())
    return h.hexdigest()


def folder_fingerprint(path: Path) -> str:
    """sha256 over every file of a model folder (names and contents)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file() and not any(
        part.startswith(".") for part in f.relative_to(path).parts))
    for f in files:
        h.update(f"{f.name}:{sha256_file(f)}\n".encode())
    return h.hexdigest()


class _Lock:
    """``OUT/.recipe/lock``: one run per output folder at a time (a stale lock from a process
    that is gone is taken over)."""

    def __init__(self, out: Path) -> None:
        self.path = out / ".recipe" / "lock"

    def __enter__(self) -> "_Lock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                    os.kill(pid, 0)
                except (ValueError, ProcessLookupError, FileNotFoundError):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                except PermissionError:
                    pass
                raise ConfigError(f"{self.path.parent.parent}: another `edgeskin run` (pid {pid}) is using this folder",
                                  "wait for it to finish, or use another --out") from None
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self
        raise ConfigError(f"{self.path}: cannot take the run lock", "remove the file if no run is going on")

    def __exit__(self, *exc: Any) -> None:
        self.path.unlink(missing_ok=True)


class State:
    """``OUT/.recipe/state.json``: per stage, its key, status and timings (written atomically)."""

    def __init__(self, out: Path) -> None:
        self.path = out / ".recipe" / "state.json"
        self.stages: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                if data.get("version") == STATE_VERSION:
                    self.stages = data.get("stages", {})
            except (OSError, json.JSONDecodeError):
                self.stages = {}  # unreadable: every stage is checked again (keys decide)

    def save(self) -> None:
        write_json(self.path, {"version": STATE_VERSION, "stages": self.stages})

    def get(self, name: str) -> dict[str, Any]:
        return self.stages.get(name, {})

    def set(self, name: str, **record: Any) -> None:
        self.stages[name] = record
        self.save()


# ----------------------------------------------------------------------------- stages

@dataclass
class StageOutcome:
    name: str
    status: str  # ran | skipped | failed | planned | up to date | failed before
    seconds: float = 0.0
    detail: str = ""


@dataclass
class RunResult:
    recipe: Recipe
    stages: list[StageOutcome]
    bundles: dict[str, Path]
    report: Any  # the bench's BenchReport (None if the bench did not run)
    breaches: list[str]
    failed: list[str]


@dataclass
class _Ctx:
    recipe: Recipe
    reporter: Reporter
    say: Callable[[str], None]
    dataset: Any = None
    data_key: str = ""
    data_source: str = ""
    split: Any = None
    keys: dict[str, str] = field(default_factory=dict)
    #: content fingerprint of each finished stage's output: what later stages' keys are made of
    fp: dict[str, str] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    _hashed: dict[Path, str] = field(default_factory=dict)

    def folder_fp(self, path: Path) -> str:
        """:func:`folder_fingerprint`, once per folder per run (a loaded model is read by its
        stage's key and again as that stage's output; finished folders do not change in a run)."""
        if path not in self._hashed:
            self._hashed[path] = folder_fingerprint(path)
        return self._hashed[path]


STAGE_ORDER = ("split", "ensemble", "student", "calibration")


def _needs_calibration(r: Recipe) -> bool:
    return any(t["precision"] == "int8" for t in r.targets)


def stage_names(r: Recipe) -> list[str]:
    names = list(STAGE_ORDER)
    if not _needs_calibration(r):
        names.remove("calibration")
    return names + [f"compile:{t['name']}" for t in r.targets] + ["bench"]


def _load_data(ctx: _Ctx, data: Path | None) -> None:
    from .data import load_dataset
    from .data.fetch import resolve_data_path

    path, source = resolve_data_path(data, ctx.recipe.data.get("path"))
    ctx.data_source = f"{path} ({source})"
    ctx.say(f"data: {ctx.data_source}")
    ctx.dataset = load_dataset(path, image_dirs=ctx.recipe.data.get("images") or None,
                               skip_bad=bool(ctx.recipe.data.get("skip_bad", False)))
    for item in ctx.dataset.skipped:
        ctx.say(f"skipped {item.where}: {item.reason}")
    ctx.data_key = data_fingerprint(ctx.dataset)


def _train_config(section: dict[str, Any], *, arch_default: str | None = None):  # noqa: ANN202
    from .train import TrainConfig, preset_settings

    given = {k: section.get(k) for k in ("arch", "labels", "size", "epochs", "batch_size", "lr", "focal_gamma",
                                         "freeze_epochs", "finetune_stages", "patience", "seed", "bf16",
                                         "steps_per_epoch", "loss")}
    given["arch"] = given["arch"] or arch_default
    kw = preset_settings(section.get("preset", "quick"), **given)
    if "pretrained" in section:
        p = section["pretrained"]
        kw["pretrained"] = None if p == "none" else p
    if section.get("augment") is False:
        kw["augment"] = None
    if "finetune_stages" in kw:
        kw["finetune_stages"] = str(kw["finetune_stages"])
    try:
        return TrainConfig(**kw)
    except TypeError as exc:
        raise ConfigError(f"bad training setting: {exc}", "see recipes/quick.toml for the keys") from None


def _compute(section: dict[str, Any], *, training: bool = True):  # noqa: ANN202
    """The section's compute device (``compute_device``: auto | cpu | cuda | cuda:N; ``[[targets]]``
    ``device`` names a device profile instead), resolved once: the same rule as ``--device``."""
    from .models.compute import resolve_compute

    return resolve_compute(str(section.get("compute_device", "auto")),
                           bf16=str(section.get("bf16", "auto")) if training else "off",
                           deterministic=bool(section.get("deterministic", False)), init_distributed=False)


def _compute_key(section: dict[str, Any]) -> dict[str, Any]:
    """What of the compute decision enters a training stage's key: the device kind and the
    *resolved* precision (``bf16 = "auto"`` resolves differently on different machines)."""
    c = _compute(section)
    return {"device": c.kind, "precision": c.precision, "deterministic": c.deterministic}


def _threads(section: dict[str, Any]) -> None:
    if section.get("threads"):
        import torch

        torch.set_num_threads(int(section["threads"]))


def _split_key(ctx: _Ctx) -> str:
    s = ctx.recipe.split
    if "file" in s:
        return _digest({"file": sha256_file(s["file"])})
    return _digest({"data": ctx.data_key, "seed": s.get("seed", 0), "fractions": s.get("fractions", [0.7, 0.1, 0.2])})


def _run_split(ctx: _Ctx, out: Path) -> None:
    from .data import make_split, read_split, write_split

    s = ctx.recipe.split
    if "file" in s:
        split = read_split(s["file"])
    else:
        fr = s.get("fractions", [0.7, 0.1, 0.2])
        if not (isinstance(fr, list) and len(fr) == 3):
            raise ConfigError(f"{ctx.recipe.path}: [split] fractions must be three numbers", "e.g. [0.7, 0.1, 0.2]")
        split = make_split(ctx.dataset, fractions=tuple(float(x) for x in fr), seed=int(s.get("seed", 0)))
    out.mkdir(parents=True, exist_ok=True)
    write_split(split, out / "split.csv")


def _ensemble_key(ctx: _Ctx) -> str:
    e = ctx.recipe.ensemble
    if "load" in e:
        if not e["load"].exists():
            raise ConfigError(f"{ctx.recipe.path}: [ensemble] load: {e['load']} not found",
                              "point load at a trained ensemble folder, or remove it to train one")
        return _digest({"load": ctx.folder_fp(e["load"])})
    cfg = _train_config(e)
    return _digest({"split": ctx.fp["split"], "data": ctx.data_key, "cfg": cfg.to_dict(),
                    "members": e.get("members", 3), "losses": e.get("losses"), "seed": e.get("seed", 0),
                    "compute": _compute_key(e)})


def _ensemble_dir(ctx: _Ctx) -> Path:
    e = ctx.recipe.ensemble
    return e["load"] if "load" in e else ctx.recipe.out / "ensemble"


def _run_ensemble(ctx: _Ctx, out: Path) -> None:
    from .train import train_ensemble

    e = ctx.recipe.ensemble
    if "load" in e:
        from .models import load_ensemble

        load_ensemble(e["load"])  # loads (and checks) every member now, not in a later stage
        return
    cfg = _train_config(e)
    _threads(e)
    members = int(e.get("members", 3))
    losses = e.get("losses")
    if isinstance(losses, str):
        losses = [losses] * members
    seed = int(e.get("seed", 0))
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ctx.recipe.out / "split.csv", out / "split.csv")
    ctx.say(f"training {members} × {cfg.arch} at {cfg.size} px, ≤{cfg.epochs} epochs each")
    compute = _compute(e)
    ctx.say(f"compute: {compute.describe()}")
    train_ensemble(cfg, dataset=ctx.dataset, split=ctx.split, out_dir=out, members=members, losses=losses,
                   seeds=[seed + i for i in range(members)], reporter=ctx.reporter,
                   skip_bad=bool(ctx.recipe.data.get("skip_bad", False)), compute=compute)


def _student_cfg(ctx: _Ctx):  # noqa: ANN202
    from .train import DistillConfig

    st = ctx.recipe.student
    tcfg = _train_config(st, arch_default="resnet50")
    return DistillConfig(train=tcfg, temperature=float(st.get("temperature", 4.0)), alpha=float(st.get("alpha", 0.7)),
                         init=st.get("init", "auto"), member=st.get("member"),
                         member_lr_factor=None if "lr" in st else 1 / 3)


def _student_key(ctx: _Ctx) -> str:
    st = ctx.recipe.student
    if "load" in st:
        return _digest({"load": ctx.folder_fp(st["load"])})
    cfg = _student_cfg(ctx)
    return _digest({"ensemble": ctx.fp["ensemble"], "split": ctx.fp["split"], "data": ctx.data_key,
                    "cfg": cfg.__dict__ | {"train": cfg.train.to_dict()},
                    "report_on": st.get("report_on", "none"), "compute": _compute_key(st)})


def _student_path(ctx: _Ctx) -> Path:
    st = ctx.recipe.student
    return st["load"] if "load" in st else ctx.recipe.out / "student" / "student.json"


def _run_student(ctx: _Ctx, out: Path) -> None:
    from .train import distill

    st = ctx.recipe.student
    if "load" in st:
        from .targets.prepare import select_member

        select_member(st["load"], None)  # one model, loadable, its hash checked: now, not at compile
        return
    cfg = _student_cfg(ctx)
    _threads(st)
    report_on = st.get("report_on", "none")
    ctx.say(f"distilling the ensemble into {cfg.train.arch} (T={cfg.temperature}, alpha={cfg.alpha}, "
            f"≤{cfg.train.epochs} epochs)")
    compute = _compute(st)
    ctx.say(f"compute: {compute.describe()}")
    distill(_ensemble_dir(ctx), cfg, dataset=ctx.dataset, split=ctx.split, out_dir=out,
            report_split=None if report_on == "none" else report_on, latency_runs=int(st.get("latency_runs", 0)),
            reporter=ctx.reporter, skip_bad=bool(ctx.recipe.data.get("skip_bad", False)), compute=compute)


def _calibration_key(ctx: _Ctx) -> str:
    c = ctx.recipe.calibration
    if "file" in c:
        return _digest({"file": sha256_file(c["file"])})
    return _digest({"split": ctx.fp["split"], "data": ctx.data_key, "size": c.get("size", 512),
                    "seed": c.get("seed", 0), "force": bool(c.get("force", False))})


def _run_calibration(ctx: _Ctx, out: Path) -> None:
    from .calibration import make_calibration_set, read_calibration_set, write_calibration_set

    c = ctx.recipe.calibration
    out.mkdir(parents=True, exist_ok=True)
    if "file" in c:
        cal = read_calibration_set(c["file"])
    else:
        cal = make_calibration_set(ctx.dataset, ctx.split, size=int(c.get("size", 512)), seed=int(c.get("seed", 0)),
                                   force=bool(c.get("force", False)))
        if cal.manifest.get("forced"):
            ctx.say(f"calibration forced: {'; '.join(cal.manifest['forced_reasons'])}")
    write_calibration_set(cal, out)


def _calibration_file(ctx: _Ctx) -> Path:
    files = sorted((ctx.recipe.out / "calibration").glob("*.json"))
    if len(files) != 1:
        raise ConfigError(f"{ctx.recipe.out / 'calibration'}: expected one calibration manifest, found {len(files)}",
                          "run the recipe again (the calibration stage rewrites the folder)")
    return files[0]


def _compile_budget(ctx: _Ctx):  # noqa: ANN202
    from .targets import Budget

    b = {k: v for k, v in ctx.recipe.compile_budget.items() if k != "on_miss"}
    try:
        return Budget(**{k: float(v) for k, v in b.items()})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{ctx.recipe.path}: [budgets.compile]: {exc}", "numbers: points, and a fraction for min_agreement") from None


def _target_options(t: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in t.items() if k not in ("target", "precision", "name")}


def _compile_key(ctx: _Ctx, t: dict[str, Any]) -> str:
    from . import __version__
    from .targets import get_target
    from .targets.options import compile_kwargs, describe

    resolved = describe(compile_kwargs(get_target(t["target"]), t["target"], _target_options(t)))
    return _digest({"student": ctx.fp["student"], "split": ctx.fp["split"], "data": ctx.data_key,
                    "calibration": ctx.fp.get("calibration") if t["precision"] == "int8" else None,
                    "target": t, "options": resolved, "budget": ctx.recipe.compile_budget, "edgeskin": __version__})


def _run_compile(ctx: _Ctx, t: dict[str, Any], out: Path) -> None:
    from .calibration import read_calibration_set
    from .targets import get_target
    from .targets.options import compile_kwargs

    tg = get_target(t["target"])
    tg.check_precision(t["precision"])
    kw = compile_kwargs(tg, t["target"], _target_options(t), where=f"{ctx.recipe.path} [[targets]] {t['name']}")
    cal = read_calibration_set(_calibration_file(ctx)) if t["precision"] == "int8" else None
    keep = ctx.recipe.compile_budget.get("on_miss", "fail") == "keep"
    res = tg.compile(_student_path(ctx), precision=t["precision"], dataset=ctx.dataset, split=ctx.split,
                     out=out, calibration=cal, budget=_compile_budget(ctx), force=keep, overwrite=True,
                     threads=ctx.recipe.bench.get("threads"), reporter=ctx.reporter, **kw)
    c = res.check
    ctx.say(f"{t['name']}: agreement with FP32 on val {100 * c['top1_agreement']:.1f}%, top-1 drop "
            f"{c['drops_points']['top1']:.2f}, balanced drop {c['drops_points']['balanced']:.2f} points"
            + (" (FORCED past its budget: on_miss = keep)" if res.forced else ""))


def _bench_key(ctx: _Ctx) -> str:
    return _digest({"ensemble": ctx.fp["ensemble"], "student": ctx.fp["student"],
                    "bundles": {t["name"]: ctx.fp.get(f"compile:{t['name']}") for t in ctx.recipe.targets},
                    "bench": ctx.recipe.bench, "budget": ctx.recipe.bench_budget})


def bench_budget(r: Recipe):  # noqa: ANN201
    from .bench import BenchBudget

    b = r.bench_budget
    profile = None
    if b.get("device"):
        from .profiles import get_profile

        profile = get_profile(b["device"])
    drops = ",".join(f"{k}={b[k]}" for k in ("top1", "balanced", "mel_recall") if k in b)
    return BenchBudget.parse(drops or None, b.get("max_latency_ms"), against=b.get("against", "auto"), profile=profile)


def _run_bench(ctx: _Ctx, out: Path) -> Any:
    import tempfile

    from .bench import compile_failed_row, export_reference_models, reference_from_models, run_bench
    from .bench.report import write_reports

    r = ctx.recipe
    on = r.bench.get("on", "test")
    threads = r.bench.get("threads")
    ref = reference_from_models(_ensemble_dir(ctx), dataset=ctx.dataset, split=ctx.split, split_name=on,
                                student=_student_path(ctx), threads=threads, reporter=ctx.reporter,
                                compute=_compute(r.bench, training=False))
    out.mkdir(parents=True, exist_ok=True)
    ref.save(out / f"reference-{on}.npz")
    exports = tempfile.TemporaryDirectory(prefix="edgeskin-reference-")
    bundles, extra = [], []
    for t in r.targets:
        b = r.out / "bundles" / f"{t['name']}.edgeskin"
        if b.is_dir():
            bundles.append(b)
        else:
            why = ctx.results.get(f"compile:{t['name']}", "no bundle")
            extra.append(compile_failed_row(t["target"], t["precision"], why))
    try:
        models = export_reference_models(_ensemble_dir(ctx), _student_path(ctx), exports.name)
        report = run_bench(ref, bundles, dataset=ctx.dataset, budget=bench_budget(r),
                           config=bench_config(r), extra_rows=extra, reporter=ctx.reporter, reference_models=models)
    finally:
        exports.cleanup()
    write_reports(report, out)
    return report


def bench_config(r: Recipe):  # noqa: ANN201
    """The recipe's [bench] timing settings (``runs`` is the older name of ``min_samples``)."""
    from .bench import BenchConfig

    b = r.bench
    return BenchConfig(threads=b.get("threads"), min_samples=int(b.get("min_samples", b.get("runs", 1000))),
                       min_seconds=float(b.get("min_seconds", 10.0)), engine=b.get("engine", "auto"))


# ----------------------------------------------------------------------------- the runner

def _clear(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def plan(recipe: Recipe, *, data: Path | None = None, reporter: Reporter | None = None,
         say: Callable[[str], None] | None = None) -> list[StageOutcome]:
    """What :func:`run` would do now, without doing it."""
    return run(recipe, data=data, reporter=reporter, say=say, dry_run=True).stages


def run(recipe: Recipe, *, dry_run: bool = False, **kw: Any) -> RunResult:
    """Run every stage of ``recipe`` that is not up to date; see the module docstring and
    :func:`_run` for the options. One run per output folder at a time."""
    if dry_run:
        return _run(recipe, dry_run=True, **kw)
    with _Lock(recipe.out):
        return _run(recipe, dry_run=False, **kw)


def _run(
    recipe: Recipe,
    *,
    data: Path | None = None,
    until: str | None = None,
    redo: Iterable[str] = (),
    dry_run: bool = False,
    reporter: Reporter | None = None,
    say: Callable[[str], None] | None = None,
) -> RunResult:
    """Run every stage of ``recipe`` that is not up to date; see the module docstring.

    ``until``: stop after this stage. ``redo``: stages to run again even if up to date.
    ``dry_run``: only report which stages would run. A compile that misses its budget (with
    ``on_miss = "fail"``) is recorded as failed, the other stages go on, and the result lists it.
    """
    from .data import read_split

    r = recipe
    say = say or (lambda s: None)
    ctx = _Ctx(recipe=r, reporter=reporter or NullReporter(), say=say)
    names = stage_names(r)
    redo = set(redo)
    for n in [*redo, *([until] if until else [])]:
        if n not in names and n != "compile":
            raise ConfigError(f"unknown stage {n!r}", f"stages of this recipe: {', '.join(names)}")
    if "compile" in redo:
        redo |= {n for n in names if n.startswith("compile:")}
    if not dry_run:
        r.out.mkdir(parents=True, exist_ok=True)
    state = State(r.out)
    _load_data(ctx, data)
    if not dry_run:
        write_json(r.out / ".recipe" / "recipe.json", {"path": str(r.path), "raw": r.raw})
        shutil.copyfile(r.path, r.out / "recipe.toml")

    outputs: dict[str, Path] = {"split": r.out / "split.csv", "ensemble": r.out / "ensemble",
                                "student": r.out / "student", "calibration": r.out / "calibration",
                                "bench": r.out / "bench"}
    for t in r.targets:
        outputs[f"compile:{t['name']}"] = r.out / "bundles" / f"{t['name']}.edgeskin"

    def key_of(name: str) -> str:
        if name == "split":
            return _split_key(ctx)
        if name == "ensemble":
            return _ensemble_key(ctx)
        if name == "student":
            return _student_key(ctx)
        if name == "calibration":
            return _calibration_key(ctx)
        if name == "bench":
            return _bench_key(ctx)
        return _compile_key(ctx, next(t for t in r.targets if f"compile:{t['name']}" == name))

    def produced(name: str) -> bool:
        if name == "ensemble" and "load" in r.ensemble or name == "student" and "load" in r.student:
            return True
        return (outputs[name] / "report.json" if name == "bench" else outputs[name]).exists()

    def deps(name: str) -> list[str]:
        if name in ("ensemble", "calibration"):
            return ["split"]
        if name == "student":
            return ["split", "ensemble"]
        if name == "bench":
            return ["ensemble", "student", *[n for n in names if n.startswith("compile:")]]
        if name.startswith("compile:"):
            return [n for n in ("split", "student", "calibration") if n in names]
        return []

    def fingerprint(name: str) -> str:
        """What later stages see of this stage: the content of what it made."""
        if name == "split":
            return sha256_file(outputs["split"])
        if name == "ensemble":
            return ctx.folder_fp(_ensemble_dir(ctx))
        if name == "student":
            return ctx.folder_fp(_student_path(ctx).parent if "load" not in r.student else r.student["load"])
        if name == "calibration":
            return ctx.folder_fp(outputs["calibration"])
        manifest = outputs[name] / "manifest.json"
        return sha256_file(manifest) if manifest.is_file() else f"failed:{ctx.keys[name]}"

    outcomes: list[StageOutcome] = []
    failed: list[str] = []
    report: Any = None
    pending: set[str] = set()  # dry run: stages that would run, whose outputs are not known yet
    for i, name in enumerate(names, 1):
        waiting = [d for d in deps(name) if d in pending]
        if waiting:  # dry run only: this stage's inputs are made by a stage that has not run yet
            pending.add(name)
            outcomes.append(StageOutcome(name, "planned", detail=f"after {', '.join(waiting)}"))
            continue
        key = key_of(name)
        ctx.keys[name] = key
        rec = state.get(name)
        same = rec.get("key") == key
        if same and rec.get("status") == "done" and produced(name) and name not in redo:
            outcomes.append(StageOutcome(name, "up to date" if dry_run else "skipped", detail="inputs unchanged"))
            say(f"[{i}/{len(names)}] {name}: up to date, skipped")
            if name == "bench":
                from .bench.report import load_report

                report = load_report(outputs["bench"] / "report.json")
        elif same and rec.get("status") == "failed" and name not in redo:
            ctx.results[name] = rec.get("error", "failed")
            failed.append(f"{name}: {rec.get('error')}")
            outcomes.append(StageOutcome(name, "failed before", detail=rec.get("error", "")))
            say(f"[{i}/{len(names)}] {name}: failed before with the same inputs ({rec.get('error')}); "
                f"--redo {name} tries again")
        elif dry_run:
            why = ("interrupted: resumes" if same and rec.get("status") == "running" else
                   "asked to redo" if name in redo else "inputs changed" if rec else "not run yet")
            outcomes.append(StageOutcome(name, "planned", detail=why))
            pending.add(name)
            continue
        else:
            resume = same and rec.get("status") == "running" and name not in redo
            if not resume and outputs[name].exists():
                _clear(outputs[name])  # inputs changed (or a redo): never mix old and new work
            say(f"[{i}/{len(names)}] {name}: " + ("resuming (interrupted before)" if resume else "running"))
            state.set(name, key=key, status="running", started=time.time())
            t0 = time.perf_counter()
            try:
                if name == "split":
                    _run_split(ctx, r.out)
                elif name == "ensemble":
                    _run_ensemble(ctx, outputs[name])
                elif name == "student":
                    _run_student(ctx, outputs[name])
                elif name == "calibration":
                    _run_calibration(ctx, outputs[name])
                elif name == "bench":
                    report = _run_bench(ctx, outputs[name])
                else:
                    t = next(t for t in r.targets if f"compile:{t['name']}" == name)
                    _run_compile(ctx, t, outputs[name])
            except EdgeskinError as exc:
                if not name.startswith("compile:"):
                    raise  # the stage stays "running": fix the cause and run again to resume
                secs = time.perf_counter() - t0
                ctx.results[name] = exc.message
                failed.append(f"{name}: {exc.message}")
                state.set(name, key=key, status="failed", error=exc.message, seconds=round(secs, 1))
                outcomes.append(StageOutcome(name, "failed", secs, exc.message))
                say(f"[{i}/{len(names)}] {name}: FAILED ({exc.message})")
            else:
                secs = time.perf_counter() - t0
                state.set(name, key=key, status="done", seconds=round(secs, 1), finished=time.time())
                outcomes.append(StageOutcome(name, "ran", secs))
                say(f"[{i}/{len(names)}] {name}: done in {secs:.0f} s")
        if name != "bench":
            ctx.fp[name] = fingerprint(name)
        if name == "split" and not dry_run:
            ctx.split = read_split(outputs["split"])
        if until and name == until:
            break
    bundles = {t["name"]: outputs[f"compile:{t['name']}"] for t in r.targets if outputs[f"compile:{t['name']}"].is_dir()}
    breaches = list(report.breaches) if report is not None else []
    if report is not None:  # a bundle that could not be loaded or run fails the run too
        from .bench import failed_rows

        failed += [f"bench: {m}" for m in failed_rows(report) if ": compile: " not in m]
    if not dry_run:
        write_json(r.out / "run.json", {
            "recipe": str(r.path), "name": r.name, "data": ctx.data_source,
            "stages": [o.__dict__ for o in outcomes], "keys": ctx.keys, "fingerprints": ctx.fp,
            "bundles": {k: str(v.relative_to(r.out)) for k, v in bundles.items()}, "failed": failed,
            "breaches": breaches})
    return RunResult(recipe=r, stages=outcomes, bundles=bundles, report=report, breaches=breaches, failed=failed)
