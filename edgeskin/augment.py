"""Training-time augmentation, on top of the shared pipeline (numpy + Pillow, training only).

Works on the cached output of :func:`edgeskin.preprocess.load_resized` (shorter side
resized) and ends with the same :func:`edgeskin.preprocess.normalize` as evaluation, so the
only difference between a training and an evaluation tensor is the augmentation itself.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from .preprocess import PreprocessConfig, _INTERPOLATION, normalize


@dataclass(frozen=True)
class AugmentConfig:
    """Random resized crop, flips, rotations and colour jitter (the published recipe)."""

    scale: tuple[float, float] = (0.6, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    vflip: bool = True
    rot90: bool = True
    rotation_degrees: float = 0.0
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["scale"] = list(self.scale)
        d["ratio"] = list(self.ratio)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AugmentConfig":
        kw = dict(d)
        kw["scale"] = tuple(kw.get("scale", (0.6, 1.0)))
        kw["ratio"] = tuple(kw.get("ratio", (3 / 4, 4 / 3)))
        return cls(**kw)


def random_resized_crop_box(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop, torchvision's RandomResizedCrop rule."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback: the largest centred crop within the ratio bounds.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class AugmentParams:
    """One image's random draws: a crop box, a rotation, flips, quarter turns and jitter factors.

    Drawn by :func:`draw_params` in one fixed order from one generator, so the CPU path
    (:func:`augment`) and the GPU path (:mod:`edgeskin.train.gpu_augment`) apply the same draws
    for the same seed, epoch and image.
    """

    top: int
    left: int
    height: int
    width: int
    angle: float
    hflip: bool
    vflip: bool
    quarter_turns: int
    brightness: float
    contrast: float
    saturation: float


def draw_params(height: int, width: int, cfg: AugmentConfig, rng: np.random.Generator) -> AugmentParams:
    """Every random draw of one training view (``height`` x ``width``: the cached image)."""
    top, left, ch, cw = random_resized_crop_box(height, width, cfg.scale, cfg.ratio, rng)
    angle = float(rng.uniform(-cfg.rotation_degrees, cfg.rotation_degrees)) if cfg.rotation_degrees > 0 else 0.0
    hflip = bool(cfg.hflip and rng.random() < 0.5)
    vflip = bool(cfg.vflip and rng.random() < 0.5)
    k = int(rng.integers(0, 4)) if cfg.rot90 else 0
    b = float(rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)) if cfg.brightness > 0 else 1.0
    c = float(rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)) if cfg.contrast > 0 else 1.0
    s = float(rng.uniform(1 - cfg.saturation, 1 + cfg.saturation)) if cfg.saturation > 0 else 1.0
    return AugmentParams(top, left, ch, cw, angle, hflip, vflip, k, b, c, s)


def _jitter(arr: np.ndarray, p: AugmentParams) -> np.ndarray:
    x = arr.astype(np.float32)
    if p.brightness != 1.0:
        x = x * p.brightness
    gray_w = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if p.contrast != 1.0:
        mean = float((np.clip(x, 0, 255) @ gray_w).mean())
        x = (x - mean) * p.contrast + mean
    if p.saturation != 1.0:
        gray = (np.clip(x, 0, 255) @ gray_w)[..., None]
        x = (x - gray) * p.saturation + gray
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def augment(
    resized: np.ndarray, pre: PreprocessConfig, cfg: AugmentConfig, rng: np.random.Generator
) -> np.ndarray:
    """A random training view of one image: HWC uint8 in, normalised float32 out."""
    h, w = resized.shape[:2]
    p = draw_params(h, w, cfg, rng)
    img = Image.fromarray(resized)
    img = img.resize(
        (pre.size, pre.size), _INTERPOLATION[pre.interpolation],
        box=(p.left, p.top, p.left + p.width, p.top + p.height),
    )
    if p.angle:
        img = img.rotate(p.angle, resample=Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    if p.hflip:
        arr = arr[:, ::-1]
    if p.vflip:
        arr = arr[::-1]
    if p.quarter_turns:
        arr = np.rot90(arr, p.quarter_turns)
    arr = _jitter(np.ascontiguousarray(arr), p)
    return normalize(arr, pre)
