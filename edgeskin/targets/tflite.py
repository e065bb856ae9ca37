"""Target ``tflite`` (aliases ``android``, ``ios``, ``phone``, ``litert``): LiteRT on phones.

Straight from the torch model with litert-torch (no ONNX step):

- ``int8``: PT2E static quantization (per-channel symmetric INT8 weights, per-tensor INT8
  activations) calibrated on the calibration set, one image at a time; the classifier stays
  in float, so the logits come out in float (a per-tensor int8 output range taken from rare
  logit outliers can ruin a trained model). ``int8_adds`` also quantizes the residual
  additions (for delegates that need an all-integer graph); by default they stay float, which
  the CPU (XNNPACK) handles well.
- ``fp16``: float16 weights (float32 compute and I/O), half the file.
- ``fp32``: the plain conversion.

What the model takes and gives (every precision):

- ``input_type="uint8"`` (default): RGB pixels 0-255 as uint8, what MediaPipe's
  ``ImageClassifier`` and phone apps feed. The model casts them to float and normalises them
  per channel before the first convolution: an explicit add of -mean, with the 1/std factor in
  that convolution's weights (exact; folding the whole normalisation into the convolution would
  change its zero-padded borders: benchmarks/tflite_target.py measures the effect). ``normalized``: the normalised tensor,
  float32, or int8 with the model's own scale/zero point for an int8 model whose first
  convolution is quantized (custom pipelines; MediaPipe refuses both).
- ``output_kind="probabilities"`` (default): float32 probabilities, softmax inside the model.
  ``logits``: the app applies softmax.

Input layout NHWC (phones) or NCHW. Labels, input and output are described in TFLite metadata
written with MediaPipe's maintained writer (targets/tflite_metadata.py), claiming only what is
true of the model. NHWC uint8 bundles also record what resizing the whole image (MediaPipe's
default without a region of interest) costs against edgeskin's centre crop on the validation
split (``manifest.extra["app_preprocessing"]``; advice in targets/phone.py and docs/phone.md).
The compiled model is checked through the runtime against FP32 like every target.
"""

from __future__ import annotations

import functools
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import InputSpec
from ..calibration import CalibrationSet
from ..data import Dataset, Split, load_eval_set
from ..errors import ConfigError, require
from ..progress import NullReporter, Reporter
from .base import Budget, CompileError, CompileResult, Target, base_manifest, labels_txt, verify_and_write
from .cpu import toolchain_versions
from .prepare import calibration_inputs, model_provenance, select_member
from .registry import register

LAYOUTS = ("NHWC", "NCHW")
#: ``max_pNN``: the NN-th percentile over calibration images of each image's min and max (the
#: ONNX targets' estimators of the same names; :func:`_image_percentile_observer`)
IMAGE_MAX_OBSERVERS = {"max_p90": 0.90, "max_p95": 0.95, "max_p99": 0.99}
OBSERVERS = ("histogram", "minmax", "mean_minmax", *IMAGE_MAX_OBSERVERS)
#: ``uint8``: RGB pixels 0-255, normalised inside the model (what MediaPipe and apps feed);
#: ``normalized``: the normalised tensor (float32, or int8 with the model's own quantization
#: parameters for an int8 model whose first convolution is quantized), for custom pipelines
INPUT_TYPES = ("uint8", "normalized")
#: ``probabilities``: float32, softmax inside the model; ``logits``: the app applies softmax
OUTPUT_KINDS = ("probabilities", "logits")


def _residual_quantizer_class() -> Any:
    """PT2EQuantizer that also annotates residual additions (and an add followed by its ReLU),
    found by ATen target, which litert's source-partition annotators miss under torch.export's
    default non-strict tracing."""
    import torch
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer
    from litert_torch.quantize.pt2e_quantizer_utils import (get_input_act_qspec, get_output_act_qspec,
                                                             propagate_annotation)
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    add_ops = {torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor}
    relu_ops = {torch.ops.aten.relu.default, torch.ops.aten.relu_.default}

    def done(n: Any) -> bool:
        a = n.meta.get("quantization_annotation")
        return a is not None and getattr(a, "_annotated", False)

    class ResidualQuantizer(PT2EQuantizer):
        def annotate(self, model: Any) -> Any:
            model = super().annotate(model)
            cfg = self.global_config
            qi, qo = get_input_act_qspec(cfg), get_output_act_qspec(cfg)
            for n in model.graph.nodes:
                if n.op != "call_function" or n.target not in add_ops or done(n):
                    continue
                ins = {a: qi for a in n.args[:2] if isinstance(a, torch.fx.Node)}
                users = list(n.users)
                if len(users) == 1 and users[0].target in relu_ops and not done(users[0]):
                    n.meta["quantization_annotation"] = QuantizationAnnotation(input_qspec_map=ins, _annotated=True)
                    users[0].meta["quantization_annotation"] = QuantizationAnnotation(output_qspec=qo,
                                                                                      _annotated=True)
                else:
                    n.meta["quantization_annotation"] = QuantizationAnnotation(input_qspec_map=ins, output_qspec=qo,
                                                                               _annotated=True)
            propagate_annotation(model)
            return model

    return ResidualQuantizer


