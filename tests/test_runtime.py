"""The device runtime: no torch, every input kind, determinism, golden outputs, selftest."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _bundles import run_cli
from conftest import CODES, REPO
from edgeskin.bundle import BundleReader, pack_bundle, write_bundle
from edgeskin.errors import ConfigError
from edgeskin.preprocess import open_image, preprocess
from edgeskin.runtime import Prediction, load, selftest


# the shared fixture exports with torch's legacy exporter, on purpose
pytestmark = pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")

@pytest.fixture(scope="module")
def fp32(built):
    return load(built.fp32)


@pytest.fixture(scope="module")
def int8(built):
    return load(built.int8)


@pytest.fixture(scope="module")
def images(built) -> list[Path]:
    return sorted(built.data.rglob("*.jpg"))[:6]


# ------------------------------------------------------------------ no torch


BLOCKER = """
import sys
BLOCKED = ("torch", "torchvision", "onnx", "nncf", "tensorflow")
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked by the test: {name}")
        return None
sys.meta_path.insert(0, _Block())
"""


def test_runtime_works_without_torch_onnx_nncf_tensorflow(built, images, fp32, int8):
    code = BLOCKER + textwrap.dedent(f"""
        import json
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("the import blocker does not work")
        import edgeskin.runtime
        out = {{}}
        for name, bundle in (("fp32", {str(built.fp32)!r}), ("int8", {str(built.int8)!r})):
            p = edgeskin.runtime.load(bundle)
            out[name] = p.predict({str(images[0])!r}).probs.tolist()
            assert edgeskin.runtime.selftest(p).passed
        bad = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not bad, bad
        print(json.dumps(out))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["fp32"] == fp32.predict(images[0]).probs.tolist()
    assert got["int8"] == int8.predict(images[0]).probs.tolist()


# ------------------------------------------------------------------ inputs


def test_every_input_kind_gives_the_same_probabilities(fp32, images):
    path = images[0]
    ref = fp32.predict(path)
    assert isinstance(ref, Prediction) and ref.source == str(path)
    assert ref.probs.shape == (7,) and ref.probs.dtype == np.float64
    assert abs(ref.probs.sum() - 1.0) < 1e-9 and (ref.probs > 0).all()
    assert ref.labels == CODES

    np.testing.assert_array_equal(fp32.predict(str(path)).probs, ref.probs)
    np.testing.assert_array_equal(fp32.predict(path.read_bytes()).probs, ref.probs)
    np.testing.assert_array_equal(fp32.predict(bytearray(path.read_bytes())).probs, ref.probs)
    with Image.open(path) as im:
        np.testing.assert_array_equal(fp32.predict(im).probs, ref.probs)
    hwc = np.asarray(open_image(path))
    assert hwc.dtype == np.uint8 and hwc.ndim == 3 and hwc.shape[-1] == 3
    np.testing.assert_array_equal(fp32.predict(hwc).probs, ref.probs)
    chw = preprocess(path, fp32.preprocess_config)
    assert chw.shape == (3, 32, 32) and chw.dtype == np.float32
    np.testing.assert_array_equal(fp32.predict(chw).probs, ref.probs)


def test_lists_and_batches_match_single_predictions(fp32, images):
    single = np.stack([fp32.predict(p).probs for p in images])
    listed = fp32.predict(list(images))
    assert isinstance(listed, list) and [r.source for r in listed] == [str(p) for p in images]
    np.testing.assert_allclose(np.stack([r.probs for r in listed]), single, rtol=0, atol=1e-7)
    batch = np.stack([preprocess(p, fp32.preprocess_config) for p in images])
    as_batch = fp32.predict(batch)
    assert isinstance(as_batch, list) and len(as_batch) == len(images)
    np.testing.assert_allclose(np.stack([r.probs for r in as_batch]), single, rtol=0, atol=1e-7)
    small = fp32.predict(list(images), batch_size=2)
    np.testing.assert_allclose(np.stack([r.probs for r in small]), single, rtol=0, atol=1e-7)
    mixed = fp32.predict([images[0], images[0].read_bytes(), np.asarray(open_image(images[0]))])
    for r in mixed:
        np.testing.assert_allclose(r.probs, single[0], rtol=0, atol=1e-7)
    assert fp32.predict([]) == []


