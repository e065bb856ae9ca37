"""The one image pipeline, in numpy + Pillow, shared by training, calibration, bench and runtime.

Decode -> EXIF orientation -> RGB -> resize the shorter side -> centre crop -> channel order
(RGB, or BGR for models trained that way) -> scale to 0-1 (or keep 0-255) -> normalise -> CHW
(or HWC) float32. Every stage calls :func:`preprocess` (or its two halves,
:func:`load_resized` and :func:`finish`), so every stage sees identical tensors for the same
image, whether it comes from a path, bytes, or an already opened Pillow image.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ConfigError, ImageError

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: Keras' "caffe" mode (keras.applications.imagenet_utils.preprocess_input): BGR, 0-255, these
#: per-channel means (B, G, R) subtracted, no scaling.
CAFFE_MEAN: tuple[float, float, float] = (103.939, 116.779, 123.68)

#: Named normalisations: mode -> (input_range, mean, std) they stand for. "meanstd" takes the
#: config's own numbers; the others fix them (Keras' "caffe" and "tf" modes, and none at all).
NORMALIZATIONS: dict[str, tuple[float, tuple[float, float, float], tuple[float, float, float]] | None] = {
    "meanstd": None,
    "caffe": (255.0, CAFFE_MEAN, (1.0, 1.0, 1.0)),
    "tf": (255.0, (127.5, 127.5, 127.5), (127.5, 127.5, 127.5)),
    "none": (1.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
CHANNEL_ORDERS = ("RGB", "BGR")
INPUT_RANGES = (1.0, 255.0)

#: Pillow's own default limit (about 89.5 megapixels); larger images are refused as
#: possible decompression bombs rather than merely warned about.
DEFAULT_MAX_PIXELS = 89_478_485

_INTERPOLATION = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image becomes a tensor. Recorded in checkpoints and bundle manifests.

    ``size`` is the square crop fed to the network; the shorter side is first resized to
    ``resize`` (default ``round(size / crop_fraction)``, i.e. 256 for 224 and 128 for 112).

    Models trained elsewhere declare the rest: ``channel_order`` (``RGB``, or ``BGR``),
    ``input_range`` (pixel values before normalisation: ``1.0`` for 0-1, ``255.0`` for 0-255)
    and ``normalization`` (``meanstd``: subtract ``mean`` and divide by ``std``, given per
    channel of the tensor as fed and in its range; ``caffe``, ``tf`` and ``none`` name fixed
    numbers, see :data:`NORMALIZATIONS`). The defaults are edgeskin's own pipeline.
    """

    size: int = 224
    resize: int | None = None
    crop_fraction: float = 0.875
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    layout: str = field(default="NCHW")
    channel_order: str = "RGB"
    input_range: float = 1.0
    normalization: str = "meanstd"

    def __post_init__(self) -> None:
        if self.resize is None:  # resolve the default once, so equal configs compare equal
            object.__setattr__(self, "resize", int(round(self.size / self.crop_fraction)))
        if self.size < 8:
            raise ConfigError(f"input size {self.size} is too small", "use a size of 32 or more")
        if self.interpolation not in _INTERPOLATION:
            raise ConfigError(
                f"unknown interpolation {self.interpolation!r}",
                f"choose one of: {', '.join(_INTERPOLATION)}",
            )
        if self.resize is not None and self.resize < self.size:
            raise ConfigError(
                f"resize {self.resize} is smaller than the crop size {self.size}",
                "resize must be at least the crop size",
            )
        if self.layout not in ("NCHW", "NHWC"):
            raise ConfigError(f"unknown layout {self.layout!r}", "choose NCHW or NHWC")
        if self.channel_order not in CHANNEL_ORDERS:
            raise ConfigError(f"unknown channel order {self.channel_order!r}", "choose RGB or BGR")
        if float(self.input_range) not in INPUT_RANGES:
            raise ConfigError(f"input range {self.input_range} is not supported",
                              "choose 1 (pixels scaled to 0-1) or 255 (pixels kept in 0-255)")
        object.__setattr__(self, "input_range", float(self.input_range))
        if self.normalization not in NORMALIZATIONS:
            raise ConfigError(f"unknown normalization {self.normalization!r}",
                              f"choose one of: {', '.join(NORMALIZATIONS)}")
        fixed = NORMALIZATIONS[self.normalization]
        if fixed is not None:
            rng, mean, std = fixed
            if (self.input_range, tuple(map(float, self.mean)), tuple(map(float, self.std))) != (rng, mean, std):
                raise ConfigError(
                    f"normalization {self.normalization!r} means input range {rng:g}, mean {list(mean)}, "
                    f"std {list(std)}; got {self.input_range:g}, {list(self.mean)}, {list(self.std)}",
                    f"build it with PreprocessConfig.with_normalization({self.normalization!r}, ...) "
                    "or use normalization 'meanstd' with your own numbers")

    @classmethod
    def with_normalization(cls, mode: str, **kw: object) -> "PreprocessConfig":
        """A config in one of the named modes (``caffe``, ``tf``, ``none``) with its numbers filled
        in; ``meanstd`` takes ``mean``/``std``/``input_range`` from ``kw``."""
        fixed = NORMALIZATIONS.get(mode)
        if fixed is not None:
            rng, mean, std = fixed
            kw = {**kw, "input_range": rng, "mean": mean, "std": std}
        return cls(normalization=mode, **kw)  # type: ignore[arg-type]

    @property
    def is_default_pixels(self) -> bool:
        """True when channel order, range and normalisation mode are edgeskin's own (RGB, 0-1, mean/std)."""
        return (self.channel_order, self.input_range, self.normalization) == ("RGB", 1.0, "meanstd")

    @property
    def resize_size(self) -> int:
        """The shorter side before the crop (``resize``, resolved in ``__post_init__``)."""
        return int(self.resize)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["resize"] = self.resize_size
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        if self.is_default_pixels:
            # edgeskin's own pipeline: written exactly as before these keys existed, so existing
            # checkpoints, manifests and cache keys stay the same
            for k in ("channel_order", "input_range", "normalization"):
                d.pop(k)
            pixels = "/255, normalise with mean/std"
        else:
            scale = "/255" if self.input_range == 1.0 else "keep 0-255"
            pixels = f"{self.channel_order}, {scale}, normalise ({self.normalization}) with mean/std"
        d["rule"] = (
            f"resize shorter side to {self.resize_size} ({self.interpolation}, antialiased), "
            f"centre crop {self.size}x{self.size}, {pixels}"
        )
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        return cls(
            size=int(d["size"]),
            resize=int(d["resize"]) if d.get("resize") is not None else None,
            crop_fraction=float(d.get("crop_fraction", 0.875)),
            mean=tuple(float(x) for x in d.get("mean", IMAGENET_MEAN)),  # type: ignore[arg-type]
            std=tuple(float(x) for x in d.get("std", IMAGENET_STD)),  # type: ignore[arg-type]
            interpolation=str(d.get("interpolation", "bilinear")),
            layout=str(d.get("layout", "NCHW")),
            channel_order=str(d.get("channel_order", "RGB")),
            input_range=float(d.get("input_range", 1.0)),
            normalization=str(d.get("normalization", "meanstd")),
        )


