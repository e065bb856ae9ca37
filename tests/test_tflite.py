"""The phone target: LiteRT int8 / fp16 / fp32 bundles from a tiny model that the fixture trains
until its predictions depend on the image; the default form (uint8 pixels in, probabilities out)
and the custom one (normalised/int8 in, logits out); their metadata as MediaPipe reads it back;
MediaPipe's ImageClassifier against edgeskin's runtime on real validation images; layouts, and the
runtime with torch unimportable."""

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


def _train_until_image_dependent(built, ctx, out):
    """A copy of the tiny resnet18 trained on the tiny data set (each class its own colour) until
    it separates the classes with real margins: predictions that depend on the image."""
    import torch

    from edgeskin.data import load_eval_set, write_split
    from edgeskin.labels import HAM10000
    from edgeskin.models import build_model, load_checkpoint, save_checkpoint

    ck = load_checkpoint(built.checkpoint)
    _, x, y = load_eval_set(ctx["split"].apply(ctx["ds"], "train"), ck.preprocess, ck.labels, what="train")
    torch.manual_seed(0)
    model, _ = build_model("resnet18", 7, pretrained=None)
    for m in model.modules():  # running statistics that keep up with a few dozen steps
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.5
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    keep = np.concatenate([np.flatnonzero(np.asarray(y) == c)[:4] for c in range(7)])  # 4 images a class
    xt, yt = torch.from_numpy(x[keep]), torch.from_numpy(np.asarray(y)[keep]).long()
    for step in range(100):
        model.train()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
        if step % 5 == 4:
            model.eval()
            with torch.inference_mode():
                p = torch.softmax(model(xt), 1)
            top2 = p.topk(2, 1).values
            if (p.argmax(1) == yt).float().mean() > 0.95 and float((top2[:, 0] - top2[:, 1]).median()) > 0.3:
                break
    else:
        raise AssertionError("the tiny model did not learn the tiny data set")
    model.eval()
    write_split(ctx["split"], out / "split.csv")
    save_checkpoint(model, out / "member0", arch="resnet18", labels=HAM10000, preprocess=ck.preprocess, dropout=0.3)
    return out


@pytest.fixture(scope="module")
def trained(built, ctx, tmp_path_factory):
    return _train_until_image_dependent(built, ctx, tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="module")
def bundles(trained, ctx, tmp_path_factory):
    from edgeskin.targets import get_target

    root = tmp_path_factory.mktemp("tflite")
    phone = get_target("phone")
    out = {}
    for key, kw in {"int8": dict(precision="int8", observer="minmax"),  # the default form
                    "int8-custom": dict(precision="int8", observer="minmax", int8_adds=True,
                                        input_type="normalized", output_kind="logits"),
                    "fp16": dict(precision="fp16"),
                    "fp32-nhwc": dict(precision="fp32"),
                    "fp32-nchw": dict(precision="fp32", layout="NCHW")}.items():
        out[key] = phone.compile(trained, dataset=ctx["ds"], split=ctx["split"], out=root / f"{key}.edgeskin",
                                 calibration=ctx["cal"], subset_size=16, force=True, threads=1, **kw)
    return out


def _ops(model: bytes) -> dict[str, int]:
    it = Interpreter(model_content=model)
    it.allocate_tensors()
    ops: dict[str, int] = {}
    for d in it._get_ops_details():
        ops[d["op_name"]] = ops.get(d["op_name"], 0) + 1
    return ops


def _torch_top1(trained, ctx) -> tuple[list, np.ndarray]:
    import torch

    from edgeskin.data import load_eval_set
    from edgeskin.models import load_checkpoint

    ck = load_checkpoint(trained / "member0.json")
    test, x, _ = load_eval_set(ctx["split"].apply(ctx["ds"], "test"), ck.preprocess, ck.labels, what="test")
    with torch.inference_mode():
        return [smp.path for smp in test.samples], ck.model(torch.from_numpy(x)).argmax(1).numpy()


def _io(model: bytes) -> tuple[dict, dict]:
    it = Interpreter(model_content=model)
    it.allocate_tensors()
    return it.get_input_details()[0], it.get_output_details()[0]


DEFAULT_FORM = ("int8", "fp16", "fp32-nhwc", "fp32-nchw")


