"""Activation ranges from a percentile of each calibration image's largest |value| (``max_p95``):
the ONNX targets' estimator (NNCF places the quantizers, edgeskin sets their scales) and the tflite
target's observer of the same name. A tiny network with a few outlier images (20 times the others'
pixel values): ``minmax`` spends its 256 steps on the outliers, ``max_p95`` keeps the steps of the
typical images fine and clips only the outliers."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from edgeskin.errors import ConfigError  # noqa: E402

N, OUTLIERS, SIZE = 80, 3, 16


def _net_and_images() -> tuple[nn.Module, np.ndarray]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(16, 5)).eval()
    x = np.random.default_rng(0).standard_normal((N, 3, SIZE, SIZE)).astype(np.float32)
    x[:OUTLIERS] *= 20.0
    return net, x


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    pytest.importorskip("nncf")
    import onnx

    from edgeskin.export import export_onnx

    net, x = _net_and_images()
    path = tmp_path_factory.mktemp("imax") / "fp32.onnx"
    export_onnx(net, path, size=SIZE, check_inputs=x[:4])
    return onnx.load(path), x


def _scales(q) -> dict[str, tuple[str, tuple[str, ...], float]]:
    """Activation tensor -> (Q's scale input, its DQs' scale inputs, scale value)."""
    from onnx import numpy_helper

    from edgeskin.quantize import activation_pairs

    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    nodes = {n.name: n for n in q.graph.node}
    return {p.tensor: (nodes[p.q].input[1], tuple(nodes[d].input[1] for d in p.dqs), float(inits[nodes[p.q].input[1]]))
            for p in activation_pairs(q)}


def _quantize(model, x, estimator: str, **kw):
    from edgeskin.quantize import QuantizeOptions, quantize_onnx

    return quantize_onnx(model, [x[i : i + 1] for i in range(len(x))],
                         QuantizeOptions(range_estimator=estimator, bias_correction="none", **kw))


def test_max_p95_sets_each_range_to_the_95th_percentile_of_the_images_maxima(onnx_model):
    model, x = onnx_model
    q, rec = _quantize(model, x, "max_p95")
    qm, _ = _quantize(model, x, "minmax")
    scales, minmax = _scales(q), _scales(qm)
    assert set(scales) == set(minmax) and len(scales) >= 3  # the same quantizers as NNCF places them
    assert rec["image_max_ranges"]["quantizers_set"] == len(scales) and rec["image_max_ranges"]["quantizers_kept"] == 0
    # the quantized input of the first convolution: its images' maxima are known without the graph
    want = np.quantile(np.abs(x).reshape(N, -1).max(axis=1), 0.95) / 127.0  # signed: INT8, zero point 0
    assert scales["input"][2] == pytest.approx(want, rel=1e-5)
    for t, (qs, dqs, s) in scales.items():
        assert all(d == qs for d in dqs), "a quantizer and its dequantizers share one scale"
        assert s < minmax[t][2], (t, s, minmax[t][2])  # finer steps than the outlier images' range


def test_max_p95_keeps_the_typical_images_closer_to_fp32_than_minmax(onnx_model):
    from edgeskin.runtime.backends import OnnxRuntimeBackend

    model, x = onnx_model
    typical = x[OUTLIERS:]

    def run(m):
        return OnnxRuntimeBackend(m.SerializeToString(), threads=1).run(typical)

    ref = run(model)
    err = {e: float(np.abs(run(_quantize(model, x, e)[0]) - ref).mean()) for e in ("max_p95", "minmax")}
    assert err["max_p95"] < 0.5 * err["minmax"], err


def test_max_p95_refuses_accuracy_control_and_quantization_aware_training(onnx_model):
    from edgeskin.train.qat import QatConfig

    model, x = onnx_model
    with pytest.raises(ConfigError, match="accuracy-controlled"):
        _quantize(model, x, "max_p95", max_drop=0.01)
    with pytest.raises(ConfigError, match="QAT range estimator"):
        QatConfig(epochs=1, target="cpu", range_estimator="max_p95")


def test_the_tflite_observer_takes_the_percentile_of_each_calibration_batch():
    pytest.importorskip("torchao")
    from edgeskin.targets.tflite import _image_percentile_observer

    obs = _image_percentile_observer()(percentile=0.95, dtype=torch.int8, quant_min=-128, quant_max=127)
    rng = np.random.default_rng(1)
    lows, highs = [], []
    for i in range(40):
        t = torch.from_numpy(rng.standard_normal((1, 4, 5, 5)).astype(np.float32) * (20.0 if i < 2 else 1.0))
        lows.append(float(t.min()))
        highs.append(float(t.max()))
        obs(t)
    scale, zero = obs.calculate_qparams()
    lo, hi = np.quantile(lows, 0.05), np.quantile(highs, 0.95)
    assert float(obs.min_val) == pytest.approx(lo, rel=1e-6) and float(obs.max_val) == pytest.approx(hi, rel=1e-6)
    assert float(scale) == pytest.approx((hi - lo) / 255.0, rel=1e-5)
    assert max(highs) > 10 * hi  # the outlier batches are clipped, not spread over the steps


def test_tflite_int8_with_max_p95_keeps_the_typical_images_closer_to_fp32_than_minmax():
    pytest.importorskip("litert_torch")
    import litert_torch

    from edgeskin.runtime.backends import LiteRTBackend
    from edgeskin.targets.tflite import post_training_int8

    net, x = _net_and_images()
    typical = x[OUTLIERS:]
    with torch.no_grad():
        ref = net(torch.from_numpy(typical)).numpy()
    err = {}
    for obs in ("max_p95", "minmax"):
        data = post_training_int8(litert_torch, net, (torch.from_numpy(x[:1]),),
                                  (torch.from_numpy(x[i : i + 1]) for i in range(N)), n=N, int8_adds=False,
                                  observer=obs, float_modules=(), wrapper=None)
        b = LiteRTBackend(bytes(data), threads=1)
        got = np.concatenate([b.run(typical[i : i + 1]) for i in range(len(typical))])
        err[obs] = float(np.abs(got - ref).mean())
    assert err["max_p95"] < 0.5 * err["minmax"], err
