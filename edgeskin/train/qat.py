"""Quantization-aware distillation: a student's last epochs train with a target's INT8 simulated.

Library: NNCF's PyTorch backend (``nncf.quantize`` on the torch model, then ordinary training:
NNCF's fake quantizers pass gradients straight through to the weights and learn their own
ranges). It is the toolkit the compile step's post-training quantization already uses on the
ONNX graph, with the same preset and the same placement of quantizers, so what is simulated
here is what is compiled.

What each target simulates (the INT8 form its compile step writes):

- ``cpu`` (ONNX Runtime): per-channel symmetric INT8 weights; per-tensor symmetric activations,
  UINT8 where the input is non-negative (after ReLU). NNCF's ``performance`` preset.
- ``jetson`` (TensorRT): symmetric INT8 everywhere: the ``performance`` preset with every
  activation quantizer signed (zero point 0, range/127): TensorRT's explicit-quantization form,
  which the jetson target's compile step writes too.

- ``tflite`` (LiteRT): torchao's PT2E with litert-torch's own quantizer, the one the tflite
  compile step quantizes with: per-channel symmetric INT8 weights, per-tensor INT8 activations,
  residual additions float, the classifier float. The fake quantizers are torchao's, started by
  the compile step's observers (``minmax`` or ``mean_minmax``) and then fixed. The result is the
  converted PT2E program (``torch.export``, ``.pt2``); the tflite compile step wraps it in the phone
  input/output layer and converts it with litert-torch, the learned weights and ranges as they are.
  (litert-torch's own QAT annotators for a convolution followed by BatchNorm fail under this
  torch; with the BatchNorm folded first, as below, there is none to annotate.)

BatchNorm is folded into the convolutions before quantizers are placed (what every INT8
compile does), so the weights trained are the weights the INT8 graph carries.

The float student stays the student: it is the FP32 model the bundles are compared with. These
epochs train its INT8 form (shadow float weights behind fake quantizers), starting from the
quantization compile would have made. Two objectives:

- ``match`` (the default): the mean squared difference between the quantized logits and the float
  student's logits on the same view, by plain SGD, the classifier (float in every INT8 form) not
  trained. It is zero at the float model, so it fits only what quantization changed: measured on
  the quick student, the INT8 noise on the gap between the top two logits (the noise that flips
  near-ties) fell by about a quarter in the cpu form (median 0.012 to 0.009 logit) and about a
  tenth in the jetson form, on held-out images; in the tflite form by 2-3 % (its noise is nearly
  all per-tensor activation rounding, which fixed ranges leave as it is). Initial ranges:
  ``minmax`` (``mean_minmax`` clips
  the images whose activations exceed the average maximum; their errors of up to 4 logits then
  dominate the loss and the fit moves every other decision).
- ``distill``: the distillation loss of the float phase on the quantized logits (the ensemble is
  the teacher), plus ``consistency`` times the temperature-scaled KL divergence from the float
  student's own output, plus ``agreement`` times the cross-entropy towards the float student's
  top-1 class; by Adam. Not zero at the float model: on a student with many near-ties each step
  moves decisions (one Adam step at 1e-5 flipped 8 % of them), so the INT8 form drifts from the
  FP32 student that the budgets compare it with. Kept for students whose teacher they should
  still follow.

The result is exported as a QDQ ONNX graph (``student.qat-TARGET.onnx``, its hash recorded in the
student's JSON); the cpu and jetson compile steps use it instead of a fresh calibration.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, require

QAT_TARGETS = ("cpu", "jetson", "tflite")
OBJECTIVES = ("match", "distill")
DEFAULT_LR = {"match": 3e-3, "distill": 3e-6}
#: the starting ranges the tflite form can take: its compile step's observers of those names
LITERT_ESTIMATORS = ("minmax", "mean_minmax")
_TARGET_ALIASES = {"onnx": "cpu", "ort": "cpu", "onnxruntime": "cpu", "tensorrt": "jetson", "trt": "jetson",
                   "litert": "tflite", "android": "tflite", "ios": "tflite", "phone": "tflite"}


def qat_target(name: str) -> str:
    t = _TARGET_ALIASES.get(name, name)
    if t not in QAT_TARGETS:
        raise ConfigError(f"unknown QAT target {name!r}", f"choose one of: {', '.join(QAT_TARGETS)}")
    return t


def qat_suffix(target: str) -> str:
    """The file type of ``target``'s trained INT8 form: a QDQ ONNX graph, or for tflite a PT2E
    program (.pt2)."""
    return ".pt2" if qat_target(target) == "tflite" else ".onnx"


def qat_artefact_key(target: str) -> str:
    """The key of the INT8 form's file and hash in a checkpoint's ``qat.TARGET`` record."""
    return qat_suffix(target).lstrip(".")


@dataclass(frozen=True)
class QatConfig:
    """Quantization-aware epochs after the float ones. ``epochs = 0``: none."""

    epochs: int = 0
    target: str = "cpu"
    #: ``match`` (logit MSE to the float student, SGD, classifier fixed) or ``distill`` (the
    #: teacher's loss + consistency + agreement, Adam); see the module docstring
    objective: str = "match"
    #: learning rate (gradients clipped to norm 1, cosine decay to 0 over the epochs); None: the
    #: objective's own (match: SGD 3e-3; distill: Adam 3e-6)
    lr: float | None = None
    #: weight of the KL term towards the student's own float output (see the module docstring)
    consistency: float = 1.0
    #: weight of the cross-entropy of the quantized logits towards the float student's own top-1
    #: decision on the same view: the term that aims at what the budgets measure (top-1 agreement)
    agreement: float = 0.0
    #: keep the first convolution in float (as ``compile --first-conv-float``); the classifier is
    #: always float, as in compile
    first_conv_float: bool = True
    #: how the activation quantizers' starting ranges are estimated (compile's estimator names)
    range_estimator: str = "minmax"
    batch_size: int = 32
    #: cap on steps per epoch (None: the whole training split)
    steps_per_epoch: int | None = None
    #: training images that set the starting ranges: as many as compile's calibration set (fewer
    #: clipped the held-out images whose activations the subset had not seen)
    calibration_size: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ConfigError(f"QAT epochs must be >= 0, got {self.epochs}")
        object.__setattr__(self, "target", qat_target(self.target))
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"unknown QAT objective {self.objective!r}", f"choose one of: {', '.join(OBJECTIVES)}")
        from ..quantize.nncf_int8 import IMAGE_MAX_ESTIMATORS, RANGE_ESTIMATORS

        # compile resolves auto on validation; the max_pNN ranges are set after NNCF, which QAT does not take
        estimators = [e for e in RANGE_ESTIMATORS if e != "auto" and e not in IMAGE_MAX_ESTIMATORS]
        if self.range_estimator not in estimators:
            raise ConfigError(f"unknown QAT range estimator {self.range_estimator!r}",
                              f"choose one of: {', '.join(estimators)}")
        if self.target == "tflite" and self.range_estimator not in LITERT_ESTIMATORS:
            raise ConfigError(f"QAT range estimator {self.range_estimator!r} has no tflite form",
                              f"for the tflite target choose one of: {', '.join(LITERT_ESTIMATORS)} (its compile "
                              "step's observers)")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"QAT learning rate must be > 0, got {self.lr}")
        if self.consistency < 0:
            raise ConfigError(f"QAT consistency weight must be >= 0, got {self.consistency}")
        if self.agreement < 0:
            raise ConfigError(f"QAT agreement weight must be >= 0, got {self.agreement}")
        if self.batch_size < 1 or self.calibration_size < 1:
            raise ConfigError("QAT batch size and calibration size must be >= 1")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.objective]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lr"] = self.learning_rate
        if not self.agreement:
            del d["agreement"]  # off: the same settings (and digest) as before the term existed
        return d


# ---------------------------------------------------------------- BatchNorm folding

def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, batchnorm) module names where the BatchNorm is the convolution's only consumer,
    found by tracing the model with torch.fx."""
    import torch.fx as fx

    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"quantization-aware training needs a model torch.fx can trace ({type(exc).__name__}: {exc})",
                          "use a torchvision ResNet or MobileNet student") from None
    mods = dict(gm.named_modules())
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0]
        if (getattr(src, "op", None) == "call_module" and isinstance(mods.get(src.target), nn.Conv2d)
                and len(src.users) == 1):
            pairs.append((str(src.target), str(node.target)))
    return pairs


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, list[tuple[str, str]]]:
    """A copy of ``model`` (eval) with each BatchNorm folded into its convolution (which gains a
    bias) and replaced by ``nn.Identity``; the same outputs to float rounding."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = copy.deepcopy(model).float().eval()
    pairs = conv_bn_pairs(model)
    for conv, bn in pairs:
        _set(model, conv, fuse_conv_bn_eval(model.get_submodule(conv), model.get_submodule(bn)))
        _set(model, bn, nn.Identity())
    return model, pairs


# ---------------------------------------------------------------- NNCF quantizers

def _nncf() -> Any:
    # NNCF builds its CPU kernels once per machine (about 80 s on 2 cores, longer than NNCF's
    # default 60 s limit); allow it the time rather than fail
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "900")
    return require("nncf", extra="compress", purpose="quantization-aware training")


def _ignored(model: nn.Module, first_conv_float: bool) -> tuple[list[str], list[str]]:
    """Module names and types kept in float, as compile keeps them: the classifier (every Linear)
    and optionally the first convolution."""
    names = []
    if first_conv_float:
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        names = convs[:1]
    return names, ["linear"]


def quantize_for_training(folded: nn.Module, target: str, calibration: torch.Tensor, *,
                          first_conv_float: bool = True,
                          range_estimator: str = "minmax") -> tuple[nn.Module, dict[str, Any]]:
    """Insert ``target``'s quantizers into the BatchNorm-folded ``folded`` (ranges initialised
    from ``calibration``, an (N, C, H, W) batch). Returns the NNCF model and a record."""
    nncf = _nncf()
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    names, types = _ignored(folded, first_conv_float)
    # NNCF's torch node names for modules are their call paths; match by type/scope instead
    scope_names = []
    if names:
        scope_names = [f"{names[0]}/conv2d/0"]
    ignored = nncf.IgnoredScope(names=scope_names, types=types, validate=False)
    preset = nncf.QuantizationPreset.PERFORMANCE
    data = nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))])
    from ..quiet import third_party_output

    with third_party_output():
        q = nncf.quantize(folded, data, preset=preset, subset_size=len(calibration), ignored_scope=ignored,
                          advanced_parameters=AdvancedQuantizationParameters(
                              disable_bias_correction=True, overflow_fix=OverflowFix.DISABLE,
                              activations_range_estimator_params=getattr(RangeEstimatorParametersSet,
                                                                         range_estimator.upper())))
    signed = 0
    if target == "jetson":
        signed = _make_signed(q)
    return q, {"tool": "nncf", "nncf_version": nncf.__version__, "backend": "torch",
               "preset": "performance",
               "float_modules": names + ["type:" + t for t in types], "signed_activation_quantizers": signed}


def _quantizers(q: nn.Module) -> list[tuple[str, nn.Module]]:
    from nncf.torch.quantization.layers import BaseQuantizer

    return [(n, m) for n, m in q.named_modules() if isinstance(m, BaseQuantizer)]


def _make_signed(q: nn.Module) -> int:
    """TensorRT's form: every per-tensor (activation) quantizer signed, same upper range."""
    from nncf.torch.quantization.layers import SymmetricQuantizer

    n = 0
    for _, m in _quantizers(q):
        if isinstance(m, SymmetricQuantizer) and not m.per_channel and not m.signed:
            m.signed = True
            n += 1
    return n