def _describe(source: ImageSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, Image.Image):
        return getattr(source, "filename", "") or "<image>"
    return "<bytes>"


def open_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image fully, apply its EXIF orientation and return it as 8-bit RGB.

    Raises :class:`ImageError` naming the file for empty, missing, non-image, truncated or
    oversized (decompression-bomb) input.
    """
    name = _describe(source)
    if isinstance(source, Image.Image):
        img = source
    else:
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if not path.is_file():
                raise ImageError(name, "file not found", "check the path and the data folder")
            if path.stat().st_size == 0:
                raise ImageError(name, "file is empty (0 bytes)", "re-copy or remove the file")
            fp: object = path
        else:
            data = bytes(source)
            if not data:
                raise ImageError(name, "no image data (0 bytes)", "pass the image's bytes")
            fp = io.BytesIO(data)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(fp)  # type: ignore[arg-type]
        except UnidentifiedImageError:
            raise ImageError(
                name, "not a readable image", "the file is not a JPEG/PNG/TIFF/... image"
            ) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(
                name,
                "image is too large (possible decompression bomb)",
                f"images above {max_pixels:,} pixels are refused; downscale it first",
            ) from None
        except (OSError, SyntaxError, ValueError) as exc:
            # e.g. a JPEG truncated inside its header: Pillow fails while opening, not loading.
            raise ImageError(
                name, f"image cannot be decoded ({exc})", "the file is truncated or corrupt; re-copy it"
            ) from None
    w, h = img.size
    if w * h > max_pixels:
        raise ImageError(
            name,
            f"image is too large ({w}x{h} pixels, possible decompression bomb)",
            f"images above {max_pixels:,} pixels are refused; downscale it first",
        )
    if w == 0 or h == 0:
        raise ImageError(name, "image has no pixels", "re-export the image")
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(
            name, f"image cannot be decoded ({exc})", "the file is truncated or corrupt; re-copy it"
        ) from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - broken EXIF must not stop a prediction
        pass
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    16-bit and 32-bit integer images are scaled (not clipped) to 8 bits; alpha is dropped
    (dermoscopy images carry no meaningful transparency); palettes, CMYK, YCbCr and LAB go
    through Pillow's own conversions.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img).astype(np.float64)
        if mode == "I" and arr.max(initial=0) <= 255:
            scaled = arr
        else:
            scaled = arr / 257.0
        arr8 = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        arr8 = np.clip(np.rint(np.nan_to_num(arr)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode in ("P", "PA"):
        img = img.convert("RGBA")
    return img.convert("RGB")


def resize_shorter(img: Image.Image, size: int, interpolation: str = "bilinear") -> Image.Image:
    """Resize so the shorter side is ``size``; long side ``int(size * long / short)``."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), _INTERPOLATION[interpolation])


