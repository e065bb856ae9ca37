"""One place for every setting the command line and recipes share.

A :class:`Setting` says once what an option is: its name (the recipe key and the Python name),
type, range or choices, default and help. From those declarations:

* :func:`command_options` adds the options to a Typer command (``edgeskin train --epochs``),
* :func:`recipe_keys` / :func:`recipe_specs` give a recipe section its keys and value checks,
* the builders (:func:`train_config`, :func:`distill_config`, :func:`bench_config`) turn a dict
  of values, from either source, into the configuration objects of the API.

So a new option is added in one place and reaches both the command line and recipes. Compile
options have their own table in :mod:`edgeskin.targets.options` (they differ per target); this
module turns it into command-line options the same way (:func:`compile_settings`).
"""

from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, List, Mapping, Optional

from .errors import ConfigError

CLI, RECIPE = "cli", "recipe"


@dataclass(frozen=True)
class Setting:
    """One option. ``kind``: int | float | str | bool | list (of text). ``default`` None: not
    given (the preset or the API decides). ``flags``: command-line spellings (a bool's first
    flag may be ``--on/--off``); default ``--name-with-dashes``. ``choices``: the allowed
    texts. ``recipe_default``: where a recipe's default differs from the command's (recipes
    bench on their own stage, so e.g. the distillation report is off there). ``cli=False`` /
    ``recipe=False``: only in one of the two."""

    name: str
    kind: type
    default: Any
    help: str
    flags: tuple[str, ...] = ()
    lo: float | None = None
    hi: float | None = None
    #: the allowed texts, or a function giving them (read only when a value is checked, so that
    #: building the command line imports nothing heavy)
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None
    recipe_default: Any = ...
    cli: bool = True
    recipe: bool = True
    spec: Any = None  # a validate spec where the default rule (kind, range, choices) is not enough

    def default_for(self, where: str) -> Any:
        return self.default if where == CLI or self.recipe_default is ... else self.recipe_default

    def allowed(self) -> tuple[str, ...] | None:
        return self.choices() if callable(self.choices) else self.choices

    def check_spec(self) -> Any:
        """The :mod:`edgeskin.validate` spec of this setting's recipe value."""
        from .validate import Bool, Int, ListOf, Num, Str, choices

        if self.spec is not None:
            return self.spec() if callable(self.spec) else self.spec
        if self.choices:
            return choices(self.allowed() or ())
        if self.kind is bool:
            return Bool()
        if self.kind is int:
            return Int(self.lo, self.hi)
        if self.kind is float:
            return Num(self.lo, self.hi)
        if self.kind is list:
            return ListOf(Str())
        return Str()

    def typer_option(self) -> tuple[Any, Any]:
        """(annotation, typer.Option) of the command-line option."""
        import typer

        flags = self.flags or (f"--{self.name.replace('_', '-')}",)
        listed = isinstance(self.choices, tuple) and "|" not in self.help
        help_ = self.help + (f" One of: {' | '.join(self.choices)}." if listed else "")  # type: ignore[arg-type]
        if self.kind is list:
            return Optional[List[str]], typer.Option(None, *flags, help=help_)
        if self.kind is bool:
            return bool, typer.Option(bool(self.default), *flags, help=help_)
        ann: Any = self.kind if self.default is not None else Optional[self.kind]
        rng = {"min": self.lo, "max": self.hi} if self.kind in (int, float) else {}
        return ann, typer.Option(self.default, *flags, help=help_, **rng)


def _names(groups: Iterable[Iterable[Setting]]) -> list[Setting]:
    seen: dict[str, Setting] = {}
    for g in groups:
        for s in g:
            seen[s.name] = s
    return list(seen.values())


def command_options(*groups: Iterable[Setting], into: str = "settings") -> Callable[[Callable], Callable]:
    """Decorator: add the command-line options of ``groups`` to a Typer command. The command
    receives their values as one dict argument ``into`` (keyed by setting name)."""
    settings = [s for s in _names(groups) if s.cli]

    def deco(fn: Callable) -> Callable:
        hints = typing.get_type_hints(fn)
        sig = inspect.signature(fn)
        params = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()
                  if p.name != into]
        taken = {p.name for p in params}
        for s in settings:
            if s.name in taken:
                raise TypeError(f"{fn.__name__}: option {s.name!r} declared twice")
            ann, opt = s.typer_option()
            params.append(inspect.Parameter(s.name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=ann))

        @functools.wraps(fn)
        def wrapper(*args: Any, **kw: Any) -> Any:
            values = {s.name: kw.pop(s.name) for s in settings if s.name in kw}
            for s in settings:  # the recipe's rule for a choice, on the command line too
                v = values.get(s.name)
                allowed = s.allowed() if v is not None and s.choices and s.spec is None else None
                if allowed and v not in allowed:
                    import difflib

                    flag = (s.flags or (f"--{s.name.replace('_', '-')}",))[0].split("/")[0]
                    close = difflib.get_close_matches(str(v), list(allowed), n=1)
                    raise ConfigError(f"{flag} {v!r} is not one of: {', '.join(allowed)}"
                                      + (f"; did you mean {close[0]!r}?" if close else ""),
                                      f"e.g. {flag} {close[0] if close else s.default or allowed[0]}")
            return fn(*args, **kw, **{into: values})

        wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return deco


