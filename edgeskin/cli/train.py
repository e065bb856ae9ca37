"""``edgeskin split | train | distill | evaluate``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from .. import settings as build
from ..errors import ConfigError, DataError
from ..settings import command_options
from .common import (
    app,
    compute_for,
    err,
    floats,
    load_data,
    out,
    reporter,
    split_for,
    warn_if_not_transfer,
)
from .tables import distill_table, metrics_tables, pct, split_table


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
    from ..data import make_split, write_split

    ds = load_data(data, images, skip_bad)
    s = make_split(ds, fractions=floats(fractions, 3, "--fractions"), seed=seed)  # type: ignore[arg-type]
    write_split(s, output)
    out.print(split_table(s))
    out.print(f"wrote {output} ({len(s.assignment)} images, seed {seed})")


@app.command()
@command_options(build.training(), build.ensemble())
def train(
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Data set (see `edgeskin split --help`). Default: $EDGESKIN_DATA."),
    output: Path = typer.Option(..., "--out", "-o", help="Ensemble folder to write (member0.pt/.json, ...). Re-running resumes."),
    split_file: Optional[Path] = typer.Option(None, "--split", help="Split file. Default: OUT/split.csv, made from --split-seed if missing."),
    split_seed: int = typer.Option(0, min=0, help="Seed for a new split when none is given."),
    images: Optional[List[Path]] = typer.Option(None, "--images", help="Image folder(s), if not next to the metadata."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip (and report) bad rows and images."),
    settings: dict = None,  # type: ignore[assignment]  (the options of edgeskin.settings, filled in by command_options)
) -> None:
    """Train an ensemble of ResNet50 members (class-weighted CE / focal loss) on a lesion-disjoint split.

    Runs on a GPU when there is one (--device), and under `torchrun --nproc-per-node N -m edgeskin
    train ...` (DistributedDataParallel; one GPU per process, or gloo on CPUs).
    """
    from ..data import make_split, read_split, write_split
    from ..train import train_ensemble

    cfg = build.train_config(settings)
    build.apply_threads(settings)
    members = int(settings["members"])
    seed = int(settings["seed"])
    compute = compute_for(settings)
    rank, world = compute.rank, compute.world
    ds = load_data(data, images, skip_bad)
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
        warn_if_not_transfer(settings["preset"], cfg.pretrained, cfg.arch)
        err.print(f"training {members} × {cfg.arch} at {cfg.size} px, ≤{cfg.epochs} epochs"
                  + (f", {world} processes" if world > 1 else ""))
    results = train_ensemble(cfg, dataset=ds, split=s, out_dir=output, members=members,
                             losses=build.member_losses(settings, members),
                             seeds=[seed + i for i in range(members)], reporter=reporter(quiet=rank != 0),
                             skip_bad=skip_bad, compute=compute)
    if rank == 0:
        t = Table(title=f"Trained members ({output})")
        for col in ("member", "best epoch", "val balanced %", "epochs run", "resumed"):
            t.add_column(col)
        for i, r in enumerate(results):
            t.add_row(f"member{i}", str(r.best_epoch), pct(r.best_score), str(len(r.history)),
                      "skipped (done)" if r.skipped else ("yes" if r.resumed_from else "no"))
        out.print(t)


@app.command()
@command_options(build.training(), build.student())
def distill(
    teacher: Path = typer.Option(..., "--teacher", help="The trained ensemble (folder of members: edgeskin's, imported with `edgeskin import`, or both; the shared reference layout works too)."),
    output: Path = typer.Option(..., "--out", "-o", help="Folder for the student (student.pt/.json, split.csv, report.json). Re-running resumes."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Data set (see `edgeskin split --help`). Default: $EDGESKIN_DATA."),
    split_file: Optional[Path] = typer.Option(None, "--split", help="Split file. Default: the teacher's split.csv."),
    images: Optional[List[Path]] = typer.Option(None, "--images", help="Image folder(s), if not next to the metadata."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip (and report) bad rows and images."),
    settings: dict = None,  # type: ignore[assignment]  (the options of edgeskin.settings, filled in by command_options)
) -> None:
    """Distil an ensemble (mean of its members' softmax) into one student network.

    Loss: alpha · T² · KL(teacher_T ‖ student_T) + (1 − alpha) · hard-label loss. The student is
    trained by the same loop as `edgeskin train` (warm-up + cosine, early stopping on validation
    balanced accuracy, resume, torchrun), then compared with the teacher on the test split.
    """
    from ..data import read_split
    from ..train import distill as run_distill

    v = build.values((build.training(), build.student()), settings, build.CLI)
    cfg = build.distill_config(settings)
    build.apply_threads(settings)
    compute = compute_for(settings)
    rank = compute.rank
    ds = load_data(data, images, skip_bad)
    s = read_split(split_for(split_file, teacher))
    if rank == 0:
        err.print(f"distilling {teacher} into {cfg.train.arch} (T={cfg.temperature}, alpha={cfg.alpha}, hard loss "
                  f"{cfg.train.loss}, ≤{cfg.train.epochs} epochs, augmentation {'on' if v['augment'] else 'off'})")
    res = run_distill(teacher, cfg, dataset=ds, split=s, out_dir=output,
                      report_split=None if v["report_on"] == "none" else v["report_on"],
                      latency_runs=int(v["latency_runs"]), latency_threads=v["latency_threads"],
                      reporter=reporter(quiet=rank != 0), skip_bad=skip_bad, compute=compute)
    if rank != 0:
        return
    out.print(f"student: {res.checkpoint} (best epoch {res.best_epoch}, val balanced {pct(res.best_score)}%"
              + (", already trained" if res.skipped else "") + ")")
    if res.report:
        out.print(distill_table(res.report))


@app.command()
@command_options(build.qat_single())
def qat(
    checkpoint: Path = typer.Argument(..., help="One checkpoint's .json: an ensemble member (OUT/member0.json) or a distilled student (OUT/student.json)."),
    teacher: Optional[Path] = typer.Option(None, "--teacher", help="--objective distill: an ensemble to learn from (as in distill). Default: the checkpoint's own float model."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Data set (see `edgeskin split --help`). Default: $EDGESKIN_DATA."),
    split_file: Optional[Path] = typer.Option(None, "--split", help="Split file. Default: the checkpoint folder's split.csv."),
    images: Optional[List[Path]] = typer.Option(None, "--images", help="Image folder(s), if not next to the metadata."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip (and report) bad rows and images."),
    settings: dict = None,  # type: ignore[assignment]  (the options of edgeskin.settings, filled in by command_options)
) -> None:
    """Fine-tune one checkpoint quantization-aware for a compile target, before `edgeskin compile`.

    The same epochs as `distill --qat-epochs`, for a model that is already trained: its INT8 form
    for --target is trained (NNCF; tflite: torchao PT2E) on the split's training images, matching
    the checkpoint's own float logits (or, with --objective distill, learning from --teacher). The
    checkpoint's weights stay as they are; the INT8 form goes beside it (NAME.qat-TARGET.onnx, for
    tflite NAME.qat-tflite.pt2, recorded in NAME.json), and compile for that target uses it.
    """
    from ..data import read_split
    from ..train import qat_checkpoint

    cfg = build.distill_config(settings)  # of it: the qat settings, the loss and the batches' settings
    if teacher is not None and cfg.qat.objective == "match":
        raise ConfigError(f"--teacher {teacher}: the match objective learns the checkpoint's own float logits "
                          "and uses no teacher", "drop --teacher, or pass --objective distill to learn from it")
    build.apply_threads(settings)
    compute = compute_for(settings)
    ds = load_data(data, images, skip_bad)
    s = read_split(split_for(split_file, checkpoint))
    err.print(f"quantization-aware fine-tuning of {checkpoint} for {cfg.qat.target}: {cfg.qat.epochs} epoch(s), "
              f"lr {cfg.qat.learning_rate:g}, "
              + (f"teacher {teacher or 'itself'}" if cfg.qat.objective == "distill" else "matching its own float logits"))
    rec = qat_checkpoint(checkpoint, cfg, dataset=ds, split=s, teacher_path=teacher, reporter=reporter(),
                         skip_bad=skip_bad, compute=compute)
    from ..train.qat import qat_artefact_key

    entry = rec.get(qat_artefact_key(cfg.qat.target))
    form = checkpoint.with_name(entry["file"]) if entry else None
    line = f"INT8 graph for {cfg.qat.target}: {form}"
    if "val_agreement_after" in rec:
        line += (f" (simulated top-1 agreement with the float model on validation: "
                 f"{100 * rec['val_agreement_before']:.2f}% before, {100 * rec['val_agreement_after']:.2f}% after)")
    out.print(line)


@app.command()
def evaluate(
    model: Path = typer.Argument(..., help="Ensemble folder (or one member's .json)."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Data set. Default: $EDGESKIN_DATA."),
    split_file: Optional[Path] = typer.Option(None, "--split", help="Split file. Default: MODEL/split.csv."),
    on: str = typer.Option("test", "--on", help="Which split: train | val | test."),
    images: Optional[List[Path]] = typer.Option(None, "--images", help="Image folder(s), if not next to the metadata."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the metrics as JSON here."),
    batch_size: int = typer.Option(64, min=1, help="Inference batch size."),
    device: str = typer.Option("auto", "--device", "--compute-device", help=build.DEVICE_HELP + " Inference is fp32."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip (and report) bad rows and images."),
) -> None:
    """Evaluate a model or ensemble: top-1/2/3, balanced accuracy, per-class metrics and more.

    Also the confusion matrix, melanoma sensitivity/specificity and the calibration error.
    """
    from ..data import read_split
    from ..evaluate import evaluate as run_eval
    from ..fileio import write_json

    ds = load_data(data, images, skip_bad)
    s = read_split(split_for(split_file, model))
    ev = run_eval(model, dataset=ds, split=s, split_name=on, batch_size=batch_size,
                  reporter=reporter(), skip_bad=skip_bad, device=compute_for({"compute_device": device}, training=False))
    for t in metrics_tables(ev.reports, f"{model} on the {on} split ({len(ev.image_ids)} images)"):
        out.print(t)
    if json_out is not None:
        write_json(json_out, ev.to_dict())
        out.print(f"wrote {json_out}")


