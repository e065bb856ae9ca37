"""TEST DOUBLE for NVIDIA TensorRT's Python API (``tensorrt``) and cuda-python's runtime API
(``cuda.bindings.runtime`` / ``cuda.cudart``).

Why it exists: TensorRT cannot be installed on the machines that run edgeskin's tests (its
packages fetch their libraries from a vendor index these machines cannot reach), yet
edgeskin's engine build and TensorRT backend must be exercised end to end. This module
simulates only the vendor's glue, following TensorRT's *documented* contract; every rule it
enforces cites the page it comes from. The numerical work is real: the double's "engine" runs
the very ONNX graph the builder was given through ONNX Runtime, so edgeskin's build, save,
load, batching and output mapping run for real.

It never replaces a real TensorRT: :func:`install` refuses when ``tensorrt`` is importable,
and the contract tests in ``tests/test_jetson.py`` run against the real TensorRT wherever it is
installed, so this double can be caught lying.

Documentation the rules come from (TensorRT 8.5 to 11.x, cuda-python 11 to 13):

- [PY-EXEC]  IExecutionContext: https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/ExecutionContext.html
  (``set_input_shape`` returns a bool, ``get_tensor_shape`` gives -1 for dimensions not yet
  known, ``set_tensor_address``, ``execute_async_v3(stream_handle)`` returns a bool)
- [DYN]      Working with Dynamic Shapes: https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/work-dynamic-shapes.html
  ("after setting input dimensions, you can get the output dimensions"; an input outside the
  optimization profile is an error)
- [PROFILE]  IOptimizationProfile: https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/OptimizationProfile.html
- [DLA]      DLA Supported Layers and Restrictions: https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/dla-layer-restrictions.html
  ("DLA does not support dynamic dimensions, so the profile's min, max, and opt values must be
  equal")
- [BUILDER]  Builder / NetworkDefinitionCreationFlag: https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Builder.html
  (EXPLICIT_BATCH ignored from 10.0; STRONGLY_TYPED)
- [MIGR11]   Migrating Python code from TensorRT 10.x to 11.x, removed APIs: https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x-python-api-reference.html
  (BuilderFlag.FP16 and BuilderFlag.INT8 removed; strong typing always enforced)
- [REL11]    TensorRT 11.0.0 release notes: https://docs.nvidia.com/deeplearning/tensorrt/11.0.0/getting-started/release-notes-11/11.0.0.html
  (networks are strongly typed by default; weak typing no longer supported)
- [TYPING]   Strongly typed networks: https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/advanced.html#strongly-typed-networks
  (tensor types follow the network; precision builder flags are not allowed with it; weak
  typing deprecated from 10.12)
- [CONFIG]   IBuilderConfig: https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/BuilderConfig.html
  (``set_timing_cache`` returns a bool; ``get_timing_cache`` returns None when no cache is set)
- [TCACHE]   ITimingCache: https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/TimingCache.html
  (a cache only combines with one from the exact same TensorRT version; ignore_mismatch for one
  from another device)
- [ENGINE]   ICudaEngine / Runtime: https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Engine.html
  and the developer guide's "engines are specific to the TensorRT version and GPU they were
  built on" (https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/advanced.html#engine-compatibility)
- [ONNX]     ONNX parser support matrix (opsets per release): https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md
- [CUDART]   cuda-python runtime API: https://nvidia.github.io/cuda-python/cuda-bindings/latest/module/runtime.html
  (every call returns a tuple whose first element is a ``cudaError_t``)

Use::

    import tensorrt_double
    mods = tensorrt_double.install("10.3", board="orin-nano")   # in this process
    env = tensorrt_double.subprocess_env(tmp_path, "10.3", board="orin-nano")   # child processes
"""

from __future__ import annotations

import ctypes
import enum
import importlib.machinery
import importlib.util
import json
import os
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ENV = "EDGESKIN_TEST_TENSORRT_DOUBLE"
MAGIC = b"TRTDOUBLE1\n"

#: simulated boards: the device-tree model string, the CUDA device name, compute capability,
#: SM count, memory and DLA cores (NVIDIA's Jetson module data sheets)
BOARDS: dict[str, dict[str, Any]] = {
    "agx-orin": {"model": "NVIDIA Jetson AGX Orin Developer Kit", "name": "Orin", "cc": (8, 7), "sm": 16,
                 "memory_gb": 32, "dla": 2},
    "orin-nx-16": {"model": "NVIDIA Jetson Orin NX Engineering Reference Developer Kit", "name": "Orin",
                   "cc": (8, 7), "sm": 8, "memory_gb": 16, "dla": 2},
    "orin-nx-8": {"model": "NVIDIA Jetson Orin NX 8GB Engineering Reference Developer Kit", "name": "Orin",
                  "cc": (8, 7), "sm": 8, "memory_gb": 8, "dla": 1},
    "orin-nano": {"model": "NVIDIA Jetson Orin Nano Developer Kit", "name": "Orin", "cc": (8, 7), "sm": 8,
                  "memory_gb": 8, "dla": 0},
    "xavier-nx": {"model": "NVIDIA Jetson Xavier NX Developer Kit", "name": "Xavier", "cc": (7, 2), "sm": 6,
                  "memory_gb": 8, "dla": 2},
    "agx-thor": {"model": "NVIDIA Jetson AGX Thor Developer Kit", "name": "NVIDIA Thor", "cc": (11, 0), "sm": 20,
                 "memory_gb": 128, "dla": 0},
}

