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


def _ddp_worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ds = load_dataset(data)
        split = make_split(ds, seed=0)
        cfg = TrainConfig(**{**TINY, "epochs": 1, "steps_per_epoch": 2, "batch_size": 4})
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