#: the first convolution of each architecture (its output, after the activation, stays quantized)
STEMS = {"resnet50": ("conv1", "bn1"), "resnet18": ("conv1", "bn1"),
         "mobilenet_v3_large": ("features.0",)}


def _skipping(qcls: Any, prefixes: tuple[str, ...], *, io_wrapper: str | None = None) -> Any:
    """``qcls`` that leaves the nodes of the named modules (and their weights) in float, and, with
    ``io_wrapper`` (the attribute under which :class:`PhoneIO` holds the network), the wrapper's
    own nodes too: the in-model normalisation and the softmax stay float."""

    def strip(fqn: str) -> str:
        return fqn.removeprefix("wrapped.").removeprefix("wrapped")

    def inside(fqn: str) -> bool:
        return any(fqn == p or fqn.startswith(p + ".") for p in prefixes)

    def own(fqn: str) -> bool:
        return io_wrapper is not None and not (fqn == io_wrapper or fqn.startswith(io_wrapper + "."))

    class Skipping(qcls):  # type: ignore[misc, valid-type]
        def annotate(self, model: Any) -> Any:
            model = super().annotate(model)
            for n in model.graph.nodes:
                if n.op != "call_function":
                    continue
                stack = n.meta.get("nn_module_stack") or {}
                fqn = strip([v[0] for v in stack.values()][-1]) if stack else ""
                if inside(fqn) or own(fqn):
                    n.meta.pop("quantization_annotation", None)
            return model

    return Skipping


def phone_io_module(net: Any, *, mean255: tuple[float, ...], std255: tuple[float, ...], bgr: bool,
                    input_type: str, output_kind: str, layout: str, size: int) -> Any:
    """``net`` (NCHW, normalised input, logits out) as a phone app takes it, in ``layout``: with
    ``input_type`` ``uint8`` it takes RGB pixels 0-255 (uint8) and normalises them itself, per
    channel, in an explicit layer before the first convolution (so the first convolution's zero
    padding stays a zero of the normalised image, exactly as in training); with ``output_kind``
    ``probabilities`` it ends with a softmax.

    In NHWC the normalisation works over each image row (``W x 3`` values, the per-channel
    constants tiled along the row): broadcasting a 3-value constant over every pixel made XNNPACK
    run 12,544 tiny kernels per op at 112 px, 0.2 ms on this host. The 1/std factor goes into the
    first convolution's weights where that is exact, so the input costs a cast and one add."""
    import copy

    import torch

    k = torch.tensor([1.0 / v for v in std255], dtype=torch.float32)
    b = torch.tensor([-m / v for m, v in zip(mean255, std255)], dtype=torch.float32)

    class PhoneIO(torch.nn.Module):
        def __init__(self, inner: Any, scale: torch.Tensor, shift: torch.Tensor) -> None:
            super().__init__()
            self.net = inner
            self.scaled = bool((scale != 1).any())
            self.register_buffer("scale_nchw", scale.view(1, 3, 1, 1))
            self.register_buffer("shift_nchw", shift.view(1, 3, 1, 1))
            self.register_buffer("scale_row", scale.repeat(size))  # (W * 3,): R G B R G B ...
            self.register_buffer("shift_row", shift.repeat(size))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if layout == "NHWC":
                if input_type == "uint8":
                    x = x.to(torch.float32)
                    if bgr:
                        x = x.flip(3)
                    n, h, w, c = x.shape
                    x = x.reshape(n, h, w * c)
                    x = (x * self.scale_row + self.shift_row) if self.scaled else x + self.shift_row
                    x = x.reshape(n, h, w, c)
                x = x.permute(0, 3, 1, 2)
            elif input_type == "uint8":
                x = x.to(torch.float32)
                if bgr:
                    x = x.flip(1)
                x = (x * self.scale_nchw + self.shift_nchw) if self.scaled else x + self.shift_nchw
            y = self.net(x)
            return torch.softmax(y, dim=1) if output_kind == "probabilities" else y

    plain = PhoneIO(net, k, b).eval()
    if input_type != "uint8":
        return plain
    # x * k + b = k * (x + b / k): the per-channel 1/std goes into the first convolution's weights,
    # leaving one add on the input. Exact, zero padding included (a zero stays a zero when scaled),
    # provided that convolution is the first thing the network does to its input: checked below on
    # random pixels, and the explicit multiply-add stays where it does not hold.
    folded_net = copy.deepcopy(net)
    first = next((m for m in folded_net.modules() if isinstance(m, torch.nn.Conv2d)), None)
    if first is None or first.in_channels != 3 or first.groups != 1:
        return plain
    with torch.no_grad():
        first.weight.mul_(k.view(1, 3, 1, 1))
    folded = PhoneIO(folded_net, torch.ones(3), b / k).eval()
    shape = (2, size, size, 3) if layout == "NHWC" else (2, 3, size, size)
    x = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    with torch.no_grad():
        want, got = plain(x), folded(x)
    tol = 1e-4 * max(1.0, float(want.abs().max()))
    return folded if float((want - got).abs().max()) <= tol else plain