#: simulated releases: full version, highest ONNX opset its parser takes [ONNX], the
#: cuda-python generation JetPack pairs it with, and which API generation it has
VERSIONS: dict[str, dict[str, Any]] = {
    # 8.2 (JetPack 4.6) only to check that edgeskin refuses it; its binding-era API is not simulated
    "8.2": {"version": "8.2.1.8", "max_opset": 13, "cuda_python": 11},
    "8.5": {"version": "8.5.2.2", "max_opset": 17, "cuda_python": 11},
    "8.6": {"version": "8.6.2.3", "max_opset": 17, "cuda_python": 12},
    "10.3": {"version": "10.3.0.30", "max_opset": 20, "cuda_python": 12},
    "10.13": {"version": "10.13.3.9", "max_opset": 22, "cuda_python": 13},
    "11.0": {"version": "11.0.0.8", "max_opset": 22, "cuda_python": 13},
}


def _vt(version: str) -> tuple[int, int]:
    parts = version.split(".")
    return int(parts[0]), int(parts[1])


# ====================================================================== cuda-python double

class cudaError_t(enum.IntEnum):  # noqa: N801 - the vendor's name
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2


class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3


class cudaStream_t:  # noqa: N801
    def __init__(self, handle: int) -> None:
        self._h = handle

    def __int__(self) -> int:
        return self._h

    def getPtr(self) -> int:  # noqa: N802 - the vendor's name
        return self._h


class _Props:
    def __init__(self, board: dict[str, Any]) -> None:
        self.name = board["name"].encode() + b"\x00" * 8
        self.major, self.minor = board["cc"]
        self.multiProcessorCount = board["sm"]
        self.totalGlobalMem = int(board["memory_gb"] * (1 << 30))


class CudaRuntime:
    """The calls edgeskin makes, with cuda-python's convention: a tuple whose first element is
    the error code [CUDART]. "Device" memory is host memory here, but every copy is checked
    against the allocation it touches, and every allocation is counted."""

    cudaError_t = cudaError_t
    cudaMemcpyKind = cudaMemcpyKind

    def __init__(self, board: dict[str, Any]) -> None:
        self._board = board
        self._device: dict[int, ctypes.Array] = {}
        self._host: dict[int, ctypes.Array] = {}
        self.stats = {"cudaMalloc": 0, "cudaMallocHost": 0, "cudaFree": 0, "cudaFreeHost": 0, "copies": 0}
        self._streams = 0

    # -- device
    def cudaGetDeviceProperties(self, device: int):  # noqa: N802
        if int(device) != 0:
            return (cudaError_t.cudaErrorInvalidValue, None)
        return (cudaError_t.cudaSuccess, _Props(self._board))

    def cudaSetDevice(self, device: int):  # noqa: N802
        return (cudaError_t.cudaSuccess if int(device) == 0 else cudaError_t.cudaErrorInvalidValue,)

    # -- memory
    def _alloc(self, table: dict[int, ctypes.Array], size: int, what: str):
        if int(size) <= 0:
            return (cudaError_t.cudaErrorInvalidValue, 0)
        buf = (ctypes.c_ubyte * int(size))()
        ptr = ctypes.addressof(buf)
        table[ptr] = buf
        self.stats[what] += 1
        return (cudaError_t.cudaSuccess, ptr)

    def cudaMalloc(self, size: int):  # noqa: N802
        return self._alloc(self._device, size, "cudaMalloc")

    def cudaMallocHost(self, size: int):  # noqa: N802
        return self._alloc(self._host, size, "cudaMallocHost")

    def cudaFree(self, ptr: int):  # noqa: N802
        if self._device.pop(int(ptr), None) is None:
            return (cudaError_t.cudaErrorInvalidValue,)
        self.stats["cudaFree"] += 1
        return (cudaError_t.cudaSuccess,)

    def cudaFreeHost(self, ptr: int):  # noqa: N802
        if self._host.pop(int(ptr), None) is None:
            return (cudaError_t.cudaErrorInvalidValue,)
        self.stats["cudaFreeHost"] += 1
        return (cudaError_t.cudaSuccess,)

    def device_range_ok(self, ptr: int, nbytes: int) -> bool:
        for base, buf in self._device.items():
            if base <= ptr and ptr + nbytes <= base + ctypes.sizeof(buf):
                return True
        return False

    def cudaMemcpyAsync(self, dst: int, src: int, count: int, kind: Any, stream: Any):  # noqa: N802
        kind = cudaMemcpyKind(int(kind))
        dst, src, count = int(dst), int(src), int(count)
        dev_dst = kind in (cudaMemcpyKind.cudaMemcpyHostToDevice, cudaMemcpyKind.cudaMemcpyDeviceToDevice)
        dev_src = kind in (cudaMemcpyKind.cudaMemcpyDeviceToHost, cudaMemcpyKind.cudaMemcpyDeviceToDevice)
        if (dev_dst and not self.device_range_ok(dst, count)) or (dev_src and not self.device_range_ok(src, count)):
            return (cudaError_t.cudaErrorInvalidValue,)
        ctypes.memmove(dst, src, count)
        self.stats["copies"] += 1
        return (cudaError_t.cudaSuccess,)

    def cudaMemcpy(self, dst: int, src: int, count: int, kind: Any):  # noqa: N802
        return self.cudaMemcpyAsync(dst, src, count, kind, None)

    # -- streams
    def cudaStreamCreate(self):  # noqa: N802
        self._streams += 1
        return (cudaError_t.cudaSuccess, cudaStream_t(0x1000 + self._streams))

    def cudaStreamSynchronize(self, stream: Any):  # noqa: N802
        return (cudaError_t.cudaSuccess,)

    def cudaStreamDestroy(self, stream: Any):  # noqa: N802
        return (cudaError_t.cudaSuccess,)


