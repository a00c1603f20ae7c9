"""Timing helpers shared by the benchmark scripts in ``scripts/``."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

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


def interleaved(functions: dict[str, Callable[[], object]], rounds: int,
                synchronize: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Wall times in seconds of each function, ``rounds`` times, the functions taking turns in
    every round (after one warm-up call each), so that a slow stretch of a shared machine falls on
    all of them alike. ``synchronize`` waits for queued device work (``torch.cuda.synchronize``)."""
    for function in functions.values():
        function()
    synchronize()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            synchronize()
            times[name].append(time.perf_counter() - start)
    return times


def median_and_range(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)


def matmul_peak(dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 5,
                device: torch.device | str = "cpu") -> float:
    """Measured FLOP/s of a square matmul: the practical peak to compare models against."""
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    synchronize = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    return 2 * size**3 / timed(lambda: (a @ b, synchronize()), repeats)


def processor_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU as Linux names it, with its family and model and the widest vector instructions
    torch can use (two hosts both named ``AMD EPYC`` have differed 4x in matmul speed), e.g.
    ``AMD EPYC (family 25 model 17, avx512_bf16)``; ``platform.processor()`` elsewhere."""
    fallback = platform.processor() or platform.machine() or "unknown"
    if not cpuinfo.is_file():
        return fallback
    fields: dict[str, str] = {}
    for line in cpuinfo.read_text(errors="replace").splitlines():
        if not line.strip():
            break  # the first processor's block is enough
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    details = []
    if "cpu family" in fields and "model" in fields:
        details.append(f"family {fields['cpu family']} model {fields['model']}")
    flags = set((fields.get("flags") or fields.get("Features", "")).split())  # x86 or ARM
    details += [f for f in ("avx512_bf16", "avx512f", "avx2", "neon", "asimd") if f in flags][:1]
    name = fields.get("model name") or fallback
    return f"{name} ({', '.join(details)})" if details else name


def machine_summary() -> dict:
    """What a wall time depends on: the processor, the threads torch uses, and its fp32 matmul
    FLOP/s measured now (1024 x 1024; the same machine type has measured 4x apart on different
    hosts, so a time means little without it)."""
    return {"processor": processor_name(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__.split("+")[0],
            "fp32_matmul_gflops_per_s": round(matmul_peak(size=1024, repeats=3) / 1e9, 1)}
