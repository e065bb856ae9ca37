"""``edgeskin bench``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from .. import settings as build
from ..errors import ConfigError, EdgeskinError
from ..settings import command_options
from .common import (
    app,
    compute_for,
    load_data,
    out,
    reporter,
    split_for,
)


@app.command()
@command_options(build.bench_timing())
def bench(
    reference: Path = typer.Option(..., "--reference", "-r", help="The full-precision ensemble (folder), or a reference-predictions file (.npz) made by --save-reference (no torch needed)."),
    bundles: Optional[List[Path]] = typer.Option(None, "--bundle", "-b", help="A bundle to bench (folder or zip). Repeatable."),
    student: Optional[Path] = typer.Option(None, "--student", help="The FP32 student (checkpoint folder/.json): adds its row, and is what --targets compiles."),
    targets_spec: Optional[str] = typer.Option(None, "--targets", help="Compile these from --student first, e.g. cpu:int8,jetson:int8,tflite:int8 (a bare name means int8)."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration manifest for --targets int8."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Data set holding the images. Default: $EDGESKIN_DATA."),
    split_file: Optional[Path] = typer.Option(None, "--split", help="Split file (default: the reference's split.csv). Not needed with a predictions file."),
    on: str = typer.Option("test", "--on", help="Split to bench on: test | val | train | all (all: every image of --data, e.g. an ISIC 2018 ground-truth CSV)."),
    device: Optional[str] = typer.Option(None, "--device", help="Device profile whose budgets apply (see `edgeskin devices`)."),
    max_drop: Optional[str] = typer.Option(None, "--max-drop", help="Budget in points, e.g. top1=0.5,balanced=1.5,mel_recall=2 (overrides the profile's)."),
    max_latency: Optional[float] = typer.Option(None, "--max-latency", min=1e-6, help="Largest batch-1 p90 latency in ms."),
    against: str = typer.Option("auto", help="Budgets compare each bundle with: auto (the FP32 student if given, else the ensemble) | student | ensemble."),
    wide: bool = typer.Option(False, "--wide", help="Print every column (the full table is always in report.md)."),
    refuse_forced: bool = typer.Option(False, "--refuse-forced", help="Fail (exit 5) when a bundle was written past its compile budget (FORCED)."),
    save_reference: Optional[Path] = typer.Option(None, "--save-reference", help="Also write the reference predictions here (to bench on a device without torch)."),
    output: Path = typer.Option(Path("bench"), "--out", "-o", help="Folder for report.json, report.md and the plots."),
    settings: dict = None,  # type: ignore[assignment]  (timing options of edgeskin.settings, filled in by command_options)
) -> None:
    """Bench bundles against the full-precision ensemble: accuracy, per-class recall, melanoma
    sensitivity, flips with McNemar's test, bootstrap intervals, latency (batch 1, model only and
    end to end from an encoded image), memory; gated by budgets.

    Exit code 3 when a row failed (compile, load or run), 4 when a budget is breached (the message
    names the row and the metric); see `edgeskin --help` for every exit code.
    """
    import tempfile

    from ..budget import Budget
    from ..bench import (
        ReferencePredictions,
        compile_failed_row,
        run_bench,
    )
    from ..bench.report import rich_table, write_reports
    from ..data import read_split

    ds = load_data(data, None, False)
    profile = None
    if device:
        from ..profiles import get_profile

        profile = get_profile(device)
    budget = Budget.parse(max_drop, max_latency_ms=max_latency, against=against, profile=profile)
    config = build.bench_config(settings)
    threads = config.threads
    exports = tempfile.TemporaryDirectory(prefix="edgeskin-reference-")
    models = None
    if reference.suffix == ".npz" or reference.is_file():
        ref = ReferencePredictions.load(reference)
        split = None
    else:
        from ..bench import export_reference_models, reference_from_models

        # --on all: every image of --data (e.g. an ISIC 2018 ground-truth CSV, which has no split)
        split = None if on == "all" else read_split(split_for(split_file, reference))
        ref = reference_from_models(reference, dataset=ds, split=split, split_name=on, student=student,
                                    threads=threads, reporter=reporter(), compute=compute_for(settings, training=False))
        if save_reference:
            ref.save(save_reference)
            out.print(f"wrote reference predictions {save_reference} ({len(ref.image_ids)} images)")
        models = export_reference_models(reference, student, exports.name)
    bundle_paths = list(bundles or [])
    extra_rows: list[dict[str, Any]] = []
    if targets_spec:
        if student is None:
            raise ConfigError("--targets compiles the student", "pass --student CHECKPOINT")
        from ..calibration import read_calibration_set
        from ..targets import get_target

        split = split or read_split(split_for(split_file, student))
        cal = read_calibration_set(calib) if calib else None
        for item in [t.strip() for t in targets_spec.split(",") if t.strip()]:
            name, _, prec = item.partition(":")
            prec = prec or "int8"
            dest = output / "bundles" / f"{name}-{prec}.edgeskin"
            try:
                tg = get_target(name)
                res = tg.compile(student, precision=prec, dataset=ds, split=split, out=dest, calibration=cal,
                                 budget=Budget.for_compile(), force=True, overwrite=True, threads=threads, reporter=reporter())
                bundle_paths.append(res.bundle)
            except EdgeskinError as exc:
                extra_rows.append(compile_failed_row(name, prec, exc.message))
    try:
        report = run_bench(ref, bundle_paths, dataset=ds, budget=budget, config=config, extra_rows=extra_rows,
                           reporter=reporter(), reference_models=models)
    finally:
        exports.cleanup()
    out.print(rich_table(report, wide=wide))
    files = write_reports(report, output)
    out.print(f"wrote {files['json']}, {files['markdown']}" + (f", {', '.join(files['plots'])}" if files["plots"]
                                                                 else " (plots skipped: pip install 'edgeskin[bench]')"))
    from ..bench import failed_rows

    failed = failed_rows(report)
    if failed:
        from ..bench import RowFailed

        raise RowFailed(f"{len(failed)} row(s) failed: " + "; ".join(failed),
                        "see report.md; a bundle that cannot be loaded or run is never a pass")
    if report.breaches:
        from ..bench import BudgetBreach

        raise BudgetBreach("budget breached: " + "; ".join(report.breaches),
                           "see report.md; relax the budget only with a reason")
    forced = [r["row"] for r in report.rows if r.get("forced")]
    if refuse_forced and forced:
        from ..bench import ForcedRefused

        raise ForcedRefused(f"bundle(s) written past their compile budget: {', '.join(forced)}",
                            "recompile them within budget, or bench without --refuse-forced to compare only")
    if budget.active():
        out.print("[green]every bundle within budget[/green]")


