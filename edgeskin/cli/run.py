"""``edgeskin run``: a pipeline recipe end to end."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from .common import (
    app,
    err,
    escape_markup,
    out,
    reporter,
)


@app.command("run")
def run_recipe(
    recipe: Path = typer.Argument(..., help="Recipe TOML file (see recipes/quick.toml)."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Data set; overrides the recipe's [data] path. Default: the recipe's, then $EDGESKIN_DATA, then the default folder."),
    output: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default: the recipe's out)."),
    until: Optional[str] = typer.Option(None, "--until", help="Stop after this stage (split, ensemble, student, calibration, compile:NAME, bench)."),
    redo: Optional[List[str]] = typer.Option(None, "--redo", help="Run this stage again even if it is up to date ('compile' = every compile). Repeatable."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only show which stages would run."),
) -> None:
    """Run a pipeline recipe end to end: split, ensemble, student, calibration, compile every
    target, bench. Stages whose inputs did not change are skipped; an interrupted run resumes.

    Bundles go to OUT/bundles/, the bench report to OUT/bench/ (report.md, report.json, plots).
    Exit code 4 when a bench budget is breached, 3 when a target failed to compile.
    """
    from ..recipe import load_recipe, run

    r = load_recipe(recipe, out=output)
    err.print(f"recipe {r.name} ({recipe}) -> {r.out}")
    res = run(r, data=data, until=until, redo=redo or (), dry_run=dry_run, reporter=reporter(),
              say=lambda text: err.print(escape_markup(text)))
    t = Table(title=f"Recipe {r.name}: stages" + (" (dry run)" if dry_run else ""))
    for col in ("stage", "status", "seconds", "detail"):
        t.add_column(col, justify="right" if col == "seconds" else "left")
    colour = {"ran": "green", "skipped": "dim", "up to date": "dim", "failed": "red", "failed before": "red",
              "planned": "yellow"}
    for o in res.stages:
        t.add_row(o.name, f"[{colour.get(o.status, 'white')}]{o.status}[/]", f"{o.seconds:.0f}" if o.seconds else "",
                  escape_markup(o.detail).replace("FORCED", "[bold yellow]FORCED[/bold yellow]"))
    out.print(t)
    if dry_run:
        return
    if res.report is not None:
        from ..bench.report import rich_table

        out.print(rich_table(res.report))
        out.print(f"bundles: {r.out / 'bundles'}; report: {r.out / 'bench' / 'report.md'}")
    if res.failed:
        from ..targets import CompileError

        raise CompileError("some targets failed to compile: " + "; ".join(res.failed),
                            "see each target's budget check above; relax [budgets.compile] only with a reason, "
                            "or set on_miss = \"keep\" to bench them marked FORCED")
    if res.breaches:
        from ..bench import BudgetBreach

        raise BudgetBreach("budget breached: " + "; ".join(res.breaches),
                           f"see {r.out / 'bench' / 'report.md'}; relax the budget only with a reason")


