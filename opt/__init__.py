"""OPT: an Omni-Perception Pre-Trainer for image, text and audio.

The package is organised by the direction imports point:
``cli`` -> ``downstream`` / ``engine`` -> ``tasks`` -> ``model``; ``data`` feeds
them all and knows nothing of the model.
"""

__version__ = "0.1.0"

MODALITIES: tuple[str, ...] = ("text", "image", "audio")
"""The three modality keys used everywhere: data, model, tasks and metrics."""
