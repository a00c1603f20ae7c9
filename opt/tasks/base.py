"""What every pretext task shares: its output type, random position selection
and whole-modality masking.

Randomness comes from two ``torch.Generator`` s owned by the task mixture (so a
resumed run draws exactly what an uninterrupted one would): ``choice`` decides
structure (which inputs a task uses, which decoding objective), is seeded the
same on every process and is consumed by the same fixed-size draws there, so
all processes use the same parameters in a step (data-parallel gradient
reductions must match); ``mask`` draws masks and per-sample choices, seeded per
process.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from opt import MODALITIES


@dataclass
class TaskRandom:
    choice: torch.Generator  # identical on every process: structural choices only
    mask: torch.Generator  # per process: masks, swaps, per-sample draws


@dataclass
class TaskOutput:
    loss: torch.Tensor  # scalar
    metrics: dict[str, float] = field(default_factory=dict)  # loss and accuracies as floats


def uniform(shape, generator: torch.Generator) -> torch.Tensor:
    """Uniform [0, 1) numbers drawn on the CPU from ``generator``."""
    return torch.rand(shape, generator=generator)


def select_positions(valid: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Pick about ``rate`` of the True positions of ``valid`` (b, n), at least one per row
    that has any; returns a bool mask of the same shape."""
    scores = uniform(valid.shape, generator).to(valid.device)
    chosen = (scores < rate) & valid
    # rows where nothing was drawn get their valid position with the lowest score
    empty = ~chosen.any(dim=1) & valid.any(dim=1)
    if empty.any():
        lowest = scores.masked_fill(~valid, 2.0).argmin(dim=1)
        chosen[empty, lowest[empty]] = True
    return chosen


def with_present(batch: dict, present: dict[str, torch.Tensor]) -> dict:
    """A shallow copy of ``batch`` with new ``present`` flags for some modalities."""
    out = dict(batch)
    for modality, flags in present.items():
        out[modality] = dict(batch[modality]) | {"present": flags}
    return out


def drop_modalities(batch: dict, keep: str, probability: float, generator: torch.Generator) -> dict:
    """Whole-modality masking: for each sample, with ``probability`` hide one or both
    of the modalities other than ``keep`` (uniformly among the non-empty subsets)."""
    others = [m for m in MODALITIES if m != keep and m in batch]
    if not others or probability <= 0:
        return batch
    size = len(batch["keys"])
    subsets = [[m] for m in others] + ([others] if len(others) == 2 else [])
    drop = uniform(size, generator) < probability
    choice = torch.randint(len(subsets), (size,), generator=generator)
    present = {}
    for modality in others:
        hidden = drop & torch.tensor([modality in subsets[c] for c in choice.tolist()])
        present[modality] = batch[modality]["present"] & ~hidden.to(batch[modality]["present"].device)
    return with_present(batch, present)


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float((logits.argmax(-1) == targets).float().mean()) if targets.numel() else 0.0
