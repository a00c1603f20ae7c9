"""The synthetic tri-modal world ("shapes"): images of simple objects, captions
that state their facts, and the captions spoken aloud. See docs/world.md."""

from opt.data.world.facts import COLORS, POSITIONS, RELATIONS, SHAPES, SIZES, Scene, WorldObject

__all__ = ["COLORS", "POSITIONS", "RELATIONS", "SHAPES", "SIZES", "Scene", "WorldObject"]
