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


# train's extra phrasings (generator 2.0): more frames and a second phrase for each position,
# none of them test_unseen's, so a model meets language beyond test's own frames in training
# while test_unseen stays unheard. test, test_novel and val keep the frames above.
TRAIN_POSITION_PHRASES = {
    "left": "toward the left",
    "right": "over on the right",
    "top": "up at the top",
    "bottom": "down at the bottom",
    "center": "at the center",
}
TRAIN_ONE_OBJECT = ONE_OBJECT + (
    "we see a {obj} {where}",
    "a photo of a {obj} {where}",
    "{where} is a {obj}",
    "the scene has a {obj} {where}",
    "a {obj} is {where}",
)
TRAIN_TWO_OBJECTS = TWO_OBJECTS + (
    "we see a {first} {relation} a {second}",
    "a photo of a {first} {relation} a {second}",
    "the scene has a {first} {relation} a {second}",
    "a {first} lies {relation} a {second}",
)

# (one-object frames, two-object frames, the position phrase sets one of which is drawn)
PHRASINGS = {
    "test": (ONE_OBJECT, TWO_OBJECTS, (POSITION_PHRASES,)),
    "train": (TRAIN_ONE_OBJECT, TRAIN_TWO_OBJECTS, (POSITION_PHRASES, TRAIN_POSITION_PHRASES)),
    "unseen": (UNSEEN_ONE_OBJECT, UNSEEN_TWO_OBJECTS, (UNSEEN_POSITION_PHRASES,)),
}


def describe(obj: WorldObject) -> str:
    return f"{obj.size} {obj.color} {obj.shape}"


def caption(scene: Scene, rng: np.random.Generator, *, phrasings: str = "test") -> str:
    """A lower-case one-sentence caption of the scene, phrasing chosen by ``rng`` from one of
    :data:`PHRASINGS` ("test": val, test and test_novel; "train"; "unseen": test_unseen)."""
    one_object, two_objects, place_sets = PHRASINGS[phrasings]
    if scene.relation is None:
        (obj,) = scene.objects
        template = one_object[rng.integers(len(one_object))]
        # a single phrase set draws nothing, so test's captions are generator 1.x's byte for byte
        places = place_sets[rng.integers(len(place_sets))] if len(place_sets) > 1 else place_sets[0]
        return template.format(obj=describe(obj), where=places[obj.position])
    first, second = scene.objects
    template = two_objects[rng.integers(len(two_objects))]
    return template.format(first=describe(first), second=describe(second), relation=RELATION_PHRASES[scene.relation])
