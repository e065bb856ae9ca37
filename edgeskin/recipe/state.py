"""What a recipe run remembers between runs: stage keys and statuses, content fingerprints, the
run lock."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..fileio import sha256_file, write_json

STATE_VERSION = 1

def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def data_fingerprint(dataset: Any) -> str:
    """Content of the data set as the pipeline sees it: every sample's id, lesion, label and
    image file size. Moving the folder keeps the fingerprint; editing a label or an image changes it."""
    h = hashlib.sha256()
    for s in sorted(dataset.samples, key=lambda s: s.image_id):
        h.update(f"{s.image_id},{s.lesion_id},{s.dx},{os.path.getsize(s.path)}\n".encode())
    return h.hexdigest()


def folder_fingerprint(path: Path) -> str:
    """sha256 over every file of a model folder (names and contents)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file() and not any(
        part.startswith(".") for part in f.relative_to(path).parts))
    for f in files:
        h.update(f"{f.name}:{sha256_file(f)}\n".encode())
    return h.hexdigest()


class RunLock:
    """``OUT/.recipe/lock``: one run per output folder at a time (a stale lock from a process
    that is gone is taken over)."""

    def __init__(self, out: Path) -> None:
        self.path = out / ".recipe" / "lock"

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                    os.kill(pid, 0)
                except (ValueError, ProcessLookupError, FileNotFoundError):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                except PermissionError:
                    pass
                raise ConfigError(f"{self.path.parent.parent}: another `edgeskin run` (pid {pid}) is using this folder",
                                  "wait for it to finish, or use another --out") from None
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self
        raise ConfigError(f"{self.path}: cannot take the run lock", "remove the file if no run is going on")

    def __exit__(self, *exc: Any) -> None:
        self.path.unlink(missing_ok=True)


class State:
    """``OUT/.recipe/state.json``: per stage, its key, status and timings (written atomically)."""

    def __init__(self, out: Path) -> None:
        self.path = out / ".recipe" / "state.json"
        self.stages: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                if data.get("version") == STATE_VERSION:
                    self.stages = data.get("stages", {})
            except (OSError, json.JSONDecodeError):
                self.stages = {}  # unreadable: every stage is checked again (keys decide)

    def save(self) -> None:
        write_json(self.path, {"version": STATE_VERSION, "stages": self.stages})

    def get(self, name: str) -> dict[str, Any]:
        return self.stages.get(name, {})

    def set(self, name: str, **record: Any) -> None:
        self.stages[name] = record
        self.save()
