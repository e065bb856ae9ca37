"""Quiet third-party toolchains unless asked: NNCF's INFO lines and progress bars, LiteRT's
converter stages, TensorFlow's and absl's start-up lines, TFLite's delegate notices. They are
captured around the calls that make them (Python-level and file-descriptor-level, since several
come from C++) and dropped, or shown when the call fails. ``edgeskin --verbose`` (DEBUG logging on
the ``edgeskin`` logger) lets everything through. Standard library only."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
from typing import Iterator

#: environment that keeps TensorFlow / absl / glog C++ start-up lines out unless verbose; set by the
#: command line before any toolchain is imported
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "GLOG_minloglevel": "2", "ABSL_MIN_LOG_LEVEL": "3"}


#: the loggers of the toolchains edgeskin drives
THIRD_PARTY_LOGGERS = ("nncf", "torch", "litert_torch", "ai_edge_torch", "ai_edge_quantizer", "absl", "tensorflow",
                       "jax", "onnxruntime")


def verbose() -> bool:
    return logging.getLogger("edgeskin").isEnabledFor(logging.DEBUG)


def _fileno(stream: object) -> int | None:
    try:
        return stream.fileno()  # type: ignore[attr-defined]
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None


@contextlib.contextmanager
def third_party_output(*, native: bool = False) -> Iterator[None]:
    """Capture what the enclosed toolchain calls print; drop it on success, show it on failure.

    Python-level output (``print``, progress bars on ``sys.stdout``) always; with ``native`` also
    what C++ code writes to file descriptors 1 and 2 (edgeskin's own progress, on stderr, is then
    captured too, so keep such blocks short)."""
    if verbose():
        yield
        return
    loggers = [logging.getLogger(n) for n in THIRD_PARTY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:  # toolchains reset their own levels when imported: set them again here
        lg.setLevel(logging.ERROR)
    buf = io.StringIO()
    saved: list[tuple[int, int]] = []
    tmp = tempfile.TemporaryFile(mode="w+b")
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    for fd in ((1, 2) if native else ()):
        try:
            saved.append((fd, os.dup(fd)))
            os.dup2(tmp.fileno(), fd)
        except OSError:
            continue
    failed = False
    try:
        with contextlib.redirect_stdout(buf):
            yield
    except BaseException:
        failed = True
        raise
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if failed:
            tmp.seek(0)
            text = buf.getvalue() + tmp.read().decode(errors="replace")
            tail = "\n".join(text.strip().splitlines()[-40:])
            if tail:
                print(f"(the toolchain's own output, last lines)\n{tail}", file=sys.stderr)
        tmp.close()


class EdgeskinOnly(logging.Filter):
    """Lets through the project's own records, and anyone's errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".")[0] == "edgeskin" or record.levelno >= logging.ERROR
