"""NNCF INT8 quantization of an ONNX model, in the form ONNX Runtime's CPU kernels run fast.

NNCF's default output is what ORT fuses into QLinearConv: per-channel symmetric INT8 weights
and UINT8 activations after ReLU. Options cover the calibration subset, bias correction (none by
default: see :attr:`QuantizeOptions.bias_correction`), an ignored scope (layers kept in float), the preset, the activation range
estimator, and an accuracy-controlled mode that keeps the most sensitive layers in float until
a validation metric (mean of balanced accuracy and melanoma recall) is within ``max_drop``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import ConfigError, require

log = logging.getLogger(__name__)

BIAS_CORRECTIONS = ("none", "fast", "full")
#: what ``range_estimator = "auto"`` tries, in order (ties keep the first)
AUTO_ESTIMATORS = ("max_p95", "minmax")
#: ``max_pNN``: each activation range is the NN-th percentile, over the calibration images, of each
#: image's largest |value| in that tensor; between NNCF's ``mean_minmax`` (the mean of those maxima,
#: which clips every image above it) and ``minmax`` (their maximum, whose few outlier images coarsen
#: the steps for all the others). NNCF places the quantizers (with ``minmax``); edgeskin then sets
#: their scales (:func:`set_image_max_ranges`).
IMAGE_MAX_ESTIMATORS = {"max_p90": 0.90, "max_p95": 0.95, "max_p99": 0.99}
RANGE_ESTIMATORS = ("auto", "mean_minmax", "minmax", *IMAGE_MAX_ESTIMATORS, "median_minmax", "mean_no_outliers_minmax",
                    "mean_quantile", "histogram")


@dataclass(frozen=True)
class QuantizeOptions:
    subset_size: int = 512
    #: NNCF bias correction: ``none`` (the default), ``fast`` (NNCF's own default) or ``full``.
    #: Measured on the validation split (benchmarks/results/int8_ablation.md): NNCF's fast bias
    #: correction cost the quick recipe's ResNet18 student 3.1 points of top-1 agreement with FP32
    #: (96.35 % with it, 99.48 % without), and the reference ResNet50 member 1.0 point; with it off
    #: the ONNX Runtime and TensorRT forms match the LiteRT form, which never had it. The graph is
    #: the same either way (only the biases differ), so the speed is too. ``full`` fails in NNCF
    #: 3.4 on ONNX under onnxruntime >= 1.31 (a model it builds references a removed node output).
    bias_correction: str = "none"
    preset: str = "performance"
    #: node names (or types, prefixed ``type:``) kept in float
    ignored: tuple[str, ...] = ()
    #: keep the classifier (the final Gemm/MatMul) in float: logits of trained models have
    #: rare large outliers that per-tensor ranges handle badly
    keep_head_float: bool = True
    #: keep the first convolution in float (it sees the normalised image, whose quantization
    #: costs this model the most agreement of any single layer)
    first_conv_float: bool = False
    #: activation ranges. ``max_p95`` (:data:`IMAGE_MAX_ESTIMATORS`): measured on held-out training
    #: images of two students (benchmarks/results/int8_ranges.md), it flipped fewer decisions than
    #: NNCF's own default ``mean_minmax`` (which clips every image above the mean of the images'
    #: maxima) and than ``minmax`` (whose few outlier images coarsen every other image's steps), or
    #: as few. ``auto``: the ONNX targets try :data:`AUTO_ESTIMATORS` and keep the best on the
    #: validation split
    range_estimator: str = "max_p95"
    overflow_fix: str = "disable"
    #: accuracy-controlled mode: maximum drop (absolute, 0-1) of the validation metric
    max_drop: float | None = None
    max_float_layers: int | None = None
    #: what accuracy control holds: ``agreement`` (top-1 agreement with the FP32 model) or
    #: ``clinical`` (mean of balanced accuracy and melanoma recall), both on the validation split
    control_metric: str = "agreement"
    #: sensitivity-guided float fallback (edgeskin.quantize.fallback): keep the most damaging
    #: activation quantizers in float until top-1 agreement with FP32 on val reaches this
    fallback_agreement: float | None = None
    fallback_max_layers: int = 12
    #: ``auto``: a checkpoint trained quantization-aware for the target being compiled brings its
    #: own INT8 graph (learned ranges); ``off``: calibrate afresh
    qat: str = "auto"

    def __post_init__(self) -> None:
        if self.qat not in ("auto", "off"):
            raise ConfigError(f"unknown qat choice {self.qat!r}", "choose auto or off")
        if self.preset not in ("performance", "mixed"):
            raise ConfigError(f"unknown preset {self.preset!r}", "choose performance or mixed")
        if self.range_estimator not in RANGE_ESTIMATORS:
            raise ConfigError(f"unknown range estimator {self.range_estimator!r}",
                              f"choose one of: {', '.join(RANGE_ESTIMATORS)}")
        if self.control_metric not in ("agreement", "clinical"):
            raise ConfigError(f"unknown control metric {self.control_metric!r}", "choose agreement or clinical")
        if self.bias_correction not in BIAS_CORRECTIONS:
            raise ConfigError(f"unknown bias correction {self.bias_correction!r}",
                              f"choose one of: {', '.join(BIAS_CORRECTIONS)}")
        if self.overflow_fix not in ("disable", "enable", "first_layer_only"):
            raise ConfigError(f"unknown overflow fix {self.overflow_fix!r}", "choose disable, enable or first_layer_only")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ignored"] = list(self.ignored)
        return d


def _head_nodes(model: Any) -> list[str]:
    nodes = [n for n in model.graph.node if n.op_type in ("Gemm", "MatMul")]
    return [nodes[-1].name] if nodes else []


def quantize_onnx(
    model: Any,
    calibration: Sequence[np.ndarray],
    options: QuantizeOptions = QuantizeOptions(),
    *,
    input_name: str = "input",
    validation: tuple[Sequence[Any], Callable[[Any, Sequence[Any]], float]] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Quantize an ``onnx.ModelProto``; ``calibration`` holds preprocessed single-image batches.

    ``validation`` = (items, metric_fn(model_proto, items) -> float, higher is better) is needed
    for the accuracy-controlled mode. Items are ``(index, input)`` pairs: NNCF scores subsets of
    them while ranking layers, so the metric must be computed on the items it is given. Returns the quantized model and a record of what was done.
    """
    nncf = require("nncf", extra="compress", purpose="INT8 quantization")
    if options.range_estimator == "auto":
        raise ConfigError("range_estimator auto is resolved by the compile step",
                          "call quantize_onnx with one estimator, or compile with --range-estimator auto")
    from nncf.quantization.advanced_parameters import (AdvancedAccuracyRestorerParameters,
                                                       AdvancedQuantizationParameters, OverflowFix)
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    names = [n for n in options.ignored if not n.startswith("type:")]
    types = [n[5:] for n in options.ignored if n.startswith("type:")]
    if options.keep_head_float:
        names += [n for n in _head_nodes(model) if n not in names]
    if options.first_conv_float:
        convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
        names += [c for c in convs[:1] if c not in names]
    ignored = nncf.IgnoredScope(names=names, types=types, validate=False) if (names or types) else None
    image_max = IMAGE_MAX_ESTIMATORS.get(options.range_estimator)
    if image_max is not None and options.max_drop is not None:
        raise ConfigError(f"range estimator {options.range_estimator} cannot be combined with accuracy-controlled INT8 "
                          "(NNCF would rank the layers with other ranges than the ones shipped)",
                          "drop --max-drop, or choose an NNCF estimator such as mean_minmax or minmax")
    adv = AdvancedQuantizationParameters(
        overflow_fix=OverflowFix(options.overflow_fix),
        disable_bias_correction=options.bias_correction == "none",
        activations_range_estimator_params=getattr(
            RangeEstimatorParametersSet, "MINMAX" if image_max is not None else options.range_estimator.upper()),
    )
    preset = nncf.QuantizationPreset.PERFORMANCE if options.preset == "performance" else nncf.QuantizationPreset.MIXED
    cal = nncf.Dataset(list(calibration), lambda x: {input_name: x})
    subset = min(options.subset_size, len(calibration))
    record: dict[str, Any] = {"tool": "nncf", "nncf_version": nncf.__version__, "options": options.to_dict(),
                              "ignored_nodes": names, "calibration_samples": subset}
    try:
        from ..quiet import third_party_output

        with third_party_output():  # NNCF's INFO lines and progress bars (shown with --verbose)
            q, record = _run(nncf, model, cal, options, preset, subset, ignored, adv, record, input_name, validation,
                             AdvancedAccuracyRestorerParameters)
        if image_max is not None:
            record["image_max_ranges"] = set_image_max_ranges(q, model, list(calibration)[:subset], image_max,
                                                              input_name=input_name)
        return q, record
    except (ConfigError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - a toolchain failure becomes a clear error
        from ..targets.base import CompileError

        raise CompileError(f"NNCF quantization failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                           "try --bias-correction none, another --range-estimator, or fewer --ignore entries") from exc


def _run(nncf, model, cal, options, preset, subset, ignored, adv, record, input_name, validation,  # noqa: ANN001, ANN202
         AdvancedAccuracyRestorerParameters):  # noqa: N803
    if options.max_drop is None:
        q = nncf.quantize(model, cal, preset=preset, subset_size=subset,
                          fast_bias_correction=options.bias_correction != "full", ignored_scope=ignored,
                          advanced_parameters=adv)
        record["mode"] = "post-training"
        return q, record
    if validation is None:
        raise ConfigError("accuracy-controlled quantization needs a validation set",
                          "pass the data and split, or drop --max-drop")
    items, metric_fn = validation
    val = nncf.Dataset(list(items), lambda item: {input_name: item[1]})

    def validation_fn(m: Any, data: Any) -> float:
        return float(metric_fn(m, list(data)))

    restorer = AdvancedAccuracyRestorerParameters(
        max_num_iterations=options.max_float_layers if options.max_float_layers is not None else 0x7FFFFFFF)
    q = nncf.quantize_with_accuracy_control(
        model, cal, val, validation_fn, max_drop=options.max_drop, preset=preset, subset_size=subset,
        fast_bias_correction=options.bias_correction != "full", ignored_scope=ignored,
        advanced_quantization_parameters=adv, advanced_accuracy_restorer_parameters=restorer)
    record["mode"] = "accuracy-control"
    return q, record


def set_image_max_ranges(q: Any, fp32: Any, calibration: Sequence[np.ndarray], percentile: float, *,
                         input_name: str = "input", batch: int = 8) -> dict[str, Any]:
    """Set, in place, the scale of every symmetric activation quantizer of the QDQ graph ``q`` so
    that its range is the ``percentile`` (0-1) of the calibration images' largest |value| in that
    tensor, measured on the FP32 graph ``fp32`` that ``q`` was quantized from.

    Only quantizers with zero point 0 are set (UINT8: scale = range / 255; INT8: range / 127, as
    NNCF's symmetric quantizers); the Q node and its DequantizeLinear nodes get one new scale
    tensor, so they always agree. Asymmetric quantizers (NNCF's ``mixed`` preset) keep NNCF's range.
    Returns a record: the percentile and how many quantizers were set and kept."""
    onnx = require("onnx", extra="compress", purpose="INT8 quantization")
    ort = require("onnxruntime", extra="runtime", purpose="measuring activation ranges")
    from onnx import numpy_helper

    from .fallback import activation_pairs

    pairs = activation_pairs(q)
    inits = {i.name: i for i in q.graph.initializer}
    nodes = {n.name: n for n in q.graph.node}
    graph_inputs = {i.name for i in fp32.graph.input}
    tensors = [p.tensor for p in pairs if p.tensor not in graph_inputs]
    probe = onnx.ModelProto()
    probe.CopyFrom(fp32)
    have = {o.name for o in probe.graph.output}
    for t in tensors:
        if t not in have:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    maxima: dict[str, list[np.ndarray]] = {p.tensor: [] for p in pairs}
    for i in range(0, len(calibration), batch):
        x = np.concatenate([np.asarray(c, dtype=np.float32) for c in calibration[i : i + batch]])
        outs = dict(zip(tensors, sess.run(tensors, {input_name: x}))) if tensors else {}
        outs.update({t: x for t in graph_inputs if t in maxima})
        for t, v in outs.items():
            maxima[t].append(np.abs(v).reshape(len(v), -1).max(axis=1))
    set_, kept = 0, 0
    for p in pairs:
        qn = nodes[p.q]
        zp = numpy_helper.to_array(inits[qn.input[2]]) if len(qn.input) > 2 and qn.input[2] in inits else None
        if zp is not None and np.any(zp != 0) or not maxima[p.tensor]:
            kept += 1
            continue
        top = float(np.quantile(np.concatenate(maxima[p.tensor]), percentile))
        if not top > 0:
            kept += 1
            continue
        levels = 127.0 if zp is not None and zp.dtype == np.int8 else 255.0
        name = f"{p.tensor}_image_max_scale"
        arr = numpy_helper.from_array(np.asarray(top / levels, dtype=np.float32), name)
        if name in inits:
            inits[name].CopyFrom(arr)
        else:
            q.graph.initializer.append(arr)
            inits[name] = arr
        for n in (qn, *(nodes[d] for d in p.dqs)):
            n.input[1] = name
        set_ += 1
    return {"percentile": percentile, "of": "each calibration image's largest |activation|",
            "quantizers_set": set_, "quantizers_kept": kept, "images": len(calibration)}
