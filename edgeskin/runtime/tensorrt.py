"""TensorRT on the Jetson: the engine build, the ``tensorrt`` backend, and the host proxy.

A jetson bundle carries an ONNX graph (TensorRT's explicit-INT8 QDQ form, or FP32 for an
FP16 build). TensorRT engines only run on the GPU and TensorRT version that built them, so
:func:`build_engine` builds on the device, records the engine in the manifest (TensorRT
version, GPU name, sha256) and checks it against the bundle's golden outputs before keeping
it. :func:`open_backend` picks the engine that fits this device; without TensorRT it runs the
graph through ONNX Runtime as a host proxy (numerically close to TensorRT INT8, not its speed).

Written against TensorRT's Python API (8.2 to 10.x) and cuda-python; no torch. TensorRT is
imported only inside the functions that need it.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import BundleError, BundleReader, sha256_bytes, write_bundle
from ..errors import ConfigError, EdgeskinError, require

log = logging.getLogger(__name__)


class EngineMismatch(EdgeskinError):
    """The bundle's engines were built for another TensorRT version or GPU."""


def _trt() -> Any:
    from ..errors import MissingDependencyError

    try:
        return require("tensorrt", extra="jetson", purpose="Building or running a TensorRT engine")
    except MissingDependencyError as exc:
        exc.hint = ("TensorRT ships with JetPack on the Jetson (python3-libnvinfer); on another machine use "
                    "--engine onnxruntime (the host proxy)")
        raise


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            from ..errors import MissingDependencyError

            exc = MissingDependencyError("cuda-python", "jetson", "moving data to the GPU")
            exc.hint = "pip install 'cuda-python<13' (matching JetPack's CUDA)"
            raise exc from None
    return cudart


