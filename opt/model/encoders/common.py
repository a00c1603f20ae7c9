"""What the single-modal encoders share."""

from __future__ import annotations

import torch


def pool(x: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Mean or max of the real positions of x (b, n, d) -> (b, d); rows without any give zeros.

    (A learned attention query, timm's ``AttentionPoolLatent``, was tried for the image
    tower: text-image alignment alone reached 0.30 in-batch accuracy at 600 steps, max
    pooling 0.82.)
    """
    if how == "max":
        pooled = x.masked_fill(~mask[..., None], torch.finfo(x.dtype).min).amax(dim=1)
        return torch.where(mask.any(1, keepdim=True), pooled, torch.zeros_like(pooled))
    weights = mask[..., None].to(x.dtype)
    return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)
