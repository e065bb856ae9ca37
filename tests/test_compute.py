"""The one device decision: --device and the torchrun environment -> device, precision, group."""

from __future__ import annotations

import pytest
import torch

from edgeskin.errors import ConfigError
from edgeskin.models.compute import resolve_compute, resolve_precision


def test_auto_is_the_cpu_without_cuda_and_cuda_is_refused_with_a_hint(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    c = resolve_compute("auto", bf16="off")
    assert c.kind == "cpu" and c.precision == "fp32" and c.world == 1
    with pytest.raises(ConfigError) as info:
        resolve_compute("cuda")
    assert "CUDA is not available" in info.value.message and "--device cpu" in info.value.hint
    with pytest.raises(ConfigError):
        resolve_compute("cuda:1")


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "cuda:", "tpu"])
def test_unknown_devices_name_the_choices(bad):
    with pytest.raises(ConfigError, match="unknown device") as info:
        resolve_compute(bad)
    assert "cuda:N" in info.value.hint


def test_cpu_precision_is_resolved_never_auto(monkeypatch):
    import edgeskin.models.compute as comp

    monkeypatch.setattr(comp, "cpu_has_bf16", lambda: True)
    assert resolve_precision("cpu", "auto") == "bf16"
    monkeypatch.setattr(comp, "cpu_has_bf16", lambda: False)
    assert resolve_precision("cpu", "auto") == "fp32"
    assert resolve_precision("cpu", "on") == "bf16" and resolve_precision("cpu", "off") == "fp32"
    rec = resolve_compute("cpu", bf16="auto").record()
    assert rec["precision"] in ("bf16", "fp32") and rec["device"] == "cpu"


def test_cuda_precision_is_bf16_where_supported_else_fp16_with_a_scaler(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("cuda", "auto") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("cuda", "auto") == "fp16"
    with pytest.raises(ConfigError, match="no bf16"):
        resolve_precision("cuda", "on")
    assert resolve_precision("cuda", "off") == "fp32"


def test_torchrun_environment_without_init_resolves_rank_and_gloo(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    c = resolve_compute("cpu", bf16="off", init_distributed=False)
    assert (c.rank, c.world, c.local_rank, c.backend) == (1, 2, 1, "gloo")


@pytest.mark.gpu
def test_cuda_under_torchrun_takes_local_rank_and_nccl(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    c = resolve_compute("cuda", init_distributed=False)
    assert c.device == torch.device("cuda", 0) and c.backend == "nccl"
    with pytest.raises(ConfigError, match="LOCAL_RANK"):
        resolve_compute("cuda:0", init_distributed=False)
