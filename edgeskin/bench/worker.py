"""Measure one bundle in a process of its own (``python -m edgeskin.bench.worker SPEC.json``):
load time, predictions on the bench images, batch-1 latency after warm-up, throughput at
larger batches and peak memory. A bundle that crashes its engine takes only this process down,
and its row says so. Runtime only: numpy + the bundle's engine, never torch."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def _rss_mb() -> float:
    """This process's peak resident memory. On Linux, VmHWM (ru_maxrss would also count the
    parent's memory inherited at fork, before exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_model() -> str:
    """The host CPU's model name (Linux /proc/cpuinfo; else the platform's word)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


class OnnxModel:
    """A full-precision reference model (the ensemble or the student exported to ONNX) timed the
    way a bundle is: the shared preprocessing, then ONNX Runtime. The same calls as a Predictor."""

    host_proxy = False

    def __init__(self, path: str, preprocess: dict[str, Any], output: str, threads: int | None) -> None:
        from ..preprocess import PreprocessConfig
        from ..runtime.backends import OnnxRuntimeBackend

        self.preprocess_config = PreprocessConfig.from_dict(preprocess)
        self.backend = OnnxRuntimeBackend(Path(path).read_bytes(), threads=threads)
        self.output = output

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.backend.run(np.ascontiguousarray(batch, dtype=np.float32)), dtype=np.float64)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        from ..runtime.numerics import softmax

        y = self.logits(batch)
        return y if self.output == "probs" else softmax(y)

    def predict(self, item: Any) -> np.ndarray:
        from ..preprocess import preprocess

        return self.probabilities(preprocess(item, self.preprocess_config)[None])[0]


def _open(spec: dict[str, Any]) -> Any:
    model = spec.get("model") or {"kind": "bundle", "path": spec["bundle"]}
    if model["kind"] == "onnx":
        return OnnxModel(model["path"], model["preprocess"], model.get("output", "logits"), spec.get("threads"))
    from ..runtime import load

    return load(model["path"], threads=spec.get("threads"), engine=spec.get("engine", "auto"))


def _predict_all(pred: Any, x: np.ndarray) -> np.ndarray:
    # never more than the engine takes at once (a TensorRT profile's maximum batch)
    step = max(1, min(16, int(getattr(pred.backend, "max_batch", 16))))
    if len(x) == 0:
        return np.zeros((0, 0))
    return np.concatenate([pred.probabilities(np.ascontiguousarray(x[i : i + step])) for i in range(0, len(x), step)])


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Load, predict the bench (and validation) images, then time batch 1 two ways, interleaved:
    model only (a preprocessed tensor in, the engine's output out) and end to end (an encoded
    image file in memory -> decode -> preprocess -> model -> probabilities, as ``predict`` does it
    on the device), until both have ``min_samples`` samples and ``min_seconds`` have passed."""
    from .latency import interleaved_latency, timed_until

    x = np.load(spec["inputs"], mmap_mode="r")
    before = _rss_mb()
    t0 = time.perf_counter()
    pred = _open(spec)
    load_s = time.perf_counter() - t0
    backend = pred.backend
    np.save(spec["out_probs"], _predict_all(pred, x))
    if spec.get("val_inputs"):
        np.save(spec["out_val_probs"], _predict_all(pred, np.load(spec["val_inputs"], mmap_mode="r")))
    first = np.ascontiguousarray(x[:1])
    encoded = [Path(p).read_bytes() for p in spec.get("images", [])]
    fns: dict[str, Any] = {"model": lambda: pred.logits(first)}
    if encoded:
        counter = iter(range(10**12))
        fns["e2e"] = lambda: pred.predict(encoded[next(counter) % len(encoded)])
    stats = timed_until(fns, min_samples=int(spec.get("min_samples", 1000)),
                        min_seconds=float(spec.get("min_seconds", 10.0)),
                        max_seconds=float(spec.get("max_seconds", 600.0)), warmup=int(spec.get("warmup", 10)))
    throughput = {}
    skipped = {}
    for bs in spec.get("batch_sizes", [8]):
        if len(x) < bs:
            continue
        if bs > int(getattr(backend, "max_batch", bs)):
            skipped[str(bs)] = f"above the engine's maximum batch {backend.max_batch}"
            continue
        batch = np.ascontiguousarray(x[:bs])
        st = interleaved_latency({"b": pred.logits}, batch, runs=int(spec.get("throughput_runs", 20)), warmup=2)["b"]
        throughput[str(bs)] = {"p50_ms": st.p50_ms, "images_per_s": bs / (st.p50_ms / 1000.0)}
    on_device = getattr(backend, "name", "") == "tensorrt"
    latency = stats["model"].to_dict()
    if on_device:  # power mode and clock locking change on-device latency severalfold
        from ..runtime.tensorrt import jetson_power_state

        device_state = jetson_power_state()
        latency["device_state"] = device_state
    e2e = stats["e2e"].to_dict() if "e2e" in stats else None
    if e2e is not None and on_device:
        e2e["device_state"] = device_state
    return {
        "status": "ok", "load_s": load_s, "probs": spec["out_probs"],
        **({"val_probs": spec["out_val_probs"]} if spec.get("val_inputs") else {}),
        "latency_batch1": latency, "latency_e2e": e2e,
        "throughput": throughput, **({"throughput_skipped": skipped} if skipped else {}),
        **({"device_state": device_state} if on_device else {}), "peak_rss_mb": _rss_mb(),
        "peak_rss_above_inputs_mb": _rss_mb() - before,
        "engine": getattr(backend, "name", "?"), "engine_version": getattr(backend, "version", "?"),
        "threads": spec.get("threads"), "cpu": cpu_model(), "host_proxy": bool(getattr(pred, "host_proxy", False)),
        "torch_loaded": "torch" in sys.modules,
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(args[0]).read_text())
    try:
        result = measure(spec)
    except Exception as exc:  # noqa: BLE001 - reported as the row's status
        from ..errors import EdgeskinError

        msg = exc.message if isinstance(exc, EdgeskinError) else f"{type(exc).__name__}: {exc}"
        result = {"status": "failed", "error": msg[:500]}
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
