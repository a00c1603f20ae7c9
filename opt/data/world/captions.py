"""Captions that state a scene's facts in one of several phrasings.

Attribute words are exactly the names in :mod:`opt.data.world.facts`; the
relation words ("left of", "right of", "above", "below") appear verbatim.
"""

from __future__ import annotations

from dataclasses import dataclass

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

# train's carrier words (generator 2.1): a third phrase for each position, and lead-ins and tails
# that name nothing in the scene, so that a model learns to pick the attribute words out of words
# it has no use for. None is an attribute or relation word, and none uses a word of test_unseen's
# frames that train's frames lack (i, can, you, this, image, look, here, sits, side, near, very).
TRAIN_POSITION_PHRASES_2 = {
    "left": "along the left",
    "right": "off to the right",
    "top": "high up at the top",
    "bottom": "low at the bottom",
    "center": "at the exact center",
}
TRAIN_LEAD_INS = (
    "okay", "so", "well", "alright", "now", "and", "next", "hmm", "in the picture", "in our picture",
    "what we have is", "the frame shows", "it shows", "at last", "we have", "as shown",
)
TRAIN_TAILS = (
    "and nothing else", "on a dark background", "in the frame", "and that is all", "more or less",
    "against the backdrop", "it seems", "in the shot", "as drawn", "for sure",
)
LEAD_IN_RATE, TAIL_RATE = 0.4, 0.3  # the fraction of train captions that get a lead-in, a tail


@dataclass(frozen=True)
class Phrasing:
    """How one kind of split states a scene: its sentence frames, the position phrase sets one of
    which is drawn, and optional carrier words around the sentence."""

    one_object: tuple[str, ...]
    two_objects: tuple[str, ...]
    places: tuple[dict[str, str], ...]
    lead_ins: tuple[str, ...] = ()
    tails: tuple[str, ...] = ()


PHRASINGS = {
    "test": Phrasing(ONE_OBJECT, TWO_OBJECTS, (POSITION_PHRASES,)),
    "train": Phrasing(TRAIN_ONE_OBJECT, TRAIN_TWO_OBJECTS,
                      (POSITION_PHRASES, TRAIN_POSITION_PHRASES, TRAIN_POSITION_PHRASES_2),
                      TRAIN_LEAD_INS, TRAIN_TAILS),
    "unseen": Phrasing(UNSEEN_ONE_OBJECT, UNSEEN_TWO_OBJECTS, (UNSEEN_POSITION_PHRASES,)),
}


def describe(obj: WorldObject) -> str:
    return f"{obj.size} {obj.color} {obj.shape}"


def caption(scene: Scene, rng: np.random.Generator, *, phrasings: str = "test") -> str:
    """A lower-case one-sentence caption of the scene, phrasing chosen by ``rng`` from one of
    :data:`PHRASINGS` ("test": val, test and test_novel; "train"; "unseen": test_unseen)."""
    phrasing = PHRASINGS[phrasings]
    if scene.relation is None:
        (obj,) = scene.objects
        template = phrasing.one_object[rng.integers(len(phrasing.one_object))]
        # a single phrase set draws nothing, so test's captions are generator 1.x's byte for byte
        sets = phrasing.places
        places = sets[rng.integers(len(sets))] if len(sets) > 1 else sets[0]
        sentence = template.format(obj=describe(obj), where=places[obj.position])
    else:
        first, second = scene.objects
        template = phrasing.two_objects[rng.integers(len(phrasing.two_objects))]
        sentence = template.format(first=describe(first), second=describe(second),
                                   relation=RELATION_PHRASES[scene.relation])
    if not phrasing.lead_ins:  # no draws: the other splits' random streams stay as they were
        return sentence
    words = [sentence]
    if rng.random() < LEAD_IN_RATE:
        words.insert(0, phrasing.lead_ins[rng.integers(len(phrasing.lead_ins))])
    if rng.random() < TAIL_RATE:
        words.append(phrasing.tails[rng.integers(len(phrasing.tails))])
    return " ".join(words)
