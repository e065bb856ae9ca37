"""The bench: metric math on hand-computed cases, budgets and their exit code, a failing bundle
as a row, device mode from a predictions file without torch, and the reports."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from _bundles import run_cli, shared
from conftest import REPO
from edgeskin.bench import (Budget, ReferencePredictions, bootstrap_drop, check_budget, mcnemar, row_metrics,
                            sensitivity_specificity, threshold_at_specificity)
from edgeskin.errors import ConfigError
from edgeskin.metrics import classification_report

CODES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return shared(tmp_path_factory)


@pytest.fixture(scope="module")
def ref_file(built, tmp_path_factory):
    from edgeskin.bench import reference_from_models
    from edgeskin.data import load_dataset, read_split

    ref = reference_from_models(built.model_dir, dataset=load_dataset(built.data), split=read_split(built.split_file),
                                student=built.model_dir, threads=1)
    return ref.save(tmp_path_factory.mktemp("ref") / "ref.npz")


# ---------------------------------------------------------------- math

def test_topk_with_ties_breaks_towards_the_lower_index():
    p = np.array([[0.4, 0.4, 0.2], [0.2, 0.4, 0.4], [0.1, 0.1, 0.8]])
    y = np.array([1, 2, 1])
    r = classification_report(p, y, ["a", "b", "c"])
    # row 0: tie a/b -> a first: top-1 wrong, top-2 right; row 1: tie b/c -> b: wrong, top-2 right;
    # row 2: c, then tie a/b -> a: top-2 wrong, top-3 right
    assert r["top1"] == 0.0 and r["top2"] == pytest.approx(2 / 3) and r["top3"] == 1.0


def test_balanced_accuracy_and_ece_by_hand():
    p = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8]])
    y = np.array([0, 0, 0, 1, 1])
    r = classification_report(p, y, ["a", "b"])
    assert r["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    # confidences 0.9 0.8 0.7 0.6 0.8 (15 bins): bins {0.9: right}, {0.8: right, right... } by hand:
    conf = np.array([0.9, 0.8, 0.7, 0.6, 0.8])
    correct = np.array([1, 1, 0, 0, 1])
    ece = sum(abs(correct[m].mean() - conf[m].mean()) * m.mean()
              for m in (conf == 0.9, conf == 0.8, conf == 0.7, conf == 0.6))
    assert r["ece"] == pytest.approx(ece)


def test_mcnemar_exact_p_values_by_hand():
    before = np.array([1] * 5 + [0] * 0 + [1] * 10, dtype=bool)
    after = np.array([0] * 5 + [1] * 10, dtype=bool)
    r = mcnemar(before, after)
    assert (r["b"], r["c"]) == (5, 0) and r["p_value"] == pytest.approx(2 * 0.5 ** 5)
    same = mcnemar(np.array([1, 0, 1, 0], bool), np.array([0, 1, 1, 0], bool))
    assert (same["b"], same["c"]) == (1, 1) and same["p_value"] == 1.0
    # b=1, c=7: P(X<=1), X~Bin(8, 1/2) = 9/256, two-sided 18/256
    a = np.array([1] + [0] * 7, bool)
    r = mcnemar(a, ~a)
    assert r["p_value"] == pytest.approx(18 / 256)
    assert mcnemar(np.ones(3, bool), np.ones(3, bool))["p_value"] == 1.0


def test_bootstrap_interval_contains_the_point_estimate_and_narrows_with_more_images():
    rng = np.random.default_rng(0)

    def top1(p, t):
        return 100 * float(np.mean(p.argmax(1) == t))

    widths = []
    for n in (100, 1600):
        y = rng.integers(0, 3, n)
        ref = np.eye(3)[np.where(rng.random(n) < 0.7, y, (y + 1) % 3)]
        new = np.eye(3)[np.where(rng.random(n) < 0.65, y, (y + 1) % 3)]
        ci = bootstrap_drop(top1, ref, new, y, n_boot=400, seed=1)
        assert ci["low"] <= ci["point"] <= ci["high"]
        assert ci["point"] == pytest.approx(top1(ref, y) - top1(new, y))
        widths.append(ci["high"] - ci["low"])
    assert widths[1] < widths[0]


def test_operating_point_at_fixed_specificity_by_hand():
    score = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    pos = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1], bool)
    t = threshold_at_specificity(score, pos, 0.75)  # 6 of 8 negatives must stay below t
    sens, spec = sensitivity_specificity(score, pos, t)
    assert t == pytest.approx(0.7) and spec == pytest.approx(0.75) and sens == 1.0
    t = threshold_at_specificity(score, pos, 1.0)
    assert sensitivity_specificity(score, pos, t) == (1.0, 1.0)


def test_row_metrics_drops_flips_and_malignant_rule():
    y = np.array([4, 4, 5, 5, 1, 0])  # mel mel nv nv bcc akiec
    ens = np.full((6, 7), 0.01)
    ens[np.arange(6), y] = 0.94
    new = ens.copy()
    new[0] = 0.01
    new[0, 5] = 0.94  # one melanoma now called nv
    r = row_metrics(new, y, CODES, ensemble=ens, student=None, mel_threshold_ens=0.5, specificity=0.9,
                    n_boot=50, seed=0)
    assert r["flips_vs_ensemble"] == 1 and r["mcnemar_vs_ensemble"]["b"] == 1
    assert r["drops_vs_ensemble"]["top1"] == pytest.approx(100 / 6)
    assert r["drops_vs_ensemble"]["mel_recall"] == pytest.approx(50.0)
    assert r["per_class_recall_drop_vs_ensemble"]["mel"] == pytest.approx(50.0)
    assert r["malignant_vs_benign"]["sensitivity"] == pytest.approx(3 / 4)  # P(mal) of image 0 is 0.03
    assert r["mel_at_ensemble_operating_point"]["sensitivity"] == 0.5


def test_budget_parsing_and_breaches_name_row_and_metric():
    b = Budget.parse("top1=0.5,balanced=1.5", max_latency_ms=20)
    rows = [{"row": "cpu/int8", "kind": "bundle", "status": "ok",
             "drops_vs_ensemble": {"top1": 0.7, "balanced": 1.0, "mel_recall": 3.0},
             "latency_batch1": {"p90_ms": 5.0}, "latency_e2e": {"p90_ms": 25.0}},
            {"row": "tflite/int8", "kind": "bundle", "status": "failed", "error": "boom"},
            {"row": "ensemble", "kind": "reference", "status": "ok", "drops_vs_ensemble": {"top1": 9}}]
    out = check_budget(rows, b, "ensemble")
    assert any(m.startswith("cpu/int8: top1 drop 0.70") for m in out)
    assert any("cpu/int8: p90 end-to-end latency 25.0 ms > 20 ms" == m for m in out)
    assert any(m.startswith("tflite/int8: failed") for m in out)
    assert not any("balanced" in m or "ensemble:" in m for m in out)
    # against the student: a bundle made from another model is held to the ensemble; ungated rows are skipped
    rows2 = [{"row": "a", "kind": "bundle", "status": "ok", "from_student": False, "gated": True,
              "drops_vs_student": {"top1": 9.0}, "drops_vs_ensemble": {"top1": 0.1}},
             {"row": "b", "kind": "bundle", "status": "ok", "from_student": True, "gated": True,
              "drops_vs_student": {"top1": 0.9}, "drops_vs_ensemble": {"top1": 0.0}},
             {"row": "c", "kind": "bundle", "status": "failed", "gated": False}]
    assert check_budget(rows2, Budget.parse("top1=0.5"), "student") == [
        "b: top1 drop 0.90 points vs the student > 0.5"]
    assert rows2[0]["budget_against"] == "ensemble"
    with pytest.raises(ConfigError):
        Budget.parse("top1=abc")
    from edgeskin.profiles import get_profile

    prof = Budget.parse(None, profile=get_profile("orin-nano"))
    assert prof.top1 == 0.5 and prof.max_latency_ms == 20.0


def test_reference_file_round_trips(ref_file):
    ref = ReferencePredictions.load(ref_file)
    assert set(ref.probs) == {"ensemble", "student"} and ref.codes == CODES
    assert ReferencePredictions.load(ref_file).sha256() == ref.sha256()
    assert ref.val is not None and set(ref.val["probs"]) == {"ensemble", "student"}
    assert len(ref.val["image_ids"]) == len(ref.val["targets"]) > 0
    assert not set(ref.val["image_ids"]) & set(ref.image_ids)  # validation is not the reported split


# ---------------------------------------------------------------- the command

def test_bench_rows_reports_failing_bundle_and_budget_exit(built, ref_file, tmp_path):
    broken = tmp_path / "broken.edgeskin"
    shutil.copytree(built.int8, broken)
    (broken / "model.onnx").write_bytes(b"not a model")
    out = tmp_path / "bench"
    r = run_cli("bench", "--reference", str(ref_file), "--bundle", str(built.fp32), "--bundle", str(broken),
                "--bundle", str(built.int8), "--data", str(built.data), "--out", str(out), "--min-samples", "5",
                "--min-seconds", "0", "--threads", "1")
    assert r.returncode == 3, r.stderr  # a row that cannot be loaded fails the bench
    assert "1 row(s) failed" in r.stderr and "error:" in r.stderr
    rep = json.loads((out / "report.json").read_text())
    rows = {x["row"]: x for x in rep["rows"]}
    assert rows["ensemble"]["status"] == "ok" and rows["student/fp32"]["status"] == "ok"
    assert rows["cpu/fp32 [member0]"]["status"] == "ok" and rows["cpu/int8 [member0]"]["status"] == "ok"
    failed = [x for x in rep["rows"] if x["status"] == "failed"]
    assert len(failed) == 1 and "modified" in failed[0]["error"]
    fp32 = rows["cpu/fp32 [member0]"]
    assert fp32["flips_vs_student"] == 0 and fp32["latency_batch1"]["runs"] >= 5 and fp32["load_s"] > 0
    assert fp32["latency_e2e"]["runs"] == fp32["latency_batch1"]["runs"]
    assert fp32["latency_e2e"]["p50_ms"] > fp32["latency_batch1"]["p50_ms"]  # decoding and preprocessing cost
    assert fp32["latency_batch1"]["p99_ms"] is None  # fewer than 1000 samples: no p99
    assert fp32["cpu"] and rep["config"]["e2e_images"]["n"] > 0 and rep["config"]["e2e_images"]["resolution"]
    assert 0 < fp32["peak_rss_mb"] < 1000 and "8" in fp32["throughput"] and fp32["torch_loaded"] is False
    assert fp32["from_student"] and fp32["gated"]
    assert (out / "report.md").read_text().count("| cpu/") >= 2
    # a budget the int8 bundle cannot meet: exit 4, the row and metric named
    r = run_cli("bench", "--reference", str(ref_file), "--bundle", str(built.int8), "--data", str(built.data),
                "--out", str(tmp_path / "b2"), "--runs", "3", "--min-seconds", "0", "--max-drop", "top1=-100",
                "--against", "ensemble")
    assert r.returncode == 4, r.stderr
    assert "cpu/int8 [member0]: top1 drop" in r.stderr.replace("\n", " ")


def test_bench_device_mode_runs_without_torch(built, ref_file, tmp_path):
    from test_runtime import BLOCKER

    out = tmp_path / "dev"
    code = BLOCKER + textwrap.dedent(f"""
        sys.argv = ["edgeskin", "bench", "--reference", {str(ref_file)!r}, "--bundle", {str(built.int8)!r},
                    "--data", {str(built.data)!r}, "--out", {str(out)!r}, "--runs", "3", "--min-seconds", "0"]
        from edgeskin.cli import main
        try:
            main()
        except SystemExit as e:
            assert not e.code, e.code
        bad = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not bad, bad
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    row = [x for x in rep["rows"] if x["row"] == "cpu/int8 [member0]"][0]
    assert row["status"] == "ok" and row["torch_loaded"] is False
    # the reference rows' latency is not this machine's: none in the device's columns
    refs = [x for x in rep["rows"] if x["kind"] == "reference"]
    assert refs and all("latency_batch1" not in x and "latency_e2e" not in x for x in refs)
    assert rep["config"]["device_mode"] and "Device mode" in (out / "report.md").read_text()


