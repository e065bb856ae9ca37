"""Bundles: a self-describing, hash-verified folder (or zip) that a device runs.

``NAME.edgeskin/`` holds ``manifest.json`` + the compiled artefact + ``labels.txt`` + a small
golden set (``golden.npz``: preprocessed inputs and the outputs the artefact gave at compile
time). The manifest records the schema version, target, precision, engine and toolchain
versions, the input spec, ordered labels, provenance, the accuracy measured at compile time and
a sha256 for every file. Bundles are written to a temporary folder and renamed into place.

Standard library + numpy only: the device runtime reads bundles with this module.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from .errors import EdgeskinError
from .fileio import atomic_path
from .preprocess import PreprocessConfig

SCHEMA_VERSION = "1.0"
SUPPORTED_MAJOR = 1
MANIFEST = "manifest.json"


class BundleError(EdgeskinError):
    """A bundle is missing, malformed, tampered with, or of an unknown schema."""


@dataclass(frozen=True)
class InputSpec:
    """What the model takes: the preprocessing rule, layout, dtype and int8 quantization."""

    size: int
    resize: int
    layout: str = "NCHW"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    crop: str = "center"
    dtype: str = "float32"
    name: str = "input"
    #: for models that take int8/uint8 input: q = round(x / scale) + zero_point
    scale: float | None = None
    zero_point: int | None = None
    #: for models trained elsewhere (see PreprocessConfig); written only when not the defaults
    channel_order: str = "RGB"
    input_range: float = 1.0
    normalization: str = "meanstd"

    @classmethod
    def from_preprocess(cls, pre: PreprocessConfig, **kw: Any) -> "InputSpec":
        return cls(size=pre.size, resize=pre.resize_size, layout=pre.layout, mean=tuple(pre.mean),
                   std=tuple(pre.std), interpolation=pre.interpolation, channel_order=pre.channel_order,
                   input_range=pre.input_range, normalization=pre.normalization, **kw)

    def preprocess_config(self) -> PreprocessConfig:
        return PreprocessConfig(size=self.size, resize=self.resize, mean=tuple(self.mean),  # type: ignore[arg-type]
                                std=tuple(self.std), interpolation=self.interpolation,  # type: ignore[arg-type]
                                layout=self.layout, channel_order=self.channel_order,
                                input_range=self.input_range, normalization=self.normalization)


@dataclass(frozen=True)
class Manifest:
    name: str
    target: str
    precision: str
    engine: dict[str, Any]
    input: InputSpec
    labels: tuple[str, ...]
    model_file: str
    output: dict[str, Any] = field(default_factory=lambda: {"name": "logits", "kind": "logits"})
    label_set: str = "ham10000"
    toolchain: dict[str, str] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    accuracy: dict[str, Any] = field(default_factory=dict)
    golden: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    created: str = ""
    edgeskin_version: str = ""
    schema_version: str = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input"]["mean"] = list(self.input.mean)
        d["input"]["std"] = list(self.input.std)
        if (self.input.channel_order, self.input.input_range, self.input.normalization) == ("RGB", 1.0, "meanstd"):
            for k in ("channel_order", "input_range", "normalization"):  # manifests as before they existed
                d["input"].pop(k)
        d["labels"] = list(self.labels)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "manifest") -> "Manifest":
        if not isinstance(d, Mapping):
            raise BundleError(f"{where}: malformed manifest (a JSON {type(d).__name__}, not an object)",
                              "re-compile the bundle")
        version = str(d.get("schema_version", ""))
        try:
            major = int(version.split(".")[0])
        except ValueError:
            raise BundleError(f"{where}: no valid schema_version ({version!r})",
                              "this is not an edgeskin bundle manifest") from None
        from . import __version__

        writer = str(d.get("edgeskin_version") or "") or "an unknown version"
        if major != SUPPORTED_MAJOR:
            raise BundleError(
                f"{where}: bundle schema {version} is not supported by this edgeskin (knows {SUPPORTED_MAJOR}.x); "
                f"the bundle was written by edgeskin {writer}, this is edgeskin {__version__}",
                ("upgrade edgeskin on this device to a release that reads schema "
                 f"{major}.x (docs/compatibility.md), or compile the bundle with a matching edgeskin"
                 if major > SUPPORTED_MAJOR else
                 "upgrade edgeskin on this device, or compile the bundle with a matching edgeskin "
                 f"(edgeskin {__version__} compiles schema {SCHEMA_VERSION})"),
            )
        # Within a major, fields that change how an image is prepared are written only when not at their
        # default; a runtime that does not know one refuses the bundle rather than feed the model wrong tensors.
        spec = d.get("input")
        unknown = sorted(set(spec) - set(InputSpec.__dataclass_fields__)) if isinstance(spec, Mapping) else []
        if unknown:
            raise BundleError(
                f"{where}: the input spec uses {', '.join(map(repr, unknown))}, which this edgeskin ({__version__}) "
                f"does not know; the bundle (schema {version}) was written by edgeskin {writer}",
                "upgrade edgeskin on this device: these fields change how images are prepared for the model, so "
                "an older runtime refuses the bundle rather than guess (docs/compatibility.md)")
        try:
            kw = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
            kw["input"] = InputSpec(**{**d["input"], "mean": tuple(d["input"]["mean"]),
                                       "std": tuple(d["input"]["std"])})
            kw["labels"] = tuple(d["labels"])
            return cls(**kw)
        except (KeyError, TypeError) as exc:
            raise BundleError(f"{where}: malformed manifest ({exc})", "re-compile the bundle") from None

    def with_(self, **changes: Any) -> "Manifest":
        return replace(self, **changes)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class BundleReader:
    """Read a bundle folder or zip: its manifest and (hash-checked) files."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            self._zip = None
            mpath = self.path / MANIFEST
            if not mpath.is_file():
                raise BundleError(f"{self.path}: no {MANIFEST} in this folder", "pass a folder made by `edgeskin compile`")
            raw = mpath.read_bytes()
        elif self.path.is_file() and zipfile.is_zipfile(self.path):
            self._zip = zipfile.ZipFile(self.path)
            names = self._zip.namelist()
            prefix = next((n[: -len(MANIFEST)] for n in names if n.endswith(MANIFEST) and n.count("/") <= 1), None)
            if prefix is None:
                raise BundleError(f"{self.path}: no {MANIFEST} in this zip", "pass a zip made by `edgeskin bundle pack`")
            self._prefix = prefix
            raw = self._zip.read(prefix + MANIFEST)
        elif self.path.exists():
            raise BundleError(f"{self.path}: not a bundle folder or zip", "pass NAME.edgeskin or NAME.edgeskin.zip")
        else:
            raise BundleError(f"{self.path}: bundle not found", "check the path")
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise BundleError(f"{self.path}/{MANIFEST}: not valid JSON ({exc})", "re-compile the bundle") from None
        self.manifest = Manifest.from_dict(data, f"{self.path}/{MANIFEST}")

    def _raw(self, name: str) -> bytes:
        if not name or "/" in name or "\\" in name or name in (".", ".."):  # as write_bundle refuses
            raise BundleError(f"{self.path}: the manifest lists an invalid file name {name!r}",
                              "re-copy the bundle from the release")
        if self._zip is not None:
            try:
                return self._zip.read(self._prefix + name)
            except KeyError:
                raise BundleError(f"{self.path}: file {name} is missing", "re-copy the whole bundle") from None
        p = self.path / name
        if not p.is_file():
            raise BundleError(f"{p}: file is missing", "re-copy the whole bundle")
        return p.read_bytes()

    def read(self, name: str) -> bytes:
        """A file's bytes, refused when its sha256 is not the manifest's."""
        entry = self.manifest.files.get(name)
        if entry is None:
            raise BundleError(f"{self.path}: {name} is not listed in the manifest", "re-compile the bundle")
        data = self._raw(name)
        digest = sha256_bytes(data)
        if digest != entry.get("sha256"):
            raise BundleError(
                f"{self.path}: {name} has been modified (sha256 {digest[:12]}..., manifest {str(entry.get('sha256'))[:12]}...)",
                "the bundle was tampered with or damaged; re-copy it from the release",
            )
        return data

    def verify(self) -> list[str]:
        """Check every listed file; returns the names checked (raises on the first problem)."""
        for name in self.manifest.files:
            self.read(name)
        if self.manifest.model_file not in self.manifest.files:
            raise BundleError(f"{self.path}: the model file {self.manifest.model_file} is not hashed in the manifest",
                              "re-compile the bundle")
        return sorted(self.manifest.files)

    def golden(self) -> dict[str, Any] | None:
        if not self.manifest.golden:
            return None
        import numpy as np

        with np.load(io.BytesIO(self.read(self.manifest.golden["file"])), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


def write_bundle(
    out: str | os.PathLike,
    manifest: Manifest,
    files: Mapping[str, bytes | str | os.PathLike],
    *,
    overwrite: bool = False,
) -> Path:
    """Write a bundle folder atomically: everything goes to a temporary sibling folder, the
    manifest (with every file's sha256) last, then one rename puts it in place."""
    dest = Path(out)
    if dest.exists() and not overwrite:
        raise BundleError(f"{dest}: already exists", "pass --overwrite, or choose another --out")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        entries: dict[str, dict[str, Any]] = {}
        for name, src in files.items():
            if "/" in name or name == MANIFEST:
                raise BundleError(f"invalid bundle file name {name!r}")
            target = tmp / name
            if isinstance(src, (bytes, bytearray)):
                target.write_bytes(bytes(src))
            else:
                shutil.copyfile(src, target)
            data = target.read_bytes()
            entries[name] = {"sha256": sha256_bytes(data), "bytes": len(data)}
        final = manifest.with_(files=entries)
        (tmp / MANIFEST).write_text(json.dumps(final.to_dict(), indent=2) + "\n")
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def pack_bundle(folder: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Zip a verified bundle folder (``NAME.edgeskin`` -> ``NAME.edgeskin.zip``), atomically."""
    src = Path(folder)
    reader = BundleReader(src)
    reader.verify()
    dest = Path(out) if out else src.with_name(src.name + ".zip")
    with atomic_path(dest) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.write(src / MANIFEST, f"{src.name}/{MANIFEST}")
            for name in sorted(reader.manifest.files):
                z.write(src / name, f"{src.name}/{name}")
    return dest
