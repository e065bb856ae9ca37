"""Shared fixtures: where the real data and reference model are, and tiny synthetic data sets."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    """Marked tests skip by themselves, with a reason, where their hardware is missing:
    ``gpu`` without CUDA, ``hardware`` unless $EDGESKIN_TEST_HARDWARE=1 says this is the device."""
    gpu = None
    hardware = os.environ.get("EDGESKIN_TEST_HARDWARE") == "1"
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            gpu = _cuda_available() if gpu is None else gpu
            if not gpu:
                item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU with a CUDA build of torch "
                                                        "(torch.cuda.is_available() is False here)"))
        if item.get_closest_marker("hardware") is not None and not hardware:
            item.add_marker(pytest.mark.skip(reason="needs the device itself (a Jetson with TensorRT); "
                                                    "run there with EDGESKIN_TEST_HARDWARE=1"))


def _first_existing(env: str, default: Path) -> Path | None:
    value = os.environ.get(env)
    path = Path(value) if value else default
    return path if path.exists() else None


@pytest.fixture(scope="session")
def ham_data() -> Path:
    """The real HAM10000 subset: $EDGESKIN_TEST_DATA or ../shared/data/ham10000."""
    path = _first_existing("EDGESKIN_TEST_DATA", SHARED / "data" / "ham10000")
    if path is None:
        pytest.skip("real HAM10000 data not found: set EDGESKIN_TEST_DATA or provide ../shared/data/ham10000")
    return path


@pytest.fixture(scope="session")
def reference_model() -> Path:
    """The shared reference ensemble: $EDGESKIN_REFERENCE_MODEL or ../shared/models/ham10000-r50x3-112."""
    path = _first_existing("EDGESKIN_REFERENCE_MODEL", SHARED / "models" / "ham10000-r50x3-112")
    if path is None:
        pytest.skip("reference ensemble not found: set EDGESKIN_REFERENCE_MODEL or provide "
                    "../shared/models/ham10000-r50x3-112")
    return path


CODES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")


def make_ham_tree(root: Path, *, lesions_per_class: int = 4, images_per_lesion: int = 2,
                  size: tuple[int, int] = (48, 36), parts: int = 2, seed: int = 0) -> Path:
    """A tiny HAM10000-style release: HAM10000_metadata.csv + images in `parts` folders.

    Each class gets a distinct colour plus noise, so a tiny model can learn something.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    dirs = [root / f"HAM10000_images_part_{i + 1}" for i in range(parts)]
    for d in dirs:
        d.mkdir(exist_ok=True)
    rows = []
    n = 0
    for ci, dx in enumerate(CODES):
        base = np.array([(ci * 37) % 256, (ci * 91) % 256, (ci * 53) % 256], dtype=np.float64)
        for li in range(lesions_per_class):
            lesion = f"HAM_{ci:02d}{li:05d}"
            for _ in range(images_per_lesion):
                image_id = f"ISIC_{n:07d}"
                arr = np.clip(base + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(dirs[n % parts] / f"{image_id}.jpg", quality=90)
                rows.append({"lesion_id": lesion, "image_id": image_id, "dx": dx, "dx_type": "histo",
                             "age": "50.0", "sex": "male", "localization": "back"})
                n += 1
    with open(root / "HAM10000_metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root


@pytest.fixture()
def tiny_ham(tmp_path: Path) -> Path:
    return make_ham_tree(tmp_path / "ham")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny data set, random resnet18 checkpoint and cpu fp32/int8 bundles of tests/_bundles.py
    (built once per test process; read-only: copy a bundle before tampering with it)."""
    from _bundles import shared

    return shared(tmp_path_factory)