def test_different_images_give_different_probabilities(fp32, images):
    a, b = fp32.predict(images[0]).probs, fp32.predict(images[-1]).probs
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("bad", [
    np.zeros((3, 32, 32), dtype=np.float64),
    np.zeros((32, 32), dtype=np.uint8),
    np.zeros((32, 32, 4), dtype=np.uint8),
])
def test_unusable_arrays_are_config_errors(fp32, bad):
    with pytest.raises(ConfigError, match="is not an input"):
        fp32.predict(bad)


@pytest.mark.parametrize("shape", [(32, 32, 3), (3, 64, 64), (1, 32, 32)])
def test_preprocessed_tensor_of_the_wrong_shape_is_a_config_error(fp32, shape):
    with pytest.raises(ConfigError, match="does not fit this bundle"):
        fp32.predict(np.zeros(shape, dtype=np.float32))


def test_top_k_and_to_dict(fp32, images):
    r = fp32.predict(images[1], top_k=4)
    top = r.top
    assert len(top) == 4
    probs = [p for _, p in top]
    assert probs == sorted(probs, reverse=True)
    order = np.argsort(-r.probs)
    assert [c for c, _ in top] == [CODES[i] for i in order[:4]]
    assert r.label == CODES[int(np.argmax(r.probs))]
    assert len(fp32.predict(images[1], top_k=100).top) == 7
    assert len(fp32.predict(images[1], top_k=0).top) == 1
    d = json.loads(json.dumps(r.to_dict()))
    assert d["source"] == str(images[1])
    assert [t["label"] for t in d["top"]] == [c for c, _ in top]
    assert list(d["probabilities"]) == list(CODES)
    assert d["probabilities"] == {c: float(p) for c, p in zip(CODES, r.probs)}
    assert abs(sum(d["probabilities"].values()) - 1) < 1e-9


def test_top_k_ties_keep_label_order():
    p = Prediction(np.array([0.1, 0.3, 0.3, 0.0, 0.3, 0.0, 0.0]), CODES, top_k=3)
    assert [c for c, _ in p.top] == ["bcc", "bkl", "mel"]


# ------------------------------------------------------------------ determinism / golden


@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_bit_identical_across_runs_and_predictors(built, images, which):
    bundle = built.fp32 if which == "fp32" else built.int8
    a, b = load(bundle), load(bundle)
    first = np.stack([a.predict(p).probs for p in images])
    for _ in range(3):
        np.testing.assert_array_equal(np.stack([a.predict(p).probs for p in images]), first)
    np.testing.assert_array_equal(np.stack([b.predict(p).probs for p in images]), first)


@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_runtime_reproduces_recorded_golden_probs(built, which):
    p = load(built.fp32 if which == "fp32" else built.int8)
    g = p.reader.golden()
    got = p.probabilities(g["inputs"])
    assert got.shape == g["probs"].shape == (8, 7)
    # recorded through this same runtime at compile time: far tighter than the bundle's tolerance
    np.testing.assert_allclose(got, g["probs"], rtol=0, atol=1e-7)
    # and one at a time
    for i in range(len(got)):
        np.testing.assert_allclose(p.probabilities(g["inputs"][i : i + 1])[0], g["probs"][i], rtol=0, atol=1e-7)


def test_golden_ids_are_validation_images(built):
    from edgeskin.data import read_split

    split = read_split(built.split_file)
    g = BundleReader(built.fp32).golden()
    ids = [str(i) for i in g["ids"]]
    assert len(ids) == 8 and all(split.assignment[i] == "val" for i in ids)


@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_selftest_passes_on_untouched_bundle(built, which):
    r = selftest(built.fp32 if which == "fp32" else built.int8)
    assert r.passed and r.n == 8 and r.top1_agreement == 1.0
    assert r.max_abs_diff <= r.tolerance
    assert r.tolerance == (1e-4 if which == "fp32" else 1e-2)


