"""Distillation: the loss, the frozen teacher, the teacher cache, and a tiny end-to-end run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from _bundles import build_model_dir, run_cli
from edgeskin.errors import ConfigError
from edgeskin.models import load_ensemble
from edgeskin.preprocess import PreprocessConfig
from edgeskin.train import DistillConfig, TrainConfig, distill, distillation_loss
from edgeskin.train.distill import Teacher, cached_teacher_probs, teacher_cache_key
from edgeskin.train.losses import make_loss


def _teacher_dir(tmp_path, seeds=(0, 1)):
    d = tmp_path / "teacher"
    for i, s in enumerate(seeds):
        build_model_dir(d, seed=s, name=f"member{i}")
    return d


def _tiny_cfg(**kw) -> DistillConfig:
    t = TrainConfig(arch="resnet18", size=32, epochs=1, batch_size=8, steps_per_epoch=2, pretrained=None,
                    bf16="off", eval_batch_size=16)
    return DistillConfig(train=t, **kw)


# ---------------------------------------------------------------- the loss

def test_distillation_loss_zero_at_teacher_and_grows_with_distance():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 7, generator=g) * 2
    teacher = torch.softmax(logits, 1)
    y = torch.randint(0, 7, (6,), generator=g)
    hard = make_loss("ce", None)
    same = distillation_loss(logits, teacher, y, hard, temperature=3.0, alpha=1.0)
    assert same.abs() < 1e-5
    # a constant shift of the logits leaves the distribution (and the loss) unchanged
    assert distillation_loss(logits + 5.0, teacher, y, hard, temperature=3.0, alpha=1.0).abs() < 1e-5
    noise = torch.randn(6, 7, generator=g)
    near = distillation_loss(logits + 0.3 * noise, teacher, y, hard, temperature=3.0, alpha=1.0)
    far = distillation_loss(logits + 2.0 * noise, teacher, y, hard, temperature=3.0, alpha=1.0)
    assert 0 < near < far


def test_distillation_loss_blends_soft_and_hard_terms_by_hand():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 2.0]])
    t_logits = torch.tensor([[0.0, 3.0, 1.0], [1.0, 0.0, 0.0]])
    y = torch.tensor([1, 2])
    T, alpha = 2.0, 0.25
    ps, pt = torch.softmax(s / T, 1), torch.softmax(t_logits / T, 1)
    soft = (pt * (pt.log() - ps.log())).sum(1).mean() * T * T
    hard = torch.nn.functional.cross_entropy(s, y)
    got = distillation_loss(s, torch.softmax(t_logits, 1), y, make_loss("ce", None), temperature=T, alpha=alpha)
    assert torch.allclose(got, alpha * soft + (1 - alpha) * hard, atol=1e-5)


def test_distill_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="temperature"):
        DistillConfig(temperature=0)
    with pytest.raises(ConfigError, match="alpha"):
        DistillConfig(alpha=1.5)
    with pytest.raises(ConfigError, match="init"):
        DistillConfig(init="teacher")


# ---------------------------------------------------------------- the teacher

def test_gradients_reach_the_student_and_never_the_teacher(tmp_path):
    teacher = Teacher(load_ensemble(_teacher_dir(tmp_path)))
    from edgeskin.models import build_model

    student, _ = build_model("resnet18", 7, pretrained=None)
    student.train()
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3])
    before = [p.detach().clone() for p in teacher.model.parameters()]
    loss = distillation_loss(student(x), teacher.probs(x), y, make_loss("ce", None), temperature=4.0, alpha=0.7)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())
    grads = [p.grad for p in student.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.model.parameters()))
    assert not teacher.model.training


def test_teacher_probs_are_the_mean_of_member_softmax(tmp_path):
    members = load_ensemble(_teacher_dir(tmp_path))
    teacher = Teacher(members)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = torch.stack([torch.softmax(m.model(x), 1) for m in members]).mean(0)
    assert torch.allclose(teacher.probs(x), expected, atol=1e-6)


def test_teacher_cache_hits_and_is_invalidated_by_teacher_data_or_preprocessing(tmp_path):
    pre = PreprocessConfig(size=32)
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (32, 40, 3), dtype=np.uint8) for _ in range(5)]
    teacher_a = Teacher(load_ensemble(_teacher_dir(tmp_path / "a", seeds=(0, 1))))
    teacher_b = Teacher(load_ensemble(_teacher_dir(tmp_path / "b", seeds=(2, 3))))
    cache = tmp_path / "cache"

    first = cached_teacher_probs(teacher_a, arrays, pre, cache)
    assert not first.hit and first.path.is_file() and first.probs.shape == (5, 7)
    again = cached_teacher_probs(teacher_a, arrays, pre, cache)
    assert again.hit and np.array_equal(again.probs, first.probs)

    other = cached_teacher_probs(teacher_b, arrays, pre, cache)
    assert not other.hit and other.key != first.key
    assert not np.allclose(other.probs, first.probs)

    changed = [a.copy() for a in arrays]
    changed[2][0, 0, 0] ^= 1
    assert teacher_cache_key(teacher_a, changed, pre) != first.key
    assert teacher_cache_key(teacher_a, arrays, PreprocessConfig(size=32, resize=36)) != first.key

    # a damaged cache file is recomputed, not trusted
    first.path.write_bytes(b"not an npz")
    fixed = cached_teacher_probs(teacher_a, arrays, pre, cache)
    assert not fixed.hit and np.allclose(fixed.probs, first.probs)


# ---------------------------------------------------------------- end to end

def test_tiny_distill_end_to_end_records_teacher_recipe_and_report(tiny_ham, tmp_path):
    from edgeskin.data import load_dataset, make_split, write_split

    teacher_dir = _teacher_dir(tmp_path)
    ds = load_dataset(tiny_ham)
    split = make_split(ds, seed=0)
    write_split(split, teacher_dir / "split.csv")
    out = tmp_path / "student"
    res = distill(teacher_dir, _tiny_cfg(init="scratch"), dataset=ds, split=split, out_dir=out, latency_runs=3)
    meta = json.loads(res.checkpoint.read_text())
    assert meta["complete"] and meta["arch"] == "resnet18"
    members = load_ensemble(teacher_dir)
    assert [m["sha256"] for m in meta["teacher"]["members"]] == [m.sha256 for m in members]
    rec = meta["recipe"]
    assert rec["kind"] == "distillation" and rec["temperature"] == 4.0 and rec["alpha"] == 0.7
    assert rec["initialisation"] == "random" and rec["teacher_view"].startswith("online")
    assert rec["split_sha256"] == split.sha256()
    assert "test" in meta["metrics"] and "val" in meta["metrics"]
    r = res.report
    assert r["n"] == len(split.ids("test")) and 0 <= r["top1_agreement"] <= 1
    for engine in ("torch", "onnxruntime"):  # both engines timed, teacher and student interleaved
        lat = r["latency"][engine]
        assert lat["teacher"]["p50_ms"] > 0 and lat["student"]["p50_ms"] > 0 and lat["teacher"]["runs"] == 3
        assert lat["student_over_teacher"] == pytest.approx(lat["student"]["p50_ms"] / lat["teacher"]["p50_ms"])
    assert json.loads((out / "report.json").read_text())["student_sha256"] == meta["sha256"]
    assert (out / "split.csv").is_file()

    # a second run finds the finished student and skips it; the skip path also puts the report's
    # metrics into the student's JSON when they are missing there (an interrupted merge)
    meta["metrics"].pop("test")
    meta["metrics"].pop("test_vs_teacher")
    res.checkpoint.write_text(json.dumps(meta))
    again = distill(teacher_dir, _tiny_cfg(init="scratch"), dataset=ds, split=split, out_dir=out, latency_runs=3)
    assert again.skipped and again.report == r
    merged = json.loads(res.checkpoint.read_text())["metrics"]
    assert merged["test"] == r["student"] and merged["test_vs_teacher"]["top1_agreement"] == r["top1_agreement"]

    # other settings in the same folder are refused rather than mixed
    with pytest.raises(Exception, match="different settings"):
        distill(teacher_dir, _tiny_cfg(init="scratch", temperature=2.0), dataset=ds, split=split, out_dir=out)


def test_member_init_copies_the_best_member_and_uses_the_teacher_cache(tiny_ham, tmp_path):
    from edgeskin.data import load_dataset, make_split

    teacher_dir = _teacher_dir(tmp_path)
    ds = load_dataset(tiny_ham)
    split = make_split(ds, seed=0)
    cfg = DistillConfig(train=_tiny_cfg().train.with_(augment=None, epochs=2, lr=3e-3), init="member", member="member1",
                        member_lr_factor=1 / 3)
    res = distill(teacher_dir, cfg, dataset=ds, split=split, out_dir=tmp_path / "s", report_split=None)
    meta = json.loads(res.checkpoint.read_text())
    m1 = [m for m in load_ensemble(teacher_dir) if m.name == "member1"][0]
    assert res.initialisation == f"member:member1:{m1.sha256}"
    assert meta["recipe"]["freeze_epochs"] == 0 and meta["recipe"]["finetune_stages"] == "all"
    assert meta["recipe"]["config"]["lr"] == pytest.approx(1e-3)  # a third: the member is already trained
    assert meta["recipe"]["teacher_view"] == "cached evaluation view"
    assert res.teacher_cache is not None and res.teacher_cache.endswith(".npz")
    assert res.report is None


def test_member_init_needs_a_member_of_the_student_architecture(tiny_ham, tmp_path):
    from edgeskin.data import load_dataset, make_split

    teacher_dir = _teacher_dir(tmp_path)
    ds = load_dataset(tiny_ham)
    cfg = DistillConfig(train=_tiny_cfg().train.with_(arch="mobilenet_v3_large"), init="member")
    with pytest.raises(ConfigError, match="architecture"):
        distill(teacher_dir, cfg, dataset=ds, split=make_split(ds, seed=0), out_dir=tmp_path / "s")


def test_distill_cli_writes_student_that_compiles(tiny_ham, tmp_path):
    from edgeskin.data import load_dataset, make_split, write_split

    teacher_dir = _teacher_dir(tmp_path)
    write_split(make_split(load_dataset(tiny_ham), seed=0), teacher_dir / "split.csv")
    out = tmp_path / "student"
    r = run_cli("distill", "--teacher", str(teacher_dir), "--student", "resnet18", "--data", str(tiny_ham),
                "--out", str(out), "--preset", "tiny", "--init", "scratch", "--latency-runs", "2",
                "--bf16", "off")
    assert r.returncode == 0, r.stderr
    assert "Student vs teacher" in r.stdout and "agreement" in r.stdout
    r = run_cli("compile", str(out), "--target", "cpu", "--precision", "fp32", "--data", str(tiny_ham),
                "--out", str(tmp_path / "s.edgeskin"), "--force")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "s.edgeskin" / "manifest.json").read_text())
    teacher = manifest["provenance"]["teacher"]
    assert teacher and len(teacher["members"]) == 2


def test_distill_cli_unknown_student_names_the_choices(tiny_ham, tmp_path):
    teacher_dir = _teacher_dir(tmp_path)
    r = run_cli("distill", "--teacher", str(teacher_dir), "--student", "resnet5", "--data", str(tiny_ham),
                "--out", str(tmp_path / "s"))
    assert r.returncode == 2
    assert "did you mean 'resnet50'" in r.stderr and "mobilenet_v3_large" in r.stderr
    assert not (tmp_path / "s").exists()


def test_distill_under_torchrun_two_processes_with_the_teacher_cache(tiny_ham, tmp_path):
    """DDP through the same loop as training; with augmentation off, rank 0 writes the teacher
    cache and the other rank reads it after the barrier."""
    import os
    import subprocess
    import sys

    from conftest import REPO
    from edgeskin.data import load_dataset, make_split, write_split

    teacher_dir = _teacher_dir(tmp_path)
    write_split(make_split(load_dataset(tiny_ham), seed=0), teacher_dir / "split.csv")
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "edgeskin", "distill", "--teacher", str(teacher_dir), "--student", "resnet18", "--data",
         str(tiny_ham), "--out", str(out), "--preset", "tiny", "--init", "scratch", "--no-augment",
         "--bf16", "off", "--latency-runs", "0"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((out / "student.json").read_text())
    assert meta["complete"] and meta["recipe"]["world_size"] == 2
    assert meta["recipe"]["teacher_view"] == "cached evaluation view"
    assert len(list((out / ".teacher-cache").glob("teacher-*.npz"))) == 1
