"""The phone target: LiteRT int8 / fp16 / fp32 bundles from a tiny model, int8 I/O parameters,
layouts, TFLite metadata, and the runtime with torch unimportable."""

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

pytest.importorskip("litert_torch", reason="litert-torch (edgeskin[compress]) is needed to compile for phones")

from ai_edge_litert.interpreter import Interpreter  # noqa: E402

from edgeskin.bundle import BundleError, BundleReader, write_bundle  # noqa: E402
from edgeskin.runtime import load, selftest  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return shared(tmp_path_factory)


@pytest.fixture(scope="module")
def ctx(built):
    from edgeskin.calibration import read_calibration_set
    from edgeskin.data import load_dataset, read_split

    return {"ds": load_dataset(built.data), "split": read_split(built.split_file),
            "cal": read_calibration_set(built.calib_file)}


@pytest.fixture(scope="module")
def bundles(built, ctx, tmp_path_factory):
    from edgeskin.targets import get_target

    root = tmp_path_factory.mktemp("tflite")
    phone = get_target("phone")
    out = {}
    for key, kw in {"int8": dict(precision="int8", observer="minmax"),
                    "int8-adds": dict(precision="int8", observer="minmax", int8_adds=True),
                    "fp16": dict(precision="fp16"),
                    "fp32-nhwc": dict(precision="fp32"),
                    "fp32-nchw": dict(precision="fp32", layout="NCHW")}.items():
        out[key] = phone.compile(built.model_dir, dataset=ctx["ds"], split=ctx["split"], out=root / f"{key}.edgeskin",
                                 calibration=ctx["cal"], subset_size=16, force=True, threads=1, **kw)
    return out


def _ops(model: bytes) -> dict[str, int]:
    it = Interpreter(model_content=model)
    it.allocate_tensors()
    ops: dict[str, int] = {}
    for d in it._get_ops_details():
        ops[d["op_name"]] = ops.get(d["op_name"], 0) + 1
    return ops


def _torch_top1(built, ctx) -> tuple[np.ndarray, np.ndarray]:
    import torch

    from edgeskin.data import load_eval_set
    from edgeskin.models import load_checkpoint

    ck = load_checkpoint(built.checkpoint)
    _, x, _ = load_eval_set(ctx["split"].apply(ctx["ds"], "test"), ck.preprocess, ck.labels, what="test")
    with torch.inference_mode():
        return x, ck.model(torch.from_numpy(x)).argmax(1).numpy()


def test_int8_bundle_records_the_models_own_io_parameters(bundles):
    res = bundles["int8"]
    m = res.manifest
    assert m.target == "tflite" and m.engine["name"] == "litert" and m.engine["layout"] == "NHWC"
    assert m.input.dtype == "int8" and m.input.layout == "NHWC" and m.input.scale > 0
    it = Interpreter(model_content=BundleReader(res.bundle).read("model.tflite"))
    it.allocate_tensors()
    i, o = it.get_input_details()[0], it.get_output_details()[0]
    assert i["dtype"] == np.int8 and tuple(i["shape"]) == (1, 32, 32, 3)
    assert i["quantization"] == pytest.approx((m.input.scale, m.input.zero_point))
    assert o["dtype"] == np.float32 and m.output.get("scale") is None  # classifier kept in float
    assert m.provenance["conversion"]["residual_adds"] == "float"
    assert m.provenance["calibration"]["size"] >= 1
    assert 0 <= m.accuracy["top1_agreement"] <= 1


def test_int8_input_is_quantized_by_the_runtime_from_the_model(bundles, built):
    img = next(built.data.rglob("*.jpg"))
    with load(bundles["int8"].bundle) as pred:
        x = pred._tensor(img)[None]
        b = pred.backend
        q = b._quantize(x)
        scale, zp = b.input_quant
        assert q.dtype == np.int8
        np.testing.assert_array_equal(q, np.clip(np.round(x / scale) + zp, -128, 127).astype(np.int8))
        assert selftest(pred).passed
        p = pred.predict(img)
        assert abs(p.probs.sum() - 1) < 1e-6


def test_a_wrong_zero_point_in_the_manifest_is_caught(bundles, tmp_path):
    src = bundles["int8"].bundle
    bad = tmp_path / "bad.edgeskin"
    r = BundleReader(src)
    files = {n: r.read(n) for n in r.manifest.files}
    m = r.manifest
    write_bundle(bad, m.with_(input=m.input.__class__(**{**m.input.__dict__, "zero_point": m.input.zero_point + 3})),
                 files)
    with pytest.raises(BundleError, match="input quantization"):
        load(bad)