def center_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """Centre crop an HWC array to ``size`` x ``size`` (torchvision's rounding rule)."""
    h, w = arr.shape[:2]
    if h < size or w < size:
        raise ConfigError(
            f"image of {w}x{h} is smaller than the crop {size}",
            "resize must be at least the crop size",
        )
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return arr[top : top + size, left : left + size]


def load_resized(
    source: ImageSource, config: PreprocessConfig, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode and resize the shorter side: an HWC uint8 array (the cacheable half)."""
    img = open_image(source, max_pixels=max_pixels)
    img = resize_shorter(img, config.resize_size, config.interpolation)
    return np.asarray(img, dtype=np.uint8)


def normalize(arr: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """HWC uint8 RGB -> normalised float32 in the config's channel order and layout (CHW for NCHW)."""
    x = arr.astype(np.float32)
    if config.channel_order == "BGR":
        x = x[..., ::-1]
    if config.input_range == 1.0:
        x = x / np.float32(255.0)
    x = (x - np.asarray(config.mean, dtype=np.float32)) / np.asarray(config.std, dtype=np.float32)
    if config.layout == "NCHW":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x, dtype=np.float32)


def finish(resized: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Centre crop and normalise an array from :func:`load_resized`."""
    return normalize(center_crop(resized, config.size), config)


def preprocess(
    source: ImageSource, config: PreprocessConfig, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """One image -> one normalised float32 tensor (CHW or HWC per ``config.layout``)."""
    return finish(load_resized(source, config, max_pixels=max_pixels), config)


def preprocess_batch(sources: list[ImageSource], config: PreprocessConfig) -> np.ndarray:
    """Several images -> one batch (NCHW or NHWC)."""
    return np.stack([preprocess(s, config) for s in sources])
