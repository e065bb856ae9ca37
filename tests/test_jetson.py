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


@pytest.mark.parametrize("device, jetpack, opset", [("xavier-nx", "5.1", 17), ("orin-nano", "6.0", 17),
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


# ================================================================ TensorRT through the test double
#
# tests/tensorrt_double.py simulates TensorRT's and cuda-python's documented glue and runs the
# real ONNX graph in ONNX Runtime. The contract tests below run against the real TensorRT where
# it is installed too, so the double can be caught lying.

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import tensorrt_double as trtd  # noqa: E402
from conftest import make_ham_tree  # noqa: E402

DOUBLE_VERSIONS = ["8.5", "10.3", "10.13", "11.0"]


@pytest.fixture()
def double(monkeypatch, tmp_path):
    """Install the double for one TensorRT version and board in this process; undone after."""
    if HAS_TRT:
        pytest.skip("a real TensorRT is installed: the double never replaces it")
    def use(version: str = "10.3", board: str = "orin-nano"):
        mods = trtd.install(version, board=board)
        monkeypatch.setenv("EDGESKIN_DEVICE_TREE", str(trtd.device_tree(tmp_path / f"dt-{board}", board)))
        monkeypatch.setenv("EDGESKIN_CACHE", str(tmp_path / "cache"))
        return mods["tensorrt"]

    yield use
    trtd.uninstall()


def tiny_onnx(*, opset: int = 17, dynamic: bool = True, fp16: bool = False) -> bytes:
    """input (N, 3, 8, 8) -> Conv -> Relu -> GlobalAveragePool -> Flatten -> (N, 4)."""
    rng = np.random.default_rng(1)
    n = "N" if dynamic else 1
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [n, 3, 8, 8])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [n, 4])
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["logits"])]
    m = helper.make_model(helper.make_graph(nodes, "tiny", [x], [y], [w]),
                          opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    if fp16:
        from edgeskin.quantize.tensorrt import to_fp16_tensors

        m, _ = to_fp16_tensors(m)
    return m.SerializeToString()


def contract_build(trt, model: bytes, *, lo=1, opt=1, hi=8, dla: int | None = None, strong: bool = False,
                   flags=("FP16",)):
    """A build written only from TensorRT's documentation (independent of edgeskin's)."""
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    nflags = 0
    if int(trt.__version__.split(".")[0]) < 10:
        nflags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if strong:
        nflags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(nflags)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(model), [parser.get_error(i) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    for f in flags:
        config.set_flag(getattr(trt.BuilderFlag, f))
    if dla is not None:  # no GPU fallback: a layer the DLA cannot take fails the build
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = dla
    profile = builder.create_optimization_profile()
    profile.set_shape("input", (lo, 3, 8, 8), (opt, 3, 8, 8), (hi, 3, 8, 8))
    config.add_optimization_profile(profile)
    return builder.build_serialized_network(network, config)


@pytest.fixture(params=["real"] + DOUBLE_VERSIONS)
def trt_api(request):
    """The real tensorrt where installed (then the simulated releases skip), else each simulated
    release."""
    if request.param == "real":
        if not HAS_TRT:
            pytest.skip("TensorRT is not installed here; the contract runs against the double's releases")
        import tensorrt

        return tensorrt
    return request.getfixturevalue("double")(request.param, board="agx-orin")


def _strong(trt) -> bool:
    return int(trt.__version__.split(".")[0]) >= 11


class TestTensorRTContract:
    """TensorRT's documented behaviour that edgeskin relies on. Runs against the real TensorRT
    wherever it is installed, so the double cannot drift from it unnoticed."""

    def _engine(self, trt, **kw):
        plan = contract_build(trt, tiny_onnx(), strong=_strong(trt), flags=() if _strong(trt) else ("FP16",), **kw)
        assert plan is not None
        return trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(bytes(plan))

    def test_set_input_shape_is_false_outside_the_profile(self, trt_api):
        ctx = self._engine(trt_api).create_execution_context()
        assert ctx.set_input_shape("input", (8, 3, 8, 8)) is True
        assert ctx.set_input_shape("input", (9, 3, 8, 8)) is False
        assert ctx.set_input_shape("input", (0, 3, 8, 8)) is False

    def test_output_shape_is_unresolved_until_the_inputs_are_set(self, trt_api):
        engine = self._engine(trt_api)
        ctx = engine.create_execution_context()
        assert tuple(ctx.get_tensor_shape("logits"))[0] == -1
        assert ctx.set_input_shape("input", (3, 3, 8, 8))
        assert tuple(ctx.get_tensor_shape("logits")) == (3, 4)
        assert [tuple(s) for s in engine.get_tensor_profile_shape("input", 0)] == [(1, 3, 8, 8), (1, 3, 8, 8),
                                                                                    (8, 3, 8, 8)]

    def test_dla_requires_static_shapes(self, trt_api):
        if trt_api.Builder(trt_api.Logger(trt_api.Logger.ERROR)).num_DLA_cores == 0:
            pytest.skip("no DLA on this device")
        flags = () if _strong(trt_api) else ("FP16",)
        assert contract_build(trt_api, tiny_onnx(), dla=0, strong=_strong(trt_api), flags=flags) is None
        assert contract_build(trt_api, tiny_onnx(), lo=4, opt=4, hi=4, dla=0, strong=_strong(trt_api),
                              flags=flags) is not None

    def test_precision_flags_and_strong_typing(self, trt_api):
        major, minor = (int(p) for p in trt_api.__version__.split(".")[:2])
        if major >= 11:  # removed in 11.x: the migration guide's list of removed Python APIs
            assert not hasattr(trt_api.BuilderFlag, "FP16") and not hasattr(trt_api.BuilderFlag, "INT8")
        else:
            assert hasattr(trt_api.BuilderFlag, "FP16") and hasattr(trt_api.BuilderFlag, "INT8")
        if (major, minor) >= (10, 0):
            assert contract_build(trt_api, tiny_onnx(opset=20, fp16=True), strong=True, flags=()) is not None
        if (major, minor) >= (10, 0) and major < 11:  # precision flags are refused on a strongly typed network
            assert contract_build(trt_api, tiny_onnx(), strong=True, flags=("FP16",)) is None

    def test_a_serialized_engine_keeps_what_it_was_built_for(self, trt_api):
        engine = self._engine(trt_api)
        again = trt_api.Runtime(trt_api.Logger(trt_api.Logger.ERROR)).deserialize_cuda_engine(bytes(engine.serialize()))
        assert again is not None and again.num_io_tensors == 2
        if hasattr(trt_api, "__double__"):
            assert again.built_on == {"name": "Orin", "cc": [8, 7], "sm": 16}
            other = trtd.build_modules(next(v for v in DOUBLE_VERSIONS if trtd.VERSIONS[v]["version"]
                                            != trt_api.__version__), board="agx-orin")["tensorrt"]
            assert other.Runtime(other.Logger()).deserialize_cuda_engine(bytes(engine.serialize())) is None
            xavier = trtd.build_modules(next(k for k, v in trtd.VERSIONS.items() if v["version"] == trt_api.__version__),
                                        board="xavier-nx")["tensorrt"]
            assert xavier.Runtime(xavier.Logger()).deserialize_cuda_engine(bytes(engine.serialize())) is None

    def test_timing_cache_results_are_reported(self, trt_api):
        builder = trt_api.Builder(trt_api.Logger(trt_api.Logger.ERROR))
        config = builder.create_builder_config()
        assert config.get_timing_cache() is None
        assert config.set_timing_cache(config.create_timing_cache(b""), False) is True
        assert config.get_timing_cache() is not None


# ---------------------------------------------------------------- edgeskin's engine path, defect by defect

def _bundle_copy(src, tmp_path, name="b.edgeskin") -> Path:
    dest = tmp_path / name
    shutil.copytree(src, dest)
    return dest


@pytest.fixture(scope="module")
def golden_inputs(jetson_int8):
    from edgeskin.bundle import BundleReader

    return BundleReader(jetson_int8.bundle).golden()["inputs"].astype(np.float32)


def _proxy_probs(bundle, x):
    from edgeskin.runtime import load

    with load(bundle, engine="onnxruntime") as p:
        return p.probabilities(x)


def test_batches_above_the_profile_maximum_run_in_slices_in_order(double, jetson_int8, tmp_path):
    from edgeskin.runtime import load
    from edgeskin.runtime.tensorrt import build_engine

    double("10.3", board="orin-nx-16")
    bundle = _bundle_copy(jetson_int8.bundle, tmp_path)
    build_engine(bundle, timing_cache=tmp_path / "tc")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((33, 3, 32, 32)).astype(np.float32)
    want = _proxy_probs(bundle, x)
    with load(bundle) as pred:  # a fresh context, first call above the maximum
        assert pred.backend.name == "tensorrt"
        np.testing.assert_allclose(pred.probabilities(x[:16]), want[:16], atol=1e-6)
        assert pred.backend.max_batch == 8
    with load(bundle) as pred:
        got = pred.predict(list(x))  # the predictor's default batches of 16
        np.testing.assert_allclose(np.stack([r.probs for r in got]), want, atol=1e-6)
        runs = pred.backend.context.runs
        assert max(runs) == 8 and sum(runs[-5:]) == 33  # 16 + 16 + 1 as 8, 8 | 8, 8 | 1


def test_after_a_smaller_batch_a_larger_one_is_not_cut_short(double, jetson_int8, tmp_path):
    """TensorRT keeps the last accepted shape when it refuses one: ignoring that ran only the
    first N images and zip() attached their probabilities to the wrong images."""
    from edgeskin.runtime import load
    from edgeskin.runtime.tensorrt import build_engine

    double("8.5", board="orin-nx-16")
    bundle = _bundle_copy(jetson_int8.bundle, tmp_path)
    build_engine(bundle, timing_cache=tmp_path / "tc")
    x = np.random.default_rng(1).standard_normal((12, 3, 32, 32)).astype(np.float32)
    want = _proxy_probs(bundle, x)
    with load(bundle) as pred:
        np.testing.assert_allclose(pred.probabilities(x[:3]), want[:3], atol=1e-6)
        twelve = pred.predict(list(x))
        assert len(twelve) == 12
        np.testing.assert_allclose(np.stack([r.probs for r in twelve]), want, atol=1e-6)


def test_a_refused_input_shape_is_an_error_not_a_short_answer(double, jetson_int8, tmp_path, monkeypatch):
    from edgeskin.errors import EdgeskinError
    from edgeskin.runtime import load
    from edgeskin.runtime.tensorrt import build_engine

    double("8.5", board="orin-nx-16")
    bundle = _bundle_copy(jetson_int8.bundle, tmp_path)
    build_engine(bundle, timing_cache=tmp_path / "tc")
    with load(bundle) as pred:
        monkeypatch.setattr(pred.backend, "max_batch", 16, raising=False)  # as if the profile allowed more
        with pytest.raises(EdgeskinError, match="refused input shape"):
            pred.probabilities(np.zeros((12, 3, 32, 32), np.float32))


def test_buffers_are_allocated_once_per_context_in_pinned_memory(double, jetson_int8, tmp_path):
    from edgeskin.runtime import load
    from edgeskin.runtime.tensorrt import build_engine

    trt = double("10.3", board="orin-nano")
    bundle = _bundle_copy(jetson_int8.bundle, tmp_path)
    build_engine(bundle, timing_cache=tmp_path / "tc")
    cudart = trt.__double__.cudart
    with load(bundle) as pred:
        before = dict(cudart.stats)
        assert before["cudaMallocHost"] >= 2
        x = np.zeros((1, 3, 32, 32), np.float32)
        for _ in range(20):
            pred.logits(x)
        pred.logits(np.zeros((20, 3, 32, 32), np.float32))
        assert cudart.stats["cudaMalloc"] == before["cudaMalloc"]
        assert cudart.stats["cudaMallocHost"] == before["cudaMallocHost"]
        assert cudart.stats["cudaFree"] == before["cudaFree"]
    assert cudart.stats["cudaFree"] == cudart.stats["cudaMalloc"]  # closing frees them
    assert cudart.stats["cudaFreeHost"] == cudart.stats["cudaMallocHost"]


def test_timing_cache_results_are_checked(double, jetson_int8, tmp_path, monkeypatch):
    from edgeskin.runtime.tensorrt import build_engine

    double("10.3", board="orin-nano")
    bundle = _bundle_copy(jetson_int8.bundle, tmp_path)
    cache = tmp_path / "tc"
    cache.write_text('{"tensorrt": "8.5.2.2", "device": {}, "entries": 7}')  # another TensorRT's cache
    rec = build_engine(bundle, timing_cache=cache)
    assert rec["timing_cache"]["rejected"] and rec["timing_cache"]["saved"]
    assert json.loads(cache.read_text())["tensorrt"] == "10.3.0.30"  # a fresh cache replaced it
    rec = build_engine(bundle, timing_cache=cache, rebuild=True)
    assert rec["timing_cache"]["loaded"] and not rec["timing_cache"].get("rejected")
    # get_timing_cache() may return None (no cache kept): the build goes on, no file written
    monkeypatch.setattr(trtd.IBuilderConfig, "get_timing_cache", lambda self: None)
    other = tmp_path / "tc2"
    rec = build_engine(bundle, timing_cache=other, rebuild=True)
    assert rec["timing_cache"]["saved"] is False and not other.exists()


def test_engines_are_keyed_on_the_board_not_the_gpu_name(double, jetson_int8, tmp_path):
    from edgeskin.runtime import load
    from edgeskin.runtime.tensorrt import EngineMismatch, build_engine, default_timing_cache, device_identity

    double("10.3", board="agx-orin")
    bundle = _bundle_copy(jetson_int8.bundle, tmp_path)
    rec = build_engine(bundle)
    agx = device_identity()
    assert rec["device"]["board"].startswith("NVIDIA Jetson AGX Orin") and rec["gpu"] == "Orin"
    double("10.3", board="orin-nano")  # the same GPU name "Orin" and compute capability 8.7
    nano = device_identity()
    assert nano["gpu"] == agx["gpu"] and nano["compute_capability"] == agx["compute_capability"]
    with pytest.raises(EngineMismatch, match="AGX Orin"):
        load(bundle)
    assert default_timing_cache("10.3.0.30", agx) != default_timing_cache("10.3.0.30", nano)
    # Orin NX 8 GB and Orin Nano 8 GB: same GPU, SM count and memory; only the board differs
    a, b = trtd.BOARDS["orin-nx-8"], trtd.BOARDS["orin-nano"]
    assert (a["name"], a["cc"], a["sm"], a["memory_gb"]) == (b["name"], b["cc"], b["sm"], b["memory_gb"])
    double("10.3", board="orin-nx-8")
    build_engine(bundle)
    double("10.3", board="orin-nano")
    with pytest.raises(EngineMismatch):
        load(bundle)


def test_engine_records_from_another_tensorrt_or_device_ask_for_a_rebuild():
    from edgeskin.runtime.tensorrt import EngineMismatch, pick_engine

    agx = {"board": "NVIDIA Jetson AGX Orin Developer Kit", "gpu": "Orin", "compute_capability": "8.7",
           "sm_count": 16}
    nano = {**agx, "board": "NVIDIA Jetson Orin Nano Developer Kit", "sm_count": 8}
    engines = [{"file": "a.plan", "tensorrt": "8.5.2", "device": agx, "precision": "fp16", "dla_core": None},
               {"file": "d.plan", "tensorrt": "8.5.2", "device": agx, "precision": "fp16", "dla_core": 0}]
    assert pick_engine(engines, tensorrt="8.5.2", device=agx, precision="fp16")["file"] == "a.plan"
    assert pick_engine(engines, tensorrt="8.5.2", device=agx, precision="fp16", dla_core=0)["file"] == "d.plan"
    with pytest.raises(EngineMismatch, match="rebuild"):
        pick_engine(engines, tensorrt="10.3.0", device=agx)
    with pytest.raises(EngineMismatch, match="Orin Nano"):
        pick_engine(engines, tensorrt="8.5.2", device=nano)
    with pytest.raises(EngineMismatch, match="DLA core 1"):
        pick_engine(engines, tensorrt="8.5.2", device=agx, dla_core=1)
    assert pick_engine([], tensorrt="8.5.2", device=agx) is None


@pytest.fixture(scope="module")
def jetson_fp16(built, tmp_path_factory):
    from edgeskin.data import load_dataset, read_split
    from edgeskin.targets import get_target

    return get_target("jetson").compile(built.model_dir, precision="fp16", dataset=load_dataset(built.data),
                                        split=read_split(built.split_file),
                                        out=tmp_path_factory.mktemp("jfp16") / "fp16.edgeskin", threads=1,
                                        device="orin-nx", jetpack="6.2")


def test_dla_builds_static_shapes_only_where_the_profile_has_a_dla(double, jetson_fp16, jetson_int8, tmp_path):
    from edgeskin.runtime import load
    from edgeskin.runtime.tensorrt import build_engine

    assert jetson_fp16.manifest.engine["dla"] is True and jetson_fp16.manifest.engine["dla_cores"] == 2
    trt = double("10.3", board="orin-nx-16")
    bundle = _bundle_copy(jetson_fp16.bundle, tmp_path)
    gpu = build_engine(bundle)
    dla = build_engine(bundle, dla=0)
    assert dla["batch"] == {"min": 1, "opt": 1, "max": 1} and gpu["batch"]["max"] == 8
    plan = trt.Runtime(trt.Logger()).deserialize_cuda_engine((bundle / dla["file"]).read_bytes())
    assert plan.header["dla_core"] == 0  # on the DLA, not fallen back to the GPU
    x = np.random.default_rng(0).standard_normal((9, 3, 32, 32)).astype(np.float32)
    want = _proxy_probs(bundle, x)
    with load(bundle, dla_core=0) as pred:  # the DLA engine, not refused, static batch 1
        assert pred.backend.max_batch == 1
        np.testing.assert_allclose(pred.probabilities(x), want, atol=1e-6)
    with load(bundle) as pred:  # the GPU engine
        assert pred.backend.max_batch == 8
    # an int8 bundle rebuilt "as fp16" would record an engine that is not what it says
    with pytest.raises(ConfigError, match="int8 bundle"):
        build_engine(_bundle_copy(jetson_int8.bundle, tmp_path, "i.edgeskin"), precision="fp16")
    # a device profile without a DLA (Orin Nano): asked for nothing, refused before building
    nano = _bundle_copy(jetson_fp16.bundle, tmp_path, "n.edgeskin")
    m = json.loads((nano / "manifest.json").read_text())
    m["engine"].update(dla=False, dla_cores=0, device="jetson-orin-nano")
    (nano / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ConfigError, match="no DLA"):
        build_engine(nano, dla=0)


def test_trtexec_line_follows_the_tensorrt_version():
    from edgeskin.targets.jetson import trtexec_command

    kw = dict(model_file="m.onnx", engine_file="m.plan", input_name="input", size=32, layout="NCHW",
              workspace_mb=512)
    old = trtexec_command(precision="int8", tensorrt="8.5", **kw)
    assert "--int8" in old and "--fp16" in old and "--stronglyTyped" not in old
    for v in ("10.13", "11.0"):
        new = trtexec_command(precision="int8", tensorrt=v, **kw)
        assert "--stronglyTyped" in new and "--int8" not in new and "--fp16" not in new
    dla = trtexec_command(precision="fp16", tensorrt="10.3", dla_core=0, **kw)
    assert "--minShapes=input:1x3x32x32" in dla and "--maxShapes=input:1x3x32x32" in dla


@pytest.fixture(scope="module")
def jetson_thor_int8(built, tmp_path_factory):
    from edgeskin.calibration import read_calibration_set
    from edgeskin.data import load_dataset, read_split
    from edgeskin.targets import get_target

    out = tmp_path_factory.mktemp("thor") / "int8.edgeskin"
    return get_target("jetson").compile(built.model_dir, precision="int8", dataset=load_dataset(built.data),
                                        split=read_split(built.split_file), out=out,
                                        calibration=read_calibration_set(built.calib_file), force=True, threads=1,
                                        device="agx-thor", jetpack="7.0")


def test_strongly_typed_releases_get_fp16_tensors_and_no_precision_flags(double, jetson_thor_int8, jetson_int8,
                                                                        tmp_path):
    from edgeskin.bundle import BundleReader
    from edgeskin.runtime.tensorrt import build_engine

    e = jetson_thor_int8.manifest.engine
    assert e["typing"] == "strong" and e["float_tensors"] == "float16" and e["precision_flags"] == []
    assert "--stronglyTyped" in e["trtexec"] and "--int8" not in e["trtexec"] and e["opset"] >= 19
    proto = onnx.load_from_string(BundleReader(jetson_thor_int8.bundle).read("model.onnx"))
    kinds = {i.data_type for i in proto.graph.initializer}
    assert TensorProto.FLOAT16 in kinds and TensorProto.FLOAT not in kinds
    assert proto.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # the app still feeds FP32
    for version in ("10.13", "11.0"):
        trt = double(version, board="agx-thor")
        bundle = _bundle_copy(jetson_thor_int8.bundle, tmp_path, f"t{version}.edgeskin")
        rec = build_engine(bundle)
        assert rec["typing"] == "strong" and rec["builder_flags"] == []
        engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine((bundle / rec["file"]).read_bytes())
        assert engine.float_precision == "fp16" and engine.header["strongly_typed"]
        # a bundle compiled for a weakly typed JetPack would run its float layers in FP32 here
        with pytest.raises(ConfigError, match="silently run them in FP32"):
            build_engine(_bundle_copy(jetson_int8.bundle, tmp_path, f"w{version}.edgeskin"))


def test_fp16_tensors_keep_the_graph_close_to_fp32():
    import onnxruntime as ort

    from edgeskin.quantize.tensorrt import to_fp16_tensors

    m = onnx.load_from_string(tiny_onnx(opset=20))
    half, rec = to_fp16_tensors(m)
    assert rec["float_tensors"] == "float16"
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    a = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    b = ort.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert b.dtype == np.float32 and np.abs(a - b).max() < 1e-2
    with pytest.raises(Exception, match="opset 19"):
        to_fp16_tensors(qdq_graph(opset=17))


@pytest.mark.skipif(HAS_TRT, reason="a real TensorRT is installed: the double never replaces it (the hardware "
                                     "test runs these steps there)")
def test_bundle_verify_on_a_device_with_only_the_runtime(jetson_int8, tmp_path):
    env = trtd.subprocess_env(tmp_path, "8.5", board="orin-nx-16")
    r = subprocess.run([sys.executable, "-m", "edgeskin", "bundle", "verify", str(jetson_int8.bundle)],
                       capture_output=True, text=True, env={**env, "COLUMNS": "200"}, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "files verified" in r.stdout and "not checked here" in r.stdout and "passed" in r.stdout


def test_tensorrt_of_jetpack_4_6_is_refused_with_what_to_do(double, jetson_int8, tmp_path):
    from edgeskin.runtime.tensorrt import build_engine

    double("8.2", board="xavier-nx")
    with pytest.raises(ConfigError, match="JetPack 4.6") as exc:
        build_engine(_bundle_copy(jetson_int8.bundle, tmp_path))
    assert "8.5" in exc.value.message and "JetPack 5.1" in exc.value.hint


def test_jetson_power_state_reads_nvpmodel_and_the_clocks(tmp_path, monkeypatch):
    from edgeskin.runtime.tensorrt import jetson_power_state

    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "nvpmodel").write_text("#!/bin/sh\necho 'NV Power Mode: MAXN'\necho 0\n")
    (bin_ / "nvpmodel").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{os.environ['PATH']}")
    sysfs = tmp_path / "sys"
    cpu = sysfs / "devices/system/cpu/cpu0/cpufreq"
    gpu = sysfs / "class/devfreq/17000000.ga10b"
    for d in (cpu, gpu):
        d.mkdir(parents=True)
    (cpu / "scaling_min_freq").write_text("2201600\n")
    (cpu / "cpuinfo_max_freq").write_text("2201600\n")
    (gpu / "min_freq").write_text("1300500000\n")
    (gpu / "max_freq").write_text("1300500000\n")
    assert jetson_power_state(sysfs=str(sysfs)) == {"power_mode": "MAXN", "power_mode_id": 0, "clocks_locked": True}
    (gpu / "min_freq").write_text("306000000\n")
    assert jetson_power_state(sysfs=str(sysfs))["clocks_locked"] is False
    assert jetson_power_state(sysfs=str(tmp_path / "none"))["clocks_locked"] is None


def test_profiles_state_python_tensorrt_cuda_opset_and_the_cuda_python_pin():
    profiles = load_profiles()
    for p in (p for p in profiles.values() if p.kind == "jetson"):
        for jp in p.jetpacks:
            assert jp.python and jp.tensorrt and jp.cuda and jp.max_opset, (p.name, jp.version)
            if not jp.supported:
                continue
            cuda_major = int(jp.cuda.split(".")[0])
            assert jp.cuda_python.startswith("cuda-python>=") and f">={cuda_major}." in jp.cuda_python \
                and f"<{cuda_major + 1}" in jp.cuda_python.replace(f"<{cuda_major}.", f"<{cuda_major + 1}"), jp
            assert tuple(int(v) for v in jp.python.split(".")) >= (3, 8)
    assert get_profile("orin-nano").jetpack("6.2").tensorrt == "10.3" and get_profile("orin-nano").jetpack("6.2").cuda == "12.6"
    thor = get_profile("agx-thor").jetpack("7.0")
    assert thor.typing == "strong" and thor.cuda == "13.0" and thor.python == "3.12"
    assert get_profile("agx-orin").jetpack("7.1").typing == "strong"
    assert get_profile("orin-nano").jetpack("5.1").python == "3.8" and get_profile("orin-nano").jetpack("5.1").cuda == "11.4"
    with pytest.raises(ConfigError, match="Python 3.6"):
        get_profile("xavier-nx").jetpack("4.6")


# ---------------------------------------------------------------- the validator and the conversion

def test_validator_refuses_int8_weights_of_minus_128_and_non_positive_scales():
    m = qdq_graph()
    for t in m.graph.initializer:
        if t.name == "w_q":
            w = numpy_helper.to_array(t).copy()
            w.flat[0] = -128
            t.CopyFrom(numpy_helper.from_array(w, "w_q"))
    rep = validate_tensorrt_onnx(m, max_opset=17, lint=False)
    assert [r.rule for r in rep.failures()] == ["weights-range"] and "conv" in rep.failures()[0].nodes[0]
    m = qdq_graph()
    for t in m.graph.initializer:
        if t.name == "a_scale":
            t.CopyFrom(numpy_helper.from_array(np.array(0.0, np.float32), "a_scale"))
    rep = validate_tensorrt_onnx(m, max_opset=17, lint=False)
    assert "scale-positive" in [r.rule for r in rep.failures()]
    assert any(n.startswith("in_") for n in _rules(rep)["scale-positive"].nodes)


def _weight_op_graph(op: str, axis: int, *, trans_b: int = 0) -> onnx.ModelProto:
    """input -> (MatMul | Gemm | ConvTranspose) with INT8 weights dequantized per channel on ``axis``."""
    if op == "ConvTranspose":
        x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 4, 4])
        w_shape, n_out, out_shape = (3, 5, 3, 3), 5, [1, 5, 6, 6]
    else:
        x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 3])
        w_shape = (5, 3) if (op == "Gemm" and trans_b) else (3, 5)
        n_out, out_shape = 5, [2, 5]
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, out_shape)
    w = np.random.default_rng(0).integers(-127, 128, w_shape).astype(np.int8)
    size = w_shape[axis]
    inits = [numpy_helper.from_array(w, "w_q"), numpy_helper.from_array(np.full(size, 0.01, np.float32), "w_s"),
             numpy_helper.from_array(np.zeros(size, np.int8), "w_z")]
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w"], name="w_dq", axis=axis),
             helper.make_node(op, ["input", "w"], ["out"], name="layer", **({"transB": trans_b} if op == "Gemm" else {}))]
    del n_out
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                             opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("op, good, bad, trans_b", [("MatMul", 1, 0, 0), ("Gemm", 1, 0, 0), ("Gemm", 0, 1, 1),
                                                    ("ConvTranspose", 1, 0, 0)])
