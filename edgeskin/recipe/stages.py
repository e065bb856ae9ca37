"""The stages of a recipe, as one table: each :class:`Stage` declares once what it reads (its
dependencies), what it writes (its output), its key (the digest of its settings and of the
fingerprints of what it reads), how it runs and what later stages see of it (its fingerprint).
The runner (:mod:`edgeskin.recipe.runner`) only walks this table.

The order is the pipeline's::

    split -> ensemble -> student -> calibration -> compile:<target> ... -> bench
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import settings as S
from ..errors import ConfigError
from ..fileio import sha256_file
from ..progress import Reporter
from .schema import Recipe, target_options
from .state import digest, folder_fingerprint


@dataclass
class Context:
    """What the stages of one run share."""

    recipe: Recipe
    reporter: Reporter
    say: Callable[[str], None]
    dataset: Any = None
    data_key: str = ""
    data_source: str = ""
    split: Any = None
    report: Any = None  # the bench's report, once the bench stage ran or was skipped
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


@dataclass(frozen=True)
class Stage:
    """One stage. ``deps``: the stages whose output it reads (those absent from this recipe are
    ignored). ``output``: what it writes, under the recipe's out folder. ``key``: its inputs'
    digest. ``run``: does the work into ``output``. ``fingerprint``: what later stages see of its
    output (None: nothing reads it). ``produced``: its output is there (loaded models always are).
    ``after``: called once the stage is done or skipped as up to date (not in a dry run).
    ``may_fail``: a failure is recorded and the run goes on (a compile that misses its budget).
    ``note``: a line on an output that is up to date and skipped."""

    name: str
    deps: tuple[str, ...]
    output: Callable[[Recipe], Path]
    key: Callable[[Context], str]
    run: Callable[[Context, Path], str | None]
    fingerprint: Callable[[Context, Path], str] | None = None
    produced: Callable[[Context, Path], bool] = lambda ctx, out: out.exists()
    after: Callable[[Context, Path], None] | None = None
    may_fail: bool = False
    #: what the stage table says of an up-to-date output (e.g. a bundle written FORCED)
    note: Callable[[Context, Path], str] | None = None


# ----------------------------------------------------------------------------- split

def _split_key(ctx: Context) -> str:
    s = ctx.recipe.split
    if "file" in s:
        return digest({"file": sha256_file(s["file"])})
    return digest({"data": ctx.data_key, "seed": s.get("seed", 0), "fractions": s.get("fractions", [0.7, 0.1, 0.2])})


def _run_split(ctx: Context, out: Path) -> None:
    from ..data import make_split, read_split, write_split

    s = ctx.recipe.split
    if "file" in s:
        split = read_split(s["file"])
    else:
        fr = s.get("fractions", [0.7, 0.1, 0.2])
        if not (isinstance(fr, list) and len(fr) == 3):
            raise ConfigError(f"{ctx.recipe.path}: [split] fractions must be three numbers", "e.g. [0.7, 0.1, 0.2]")
        split = make_split(ctx.dataset, fractions=tuple(float(x) for x in fr), seed=int(s.get("seed", 0)))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_split(split, out)


def _read_split(ctx: Context, out: Path) -> None:
    from ..data import read_split

    ctx.split = read_split(out)


# ----------------------------------------------------------------------------- ensemble

def _compute_key(section: dict[str, Any]) -> dict[str, Any]:
    """What of the compute decision enters a training stage's key: the device kind and the
    *resolved* precision (``bf16 = "auto"`` resolves differently on different machines)."""
    c = S.compute(section, init_distributed=False)
    return {"device": c.kind, "precision": c.precision, "deterministic": c.deterministic}


def ensemble_dir(ctx: Context) -> Path:
    e = ctx.recipe.ensemble
    return e["load"] if "load" in e else ctx.recipe.out / "ensemble"


def _ensemble_key(ctx: Context) -> str:
    e = ctx.recipe.ensemble
    if "load" in e:
        if not e["load"].exists():
            raise ConfigError(f"{ctx.recipe.path}: [ensemble] load: {e['load']} not found",
                              "point load at a trained ensemble folder, or remove it to train one")
        return digest({"load": ctx.folder_fp(e["load"])})
    cfg = S.train_config(e, where=S.RECIPE)
    return digest({"split": ctx.fp["split"], "data": ctx.data_key, "cfg": cfg.to_dict(),
                   "members": e.get("members", 3), "losses": e.get("losses"), "seed": e.get("seed", 0),
                   "compute": _compute_key(e)})


def _run_ensemble(ctx: Context, out: Path) -> None:
    from ..train import train_ensemble

    e = ctx.recipe.ensemble
    if "load" in e:
        from ..models import load_ensemble

        load_ensemble(e["load"])  # loads (and checks) every member now, not in a later stage
        return
    cfg = S.train_config(e, where=S.RECIPE)
    S.apply_threads(e)
    members = int(e.get("members", 3))
    seed = int(e.get("seed", 0))
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ctx.recipe.out / "split.csv", out / "split.csv")
    ctx.say(f"training {members} × {cfg.arch} at {cfg.size} px, ≤{cfg.epochs} epochs each")
    compute = S.compute(e, init_distributed=False)
    ctx.say(f"compute: {compute.describe()}")
    train_ensemble(cfg, dataset=ctx.dataset, split=ctx.split, out_dir=out, members=members,
                   losses=S.member_losses(e, members), seeds=[seed + i for i in range(members)],
                   reporter=ctx.reporter, skip_bad=bool(ctx.recipe.data.get("skip_bad", False)), compute=compute)


# ----------------------------------------------------------------------------- student

def student_path(ctx: Context) -> Path:
    st = ctx.recipe.student
    return st["load"] if "load" in st else ctx.recipe.out / "student" / "student.json"


def _student_key(ctx: Context) -> str:
    st = ctx.recipe.student
    if "load" in st:
        return digest({"load": ctx.folder_fp(st["load"])})
    cfg = S.distill_config(st, where=S.RECIPE)
    return digest({"ensemble": ctx.fp["ensemble"], "split": ctx.fp["split"], "data": ctx.data_key,
                   "cfg": cfg.to_dict(),
                   "report_on": st.get("report_on", "none"), "compute": _compute_key(st)})


def _run_student(ctx: Context, out: Path) -> None:
    from ..train import distill

    st = ctx.recipe.student
    if "load" in st:
        from ..targets.prepare import select_member

        select_member(st["load"], None)  # one model, loadable, its hash checked: now, not at compile
        return
    cfg = S.distill_config(st, where=S.RECIPE)
    v = S.values((S.training(), S.student()), st, S.RECIPE)
    S.apply_threads(st)
    ctx.say(f"distilling the ensemble into {cfg.train.arch} (T={cfg.temperature}, alpha={cfg.alpha}, "
            f"≤{cfg.train.epochs} epochs)")
    compute = S.compute(st, init_distributed=False)
    ctx.say(f"compute: {compute.describe()}")
    distill(ensemble_dir(ctx), cfg, dataset=ctx.dataset, split=ctx.split, out_dir=out,
            report_split=None if v["report_on"] == "none" else v["report_on"], latency_runs=int(v["latency_runs"]),
            latency_threads=v["latency_threads"], reporter=ctx.reporter,
            skip_bad=bool(ctx.recipe.data.get("skip_bad", False)), compute=compute)


# ----------------------------------------------------------------------------- calibration

def _calibration_key(ctx: Context) -> str:
    c = ctx.recipe.calibration
    if "file" in c:
        return digest({"file": sha256_file(c["file"])})
    return digest({"split": ctx.fp["split"], "data": ctx.data_key, "size": c.get("size", 512),
                   "seed": c.get("seed", 0), "force": bool(c.get("force", False))})


def _run_calibration(ctx: Context, out: Path) -> None:
    from ..calibration import make_calibration_set, read_calibration_set, write_calibration_set

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


def _calibration_file(ctx: Context) -> Path:
    files = sorted((ctx.recipe.out / "calibration").glob("*.json"))
    if len(files) != 1:
        raise ConfigError(f"{ctx.recipe.out / 'calibration'}: expected one calibration manifest, found {len(files)}",
                          "run the recipe again (the calibration stage rewrites the folder)")
    return files[0]


# ----------------------------------------------------------------------------- compile

def compile_budget(r: Recipe):  # noqa: ANN201
    """The recipe's ``[budgets.compile]`` as the one budget type."""
    from ..budget import Budget

    return Budget.from_table({k: v for k, v in r.compile_budget.items() if k != "on_miss"},
                             where=f"{r.path}: [budgets.compile]")


