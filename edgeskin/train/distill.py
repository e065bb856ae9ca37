"""Distillation: one student learns the ensemble's averaged softmax (the teacher).

The loss blends the temperature-scaled KL divergence to the teacher (times T²) with the
hard-label loss of training (class-weighted cross-entropy or focal loss). The teacher runs
online on exactly the augmented view the student sees; with augmentation off its outputs are
computed once per image and cached on disk under a key made of the teacher's member hashes,
the decoded training images and the preprocessing, so a change to any of them recomputes.
Training itself is :func:`edgeskin.train.loop.fit`, the loop of ``edgeskin train``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..data import Dataset, Split, decode_with_progress, eval_tensors, labels_of, load_eval_set, write_split
from ..data.licence import licence_record
from ..errors import CheckpointError, ConfigError
from ..fileio import atomic_path, write_json
from ..labels import LabelSet
from ..metrics import best_member, classification_report, drops_points
from ..models.arch import arch_spec, build_model
from ..members.base import display
from ..models import load_ensemble
from ..models.checkpoint import Checkpoint
from ..models.ensemble import Ensemble, inference_fn, predict_probs
from ..preprocess import PreprocessConfig
from ..progress import NullReporter, Reporter
from .config import TrainConfig
from ..models.compute import CPU, Compute
from .loop import default_compute, dist_info, fit, _barrier
from .losses import class_weights, distillation_kl, make_loss
from .qat import QatConfig

INITS = ("auto", "imagenet", "member", "scratch")
STUDENT_NAME = "student"


@dataclass(frozen=True)
class DistillConfig:
    """How a student is distilled. The student's architecture, schedule and hard-label loss
    are the ``train`` config (``train.arch``, ``train.loss``, ...).

    ``alpha`` weighs the distillation term, ``1 - alpha`` the hard-label loss.
    ``init``: ``auto`` (ImageNet weights when present, else the best teacher member when the
    architectures match, else random), ``imagenet``, ``member`` or ``scratch``.
    ``member``: the member ``--init member`` copies (default: best validation balanced accuracy).
    """

    train: TrainConfig = field(default_factory=TrainConfig)
    temperature: float = 4.0
    alpha: float = 0.7
    init: str = "auto"
    member: str | None = None
    #: when the student starts from a teacher member (an already trained network), scale the
    #: learning rate by this (None: keep ``train.lr``); the CLI uses 1/3 unless --lr is given
    member_lr_factor: float | None = None
    #: quantization-aware epochs after the float ones (:mod:`edgeskin.train.qat`); off by default
    qat: QatConfig = field(default_factory=QatConfig)

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha (the distillation weight) must be in [0, 1], got {self.alpha}")
        if self.init not in INITS:
            raise ConfigError(f"unknown --init {self.init!r}", f"choose one of: {', '.join(INITS)}")
        arch_spec(self.train.arch)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["train"] = self.train.to_dict()
        if self.qat.epochs == 0:
            del d["qat"]  # no QAT: the same settings (and digest) as before the option existed
        else:
            d["qat"] = self.qat.to_dict()
        return d

    def with_train(self, train: TrainConfig) -> "DistillConfig":
        return replace(self, train=train)

    def digest(self, teacher_digest: str) -> str:
        blob = json.dumps({"distill": self.to_dict(), "teacher": teacher_digest}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- loss and teacher

def distillation_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    targets: torch.Tensor,
    hard_loss: nn.Module,
    *,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """``alpha * T² KL(teacher_T || student_T) + (1 - alpha) * hard_loss(student, targets)``."""
    soft = distillation_kl(student_logits, teacher_probs, temperature)
    if alpha >= 1.0:
        return soft
    return alpha * soft + (1.0 - alpha) * hard_loss(student_logits.float(), targets)


class Teacher:
    """The frozen ensemble (mean of its members' probabilities). It never receives gradients.

    It runs on ``compute``'s device in fp32, the precision ``evaluate`` and ``bench`` use for the
    reference ensemble (on CUDA: cuDNN's TF32 convolutions, PyTorch's default), so the teacher a
    student learns from is the ensemble the student is measured against.

    ``view``: the preprocessing the batches given to :meth:`probs` were made with (the student's).
    Every member sees that same view through its own preprocessing (channel order, scaling,
    normalisation, layout; resized when its input size differs). ONNX members run in ONNX Runtime
    (on the GPU with onnxruntime-gpu). When every member is an edgeskin checkpoint with the
    student's preprocessing, ``model`` is the one torch module of them all."""

    def __init__(self, members: Sequence[Any], *, compute: Compute = CPU,
                 view: PreprocessConfig | None = None) -> None:
        if not members:
            raise CheckpointError("the teacher has no members", "pass an ensemble folder")
        self.members = list(members)
        self.compute = compute
        self.view = view or self.members[0].preprocess
        self.model: nn.Module | None = None
        if all(m.source == "edgeskin" and m.preprocess == self.view for m in self.members):
            self.model = Ensemble([m.model for m in members]).eval().to(compute.device)
            for p in self.model.parameters():
                p.requires_grad_(False)
        else:
            for m in self.members:
                if isinstance(getattr(m, "model", None), nn.Module):
                    m.model.eval().to(compute.device)
                    for p in m.model.parameters():
                        p.requires_grad_(False)

    @property
    def precision(self) -> str:
        return self.compute.inference_precision

    @property
    def hashes(self) -> list[dict[str, str]]:
        return [{"name": m.name, "sha256": m.sha256, **({} if m.source == "edgeskin" else {"source": m.source})}
                for m in self.members]

    @property
    def digest(self) -> str:
        """Of the members' weights, and for imported members also of what turns their outputs into
        our probabilities (preprocessing, output kind, class map): re-importing the same file with
        another declaration is another teacher."""
        def one(m: Any) -> str:
            if m.source == "edgeskin":
                return m.sha256
            decl = {k: m.config.get(k) for k in ("preprocess", "outputs", "class_map")}
            return hashlib.sha256(json.dumps([m.sha256, decl], sort_keys=True).encode()).hexdigest()

        blob = json.dumps(sorted(one(m) for m in self.members))
        return hashlib.sha256(blob.encode()).hexdigest()

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher probabilities (N, C) for a batch, on the batch's device; no graph is recorded."""
        if self.model is not None:
            self.model.eval()
            with torch.no_grad():
                return self.model(x.to(self.compute.device).float()).float().to(x.device)
        from ..members import convert_view

        xs = x.to(self.compute.device).float()
        out = []
        with torch.no_grad():
            for m in self.members:
                xm = convert_view(xs, self.view, m.preprocess)
                if m.source == "edgeskin":
                    out.append(torch.softmax(m.model(xm).float(), dim=1))
                else:
                    p = m.probs(xm.cpu().numpy(), batch_size=max(1, len(xm)), device=self.compute)
                    out.append(torch.from_numpy(np.asarray(p, dtype=np.float32)).to(xs.device))
        return torch.stack(out).mean(dim=0).float().to(x.device)

    def predict(self, x: np.ndarray, *, batch_size: int = 64, progress: Any = None) -> np.ndarray:
        """(N, C) probabilities for a numpy batch made with ``view``."""
        out = []
        for s in range(0, len(x), batch_size):
            out.append(self.probs(torch.from_numpy(np.ascontiguousarray(x[s : s + batch_size]))).cpu().numpy())
            if progress is not None:
                progress(len(out[-1]))
        return np.concatenate(out).astype(np.float64) if out else np.zeros((0, 0))

    def release(self) -> None:
        """Back to the CPU (latency is a host measurement)."""
        if self.model is not None:
            self.model.cpu()
        for m in self.members:
            m.release()

    def inference(self) -> Any:
        """What latency measurements time: the torch module, or (mixed or imported members) a
        function of a numpy batch."""
        if self.model is not None:
            return self.model
        from ..members import ensemble_fn

        return ensemble_fn(self.members, self.view)


def teacher_cache_key(teacher: Teacher, arrays: Sequence[np.ndarray], pre: PreprocessConfig) -> str:
    """Hash of the teacher's member hashes, the decoded images (content and order) and the
    preprocessing: any change to one of them gives another key."""
    h = hashlib.sha256()
    h.update(teacher.digest.encode())
    h.update(json.dumps(pre.to_dict(), sort_keys=True).encode())
    h.update(teacher.precision.encode())
    for a in arrays:
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


@dataclass
class CachedTeacher:
    probs: np.ndarray
    key: str
    path: Path
    hit: bool


def cached_teacher_probs(
    teacher: Teacher,
    arrays: Sequence[np.ndarray],
    pre: PreprocessConfig,
    cache_dir: str | os.PathLike,
    *,
    batch_size: int = 64,
    reporter: Reporter | None = None,
) -> CachedTeacher:
    """Teacher probabilities on the evaluation view of every image, from the cache when its key
    matches, else computed and written (atomically) to ``cache_dir/teacher-KEY.npz``."""
    reporter = reporter or NullReporter()
    key = teacher_cache_key(teacher, arrays, pre)
    path = Path(cache_dir) / f"teacher-{key[:24]}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                if str(z["key"]) == key and z["probs"].shape[0] == len(arrays):
                    return CachedTeacher(z["probs"].astype(np.float32), key, path, True)
        except (OSError, ValueError, KeyError):
            pass  # unreadable or foreign: recompute below
    reporter.start("teacher outputs (cached for later runs)", len(arrays))
    out = []
    for s in range(0, len(arrays), batch_size):
        x = torch.from_numpy(eval_tensors(list(arrays[s : s + batch_size]), pre))
        out.append(teacher.probs(x).cpu().numpy())
        reporter.advance(len(x))
    reporter.stop()
    probs = np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, probs=probs, key=np.array(key))
    return CachedTeacher(probs, key, path, False)


# ---------------------------------------------------------------- the student

def _best_member(members: Sequence[Checkpoint], val_x: np.ndarray, val_y: np.ndarray, labels: LabelSet,
                 name: str | None, batch_size: int, device: Any = None) -> tuple[Checkpoint, dict[str, float]]:
    if name is not None:
        chosen = [m for m in members if m.name == name]
        if not chosen:
            raise ConfigError(f"the teacher has no member named {name!r}",
                              f"members: {', '.join(m.name for m in members)}")
        return chosen[0], {}
    scores = {}
    for m in members:
        p = predict_probs(m.model, val_x, batch_size=batch_size, device=device)
        scores[m.name] = float(classification_report(p, val_y, labels.codes)["balanced_accuracy"])
    best = best_member(scores)
    return next(m for m in members if m.name == best), scores


def init_student(cfg: DistillConfig, members: Sequence[Checkpoint], val_x: np.ndarray, val_y: np.ndarray,
                 labels: LabelSet, device: Any = None) -> tuple[nn.Module, str, str, str | None]:
    """Build the student. Returns (model, initialisation record, how it was chosen (a sentence),
    the sha256 of the initial weights file or None)."""
    from ..models.weights import resolve_pretrained

    t = cfg.train
    arch_spec(t.arch)
    same_arch = [m for m in members if m.config["arch"] == t.arch]
    if cfg.init in ("auto", "imagenet"):
        weights = None  # --pretrained none: never ImageNet
        if t.pretrained not in (None, "none"):
            pretrained = "imagenet" if cfg.init == "imagenet" and t.pretrained == "auto" else t.pretrained
            weights = resolve_pretrained(t.arch, pretrained, progress=True)
        if weights is not None:
            model, source = build_model(t.arch, labels.num_classes, dropout=t.dropout, pretrained=weights)
            return model, str(source), f"starting from ImageNet weights ({source})", weights.sha256
        if cfg.init == "imagenet":
            raise ConfigError(
                f"no ImageNet weights for {t.arch} found (torchvision's cache or --pretrained FILE)",
                "pass --pretrained imagenet (downloads them) or FILE, or choose --init member / --init scratch",
            )
    if cfg.init == "member" or (cfg.init == "auto" and same_arch):
        if not same_arch:
            raise ConfigError(
                f"--init member needs a teacher member of the student's architecture ({t.arch}); "
                f"the teacher's are {sorted({m.config['arch'] for m in members})}",
                "use --student resnet50 or --init scratch",
            )
        member, scores = _best_member(same_arch, val_x, val_y, labels, cfg.member, t.eval_batch_size, device)
        model, _ = build_model(t.arch, labels.num_classes, dropout=t.dropout, pretrained=None)
        model.load_state_dict(copy.deepcopy({k: v.cpu() for k, v in member.model.state_dict().items()}))
        why = (f" (best validation balanced accuracy, {100 * scores[member.name]:.1f}%)" if scores else "")
        prefix = "no ImageNet weights found; " if cfg.init == "auto" else ""
        return (model, f"member:{member.name}:{member.sha256}", f"{prefix}starting from teacher {member.name}{why}",
                member.sha256)
    torch.manual_seed(t.seed)
    model, _ = build_model(t.arch, labels.num_classes, dropout=t.dropout, pretrained=None)
    prefix = "no ImageNet weights found; " if cfg.init == "auto" else ""
    return model, "random", f"{prefix}starting {t.arch} from random initialisation", None


# ---------------------------------------------------------------- report

def latency_pair(teacher: Any, student: nn.Module, size: int, *, runs: int = 30,
                 warmup: int = 5, threads: int | None = None) -> dict[str, Any]:
    """Batch-1 host latency of teacher and student, interleaved in one run per engine: torch
    FP32 and ONNX Runtime FP32 (the engine the host bundle runs; both models exported to one
    graph each, the teacher's three members and their mean softmax inside one graph). The
    ONNX Runtime part is skipped, with a note, when onnx or onnxruntime is not installed.
    ``teacher``: a torch module, or a function of a numpy batch (an ensemble with imported
    members, timed as its members run: the "torch" row, no ONNX Runtime row)."""
    import tempfile

    from ..bench.latency import interleaved_latency

    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)

    def summary(engine: str, stats: dict[str, Any], n_threads: int | None) -> dict[str, Any]:
        return {"engine": engine, "threads": n_threads, "batch": 1,
                "teacher": stats["teacher"].to_dict(), "student": stats["student"].to_dict(),
                "student_over_teacher": stats["student"].p50_ms / stats["teacher"].p50_ms}

    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        tfn = inference_fn(teacher) if isinstance(teacher, nn.Module) else teacher
        stats = interleaved_latency({"teacher": tfn, "student": inference_fn(student)}, x,
                                    runs=runs, warmup=warmup)
        out: dict[str, Any] = {"torch": summary(f"torch {torch.__version__} fp32", stats, torch.get_num_threads())}
    finally:
        torch.set_num_threads(old_threads)
    try:
        if not isinstance(teacher, nn.Module):
            raise TypeError("the teacher has imported members; its row above times them as they run")
        from ..export import export_onnx
        from ..runtime.backends import OnnxRuntimeBackend

        with tempfile.TemporaryDirectory(prefix="edgeskin-latency-") as tmp:
            fns = {}
            for name, model in (("teacher", teacher), ("student", student)):
                path = Path(tmp) / f"{name}.onnx"
                export_onnx(model, path, size=size, check_inputs=x)
                backend = OnnxRuntimeBackend(path.read_bytes(), threads=threads)
                fns[name] = backend.run
                version = backend.version
            stats = interleaved_latency(fns, x, runs=runs, warmup=warmup)
        out["onnxruntime"] = summary(f"onnxruntime {version} fp32", stats, threads)
    except Exception as exc:  # noqa: BLE001 - the torch numbers stand on their own
        out["onnxruntime"] = {"skipped": f"{type(exc).__name__}: {exc}"}
    return out


