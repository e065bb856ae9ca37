"""The real `edgeskin` entry point, run as a user runs it (subprocesses, no mocks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


def run(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "160"}
    env.pop("EDGESKIN_DATA", None)
    return subprocess.run([sys.executable, "-m", "edgeskin", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, env=env, timeout=timeout)


def test_version():
    from edgeskin import __version__

    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"edgeskin {__version__}"


@pytest.mark.parametrize("command", ["split", "train", "evaluate"])
def test_every_command_has_help(command):
    r = run(command, "--help")
    assert r.returncode == 0, r.stderr
    assert "Usage" in r.stdout and "--data" in r.stdout


def test_help_does_not_import_torch():
    code = "import sys; sys.argv=['edgeskin','--help']\nfrom edgeskin.cli import app\ntry:\n app()\nexcept SystemExit: pass\nassert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_user_error_is_message_hint_and_exit_2(tmp_path):
    r = run("split", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "s.csv"))
    assert r.returncode == 2
    assert "error:" in r.stderr and "hint:" in r.stderr and "nowhere" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_data_option_says_what_to_do(tmp_path):
    r = run("train", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "EDGESKIN_DATA" in r.stderr and "Traceback" not in r.stderr


def test_bad_metadata_row_names_file_and_line(tiny_ham, tmp_path):
    meta = tiny_ham / "HAM10000_metadata.csv"
    lines = meta.read_text().splitlines()
    lines[3] = lines[3].replace(",akiec,", ",zzz,")
    meta.write_text("\n".join(lines) + "\n")
    r = run("split", "--data", str(tiny_ham), "--out", str(tmp_path / "s.csv"))
    assert r.returncode == 2 and f"{meta}:4" in r.stderr and "zzz" in r.stderr
    assert not (tmp_path / "s.csv").exists()
    r = run("split", "--data", str(tiny_ham), "--out", str(tmp_path / "s.csv"), "--skip-bad")
    assert r.returncode == 0 and "skipped" in r.stderr and (tmp_path / "s.csv").is_file()


def test_split_train_evaluate_end_to_end(tiny_ham, tmp_path):
    split = tmp_path / "split.csv"
    r = run("split", "--data", str(tiny_ham), "--out", str(split), "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert "train" in r.stdout and split.read_text().startswith("image_id,lesion_id,dx,split")
    out = tmp_path / "ens"
    r = run("train", "--data", str(tiny_ham), "--out", str(out), "--split", str(split), "--preset", "tiny",
            "--size", "32", "--members", "2", "--pretrained", "none", "--bf16", "off")
    assert r.returncode == 0, r.stderr
    assert "random initialisation" in r.stderr
    assert (out / "member0.json").is_file() and (out / "member1.json").is_file()
    js = tmp_path / "metrics.json"
    r = run("evaluate", str(out), "--data", str(tiny_ham), "--split", str(split), "--on", "test", "--json", str(js))
    assert r.returncode == 0, r.stderr
    assert "ensemble" in r.stdout and "top-1" in r.stdout and "Confusion matrix" in r.stdout
    res = json.loads(js.read_text())["results"]
    assert set(res) == {"member0", "member1", "ensemble"}
    for rep in res.values():
        assert 0 <= rep["top1"] <= rep["top2"] <= rep["top3"] <= 1
        assert "mel_sensitivity" in rep and len(rep["confusion_matrix"]) == 7


@pytest.mark.slow
def test_torchrun_two_processes(tiny_ham, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "edgeskin", "train", "--data", str(tiny_ham), "--out", str(out), "--preset", "tiny",
         "--size", "32", "--members", "1", "--pretrained", "none", "--bf16", "off"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "member0.json").read_text())["recipe"]["world_size"] == 2


@pytest.mark.data
def test_train_tiny_preset_on_real_data(ham_data, tmp_path):
    out = tmp_path / "real"
    r = run("train", "--data", str(ham_data), "--out", str(out), "--preset", "tiny", "--members", "1",
            "--size", "32", "--pretrained", "none")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "member0" in r.stdout
    r = run("evaluate", str(out), "--data", str(ham_data), "--on", "val")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "member0" in r.stdout


@pytest.mark.data
@pytest.mark.reference
@pytest.mark.slow
def test_evaluate_reproduces_reference_metrics(ham_data, reference_model, tmp_path):
    js = tmp_path / "m.json"
    r = run("evaluate", str(reference_model), "--data", str(ham_data), "--split",
            str(reference_model / "split.csv"), "--json", str(js))
    assert r.returncode == 0, r.stderr[-3000:]
    ours = json.loads(js.read_text())["results"]
    theirs = json.loads((reference_model / "metrics.json").read_text())["results"]
    assert set(theirs) <= set(ours)
    for name, t in theirs.items():
        for key in ("top1", "top2", "top3", "balanced_accuracy"):
            assert abs(ours[name][key] - t[key]) <= 0.01, (name, key, ours[name][key], t[key])
        assert abs(ours[name]["mel_sensitivity"] - t["mel_recall"]) <= 0.01


@pytest.mark.data
@pytest.mark.slow
def test_readme_main_command_runs(ham_data, tmp_path):
    """The README's main-job command (scripts/main.sh -> edgeskin run RECIPE) end to end on the
    real images, with a tiny recipe in place of the quick one to keep CI short."""
    from test_recipe import TINY

    readme = (REPO / "README.md").read_text()
    assert "bash scripts/main.sh" in readme and "bash scripts/test.sh" in readme
    assert 'edgeskin run "${RECIPE:-recipes/quick.toml}"' in (REPO / "scripts" / "main.sh").read_text()
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY.replace('[data]\npath = "ham"\n', "").replace("size = 24\n", "size = 48\n"))
    env = {**os.environ, "EDGESKIN_DATA": str(ham_data), "RECIPE": str(recipe), "COLUMNS": "100"}
    r = subprocess.run(["bash", "scripts/main.sh"], capture_output=True, text=True, cwd=REPO, env=env,
                       timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"data: {ham_data} (EDGESKIN_DATA)" in r.stderr
    log = r.stdout + r.stderr
    # no third-party chatter (NNCF INFO lines and progress bars, LiteRT converter stages, absl/oneDNN,
    # TFLite delegate notices) unless --verbose; the final table reads in full at 100 columns
    for noise in ("INFO:nncf", "Statistics collection", "[START]", "absl::", "oneDNN", "XNNPACK delegate", "torch/utils/"):
        assert noise not in log, noise
    table = r.stdout[r.stdout.index("edgeskin bench:"):]
    assert "…" not in table and all(len(line) <= 100 for line in table.splitlines())
    rep = json.loads((tmp_path / "out" / "bench" / "report.json").read_text())
    rows = {row["row"].split(" ")[0]: row for row in rep["rows"]}
    assert {"ensemble", "student/fp32", "cpu/int8", "jetson/int8", "tflite/int8"} <= set(rows)
    assert all(row["status"].startswith("ok") for row in rows.values())
    assert rows["ensemble"]["n"] > 700  # the real test split
