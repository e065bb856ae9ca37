"""The jetson target: device profiles, TensorRT's INT8 form (conversion and validator), the
compiled bundle, the host proxy, and the on-device engine build (skipped without TensorRT)."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from _bundles import run_cli, shared
from edgeskin.errors import ConfigError
from edgeskin.profiles import get_profile, load_profiles
from edgeskin.quantize.tensorrt import to_tensorrt_int8, validate_tensorrt_onnx

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return shared(tmp_path_factory)


# ---------------------------------------------------------------- hand-made QDQ graphs

def qdq_graph(*, act_dtype=np.int8, act_zp=0, weight_scale="per-channel", weight_axis=0, opset=17,
              quantize_bias=False, qdq_before_relu=False) -> onnx.ModelProto:
    """input -> Q/DQ -> Conv (INT8 weights + DQ) -> Relu -> Q/DQ -> output, with one fault on demand."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 8, 8])
    inits = [
        numpy_helper.from_array(np.array(0.02, np.float32), "a_scale"),
        numpy_helper.from_array(np.array(act_zp, act_dtype), "a_zp"),
        numpy_helper.from_array(rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8), "w_q"),
        numpy_helper.from_array(np.full((4,) if weight_scale == "per-channel" else (), 0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros((4,) if weight_scale == "per-channel" else (), np.int8), "w_zp"),
        numpy_helper.from_array(np.array(0.05, np.float32), "o_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "o_zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["input", "a_scale", "a_zp"], ["xq"], name="in_q"),
        helper.make_node("DequantizeLinear", ["xq", "a_scale", "a_zp"], ["xdq"], name="in_dq"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], name="w_dq",
                         **({"axis": weight_axis} if weight_scale == "per-channel" else {})),
    ]
    if quantize_bias:
        inits += [numpy_helper.from_array(np.zeros(4, np.int32), "b_q"),
                  numpy_helper.from_array(np.full(4, 2e-4, np.float32), "b_scale"),
                  numpy_helper.from_array(np.zeros(4, np.int32), "b_zp")]
        nodes.append(helper.make_node("DequantizeLinear", ["b_q", "b_scale", "b_zp"], ["b"], name="b_dq", axis=0))
    else:
        inits.append(numpy_helper.from_array(np.zeros(4, np.float32), "b"))
    nodes.append(helper.make_node("Conv", ["xdq", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]))
    if qdq_before_relu:
        nodes += [helper.make_node("QuantizeLinear", ["c", "o_scale", "o_zp"], ["cq"], name="conv_out_q"),
                  helper.make_node("DequantizeLinear", ["cq", "o_scale", "o_zp"], ["cdq"], name="conv_out_dq"),
                  helper.make_node("Relu", ["cdq"], ["r"], name="relu")]
    else:
        nodes.append(helper.make_node("Relu", ["c"], ["r"], name="relu"))
    nodes += [helper.make_node("QuantizeLinear", ["r", "o_scale", "o_zp"], ["rq"], name="relu_q"),
              helper.make_node("DequantizeLinear", ["rq", "o_scale", "o_zp"], ["out"], name="relu_dq")]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                          opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    return m


def _rules(report):
    return {r.rule: r for r in report.results}


def test_validator_passes_a_good_graph():
    rep = validate_tensorrt_onnx(qdq_graph(), max_opset=17)
    assert rep.passed, rep.to_dict()
    assert {"opset", "onnx.checker", "polygraphy lint", "int8", "zero-point", "weights-per-channel",
            "bias-float", "conv-relu"} <= set(_rules(rep))


@pytest.mark.parametrize("fault, kwargs, rule, node", [
    ("uint8 activations", {"act_dtype": np.uint8}, "int8", "in_q"),
    ("non-zero zero point", {"act_zp": 3}, "zero-point", "in_q"),
    ("per-tensor conv weights", {"weight_scale": "per-tensor"}, "weights-per-channel", "conv"),
    ("weights on axis 1", {"weight_axis": 1}, "weights-per-channel", "conv"),
    ("quantized bias", {"quantize_bias": True}, "bias-float", "conv"),
    ("Q/DQ between conv and relu", {"qdq_before_relu": True}, "conv-relu", "conv_out_q"),
])
def test_validator_names_each_broken_rule_and_node(fault, kwargs, rule, node):
    rep = validate_tensorrt_onnx(qdq_graph(**kwargs), max_opset=17, lint=False)
    rules = _rules(rep)
    assert not rep.passed, fault
    assert not rules[rule].passed, fault
    assert any(n.startswith(node) for n in rules[rule].nodes), rules[rule]
    others = [r.rule for r in rep.failures() if r.rule != rule]
    assert others == [], f"{fault}: unexpected failures {others}"
    with pytest.raises(Exception, match=rule):
        rep.raise_if_failed("model.onnx")


