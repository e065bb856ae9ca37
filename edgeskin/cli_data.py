"""``edgeskin data ...``: fetch public data sets (registered in cli.py as ``app.add_typer(data_app, name="data")``)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

data_app = typer.Typer(
    help="Fetch public data sets (HAM10000) into the layout --data reads.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
out = Console()
err = Console(stderr=True)


@data_app.callback()
def _data() -> None:
    """Fetch public data sets (HAM10000) into the layout --data reads."""


@data_app.command("fetch")
def fetch(
    name: str = typer.Argument(..., help="Data set to fetch: ham10000."),
    dest: Optional[Path] = typer.Option(None, "--dest", help="Folder to fill. Default: $EDGESKIN_HOME/data/NAME, else ~/.local/share/edgeskin/data/NAME (XDG_DATA_HOME respected)."),
    server: Optional[str] = typer.Option(None, "--server", help="Dataverse installation or mirror to use (default: https://dataverse.harvard.edu)."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="JSON list of {name, url, size?, sha256?|md5?}: download from these urls (a mirror) instead of Dataverse; with --archives, only its checksums are used."),
    archives: Optional[Path] = typer.Option(None, "--archives", help="Folder with hand-downloaded HAM10000_images_part_1.zip, _part_2.zip and HAM10000_metadata.csv (or .tab): unpack these, no network."),
    retries: int = typer.Option(3, "--retries", min=0, help="Retries (each resuming where it stopped) when a connection is cut mid-file."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Accept files without (or failing) a published checksum. The data set is still checked by reading it."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Download a data set, verify each file's published checksum, and unpack it where --data finds it.

    Interrupted downloads resume (run the same command again); finished files are skipped.
    Without a network, download the files by hand and pass --archives DIR.
    HAM10000 is licensed CC BY-NC 4.0 (non-commercial): the terms are printed, written beside the
    images (DATA_LICENCE.txt) and recorded in every checkpoint and bundle trained on it.
    """
    from .data.fetch import LICENCE_FILE, default_data_dir, fetch_dataset, human_bytes
    from .data.licence import same_licence
    from .progress import RichReporter

    target = dest if dest is not None else default_data_dir(name.lower())
    err.print(f"[dim]dest: {escape(str(target))}" + (" (--dest)" if dest is not None else " (default)") + "[/dim]")
    res = fetch_dataset(name, target, server=server, manifest=manifest, archives=archives, retries=retries,
                        verify=not no_verify, reporter=RichReporter(err, quiet=quiet))
    t = Table(title=f"{name} files")
    for col in ("file", "size", "checksum", "status"):
        t.add_column(col, justify="right" if col == "size" else "left")
    for f in res.files:
        check = (f"{f.algorithm} {f.digest[:16]}…" if f.verified and f.digest else
                 "[yellow]not verified[/yellow]")
        status = "skipped (done earlier)" if f.skipped else "fetched"
        t.add_row(f.name, human_bytes(f.size), check, status)
    out.print(t)
    if res.bytes_downloaded:
        out.print(f"downloaded {human_bytes(res.bytes_downloaded)}" + (" (resumed)" if res.resumed else ""))
    lic = res.licence
    if lic is not None:
        out.print(f"[bold yellow]licence[/bold yellow]: {escape(lic.notice)}")
        out.print(f"cite: {escape(lic.attribution)}")
        out.print(f"[dim]terms kept beside the images in {escape(str(res.dest / LICENCE_FILE))}[/dim]")
        if res.licence_at_source and not same_licence(res.licence_at_source, lic):
            out.print(f"[yellow]the source states the licence {escape(res.licence_at_source)}, not "
                      f"{lic.spdx}: the source's terms are the ones that apply[/yellow]")
    where = escape(shlex.quote(str(res.dest)))
    out.print(f"[green]ready[/green]: {res.n_images} images in {where}")
    out.print(f"use --data {where} or export EDGESKIN_DATA={where}")