# ====================================================================== tensorrt double

class Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class Logger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = (Severity.INTERNAL_ERROR, Severity.ERROR, Severity.WARNING,
                                                     Severity.INFO, Severity.VERBOSE)
    Severity = Severity

    def __init__(self, min_severity: Severity = Severity.WARNING) -> None:
        self.min_severity = min_severity
        self.messages: list[tuple[Severity, str]] = []

    def log(self, severity: Severity, msg: str) -> None:
        self.messages.append((severity, msg))
        if severity <= self.min_severity:
            sys.stderr.write(f"[TensorRT double] {severity.name}: {msg}\n")


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3


_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8, DataType.INT32: np.int32}


def nptype(dtype: DataType) -> type:
    return _NP[DataType(dtype)]


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class DeviceType(enum.IntEnum):
    GPU = 0
    DLA = 1


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0
    DLA_MANAGED_SRAM = 1


class IHostMemory(bytes):
    """Serialized bytes; the real one supports the buffer protocol (``bytes(mem)`` works)."""

    @property
    def nbytes(self) -> int:
        return len(self)


class _Tensor:
    def __init__(self, name: str, shape: tuple[int, ...], dtype: DataType) -> None:
        self.name, self.shape, self.dtype = name, shape, dtype


class INetworkDefinition:
    def __init__(self, builder: "Builder", flags: int) -> None:
        self.builder = builder
        self.flags = int(flags)
        self.inputs: list[_Tensor] = []
        self.outputs: list[_Tensor] = []
        self.onnx: bytes | None = None
        self.has_qdq = False
        self.float_types: set[str] = set()

    @property
    def explicit_batch(self) -> bool:
        api = self.builder.api
        if api.major >= 10:  # [BUILDER] networks are always explicit batch from 10.0
            return True
        return bool(self.flags & (1 << int(api.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)))

    @property
    def strongly_typed(self) -> bool:
        api = self.builder.api
        if api.major >= 11:  # [REL11] strongly typed by default, weak typing gone
            return True
        flag = getattr(api.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        return flag is not None and bool(self.flags & (1 << int(flag)))

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    @property
    def num_outputs(self) -> int:
        return len(self.outputs)

    def get_input(self, i: int) -> _Tensor:
        return self.inputs[i]

    def get_output(self, i: int) -> _Tensor:
        return self.outputs[i]


class OnnxParser:
    def __init__(self, network: INetworkDefinition, logger: Logger) -> None:
        self.network, self.logger = network, logger
        self.errors: list[str] = []

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, i: int) -> str:
        return self.errors[i]

    def parse(self, model: bytes, path: str | None = None) -> bool:
        # The double reads the graph with ONNX Runtime and a few protobuf fields, never with the
        # ``onnx`` package: a device has only edgeskin's runtime extra, and so do these tests.
        import onnxruntime as ort

        api = self.network.builder.api
        if not self.network.explicit_batch:
            # [ONNX] the ONNX parser of TensorRT 8.x needs an explicit-batch network
            self.errors.append("the ONNX parser requires a network created with EXPLICIT_BATCH")
            return False
        data = bytes(model)
        try:
            info = _onnx_summary(data)
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001
            self.errors.append(f"not an ONNX model TensorRT can parse: {exc}")
            return False
        if info["opset"] > api.max_opset:  # [ONNX] each release parses opsets up to a bound
            self.errors.append(f"unsupported opset {info['opset']} (this TensorRT parses up to {api.max_opset})")
            return False
        elem = {"tensor(float)": DataType.FLOAT, "tensor(float16)": DataType.HALF, "tensor(int8)": DataType.INT8,
                "tensor(int32)": DataType.INT32}

        def dims(arg: Any) -> tuple[int, ...]:
            return tuple(d if isinstance(d, int) else -1 for d in arg.shape)

        self.network.inputs = [_Tensor(a.name, dims(a), elem[a.type]) for a in sess.get_inputs()]
        self.network.outputs = [_Tensor(a.name, dims(a), elem[a.type]) for a in sess.get_outputs()]
        self.network.onnx = data
        self.network.has_qdq = bool({"QuantizeLinear", "DequantizeLinear"} & info["ops"])
        self.network.float_types = info["float_initializers"]
        return True


