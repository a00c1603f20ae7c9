"""Where a command runs and in what precision, shared by training and inference.

``--device`` names a torch device (``cpu``, ``cuda``, ``cuda:1``, ``mps``) and is
checked to exist here before any work starts, so a device this machine lacks is
a one-line :class:`~opt.errors.UserError`. Every ``--device`` defaults to ``cpu``:
a command gives the same result on any machine unless asked otherwise
(``opt train`` has no flag: it takes the GPU of its launcher's rank, or the CPU).

Inference runs under bf16 autocast on a CUDA device that supports bf16 and in
fp32 everywhere else: on the CPU bf16 autocast slowed the tiny model down.
"""

from __future__ import annotations

import contextlib
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


def inference_dtype(device: torch.device) -> torch.dtype:
    """The precision inference runs in on ``device``: bf16 on a CUDA GPU that supports it, else fp32."""
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def inference_autocast(device: torch.device) -> ContextManager:
    """A context that runs inference on ``device`` in :func:`inference_dtype` (bf16 autocast, or nothing)."""
    dtype = inference_dtype(device)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
