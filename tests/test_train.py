"""Training: a tiny end-to-end run, resume after an interruption, and DistributedDataParallel."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeskin.data import load_dataset, make_split
from edgeskin.errors import CheckpointError
from edgeskin.models import load_ensemble
from edgeskin.progress import NullReporter
from edgeskin.train import TrainConfig, train_ensemble

TINY = dict(arch="resnet18", size=32, epochs=2, batch_size=8, steps_per_epoch=2, pretrained=None,
            bf16="off", patience=None)


class InterruptAt(NullReporter):
    """Simulates Ctrl-C when the named epoch starts."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def start(self, description, total):
        if self.marker in description:
            raise KeyboardInterrupt


def test_tiny_ensemble_trains_and_loads(tiny_ham, tmp_path):
    ds = load_dataset(tiny_ham)
    split = make_split(ds, seed=0)
    out = tmp_path / "ens"
    results = train_ensemble(TrainConfig(**TINY), dataset=ds, split=split, out_dir=out, members=2)
    assert [r.checkpoint.name for r in results] == ["member0.json", "member1.json"]
    meta = [json.loads(r.checkpoint.read_text()) for r in results]
    assert [m["recipe"]["loss"] for m in meta] == ["wce", "focal"]
    assert [m["recipe"]["config"]["seed"] for m in meta] == [0, 1]
    assert all(m["complete"] for m in meta)
    assert meta[0]["recipe"]["initialisation"] == "random"
    assert len(meta[0]["recipe"]["history"]) == 2
    assert meta[0]["recipe"]["split_sha256"] == split.sha256()
    assert set(meta[0]["metrics"]["val"]) >= {"top1", "balanced_accuracy"}
    assert not list(out.glob("*.state.pt")), "resume state must be removed once a member is done"
    members = load_ensemble(out)
    assert len(members) == 2 and members[0].preprocess.size == 32
    # Re-running skips finished members.
    again = train_ensemble(TrainConfig(**TINY), dataset=ds, split=split, out_dir=out, members=2)
    assert all(r.skipped for r in again)


def test_interrupted_training_resumes(tiny_ham, tmp_path):
    ds = load_dataset(tiny_ham)
    split = make_split(ds, seed=0)
    out = tmp_path / "ens"
    cfg = TrainConfig(**TINY)
    with pytest.raises(KeyboardInterrupt):
        train_ensemble(cfg, dataset=ds, split=split, out_dir=out, members=1, reporter=InterruptAt("epoch 2/"))
    assert (out / "member0.state.pt").is_file()
    assert not json.loads((out / "member0.json").read_text())["complete"]
    # A different recipe must not silently continue this run.
    with pytest.raises(CheckpointError, match="different settings"):
        train_ensemble(cfg.with_(lr=0.5), dataset=ds, split=split, out_dir=out, members=1)
    [r] = train_ensemble(cfg, dataset=ds, split=split, out_dir=out, members=1)
    assert r.resumed_from == 1
    assert [h["epoch"] for h in r.history] == [1, 2]
    assert json.loads((out / "member0.json").read_text())["complete"]
    assert not (out / "member0.state.pt").exists()
    with pytest.raises(CheckpointError, match="different settings"):
        train_ensemble(cfg.with_(lr=0.5), dataset=ds, split=split, out_dir=out, members=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, data: str, out: str, pretrained: str | None = None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ds = load_dataset(data)
        split = make_split(ds, seed=0)
        cfg = TrainConfig(**{**TINY, "epochs": 1, "steps_per_epoch": 2, "batch_size": 4})
        if pretrained:  # the published setup: a frozen warm-up epoch, then the last stages unfreeze
            cfg = cfg.with_(pretrained=pretrained, freeze_epochs=1, epochs=2, finetune_stages="auto")
        [r] = train_ensemble(cfg, dataset=ds, split=split, out_dir=out, members=1)
        # Each process saw other images; DDP's gradient all-reduce must keep their weights equal.
        vec = torch.cat([p.detach().flatten() for p in r.model.parameters()])
        np.save(Path(out) / f"rank{rank}.npy", vec.numpy())
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_gloo(tiny_ham, tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "ddp"
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tiny_ham), str(out)), nprocs=2, join=True)
    meta = json.loads((out / "member0.json").read_text())
    assert meta["recipe"]["world_size"] == 2
    assert meta["complete"]
    w0, w1 = np.load(out / "rank0.npy"), np.load(out / "rank1.npy")
    assert np.array_equal(w0, w1), "weights diverged across processes: gradients were not synchronised"
    # ...and training really changed them (the step ran).
    torch.manual_seed(0)
    from edgeskin.models import build_model

    init, _ = build_model("resnet18", 7, pretrained=None)
    w_init = torch.cat([p.detach().flatten() for p in init.parameters()]).numpy()
    assert w0.shape == w_init.shape and not np.allclose(w0, w_init)