def _small_split(check: dict[str, Any]) -> str:
    """The stage detail's note on budgets the validation split is too small to judge (warned at compile)."""
    small = [w.split(" ", 1)[0] for w in check.get("warnings") or []]
    return f" (val split small for the {', '.join(small)} budget{'s' if len(small) > 1 else ''})" if small else ""


def _compile_stage(t: dict[str, Any]) -> Stage:
    name = f"compile:{t['name']}"

    def key(ctx: Context) -> str:
        from .. import __version__
        from ..targets import get_target
        from ..targets.options import compile_kwargs, describe

        resolved = describe(compile_kwargs(get_target(t["target"]), t["target"], target_options(t)))
        return digest({"student": ctx.fp["student"], "split": ctx.fp["split"], "data": ctx.data_key,
                       "calibration": ctx.fp.get("calibration") if t["precision"] == "int8" else None,
                       "target": t, "options": resolved, "budget": ctx.recipe.compile_budget, "edgeskin": __version__})

    def run(ctx: Context, out: Path) -> str:
        from ..calibration import read_calibration_set
        from ..targets import get_target
        from ..targets.options import compile_kwargs

        tg = get_target(t["target"])
        tg.check_precision(t["precision"])
        kw = compile_kwargs(tg, t["target"], target_options(t), where=f"{ctx.recipe.path} [[targets]] {t['name']}")
        cal = read_calibration_set(_calibration_file(ctx)) if t["precision"] == "int8" else None
        keep = ctx.recipe.compile_budget.get("on_miss", "fail") == "keep"
        res = tg.compile(student_path(ctx), precision=t["precision"], dataset=ctx.dataset, split=ctx.split,
                         out=out, calibration=cal, budget=compile_budget(ctx.recipe), force=keep, overwrite=True,
                         threads=ctx.recipe.bench.get("threads"), reporter=ctx.reporter, **kw)
        from ..budget import check_summary

        c = res.check
        ctx.say(f"{t['name']}: vs FP32 on val, {check_summary(c)}"
                + (" (FORCED past its budget: on_miss = keep)" if res.forced else ""))
        return (("FORCED past its budget: " + "; ".join(c["failures"])) if res.forced else "within budget") \
            + _small_split(c)

    def fingerprint(ctx: Context, out: Path) -> str:
        manifest = out / "manifest.json"
        return sha256_file(manifest) if manifest.is_file() else f"failed:{ctx.keys[name]}"

    def note(ctx: Context, out: Path) -> str:
        acc = _accuracy(out)
        return (("FORCED past its budget: " + "; ".join(acc.get("failures", []))) if acc.get("forced") else
                "inputs unchanged; within budget") + _small_split(acc)

    return Stage(name, ("split", "student", "calibration"), lambda r: r.out / "bundles" / f"{t['name']}.edgeskin",
                 key, run, fingerprint, may_fail=True, note=note)


