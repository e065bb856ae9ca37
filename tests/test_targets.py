"""Targets: registry, ONNX export checks, cpu fp32/int8 bundles, budgets, ensembles, CLI."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from _bundles import build_model_dir, run_cli
from conftest import CODES
from edgeskin.bundle import BundleReader
from edgeskin.calibration import read_calibration_set
from edgeskin.data import load_dataset, read_split
from edgeskin.errors import CheckpointError, ConfigError
from edgeskin.export import ExportError, export_onnx
from edgeskin.metrics import budget_steps
from edgeskin.targets import Budget, CompileError, Target, get_target, register
from edgeskin.targets.cpu import CpuTarget


# the shared fixture exports with torch's legacy exporter, on purpose
pytestmark = pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")


@pytest.fixture(scope="module")
def data(built):
    return load_dataset(built.data), read_split(built.split_file)


# ------------------------------------------------------------------ registry


@pytest.mark.parametrize("name", ["cpu", "onnx", "ort", "onnxruntime", " CPU ", "ONNX"])
def test_get_target_by_name_and_alias(name):
    t = get_target(name)
    assert isinstance(t, CpuTarget) and t.name == "cpu" and t is get_target("cpu")


@pytest.mark.parametrize("name", ["cpu2", "cpuu", "cp"])
def test_unknown_target_suggests_cpu(name):
    with pytest.raises(ConfigError) as e:
        get_target(name)
    assert f"unknown target {name!r}" in e.value.message and "did you mean 'cpu'" in e.value.message
    assert "cpu" in e.value.hint


def test_unknown_target_without_close_match():
    with pytest.raises(ConfigError) as e:
        get_target("jetson-orin-nano")
    assert "did you mean" not in e.value.message and "available targets: cpu" in e.value.hint


def test_duplicate_registration_is_refused_and_registers_nothing():
    with pytest.raises(ValueError, match="'cpu' is already registered"):
        register(CpuTarget())

    class Clash(Target):
        name = "brand-new-target"
        aliases = ("fresh-alias", "onnx")
        precisions = ("fp32",)

    with pytest.raises(ValueError, match="'onnx' is already registered"):
        register(Clash())
    for n in ("brand-new-target", "fresh-alias"):  # nothing half-registered
        with pytest.raises(ConfigError):
            get_target(n)
    assert get_target("onnx").name == "cpu"


def test_unsupported_precision(built, data):
    t = get_target("cpu")
    t.check_precision("fp32")
    t.check_precision("int8")
    with pytest.raises(ConfigError, match="cannot make 'fp16'") as e:
        t.check_precision("fp16")
    assert "fp32, int8" in e.value.hint
    ds, split = data
    with pytest.raises(ConfigError, match="int4"):
        t.compile(built.model_dir, precision="int4", dataset=ds, split=split, out=built.root / "never.edgeskin")
    with pytest.raises(ConfigError, match="needs a calibration set"):
        t.compile(built.model_dir, precision="int8", dataset=ds, split=split, out=built.root / "never.edgeskin")
    assert not (built.root / "never.edgeskin").exists()


# ------------------------------------------------------------------ Budget


def test_budget_parse():
    assert Budget.for_compile("top1=0.5,balanced=1.5,mel_recall=2") == Budget(0.5, 1.5, 2.0, 0.97)
    assert Budget.for_compile("mel-recall=3, top1 = 1") == Budget(top1=1.0, balanced=1.5, mel_recall=3.0,
                                                                 min_agreement=0.97)
    assert Budget.for_compile(None) == Budget.for_compile("") == Budget(0.5, 1.5, 2.0, 0.97)
    assert Budget.for_compile("top1=0.1", min_agreement=0.9) == Budget(0.1, 1.5, 2.0, 0.9)
    # the same type and parser for the bench (nothing checked unless given) and recipe tables
    assert Budget.parse(None) == Budget() and not Budget().active()
    assert Budget.parse("top1=1") == Budget.from_table({"top1": 1}, where="r.toml", compile_defaults=False)
    with pytest.raises(ConfigError, match="r.toml.*top5"):
        Budget.from_table({"top5": 1}, where="r.toml")


@pytest.mark.parametrize("text", ["top1", "top1=", "top5=1", "agreement=0.9", "top1=abc", "top1=1;balanced=2",
                                  "top1=nan", "balanced=inf"])
def test_budget_parse_refuses_bad_text(text):
    with pytest.raises(ConfigError, match="bad budget"):
        Budget.parse(text)


def test_small_split_warning_fires_on_a_tiny_class_and_is_silent_on_a_big_split():
    budget = Budget.for_compile()  # top1 0.5, balanced 1.5, mel_recall 2 points
    # the quick recipe's 384 validation images: 9 df images make one flip 1.59 balanced points
    small = budget_steps(np.repeat(np.arange(7), [24, 40, 97, 9, 83, 119, 12]), CODES)
    warnings_ = budget.resolution_warnings(small)
    assert warnings_ == [
        "top1 budget 0.5 points = 1.9 flipped images (0.26 points each; 384 images)",
        "balanced budget 1.5 points < one flipped image (1.59 points; smallest class df: 9 images)",
        "mel_recall budget 2 points = 1.7 flipped images (1.20 points each; 83 mel images)",
    ]
    # ten times the images: every budget is worth at least 3 images
    big = budget_steps(np.repeat(np.arange(7), [240, 400, 970, 90, 830, 1190, 120]), CODES)
    assert budget.resolution_warnings(big) == []
    # an unbudgeted metric is not warned about; a split without melanoma cannot check its budget
    assert Budget(balanced=1.5).resolution_warnings(small) == [warnings_[1]]
    no_mel = budget_steps(np.repeat([0, 1, 2, 3, 5, 6], 1000), CODES)
    assert budget.resolution_warnings(no_mel) == ["mel_recall budget 2 points cannot be checked: 0 mel images"]


def test_compile_check_records_intervals_image_count_and_warnings():
    from edgeskin.budget import check_summary
    from edgeskin.targets.base import compare

    y = np.repeat(np.arange(7), [24, 40, 97, 9, 83, 119, 12])
    ref = np.full((len(y), 7), 0.1)
    ref[np.arange(len(y)), y] = 0.4
    probs = ref.copy()
    probs[:3] = np.roll(probs[:3], 1, axis=1)  # three akiec images now wrong
    c = compare(probs, ref, y, CODES, Budget.for_compile())
    assert c["n"] == 384 and c["top1_agreement"] == pytest.approx(381 / 384)
    iv = c["intervals"]
    assert iv["level"] == 0.95 and iv["top1_agreement"][0] < 381 / 384 < iv["top1_agreement"][1] < 1
    assert c["drops_points"]["top1"] == pytest.approx(300 / 384)
    lo, hi = iv["drops_points"]["top1"]
    assert 0 <= lo < 300 / 384 < hi  # only losses: a paired resample never shows a gain
    assert iv["drops_points"]["mel_recall"] == [0.0, 0.0]
    assert c["resolution_points"]["balanced"]["class"] == "df"
    assert [w.split()[0] for w in c["warnings"]] == ["top1", "balanced", "mel_recall"]
    assert not c["passed"]  # 0.78 points > 0.5: the warnings do not change the verdict
    assert check_summary(c).startswith(f"agreement 99.2% [{100 * iv['top1_agreement'][0]:.1f}, "
                                       f"{100 * iv['top1_agreement'][1]:.1f}] of 384 images; "
                                       f"drop (points, 95% interval): top1 0.78 [{lo:.2f}, {hi:.2f}], balanced ")
    # a record from before the intervals still reads
    assert check_summary({"n": 14, "top1_agreement": 1.0, "drops_points": {"top1": 0.0}}) == \
        "agreement 100.0% of 14 images; drop (points): top1 0.00"


# ------------------------------------------------------------------ export


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(16, 7)

    def forward(self, x):  # noqa: ANN001, ANN201
        return self.fc(self.features(x).flatten(1))


class Branchy(Tiny):
    """Data-dependent Python control flow: the tracing exporter records only the branch the
    dummy input (zeros) takes, so the ONNX graph disagrees with torch on positive inputs."""

    def forward(self, x):  # noqa: ANN001, ANN201
        y = super().forward(x)
        if x.mean() > 0:
            return y
        return -y


def _tiny(cls=Tiny):  # noqa: ANN001, ANN202
    torch.manual_seed(0)
    m = cls()
    m.eval()
    with torch.no_grad():  # non-trivial BN statistics
        m.features[1].running_mean.uniform_(-0.5, 0.5)
        m.features[1].running_var.uniform_(0.5, 2.0)
    return m


@pytest.mark.parametrize("opset", [17, 13])
def test_export_matches_torch(tmp_path, opset):
    import onnx

    out = tmp_path / "m.onnx"
    res = export_onnx(_tiny(), out, size=32, opset=opset)
    assert res.path == out and out.is_file() and res.opset == opset and res.checked_inputs == 4
    assert 0 <= res.max_abs_diff <= 1e-3
    proto = onnx.load(out)
    assert proto.opset_import[0].version == opset
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["logits"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_export_with_given_inputs_and_dynamic_batch(tmp_path):
    import onnxruntime as ort

    x = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    res = export_onnx(_tiny(), tmp_path / "m.onnx", size=32, check_inputs=x)
    assert res.checked_inputs == 3
    sess = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x})[0]  # batch of 3 though exported with batch 1
    with torch.no_grad():
        want = _tiny()(torch.from_numpy(x)).numpy()
    assert got.shape == (3, 7) and np.abs(got - want).max() <= 1e-4


def test_export_that_differs_from_torch_is_refused(tmp_path):
    x = np.abs(np.random.default_rng(0).standard_normal((2, 3, 32, 32))).astype(np.float32) + 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarning about the Python branch
        with pytest.raises(ExportError, match="differs from torch") as e:
            export_onnx(_tiny(Branchy), tmp_path / "m.onnx", size=32, check_inputs=x)
    assert "--opset" in e.value.hint
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary
    # the same model is fine on inputs that take the traced branch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = export_onnx(_tiny(Branchy), tmp_path / "m.onnx", size=32, check_inputs=-x)
    assert res.max_abs_diff <= 1e-3


def test_export_tolerance_is_enforced(tmp_path):
    res = export_onnx(_tiny(), tmp_path / "a.onnx", size=32)
    diff = res.max_abs_diff
    if diff > 0:  # float reordering in ORT usually leaves a tiny difference
        with pytest.raises(ExportError):
            export_onnx(_tiny(), tmp_path / "b.onnx", size=32, tolerance=diff / 2)
        assert not (tmp_path / "b.onnx").exists()
    assert export_onnx(_tiny(), tmp_path / "c.onnx", size=32, tolerance=diff).max_abs_diff == diff


# ------------------------------------------------------------------ compiled bundles


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fp32_manifest(built):
    m = BundleReader(built.fp32).manifest
    assert (m.target, m.precision, m.model_file) == ("cpu", "fp32", "model.onnx")
    assert m.engine["name"] == "onnxruntime" and m.engine["opset"] == 17
    assert (m.input.size, m.input.resize, m.input.layout, m.input.dtype) == (32, 37, "NCHW", "float32")
    assert m.labels == CODES and m.label_set == "ham10000"
    assert (built.fp32 / "labels.txt").read_text().split("\n")[:7] == list(CODES)
    ck = json.loads(built.checkpoint.read_text())
    assert m.provenance["model"] == {"name": "member0", "arch": "resnet18", "sha256": ck["sha256"]}
    assert m.provenance["model"]["sha256"] == _sha(built.model_dir / "member0.pt")
    assert m.provenance["split_sha256"] == read_split(built.split_file).sha256()
    assert m.provenance["export"]["max_abs_logit_diff_vs_torch"] <= 1e-3
    assert "calibration" not in m.provenance and "quantization" not in m.provenance
    acc = m.accuracy
    assert acc["top1_agreement"] == 1.0 and acc["passed"] is True and acc["forced"] is False
    assert acc["max_abs_prob_diff"] <= 1e-6 and acc["n"] == 14
    # 14 images: all agree, yet the interval says "at least 78 %"; one image is 7 top-1 points
    assert acc["intervals"]["top1_agreement"] == [pytest.approx(14 / (14 + 1.96 ** 2), abs=1e-3), 1.0]
    assert acc["intervals"]["drops_points"]["top1"] == [0.0, 0.0]
    assert "top1 budget 0.5 points < one flipped image (7.14 points; 14 images)" in acc["warnings"]
    assert set(m.files) == {"model.onnx", "labels.txt", "golden.npz"}
    for name, entry in m.files.items():
        assert entry == {"sha256": _sha(built.fp32 / name), "bytes": (built.fp32 / name).stat().st_size}
    assert m.golden["n"] == 8 and m.golden["tolerance"] == 1e-4
    assert m.toolchain["onnxruntime"] and m.created and m.edgeskin_version


def test_fp32_bundle_computes_the_checkpoint(built):
    """The bundle's recorded outputs are the torch checkpoint's softmax on the same inputs."""
    from edgeskin.models import load_checkpoint

    g = BundleReader(built.fp32).golden()
    model = load_checkpoint(built.checkpoint).model
    with torch.no_grad():
        want = torch.softmax(model(torch.from_numpy(g["inputs"])).double(), 1).numpy()
    np.testing.assert_allclose(g["probs"], want, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def int8_proto(built):
    import onnx

    return onnx.load(str(built.int8 / "model.onnx"))


def test_int8_graph_is_qdq_with_per_channel_weights_and_uint8_activations(int8_proto):
    from onnx import numpy_helper

    g = int8_proto.graph
    ops = [n.op_type for n in g.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 10
    init = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    convs = [n for n in g.node if n.op_type == "Conv"]
    assert len(convs) == 20  # resnet18: 1 stem + 16 block + 3 downsample convolutions
    for conv in convs:
        dq = producer[conv.input[1]]
        assert dq.op_type == "DequantizeLinear", conv.name
        w, scale = init[dq.input[0]], init[dq.input[1]]
        assert w.dtype == np.int8 and w.ndim == 4
        assert scale.ndim == 1 and scale.shape == (w.shape[0],), conv.name  # per output channel
        axis = {a.name: a.i for a in dq.attribute}.get("axis", 1)
        assert axis == 0
    relu_outputs = {n.output[0] for n in g.node if n.op_type == "Relu"}
    q_after_relu = [n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] in relu_outputs]
    assert len(q_after_relu) >= 16
    assert all(init[n.input[2]].dtype == np.uint8 for n in q_after_relu)
    # the classifier stays float (keep_head_float default)
    gemm = next(n for n in g.node if n.op_type == "Gemm")
    assert gemm.input[1] in init and init[gemm.input[1]].dtype == np.float32


def test_int8_manifest(built):
    m = BundleReader(built.int8).manifest
    assert (m.target, m.precision) == ("cpu", "int8")
    cal = read_calibration_set(built.calib_file)
    assert m.provenance["calibration"]["id"] == cal.name
    assert m.provenance["calibration"]["sha256"] == cal.sha256 and m.provenance["calibration"]["size"] == 32
    q = m.provenance["quantization"]
    assert q["tool"] == "nncf" and q["mode"] == "post-training" and q["calibration_samples"] == 32
    assert q["options"]["keep_head_float"] is True and q["ignored_nodes"]
    assert m.provenance["model"]["sha256"] == BundleReader(built.fp32).manifest.provenance["model"]["sha256"]
    fp32_size = (built.fp32 / "model.onnx").stat().st_size
    int8_size = (built.int8 / "model.onnx").stat().st_size
    assert int8_size < 0.4 * fp32_size
    assert m.files["model.onnx"]["bytes"] == int8_size
    assert m.golden["tolerance"] == 1e-2
    assert m.accuracy["forced"] == (not m.accuracy["passed"])  # compiled with force=True


def test_impossible_budget_writes_no_bundle_unless_forced(built, data, tmp_path):
    ds, split = data
    cpu = get_target("cpu")
    out = tmp_path / "b.edgeskin"
    with pytest.raises(CompileError) as e:
        cpu.compile(built.model_dir, precision="fp32", dataset=ds, split=split, out=out,
                    budget=Budget.for_compile().with_(min_agreement=1.01), threads=1)
    assert e.value.exit_code == 3
    assert "misses its budget" in e.value.message and "agreement" in e.value.message
    assert "--force" in e.value.hint and "no bundle was written" in e.value.hint
    assert list(tmp_path.iterdir()) == []  # no bundle, no scratch folder

    res = cpu.compile(built.model_dir, precision="fp32", dataset=ds, split=split, out=out,
                      budget=Budget.for_compile().with_(min_agreement=1.01), force=True, threads=1)
    assert res.forced and res.bundle == out
    acc = BundleReader(out).manifest.accuracy
    assert acc["forced"] is True and acc["passed"] is False
    assert any("agreement" in f for f in acc["failures"])
    assert acc["budget"]["min_agreement"] == 1.01
    assert BundleReader(out).verify()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.edgeskin"]

    with pytest.raises(Exception, match="already exists"):  # no silent overwrite
        cpu.compile(built.model_dir, precision="fp32", dataset=ds, split=split, out=out, threads=1)


def test_ensemble_folder_needs_a_member(built, data, tmp_path):
    ds, split = data
    ens = tmp_path / "ens"
    build_model_dir(ens, seed=0, name="member0")
    build_model_dir(ens, seed=1, name="member1")
    cpu = get_target("cpu")
    with pytest.raises(CheckpointError) as e:
        cpu.compile(ens, precision="fp32", dataset=ds, split=split, out=tmp_path / "x.edgeskin")
    assert "2 members" in e.value.message
    assert "--member" in e.value.hint and "member0" in e.value.hint and "member1" in e.value.hint
    with pytest.raises(CheckpointError, match="no member named 'member7'") as e:
        cpu.compile(ens, precision="fp32", dataset=ds, split=split, out=tmp_path / "x.edgeskin", member="member7")
    assert "member0, member1" in e.value.hint
    assert not (tmp_path / "x.edgeskin").exists()


# ------------------------------------------------------------------ CLI


def test_cli_targets_lists_cpu():
    r = run_cli("targets")
    assert r.returncode == 0, r.stderr
    assert "cpu" in r.stdout and "onnx" in r.stdout and "fp32" in r.stdout and "int8" in r.stdout


def test_cli_compile_via_alias(built, tmp_path):
    out = tmp_path / "alias.edgeskin"
    r = run_cli("compile", str(built.model_dir), "--target", "onnx", "--precision", "fp32", "--out", str(out),
                "--data", str(built.data), "--threads", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "within budget" in r.stdout
    assert "95% interval" in r.stdout and "[78.5, 100.0]" in r.stdout  # agreement 14/14, Wilson interval
    assert "validation split small for the compile budget" in r.stderr and "7.14 points" in r.stderr
    m = BundleReader(out).manifest
    assert (m.target, m.precision) == ("cpu", "fp32")
    # same checkpoint, same compiler: the same model file as the Python API's bundle
    assert m.files["model.onnx"]["sha256"] == BundleReader(built.fp32).manifest.files["model.onnx"]["sha256"]


def test_cli_compile_budget_miss_exits_3(built, tmp_path):
    out = tmp_path / "miss.edgeskin"
    r = run_cli("compile", str(built.model_dir), "--target", "cpu", "--precision", "fp32", "--out", str(out),
                "--data", str(built.data), "--max-drop", "top1=-101", "--threads", "1")
    assert r.returncode == 3, r.stderr[-3000:]
    assert "error:" in r.stderr and "misses its budget" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_unknown_target_and_precision(built, tmp_path):
    r = run_cli("compile", str(built.model_dir), "--target", "cpuu", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "did you mean 'cpu'" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("compile", str(built.model_dir), "--precision", "fp16", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "cannot make 'fp16'" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["agreement", "clinical"])
def test_accuracy_controlled_int8_runs_nncf_accuracy_control(built, data, tmp_path, metric):
    from edgeskin.quantize import QuantizeOptions

    ds, split = data
    res = get_target("cpu").compile(
        built.model_dir, precision="int8", dataset=ds, split=split, out=tmp_path / "ac.edgeskin",
        calibration=read_calibration_set(built.calib_file), force=True, threads=1,
        quantize=QuantizeOptions(max_drop=0.01, control_metric=metric, range_estimator="mean_minmax"))
    q = res.manifest.provenance["quantization"]
    assert q["mode"] == "accuracy-control" and q["options"]["control_metric"] == metric
    assert q["options"]["max_drop"] == 0.01
    assert BundleReader(res.bundle).verify()


def test_range_estimator_auto_keeps_the_candidate_that_agrees_most_on_val(built, data, tmp_path):
    from edgeskin.quantize import AUTO_ESTIMATORS, QuantizeOptions, quantize_onnx

    ds, split = data
    res = get_target("cpu").compile(
        built.model_dir, precision="int8", dataset=ds, split=split, out=tmp_path / "auto.edgeskin",
        calibration=read_calibration_set(built.calib_file), force=True, threads=1,
        quantize=QuantizeOptions(range_estimator="auto"))
    q = res.manifest.provenance["quantization"]
    search = q["range_estimator_search"]
    assert [t["range_estimator"] for t in search["tried"]] == list(AUTO_ESTIMATORS)
    best = max(t["val_agreement"] for t in search["tried"])
    chosen = next(t for t in search["tried"] if t["range_estimator"] == search["chose"])
    assert chosen["val_agreement"] == best and q["options"]["range_estimator"] == search["chose"]
    # the bundle's own compile check is of the graph that was kept
    assert res.check["top1_agreement"] == pytest.approx(best)
    with pytest.raises(ConfigError, match="auto"):
        quantize_onnx(None, [], QuantizeOptions(range_estimator="auto"))