def test_early_stopping_stops_after_patience(tiny_ham, tmp_path):
    ds = load_dataset(tiny_ham)
    split = make_split(ds, seed=0)
    # lr 0: the validation score never improves after epoch 1, so patience 1 stops after epoch 2.
    cfg = TrainConfig(**{**TINY, "epochs": 5, "lr": 0.0, "patience": 1})
    [r] = train_ensemble(cfg, dataset=ds, split=split, out_dir=tmp_path / "es", members=1)
    assert [h["epoch"] for h in r.history] == [1, 2]
    assert r.best_epoch == 1


def test_binary_labels_and_frozen_warmup_from_pretrained_file(tiny_ham, tmp_path):
    import torchvision

    from edgeskin.evaluate import evaluate

    torch.manual_seed(5)
    imagenet = torchvision.models.resnet18(weights=None)
    weights = tmp_path / "imagenet_r18.pth"
    torch.save(imagenet.state_dict(), weights)
    ds = load_dataset(tiny_ham)
    split = make_split(ds, seed=0)
    cfg = TrainConfig(**{**TINY, "labels": "binary", "pretrained": str(weights), "freeze_epochs": 1,
                         "finetune_stages": "1", "epochs": 2})
    [r] = train_ensemble(cfg, dataset=ds, split=split, out_dir=tmp_path / "bin", members=1)
    meta = json.loads(r.checkpoint.read_text())
    assert meta["labels"]["codes"] == ["benign", "malignant"] and meta["num_classes"] == 2
    assert meta["recipe"]["initialisation"] == "imagenet:imagenet_r18.pth"
    assert meta["recipe"]["freeze_epochs"] == 1 and meta["recipe"]["finetune_stages"] == 1
    trained = r.model
    # The stem never trains (frozen, then outside the last stage); layer4 does after the warm-up.
    assert torch.equal(trained.conv1.weight, imagenet.conv1.weight)
    assert torch.equal(trained.layer3[0].conv1.weight, imagenet.layer3[0].conv1.weight)
    assert not torch.equal(trained.layer4[0].conv1.weight, imagenet.layer4[0].conv1.weight)
    ev = evaluate(tmp_path / "bin", dataset=ds, split=split, split_name="test")
    rep = ev.reports["member0"]
    assert rep["class_order"] == ["benign", "malignant"] and "malignant_sensitivity" in rep
    assert len(rep["confusion_matrix"]) == 2


@pytest.mark.slow
def test_ddp_frozen_warmup_then_unfrozen_stages_stay_in_sync(tiny_ham, tmp_path):
    """DDP registers only the parameters that require gradients when it is built. Built during the
    frozen warm-up, it would never all-reduce the stages unfrozen later, and the ranks would drift
    apart. The wrapper is rebuilt at the unfreeze, so every parameter ends equal on both ranks."""
    import torch.multiprocessing as mp
    import torchvision

    torch.manual_seed(11)
    weights = tmp_path / "imagenet_r18.pth"
    start = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(start, weights)  # random weights standing in for an ImageNet file
    out = tmp_path / "ddp-frozen"
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tiny_ham), str(out), str(weights)), nprocs=2, join=True)
    meta = json.loads((out / "member0.json").read_text())
    assert meta["recipe"]["freeze_epochs"] == 1 and meta["recipe"]["finetune_stages"] == 2
    assert meta["recipe"]["initial_weights_sha256"] is not None
    w0, w1 = np.load(out / "rank0.npy"), np.load(out / "rank1.npy")
    assert np.array_equal(w0, w1), "ranks drifted apart: the stages unfrozen after the warm-up were not all-reduced"
    from edgeskin.models import build_model

    model, _ = build_model("resnet18", 7, pretrained=None)
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    final = dict(zip(names, np.split(w0, np.cumsum(sizes)[:-1])))
    changed = [n for n in names if n in start and not np.array_equal(final[n], start[n].flatten().numpy())]
    assert any(n.startswith("layer4.") for n in changed) and any(n.startswith("layer3.") for n in changed)
    assert not any(n.startswith(("conv1.", "layer1.", "layer2.")) for n in changed)  # never unfrozen