def _quantization_config(observer: str) -> Any:
    from litert_torch.quantize.pt2e_quantizer import get_symmetric_quantization_config

    cfg = get_symmetric_quantization_config(is_per_channel=True)
    if observer == "histogram":
        return cfg
    import dataclasses

    from torchao.quantization.pt2e.observer import MinMaxObserver, MovingAverageMinMaxObserver

    if observer == "minmax":  # global min/max: fast, hostage to rare outliers
        ctr = MinMaxObserver.with_args(eps=2**-12)
    elif observer in IMAGE_MAX_OBSERVERS:
        ctr = _image_percentile_observer().with_args(eps=2**-12, percentile=IMAGE_MAX_OBSERVERS[observer])
    else:  # mean_minmax: a slow moving average of each image's min/max (NNCF's default estimator)
        ctr = MovingAverageMinMaxObserver.with_args(averaging_constant=0.01, eps=2**-12)
    act = dataclasses.replace(cfg.input_activation, observer_or_fake_quant_ctr=ctr)
    return dataclasses.replace(cfg, input_activation=act, output_activation=act)


@functools.lru_cache(maxsize=None)
def _image_percentile_observer() -> Any:
    """A torchao observer whose range is a percentile, over the calibration batches (one image each
    in compile), of each batch's max, and the complementary percentile of each batch's min: between
    ``mean_minmax`` (clips every image above the mean) and ``minmax`` (coarse steps for all images
    when a few are outliers). Defined on first use so that importing this module needs no torchao."""
    import torch
    from torchao.quantization.pt2e.observer import MinMaxObserver

    class ImagePercentileObserver(MinMaxObserver):
        def __init__(self, *args: Any, percentile: float = 0.95, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.percentile = float(percentile)
            self.batch_mins: list[float] = []
            self.batch_maxs: list[float] = []

        def forward(self, x_orig: Any) -> Any:
            if x_orig.numel():
                lo, hi = torch.aminmax(x_orig.detach().float())
                self.batch_mins.append(float(lo))
                self.batch_maxs.append(float(hi))
            return super().forward(x_orig)

        def calculate_qparams(self) -> Any:
            if self.batch_maxs:  # (the global min/max stay where nothing was observed)
                lo = float(np.quantile(self.batch_mins, 1.0 - self.percentile))
                hi = float(np.quantile(self.batch_maxs, self.percentile))
                self.min_val.copy_(torch.tensor(lo))
                self.max_val.copy_(torch.tensor(hi))
            return self._calculate_qparams(self.min_val, self.max_val)

    return ImagePercentileObserver


def load_qat_program(path: str | os.PathLike) -> Any:
    """The PT2E program quantization-aware training wrote (``edgeskin.train.qat.export_pt2``), as a
    module in eval mode."""
    import torch
    from torchao.quantization.pt2e import allow_exported_model_train_eval  # also registers the quantize ops

    module = torch.export.load(str(path)).module()
    allow_exported_model_train_eval(module)
    module.eval()  # (the replaced eval returns None)
    return module


def _static_int8(litert_torch: Any, net: Any, sample: tuple) -> bytes:
    """``net``, which already holds PT2E's quantize/dequantize ops (a converted program), as an
    INT8 LiteRT model; litert-torch reads only the quantizer's kind (static) from the config."""
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig

    static = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    return bytes(_quiet(lambda: litert_torch.convert(net, sample, quant_config=QuantConfig(pt2e_quantizer=static))
                        .model_content()))


def to_fp16(model: bytes) -> bytes:
    """Float16 weights (with DEQUANTIZE ops), float32 compute and I/O: TFLite's "float16
    quantization". (litert-torch's own fp16 recipe fails to build its interpreter here.)"""
    from ai_edge_quantizer import Quantizer, qtyping
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    qt = Quantizer(bytes(model))
    qt.add_weight_only_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED, num_bits=16,
                              granularity=qtyping.QuantGranularity.TENSORWISE,
                              algorithm_key=AlgorithmName.FLOAT_CASTING)
    return bytes(qt.quantize().quantized_model)