def test_default_form_takes_uint8_pixels_and_gives_probabilities(bundles, built):
    img = next(built.data.rglob("*.jpg"))
    for key in DEFAULT_FORM:
        m = bundles[key].manifest
        model = BundleReader(bundles[key].bundle).read("model.tflite")
        i, o = _io(model)
        shape = (1, 32, 32, 3) if m.input.layout == "NHWC" else (1, 3, 32, 32)
        assert i["dtype"] == np.uint8 and tuple(i["shape"]) == shape and not len(i["quantization_parameters"]["scales"])
        assert o["dtype"] == np.float32 and _ops(model).get("SOFTMAX") == 1
        assert (m.input.dtype, m.input.scale, m.input.zero_point, m.input.input_range) == ("uint8", 1.0, 0, 255.0)
        assert m.input.mean == (0.0, 0.0, 0.0) and m.input.std == (1.0, 1.0, 1.0) and m.output["kind"] == "probs"
        conv = m.provenance["conversion"]
        assert (conv["input_type"], conv["output_kind"]) == ("uint8", "probabilities")
        assert conv["normalization"]["mean_0_255"] == pytest.approx([123.675, 116.28, 103.53])
        with load(bundles[key].bundle) as pred:
            assert pred.backend.input_quant == (1.0, 0) and selftest(pred).passed
            p = pred.predict(img).probs
        assert abs(p.sum() - 1) < 1e-5 and (p >= 0).all()
    assert bundles["int8"].check["passed"] and bundles["fp32-nhwc"].check["top1_agreement"] == 1.0
    app = bundles["int8"].manifest.extra["app_preprocessing"]
    assert app["split"] == "val" and app["n"] == bundles["int8"].check["n"] and 0 <= app["top1_agreement"] <= 1
    assert "app_preprocessing" not in bundles["fp32-nchw"].manifest.extra  # MediaPipe feeds NHWC only


def test_the_custom_int8_form_records_the_models_own_io_parameters(bundles):
    res = bundles["int8-custom"]
    m = res.manifest
    assert m.target == "tflite" and m.engine["name"] == "litert" and m.engine["layout"] == "NHWC"
    assert m.input.dtype == "int8" and m.input.layout == "NHWC" and m.input.scale > 0
    i, o = _io(BundleReader(res.bundle).read("model.tflite"))
    assert i["dtype"] == np.int8 and tuple(i["shape"]) == (1, 32, 32, 3)
    assert i["quantization"] == pytest.approx((m.input.scale, m.input.zero_point))
    assert o["dtype"] == np.float32 and m.output.get("scale") is None and m.output["kind"] == "logits"
    assert m.provenance["conversion"]["residual_adds"] == "int8"
    assert m.provenance["calibration"]["size"] >= 1
    assert 0 <= m.accuracy["top1_agreement"] <= 1


def test_int8_input_is_quantized_by_the_runtime_from_the_model(bundles, built):
    img = next(built.data.rglob("*.jpg"))
    with load(bundles["int8-custom"].bundle) as pred:
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
    src = bundles["int8-custom"].bundle
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
    adds = _ops(BundleReader(bundles["int8-custom"].bundle).read("model.tflite"))
    assert plain.get("QUANTIZE", 0) > 0  # float adds need re-quantizing afterwards
    assert adds.get("QUANTIZE", 0) == 0 and adds.get("DEQUANTIZE", 0) <= 1  # only before the float classifier
    assert "SOFTMAX" not in adds and "CAST" not in adds  # the custom form: normalised int8 in, logits out
    assert bundles["int8"].manifest.provenance["conversion"]["residual_adds"] == "float"


def test_fp16_halves_the_file(bundles):
    fp16 = BundleReader(bundles["fp16"].bundle).read("model.tflite")
    fp32 = BundleReader(bundles["fp32-nhwc"].bundle).read("model.tflite")
    assert len(fp16) < 0.6 * len(fp32)
    assert _ops(fp16).get("DEQUANTIZE", 0) > 0
    assert bundles["fp16"].check["top1_agreement"] == 1.0


