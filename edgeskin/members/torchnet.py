"""timm and torchvision members: a state_dict (``.pt``, ``.pth``, ``.safetensors``) plus an
architecture name, built through the library's own factory and run in torch.

timm's ``pretrained_cfg`` (through ``timm.data.resolve_data_config``) supplies the declared
preprocessing, as timm itself would preprocess for that model. Head names that differ from the
factory's (``fc`` vs ``head.fc`` vs ``classifier``, or a ``Sequential(Dropout, Linear)`` head)
are mapped when the shapes leave no doubt; anything else that does not fit is listed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, ConfigError, require
from .base import ForeignMember

FACTORIES = ("timm", "torchvision")


def split_arch(arch: str) -> tuple[str, str]:
    """``timm:resnet50`` / ``torchvision:resnet50`` -> (factory, name); a bare name means timm."""
    if ":" in arch:
        factory, name = arch.split(":", 1)
    else:
        factory, name = "timm", arch
    if factory not in FACTORIES:
        raise ConfigError(f"unknown model factory {factory!r} in --arch {arch}",
                          "write timm:NAME or torchvision:NAME, e.g. --arch timm:resnet50")
    return factory, name


def build(arch: str, num_classes: int) -> Any:
    factory, name = split_arch(arch)
    if factory == "timm":
        timm = require("timm", extra="timm", purpose="importing a timm checkpoint")
        try:
            return timm.create_model(name, pretrained=False, num_classes=num_classes)
        except RuntimeError as exc:  # timm: "Unknown model (...)"
            close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:8]
            raise ConfigError(f"timm has no architecture {name!r} ({exc})",
                              f"close names: {', '.join(close) or 'none'}") from None
    import torchvision

    try:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    except (ValueError, KeyError):
        raise ConfigError(f"torchvision has no architecture {name!r}",
                          f"e.g. {', '.join(torchvision.models.list_models()[:6])}, ...") from None


def read_state(path: Path) -> dict[str, Any]:
    """A state_dict from ``.safetensors`` or a torch file (unwrapping ``state_dict``/``model``
    and a DDP ``module.`` prefix)."""
    import torch

    try:
        if path.suffix == ".safetensors":
            st = require("safetensors.torch", extra="timm", purpose="reading a .safetensors checkpoint")
            state = st.load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - each reader fails its own way on a corrupt file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: cannot read the checkpoint ({first})",
                              "pass an intact .pt/.pth/.safetensors state_dict") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise CheckpointError(f"{path}: not a state_dict (a mapping of tensor names to tensors)",
                              "save the weights with torch.save(model.state_dict()) or safetensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def head_size(state: dict[str, Any], model: Any) -> int | None:
    """How many classes the checkpoint's classifier has (from the factory's classifier name, else
    the last 2-D weight)."""
    names = _classifier_names(model)
    for n in names:
        if f"{n}.weight" in state:
            return int(state[f"{n}.weight"].shape[0])
    two_d = [k for k, v in state.items() if k.endswith(".weight") and len(v.shape) == 2]
    return int(state[two_d[-1]].shape[0]) if two_d else None


def _classifier_names(model: Any) -> list[str]:
    names = []
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    c = cfg.get("classifier") if isinstance(cfg, dict) else None
    if isinstance(c, str):
        names.append(c)
    names += ["fc", "head.fc", "head", "classifier", "classifier.1", "classifier.3", "last_linear"]
    return names


def fit_state(model: Any, state: dict[str, Any], where: Path) -> dict[str, str]:
    """Load ``state`` into ``model`` strictly, renaming the classifier when only its name differs.
    Returns the renames made; raises listing missing and unexpected keys otherwise."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    renames: dict[str, str] = {}
    if missing and unexpected:
        for suffix in ("weight", "bias"):
            m = [k for k in missing if k.endswith("." + suffix)]
            u = [k for k in unexpected if k.endswith("." + suffix)]
            if len(m) == 1 and len(u) == 1 and tuple(own[m[0]].shape) == tuple(state[u[0]].shape):
                renames[u[0]] = m[0]
        if len(renames) == len(missing) == len(unexpected):
            state = {renames.get(k, k): v for k, v in state.items()}
            missing, unexpected = [], []
        else:
            renames = {}
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: the weights do not fit the architecture: missing keys {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}; unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}",
            "check --arch (the exact timm/torchvision name the model was trained as) and that the file holds "
            "that model's state_dict")
    try:
        model.load_state_dict({k: v for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{where}: the weights do not fit the architecture ({str(exc).splitlines()[0]})",
                              "check --arch and the number of classes (--labels)") from None
    return renames


def timm_preprocess(model: Any) -> dict[str, Any]:
    """What timm itself resolves for the model (``resolve_data_config``): size, crop, interpolation,
    mean/std, as declaration keys."""
    timm_data = require("timm.data", extra="timm", purpose="reading a timm model's pretrained_cfg")
    cfg = timm_data.resolve_data_config({}, model=model)
    size = int(cfg["input_size"][-1])
    interp = str(cfg.get("interpolation", "bilinear"))
    return {"size": size, "crop_fraction": float(cfg.get("crop_pct", 0.875)),
            "interpolation": interp if interp in ("bilinear", "bicubic", "nearest") else "bilinear",
            "mean": tuple(float(v) for v in cfg["mean"]), "std": tuple(float(v) for v in cfg["std"]),
            "layout": "NCHW", "channel_order": "RGB", "input_range": 1.0, "normalization": "meanstd"}


class TorchNetMember(ForeignMember):
    """A timm or torchvision network in torch (it has a ``model``, so it runs on the GPU too)."""

    def __init__(self, config: dict[str, Any], path: Path, *, model: Any = None) -> None:
        super().__init__(config, path)
        if model is None:
            model = build(str(config["arch"]), len(self.class_map.member_classes))
            state = read_state(self.weights_path)
            state = {config.get("head_renames", {}).get(k, k): v for k, v in state.items()}
            fit_state(model, state, self.weights_path)
        self.model = model.float().eval()

    def raw(self, x: np.ndarray, *, device: Any = None) -> np.ndarray:
        import torch

        dev = getattr(device, "device", device)
        if dev is not None:
            self.model.to(dev)
        d = next(self.model.parameters()).device
        with torch.inference_mode():
            return self.model(torch.from_numpy(x).to(d)).float().cpu().numpy()

    def release(self) -> None:
        self.model.cpu()


def load_torchnet_member(config: dict[str, Any], path: Path) -> TorchNetMember:
    return TorchNetMember(config, path)
