"""Sensitivity-guided float fallback for QDQ models.

A quantized model flips some top-1 decisions of its FP32 original. This pass finds which
activation quantizers cause the most damage and removes the fewest of them (that tensor then
stays float) until top-1 agreement with the FP32 model on the validation split reaches a target:

1. rank every activation Quantize/Dequantize pair by how much the model's output moves towards
   FP32 when that pair alone is removed (mean KL divergence of FP32 to the candidate's
   probabilities over the validation inputs — smoother than counting flips);
2. remove pairs in that order, re-measuring agreement after each, until the target holds or
   ``max_layers`` pairs are gone.

Only validation data is used. Weights stay INT8 per-channel throughout.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..errors import require


@dataclass(frozen=True)
class QPair:
    """An activation QuantizeLinear node and the DequantizeLinear node(s) reading it."""

    q: str
    dqs: tuple[str, ...]
    tensor: str  # the float tensor being quantized
    consumers: tuple[str, ...]  # nodes reading the dequantized value


def activation_pairs(model: Any) -> list[QPair]:
    inits = {i.name for i in model.graph.initializer}
    by_input: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            by_input.setdefault(i, []).append(n)
    pairs = []
    for n in model.graph.node:
        if n.op_type != "QuantizeLinear" or n.input[0] in inits:
            continue
        dqs = [c for c in by_input.get(n.output[0], []) if c.op_type == "DequantizeLinear"]
        if not dqs:
            continue
        consumers = tuple(c.name for d in dqs for c in by_input.get(d.output[0], []))
        pairs.append(QPair(n.name, tuple(d.name for d in dqs), n.input[0], consumers))
    return pairs


def remove_pairs(model: Any, pairs: list[QPair]) -> Any:
    """A copy of ``model`` with the given activation Q/DQ pairs bypassed (the tensor stays float)."""
    m = copy.deepcopy(model)
    nodes = {n.name: n for n in m.graph.node}
    drop: set[str] = set()
    for p in pairs:
        for dq_name in p.dqs:
            dq_out = nodes[dq_name].output[0]
            for n in m.graph.node:
                for k, i in enumerate(n.input):
                    if i == dq_out:
                        n.input[k] = p.tensor
            for o in m.graph.output:
                if o.name == dq_out:
                    o.name = p.tensor
            drop.add(dq_name)
        drop.add(p.q)
    keep = [n for n in m.graph.node if n.name not in drop]
    del m.graph.node[:]
    m.graph.node.extend(keep)
    return m


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    p = np.clip(p, 1e-12, 1)
    q = np.clip(q, 1e-12, 1)
    return float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1)))


def float_fallback(
    qmodel: Any,
    *,
    inputs: np.ndarray,
    fp32_probs: np.ndarray,
    target_agreement: float,
    max_layers: int = 12,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Remove the most damaging activation quantizers until agreement >= ``target_agreement``."""
    require("onnxruntime", extra="runtime", purpose="float fallback")
    from ..runtime.backends import OnnxRuntimeBackend
    from ..runtime.numerics import softmax

    def probs_of(model: Any) -> np.ndarray:
        b = OnnxRuntimeBackend(model.SerializeToString(), threads=threads)
        return softmax(np.concatenate([b.run(inputs[s : s + 64]) for s in range(0, len(inputs), 64)]))

    ref_top = fp32_probs.argmax(1)

    def agreement(p: np.ndarray) -> float:
        return float(np.mean(p.argmax(1) == ref_top))

    base = probs_of(qmodel)
    record: dict[str, Any] = {"target_agreement": target_agreement, "start_agreement": agreement(base),
                              "start_kl": _kl(fp32_probs, base), "kept_float": [], "steps": []}
    if agreement(base) >= target_agreement:
        record["final_agreement"] = agreement(base)
        return qmodel, record
    pairs = activation_pairs(qmodel)
    scores = []
    for i, p in enumerate(pairs):
        cand = probs_of(remove_pairs(qmodel, [p]))
        scores.append((_kl(fp32_probs, cand), -agreement(cand), i))
        if progress:
            progress(f"ranked {i + 1}/{len(pairs)} quantizers")
    order = [pairs[i] for _, _, i in sorted(scores)]
    record["ranking"] = [{"quantizer": p.q, "consumers": list(p.consumers), "kl": s[0], "agreement": -s[1]}
                         for p, s in zip(order, sorted(scores))][:max(2 * max_layers, 10)]
    chosen: list[QPair] = []
    best = qmodel
    acc = agreement(base)
    for p in order[:max_layers]:
        chosen.append(p)
        best = remove_pairs(qmodel, chosen)
        acc = agreement(probs_of(best))
        record["steps"].append({"removed": p.q, "consumers": list(p.consumers), "agreement": acc})
        if progress:
            progress(f"{len(chosen)} quantizer(s) in float: agreement {100 * acc:.2f}%")
        if acc >= target_agreement:
            break
    record["kept_float"] = [{"quantizer": p.q, "tensor": p.tensor, "consumers": list(p.consumers)} for p in chosen]
    record["final_agreement"] = acc
    return best, record
