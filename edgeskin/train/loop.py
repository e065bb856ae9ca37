"""The one training loop (used by ``train`` and, later, ``distill``).

AdamW, per-step linear warm-up then cosine decay, mixed precision on the device that
:func:`edgeskin.models.compute.resolve_compute` chose (bf16 autocast, or fp16 with a gradient
scaler on GPUs without bf16), ``channels_last``, early stopping on validation balanced accuracy, a
resumable state written atomically after every epoch, and DistributedDataParallel when launched
under ``torchrun``. Batches come ready from :mod:`edgeskin.train.batches` (augmented on the GPU
when training on one).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..data import Dataset, Split, decode_with_progress, labels_of, load_eval_set
from ..data.licence import licence_record
from ..errors import CheckpointError, ConfigError
from ..labels import LabelSet, get_label_set
from ..metrics import classification_report
from ..progress import NullReporter, Reporter
from ..models.arch import build_model, frozen_bn_to_eval, set_trainable, arch_spec
from ..fileio import write_json
from ..models.checkpoint import atomic_torch_save, save_checkpoint
from ..models.compute import Compute, is_out_of_memory, out_of_memory, resolve_compute, resolve_precision
from ..models.ensemble import predict_probs
from .batches import epoch_indices, make_batches
from .config import TrainConfig
from .losses import class_weights, make_loss

log = logging.getLogger(__name__)

#: criterion(logits, inputs, targets, indices) -> scalar loss
Criterion = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------- distributed helpers

def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) when not distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def default_compute(cfg: TrainConfig) -> Compute:
    """The CPU, in ``cfg``'s precision, joining torchrun's (or the caller's) process group: what
    the training functions use when they are given no :class:`Compute`."""
    return resolve_compute("cpu", bf16=cfg.bf16)


def _barrier() -> None:
    if dist_info()[1] > 1:
        torch.distributed.barrier()


def _checkpoint_consistent(meta: Path) -> bool:
    """Whether ``NAME.json`` and the weights it names agree (sha256); True when neither exists."""
    from ..fileio import sha256_file

    if not meta.is_file():
        return not meta.with_suffix(".pt").is_file()
    try:
        m = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    weights = meta.parent / str(m.get("weights", meta.with_suffix(".pt").name))
    return weights.is_file() and sha256_file(weights) == m.get("sha256")


def check_validation(n_val: int, labels: LabelSet, where: str) -> None:
    """Training early-stops and keeps its best checkpoint by validation balanced accuracy: refuse
    an empty or too-small validation split before any training starts."""
    if n_val < labels.num_classes:
        raise ConfigError(
            f"{where}: the validation split has {n_val} image(s), fewer than the {labels.num_classes} classes: "
            "training could not choose its best epoch",
            "give the split a validation share (e.g. --fractions 0.7,0.1,0.2) or use more data",
        )


def _wrap_ddp(model: nn.Module, compute: Compute) -> nn.Module:
    """DistributedDataParallel over the parameters that train *now*.

    DDP registers its all-reduce hooks for the parameters that require gradients when it is
    built, so it is rebuilt whenever the set of trainable parameters changes (the end of a frozen
    warm-up); otherwise stages unfrozen later would never be synchronised and the ranks would drift
    apart. Every parameter that trains takes part in every forward pass of these networks, so
    ``find_unused_parameters`` stays off.
    """
    ids = [compute.device.index] if compute.is_cuda else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)


# ---------------------------------------------------------------- the loop

@dataclass
class FitResult:
    checkpoint: Path
    best_epoch: int
    best_score: float
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int | None = None
    skipped: bool = False
    #: the model as it was after the last epoch (not reloaded from disk; None when skipped)
    model: nn.Module | None = field(default=None, repr=False)


def _lr_lambda(total: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return 1 / 25 + (1 - 1 / 25) * step / warmup
        rest = max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / rest)))
    return f


def fit(
    model: nn.Module,
    *,
    cfg: TrainConfig,
    labels: LabelSet,
    train_arrays: Sequence[np.ndarray],
    train_targets: np.ndarray,
    val_inputs: np.ndarray,
    val_targets: np.ndarray,
    criterion: Criterion,
    out: Path,
    pretrained_source: str | None,
    recipe: dict[str, Any],
    reporter: Reporter | None = None,
    extra: dict[str, Any] | None = None,
    digest: str | None = None,
    compute: Compute | None = None,
    pretrained_sha256: str | None = None,
) -> FitResult:
    """Train ``model`` and keep the checkpoint with the best validation balanced accuracy.

    ``out`` is the checkpoint stem (``DIR/member0`` -> ``member0.pt``/``.json``); the resumable
    state goes to ``member0.state.pt``. A finished checkpoint is not trained again; an
    unfinished one resumes from its last completed epoch. ``digest`` identifies the settings
    (default: ``cfg.digest()``; distillation adds its own); a folder holding another digest
    is refused rather than mixed. ``compute`` says where and in which precision to train (default:
    the CPU); a resume state written in another precision is refused rather than mixed.
    """
    reporter = reporter or NullReporter()
    compute = compute or default_compute(cfg)
    rank, world = dist_info()
    pre = cfg.preprocess
    meta, state_path = out.with_suffix(".json"), out.with_suffix(".state.pt")
    digest = digest or cfg.digest()

    if meta.is_file():
        done = json.loads(meta.read_text())
        if done.get("complete") and done.get("recipe", {}).get("config_digest") != digest:
            raise CheckpointError(
                f"{meta}: this folder holds a finished member trained with different settings",
                "use another --out folder, or delete this one to train again",
            )
        if done.get("complete"):
            reporter.message(f"{out.name}: already trained (best epoch {done['recipe'].get('best_epoch')}), skipping")
            return FitResult(meta, int(done["recipe"].get("best_epoch", 0)),
                             float(done["recipe"].get("best_val_balanced_accuracy", float('nan'))),
                             done["recipe"].get("history", []), None, True)

    pretrained = pretrained_source is not None
    freeze_epochs = cfg.freeze_epochs if cfg.freeze_epochs is not None else (2 if pretrained else 0)
    if cfg.finetune_stages == "auto":
        stages: int | None = 2 if pretrained else None
    elif cfg.finetune_stages == "all":
        stages = None
    else:
        stages = int(cfg.finetune_stages)

    n = len(train_arrays)
    per_rank = n // world
    if per_rank < 1:
        raise ConfigError(f"{n} training images cannot be shared by {world} processes")
    steps = max(1, math.ceil(per_rank / cfg.batch_size))
    if cfg.steps_per_epoch:
        steps = min(steps, cfg.steps_per_epoch)
    total_steps = steps * cfg.epochs

    channels_last = cfg.channels_last and cfg.arch.startswith("resnet")
    model = model.to(compute.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    set_trainable(model, cfg.arch, 0 if freeze_epochs > 0 else stages)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(total_steps, int(round(cfg.warmup_epochs * steps)))
    )
    scaler = compute.grad_scaler()

    start_epoch, best_score, best_epoch, bad_epochs = 0, -1.0, -1, 0
    history: list[dict[str, Any]] = []
    resumed_from = None
    if state_path.is_file():
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{state_path}: cannot read the resume state ({exc})",
                                  "delete it to start this member again") from None
        if state.get("config_digest") != digest:
            raise CheckpointError(
                f"{state_path}: an unfinished run with different settings is in this folder",
                "use another --out folder, or delete the folder to start again",
            )
        was = state.get("precision") or resolve_precision("cpu", cfg.bf16)  # states before the record: CPU
        if was != compute.precision:
            raise CheckpointError(
                f"{state_path}: this run was started in {was} and would resume in {compute.precision} "
                f"({compute.describe()})",
                f"resume on a device with {was} (--bf16 / --device as before), or delete the folder to start again",
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
        start_epoch = int(state["epoch"]) + 1
        best_score, best_epoch = float(state["best_score"]), int(state["best_epoch"])
        bad_epochs, history = int(state["bad_epochs"]), list(state["history"])
        resumed_from = start_epoch
        reporter.message(f"{out.name}: resuming after epoch {start_epoch} of {cfg.epochs}")
        if not _checkpoint_consistent(meta):
            # interrupted between writing the best weights and their JSON: the pair no longer
            # matches. The next epoch counts as the best so far and writes both again.
            best_score, bad_epochs = -1.0, 0
            reporter.message(f"{out.name}: the best checkpoint's weights and JSON disagree (an interrupted write); "
                             "the next epoch writes both again")

    if start_epoch >= freeze_epochs:  # resumed after the warm-up: the stages it unfroze train again
        set_trainable(model, cfg.arch, stages)
    train_model: nn.Module = _wrap_ddp(model, compute) if world > 1 else model
    batches = make_batches(train_arrays, pre, cfg.augment, cfg.seed, compute, channels_last=channels_last)
    if start_epoch < cfg.epochs:
        reporter.message(f"{out.name}: training on {compute.describe()}; batches made on {batches.where}")
    targets_dev = torch.from_numpy(np.asarray(train_targets)).to(compute.device)

    for epoch in range(start_epoch, cfg.epochs):
        if bad_epochs >= (cfg.patience or 10**9):
            break
        t0 = time.perf_counter()
        if epoch == freeze_epochs and freeze_epochs > 0:
            trainable = set_trainable(model, cfg.arch, stages)
            if world > 1:
                train_model = _wrap_ddp(model, compute)  # the newly trainable stages join the all-reduce
            reporter.message(f"{out.name}: backbone unfrozen, training {', '.join(trainable)}")
        train_model.train()
        frozen_bn_to_eval(model)
        mine = epoch_indices(n, cfg.seed, epoch, rank, world)
        reporter.start(f"{out.name} epoch {epoch + 1}/{cfg.epochs}", steps)
        running = torch.zeros((), device=compute.device)
        seen = 0
        try:
            for step in range(steps):
                idx = mine[step * cfg.batch_size : (step + 1) * cfg.batch_size]
                if len(idx) == 0:
                    break
                x = batches.batch(idx, epoch)
                ii = torch.from_numpy(idx)
                y = targets_dev[ii.to(compute.device)]
                with compute.autocast():
                    logits = train_model(x)
                loss = criterion(logits.float(), x, y, ii)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                running += loss.detach() * len(idx)  # no host sync per step
                seen += len(idx)
                reporter.advance(1)
        except (RuntimeError, MemoryError) as exc:
            if is_out_of_memory(exc):
                raise out_of_memory(exc, compute, cfg.batch_size) from None
            raise
        finally:
            reporter.stop()
        score, val_report = _validate(model, val_inputs, val_targets, labels, cfg, compute)
        improved = score > best_score
        row = {"epoch": epoch + 1, "train_loss": float(running) / max(seen, 1), "val_balanced_accuracy": score,
               "val_top1": val_report["top1"], "seconds": round(time.perf_counter() - t0, 1),
               "lr": scheduler.get_last_lr()[0]}
        history.append(row)
        if improved:
            best_score, best_epoch, bad_epochs = score, epoch + 1, 0
        else:
            bad_epochs += 1
        reporter.message(
            f"{out.name} epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f}  "
            f"val top-1 {100 * row['val_top1']:.1f}%  val balanced {100 * score:.1f}%"
            + ("  [best]" if improved else "") + f"  ({row['seconds']:.0f} s)"
        )
        if rank == 0:
            rec = _recipe(recipe, cfg, digest, pretrained_source, freeze_epochs, stages, world,
                          best_epoch, best_score, history, compute, pretrained_sha256)
            if improved:
                save_checkpoint(model, out, arch=cfg.arch, labels=labels, preprocess=pre,
                                dropout=cfg.dropout, recipe=rec, metrics={"val": val_report},
                                extra={"complete": False, **(extra or {})})
            atomic_torch_save({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch, "best_score": best_score,
                "best_epoch": best_epoch, "bad_epochs": bad_epochs, "history": history,
                "config_digest": digest, "precision": compute.precision, "scaler": scaler.state_dict(),
            }, state_path)
        _barrier()

    if rank == 0:
        done = json.loads(meta.read_text())
        done["complete"] = True
        done["recipe"] = _recipe(recipe, cfg, digest, pretrained_source, freeze_epochs, stages, world,
                                 best_epoch, best_score, history, compute, pretrained_sha256)
        write_json(meta, done)
        state_path.unlink(missing_ok=True)
    _barrier()
    return FitResult(meta, best_epoch, best_score, history, resumed_from, False, model)


def _recipe(base: dict[str, Any], cfg: TrainConfig, digest: str, pretrained_source: str | None,
            freeze_epochs: int, stages: int | None, world: int, best_epoch: int, best_score: float,
            history: list[dict[str, Any]], compute: Compute, pretrained_sha256: str | None) -> dict[str, Any]:
    return {
        **base,
        "config": cfg.to_dict(),
        "config_digest": digest,
        "compute": compute.record(),
        "initialisation": pretrained_source or "random",
        "initial_weights_sha256": pretrained_sha256,
        "freeze_epochs": freeze_epochs,
        "finetune_stages": "all" if stages is None else stages,
        "world_size": world,
        "best_epoch": best_epoch,
        "best_val_balanced_accuracy": best_score,
        "history": history,
    }


def _validate(model: nn.Module, inputs: np.ndarray, targets: np.ndarray, labels: LabelSet,
              cfg: TrainConfig, compute: Compute) -> tuple[float, dict[str, Any]]:
    """Validation metrics (fp32 on the training device); under DDP each process scores its share
    and the shares are gathered."""
    rank, world = dist_info()
    idx = np.arange(len(inputs))[rank::world]
    probs = predict_probs(model, inputs[idx], batch_size=cfg.eval_batch_size, device=compute.device) if len(idx) else \
        np.zeros((0, labels.num_classes))
    if world > 1:
        parts: list[Any] = [None] * world
        torch.distributed.all_gather_object(parts, (idx, probs))
        full = np.zeros((len(inputs), labels.num_classes))
        for i, p in parts:
            if len(i):
                full[i] = p
        probs = full
    report = classification_report(probs, targets, labels.codes)
    return float(report["balanced_accuracy"]), report


# ---------------------------------------------------------------- members and ensembles

def train_member(
    cfg: TrainConfig,
    *,
    train_set: Dataset,
    val_set: Dataset,
    out: Path,
    reporter: Reporter | None = None,
    skip_bad: bool = False,
    recipe: dict[str, Any] | None = None,
    compute: Compute | None = None,
    _decoded: tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> FitResult:
    """Train one member on ``train_set``, early-stopping on ``val_set``, on ``compute``'s device
    (default: the CPU)."""
    from ..models.weights import resolve_pretrained

    reporter = reporter or NullReporter()
    labels = get_label_set(cfg.labels)
    pre = cfg.preprocess
    if _decoded is None:
        train_set, train_arrays = decode_with_progress(train_set, pre, what="training", reporter=reporter,
                                                       skip_bad=skip_bad)
        val_set, val_x, val_y = load_eval_set(val_set, pre, labels, what="validation", reporter=reporter,
                                              skip_bad=skip_bad)
        train_y = labels_of(train_set, labels)
    else:
        train_arrays, train_y, val_x, val_y = _decoded
    torch.manual_seed(cfg.seed)
    init_weights = resolve_pretrained(cfg.arch, cfg.pretrained, progress=True)
    model, source = build_model(cfg.arch, labels.num_classes, dropout=cfg.dropout, pretrained=init_weights)
    if source is None:
        reporter.message(f"{out.name}: " + ("no ImageNet weights found; " if cfg.pretrained == "auto" else "")
                         + "starting from random initialisation")
    else:
        reporter.message(f"{out.name}: starting from {source} (sha256 {init_weights.sha256[:12]}...)")
    counts = np.bincount(train_y, minlength=labels.num_classes)
    weights = class_weights(counts) if cfg.loss in ("wce", "focal") else None
    loss_fn = make_loss(cfg.loss, weights, gamma=cfg.focal_gamma)

    def criterion(logits: torch.Tensor, _x: torch.Tensor, y: torch.Tensor, _i: torch.Tensor) -> torch.Tensor:
        return loss_fn(logits, y)

    base = dict(recipe or {})
    base.update({
        "loss": cfg.loss,
        "focal_gamma": cfg.focal_gamma if cfg.loss == "focal" else None,
        "class_weights": None if weights is None else dict(zip(labels.codes, map(float, weights))),
        "train_images": int(len(train_y)),
        "val_images": int(len(val_y)),
        "train_class_counts": dict(zip(labels.codes, map(int, counts))),
        "data_licence": licence_record(train_set.layout),  # HAM10000: CC BY-NC 4.0; None: unknown
    })
    return fit(model, cfg=cfg, labels=labels, train_arrays=train_arrays, train_targets=train_y,
               val_inputs=val_x, val_targets=val_y, criterion=criterion, out=out,
               pretrained_source=source, recipe=base, reporter=reporter, compute=compute,
               pretrained_sha256=None if init_weights is None else init_weights.sha256)


def default_losses(n: int) -> list[str]:
    """Members alternate class-weighted cross-entropy and focal loss (wce, focal, wce, ...)."""
    return ["wce" if i % 2 == 0 else "focal" for i in range(n)]


def train_ensemble(
    cfg: TrainConfig,
    *,
    dataset: Dataset,
    split: Split,
    out_dir: str | os.PathLike,
    members: int = 3,
    seeds: Sequence[int] | None = None,
    losses: Sequence[str] | None = None,
    reporter: Reporter | None = None,
    skip_bad: bool = False,
    compute: Compute | None = None,
) -> list[FitResult]:
    """Train ``members`` members (different seeds; losses alternate wce/focal by default) into
    ``out_dir`` (``member0.pt``/``.json``, ...) on ``compute`` (default: resolved from
    ``cfg.bf16`` on the CPU, joining ``torchrun``'s process group). Re-running resumes or skips
    finished members."""
    reporter = reporter or NullReporter()
    compute = compute or default_compute(cfg)
    rank, _ = dist_info()
    arch_spec(cfg.arch)
    seeds = list(seeds) if seeds is not None else [cfg.seed + i for i in range(members)]
    losses = list(losses) if losses is not None else default_losses(members)
    if len(seeds) != members or len(losses) != members:
        raise ConfigError(f"need {members} seeds and losses, got {len(seeds)} and {len(losses)}")
    out = Path(out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    _barrier()
    labels = get_label_set(cfg.labels)
    pre = cfg.preprocess
    train_set = split.apply(dataset, "train")
    val_set = split.apply(dataset, "val")
    check_validation(len(val_set.samples), labels, split.source or "the split")
    train_set, train_arrays = decode_with_progress(train_set, pre, what="training", reporter=reporter,
                                                   skip_bad=skip_bad)
    val_set, val_x, val_y = load_eval_set(val_set, pre, labels, what="validation", reporter=reporter,
                                          skip_bad=skip_bad)
    for item in train_set.skipped + val_set.skipped:
        reporter.message(f"skipped {item.where}: {item.reason}")
    decoded = (train_arrays, labels_of(train_set, labels), val_x, val_y)
    recipe = {"data": dataset.source, "split": split.source, "split_sha256": split.sha256()}
    results = []
    for i in range(members):
        member_cfg = cfg.with_(seed=seeds[i], loss=losses[i])
        results.append(train_member(member_cfg, train_set=train_set, val_set=val_set,
                                    out=out / f"member{i}", reporter=reporter, recipe=recipe,
                                    compute=compute, _decoded=decoded))
    return results
