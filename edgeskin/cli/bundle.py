"""``edgeskin bundle verify | pack | show``, ``devices``, ``engine build``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .common import app, bundle_app, engine_app, err, escape_markup, out


@bundle_app.command("verify")
def bundle_verify(bundle: Path = typer.Argument(..., help="Bundle folder or zip.")) -> None:
    """Check a bundle: schema version, manifest, and the sha256 of every file; for a jetson
    bundle also TensorRT's graph rules where onnx is installed (the host), and polygraphy lint
    where polygraphy is. On the device (runtime only) it says which checks it skipped."""
    import shutil

    from ..bundle import BundleReader

    r = BundleReader(bundle)
    names = r.verify()
    m = r.manifest
    out.print(f"[green]ok[/green] {bundle}: schema {m.schema_version}, target {m.target}/{m.precision}, "
              f"{len(names)} files verified ({', '.join(names)})")
    if m.engine.get("name") != "tensorrt":
        return
    compiled = ((m.provenance.get("artefact_checks") or {}).get("tensorrt_form") or {})
    try:
        import onnx
    except ImportError:
        out.print("TensorRT form: [yellow]not checked here[/yellow] (onnx is not installed: the device needs only "
                  "the runtime); hashes and manifest checked above"
                  + ("; at compile time it " + ("passed" if compiled.get("passed") else "FAILED")
                     if compiled else "") + ". Check the graph on the host with `pip install 'edgeskin[jetson]'`.")
        return
    from ..quantize.tensorrt import validate_tensorrt_onnx

    lint = shutil.which("polygraphy") is not None or (Path(sys.executable).parent / "polygraphy").exists()
    report = validate_tensorrt_onnx(onnx.load_from_string(r.read(m.model_file)),
                                    max_opset=int(m.engine.get("opset", 17)), lint=lint)
    t = Table(title=f"TensorRT form (TensorRT {m.engine.get('tensorrt')}, opset ≤ {m.engine.get('opset')})")
    for col in ("rule", "result", "detail"):
        t.add_column(col)
    for res in report.results:
        t.add_row(res.rule, "[green]pass[/green]" if res.passed else "[red]FAIL[/red]",
                  res.detail + (f" ({', '.join(res.nodes[:5])})" if res.nodes else ""))
    if not lint:
        t.add_row("polygraphy lint", "[yellow]skipped[/yellow]", "polygraphy is not installed here")
    out.print(t)
    report.raise_if_failed(f"{bundle}/{m.model_file}")


@bundle_app.command("pack")
def bundle_pack(bundle: Path = typer.Argument(..., help="Bundle folder."),
                output: Optional[Path] = typer.Option(None, "--out", "-o", help="Zip to write (default: BUNDLE.zip).")) -> None:
    """Zip a verified bundle folder (the runtime loads the zip directly)."""
    from ..bundle import pack_bundle

    path = pack_bundle(bundle, output)
    out.print(f"wrote {path}")


@bundle_app.command("show")
def bundle_show(bundle: Path = typer.Argument(..., help="Bundle folder or zip.")) -> None:
    """Print a bundle's manifest (JSON, on stdout), then what a user must know first (on stderr):
    whether it met its compile budget or was FORCED past it, its agreement and drops vs FP32 with
    95 % intervals and image count, warnings where the validation split was too small for the
    budget, the licence of the data it was trained on, and, for phone bundles, how an app must
    feed it."""
    from ..budget import check_summary
    from ..bundle import BundleReader
    from ..targets.phone import preprocessing_advice

    m = BundleReader(bundle).manifest
    out.print_json(json.dumps(m.to_dict()))
    acc = m.accuracy or {}
    if acc.get("forced"):
        err.print(f"[bold yellow]FORCED[/bold yellow]: written past its compile budget "
                  f"({escape_markup('; '.join(acc.get('failures') or []))}); `edgeskin bench --refuse-forced` refuses it")
    if "passed" in acc:
        err.print(("" if acc.get("forced") else "[green]within budget[/green]: ")
                  + f"vs FP32 on validation, {escape_markup(check_summary(acc))}")
    if acc.get("warnings"):
        err.print("[yellow]warning:[/yellow] validation split small for the compile budget: "
                  + escape_markup("; ".join(acc["warnings"])))
    lic = (m.provenance or {}).get("data_licence")
    if lic:
        err.print(f"data licence ({lic.get('spdx')}): {escape_markup(str(lic.get('notice')))}")
    advice = preprocessing_advice(m)
    if advice:
        err.print("[bold]app preprocessing[/bold]\n" + escape_markup(advice))


@app.command()
def devices(
    show: Optional[str] = typer.Option(None, "--show", help="Print one profile in full (JSON)."),
) -> None:
    """List the device profiles: runtime versions, opset, precisions, DLA cores and budgets.

    Profiles are TOML files in edgeskin/devices/; $EDGESKIN_DEVICES names a folder of your own.
    """
    from ..profiles import get_profile, load_profiles

    if show:
        out.print_json(json.dumps(get_profile(show).to_dict()))
        return
    t = Table(title="Device profiles")
    for col in ("device", "aliases", "target", "precisions", "JetPack / TensorRT / max opset", "DLA", "budget"):
        t.add_column(col)
    for p in load_profiles().values():
        jps = "\n".join(f"{j.version} / {j.tensorrt} / {j.max_opset}" + (" (default)" if j.version == p.default_jetpack else "")
                        + ("" if j.supported else " (not supported)") for j in p.jetpacks) or "-"
        b = p.budget
        budget = (p.max_drop() + (f", agreement ≥ {100 * b['min_agreement']:.0f}%" if "min_agreement" in b else "")
                  + (f", ≤ {b['max_latency_ms']:g} ms" if "max_latency_ms" in b else ""))
        t.add_row(p.name, ", ".join(p.aliases), p.target, ", ".join(p.precisions), jps,
                  str(p.dla_cores) if p.kind == "jetson" else "-", budget)
    out.print(t)



@engine_app.command("build")
def engine_build(
    bundle: Path = typer.Argument(..., help="A jetson bundle folder."),
    precision: Optional[str] = typer.Option(None, help="fp16 | fp32 for a float bundle on TensorRT < 10.12 (default: the bundle's)."),
    dla: Optional[int] = typer.Option(None, "--dla", min=0, max=7, help="DLA core to build for (static batch, GPU fallback); only where the device profile has a DLA."),
    workspace_mb: Optional[int] = typer.Option(None, min=1, help="Builder workspace (default: the device profile's)."),
    timing_cache: Optional[Path] = typer.Option(None, help="Timing cache file (default: ~/.cache/edgeskin/tensorrt/)."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Build again even if an engine for this TensorRT and device exists."),
) -> None:
    """Build the TensorRT engine on this Jetson, self-test it against the bundle's golden
    outputs, and add it to the bundle (TensorRT version and device identity in the manifest)."""
    from ..runtime.tensorrt import build_engine

    rec = build_engine(bundle, precision=precision, dla=dla, workspace_mb=workspace_mb,
                       timing_cache=timing_cache, rebuild=rebuild)
    st = rec.get("selftest", {})
    dev = rec.get("device") or {}
    tc = rec.get("timing_cache") or {}
    out.print(f"[green]engine ready[/green]: {rec['file']} (TensorRT {rec['tensorrt']}, "
              f"{dev.get('board') or rec.get('gpu')}, {rec.get('typing', 'weak')} typing, "
              f"batch {rec['batch']['min']}-{rec['batch']['max']}, {rec['bytes'] / 1e6:.1f} MB, "
              f"built in {rec['build_seconds']} s"
              + (f"; golden max |Δp| {st['max_abs_diff']:.2e} ≤ {st['tolerance']:g}" if st else "") + ")")
    if tc.get("rejected"):
        err.print(f"[yellow]timing cache[/yellow] {tc.get('path')} came from another TensorRT or device; "
                  "a fresh one was saved in its place")


