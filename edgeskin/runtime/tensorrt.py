"""TensorRT on the Jetson: the engine build, the ``tensorrt`` backend, and the host proxy.

A jetson bundle carries an ONNX graph (TensorRT's explicit-INT8 Q/DQ form, or a float graph
for FP16/FP32). Engines only run on the TensorRT version and the device that built them, so
:func:`build_engine` builds on the device, records the engine in the manifest under the
device's identity (board model, compute capability, SM count, TensorRT version) and checks it
against the bundle's golden outputs before keeping it. :func:`open_backend` picks the engine
that fits this device; without TensorRT it runs the graph through ONNX Runtime as a host proxy
(numerically close to TensorRT INT8, not its speed).

Written against TensorRT's Python API from 8.5 (JetPack 5.1) to 11.x and cuda-python 11 to 13:
the name-based tensor API (``set_input_shape``, ``get_tensor_shape``, ``set_tensor_address``,
``execute_async_v3``); weakly typed builds with precision flags before TensorRT 10.12, strongly
typed builds (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``, no precision flags) from 10.12,
where weak typing is deprecated, and in 11.x, where the precision flags are gone. No torch, no
onnx; TensorRT and cuda-python are imported only inside the functions that need them. Runs on
Python 3.8 (JetPack 5's system Python).
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..bundle import BundleError, BundleReader, sha256_bytes, write_bundle
from ..errors import ConfigError, EdgeskinError, require

log = logging.getLogger(__name__)

#: the oldest TensorRT edgeskin drives: 8.5 (JetPack 5.1) has the name-based tensor API
MIN_TENSORRT = (8, 5)
#: from TensorRT 10.12 weak typing is deprecated (and gone in 11.x): build strongly typed
STRONG_TYPING_FROM = (10, 12)
#: where the Jetson's device tree is (a container may mount the host's elsewhere)
DEVICE_TREE_ENV = "EDGESKIN_DEVICE_TREE"


class EngineMismatch(EdgeskinError):
    """The bundle's engines were built for another TensorRT version or device."""


def version_tuple(version: str) -> Tuple[int, int]:
    parts = re.findall(r"\d+", str(version))
    if not parts:
        raise ConfigError(f"cannot read the TensorRT version {version!r}", "check the TensorRT installation")
    return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0


def strongly_typed(tensorrt: str) -> bool:
    """Whether edgeskin builds strongly typed networks with this TensorRT (10.12 and later)."""
    return version_tuple(tensorrt) >= STRONG_TYPING_FROM


def _trt() -> Any:
    from ..errors import MissingDependencyError

    try:
        trt = require("tensorrt", extra="jetson", purpose="Building or running a TensorRT engine")
    except MissingDependencyError as exc:
        exc.hint = ("TensorRT ships with JetPack on the Jetson (python3-libnvinfer); on another machine use "
                    "--engine onnxruntime (the host proxy)")
        raise
    if version_tuple(trt.__version__) < MIN_TENSORRT:
        raise ConfigError(
            f"TensorRT {trt.__version__} is too old: edgeskin needs TensorRT 8.5 or later (JetPack 5.1 or later)",
            "JetPack 4.6 (TensorRT 8.2, Python 3.6) is end of life; flash JetPack 5.1 or later")
    return trt


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # cuda-python 11.x to 12.x
        except ImportError:
            from ..errors import MissingDependencyError

            exc = MissingDependencyError("cuda-python", "jetson", "moving data to the GPU")
            exc.hint = ("pip install the cuda-python your JetPack's CUDA takes (see `edgeskin devices --show "
                        "DEVICE`: cuda_python), e.g. 'cuda-python>=12.6,<12.7' on JetPack 6.1/6.2")
            raise exc from None
    return cudart


