"""Initial weights for transfer learning: ImageNet weights through torchvision's weights API.

``pretrained`` is one of:

- ``imagenet``: torchvision's default ImageNet weights for the architecture
  (``torchvision.models.get_model_weights(arch).DEFAULT``), from torch hub's cache
  (``$TORCH_HOME/hub/checkpoints``, the folder torchvision itself uses), downloaded into it when
  missing. The download is hash-checked as torchvision does it: the file name carries the first
  hex digits of its sha256 (``resnet50-11ad3fa6.pth``) and ``torch.hub.download_url_to_file``
  refuses a file whose digest does not start with them, leaving nothing behind. Offline, it fails
  with the file to place and where. ``$EDGESKIN_WEIGHTS_MIRROR`` (a base URL) fetches the same
  file name from a mirror instead.
- an ``http(s)://`` URL: the same download, cache and hash rule for any weights file.
- ``auto``: offline-safe, never downloads: the cache when the file is there, else random
  initialisation (said so by the caller).
- a file path: that file.
- ``none`` / ``None``: random initialisation.

The sha256 of the file used is returned so that it goes into checkpoints and bundle provenance:
a result never depends silently on what happened to be downloadable.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from ..errors import CheckpointError, ConfigError
from ..fileio import sha256_file

log = logging.getLogger(__name__)

#: torch hub's rule: the digits after the last "-" of the file name start the file's sha256
_HASH_PREFIX = re.compile(r"-([a-f0-9]*)\.")


@dataclass(frozen=True)
class WeightsFile:
    path: Path
    source: str  # how it was found, e.g. "imagenet:resnet50-11ad3fa6.pth"
    sha256: str


def hub_checkpoints() -> Path:
    """torch hub's checkpoint folder, where torchvision caches its weights."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def imagenet_url(arch: str) -> str:
    """The URL of torchvision's default ImageNet weights for ``arch`` (or its mirror copy)."""
    import torchvision

    try:
        url = torchvision.models.get_model_weights(arch).DEFAULT.url
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"torchvision has no ImageNet weights for {arch!r} ({exc})",
                          "pass --pretrained FILE or --pretrained none") from None
    mirror = os.environ.get("EDGESKIN_WEIGHTS_MIRROR")
    if mirror:
        url = mirror.rstrip("/") + "/" + os.path.basename(urlparse(url).path)
    return url


def cached_imagenet(arch: str) -> Path | None:
    """A torchvision ImageNet weights file for ``arch`` already in the cache (newest first)."""
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(arch)
    except Exception:  # noqa: BLE001
        return None
    names = [os.path.basename(urlparse(w.url).path) for w in enum]
    for name in [os.path.basename(urlparse(enum.DEFAULT.url).path)] + names[::-1]:
        p = hub_checkpoints() / name
        if p.is_file():
            return p
    return None


def fetch_weights(url: str, *, model_dir: Path | None = None, progress: bool = False) -> Path:
    """The weights file at ``url``, from the cache or downloaded into it, hash-checked by torch
    hub's file-name rule. Errors name the file to place by hand and where."""
    folder = model_dir or hub_checkpoints()
    name = os.path.basename(urlparse(url).path)
    if not name:
        raise ConfigError(f"{url}: the URL names no file", "pass the URL of a .pth/.pt weights file")
    dest = folder / name
    if dest.is_file():
        return dest
    m = _HASH_PREFIX.search(name)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(dest), hash_prefix=m.group(1) if m else None, progress=progress)
    except RuntimeError as exc:  # torch hub's hash mismatch (the partial file is already removed)
        raise CheckpointError(f"{url}: the downloaded file does not match its published hash ({exc})",
                              "try again; if it persists the mirror serves another file") from None
    except (OSError, ValueError) as exc:  # URLError is an OSError
        raise CheckpointError(
            f"cannot download {url} ({getattr(exc, 'reason', exc)})",
            f"offline? download {name} on a machine with internet and place it at {dest} "
            f"(or set $TORCH_HOME; or pass --pretrained FILE, or --pretrained none for random initialisation)",
        ) from None
    return dest


def resolve_pretrained(arch: str, pretrained: str | os.PathLike | None, *, progress: bool = False,
                       ) -> WeightsFile | None:
    """The weights file ``pretrained`` asks for (see the module docstring); None: random init."""
    if pretrained in (None, "none", "random"):
        return None
    text = str(pretrained)
    if text == "auto":
        path = cached_imagenet(arch)
        if path is None:
            log.info("no ImageNet weights for %s in %s: starting from random initialisation", arch, hub_checkpoints())
            return None
        return WeightsFile(path, f"imagenet:{path.name}", sha256_file(path))
    if text == "imagenet":
        path = fetch_weights(imagenet_url(arch), progress=progress)
        return WeightsFile(path, f"imagenet:{path.name}", sha256_file(path))
    if text.startswith(("http://", "https://")):
        path = fetch_weights(text, progress=progress)
        return WeightsFile(path, f"url:{text}", sha256_file(path))
    path = Path(text)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: pretrained weights not found",
            "pass an ImageNet state_dict file for this architecture, imagenet (download), auto or none",
        )
    return WeightsFile(path, f"imagenet:{path.name}", sha256_file(path))
