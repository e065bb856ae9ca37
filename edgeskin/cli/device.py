"""On the device: ``edgeskin selftest | predict``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.table import Table

from ..errors import EXIT_CODES, ConfigError, DataError, EdgeskinError
from .common import (
    app,
    err,
    out,
)


@app.command()
def selftest(
    bundle: Path = typer.Argument(..., help="Bundle folder or zip."),
    threads: Optional[int] = typer.Option(None, min=1, max=4096, help="Runtime threads."),
    engine: str = typer.Option("auto", help="Jetson bundles: auto (TensorRT if installed, else the ONNX Runtime host proxy) | tensorrt | onnxruntime."),
    dla: Optional[int] = typer.Option(None, "--dla", min=0, max=7, help="Jetson bundles: run the engine built for this DLA core."),
) -> None:
    """Re-run the bundle's golden inputs on this machine and compare with the compile-time outputs."""
    from ..runtime import load
    from ..runtime import selftest as run_selftest

    pred = load(bundle, threads=threads, engine=engine, dla_core=dla)
    if pred.host_proxy:
        err.print("[yellow]host proxy[/yellow]: TensorRT is not installed here; the graph runs in ONNX Runtime")
    r = run_selftest(pred)
    msg = (f"{r.n} golden inputs, max |Δp| {r.max_abs_diff:.2e} (tolerance {r.tolerance:.0e}), "
           f"top-1 agreement {100 * r.top1_agreement:.0f}%, engine {pred.backend.name} {pred.backend.version}")
    if not r.passed:
        raise EdgeskinError(f"selftest FAILED: {msg}; worst input #{r.worst_index} ({r.worst_id})",
                            "the engine on this device computes differently from the compile machine; "
                            "rebuild the bundle for this device or check the runtime version")
    out.print(f"[green]selftest passed[/green]: {msg}")


@app.command()
def predict(
    inputs: List[Path] = typer.Argument(..., help="Image files and/or folders of images."),
    bundle: Path = typer.Option(..., "--bundle", "-b", help="Bundle folder or zip."),
    top_k: int = typer.Option(3, "--top-k", "-k", min=1, max=1000, help="How many classes to show."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (one object per image)."),
    threads: Optional[int] = typer.Option(None, min=1, max=4096, help="Runtime threads."),
    engine: str = typer.Option("auto", help="Jetson bundles: auto (TensorRT if installed, else the ONNX Runtime host proxy) | tensorrt | onnxruntime."),
    dla: Optional[int] = typer.Option(None, "--dla", min=0, max=7, help="Jetson bundles: run the engine built for this DLA core."),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="Images per engine call (1: results never depend on the batch; more: faster)."),
) -> None:
    """Top-k labels with probabilities for each image.

    Bad files are reported and skipped; the exit code is 1 when any failed.
    """
    from ..data.readers import IMAGE_EXTENSIONS
    from ..runtime import load

    files: list[Path] = []
    for p in inputs:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            files.append(p)
    if not files:
        raise DataError("no images given", "pass image files or folders holding .jpg/.png images")
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}", "pass 1 or more")
    pred = load(bundle, threads=threads, engine=engine, dla_core=dla)
    if pred.host_proxy:
        err.print("[yellow]host proxy[/yellow]: TensorRT is not installed here; the jetson graph runs in ONNX Runtime "
                  "(close to TensorRT INT8 numerics, not its speed)")
    results: list[dict[str, Any]] = []
    failed = 0
    tensors: list[Any] = []
    pending: list[Path] = []

    def flush() -> None:
        if not tensors:
            return
        import numpy as np

        for f, r in zip(pending, pred.predict(np.stack(tensors), top_k=top_k)):  # type: ignore[arg-type]
            d = r.to_dict()
            d["source"] = str(f)
            results.append(d)
        tensors.clear()
        pending.clear()

    for f in files:
        try:
            tensors.append(pred.tensor(f))  # decode and preprocess: bad files fail here, one by one
            pending.append(f)
        except EdgeskinError as exc:
            failed += 1
            flush()
            results.append({"source": str(f), "error": exc.message, "hint": exc.hint})
            continue
        if len(tensors) >= batch_size:
            flush()
    flush()
    if as_json:
        out.print_json(json.dumps(results))
    else:
        t = Table(title=f"{bundle} ({pred.manifest.target}/{pred.manifest.precision})")
        t.add_column("image")
        for i in range(top_k):
            t.add_column(f"#{i + 1}")
        for r in results:
            if "error" in r:
                t.add_row(r["source"], f"[red]error[/red]: {r['error']}", *[""] * (top_k - 1))
            else:
                cells = [f"{x['label']} {100 * x['probability']:.1f}%" for x in r["top"]]
                t.add_row(r["source"], *cells, *[""] * (top_k - len(cells)))
        out.print(t)
    if failed:
        err.print(f"[red]{failed} of {len(files)} image(s) failed[/red]")
        raise typer.Exit(EXIT_CODES["failed row"])


