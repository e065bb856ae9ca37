"""The one input pipeline of training: ready batches on the training device.

Two implementations with one contract (same images, same random draws, same augmentation
semantics), chosen by the device:

- **CPU** (:class:`CpuBatches`): each view is made by :func:`edgeskin.augment.augment` in numpy
  and Pillow, exactly as before. On a CPU the model is the bottleneck, not the input.
- **CUDA** (:class:`DeviceBatches`): the decoded images (shorter side resized, uint8) are kept
  once in a padded uint8 tensor, on the GPU when it fits in the memory bound and in pinned host
  memory otherwise, and whole batches are cropped, resized, flipped, turned, jittered and
  normalised on the GPU. This takes JPEG decoding and per-image Pillow work out of every epoch;
  its speed against DataLoader workers is what ``benchmarks/gpu_train.py`` measures on a GPU (not
  yet run: no GPU was available when this was written).

Both draw every random parameter with :func:`edgeskin.augment.draw_params` from
``numpy.random.default_rng([seed, epoch, image index])``, so a view's crop box, flips, turns and
jitter factors are the same on both paths; only the resampling kernel differs (Pillow's
antialiased bilinear box resize against ``torchvision.ops.roi_align`` with adaptive sampling,
which averages each output pixel's footprint the same way). ``tests/test_batches.py`` holds the
two to the same statistics.

Under ``torchrun`` the padded uint8 array is written once per machine, by local rank 0, to a
memory-mapped file that every rank maps read-only, so the page cache holds one copy for all
ranks instead of one per rank.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from ..augment import AugmentConfig, draw_params
from ..data import eval_tensors
from ..fileio import atomic_path
from ..models.compute import Compute
from ..preprocess import PreprocessConfig

#: the decoded cache stays on the GPU only while it takes at most this fraction of the GPU's memory
GPU_CACHE_FRACTION = 0.25


class CpuBatches:
    """Training batches made on the CPU (numpy + Pillow), as float32 tensors."""

    def __init__(self, arrays: Sequence[np.ndarray], pre: PreprocessConfig, augment: AugmentConfig | None,
                 seed: int, compute: Compute, channels_last: bool = False) -> None:
        self.arrays, self.pre, self.augment, self.seed = arrays, pre, augment, seed
        self.compute, self.channels_last = compute, channels_last
        self.where = "cpu (numpy + Pillow)"

    def batch(self, idx: np.ndarray, epoch: int) -> torch.Tensor:
        from ..augment import augment as augment_one

        if self.augment is None:
            x = eval_tensors([self.arrays[int(i)] for i in idx], self.pre)
        else:
            x = np.stack([augment_one(self.arrays[int(i)], self.pre, self.augment,
                                      np.random.default_rng([self.seed, epoch, int(i)])) for i in idx])
        t = torch.from_numpy(x)
        if self.compute.is_cuda:
            t = t.pin_memory().to(self.compute.device, non_blocking=True)
        if self.channels_last and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        return t


def padded_uint8(arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(N, Hmax, Wmax, 3) uint8 with each image at the top left, and (N, 2) heights and widths."""
    sizes = np.array([a.shape[:2] for a in arrays], dtype=np.int64).reshape(-1, 2)
    hmax, wmax = (int(sizes[:, 0].max()), int(sizes[:, 1].max())) if len(arrays) else (1, 1)
    out = np.zeros((len(arrays), hmax, wmax, 3), np.uint8)
    for i, a in enumerate(arrays):
        out[i, : a.shape[0], : a.shape[1]] = a
    return out, sizes