def freeze_ranges(q: nn.Module, frozen: bool = True) -> None:
    for _, m in _quantizers(q):
        for p in m.parameters():
            p.requires_grad_(not frozen)


# ---------------------------------------------------------------- LiteRT (torchao PT2E)

_BATCH = "batch"


def _export_batched(model: nn.Module, example: torch.Tensor) -> Any:
    """``torch.export`` of ``model`` with a free batch size."""
    batch = torch.export.Dim(_BATCH, min=1, max=65536)
    return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))


def quantize_for_litert(folded: nn.Module, calibration: torch.Tensor, *, first_conv_float: bool = True,
                        range_estimator: str = "minmax") -> tuple[nn.Module, dict[str, Any]]:
    """The tflite compile step's INT8 form of the BatchNorm-folded ``folded`` with fake quantizers
    in place (torchao PT2E, litert-torch's quantizer), their ranges set by ``range_estimator`` (the
    compile step's observer of that name) on ``calibration`` one image at a time, as compile
    calibrates, and then fixed. Returns the prepared program (eval mode) and a record."""
    import warnings

    from ..quiet import third_party_output

    with third_party_output(native=True), warnings.catch_warnings():  # the converter's start-up lines
        warnings.simplefilter("ignore")                                # (shown with --verbose)
        require("litert_torch", extra="compress", purpose="quantization-aware training for LiteRT")
        import torchao
        from torchao.quantization.pt2e import allow_exported_model_train_eval, disable_observer
        from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

        from ..targets.tflite import litert_quantizer

    names, _ = _ignored(folded, first_conv_float)
    # compile's own quantizer and observers, each inside a fake quantizer. is_qat stays False:
    # litert-torch's QAT-only annotators (a convolution followed by BatchNorm) fail under this
    # torch, and with the BatchNorm folded there is nothing for them to do
    quantizer = litert_quantizer(range_estimator, names, wrapper=None, fake_quantize=True)
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # litert prints one line per shared ReLU module
        q = prepare_qat_pt2e(_export_batched(folded, calibration[:2]).module(), quantizer)
    allow_exported_model_train_eval(q)
    q.eval()
    with torch.no_grad():
        for i in range(len(calibration)):
            q(calibration[i : i + 1])
    q.apply(disable_observer)  # the ranges stay where calibration put them; the weights learn
    import litert_torch

    return q, {"tool": "torchao-pt2e", "torchao_version": torchao.__version__,
               "litert_torch_version": getattr(litert_torch, "__version__", None),
               "quantizer": "litert-torch PT2EQuantizer: per-channel symmetric INT8 weights, per-tensor INT8 "
                            "activations; residual additions float",
               "observer": range_estimator, "float_modules": names + ["type:linear"]}


