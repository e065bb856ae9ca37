"""Bring your own ensemble: members imported from ONNX, Keras and timm, mixed with edgeskin's own,
used by evaluate, distill, bench and compile.

Every fidelity test uses a model whose predictions depend on the image (a trained reference
member, a briefly trained Keras ResNet50) and compares edgeskin with a pipeline written
independently of it (torchvision transforms, or Keras' own preprocess_input and predict).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from _bundles import run_cli
from edgeskin.errors import CheckpointError, ConfigError
from edgeskin.preprocess import CAFFE_MEAN, IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig, normalize

# Keras (torch backend) and torch.onnx's tracer are chatty; their warnings say nothing about edgeskin
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")]


# ---------------------------------------------------------------- helpers

class Convention(nn.Module):
    """Wraps a network that takes edgeskin's input (NCHW, RGB, 0-1, ImageNet mean/std) behind
    another framework's input convention, so the exported graph expects that convention."""

    def __init__(self, net: nn.Module, *, layout: str = "NCHW", order: str = "RGB", mode: str = "meanstd",
                 softmax: bool = False) -> None:
        super().__init__()
        self.net, self.layout, self.order, self.mode, self.softmax = net, layout, order, mode, softmax
        self.register_buffer("caffe", torch.tensor(CAFFE_MEAN).view(1, 3, 1, 1))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "NHWC":
            x = x.permute(0, 3, 1, 2)
        if self.mode == "caffe":  # x = pixels (0-255) in the channel order, minus the BGR means
            pix = x + (self.caffe if self.order == "BGR" else self.caffe.flip(1))
        elif self.mode == "tf":
            pix = (x + 1.0) * 127.5
        else:  # torchvision: (pixels/255 - mean) / std in the channel order
            m, s = (self.mean, self.std) if self.order == "RGB" else (self.mean.flip(1), self.std.flip(1))
            pix = (x * s + m) * 255.0
        if self.order == "BGR":
            pix = pix.flip(1)
        y = self.net((pix / 255.0 - self.mean) / self.std)
        return torch.softmax(y, dim=1) if self.softmax else y


class TinyNet(nn.Module):
    """A small CNN (edgeskin's input convention) for plumbing tests."""

    def __init__(self, classes: int = 7, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x)) * 5.0


def export(net: nn.Module, path: Path, size: int, *, layout: str = "NCHW", opset: int = 17,
           name: str = "image") -> Path:
    shape = (1, 3, size, size) if layout == "NCHW" else (1, size, size, 3)
    torch.onnx.export(net.eval(), torch.zeros(shape), str(path), input_names=[name], output_names=["out"],
                      dynamic_axes={name: {0: "n"}, "out": {0: "n"}}, opset_version=opset, dynamo=False)
    return path


