"""`edgeskin predict` as a user runs it: JSON, folders, bad files in a batch, odd image formats."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _bundles import run_cli
from conftest import CODES
from edgeskin.runtime import load


# the shared fixture exports with torch's legacy exporter, on purpose
pytestmark = pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")

@pytest.fixture(scope="module")
def predictor(built):
    return load(built.int8)


def _rgb(seed: int, w: int = 56, h: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (1, 1, 3))
    grad = np.linspace(0, 120, w)[None, :, None]
    return np.clip(base + grad + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR claims ``width`` x ``height`` (CRC recomputed)."""
    data = bytearray(_png_bytes(Image.new("RGB", (1, 1), (200, 10, 10))))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def exif_rotated_jpeg(upright: np.ndarray) -> bytes:
    """Pixels stored rotated 90 degrees counter-clockwise, EXIF orientation 6 to undo it."""
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=95, exif=exif)
    return buf.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("predict-images")
    out: dict[str, Path] = {}

    def put(name: str, data: bytes) -> None:
        (d / name).write_bytes(data)
        out[name] = d / name

    good = io.BytesIO()
    Image.fromarray(_rgb(1)).save(good, "JPEG", quality=90)
    put("good.jpg", good.getvalue())
    put("good.png", _png_bytes(Image.fromarray(_rgb(2))))
    # failures
    put("empty.jpg", b"")
    big = io.BytesIO()
    Image.fromarray(_rgb(3, 160, 120)).save(big, "JPEG", quality=95)
    put("truncated.jpg", big.getvalue()[: len(big.getvalue()) // 2])
    put("text.jpg", b"this is a text file, not a JPEG\n" * 4)
    put("bomb.png", bomb_png(20000, 20000))
    put("bomb-warn.png", bomb_png(10000, 10000))  # above Pillow's warning limit, below its error limit
    # odd but valid
    put("exif6.jpg", exif_rotated_jpeg(_rgb(4, 64, 40)))
    gray = _rgb(5)[..., 0]
    put("gray.png", _png_bytes(Image.fromarray(gray, "L")))
    put("gray-as-rgb.png", _png_bytes(Image.fromarray(np.repeat(gray[..., None], 3, axis=2))))
    put("gray16.png", _png_bytes(Image.fromarray(gray.astype(np.uint16) * 257)))
    rgb = _rgb(6)
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 37, np.uint8)], axis=2)
    put("rgba.png", _png_bytes(Image.fromarray(rgba, "RGBA")))
    put("rgb-of-rgba.png", _png_bytes(Image.fromarray(rgb)))
    cmyk = io.BytesIO()
    Image.fromarray(_rgb(7)).convert("CMYK").save(cmyk, "JPEG", quality=95)
    put("cmyk.jpg", cmyk.getvalue())
    return out


BAD = {
    "empty.jpg": "empty",
    "truncated.jpg": "cannot be decoded",
    "text.jpg": "not a readable image",
    "bomb.png": "decompression bomb",
    "bomb-warn.png": "decompression bomb",
    "missing.jpg": "not found",
}
ODD = ["exif6.jpg", "gray.png", "gray-as-rgb.png", "gray16.png", "rgba.png", "rgb-of-rgba.png", "cmyk.jpg"]


def test_crafted_files_are_what_they_claim(files):
    assert Image.open(files["gray16.png"]).mode.startswith("I")
    assert Image.open(files["cmyk.jpg"]).mode == "CMYK"
    assert Image.open(files["rgba.png"]).mode == "RGBA"
    assert Image.open(files["exif6.jpg"]).getexif()[0x0112] == 6
    with pytest.raises(Image.DecompressionBombError):
        Image.open(files["bomb.png"])