def compare_report(teacher_probs: np.ndarray, student_probs: np.ndarray, targets: np.ndarray,
                   labels: LabelSet, split_name: str) -> dict[str, Any]:
    """Student vs teacher on one split: both classification reports and top-1 agreement."""
    t = classification_report(teacher_probs, targets, labels.codes)
    s = classification_report(student_probs, targets, labels.codes)
    agree = float(np.mean(teacher_probs.argmax(1) == student_probs.argmax(1))) if len(targets) else float("nan")
    return {"split": split_name, "n": int(len(targets)), "teacher": t, "student": s, "top1_agreement": agree,
            "drops_points": drops_points(t, s)}


# ---------------------------------------------------------------- the command

@dataclass
class DistillResult:
    checkpoint: Path
    best_epoch: int
    best_score: float
    initialisation: str
    teacher_cache: str | None
    report: dict[str, Any] | None
    skipped: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


def hard_label_loss(t: TrainConfig, train_y: np.ndarray, labels: LabelSet,
                    device: Any) -> tuple[nn.Module, np.ndarray | None]:
    """The hard-label loss of ``t.loss`` (class-weighted from the training counts for wce and
    focal) and the weights (None: unweighted)."""
    counts = np.bincount(train_y, minlength=labels.num_classes)
    weights = class_weights(counts) if t.loss in ("wce", "focal") else None
    return make_loss(t.loss, weights, gamma=t.focal_gamma).to(device), weights