def test_validator_checks_the_per_channel_axis_of_each_weight_layer(op, good, bad, trans_b):
    ok = validate_tensorrt_onnx(_weight_op_graph(op, good, trans_b=trans_b), max_opset=17, lint=False)
    assert ok.passed, ok.to_dict()
    rep = validate_tensorrt_onnx(_weight_op_graph(op, bad, trans_b=trans_b), max_opset=17, lint=False)
    assert [r.rule for r in rep.failures()] == ["weights-per-channel"] and rep.failures()[0].nodes[0].startswith("layer")


def _run(model, x):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_conversion_rescales_a_shared_scale_once_per_zero_point():
    m = qdq_graph(act_dtype=np.uint8, act_zp=0)
    # the output quantizer shares the input's scale, with its own UINT8 zero point of 10
    m.graph.initializer.append(numpy_helper.from_array(np.array(10, np.uint8), "o_zp_u8"))
    for n in m.graph.node:
        if n.name in ("relu_q", "relu_dq"):
            n.input[1], n.input[2] = "a_scale", "o_zp_u8"
    # non-negative inputs: a UINT8 input quantizer with zero point 0 clips negatives, its signed form does not
    x = np.abs(np.random.default_rng(0).standard_normal((1, 3, 8, 8))).astype(np.float32)
    fixed, rec = to_tensorrt_int8(m)
    assert validate_tensorrt_onnx(fixed, max_opset=17, lint=False).passed
    inits = {i.name: numpy_helper.to_array(i) for i in fixed.graph.initializer}
    scales = {n.name: inits[n.input[1]] for n in fixed.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    assert np.isclose(scales["in_q"], 0.02 * 255 / 127)  # rescaled once, not twice
    assert np.isclose(scales["relu_q"], 0.02 * 245 / 127) and rec["shared_scales_split"] == 1
    assert np.abs(_run(fixed, x) - _run(m, x)).max() < 0.3  # one step of the coarser signed grids


def test_conversion_rewrites_uint8_weights_with_their_scale():
    m = qdq_graph()
    for t in m.graph.initializer:
        if t.name == "w_q":
            w = numpy_helper.to_array(t).astype(np.int16) + 128
            t.CopyFrom(numpy_helper.from_array(w.astype(np.uint8), "w_q"))
        if t.name == "w_zp":
            t.CopyFrom(numpy_helper.from_array(np.full(4, 128, np.uint8), "w_zp"))
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    fixed, rec = to_tensorrt_int8(m)
    assert rec["weights_rewritten"] == 1
    assert validate_tensorrt_onnx(fixed, max_opset=17, lint=False).passed
    ref = _run(m, x)
    assert np.abs(_run(fixed, x) - ref).max() < 0.05 * (np.abs(ref).max() + 1e-6) + 0.06


# ---------------------------------------------------------------- the documented device steps, per release

#: the command-line package's modules (every command is registered when edgeskin.cli is imported)
CLI_MODULES = ("common", "tables", "train", "members", "compile", "bench", "bundle", "device", "run")
#: the edgeskin modules the device commands may load; tests/test_jetson.py proves each runs on
#: Python 3.8 (vermin) and the flow below proves the device commands load nothing else
DEVICE_MODULES = (
    "edgeskin", "edgeskin.__main__", "edgeskin.errors", "edgeskin.labels", "edgeskin.preprocess",
    "edgeskin.bundle", "edgeskin.fileio", "edgeskin.profiles", "edgeskin.progress", "edgeskin.cli",
    *(f"edgeskin.cli.{m}" for m in CLI_MODULES), "edgeskin.settings", "edgeskin.validate", "edgeskin.budget",
    "edgeskin.targets", "edgeskin.targets.options", "edgeskin.targets.phone",
    "edgeskin.cli_data", "edgeskin.runtime", "edgeskin.runtime.backends", "edgeskin.runtime.predictor",
    "edgeskin.runtime.tensorrt", "edgeskin.runtime.numerics", "edgeskin.bench", "edgeskin.bench.worker", "edgeskin.bench.latency",
    "edgeskin.bench.runner", "edgeskin.bench.report", "edgeskin.bench.reference", "edgeskin.bench.stats",
    "edgeskin.metrics", "edgeskin.data", "edgeskin.data.readers", "edgeskin.data.split", "edgeskin.data.cache",
    "edgeskin.data.fetch", "edgeskin.data.licence", "edgeskin.quiet",
)
#: the modules whose annotations run at import or call time (typer reads the command functions')
EVAL_ANNOTATIONS = (*(f"edgeskin/cli/{m}.py" for m in CLI_MODULES if m != "tables"), "edgeskin/cli_data.py")

DOC = Path(__file__).resolve().parent.parent / "docs" / "jetson.md"
#: simulated TensorRT -> (documented JetPack block, board, which bundle)
FLOW = {"8.5": ("5.1", "orin-nx-16", "jp5"), "10.3": ("6.2", "orin-nano", "jp5"),
        "10.13": ("7.0", "agx-thor", "jp7"), "11.0": ("7.0", "agx-thor", "jp7")}


def documented_steps() -> dict[str, list[str]]:
    """The shell lines of each ``<!-- device-steps jetpack=X -->`` block of docs/jetson.md."""
    import re

    out: dict[str, list[str]] = {}
    for m in re.finditer(r"<!-- device-steps jetpack=(\S+) tensorrt=\S+ -->\n```sh\n(.*?)```", DOC.read_text(), re.S):
        out[m.group(1)] = [ln.strip() for ln in m.group(2).splitlines() if ln.strip()]
    return out


def test_docs_give_device_steps_for_jetpack_5_6_and_7():
    steps = documented_steps()
    assert set(steps) == {"5.1", "6.2", "7.0"}
    for jp, lines in steps.items():
        pip = [ln for ln in lines if ln.startswith("pip install")]
        assert len(pip) == 1 and "[runtime]" in pip[0], jp
        profile = next(p for p in load_profiles().values() if p.kind == "jetson" and
                       any(j.version == jp for j in p.jetpacks))
        assert f"'{profile.jetpack(jp).cuda_python}'" in pip[0], (jp, profile.jetpack(jp).cuda_python)
        assert [ln.split()[1] for ln in lines if ln.startswith("edgeskin ")][:3] == ["bundle", "engine", "selftest"]


def _reference(bundle, data, out):
    """A reference-predictions file for the device bench: the host proxy's probabilities."""
    from edgeskin.bench.reference import ReferencePredictions
    from edgeskin.data import load_dataset
    from edgeskin.runtime import load

    ds = load_dataset(data)
    samples = ds.samples[:40]
    codes = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
    with load(bundle, engine="onnxruntime") as p:
        probs = np.stack([r.probs for r in p.predict([s.path for s in samples])])
    ref = ReferencePredictions([s.image_id for s in samples], codes, np.array([codes.index(s.dx) for s in samples]),
                               {"ensemble": probs}, split="all")
    ref.save(out)
    return probs


@pytest.fixture(scope="module")
def flow_bundles(jetson_int8, jetson_thor_int8):
    return {"jp5": jetson_int8.bundle, "jp7": jetson_thor_int8.bundle}


PREDICT_COUNTS = ((1, 1), (8, 8), (9, 16), (33, 16))  # (images, --batch-size): the profile's max is 8


def _device_flow(version: str, bundles: dict, root: Path) -> dict:
    """Run the documented edgeskin lines for ``version`` on a simulated device, then predict on
    1, 8, 9 and 33 images; return what came out (the test asserts on it)."""
    import shlex

    jp, board, which = FLOW[version]
    tmp = root / version
    work = tmp / "jetson"
    work.mkdir(parents=True)
    bundle = work / "model.edgeskin"
    shutil.copytree(bundles[which], bundle)
    make_ham_tree(work / "images", lesions_per_class=3, seed=1)  # 42 images
    images = sorted((work / "images").rglob("*.jpg"))
    shutil.copyfile(images[0], work / "lesion.jpg")
    ref_probs = _reference(bundle, work / "images", work / "ref.npz")
    log = tmp / "modules.txt"
    env = trtd.subprocess_env(tmp, version, board=board, modules_log=log)
    env.update(COLUMNS="200", OMP_NUM_THREADS="1", EDGESKIN_CACHE=str(tmp / "cache"))
    env.pop("EDGESKIN_DATA", None)

    def edgeskin(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "edgeskin", *args], capture_output=True, text=True, env=env,
                              cwd=work, timeout=300)

    steps = []
    for line in documented_steps()[jp]:
        if line.startswith("edgeskin "):
            steps.append((line, edgeskin(*shlex.split(line)[1:])))
            if steps[-1][1].returncode != 0:
                break
    predicts = []
    if all(r.returncode == 0 for _, r in steps):
        for n, bs in PREDICT_COUNTS:
            files = [str(p) for p in images[:n]]
            predicts.append((files, edgeskin("predict", *files, "--bundle", str(bundle), "--engine", "tensorrt",
                                              "--json", "--batch-size", str(bs))))
    return {"work": work, "bundle": bundle, "board": board, "steps": steps, "predicts": predicts,
            "ref_probs": ref_probs, "modules": log}


