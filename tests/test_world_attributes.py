"""Captions of the synthetic world are parsed into facts and scored against the truth."""

from __future__ import annotations

import numpy as np
import pytest

from opt.data.world.attributes import aggregate, parse_caption, score_caption
from opt.data.world.captions import POSITION_PHRASES, caption
from opt.data.world.facts import COLORS, SHAPES, SIZES, sample_scene

ATTRIBUTE_VALUES = {"size": list(SIZES), "color": list(COLORS), "shape": list(SHAPES)}


def generated(count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        scene = sample_scene(rng, 64, novel=None, held_out=set())
        yield scene.facts(), caption(scene, rng)


def one_object(shape="circle", color="red", size="small", position="left"):
    return {"objects": [{"shape": shape, "color": color, "size": size, "position": position, "bbox": [0, 0, 1, 1]}],
            "relation": None}


def two_objects(relation="left of"):
    first = {"shape": "circle", "color": "red", "size": "small", "position": None, "bbox": [0, 0, 1, 1]}
    second = {"shape": "star", "color": "blue", "size": "large", "position": None, "bbox": [0, 0, 1, 1]}
    return {"objects": [first, second], "relation": relation}


def test_every_generated_caption_scores_perfectly_on_its_own_facts():
    scores = [score_caption(text, facts) for facts, text in generated(500)]
    assert aggregate(scores) == {"size": 1.0, "color": 1.0, "shape": 1.0, "position_or_relation": 1.0,
                                 "overall": 1.0, "count": 1.0}


def test_parse_reads_a_two_object_caption_in_order():
    parsed = parse_caption("there is a large blue square to the left of a small yellow star")
    assert parsed == {
        "objects": [
            {"shape": "square", "color": "blue", "size": "large", "position": None},
            {"shape": "star", "color": "yellow", "size": "small", "position": None},
        ],
        "relation": "left of",
    }


def test_parse_places_a_leading_position_on_the_object():
    parsed = parse_caption("in the center there is a small green cross")
    assert parsed["objects"] == [{"shape": "cross", "color": "green", "size": "small", "position": "center"}]
    assert parsed["relation"] is None


@pytest.mark.parametrize("attribute", ["size", "color", "shape"])
def test_changing_one_attribute_lowers_the_score(attribute):
    for facts, text in generated(60, seed=1):
        truth = facts["objects"][0][attribute]
        other = next(v for v in ATTRIBUTE_VALUES[attribute] if v != truth)
        changed = text.replace(truth, other, 1)
        scores = score_caption(changed, facts)
        assert scores["overall"] < 1.0 and scores[attribute] < 1.0, changed
        untouched = [a for a in ("size", "color", "shape", "position_or_relation") if a != attribute]
        assert all(scores[a] == 1.0 for a in untouched), changed


def test_changing_the_position_or_relation_lowers_the_score():
    assert score_caption("a small red circle on the right", one_object())["position_or_relation"] == 0.0
    scores = score_caption("a small red circle above a large blue star", two_objects())
    assert scores == {"size": 1.0, "color": 1.0, "shape": 1.0, "position_or_relation": 0.0, "overall": 0.0,
                      "count": 1.0}


def test_swapped_order_with_inverted_relation_states_the_same_facts():
    scores = score_caption("a large blue star to the right of a small red circle", two_objects("left of"))
    assert scores["overall"] == 1.0
    wrong = score_caption("a large blue star to the left of a small red circle", two_objects("left of"))
    assert wrong["position_or_relation"] == 0.0 and wrong["color"] == 1.0


def test_a_partial_caption_gets_partial_credit():
    scores = score_caption("a small red circle to the left of a", two_objects())
    assert scores == {"size": 0.5, "color": 0.5, "shape": 0.5, "position_or_relation": 1.0, "overall": 0.5,
                      "count": 0.0}
    assert score_caption("", one_object())["overall"] == 0.0


def test_malformed_captions_with_synonyms_and_extra_words_are_read():
    assert score_caption("A big, RED circle... sits in the middle!!", one_object(size="large", position="center")) \
        == {"size": 1.0, "color": 1.0, "shape": 1.0, "position_or_relation": 1.0, "overall": 1.0, "count": 1.0}
    assert parse_caption("a red circle on top of a blue star")["relation"] == "above"
    assert parse_caption("a red circle at the top of the picture")["objects"][0]["position"] == "top"
    above = parse_caption("above a blue star there is a red circle")
    assert above["relation"] == "below" and above["objects"][0]["shape"] == "star"


def test_an_extra_object_shows_in_count_only():
    scores = score_caption("a small red circle on the left and a white square", one_object())
    assert scores["overall"] == 1.0 and scores["count"] == 0.0


def test_aggregate_takes_means():
    first = {"overall": 1.0, "color": 1.0}
    second = {"overall": 0.0, "color": 0.5}
    assert aggregate([first, second]) == {"overall": 0.5, "color": 0.75}
    assert aggregate([]) == {}


@pytest.mark.parametrize("position", list(POSITION_PHRASES))
def test_every_position_phrase_is_parsed(position):
    parsed = parse_caption(f"a small red circle {POSITION_PHRASES[position]}")
    assert parsed["objects"][0]["position"] == position
