"""The one device decision: ``--device`` and the ``torchrun`` environment become a device, a
precision and a process group. Everything that runs torch receives a :class:`Compute`; nothing
else calls ``.cuda()`` or asks ``torch.cuda.is_available()``.

Precision:
- training on CUDA: bf16 autocast where the GPU supports it, otherwise fp16 autocast with a
  gradient scaler; ``bf16 = "off"`` trains in fp32 (TF32 convolutions, PyTorch's default);
- training on the CPU: bf16 autocast when the CPU has bf16 instructions (``auto``), as before;
- inference that a result is measured with (evaluate, bench's model rows, the distillation
  teacher): fp32 on every device. On CUDA that means cuDNN's TF32 convolutions, which PyTorch
  enables by default (``torch.backends.cudnn.allow_tf32``); matrix products stay fp32.

The precision actually used is *resolved* here and recorded (checkpoints, stage keys), never the
unresolved ``auto``: two machines that resolve ``auto`` differently train under different keys.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, EdgeskinError

log = logging.getLogger(__name__)

DEVICE_CHOICES = "auto | cpu | cuda | cuda:N"


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX-512 BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(frozen=True)
class Compute:
    """Where and how torch runs. ``precision`` is the training autocast precision
    (``bf16`` | ``fp16`` | ``fp32``); inference for measurements is always fp32."""

    device: torch.device
    precision: str = "fp32"
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    deterministic: bool = False

    @property
    def kind(self) -> str:
        return self.device.type

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self) -> Any:
        """The training autocast context (a no-op in fp32)."""
        dtype = self.autocast_dtype
        return torch.autocast(self.kind, dtype=dtype or torch.float32, enabled=dtype is not None)

    def grad_scaler(self) -> Any:
        """A gradient scaler for fp16 (the only precision that needs one); disabled otherwise."""
        return torch.amp.GradScaler(self.kind, enabled=self.precision == "fp16")

    @property
    def inference_precision(self) -> str:
        return "fp32-tf32conv" if self.is_cuda and torch.backends.cudnn.allow_tf32 else "fp32"

    def describe(self, training: bool = True) -> str:
        name = str(self.device)
        if self.is_cuda:
            name += f" ({torch.cuda.get_device_name(self.device)})"
        text = f"{name}, " + (f"{self.precision} training" if training else f"{self.inference_precision} inference")
        if self.world > 1:
            text += f", rank {self.rank} of {self.world} ({self.backend})"
        if self.deterministic:
            text += ", deterministic"
        return text

    def record(self) -> dict[str, Any]:
        """What goes into checkpoints and stage keys."""
        rec: dict[str, Any] = {"device": self.kind, "precision": self.precision, "world_size": self.world,
                               "inference_precision": self.inference_precision,
                               "deterministic": self.deterministic}
        if self.is_cuda:
            rec["gpu"] = torch.cuda.get_device_name(self.device)
            rec["cuda"] = torch.version.cuda
        return rec


CPU = Compute(torch.device("cpu"))


def _parse(device: str) -> tuple[str, int | None]:
    text = (device or "auto").strip().lower()
    if text in ("auto", "cpu", "cuda"):
        return text, None
    if text.startswith("cuda:") and text[5:].isdigit():
        return "cuda", int(text[5:])
    raise ConfigError(f"unknown device {device!r}", f"choose {DEVICE_CHOICES}")


def resolve_precision(kind: str, bf16: str = "auto") -> str:
    """The training precision for a device kind and the ``bf16`` setting (auto | on | off)."""
    if bf16 not in ("auto", "on", "off"):
        raise ConfigError(f"bf16 must be auto, on or off, not {bf16!r}")
    if bf16 == "off":
        return "fp32"
    if kind == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16"
        if bf16 == "on":
            raise ConfigError("this GPU has no bf16 support", "use --bf16 auto (fp16 with a gradient scaler) or off")
        return "fp16"
    if bf16 == "on" or cpu_has_bf16():
        return "bf16"
    return "fp32"


def resolve_compute(device: str = "auto", *, bf16: str = "auto", deterministic: bool = False,
                    init_distributed: bool = True) -> Compute:
    """Resolve ``device`` (auto | cpu | cuda | cuda:N) and the ``torchrun`` environment.

    ``auto`` means CUDA when it is available. Under ``torchrun`` (WORLD_SIZE > 1) rank r uses
    ``cuda:LOCAL_RANK`` with NCCL, or the CPU with gloo; the process group is joined here
    (``init_distributed=False`` resolves without joining, e.g. for a dry run).
    """
    kind, index = _parse(device)
    available = torch.cuda.is_available()
    if kind == "auto":
        kind = "cuda" if available else "cpu"
    if kind == "cuda" and not available:
        raise ConfigError(f"--device {device}: CUDA is not available here (torch {torch.__version__}, "
                          f"CUDA build {torch.version.cuda or 'none'})",
                          "use --device cpu, or install a CUDA build of torch on a machine with an NVIDIA GPU")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if kind == "cuda":
        count = torch.cuda.device_count()
        if world > 1:
            if index is not None:
                raise ConfigError(f"--device {device} under torchrun: each process takes cuda:LOCAL_RANK",
                                  "pass --device cuda (or auto) when launching with torchrun")
            index = local_rank
        index = 0 if index is None else index
        if index >= count:
            raise ConfigError(f"--device cuda:{index}: this machine has {count} GPU(s)",
                              f"choose cuda:0 .. cuda:{count - 1}" + (" (one process per GPU under torchrun)"
                                                                     if world > 1 else ""))
        dev = torch.device("cuda", index)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    backend = None
    if world > 1:
        backend = "nccl" if kind == "cuda" else "gloo"
        if init_distributed and not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend=backend)
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        # a caller (a test, a notebook) joined a group itself
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        backend = torch.distributed.get_backend()
    precision = resolve_precision(kind, bf16)
    configure(kind, deterministic)
    return Compute(dev, precision, rank, world, local_rank, backend, deterministic)


def configure(kind: str, deterministic: bool) -> None:
    """cuDNN autotuning and non-deterministic fast kernels by default on CUDA; ``deterministic``
    trades that speed for repeatability (torch's deterministic algorithms, no autotuning)."""
    if kind == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS' documented requirement
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)


def out_of_memory(exc: BaseException, compute: Compute, batch_size: int) -> EdgeskinError:
    """A CUDA out-of-memory error as a clear error with what to do."""
    return EdgeskinError(
        f"the GPU ran out of memory ({compute.device}, batch size {batch_size}): {str(exc).splitlines()[0]}",
        f"use a smaller batch (--batch-size {max(1, batch_size // 2)}), or --device cpu",
    )


def is_out_of_memory(exc: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or "CUDA out of memory" in str(exc)