def test_nhwc_and_nchw_give_the_torch_models_top1(bundles, trained, ctx):
    paths, want = _torch_top1(trained, ctx)
    assert len(set(want.tolist())) >= 4  # the trained model tells the classes apart
    for key, layout in (("fp32-nhwc", "NHWC"), ("fp32-nchw", "NCHW")):
        with load(bundles[key].bundle) as pred:
            assert pred.manifest.input.layout == layout
            got = np.array([p.probs.argmax() for p in pred.predict(paths)])
        np.testing.assert_array_equal(got, want)


def _metadata(bundle) -> tuple[dict, bytes]:
    from edgeskin.targets.tflite_metadata import read_metadata

    model = BundleReader(bundle).read("model.tflite")
    return read_metadata(model), model


def test_metadata_says_what_the_tensors_are_as_mediapipe_reads_it_back(bundles):
    pytest.importorskip("mediapipe", reason="mediapipe (edgeskin[phone]) reads the metadata back")
    for key, res in bundles.items():
        md, model = _metadata(res.bundle)
        i, o = _io(model)
        sg = md["subgraph_metadata"][0]
        inp, out = sg["input_tensor_metadata"][0], sg["output_tensor_metadata"][0]
        assert md["min_parser_version"] == "1.0.0"
        assert inp["content"]["content_properties"]["color_space"] == "RGB"
        assert md["packed_files"]["labels.txt"].decode().split() == list(res.manifest.labels)
        assert out["associated_files"][0]["type"] == "TENSOR_AXIS_LABELS"
        norm = [u["options"] for u in inp.get("process_units", [])
                if u["options_type"] == "NormalizationOptions"]
        if i["dtype"] == np.uint8:  # pixels as they are: nothing for the app to normalise
            assert not norm and inp["stats"] == {"max": [255.0], "min": [0.0]}, key
        else:  # the normalised forms: per-channel mean/std in pixel units, as the model was trained
            assert norm[0]["mean"] == pytest.approx([123.675, 116.28, 103.53], abs=1e-3), key
            assert norm[0]["std"] == pytest.approx([58.395, 57.12, 57.375], abs=1e-3), key
            if i["dtype"] == np.int8:
                assert not inp.get("stats") and "quantized with this tensor's own scale" in inp["description"]
        probs = res.manifest.output["kind"] == "probs"
        assert o["dtype"] == np.float32 and probs == ("SOFTMAX" in _ops(model)), key
        if probs:
            assert out["name"] == "probabilities" and out["stats"] == {"max": [1.0], "min": [0.0]}, key
        else:
            assert out["name"] == "logits" and not out.get("stats") and "apply softmax" in out["description"]


def test_mediapipe_takes_the_default_form_and_refuses_the_custom_int8_one(bundles):
    from edgeskin.targets.phone import mediapipe_scores

    pytest.importorskip("mediapipe", reason="mediapipe (edgeskin[phone]) is the app-side client")
    px = np.full((32, 32, 3), 128, np.uint8)
    for key in ("int8", "fp16", "fp32-nhwc"):
        assert mediapipe_scores(bundles[key].bundle / "model.tflite", [px]).shape == (1, 7)
    with pytest.raises(Exception, match="(?i)type"):  # MediaPipe takes uint8/float32 image inputs only
        mediapipe_scores(bundles["int8-custom"].bundle / "model.tflite", [px])


#: how far MediaPipe's scores may be from edgeskin's runtime on the same pixels (same model file;
#: two builds of the LiteRT/XNNPACK kernels): absolute, per class probability
SCORE_TOLERANCE = 1e-4