def export_pt2(q: nn.Module, path: str | os.PathLike, *, size: int) -> Path:
    """The trained tflite form as a ``torch.export`` program (``.pt2``): ``convert_pt2e`` turns its
    fake quantizers into quantize/dequantize ops with the learned ranges (weights kept as float
    behind theirs, as the tflite compile step's own conversion takes them); the compile step reads
    it back with :func:`edgeskin.targets.tflite.load_qat_program`."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    from ..fileio import atomic_path

    converted = convert_pt2e(copy.deepcopy(q).cpu(), fold_quantize=False)
    program = _export_batched(converted, torch.zeros(2, 3, size, size))
    out = Path(path)
    with atomic_path(out, suffix=".pt2") as tmp:
        torch.export.save(program, str(tmp))
    return out


# ---------------------------------------------------------------- training

@dataclass
class QatResult:
    model: nn.Module          # the NNCF model (quantizers in place), eval mode
    folded: nn.Module         # its float weights without quantizers (BatchNorm folded)
    pairs: list[tuple[str, str]]
    record: dict[str, Any]


def train_qat(
    model: nn.Module,
    cfg: QatConfig,
    *,
    batches: Any,
    n_train: int,
    teacher_probs: Callable[[torch.Tensor, np.ndarray], torch.Tensor],
    hard_loss: Callable[[torch.Tensor, np.ndarray], torch.Tensor] | None,
    calibration: torch.Tensor,
    temperature: float,
    alpha: float,
    val_inputs: np.ndarray | None = None,
    reporter: Any = None,
) -> QatResult:
    """Quantization-aware fine-tuning of ``model`` (a float student) for ``cfg.epochs`` epochs.

    ``batches.batch(idx, epoch)`` gives the training batch for indices ``idx``;
    ``teacher_probs(x, idx)`` the teacher's probabilities for it; ``hard_loss(logits, idx)`` the
    hard-label loss (None: distillation only). ``val_inputs``: where the simulated INT8 model's
    top-1 agreement with the float model is measured before and after training (recorded).
    Deterministic for a given seed on one machine."""
    from ..progress import NullReporter
    from .losses import distillation_kl

    reporter = reporter or NullReporter()

    torch.manual_seed(cfg.seed)
    litert = cfg.target == "tflite"
    if litert and calibration.device.type != "cpu":
        # torchao's PT2E programs are exported, prepared and converted on the CPU here (its
        # prepare step does not yet move the fake quantizers it inserts to the model's device)
        reporter.message("the tflite form trains on the CPU (torchao PT2E)")
        calibration = calibration.cpu()
    folded, pairs = fold_batchnorm(model.to(calibration.device) if litert else model)
    reference = copy.deepcopy(folded).eval()  # NNCF adds its quantizers to ``folded`` itself
    shadow = copy.deepcopy(folded).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    if litert:  # the PT2E program's ranges are fixed once calibrated
        q, record = quantize_for_litert(folded, calibration, first_conv_float=cfg.first_conv_float,
                                        range_estimator=cfg.range_estimator)
    else:
        q, record = quantize_for_training(folded, cfg.target, calibration, first_conv_float=cfg.first_conv_float,
                                          range_estimator=cfg.range_estimator)
        # the quantizers' ranges stay where calibration put them (what compile would use); the
        # weights learn. Measured on the tiny lossy model of tests/test_qat.py, learning the ranges
        # too changed nothing there, and it needs a learning rate of its own per range's scale.
        freeze_ranges(q)
    if val_inputs is not None:
        record["val_agreement_before"] = simulated_agreement(q, reference, val_inputs)
    match = cfg.objective == "match"
    if match:  # the classifier is float in every INT8 form: training it would only move decisions
        head = {f"{n}.{p}" for n, m in reference.named_modules() if isinstance(m, nn.Linear)
                for p, _ in m.named_parameters(recurse=False)}
        for name, p in q.named_parameters():  # (NNCF and PT2E keep the float model's names)
            if name in head:
                p.requires_grad_(False)
    weights = [p for p in q.parameters() if p.requires_grad]
    # Adam moves every weight by about its learning rate from the first step, whatever its
    # gradient: near the float optimum that is drift; SGD's step follows the (small) gradient
    opt = (torch.optim.SGD(weights, lr=cfg.learning_rate) if match
           else torch.optim.Adam(weights, lr=cfg.learning_rate))
    steps = max(1, math.ceil(n_train / cfg.batch_size))
    if cfg.steps_per_epoch:
        steps = min(steps, cfg.steps_per_epoch)
    total = steps * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / max(total, 1))))
    history = []
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        if not litert:  # (the PT2E program stays in eval mode: BatchNorm is folded, dropout off)
            q.train()
            for mod in q.modules():  # the float student's head has dropout: the INT8 form is fitted without it
                if isinstance(mod, nn.Dropout):
                    mod.eval()
        perm = np.random.default_rng([cfg.seed, epoch, 104729]).permutation(n_train)
        running, seen = 0.0, 0
        reporter.start(f"QAT ({cfg.target}) epoch {epoch + 1}/{cfg.epochs}", steps)
        for step in range(steps):
            idx = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            if len(idx) == 0:
                break
            x = batches.batch(idx, epoch).float().contiguous()
            # (the tflite form runs on the CPU; its logits join the losses where the batches are)
            logits = q(x.to(calibration.device)).to(x.device)
            if match:
                with torch.no_grad():
                    ref_logits = reference(x.to(calibration.device)).float().to(x.device)
                loss = nn.functional.mse_loss(logits.float(), ref_logits)
            else:
                soft = distillation_kl(logits, teacher_probs(x, idx), temperature)
                loss = (soft if (hard_loss is None or alpha >= 1.0)
                        else alpha * soft + (1 - alpha) * hard_loss(logits, idx))
                if cfg.consistency > 0 or cfg.agreement > 0:
                    with torch.no_grad():
                        ref_logits = reference(x.to(calibration.device)).float().to(x.device)
                    if cfg.consistency > 0:
                        loss = loss + cfg.consistency * distillation_kl(logits, torch.softmax(ref_logits, dim=1),
                                                                        temperature)
                    if cfg.agreement > 0:
                        loss = loss + cfg.agreement * nn.functional.cross_entropy(logits.float(),
                                                                                  ref_logits.argmax(1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(weights, 1.0)
            opt.step()
            sched.step()
            running += float(loss.detach()) * len(idx)
            seen += len(idx)
            reporter.advance(1)
        reporter.stop()
        row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": running / max(seen, 1)}
        q.eval()
        if val_inputs is not None:
            row["val_agreement"] = simulated_agreement(q, reference, val_inputs)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        history.append(row)
        reporter.message(f"QAT epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f}"
                         + (f"  simulated INT8 agrees with the float student on {100 * row['val_agreement']:.2f}% "
                            "of validation"
                            if "val_agreement" in row else "") + f"  ({row['seconds']:.0f} s)")
    q.eval()
    record.update({"config": cfg.to_dict(), "history": history, "steps": total})
    if history and "val_agreement" in history[-1]:
        record["val_agreement_after"] = history[-1]["val_agreement"]
    return QatResult(q, float_weights(q, shadow), pairs, record)


def _probs(model: nn.Module, x: np.ndarray, batch: int = 64) -> np.ndarray:
    out = []
    dev = next(model.parameters()).device
    with torch.no_grad():
        for s in range(0, len(x), batch):
            xb = torch.from_numpy(np.ascontiguousarray(x[s : s + batch])).to(dev)
            out.append(torch.softmax(model(xb).float(), 1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def simulated_agreement(q: nn.Module, float_model: nn.Module, x: np.ndarray) -> float:
    """Top-1 agreement of the simulated INT8 model ``q`` with ``float_model`` on ``x``."""
    q.eval()
    float_model.eval()
    if len(x) == 0:
        return float("nan")
    return float(np.mean(_probs(q, x).argmax(1) == _probs(float_model, x).argmax(1)))


def float_weights(q: nn.Module, folded_like: nn.Module) -> nn.Module:
    """The quantized model's float weights in a copy of ``folded_like`` (no quantizers)."""
    out = copy.deepcopy(folded_like).eval()
    src = {k: v for k, v in q.state_dict().items()}
    state = out.state_dict()
    for k in state:
        if k not in src:
            raise ConfigError(f"internal: the NNCF model has no tensor {k}")
        state[k] = src[k].detach().clone()
    out.load_state_dict(state)
    return out