def test_resume_in_another_precision_is_refused(tiny_ham, tmp_path):
    ds = load_dataset(tiny_ham)
    split = make_split(ds, seed=0)
    cfg = TrainConfig(**{**TINY, "epochs": 3})
    with pytest.raises(KeyboardInterrupt):
        train_ensemble(cfg, dataset=ds, split=split, out_dir=tmp_path / "p", members=1,
                       reporter=InterruptAt("epoch 2/3"))
    state = tmp_path / "p" / "member0.state.pt"
    blob = torch.load(state, weights_only=False)
    assert blob["precision"] == "fp32"
    blob["precision"] = "bf16"  # as if the first epoch had run under bf16 autocast
    torch.save(blob, state)
    with pytest.raises(CheckpointError, match="started in bf16 and would resume in fp32"):
        train_ensemble(cfg, dataset=ds, split=split, out_dir=tmp_path / "p", members=1)


def test_cuda_out_of_memory_becomes_a_clear_error(tiny_ham, tmp_path):
    """The loop's handler turns torch's CUDA OOM exception into an error with a hint (raised here
    by the criterion, since this machine has no GPU to exhaust)."""
    from edgeskin.errors import EdgeskinError
    from edgeskin.labels import get_label_set
    from edgeskin.models import build_model
    from edgeskin.train import fit

    def criterion(logits, x, y, idx):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    cfg = TrainConfig(**TINY)
    model, _ = build_model("resnet18", 7, pretrained=None)
    arrays = [np.zeros((40, 40, 3), np.uint8)] * 8
    with pytest.raises(EdgeskinError) as info:
        fit(model, cfg=cfg, labels=get_label_set("ham10000"), train_arrays=arrays, train_targets=np.zeros(8, np.int64),
            val_inputs=np.zeros((2, 3, 32, 32), np.float32), val_targets=np.zeros(2, np.int64), criterion=criterion,
            out=tmp_path / "m", pretrained_source=None, recipe={})
    assert "ran out of memory" in info.value.message and "--batch-size 4" in info.value.hint
    assert "--device cpu" in info.value.hint


