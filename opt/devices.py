"""Where a command runs and in what precision, shared by training and inference.

``--device`` names a torch device (``cpu``, ``cuda``, ``cuda:1``, ``mps``) and is
checked to exist here before any work starts, so a device this machine lacks is
a one-line :class:`~opt.errors.UserError`. Every ``--device`` defaults to ``cpu``:
a command gives the same result on any machine unless asked otherwise
(``opt train`` has no flag: it takes the GPU of its launcher's rank, or the CPU).

Precision follows one rule for training (``train.precision: auto``) and inference
(:func:`auto_precision`): bf16 where the hardware does it natively (a CUDA GPU with bf16;
a CPU with AVX512-BF16 or AMX, read from its flags) and it pays for the model at hand, fp32
elsewhere. On a GPU it always pays. On a CPU it paid for the base model (the base training step
1.7x faster under bf16 autocast) and cost the tiny one (its step about 8% slower): small
matmuls gain nothing from bf16 and pay for the casts. :data:`CPU_BF16_MIN_PARAMETERS` sits
between the two measured sizes; the crossover itself has not been measured.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import ContextManager

import torch

from opt.errors import UserError


def resolve_device(name: str) -> torch.device:
    """The torch device ``name`` (``cpu``, ``cuda``, ``cuda:1``, ``mps``), checked to exist on this machine."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device {name!r} is not a torch device (cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"device {name!r}: CUDA is not available on this machine")
        if (device.index or 0) >= count:
            raise UserError(f"device {name!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return device
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError):  # a backend this build or machine lacks (mps, xpu, ...)
        raise UserError(f"device {name!r} is not available on this machine") from None
    return device


CPU_BF16_MIN_PARAMETERS = 100_000_000  # the tiny model (3.5 M) lost under bf16 on the CPU, base (658 M) gained


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The first processor's feature flags (empty where ``/proc/cpuinfo`` does not exist)."""
    if not cpuinfo.is_file():
        return set()
    for line in cpuinfo.read_text(errors="replace").splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively: a CUDA GPU that supports it, or a CPU with
    AVX512-BF16 or AMX (elsewhere bf16 is emulated and slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    return False


def auto_precision(device: torch.device, parameters: int) -> str:
    """``"bf16"`` or ``"fp32"`` for a model of ``parameters`` on ``device`` (see the module's rule)."""
    if not native_bf16(device):
        return "fp32"
    if device.type == "cuda" or parameters >= CPU_BF16_MIN_PARAMETERS:
        return "bf16"
    return "fp32"


def inference_dtype(device: torch.device, model: torch.nn.Module | None = None) -> torch.dtype:
    """The precision inference runs in on ``device``: :func:`auto_precision`'s for ``model`` (a CPU
    without a model: fp32)."""
    parameters = sum(p.numel() for p in model.parameters()) if model is not None else 0
    return torch.bfloat16 if auto_precision(device, parameters) == "bf16" else torch.float32


def inference_autocast(device: torch.device, model: torch.nn.Module | None = None) -> ContextManager:
    """A context that runs inference of ``model`` on ``device`` in :func:`inference_dtype` (bf16 autocast, or nothing)."""
    dtype = inference_dtype(device, model)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