def _fields(buf: bytes) -> list[tuple[int, int, Any]]:
    """Top-level protobuf fields (number, wire type, value) of one message."""
    out, i, n = [], 0, len(buf)

    def varint() -> int:
        nonlocal i
        shift = result = 0
        while True:
            b = buf[i]
            i += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7

    while i < n:
        key = varint()
        num, wt = key >> 3, key & 7
        if wt == 0:
            out.append((num, wt, varint()))
        elif wt == 1:
            out.append((num, wt, buf[i:i + 8]))
            i += 8
        elif wt == 2:
            ln = varint()
            out.append((num, wt, buf[i:i + ln]))
            i += ln
        elif wt == 5:
            out.append((num, wt, buf[i:i + 4]))
            i += 4
        else:
            raise ValueError(f"protobuf wire type {wt}")
    return out


def _onnx_summary(data: bytes) -> dict[str, Any]:
    """Opset, operator types and float initializer types of an ONNX ModelProto (onnx.proto3:
    ModelProto.graph = 7, opset_import = 8; GraphProto.node = 1, initializer = 5;
    NodeProto.op_type = 4; TensorProto.data_type = 2; OperatorSetIdProto domain = 1, version = 2)."""
    model = _fields(data)
    opset = 0
    for num, _, v in model:
        if num == 8:
            f = {k: val for k, _, val in _fields(v)}
            if f.get(1, b"") in (b"", b"ai.onnx"):
                opset = max(opset, int(f.get(2, 0)))
    graph = next(v for num, _, v in model if num == 7)
    ops, floats = set(), set()
    for num, _, v in _fields(graph):
        if num == 1:
            ops |= {val.decode() for k, _, val in _fields(v) if k == 4}
        elif num == 5:
            dt = next((val for k, _, val in _fields(v) if k == 2), 0)
            if dt in (1, 10):
                floats.add({1: "FLOAT", 10: "FLOAT16"}[dt])
    return {"opset": opset, "ops": ops, "float_initializers": floats}


class IOptimizationProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {}

    def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:  # noqa: A002 - vendor's names
        self.shapes[input] = (tuple(min), tuple(opt), tuple(max))

    def get_shape(self, input: str) -> list[tuple[int, ...]]:  # noqa: A002
        return list(self.shapes.get(input, ()))

    def is_valid(self) -> bool:
        # [PROFILE] min <= opt <= max in every dimension
        return all(all(a <= b <= c for a, b, c in zip(*s)) for s in self.shapes.values())


class ITimingCache:
    def __init__(self, blob: dict[str, Any], mismatch: bool) -> None:
        self.blob, self.mismatch = blob, mismatch

    def serialize(self) -> IHostMemory:
        return IHostMemory(json.dumps(self.blob).encode())

    def combine(self, input_cache: "ITimingCache", ignore_mismatch: bool) -> bool:
        if input_cache.blob.get("tensorrt") != self.blob.get("tensorrt"):  # [TCACHE] same version only
            return False
        if input_cache.blob.get("device") != self.blob.get("device") and not ignore_mismatch:
            return False
        self.blob["entries"] = int(self.blob.get("entries", 0)) + int(input_cache.blob.get("entries", 0))
        return True

    def reset(self) -> bool:
        self.blob["entries"] = 0
        return True


class IBuilderConfig:
    def __init__(self, builder: "Builder") -> None:
        self.builder = builder
        self.flags: set[str] = set()
        self.pool: dict[int, int] = {}
        self.profiles: list[IOptimizationProfile] = []
        self.default_device_type = DeviceType.GPU
        self.DLA_core = -1
        self._cache: ITimingCache | None = None

    def set_flag(self, flag: Any) -> None:
        self.flags.add(flag.name)

    def get_flag(self, flag: Any) -> bool:
        return flag.name in self.flags

    def clear_flag(self, flag: Any) -> None:
        self.flags.discard(flag.name)

    def set_memory_pool_limit(self, pool: Any, size: int) -> None:
        self.pool[int(pool)] = int(size)

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        if not profile.is_valid():  # [PROFILE] an invalid profile is refused with index -1
            return -1
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, serialized_timing_cache: bytes) -> ITimingCache:
        api = self.builder.api
        mine = {"tensorrt": api.__version__, "device": api.identity()}
        if not serialized_timing_cache:
            return ITimingCache({**mine, "entries": 0}, mismatch=False)
        try:
            blob = json.loads(bytes(serialized_timing_cache).decode())
        except (UnicodeDecodeError, json.JSONDecodeError):
            return ITimingCache({**mine, "entries": 0}, mismatch=True)
        return ITimingCache(blob, mismatch=blob.get("tensorrt") != mine["tensorrt"]
                            or blob.get("device") != mine["device"])

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        # [CONFIG] returns whether the cache was set; [TCACHE] a cache from another TensorRT
        # version never applies, one from another device only with ignore_mismatch
        api = self.builder.api
        if cache.blob.get("tensorrt") != api.__version__:
            return False
        if cache.mismatch and not ignore_mismatch:
            return False
        self._cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache | None:
        return self._cache  # [CONFIG] None when no timing cache is set