@pytest.fixture(scope="module")
def device_flows(flow_bundles, tmp_path_factory):
    """The four simulated releases' flows, two at a time (they are chains of short processes)."""
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path_factory.mktemp("device-flows")
    with ThreadPoolExecutor(max_workers=2) as pool:
        return {v: pool.submit(_device_flow, v, flow_bundles, root) for v in DOUBLE_VERSIONS}


@pytest.mark.skipif(HAS_TRT, reason="a real TensorRT is installed: the double never replaces it (the hardware "
                                     "test runs these steps there)")
@pytest.mark.parametrize("version", DOUBLE_VERSIONS)
def test_the_documented_device_steps_run(version, device_flows):
    """The edgeskin lines of docs/jetson.md for this release, as a device with only the runtime
    extra runs them, through the simulated TensorRT; then predict on 1, 8, 9 and 33 images and
    the bench's probabilities, in order, against the host proxy."""
    flow = device_flows[version].result()
    for line, r in flow["steps"]:
        assert r.returncode == 0, f"{line}\n{r.stdout[-1500:]}\n{r.stderr[-3000:]}"
    assert len(flow["steps"]) == sum(ln.startswith("edgeskin ") for ln in documented_steps()[FLOW[version][0]])
    out = {line.split()[1]: r for line, r in flow["steps"]}
    bundle, work = flow["bundle"], flow["work"]
    assert "not checked here" in out["bundle"].stdout  # onnx is not on the device
    rec = json.loads((bundle / "manifest.json").read_text())["engine"]["engines"][-1]
    assert rec["tensorrt"] == trtd.VERSIONS[version]["version"]
    assert rec["device"]["board"] == trtd.BOARDS[flow["board"]]["model"]
    assert rec["typing"] == ("strong" if version in ("10.13", "11.0") else "weak")
    assert "selftest passed" in out["selftest"].stdout and "tensorrt" in out["selftest"].stdout

    # predict on 1, 8, 9 and 33 images: probabilities in order, as the host proxy gives them
    from edgeskin.runtime import load

    assert [len(files) for files, _ in flow["predicts"]] == [n for n, _ in PREDICT_COUNTS]
    with load(bundle, engine="onnxruntime") as proxy:
        for files, r in flow["predicts"]:
            assert r.returncode == 0, r.stderr[-3000:]
            got = json.loads(r.stdout)
            assert [g["source"] for g in got] == files
            want = np.stack([p.probs for p in proxy.predict(files)])
            probs = np.array([[g["probabilities"][c] for c in proxy.labels] for g in got])
            np.testing.assert_allclose(probs, want, atol=2e-5, err_msg=f"{len(files)} images")

    # the bench ran in device mode: TensorRT, its power state recorded, the same predictions
    report = json.loads((work / "bench" / "report.json").read_text())
    row = next(r for r in report["rows"] if r.get("kind") == "bundle")
    assert row["status"] == "ok", row
    assert row["engine"] == "tensorrt" and not row["host_proxy"] and not row["torch_loaded"]
    assert set(row["device_state"]) == {"power_mode", "power_mode_id", "clocks_locked"}
    assert "device_state" in row["latency_batch1"]
    assert row["top1"] == pytest.approx(float(np.mean(flow["ref_probs"].argmax(1) == np.array(
        [("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc").index(s) for s in _dx(work / "images", 40)]))))
    loaded = set(flow["modules"].read_text().split())
    assert loaded and loaded <= set(DEVICE_MODULES), (
        f"the device commands now load {sorted(loaded - set(DEVICE_MODULES))}: add them to DEVICE_MODULES, "
        "which test_device_modules_need_only_python_3_8 checks for Python 3.8 (JetPack 5)")


