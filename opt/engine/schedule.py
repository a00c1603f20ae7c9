"""The learning-rate schedule every optimizer of the project uses: linear warmup to
the peak, then cosine or linear decay to zero at the last step.

    scheduler = warmup_decay(optimizer, warmup=100, total=3000, decay="cosine")
"""

from __future__ import annotations

import math

import torch


def learning_rate_factor(step: int, *, warmup: int, total: int, decay: str = "cosine") -> float:
    """The multiple of the peak learning rate at optimizer step ``step`` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress


def warmup_decay(optimizer: torch.optim.Optimizer, *, warmup: int, total: int,
                 decay: str = "cosine") -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler stepping ``optimizer``'s learning rates along :func:`learning_rate_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, warmup=warmup, total=total, decay=decay))
