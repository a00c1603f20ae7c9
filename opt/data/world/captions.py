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


# test_unseen's phrasings: sentence frames and position phrases that no other split uses, with
# the same attribute words (WORLD.md), so the split measures language beyond the world's own frames
UNSEEN_POSITION_PHRASES = {
    "left": "on the left side",
    "right": "on the right side",
    "top": "near the top",
    "bottom": "near the bottom",
    "center": "in the very center",
}
UNSEEN_ONE_OBJECT = (
    "i can see a {obj} {where}",
    "this image has a {obj} {where}",
    "{where} you can see a {obj}",
    "look, a {obj} {where}",
)
UNSEEN_TWO_OBJECTS = (
    "i can see a {first} {relation} a {second}",
    "this image has a {first} {relation} a {second}",
    "here a {first} sits {relation} a {second}",
)


def describe(obj: WorldObject) -> str:
    return f"{obj.size} {obj.color} {obj.shape}"


def caption(scene: Scene, rng: np.random.Generator, *, unseen: bool = False) -> str:
    """A lower-case one-sentence caption of the scene, phrasing chosen by ``rng``; ``unseen``
    draws from test_unseen's phrasings instead of the others'."""
    if scene.relation is None:
        (obj,) = scene.objects
        frames, places = (UNSEEN_ONE_OBJECT, UNSEEN_POSITION_PHRASES) if unseen else (ONE_OBJECT, POSITION_PHRASES)
        template = frames[rng.integers(len(frames))]
        return template.format(obj=describe(obj), where=places[obj.position])
    first, second = scene.objects
    frames = UNSEEN_TWO_OBJECTS if unseen else TWO_OBJECTS
    template = frames[rng.integers(len(frames))]
    return template.format(first=describe(first), second=describe(second),
                           relation=RELATION_PHRASES[scene.relation])