def torchvision_probs(net: nn.Module, paths: list[Path], size: int, resize: int) -> np.ndarray:
    """The independent pipeline: PIL + torchvision transforms + the torch network + softmax."""
    from torchvision import transforms as T

    tf = T.Compose([T.Resize(resize), T.CenterCrop(size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])
    with torch.inference_mode():
        return torch.softmax(net.eval()(x), dim=1).double().numpy()


def import_api(sources, out, *, data, split=None, on="val", n=24, **decl):
    from edgeskin.data import load_dataset, read_split
    from edgeskin.members.declare import Declaration
    from edgeskin.members.importer import import_members

    ds = load_dataset(data)
    s = read_split(split) if split is not None else None
    return import_members([str(p) for p in sources], out, Declaration(**decl), dataset=ds, split=s, split_name=on,
                          check_images=n)


def first_val(data: Path, split: Path, n: int):
    """The first ``n`` validation samples (a small data set, in the split's order)."""
    from edgeskin.data import load_dataset, read_split

    sub = read_split(split).apply(load_dataset(data), "val")
    return replace(sub, samples=sub.samples[:n])


def nothing_written(parent: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{out.name}.import-")]


# ---------------------------------------------------------------- the pipeline (no models)

def test_default_preprocessing_is_written_and_read_as_before():
    pre = PreprocessConfig(size=112)
    d = pre.to_dict()
    assert not {"channel_order", "input_range", "normalization"} & set(d)  # old manifests, same bytes
    assert d["rule"].endswith("centre crop 112x112, /255, normalise with mean/std")
    old = {k: v for k, v in d.items() if k != "rule"}
    assert PreprocessConfig.from_dict(old) == pre
    caffe = PreprocessConfig.with_normalization("caffe", size=112, channel_order="BGR", layout="NHWC")
    assert PreprocessConfig.from_dict(caffe.to_dict()) == caffe
    with pytest.raises(ConfigError, match="caffe"):
        PreprocessConfig(size=112, normalization="caffe")  # the mode's numbers must be there
    with pytest.raises(ConfigError, match="channel order"):
        PreprocessConfig(size=112, channel_order="GBR")


def test_caffe_and_tf_modes_match_keras_preprocess_input_written_out():
    """keras.applications.imagenet_utils.preprocess_input, by hand: caffe flips RGB->BGR and
    subtracts the BGR means; tf scales to -1..1."""
    arr = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    x = arr.astype(np.float64)
    caffe = normalize(arr, PreprocessConfig.with_normalization("caffe", size=8, channel_order="BGR", layout="NHWC"))
    np.testing.assert_allclose(caffe, x[..., ::-1] - np.array([103.939, 116.779, 123.68]), atol=1e-4)
    tf = normalize(arr, PreprocessConfig.with_normalization("tf", size=8, layout="NHWC"))
    np.testing.assert_allclose(tf, x / 127.5 - 1.0, atol=1e-5)
    chw = normalize(arr, PreprocessConfig(size=8))
    np.testing.assert_allclose(chw, ((x / 255 - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1), atol=1e-5)


def test_class_maps_rename_drop_merge_and_refuse():
    from edgeskin.labels import HAM10000
    from edgeskin.members import build_class_map

    isic = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    cm = build_class_map(isic, HAM10000, rename={"AK": "akiec"}, extra={"SCC": "akiec", "UNK": "drop"})
    p = np.array([[0.1, 0.2, 0.1, 0.05, 0.1, 0.05, 0.1, 0.1, 0.2]])
    q = cm.apply(p)
    assert q.sum() == pytest.approx(1.0)
    assert q[0, HAM10000.index("akiec")] == pytest.approx((0.05 + 0.1) / 0.8)  # merged, renormalised
    assert cm.to_dict()["dropped"] == ["UNK"]
    with pytest.raises(ConfigError, match="SCC, UNK") as e:  # extra classes nobody mapped
        build_class_map(isic, HAM10000, rename={"AK": "akiec"})
    assert "--extra SCC=drop" in e.value.hint
    with pytest.raises(ConfigError, match="akiec"):  # one of ours missing
        build_class_map(["bcc", "bkl", "df", "mel", "nv", "vasc", "x"], HAM10000, extra={"x": "drop"})
    with pytest.raises(ConfigError, match="more than once"):
        build_class_map(["akiec", "bcc", "bkl", "df", "mel", "nv", "nv"], HAM10000)


# ---------------------------------------------------------------- bad inputs: a clear error, nothing written

@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-onnx")
    net = TinyNet()
    return {"net": net, "nchw": export(Convention(net), d / "tiny.onnx", 32),
            "keras": export(Convention(net, layout="NHWC", order="BGR", mode="caffe", softmax=True),
                            d / "tiny_keras.onnx", 32, layout="NHWC"),
            "dir": d}


def test_wrong_class_lists_are_refused_and_nothing_is_written(tiny_ham, tiny_onnx, tmp_path):
    out = tmp_path / "ens"
    with pytest.raises(ConfigError, match="vasc") as e:  # one of ours is missing
        import_api([tiny_onnx["nchw"]], out, data=tiny_ham, preset="torchvision", size=32,
                   labels=("akiec", "bcc", "bkl", "df", "mel", "nv", "scc"), extra={"scc": "drop"})
    assert "tiny.onnx" in str(e.value) and e.value.hint
    nothing_written(tmp_path, out)
    with pytest.raises(ConfigError, match="more than once"):
        import_api([tiny_onnx["nchw"]], out, data=tiny_ham, preset="torchvision", size=32,
                   labels=("akiec", "bcc", "bkl", "df", "mel", "nv", "NV"))
    with pytest.raises(ConfigError, match="6 classes but the model has 7 outputs"):
        import_api([tiny_onnx["nchw"]], out, data=tiny_ham, preset="torchvision", size=32,
                   labels=("akiec", "bcc", "bkl", "df", "mel", "nv"))
    nothing_written(tmp_path, out)


def test_mismatched_input_size_is_refused(tiny_ham, tiny_onnx, tmp_path):
    out = tmp_path / "ens"
    r = run_cli("import", str(tiny_onnx["nchw"]), "--out", str(out), "--preset", "torchvision", "--size", "48",
                "--data", str(tiny_ham))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "mismatched input size: declared 48 but the model's own input is 32x32" in r.stderr
    assert "tiny.onnx" in r.stderr and "--size 32" in r.stderr
    nothing_written(tmp_path, out)


def test_nan_constant_and_non_probability_outputs_are_refused(tiny_ham, tiny_onnx, tmp_path):
    class Nan(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = TinyNet()

        def forward(self, x):
            return self.net(x) * torch.sqrt(x.mean() - 1e6)  # sqrt of a negative number: NaN

    class Constant(nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 7) + x.mean() * 0.0 + torch.arange(7.0)

    d = tmp_path / "models"
    d.mkdir()
    out = tmp_path / "ens"
    with pytest.raises(CheckpointError, match="NaN") as e:
        import_api([export(Nan(), d / "nan.onnx", 32)], out, data=tiny_ham, preset="torchvision", size=32)
    assert "nan.onnx" in str(e.value)
    with pytest.raises(CheckpointError, match="same output for every image"):
        import_api([export(Constant(), d / "const.onnx", 32)], out, data=tiny_ham, preset="torchvision", size=32)
    with pytest.raises(CheckpointError, match="do not sum to 1") as e:  # logits declared as probabilities
        import_api([tiny_onnx["nchw"]], out, data=tiny_ham, preset="torchvision", size=32, outputs="probs")
    assert "--outputs logits" in e.value.hint
    nothing_written(tmp_path, out)


def test_corrupt_files_are_refused(tiny_ham, tiny_onnx, tmp_path):
    d = tmp_path / "models"
    d.mkdir()
    cut = d / "cut.onnx"
    cut.write_bytes(tiny_onnx["nchw"].read_bytes()[:700])
    junk = d / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    out = tmp_path / "ens"
    with pytest.raises(CheckpointError, match="cut.onnx: not a readable ONNX model"):
        import_api([cut], out, data=tiny_ham, preset="torchvision", size=32)
    r = run_cli("import", str(junk), "--arch", "timm:resnet18", "--out", str(out), "--size", "32",
                "--data", str(tiny_ham))
    assert r.returncode == 2 and "junk.safetensors: cannot read the checkpoint" in r.stderr, r.stderr
    nothing_written(tmp_path, out)


def test_a_graph_with_a_fixed_batch_of_one_runs_image_by_image(tiny_ham, tiny_onnx, tmp_path):
    from edgeskin.data import load_dataset
    from edgeskin.evaluate import evaluate

    net = TinyNet()
    one = tmp_path / "b1.onnx"
    torch.onnx.export(Convention(net).eval(), torch.zeros(1, 3, 32, 32), str(one), input_names=["x"], dynamo=False)
    import_api([one], tmp_path / "ens", data=tiny_ham, preset="torchvision", size=32)
    import_api([tiny_onnx["nchw"]], tmp_path / "ens", data=tiny_ham, preset="torchvision", size=32)
    ev = evaluate(tmp_path / "ens", dataset=load_dataset(tiny_ham), split=None)
    np.testing.assert_allclose(ev.probs["b1"], ev.probs["tiny"], atol=1e-6)  # the same network, batch 1 vs dynamic


def test_a_failing_member_leaves_an_existing_ensemble_as_it_was(tiny_ham, tiny_onnx, tmp_path):
    out = tmp_path / "ens"
    import_api([tiny_onnx["nchw"]], out, data=tiny_ham, preset="torchvision", size=32, name="a")
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ConfigError, match="mismatched input size"):
        import_api([tiny_onnx["keras"]], out, data=tiny_ham, preset="keras-resnet50", size=40, name="b")
    assert sorted(p.name for p in out.iterdir()) == before
    with pytest.raises(ConfigError, match="already has a member named 'a'"):
        import_api([tiny_onnx["keras"]], out, data=tiny_ham, preset="keras-resnet50", name="a")


# ---------------------------------------------------------------- a trained reference member behind a foreign input

N_VAL = 12  # validation images the fidelity checks run on (a ResNet50 at 112 px each, on 2 cores)


@pytest.fixture(scope="module")
def ref(reference_model, ham_data, tmp_path_factory):
    """The reference ensemble's members, member0 exported behind Keras' input convention (NHWC,
    BGR, caffe, softmax) and member2 behind torchvision's at another size (128 px, logits)."""
    from edgeskin.models import load_ensemble

    d = tmp_path_factory.mktemp("ref-onnx")
    members = load_ensemble(reference_model)
    m0, m1, m2 = (m.model for m in members)
    keras0 = export(Convention(m0, layout="NHWC", order="BGR", mode="caffe", softmax=True), d / "keras0.onnx", 112,
                    layout="NHWC")
    tv2 = export(Convention(m2), d / "tv2.onnx", 128, name="pixel_values")
    sub = first_val(ham_data, reference_model / "split.csv", N_VAL)
    return {"members": members, "keras0": keras0, "tv2": tv2, "dir": d, "sub": sub,
            "paths": [Path(s.path) for s in sub.samples], "split": reference_model / "split.csv"}


@pytest.mark.reference
def test_trained_member_behind_keras_input_matches_its_own_probabilities(ref, ham_data, tmp_path):
    from edgeskin.evaluate import evaluate
    from edgeskin.metrics import classification_report

    res = import_api([ref["keras0"]], tmp_path / "k", data=ham_data, split=ref["split"], n=32,
                     preset="keras-resnet50", resize=128)
    assert not res.warnings
    manifest = json.loads((tmp_path / "k" / "keras0.json").read_text())
    assert manifest["preprocess"]["channel_order"] == "BGR" and manifest["preprocess"]["normalization"] == "caffe"
    assert manifest["input"]["layout"] == "NHWC" and manifest["input"]["size"] == 112  # from the graph
    assert manifest["source"]["sha256"] == manifest["sha256"] and manifest["check"]["images"] == 32

    ev = evaluate(tmp_path / "k", dataset=ref["sub"], split=None)
    want = torchvision_probs(ref["members"][0].model, ref["paths"], 112, 128)
    got = ev.probs["keras0"]
    diff = float(np.max(np.abs(got - want)))
    print(f"reference member0 behind NHWC/BGR/caffe ONNX: max abs prob diff {diff:.2e}")
    assert diff < 1e-4
    y = ev.targets
    assert ev.reports["keras0"]["top1"] == classification_report(want, y, ev.labels.codes)["top1"]

    # negative control: the same file declared RGB must not match, and import says so with both numbers
    bad = import_api([ref["keras0"]], tmp_path / "rgb", data=ham_data, split=ref["split"], n=32,
                     preset="keras-resnet50", resize=128, channel_order="RGB")
    assert len(bad.warnings) == 1
    check = bad.members[0]["check"]
    declared, swapped = check["accuracy"], check["accuracy_channels_swapped"]["BGR"]
    print(f"negative control (declared RGB): accuracy {100 * declared:.1f}% vs {100 * swapped:.1f}% with BGR")
    assert f"{100 * declared:.1f}%" in bad.warnings[0] and f"{100 * swapped:.1f}%" in bad.warnings[0]
    assert swapped - declared >= 0.10
    wrong = evaluate(tmp_path / "rgb", dataset=ref["sub"], split=None).probs["keras0"]
    assert float(np.max(np.abs(wrong - want))) > 0.05


@pytest.mark.reference
def test_mixed_ensemble_is_the_mean_of_members_each_with_its_own_preprocessing(ref, ham_data, tmp_path):
    """One edgeskin member (112 px) and two ONNX members (Keras convention at 112 px, torchvision
    convention at 128 px) as evaluate, `bench --reference` and the distillation teacher see them."""
    from edgeskin.bench import reference_from_models
    from edgeskin.labels import HAM10000
    from edgeskin.models import save_checkpoint

    ens = tmp_path / "mixed"
    save_checkpoint(ref["members"][1].model, ens / "a_member1", arch="resnet50", labels=HAM10000,
                    preprocess=PreprocessConfig(size=112, resize=128), dropout=0.3)
    import_api([ref["keras0"]], ens, data=ham_data, split=ref["split"], n=8, preset="keras-resnet50",
               resize=128, name="b_keras0")
    res = import_api([ref["tv2"]], ens, data=ham_data, split=ref["split"], n=8, preset="torchvision",
                     resize=146, name="c_tv2")
    assert res.ensemble is not None and res.ensemble["members"] == ["a_member1", "b_keras0", "c_tv2"]

    nets = [m.model for m in ref["members"]]
    want = {"a_member1": torchvision_probs(nets[1], ref["paths"], 112, 128),
            "b_keras0": torchvision_probs(nets[0], ref["paths"], 112, 128),
            "c_tv2": torchvision_probs(nets[2], ref["paths"], 128, 146)}
    mean = np.mean(list(want.values()), axis=0)
    # what `bench --reference` computes (through evaluate, which also reports each member)
    rp = reference_from_models(ens, dataset=ref["sub"], split=None, split_name="all")
    assert float(np.max(np.abs(rp.probs["ensemble"] - mean))) < 1e-4
    assert [m["name"] for m in rp.info["members"]] == ["a_member1", "b_keras0", "c_tv2"]

    # the distillation teacher: every member sees the student's view through its own preprocessing
    from torchvision import transforms as T
    from torchvision.transforms import functional as TF

    from edgeskin.data import eval_tensors
    from edgeskin.preprocess import load_resized
    from edgeskin.models import load_ensemble
    from edgeskin.train.distill import Teacher

    view = PreprocessConfig(size=112, resize=128)
    teacher = Teacher(load_ensemble(ens), view=view)
    assert teacher.model is None  # not one torch module: members run as they are
    x = eval_tensors([load_resized(p, view) for p in ref["paths"][:6]], view)
    got = teacher.probs(torch.from_numpy(x)).numpy()
    crop = T.Compose([T.Resize(128), T.CenterCrop(112), T.ToTensor()])
    views = torch.stack([crop(Image.open(p).convert("RGB")) for p in ref["paths"][:6]])
    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    with torch.inference_mode():
        p1 = torch.softmax(nets[1].eval()(norm(views)), 1)
        p0 = torch.softmax(nets[0].eval()(norm(views)), 1)
        p2 = torch.softmax(nets[2].eval()(norm(TF.resize(views, [128, 128], antialias=True))), 1)
    np.testing.assert_allclose(got, ((p0 + p1 + p2) / 3).numpy(), atol=1e-4)


# ---------------------------------------------------------------- the teacher: a mixed ensemble through `distill`

def test_mixed_teacher_distils_cached_and_online(tiny_ham, tiny_onnx, tmp_path):
    """An edgeskin member (32 px) with two ONNX members (Keras convention at 32 px, torchvision
    convention at 40 px) teaches a student through the command line, cached and online."""
    from _bundles import build_model_dir

    from edgeskin.data import load_dataset, make_split, write_split

    ens = tmp_path / "mixed"
    build_model_dir(ens, name="a_member")
    write_split(make_split(load_dataset(tiny_ham), seed=0), ens / "split.csv")
    import_api([tiny_onnx["keras"]], ens, data=tiny_ham, preset="keras-resnet50", name="b_keras")
    tv40 = export(Convention(TinyNet(seed=1)), tmp_path / "tv40.onnx", 40)
    import_api([tv40], ens, data=tiny_ham, preset="torchvision", size=40, resize=44, name="c_tv40")
    for augment in ("--no-augment", "--augment"):
        out = tmp_path / f"student{augment}"
        r = run_cli("distill", "--teacher", str(ens), "--out", str(out), "--student", "resnet18", "--data",
                    str(tiny_ham), "--preset", "tiny", "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "8",
                    "--init", "scratch", "--pretrained", "none", "--bf16", "off", "--device", "cpu",
                    "--latency-runs", "2", augment)
        assert r.returncode == 0, r.stdout + r.stderr
        rep = json.loads((out / "report.json").read_text())
        assert [m["name"] for m in rep["teacher_members"]] == ["a_member", "b_keras", "c_tv40"]
        assert [m.get("source", "edgeskin") for m in rep["teacher_members"]] == ["edgeskin", "onnx", "onnx"]
        student = json.loads((out / "student.json").read_text())
        assert student["preprocess"]["size"] == 32 and "channel_order" not in student["preprocess"]  # edgeskin's own
        cached = list((out / ".teacher-cache").glob("teacher-*.npz"))
        assert bool(cached) == (augment == "--no-augment")


# ---------------------------------------------------------------- timm

def test_timm_resnet50_safetensors_import_distill_bench(tiny_ham, tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    from edgeskin.data import load_dataset, make_split, write_split

    torch.manual_seed(0)
    net = timm.create_model("resnet50", pretrained=False, num_classes=7).eval()
    weights = tmp_path / "r50.safetensors"
    save_file(net.state_dict(), str(weights))
    split = write_split(make_split(load_dataset(tiny_ham), seed=0), tmp_path / "split.csv")
    ens = tmp_path / "timm-ens"
    r = run_cli("import", str(weights), "--arch", "timm:resnet50", "--size", "64", "--out", str(ens),
                "--data", str(tiny_ham), "--split", str(split), "--on", "train", "--check-images", "16")
    assert r.returncode == 0, r.stdout + r.stderr
    m = json.loads((ens / "r50.json").read_text())
    cfg = timm.data.resolve_data_config({}, model=net)  # timm's own preprocessing for this model
    assert m["source"]["format"] == "timm" and m["arch"] == "timm:resnet50"
    assert m["preprocess"]["interpolation"] == cfg["interpolation"] and m["preprocess"]["size"] == 64
    assert m["preprocess"]["crop_fraction"] == pytest.approx(cfg["crop_pct"])
    assert m["preprocess"]["mean"] == pytest.approx(list(cfg["mean"]))
    assert (ens / "split.csv").is_file()

    # the member computes what timm's own transforms and the network give (random weights: plumbing only)
    from edgeskin.evaluate import evaluate

    ds = load_dataset(tiny_ham)
    sub = replace(ds, samples=ds.samples[:6])
    tf = timm.data.create_transform(**{**cfg, "input_size": (3, 64, 64)})
    with torch.inference_mode():
        want = torch.softmax(net(torch.stack([tf(Image.open(s.path).convert("RGB")) for s in sub.samples])), 1)
    got = evaluate(ens, dataset=sub, split=None).probs["r50"]
    np.testing.assert_allclose(got, want.double().numpy(), atol=1e-5)

    student = tmp_path / "student"
    r = run_cli("distill", "--teacher", str(ens), "--out", str(student), "--student", "resnet18", "--data",
                str(tiny_ham), "--preset", "tiny", "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "8",
                "--init", "scratch", "--pretrained", "none", "--bf16", "off", "--device", "cpu", "--latency-runs", "0",
                "--no-augment")
    assert r.returncode == 0, r.stdout + r.stderr
    spre = json.loads((student / "student.json").read_text())["preprocess"]  # its own, not timm's bicubic
    assert spre["interpolation"] == "bilinear" and spre["size"] == 64 and spre["mean"] == pytest.approx(IMAGENET_MEAN)
    from edgeskin.data import read_split
    from edgeskin.targets import get_target

    bundle = get_target("cpu").compile(student / "student.json", precision="fp32", dataset=ds, split=read_split(split),
                                       out=tmp_path / "s.edgeskin", threads=1, force=True).bundle
    out = tmp_path / "bench"
    r = run_cli("bench", "--reference", str(ens), "--student", str(student / "student.json"), "--bundle", str(bundle),
                "--data", str(tiny_ham), "--split", str(split), "--out", str(out), "--runs", "3", "--min-seconds", "0")
    assert r.returncode in (0, 1), r.stdout + r.stderr  # 1: the random teacher's budget breach, reported
    rep = json.loads((out / "report.json").read_text())
    assert [(x["kind"], x["status"]) for x in rep["rows"]] == [("reference", "ok"), ("reference", "ok"), ("bundle", "ok")]
    assert rep["rows"][0]["row"] == "ensemble"


# ---------------------------------------------------------------- Keras

def test_keras_resnet50_matches_keras_own_predict(tiny_ham, tmp_path):
    """A keras.applications.ResNet50 (7 classes) trained for a step so its predictions vary
    across images, saved as .keras (and legacy .h5) and imported with the keras-resnet50 preset: edgeskin's
    probabilities equal Keras' predict after keras.applications.resnet50.preprocess_input on the
    same crops, within 1e-3 (the two engines' float32 difference; the preprocessing matches exactly)."""
    if os.environ.get("KERAS_BACKEND", "torch") != "torch":
        pytest.skip("Keras members are loaded on the torch backend")
    os.environ["KERAS_BACKEND"] = "torch"
    keras = pytest.importorskip("keras")
    from torchvision import transforms as T

    from edgeskin.data import load_dataset
    from edgeskin.labels import HAM10000

    ds = load_dataset(tiny_ham)
    crop = T.Compose([T.Resize(37), T.CenterCrop(32)])  # edgeskin's default resize for 32 px: round(32 / 0.875)
    pixels = np.stack([np.asarray(crop(Image.open(s.path).convert("RGB")), dtype=np.float32) for s in ds.samples])
    x = keras.applications.resnet50.preprocess_input(pixels.copy())
    y = np.array([HAM10000.encode(s.dx) for s in ds.samples])
    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(weights=None, classes=7, input_shape=(32, 32, 3))
    for layer in model.layers:  # moving statistics = the last batch's, so a few steps give a usable network
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy")
    t0 = __import__("time").perf_counter()
    model.fit(x, y, epochs=1, batch_size=len(x), verbose=0)  # one step: enough with these statistics
    print(f"keras fit {__import__('time').perf_counter() - t0:.1f}s")
    want = model.predict(x, verbose=0)
    assert float(want.std(axis=0).max()) > 1e-3  # predictions depend on the image
    path = tmp_path / "k_r50.keras"
    model.save(path)

    ens = tmp_path / "keras-ens"
    import_api([path], ens, data=tiny_ham, n=12, preset="keras-resnet50")
    m = json.loads((ens / "k_r50.json").read_text())
    assert m["source"]["format"] == "keras" and m["weights"] == "k_r50.onnx" and m["input"]["size"] == 32
    assert m["source"]["conversion"]["max_abs_diff_vs_keras_predict"] < 1e-3

    from edgeskin.evaluate import evaluate

    few = replace(ds, samples=ds.samples[::4])
    want, x = want[::4], x[::4]
    got = evaluate(ens, dataset=few, split=None).probs["k_r50"]
    print(f"Keras ResNet50 predictions: std across images up to {float(want.std(axis=0).max()):.3f}, "
          f"{len(set(want.argmax(1)))} distinct top-1 classes")
    diff = float(np.max(np.abs(got - want)))
    print(f"Keras ResNet50 via ONNX vs Keras predict: max abs prob diff {diff:.2e}")
    # Tolerance 1e-3: ONNX Runtime and Keras (torch) compute the same float32 graph in different
    # orders, and this briefly trained network's sharp softmax turns ~1e-6 logit differences into
    # ~1e-4 probability differences. The preprocessing itself is held exactly: the member on Keras'
    # own preprocess_input tensors gives what evaluate gives.
    assert diff < 1e-3
    assert (got.argmax(1) == want.argmax(1)).all()
    from edgeskin.members import load_members

    [member] = load_members(ens)
    np.testing.assert_allclose(member.probs(x), got, atol=1e-6)

    # the legacy HDF5 file of the same model imports to the same member
    model.save(tmp_path / "k_h5.h5")
    import_api([tmp_path / "k_h5.h5"], tmp_path / "h5-ens", data=tiny_ham, n=8, preset="keras-resnet50")
    h5 = evaluate(tmp_path / "h5-ens", dataset=few, split=None).probs["k_h5"]
    np.testing.assert_allclose(h5, got, atol=1e-6)
    assert json.loads((tmp_path / "h5-ens" / "k_h5.json").read_text())["source"]["file"] == "k_h5.h5"


# ---------------------------------------------------------------- compile --member with an ONNX member

def test_onnx_member_compiles_for_cpu_converted_down_and_tflite_names_the_route(tiny_ham, tmp_path):
    from edgeskin.data import load_dataset, make_split, write_split
    from edgeskin.members import load_members
    from edgeskin.runtime import load
    from edgeskin.targets import get_target

    ds = load_dataset(tiny_ham)
    split = make_split(ds, seed=0)
    ens = tmp_path / "ens"
    ens.mkdir()
    write_split(split, ens / "split.csv")
    k20 = export(Convention(TinyNet(), layout="NHWC", order="BGR", mode="caffe", softmax=True), tmp_path / "k20.onnx",
                 32, layout="NHWC", opset=20)
    isic = export(Convention(TinyNet(classes=9, seed=2)), tmp_path / "isic.onnx", 32)
    import_api([k20], ens, data=tiny_ham, preset="keras-resnet50")
    import_api([isic], ens, data=tiny_ham, preset="torchvision", size=32,
               labels=("MEL", "NV", "BCC", "AK=akiec", "BKL", "DF", "VASC", "SCC", "UNK"),
               extra={"SCC": "akiec", "UNK": "drop"})
    members = {m.name: m for m in load_members(ens)}
    images = [s.path for s in ds.samples[:6]]
    cpu = get_target("cpu")

    # opset 20 -> 17 (the cpu default) by onnx's version converter; the bundle keeps the BGR/caffe/NHWC input
    res = cpu.compile(ens, member="k20", precision="fp32", dataset=ds, split=split, out=tmp_path / "k20.edgeskin",
                      threads=1, force=True)
    man = json.loads((res.bundle / "manifest.json").read_text())
    assert man["input"]["channel_order"] == "BGR" and man["input"]["normalization"] == "caffe"
    assert man["input"]["layout"] == "NHWC"
    assert man["provenance"]["export"]["source_opset"] == 20 and man["provenance"]["export"]["opset"] == 17
    assert "version_converter" in man["provenance"]["export"]["converter"]
    # the ISIC-style member: extra classes merged and dropped inside the bundle's graph
    res9 = cpu.compile(ens, member="isic", precision="fp32", dataset=ds, split=split, out=tmp_path / "isic.edgeskin",
                       threads=1, force=True)
    for name, bundle in (("k20", res.bundle), ("isic", res9.bundle)):
        m = members[name]
        from edgeskin.preprocess import preprocess

        want = m.probs(np.stack([preprocess(p, m.preprocess) for p in images]))
        with load(bundle, threads=1) as pred:  # the runtime's own preprocessing, from the manifest
            got = pred.probabilities(np.stack([pred.tensor(p) for p in images]))
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=name)

    # int8: calibration images go through the member's own preprocessing, like every other stage
    from edgeskin.calibration import make_calibration_set

    # (an NHWC, caffe-mode graph: calibration tensors in edgeskin's own NCHW form would not even run)
    cal = make_calibration_set(ds, split, size=16, seed=0, force=True)
    q = cpu.compile(ens, member="k20", precision="int8", dataset=ds, split=split, out=tmp_path / "k8.edgeskin",
                    calibration=cal, threads=1, force=True)
    qman = json.loads((q.bundle / "manifest.json").read_text())
    assert qman["precision"] == "int8" and qman["input"]["normalization"] == "caffe" and q.check["n"] > 0
    # jetson: the device profile's highest opset applies (JetPack 5.1's TensorRT 8.5 parses opset 17)
    jet = get_target("jetson").compile(ens, member="k20", precision="fp32", dataset=ds, split=split,
                                       out=tmp_path / "k20.jetson.edgeskin", device="jetson-orin-nano", jetpack="5.1",
                                       threads=1, force=True)
    jman = json.loads((jet.bundle / "manifest.json").read_text())
    assert jman["engine"]["opset"] == 17 and jman["provenance"]["export"]["source_opset"] == 20
    assert jman["input"]["channel_order"] == "BGR"
    # a target whose runtime stops below the graph's opset, where the converter cannot go: refused
    with pytest.raises(ConfigError, match="opset 20 .* at most opset 13") as e:
        cpu.compile(ens, member="k20", precision="fp32", dataset=ds, split=split, out=tmp_path / "k13.edgeskin",
                    opset=13, threads=1, force=True)
    assert "re-export the model at opset 13" in e.value.hint
    assert not (tmp_path / "k13.edgeskin").exists()
    # tflite: no maintained converter takes an ONNX member; the error names the route
    with pytest.raises(CheckpointError, match="imported onnx model") as e:
        get_target("tflite").compile(ens, member="k20", precision="fp32", dataset=ds, split=split,
                                      out=tmp_path / "k.tflite.edgeskin")
    assert "distil the ensemble into a student first" in e.value.hint
    assert not (tmp_path / "k.tflite.edgeskin").exists()


# ---------------------------------------------------------------- recipes

def test_recipe_loads_a_mixed_ensemble_and_runs_distill_compile_bench(tiny_ham, tiny_onnx, tmp_path):
    from _bundles import build_model_dir

    ens = tmp_path / "mixed"
    build_model_dir(ens, name="a_member")
    import_api([tiny_onnx["keras"]], ens, data=tiny_ham, preset="keras-resnet50", name="b_keras")
    recipe = tmp_path / "byo.toml"
    recipe.write_text(f"""
name = "byo"
out = "out"

[data]
path = "{tiny_ham}"

[split]
seed = 0

[ensemble]
load = "mixed"

[student]
preset = "tiny"
arch = "resnet18"
epochs = 1
steps_per_epoch = 2
augment = false
pretrained = "none"
init = "scratch"

[[targets]]
target = "cpu"
precision = "fp32"

[budgets.compile]
on_miss = "keep"

[bench]
runs = 3
min_seconds = 0
""")
    r = run_cli("run", str(recipe))
    assert r.returncode in (0, 4), r.stdout + r.stderr  # 4: a random tiny student over its budget, reported
    rep = json.loads((tmp_path / "out" / "bench" / "report.json").read_text())
    assert rep["rows"][0]["row"] == "ensemble" and rep["rows"][0]["status"] == "ok"
    teacher = json.loads(next((tmp_path / "out").rglob("student.json")).read_text())["teacher"]
    assert [m["name"] for m in teacher["members"]] == ["a_member", "b_keras"]


def test_state_dict_heads_are_mapped_and_misfits_listed(tmp_path):
    import torchvision

    from edgeskin.members.torchnet import build, fit_state, read_state

    src = torchvision.models.resnet18(num_classes=7).state_dict()
    # a head saved as Sequential(Dropout, Linear), as edgeskin and the reference ensemble save it
    seq = {("fc.1." + k[3:] if k.startswith("fc.") else k): v for k, v in src.items()}
    torch.save({"state_dict": {"module." + k: v for k, v in seq.items()}}, tmp_path / "wrapped.pth")
    model = build("torchvision:resnet18", 7)
    renames = fit_state(model, read_state(tmp_path / "wrapped.pth"), tmp_path / "wrapped.pth")
    assert renames == {"fc.1.weight": "fc.weight", "fc.1.bias": "fc.bias"}
    assert torch.equal(model.fc.weight, src["fc.weight"])
    broken = dict(src)
    broken.pop("layer4.1.bn2.running_mean")
    broken["extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as e:
        fit_state(build("torchvision:resnet18", 7), broken, tmp_path / "broken.pth")
    assert "missing keys ['layer4.1.bn2.running_mean']" in str(e.value)
    assert "unexpected keys ['extra.weight']" in str(e.value) and "--arch" in e.value.hint


def test_onnx_members_import_and_evaluate_without_torch(tiny_ham, tiny_onnx, tmp_path):
    """An ONNX member runs in ONNX Runtime: importing and evaluating it never imports torch."""
    import subprocess
    import sys

    code = f"""
import sys
sys.modules["torch"] = None  # any import of torch fails from here on
from edgeskin.data import load_dataset
from edgeskin.evaluate import evaluate
from edgeskin.members.declare import Declaration
from edgeskin.members.importer import import_members
ds = load_dataset({str(tiny_ham)!r})
import_members([{str(tiny_onnx["keras"])!r}], {str(tmp_path / "ens")!r}, Declaration(preset="keras-resnet50"),
               dataset=ds, check_images=8)
ev = evaluate({str(tmp_path / "ens")!r}, dataset=ds, split=None)
print("top1", ev.reports["tiny_keras"]["top1"])
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "top1" in r.stdout, r.stderr


def test_an_undeclared_input_convention_is_refused(tiny_ham, tiny_onnx, tmp_path):
    r = run_cli("import", str(tiny_onnx["keras"]), "--out", str(tmp_path / "ens"), "--data", str(tiny_ham))
    assert r.returncode == 2 and "how the model expects its input is not declared" in r.stderr, r.stderr
    assert "--preset keras-resnet50" in r.stderr
    nothing_written(tmp_path, tmp_path / "ens")


def test_a_toml_declaration_maps_an_isic_style_member_and_options_override_it(tiny_ham, tmp_path):
    """Nine ISIC 2019-style outputs: AK renamed, SCC merged into akiec, UNK dropped and the rest
    renormalised, all from a TOML file; the command line overrides the file."""
    net = TinyNet(classes=9, seed=3)
    src = export(Convention(net, layout="NHWC", order="RGB", mode="tf", softmax=True), tmp_path / "isic9.onnx", 32,
                 layout="NHWC")
    spec = tmp_path / "isic.toml"
    spec.write_text('preset = "keras-tf"\nlabels = ["MEL", "NV", "BCC", "AK=akiec", "BKL", "DF", "VASC", "SCC", "UNK"]\n'
                    'extra = { SCC = "akiec", UNK = "drop" }\nresize = 48\n')
    ens = tmp_path / "ens"
    r = run_cli("import", str(src), "--spec", str(spec), "--resize", "36", "--out", str(ens), "--data", str(tiny_ham))
    assert r.returncode == 0, r.stdout + r.stderr
    m = json.loads((ens / "isic9.json").read_text())
    assert m["preprocess"]["resize"] == 36 and m["preprocess"]["normalization"] == "tf"  # option over file
    assert m["class_map"]["dropped"] == ["UNK"] and m["class_map"]["merged"] == {"AK": "akiec", "SCC": "akiec"}
    assert m["declaration"]["extra"] == {"SCC": "akiec", "UNK": "drop"}

    from edgeskin.data import load_dataset
    from edgeskin.evaluate import evaluate
    from torchvision import transforms as T

    ds = load_dataset(tiny_ham)
    sub = replace(ds, samples=ds.samples[:8])
    got = evaluate(ens, dataset=sub, split=None).probs["isic9"]
    tf = T.Compose([T.Resize(36), T.CenterCrop(32), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    with torch.inference_mode():
        p = torch.softmax(net(torch.stack([tf(Image.open(s.path).convert("RGB")) for s in sub.samples])), 1).numpy()
    # ours: akiec, bcc, bkl, df, mel, nv, vasc from MEL, NV, BCC, AK, BKL, DF, VASC, SCC, UNK
    want = np.stack([p[:, 3] + p[:, 7], p[:, 2], p[:, 4], p[:, 5], p[:, 0], p[:, 1], p[:, 6]], axis=1)
    want /= want.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, atol=1e-5)
