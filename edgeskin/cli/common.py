"""What every command shares: the Typer app and its sub-apps, the consoles, data loading, progress."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console

from .. import __version__
from ..errors import ConfigError, DataError, exit_code_table

app = typer.Typer(
    name="edgeskin",
    help="Take skin-lesion classifier ensembles to the edge: train, evaluate, distill, "
    "quantize and compile into bundles (cpu, jetson, tflite), bench them, predict on the device.",
    epilog="Exit codes: " + exit_code_table(),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
out = Console()
err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        out.print(f"edgeskin {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug logging."),
) -> None:
    """edgeskin: train, distill, quantize, compile and bench skin-lesion classifiers for devices."""
    import os

    from rich.logging import RichHandler

    from ..quiet import QUIET_ENV, EdgeskinOnly

    handler = RichHandler(console=err, show_path=False, show_time=False)
    if not verbose:  # third-party INFO lines and warnings stay out of the way (--verbose shows them)
        handler.addFilter(EdgeskinOnly())
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(message)s",
                        handlers=[handler], force=True)
    if not verbose:
        for name in ("nncf", "torch", "litert_torch", "ai_edge_torch", "absl", "tensorflow", "jax"):
            logging.getLogger(name).setLevel(logging.ERROR)


# ----------------------------------------------------------------- shared helpers

def resolve_data(data: Optional[Path]) -> Path:
    """--data, then $EDGESKIN_DATA, then the default folder (where `data fetch` puts it); says which."""
    from ..data.fetch import resolve_data_path

    path, source = resolve_data_path(data)
    err.print(f"[dim]data: {path} ({source})[/dim]")
    return path


def compute_for(given: dict[str, Any], *, training: bool = True):  # noqa: ANN201
    """The one device decision for a command (joins torchrun's process group); printed once."""
    from ..settings import compute

    c = compute(given, training_run=training)
    if c.rank == 0:
        err.print(f"[dim]compute: {c.describe(training)}[/dim]")
    return c


def warn_if_not_transfer(preset: str, pretrained: Optional[str], arch: str) -> None:
    """A preset meant for transfer learning that will start from random weights: say so loudly."""
    from ..train.config import TRANSFER_PRESETS

    if preset not in TRANSFER_PRESETS or pretrained != "auto":
        return
    from ..models.weights import cached_imagenet, hub_checkpoints

    if cached_imagenet(arch) is None:
        err.print(f"[bold yellow]warning:[/bold yellow] the {preset} preset is ImageNet transfer learning, but "
                  f"--pretrained auto found no {arch} weights in {hub_checkpoints()}: training from random "
                  "initialisation, which is not the published method. Use --pretrained imagenet to download them.")


def reporter(quiet: bool = False):  # noqa: ANN202
    from ..progress import RichReporter

    return RichReporter(err, quiet=quiet)


def floats(text: str, n: int, what: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not a list of numbers", "e.g. 0.7,0.1,0.2") from None
    if len(vals) != n:
        raise ConfigError(f"{what} needs {n} numbers, got {len(vals)}", "e.g. 0.7,0.1,0.2")
    return vals


def load_data(data: Optional[Path], images: Optional[List[Path]], skip_bad: bool):  # noqa: ANN202
    from ..data import load_dataset

    ds = load_dataset(resolve_data(data), image_dirs=images or None, skip_bad=skip_bad)
    for item in ds.skipped:
        err.print(f"[yellow]skipped[/yellow] {item.where}: {item.reason}")
    if ds.skipped:
        err.print(f"[yellow]{len(ds.skipped)} item(s) skipped (--skip-bad)[/yellow]")
    return ds

calib_app = typer.Typer(help="Calibration sets for INT8 quantization.", no_args_is_help=True)
bundle_app = typer.Typer(help="Inspect, verify and pack bundles.", no_args_is_help=True)
app.add_typer(calib_app, name="calib")
app.add_typer(bundle_app, name="bundle")


def split_for(data_split: Optional[Path], model: Optional[Path]) -> Path:
    if data_split is not None:
        return data_split
    if model is not None:
        cand = (model if model.is_dir() else model.parent) / "split.csv"
        if cand.is_file():
            return cand
    raise DataError("no split file given", "pass --split FILE (the split the model was trained with)")


engine_app = typer.Typer(help="TensorRT engines on the Jetson.", no_args_is_help=True)
app.add_typer(engine_app, name="engine")


def escape_markup(text: str) -> str:
    from rich.markup import escape

    return escape(text)
