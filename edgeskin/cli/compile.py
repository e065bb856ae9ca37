"""``edgeskin calib make | targets | compile``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from .. import settings as build
from ..settings import command_options
from .common import (
    app,
    calib_app,
    err,
    load_data,
    out,
    reporter,
    split_for,
)
from .tables import pct


@calib_app.command("make")
def calib_make(
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Data set. Default: $EDGESKIN_DATA."),
    split_file: Path = typer.Option(..., "--split", help="Split file; images are drawn from its train split."),
    size: int = typer.Option(512, min=1, help="Number of images (at least 300 unless --force)."),
    seed: int = typer.Option(0, min=0, help="Seed of the draw."),
    name: Optional[str] = typer.Option(None, help="Name (default: train-SIZE-seedSEED-HASH)."),
    out_dir: Path = typer.Option(Path("calibration"), "--out-dir", help="Folder for the manifest."),
    source_split: str = typer.Option("train", "--from", help="Split to draw from (anything but train needs --force)."),
    force: bool = typer.Option(False, "--force", help="Accept a small set, a missing class or a non-train split; recorded in the manifest."),
    images: Optional[List[Path]] = typer.Option(None, "--images", help="Image folder(s), if not next to the metadata."),
) -> None:
    """Draw a deterministic, class-stratified calibration set from the training split."""
    from ..calibration import make_calibration_set, write_calibration_set
    from ..data import read_split

    ds = load_data(data, images, False)
    cal = make_calibration_set(ds, read_split(split_file), size=size, seed=seed, name=name,
                               source_split=source_split, force=force)
    path = write_calibration_set(cal, out_dir)
    t = Table(title=f"Calibration set {cal.name}")
    t.add_column("class")
    t.add_column("images", justify="right")
    for c, n in cal.manifest["class_counts"].items():
        t.add_row(c, str(n))
    out.print(t)
    if cal.manifest["forced"]:
        err.print(f"[yellow]forced:[/yellow] {'; '.join(cal.manifest['forced_reasons'])}")
    out.print(f"wrote {path} ({len(cal.image_ids)} images, sha256 {cal.sha256[:12]})")


@app.command()
def targets() -> None:
    """List the compile targets, their aliases and precisions."""
    from ..targets import available_targets

    t = Table(title="Targets")
    for col in ("target", "aliases", "precisions", "needs calibration", "extras", "what"):
        t.add_column(col)
    for tg in available_targets():
        t.add_row(tg.name, ", ".join(tg.aliases), ", ".join(tg.precisions), ", ".join(tg.needs_calibration) or "-",
                  ", ".join(tg.extras), tg.description)
    out.print(t)


@app.command("compile")
@command_options(build.compile_settings())
def compile_cmd(
    model: Path = typer.Argument(..., help="A checkpoint (.json), or a folder with one model (or use --member)."),
    target: str = typer.Option("cpu", "--target", "-t", help="Target name (see `edgeskin targets`)."),
    precision: str = typer.Option("int8", "--precision", "-p", help="fp32 | int8 (what the target offers)."),
    output: Path = typer.Option(..., "--out", "-o", help="Bundle folder to write (NAME.edgeskin)."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Data set for verification/calibration. Default: $EDGESKIN_DATA."),
    split_file: Optional[Path] = typer.Option(None, "--split", help="Split file (default: MODEL's split.csv)."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration manifest (calibration/NAME.json); needed for int8."),
    member: Optional[str] = typer.Option(None, help="Member of an ensemble folder to compile (e.g. member2)."),
    max_drop: Optional[str] = typer.Option(None, "--max-drop", help="Budget in points vs FP32 on val: top1=0.5,balanced=1.5,mel_recall=2."),
    min_agreement: float = typer.Option(0.97, min=0.0, max=1.0, help="Smallest top-1 agreement with FP32 on val."),
    threads: Optional[int] = typer.Option(None, min=1, max=4096, help="Runtime threads for the verification."),
    force: bool = typer.Option(False, "--force", help="Write the bundle even if it misses the budget (recorded in the manifest)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing bundle."),
    settings: dict = None,  # type: ignore[assignment]  (the compile options of edgeskin.targets.options)
) -> None:
    """Compile one model for a target into a self-describing, hash-verified bundle.

    The compiled artefact is checked against FP32 on the validation split first.
    """
    from ..calibration import read_calibration_set
    from ..data import read_split
    from ..budget import Budget
    from ..targets import get_target
    from ..targets.options import compile_kwargs

    tg = get_target(target)
    tg.check_precision(precision)
    budget = Budget.for_compile(max_drop, min_agreement)
    kw = compile_kwargs(tg, target, settings)
    ds = load_data(data, None, False)
    s = read_split(split_for(split_file, model))
    cal = read_calibration_set(calib) if calib else None
    res = tg.compile(model, precision=precision, dataset=ds, split=s, out=output, calibration=cal, member=member,
                     budget=budget, force=force, overwrite=overwrite, threads=threads, reporter=reporter(), **kw)
    c = res.check
    t = Table(title=f"{tg.name}/{precision} vs FP32 on the validation split ({c['n']} images)")
    for col in ("metric", "FP32", "compiled", "drop (points)", "95% interval", "budget"):
        t.add_column(col, justify="left" if col == "metric" else "right")
    iv = c.get("intervals") or {}

    def interval(lo_hi: Optional[list], scale: float = 1.0, digits: int = 2) -> str:
        return f"[{scale * lo_hi[0]:.{digits}f}, {scale * lo_hi[1]:.{digits}f}]" if lo_hi else ""

    pos = "mel_sensitivity" if "mel_sensitivity" in c["fp32"] else "malignant_sensitivity"
    for key, label, dk in (("top1", "top-1", "top1"), ("balanced_accuracy", "balanced acc.", "balanced"),
                           (pos, "mel recall" if pos == "mel_sensitivity" else "malignant recall", "mel_recall")):
        t.add_row(label, pct(c["fp32"][key]), pct(c["compiled"][key]), f"{c['drops_points'][dk]:.2f}",
                  interval((iv.get("drops_points") or {}).get(dk)), f"≤ {c['budget'][dk]}")
    t.add_row("top-1 agreement", "", pct(c["top1_agreement"]), "", interval(iv.get("top1_agreement"), 100, 1),
              f"≥ {100 * c['budget']['min_agreement']:.0f}")
    out.print(t)
    size = sum(f["bytes"] for f in res.manifest.files.values())
    status = "[yellow]FORCED past its budget[/yellow]" if res.forced else "[green]within budget[/green]"
    out.print(f"wrote {res.bundle} ({size / 1e6:.1f} MB, {status})")
    e = res.manifest.engine
    if e.get("name") == "tensorrt":
        out.print(f"TensorRT {e['tensorrt']} (JetPack {e['jetpack']}, {e['device']}), opset {e['opset']}; "
                  f"build the engine on the device with `edgeskin engine build {res.bundle}` or:\n  {e['trtexec']}")


