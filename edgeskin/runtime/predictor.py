"""Predictor over a bundle: preprocessing from the manifest, engine from the backend table."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import numpy as np
from PIL import Image

from ..bundle import BundleError, BundleReader, Manifest
from ..errors import ConfigError, EdgeskinError
from ..preprocess import ImageSource, preprocess
from .backends import make_backend
from .numerics import softmax

Input = Union[ImageSource, np.ndarray]


@dataclass(frozen=True)
class Prediction:
    """Class probabilities of one image, in the bundle's label order, and the top-k."""

    probs: np.ndarray
    labels: tuple[str, ...]
    top_k: int = 3
    source: str = ""

    @property
    def top(self) -> list[tuple[str, float]]:
        order = np.argsort(-self.probs, kind="stable")[: self.top_k]
        return [(self.labels[i], float(self.probs[i])) for i in order]

    @property
    def label(self) -> str:
        return self.top[0][0]

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "top": [{"label": c, "probability": p} for c, p in self.top],
                "probabilities": {c: float(p) for c, p in zip(self.labels, self.probs)}}


class Predictor:
    """Runs one bundle. ``predict`` takes a path, bytes, a Pillow image, an HWC uint8 RGB array,
    a preprocessed (C, H, W) / (N, C, H, W) float32 array, or a list of those."""

    def __init__(self, reader: BundleReader, *, threads: int | None = None, engine: str = "auto",
                 dla_core: int | None = None) -> None:
        self.reader = reader
        self.manifest: Manifest = reader.manifest
        self.labels = tuple(self.manifest.labels)
        self.preprocess_config = self.manifest.input.preprocess_config()
        model = reader.read(self.manifest.model_file)  # hash-checked
        #: True when a device engine's graph runs in ONNX Runtime instead (a jetson bundle here)
        self.host_proxy = False
        name = self.manifest.engine.get("name", "onnxruntime")
        if name == "tensorrt":
            from .tensorrt import open_backend

            self.backend, self.host_proxy = open_backend(reader, model, engine=engine, threads=threads,
                                                         input_name=self.manifest.input.name, dla_core=dla_core)
        else:
            self.backend = make_backend(name, model, threads=threads, input_name=self.manifest.input.name)
        if getattr(self.backend, "handles_quantization", False):
            self._check_quantization()

    def _check_quantization(self) -> None:
        """The manifest's int8 input/output parameters must be the model's own (an app that
        quantizes by the manifest would otherwise feed the model wrong numbers)."""
        b = self.backend
        spec, out = self.manifest.input, self.manifest.output
        pairs = [("input", b.input_quant, (spec.scale, spec.zero_point) if spec.dtype != "float32" else None),
                 ("output", b.output_quant, (out.get("scale"), out.get("zero_point")) if out.get("scale") is not None else None)]
        for what, model_q, manifest_q in pairs:
            bad = (model_q is None) != (manifest_q is None) or (
                model_q is not None and (abs(float(manifest_q[0]) - model_q[0]) > 1e-6 * max(1.0, model_q[0])
                                         or int(manifest_q[1]) != model_q[1]))
            if bad:
                raise BundleError(
                    f"{self.reader.path}: the manifest's {what} quantization {manifest_q} is not the model's own "
                    f"{model_q}", "the bundle was edited or mis-built; re-compile it")

    def close(self) -> None:
        """Release the bundle (a zip's file handle) and the engine."""
        self.reader.close()
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()
        self.backend = None  # type: ignore[assignment]

    def __enter__(self) -> "Predictor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inputs
    def tensor(self, item: Input) -> np.ndarray:
        """One input decoded and preprocessed as this bundle wants it (raises for a bad file)."""
        return self._tensor(item)

    def _tensor(self, item: Input) -> np.ndarray:
        if isinstance(item, np.ndarray):
            if item.dtype == np.uint8 and item.ndim == 3 and item.shape[-1] == 3:
                return preprocess(Image.fromarray(item), self.preprocess_config)
            if item.dtype == np.float32 and item.ndim == 3:
                c = self.preprocess_config
                want = (3, c.size, c.size) if c.layout == "NCHW" else (c.size, c.size, 3)
                if item.shape != want:
                    raise ConfigError(f"preprocessed tensor of shape {item.shape} does not fit this bundle "
                                      f"(expects {want}, {c.layout})",
                                      "pass an image, or a tensor made with the bundle's preprocessing")
                return item
            raise ConfigError(f"array of shape {item.shape} and dtype {item.dtype} is not an input",
                              "pass an HWC uint8 RGB image or a preprocessed float32 tensor")
        return preprocess(item, self.preprocess_config)

    def _quantize_input(self, x: np.ndarray) -> np.ndarray:
        spec = self.manifest.input
        if spec.dtype == "float32":
            return x
        if spec.scale is None or spec.zero_point is None:
            raise ConfigError(f"{self.reader.path}: {spec.dtype} input without scale/zero point in the manifest",
                              "re-compile the bundle")
        info = np.iinfo(np.int8 if spec.dtype == "int8" else np.uint8)
        q = np.round(x / spec.scale) + spec.zero_point
        return np.clip(q, info.min, info.max).astype(info.dtype)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw model outputs for a preprocessed batch (N, C, H, W) or (N, H, W, C)."""
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if getattr(self.backend, "handles_quantization", False):  # from the model's own parameters
            y = np.asarray(self.backend.run(x), dtype=np.float64)
            if len(y) != len(x):
                raise EdgeskinError(f"the backend returned {len(y)} outputs for {len(x)} inputs",
                                    "run `edgeskin selftest` on the bundle and report this")
            return y
        y = self.backend.run(self._quantize_input(x))
        if len(y) != len(x):  # never let a short answer shift probabilities onto other images
            raise EdgeskinError(f"the {getattr(self.backend, 'name', 'engine')} backend returned {len(y)} outputs "
                                f"for {len(x)} inputs", "run `edgeskin selftest` on the bundle and report this")
        out = self.manifest.output
        if out.get("scale") is not None:  # integer outputs
            y = (y.astype(np.float64) - float(out.get("zero_point", 0))) * float(out["scale"])
        return np.asarray(y, dtype=np.float64)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        y = self.logits(batch)
        return y if self.manifest.output.get("kind") == "probs" else softmax(y)

    def predict(self, inputs: Input | Sequence[Input], *, top_k: int = 3,
                batch_size: int = 16) -> Prediction | list[Prediction]:
        single = not isinstance(inputs, (list, tuple)) and not (
            isinstance(inputs, np.ndarray) and inputs.ndim == 4)
        items: list[Any] = [inputs] if single else list(inputs)
        tensors = [self._tensor(i) for i in items]
        probs = np.concatenate([self.probabilities(np.stack(tensors[s : s + batch_size]))
                                for s in range(0, len(tensors), batch_size)]) if tensors else np.zeros((0, len(self.labels)))
        k = max(1, min(int(top_k), len(self.labels)))
        if len(probs) != len(items):
            raise EdgeskinError(f"{len(probs)} results for {len(items)} inputs", "report this")
        preds = [Prediction(p, self.labels, k, _name(i)) for p, i in zip(probs, items)]
        return preds[0] if single else preds


def _name(item: Any) -> str:
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    return ""


def load(bundle: str | os.PathLike, *, threads: int | None = None, engine: str = "auto",
         dla_core: int | None = None) -> Predictor:
    """Open a bundle (folder or zip), check its schema and hashes, and build its engine.

    ``engine`` matters for jetson bundles: ``auto`` uses TensorRT when installed and the ONNX
    Runtime host proxy otherwise; ``tensorrt`` or ``onnxruntime`` force one. ``dla_core`` picks
    the engine built for that DLA core (default: the GPU's).
    """
    return Predictor(BundleReader(bundle), threads=threads, engine=engine, dla_core=dla_core)


@dataclass(frozen=True)
class SelftestResult:
    passed: bool
    n: int
    max_abs_diff: float
    tolerance: float
    worst_index: int
    worst_id: str
    top1_agreement: float
    details: dict[str, Any] = field(default_factory=dict)


def selftest(bundle: str | os.PathLike | Predictor, *, threads: int | None = None) -> SelftestResult:
    """Re-run the bundle's golden inputs here and compare with the outputs recorded at compile
    time (largest absolute probability difference against the manifest's tolerance)."""
    pred = bundle if isinstance(bundle, Predictor) else load(bundle, threads=threads)
    golden = pred.reader.golden()
    if golden is None:
        raise ConfigError(f"{pred.reader.path}: this bundle carries no golden set", "re-compile it")
    tol = float(pred.manifest.golden.get("tolerance", 1e-3))
    probs = pred.probabilities(golden["inputs"])
    want = golden["probs"]
    per = np.abs(probs - want).max(axis=1)
    worst = int(np.argmax(per))
    ids = [str(s) for s in golden.get("ids", np.array([str(i) for i in range(len(per))]))]
    agree = float(np.mean(probs.argmax(1) == want.argmax(1)))
    return SelftestResult(bool(per.max() <= tol), len(per), float(per.max()), tol, worst, ids[worst], agree)
