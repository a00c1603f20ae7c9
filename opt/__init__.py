"""OPT: an Omni-Perception Pre-Trainer for image, text and audio.

The package is organised by the direction imports point:
``cli`` -> ``downstream`` / ``engine`` -> ``tasks`` -> ``model``; ``data`` feeds
them all and knows nothing of the model. ``from opt import OPT`` gives the Python API
(:mod:`opt.api`: caption, generate, embed), loaded on first use.
"""

__version__ = "0.1.0"

MODALITIES: tuple[str, ...] = ("text", "image", "audio")
"""The three modality keys used everywhere: data, model, tasks and metrics."""

TOWER_PAIRS: tuple[tuple[str, str], ...] = (("text", "image"), ("text", "audio"), ("image", "audio"))
"""The modality pairs the two towers align, and whose similarities the matching head reads."""


def pair_name(pair: tuple[str, str]) -> str:
    """``("text", "image")`` -> ``"text-image"``, as ``tasks.contrastive_pairs`` names pairs."""
    return "-".join(pair)


# what ``from opt import ...`` loads on first use, so that importing ``opt`` (every CLI start) stays light
_LAZY_EXPORTS = {"OPT": "opt.api", "OPTModel": "opt.model.opt_model"}


def __getattr__(name: str):
    """``OPT`` (the Python API, :mod:`opt.api`) and ``OPTModel`` (the network), imported when first asked for."""
    if name in _LAZY_EXPORTS:
        import importlib

        return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module 'opt' has no attribute {name!r}")