def test_bench_on_every_image_of_a_data_set_without_a_split(built, tmp_path):
    out = tmp_path / "all"
    r = run_cli("bench", "--reference", str(built.model_dir), "--on", "all", "--bundle", str(built.fp32),
                "--data", str(built.data), "--out", str(out), "--runs", "3", "--min-seconds", "0")
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "report.json").read_text())
    from edgeskin.data import load_dataset

    # the ensemble row is timed like a bundle: exported to ONNX Runtime FP32, model only and end to end
    ens = rep["rows"][0]
    assert ens["row"] == "ensemble" and ens["engine"] == "onnxruntime" and ens["onnx_max_abs_diff"] < 1e-3
    assert ens["latency_e2e"]["runs"] >= 3 and ens["latency_batch1"]["runs"] >= 3
    assert "no validation" in rep["config"]["thresholds_fitted_on"]  # --on all: no split, said so

    assert rep["config"]["n_images"] == len(load_dataset(built.data).samples) and rep["config"]["split"] == "all"
    assert [x["status"] for x in rep["rows"]] == ["ok", "ok"]


def test_bench_compiles_targets_on_the_fly_from_the_student(built, ref_file, tmp_path):
    out = tmp_path / "fly"
    r = run_cli("bench", "--reference", str(ref_file), "--student", str(built.model_dir), "--targets",
                "cpu:fp32,jetson:fp16,tflite:fp32,nosuch", "--data", str(built.data), "--out", str(out),
                "--runs", "3", "--min-seconds", "0")
    assert r.returncode == 3, r.stderr  # the unknown target is a failed row
    rep = json.loads((out / "report.json").read_text())
    rows = {x["row"]: x for x in rep["rows"]}
    assert rows["jetson/fp16 [member0]"]["host_proxy"]
    assert "| jetson/fp16 [member0] | ok |" in (out / "report.md").read_text()
    assert "proxy" in (out / "report.md").read_text().split("| jetson/fp16 [member0] |")[1].split("\n")[0]
    for name in ("cpu/fp32 [member0]", "jetson/fp16 [member0]", "tflite/fp32 [member0]"):
        assert rows[name]["status"] == "ok" and rows[name]["from_student"], name
        assert rows[name]["flips_vs_student"] == 0, name  # fp32/fp16-on-host: the student's own decisions
    assert rows["nosuch/int8"]["status"] == "failed" and "unknown target" in rows["nosuch/int8"]["error"]
    assert sorted(p.name for p in (out / "bundles").iterdir()) == ["cpu-fp32.edgeskin", "jetson-fp16.edgeskin",
                                                                  "tflite-fp32.edgeskin"]