# ----------------------------------------------------------------------------- bench

def bench_budget(r: Recipe):  # noqa: ANN201
    """The recipe's ``[budgets.bench]``: its device profile's budget, with the table's keys on top."""
    from ..budget import METRICS, Budget

    b = r.bench_budget
    profile = None
    if b.get("device"):
        from ..profiles import get_profile

        profile = get_profile(b["device"])
    return Budget.parse({k: b[k] for k in METRICS if k in b}, max_latency_ms=b.get("max_latency_ms"),
                        against=b.get("against", "auto"), profile=profile, where=f"{r.path}: [budgets.bench]")


def bench_config(r: Recipe):  # noqa: ANN201
    """The recipe's [bench] timing settings."""
    return S.bench_config(r.bench, where=S.RECIPE)


def _bench_key(ctx: Context) -> str:
    return digest({"ensemble": ctx.fp["ensemble"], "student": ctx.fp["student"],
                   "bundles": {t["name"]: ctx.fp.get(f"compile:{t['name']}") for t in ctx.recipe.targets},
                   "bench": ctx.recipe.bench, "budget": ctx.recipe.bench_budget})


def _run_bench(ctx: Context, out: Path) -> None:
    import tempfile

    from ..bench import compile_failed_row, export_reference_models, reference_from_models, run_bench
    from ..bench.report import write_reports

    r = ctx.recipe
    on = r.bench.get("on", "test")
    threads = r.bench.get("threads")
    ref = reference_from_models(ensemble_dir(ctx), dataset=ctx.dataset, split=ctx.split, split_name=on,
                                student=student_path(ctx), threads=threads, reporter=ctx.reporter,
                                compute=S.compute(r.bench, training_run=False, init_distributed=False))
    out.mkdir(parents=True, exist_ok=True)
    ref.save(out / f"reference-{on}.npz")
    exports = tempfile.TemporaryDirectory(prefix="edgeskin-reference-")
    bundles, extra = [], []
    refuse_forced = r.compile_budget.get("on_miss", "fail") != "keep"
    for t in r.targets:
        b = r.out / "bundles" / f"{t['name']}.edgeskin"
        if b.is_dir() and refuse_forced and _forced(b):
            # on_miss = "fail": a bundle written past its budget (by an earlier on_miss = "keep" run)
            # is refused, as `edgeskin bench --refuse-forced` does
            extra.append(compile_failed_row(t["target"], t["precision"],
                                            "FORCED past its compile budget; refused (on_miss = fail)"))
        elif b.is_dir():
            bundles.append(b)
        else:
            why = ctx.results.get(f"compile:{t['name']}", "no bundle")
            extra.append(compile_failed_row(t["target"], t["precision"], why))
    try:
        models = export_reference_models(ensemble_dir(ctx), student_path(ctx), exports.name)
        report = run_bench(ref, bundles, dataset=ctx.dataset, budget=bench_budget(r),
                           config=bench_config(r), extra_rows=extra, reporter=ctx.reporter, reference_models=models)
    finally:
        exports.cleanup()
    write_reports(report, out)
    ctx.report = report


