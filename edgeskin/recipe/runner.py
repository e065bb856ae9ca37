"""Running a recipe: walk its stage table (:mod:`edgeskin.recipe.stages`), skip the stages whose
key matches a finished record, resume an interrupted one, start a changed one from an empty folder."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from ..errors import ConfigError, EdgeskinError
from ..fileio import write_json
from ..progress import NullReporter, Reporter
from .schema import Recipe
from .stages import Context, stages
from .state import RunLock, State, data_fingerprint


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


def _clear(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _load_data(ctx: Context, data: Path | None) -> None:
    from ..data import load_dataset
    from ..data.fetch import resolve_data_path

    path, source = resolve_data_path(data, ctx.recipe.data.get("path"))
    ctx.data_source = f"{path} ({source})"
    ctx.say(f"data: {ctx.data_source}")
    ctx.dataset = load_dataset(path, image_dirs=ctx.recipe.data.get("images") or None,
                               skip_bad=bool(ctx.recipe.data.get("skip_bad", False)))
    for item in ctx.dataset.skipped:
        ctx.say(f"skipped {item.where}: {item.reason}")
    ctx.data_key = data_fingerprint(ctx.dataset)


def plan(recipe: Recipe, *, data: Path | None = None, reporter: Reporter | None = None,
         say: Callable[[str], None] | None = None) -> list[StageOutcome]:
    """What :func:`run` would do now, without doing it."""
    return run(recipe, data=data, reporter=reporter, say=say, dry_run=True).stages


def run(recipe: Recipe, *, dry_run: bool = False, **kw: Any) -> RunResult:
    """Run every stage of ``recipe`` that is not up to date; see :func:`_run` for the options.
    One run per output folder at a time."""
    if dry_run:
        return _run(recipe, dry_run=True, **kw)
    with RunLock(recipe.out):
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
    """Run every stage of ``recipe`` that is not up to date.

    ``until``: stop after this stage. ``redo``: stages to run again even if up to date.
    ``dry_run``: only report which stages would run. A compile that misses its budget (with
    ``on_miss = "fail"``) is recorded as failed, the other stages go on, and the result lists it.
    """
    r = recipe
    say = say or (lambda s: None)
    ctx = Context(recipe=r, reporter=reporter or NullReporter(), say=say)
    table = stages(r)
    names = [s.name for s in table]
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

    outcomes: list[StageOutcome] = []
    failed: list[str] = []
    pending: set[str] = set()  # dry run: stages that would run, whose outputs are not known yet
    for i, st in enumerate(table, 1):
        name, out = st.name, st.output(r)
        step = f"[{i}/{len(table)}] {name}"
        waiting = [d for d in st.deps if d in pending]
        if waiting:  # dry run only: this stage's inputs are made by a stage that has not run yet
            pending.add(name)
            outcomes.append(StageOutcome(name, "planned", detail=f"after {', '.join(waiting)}"))
            continue
        key = st.key(ctx)
        ctx.keys[name] = key
        rec = state.get(name)
        same = rec.get("key") == key
        if same and rec.get("status") == "done" and st.produced(ctx, out) and name not in redo:
            detail = st.note(ctx, out) if st.note is not None else "inputs unchanged"
            outcomes.append(StageOutcome(name, "up to date" if dry_run else "skipped", detail=detail))
            say(f"{step}: up to date, skipped")
        elif same and rec.get("status") == "failed" and name not in redo:
            ctx.results[name] = rec.get("error", "failed")
            failed.append(f"{name}: {rec.get('error')}")
            outcomes.append(StageOutcome(name, "failed before", detail=rec.get("error", "")))
            say(f"{step}: failed before with the same inputs ({rec.get('error')}); --redo {name} tries again")
        elif dry_run:
            why = ("interrupted: resumes" if same and rec.get("status") == "running" else
                   "asked to redo" if name in redo else "inputs changed" if rec else "not run yet")
            outcomes.append(StageOutcome(name, "planned", detail=why))
            pending.add(name)
            continue
        else:
            resume = same and rec.get("status") == "running" and name not in redo
            if not resume and out.exists():
                _clear(out)  # inputs changed (or a redo): never mix old and new work
            say(f"{step}: " + ("resuming (interrupted before)" if resume else "running"))
            state.set(name, key=key, status="running", started=time.time())
            t0 = time.perf_counter()
            try:
                detail = st.run(ctx, out) or ""
            except EdgeskinError as exc:
                if not st.may_fail:
                    raise  # the stage stays "running": fix the cause and run again to resume
                secs = time.perf_counter() - t0
                ctx.results[name] = exc.message
                failed.append(f"{name}: {exc.message}")
                state.set(name, key=key, status="failed", error=exc.message, seconds=round(secs, 1))
                outcomes.append(StageOutcome(name, "failed", secs, exc.message))
                say(f"{step}: FAILED ({exc.message})")
            else:
                secs = time.perf_counter() - t0
                state.set(name, key=key, status="done", seconds=round(secs, 1), finished=time.time())
                outcomes.append(StageOutcome(name, "ran", secs, detail))
                say(f"{step}: done in {secs:.0f} s")
        if st.fingerprint is not None:
            ctx.fp[name] = st.fingerprint(ctx, out)
        if st.after is not None and not dry_run and name not in ctx.results:
            st.after(ctx, out)
        if until and name == until:
            break
    compiled = {t["name"]: r.out / "bundles" / f"{t['name']}.edgeskin" for t in r.targets}
    bundles = {k: v for k, v in compiled.items() if v.is_dir()}
    report = ctx.report
    breaches = list(report.breaches) if report is not None else []
    if report is not None:  # a bundle that could not be loaded or run fails the run too
        from ..bench import failed_rows

        failed += [f"bench: {m}" for m in failed_rows(report) if ": compile: " not in m]
    if not dry_run:
        write_json(r.out / "run.json", {
            "recipe": str(r.path), "name": r.name, "data": ctx.data_source,
            "stages": [o.__dict__ for o in outcomes], "keys": ctx.keys, "fingerprints": ctx.fp,
            "bundles": {k: str(v.relative_to(r.out)) for k, v in bundles.items()}, "failed": failed,
            "breaches": breaches})
    return RunResult(recipe=r, stages=outcomes, bundles=bundles, report=report, breaches=breaches, failed=failed)