# ---------------------------------------------------------------- measuring and reporting

def test_timed_until_needs_both_samples_and_seconds_and_p99_needs_1000():
    from edgeskin.bench import timed_until

    calls = {"a": 0, "b": 0}

    def fn(k):
        def f():
            calls[k] += 1
        return f

    st = timed_until({"a": fn("a"), "b": fn("b")}, min_samples=50, min_seconds=0.2, warmup=2)
    assert st["a"].runs == st["b"].runs >= 50 and st["a"].seconds >= 0.2
    assert calls["a"] == st["a"].runs + 2 and (st["a"].p99_ms is None) == (st["a"].runs < 1000)
    st = timed_until({"a": fn("a")}, min_samples=50, min_seconds=0.0, warmup=0)
    assert st["a"].runs == 50 and st["a"].p99_ms is None
    st = timed_until({"a": fn("a")}, min_samples=1000, min_seconds=0.0, warmup=0)
    assert st["a"].runs == 1000 and st["a"].p99_ms is not None
    with pytest.raises(ValueError):
        timed_until({"a": fn("a")}, min_samples=0)


def test_mcnemar_continuity_corrected_statistic_is_zero_without_discordance_imbalance():
    from edgeskin.bench import mcnemar

    ref = np.array([1, 0, 1, 0, 1, 1], bool)
    new = np.array([0, 1, 0, 1, 1, 1], bool)  # b == c == 2
    assert mcnemar(ref, new)["chi2_cc"] == 0.0
    assert mcnemar(np.array([1, 1, 1, 1], bool), np.array([0, 0, 0, 1], bool))["chi2_cc"] == pytest.approx(4 / 3)


