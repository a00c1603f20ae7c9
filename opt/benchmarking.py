"""Timing helpers shared by the benchmark scripts in ``scripts/``."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def timed(function: Callable[[], object], repeats: int) -> float:
    """Best wall time in seconds of ``repeats`` calls, after one warm-up call."""
    function()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak(dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 5) -> float:
    """Measured FLOP/s of a square matmul: the practical peak to compare models against."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    return 2 * size**3 / timed(lambda: a @ b, repeats)