class Builder:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger
        self.api: Any = _CURRENT["api"]

    @property
    def num_DLA_cores(self) -> int:  # noqa: N802
        return int(self.api.board["dla"])

    @property
    def platform_has_fast_fp16(self) -> bool:
        if self.api.major >= 11:  # [MIGR11] removed; strongly typed networks instead
            raise AttributeError("platform_has_fast_fp16")
        return True

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        return INetworkDefinition(self, flags)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig(self)

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def _error(self, msg: str) -> None:
        self.logger.log(Severity.ERROR, msg)
        return None

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> IHostMemory | None:
        api = self.api
        if network.onnx is None:
            return self._error("empty network")
        precision_flags = sorted(f for f in config.flags if f in ("FP16", "INT8", "BF16", "FP8"))
        if network.strongly_typed and precision_flags:
            # [TYPING] precision builder flags are not allowed on a strongly typed network
            return self._error(f"builder flags {precision_flags} are not allowed with a strongly typed network")
        if not network.strongly_typed and api.version_tuple >= (10, 12):
            # [TYPING] weak typing is deprecated from TensorRT 10.12
            self.logger.log(Severity.WARNING, "weakly typed networks are deprecated; use STRONGLY_TYPED")
        if network.has_qdq and not network.strongly_typed and "INT8" not in config.flags and api.major < 10:
            # TensorRT 8.x developer guide, "Explicit Quantization": a network with Q/DQ layers
            # is built with the INT8 builder flag set
            return self._error("the network has Q/DQ layers but the INT8 builder flag is not set")
        if len(config.profiles) == 0 and any(-1 in t.shape for t in network.inputs):
            # [DYN] a network with dynamic inputs needs an optimization profile
            return self._error("dynamic input without an optimization profile")
        shapes: dict[str, list[list[int]]] = {}
        for t in network.inputs:
            prof = config.profiles[0].shapes.get(t.name) if config.profiles else None
            if prof is None:
                if -1 in t.shape:
                    return self._error(f"input {t.name} is dynamic and has no profile shape")
                prof = (t.shape, t.shape, t.shape)
            for dims in prof:
                if len(dims) != len(t.shape) or any(s != -1 and s != d for s, d in zip(t.shape, dims)):
                    return self._error(f"profile shape {dims} does not fit input {t.name} {t.shape}")
            shapes[t.name] = [list(d) for d in prof]
        dla = None
        if config.default_device_type == DeviceType.DLA:
            if self.num_DLA_cores == 0 or not 0 <= config.DLA_core < self.num_DLA_cores:
                return self._error(f"DLA core {config.DLA_core} requested; this device has {self.num_DLA_cores}")
            dynamic = [n for n, (lo, opt, hi) in shapes.items() if not (lo == opt == hi)]
            if dynamic and "GPU_FALLBACK" not in config.flags:  # [DLA] no dynamic dimensions on the DLA
                return self._error(f"DLA needs static shapes: the profile of {dynamic[0]} is not min = opt = max")
            if dynamic:  # [DLA] with GPU fallback, what the DLA cannot take runs on the GPU
                self.logger.log(Severity.WARNING, "dynamic shapes: the network runs on the GPU, not the DLA")
            else:
                dla = int(config.DLA_core)
        if network.strongly_typed:  # [TYPING] float tensors run in the precision the graph gives them
            float_precision = "fp16" if "FLOAT16" in network.float_types else "fp32"
        else:
            float_precision = "fp16" if "FP16" in config.flags else "fp32"
        if config._cache is not None:
            config._cache.blob["entries"] = int(config._cache.blob.get("entries", 0)) + 1
        header = {"tensorrt": api.__version__, "device": api.identity(), "inputs": [
            {"name": t.name, "shape": list(t.shape), "dtype": t.dtype.name, "profile": shapes[t.name]}
            for t in network.inputs],
            "outputs": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype.name} for t in network.outputs],
            "strongly_typed": network.strongly_typed, "float_precision": float_precision,
            "int8": network.has_qdq, "dla_core": dla, "flags": sorted(config.flags)}
        head = json.dumps(header).encode()
        return IHostMemory(MAGIC + len(head).to_bytes(8, "little") + head + network.onnx)