def test_mediapipe_image_classifier_agrees_with_edgeskin_on_real_validation_images(bundles, ham_data,
                                                                                   record_property):
    """Each phone bundle's model.tflite in MediaPipe's ImageClassifier, created from the file alone
    as an app creates it, against edgeskin's runtime on real validation images."""
    pytest.importorskip("mediapipe", reason="mediapipe (edgeskin[phone]) is the app-side client")
    from edgeskin.data import load_dataset, make_split
    from edgeskin.preprocess import center_crop, load_resized, open_image
    from edgeskin.targets.phone import centre_roi, mediapipe_scores
    from edgeskin.targets.tflite import resize_whole

    ds = load_dataset(ham_data)
    val = make_split(ds, seed=0).apply(ds, "val").samples[:200]
    cfg = bundles["int8"].manifest.input.preprocess_config()  # the same 32 px rule for every bundle here
    full = [np.asarray(open_image(s.path), dtype=np.uint8) for s in val]
    cropped = [center_crop(load_resized(s.path, cfg), cfg.size) for s in val]  # edgeskin's crop, done by the app
    for key in ("int8", "fp16", "fp32-nhwc"):
        with load(bundles[key].bundle) as pred:
            assert pred.preprocess_config == cfg
            ours = np.stack([p.probs for p in pred.predict([s.path for s in val])])
        model = bundles[key].bundle / "model.tflite"
        mp_crop = mediapipe_scores(model, cropped)
        mp_roi = mediapipe_scores(model, full, rois=[centre_roi(a.shape[1], a.shape[0], size=cfg.size,
                                                               resize=cfg.resize_size) for a in full])
        mp_whole = mediapipe_scores(model, full)
        with load(bundles[key].bundle) as pred:  # the bundle's own emulation of MediaPipe's whole-image resize
            emulated = pred.probabilities(np.stack([resize_whole(a, cfg.size) for a in full]).astype(np.float32))
        agree = {name: float(np.mean(v.argmax(1) == ours.argmax(1)))
                 for name, v in (("pre-cropped", mp_crop), ("centre ROI", mp_roi), ("whole image", mp_whole))}
        worst = float(np.abs(mp_crop - ours).max())
        emulation = float(np.mean(emulated.argmax(1) == mp_whole.argmax(1)))
        record_property(f"mediapipe_{key}", {"top1_agreement": agree, "max_abs_score_diff_pre_cropped": worst,
                                             "whole_image_emulation_agreement": emulation})
        print(key, agree, f"max |score diff| pre-cropped {worst:.2e}; emulated whole image vs MediaPipe's "
              f"{emulation:.3f}, max |diff| {np.abs(emulated - mp_whole).max():.2e}")
        assert len(set(ours.argmax(1).tolist())) >= 3, "the model's predictions must depend on the image"
        assert agree["pre-cropped"] >= 0.995, (key, agree)
        assert worst <= SCORE_TOLERANCE, (key, worst)
        assert emulation >= 0.95, (key, emulation)  # the bundle's whole-image report stands for MediaPipe's resize


def test_minimum_parser_version_port_follows_mediapipes_rules():
    pytest.importorskip("mediapipe", reason="mediapipe (edgeskin[phone]) has the metadata schema")
    import flatbuffers
    from mediapipe.tasks.metadata import metadata_schema_py_generated as fb

    from edgeskin.targets.tflite_metadata import minimum_parser_version

    def buf(**file_kw) -> bytes:
        f = fb.AssociatedFileT()
        f.name = "v.txt"
        for k, v in file_kw.items():
            setattr(f, k, v)
        t = fb.TensorMetadataT()
        t.associatedFiles = [f]
        sg = fb.SubGraphMetadataT()
        sg.inputTensorMetadata, sg.outputTensorMetadata = [t], []
        md = fb.ModelMetadataT()
        md.subgraphMetadata = [sg]
        b = flatbuffers.Builder(0)
        b.Finish(md.Pack(b), b"M001")
        return bytes(b.Output())

    assert minimum_parser_version(buf(type=fb.AssociatedFileType.TENSOR_AXIS_LABELS)) == "1.0.0"
    assert minimum_parser_version(buf(type=fb.AssociatedFileType.VOCABULARY)) == "1.0.1"
    assert minimum_parser_version(buf(type=fb.AssociatedFileType.SCANN_INDEX_FILE)) == "1.4.0"
    assert minimum_parser_version(buf(version="2")) == "1.4.1"


def test_preprocessing_advice_for_phone_bundles_only(bundles, built):
    from edgeskin.targets.phone import centre_roi, preprocessing_advice

    text = preprocessing_advice(bundles["int8"].manifest)
    spec = bundles["int8"].manifest.input
    assert f"{spec.size / spec.resize:.3f} of the image's shorter side" in text
    assert "uint8" in text and "region of interest" in text and "docs/phone.md" in text
    assert "validation images" in text and "probabilities" in text
    custom = preprocessing_advice(bundles["int8-custom"].manifest)
    assert "int8" in custom and "softmax" in custom and "MediaPipe cannot feed it" in custom
    assert preprocessing_advice(built.fp32_result.manifest) is None
    assert centre_roi(48, 36, size=32, resize=36) == pytest.approx((1 / 6, 1 / 18, 5 / 6, 17 / 18))


