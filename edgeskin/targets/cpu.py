"""Target ``cpu`` (aliases ``onnx``, ``ort``, ``onnxruntime``): ONNX Runtime on the host CPU.

fp32: the exported ONNX graph. int8: NNCF post-training quantization (per-channel INT8
weights, UINT8 activations: the QDQ form ORT fuses into its integer kernels), optionally
accuracy-controlled.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import InputSpec
from ..calibration import CalibrationSet
from ..data import Dataset, Split
from ..errors import ConfigError, require
from ..progress import NullReporter, Reporter
from ..quantize import QuantizeOptions
from .base import Budget, CompileResult, Target, base_manifest, labels_txt, verify_and_write
from .prepare import calibration_inputs, prepare
from .registry import register


def toolchain_versions(*modules: str) -> dict[str, str]:
    import importlib

    out = {}
    for m in modules:
        try:
            out[m] = str(importlib.import_module(m).__version__)
        except Exception:  # noqa: BLE001
            pass
    return out


class OnnxTarget(Target):
    """A target whose artefact is an ONNX graph: export, optional NNCF INT8, verification through
    the runtime, bundle. Subclasses adapt the opset, the engine record and the INT8 form."""

    #: the device profile used when none is given
    default_device: str | None = None

    def resolve_opset(self, opset: int | None, device: Any) -> int:
        return 17 if opset is None else int(opset)

    def engine_record(self, precision: str, opset: int, device: Any, input_spec: InputSpec) -> dict[str, Any]:
        return {"name": "onnxruntime", "format": "onnx", "opset": opset, "providers": ["CPUExecutionProvider"]}

    def finish(self, proto: Any, precision: str, record: dict[str, Any], device: Any) -> tuple[Any, dict | None]:
        """Last rewrite of the graph before it is verified and bundled, and the checks made on
        it (recorded in the manifest). Default: neither."""
        return proto, None

    def golden_tolerance(self, precision: str) -> float:
        return 1e-4 if precision == "fp32" else 1e-2

    def toolchain(self) -> dict[str, str]:
        return toolchain_versions("torch", "onnx", "onnxruntime", "nncf", "numpy")

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
        quantize: QuantizeOptions = QuantizeOptions(),
        opset: int | None = None,
        device: str | None = None,
        jetpack: str | None = None,
        force: bool = False,
        overwrite: bool = False,
        threads: int | None = None,
        golden_n: int = 8,
        reporter: Reporter | None = None,
    ) -> CompileResult:
        self.check_precision(precision)
        onnx = require("onnx", extra="compress", purpose="compiling for the cpu target")
        reporter = reporter or NullReporter()
        if precision in self.needs_calibration and calibration is None:
            raise ConfigError(f"{self.name}/{precision} needs a calibration set",
                              "make one with `edgeskin calib make` and pass --calib calibration/NAME.json")
        from ..profiles import get_profile

        profile = get_profile(device or self.default_device) if (device or self.default_device) else None
        if profile is not None and profile.target != self.name:
            raise ConfigError(f"device {profile.name} is a {profile.target} device, not a {self.name} one",
                              f"pass --target {profile.target}, or another --device")
        if profile is not None:
            self.check_device_precision(profile, precision)
        dev = (profile, profile.jetpack(jetpack) if profile is not None and profile.jetpacks else None)
        opset = self.resolve_opset(opset, dev)
        prep = prepare(model, dataset=dataset, split=split, member=member, opset=opset, reporter=reporter,
                       threads=threads)
        try:
            provenance = prep.provenance(split)
            if profile is not None:
                provenance["device"] = {"profile": profile.name, "title": profile.title,
                                        **({"jetpack": dev[1].to_dict()} if dev[1] is not None else {})}
            record: dict[str, Any] = {}
            proto = onnx.load(prep.onnx_path)
            if precision == "int8":
                assert calibration is not None
                cal = calibration_inputs(calibration, dataset, split, prep.preprocess, reporter)
                validation = None
                if quantize.max_drop is not None:
                    validation = ([(i, prep.val_inputs[i : i + 1]) for i in range(len(prep.val_inputs))],
                                  _metric_fn(prep.val_labels, prep.labels.codes, threads,
                                             quantize.control_metric, prep.fp32_probs))
                from .prepare import qat_graph

                learned = qat_graph(prep, self.name, quantize, reporter)
                if learned is not None:
                    reporter.message(f"{prep.name} was trained quantization-aware for {self.name}: its learned "
                                     "ranges and weights make the INT8 graph (no fresh calibration)")
                    proto, record = learned
                else:
                    reporter.message(f"quantizing to INT8 with NNCF ({len(cal)} calibration images"
                                     + (f", accuracy control max drop {quantize.max_drop}"
                                        if quantize.max_drop is not None else "") + ")")
                    proto, record = self._calibrate(proto, cal, quantize, validation, prep, dev, threads, reporter)
                if quantize.fallback_agreement is not None and learned is None:
                    from ..quantize import float_fallback

                    reporter.message(f"float fallback towards {100 * quantize.fallback_agreement:.1f}% agreement "
                                     "with FP32 on the validation split")
                    proto, fb = float_fallback(proto, inputs=prep.val_inputs, fp32_probs=prep.fp32_probs,
                                               target_agreement=quantize.fallback_agreement,
                                               max_layers=quantize.fallback_max_layers, threads=threads,
                                               progress=lambda m: reporter.update(m))
                    record["float_fallback"] = fb
                    reporter.message(f"float fallback: {len(fb['kept_float'])} activation quantizer(s) kept in "
                                     f"float, agreement {100 * fb['start_agreement']:.2f}% -> "
                                     f"{100 * fb['final_agreement']:.2f}%")
                provenance["calibration"] = calibration.summary()
                provenance["quantization"] = record
            proto, checks = self.finish(proto, precision, record, dev)
            if checks is not None:
                provenance["artefact_checks"] = checks
            model_bytes = proto.SerializeToString()
            input_spec = InputSpec.from_preprocess(prep.preprocess)
            manifest = base_manifest(
                name=Path(out).name.removesuffix(".edgeskin"),
                target=self.name, precision=precision,
                engine=self.engine_record(precision, opset, dev, input_spec),
                input=input_spec,
                labels=tuple(prep.labels.codes), label_set=prep.labels.name, model_file="model.onnx",
                output={"name": "logits", "kind": "logits"},
                toolchain=self.toolchain(),
                provenance=provenance,
            )
            reporter.start(f"checking the {precision} artefact through the runtime", len(prep.val_inputs))
            try:
                res = verify_and_write(
                    manifest=manifest, files={"model.onnx": model_bytes, "labels.txt": labels_txt(manifest.labels)},
                    val_inputs=prep.val_inputs, val_labels=prep.val_labels, val_ids=prep.val_ids,
                    reference_probs=prep.fp32_probs, budget=budget, out=Path(out), force=force,
                    overwrite=overwrite, golden_n=golden_n, golden_tolerance=self.golden_tolerance(precision),
                    threads=threads, progress=reporter.advance)
            finally:
                reporter.stop()
            return res
        finally:
            prep.close()


    def _calibrate(self, proto: Any, cal: list, quantize: QuantizeOptions, validation: Any, prep: Any, dev: Any,
                   threads: int | None, reporter: Reporter) -> tuple[Any, dict[str, Any]]:
        """NNCF post-training quantization. ``range_estimator = auto`` quantizes once per candidate
        estimator (:data:`~edgeskin.quantize.AUTO_ESTIMATORS`) and keeps the graph whose final form
        (after :meth:`finish`) agrees most with FP32 on the validation split (ties: the first);
        every candidate's agreement is recorded."""
        from dataclasses import replace

        from ..quantize import AUTO_ESTIMATORS, quantize_onnx

        if quantize.range_estimator != "auto":
            return quantize_onnx(proto, cal, quantize, validation=validation)
        from ..runtime.backends import OnnxRuntimeBackend

        best: tuple[float, Any, dict[str, Any]] | None = None
        tried = []
        want = prep.fp32_probs.argmax(1)
        for name in AUTO_ESTIMATORS:
            reporter.update(f"INT8 with {name} activation ranges")
            q, rec = quantize_onnx(proto, cal, replace(quantize, range_estimator=name), validation=validation)
            final, _ = self.finish(q, "int8", rec, dev)
            b = OnnxRuntimeBackend(final.SerializeToString(), threads=threads)
            x = prep.val_inputs
            got = np.concatenate([b.run(x[i : i + 32]) for i in range(0, len(x), 32)]).argmax(1) if len(x) else want
            agree = float(np.mean(got == want)) if len(x) else float("nan")
            tried.append({"range_estimator": name, "val_agreement": agree})
            if best is None or agree > best[0]:
                best = (agree, q, rec)
        assert best is not None
        record = best[2]
        record["range_estimator_search"] = {"chose": record["options"]["range_estimator"], "tried": tried,
                                            "on": "validation split, top-1 agreement with FP32"}
        reporter.message("activation ranges: " + ", ".join(
            f"{t['range_estimator']} {100 * t['val_agreement']:.2f}%" for t in tried)
            + f" agreement on val; kept {record['options']['range_estimator']}")
        return best[1], record


