"""Dataset plug-ins of the downstream evaluator.

The evaluator (:mod:`opt.downstream.evaluate`) runs the same tasks on any
shards; a plug-in adds what one dataset knows: where its evaluation splits lie
in a directory, and metrics read against the annotations its samples carry
(``meta``, the sample's ``KEY.json``). A plug-in scores only the samples that
carry its annotations, so every plug-in may be given any shards.

The plug-ins are listed explicitly in :data:`PLUGINS`; the first whose
``splits`` finds something in a directory evaluates it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from opt.data.world.evaluation import WorldEvaluation
from opt.errors import UserError


class EvaluationPlugin(Protocol):
    name: str  # short name of the dataset
    layout: str  # the files ``splits`` looks for, for messages

    def splits(self, directory: str | Path) -> dict[str, str]:
        """Split name -> shard spec under ``directory``; empty when it is not this dataset's."""

    def caption_metrics(self, captions: Sequence[str], metas: Sequence[dict]) -> dict[str, float]:
        """Metrics of generated captions against their samples' annotations."""

    def image_metrics(self, images: Sequence[np.ndarray], metas: Sequence[dict]) -> dict[str, float]:
        """Metrics of (H, W, 3) uint8 pictures drawn from the captions of samples with these annotations."""


PLUGINS: tuple[EvaluationPlugin, ...] = (WorldEvaluation(),)


def find_splits(directory: str | Path) -> tuple[EvaluationPlugin, dict[str, str]]:
    """The plug-in that recognises ``directory`` and the splits it finds there."""
    for plugin in PLUGINS:
        splits = plugin.splits(directory)
        if splits:
            return plugin, splits
    raise UserError(f"no {' or '.join(p.layout for p in PLUGINS)} in {directory}")
