"""The project's errors: every one carries a message and a hint that says what to do.

Standard library only, so every layer (runtime included) can raise them.
"""

from __future__ import annotations


#: The one exit-code table of the command line: (code, name, meaning). Shown by `edgeskin --help`
#: and docs/exit-codes.md; every error class and command takes its code from here.
EXIT_TABLE: tuple[tuple[int, str, str], ...] = (
    (0, "success", "success"),
    (1, "internal", "internal error: a bug (please report the traceback)"),
    (2, "user error", "user error: a bad option, value, file, or a missing dependency; nothing was changed"),
    (3, "failed row", "a failed row: a target could not be compiled, a bundle could not be loaded or run, "
                      "or an image could not be predicted (the others still were)"),
    (4, "budget breached", "a budget was breached (bench, or compile in a recipe)"),
    (5, "forced refused", "a bundle written past its compile budget (FORCED) was refused"),
    (130, "interrupted", "interrupted (Ctrl-C): finished work is kept; run the same command to resume"),
)
EXIT_CODES: dict[str, int] = {name: code for code, name, _ in EXIT_TABLE}


def exit_code_table() -> str:
    """``0 success; 1 internal error ...; ...`` for help texts."""
    return "; ".join(f"{code} {meaning}" for code, _, meaning in EXIT_TABLE)


class EdgeskinError(Exception):
    """Base class. ``message`` says what went wrong, ``hint`` what to do about it."""

    exit_code: int = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


class ConfigError(EdgeskinError):
    """An option or configuration value is invalid."""


class DataError(EdgeskinError):
    """A data set, split or metadata file is wrong."""


class ImageError(DataError):
    """One image cannot be read (missing, empty, truncated, not an image, too large)."""

    def __init__(self, path: str, message: str, hint: str | None = None) -> None:
        super().__init__(f"{path}: {message}", hint)
        self.path = path


class CheckpointError(EdgeskinError):
    """A checkpoint or ensemble directory cannot be loaded."""


class MissingDependencyError(EdgeskinError):
    """An optional dependency (extra) is not installed."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs '{package}', which is not installed.",
            f"pip install 'edgeskin[{extra}]'",
        )
        self.package = package
        self.extra = extra


def require(module: str, *, extra: str, purpose: str):  # noqa: ANN201 - returns a module
    """Import ``module`` or raise :class:`MissingDependencyError` naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(module.split(".")[0], extra, purpose) from exc
