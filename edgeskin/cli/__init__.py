"""The ``edgeskin`` command line: each module parses one group of commands and prints; the work
is done by the API. ``main`` is the console entry point."""

from __future__ import annotations

import sys

import typer

from ..errors import EXIT_CODES, EdgeskinError
from .common import app, err

# The order of these imports is the order of `edgeskin --help`: the pipeline's.
# isort: off
from . import train, members, compile, bench, bundle, device, run  # noqa: F401, E402  (registers the commands)
from ..cli_data import data_app  # noqa: E402  (light: the fetcher is standard library only)
# isort: on

app.add_typer(data_app, name="data")

__all__ = ["app", "main"]


def _parser_exceptions() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """The command-line parser's usage-error and abort classes (typer vendors click as
    ``typer._click`` in recent releases and uses the click package in older ones)."""
    usage: list[type] = []
    aborts: list[type] = [typer.Abort]
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            import importlib

            mod = importlib.import_module(name)
        except ImportError:
            continue
        usage.append(mod.UsageError)
        if hasattr(mod, "Abort"):
            aborts.append(mod.Abort)
    return tuple(usage), tuple(dict.fromkeys(aborts))


def main() -> None:
    """Console entry point. Every ending has its exit code (:data:`edgeskin.errors.EXIT_CODES`):
    a user error (a project error, or an option the command line parser refuses) prints an
    ``error:`` line and a ``hint:`` line; an interruption keeps finished work."""
    from ..progress import stop_all

    usage_errors, aborts = _parser_exceptions()

    try:
        rc = app(standalone_mode=False, prog_name="edgeskin")
    except EdgeskinError as exc:
        from rich.markup import escape

        stop_all()
        err.print(f"[bold red]error:[/bold red] {escape(exc.message)}")
        if exc.hint:
            err.print(f"[yellow]hint:[/yellow] {escape(exc.hint)}")
        sys.exit(exc.exit_code)
    except usage_errors as exc:  # a bad option or value, before the command runs
        from rich.markup import escape

        stop_all()
        command = exc.ctx.command_path if exc.ctx is not None else "edgeskin"
        err.print(f"[bold red]error:[/bold red] {escape(exc.format_message())}")
        err.print(f"[yellow]hint:[/yellow] see `{escape(command)} --help`")
        sys.exit(EXIT_CODES["user error"])
    except (KeyboardInterrupt, *aborts):
        stop_all()
        err.print("[yellow]interrupted[/yellow]: finished work is kept; run the same command to resume")
        sys.exit(EXIT_CODES["interrupted"])
    except SystemExit as exc:
        # typer turns Ctrl-C into a silent exit with code 130
        if exc.code != 130:
            raise
        stop_all()
        err.print("[yellow]interrupted[/yellow]: finished work is kept; run the same command to resume")
        sys.exit(130)
    if rc == EXIT_CODES["interrupted"]:  # typer turns Ctrl-C inside a command into this code
        stop_all()
        err.print("[yellow]interrupted[/yellow]: finished work is kept; run the same command to resume")
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
