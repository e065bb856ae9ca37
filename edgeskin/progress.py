"""Progress reporting without global state: library code takes a Reporter, the CLI gives a rich one."""

from __future__ import annotations

import logging
from typing import Protocol

log = logging.getLogger("edgeskin")


class Reporter(Protocol):
    def start(self, description: str, total: int | None) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def update(self, description: str) -> None: ...
    def stop(self) -> None: ...
    def message(self, text: str) -> None: ...


class NullReporter:
    """Reports nothing but messages, which go to the log."""

    def start(self, description: str, total: int | None) -> None:
        log.debug("start: %s (%s)", description, total)

    def advance(self, n: int = 1) -> None:
        pass

    def update(self, description: str) -> None:
        pass

    def stop(self) -> None:
        pass

    def message(self, text: str) -> None:
        log.info("%s", text)


_RUNNING: list["RichReporter"] = []


def stop_all() -> None:
    """Stop every running progress display, so a final message (an error, an interrupt) is
    printed rather than swallowed by a live display that never refreshes again."""
    for r in list(_RUNNING):
        r.stop()


class RichReporter:
    """Progress bars and messages on a rich console (used by the CLI)."""

    def __init__(self, console=None, *, quiet: bool = False) -> None:  # noqa: ANN001
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self._progress = None
        self._task = None

    def start(self, description: str, total: int | None) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn,
                                   TextColumn, TimeElapsedColumn, TimeRemainingColumn)

        self.stop()
        if self.quiet:
            return
        self._progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=True,
        )
        self._progress.start()
        _RUNNING.append(self)
        self._task = self._progress.add_task(description, total=total)

    def advance(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def update(self, description: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=description)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            if self in _RUNNING:
                _RUNNING.remove(self)

    def message(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text)