def _accuracy(bundle: Path) -> dict[str, Any]:
    """The compile check recorded in a bundle folder's manifest ({} without one)."""
    import json

    m = bundle / "manifest.json"
    return json.loads(m.read_text()).get("accuracy", {}) if m.is_file() else {}


def _forced(bundle: Path) -> bool:
    return bool(_accuracy(bundle).get("forced"))


def _load_report(ctx: Context, out: Path) -> None:
    """The report of a bench skipped as up to date (one that just ran left its report in ``ctx``)."""
    if ctx.report is None:
        from ..bench.report import load_report

        ctx.report = load_report(out / "report.json")


# ----------------------------------------------------------------------------- the table

def stages(r: Recipe) -> list[Stage]:
    """This recipe's stages, in the order they run (calibration only when a target is INT8)."""
    table = [
        Stage("split", (), lambda r: r.out / "split.csv", _split_key, _run_split,
              lambda ctx, out: sha256_file(out), after=_read_split),
        Stage("ensemble", ("split",), lambda r: r.out / "ensemble", _ensemble_key, _run_ensemble,
              lambda ctx, out: ctx.folder_fp(ensemble_dir(ctx)),
              produced=lambda ctx, out: "load" in ctx.recipe.ensemble or out.exists()),
        Stage("student", ("split", "ensemble"), lambda r: r.out / "student", _student_key, _run_student,
              lambda ctx, out: ctx.folder_fp(student_path(ctx).parent if "load" not in ctx.recipe.student
                                             else ctx.recipe.student["load"]),
              produced=lambda ctx, out: "load" in ctx.recipe.student or out.exists()),
    ]
    if any(t["precision"] == "int8" for t in r.targets):
        table.append(Stage("calibration", ("split",), lambda r: r.out / "calibration", _calibration_key,
                           _run_calibration, lambda ctx, out: ctx.folder_fp(out)))
    table += [_compile_stage(t) for t in r.targets]
    table.append(Stage("bench", ("ensemble", "student", *[f"compile:{t['name']}" for t in r.targets]),
                       lambda r: r.out / "bench", _bench_key, _run_bench,
                       produced=lambda ctx, out: (out / "report.json").exists(), after=_load_report))
    return table


def stage_names(r: Recipe) -> list[str]:
    return [s.name for s in stages(r)]
