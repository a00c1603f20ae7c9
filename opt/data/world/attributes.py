"""Read the facts a caption of the synthetic world states, and score them.

A caption made by a model may be malformed, partial, or carry extra words, so
parsing is a tolerant left-to-right scan of the words, never a grammar:

- a shape word closes an object; the size and colour words seen since the
  previous object belong to it (size or colour words left after the last
  shape make an object with no shape);
- a few synonyms and plurals are read as the world's words ("big" -> large,
  "circles" -> circle, "centre" / "middle" -> center);
- "left of" / "right of" / "above" / "below" (also "on top of", "under") is
  a relation ("at the top of the picture" stays a position); it relates the
  object before it to the object after it and is stored, as in ``KEY.json``,
  as where ``objects[0]`` lies relative to ``objects[1]``;
- a lone "left", "right", "top", "bottom" or "center" is a position and goes
  to the object nearest to it in the sentence.

Scoring follows WORLD.md's facts. An object of the truth counts as correct
when the caption states its size, colour, shape and its position (one-object
scenes) or the scene's relation (two-object scenes). In a two-object scene the
caption's first two objects are aligned with the truth's either in order or
swapped, whichever states more attributes correctly (ties: in order); when
swapped, the caption's relation is inverted, so "a blue star to the right of a
red circle" states the same facts as "a red circle to the left of a blue
star". A one-object scene is matched with the caption's first object. Objects
the caption adds beyond the truth do not lower the attribute scores; they
show in ``count`` (whether the caption names as many objects as the truth).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from opt.data.world.facts import COLORS, POSITIONS, SHAPES, SIZES

ATTRIBUTES = ("size", "color", "shape", "position_or_relation")
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
SYNONYMS = {
    "big": "large", "little": "small", "tiny": "small",
    "centre": "center", "middle": "center", "centered": "center", "centred": "center",
    "under": "below", "beneath": "below",
}
_WORD = re.compile(r"[a-z]+")


def _words(text: str) -> list[str]:
    """Lower-case words with synonyms and plurals mapped onto the world's vocabulary."""
    words = []
    for word in _WORD.findall(text.lower()):
        word = SYNONYMS.get(word, word)
        if word.endswith("s") and word[:-1] in SHAPES:
            word = word[:-1]
        elif word.endswith("es") and word[:-2] in SHAPES:  # crosses
            word = word[:-2]
        words.append(word)
    return words


def _relation_at(words: list[str], i: int) -> str | None:
    """The relation that starts at word ``i``, if any."""
    word = words[i]
    following = words[i + 1] if i + 1 < len(words) else None
    if word in ("left", "right") and following == "of":
        return f"{word} of"
    if word == "top" and following == "of" and i > 0 and words[i - 1] == "on":
        return "above"
    if word in ("above", "below"):
        return word
    return None


def _empty_object() -> dict:
    return {"shape": None, "color": None, "size": None, "position": None}


def parse_caption(text: str) -> dict:
    """The facts a caption states: ``{"objects": [{shape, color, size, position}], "relation"}``.

    Attributes the caption does not state are None; ``relation`` is where
    ``objects[0]`` lies relative to ``objects[1]`` (None when not stated).
    """
    words = _words(text)
    objects: list[dict] = []
    anchors: list[int] = []  # word index of each object's last word, for placing positions
    pending, pending_at = _empty_object(), None
    positions: list[tuple[int, str]] = []
    relation, objects_before_relation = None, 0
    for i, word in enumerate(words):
        found_relation = _relation_at(words, i)
        if found_relation is not None:
            if relation is None:
                relation, objects_before_relation = found_relation, len(objects)
        elif word in POSITIONS:
            positions.append((i, word))
        elif word in SIZES or word in COLORS:
            pending["size" if word in SIZES else "color"] = word
            pending_at = i
        elif word in SHAPES:
            objects.append(pending | {"shape": word})
            anchors.append(i)
            pending, pending_at = _empty_object(), None
    if pending_at is not None:
        objects.append(pending)
        anchors.append(pending_at)
    for at, position in positions:
        if objects:
            nearest = min(range(len(objects)), key=lambda k: (abs(anchors[k] - at), k))
            objects[nearest]["position"] = position
    if relation is not None and objects_before_relation == 0 and len(objects) >= 2:
        relation = INVERSE_RELATION[relation]  # "above a blue star is a red circle"
    return {"objects": objects, "relation": relation}


def _object_correctness(stated: dict | None, truth: dict, located: bool) -> dict[str, bool]:
    """Which of one truth object's attributes are stated; ``located`` scores position or relation."""
    stated = stated or _empty_object()
    return {
        "size": stated["size"] == truth["size"],
        "color": stated["color"] == truth["color"],
        "shape": stated["shape"] == truth["shape"],
        "position_or_relation": located,
    }


def _two_object_correctness(stated: dict, truth: dict) -> list[dict[str, bool]]:
    """Per truth object correctness under the better of the in-order and the swapped alignment."""
    parsed = stated["objects"][:2] + [None] * (2 - len(stated["objects"][:2]))
    alignments = []
    for order, relation in (((0, 1), stated["relation"]), ((1, 0), INVERSE_RELATION.get(stated["relation"]))):
        located = relation is not None and relation == truth["relation"]
        alignments.append([
            _object_correctness(parsed[k], obj, located) for k, obj in zip(order, truth["objects"])
        ])
    return max(alignments, key=lambda objs: sum(sum(o.values()) for o in objs))


def score_caption(text: str, facts: dict) -> dict[str, float]:
    """Score a caption against ground-truth facts (a ``KEY.json`` dict).

    Returns the fraction of truth objects whose size, colour, shape and
    position / relation are stated correctly (one key each), ``overall`` (all
    four correct) and ``count`` (1.0 when the caption names as many objects as
    the truth).
    """
    stated = parse_caption(text)
    truth_objects = facts["objects"]
    if len(truth_objects) == 1:
        first = stated["objects"][0] if stated["objects"] else None
        located = first is not None and first["position"] == truth_objects[0]["position"]
        per_object = [_object_correctness(first, truth_objects[0], located)]
    else:
        per_object = _two_object_correctness(stated, facts)
    scores = {name: sum(obj[name] for obj in per_object) / len(per_object) for name in ATTRIBUTES}
    scores["overall"] = sum(all(obj.values()) for obj in per_object) / len(per_object)
    scores["count"] = float(len(stated["objects"]) == len(truth_objects))
    return scores


def aggregate(scores: Iterable[dict[str, float]]) -> dict[str, float]:
    """Mean of each score over captions (an empty input gives an empty dict)."""
    scores = list(scores)
    if not scores:
        return {}
    return {name: sum(s[name] for s in scores) / len(scores) for name in scores[0]}
