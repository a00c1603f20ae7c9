"""The synthetic world as a plug-in of the downstream evaluator
(:mod:`opt.downstream.evaluate`): where its evaluation splits are, and the
metrics only the world can give because every sample carries its facts
(``KEY.json``).

- splits: a directory holding ``test-*.tar``, ``test_novel-*.tar`` and/or
  ``test_unseen-*.tar`` shards (``test_novel``: attribute pairs held out of
  training; ``test_unseen``: voices and phrasings no other split has);
- captions: attribute accuracy, each caption parsed against its sample's
  facts (:mod:`opt.data.world.attributes`); samples without facts are left out;
- images: attribute accuracy of pictures drawn from the samples' captions,
  read by the fixed analyser (:mod:`opt.data.world.image_analysis`), given
  only when every sample has facts.

Metric names: ``attribute_accuracy`` (every attribute of an object right),
then ``attribute_<name>`` per attribute and ``attribute_count``. Nothing here
knows the model: captions arrive as text, pictures as uint8 arrays.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from opt.data.shards import resolve_shards
from opt.data.world.attributes import aggregate, score_caption
from opt.data.world.image_analysis import score_image
from opt.errors import UserError

SPLITS = ("test", "test_novel", "test_unseen")


def has_facts(meta: dict) -> bool:
    """Whether a sample's metadata holds the world's facts."""
    return isinstance(meta, dict) and "objects" in meta


def attribute_metrics(scores: Iterable[dict[str, float]]) -> dict[str, float]:
    """Per-sample attribute scores averaged and named as metrics (empty for no samples)."""
    means = aggregate(scores)
    if not means:
        return {}
    overall = means.pop("overall")
    return {"attribute_accuracy": overall} | {f"attribute_{name}": value for name, value in means.items()}


class WorldEvaluation:
    """The plug-in: the world's splits and its attribute metrics."""

    name = "world"
    layout = " or ".join(f"{split}-*.tar" for split in SPLITS) + " shards"

    def splits(self, directory: str | Path) -> dict[str, str]:
        """Split name -> shard spec of the evaluation splits under ``directory`` (empty when none)."""
        found = {}
        for split in SPLITS:
            spec = str(Path(directory) / f"{split}-*.tar")
            try:
                resolve_shards(spec)
            except UserError:
                continue
            found[split] = spec
        return found

    def caption_metrics(self, captions: Sequence[str], metas: Sequence[dict]) -> dict[str, float]:
        """Attribute accuracy of captions against the facts of their samples (those that have them)."""
        return attribute_metrics(score_caption(caption, meta) for caption, meta in zip(captions, metas)
                                 if has_facts(meta))

    def image_metrics(self, images: Sequence[np.ndarray], metas: Sequence[dict]) -> dict[str, float]:
        """Attribute accuracy of (H, W, 3) uint8 pictures drawn from the captions of samples
        with these facts; empty unless every sample has facts."""
        if not all(has_facts(meta) for meta in metas):
            return {}
        return attribute_metrics(score_image(image, meta) for image, meta in zip(images, metas))