def _check(result: Any, what: str) -> Any:
    """cuda-python calls return (err, value...); raise on a non-zero error."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise EdgeskinError(f"CUDA call {what} failed ({err})", "check the GPU and the JetPack installation")
    return rest[0] if len(rest) == 1 else (rest or None)


def _ok(result: Any, what: str, hint: str = "run `edgeskin selftest` on the bundle") -> None:
    """TensorRT calls that report success as a bool."""
    if result is False or result is None:
        raise EdgeskinError(f"TensorRT call {what} failed", hint)


# ---------------------------------------------------------------- the device's identity

def board_model() -> str:
    """The Jetson's board model from its device tree (e.g. "NVIDIA Jetson AGX Orin Developer
    Kit"); "" on a machine without one. Every Orin module reports the GPU name "Orin"; this
    string is what tells them apart."""
    roots = [os.environ[DEVICE_TREE_ENV]] if os.environ.get(DEVICE_TREE_ENV) else \
        ["/proc/device-tree", "/sys/firmware/devicetree/base"]
    for root in roots:
        try:
            return (Path(root) / "model").read_bytes().decode("utf-8", "replace").strip("\x00 \n")
        except OSError:
            continue
    return ""


def device_identity() -> Dict[str, Any]:
    """What an engine and a timing cache are keyed on, besides the TensorRT version: the board
    model, the GPU's name, compute capability and SM count."""
    cudart = _cudart()
    prop = _check(cudart.cudaGetDeviceProperties(0), "cudaGetDeviceProperties")
    name = prop.name
    name = (name.decode() if isinstance(name, bytes) else str(name)).strip("\x00 ")
    return {"board": board_model(), "gpu": name, "compute_capability": f"{int(prop.major)}.{int(prop.minor)}",
            "sm_count": int(prop.multiProcessorCount)}


def gpu_name() -> str:
    return str(device_identity()["gpu"])


IDENTITY_KEYS = ("board", "gpu", "compute_capability", "sm_count")


def _describe(ident: Dict[str, Any]) -> str:
    return (f"{ident.get('board') or ident.get('gpu')} (sm {ident.get('compute_capability')}, "
            f"{ident.get('sm_count')} SMs)")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", str(text)).strip("-").lower()


def precision_flags(precision: str, *, tensorrt: Optional[str] = None) -> List[str]:
    """TensorRT builder flags for a weakly typed build: INT8 (the explicit Q/DQ graph) with FP16
    for the layers kept in float; FP16; none for FP32. None at all for a strongly typed build
    (TensorRT 10.12 and later), where the graph's tensor types decide."""
    if tensorrt is not None and strongly_typed(tensorrt):
        return []
    return {"int8": ["INT8", "FP16"], "fp16": ["FP16"], "fp32": []}[precision]


# ---------------------------------------------------------------- choosing an engine

def pick_engine(engines: List[Dict[str, Any]], *, tensorrt: str, device: Dict[str, Any],
                precision: Optional[str] = None, dla_core: Optional[int] = None) -> Optional[Dict[str, Any]]:
    """The recorded engine built by this TensorRT version on this device (same board model,
    compute capability and SM count) for ``dla_core`` (None: the GPU), preferring
    ``precision``; ``None`` when the bundle has no engine yet; :class:`EngineMismatch` when it
    only has engines built elsewhere."""
    if not engines:
        return None
    here = [e for e in engines if e.get("tensorrt") == tensorrt
            and all(e.get("device", {}).get(k) == device.get(k) for k in IDENTITY_KEYS)]
    fits = [e for e in here if e.get("dla_core") == dla_core]
    if fits:
        return next((e for e in fits if e.get("precision") == precision), fits[0])
    built = "; ".join(f"TensorRT {e.get('tensorrt')} on {_describe(e.get('device') or {'gpu': e.get('gpu')})}"
                      + (f" DLA core {e['dla_core']}" if e.get("dla_core") is not None else "") for e in engines)
    where = "the GPU" if dla_core is None else f"DLA core {dla_core}"
    raise EngineMismatch(
        f"this bundle's engine(s) were built for {built}; this device is TensorRT {tensorrt} on "
        f"{_describe(device)}, {where}",
        "engines do not move between TensorRT versions or devices: rebuild it here with "
        "`edgeskin engine build BUNDLE --rebuild`" + (f" --dla {dla_core}" if dla_core is not None else ""),
    )


def open_backend(reader: BundleReader, model: bytes, *, engine: str = "auto", threads: Optional[int] = None,
                 input_name: str = "input", dla_core: Optional[int] = None) -> Tuple[Any, bool]:
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
    rec = pick_engine(reader.manifest.engine.get("engines", []), tensorrt=trt.__version__,
                      device=device_identity(), precision=reader.manifest.precision, dla_core=dla_core)
    if rec is None:
        raise BundleError(f"{reader.path}: no TensorRT engine has been built for this device yet",
                          f"run `edgeskin engine build {reader.path}` once on this Jetson")
    return TensorRTBackend(reader.read(rec["file"])), False