def _shared_padded(arrays: Sequence[np.ndarray], compute: Compute, cache_dir: Path | None) -> np.ndarray:
    """The padded array, written once per machine (local rank 0) and memory-mapped by every rank."""
    import torch.distributed as dist

    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a[:: max(1, a.shape[0] // 8), :: max(1, a.shape[1] // 8)]).tobytes())
    sizes = np.array([a.shape[:2] for a in arrays], dtype=np.int64).reshape(-1, 2)
    shape = (len(arrays), int(sizes[:, 0].max()), int(sizes[:, 1].max()), 3)
    folder = cache_dir or Path(os.environ.get("EDGESKIN_SHM", "/dev/shm" if Path("/dev/shm").is_dir()
                                              else tempfile.gettempdir()))
    path = folder / f"edgeskin-decoded-{h.hexdigest()[:20]}-{'x'.join(map(str, shape))}.u8"
    if compute.local_rank == 0 and not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            mm = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=shape)
            for i, a in enumerate(arrays):
                mm[i, : a.shape[0], : a.shape[1]] = a
            mm.flush()
            del mm
    if dist.is_initialized():
        dist.barrier()
    return np.memmap(path, dtype=np.uint8, mode="r", shape=shape)


class DeviceBatches:
    """Training batches augmented on the GPU from a uint8 cache (see the module docstring)."""

    def __init__(self, arrays: Sequence[np.ndarray], pre: PreprocessConfig, augment: AugmentConfig | None,
                 seed: int, compute: Compute, channels_last: bool = False, *,
                 gpu_fraction: float = GPU_CACHE_FRACTION, cache_dir: Path | None = None) -> None:
        self.pre, self.augment, self.seed, self.compute = pre, augment, seed, compute
        self.channels_last = channels_last
        self.sizes = np.array([a.shape[:2] for a in arrays], dtype=np.int64).reshape(-1, 2)
        if compute.world > 1:
            host = _shared_padded(arrays, compute, cache_dir)
        else:
            host, _ = padded_uint8(arrays)
        nbytes = host.nbytes
        budget = (torch.cuda.get_device_properties(compute.device).total_memory * gpu_fraction
                  if compute.is_cuda else float("inf"))
        if nbytes <= budget:
            self.images = torch.from_numpy(np.ascontiguousarray(host)).to(compute.device)
            self.where = f"{compute.device} ({nbytes / 2**20:.0f} MiB uint8 cache)"
        else:  # too large for the bound: keep it on the host, pinned, and copy each batch
            t = torch.from_numpy(np.ascontiguousarray(host))
            self.images = t.pin_memory() if compute.is_cuda else t
            self.where = f"host memory ({nbytes / 2**20:.0f} MiB uint8 cache), augmented on {compute.device}"
        self.mean = torch.tensor(pre.mean, device=compute.device).view(1, 3, 1, 1)
        self.std = torch.tensor(pre.std, device=compute.device).view(1, 3, 1, 1)

    def batch(self, idx: np.ndarray, epoch: int) -> torch.Tensor:
        dev = self.compute.device
        ii = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        if self.images.device == dev:
            u8 = self.images[ii.to(dev)]
        else:
            u8 = self.images[ii].pin_memory().to(dev, non_blocking=True) if self.compute.is_cuda \
                else self.images[ii]
        x = views_from_uint8(u8, self.sizes[np.asarray(idx)], np.asarray(idx), self.pre, self.augment,
                             seed=self.seed, epoch=epoch)
        x = (x / 255.0 - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def _center_box(h: int, w: int, size: int) -> tuple[int, int, int, int]:
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return top, left, size, size


def views_from_uint8(u8: torch.Tensor, sizes: np.ndarray, idx: np.ndarray, pre: PreprocessConfig,
                     cfg: AugmentConfig | None, *, seed: int, epoch: int) -> torch.Tensor:
    """(B, H, W, 3) uint8 (padded) -> (B, 3, S, S) float views in 0..255, on ``u8``'s device.

    With ``cfg`` None: the evaluation view (centre crop). Otherwise the random view of
    :func:`edgeskin.augment.augment` with the same draws for (seed, epoch, image index).
    """
    from torchvision.ops import roi_align

    s = pre.size
    dev = u8.device
    b = u8.shape[0]
    x = u8.permute(0, 3, 1, 2).float()
    if cfg is None:
        boxes = [_center_box(int(h), int(w), s) for h, w in sizes]
        params = None
    else:
        params = [draw_params(int(h), int(w), cfg, np.random.default_rng([seed, epoch, int(i)]))
                  for (h, w), i in zip(sizes, idx)]
        boxes = [(p.top, p.left, p.height, p.width) for p in params]
    rois = torch.tensor([[k, left, top, left + cw, top + ch] for k, (top, left, ch, cw) in enumerate(boxes)],
                        dtype=torch.float32, device=dev)
    # aligned=True: box edges are pixel edges, as in Pillow's box resize; sampling_ratio=-1
    # averages ceil(box / size) samples per output pixel in each direction (antialiasing)
    x = roi_align(x, rois, output_size=(s, s), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    x = x.round().clamp_(0, 255)  # Pillow returns uint8
    if params is None:
        return x

    def col(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=dev).view(b, 1, 1, 1)

    angles = [p.angle for p in params]
    if any(angles):
        x = _rotate(x, angles)
    hflip = col([float(p.hflip) for p in params]).bool()
    vflip = col([float(p.vflip) for p in params]).bool()
    x = torch.where(hflip, x.flip(-1), x)
    x = torch.where(vflip, x.flip(-2), x)
    turns = [p.quarter_turns for p in params]
    for k in (1, 2, 3):
        if k in turns:
            mask = col([float(t == k) for t in turns]).bool()
            x = torch.where(mask, torch.rot90(x, k, dims=(-2, -1)), x)
    gray_w = torch.tensor([0.299, 0.587, 0.114], device=dev).view(1, 3, 1, 1)
    x = x * col([p.brightness for p in params])
    cf = col([p.contrast for p in params])
    if bool((cf != 1).any()):
        mean = (x.clamp(0, 255) * gray_w).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
        x = torch.where(cf != 1, (x - mean) * cf + mean, x)
    sf = col([p.saturation for p in params])
    if bool((sf != 1).any()):
        gray = (x.clamp(0, 255) * gray_w).sum(1, keepdim=True)
        x = torch.where(sf != 1, (x - gray) * sf + gray, x)
    return x.round().clamp_(0, 255)


def _rotate(x: torch.Tensor, angles: list[float]) -> torch.Tensor:
    """Rotate each view counter-clockwise by its angle in degrees about its centre, bilinear,
    zeros outside (Pillow's ``Image.rotate`` with the default fill)."""
    import torch.nn.functional as F

    a = torch.tensor([math.radians(v) for v in angles], dtype=torch.float32, device=x.device)
    cos, sin = torch.cos(a), torch.sin(a)
    # output (x, y) samples input R(-angle) (x, y); y points down, so a counter-clockwise turn
    # on screen is a clockwise one in these coordinates
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(a)], 1),
                         torch.stack([sin, cos, torch.zeros_like(a)], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def make_batches(arrays: Sequence[np.ndarray], pre: PreprocessConfig, augment: AugmentConfig | None, seed: int,
                 compute: Compute, *, channels_last: bool = False, cache_dir: Path | None = None,
                 ) -> CpuBatches | DeviceBatches:
    """The training input pipeline for ``compute``'s device."""
    if compute.is_cuda and pre.layout == "NCHW":
        return DeviceBatches(arrays, pre, augment, seed, compute, channels_last, cache_dir=cache_dir)
    return CpuBatches(arrays, pre, augment, seed, compute, channels_last)


def epoch_indices(n: int, seed: int, epoch: int, rank: int, world: int) -> np.ndarray:
    """This rank's share of the epoch's permutation (every rank the same number of images)."""
    per_rank = n // world
    perm = np.random.default_rng([seed, epoch, 7919]).permutation(n)[: per_rank * world]
    return perm[rank::world]


def iterate(batches: CpuBatches | DeviceBatches, mine: np.ndarray, batch_size: int, steps: int,
            epoch: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    for step in range(steps):
        idx = mine[step * batch_size : (step + 1) * batch_size]
        if len(idx) == 0:
            return
        yield idx, batches.batch(idx, epoch)


__all__ = ["CpuBatches", "DeviceBatches", "make_batches", "views_from_uint8", "padded_uint8", "epoch_indices",
           "iterate"]
