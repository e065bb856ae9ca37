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

Input layout NHWC (phones) or NCHW. The labels and normalisation also go into standard TFLite
metadata. The compiled model is checked through the runtime against FP32 like every target.
"""

from __future__ import annotations

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
OBSERVERS = ("histogram", "minmax", "mean_minmax")


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


def _skipping(qcls: Any, prefixes: tuple[str, ...]) -> Any:
    """``qcls`` that leaves the nodes of the named modules (and their weights) in float."""

    def inside(fqn: str) -> bool:
        fqn = fqn.removeprefix("wrapped.")
        return any(fqn == p or fqn.startswith(p + ".") for p in prefixes)

    class Skipping(qcls):  # type: ignore[misc, valid-type]
        def annotate(self, model: Any) -> Any:
            model = super().annotate(model)
            for n in model.graph.nodes:
                stack = n.meta.get("nn_module_stack") or {}
                fqns = [v[0] for v in stack.values()]
                if fqns and inside(fqns[-1]):
                    n.meta.pop("quantization_annotation", None)
            return model

    return Skipping


def _quantization_config(observer: str) -> Any:
    from litert_torch.quantize.pt2e_quantizer import get_symmetric_quantization_config

    cfg = get_symmetric_quantization_config(is_per_channel=True)
    if observer == "histogram":
        return cfg
    import dataclasses

    from torchao.quantization.pt2e.observer import MinMaxObserver, MovingAverageMinMaxObserver

    if observer == "minmax":  # global min/max: fast, hostage to rare outliers
        ctr = MinMaxObserver.with_args(eps=2**-12)
    else:  # mean_minmax: a slow moving average of each image's min/max (NNCF's default estimator)
        ctr = MovingAverageMinMaxObserver.with_args(averaging_constant=0.01, eps=2**-12)
    act = dataclasses.replace(cfg.input_activation, observer_or_fake_quant_ctr=ctr)
    return dataclasses.replace(cfg, input_activation=act, output_activation=act)


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
    extras = ("compress", "tflite")
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
        budget: Budget = Budget(),
        layout: str = "NHWC",
        int8_adds: bool = False,
        first_conv_float: bool = False,
        observer: str = "mean_minmax",
        subset_size: int = 512,
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
        if precision in self.needs_calibration and calibration is None:
            raise ConfigError(f"{self.name}/{precision} needs a calibration set",
                              "make one with `edgeskin calib make` and pass --calib calibration/NAME.json")
        litert_torch = _quiet(lambda: require("litert_torch", extra="compress", purpose="compiling for phones (LiteRT)"))
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
        val, val_x, val_y = load_eval_set(split.apply(dataset, "val"), pre, labels, what="validation",
                                          reporter=reporter)
        val_ids = [s.image_id for s in val.samples]
        net: torch.nn.Module = ck.model.float().eval()
        with torch.inference_mode():
            fp32_probs = torch.softmax(torch.cat([net(torch.from_numpy(val_x[s : s + 64]))
                                                  for s in range(0, len(val_x), 64)]).float(), 1).numpy()
        to_layout = (lambda a: np.ascontiguousarray(a.transpose(0, 2, 3, 1))) if layout == "NHWC" else (lambda a: a)
        if layout == "NHWC":
            net = litert_torch.to_channel_last_io(net, args=[0]).eval()
        sample = (torch.from_numpy(to_layout(val_x[:1])),)
        record: dict[str, Any] = {"converter": "litert-torch", "layout": layout}
        reporter.message(f"converting {ck.name} to LiteRT {precision} ({layout} input)")
        from ..quiet import third_party_output

        try:
            with third_party_output():  # the converter's stage lines (shown with --verbose)
                data = self._convert(litert_torch, net, sample, precision, calibration, dataset, split, pre,
                                     to_layout, record, int8_adds=int8_adds, observer=observer,
                                     subset_size=subset_size, first_conv_float=first_conv_float, ck=ck,
                                     reporter=reporter)
        except (ConfigError, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - a converter failure becomes a clear error
            raise CompileError(f"LiteRT conversion failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                               "try --precision fp32, or --layout NCHW, and report this model") from exc
        data = bytes(data)
        inp, outp = io_details(data)
        spec = replace(InputSpec.from_preprocess(pre), layout=layout, name="args_0")
        if inp["quant"] is not None:
            spec = replace(spec, dtype=inp["dtype"], scale=inp["quant"][0], zero_point=inp["quant"][1])
        output: dict[str, Any] = {"name": "output_0", "kind": "logits", "dtype": outp["dtype"]}
        if outp["quant"] is not None:
            output.update(scale=outp["quant"][0], zero_point=outp["quant"][1])
        from ..tflite_metadata import add_metadata, build_metadata

        meta = build_metadata(labels=labels.codes, mean=[255 * m for m in pre.mean], std=[255 * s for s in pre.std],
                              size=pre.size, name=f"edgeskin {ck.name}", version=ck.sha256[:12],
                              description=f"Skin-lesion classifier ({labels.name}, {len(labels.codes)} classes), "
                                          f"{precision}, compiled by edgeskin",
                              input_is_float=inp["quant"] is None)
        data = add_metadata(data, meta, labels.codes)
        record["metadata"] = {"format": "TFLite ModelMetadata (TFLITE_METADATA) + labels.txt",
                              "normalization_0_255": {"mean": [255 * m for m in pre.mean],
                                                      "std": [255 * s for s in pre.std]}}
        provenance = {**model_provenance(ck.name, ck.config["arch"], ck.sha256, ck.config, split),
                      "conversion": record, "device": {"profile": profile.name, "title": profile.title}}
        if precision == "int8" and calibration is not None:
            provenance["calibration"] = calibration.summary()
        manifest = base_manifest(
            name=Path(out).name.removesuffix(".edgeskin"), target=self.name, precision=precision,
            engine={"name": "litert", "format": "tflite", "delegates": profile.extra.get("delegates", ["xnnpack"]),
                    "layout": layout, "int8_adds": bool(int8_adds) if precision == "int8" else None,
                    "threads": profile.threads},
            input=spec, labels=tuple(labels.codes), label_set=labels.name, model_file="model.tflite",
            output=output,
            toolchain=toolchain_versions("torch", "litert_torch", "ai_edge_litert", "torchao", "numpy"),
            provenance=provenance,
        )
        xs = to_layout(val_x)
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

    def _convert(self, litert_torch: Any, net: Any, sample: Any, precision: str, calibration: Any, dataset: Any,
                 split: Any, pre: Any, to_layout: Any, record: dict[str, Any], *, int8_adds: bool, observer: str,
                 subset_size: int, first_conv_float: bool, ck: Any, reporter: Any) -> Any:
        if precision == "fp32":
            return _quiet(lambda: litert_torch.convert(net, sample).model_content())
        if precision == "fp16":
            record["fp16"] = "float16 weights (ai-edge-quantizer FLOAT_CASTING), float32 compute and I/O"
            return to_fp16(_quiet(lambda: litert_torch.convert(net, sample).model_content()))
        assert calibration is not None
        data, qrec = self._int8(litert_torch, net, calibration, dataset, split, pre, to_layout, sample,
                                int8_adds=int8_adds, observer=observer, subset_size=subset_size,
                                float_modules=STEMS.get(ck.config["arch"], ()) if first_conv_float else (),
                                reporter=reporter)
        record.update(qrec)
        return data

    def _int8(self, litert_torch: Any, net: Any, calibration: CalibrationSet, dataset: Dataset, split: Split,
              pre: Any, to_layout: Any, sample: tuple, *, int8_adds: bool, observer: str, subset_size: int,
              float_modules: tuple[str, ...], reporter: Reporter) -> tuple[bytes, dict[str, Any]]:
        import torch
        from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer
        from litert_torch.quantize.quant_config import QuantConfig
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        cal = calibration_inputs(calibration, dataset, split, pre, reporter)[: max(1, subset_size)]
        qcls = _residual_quantizer_class() if int8_adds else PT2EQuantizer
        if float_modules:
            qcls = _skipping(qcls, float_modules)
        q = qcls().set_global(_quantization_config(observer))
        # keep the classifier in float: litert's module-type filter compares the type *names*
        # torch.export records, so the class must be given by its qualified name
        q.set_module_type("torch.nn.modules.linear.Linear", None)
        g = torch.export.export(net, sample).module()
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # litert prints one line per shared ReLU module
            g = prepare_pt2e(g, q)
        reporter.start(f"calibrating ({len(cal)} images, {observer} observer)", len(cal))
        with torch.no_grad():
            for x in cal:
                g(torch.from_numpy(to_layout(x)))
                reporter.advance(1)
        reporter.stop()
        g = convert_pt2e(g, fold_quantize=False)
        data = _quiet(lambda: litert_torch.convert(g, sample, quant_config=QuantConfig(pt2e_quantizer=q)).model_content())
        return bytes(data), {"quantization": "PT2E static: per-channel symmetric INT8 weights, per-tensor INT8 "
                                             "activations; classifier in float",
                             "observer": observer, "calibration_samples": len(cal),
                             "float_modules": list(float_modules),
                             "residual_adds": "int8" if int8_adds else "float"}


register(TfliteTarget())