def test_int8_adds_makes_the_residual_additions_integer(bundles):
    plain = _ops(BundleReader(bundles["int8"].bundle).read("model.tflite"))
    adds = _ops(BundleReader(bundles["int8-adds"].bundle).read("model.tflite"))
    assert plain.get("QUANTIZE", 0) > 0  # float adds need re-quantizing afterwards
    assert adds.get("QUANTIZE", 0) == 0 and adds.get("DEQUANTIZE", 0) <= 1  # only before the float classifier
    assert bundles["int8-adds"].manifest.provenance["conversion"]["residual_adds"] == "int8"


def test_fp16_halves_the_file_and_keeps_float_io(bundles):
    fp16 = BundleReader(bundles["fp16"].bundle).read("model.tflite")
    fp32 = BundleReader(bundles["fp32-nhwc"].bundle).read("model.tflite")
    assert len(fp16) < 0.6 * len(fp32)
    assert _ops(fp16).get("DEQUANTIZE", 0) > 0
    assert bundles["fp16"].manifest.input.dtype == "float32"
    assert bundles["fp16"].check["top1_agreement"] == 1.0


def test_nhwc_and_nchw_give_the_torch_models_top1(bundles, built, ctx):
    x, want = _torch_top1(built, ctx)
    for key, layout in (("fp32-nhwc", "NHWC"), ("fp32-nchw", "NCHW")):
        with load(bundles[key].bundle) as pred:
            assert pred.manifest.input.layout == layout
            xs = x.transpose(0, 2, 3, 1) if layout == "NHWC" else x
            got = pred.probabilities(np.ascontiguousarray(xs)).argmax(1)
        np.testing.assert_array_equal(got, want)


def test_labels_and_normalisation_are_in_standard_tflite_metadata(bundles):
    from edgeskin.tflite_metadata import read_metadata

    model = BundleReader(bundles["int8"].bundle).read("model.tflite")
    md = read_metadata(model)
    assert md.labels == bundles["int8"].manifest.labels and md.label_file == "labels.txt"
    assert md.mean == pytest.approx((123.675, 116.28, 103.53), abs=1e-3)
    assert md.std == pytest.approx((58.395, 57.12, 57.375), abs=1e-3)
    assert md.min_parser_version == "1.0.0"
    # the metadata leaves the model itself untouched: it still loads and runs
    it = Interpreter(model_content=model)
    it.allocate_tensors()


def test_runtime_runs_a_tflite_bundle_with_torch_unimportable(bundles, built):
    from test_runtime import BLOCKER

    img = next(built.data.rglob("*.jpg"))
    code = BLOCKER + textwrap.dedent(f"""
        import json
        import edgeskin.runtime
        p = edgeskin.runtime.load({str(bundles['int8'].bundle)!r}, threads=2)
        assert edgeskin.runtime.selftest(p).passed
        out = p.predict({str(img)!r}).probs.tolist()
        bad = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not bad, bad
        print(json.dumps(out))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    with load(bundles["int8"].bundle) as pred:
        np.testing.assert_allclose(json.loads(r.stdout.strip().splitlines()[-1]), pred.predict(img).probs, atol=1e-6)


def test_phone_cli_compiles_and_predicts(built, tmp_path):
    out = tmp_path / "p.edgeskin"
    r = run_cli("compile", str(built.model_dir), "--target", "android", "--precision", "fp16", "--data",
                str(built.data), "--out", str(out), "--force")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "manifest.json").read_text())["engine"]["name"] == "litert"
    img = next(built.data.rglob("*.jpg"))
    r = run_cli("predict", str(img), "--bundle", str(out), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["top"][0]["label"] in ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
    r = run_cli("compile", str(built.model_dir), "--target", "phone", "--precision", "int8", "--data",
                str(built.data), "--out", str(tmp_path / "q.edgeskin"), "--layout", "NCWH")
    assert r.returncode == 2 and "layout" in r.stderr
    shutil.rmtree(out)
    r = run_cli("compile", str(built.model_dir), "--target", "ios", "--precision", "fp32", "--data",
                str(built.data), "--out", str(out), "--force")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "manifest.json").read_text())["provenance"]["device"]["profile"] == "iphone"


def test_first_conv_float_keeps_the_stem_in_float_and_the_input_float(built, ctx, tmp_path):
    from edgeskin.targets import get_target

    res = get_target("tflite").compile(built.model_dir, precision="int8", dataset=ctx["ds"], split=ctx["split"],
                                       out=tmp_path / "s.edgeskin", calibration=ctx["cal"], subset_size=8,
                                       observer="minmax", first_conv_float=True, force=True, threads=1)
    assert res.manifest.input.dtype == "float32" and res.manifest.input.scale is None
    assert res.manifest.provenance["conversion"]["float_modules"] == ["conv1", "bn1"]
    with load(res.bundle) as pred:
        assert pred.backend.input_quant is None and selftest(pred).passed