def test_unknown_input_type_or_output_kind_is_refused_before_compiling(trained, ctx, tmp_path):
    from edgeskin.errors import ConfigError
    from edgeskin.targets import get_target
    from edgeskin.targets.options import HELP, OPTIONS, compile_kwargs

    phone = get_target("tflite")
    for kw, hint in ((dict(input_type="int16"), "uint8"), (dict(output_kind="scores"), "probabilities")):
        with pytest.raises(ConfigError) as e:
            phone.compile(trained, precision="fp32", dataset=ctx["ds"], split=ctx["split"], out=tmp_path / "x", **kw)
        assert hint in e.value.hint
    assert not (tmp_path / "x").exists()
    kw = compile_kwargs(phone, "phone", {"input_type": "normalized", "output_kind": "logits"})
    assert (kw["input_type"], kw["output_kind"]) == ("normalized", "logits")
    with pytest.raises(ConfigError, match="'uint8', 'normalized'"):  # refused before a recipe or command runs
        compile_kwargs(phone, "phone", {"input_type": "int8"})
    from edgeskin.targets.options import _types
    from edgeskin.targets.tflite import INPUT_TYPES, OUTPUT_KINDS

    assert (_types()["input_type"].choices, _types()["output_kind"].choices) == (INPUT_TYPES, OUTPUT_KINDS)
    assert (OPTIONS["input_type"][0], OPTIONS["output_kind"][0]) == ("uint8", "probabilities")
    assert set(HELP) >= {"input_type", "output_kind"}
    with pytest.raises(ConfigError, match="does not apply"):
        compile_kwargs(get_target("cpu"), "cpu", {"input_type": "normalized"})


