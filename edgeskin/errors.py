"""The project's errors: every one carries a message and a hint that says what to do.

Standard library only, so every layer (runtime included) can raise them.
"""

from __future__ import annotations


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
