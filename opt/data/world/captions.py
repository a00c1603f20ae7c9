"""Captions that state a scene's facts in one of several phrasings.

Attribute words are exactly the names in :mod:`opt.data.world.facts`; the
relation words ("left of", "right of", "above", "below") appear verbatim.
"""

from __future__ import annotations

import numpy as np

from opt.data.world.facts import Scene, WorldObject

POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
RELATION_PHRASES = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}

ONE_OBJECT = (
    "a {obj} {where}",
    "there is a {obj} {where}",
    "{where} there is a {obj}",
    "the picture shows a {obj} {where}",
    "a {obj} placed {where}",
)
TWO_OBJECTS = (
    "a {first} {relation} a {second}",
    "there is a {first} {relation} a {second}",
    "the picture shows a {first} {relation} a {second}",
    "a {first} is {relation} a {second}",
)


def describe(obj: WorldObject) -> str:
    return f"{obj.size} {obj.color} {obj.shape}"


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A lower-case one-sentence caption of the scene, phrasing chosen by ``rng``."""
    if scene.relation is None:
        (obj,) = scene.objects
        template = ONE_OBJECT[rng.integers(len(ONE_OBJECT))]
        return template.format(obj=describe(obj), where=POSITION_PHRASES[obj.position])
    first, second = scene.objects
    template = TWO_OBJECTS[rng.integers(len(TWO_OBJECTS))]
    return template.format(first=describe(first), second=describe(second),
                           relation=RELATION_PHRASES[scene.relation])
