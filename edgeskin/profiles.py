"""Device profiles: what a device runs (TensorRT version, ONNX opset, precisions, DLA cores,
workspace) and the budgets a release must meet on it. One TOML file per device in
``edgeskin/devices/``; ``$EDGESKIN_DEVICES`` (a folder) adds or overrides profiles.
Stdlib only.
"""

from __future__ import annotations

import difflib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

BUILTIN = Path(__file__).resolve().parent / "devices"
KINDS = ("jetson", "phone", "cpu")


#: the TensorRT release from which edgeskin builds strongly typed networks (weak typing is
#: deprecated from 10.12 and removed in 11.x)
STRONG_TYPING_FROM = (10, 12)


def _version_tuple(text: str) -> tuple:
    out = []
    for part in str(text).split("."):
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


@dataclass(frozen=True)
class JetPack:
    """One JetPack release on one device: what its system ships and what edgeskin does there.

    ``python`` is the system Python (TensorRT's bindings exist only for it), ``cuda`` the CUDA
    release and ``cuda_python`` the pip requirement that matches it; ``dla`` whether edgeskin
    may build for the DLA with this release; ``supported`` False (with ``note``) for a release
    edgeskin refuses, such as JetPack 4.6 (Python 3.6, end of life)."""

    version: str
    tensorrt: str
    max_opset: int
    cuda: str = ""
    python: str = ""
    cuda_python: str = ""
    dla: bool = False
    supported: bool = True
    note: str = ""

    @property
    def typing(self) -> str:
        """``strong`` where edgeskin builds strongly typed networks (TensorRT 10.12+), else ``weak``."""
        return "strong" if _version_tuple(self.tensorrt)[:2] >= STRONG_TYPING_FROM else "weak"

    @property
    def float_tensors(self) -> str:
        """The precision a reduced-precision graph stores its float tensors in for this release:
        FP16 under strong typing (no FP16 flag then), FP32 under weak typing (the flag does it)."""
        return "float16" if self.typing == "strong" else "float32"

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "tensorrt": self.tensorrt, "max_opset": self.max_opset,
                "cuda": self.cuda, "python": self.python, "cuda_python": self.cuda_python, "dla": self.dla,
                "typing": self.typing, "supported": self.supported, **({"note": self.note} if self.note else {})}


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    title: str
    kind: str
    target: str
    precisions: tuple[str, ...]
    aliases: tuple[str, ...] = ()
    dla_cores: int = 0
    workspace_mb: int = 1024
    threads: int | None = None
    gpu: str | None = None
    memory_gb: float | None = None
    jetpacks: tuple[JetPack, ...] = ()
    default_jetpack: str | None = None
    budget: dict[str, float] = field(default_factory=dict)
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def jetpack(self, version: str | None = None) -> JetPack:
        """The JetPack release ``version`` (default: the profile's default) this device runs."""
        if not self.jetpacks:
            raise ConfigError(f"device {self.name} is not a Jetson", "pass a jetson-* device")
        want = version or self.default_jetpack or self.jetpacks[-1].version
        bare = want[2:] if want.lower().startswith("jp") else want
        for jp in self.jetpacks:
            if jp.version in (want, bare):
                if not jp.supported:
                    raise ConfigError(f"JetPack {jp.version} on {self.name} is not supported: {jp.note}",
                                      "flash JetPack " + ", ".join(j.version for j in self.jetpacks if j.supported)
                                      + " (edgeskin's device side needs Python 3.8 or later)")
                return jp
        raise ConfigError(f"device {self.name} does not run JetPack {want}",
                          f"choose one of: {', '.join(j.version for j in self.jetpacks)}")

    @property
    def max_latency_ms(self) -> float | None:
        v = self.budget.get("max_latency_ms")
        return None if v is None else float(v)

    def max_drop(self) -> str:
        """The accuracy budget in ``--max-drop`` syntax."""
        keys = [k for k in ("top1", "balanced", "mel_recall") if k in self.budget]
        return ",".join(f"{k}={self.budget[k]:g}" for k in keys)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "title": self.title, "kind": self.kind, "target": self.target,
            "precisions": list(self.precisions), "aliases": list(self.aliases), "dla_cores": self.dla_cores,
            "workspace_mb": self.workspace_mb, "threads": self.threads, "gpu": self.gpu,
            "memory_gb": self.memory_gb, "jetpacks": [j.to_dict() for j in self.jetpacks],
            "default_jetpack": self.default_jetpack, "budget": dict(self.budget), **self.extra,
        }