class Runtime:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger
        self.api = _CURRENT["api"]

    def deserialize_cuda_engine(self, serialized_engine: bytes) -> "ICudaEngine | None":
        data = bytes(serialized_engine)
        if not data.startswith(MAGIC):
            self.logger.log(Severity.ERROR, "the data is not a serialized engine")
            return None
        n = int.from_bytes(data[len(MAGIC):len(MAGIC) + 8], "little")
        header = json.loads(data[len(MAGIC) + 8:len(MAGIC) + 8 + n].decode())
        onnx_bytes = data[len(MAGIC) + 8 + n:]
        # [ENGINE] an engine runs only on the TensorRT version that built it ...
        if header["tensorrt"] != self.api.__version__:
            self.logger.log(Severity.ERROR, f"the engine plan file is not compatible with this version of TensorRT, "
                                            f"expecting {self.api.__version__} got {header['tensorrt']}")
            return None
        # ... and on a GPU of the same compute capability; another model of device is warned about
        built, here = header["device"], self.api.identity()
        if built["cc"] != here["cc"]:
            self.logger.log(Severity.ERROR, f"the engine was built for compute capability {built['cc']}, "
                                            f"this device has {here['cc']}")
            return None
        if built != here:
            self.logger.log(Severity.WARNING, "Using an engine plan file across different models of devices is "
                                              "not recommended and is likely to affect performance or even cause "
                                              "errors.")
        return ICudaEngine(self.api, header, onnx_bytes, data)


class ICudaEngine:
    def __init__(self, api: Any, header: dict[str, Any], onnx_bytes: bytes, data: bytes) -> None:
        self.api, self.header, self.onnx, self._data = api, header, onnx_bytes, data
        self._io = [(t["name"], TensorIOMode.INPUT, t) for t in header["inputs"]] + \
                   [(t["name"], TensorIOMode.OUTPUT, t) for t in header["outputs"]]
        self.contexts = 0

    # -- introspection the test suite uses (not a TensorRT API)
    @property
    def built_on(self) -> dict[str, Any]:
        return dict(self.header["device"])

    @property
    def float_precision(self) -> str:
        return self.header["float_precision"]

    # -- TensorRT's API
    @property
    def num_io_tensors(self) -> int:
        return len(self._io)

    @property
    def num_optimization_profiles(self) -> int:
        return 1

    def get_tensor_name(self, index: int) -> str:
        return self._io[index][0]

    def _t(self, name: str) -> tuple[str, TensorIOMode, dict[str, Any]]:
        for t in self._io:
            if t[0] == name:
                return t
        raise KeyError(name)

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self._t(name)[1]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._t(name)[2]["shape"])

    def get_tensor_dtype(self, name: str) -> DataType:
        return DataType[self._t(name)[2]["dtype"]]

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
        t = self._t(name)
        if t[1] != TensorIOMode.INPUT or profile_index != 0:
            return []
        return [tuple(d) for d in t[2]["profile"]]

    def create_execution_context(self) -> "IExecutionContext":
        self.contexts += 1
        return IExecutionContext(self)

    def serialize(self) -> IHostMemory:
        return IHostMemory(self._data)


