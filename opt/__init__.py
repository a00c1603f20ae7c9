"""OPT: an Omni-Perception Pre-Trainer for image, text and audio.

The package is organised by the direction imports point:
``cli`` -> ``downstream`` / ``engine`` -> ``tasks`` -> ``model``; ``data`` feeds
them all and knows nothing of the model.
"""

__version__ = "0.1.0"

MODALITIES: tuple[str, ...] = ("text", "image", "audio")
"""The three modality keys used everywhere: data, model, tasks and metrics."""

TOWER_PAIRS: tuple[tuple[str, str], ...] = (("text", "image"), ("text", "audio"), ("image", "audio"))
"""The modality pairs the two towers align, and whose similarities the matching head reads."""


def pair_name(pair: tuple[str, str]) -> str:
    """``("text", "image")`` -> ``"text-image"``, as ``tasks.contrastive_pairs`` names pairs."""
    return "-".join(pair)
