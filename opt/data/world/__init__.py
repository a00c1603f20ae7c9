"""The synthetic tri-modal world ("shapes"): images of simple objects, captions
that state their facts, and the captions spoken aloud; and its evaluators, which
read captions (``attributes``) and pictures (``image_analysis``) back into facts
and plug the world into ``opt eval`` (``evaluation``). See docs/world.md."""

from opt.data.world.facts import COLORS, POSITIONS, RELATIONS, SHAPES, SIZES, Scene, WorldObject

__all__ = ["COLORS", "POSITIONS", "RELATIONS", "SHAPES", "SIZES", "Scene", "WorldObject"]