def io_details(model: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    from ..runtime.backends import LiteRTBackend

    b = LiteRTBackend(model, threads=1)
    return ({"dtype": np.dtype(b.input["dtype"]).name, "quant": b.input_quant, "shape": list(b.input["shape"])},
            {"dtype": np.dtype(b.output["dtype"]).name, "quant": b.output_quant, "shape": list(b.output["shape"])})


def pixels(x: np.ndarray, mean255: tuple[float, ...], std255: tuple[float, ...], bgr: bool) -> np.ndarray:
    """Normalised NCHW tensors back to the RGB pixels (0-255, float32 holding integers) they
    came from: what a ``uint8``-input model is fed."""
    m = np.asarray(mean255, np.float64).reshape(1, 3, 1, 1)
    sd = np.asarray(std255, np.float64).reshape(1, 3, 1, 1)
    p = x.astype(np.float64) * sd + m
    if bgr:
        p = p[:, ::-1]
    return np.ascontiguousarray(np.clip(np.rint(p), 0, 255), dtype=np.float32)


def resize_whole(img: np.ndarray, size: int) -> np.ndarray:
    """An HWC uint8 image squeezed to ``size`` x ``size`` as MediaPipe's ImageClassifier does
    without a region of interest: the whole image, aspect ratio not kept, bilinear sampling at
    pixel centres without antialiasing (OpenCV ``warpAffine`` with ``INTER_LINEAR``, its CPU
    path). The result is uint8."""
    h, w = img.shape[:2]

    def axis(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        c = (np.arange(size) + 0.5) * (n_in / size) - 0.5
        c = np.clip(c, 0, n_in - 1)
        lo = np.floor(c).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (c - lo)

    y0, y1, fy = axis(h)
    x0, x1, fx = axis(w)
    a = img.astype(np.float32)
    top = a[y0][:, x0] * (1 - fx)[None, :, None] + a[y0][:, x1] * fx[None, :, None]
    bot = a[y1][:, x0] * (1 - fx)[None, :, None] + a[y1][:, x1] * fx[None, :, None]
    out = top * (1 - fy)[:, None, None] + bot * fy[:, None, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def app_preprocessing_check(model: bytes, val: Dataset, pre: Any, codes: tuple[str, ...] | list[str], *,
                            probabilities: bool = True, threads: int | None = None) -> dict[str, Any]:
    """How much a phone app loses by resizing the whole image (MediaPipe's default without a
    region of interest) instead of edgeskin's resize-shorter-side and centre crop: both ways
    through ``model`` (an NHWC uint8-input model) on the validation images. Top-1 agreement
    between the two, and each way's balanced accuracy."""
    from ..metrics import balanced_accuracy
    from ..preprocess import center_crop, open_image, resize_shorter
    from ..runtime.backends import LiteRTBackend
    from ..runtime.numerics import softmax

    b = LiteRTBackend(model, threads=threads)
    crop, whole, ys = [], [], []
    for smp in val.samples:  # decoded once: edgeskin's crop (load_resized + center_crop) and the whole image
        img = open_image(smp.path)
        crop.append(center_crop(np.asarray(resize_shorter(img, pre.resize_size, pre.interpolation), np.uint8),
                                pre.size))
        whole.append(resize_whole(np.asarray(img, dtype=np.uint8), pre.size))
        ys.append(list(codes).index(smp.dx))

    def probs(images: list[np.ndarray]) -> np.ndarray:
        y = b.run(np.stack(images).astype(np.float32)) if images else np.zeros((0, len(codes)), np.float32)
        return np.asarray(y, np.float64) if probabilities else softmax(np.asarray(y, np.float64))

    pc, pw, y = probs(crop), probs(whole), np.asarray(ys)
    n = len(y)
    bc = balanced_accuracy(pc.argmax(1), y, len(codes)) if n else float("nan")
    bw = balanced_accuracy(pw.argmax(1), y, len(codes)) if n else float("nan")
    return {"split": "val", "n": n,
            "centre_crop": f"resize the shorter side to {pre.resize_size}, centre crop {pre.size} (edgeskin's own)",
            "whole_image": f"whole image resized to {pre.size}x{pre.size}, aspect ratio not kept, bilinear without "
                           "antialiasing (MediaPipe ImageClassifier without a region of interest, emulated)",
            "top1_agreement": float(np.mean(pc.argmax(1) == pw.argmax(1))) if n else float("nan"),
            "balanced_accuracy_centre_crop": bc, "balanced_accuracy_whole_image": bw,
            "balanced_accuracy_drop_points": 100 * (bc - bw)}


def _quiet(convert: Any) -> Any:
    """The converter's C++ start-up lines (absl, oneDNN) stay out of the log unless --verbose."""
    from ..quiet import third_party_output

    with third_party_output(native=True):
        return convert()


class TfliteTarget(Target):
    name = "tflite"
    aliases = ("android", "ios", "phone", "litert")
    precisions = ("int8", "fp16", "fp32")
    needs_calibration = ("int8",)
    extras = ("compress", "tflite", "phone")
    engine = "litert"
    description = "phones through LiteRT (TFLite): litert-torch PT2E INT8, FP16 or FP32; NHWC or NCHW input"
    default_device = "android-arm64"

    def compile(
        self,
        model: str | os.PathLike,
        *,
        precision: str,
        dataset: Dataset,
        split: Split,
        out: str | os.PathLike,
        calibration: CalibrationSet | None = None,
        member: str | None = None,
        budget: Budget = Budget.for_compile(),
        layout: str = "NHWC",
        int8_adds: bool = False,
        first_conv_float: bool = False,
        observer: str = "max_p95",
        input_type: str = "uint8",
        output_kind: str = "probabilities",
        subset_size: int = 512,
        qat: str = "auto",
        device: str | None = None,
        force: bool = False,
        overwrite: bool = False,
        threads: int | None = None,
        golden_n: int = 8,
        reporter: Reporter | None = None,
    ) -> CompileResult:
        self.check_precision(precision)
        if layout not in LAYOUTS:
            raise ConfigError(f"unknown layout {layout!r}", "choose NHWC (phones) or NCHW")
        if observer not in OBSERVERS:
            raise ConfigError(f"unknown observer {observer!r}", f"choose one of: {', '.join(OBSERVERS)}")
        if input_type not in INPUT_TYPES:
            raise ConfigError(f"unknown input type {input_type!r}",
                              "choose uint8 (RGB pixels 0-255, what phone apps feed) or normalized")
        if output_kind not in OUTPUT_KINDS:
            raise ConfigError(f"unknown output kind {output_kind!r}", "choose probabilities or logits")
        if precision in self.needs_calibration and calibration is None:
            raise ConfigError(f"{self.name}/{precision} needs a calibration set",
                              "make one with `edgeskin calib make` and pass --calib calibration/NAME.json")
        litert_torch = _quiet(lambda: require("litert_torch", extra="compress", purpose="compiling for phones (LiteRT)"))
        require("mediapipe", extra="phone", purpose="writing the phone bundle's metadata (MediaPipe's writer)")
        import torch

        from ..profiles import get_profile

        reporter = reporter or NullReporter()
        profile = get_profile(device or self.default_device)
        if profile.target != self.name:
            raise ConfigError(f"device {profile.name} is a {profile.target} device, not a phone",
                              f"pass --target {profile.target}, or another --device")
        self.check_device_precision(profile, precision)
        ck = select_member(model, member, target="tflite")
        pre, labels = ck.preprocess, ck.labels
        learned = self._trained_form(ck, qat=qat, first_conv_float=first_conv_float, int8_adds=int8_adds,
                                     reporter=reporter) if precision == "int8" else None
        val, val_x, val_y = load_eval_set(split.apply(dataset, "val"), pre, labels, what="validation",
                                          reporter=reporter)
        val_ids = [s.image_id for s in val.samples]
        net: torch.nn.Module = ck.model.float().eval()
        with torch.inference_mode():
            fp32_probs = torch.softmax(torch.cat([net(torch.from_numpy(val_x[s : s + 64]))
                                                  for s in range(0, len(val_x), 64)]).float(), 1).numpy()
        to_layout = (lambda a: np.ascontiguousarray(a.transpose(0, 2, 3, 1))) if layout == "NHWC" else (lambda a: a)
        k = 255.0 if pre.input_range == 1.0 else 1.0  # normalise in 0-255 pixel units
        mean255, std255 = tuple(k * m for m in pre.mean), tuple(k * v for v in pre.std)
        bgr = pre.channel_order == "BGR"
        if input_type == "uint8":  # the model's input: pixels; the compile-time check feeds those
            to_model = lambda a: to_layout(pixels(a, mean255, std255, bgr))  # noqa: E731
        else:
            to_model = to_layout
        if learned is not None:  # the INT8 form trained quantization-aware, in place of the float network
            reporter.message(f"{ck.name} was trained quantization-aware for {self.name}: its learned ranges and "
                             "weights make the INT8 model (no fresh calibration)")
            net = load_qat_program(learned[0])
        net = phone_io_module(net, mean255=mean255, std255=std255, bgr=bgr, input_type=input_type,
                              output_kind=output_kind, layout=layout, size=pre.size)
        first = to_model(val_x[:1])
        sample = (torch.from_numpy(first.astype(np.uint8) if input_type == "uint8" else first),)
        record: dict[str, Any] = {"converter": "litert-torch", "layout": layout, "input_type": input_type,
                                  "output_kind": output_kind}
        if input_type == "uint8":
            record["normalization"] = {"where": "inside the model, an explicit pixel * (1 / std) - mean / std "
                                                "before the first convolution", "mean_0_255": list(mean255),
                                       "std_0_255": list(std255), "channel_order": pre.channel_order}
        reporter.message(f"converting {ck.name} to LiteRT {precision} ({layout} {input_type} input, {output_kind})")
        from ..quiet import third_party_output

        try:
            with third_party_output():  # the converter's stage lines (shown with --verbose)
                if learned is not None:
                    data = _static_int8(litert_torch, net, sample)
                    record["quantization"] = ("quantization-aware (torchao PT2E, litert-torch's quantizer): "
                                              "per-channel symmetric INT8 weights, per-tensor INT8 activations; "
                                              "classifier in float")
                else:
                    data = self._convert(litert_torch, net, sample, precision, calibration, dataset, split, pre,
                                         to_model, record, int8_adds=int8_adds, observer=observer,
                                         subset_size=subset_size, first_conv_float=first_conv_float, ck=ck,
                                         input_type=input_type, reporter=reporter)
        except (ConfigError, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - a converter failure becomes a clear error
            raise CompileError(f"LiteRT conversion failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                               "try --precision fp32, or --layout NCHW, and report this model") from exc
        data = bytes(data)
        inp, outp = io_details(data)
        spec = replace(InputSpec.from_preprocess(pre), layout=layout, name="args_0")
        if input_type == "uint8":
            if inp["dtype"] != "uint8":
                raise CompileError(f"the converted model takes {inp['dtype']}, not uint8 pixels",
                                   "report this model; --input-type normalized avoids it")
            # the runtime feeds pixels 0-255, RGB, unnormalised: the model does the rest
            spec = replace(spec, channel_order="RGB", input_range=255.0, normalization="meanstd",
                           mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
        if inp["quant"] is not None:
            spec = replace(spec, dtype=inp["dtype"], scale=inp["quant"][0], zero_point=inp["quant"][1])
        output: dict[str, Any] = {"name": "output_0", "kind": "probs" if output_kind == "probabilities" else "logits",
                                  "dtype": outp["dtype"]}
        if outp["quant"] is not None:
            output.update(scale=outp["quant"][0], zero_point=outp["quant"][1])
        from .tflite_metadata import write_metadata

        data = write_metadata(data, labels=labels.codes, name=f"edgeskin {ck.name}",
                              description=f"Skin-lesion classifier ({labels.name}, {len(labels.codes)} classes), "
                                          f"{precision}, {input_type} input, {output_kind} out; compiled by edgeskin "
                                          f"from {ck.sha256[:12]}",
                              input_type=input_type, output_kind=output_kind, mean255=mean255, std255=std255)
        record["metadata"] = {"format": "TFLite ModelMetadata (MediaPipe metadata writer) + labels.txt",
                              "normalization_0_255": (None if input_type == "uint8"
                                                      else {"mean": list(mean255), "std": list(std255)}),
                              "output": output_kind}
        provenance = {**model_provenance(ck.name, ck.config["arch"], ck.sha256, ck.config, split),
                      "conversion": record, "device": {"profile": profile.name, "title": profile.title}}
        if learned is not None:
            from .prepare import qat_record

            provenance["quantization"] = qat_record(learned[1], {"first_conv_float": bool(first_conv_float),
                                                                 "int8_adds": False, "qat": qat})
        elif precision == "int8" and calibration is not None:
            provenance["calibration"] = calibration.summary()
            provenance["quantization"] = {"mode": "post-training", "observer": observer}
        extra: dict[str, Any] = {}
        if layout == "NHWC" and input_type == "uint8":
            reporter.message("measuring whole-image resize against the centre crop on the validation split")
            extra["app_preprocessing"] = app_preprocessing_check(data, val, pre, labels.codes, threads=threads,
                                                                 probabilities=output_kind == "probabilities")
        manifest = base_manifest(
            name=Path(out).name.removesuffix(".edgeskin"), target=self.name, precision=precision,
            engine={"name": "litert", "format": "tflite", "delegates": profile.extra.get("delegates", ["xnnpack"]),
                    "layout": layout, "int8_adds": bool(int8_adds) if precision == "int8" else None,
                    "threads": profile.threads},
            input=spec, labels=tuple(labels.codes), label_set=labels.name, model_file="model.tflite",
            output=output,
            toolchain=toolchain_versions("torch", "litert_torch", "ai_edge_litert", "torchao", "mediapipe", "numpy"),
            provenance=provenance, extra=extra,
        )
        xs = to_model(val_x)
        reporter.start(f"checking the {precision} artefact through the runtime", len(xs))
        try:
            return verify_and_write(
                manifest=manifest, files={"model.tflite": data, "labels.txt": labels_txt(manifest.labels)},
                val_inputs=xs, val_labels=val_y, val_ids=val_ids, reference_probs=fp32_probs, budget=budget,
                out=Path(out), force=force, overwrite=overwrite, golden_n=golden_n,
                golden_tolerance={"fp32": 1e-4, "fp16": 1e-3, "int8": 1e-2}[precision], threads=threads,
                progress=reporter.advance)
        finally:
            reporter.stop()

    def _trained_form(self, ck: Any, *, qat: str, first_conv_float: bool, int8_adds: bool,
                      reporter: Reporter) -> tuple[Path, dict[str, Any]] | None:
        """The PT2E program quantization-aware training made of ``ck`` for this target (file,
        record), when the compile options are the ones it was trained with."""
        from .prepare import trained_form

        if qat not in ("auto", "off"):
            raise ConfigError(f"unknown qat setting {qat!r}", "choose auto or off")

        def misfit(rec: dict[str, Any]) -> str | None:
            trained_fcf = bool(rec.get("config", {}).get("first_conv_float", True))
            if trained_fcf != bool(first_conv_float) or int8_adds:
                return (f"keeps {'the first convolution, ' if trained_fcf else ''}the residual additions and the "
                        "classifier in float; these compile options ask for another float set")
            return None

        return trained_form(ck.name, ck.config, Path(ck.path) if ck.source == "edgeskin" else None, ck.sha256,
                            self.name, off=qat == "off", misfit=misfit, reporter=reporter)

    def _convert(self, litert_torch: Any, net: Any, sample: Any, precision: str, calibration: Any, dataset: Any,
                 split: Any, pre: Any, to_layout: Any, record: dict[str, Any], *, int8_adds: bool, observer: str,
                 subset_size: int, first_conv_float: bool, ck: Any, input_type: str, reporter: Any) -> Any:
        if precision == "fp32":
            return _quiet(lambda: litert_torch.convert(net, sample).model_content())
        if precision == "fp16":
            record["fp16"] = "float16 weights (ai-edge-quantizer FLOAT_CASTING), float32 compute and I/O"
            return to_fp16(_quiet(lambda: litert_torch.convert(net, sample).model_content()))
        assert calibration is not None
        data, qrec = self._int8(litert_torch, net, calibration, dataset, split, pre, to_layout, sample,
                                int8_adds=int8_adds, observer=observer, subset_size=subset_size,
                                float_modules=STEMS.get(ck.config["arch"], ()) if first_conv_float else (),
                                input_type=input_type, reporter=reporter)
        record.update(qrec)
        return data

    def _int8(self, litert_torch: Any, net: Any, calibration: CalibrationSet, dataset: Dataset, split: Split,
              pre: Any, to_layout: Any, sample: tuple, *, int8_adds: bool, observer: str, subset_size: int,
              float_modules: tuple[str, ...], input_type: str, reporter: Reporter) -> tuple[bytes, dict[str, Any]]:
        cal = calibration_inputs(calibration, dataset, split, pre, reporter)[: max(1, subset_size)]

        def inputs() -> Any:
            for x in cal:
                xi = to_layout(x)
                yield xi.astype(np.uint8) if input_type == "uint8" else xi

        data = post_training_int8(litert_torch, net, sample, inputs(), n=len(cal), int8_adds=int8_adds,
                                  observer=observer, float_modules=float_modules, reporter=reporter)
        return data, {"quantization": "PT2E static: per-channel symmetric INT8 weights, per-tensor INT8 "
                                      "activations; classifier in float",
                      "observer": observer, "calibration_samples": len(cal),
                      "float_modules": list(float_modules),
                      "residual_adds": "int8" if int8_adds else "float"}


def litert_quantizer(observer: str, float_modules: tuple[str, ...] | list[str], *, wrapper: str | None = "net",
                     int8_adds: bool = False, fake_quantize: bool = False) -> Any:
    """litert-torch's PT2E quantizer as the tflite compile step sets it up: ``observer``'s
    activation ranges, ``float_modules`` (of the network under ``wrapper``, the attribute under
    which :class:`PhoneIO` holds it, whose own nodes stay float; None for a bare network) and the
    classifier kept in float, residual additions quantized with ``int8_adds``. With
    ``fake_quantize`` every observer sits in a torchao ``FakeQuantize`` (the same ranges, for
    quantization-aware training)."""
    import dataclasses

    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer

    cfg = _quantization_config(observer)
    if fake_quantize:
        from torchao.quantization.pt2e import FakeQuantize

        def fq(spec: Any) -> Any:
            return dataclasses.replace(spec, observer_or_fake_quant_ctr=FakeQuantize.with_args(
                observer=spec.observer_or_fake_quant_ctr))

        cfg = dataclasses.replace(cfg, input_activation=fq(cfg.input_activation),
                                  output_activation=fq(cfg.output_activation), weight=fq(cfg.weight))
    qcls = _residual_quantizer_class() if int8_adds else PT2EQuantizer
    prefix = f"{wrapper}." if wrapper else ""
    q = _skipping(qcls, tuple(prefix + m for m in float_modules), io_wrapper=wrapper)().set_global(cfg)
    # keep the classifier in float: litert's module-type filter compares the type *names*
    # torch.export records, so the class must be given by its qualified name
    q.set_module_type("torch.nn.modules.linear.Linear", None)
    return q


def post_training_int8(litert_torch: Any, net: Any, sample: tuple, inputs: Any, *, n: int, int8_adds: bool,
                       observer: str, float_modules: tuple[str, ...], wrapper: str | None = "net",
                       reporter: Reporter | None = None) -> bytes:
    """The tflite compile step's post-training INT8 of ``net`` (PT2E static quantization with
    litert-torch's quantizer, calibrated on ``inputs``, ``n`` model inputs fed one at a time, with
    ``observer``), converted by litert-torch. ``float_modules``: the network's modules kept in float;
    ``wrapper``: the attribute under which :class:`PhoneIO` holds the network (its own nodes stay
    float), or None for a bare network. The classifier stays float."""
    import contextlib
    import io

    import torch
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    reporter = reporter or NullReporter()
    q = litert_quantizer(observer, float_modules, wrapper=wrapper, int8_adds=int8_adds)
    g = torch.export.export(net, sample).module()
    with contextlib.redirect_stdout(io.StringIO()):  # litert prints one line per shared ReLU module
        g = prepare_pt2e(g, q)
    reporter.start(f"calibrating ({n} images, {observer} observer)", n)
    with torch.no_grad():
        for x in inputs:
            g(torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x)
            reporter.advance(1)
    reporter.stop()
    g = convert_pt2e(g, fold_quantize=False)
    return bytes(_quiet(lambda: litert_torch.convert(g, sample, quant_config=QuantConfig(pt2e_quantizer=q))
                        .model_content()))


register(TfliteTarget())