def export_qdq(q: nn.Module, path: str | os.PathLike, *, size: int, opset: int = 17) -> Path:
    """The trained quantizers as a QDQ ONNX graph (input ``input``, output ``logits``): NNCF strips
    its quantizers into torch's fake-quantize ops, which the ONNX exporter writes as
    QuantizeLinear/DequantizeLinear pairs."""
    nncf = _nncf()
    from ..export import INPUT_NAME, OUTPUT_NAME
    from ..fileio import atomic_path

    example = torch.zeros(1, 3, size, size)
    stripped = nncf.strip(q, do_copy=True, example_input=example).eval()
    out = Path(path)
    with atomic_path(out, suffix=".onnx") as tmp:
        with torch.no_grad():
            torch.onnx.export(stripped, (example,), str(tmp), opset_version=opset, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], do_constant_folding=True, dynamo=False,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        _constants_to_initializers(tmp)
    return out


def _constants_to_initializers(path: Path) -> None:
    """The exporter writes scales and zero points as Constant nodes; compile's tools (the
    TensorRT converter and its rule checks, as NNCF's own graphs) read them as initializers. In the
    same pass (one load and save) the weights' quantizers are folded into integer weights."""
    import onnx

    m = onnx.load(str(path))
    known = {i.name: i for i in m.graph.initializer}
    keep = []
    for node in m.graph.node:  # topological order: an Identity's source is seen before it
        value = next((a.t for a in node.attribute if a.name == "value"), None) if node.op_type == "Constant" else None
        if value is None and node.op_type == "Identity" and node.input[0] in known:
            value = known[node.input[0]]  # the exporter's copy of a shared constant
        if value is None:
            keep.append(node)
            continue
        t = onnx.TensorProto()
        t.CopyFrom(value)
        t.name = node.output[0]
        m.graph.initializer.append(t)
        known[t.name] = t
    del m.graph.node[:]
    m.graph.node.extend(keep)
    _fold_weight_quantizers(m)
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def _fold_weight_quantizers(m: Any) -> int:
    """Store each quantized weight as integers, as post-training INT8 graphs do: a QuantizeLinear
    whose input, scale and zero point are all initializers is computed here (ONNX's rule: divide by
    the scale, round half to even, add the zero point, saturate) and replaced by its integer
    initializer, which the DequantizeLinear then reads. The exporter writes the float weights and
    their QuantizeLinear, which is the same function in a file four times as large. Returns the
    number folded."""
    from onnx import numpy_helper

    inits = {i.name: i for i in m.graph.initializer}
    consumers: dict[str, int] = {}
    for node in m.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    keep, folded = [], 0
    for node in m.graph.node:
        ins = list(node.input)
        if node.op_type != "QuantizeLinear" or len(ins) < 3 or not all(n in inits for n in ins[:3]):
            keep.append(node)
            continue
        x, scale, zp = (numpy_helper.to_array(inits[n]) for n in ins[:3])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.ndim == 1 and scale.size > 1:  # per channel along ``axis``
            shape = [1] * x.ndim
            shape[axis] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        info = np.iinfo(zp.dtype)
        q = np.clip(np.rint(x.astype(np.float64) / scale) + zp.astype(np.int64), info.min, info.max).astype(zp.dtype)
        t = numpy_helper.from_array(q, node.output[0])
        m.graph.initializer.append(t)
        consumers[ins[0]] -= 1
        folded += 1
    del m.graph.node[:]
    m.graph.node.extend(keep)
    for i in [i for i in m.graph.initializer if consumers.get(i.name, 0) <= 0]:
        m.graph.initializer.remove(i)
    return folded


__all__ = ["LITERT_ESTIMATORS", "OBJECTIVES", "QAT_TARGETS", "QatConfig", "QatResult", "conv_bn_pairs", "export_pt2",
           "export_qdq", "float_weights", "fold_batchnorm", "freeze_ranges", "qat_artefact_key", "qat_suffix",
           "quantize_for_litert", "quantize_for_training", "qat_target", "simulated_agreement", "train_qat"]