class CpuTarget(OnnxTarget):
    name = "cpu"
    aliases = ("onnx", "ort", "onnxruntime")
    precisions = ("fp32", "int8")
    needs_calibration = ("int8",)
    extras = ("compress", "runtime")
    engine = "onnxruntime"
    description = "host CPU through ONNX Runtime (fp32, or NNCF INT8 in ORT's fast QDQ form)"


def _metric_fn(y: np.ndarray, codes: tuple[str, ...], threads: int | None, kind: str,  # noqa: ANN202
               fp32_probs: np.ndarray):
    """Accuracy-control metric on the validation split, computed with ONNX Runtime on the
    candidate model (higher is better): top-1 agreement with FP32 (``agreement``), or the mean
    of balanced accuracy and melanoma recall (``clinical``)."""
    from ..metrics import classification_report
    from ..runtime.backends import OnnxRuntimeBackend
    from ..runtime.numerics import softmax

    cache: dict[str, Any] = {}

    def metric(model: Any, items: list) -> float:
        idx = np.array([i for i, _ in items], dtype=np.int64)
        xs = np.concatenate([item for _, item in items])
        # NNCF scores one item at a time while collecting per-item values: build each
        # candidate's session once (one-entry cache, keyed by the model object itself)
        if cache.get("model") is not model:
            cache["model"], cache["backend"] = model, OnnxRuntimeBackend(model.SerializeToString(), threads=threads)
        b = cache["backend"]
        probs = softmax(np.concatenate([b.run(xs[s : s + 32]) for s in range(0, len(xs), 32)]))
        if kind == "agreement":
            return float(np.mean(probs.argmax(1) == fp32_probs[idx].argmax(1)))
        r = classification_report(probs, y[idx], codes)
        pos = r.get("mel_sensitivity", r.get("malignant_sensitivity"))
        return 0.5 * (float(r["balanced_accuracy"]) + float(pos))

    return metric


register(CpuTarget())
