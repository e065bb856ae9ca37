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


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    from ..runtime import load
    from .latency import interleaved_latency

    x = np.load(spec["inputs"], mmap_mode="r")
    before = _rss_mb()
    t0 = time.perf_counter()
    pred = load(spec["bundle"], threads=spec.get("threads"), engine=spec.get("engine", "auto"))
    load_s = time.perf_counter() - t0
    backend = pred.backend
    # never more than the engine takes at once (a TensorRT profile's maximum batch)
    step = max(1, min(16, int(getattr(backend, "max_batch", 16))))
    probs = np.concatenate([pred.probabilities(np.ascontiguousarray(x[i : i + step])) for i in range(0, len(x), step)])
    np.save(spec["out_probs"], probs)
    first = np.ascontiguousarray(x[:1])
    lat = interleaved_latency({"b1": pred.logits}, first, runs=int(spec.get("runs", 50)),
                              warmup=int(spec.get("warmup", 10)))["b1"]
    throughput = {}
    skipped = {}
    for bs in spec.get("batch_sizes", [8]):
        if len(x) < bs:
            continue
        if bs > int(getattr(backend, "max_batch", bs)):
            skipped[str(bs)] = f"above the engine's maximum batch {backend.max_batch}"
            continue
        batch = np.ascontiguousarray(x[:bs])
        stats = interleaved_latency({"b": pred.logits}, batch, runs=max(3, int(spec.get("runs", 50)) // 5), warmup=2)["b"]
        throughput[str(bs)] = {"p50_ms": stats.p50_ms, "images_per_s": bs / (stats.p50_ms / 1000.0)}
    on_device = getattr(backend, "name", "") == "tensorrt"
    if on_device:  # power mode and clock locking change on-device latency severalfold
        from ..runtime.tensorrt import jetson_power_state

        device_state = jetson_power_state()
    latency = lat.to_dict()
    if on_device:
        latency["device_state"] = device_state
    return {
        "status": "ok", "load_s": load_s, "probs": spec["out_probs"], "latency_batch1": latency,
        "throughput": throughput, **({"throughput_skipped": skipped} if skipped else {}),
        **({"device_state": device_state} if on_device else {}), "peak_rss_mb": _rss_mb(), "peak_rss_above_inputs_mb": _rss_mb() - before,
        "engine": getattr(backend, "name", "?"), "engine_version": getattr(backend, "version", "?"),
        "threads": spec.get("threads"), "host_proxy": bool(getattr(pred, "host_proxy", False)),
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
