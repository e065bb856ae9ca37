"""The training input pipeline: the GPU path (uint8 cache, whole batches augmented with torch ops)
against the CPU path (numpy + Pillow), on the same images with the same random draws.

The GPU path is device-agnostic torch code, so it runs here on CPU tensors; on a GPU the same
ops run on CUDA tensors (the ``gpu`` test at the end)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from edgeskin.augment import AugmentConfig, augment, draw_params
from edgeskin.models.compute import CPU
from edgeskin.preprocess import PreprocessConfig, finish
from edgeskin.train.batches import CpuBatches, DeviceBatches, padded_uint8, views_from_uint8

PRE = PreprocessConfig(size=48, resize=64)


def _images(n: int = 48, seed: int = 0) -> list[np.ndarray]:
    """Smooth images with structure (a blurred random field), of two shapes, like resized photos."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = ((85, 64) if i % 3 else (64, 80))
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        out.append(np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR)))
    return out


def _normalise(x: torch.Tensor) -> np.ndarray:
    m = torch.tensor(PRE.mean).view(1, 3, 1, 1)
    s = torch.tensor(PRE.std).view(1, 3, 1, 1)
    return ((x / 255.0 - m) / s).numpy()


def _both(arrays, cfg, seed=5, epoch=2):
    idx = np.arange(len(arrays))
    cpu = np.stack([augment(a, PRE, cfg, np.random.default_rng([seed, epoch, int(i)])) if cfg else finish(a, PRE)
                    for i, a in zip(idx, arrays)])
    u8, sizes = padded_uint8(arrays)
    dev = _normalise(views_from_uint8(torch.from_numpy(u8), sizes, idx, PRE, cfg, seed=seed, epoch=epoch))
    return cpu, dev


def test_evaluation_view_is_identical_on_both_paths():
    cpu, dev = _both(_images(), None)
    np.testing.assert_array_equal(cpu, dev)


def test_augmented_views_match_image_by_image_with_the_same_draws():
    """Same crop box, flips, quarter turns and jitter for the same (seed, epoch, image): the two
    paths differ only by their resampling kernels."""
    cpu, dev = _both(_images(), AugmentConfig())
    diff = np.abs(cpu - dev)
    for a, b in zip(cpu, dev):  # every single view is the same picture
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99
    assert diff.mean() < 0.05  # in normalised units (one uint8 step is about 0.017)


def test_augmented_views_have_the_same_statistics_over_many_draws():
    arrays = _images(16, seed=1)
    cpu_all, dev_all = [], []
    for epoch in range(6):
        cpu, dev = _both(arrays, AugmentConfig(), seed=0, epoch=epoch)
        cpu_all.append(cpu)
        dev_all.append(dev)
    cpu, dev = np.concatenate(cpu_all), np.concatenate(dev_all)
    np.testing.assert_allclose(cpu.mean(axis=(0, 2, 3)), dev.mean(axis=(0, 2, 3)), atol=0.01)
    np.testing.assert_allclose(cpu.std(axis=(0, 2, 3)), dev.std(axis=(0, 2, 3)), rtol=0.02)
    # spatial structure too: the mean image (where flips and turns put things) agrees
    assert np.corrcoef(cpu.mean(0).ravel(), dev.mean(0).ravel())[0, 1] > 0.99


def test_rotation_turns_the_same_way_as_pillow():
    cfg = AugmentConfig(rotation_degrees=25, hflip=False, vflip=False, rot90=False)
    cpu, dev = _both(_images(24, seed=2), cfg)
    assert np.mean([np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(cpu, dev)]) > 0.97


def test_draws_are_a_pure_function_of_seed_epoch_and_image():
    a = draw_params(64, 85, AugmentConfig(), np.random.default_rng([1, 2, 3]))
    b = draw_params(64, 85, AugmentConfig(), np.random.default_rng([1, 2, 3]))
    c = draw_params(64, 85, AugmentConfig(), np.random.default_rng([1, 3, 3]))
    assert a == b and a != c


def test_device_batches_on_the_cpu_equal_views_from_uint8_and_normalise_like_cpu_batches():
    arrays = _images(12)
    idx = np.array([3, 0, 7, 11])
    dev = DeviceBatches(arrays, PRE, None, 0, CPU).batch(idx, 0)
    cpu = CpuBatches(arrays, PRE, None, 0, CPU).batch(idx, 0)
    np.testing.assert_allclose(dev.numpy(), cpu.numpy(), atol=1e-6)
    aug_dev = DeviceBatches(arrays, PRE, AugmentConfig(), 4, CPU, channels_last=True).batch(idx, 1)
    aug_cpu = CpuBatches(arrays, PRE, AugmentConfig(), 4, CPU).batch(idx, 1)
    assert aug_dev.is_contiguous(memory_format=torch.channels_last)
    assert np.abs(aug_dev.numpy() - aug_cpu.numpy()).mean() < 0.05


@pytest.mark.gpu
def test_views_on_cuda_equal_views_on_the_cpu():
    arrays = _images(16)
    u8, sizes = padded_uint8(arrays)
    idx = np.arange(16)
    on_cpu = views_from_uint8(torch.from_numpy(u8), sizes, idx, PRE, AugmentConfig(), seed=1, epoch=1)
    on_gpu = views_from_uint8(torch.from_numpy(u8).cuda(), sizes, idx, PRE, AugmentConfig(), seed=1, epoch=1)
    assert (on_gpu.cpu() - on_cpu).abs().max() <= 1.0  # at most one uint8 step of rounding
