"""The ``edgeskin`` command line: builds configs, calls the API, prints with rich."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import EXIT_CODES, ConfigError, DataError, EdgeskinError, exit_code_table

app = typer.Typer(
    name="edgeskin",
    help="Take skin-lesion classifier ensembles to the edge: train, evaluate, distill, "
    "quantize and compile into bundles (cpu, jetson, tflite), bench them, predict on the device.",
    epilog="Exit codes: " + exit_code_table(),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
out = Console()
err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        out.print(f"edgeskin {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug logging."),
) -> None:
    """edgeskin: train, distill, quantize, compile and bench skin-lesion classifiers for devices."""
    import os

    from rich.logging import RichHandler

    from .quiet import QUIET_ENV, EdgeskinOnly

    handler = RichHandler(console=err, show_path=False, show_time=False)
    if not verbose:  # third-party INFO lines and warnings stay out of the way (--verbose shows them)
        handler.addFilter(EdgeskinOnly())
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(message)s",
                        handlers=[handler], force=True)
    if not verbose:
        for name in ("nncf", "torch", "litert_torch", "ai_edge_torch", "absl", "tensorflow", "jax"):
            logging.getLogger(name).setLevel(logging.ERROR)


# ----------------------------------------------------------------- shared helpers

def resolve_data(data: Optional[Path]) -> Path:
    """--data, then $EDGESKIN_DATA, then the default folder (where `data fetch` puts it); says which."""
    from .data.fetch import resolve_data_path

    path, source = resolve_data_path(data)
    err.print(f"[dim]data: {path} ({source})[/dim]")
    return path


def _preset_kwargs(preset: str, threads: Optional[int], **overrides: Any) -> dict[str, Any]:
    """A training preset's settings with the options the user gave (None: not given) on top;
    also applies --threads to torch. Shared by `train` and `distill`."""
    from .train import preset_settings

    kw = preset_settings(preset, **overrides)
    if threads:
        import torch

        torch.set_num_threads(threads)
    return kw


def _pretrained_option(text: Optional[str]) -> Optional[str]:
    """--pretrained: ``auto`` (torchvision's cache), ``imagenet`` (download if missing), ``none``
    (random initialisation), a URL or a file. None: not given (the preset decides)."""
    if text is None or text in ("auto", "imagenet", "none") or text.startswith(("http://", "https://")):
        return text
    return str(Path(text))


def _pretrained_setting(kw: dict[str, Any]) -> dict[str, Any]:
    """The resolved ``pretrained`` of a settings dict: the preset's or the option's, ``auto`` when
    neither says, and None for ``none``."""
    p = kw.get("pretrained", "auto")
    kw["pretrained"] = None if p == "none" else p
    return kw


DEVICE_HELP = "Compute device: auto (CUDA when available) | cpu | cuda | cuda:N. Under torchrun: cuda:LOCAL_RANK."
DETERMINISTIC_HELP = ("Repeatable CUDA runs: torch's deterministic algorithms and no cuDNN autotuning "
                      "(slower); off: fast non-deterministic kernels.")


def _compute(device: str, bf16: str = "auto", deterministic: bool = False, *, training: bool = True):  # noqa: ANN202
    """The one device decision for a command (joins torchrun's process group); printed once."""
    from .models.compute import resolve_compute

    c = resolve_compute(device, bf16=bf16, deterministic=deterministic)
    if c.rank == 0:
        err.print(f"[dim]compute: {c.describe(training)}[/dim]")
    return c


def _warn_if_not_transfer(preset: str, pretrained: Optional[str], arch: str) -> None:
    """A preset meant for transfer learning that will start from random weights: say so loudly."""
    from .train.config import TRANSFER_PRESETS

    if preset not in TRANSFER_PRESETS or pretrained != "auto":
        return
    from .models.weights import cached_imagenet, hub_checkpoints

    if cached_imagenet(arch) is None:
        err.print(f"[bold yellow]warning:[/bold yellow] the {preset} preset is ImageNet transfer learning, but "
                  f"--pretrained auto found no {arch} weights in {hub_checkpoints()}: training from random "
                  "initialisation, which is not the published method. Use --pretrained imagenet to download them.")


def _reporter(quiet: bool = False):  # noqa: ANN202
    from .progress import RichReporter

    return RichReporter(err, quiet=quiet)


def _pct(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and x != x) else f"{100 * float(x):.1f}"


def _floats(text: str, n: int, what: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not a list of numbers", "e.g. 0.7,0.1,0.2") from None
    if len(vals) != n:
        raise ConfigError(f"{what} needs {n} numbers, got {len(vals)}", "e.g. 0.7,0.1,0.2")
    return vals


def _load_data(data: Optional[Path], images: Optional[List[Path]], skip_bad: bool):  # noqa: ANN202
    from .data import load_dataset

    ds = load_dataset(resolve_data(data), image_dirs=images or None, skip_bad=skip_bad)
    for item in ds.skipped:
        err.print(f"[yellow]skipped[/yellow] {item.where}: {item.reason}")
    if ds.skipped:
        err.print(f"[yellow]{len(ds.skipped)} item(s) skipped (--skip-bad)[/yellow]")
    return ds


def split_table(split: Any) -> Table:
    from .labels import HAM10000_CODES

    counts = split.counts()
    t = Table(title="Split (images per class)")
    t.add_column("split")
    for c in HAM10000_CODES:
        t.add_column(c, justify="right")
    t.add_column("images", justify="right")
    t.add_column("lesions", justify="right")
    for name, row in counts.items():
        lesions = {split.lesion_of[i] for i in split.ids(name)}
        t.add_row(name, *[str(row[c]) for c in HAM10000_CODES], str(sum(row.values())), str(len(lesions)))
    return t


def metrics_tables(reports: dict[str, dict[str, Any]], title: str) -> list[Table]:
    first = next(iter(reports.values()))
    codes = first["class_order"]
    pos = first.get("positive_class", "mel")
    t = Table(title=title)
    for col in ("model", "top-1", "top-2", "top-3", "bal.acc", f"{pos} sens", f"{pos} spec", "ECE", "n"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for name, r in reports.items():
        t.add_row(name, _pct(r["top1"]), _pct(r["top2"]), _pct(r["top3"]), _pct(r["balanced_accuracy"]),
                  _pct(r.get(f"{pos}_sensitivity")), _pct(r.get(f"{pos}_specificity")),
                  f"{float(r['ece']):.3f}", str(r["n"]))
    rc = Table(title="Per-class recall (%)")
    rc.add_column("model")
    for c in codes:
        rc.add_column(c, justify="right")
    for name, r in reports.items():
        rc.add_row(name, *[_pct(r["per_class"][c]["recall"]) for c in codes])
    last_name, last = list(reports.items())[-1]
    cm = Table(title=f"Confusion matrix, {last_name} (rows: true, columns: predicted)")
    cm.add_column("true \\ pred")
    for c in codes:
        cm.add_column(c, justify="right")
    for c, row in zip(codes, last["confusion_matrix"]):
        cm.add_row(c, *map(str, row))
    pc = Table(title=f"Per-class metrics, {last_name} (%)")
    for col in ("class", "recall", "precision", "F1", "support"):
        pc.add_column(col, justify="left" if col == "class" else "right")
    for c in codes:
        m = last["per_class"][c]
        pc.add_row(c, _pct(m["recall"]), _pct(m["precision"]), _pct(m["f1"]), str(int(m["support"] or 0)))
    return [t, rc, pc, cm]


# ----------------------------------------------------------------- commands

@app.command()
def split(
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="HAM10000 folder or metadata CSV, ISIC 2018 ground-truth CSV, or a folder per class. Default: $EDGESKIN_DATA."),
    output: Path = typer.Option(..., "--out", "-o", help="Split file to write (CSV: image_id,lesion_id,dx,split)."),
    images: Optional[List[Path]] = typer.Option(None, "--images", help="Image folder(s), if not next to the metadata. Repeatable."),
    seed: int = typer.Option(0, min=0, help="Seed of the shuffle (the split is a pure function of data and seed)."),
    fractions: str = typer.Option("0.7,0.1,0.2", help="Train,val,test fractions of each class's lesions."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip (and report) bad rows instead of stopping."),
) -> None:
    """Make a lesion-disjoint, class-stratified train/val/test split and write it to a file."""
    from .data import make_split, write_split

    ds = _load_data(data, images, skip_bad)
    s = make_split(ds, fractions=_floats(fractions, 3, "--fractions"), seed=seed)  # type: ignore[arg-type]
    write_split(s, output)
    out.print(split_table(s))
    out.print(f"wrote {output} ({len(s.assignment)} images, seed {seed})")


@app.command()
def train(
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Data set (see `edgeskin split --help`). Default: $EDGESKIN_DATA."),
    output: Path = typer.Option(..., "--out", "-o", help="Ensemble folder to write (member0.pt/.json, ...). Re-running resumes."),
    split_file: Optional[Path] = typer.Option(None, "--split", help="Split file. Default: OUT/split.csv, made from --split-seed if missing."),
    split_seed: int = typer.Option(0, min=0, help="Seed for a new split when none is given."),
    images: Optional[List[Path]] = typer.Option(None, "--images", help="Image folder(s), if not next to the metadata."),
    preset: str = typer.Option("quick", help="tiny | quick | reference | published: defaults that the options below override."),
    members: int = typer.Option(3, min=1, max=1000, help="Number of ensemble members (different seeds)."),
    arch: Optional[str] = typer.Option(None, help="resnet50 (default) | resnet18 | mobilenet_v3_large."),
    labels: str = typer.Option("ham10000", help="ham10000 (7 classes) or binary (malignant = mel, bcc, akiec)."),
    size: Optional[int] = typer.Option(None, min=32, max=4096, help="Input size in pixels (224 published; 112 quick)."),
    epochs: Optional[int] = typer.Option(None, min=1, help="Maximum epochs per member."),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Batch size."),
    lr: Optional[float] = typer.Option(None, min=0.0, max=10.0, help="Peak learning rate (AdamW, warm-up then cosine)."),
    loss: Optional[str] = typer.Option(None, help="wce | focal | ce, or a comma list, one per member. Default: wce, focal, wce, ..."),
    focal_gamma: float = typer.Option(2.0, min=0.0, max=100.0, help="Focal loss gamma (alpha = the class weights)."),
    pretrained: Optional[str] = typer.Option(None, help="imagenet (torchvision's weights, downloaded once into torch hub's cache) | auto (the cache if present, else random; never downloads) | none | URL | FILE. Default: the preset's (published: imagenet; others: auto)."),
    freeze_epochs: Optional[int] = typer.Option(None, min=0, help="Epochs with the backbone frozen. Default: 2 if pretrained, else 0."),
    finetune_stages: str = typer.Option("auto", help="Stages trained after the warm-up: auto | all | N (the last N)."),
    patience: int = typer.Option(8, min=1, help="Stop after this many epochs without a better validation balanced accuracy."),
    seed: int = typer.Option(0, min=0, help="Seed of member 0 (member i uses seed + i)."),
    bf16: str = typer.Option("auto", help="Mixed precision: auto (CUDA: bf16 where the GPU has it, else fp16 with a gradient scaler; CPU: bf16 if it has the instructions) | on | off (fp32)."),
    device: str = typer.Option("auto", "--device", "--compute-device", help=DEVICE_HELP),
    deterministic: bool = typer.Option(False, "--deterministic", help=DETERMINISTIC_HELP),
    threads: Optional[int] = typer.Option(None, min=1, max=4096, help="Torch threads (default: torch's choice)."),
    steps_per_epoch: Optional[int] = typer.Option(None, min=1, help="Cap steps per epoch (smoke tests)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip (and report) bad rows and images."),
) -> None:
    """Train an ensemble of ResNet50 members (class-weighted CE / focal loss) on a lesion-disjoint split.

    Runs on a GPU when there is one (--device), and under `torchrun --nproc-per-node N -m edgeskin
    train ...` (DistributedDataParallel; one GPU per process, or gloo on CPUs).
    """
    from .data import make_split, read_split, write_split
    from .train import TrainConfig, train_ensemble

    kw = _pretrained_setting(_preset_kwargs(preset, threads, arch=arch, size=size, epochs=epochs,
                                            batch_size=batch_size, lr=lr, steps_per_epoch=steps_per_epoch or None,
                                            pretrained=_pretrained_option(pretrained)))
    losses = [s.strip() for s in loss.split(",")] if loss else None
    if losses and len(losses) == 1:
        losses = losses * members
    cfg = TrainConfig(labels=labels, focal_gamma=focal_gamma,
                      freeze_epochs=freeze_epochs, finetune_stages=finetune_stages, patience=patience,
                      seed=seed, bf16=bf16, **kw)
    compute = _compute(device, bf16, deterministic)
    rank, world = compute.rank, compute.world
    ds = _load_data(data, images, skip_bad)
    split_path = split_file or output / "split.csv"
    if split_path.is_file():
        s = read_split(split_path)
    elif split_file is not None:
        raise DataError(f"{split_file}: split file not found", "make one with `edgeskin split`")
    else:
        s = make_split(ds, seed=split_seed)
        if rank == 0:
            write_split(s, split_path)
            err.print(f"wrote split {split_path}")
    if rank == 0:
        out.print(split_table(s))
        _warn_if_not_transfer(preset, cfg.pretrained, cfg.arch)
        err.print(f"training {members} × {cfg.arch} at {cfg.size} px, ≤{cfg.epochs} epochs"
                  + (f", {world} processes" if world > 1 else ""))
    results = train_ensemble(cfg, dataset=ds, split=s, out_dir=output, members=members, losses=losses,
                             seeds=[seed + i for i in range(members)], reporter=_reporter(quiet=rank != 0),
                             skip_bad=skip_bad, compute=compute)
    if rank == 0:
        t = Table(title=f"Trained members ({output})")
        for col in ("member", "best epoch", "val balanced %", "epochs run", "resumed"):
            t.add_column(col)
        for i, r in enumerate(results):
            t.add_row(f"member{i}", str(r.best_epoch), _pct(r.best_score), str(len(r.history)),
                      "skipped (done)" if r.skipped else ("yes" if r.resumed_from else "no"))
        out.print(t)


@app.command()
def distill(
    teacher: Path = typer.Option(..., "--teacher", help="The trained ensemble (folder of members: edgeskin's, imported with `edgeskin import`, or both; the shared reference layout works too)."),
    output: Path = typer.Option(..., "--out", "-o", help="Folder for the student (student.pt/.json, split.csv, report.json). Re-running resumes."),
    student: str = typer.Option("resnet50", "--student", help="resnet50 (default) | resnet18 | mobilenet_v3_large."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Data set (see `edgeskin split --help`). Default: $EDGESKIN_DATA."),
    split_file: Optional[Path] = typer.Option(None, "--split", help="Split file. Default: the teacher's split.csv."),
    images: Optional[List[Path]] = typer.Option(None, "--images", help="Image folder(s), if not next to the metadata."),
    preset: str = typer.Option("quick", help="tiny | quick | reference | published: schedule defaults the options below override."),
    init: str = typer.Option("auto", help="auto (ImageNet if present, else the best teacher member of the same architecture, else random) | imagenet | member | scratch."),
    member: Optional[str] = typer.Option(None, help="Member copied by --init member (default: best validation balanced accuracy)."),
    temperature: float = typer.Option(4.0, "--temperature", "-T", min=1e-6, max=1000.0, help="Softmax temperature of the distillation term (scaled by T²)."),
    alpha: float = typer.Option(0.7, min=0.0, max=1.0, help="Weight of the distillation term; 1 - alpha goes to the hard-label loss."),
    loss: str = typer.Option("wce", help="Hard-label loss: wce | focal | ce."),
    focal_gamma: float = typer.Option(2.0, min=0.0, max=100.0, help="Focal loss gamma."),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="Augment training views (the teacher runs online on the same view). Off: teacher outputs are cached once."),
    epochs: Optional[int] = typer.Option(None, min=1, help="Maximum epochs."),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Batch size."),
    lr: Optional[float] = typer.Option(None, min=0.0, max=10.0, help="Peak learning rate. Default: the preset's, a third of it when starting from a teacher member."),
    pretrained: Optional[str] = typer.Option(None, help="For ImageNet initialisation: imagenet (download once) | auto (torchvision's cache only) | none | URL | FILE. Default: the preset's."),
    patience: int = typer.Option(8, min=1, help="Stop after this many epochs without a better validation balanced accuracy."),
    seed: int = typer.Option(0, min=0, help="Seed."),
    bf16: str = typer.Option("auto", help="Mixed precision of the student: auto (CUDA: bf16, else fp16; CPU: bf16 if it has the instructions) | on | off. The teacher always runs in fp32, as evaluate and bench do."),
    device: str = typer.Option("auto", "--device", "--compute-device", help=DEVICE_HELP),
    deterministic: bool = typer.Option(False, "--deterministic", help=DETERMINISTIC_HELP),
    threads: Optional[int] = typer.Option(None, min=1, max=4096, help="Torch threads (default: torch's choice)."),
    steps_per_epoch: Optional[int] = typer.Option(None, min=1, help="Cap steps per epoch (smoke tests)."),
    report_on: str = typer.Option("test", "--report-on", help="Split of the final student-vs-teacher report: test | val | none."),
    latency_runs: int = typer.Option(30, min=0, help="Interleaved batch-1 runs timing teacher vs student (0: skip)."),
    latency_threads: Optional[int] = typer.Option(None, min=1, max=4096, help="Threads for the latency runs (default: the engines' choice)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip (and report) bad rows and images."),
) -> None:
    """Distil an ensemble (mean of its members' softmax) into one student network.

    Loss: alpha · T² · KL(teacher_T ‖ student_T) + (1 − alpha) · hard-label loss. The student is
    trained by the same loop as `edgeskin train` (warm-up + cosine, early stopping on validation
    balanced accuracy, resume, torchrun), then compared with the teacher on the test split.
    """
    from .data import read_split
    from .train import DistillConfig, TrainConfig, distill as run_distill

    if report_on not in ("test", "val", "none"):
        raise ConfigError(f"--report-on {report_on!r}", "choose test, val or none")
    kw = _pretrained_setting(_preset_kwargs(preset, threads, arch=student, epochs=epochs, batch_size=batch_size,
                                            lr=lr, steps_per_epoch=steps_per_epoch,
                                            pretrained=_pretrained_option(pretrained)))
    tcfg = TrainConfig(loss=loss, focal_gamma=focal_gamma,
                       patience=patience, seed=seed, bf16=bf16, **({} if augment else {"augment": None}), **kw)
    cfg = DistillConfig(train=tcfg, temperature=temperature, alpha=alpha, init=init, member=member,
                        member_lr_factor=None if lr is not None else 1 / 3)
    compute = _compute(device, bf16, deterministic)
    rank = compute.rank
    ds = _load_data(data, images, skip_bad)
    s = read_split(_split_for(split_file, teacher))
    if rank == 0:
        err.print(f"distilling {teacher} into {student} (T={temperature}, alpha={alpha}, hard loss {loss}, "
                  f"≤{tcfg.epochs} epochs, augmentation {'on' if augment else 'off'})")
    res = run_distill(teacher, cfg, dataset=ds, split=s, out_dir=output,
                      report_split=None if report_on == "none" else report_on, latency_runs=latency_runs,
                      latency_threads=latency_threads,
                      reporter=_reporter(quiet=rank != 0), skip_bad=skip_bad, compute=compute)
    if rank != 0:
        return
    out.print(f"student: {res.checkpoint} (best epoch {res.best_epoch}, val balanced {_pct(res.best_score)}%"
              + (", already trained" if res.skipped else "") + ")")
    if res.report:
        out.print(distill_table(res.report))


def distill_table(r: dict[str, Any]) -> Table:
    """Student vs teacher: accuracy, melanoma sensitivity, agreement and latency per engine."""
    pos = r["teacher"].get("positive_class", "mel")
    lat = {k: v for k, v in (r.get("latency") or {}).items() if "teacher" in v}
    t = Table(title=f"Student vs teacher on the {r['split']} split ({r['n']} images)")
    cols = ["model", "top-1", "top-2", "top-3", "bal.acc", f"{pos} sens", "agreement"]
    cols += [f"{engine} p50 ms" for engine in lat]
    for col in cols:
        t.add_column(col, justify="left" if col == "model" else "right")
    for who in ("teacher", "student"):
        m = r[who]
        t.add_row(who, _pct(m["top1"]), _pct(m["top2"]), _pct(m["top3"]), _pct(m["balanced_accuracy"]),
                  _pct(m.get(f"{pos}_sensitivity")), "" if who == "teacher" else _pct(r["top1_agreement"]),
                  *[f"{v[who]['p50_ms']:.1f}" for v in lat.values()])
    d = r["drops_points"]
    ratios = ", ".join(f"{engine} {v['student_over_teacher']:.2f}" for engine, v in lat.items())
    t.caption = (f"drops (points): top-1 {d['top1']:.2f}, balanced {d['balanced']:.2f}"
                 + (f"; student latency / teacher latency (batch 1): {ratios}" if ratios else ""))
    return t


@app.command()
def evaluate(
    model: Path = typer.Argument(..., help="Ensemble folder (or one member's .json)."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Data set. Default: $EDGESKIN_DATA."),
    split_file: Optional[Path] = typer.Option(None, "--split", help="Split file. Default: MODEL/split.csv."),
    on: str = typer.Option("test", "--on", help="Which split: train | val | test."),
    images: Optional[List[Path]] = typer.Option(None, "--images", help="Image folder(s), if not next to the metadata."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the metrics as JSON here."),
    batch_size: int = typer.Option(64, min=1, help="Inference batch size."),
    device: str = typer.Option("auto", "--device", "--compute-device", help=DEVICE_HELP + " Inference is fp32."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip (and report) bad rows and images."),
) -> None:
    """Evaluate a model or ensemble: top-1/2/3, balanced accuracy, per-class metrics and more.

    Also the confusion matrix, melanoma sensitivity/specificity and the calibration error.
    """
    from .data import read_split
    from .evaluate import evaluate as run_eval
    from .fileio import write_json

    ds = _load_data(data, images, skip_bad)
    s = read_split(_split_for(split_file, model))
    ev = run_eval(model, dataset=ds, split=s, split_name=on, batch_size=batch_size,
                  reporter=_reporter(), skip_bad=skip_bad, device=_compute(device, training=False))
    for t in metrics_tables(ev.reports, f"{model} on the {on} split ({len(ev.image_ids)} images)"):
        out.print(t)
    if json_out is not None:
        write_json(json_out, ev.to_dict())
        out.print(f"wrote {json_out}")


@app.command("import")
def import_cmd(
    sources: List[Path] = typer.Argument(..., help="Model files: .onnx, .keras/.h5, or .pt/.pth/.safetensors with --arch."),
    output: Path = typer.Option(..., "--out", "-o", help="Ensemble folder to create, or to add to (a mixed ensemble)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="keras-resnet50 | keras-tf | torchvision | timm | edgeskin."),
    spec: Optional[Path] = typer.Option(None, "--spec", help="A TOML file with the declaration (options below override it)."),
    fmt: Optional[str] = typer.Option(None, "--format", help="onnx | keras | timm | torchvision (default: from the file name)."),
    arch: Optional[str] = typer.Option(None, "--arch", help="For a state_dict: timm:NAME or torchvision:NAME."),
    name: Optional[str] = typer.Option(None, "--name", help="Member name (default: the file's stem)."),
    size: Optional[int] = typer.Option(None, "--size", min=32, max=4096, help="Square input size the model takes."),
    resize: Optional[int] = typer.Option(None, "--resize", min=32, max=8192, help="Shorter side before the centre crop."),
    interpolation: Optional[str] = typer.Option(None, "--interpolation", help="bilinear | bicubic | nearest."),
    layout: Optional[str] = typer.Option(None, "--layout", help="NCHW | NHWC (default: from the model)."),
    channel_order: Optional[str] = typer.Option(None, "--channel-order", help="RGB | BGR."),
    input_range: Optional[float] = typer.Option(None, "--input-range", min=1e-6, max=65535.0, help="Pixels before normalisation: 1 (0-1) or 255 (0-255)."),
    normalization: Optional[str] = typer.Option(None, "--normalization", help="meanstd | caffe | tf | none."),
    mean: Optional[str] = typer.Option(None, "--mean", help="Per-channel mean (meanstd), e.g. 0.485,0.456,0.406."),
    std: Optional[str] = typer.Option(None, "--std", help="Per-channel std (meanstd)."),
    outputs: Optional[str] = typer.Option(None, "--outputs", help="What the model outputs: logits | probs."),
    labels: Optional[str] = typer.Option(None, "--labels", help="The model's classes in output order, NAME or NAME=ourclass, comma-separated."),
    extra: Optional[List[str]] = typer.Option(None, "--extra", help="A class we do not have: NAME=drop or NAME=ourclass (merge). Repeatable."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Real images to check the members on. Default: $EDGESKIN_DATA."),
    split_file: Optional[Path] = typer.Option(None, "--split", help="Split file; the check uses --on of it."),
    on: str = typer.Option("val", "--on", help="Which split the check runs on."),
    check_images: int = typer.Option(64, "--check-images", min=1, help="How many images of the split the check runs."),
    label_set: str = typer.Option("ham10000", "--label-set", help="Our classes: ham10000 | binary."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the import report as JSON here."),
) -> None:
    """Import members trained anywhere (ONNX, Keras, timm, torchvision) into an ensemble folder.

    Each member is run on real images first; nothing is written unless every member passes.
    """
    from .data import read_split
    from .fileio import write_json
    from .members.declare import Declaration, read_declaration
    from .members.importer import import_members

    extras = {}
    for item in extra or []:
        k, sep, v = item.partition("=")
        if not sep or not k.strip() or not v.strip():
            raise ConfigError(f"--extra {item!r} is not NAME=drop or NAME=CLASS", "e.g. --extra SCC=akiec --extra UNK=drop")
        extras[k.strip()] = v.strip()
    said = Declaration(
        preset=preset, size=size, resize=resize, interpolation=interpolation, layout=layout,
        channel_order=channel_order, input_range=input_range, normalization=normalization,
        mean=_floats(mean, 3, "--mean") if mean else None, std=_floats(std, 3, "--std") if std else None,
        outputs=outputs, labels=tuple(x.strip() for x in labels.split(",")) if labels else None, extra=extras,
        arch=arch, format=fmt, name=name)
    decl = said.over(read_declaration(spec)) if spec is not None else said
    ds = _load_data(data, None, False)
    s = read_split(split_file) if split_file is not None else None
    res = import_members(sources, output, decl, dataset=ds, split=s, split_name=on, check_images=check_images,
                         labels=label_set, reporter=_reporter())
    t = Table(title=f"imported into {res.out} (checked on {res.members[0]['images']} images of "
                    f"{on if s is not None else 'the data set'})")
    for col in ("member", "format", "top-1"):
        t.add_column(col, justify="left" if col != "top-1" else "right")
    for r in res.members:
        t.add_row(r["name"], r["format"], _pct(r["accuracy"]))
    new = {r["name"] for r in res.members}
    for name, acc in (res.ensemble or {}).get("member_accuracy", {}).items():
        if name not in new:
            t.add_row(name, "(already there)", _pct(acc))
    if res.ensemble is not None:
        t.add_row(f"ensemble ({len(res.ensemble['members'])} members)", "", _pct(res.ensemble["accuracy"]))
    out.print(t)
    for w in res.warnings:
        err.print(f"[yellow]warning:[/yellow] {escape_markup(w)}")
    if json_out is not None:
        write_json(json_out, {"out": str(res.out), "members": res.members, "ensemble": res.ensemble,
                              "warnings": res.warnings})


calib_app = typer.Typer(help="Calibration sets for INT8 quantization.", no_args_is_help=True)
bundle_app = typer.Typer(help="Inspect, verify and pack bundles.", no_args_is_help=True)
app.add_typer(calib_app, name="calib")
app.add_typer(bundle_app, name="bundle")


def _split_for(data_split: Optional[Path], model: Optional[Path]) -> Path:
    if data_split is not None:
        return data_split
    if model is not None:
        cand = (model if model.is_dir() else model.parent) / "split.csv"
        if cand.is_file():
            return cand
    raise DataError("no split file given", "pass --split FILE (the split the model was trained with)")


@calib_app.command("make")
def calib_make(
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Data set. Default: $EDGESKIN_DATA."),
    split_file: Path = typer.Option(..., "--split", help="Split file; images are drawn from its train split."),
    size: int = typer.Option(512, min=1, help="Number of images (at least 300 unless --force)."),
    seed: int = typer.Option(0, min=0, help="Seed of the draw."),
    name: Optional[str] = typer.Option(None, help="Name (default: train-SIZE-seedSEED-HASH)."),
    out_dir: Path = typer.Option(Path("calibration"), "--out-dir", help="Folder for the manifest."),
    source_split: str = typer.Option("train", "--from", help="Split to draw from (anything but train needs --force)."),
    force: bool = typer.Option(False, "--force", help="Accept a small set, a missing class or a non-train split; recorded in the manifest."),
    images: Optional[List[Path]] = typer.Option(None, "--images", help="Image folder(s), if not next to the metadata."),
) -> None:
    """Draw a deterministic, class-stratified calibration set from the training split."""
    from .calibration import make_calibration_set, write_calibration_set
    from .data import read_split

    ds = _load_data(data, images, False)
    cal = make_calibration_set(ds, read_split(split_file), size=size, seed=seed, name=name,
                               source_split=source_split, force=force)
    path = write_calibration_set(cal, out_dir)
    t = Table(title=f"Calibration set {cal.name}")
    t.add_column("class")
    t.add_column("images", justify="right")
    for c, n in cal.manifest["class_counts"].items():
        t.add_row(c, str(n))
    out.print(t)
    if cal.manifest["forced"]:
        err.print(f"[yellow]forced:[/yellow] {'; '.join(cal.manifest['forced_reasons'])}")
    out.print(f"wrote {path} ({len(cal.image_ids)} images, sha256 {cal.sha256[:12]})")


@app.command()
def targets() -> None:
    """List the compile targets, their aliases and precisions."""
    from .targets import available_targets

    t = Table(title="Targets")
    for col in ("target", "aliases", "precisions", "needs calibration", "extras", "what"):
        t.add_column(col)
    for tg in available_targets():
        t.add_row(tg.name, ", ".join(tg.aliases), ", ".join(tg.precisions), ", ".join(tg.needs_calibration) or "-",
                  ", ".join(tg.extras), tg.description)
    out.print(t)


@app.command("compile")
def compile_cmd(
    model: Path = typer.Argument(..., help="A checkpoint (.json), or a folder with one model (or use --member)."),
    target: str = typer.Option("cpu", "--target", "-t", help="Target name (see `edgeskin targets`)."),
    precision: str = typer.Option("int8", "--precision", "-p", help="fp32 | int8 (what the target offers)."),
    output: Path = typer.Option(..., "--out", "-o", help="Bundle folder to write (NAME.edgeskin)."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Data set for verification/calibration. Default: $EDGESKIN_DATA."),
    split_file: Optional[Path] = typer.Option(None, "--split", help="Split file (default: MODEL's split.csv)."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration manifest (calibration/NAME.json); needed for int8."),
    member: Optional[str] = typer.Option(None, help="Member of an ensemble folder to compile (e.g. member2)."),
    max_drop: Optional[str] = typer.Option(None, "--max-drop", help="Budget in points vs FP32 on val: top1=0.5,balanced=1.5,mel_recall=2."),
    min_agreement: float = typer.Option(0.97, min=0.0, max=1.0, help="Smallest top-1 agreement with FP32 on val."),
    subset_size: int = typer.Option(512, min=1, help="Calibration images used (NNCF, or the tflite observers); at most the set's size."),
    fast_bias_correction: bool = typer.Option(True, "--fast-bias-correction/--full-bias-correction", help="NNCF bias correction flavour."),
    preset: str = typer.Option("performance", help="NNCF preset: performance | mixed."),
    ignore: Optional[List[str]] = typer.Option(None, "--ignore", help="Node name (or type:OpType) to keep in float. Repeatable."),
    head_float: bool = typer.Option(True, "--head-float/--head-int8", help="Keep the classifier layer in float."),
    first_conv_float: bool = typer.Option(False, "--first-conv-float/--first-conv-int8", help="Keep the first convolution in float."),
    range_estimator: str = typer.Option("mean_minmax", help="Activation ranges: mean_minmax (NNCF default) | minmax | median_minmax | mean_no_outliers_minmax | mean_quantile | histogram."),
    accuracy_control: Optional[float] = typer.Option(None, "--max-drop-int8", min=0.0, max=100.0, help="Accuracy-controlled INT8: keep the most sensitive layers in float until the control metric on val drops at most this (0-1)."),
    fallback: Optional[float] = typer.Option(None, "--float-fallback", min=0.0, max=1.0, help="Keep the most damaging activation quantizers in float until top-1 agreement with FP32 on val reaches this (e.g. 0.98)."),
    fallback_max_layers: int = typer.Option(12, min=0, help="At most this many quantizers kept in float by --float-fallback."),
    control_metric: str = typer.Option("agreement", help="What accuracy control holds: agreement (top-1 agreement with FP32) | clinical (mean of balanced acc. and mel recall)."),
    opset: Optional[int] = typer.Option(None, min=7, max=30, help="ONNX opset (default: 17 for cpu; the device profile's highest for jetson)."),
    device: Optional[str] = typer.Option(None, "--device", help="Device profile (see `edgeskin devices`); jetson default: jetson-orin-nano."),
    jetpack: Optional[str] = typer.Option(None, "--jetpack", help="JetPack release of the Jetson (default: the profile's), which fixes TensorRT and the opset."),
    threads: Optional[int] = typer.Option(None, min=1, max=4096, help="Runtime threads for the verification."),
    layout: str = typer.Option("NHWC", help="tflite: input layout NHWC (phones) | NCHW."),
    int8_adds: bool = typer.Option(False, "--int8-adds/--float-adds", help="tflite int8: quantize the residual additions too (all-integer graph for NPU delegates)."),
    observer: str = typer.Option("mean_minmax", help="tflite int8: activation ranges, mean_minmax (moving average of each image's min/max; the default) | histogram (litert's default) | minmax."),
    force: bool = typer.Option(False, "--force", help="Write the bundle even if it misses the budget (recorded in the manifest)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing bundle."),
) -> None:
    """Compile one model for a target into a self-describing, hash-verified bundle.

    The compiled artefact is checked against FP32 on the validation split first.
    """
    from .calibration import read_calibration_set
    from .data import read_split
    from .targets import Budget, get_target
    from .targets.options import compile_kwargs

    tg = get_target(target)
    tg.check_precision(precision)
    budget = Budget.parse(max_drop, min_agreement)
    given = dict(device=device, subset_size=subset_size, first_conv_float=first_conv_float)
    if tg.name == "tflite":
        given.update(layout=layout, int8_adds=int8_adds, observer=observer)
    else:
        given.update(fast_bias_correction=fast_bias_correction, preset=preset, ignore=tuple(ignore or ()),
                     head_float=head_float, range_estimator=range_estimator, max_drop_int8=accuracy_control,
                     float_fallback=fallback, fallback_max_layers=fallback_max_layers, control_metric=control_metric,
                     opset=opset, jetpack=jetpack)
    kw = compile_kwargs(tg, target, given)
    ds = _load_data(data, None, False)
    s = read_split(_split_for(split_file, model))
    cal = read_calibration_set(calib) if calib else None
    res = tg.compile(model, precision=precision, dataset=ds, split=s, out=output, calibration=cal, member=member,
                     budget=budget, force=force, overwrite=overwrite, threads=threads, reporter=_reporter(), **kw)
    c = res.check
    t = Table(title=f"{tg.name}/{precision} vs FP32 on the validation split ({c['n']} images)")
    for col in ("metric", "FP32", "compiled", "drop (points)", "budget"):
        t.add_column(col, justify="left" if col == "metric" else "right")
    pos = "mel_sensitivity" if "mel_sensitivity" in c["fp32"] else "malignant_sensitivity"
    for key, label, dk in (("top1", "top-1", "top1"), ("balanced_accuracy", "balanced acc.", "balanced"),
                           (pos, "mel recall" if pos == "mel_sensitivity" else "malignant recall", "mel_recall")):
        t.add_row(label, _pct(c["fp32"][key]), _pct(c["compiled"][key]), f"{c['drops_points'][dk]:.2f}",
                  f"≤ {c['budget'][dk]}")
    t.add_row("top-1 agreement", "", _pct(c["top1_agreement"]), "", f"≥ {100 * c['budget']['min_agreement']:.0f}")
    out.print(t)
    size = sum(f["bytes"] for f in res.manifest.files.values())
    status = "[yellow]FORCED past its budget[/yellow]" if res.forced else "[green]within budget[/green]"
    out.print(f"wrote {res.bundle} ({size / 1e6:.1f} MB, {status})")
    e = res.manifest.engine
    if e.get("name") == "tensorrt":
        out.print(f"TensorRT {e['tensorrt']} (JetPack {e['jetpack']}, {e['device']}), opset {e['opset']}; "
                  f"build the engine on the device with `edgeskin engine build {res.bundle}` or:\n  {e['trtexec']}")


@app.command()
def bench(
    reference: Path = typer.Option(..., "--reference", "-r", help="The full-precision ensemble (folder), or a reference-predictions file (.npz) made by --save-reference (no torch needed)."),
    bundles: Optional[List[Path]] = typer.Option(None, "--bundle", "-b", help="A bundle to bench (folder or zip). Repeatable."),
    student: Optional[Path] = typer.Option(None, "--student", help="The FP32 student (checkpoint folder/.json): adds its row, and is what --targets compiles."),
    targets_spec: Optional[str] = typer.Option(None, "--targets", help="Compile these from --student first, e.g. cpu:int8,jetson:int8,tflite:int8 (a bare name means int8)."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration manifest for --targets int8."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Data set holding the images. Default: $EDGESKIN_DATA."),
    split_file: Optional[Path] = typer.Option(None, "--split", help="Split file (default: the reference's split.csv). Not needed with a predictions file."),
    on: str = typer.Option("test", "--on", help="Split to bench on: test | val | train | all (all: every image of --data, e.g. an ISIC 2018 ground-truth CSV)."),
    device: Optional[str] = typer.Option(None, "--device", help="Device profile whose budgets apply (see `edgeskin devices`)."),
    max_drop: Optional[str] = typer.Option(None, "--max-drop", help="Budget in points, e.g. top1=0.5,balanced=1.5,mel_recall=2 (overrides the profile's)."),
    max_latency: Optional[float] = typer.Option(None, "--max-latency", min=1e-6, help="Largest batch-1 p90 latency in ms."),
    against: str = typer.Option("auto", help="Budgets compare each bundle with: auto (the FP32 student if given, else the ensemble) | student | ensemble."),
    threads: Optional[int] = typer.Option(None, min=1, help="Runtime threads for every bundle."),
    min_samples: int = typer.Option(1000, "--min-samples", "--runs", min=1, help="Batch-1 timing: at least this many runs per row, model only and end to end (p99 is shown from 1000)."),
    min_seconds: float = typer.Option(10.0, "--min-seconds", min=0.0, help="Batch-1 timing: and at least this many seconds per row."),
    wide: bool = typer.Option(False, "--wide", help="Print every column (the full table is always in report.md)."),
    refuse_forced: bool = typer.Option(False, "--refuse-forced", help="Fail (exit 5) when a bundle was written past its compile budget (FORCED)."),
    engine: str = typer.Option("auto", help="Jetson bundles: auto | tensorrt | onnxruntime (host proxy)."),
    compute_device: str = typer.Option("auto", "--compute-device", help="Where the ensemble and student rows are evaluated (fp32): auto | cpu | cuda | cuda:N. Latency is always measured on the host CPU."),
    save_reference: Optional[Path] = typer.Option(None, "--save-reference", help="Also write the reference predictions here (to bench on a device without torch)."),
    output: Path = typer.Option(Path("bench"), "--out", "-o", help="Folder for report.json, report.md and the plots."),
) -> None:
    """Bench bundles against the full-precision ensemble: accuracy, per-class recall, melanoma
    sensitivity, flips with McNemar's test, bootstrap intervals, latency (batch 1, model only and
    end to end from an encoded image), memory; gated by budgets.

    Exit code 3 when a row failed (compile, load or run), 4 when a budget is breached (the message
    names the row and the metric); see `edgeskin --help` for every exit code.
    """
    import tempfile

    from .bench import BenchBudget, BenchConfig, ReferencePredictions, compile_failed_row, run_bench
    from .bench.report import rich_table, write_reports
    from .data import read_split

    ds = _load_data(data, None, False)
    profile = None
    if device:
        from .profiles import get_profile

        profile = get_profile(device)
    budget = BenchBudget.parse(max_drop, max_latency, against=against, profile=profile)
    config = BenchConfig(threads=threads, min_samples=min_samples, min_seconds=min_seconds, engine=engine)
    exports = tempfile.TemporaryDirectory(prefix="edgeskin-reference-")
    models = None
    if reference.suffix == ".npz" or reference.is_file():
        ref = ReferencePredictions.load(reference)
        split = None
    else:
        from .bench import export_reference_models, reference_from_models

        # --on all: every image of --data (e.g. an ISIC 2018 ground-truth CSV, which has no split)
        split = None if on == "all" else read_split(_split_for(split_file, reference))
        ref = reference_from_models(reference, dataset=ds, split=split, split_name=on, student=student,
                                    threads=threads, reporter=_reporter(), compute=_compute(compute_device, training=False))
        if save_reference:
            ref.save(save_reference)
            out.print(f"wrote reference predictions {save_reference} ({len(ref.image_ids)} images)")
        models = export_reference_models(reference, student, exports.name)
    bundle_paths = list(bundles or [])
    extra_rows: list[dict[str, Any]] = []
    if targets_spec:
        if student is None:
            raise ConfigError("--targets compiles the student", "pass --student CHECKPOINT")
        from .calibration import read_calibration_set
        from .targets import Budget, get_target

        split = split or read_split(_split_for(split_file, student))
        cal = read_calibration_set(calib) if calib else None
        for item in [t.strip() for t in targets_spec.split(",") if t.strip()]:
            name, _, prec = item.partition(":")
            prec = prec or "int8"
            dest = output / "bundles" / f"{name}-{prec}.edgeskin"
            try:
                tg = get_target(name)
                res = tg.compile(student, precision=prec, dataset=ds, split=split, out=dest, calibration=cal,
                                 budget=Budget(), force=True, overwrite=True, threads=threads, reporter=_reporter())
                bundle_paths.append(res.bundle)
            except EdgeskinError as exc:
                extra_rows.append(compile_failed_row(name, prec, exc.message))
    try:
        report = run_bench(ref, bundle_paths, dataset=ds, budget=budget, config=config, extra_rows=extra_rows,
                           reporter=_reporter(), reference_models=models)
    finally:
        exports.cleanup()
    out.print(rich_table(report, wide=wide))
    files = write_reports(report, output)
    out.print(f"wrote {files['json']}, {files['markdown']}" + (f", {', '.join(files['plots'])}" if files["plots"]
                                                                 else " (plots skipped: pip install 'edgeskin[bench]')"))
    from .bench import failed_rows

    failed = failed_rows(report)
    if failed:
        from .bench import RowFailed

        raise RowFailed(f"{len(failed)} row(s) failed: " + "; ".join(failed),
                        "see report.md; a bundle that cannot be loaded or run is never a pass")
    if report.breaches:
        from .bench import BudgetBreach

        raise BudgetBreach("budget breached: " + "; ".join(report.breaches),
                           "see report.md; relax the budget only with a reason")
    forced = [r["row"] for r in report.rows if r.get("forced")]
    if refuse_forced and forced:
        from .bench import ForcedRefused

        raise ForcedRefused(f"bundle(s) written past their compile budget: {', '.join(forced)}",
                            "recompile them within budget, or bench without --refuse-forced to compare only")
    if budget.active():
        out.print("[green]every bundle within budget[/green]")


@bundle_app.command("verify")
def bundle_verify(bundle: Path = typer.Argument(..., help="Bundle folder or zip.")) -> None:
    """Check a bundle: schema version, manifest, and the sha256 of every file; for a jetson
    bundle also TensorRT's graph rules where onnx is installed (the host), and polygraphy lint
    where polygraphy is. On the device (runtime only) it says which checks it skipped."""
    import shutil

    from .bundle import BundleReader

    r = BundleReader(bundle)
    names = r.verify()
    m = r.manifest
    out.print(f"[green]ok[/green] {bundle}: schema {m.schema_version}, target {m.target}/{m.precision}, "
              f"{len(names)} files verified ({', '.join(names)})")
    if m.engine.get("name") != "tensorrt":
        return
    compiled = ((m.provenance.get("artefact_checks") or {}).get("tensorrt_form") or {})
    try:
        import onnx
    except ImportError:
        out.print("TensorRT form: [yellow]not checked here[/yellow] (onnx is not installed: the device needs only "
                  "the runtime); hashes and manifest checked above"
                  + ("; at compile time it " + ("passed" if compiled.get("passed") else "FAILED")
                     if compiled else "") + ". Check the graph on the host with `pip install 'edgeskin[jetson]'`.")
        return
    from .quantize.tensorrt import validate_tensorrt_onnx

    lint = shutil.which("polygraphy") is not None or (Path(sys.executable).parent / "polygraphy").exists()
    report = validate_tensorrt_onnx(onnx.load_from_string(r.read(m.model_file)),
                                    max_opset=int(m.engine.get("opset", 17)), lint=lint)
    t = Table(title=f"TensorRT form (TensorRT {m.engine.get('tensorrt')}, opset ≤ {m.engine.get('opset')})")
    for col in ("rule", "result", "detail"):
        t.add_column(col)
    for res in report.results:
        t.add_row(res.rule, "[green]pass[/green]" if res.passed else "[red]FAIL[/red]",
                  res.detail + (f" ({', '.join(res.nodes[:5])})" if res.nodes else ""))
    if not lint:
        t.add_row("polygraphy lint", "[yellow]skipped[/yellow]", "polygraphy is not installed here")
    out.print(t)
    report.raise_if_failed(f"{bundle}/{m.model_file}")


@bundle_app.command("pack")
def bundle_pack(bundle: Path = typer.Argument(..., help="Bundle folder."),
                output: Optional[Path] = typer.Option(None, "--out", "-o", help="Zip to write (default: BUNDLE.zip).")) -> None:
    """Zip a verified bundle folder (the runtime loads the zip directly)."""
    from .bundle import pack_bundle

    path = pack_bundle(bundle, output)
    out.print(f"wrote {path}")


@bundle_app.command("show")
def bundle_show(bundle: Path = typer.Argument(..., help="Bundle folder or zip.")) -> None:
    """Print a bundle's manifest."""
    from .bundle import BundleReader

    out.print_json(json.dumps(BundleReader(bundle).manifest.to_dict()))


@app.command()
def devices(
    show: Optional[str] = typer.Option(None, "--show", help="Print one profile in full (JSON)."),
) -> None:
    """List the device profiles: runtime versions, opset, precisions, DLA cores and budgets.

    Profiles are TOML files in edgeskin/devices/; $EDGESKIN_DEVICES names a folder of your own.
    """
    from .profiles import get_profile, load_profiles

    if show:
        out.print_json(json.dumps(get_profile(show).to_dict()))
        return
    t = Table(title="Device profiles")
    for col in ("device", "aliases", "target", "precisions", "JetPack / TensorRT / max opset", "DLA", "budget"):
        t.add_column(col)
    for p in load_profiles().values():
        jps = "\n".join(f"{j.version} / {j.tensorrt} / {j.max_opset}" + (" (default)" if j.version == p.default_jetpack else "")
                        + ("" if j.supported else " (not supported)") for j in p.jetpacks) or "-"
        b = p.budget
        budget = (p.max_drop() + (f", agreement ≥ {100 * b['min_agreement']:.0f}%" if "min_agreement" in b else "")
                  + (f", ≤ {b['max_latency_ms']:g} ms" if "max_latency_ms" in b else ""))
        t.add_row(p.name, ", ".join(p.aliases), p.target, ", ".join(p.precisions), jps,
                  str(p.dla_cores) if p.kind == "jetson" else "-", budget)
    out.print(t)


engine_app = typer.Typer(help="TensorRT engines on the Jetson.", no_args_is_help=True)
app.add_typer(engine_app, name="engine")

from .cli_data import data_app  # noqa: E402  (light: the fetcher is standard library only)

app.add_typer(data_app, name="data")


@engine_app.command("build")
def engine_build(
    bundle: Path = typer.Argument(..., help="A jetson bundle folder."),
    precision: Optional[str] = typer.Option(None, help="fp16 | fp32 for a float bundle on TensorRT < 10.12 (default: the bundle's)."),
    dla: Optional[int] = typer.Option(None, "--dla", min=0, max=7, help="DLA core to build for (static batch, GPU fallback); only where the device profile has a DLA."),
    workspace_mb: Optional[int] = typer.Option(None, min=1, help="Builder workspace (default: the device profile's)."),
    timing_cache: Optional[Path] = typer.Option(None, help="Timing cache file (default: ~/.cache/edgeskin/tensorrt/)."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Build again even if an engine for this TensorRT and device exists."),
) -> None:
    """Build the TensorRT engine on this Jetson, self-test it against the bundle's golden
    outputs, and add it to the bundle (TensorRT version and device identity in the manifest)."""
    from .runtime.tensorrt import build_engine

    rec = build_engine(bundle, precision=precision, dla=dla, workspace_mb=workspace_mb,
                       timing_cache=timing_cache, rebuild=rebuild)
    st = rec.get("selftest", {})
    dev = rec.get("device") or {}
    tc = rec.get("timing_cache") or {}
    out.print(f"[green]engine ready[/green]: {rec['file']} (TensorRT {rec['tensorrt']}, "
              f"{dev.get('board') or rec.get('gpu')}, {rec.get('typing', 'weak')} typing, "
              f"batch {rec['batch']['min']}-{rec['batch']['max']}, {rec['bytes'] / 1e6:.1f} MB, "
              f"built in {rec['build_seconds']} s"
              + (f"; golden max |Δp| {st['max_abs_diff']:.2e} ≤ {st['tolerance']:g}" if st else "") + ")")
    if tc.get("rejected"):
        err.print(f"[yellow]timing cache[/yellow] {tc.get('path')} came from another TensorRT or device; "
                  "a fresh one was saved in its place")


@app.command()
def selftest(
    bundle: Path = typer.Argument(..., help="Bundle folder or zip."),
    threads: Optional[int] = typer.Option(None, min=1, max=4096, help="Runtime threads."),
    engine: str = typer.Option("auto", help="Jetson bundles: auto (TensorRT if installed, else the ONNX Runtime host proxy) | tensorrt | onnxruntime."),
    dla: Optional[int] = typer.Option(None, "--dla", min=0, max=7, help="Jetson bundles: run the engine built for this DLA core."),
) -> None:
    """Re-run the bundle's golden inputs on this machine and compare with the compile-time outputs."""
    from .runtime import load, selftest as run_selftest

    pred = load(bundle, threads=threads, engine=engine, dla_core=dla)
    if pred.host_proxy:
        err.print("[yellow]host proxy[/yellow]: TensorRT is not installed here; the graph runs in ONNX Runtime")
    r = run_selftest(pred)
    msg = (f"{r.n} golden inputs, max |Δp| {r.max_abs_diff:.2e} (tolerance {r.tolerance:.0e}), "
           f"top-1 agreement {100 * r.top1_agreement:.0f}%, engine {pred.backend.name} {pred.backend.version}")
    if not r.passed:
        raise EdgeskinError(f"selftest FAILED: {msg}; worst input #{r.worst_index} ({r.worst_id})",
                            "the engine on this device computes differently from the compile machine; "
                            "rebuild the bundle for this device or check the runtime version")
    out.print(f"[green]selftest passed[/green]: {msg}")


@app.command()
def predict(
    inputs: List[Path] = typer.Argument(..., help="Image files and/or folders of images."),
    bundle: Path = typer.Option(..., "--bundle", "-b", help="Bundle folder or zip."),
    top_k: int = typer.Option(3, "--top-k", "-k", min=1, max=1000, help="How many classes to show."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (one object per image)."),
    threads: Optional[int] = typer.Option(None, min=1, max=4096, help="Runtime threads."),
    engine: str = typer.Option("auto", help="Jetson bundles: auto (TensorRT if installed, else the ONNX Runtime host proxy) | tensorrt | onnxruntime."),
    dla: Optional[int] = typer.Option(None, "--dla", min=0, max=7, help="Jetson bundles: run the engine built for this DLA core."),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="Images per engine call (1: results never depend on the batch; more: faster)."),
) -> None:
    """Top-k labels with probabilities for each image.

    Bad files are reported and skipped; the exit code is 1 when any failed.
    """
    from .data.readers import IMAGE_EXTENSIONS
    from .runtime import load

    files: list[Path] = []
    for p in inputs:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            files.append(p)
    if not files:
        raise DataError("no images given", "pass image files or folders holding .jpg/.png images")
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}", "pass 1 or more")
    pred = load(bundle, threads=threads, engine=engine, dla_core=dla)
    if pred.host_proxy:
        err.print("[yellow]host proxy[/yellow]: TensorRT is not installed here; the jetson graph runs in ONNX Runtime "
                  "(close to TensorRT INT8 numerics, not its speed)")
    results: list[dict[str, Any]] = []
    failed = 0
    tensors: list[Any] = []
    pending: list[Path] = []

    def flush() -> None:
        if not tensors:
            return
        import numpy as np

        for f, r in zip(pending, pred.predict(np.stack(tensors), top_k=top_k)):  # type: ignore[arg-type]
            d = r.to_dict()
            d["source"] = str(f)
            results.append(d)
        tensors.clear()
        pending.clear()

    for f in files:
        try:
            tensors.append(pred.tensor(f))  # decode and preprocess: bad files fail here, one by one
            pending.append(f)
        except EdgeskinError as exc:
            failed += 1
            flush()
            results.append({"source": str(f), "error": exc.message, "hint": exc.hint})
            continue
        if len(tensors) >= batch_size:
            flush()
    flush()
    if as_json:
        out.print_json(json.dumps(results))
    else:
        t = Table(title=f"{bundle} ({pred.manifest.target}/{pred.manifest.precision})")
        t.add_column("image")
        for i in range(top_k):
            t.add_column(f"#{i + 1}")
        for r in results:
            if "error" in r:
                t.add_row(r["source"], f"[red]error[/red]: {r['error']}", *[""] * (top_k - 1))
            else:
                cells = [f"{x['label']} {100 * x['probability']:.1f}%" for x in r["top"]]
                t.add_row(r["source"], *cells, *[""] * (top_k - len(cells)))
        out.print(t)
    if failed:
        err.print(f"[red]{failed} of {len(files)} image(s) failed[/red]")
        raise typer.Exit(EXIT_CODES["failed row"])


@app.command("run")
def run_recipe(
    recipe: Path = typer.Argument(..., help="Recipe TOML file (see recipes/quick.toml)."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Data set; overrides the recipe's [data] path. Default: the recipe's, then $EDGESKIN_DATA, then the default folder."),
    output: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default: the recipe's out)."),
    until: Optional[str] = typer.Option(None, "--until", help="Stop after this stage (split, ensemble, student, calibration, compile:NAME, bench)."),
    redo: Optional[List[str]] = typer.Option(None, "--redo", help="Run this stage again even if it is up to date ('compile' = every compile). Repeatable."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only show which stages would run."),
) -> None:
    """Run a pipeline recipe end to end: split, ensemble, student, calibration, compile every
    target, bench. Stages whose inputs did not change are skipped; an interrupted run resumes.

    Bundles go to OUT/bundles/, the bench report to OUT/bench/ (report.md, report.json, plots).
    Exit code 4 when a bench budget is breached, 3 when a target failed to compile.
    """
    from .recipe import load_recipe, run

    r = load_recipe(recipe, out=output)
    err.print(f"recipe {r.name} ({recipe}) -> {r.out}")
    res = run(r, data=data, until=until, redo=redo or (), dry_run=dry_run, reporter=_reporter(),
              say=lambda text: err.print(escape_markup(text)))
    t = Table(title=f"Recipe {r.name}: stages" + (" (dry run)" if dry_run else ""))
    for col in ("stage", "status", "seconds", "detail"):
        t.add_column(col, justify="right" if col == "seconds" else "left")
    colour = {"ran": "green", "skipped": "dim", "up to date": "dim", "failed": "red", "failed before": "red",
              "planned": "yellow"}
    for o in res.stages:
        t.add_row(o.name, f"[{colour.get(o.status, 'white')}]{o.status}[/]", f"{o.seconds:.0f}" if o.seconds else "",
                  escape_markup(o.detail))
    out.print(t)
    if dry_run:
        return
    if res.report is not None:
        from .bench.report import rich_table

        out.print(rich_table(res.report))
        out.print(f"bundles: {r.out / 'bundles'}; report: {r.out / 'bench' / 'report.md'}")
    if res.failed:
        from .targets import CompileError

        raise CompileError("some targets failed to compile: " + "; ".join(res.failed),
                            "see each target's budget check above; relax [budgets.compile] only with a reason, "
                            "or set on_miss = \"keep\" to bench them marked FORCED")
    if res.breaches:
        from .bench import BudgetBreach

        raise BudgetBreach("budget breached: " + "; ".join(res.breaches),
                           f"see {r.out / 'bench' / 'report.md'}; relax the budget only with a reason")


def escape_markup(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _parser_exceptions() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """The command-line parser's usage-error and abort classes (typer vendors click as
    ``typer._click`` in recent releases and uses the click package in older ones)."""
    usage: list[type] = []
    aborts: list[type] = [typer.Abort]
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            import importlib

            mod = importlib.import_module(name)
        except ImportError:
            continue
        usage.append(mod.UsageError)
        if hasattr(mod, "Abort"):
            aborts.append(mod.Abort)
    return tuple(usage), tuple(dict.fromkeys(aborts))


def main() -> None:
    """Console entry point. Every ending has its exit code (:data:`edgeskin.errors.EXIT_CODES`):
    a user error (a project error, or an option the command line parser refuses) prints an
    ``error:`` line and a ``hint:`` line; an interruption keeps finished work."""
    from .progress import stop_all

    usage_errors, aborts = _parser_exceptions()

    try:
        rc = app(standalone_mode=False, prog_name="edgeskin")
    except EdgeskinError as exc:
        from rich.markup import escape

        stop_all()
        err.print(f"[bold red]error:[/bold red] {escape(exc.message)}")
        if exc.hint:
            err.print(f"[yellow]hint:[/yellow] {escape(exc.hint)}")
        sys.exit(exc.exit_code)
    except usage_errors as exc:  # a bad option or value, before the command runs
        from rich.markup import escape

        stop_all()
        command = exc.ctx.command_path if exc.ctx is not None else "edgeskin"
        err.print(f"[bold red]error:[/bold red] {escape(exc.format_message())}")
        err.print(f"[yellow]hint:[/yellow] see `{escape(command)} --help`")
        sys.exit(EXIT_CODES["user error"])
    except (KeyboardInterrupt, *aborts):
        stop_all()
        err.print("[yellow]interrupted[/yellow]: finished work is kept; run the same command to resume")
        sys.exit(EXIT_CODES["interrupted"])
    except SystemExit as exc:
        # typer turns Ctrl-C into a silent exit with code 130
        if exc.code != 130:
            raise
        stop_all()
        err.print("[yellow]interrupted[/yellow]: finished work is kept; run the same command to resume")
        sys.exit(130)
    if rc == EXIT_CODES["interrupted"]:  # typer turns Ctrl-C inside a command into this code
        stop_all()
        err.print("[yellow]interrupted[/yellow]: finished work is kept; run the same command to resume")
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