def _dx(data, n):
    from edgeskin.data import load_dataset

    return [s.dx for s in load_dataset(data).samples[:n]]


# ---------------------------------------------------------------- Python 3.8 on the device side (JetPack 5)
#
# No Python 3.8 interpreter can be installed on these machines, so two static proofs stand in:
# vermin over every module the device commands load (the list above, which the documented flow
# checks), and the runtime extra's dependencies resolving for CPython 3.8 on aarch64.

REPO_ROOT = Path(__file__).resolve().parent.parent


def _vermin() -> str:
    exe = shutil.which("vermin") or str(Path(sys.executable).parent / "vermin")
    if not Path(exe).exists():
        pytest.fail("vermin is not installed: pip install -e '.[dev]'")
    return exe


def _typer_callbacks() -> list:
    from edgeskin.cli import app

    def walk(t, out):
        out += [c.callback for c in t.registered_commands]
        if t.registered_callback is not None:
            out.append(t.registered_callback.callback)
        for g in t.registered_groups:
            walk(g.typer_instance, out)
        return out

    return walk(app, [])


def test_device_modules_need_only_python_3_8(tmp_path):
    import inspect

    paths = [REPO_ROOT / (m.replace(".", "/") + ".py") for m in DEVICE_MODULES]
    paths = [p if p.is_file() else p.with_suffix("") / "__init__.py" for p in paths]
    files = [str(p) for p in paths if p.is_file()]  # the list may name a module not written yet
    assert len(files) >= 25
    r = subprocess.run([_vermin(), "-t=3.8-", "--no-tips", "--violations", *files], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]
    # typer evaluates the command functions' annotations when the CLI starts: every command's,
    # the device ones included, must evaluate on 3.8 (vermin --eval-annotations on exactly those)
    stub = ["from __future__ import annotations"]
    for i, fn in enumerate(_typer_callbacks()):
        sig = inspect.signature(fn)
        params = ", ".join(f"p{j}: {p.annotation}" for j, p in enumerate(sig.parameters.values())
                           if p.annotation is not inspect.Parameter.empty)
        ret = "" if sig.return_annotation is inspect.Signature.empty else f" -> {sig.return_annotation}"
        stub.append(f"def {fn.__name__}_{i}({params}){ret}: pass  # {fn.__module__}")
    assert len(stub) > 15 and any("engine_build" in s for s in stub)
    (tmp_path / "annotations.py").write_text("\n".join(stub) + "\n")
    r = subprocess.run([_vermin(), "-t=3.8-", "--no-tips", "--violations", "--eval-annotations",
                        str(tmp_path / "annotations.py")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]
    assert set(EVAL_ANNOTATIONS) == {f.__module__.replace(".", "/") + ".py" for f in _typer_callbacks()}


def test_vermin_catches_what_python_3_8_lacks(tmp_path):
    """The check above can fail: a 3.9 feature and a 3.9 annotation are both caught."""
    (tmp_path / "a.py").write_text("def f(s):\n    return s.removeprefix('x')\n")
    (tmp_path / "b.py").write_text("from __future__ import annotations\ndef f(x: list[int]) -> None: pass\n")
    assert subprocess.run([_vermin(), "-t=3.8-", "--no-tips", str(tmp_path / "a.py")], capture_output=True).returncode
    assert subprocess.run([_vermin(), "-t=3.8-", "--no-tips", "--eval-annotations", str(tmp_path / "b.py")],
                          capture_output=True).returncode


JETPACK5 = {"python_version": "3.8", "python_full_version": "3.8.10", "implementation_name": "cpython",
            "platform_python_implementation": "CPython", "platform_machine": "aarch64", "platform_system": "Linux",
            "sys_platform": "linux", "os_name": "posix"}
PIP_TARGET = ["--python-version", "3.8", "--platform", "manylinux2014_aarch64", "--platform", "manylinux_2_31_aarch64",
              "--only-binary=:all:", "--ignore-installed"]
OFFLINE = ("Network is unreachable", "NewConnectionError", "Temporary failure in name resolution",
           "Could not fetch URL", "ProxyError", "timed out")


def _pip(args: list, tmp_path: Path) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    if r.returncode != 0 and any(s in r.stdout + r.stderr for s in OFFLINE):
        pytest.skip("the package index is unreachable from here: " + (r.stderr.strip().splitlines() or ["?"])[-1])
    return r


def test_runtime_extra_installs_on_jetpack5_python_3_8(tmp_path):
    """``pip install --dry-run --python-version 3.8 --platform manylinux2014_aarch64
    --only-binary=:all: 'edgeskin[runtime]'``, in two steps: pip evaluates environment markers
    against the interpreter running it, not against --python-version (pip's
    ``InstallRequirement.match_markers``), so the wheel's own requirements are evaluated for
    CPython 3.8 on aarch64 here, then resolved with their dependencies for that target."""
    from email.parser import Parser

    from packaging.requirements import Requirement

    r = _pip(["wheel", "--no-deps", "--no-build-isolation", "-q", str(REPO_ROOT), "-w", str(tmp_path / "dist")], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("edgeskin-*.whl"))
    r = _pip(["install", "--dry-run", "--no-deps", *PIP_TARGET, str(wheel)], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]  # Requires-Python admits 3.8
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        meta = Parser().parsestr(z.read(next(n for n in z.namelist() if n.endswith("METADATA"))).decode())
    reqs = []
    for line in meta.get_all("Requires-Dist"):
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({**JETPACK5, "extra": "runtime"}):
            req.marker = None
            reqs.append(str(req))
    assert any(q.startswith("onnxruntime") for q in reqs) and not any(q.startswith("torch") for q in reqs)
    r = _pip(["install", "--dry-run", *PIP_TARGET, "--report", str(tmp_path / "report.json"), *reqs], tmp_path)
    assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-2500:]
    got = {i["metadata"]["name"].lower(): i["metadata"]["version"]
           for i in json.loads((tmp_path / "report.json").read_text())["install"]}
    assert {"numpy", "pillow", "typer", "rich", "onnxruntime", "tomli"} <= set(got), got
    assert got["onnxruntime"].startswith("1.16.")