class IExecutionContext:
    def __init__(self, engine: ICudaEngine) -> None:
        self.engine = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self._session: Any = None
        self.runs: list[int] = []

    def set_input_shape(self, name: str, shape: Any) -> bool:
        # [PY-EXEC] returns False (and leaves the shape unset) when the shape is outside the
        # profile [DYN] or the name is not an input
        try:
            _, mode, t = self.engine._t(name)
        except KeyError:
            return False
        shape = tuple(int(s) for s in shape)
        lo, _, hi = t["profile"]
        if mode != TensorIOMode.INPUT or len(shape) != len(lo) or \
                not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
            self.engine.api.logger_errors.append(f"set_input_shape({name}, {shape}) outside profile {lo}..{hi}")
            return False
        self.shapes[name] = shape
        return True

    def _output_shape(self, name: str) -> tuple[int, ...]:
        t = self.engine._t(name)[2]
        inputs = self.engine.header["inputs"]
        if any(i["name"] not in self.shapes for i in inputs):
            return tuple(t["shape"])  # [PY-EXEC] dimensions stay -1 until the inputs are set
        batch = self.shapes[inputs[0]["name"]][0]
        return tuple(batch if d == -1 else d for d in t["shape"])

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        _, mode, t = self.engine._t(name)
        if mode == TensorIOMode.INPUT:
            return self.shapes.get(name, tuple(t["shape"]))
        return self._output_shape(name)

    @property
    def all_binding_shapes_specified(self) -> bool:
        return all(i["name"] in self.shapes for i in self.engine.header["inputs"])

    def infer_shapes(self) -> list[str]:
        return [i["name"] for i in self.engine.header["inputs"] if i["name"] not in self.shapes]

    def set_tensor_address(self, name: str, memory: int) -> bool:
        try:
            self.engine._t(name)
        except KeyError:
            return False
        self.addresses[name] = int(memory)
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        # stream_handle: int [PY-EXEC]; TensorRT's own samples pass cuda-python's cudaStream_t,
        # which converts to one
        int(stream_handle)
        api = self.engine.api
        cudart = api.cudart
        header = self.engine.header
        if not self.all_binding_shapes_specified:
            api.logger_errors.append("execute_async_v3 before every input shape is set")
            return False
        feeds = {}
        for i in header["inputs"]:
            shape = self.shapes[i["name"]]
            dtype = np.dtype(_NP[DataType[i["dtype"]]])
            nbytes = int(np.prod(shape)) * dtype.itemsize
            ptr = self.addresses.get(i["name"])
            if ptr is None or not cudart.device_range_ok(ptr, nbytes):
                api.logger_errors.append(f"input {i['name']}: no device buffer of {nbytes} bytes at its address")
                return False
            feeds[i["name"]] = np.frombuffer((ctypes.c_ubyte * nbytes).from_address(ptr), dtype=dtype).reshape(shape).copy()
        if self._session is None:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3
            self._session = ort.InferenceSession(self.engine.onnx, opts, providers=["CPUExecutionProvider"])
        outs = self._session.run([o["name"] for o in header["outputs"]], feeds)
        for o, y in zip(header["outputs"], outs):
            shape = self._output_shape(o["name"])
            y = np.ascontiguousarray(y, dtype=_NP[DataType[o["dtype"]]])
            assert tuple(y.shape) == shape, (y.shape, shape)
            ptr = self.addresses.get(o["name"])
            if ptr is None or not cudart.device_range_ok(ptr, y.nbytes):
                api.logger_errors.append(f"output {o['name']}: no device buffer of {y.nbytes} bytes at its address")
                return False
            ctypes.memmove(ptr, y.ctypes.data, y.nbytes)
        self.runs.append(int(self.shapes[header["inputs"][0]["name"]][0]))
        return True


# ====================================================================== installing the double

_CURRENT: dict[str, Any] = {}
_HIDDEN: dict[str, types.ModuleType] = {}
_NAMES = ("tensorrt", "cuda", "cuda.cudart", "cuda.bindings", "cuda.bindings.runtime")


def _module(name: str, attrs: dict[str, Any], package: bool = False) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=package)
    if package:
        mod.__path__ = []  # type: ignore[attr-defined]
    # no __file__: inspect.getmodule() caches files by module name, and a name that later maps
    # back to a real namespace package (cuda) must not look like a moved file
    mod.__tensorrt_double__ = True  # type: ignore[attr-defined]
    return mod


def build_modules(version: str = "10.3", *, board: str = "orin-nano") -> dict[str, types.ModuleType]:
    """The ``tensorrt`` and ``cuda`` modules of one simulated TensorRT release on one board."""
    rel = VERSIONS[version]
    full = rel["version"]
    major, minor = _vt(full)
    b = dict(BOARDS[board])
    cudart = CudaRuntime(b)

    flags: dict[str, int] = {"EXPLICIT_BATCH": 0}
    if (major, minor) >= (9, 1):  # STRONGLY_TYPED exists from TensorRT 9.1/10.0 [BUILDER]
        flags["STRONGLY_TYPED"] = 1
    NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", flags)  # noqa: N806
    bflags = {"GPU_FALLBACK": 3, "REFIT": 4, "DEBUG": 5, "STRICT_TYPES": 6} if major < 10 else \
        {"GPU_FALLBACK": 3, "REFIT": 4, "DEBUG": 5}
    if major < 11:  # [MIGR11] FP16 and INT8 are removed in 11.x
        bflags.update({"FP16": 0, "INT8": 1})
    BuilderFlag = enum.IntEnum("BuilderFlag", bflags)  # noqa: N806

    api = types.SimpleNamespace(
        __version__=full, major=major, version_tuple=(major, minor), max_opset=rel["max_opset"], board=b,
        cudart=cudart, NetworkDefinitionCreationFlag=NetworkDefinitionCreationFlag, logger_errors=[],
        identity=lambda: {"name": b["name"], "cc": list(b["cc"]), "sm": b["sm"]},
    )
    trt = _module("tensorrt", {
        "__version__": full, "Logger": Logger, "ILogger": Logger, "Builder": Builder, "Runtime": Runtime,
        "OnnxParser": OnnxParser, "NetworkDefinitionCreationFlag": NetworkDefinitionCreationFlag,
        "BuilderFlag": BuilderFlag, "DeviceType": DeviceType, "MemoryPoolType": MemoryPoolType,
        "TensorIOMode": TensorIOMode, "DataType": DataType, "nptype": nptype, "ICudaEngine": ICudaEngine,
        "IExecutionContext": IExecutionContext, "__double__": api,
    })
    cudart_attrs = {k: getattr(cudart, k) for k in dir(cudart) if k.startswith("cuda")}
    cudart_attrs["__double__"] = cudart
    mods = {"tensorrt": trt, "cuda": _module("cuda", {}, package=True)}
    if rel["cuda_python"] <= 12:  # cuda-python < 13 still has the flat ``cuda.cudart`` module [CUDART]
        mods["cuda.cudart"] = _module("cuda.cudart", dict(cudart_attrs))
        mods["cuda"].cudart = mods["cuda.cudart"]  # type: ignore[attr-defined]
    if rel["cuda_python"] >= 12 and version != "8.6":  # ``cuda.bindings.runtime`` from cuda-python 12.6
        mods["cuda.bindings"] = _module("cuda.bindings", {}, package=True)
        mods["cuda.bindings.runtime"] = _module("cuda.bindings.runtime", dict(cudart_attrs))
        mods["cuda.bindings"].runtime = mods["cuda.bindings.runtime"]  # type: ignore[attr-defined]
        mods["cuda"].bindings = mods["cuda.bindings"]  # type: ignore[attr-defined]
    _CURRENT["api"] = api
    return mods