def test_validator_refuses_an_opset_above_the_profile():
    rep = validate_tensorrt_onnx(qdq_graph(opset=17), max_opset=13, lint=False)
    assert [r.rule for r in rep.failures()] == ["opset"]
    assert "13" in _rules(rep)["opset"].detail


def test_validator_reports_checker_and_lint_failures():
    m = qdq_graph()
    m.graph.node[3].input[1] = "no_such_tensor"  # the conv reads a tensor nobody makes
    rep = validate_tensorrt_onnx(m, max_opset=17)
    failed = {r.rule for r in rep.failures()}
    assert {"onnx.checker", "polygraphy lint"} <= failed


def test_conversion_makes_uint8_graph_signed_with_the_same_range():
    m = qdq_graph(act_dtype=np.uint8, act_zp=0)
    fixed, rec = to_tensorrt_int8(m)
    assert rec["quantizers_converted"] >= 1
    assert validate_tensorrt_onnx(fixed, max_opset=17, lint=False).passed
    inits = {i.name: numpy_helper.to_array(i) for i in fixed.graph.initializer}
    assert inits["a_zp"].dtype == np.int8 and inits["a_zp"] == 0
    assert np.isclose(inits["a_scale"], 0.02 * 255 / 127)
    # an asymmetric UINT8 range [-zp*s, (255-zp)*s] becomes the symmetric signed range covering it
    fixed2, _ = to_tensorrt_int8(qdq_graph(act_dtype=np.uint8, act_zp=100))
    s2 = {i.name: numpy_helper.to_array(i) for i in fixed2.graph.initializer}["a_scale"]
    assert np.isclose(s2, max(100, 155) * 0.02 / 127)