def recipe_keys(*groups: Iterable[Setting]) -> set[str]:
    return {s.name for s in _names(groups) if s.recipe}


def recipe_specs(*groups: Iterable[Setting]) -> dict[str, Any]:
    return {s.name: s.check_spec() for s in _names(groups) if s.recipe}


def values(groups: Iterable[Iterable[Setting]], given: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Every setting of ``groups`` with its value: ``given``'s, else the default for ``where``."""
    return {s.name: given[s.name] if given.get(s.name) is not None else s.default_for(where)
            for s in _names(groups)}


# ----------------------------------------------------------------------------- the settings

DEVICE_HELP = "Compute device: auto (CUDA when available) | cpu | cuda | cuda:N. Under torchrun: cuda:LOCAL_RANK."


def _presets() -> tuple[str, ...]:
    from .train.config import PRESETS

    return tuple(PRESETS)


def _archs() -> tuple[str, ...]:
    from .models.arch import ARCHS

    return tuple(ARCHS)


def _inits() -> tuple[str, ...]:
    from .train.distill import INITS

    return tuple(INITS)


def _losses() -> tuple[str, ...]:
    from .train.losses import LOSSES

    return tuple(LOSSES)


@functools.lru_cache(maxsize=1)
def training() -> tuple[Setting, ...]:
    """Settings of every training run: an ensemble's members and a distilled student."""
    return (
        Setting("preset", str, "quick", "tiny | quick | reference | published: defaults that the options below override.",
                choices=_presets),
        Setting("epochs", int, None, "Maximum epochs (per member).", lo=1, hi=100_000),
        Setting("batch_size", int, None, "Batch size.", lo=1, hi=65_536),
        Setting("lr", float, None, "Peak learning rate (AdamW, warm-up then cosine). Default: the preset's; a student "
                "that starts from a teacher member uses a third of it.", lo=0.0, hi=10.0),
        Setting("focal_gamma", float, 2.0, "Focal loss gamma (alpha = the class weights).", lo=0.0, hi=100.0),
        Setting("pretrained", str, None, "imagenet (torchvision's weights, downloaded once into torch hub's cache) | "
                "auto (the cache if present, else random; never downloads) | none | URL | FILE. Default: the "
                "preset's (published: imagenet; others: auto)."),
        Setting("patience", int, 8, "Stop after this many epochs without a better validation balanced accuracy.",
                lo=1, hi=100_000),
        Setting("seed", int, 0, "Seed (ensemble member i uses seed + i).", lo=0, hi=2**32 - 1),
        Setting("bf16", str, "auto", "Mixed precision: auto (CUDA: bf16 where the GPU has it, else fp16 with a "
                "gradient scaler; CPU: bf16 if it has the instructions) | on | off (fp32). Teachers, evaluate and "
                "bench always run in fp32.", choices=("auto", "on", "off")),
        Setting("compute_device", str, "auto", DEVICE_HELP, flags=("--device", "--compute-device")),
        Setting("deterministic", bool, False, "Repeatable CUDA runs: torch's deterministic algorithms and no cuDNN "
                "autotuning (slower); off: fast non-deterministic kernels.", flags=("--deterministic",)),
        Setting("threads", int, None, "Torch threads (default: torch's choice).", lo=1, hi=4096),
        Setting("steps_per_epoch", int, None, "Cap steps per epoch (smoke tests).", lo=1, hi=10**9),
    )


@functools.lru_cache(maxsize=1)
def ensemble() -> tuple[Setting, ...]:
    """Settings of an ensemble (``edgeskin train``, a recipe's ``[ensemble]``), on top of :func:`training`."""
    from .labels import LABEL_SETS
    from .validate import AnyOf, Int, ListOf, choices

    def losses_spec() -> Any:
        return AnyOf((choices(_losses()), ListOf(choices(_losses()))))

    return (
        Setting("members", int, 3, "Number of ensemble members (different seeds).", lo=1, hi=1000),
        Setting("arch", str, None, "resnet50 (default) | resnet18 | mobilenet_v3_large.", choices=_archs),
        Setting("labels", str, "ham10000", "ham10000 (7 classes) or binary (malignant = mel, bcc, akiec).",
                choices=tuple(LABEL_SETS)),
        Setting("size", int, None, "Input size in pixels (224 published; 112 quick).", lo=32, hi=4096),
        Setting("losses", str, None, "wce | focal | ce, or a comma list, one per member. Default: wce, focal, wce, ...",
                flags=("--loss", "--losses"),
                spec=losses_spec),
        Setting("freeze_epochs", int, None, "Epochs with the backbone frozen. Default: 2 if pretrained, else 0.",
                lo=0, hi=100_000),
        Setting("finetune_stages", str, "auto", "Stages trained after the warm-up: auto | all | N (the last N).",
                spec=AnyOf((choices(("auto", "all")), Int(0, 100)))),
    )


@functools.lru_cache(maxsize=1)
def student() -> tuple[Setting, ...]:
    """Settings of a distilled student (``edgeskin distill``, a recipe's ``[student]``), on top of :func:`training`."""
    return (
        Setting("arch", str, "resnet50", "The student: resnet50 (default) | resnet18 | mobilenet_v3_large.",
                flags=("--student",), choices=_archs),
        Setting("loss", str, "wce", "Hard-label loss: wce | focal | ce.", choices=_losses),
        Setting("temperature", float, 4.0, "Softmax temperature of the distillation term (scaled by T²).",
                flags=("--temperature", "-T"), lo=1e-6, hi=1000.0),
        Setting("alpha", float, 0.7, "Weight of the distillation term; 1 - alpha goes to the hard-label loss.",
                lo=0.0, hi=1.0),
        Setting("init", str, "auto", "auto (ImageNet if present, else the best teacher member of the same "
                "architecture, else random) | imagenet | member | scratch.", choices=_inits),
        Setting("member", str, None, "Member copied by init = member (default: best validation balanced accuracy)."),
        Setting("augment", bool, True, "Augment training views (the teacher runs online on the same view). Off: "
                "teacher outputs are cached once.", flags=("--augment/--no-augment",)),
        Setting("report_on", str, "test", "Split of the final student-vs-teacher report: test | val | none.",
                flags=("--report-on",), choices=("test", "val", "none"), recipe_default="none"),
        Setting("latency_runs", int, 30, "Interleaved batch-1 runs timing teacher vs student (0: skip).",
                lo=0, hi=10**6, recipe_default=0),
        Setting("latency_threads", int, None, "Threads for the latency runs (default: the engines' choice).",
                lo=1, hi=4096),
    ) + qat()


@functools.lru_cache(maxsize=1)
def qat() -> tuple[Setting, ...]:
    """Quantization-aware epochs (``distill --qat-epochs``, a recipe's ``[student]``, ``edgeskin qat``)."""
    return (
        Setting("qat_epochs", int, 0, "Quantization-aware epochs after the float ones: the student's INT8 form "
                "for --qat-target is trained (NNCF; tflite: torchao PT2E), and compile uses it. 0: none.",
                lo=0, hi=1000),
        Setting("qat_target", str, "cpu", "The INT8 form trained, and the compile target that uses it: cpu (ONNX "
                "Runtime: INT8 weights, UINT8 activations) | jetson (TensorRT: symmetric INT8) | tflite (LiteRT: "
                "INT8, litert-torch's quantizer).",
                choices=("cpu", "jetson", "tflite")),
        Setting("qat_objective", str, "match", "What the quantization-aware epochs fit: match (the float "
                "student's own logits, mean squared error, SGD, classifier fixed: fits only what quantization "
                "changed) | distill (the ensemble's distillation loss plus the two terms below, Adam).",
                choices=("match", "distill")),
        Setting("qat_lr", float, None, "Learning rate of the quantization-aware epochs (cosine to 0). Default: "
                "3e-3 for match (SGD), 3e-6 for distill (Adam).", lo=1e-9, hi=1.0),
        Setting("qat_consistency", float, 1.0, "distill objective: weight of the term that keeps the INT8 "
                "decisions on the float student's own (0: the ensemble and the labels only).", lo=0.0, hi=100.0),
        Setting("qat_agreement", float, 0.0, "distill objective: weight of the cross-entropy that pulls the INT8 "
                "logits towards the float student's own top-1 decision on each view. 0: off.",
                lo=0.0, hi=100.0),
    )


@functools.lru_cache(maxsize=1)
def qat_single() -> tuple[Setting, ...]:
    """Settings of ``edgeskin qat`` (quantization-aware fine-tuning of one checkpoint): the
    :func:`qat` settings under shorter flags, and what of :func:`training` / :func:`student` applies."""
    by = {s.name: s for s in training() + student()}
    q = {s.name: s for s in qat()}
    return (
        replace(q["qat_epochs"], default=1, lo=1, flags=("--epochs", "--qat-epochs"),
                help="Quantization-aware epochs (NNCF; tflite: torchao PT2E) on the split's training images."),
        replace(q["qat_target"], flags=("--target", "--qat-target")),
        replace(q["qat_objective"], flags=("--objective", "--qat-objective")),
        replace(q["qat_lr"], flags=("--lr", "--qat-lr")),
        replace(q["qat_consistency"], flags=("--consistency", "--qat-consistency"),
                help="Weight of the term that keeps the INT8 decisions on the checkpoint's own float ones."),
        replace(q["qat_agreement"], flags=("--agreement", "--qat-agreement"),
                help="Weight of the cross-entropy towards the checkpoint's own float top-1 decision. 0: off."),
        by["temperature"],
        replace(by["alpha"], default=1.0, help="Weight of the distillation term (the teacher); 1 - alpha goes to "
                "the hard-label loss (--loss, class-weighted as in training)."),
        by["loss"],
        replace(by["augment"], default=False, help="Augment training views (the teacher runs online on the same "
                "view). Off (default): the teacher's outputs are computed once and cached beside the checkpoint."),
        by["batch_size"], by["seed"], by["compute_device"], by["deterministic"], by["threads"],
        by["steps_per_epoch"],
    )


@functools.lru_cache(maxsize=1)
def bench_timing() -> tuple[Setting, ...]:
    """How ``edgeskin bench`` (and a recipe's ``[bench]``) times and runs the rows."""
    return (
        Setting("threads", int, None, "Runtime threads for every bundle.", lo=1, hi=4096),
        Setting("min_samples", int, 1000, "Batch-1 timing: at least this many runs per row, model only and end to "
                "end (p99 is shown from 1000).", flags=("--min-samples", "--runs"), lo=1, hi=10**7),
        Setting("min_seconds", float, 10.0, "Batch-1 timing: and at least this many seconds per row.",
                lo=0.0, hi=86_400.0),
        Setting("engine", str, "auto", "Jetson bundles: auto | tensorrt | onnxruntime (host proxy).",
                choices=("auto", "tensorrt", "onnxruntime")),
        Setting("compute_device", str, "auto", "Where the ensemble and student rows are evaluated (fp32): auto | "
                "cpu | cuda | cuda:N. Latency is always measured on the host CPU.", flags=("--compute-device",)),
    )


# ----------------------------------------------------------------------------- the builders

def _pretrained(text: Any) -> Any:
    """``pretrained``: auto | imagenet | none | URL | FILE (a path is normalised); None: not given."""
    from pathlib import Path

    if text is None or text in ("auto", "imagenet", "none") or str(text).startswith(("http://", "https://")):
        return text
    return str(Path(str(text)))


def train_config(given: Mapping[str, Any], *, student_run: bool = False, where: str = CLI):  # noqa: ANN201
    """The :class:`~edgeskin.train.TrainConfig` of an ensemble member (or, ``student_run``, of a
    distilled student) from the settings' values: the preset's defaults, then what was given."""
    from .train import TrainConfig, preset_settings

    groups = (training(), student() if student_run else ensemble())
    v = values(groups, given, where)
    over = {k: given.get(k) for k in ("arch", "size", "epochs", "batch_size", "lr", "steps_per_epoch")
            if k in v}
    over["pretrained"] = _pretrained(given.get("pretrained"))
    kw = preset_settings(str(v["preset"]), **over)
    p = kw.get("pretrained", "auto")
    kw["pretrained"] = None if p == "none" else p
    common = {"focal_gamma": float(v["focal_gamma"]), "patience": int(v["patience"]), "seed": int(v["seed"]),
              "bf16": str(v["bf16"])}
    if student_run:
        common["loss"] = str(v["loss"])
        if v["augment"] is False:
            common["augment"] = None
    else:
        common.update(labels=str(v["labels"]), freeze_epochs=v["freeze_epochs"],
                      finetune_stages=str(v["finetune_stages"]))
    try:
        return TrainConfig(**{**kw, **common})
    except TypeError as exc:
        raise ConfigError(f"bad training setting: {exc}", "see recipes/quick.toml for the keys") from None


def member_losses(given: Mapping[str, Any], members: int) -> list[str] | None:
    """One loss per member from ``losses`` (a name, a comma list or a list); None: the default cycle."""
    losses = given.get("losses")
    if losses is None:
        return None
    if isinstance(losses, str):
        losses = [s.strip() for s in losses.split(",") if s.strip()]
    losses = list(losses)
    known = _losses()
    for name in losses:
        if name not in known:
            raise ConfigError(f"unknown loss {name!r}", f"choose from: {', '.join(known)}")
    return losses * members if len(losses) == 1 else losses


def distill_config(given: Mapping[str, Any], *, where: str = CLI):  # noqa: ANN201
    """The :class:`~edgeskin.train.DistillConfig` from the settings' values. A student that starts
    from a teacher member (already trained) gets a third of the learning rate, unless ``lr`` is given."""
    from .train import DistillConfig

    from .train.qat import QatConfig

    v = values((training(), student()), given, where)
    train = train_config(given, student_run=True, where=where)
    q = QatConfig(epochs=int(v["qat_epochs"]), target=str(v["qat_target"]), objective=str(v["qat_objective"]),
                  lr=None if v["qat_lr"] is None else float(v["qat_lr"]),
                  consistency=float(v["qat_consistency"]), agreement=float(v["qat_agreement"]),
                  seed=int(v["seed"]), batch_size=train.batch_size,
                  steps_per_epoch=train.steps_per_epoch)
    return DistillConfig(train=train, temperature=float(v["temperature"]),
                         alpha=float(v["alpha"]), init=str(v["init"]), member=v["member"],
                         member_lr_factor=None if given.get("lr") is not None else 1 / 3, qat=q)


def compute(given: Mapping[str, Any], *, training_run: bool = True, init_distributed: bool = True):  # noqa: ANN201
    """The one device decision of a run, from ``compute_device``, ``bf16`` and ``deterministic``."""
    from .models.compute import resolve_compute

    return resolve_compute(str(given.get("compute_device") or "auto"),
                           bf16=str(given.get("bf16") or "auto") if training_run else "off",
                           deterministic=bool(given.get("deterministic", False)), init_distributed=init_distributed)


def apply_threads(given: Mapping[str, Any]) -> None:
    """``threads``: torch's thread count for this process (unset: torch's choice)."""
    if given.get("threads"):
        import torch

        torch.set_num_threads(int(given["threads"]))


def bench_config(given: Mapping[str, Any], *, where: str = CLI):  # noqa: ANN201
    """The bench's :class:`~edgeskin.bench.BenchConfig` (``runs`` is the older name of ``min_samples``)."""
    from .bench import BenchConfig

    g = dict(given)
    if g.get("min_samples") is None and g.get("runs") is not None:
        g["min_samples"] = g["runs"]
    v = values((bench_timing(),), g, where)
    return BenchConfig(threads=v["threads"], min_samples=int(v["min_samples"]), min_seconds=float(v["min_seconds"]),
                       engine=str(v["engine"]))


# ----------------------------------------------------------------------------- compile options

#: command-line spellings of compile options whose flag is not ``--name-with-dashes``
_COMPILE_FLAGS: dict[str, tuple[str, ...]] = {
    "max_drop_int8": ("--max-drop-int8",),
    "float_fallback": ("--float-fallback",),
    "head_float": ("--head-float/--head-int8",),
    "first_conv_float": ("--first-conv-float/--first-conv-int8",),
    "int8_adds": ("--int8-adds/--float-adds",),
    "ignore": ("--ignore",),
}


def compile_settings() -> tuple[Setting, ...]:
    """The compile options of :mod:`edgeskin.targets.options` as settings (for the command line)."""
    from .targets.options import HELP, OPTIONS, _types
    from .validate import Bool, Int, ListOf, Num

    out = []
    for name, (default, users) in OPTIONS.items():
        spec = _types()[name]
        kind = bool if isinstance(spec, Bool) else int if isinstance(spec, Int) else \
            float if isinstance(spec, Num) else list if isinstance(spec, ListOf) else str
        where = "" if users is None else f" ({', '.join(users)})"
        out.append(Setting(name, kind, None if kind is list else default, HELP.get(name, name) + where,
                           flags=_COMPILE_FLAGS.get(name, ()), lo=getattr(spec, "lo", None),
                           hi=getattr(spec, "hi", None)))
    return tuple(out)
