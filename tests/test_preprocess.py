"""The shared image pipeline: decoding, colour modes, EXIF, bad files, resize/crop, normalise, augment."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeskin.augment import AugmentConfig, augment
from edgeskin.errors import ConfigError, ImageError
from edgeskin.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PreprocessConfig,
    center_crop,
    finish,
    load_resized,
    open_image,
    preprocess,
    preprocess_batch,
    resize_shorter,
    to_rgb,
)

SMALL = PreprocessConfig(size=32, resize=40)


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _quadrants(h: int = 32, w: int = 64) -> np.ndarray:
    """Four large solid-colour quadrants: orientation survives JPEG noise."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[: h // 2, : w // 2] = (255, 0, 0)
    arr[: h // 2, w // 2 :] = (0, 255, 0)
    arr[h // 2 :, : w // 2] = (0, 0, 255)
    arr[h // 2 :, w // 2 :] = (255, 255, 0)
    return arr


def _quadrant_centres(arr: np.ndarray) -> np.ndarray:
    """Mean colour of the interior of each quadrant (away from JPEG ringing at the edges)."""
    h, w = arr.shape[:2]
    qh, qw = h // 2, w // 2
    out = []
    for top in (0, qh):
        for left in (0, qw):
            block = arr[top + qh // 4 : top + 3 * qh // 4, left + qw // 4 : left + 3 * qw // 4]
            out.append(block.reshape(-1, 3).mean(axis=0))
    return np.array(out)


def _exif_jpeg(arr: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(Image.fromarray(arr), "JPEG", quality=95, exif=exif.tobytes())


# --------------------------------------------------------------------------- same tensor, any source


@pytest.mark.parametrize("orientation", [1, 6])
def test_path_bytes_and_pil_give_bit_identical_tensors(tmp_path: Path, orientation: int) -> None:
    path = tmp_path / "img.jpg"
    path.write_bytes(_exif_jpeg(_noise(36, 48), orientation))
    cfg = PreprocessConfig(size=32, resize=40)
    from_path = preprocess(path, cfg)
    from_str = preprocess(str(path), cfg)
    from_bytes = preprocess(path.read_bytes(), cfg)
    from_bytearray = preprocess(bytearray(path.read_bytes()), cfg)
    with Image.open(path) as im:
        from_pil = preprocess(im, cfg)
    assert from_path.shape == (3, 32, 32) and from_path.dtype == np.float32
    for other in (from_str, from_bytes, from_bytearray, from_pil):
        assert other.dtype == from_path.dtype
        assert np.array_equal(other, from_path)


def test_pil_source_is_not_modified(tmp_path: Path) -> None:
    im = Image.fromarray(_noise(20, 30)).convert("L")
    before = np.asarray(im).copy()
    out = open_image(im)
    assert out.mode == "RGB" and im.mode == "L"
    assert np.array_equal(np.asarray(im), before)


# --------------------------------------------------------------------------- colour modes


def test_grayscale_is_replicated_to_three_channels() -> None:
    gray = _noise(10, 12)[..., 0]
    out = np.asarray(open_image(_encode(Image.fromarray(gray, "L"), "PNG")))
    assert out.shape == (10, 12, 3) and out.dtype == np.uint8
    for c in range(3):
        assert np.array_equal(out[..., c], gray)


@pytest.mark.parametrize("alpha_value", [0, 1, 128, 255])
def test_rgba_drops_alpha_whatever_its_value(alpha_value: int) -> None:
    rgb = _noise(16, 16, seed=3)
    alpha = np.full((16, 16, 1), alpha_value, np.uint8)
    rgba = np.concatenate([rgb, alpha], axis=2)
    png = _encode(Image.fromarray(rgba, "RGBA"), "PNG")
    assert np.array_equal(np.asarray(open_image(png)), rgb)
    assert np.array_equal(preprocess(png, SMALL), preprocess(_encode(Image.fromarray(rgb), "PNG"), SMALL))


def test_rgba_with_varying_alpha_equals_rgb_part() -> None:
    rgb = _noise(16, 16, seed=4)
    alpha = _noise(16, 16, seed=5)[..., :1]
    png = _encode(Image.fromarray(np.concatenate([rgb, alpha], axis=2), "RGBA"), "PNG")
    assert np.array_equal(np.asarray(open_image(png)), rgb)


def _palette_image(transparency: bool) -> tuple[bytes, np.ndarray]:
    colours = [(10, 20, 30), (200, 100, 50), (0, 255, 7), (250, 250, 250)]
    idx = np.array([[0, 1, 2, 3], [3, 2, 1, 0]], np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette([v for c in colours for v in c] + [0] * (768 - 3 * len(colours)))
    kw = {"transparency": 1} if transparency else {}
    png = _encode(im, "PNG", **kw)
    expected = np.array([[colours[i] for i in row] for row in idx], np.uint8)
    return png, expected


@pytest.mark.parametrize("transparency", [False, True])
def test_palette_image_gives_palette_colours(transparency: bool) -> None:
    png, expected = _palette_image(transparency)
    with Image.open(io.BytesIO(png)) as im:
        assert im.mode == "P"
        assert ("transparency" in im.info) == transparency
    out = np.asarray(open_image(png))
    # The transparent index keeps its own colour (alpha is dropped, not composited).
    assert np.array_equal(out, expected)


def test_palette_with_alpha_mode_pa() -> None:
    im = Image.new("PA", (2, 1))
    im.putpalette([9, 99, 199, 50, 60, 70] + [0] * 762)
    im.putpixel((0, 0), (0, 0))
    im.putpixel((1, 0), (1, 255))
    out = np.asarray(open_image(im))
    assert out.tolist() == [[[9, 99, 199], [50, 60, 70]]]


def test_cmyk_converts_back_to_close_rgb() -> None:
    rgb = np.array([[[200, 30, 90], [10, 250, 128]], [[0, 0, 0], [255, 255, 255]]], np.uint8)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    assert cmyk.mode == "CMYK"
    assert np.abs(np.asarray(open_image(cmyk)).astype(int) - rgb).max() <= 2
    # The same through a CMYK JPEG on disk (solid blocks, so JPEG noise stays small).
    big = np.repeat(np.repeat(rgb, 16, axis=0), 16, axis=1)
    jpg = _encode(Image.fromarray(big).convert("CMYK"), "JPEG", quality=95)
    with Image.open(io.BytesIO(jpg)) as im:
        assert im.mode == "CMYK"
    decoded = np.asarray(open_image(jpg)).astype(int)
    assert np.abs(_quadrant_centres(decoded) - _quadrant_centres(big)).max() <= 6


def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32768, 65535], [1000, 20000, 40000, 60000]], np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # really a 16-bit image, not 8-bit
        assert np.asarray(im).max() == 65535
    out = np.asarray(open_image(path))
    assert out.shape == (2, 4, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [0, 0, 0]
    assert out[0, 1].tolist() == [1, 1, 1]
    assert out[0, 2].tolist() == [128, 128, 128]
    assert out[0, 3].tolist() == [255, 255, 255]
    assert np.array_equal(out[..., 0], np.rint(values / 257.0).astype(np.uint8))


def test_32bit_integer_image_with_16bit_range_is_scaled() -> None:
    im = Image.fromarray(np.array([[0, 32768, 65535]], np.int32))
    assert im.mode == "I"
    assert np.asarray(open_image(im))[..., 0].tolist() == [[0, 128, 255]]


def _png16_rgb(arr: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def test_16bit_rgb_png_is_scaled(tmp_path: Path) -> None:
    values = np.array([[[65535, 32768, 0], [2570, 51400, 16448]]], np.uint16)
    path = tmp_path / "rgb16.png"
    try:
        Image.fromarray(values).save(path)  # newer Pillow may write 16-bit RGB itself
    except (TypeError, ValueError, OSError, KeyError):
        path.write_bytes(_png16_rgb(values))
    out = np.asarray(open_image(path)).astype(int)
    expected = np.rint(values / 257.0)
    assert out.shape == (1, 2, 3)
    # Pillow keeps the high byte of each 16-bit sample: at most 1 off a true rescale.
    assert np.abs(out - expected).max() <= 1
    assert out[0, 0].tolist()[0] == 255 and out[0, 0].tolist()[2] == 0


@pytest.mark.parametrize("mode", ["1", "LA", "YCbCr", "F"])
def test_other_modes_become_rgb(mode: str) -> None:
    base = Image.fromarray(_quadrants(8, 8)).convert("L")
    im = base.convert(mode)
    out = open_image(im)
    assert out.mode == "RGB" and out.size == (8, 8)


def test_float_image_in_unit_range_is_scaled() -> None:
    im = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")
    assert np.asarray(to_rgb(im))[..., 1].tolist() == [[0, 128, 255]]


# --------------------------------------------------------------------------- EXIF orientation


def test_exif_orientation_6_is_applied(tmp_path: Path) -> None:
    arr = _quadrants(32, 64)  # h=32, w=64
    path = tmp_path / "rot.jpg"
    path.write_bytes(_exif_jpeg(arr, 6))
    with Image.open(path) as raw:
        assert raw.size == (64, 32)  # stored unrotated
        assert raw.getexif().get(0x0112) == 6
    out = np.asarray(open_image(path)).astype(int)
    assert out.shape == (64, 32, 3)  # sizes swapped
    expected = np.rot90(arr, k=-1)  # orientation 6: rotate 90 degrees clockwise to display
    assert np.abs(_quadrant_centres(out) - _quadrant_centres(expected)).max() < 12
    # ... and not the other way round, nor unrotated content squeezed into the new shape.
    wrong = np.rot90(arr, k=1)
    assert np.abs(_quadrant_centres(out) - _quadrant_centres(wrong)).max() > 200


def test_exif_orientation_1_is_left_alone() -> None:
    arr = _quadrants(32, 64)
    out = np.asarray(open_image(_exif_jpeg(arr, 1))).astype(int)
    assert out.shape == (32, 64, 3)
    assert np.abs(_quadrant_centres(out) - _quadrant_centres(arr)).max() < 12


# --------------------------------------------------------------------------- bad input


def _jpeg_file(tmp_path: Path, name: str = "real.jpg") -> Path:
    path = tmp_path / name
    Image.fromarray(_noise(48, 64)).save(path, quality=90)
    return path


def _assert_image_error(exc_info: pytest.ExceptionInfo, path: Path) -> None:
    assert isinstance(exc_info.value, ImageError)
    assert str(path) in str(exc_info.value)
    assert exc_info.value.path == str(path)


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageError) as ei:
        open_image(path)
    _assert_image_error(ei, path)


def test_truncated_jpeg(tmp_path: Path) -> None:
    data = _jpeg_file(tmp_path).read_bytes()
    path = tmp_path / "half.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as ei:
        preprocess(path, SMALL)
    _assert_image_error(ei, path)


@pytest.mark.parametrize("keep", [20, 100, 300])
def test_jpeg_truncated_inside_its_header(tmp_path: Path, keep: int) -> None:
    data = _jpeg_file(tmp_path).read_bytes()
    path = tmp_path / "header_only.jpg"
    path.write_bytes(data[:keep])
    with pytest.raises(ImageError) as ei:
        open_image(path)
    _assert_image_error(ei, path)
    with pytest.raises(ImageError):
        open_image(data[:keep])


def test_truncated_png(tmp_path: Path) -> None:
    path = tmp_path / "cut.png"
    Image.fromarray(_noise(48, 64)).save(path)
    path.write_bytes(path.read_bytes()[:-2000])
    with pytest.raises(ImageError) as ei:
        open_image(path)
    _assert_image_error(ei, path)


def test_text_file_named_jpg(tmp_path: Path) -> None:
    path = tmp_path / "x.jpg"
    path.write_text("lesion_id,image_id,dx\nthis is not an image\n")
    with pytest.raises(ImageError) as ei:
        open_image(path)
    _assert_image_error(ei, path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "missing.jpg"
    with pytest.raises(ImageError) as ei:
        preprocess(path, SMALL)
    _assert_image_error(ei, path)


def test_directory_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(ImageError) as ei:
        open_image(tmp_path)
    _assert_image_error(ei, tmp_path)


def test_empty_bytes() -> None:
    with pytest.raises(ImageError):
        open_image(b"")


def test_decompression_bomb_with_small_max_pixels(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    Image.fromarray(_noise(20, 20)).save(path)
    with pytest.raises(ImageError) as ei:
        open_image(path, max_pixels=100)
    _assert_image_error(ei, path)
    assert "large" in str(ei.value)
    with pytest.raises(ImageError):
        preprocess(path, SMALL, max_pixels=399)
    # exactly at the limit is fine
    assert open_image(path, max_pixels=400).size == (20, 20)


@pytest.mark.parametrize("limit", [100, 300])  # 400 pixels: > 2x limit is an error, > limit a warning
def test_pillow_bomb_check_becomes_image_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               limit: int) -> None:
    path = tmp_path / "bomb.png"
    Image.fromarray(_noise(20, 20)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(ImageError) as ei:
        open_image(path)
    _assert_image_error(ei, path)


# --------------------------------------------------------------------------- resize and crop


def test_resize_rule_341x256() -> None:
    cfg = PreprocessConfig(size=112, resize=128)
    img = Image.fromarray(_noise(256, 341))
    assert resize_shorter(img, 128).size == (170, 128)  # int(128 * 341 / 256) = int(170.5)
    resized = load_resized(_encode(img, "PNG"), cfg)
    assert resized.shape == (128, 170, 3) and resized.dtype == np.uint8
    assert preprocess(_encode(img, "PNG"), cfg).shape == (3, 112, 112)


def test_resize_rule_portrait_and_square() -> None:
    assert resize_shorter(Image.new("RGB", (50, 75)), 40).size == (40, 60)
    assert resize_shorter(Image.new("RGB", (50, 77)), 40).size == (40, 61)  # int(61.6)
    assert resize_shorter(Image.new("RGB", (64, 64)), 40).size == (40, 40)
    assert resize_shorter(Image.new("RGB", (77, 50)), 40).size == (61, 40)  # floor, not round


def test_centre_crop_rounding() -> None:
    arr = np.arange(9 * 12).reshape(9, 12, 1)
    out = center_crop(arr, 4)
    # top = round(5 / 2) = 2 (round half to even), left = round(8 / 2) = 4
    assert np.array_equal(out, arr[2:6, 4:8])
    arr2 = np.arange(11 * 7).reshape(11, 7, 1)
    # top = round(6 / 2) = 3, left = round(2 / 2) = 1
    assert np.array_equal(center_crop(arr2, 5), arr2[3:8, 1:6])
    arr3 = np.arange(14 * 8).reshape(14, 8, 1)
    # top = round(7 / 2) = 4 (3.5 rounds to even), left = round(1 / 2) = 0
    assert np.array_equal(center_crop(arr3, 7), arr3[4:11, 0:7])


def test_centre_crop_too_small() -> None:
    with pytest.raises(ConfigError):
        center_crop(np.zeros((10, 20, 3), np.uint8), 12)


def test_full_pipeline_matches_manual_resize_and_crop() -> None:
    cfg = PreprocessConfig(size=112, resize=128)
    img = Image.fromarray(_noise(256, 341, seed=7))
    manual = np.asarray(img.resize((170, 128), Image.BILINEAR))
    top, left = round((128 - 112) / 2), round((170 - 112) / 2)  # 8, 29
    crop = manual[top : top + 112, left : left + 112].astype(np.float32) / 255.0
    expected = ((crop - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)).transpose(2, 0, 1)
    out = preprocess(img, cfg)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


def test_default_resize_sizes() -> None:
    assert PreprocessConfig(size=224).resize_size == 256
    assert PreprocessConfig(size=112).resize_size == 128
    assert PreprocessConfig(size=180).resize_size == 206
    cfg = PreprocessConfig(size=180)
    out = preprocess(Image.fromarray(_noise(40, 50)), cfg)
    assert out.shape == (3, 180, 180) and out.dtype == np.float32


def test_config_validation() -> None:
    with pytest.raises(ConfigError):
        PreprocessConfig(size=64, resize=32)
    with pytest.raises(ConfigError):
        PreprocessConfig(size=64, layout="CHW")
    with pytest.raises(ConfigError):
        PreprocessConfig(size=64, interpolation="lanczos9")
    cfg = PreprocessConfig(size=112, layout="NHWC", interpolation="bicubic")
    again = PreprocessConfig.from_dict(cfg.to_dict())
    assert again.size == 112 and again.resize_size == 128 and again.layout == "NHWC"
    assert again.interpolation == "bicubic"


# --------------------------------------------------------------------------- normalise and layout


@pytest.mark.parametrize("v", [0, 37, 128, 255])
def test_uniform_image_normalisation(v: int) -> None:
    img = Image.new("RGB", (48, 40), (v, v, v))
    out = preprocess(img, SMALL)
    assert out.shape == (3, 32, 32)
    for c in range(3):
        expected = (v / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        np.testing.assert_allclose(out[c], expected, rtol=0, atol=1e-5)


def test_custom_mean_std_per_channel() -> None:
    cfg = PreprocessConfig(size=32, resize=32, mean=(0.5, 0.0, 1.0), std=(0.5, 2.0, 0.25))
    out = preprocess(Image.new("RGB", (32, 32), (255, 51, 0)), cfg)
    np.testing.assert_allclose(out[0], 1.0, atol=1e-6)
    np.testing.assert_allclose(out[1], 0.1, atol=1e-6)
    np.testing.assert_allclose(out[2], -4.0, atol=1e-6)


def test_nhwc_is_transpose_of_nchw() -> None:
    img = Image.fromarray(_noise(40, 52, seed=9))
    nchw = preprocess(img, PreprocessConfig(size=32, resize=40))
    nhwc = preprocess(img, PreprocessConfig(size=32, resize=40, layout="NHWC"))
    assert nchw.shape == (3, 32, 32) and nhwc.shape == (32, 32, 3)
    assert np.array_equal(nhwc, nchw.transpose(1, 2, 0))
    assert nhwc.flags["C_CONTIGUOUS"] and nchw.flags["C_CONTIGUOUS"]


def test_preprocess_batch_stacks(tmp_path: Path) -> None:
    a = tmp_path / "a.png"
    Image.fromarray(_noise(36, 48, seed=1)).save(a)
    b = _encode(Image.fromarray(_noise(50, 40, seed=2)), "JPEG")
    c = Image.fromarray(_noise(32, 32, seed=3))
    batch = preprocess_batch([a, b, c], SMALL)
    assert batch.shape == (3, 3, 32, 32) and batch.dtype == np.float32
    for i, src in enumerate([a, b, c]):
        assert np.array_equal(batch[i], preprocess(src, SMALL))
    assert not np.array_equal(batch[0], batch[1])
    nhwc = preprocess_batch([a, b], PreprocessConfig(size=32, resize=40, layout="NHWC"))
    assert nhwc.shape == (2, 32, 32, 3)


# --------------------------------------------------------------------------- augmentation


def test_augment_shape_dtype_and_range() -> None:
    resized = load_resized(Image.fromarray(_noise(48, 64)), SMALL)
    out = augment(resized, SMALL, AugmentConfig(), np.random.default_rng(0))
    assert out.shape == (3, 32, 32) and out.dtype == np.float32
    lo = (0 - max(IMAGENET_MEAN)) / min(IMAGENET_STD)
    hi = (1 - min(IMAGENET_MEAN)) / min(IMAGENET_STD)
    assert out.min() >= lo - 1e-5 and out.max() <= hi + 1e-5
    nhwc = PreprocessConfig(size=32, resize=40, layout="NHWC")
    assert augment(resized, nhwc, AugmentConfig(), np.random.default_rng(0)).shape == (32, 32, 3)


def test_augment_deterministic_per_seed() -> None:
    resized = load_resized(Image.fromarray(_noise(48, 64)), SMALL)
    cfg = AugmentConfig(rotation_degrees=10.0)
    a = augment(resized, SMALL, cfg, np.random.default_rng(123))
    b = augment(resized, SMALL, cfg, np.random.default_rng(123))
    assert np.array_equal(a, b)
    others = [augment(resized, SMALL, cfg, np.random.default_rng(s)) for s in (1, 2, 3)]
    assert all(not np.array_equal(a, o) for o in others)


def test_augment_does_not_modify_input() -> None:
    resized = load_resized(Image.fromarray(_noise(48, 64)), SMALL)
    before = resized.copy()
    augment(resized, SMALL, AugmentConfig(), np.random.default_rng(0))
    assert np.array_equal(resized, before)


NO_AUG = AugmentConfig(scale=(1, 1), ratio=(1, 1), hflip=False, vflip=False, rot90=False,
                       brightness=0, contrast=0, saturation=0)


def test_augment_with_everything_off_equals_eval_tensor() -> None:
    # A square pre-resized image as large as the crop: the crop box is the whole image, the
    # resize to (size, size) is the identity and jitter is off, so the tensors are identical.
    resized = _noise(32, 32, seed=11)
    expected = finish(resized, SMALL)
    for seed in (0, 1, 2):
        out = augment(resized, SMALL, NO_AUG, np.random.default_rng(seed))
        assert out.shape == expected.shape and out.dtype == expected.dtype
        assert np.array_equal(out, expected)


def test_augment_flip_only_is_a_flip_of_eval_tensor() -> None:
    resized = _noise(32, 32, seed=12)
    expected = finish(resized, SMALL)
    cfg = AugmentConfig(scale=(1, 1), ratio=(1, 1), hflip=True, vflip=False, rot90=False,
                        brightness=0, contrast=0, saturation=0)
    seen = set()
    for seed in range(12):
        out = augment(resized, SMALL, cfg, np.random.default_rng(seed))
        if np.array_equal(out, expected):
            seen.add("same")
        elif np.array_equal(out, expected[:, :, ::-1]):
            seen.add("flipped")
        else:
            pytest.fail("hflip produced something other than the image or its mirror")
    assert seen == {"same", "flipped"}