def test_melanoma_operating_point_is_fitted_on_validation_and_applied_to_the_split():
    rng = np.random.default_rng(0)
    y = np.array([4] * 10 + [5] * 30)
    p = rng.dirichlet(np.ones(7), size=40)
    r_val = row_metrics(p, y, CODES, ensemble=p, student=None, mel_threshold_ens=0.5, specificity=0.9, n_boot=10,
                        seed=0, mel_threshold=0.99)
    assert r_val["mel_at_fixed_specificity"]["threshold"] == 0.99 and r_val["mel_at_fixed_specificity"]["fitted_on"] == "val"
    assert r_val["mel_at_fixed_specificity"]["sensitivity"] == 0.0  # nobody reaches 0.99 on this split
    r_self = row_metrics(p, y, CODES, ensemble=p, student=None, mel_threshold_ens=0.5, specificity=0.9, n_boot=10,
                         seed=0)
    assert r_self["mel_at_fixed_specificity"]["specificity"] >= 0.9


def _fake_report(n_rows=6):
    from edgeskin.bench import BenchReport

    lat = {"runs": 1200, "batch": 1, "p50_ms": 12.3, "p90_ms": 14.1, "p99_ms": 20.2, "mean_ms": 12.9, "min_ms": 11.0}
    row = {"status": "ok", "kind": "bundle", "size_bytes": 24_000_000, "top1": 0.551, "top2": 0.7, "top3": 0.8,
           "balanced_accuracy": 0.546, "ece": 0.05, "positive_sensitivity": 0.638, "flips_vs_ensemble": 123,
           "flips_vs_student": 12, "drops_vs_ensemble": {"top1": -0.5, "balanced": 0.3},
           "per_class_recall": {c: 0.5 for c in CODES}, "per_class_recall_drop_vs_ensemble": {c: 0.1 for c in CODES},
           "latency_batch1": lat, "latency_e2e": lat}
    rows = [{**row, "row": f"tflite/int8 [student-resnet18-{i}]"} for i in range(n_rows)]
    rows[1]["host_proxy"] = True
    rows[2]["forced"] = True
    rows.append({"row": "cpu/int8 [student]", "kind": "bundle", "status": "failed",
                 "error": "IndexError: index -1 is out of bounds for axis 0 with size 0 " * 3})
    cfg = {"n_images": 762, "split": "test", "specificity": 0.9, "min_samples": 1000, "min_seconds": 10,
           "threads": None, "e2e_images": {"n": 32, "resolution": "600x450", "mean_kb": 250, "format": "JPG"}}
    return BenchReport(rows, cfg, {"applied_against": "student"})


