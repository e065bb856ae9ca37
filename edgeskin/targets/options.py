"""One vocabulary of compile options for every target, shared by `edgeskin compile` and recipes.

Each target's ``compile()`` takes its own keyword arguments (the ONNX targets a
:class:`~edgeskin.quantize.QuantizeOptions`, tflite its PT2E settings); :func:`compile_kwargs`
maps the common option names onto them and refuses options the target does not have.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError

#: option -> (default, targets that use it; None: every target)
OPTIONS: dict[str, tuple[Any, tuple[str, ...] | None]] = {
    "device": (None, None),
    "subset_size": (512, None),
    "first_conv_float": (False, None),
    "bias_correction": ("none", ("cpu", "jetson")),
    "preset": ("performance", ("cpu", "jetson")),
    "ignore": ((), ("cpu", "jetson")),
    "head_float": (True, ("cpu", "jetson")),
    "range_estimator": ("max_p95", ("cpu", "jetson")),
    "max_drop_int8": (None, ("cpu", "jetson")),
    "float_fallback": (None, ("cpu", "jetson")),
    "fallback_max_layers": (12, ("cpu", "jetson")),
    "control_metric": ("agreement", ("cpu", "jetson")),
    "opset": (None, ("cpu", "jetson")),
    "qat": ("auto", ("cpu", "jetson", "tflite")),
    "jetpack": (None, ("jetson",)),
    "layout": ("NHWC", ("tflite",)),
    "int8_adds": (False, ("tflite",)),
    "observer": ("max_p95", ("tflite",)),
    "input_type": ("uint8", ("tflite",)),
    "output_kind": ("probabilities", ("tflite",)),
}


def _types() -> dict[str, Any]:
    """What each option's value may be (checked before anything is compiled)."""
    from ..validate import AnyOf, Bool, Int, ListOf, Num, Str

    text = Str()
    return {
        "device": text, "subset_size": Int(1, 10**6), "first_conv_float": Bool(),
        "bias_correction": Str(("none", "fast", "full")),
        "preset": text, "ignore": ListOf(text), "head_float": Bool(), "range_estimator": text,
        "max_drop_int8": Num(0, 100), "float_fallback": Num(0, 1), "fallback_max_layers": Int(0, 10_000),
        "control_metric": text, "opset": Int(7, 30), "jetpack": AnyOf((text, Num(0, 100))), "layout": text,
        "int8_adds": Bool(), "observer": text, "input_type": Str(("uint8", "normalized")),
        "output_kind": Str(("probabilities", "logits")),
        "qat": Str(("auto", "off")),
    }


def device_for_alias(target: Any, typed: str) -> str | None:
    """A target named by a device alias (``ios``, ``android``, ``cpu``) compiles for that device."""
    from ..profiles import load_profiles

    typed = typed.strip().lower()
    return next((p.name for p in load_profiles().values() if p.target == target.name and typed in p.aliases), None)


def compile_kwargs(target: Any, typed: str, options: dict[str, Any], *, where: str = "") -> dict[str, Any]:
    """The keyword arguments of ``target.compile`` for the common ``options`` (unset: default).

    ``typed``: the target name as the user wrote it (an alias may pick the device).
    ``where``: names the source of the options in errors (e.g. ``recipe.toml [[targets]] #2``).
    """
    opts = {k: v for k, v in options.items() if v is not None}
    for key in opts:
        if key not in OPTIONS:
            import difflib

            close = difflib.get_close_matches(key, list(OPTIONS), n=1)
            raise ConfigError(f"{where + ': ' if where else ''}unknown compile option {key!r}"
                              + (f"; did you mean {close[0]!r}?" if close else ""),
                              f"compile options: {', '.join(sorted(OPTIONS))}")
        users = OPTIONS[key][1]
        if users is not None and target.name not in users and opts[key] != OPTIONS[key][0]:
            raise ConfigError(f"{where + ': ' if where else ''}option {key!r} does not apply to target {target.name!r}",
                              f"it is for: {', '.join(users)}")
    from ..validate import check

    types = _types()
    for key, value in opts.items():
        check(value, types[key], key=key, where=where or "compile")
    val = {k: opts.get(k, d) for k, (d, _) in OPTIONS.items()}
    device = val["device"] or device_for_alias(target, typed)
    if target.name == "tflite":
        kw: dict[str, Any] = {"layout": str(val["layout"]).upper(), "int8_adds": bool(val["int8_adds"]),
                              "observer": val["observer"], "first_conv_float": bool(val["first_conv_float"]),
                              "input_type": val["input_type"], "output_kind": val["output_kind"],
                              "device": device, "qat": str(val["qat"])}
        kw["subset_size"] = int(val["subset_size"])
        return kw
    from ..quantize import QuantizeOptions

    q = QuantizeOptions(subset_size=int(val["subset_size"]), bias_correction=str(val["bias_correction"]),
                        preset=val["preset"], ignored=tuple(val["ignore"] or ()), keep_head_float=bool(val["head_float"]),
                        first_conv_float=bool(val["first_conv_float"]), range_estimator=val["range_estimator"],
                        max_drop=val["max_drop_int8"], control_metric=val["control_metric"],
                        fallback_agreement=val["float_fallback"], fallback_max_layers=int(val["fallback_max_layers"]),
                        qat=str(val["qat"]))
    return {"quantize": q, "opset": val["opset"], "device": device, "jetpack": val["jetpack"]}