def test_checkpoint_records_device_and_resolved_precision_and_loads_without_cuda(tiny_ham, tmp_path):
    """The checkpoint says where and in which precision it trained (never the unresolved "auto"), and
    loads and evaluates in a process where CUDA is hidden (weights are saved mapped to the CPU)."""
    import subprocess
    import sys

    ds = load_dataset(tiny_ham)
    split = make_split(ds, seed=0)
    cfg = TrainConfig(**{**TINY, "bf16": "auto", "channels_last": True})
    [r] = train_ensemble(cfg, dataset=ds, split=split, out_dir=tmp_path / "c", members=1)
    meta = json.loads(r.checkpoint.read_text())
    comp = meta["recipe"]["compute"]
    assert comp["device"] == "cpu" and comp["precision"] in ("bf16", "fp32")
    code = ("import torch, sys; from edgeskin.evaluate import evaluate; from edgeskin.data import load_dataset, "
            "make_split; assert not torch.cuda.is_available(); ds = load_dataset(sys.argv[1]); "
            "ev = evaluate(sys.argv[2], dataset=ds, split=make_split(ds, seed=0), split_name='val'); "
            "print(ev.reports['member0']['n'])")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run([sys.executable, "-c", code, str(tiny_ham), str(tmp_path / "c")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert int(res.stdout.strip().splitlines()[-1]) > 0


@pytest.mark.gpu
def test_train_on_cuda_then_load_and_evaluate_on_the_cpu(tiny_ham, tmp_path):
    from edgeskin.evaluate import evaluate
    from edgeskin.models.compute import resolve_compute

    ds = load_dataset(tiny_ham)
    split = make_split(ds, seed=0)
    compute = resolve_compute("cuda")
    cfg = TrainConfig(**{**TINY, "bf16": "auto"})
    [r] = train_ensemble(cfg, dataset=ds, split=split, out_dir=tmp_path / "g", members=1, compute=compute)
    meta = json.loads(r.checkpoint.read_text())
    assert meta["recipe"]["compute"]["device"] == "cuda"
    assert meta["recipe"]["compute"]["precision"] in ("bf16", "fp16")
    [m] = load_ensemble(tmp_path / "g")
    assert next(m.model.parameters()).device.type == "cpu"
    on_cpu = evaluate(tmp_path / "g", dataset=ds, split=split, split_name="val").probs["member0"]
    on_gpu = evaluate(tmp_path / "g", dataset=ds, split=split, split_name="val", device=compute).probs["member0"]
    np.testing.assert_allclose(on_cpu, on_gpu, atol=2e-3)


@pytest.mark.slow
def test_gpu_train_benchmark_runs_on_the_cpu(tiny_ham, tmp_path):
    """benchmarks/gpu_train.py measures every row with --device cpu on a tiny set."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "gpu_train"
    r = subprocess.run([sys.executable, str(repo / "benchmarks" / "gpu_train.py"), "--data", str(tiny_ham),
                        "--device", "cpu", "--size", "32", "--epochs", "2", "--arch", "resnet18",
                        "--teacher-arch", "resnet18", "--students", "resnet18", "--batch", "8", "--workers", "0",
                        "--synthetic-batch", "8", "--synthetic-steps", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(out.with_suffix(".json").read_text())
    rows = {row["row"].split(" (")[0].split(",")[0]: row for row in result["rows"]}
    assert set(rows) == {"edgeskin train", "plain loop", "model alone", "edgeskin distill"}
    assert all(row["images_per_s"] > 0 for row in result["rows"])
    assert result["machine"]["gpu"] is None and "| edgeskin train" in out.with_suffix(".md").read_text()


def test_an_empty_or_too_small_validation_split_is_refused_before_training(tiny_ham, tmp_path):
    from edgeskin.errors import ConfigError

    ds = load_dataset(tiny_ham)
    split = make_split(ds, seed=0, fractions=(0.8, 0.0, 0.2))
    with pytest.raises(ConfigError, match="validation split has 0 image"):
        train_ensemble(TrainConfig(**TINY), dataset=ds, split=split, out_dir=tmp_path / "nv", members=1)
    assert not any((tmp_path / "nv").glob("member0*"))  # nothing trained, nothing written


def test_an_interrupted_checkpoint_write_is_repaired_on_resume(tiny_ham, tmp_path):
    """The weights and the JSON of the best checkpoint are two files. Interrupted between them, the
    JSON's sha256 no longer matches its weights; on resume the next epoch writes both again (here lr 0,
    so no later epoch would otherwise count as better and rewrite them)."""
    from edgeskin.models import load_checkpoint

    ds = load_dataset(tiny_ham)
    split = make_split(ds, seed=0)
    cfg = TrainConfig(**{**TINY, "epochs": 3, "lr": 0.0})
    with pytest.raises(KeyboardInterrupt):
        train_ensemble(cfg, dataset=ds, split=split, out_dir=tmp_path / "ck", members=1,
                       reporter=InterruptAt("epoch 2/3"))
    weights = tmp_path / "ck" / "member0.pt"
    state = torch.load(weights, weights_only=True)
    state["fc.1.bias"] = state["fc.1.bias"] + 1.0  # as if a newer best had been written, and not its JSON
    torch.save(state, weights)
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(tmp_path / "ck" / "member0.json")
    [r] = train_ensemble(cfg, dataset=ds, split=split, out_dir=tmp_path / "ck", members=1)
    assert r.best_epoch == 2  # the first epoch after the repair
    load_checkpoint(tmp_path / "ck" / "member0.json")  # consistent again
