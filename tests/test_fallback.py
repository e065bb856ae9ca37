"""Sensitivity-guided float fallback on a real NNCF-quantized (tiny) model."""

from __future__ import annotations

import io

import numpy as np
import pytest




def _qmodel_and_golden(built):
    import onnx

    from edgeskin.bundle import BundleReader

    r = BundleReader(built.int8)
    q = onnx.load_from_string(r.read("model.onnx"))
    g32 = BundleReader(built.fp32).golden()
    return q, g32


def test_pairs_found_and_removal_keeps_a_valid_graph(built):
    import onnx

    from edgeskin.quantize import activation_pairs, remove_pairs

    q, _ = _qmodel_and_golden(built)
    pairs = activation_pairs(q)
    assert len(pairs) >= 10, "a quantized resnet18 has many activation quantizers"
    assert all(p.consumers for p in pairs)
    n_q = sum(n.op_type == "QuantizeLinear" for n in q.graph.node)
    m = remove_pairs(q, pairs[:3])
    onnx.checker.check_model(m, full_check=True)
    assert sum(n.op_type == "QuantizeLinear" for n in m.graph.node) == n_q - 3
    assert q.graph.node[0].name in {n.name for n in q.graph.node}  # the original is untouched
    assert sum(n.op_type == "QuantizeLinear" for n in q.graph.node) == n_q


def test_removing_every_activation_quantizer_moves_towards_fp32(built):
    from edgeskin.quantize import activation_pairs, remove_pairs
    from edgeskin.runtime.backends import OnnxRuntimeBackend
    from edgeskin.runtime.numerics import softmax

    q, g32 = _qmodel_and_golden(built)
    x, p32 = g32["inputs"], g32["probs"]

    def probs(model):
        return softmax(OnnxRuntimeBackend(model.SerializeToString(), threads=1).run(x))

    full = np.abs(probs(q) - p32).max()
    none = np.abs(probs(remove_pairs(q, activation_pairs(q))) - p32).max()
    assert none < full, (none, full)


def test_float_fallback_reaches_target_or_reports_its_best(built):
    from edgeskin.quantize import activation_pairs, float_fallback

    q, g32 = _qmodel_and_golden(built)
    x, p32 = g32["inputs"], g32["probs"]
    model, rec = float_fallback(q, inputs=x, fp32_probs=p32, target_agreement=1.0, max_layers=4, threads=1)
    assert rec["start_agreement"] <= rec["final_agreement"] or len(rec["kept_float"]) == 4
    assert len(rec["kept_float"]) <= 4
    if rec["start_agreement"] < 1.0:
        assert len(rec["steps"]) >= 1 and rec["ranking"]
        assert len(activation_pairs(model)) == len(activation_pairs(q)) - len(rec["kept_float"])
    else:
        assert model is q and rec["kept_float"] == []