def _qat_losses(cache_probs: torch.Tensor | None, teacher: Teacher, hard: nn.Module, train_y: np.ndarray,
                device: Any) -> dict[str, Any]:
    """The ``teacher_probs`` and ``hard_loss`` callables of :func:`qat_phase`: the cached teacher
    outputs where there are some (else the teacher online), and the hard loss by image index."""
    ys = torch.from_numpy(np.asarray(train_y)).to(device)
    return {"teacher_probs": lambda x, idx: (cache_probs[torch.from_numpy(idx).to(cache_probs.device)]
                                             if cache_probs is not None else teacher.probs(x)),
            "hard_loss": lambda logits, idx: hard(logits.float(), ys[torch.from_numpy(idx).to(ys.device)])}


def distill(
    teacher_path: str | os.PathLike,
    cfg: DistillConfig,
    *,
    dataset: Dataset,
    split: Split,
    out_dir: str | os.PathLike,
    report_split: str | None = "test",
    latency_runs: int = 30,
    latency_threads: int | None = None,
    reporter: Reporter | None = None,
    skip_bad: bool = False,
    compute: Compute | None = None,
) -> DistillResult:
    """Distil the ensemble at ``teacher_path`` into one student written to ``out_dir/student``.

    The student uses the teacher's preprocessing (the teacher must see the student's views).
    Re-running resumes an interrupted run or skips a finished one. After training, the student
    and the teacher are compared on ``report_split`` (``None``: no report) and the report is
    written to ``out_dir/report.json`` and into the student's checkpoint. ``compute``: where the
    teacher (fp32) and the student (mixed precision) run; default: the CPU.
    """
    reporter = reporter or NullReporter()
    compute = compute or default_compute(cfg.train)
    rank, _ = dist_info()
    members = load_ensemble(Path(teacher_path))
    labels, first = members[0].labels, members[0].preprocess
    # the student gets edgeskin's own preprocessing at the (first) teacher member's size; each
    # member sees the student's view through its own preprocessing
    t = cfg.train.with_(size=first.size, resize=first.resize, labels=labels.name)
    pre = t.preprocess
    teacher = Teacher(members, compute=compute, view=pre)
    out = Path(out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    _barrier()

    from .loop import check_validation

    check_validation(len(split.apply(dataset, "val").samples), labels, split.source or "the split")
    train_set, train_arrays = decode_with_progress(split.apply(dataset, "train"), pre, what="training",
                                                   reporter=reporter, skip_bad=skip_bad)
    val_set, val_x, val_y = load_eval_set(split.apply(dataset, "val"), pre, labels, what="validation",
                                          reporter=reporter, skip_bad=skip_bad)
    for item in train_set.skipped + val_set.skipped:
        reporter.message(f"skipped {item.where}: {item.reason}")
    train_y = labels_of(train_set, labels)

    model, initialisation, how, init_sha = init_student(cfg.with_train(t), members, val_x, val_y, labels,
                                                        compute.device)
    reporter.message(f"student {t.arch}: {how}")
    if initialisation.startswith("member:"):
        # an already trained network: no frozen warm-up, every stage learns
        t = t.with_(freeze_epochs=0 if t.freeze_epochs is None else t.freeze_epochs,
                    finetune_stages="all" if t.finetune_stages == "auto" else t.finetune_stages,
                    lr=t.lr * cfg.member_lr_factor if cfg.member_lr_factor else t.lr)
    run_cfg = cfg.with_train(t)

    cache: CachedTeacher | None = None
    if t.augment is None:
        if rank == 0:
            cache = cached_teacher_probs(teacher, train_arrays, pre, out / ".teacher-cache",
                                         batch_size=t.eval_batch_size, reporter=reporter)
            reporter.message(f"teacher outputs {'read from' if cache.hit else 'cached in'} {cache.path.name}")
        _barrier()
        if cache is None:
            cache = cached_teacher_probs(teacher, train_arrays, pre, out / ".teacher-cache",
                                         batch_size=t.eval_batch_size)

    counts = np.bincount(train_y, minlength=labels.num_classes)
    hard, weights = hard_label_loss(t, train_y, labels, compute.device)
    cache_probs = None if cache is None else torch.from_numpy(cache.probs).to(compute.device)

    def criterion(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if cache is not None:
            tp = cache_probs[idx.to(cache_probs.device)]
        else:
            tp = teacher.probs(x)
        return distillation_loss(logits, tp, y, hard, temperature=run_cfg.temperature, alpha=run_cfg.alpha)

    teacher_record = {
        "path": display(teacher_path), "members": teacher.hashes, "digest": teacher.digest,
        "arch": sorted({m.config["arch"] for m in members}), "combination": "mean of softmax",
    }
    recipe = {
        "kind": "distillation", "data": dataset.source, "split": split.source, "split_sha256": split.sha256(),
        "loss": t.loss, "focal_gamma": t.focal_gamma if t.loss == "focal" else None,
        "class_weights": None if weights is None else dict(zip(labels.codes, map(float, weights))),
        "temperature": run_cfg.temperature, "alpha": run_cfg.alpha, "init": run_cfg.init,
        "teacher_view": "cached evaluation view" if cache is not None else "online, the student's augmented view",
        "teacher_precision": teacher.precision,
        "teacher": teacher_record, "train_images": int(len(train_y)), "val_images": int(len(val_y)),
        "train_class_counts": dict(zip(labels.codes, map(int, counts))),
        "data_licence": licence_record(dataset.layout),  # HAM10000: CC BY-NC 4.0; None: unknown
    }
    if rank == 0 and not (out / "split.csv").exists():
        write_split(split, out / "split.csv")  # so evaluate and compile find the split by default
    float_cfg = replace(run_cfg, qat=QatConfig())
    res = fit(model, cfg=t, labels=labels, train_arrays=train_arrays, train_targets=train_y, val_inputs=val_x,
              val_targets=val_y, criterion=criterion, out=out / STUDENT_NAME,
              pretrained_source=None if initialisation == "random" else initialisation,
              recipe=recipe, reporter=reporter, extra={"teacher": teacher_record},
              digest=float_cfg.digest(teacher.digest), compute=compute, pretrained_sha256=init_sha)
    if run_cfg.qat.epochs > 0:
        qat_phase(res.checkpoint, run_cfg, digest=run_cfg.digest(teacher.digest), train_arrays=train_arrays,
                  val_x=val_x, labels=labels, pre=pre, compute=compute, reporter=reporter,
                  **_qat_losses(cache_probs, teacher, hard, train_y, compute.device))

    report = None
    report_path = out / "report.json"
    if rank == 0 and report_split is not None:
        if res.skipped and report_path.is_file():
            report = json.loads(report_path.read_text())
        else:
            report = _final_report(teacher, res.checkpoint, dataset, split, report_split, labels, pre,
                                   t.eval_batch_size, latency_runs, reporter, skip_bad, initialisation, run_cfg,
                                   latency_threads, compute)
            write_json(report_path, report)
        if report.get("split") == report_split:  # also on the skip path: the JSON always carries them
            meta = json.loads(res.checkpoint.read_text())
            metrics = {report_split: report["student"], f"{report_split}_vs_teacher": {
                k: report[k] for k in ("top1_agreement", "drops_points", "latency") if k in report}}
            if any(meta.get("metrics", {}).get(k) != v for k, v in metrics.items()):
                meta.setdefault("metrics", {}).update(metrics)
                write_json(res.checkpoint, meta)
    _barrier()
    return DistillResult(res.checkpoint, res.best_epoch, res.best_score, initialisation,
                         None if cache is None else str(cache.path), report, res.skipped, res.history)


def qat_checkpoint(
    checkpoint: str | os.PathLike,
    cfg: DistillConfig,
    *,
    dataset: Dataset,
    split: Split,
    teacher_path: str | os.PathLike | None = None,
    reporter: Reporter | None = None,
    skip_bad: bool = False,
    compute: Compute | None = None,
) -> dict[str, Any]:
    """Quantization-aware fine-tuning of one trained checkpoint (``edgeskin qat``): an ensemble
    member, a distilled student, any edgeskin checkpoint, for the compile target ``cfg.qat.target``.

    The same epochs as ``distill --qat-epochs`` (:func:`qat_phase`), on the split's training
    images. The teacher is the ensemble at ``teacher_path``, or by default the checkpoint's own
    float model (the INT8 form learns to keep the float model's decisions). The checkpoint's
    weights are not changed: the trained INT8 form is written beside it
    (``NAME.qat-TARGET.onnx``, for tflite ``.pt2``) and recorded, with its hash, in the checkpoint's JSON, where
    ``compile`` for that target finds it. Re-running with the same settings skips the work.
    Returns the record."""
    from ..models.checkpoint import load_checkpoint

    reporter = reporter or NullReporter()
    if cfg.qat.epochs < 1:
        raise ConfigError("quantization-aware fine-tuning needs at least one epoch", "pass --epochs 1 or more")
    meta_path = Path(checkpoint)
    if meta_path.is_dir():
        raise CheckpointError(f"{checkpoint}: a folder, not one checkpoint",
                              "name one member's .json (e.g. ensemble/member0.json) or the student's student.json")
    ckpt = load_checkpoint(meta_path)  # a clear error for anything that is not an edgeskin checkpoint
    meta_path = ckpt.path
    compute = compute or default_compute(cfg.train)
    labels, pre = ckpt.labels, ckpt.preprocess
    members = load_ensemble(Path(teacher_path)) if teacher_path is not None else [ckpt]
    for m in members:
        if list(m.labels.codes) != list(labels.codes):
            raise CheckpointError(f"{teacher_path}: its classes {list(m.labels.codes)} are not {meta_path.name}'s "
                                  f"{list(labels.codes)}", "use a teacher with the checkpoint's classes")
    teacher = Teacher(members, compute=compute, view=pre)
    train_set, train_arrays = decode_with_progress(split.apply(dataset, "train"), pre, what="training",
                                                   reporter=reporter, skip_bad=skip_bad)
    _, val_x, _ = load_eval_set(split.apply(dataset, "val"), pre, labels, what="validation",
                                reporter=reporter, skip_bad=skip_bad)
    if not train_arrays:
        raise ConfigError(f"{split.source or 'the split'}: no training images", "quantization-aware "
                          "fine-tuning trains on the split's training images; check --split and --data")
    cache_probs = None
    if cfg.train.augment is None and cfg.qat.objective == "distill":  # ``match`` needs no teacher outputs
        cache = cached_teacher_probs(teacher, train_arrays, pre, meta_path.parent / ".teacher-cache",
                                     batch_size=cfg.train.eval_batch_size, reporter=reporter)
        cache_probs = torch.from_numpy(cache.probs).to(compute.device)
    train_y = labels_of(train_set, labels)
    hard, _ = hard_label_loss(cfg.train, train_y, labels, compute.device)
    if cfg.qat.objective == "distill":
        who = "itself (its float model)" if teacher_path is None else f"the ensemble {display(teacher_path)}"
        reporter.message(f"{meta_path.stem}: teacher {who}")

    record = qat_phase(meta_path, cfg, digest=cfg.digest(teacher.digest), train_arrays=train_arrays, val_x=val_x,
                       labels=labels, pre=pre, compute=compute, reporter=reporter,
                       **_qat_losses(cache_probs, teacher, hard, train_y, compute.device))
    teacher.release()
    return record


def qat_file(checkpoint: Path, target: str) -> Path:
    """Where the INT8 form that quantization-aware training made for ``target`` is kept: a QDQ
    ONNX graph, or for tflite a PT2E program (``.pt2``)."""
    from .qat import qat_suffix

    return checkpoint.with_name(f"{checkpoint.name.removesuffix('.json')}.qat-{target}{qat_suffix(target)}")


def qat_phase(checkpoint: Path, cfg: DistillConfig, *, digest: str, train_arrays: Sequence[np.ndarray],
              val_x: np.ndarray, labels: LabelSet, pre: PreprocessConfig, compute: Compute,
              teacher_probs: Any, hard_loss: Any, reporter: Reporter) -> dict[str, Any]:
    """The quantization-aware epochs after the float ones (:mod:`edgeskin.train.qat`).

    The float student stays the student (the FP32 model every bundle is compared with); these
    epochs make its INT8 form for ``cfg.qat.target``: a QDQ ONNX graph (tflite: a PT2E program) of
    the learned weights and ranges, written beside the checkpoint (``student.qat-TARGET.onnx``,
    ``.pt2``) with its record and hash in
    the checkpoint's JSON. The compile step for that target uses it. A finished one with the same
    settings is not trained again. Returns the record."""
    from ..data import eval_tensors
    from ..fileio import sha256_file
    from ..models.checkpoint import load_checkpoint
    from .batches import make_batches
    from .qat import export_pt2, export_qdq, qat_artefact_key, train_qat

    q = cfg.qat
    meta_path = Path(checkpoint)
    meta = json.loads(meta_path.read_text())
    form_path, key = qat_file(meta_path, q.target), qat_artefact_key(q.target)
    done = (meta.get("qat") or {}).get(q.target)
    if (done and done.get("config_digest") == digest and form_path.is_file()
            and sha256_file(form_path) == done.get(key, {}).get("sha256")):
        reporter.message(f"{meta_path.stem}: quantization-aware epochs for {q.target} already done, skipping")
        return done
    rank, _ = dist_info()
    if rank != 0:  # one process fine-tunes (the phase is short); the others wait
        _barrier()
        return {}
    start = load_checkpoint(meta_path)
    model = start.model.to(compute.device)
    rng = np.random.default_rng([q.seed, 31337])
    pick = np.sort(rng.choice(len(train_arrays), size=min(q.calibration_size, len(train_arrays)), replace=False))
    calibration = torch.from_numpy(eval_tensors([train_arrays[i] for i in pick], pre)).to(compute.device)
    batches = make_batches(train_arrays, pre, cfg.train.augment, cfg.train.seed, compute)
    tool = "torchao PT2E" if q.target == "tflite" else "NNCF"
    reporter.message(f"{meta_path.stem}: {q.epochs} quantization-aware epoch(s) for {q.target} ({tool}; "
                     f"{len(pick)} training images set the initial ranges)")
    res = train_qat(model, q, batches=batches, n_train=len(train_arrays), teacher_probs=teacher_probs,
                    hard_loss=hard_loss if cfg.alpha < 1.0 else None, calibration=calibration,
                    temperature=cfg.temperature, alpha=cfg.alpha, val_inputs=val_x, reporter=reporter)
    (export_pt2 if q.target == "tflite" else export_qdq)(res.model.cpu(), form_path, size=pre.size)
    record = dict(res.record)
    record.update({"target": q.target, "config_digest": digest, "student_sha256": start.sha256,
                   key: {"file": form_path.name, "sha256": sha256_file(form_path)}})
    meta = json.loads(meta_path.read_text())
    meta.setdefault("qat", {})[q.target] = record
    write_json(meta_path, meta)
    if "val_agreement_after" in record:
        reporter.message(f"{meta_path.stem}: simulated {q.target} INT8 agrees with the float student on "
                         f"{100 * record['val_agreement_after']:.2f}% of validation (before these epochs: "
                         f"{100 * record['val_agreement_before']:.2f}%)")
    _barrier()
    return record


def _final_report(teacher: Teacher, checkpoint: Path, dataset: Dataset, split: Split, split_name: str,
                  labels: LabelSet, pre: PreprocessConfig, batch_size: int, latency_runs: int,
                  reporter: Reporter, skip_bad: bool, initialisation: str, cfg: DistillConfig,
                  latency_threads: int | None, compute: Compute = CPU) -> dict[str, Any]:
    from ..models.checkpoint import load_checkpoint

    student = load_checkpoint(checkpoint)  # the best epoch, as written and hash-checked
    _, x, y = load_eval_set(split.apply(dataset, split_name), pre, labels, what=split_name, reporter=reporter,
                            skip_bad=skip_bad)
    reporter.start(f"teacher on the {split_name} split", len(x))
    tp = teacher.predict(x, batch_size=batch_size, progress=reporter.advance)
    reporter.stop()
    reporter.start(f"student on the {split_name} split", len(x))
    sp = predict_probs(student.model, x, batch_size=batch_size, progress=reporter.advance, device=compute.device)
    reporter.stop()
    teacher.release()  # latency is a host measurement
    student.model.cpu()
    report = compare_report(tp, sp, y, labels, split_name)
    report.update({"student_arch": cfg.train.arch, "student_sha256": student.sha256,
                   "initialisation": initialisation, "teacher_members": teacher.hashes,
                   "temperature": cfg.temperature, "alpha": cfg.alpha})
    if latency_runs > 0:
        reporter.message(f"timing teacher vs student (batch 1, {latency_runs} interleaved runs)")
        report["latency"] = latency_pair(teacher.inference(), student.model, pre.size, runs=latency_runs,
                                         threads=latency_threads)
    return report