def _importable(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ValueError:  # a module in sys.modules without a spec
        return False


# ---------------------------------------------------------------- the backend

class TensorRTBackend:
    """Runs a serialized engine. Input and output are host numpy arrays.

    One execution context; its device buffers and pinned host buffers are allocated once, for
    the optimization profile's largest batch, and reused by every call (latency measured
    through ``run`` never includes an allocation). A batch larger than the profile's maximum
    runs in slices of that maximum; every ``set_input_shape`` is checked and the output shape is
    read back for each slice; a static-shape engine (DLA) gets its slices padded to its batch.
    """

    name = "tensorrt"

    def __init__(self, engine_bytes: bytes) -> None:
        trt = _trt()
        self.version = trt.__version__
        self._cudart = _cudart()
        self._buffers: List[Tuple[str, int]] = []
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise EngineMismatch("TensorRT could not load this engine (built by another TensorRT version or device?)",
                                 "rebuild it with `edgeskin engine build BUNDLE --rebuild`")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EdgeskinError("TensorRT could not create an execution context", "check free GPU memory")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise BundleError(f"the engine has inputs {inputs} and outputs {outputs}; edgeskin expects one of each",
                              "re-compile the bundle")
        self.input, self.output = inputs[0], outputs[0]
        lo, _opt, hi = (tuple(int(d) for d in s) for s in self.engine.get_tensor_profile_shape(self.input, 0))
        self.min_batch, self.max_batch = lo[0], hi[0]
        self.item_shape = hi[1:]
        self.in_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.input)))
        self.out_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.output)))
        self._batch = -1
        out_shape = self._set_batch(self.max_batch)
        self.out_item_shape = out_shape[1:]
        cudart = self._cudart
        try:
            self.stream = _check(cudart.cudaStreamCreate(), "cudaStreamCreate")
            in_bytes = self.max_batch * int(np.prod(self.item_shape)) * self.in_dtype.itemsize
            out_bytes = self.max_batch * int(np.prod(self.out_item_shape)) * self.out_dtype.itemsize
            self._d_in = self._alloc("cudaMalloc", in_bytes)
            self._d_out = self._alloc("cudaMalloc", out_bytes)
            self._h_in = self._host_array(self._alloc("cudaMallocHost", in_bytes), in_bytes, self.in_dtype,
                                          (self.max_batch,) + self.item_shape)
            self._h_out = self._host_array(self._alloc("cudaMallocHost", out_bytes), out_bytes, self.out_dtype,
                                           (self.max_batch,) + self.out_item_shape)
            _ok(self.context.set_tensor_address(self.input, self._d_in), "set_tensor_address(input)")
            _ok(self.context.set_tensor_address(self.output, self._d_out), "set_tensor_address(output)")
        except BaseException:
            self.close()
            raise

    # -- buffers
    def _alloc(self, kind: str, nbytes: int) -> int:
        ptr = int(_check(getattr(self._cudart, kind)(max(1, int(nbytes))), kind))
        self._buffers.append((kind, ptr))
        return ptr

    @staticmethod
    def _host_array(ptr: int, nbytes: int, dtype: np.dtype, shape: Tuple[int, ...]) -> np.ndarray:
        raw = (ctypes.c_ubyte * nbytes).from_address(ptr)
        return np.frombuffer(raw, dtype=np.uint8).view(dtype).reshape(shape)

    def close(self) -> None:
        """Free the device and pinned host buffers (also done when the backend is collected)."""
        buffers, self._buffers = self._buffers, []
        for kind, ptr in reversed(buffers):
            (self._cudart.cudaFree if kind == "cudaMalloc" else self._cudart.cudaFreeHost)(ptr)

    def __del__(self) -> None:  # pragma: no cover - depends on the collector
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    # -- running
    def _set_batch(self, batch: int) -> Tuple[int, ...]:
        """Set the input shape for ``batch`` images and return the output shape TensorRT resolves."""
        if batch != self._batch:
            shape = (batch,) + tuple(self.item_shape)
            if not self.context.set_input_shape(self.input, shape):
                self._batch = -1
                raise EdgeskinError(
                    f"TensorRT refused input shape {shape} (the engine's profile takes batches "
                    f"{self.min_batch} to {self.max_batch})", "rebuild the engine with `edgeskin engine build --rebuild`")
            self._batch = batch
        out = tuple(int(d) for d in self.context.get_tensor_shape(self.output))
        if any(d < 0 for d in out) or out[0] != batch:
            raise EdgeskinError(f"TensorRT left the output shape unresolved ({out}) for a batch of {batch}",
                                "rebuild the engine with `edgeskin engine build --rebuild`")
        return out

    def run(self, x: np.ndarray) -> np.ndarray:
        cudart = self._cudart
        x = np.asarray(x)
        if tuple(x.shape[1:]) != tuple(self.item_shape):
            raise ConfigError(f"input of shape {x.shape} does not fit the engine ({self.item_shape} per image)",
                              "use the bundle's preprocessing")
        n = len(x)
        y = np.empty((n,) + tuple(self.out_item_shape), dtype=np.float32)
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for s in range(0, n, self.max_batch):
            chunk = x[s : s + self.max_batch]
            k = len(chunk)
            batch = max(k, self.min_batch)  # a static-shape engine runs its own batch, padded
            out_shape = self._set_batch(batch)
            self._h_in[:k] = chunk
            if batch > k:
                self._h_in[k:batch] = 0
            in_bytes = batch * self._h_in[0].nbytes
            out_bytes = int(np.prod(out_shape)) * self.out_dtype.itemsize
            _check(cudart.cudaMemcpyAsync(self._d_in, self._h_in.ctypes.data, in_bytes, h2d, self.stream),
                   "cudaMemcpyAsync")
            _ok(self.context.execute_async_v3(int(self.stream)), "execute_async_v3")
            _check(cudart.cudaMemcpyAsync(self._h_out.ctypes.data, self._d_out, out_bytes, d2h, self.stream),
                   "cudaMemcpyAsync")
            _check(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
            y[s : s + k] = self._h_out[:k]
        return y


# ---------------------------------------------------------------- the device's power state

def jetson_power_state(*, sysfs: str = "/sys") -> Dict[str, Any]:
    """The Jetson's power mode (``nvpmodel -q``) and whether its clocks are locked
    (``jetson_clocks``: CPU minimum frequency at its maximum, GPU minimum at its maximum).
    Both change latency severalfold, so every latency figure taken on the device carries them.
    ``None`` where this machine cannot tell."""
    state: Dict[str, Any] = {"power_mode": None, "power_mode_id": None, "clocks_locked": None}
    exe = shutil.which("nvpmodel")
    if exe:
        try:
            out = subprocess.run([exe, "-q"], capture_output=True, text=True, timeout=10).stdout
            m = re.search(r"NV Power Mode:\s*(\S+)\s*(\d+)?", out)
            if m:
                state["power_mode"] = m.group(1)
                state["power_mode_id"] = int(m.group(2)) if m.group(2) else None
        except (OSError, subprocess.SubprocessError):
            pass
    root = Path(sysfs)

    def freq(p: Path) -> Optional[int]:
        try:
            return int(p.read_text().strip())
        except (OSError, ValueError):
            return None

    locked: List[bool] = []
    for cpu in sorted((root / "devices/system/cpu").glob("cpu[0-9]*/cpufreq")):
        lo, hi = freq(cpu / "scaling_min_freq"), freq(cpu / "cpuinfo_max_freq")
        if lo is not None and hi is not None:
            locked.append(lo == hi)
    gpus = [d for d in (root / "class/devfreq").glob("*")
            if re.search(r"gpu|ga10b|gv11b|gp10b|gb10b", d.name) and (d / "max_freq").is_file()]
    for d in gpus:
        lo, hi = freq(d / "min_freq"), freq(d / "max_freq")
        if lo is not None and hi is not None:
            locked.append(lo == hi)
    if locked and gpus:
        state["clocks_locked"] = all(locked)
    return state


# ---------------------------------------------------------------- the build

def default_timing_cache(tensorrt: str, device: Dict[str, Any]) -> Path:
    root = Path(os.environ.get("EDGESKIN_CACHE", Path.home() / ".cache" / "edgeskin"))
    key = _slug(f"{device.get('board') or device.get('gpu')}-sm{device.get('compute_capability')}-"
                f"{device.get('sm_count')}sm")
    return root / "tensorrt" / f"timing-{_slug(tensorrt)}-{key}.cache"


def _batch_profile(e: Dict[str, Any], dla: Optional[int]) -> Dict[str, int]:
    batch = dict(e.get("batch", {"min": 1, "opt": 1, "max": 8}))
    if dla is not None:  # DLA takes static shapes only: min = opt = max
        b = int(batch.get("opt", 1))
        batch = {"min": b, "opt": b, "max": b}
    return batch


def build_engine(
    bundle: "str | os.PathLike[str]",
    *,
    precision: Optional[str] = None,
    dla: Optional[int] = None,
    workspace_mb: Optional[int] = None,
    timing_cache: "str | os.PathLike[str] | None" = None,
    rebuild: bool = False,
    reporter: Any = None,
) -> Dict[str, Any]:
    """Build the TensorRT engine of a jetson bundle folder on this device and add it to the bundle.

    Weakly typed with precision flags before TensorRT 10.12 (INT8 + FP16 for the explicit-INT8
    graph, FP16, or none); strongly typed from 10.12, where the graph's tensor types (made at
    compile time for the bundle's JetPack) decide. The workspace the device profile gives, a
    dynamic-batch optimisation profile (static on the DLA), and a timing cache keyed on the
    TensorRT version and the device, reused across builds. The new engine must reproduce the
    bundle's golden outputs within the manifest's tolerance, else nothing is written.
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
    e = m.engine
    version = trt.__version__
    strong = strongly_typed(version)
    precision = precision or m.precision
    if precision not in ("int8", "fp16", "fp32"):
        raise ConfigError(f"unknown precision {precision!r}", "choose int8, fp16 or fp32")
    if (precision == "int8") != (m.precision == "int8"):
        raise ConfigError(
            f"{path} is a {m.precision} bundle; its graph makes only "
            + ("INT8 engines (it is explicitly quantized)" if m.precision == "int8" else "float engines"),
            f"compile the bundle with --target jetson --precision {precision}")
    float_tensors = e.get("float_tensors", "float32")
    if strong and precision != "fp32" and float_tensors != "float16":
        raise ConfigError(
            f"TensorRT {version} builds strongly typed networks, which run float layers in the graph's own "
            f"precision; this bundle's graph (compiled for TensorRT {e.get('tensorrt')}) keeps them in FP32, so "
            f"its {precision} engine would silently run them in FP32",
            "compile the bundle for this JetPack (--jetpack 7.0 or the device's), which stores FP16 tensors")
    if strong and precision == "fp32" and float_tensors == "float16":
        raise ConfigError(f"this bundle's graph holds FP16 tensors; TensorRT {version} builds it as typed",
                          "build it at the bundle's precision (no --precision fp32)")
    if dla is not None:
        if precision == "int8":
            raise ConfigError("the DLA does not take explicit-quantization (Q/DQ) graphs",
                              "compile --precision fp16 for the DLA, or build the int8 engine on the GPU (no --dla)")
        if not e.get("dla", e.get("dla_cores", 0) > 0) or int(dla) >= int(e.get("dla_cores", 0)) or int(dla) < 0:
            raise ConfigError(
                f"DLA core {dla} is not available: the bundle's profile ({e.get('device')}, JetPack "
                f"{e.get('jetpack')}, TensorRT {e.get('tensorrt')}) has "
                + (f"{e.get('dla_cores', 0)} DLA core(s)" if e.get("dla") else "no DLA support"),
                "build for the GPU (no --dla)")
    ident = device_identity()
    engines = list(e.get("engines", []))
    try:
        found = pick_engine(engines, tensorrt=version, device=ident, precision=precision, dla_core=dla)
    except EngineMismatch:
        found = None
    if found is not None and found.get("precision") == precision and not rebuild:
        return found
    ws = int(workspace_mb or e.get("workspace_mb", 1024))
    batch = _batch_profile(e, dla)
    spec = m.input
    dims = (lambda b: (b, 3, spec.size, spec.size)) if spec.layout == "NCHW" else (lambda b: (b, spec.size, spec.size, 3))

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if version_tuple(version)[0] < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if strong and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(reader.read(m.model_file)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EdgeskinError(f"{path}: TensorRT {version} cannot parse the graph: {errors}",
                            "compile the bundle for this JetPack (--device/--jetpack) and run `edgeskin bundle verify`")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, ws << 20)
    used_flags = precision_flags(precision, tensorrt=version)
    for flag in used_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if dla is not None:
        if int(getattr(builder, "num_DLA_cores", 0)) <= int(dla):
            raise ConfigError(f"this device has {getattr(builder, 'num_DLA_cores', 0)} DLA core(s); --dla {dla} "
                              "asks for another", "build for the GPU (no --dla)")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(dla)
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    profile = builder.create_optimization_profile()
    profile.set_shape(spec.name, dims(batch["min"]), dims(batch["opt"]), dims(batch["max"]))
    if config.add_optimization_profile(profile) < 0:
        raise EdgeskinError(f"TensorRT refused the optimization profile {batch}", "check the bundle's engine.batch")

    cache_path = Path(timing_cache) if timing_cache else default_timing_cache(version, ident)
    cache_note = _use_timing_cache(config, cache_path)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EdgeskinError(f"{path}: TensorRT {version} could not build the engine",
                            "see the TensorRT log above; try a larger --workspace-mb")
    seconds = time.perf_counter() - t0
    data = bytes(serialized)
    cache_note["saved"] = _save_timing_cache(config, cache_path)

    record: Dict[str, Any] = {
        "file": f"engine-trt{_slug(version)}-{_slug(ident['board'] or ident['gpu'])}-sm"
                f"{_slug(ident['compute_capability'])}x{ident['sm_count']}-{precision}"
                + (f"-dla{dla}" if dla is not None else "") + ".plan",
        "tensorrt": version, "device": ident, "gpu": ident["gpu"], "precision": precision,
        "typing": "strong" if strong else "weak", "builder_flags": used_flags,
        "float_tensors": float_tensors, "dla_core": dla, "workspace_mb": ws, "batch": batch,
        "sha256": sha256_bytes(data), "bytes": len(data), "build_seconds": round(seconds, 1),
        "timing_cache": cache_note,
    }
    # the golden self-test against the host-proxy outputs, before anything is written
    golden = reader.golden()
    if golden is not None:
        backend = TensorRTBackend(data)
        try:
            logits = backend.run(golden["inputs"].astype(np.float32))
        finally:
            backend.close()
        from .numerics import softmax

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
                "the engine was not saved; re-compile the bundle and report this")

    def same(e2: Dict[str, Any]) -> bool:
        return e2.get("tensorrt") == version and e2.get("dla_core") == dla and \
            all((e2.get("device") or {}).get(k) == ident.get(k) for k in IDENTITY_KEYS)

    replaced = {e2["file"] for e2 in engines if same(e2)}
    files = {n: reader.read(n) for n in m.files if n not in replaced}
    files[record["file"]] = data
    kept = [e2 for e2 in engines if not same(e2)]
    new_engine = dict(e)
    new_engine["engines"] = kept + [record]
    reader.close()
    write_bundle(path, m.with_(engine=new_engine), files, overwrite=True)
    return record


def _use_timing_cache(config: Any, cache_path: Path) -> Dict[str, Any]:
    """Load the timing cache into the builder config, checking what TensorRT says: a cache from
    another TensorRT version or device is not applied, and the build starts a fresh one."""
    note: Dict[str, Any] = {"path": str(cache_path), "loaded": False}
    blob = b""
    if cache_path.is_file():
        blob = cache_path.read_bytes()
    cache = config.create_timing_cache(blob)
    if cache is not None and config.set_timing_cache(cache, False):
        note["loaded"] = bool(blob)
        return note
    if blob:
        log.warning("%s: TensorRT did not accept this timing cache (another TensorRT version or device); "
                    "starting a fresh one", cache_path)
        note["rejected"] = True
    fresh = config.create_timing_cache(b"")
    if fresh is None or not config.set_timing_cache(fresh, False):
        log.warning("TensorRT did not accept a fresh timing cache; building without one")
        note["unused"] = True
    return note


def _save_timing_cache(config: Any, cache_path: Path) -> bool:
    cache = config.get_timing_cache()
    if cache is None:  # no cache was set (or TensorRT kept none)
        return False
    data = cache.serialize()
    if data is None:
        return False
    from ..fileio import atomic_write_bytes

    atomic_write_bytes(cache_path, bytes(data))
    return True