def predict_json(built, *args: str, top_k: int | None = None):  # noqa: ANN001, ANN201
    extra = ["--top-k", str(top_k)] if top_k is not None else []
    r = run_cli("predict", *args, "--bundle", str(built.int8), "--json", *extra)
    try:
        data = json.loads(r.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"stdout is not JSON (exit {r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r, data


@pytest.fixture(scope="module")
def mixed_run(built, files):
    """One batch: good images around every kind of bad file, plus the odd formats."""
    d = next(iter(files.values())).parent
    order = ["good.jpg", *BAD, "good.png", *ODD]
    paths = [str(files[n]) if n in files else str(d / n) for n in order]
    r, data = predict_json(built, *paths)
    return order, paths, r, {Path(x["source"]).name: x for x in data}, data


def test_batch_with_failures_exits_3_and_keeps_going(mixed_run):
    order, paths, r, by_name, data = mixed_run
    assert r.returncode == 3, r.stderr  # a failed item, as in the exit-code table
    assert [x["source"] for x in data] == paths  # every file reported, in order
    assert f"{len(BAD)} of {len(order)} image(s) failed" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("name", list(BAD))
def test_each_bad_file_gets_an_error_naming_it(mixed_run, name):
    _, paths, _, by_name, _ = mixed_run
    res = by_name[name]
    assert "error" in res and "top" not in res
    assert name in res["error"] and BAD[name] in res["error"], res
    assert res["hint"]


@pytest.mark.parametrize("name", ["good.jpg", "good.png", *ODD])
def test_good_and_odd_images_get_predictions(mixed_run, name):
    res = mixed_run[3][name]
    assert "error" not in res, res
    probs = res["probabilities"]
    assert list(probs) == list(CODES) and abs(sum(probs.values()) - 1) < 1e-9
    assert len(res["top"]) == 3
    assert res["top"][0]["probability"] == max(probs.values())


def _probs(res: dict) -> np.ndarray:
    return np.array([res["probabilities"][c] for c in CODES])


def test_predictions_match_the_python_api(mixed_run, files, predictor):
    by_name = mixed_run[3]
    for name in ("good.jpg", "good.png", "cmyk.jpg"):
        np.testing.assert_array_equal(_probs(by_name[name]), predictor.predict(files[name]).probs)


def test_exif_rotation_is_applied(mixed_run, files, predictor):
    with Image.open(files["exif6.jpg"]) as im:
        stored = np.asarray(im.convert("RGB"))  # decoded pixels, orientation not applied
    assert stored.shape[:2] == (64, 40)
    upright = np.ascontiguousarray(np.asarray(Image.fromarray(stored).transpose(Image.Transpose.ROTATE_270)))
    assert upright.shape[:2] == (40, 64)
    got = _probs(mixed_run[3]["exif6.jpg"])
    np.testing.assert_array_equal(got, predictor.predict(upright).probs)
    # and the rotation matters for this image, so the check above can fail
    assert not np.array_equal(got, predictor.predict(stored).probs)


@pytest.mark.parametrize("name, same_as", [("gray.png", "gray-as-rgb.png"), ("gray16.png", "gray-as-rgb.png"),
                                           ("rgba.png", "rgb-of-rgba.png")])
def test_mode_conversions_preserve_content(mixed_run, name, same_as):
    by_name = mixed_run[3]
    np.testing.assert_array_equal(_probs(by_name[name]), _probs(by_name[same_as]))


def test_repeated_runs_are_bit_identical(built, files, mixed_run):
    names = ["good.jpg", "good.png", "exif6.jpg", "cmyk.jpg", "gray16.png"]
    r, again = predict_json(built, *[str(files[n]) for n in names])
    assert r.returncode == 0, r.stderr
    first = mixed_run[3]
    for res in again:
        name = Path(res["source"]).name
        assert res["probabilities"] == first[name]["probabilities"]  # exact float equality
        assert res["top"] == first[name]["top"]


def test_folder_argument_expands_to_its_images(built, tmp_path, files):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    (d / "b.jpg").write_bytes(files["good.jpg"].read_bytes())
    (d / "a.PNG").write_bytes(files["good.png"].read_bytes())
    (d / "sub" / "c.jpeg").write_bytes(files["cmyk.jpg"].read_bytes())
    (d / "notes.txt").write_text("not an image")
    (d / "model.json").write_text("{}")
    r, data = predict_json(built, str(d), top_k=2)
    assert r.returncode == 0, r.stderr
    assert sorted(Path(x["source"]).relative_to(d).as_posix() for x in data) == ["a.PNG", "b.jpg", "sub/c.jpeg"]
    assert all(len(x["top"]) == 2 for x in data)
    by = {Path(x["source"]).name: x for x in data}
    assert by["b.jpg"]["probabilities"] == predict_json(built, str(files["good.jpg"]))[1][0]["probabilities"]


@pytest.mark.parametrize("k, expected", [(1, 1), (12, 7)])
def test_top_k_length(built, files, k, expected):
    r, data = predict_json(built, str(files["good.jpg"]), top_k=k)
    assert r.returncode == 0, r.stderr
    top = data[0]["top"]
    assert len(top) == expected
    assert [t["probability"] for t in top] == sorted((t["probability"] for t in top), reverse=True)


def test_table_output_and_errors(built, files):
    r = run_cli("predict", str(files["good.jpg"]), str(files["text.jpg"]), "--bundle", str(built.int8))
    assert r.returncode == 3
    assert "good.jpg" in r.stdout and "text.jpg" in r.stdout and "error" in r.stdout
    assert "%" in r.stdout and "cpu/int8" in r.stdout
    assert "1 of 2 image(s) failed" in r.stderr and "Traceback" not in r.stderr


def test_no_images_and_bad_bundle_are_usage_errors(built, tmp_path, files):
    (tmp_path / "empty").mkdir()
    r = run_cli("predict", str(tmp_path / "empty"), "--bundle", str(built.int8))
    assert r.returncode == 2 and "no images given" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("predict", str(files["good.jpg"]), "--bundle", str(tmp_path / "nope.edgeskin"))
    assert r.returncode == 2 and "bundle not found" in r.stderr and "Traceback" not in r.stderr