def test_terminal_table_reads_in_full_at_100_columns():
    from rich.console import Console

    from edgeskin.bench.report import rich_table

    rep = _fake_report()
    console = Console(width=100, record=True, color_system=None)
    console.print(rich_table(rep))
    text = console.export_text()
    assert "…" not in text
    assert all(len(line) <= 100 for line in text.splitlines())
    assert "FORCED" in text and "proxy" in text and "FAILED" in text and "12.3/14.1" in text
    wide = Console(width=400, record=True, color_system=None)
    wide.print(rich_table(rep, wide=True))
    assert "20.2" in wide.export_text()  # p99 from 1200 samples, in the wide table


def test_markdown_uses_one_sign_convention_and_states_sample_counts():
    from edgeskin.bench.report import markdown

    md = markdown(_fake_report(3))
    assert "Δ" not in md and "positive is worse" in md
    assert "12.3/14.1/20.2 (1200)" in md and "600x450" in md
    assert "- FAILED: cpu/int8 [student]" in md


def test_a_forced_bundle_shows_forced_and_refuse_forced_exits_5(built, ref_file, tmp_path):
    forced = tmp_path / "forced.edgeskin"
    shutil.copytree(built.int8, forced)
    manifest = json.loads((forced / "manifest.json").read_text())
    manifest["accuracy"]["forced"] = True  # as a bundle written with on_miss = "keep" past its budget
    (forced / "manifest.json").write_text(json.dumps(manifest))
    args = ["bench", "--reference", str(ref_file), "--bundle", str(forced), "--data", str(built.data),
            "--runs", "3", "--min-seconds", "0"]
    r = run_cli(*args, "--out", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    assert "FORCED" in r.stdout and "| cpu/int8 [member0] | FORCED |" in (tmp_path / "a" / "report.md").read_text()
    r = run_cli(*args, "--out", str(tmp_path / "b"), "--refuse-forced")
    assert r.returncode == 5 and "compile budget" in r.stderr
    r = run_cli("bundle", "show", str(forced))  # the manifest on stdout, what to know first on stderr
    assert r.returncode == 0 and '"forced": true' in r.stdout and "FORCED" in r.stderr and "refuse" in r.stderr
    r = run_cli("bundle", "show", str(built.int8))
    assert r.returncode == 0 and "within budget" in r.stderr and "FORCED" not in r.stderr
