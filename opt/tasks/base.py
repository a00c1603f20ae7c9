"""What every pretext task shares: its output type, the random generators it
draws from, and random position selection.

Randomness comes from two ``torch.Generator`` s owned by the task mixture (so a
resumed run draws exactly what an uninterrupted one would):
:attr:`TaskGenerators.shared` decides structure (which inputs a task uses,
which decoding objective), is seeded the same on every process and is consumed
by the same fixed-size draws there, so all processes use the same parameters in
a step (data-parallel gradient reductions must match);
:attr:`TaskGenerators.local` draws masks and per-sample choices, seeded per
process.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TaskGenerators:
    shared: torch.Generator  # identical on every process: structural choices only
    local: torch.Generator  # per process: masks, swaps, per-sample draws


@dataclass
class TaskOutput:
    loss: torch.Tensor  # scalar
    # loss and accuracies as detached 0-d tensors: nothing waits for their values until the
    # trainer logs them (a ``.item()`` per metric per step would stall a GPU once per metric)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def uniform(shape, generator: torch.Generator) -> torch.Tensor:
    """Uniform [0, 1) numbers drawn on the CPU from ``generator``."""
    return torch.rand(shape, generator=generator)


def select_positions(valid: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Pick about ``rate`` of the True positions of ``valid`` (b, n), at least one per row
    that has any; returns a bool mask of the same shape."""
    scores = uniform(valid.shape, generator).to(valid.device)
    chosen = (scores < rate) & valid
    # rows where nothing was drawn get their valid position with the lowest score (computed for
    # every row and applied where needed: no branch on the tensors' values, so no device sync)
    empty = ~chosen.any(dim=1) & valid.any(dim=1)
    lowest = scores.masked_fill(~valid, 2.0).argmin(dim=1, keepdim=True)
    return chosen | (torch.zeros_like(chosen).scatter_(1, lowest, True) & empty[:, None])


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The fraction of rows whose largest logit is the target, as a detached 0-d tensor (0 when empty)."""
    if not targets.numel():
        return torch.zeros((), device=logits.device)
    return (logits.detach().argmax(-1) == targets).float().mean()