def real_tensorrt_installed() -> bool:
    mod = sys.modules.get("tensorrt")
    if mod is not None and hasattr(mod, "__double__"):
        return False
    try:
        return importlib.util.find_spec("tensorrt") is not None
    except ValueError:
        return False


def install(version: str = "10.3", *, board: str = "orin-nano") -> dict[str, types.ModuleType]:
    """Put the double's modules into ``sys.modules`` (never over a real TensorRT)."""
    if real_tensorrt_installed():
        raise RuntimeError("a real TensorRT is installed: the double never replaces it")
    uninstall()
    for name in [n for n in sys.modules if n.split(".")[0] in ("tensorrt", "cuda")]:
        _HIDDEN[name] = sys.modules.pop(name)  # e.g. a real cuda-python another package imported
    mods = build_modules(version, board=board)
    sys.modules.update(mods)
    return mods


def uninstall() -> None:
    """Remove the double's modules and put back what :func:`install` hid."""
    for name in [n for n in sys.modules if n.split(".")[0] in ("tensorrt", "cuda")]:
        if getattr(sys.modules[name], "__tensorrt_double__", False):
            del sys.modules[name]
    sys.modules.update(_HIDDEN)
    _HIDDEN.clear()
    _CURRENT.clear()


def device_tree(root: Path, board: str) -> Path:
    """A device-tree folder holding the board's ``model`` string, as /proc/device-tree has."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model").write_bytes(BOARDS[board]["model"].encode() + b"\x00")
    return root


#: what a device with only ``pip install 'edgeskin[runtime]'`` lacks: the compile-side packages
NOT_ON_DEVICE = ("torch", "torchvision", "onnx", "nncf", "polygraphy", "onnx_graphsurgeon", "onnxslim",
                 "onnxscript", "tensorflow", "litert_torch")


def subprocess_env(tmp: Path, version: str, *, board: str = "orin-nano", base: dict[str, str] | None = None,
                   block: tuple[str, ...] = NOT_ON_DEVICE, modules_log: Path | None = None) -> dict[str, str]:
    """Environment for child processes (``python -m edgeskin ...`` and the bench workers it
    starts) in which the double is installed at start-up, through a ``sitecustomize`` module
    on PYTHONPATH, the board's device tree is at ``$EDGESKIN_DEVICE_TREE``, and the packages in
    ``block`` cannot be imported (as on a device that has only the runtime extra). With
    ``modules_log``, each process appends the edgeskin modules it loaded to that file."""
    boot = tmp / "trt-double-boot"
    boot.mkdir(parents=True, exist_ok=True)
    (boot / "sitecustomize.py").write_text(
        "import atexit, json, os, sys\n"
        f"sys.path.insert(0, {str(HERE)!r})\n"
        "_spec = json.loads(os.environ[" + repr(ENV) + "])\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in _spec['block']:\n"
        "            raise ImportError(f'{name} is not installed on the device (blocked by the test)')\n"
        "        return None\n"
        "sys.meta_path.insert(0, _Block())\n"
        "import tensorrt_double\n"
        "tensorrt_double.install(_spec['version'], board=_spec['board'])\n"
        "if _spec.get('modules_log'):\n"
        "    def _dump():\n"
        "        with open(_spec['modules_log'], 'a') as f:\n"
        "            f.write('\\n'.join(sorted(m for m in sys.modules if m.startswith('edgeskin'))) + '\\n')\n"
        "    atexit.register(_dump)\n")
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join([str(boot)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env[ENV] = json.dumps({"version": version, "board": board, "block": list(block),
                           "modules_log": str(modules_log) if modules_log else ""})
    env["EDGESKIN_DEVICE_TREE"] = str(device_tree(tmp / f"device-tree-{board}", board))
    return env