def test_runtime_runs_a_tflite_bundle_with_torch_unimportable(bundles, built):
    from test_runtime import BLOCKER

    img = next(built.data.rglob("*.jpg"))
    code = BLOCKER + textwrap.dedent(f"""
        import json
        import edgeskin.runtime
        p = edgeskin.runtime.load({str(bundles['int8'].bundle)!r}, threads=2)
        assert edgeskin.runtime.selftest(p).passed
        out = p.predict({str(img)!r}).probs.tolist()
        bad = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED + ("mediapipe", "cv2"))
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


def test_first_conv_float_keeps_the_normalisation_and_the_stem_in_float(built, ctx, tmp_path):
    from edgeskin.targets import get_target

    res = get_target("tflite").compile(built.model_dir, precision="int8", dataset=ctx["ds"], split=ctx["split"],
                                       out=tmp_path / "s.edgeskin", calibration=ctx["cal"], subset_size=8,
                                       observer="minmax", first_conv_float=True, force=True, threads=1)
    assert res.manifest.input.dtype == "uint8" and res.manifest.input.scale == 1.0
    assert res.manifest.provenance["conversion"]["float_modules"] == ["conv1", "bn1"]
    it = Interpreter(model_content=BundleReader(res.bundle).read("model.tflite"))
    it.allocate_tensors()
    dtype = {t["index"]: t["dtype"] for t in it.get_tensor_details()}
    ops = it._get_ops_details()
    first_conv = next(o for o in ops if o["op_name"] == "CONV_2D")
    # the explicit normalisation, in float: one add of -mean over each NHWC image row (1/std went into
    # the first convolution's weights, exactly: see phone_io_module)
    assert [o["op_name"] for o in ops[:4]] == ["CAST", "RESHAPE", "ADD", "RESHAPE"]
    assert dtype[first_conv["inputs"][0]] == np.float32 and dtype[first_conv["inputs"][1]] == np.float32
    with load(res.bundle) as pred:
        assert pred.backend.input_quant == (1.0, 0) and selftest(pred).passed


def test_the_phone_input_folds_1_over_std_into_the_first_convolution_exactly():
    """x * k + b = k * (x + b / k): the folded model matches the normalise-then-convolve one to float
    rounding, borders included, and a network whose first operation is not that convolution keeps
    the explicit multiply-add."""
    import torch
    import torchvision

    from edgeskin.targets.tflite import phone_io_module

    mean, std = (123.7, 116.3, 103.5), (58.4, 57.1, 57.4)
    net = torchvision.models.resnet18(num_classes=7).eval()
    kw = dict(mean255=mean, std255=std, bgr=False, output_kind="logits", layout="NHWC", size=32)
    folded = phone_io_module(net, input_type="uint8", **kw)
    assert not folded.scaled  # only the add is left on the input
    x = torch.randint(0, 256, (2, 32, 32, 3), generator=torch.Generator().manual_seed(1)).to(torch.uint8)
    normalised = ((x.float() - torch.tensor(mean)) / torch.tensor(std)).permute(0, 3, 1, 2)
    with torch.no_grad():
        assert float((folded(x) - net(normalised)).abs().max()) < 1e-4

    class ShiftFirst(torch.nn.Module):  # its first conv is not the first thing done to the input
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.conv(t * t).mean((2, 3))

    kept = phone_io_module(ShiftFirst().eval(), input_type="uint8", **kw)
    assert kept.scaled


def test_a_checkpoint_trained_quantization_aware_for_tflite_compiles_with_its_learned_form(trained, built, ctx,
                                                                                           tmp_path):
    """`edgeskin qat MEMBER.json --target tflite` writes the PT2E program beside the checkpoint (its
    hash in the checkpoint's JSON); the tflite compile builds the INT8 model from it (no fresh
    calibration) when its options are the ones the form was trained with, calibrates afresh
    otherwise or with qat off, and refuses a program whose hash does not match."""
    from typer.testing import CliRunner

    from edgeskin.cli import app
    from edgeskin.errors import CheckpointError
    from edgeskin.fileio import sha256_file
    from edgeskin.progress import NullReporter
    from edgeskin.targets import get_target
    from edgeskin.targets.prepare import select_member

    src = tmp_path / "m"
    shutil.copytree(trained, src)
    member = src / "member0.json"
    r = CliRunner().invoke(app, ["qat", str(member), "--data", str(built.data), "--target", "tflite", "--epochs", "1",
                                 "--steps-per-epoch", "2", "--batch-size", "8", "--device", "cpu"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    rec = json.loads(member.read_text())["qat"]["tflite"]
    pt2 = src / rec["pt2"]["file"]
    assert pt2.name == "member0.qat-tflite.pt2" and sha256_file(pt2) == rec["pt2"]["sha256"]
    assert rec["tool"] == "torchao-pt2e" and "INT8 graph for tflite" in r.output

    phone = get_target("tflite")
    res = phone.compile(src, precision="int8", dataset=ctx["ds"], split=ctx["split"], out=tmp_path / "q.edgeskin",
                        calibration=ctx["cal"], first_conv_float=True, force=True, threads=1)
    q = res.manifest.provenance["quantization"]
    assert q["mode"] == "quantization-aware" and q["qat"]["pt2"]["sha256"] == rec["pt2"]["sha256"]
    assert "calibration" not in res.manifest.provenance
    assert res.manifest.input.dtype == "uint8"  # the phone form as ever: pixels in
    with load(res.bundle) as pred:
        assert selftest(pred).passed

    ck, quiet = select_member(src, None, target="tflite"), NullReporter()
    assert phone._trained_form(ck, qat="auto", first_conv_float=True, int8_adds=False, reporter=quiet)[0] == pt2
    # other float layers than the form's, or qat off: calibrated afresh
    assert phone._trained_form(ck, qat="auto", first_conv_float=False, int8_adds=False, reporter=quiet) is None
    assert phone._trained_form(ck, qat="auto", first_conv_float=True, int8_adds=True, reporter=quiet) is None
    assert phone._trained_form(ck, qat="off", first_conv_float=True, int8_adds=False, reporter=quiet) is None

    pt2.write_bytes(pt2.read_bytes() + b"\0")
    with pytest.raises(CheckpointError, match=pt2.name):
        phone.compile(src, precision="int8", dataset=ctx["ds"], split=ctx["split"], out=tmp_path / "d.edgeskin",
                      calibration=ctx["cal"], first_conv_float=True, force=True, threads=1)
    assert not (tmp_path / "d.edgeskin").exists()