def _rebuild_with_golden(src: Path, dest: Path, alter) -> tuple[Path, list[str]]:  # noqa: ANN001
    """Same manifest and model, a golden.npz edited by ``alter`` and re-hashed (write_bundle)."""
    reader = BundleReader(src)
    g = reader.golden()
    probs = alter(g["probs"].copy())
    buf = io.BytesIO()
    np.savez(buf, inputs=g["inputs"], probs=probs, ids=g["ids"])
    files = {n: src / n for n in reader.manifest.files if n != "golden.npz"}
    files["golden.npz"] = buf.getvalue()
    write_bundle(dest, reader.manifest, files)
    return dest, [str(i) for i in g["ids"]]


def _alter_row(k: int, delta: float):  # noqa: ANN202
    def alter(p: np.ndarray) -> np.ndarray:
        row = p[k].copy()
        j = int(np.argmax(row))
        row[j] -= delta
        row[(j + 1) % len(row)] += delta  # still a distribution
        p[k] = row
        return p
    return alter


@pytest.mark.parametrize("which, k", [("fp32", 3), ("int8", 5)])
def test_selftest_fails_when_engine_computes_differently(built, tmp_path, which, k):
    src = built.fp32 if which == "fp32" else built.int8
    bundle, ids = _rebuild_with_golden(src, tmp_path / "odd.edgeskin", _alter_row(k, 0.05))
    assert BundleReader(bundle).verify()  # hashes are consistent: only the numbers differ
    r = selftest(bundle)
    assert not r.passed
    assert r.worst_index == k and r.worst_id == ids[k]
    assert abs(r.max_abs_diff - 0.05) < 1e-6

    # a difference below the tolerance still passes
    tiny = selftest(_rebuild_with_golden(src, tmp_path / "tiny.edgeskin", _alter_row(k, r.tolerance / 10))[0])
    assert tiny.passed and tiny.worst_index == k


def test_selftest_cli_pass_and_fail(built, tmp_path):
    r = run_cli("selftest", str(built.int8))
    assert r.returncode == 0, r.stderr
    assert "selftest passed" in r.stdout and "8 golden inputs" in r.stdout

    bundle, ids = _rebuild_with_golden(built.int8, tmp_path / "odd.edgeskin", _alter_row(2, 0.2))
    r = run_cli("selftest", str(bundle))
    assert r.returncode != 0
    assert "selftest FAILED" in r.stderr and f"#2 ({ids[2]})" in r.stderr
    assert "Traceback" not in r.stderr


def test_zip_bundle_predicts_like_the_folder(built, tmp_path, int8, images):
    z = pack_bundle(built.int8, tmp_path / "int8.edgeskin.zip")
    pz = load(z)
    try:
        assert pz.manifest == int8.manifest
        for p in images[:3]:
            np.testing.assert_array_equal(pz.predict(p).probs, int8.predict(p).probs)
        assert selftest(pz).passed
    finally:
        pz.reader.close()


def test_load_copied_bundle_anywhere(built, tmp_path, fp32, images):
    moved = Path(shutil.copytree(built.fp32, tmp_path / "elsewhere" / "renamed.edgeskin"))
    p = load(moved)
    np.testing.assert_array_equal(p.predict(images[0]).probs, fp32.predict(images[0]).probs)


def test_a_backend_answering_for_fewer_images_is_an_error_not_a_shift(built, images):
    """zip() would silently attach the answers to the wrong images (a TensorRT context that ran
    only the first N images did exactly that)."""
    from edgeskin.errors import EdgeskinError

    with load(built.fp32) as pred:
        real = pred.backend

        class Short:
            name, version = "short", "0"

            def run(self, x):
                return real.run(x)[:-1]

        pred.backend = Short()
        with pytest.raises(EdgeskinError, match="outputs"):
            pred.predict(list(images[:3]))
        pred.backend = real