def test_converted_nncf_output_passes_and_runs_close_to_the_original(built):
    import onnxruntime as ort

    from edgeskin.bundle import BundleReader

    raw = onnx.load_from_string(BundleReader(built.int8).read("model.onnx"))
    before = validate_tensorrt_onnx(raw, max_opset=17, lint=False)
    assert not _rules(before)["int8"].passed  # NNCF keeps post-ReLU activations UINT8
    fixed, _ = to_tensorrt_int8(raw)
    assert validate_tensorrt_onnx(fixed, max_opset=17).passed
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    a = ort.InferenceSession(raw.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    b = ort.InferenceSession(fixed.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert np.abs(a - b).max() < 0.25 * (np.abs(a).max() + 1e-6)


# ---------------------------------------------------------------- profiles

def test_profiles_cover_the_jetson_modules_and_jetpacks():
    profiles = load_profiles()
    for name in ("jetson-orin-nano", "jetson-orin-nx", "jetson-agx-orin", "jetson-xavier-nx"):
        p = profiles[name]
        assert p.kind == "jetson" and p.target == "jetson" and "int8" in p.precisions
        assert p.jetpack().max_opset >= 13 and p.budget["top1"] > 0 and p.max_latency_ms
    assert get_profile("xavier-nx").jetpack("4.6").tensorrt == "8.2"
    assert get_profile("xavier-nx").jetpack("4.6").max_opset == 13
    assert get_profile("orin-nano").jetpack("5.1").tensorrt == "8.5"
    assert get_profile("agx-orin").dla_cores == 2 and get_profile("orin-nano").dla_cores == 0
    with pytest.raises(ConfigError, match="did you mean 'jetson-orin-nano'"):
        get_profile("jetson-orin-nan")
    with pytest.raises(ConfigError, match="JetPack 6.1"):
        get_profile("xavier-nx").jetpack("6.1")


def test_user_profiles_folder_adds_devices_and_bad_files_are_named(tmp_path, monkeypatch):
    (tmp_path / "mine.toml").write_text('name = "my-box"\nkind = "cpu"\ntarget = "cpu"\nprecisions = ["fp32"]\n')
    monkeypatch.setenv("EDGESKIN_DEVICES", str(tmp_path))
    assert get_profile("my-box").target == "cpu"
    (tmp_path / "broken.toml").write_text('name = "x"\nkind = "jetson"\n')
    with pytest.raises(ConfigError, match="broken.toml.*jetpack"):
        load_profiles()


def test_devices_cli_lists_profiles_and_suggests():
    r = run_cli("devices")
    assert r.returncode == 0, r.stderr
    for name in ("jetson-orin-nano", "jetson-agx-orin", "jetson-xavier-nx", "8.2", "10.3"):
        assert name in r.stdout
    r = run_cli("devices", "--show", "orin-nx")
    assert r.returncode == 0 and '"dla_cores": 2' in r.stdout
    r = run_cli("devices", "--show", "orin-nxx")
    assert r.returncode == 2 and "did you mean" in r.stderr


# ---------------------------------------------------------------- compile

@pytest.fixture(scope="module")
def jetson_int8(built, tmp_path_factory):
    from edgeskin.calibration import read_calibration_set
    from edgeskin.data import load_dataset, read_split
    from edgeskin.targets import get_target

    out = tmp_path_factory.mktemp("jetson") / "int8.edgeskin"
    return get_target("trt").compile(built.model_dir, precision="int8", dataset=load_dataset(built.data),
                                     split=read_split(built.split_file), out=out,
                                     calibration=read_calibration_set(built.calib_file), force=True, threads=1,
                                     device="orin-nx", jetpack="5.1")


def test_tiny_model_compiles_to_a_jetson_int8_bundle(jetson_int8):
    from edgeskin.bundle import BundleReader

    m = jetson_int8.manifest
    assert m.target == "jetson" and m.precision == "int8"
    e = m.engine
    assert e["name"] == "tensorrt" and e["format"] == "onnx-qdq" and e["tensorrt"] == "8.5" and e["opset"] == 17
    assert e["device"] == "jetson-orin-nx" and e["dla_cores"] == 2 and e["precision_flags"] == ["INT8", "FP16"]
    assert e["trtexec"].startswith("trtexec --onnx=model.onnx") and "--int8" in e["trtexec"]
    assert "--minShapes=input:1x3x32x32" in e["trtexec"] and "--maxShapes=input:8x3x32x32" in e["trtexec"]
    checks = m.provenance["artefact_checks"]["tensorrt_form"]
    assert checks["passed"] and {r["rule"] for r in checks["rules"]} >= {"int8", "polygraphy lint"}
    assert m.provenance["quantization"]["tensorrt_form"]["quantizers_converted"] > 0
    assert m.provenance["device"]["jetpack"]["tensorrt"] == "8.5"
    proto = onnx.load_from_string(BundleReader(jetson_int8.bundle).read("model.onnx"))
    assert validate_tensorrt_onnx(proto, max_opset=17, lint=False).passed
    assert 0 <= m.accuracy["top1_agreement"] <= 1


@pytest.mark.parametrize("device, jetpack, opset", [("xavier-nx", "4.6", 13), ("orin-nano", "6.0", 17),
                                                      ("agx-orin", "6.1", 20)])
def test_each_profile_opset_is_honoured(built, tmp_path, device, jetpack, opset):
    from edgeskin.data import load_dataset, read_split
    from edgeskin.targets import get_target

    res = get_target("jetson").compile(built.model_dir, precision="fp16", dataset=load_dataset(built.data),
                                       split=read_split(built.split_file), out=tmp_path / "b.edgeskin",
                                       threads=1, device=device, jetpack=jetpack)
    from edgeskin.bundle import BundleReader

    proto = onnx.load_from_string(BundleReader(res.bundle).read("model.onnx"))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [opset]
    assert res.manifest.engine["opset"] == opset and "--fp16" in res.manifest.engine["trtexec"]
    with pytest.raises(ConfigError, match="opset"):
        get_target("jetson").compile(built.model_dir, precision="fp16", dataset=load_dataset(built.data),
                                     split=read_split(built.split_file), out=tmp_path / "c.edgeskin",
                                     device=device, jetpack=jetpack, opset=opset + 1)


def test_host_proxy_runs_the_jetson_bundle_and_says_so(jetson_int8):
    from edgeskin.runtime import load, selftest

    with load(jetson_int8.bundle) as pred:
        if not HAS_TRT:
            assert pred.host_proxy and pred.backend.name.startswith("onnxruntime")
        r = selftest(pred)
    assert r.passed and r.max_abs_diff <= r.tolerance


def test_bundle_verify_runs_the_tensorrt_validator(jetson_int8, tmp_path):
    bundle = tmp_path / "b.edgeskin"
    shutil.copytree(jetson_int8.bundle, bundle)
    r = run_cli("bundle", "verify", str(bundle))
    assert r.returncode == 0, r.stderr
    assert "TensorRT form" in r.stdout and "polygraphy lint" in r.stdout
    # swap in a graph with a UINT8 quantizer (re-hashed, so only the validator can notice)
    from edgeskin.bundle import BundleReader, write_bundle

    reader = BundleReader(bundle)
    files = {n: reader.read(n) for n in reader.manifest.files}
    files["model.onnx"] = qdq_graph(act_dtype=np.uint8).SerializeToString()
    write_bundle(bundle, reader.manifest, files, overwrite=True)
    r = run_cli("bundle", "verify", str(bundle))
    assert r.returncode != 0 and "int8" in r.stderr and "in_q" in r.stderr


def test_cpu_device_is_refused_by_the_jetson_target(built, tmp_path):
    from edgeskin.data import load_dataset, read_split
    from edgeskin.targets import get_target

    with pytest.raises(ConfigError, match="not a jetson"):
        get_target("jetson").compile(built.model_dir, precision="fp16", dataset=load_dataset(built.data),
                                     split=read_split(built.split_file), out=tmp_path / "b.edgeskin",
                                     device="generic-cpu")


# ---------------------------------------------------------------- the engine on the device

def test_engine_records_from_another_tensorrt_or_gpu_ask_for_a_rebuild():
    from edgeskin.runtime.tensorrt import EngineMismatch, pick_engine

    engines = [{"file": "a.plan", "tensorrt": "8.5.2", "gpu": "Orin", "sha256": "x", "precision": "int8"}]
    assert pick_engine(engines, tensorrt="8.5.2", gpu="Orin", precision="int8")["file"] == "a.plan"
    with pytest.raises(EngineMismatch, match="rebuild"):
        pick_engine(engines, tensorrt="10.3.0", gpu="Orin", precision="int8")
    with pytest.raises(EngineMismatch, match="Xavier"):
        pick_engine(engines, tensorrt="8.5.2", gpu="Xavier", precision="int8")
    assert pick_engine([], tensorrt="8.5.2", gpu="Orin", precision="int8") is None


@pytest.mark.hardware
@pytest.mark.skipif(not HAS_TRT, reason="TensorRT is not installed here (it ships with JetPack on the Jetson); "
                                        "the engine build and the tensorrt backend run on the device")
def test_engine_build_on_the_device(jetson_int8, tmp_path):  # pragma: no cover - needs a Jetson
    from edgeskin.runtime import load, selftest
    from edgeskin.runtime.tensorrt import build_engine

    bundle = tmp_path / "b.edgeskin"
    shutil.copytree(jetson_int8.bundle, bundle)
    rec = build_engine(bundle, timing_cache=tmp_path / "timing.cache")
    assert rec["sha256"] and rec["tensorrt"] and rec["gpu"] and (tmp_path / "timing.cache").is_file()
    with load(bundle) as pred:
        assert not pred.host_proxy and pred.backend.name == "tensorrt"
        assert selftest(pred).passed
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["engine"]["engines"][0]["file"] in manifest["files"]


def test_predict_on_a_jetson_bundle_says_host_proxy_and_engine_tensorrt_needs_tensorrt(jetson_int8, built):
    img = next(built.data.rglob("*.jpg"))
    r = run_cli("predict", str(img), "--bundle", str(jetson_int8.bundle), "--json")
    assert r.returncode == 0, r.stderr
    if not HAS_TRT:
        assert "host proxy" in r.stderr
        r = run_cli("predict", str(img), "--bundle", str(jetson_int8.bundle), "--engine", "tensorrt")
        assert r.returncode == 2 and "tensorrt" in r.stderr.lower() and "JetPack" in r.stderr


@pytest.mark.skipif(HAS_TRT, reason="checks the message a machine without TensorRT gives")
def test_engine_build_without_tensorrt_says_where_tensorrt_comes_from(jetson_int8, tmp_path):
    bundle = tmp_path / "b.edgeskin"
    shutil.copytree(jetson_int8.bundle, bundle)
    r = run_cli("engine", "build", str(bundle))
    assert r.returncode == 2 and "JetPack" in r.stderr
    assert json.loads((bundle / "manifest.json").read_text())["engine"]["engines"] == []  # nothing half-written
