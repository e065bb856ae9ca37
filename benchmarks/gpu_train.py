"""Training and distillation throughput, edgeskin against a plain PyTorch loop and the GPU alone.

Rows (images per second, steady-state epochs, end to end including data loading; start-up,
i.e. decoding, cache building, worker start and the first epoch, is reported apart):

- ``edgeskin train``: :func:`edgeskin.train.loop.fit`, as ``edgeskin train`` runs it (the batches
  of :mod:`edgeskin.train.batches`, mixed precision, channels_last). Validation is excluded.
- ``plain loop``: torchvision's model, a ``DataLoader`` whose workers decode the JPEGs and augment
  with torchvision v2 transforms, the same autocast precision and channels_last, batch as given.
- ``GPU alone``: the same model and precision on synthetic batches already on the device.
- ``edgeskin distill``: :func:`edgeskin.train.distill.distill` with a 3-member ResNet50 teacher
  (random weights; the speed does not depend on them) run online on every augmented view, into a
  ResNet18 and a ResNet50 student.

    python benchmarks/gpu_train.py --data ../shared/data/ham10000 --device cuda      # the GPU table
    python benchmarks/gpu_train.py --data ../shared/data/ham10000 --device cpu --size 64 --limit 96 \\
        --epochs 2 --arch resnet18 --teacher-arch resnet18 --batch 16 --workers 1      # a CPU smoke run

Writes ``benchmarks/results/gpu_train.md`` and ``.json`` (``--out`` to change), with the
machine, versions and every setting. A GPU number is only ever written from a run on a GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edgeskin.data import decode_with_progress, labels_of, load_dataset, load_eval_set, make_split  # noqa: E402
from edgeskin.labels import get_label_set  # noqa: E402
from edgeskin.models import build_model, save_checkpoint  # noqa: E402
from edgeskin.models.compute import Compute, resolve_compute  # noqa: E402
from edgeskin.progress import NullReporter  # noqa: E402
from edgeskin.train import DistillConfig, TrainConfig, distill, fit  # noqa: E402
from edgeskin.train.losses import make_loss  # noqa: E402


def _sync(compute: Compute) -> None:
    if compute.is_cuda:
        torch.cuda.synchronize(compute.device)


class EpochTimer(NullReporter):
    """Times each training epoch (the loop's progress bar named "... epoch k/n"), GPU-synchronised."""

    def __init__(self, compute: Compute) -> None:
        self.compute, self.epochs, self._t0, self._images = compute, [], None, 0

    def start(self, description: str, total: int | None) -> None:
        if " epoch " in description:
            _sync(self.compute)
            self._t0, self._steps = time.perf_counter(), 0

    def advance(self, n: int = 1) -> None:
        if self._t0 is not None:
            self._steps += n

    def stop(self) -> None:
        if self._t0 is not None:
            _sync(self.compute)
            self.epochs.append((time.perf_counter() - self._t0, self._steps))
            self._t0 = None


def steady_rate(epochs: list[tuple[float, int]], batch: int, n_images: int) -> tuple[float, float]:
    """(images/s over the epochs after the first, seconds of the first epoch)."""
    if len(epochs) < 2:
        raise SystemExit("need at least 2 epochs (the first is start-up)")
    rest = epochs[1:]
    images = sum(min(steps * batch, n_images) for _, steps in rest)
    return images / sum(t for t, _ in rest), epochs[0][0]


def row_edgeskin_train(args, compute, arrays, targets, val_x, val_y, labels) -> dict[str, Any]:
    t0 = time.perf_counter()
    cfg = TrainConfig(arch=args.arch, size=args.size, epochs=args.epochs, batch_size=args.batch, pretrained=None,
                      patience=None, bf16=args.bf16, eval_batch_size=args.batch)
    model, _ = build_model(args.arch, labels.num_classes, pretrained=None)
    loss = make_loss("ce", None).to(compute.device)
    timer = EpochTimer(compute)
    with tempfile.TemporaryDirectory() as tmp:
        setup = time.perf_counter() - t0
        fit(model, cfg=cfg, labels=labels, train_arrays=arrays, train_targets=targets, val_inputs=val_x[:args.batch],
            val_targets=val_y[:args.batch], criterion=lambda lg, x, y, i: loss(lg, y), out=Path(tmp) / "m",
            pretrained_source=None, recipe={}, reporter=timer, compute=compute)
    rate, first = steady_rate(timer.epochs, args.batch, len(arrays))
    return {"row": f"edgeskin train ({args.arch})", "images_per_s": rate, "first_epoch_s": first,
            "setup_s": setup, "epochs": len(timer.epochs)}


def _plain_step(model, opt, scaler, compute: Compute, x: torch.Tensor, y: torch.Tensor) -> None:
    """One training step of the plain loop: autocast forward, cross-entropy, scaled backward, step."""
    with compute.autocast():
        out = model(x)
    loss = torch.nn.functional.cross_entropy(out.float(), y)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


def row_plain(args, compute, paths, targets) -> dict[str, Any]:
    import torchvision
    from torchvision.transforms import v2
    from PIL import Image

    resize = int(round(args.size / 0.875))
    tf = v2.Compose([v2.PILToTensor(), v2.Resize(resize, antialias=True),
                     v2.RandomResizedCrop(args.size, scale=(0.6, 1.0), antialias=True),
                     v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(),
                     v2.ColorJitter(0.1, 0.1, 0.1), v2.ToDtype(torch.float32, scale=True),
                     v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])

    class Images(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(paths)

        def __getitem__(self, i: int):
            with Image.open(paths[i]) as im:
                return tf(im.convert("RGB")), int(targets[i])

    t0 = time.perf_counter()
    loader = torch.utils.data.DataLoader(
        Images(), batch_size=args.batch, shuffle=True, drop_last=True, num_workers=args.workers,
        pin_memory=compute.is_cuda, persistent_workers=args.workers > 0,
        prefetch_factor=4 if args.workers > 0 else None)
    model = torchvision.models.get_model(args.arch, weights=None, num_classes=7).to(compute.device)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = compute.grad_scaler()
    epochs = []
    setup = time.perf_counter() - t0
    for _ in range(args.epochs):
        _sync(compute)
        t = time.perf_counter()
        steps = 0
        for x, y in loader:
            x = x.to(compute.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            _plain_step(model, opt, scaler, compute, x, y.to(compute.device, non_blocking=True))
            steps += 1
        _sync(compute)
        epochs.append((time.perf_counter() - t, steps))
    rate, first = steady_rate(epochs, args.batch, len(paths))
    return {"row": f"plain loop ({args.arch}, DataLoader, {args.workers} workers)", "images_per_s": rate,
            "first_epoch_s": first, "setup_s": setup, "epochs": len(epochs)}


def row_gpu_alone(args, compute) -> dict[str, Any]:
    import torchvision

    model = torchvision.models.get_model(args.arch, weights=None, num_classes=7).to(compute.device)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = compute.grad_scaler()
    x = torch.randn(args.synthetic_batch, 3, args.size, args.size, device=compute.device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 7, (args.synthetic_batch,), device=compute.device)
    times = []
    for i in range(args.synthetic_steps + 3):
        _sync(compute)
        t = time.perf_counter()
        _plain_step(model, opt, scaler, compute, x, y)
        _sync(compute)
        if i >= 3:
            times.append(time.perf_counter() - t)
    return {"row": f"model alone, synthetic batches of {args.synthetic_batch} ({args.arch})",
            "images_per_s": args.synthetic_batch / float(np.median(times)), "first_epoch_s": None,
            "setup_s": None, "epochs": None}


def row_distill(args, compute, dataset, split, student: str) -> dict[str, Any]:
    labels = get_label_set("ham10000")
    from edgeskin.preprocess import PreprocessConfig

    pre = PreprocessConfig(size=args.size)
    with tempfile.TemporaryDirectory() as tmp:
        teacher = Path(tmp) / "teacher"
        for i in range(3):
            torch.manual_seed(i)
            m, _ = build_model(args.teacher_arch, labels.num_classes, pretrained=None)
            save_checkpoint(m, teacher / f"member{i}", arch=args.teacher_arch, labels=labels, preprocess=pre,
                            dropout=0.3)
        cfg = DistillConfig(train=TrainConfig(arch=student, size=args.size, epochs=args.epochs, batch_size=args.batch,
                                              pretrained=None, patience=None, bf16=args.bf16,
                                              eval_batch_size=args.batch), init="scratch")
        timer = EpochTimer(compute)
        distill(teacher, cfg, dataset=dataset, split=split, out_dir=Path(tmp) / "out", report_split=None,
                latency_runs=0, reporter=timer, compute=compute)
    n = len(split.apply(dataset, "train").samples)
    rate, first = steady_rate(timer.epochs, args.batch, n)
    return {"row": f"edgeskin distill, 3 x {args.teacher_arch} teacher online -> {student}", "images_per_s": rate,
            "first_epoch_s": first, "setup_s": None, "epochs": len(timer.epochs)}


def render(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Training throughput: edgeskin against a plain loop and the model alone",
        "",
        f"Measured {result['date']} on {m['device']} ({m['cpu_count']} CPU cores), torch {m['torch']}, "
        f"{result['settings']['images']} training images of `{result['settings']['data']}` at "
        f"{result['settings']['size']} px, batch {result['settings']['batch']}, {result['precision']} autocast, "
        "channels_last. Images per second over the epochs after the first (end to end, data loading "
        "included); the first epoch and the set-up are start-up, reported apart.",
        "",
        f"Command: `{result['command']}`",
        "",
        "| row | images/s | first epoch (s) | set-up (s) | share of the model alone |",
        "|---|---|---|---|---|",
    ]
    alone = next((r["images_per_s"] for r in result["rows"] if r["row"].startswith("model alone")), None)
    for r in result["rows"]:
        share = f"{100 * r['images_per_s'] / alone:.0f} %" if alone else "-"
        first = "-" if r["first_epoch_s"] is None else f"{r['first_epoch_s']:.1f}"
        setup = "-" if r["setup_s"] is None else f"{r['setup_s']:.1f}"
        lines.append(f"| {r['row']} | {r['images_per_s']:,.0f} | {first} | {setup} | {share} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--teacher-arch", default="resnet50")
    ap.add_argument("--students", default="resnet18,resnet50")
    ap.add_argument("--workers", type=int, default=14)
    ap.add_argument("--bf16", default="auto")
    ap.add_argument("--limit", type=int, default=None, help="Use only this many images (a smoke run).")
    ap.add_argument("--synthetic-batch", type=int, default=128)
    ap.add_argument("--synthetic-steps", type=int, default=20)
    ap.add_argument("--rows", default="train,plain,alone,distill")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu_train")
    args = ap.parse_args()

    compute = resolve_compute(args.device, bf16=args.bf16)
    torch.manual_seed(0)
    ds = load_dataset(args.data)
    if args.limit:
        ds = ds.subset([s.image_id for s in ds.samples[: args.limit]])
    split = make_split(ds, seed=0)
    labels = get_label_set("ham10000")
    from edgeskin.preprocess import PreprocessConfig

    pre = PreprocessConfig(size=args.size)
    train_set = split.apply(ds, "train")
    rows = []
    wanted = set(args.rows.split(","))
    if "train" in wanted:
        t0 = time.perf_counter()
        kept, arrays = decode_with_progress(train_set, pre, what="training")
        _, val_x, val_y = load_eval_set(split.apply(ds, "val"), pre, labels, what="validation")
        decode_s = time.perf_counter() - t0
        r = row_edgeskin_train(args, compute, arrays, labels_of(kept, labels), val_x, val_y, labels)
        r["setup_s"] = (r["setup_s"] or 0) + decode_s
        rows.append(r)
        print(r, flush=True)
    if "plain" in wanted:
        targets = labels_of(train_set, labels)
        rows.append(row_plain(args, compute, [s.path for s in train_set.samples], targets))
        print(rows[-1], flush=True)
    if "alone" in wanted:
        rows.append(row_gpu_alone(args, compute))
        print(rows[-1], flush=True)
    if "distill" in wanted:
        for student in args.students.split(","):
            rows.append(row_distill(args, compute, ds, split, student))
            print(rows[-1], flush=True)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", "benchmarks/gpu_train.py"] + sys.argv[1:]),
        "machine": {"device": compute.describe(), "cpu_count": __import__("os").cpu_count(),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "gpu": torch.cuda.get_device_name(compute.device) if compute.is_cuda else None},
        "precision": compute.precision,
        "settings": {"data": str(args.data), "images": len(train_set.samples), "size": args.size,
                     "batch": args.batch, "epochs": args.epochs, "workers": args.workers, "arch": args.arch},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