def _check(result: Any, what: str) -> Any:
    """cuda-python calls return (err, value...); raise on a non-zero error."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise EdgeskinError(f"CUDA call {what} failed ({err})", "check the GPU and the JetPack installation")
    return rest[0] if len(rest) == 1 else (rest or None)


def gpu_name() -> str:
    cudart = _cudart()
    prop = _check(cudart.cudaGetDeviceProperties(0), "cudaGetDeviceProperties")
    name = prop.name
    return (name.decode() if isinstance(name, bytes) else str(name)).strip("\x00 ")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def precision_flags(precision: str) -> list[str]:
    """TensorRT builder flags: INT8 (for the explicit Q/DQ graph) with FP16 for the layers kept
    in float; FP16; none for FP32."""
    return {"int8": ["INT8", "FP16"], "fp16": ["FP16"], "fp32": []}[precision]


# ---------------------------------------------------------------- choosing an engine

def pick_engine(engines: list[dict[str, Any]], *, tensorrt: str, gpu: str, precision: str) -> dict[str, Any] | None:
    """The recorded engine built by this TensorRT version on this GPU; ``None`` when the bundle
    has no engine yet; :class:`EngineMismatch` when it only has engines built elsewhere."""
    if not engines:
        return None
    for e in engines:
        if e.get("tensorrt") == tensorrt and e.get("gpu") == gpu and e.get("precision", precision) == precision:
            return e
    built = ", ".join(f"TensorRT {e.get('tensorrt')} on {e.get('gpu')}" for e in engines)
    raise EngineMismatch(
        f"this bundle's engine(s) were built for {built}; this device has TensorRT {tensorrt} on {gpu}",
        "engines do not move between TensorRT versions or GPUs: rebuild it here with "
        "`edgeskin engine build BUNDLE --rebuild`",
    )


def open_backend(reader: BundleReader, model: bytes, *, engine: str = "auto", threads: int | None = None,
                 input_name: str = "input") -> tuple[Any, bool]:
    """(backend, host_proxy) for a jetson bundle. ``engine``: ``auto`` (TensorRT when installed,
    else the ONNX Runtime host proxy), ``tensorrt`` (required) or ``onnxruntime`` (the proxy)."""
    from .backends import OnnxRuntimeBackend

    if engine not in ("auto", "tensorrt", "onnxruntime"):
        raise ConfigError(f"unknown engine {engine!r}", "choose auto, tensorrt or onnxruntime")
    have_trt = engine != "onnxruntime" and _importable("tensorrt")
    if engine == "tensorrt" and not have_trt:
        _trt()  # raises the missing-dependency error
    if not have_trt:
        if engine == "auto":
            log.info("%s: TensorRT is not installed here; running the jetson graph in ONNX Runtime "
                        "(host proxy: close to TensorRT INT8 numerics, not its speed)", reader.path)
        backend = OnnxRuntimeBackend(model, threads=threads, input_name=input_name)
        backend.name = "onnxruntime (host proxy of tensorrt)"
        return backend, True
    trt = _trt()
    rec = pick_engine(reader.manifest.engine.get("engines", []), tensorrt=trt.__version__, gpu=gpu_name(),
                      precision=reader.manifest.precision)
    if rec is None:
        raise BundleError(f"{reader.path}: no TensorRT engine has been built for this device yet",
                          f"run `edgeskin engine build {reader.path}` once on this Jetson")
    return TensorRTBackend(reader.read(rec["file"])), False


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ---------------------------------------------------------------- the backend

class TensorRTBackend:
    """Runs a serialized engine with device buffers from cuda-python (TensorRT 8.5+ tensor API,
    binding API before that). Input and output are host numpy arrays."""

    name = "tensorrt"

    def __init__(self, engine_bytes: bytes) -> None:
        trt = _trt()
        self.version = trt.__version__
        self._cudart = _cudart()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise EngineMismatch("TensorRT could not load this engine (built by another TensorRT version or GPU?)",
                                 "rebuild it with `edgeskin engine build BUNDLE --rebuild`")
        self.context = self.engine.create_execution_context()
        self._tensor_api = hasattr(self.engine, "num_io_tensors")
        if self._tensor_api:
            names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
            self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            self.outputs = [n for n in names if n not in self.inputs]
        else:  # TensorRT 8.2/8.4
            names = [self.engine.get_binding_name(i) for i in range(self.engine.num_bindings)]
            self.inputs = [n for i, n in enumerate(names) if self.engine.binding_is_input(i)]
            self.outputs = [n for n in names if n not in self.inputs]
        self.stream = _check(self._cudart.cudaStreamCreate(), "cudaStreamCreate")

    def _malloc(self, nbytes: int) -> int:
        return int(_check(self._cudart.cudaMalloc(max(1, nbytes)), "cudaMalloc"))

    def run(self, x: np.ndarray) -> np.ndarray:
        cudart = self._cudart
        x = np.ascontiguousarray(x)
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        d_in = self._malloc(x.nbytes)
        buffers = [d_in]
        try:
            _check(cudart.cudaMemcpyAsync(d_in, x.ctypes.data, x.nbytes, h2d, self.stream), "cudaMemcpyAsync")
            inp, out_name = self.inputs[0], self.outputs[0]
            if self._tensor_api:
                self.context.set_input_shape(inp, tuple(x.shape))
                shape = tuple(self.context.get_tensor_shape(out_name))
                y = np.empty(shape, dtype=np.float32)
                d_out = self._malloc(y.nbytes)
                buffers.append(d_out)
                self.context.set_tensor_address(inp, d_in)
                self.context.set_tensor_address(out_name, d_out)
                if not self.context.execute_async_v3(self.stream):
                    raise EdgeskinError("TensorRT inference failed", "run `edgeskin selftest` on the bundle")
            else:
                i_in, i_out = self.engine.get_binding_index(inp), self.engine.get_binding_index(out_name)
                self.context.set_binding_shape(i_in, tuple(x.shape))
                shape = tuple(self.context.get_binding_shape(i_out))
                y = np.empty(shape, dtype=np.float32)
                d_out = self._malloc(y.nbytes)
                buffers.append(d_out)
                bindings = [0] * self.engine.num_bindings
                bindings[i_in], bindings[i_out] = d_in, d_out
                if not self.context.execute_async_v2(bindings, self.stream):
                    raise EdgeskinError("TensorRT inference failed", "run `edgeskin selftest` on the bundle")
            _check(cudart.cudaMemcpyAsync(y.ctypes.data, d_out, y.nbytes, d2h, self.stream), "cudaMemcpyAsync")
            _check(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
            return y
        finally:
            for b in buffers:
                cudart.cudaFree(b)


# ---------------------------------------------------------------- the build

def default_timing_cache(tensorrt: str, gpu: str) -> Path:
    root = Path(os.environ.get("EDGESKIN_CACHE", Path.home() / ".cache" / "edgeskin"))
    return root / "tensorrt" / f"timing-{_slug(tensorrt)}-{_slug(gpu)}.cache"


def build_engine(
    bundle: str | os.PathLike,
    *,
    precision: str | None = None,
    dla: int | None = None,
    workspace_mb: int | None = None,
    timing_cache: str | os.PathLike | None = None,
    rebuild: bool = False,
    reporter: Any = None,
) -> dict[str, Any]:
    """Build the TensorRT engine of a jetson bundle folder on this device and add it to the bundle.

    Builder flags follow the bundle's precision (INT8 + FP16 for the explicit-INT8 graph, FP16,
    or none), the workspace the device profile gives, a dynamic-batch optimisation profile, and a
    timing cache saved and reused across builds. The new engine must reproduce the bundle's
    golden outputs within the manifest's tolerance, else nothing is written.
    """
    trt = _trt()
    path = Path(bundle)
    if not path.is_dir():
        raise BundleError(f"{path}: an engine is added to a bundle folder", "unzip the bundle first")
    reader = BundleReader(path)
    reader.verify()
    m = reader.manifest
    if m.target != "jetson":
        raise ConfigError(f"{path} is a {m.target} bundle", "engines are built for jetson bundles")
    precision = precision or m.precision
    if precision == "int8" and m.precision != "int8":
        raise ConfigError(f"{path} holds an FP32 graph; INT8 needs the quantized graph",
                          "compile with --target jetson --precision int8")
    if dla is not None and precision == "int8":
        raise ConfigError("the DLA does not take explicit-quantization (Q/DQ) graphs",
                          "build --precision fp16 for the DLA, or the int8 engine on the GPU (no --dla)")
    version, gpu = trt.__version__, gpu_name()
    engines = list(m.engine.get("engines", []))
    try:
        found = pick_engine(engines, tensorrt=version, gpu=gpu, precision=precision)
    except EngineMismatch:
        found = None
    if found is not None and not rebuild:
        return found
    e = m.engine
    ws = int(workspace_mb or e.get("workspace_mb", 1024))
    batch = e.get("batch", {"min": 1, "opt": 1, "max": 8})
    spec = m.input
    dims = (lambda b: (b, 3, spec.size, spec.size)) if spec.layout == "NCHW" else (lambda b: (b, spec.size, spec.size, 3))

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(version.split(".")[0])
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(reader.read(m.model_file)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EdgeskinError(f"{path}: TensorRT {version} cannot parse the graph: {errors}",
                            "compile the bundle for this JetPack (--device/--jetpack) and run `edgeskin bundle verify`")
    config = builder.create_builder_config()
    if hasattr(config, "set_memory_pool_limit"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, ws << 20)
    else:  # TensorRT < 8.4
        config.max_workspace_size = ws << 20
    for flag in precision_flags(precision):
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if dla is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(dla)
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    profile = builder.create_optimization_profile()
    profile.set_shape(spec.name, dims(batch["min"]), dims(batch["opt"]), dims(batch["max"]))
    config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache else default_timing_cache(version, gpu)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EdgeskinError(f"{path}: TensorRT {version} could not build the engine",
                            "see the TensorRT log above; try --precision fp16 or a larger --workspace-mb")
    seconds = time.perf_counter() - t0
    data = bytes(serialized)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_suffix(".tmp")
    tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    os.replace(tmp, cache_path)

    # the golden self-test against the host-proxy outputs, before anything is written
    golden = reader.golden()
    record = {"file": f"engine-trt{_slug(version)}-{_slug(gpu)}-{precision}" + (f"-dla{dla}" if dla is not None else "")
              + ".plan", "tensorrt": version, "gpu": gpu, "precision": precision, "dla_core": dla,
              "workspace_mb": ws, "batch": batch, "sha256": sha256_bytes(data), "bytes": len(data),
              "build_seconds": round(seconds, 1), "timing_cache": str(cache_path)}
    if golden is not None:
        backend = TensorRTBackend(data)
        logits = backend.run(golden["inputs"].astype(np.float32))
        from .predictor import softmax

        probs = logits if m.output.get("kind") == "probs" else softmax(logits.astype(np.float64))
        diff = np.abs(probs - golden["probs"]).max(axis=1)
        tol = float(m.golden.get("tolerance", 5e-2))
        worst = int(np.argmax(diff))
        record["selftest"] = {"n": int(len(diff)), "max_abs_diff": float(diff.max()), "tolerance": tol,
                              "top1_agreement": float(np.mean(probs.argmax(1) == golden["probs"].argmax(1)))}
        if diff.max() > tol:
            ids = [str(s) for s in golden.get("ids", [])]
            raise EdgeskinError(
                f"{path}: the new engine disagrees with the compile-time outputs: max |Δp| {diff.max():.3g} > "
                f"{tol:g} on golden input #{worst}" + (f" ({ids[worst]})" if ids else ""),
                "the engine was not saved; try --precision fp16, or re-compile the bundle and report this")
    def same(e2: dict[str, Any]) -> bool:
        return e2.get("tensorrt") == version and e2.get("gpu") == gpu and e2.get("precision") == precision \
            and e2.get("dla_core") == dla

    replaced = {e2["file"] for e2 in engines if same(e2)}
    files = {n: reader.read(n) for n in m.files if n not in replaced}
    files[record["file"]] = data
    kept = [e2 for e2 in engines if not same(e2)]
    new_engine = {**e, "engines": kept + [record]}
    reader.close()
    write_bundle(path, m.with_(engine=new_engine), files, overwrite=True)
    return record