_KNOWN = {"name", "title", "kind", "target", "precisions", "aliases", "dla_cores", "workspace_mb", "threads",
          "gpu", "memory_gb", "jetpack", "default_jetpack", "budget"}


def parse_profile(data: dict[str, Any], source: str) -> DeviceProfile:
    """Build a profile from a TOML table, with errors naming the file and the field."""
    try:
        name = str(data["name"])
        kind = str(data.get("kind", "jetson"))
        if kind not in KINDS:
            raise ConfigError(f"{source}: kind {kind!r} is not one of {', '.join(KINDS)}")
        jps = tuple(JetPack(str(j["version"]), str(j["tensorrt"]), int(j["max_opset"]), cuda=str(j.get("cuda", "")),
                            python=str(j.get("python", "")), cuda_python=str(j.get("cuda_python", "")),
                            dla=bool(j.get("dla", False)), supported=bool(j.get("supported", True)),
                            note=str(j.get("note", "")))
                    for j in data.get("jetpack", []))
        if kind == "jetson" and not jps:
            raise ConfigError(f"{source}: a jetson profile needs at least one [[jetpack]] table",
                              "add version, tensorrt and max_opset")
        prof = DeviceProfile(
            name=name, title=str(data.get("title", name)), kind=kind, target=str(data.get("target", kind)),
            precisions=tuple(data.get("precisions", ("fp32",))), aliases=tuple(data.get("aliases", ())),
            dla_cores=int(data.get("dla_cores", 0)), workspace_mb=int(data.get("workspace_mb", 1024)),
            threads=data.get("threads"), gpu=data.get("gpu"), memory_gb=data.get("memory_gb"),
            jetpacks=jps, default_jetpack=data.get("default_jetpack"),
            budget={k: float(v) for k, v in data.get("budget", {}).items()}, source=source,
            extra={k: v for k, v in data.items() if k not in _KNOWN},
        )
    except KeyError as exc:
        raise ConfigError(f"{source}: missing field {exc.args[0]!r}", "see edgeskin/devices/*.toml for the format") \
            from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {exc}", "see edgeskin/devices/*.toml for the format") from None
    if prof.default_jetpack is not None and jps:
        prof.jetpack(prof.default_jetpack)
    return prof


def _folders() -> list[Path]:
    out = [BUILTIN]
    extra = os.environ.get("EDGESKIN_DEVICES")
    if extra:
        out.append(Path(extra))
    return out


def load_profiles() -> dict[str, DeviceProfile]:
    """Every profile by name (later folders override earlier ones)."""
    profiles: dict[str, DeviceProfile] = {}
    for folder in _folders():
        if not folder.is_dir():
            continue
        for f in sorted(folder.glob("*.toml")):
            try:
                data = tomllib.loads(f.read_text(encoding="utf-8"))
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{f}: not valid TOML ({exc})", "fix the file or remove it") from None
            p = parse_profile(data, str(f))
            profiles[p.name] = p
    return profiles


def get_profile(name: str) -> DeviceProfile:
    """A profile by name or alias; an unknown name gets the closest match and the list."""
    profiles = load_profiles()
    key = name.strip().lower()
    for p in profiles.values():
        if key == p.name or key in p.aliases:
            return p
    names = list(profiles) + [a for p in profiles.values() for a in p.aliases]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    hint = f"known devices: {', '.join(sorted(profiles))}"
    raise ConfigError(f"unknown device {name!r}" + (f"; did you mean {close[0]!r}?" if close else ""), hint)