def describe(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``compile_kwargs``' result as plain JSON (what a recipe's compile key is made of, so a
    changed default also makes a bundle stale)."""
    return {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in kwargs.items()}


#: what each option does, shown by `edgeskin compile --help` (the command's flags are made from
#: this table by :func:`edgeskin.settings.compile_settings`; a new option is added here only)
HELP: dict[str, str] = {
    "device": "Device profile (see `edgeskin devices`); jetson default: jetson-orin-nano.",
    "subset_size": "Calibration images used (NNCF, or the tflite observers); at most the set's size.",
    "first_conv_float": "Keep the first convolution in float.",
    "bias_correction": "NNCF bias correction: none (the default; NNCF's fast variant cost the quick student 3 "
                       "points of agreement with FP32) | fast | full.",
    "preset": "NNCF preset: performance | mixed.",
    "ignore": "Node name (or type:OpType) to keep in float. Repeatable.",
    "head_float": "Keep the classifier layer in float.",
    "range_estimator": "Activation ranges: max_p95 (the default: the 95th percentile over calibration images of each "
                       "image's largest value; max_p90 | max_p99 likewise) | mean_minmax (NNCF's default: their mean) "
                       "| minmax (their maximum) | median_minmax | mean_no_outliers_minmax | mean_quantile | histogram | "
                       "auto (quantize with max_p95 and with minmax, keep the one that agrees more with FP32 on val; "
                       "about twice the time).",
    "max_drop_int8": "Accuracy-controlled INT8: keep the most sensitive layers in float until the control metric "
                     "on val drops at most this (0-1).",
    "float_fallback": "Keep the most damaging activation quantizers in float until top-1 agreement with FP32 on val "
                      "reaches this (e.g. 0.98).",
    "fallback_max_layers": "At most this many quantizers kept in float by --float-fallback.",
    "control_metric": "What accuracy control holds: agreement (top-1 agreement with FP32) | clinical (mean of "
                      "balanced acc. and mel recall).",
    "opset": "ONNX opset (default: 17 for cpu; the device profile's highest for jetson).",
    "qat": "auto: a student trained quantization-aware for this target (distill --qat-target) compiles with the "
           "ranges and weights it learned | off: calibrate afresh.",
    "jetpack": "JetPack release of the Jetson (default: the profile's), which fixes TensorRT and the opset.",
    "layout": "Input layout NHWC (phones) | NCHW.",
    "int8_adds": "Quantize the residual additions too (all-integer graph for NPU delegates).",
    "observer": "Activation ranges for int8: max_p95 (the default: the 95th percentile over calibration images of "
                "each image's max, and the 5th of each image's min; max_p90 | max_p99 likewise) | mean_minmax "
                "(moving average of each image's min/max) | histogram (litert's default) | minmax.",
    "input_type": "What the phone model takes: uint8 (RGB pixels 0-255, normalised inside the model; what MediaPipe "
                  "and apps feed; the default) | normalized (the normalised tensor: float32, or int8 with the "
                  "model's own scale/zero point when the first convolution is quantized; custom pipelines).",
    "output_kind": "What the phone model gives: probabilities (float32, softmax inside the model; the default) | "
                   "logits (the app applies softmax).",
}
