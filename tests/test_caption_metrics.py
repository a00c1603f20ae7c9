"""COCO caption metrics and word error rate, offline."""

from __future__ import annotations

import socket

import pytest

from opt.downstream import caption_metrics
from opt.downstream.caption_metrics import caption_scores, tokenize, word_error_rate

REFERENCES = {
    0: ["a small red circle on the left", "there is a small red circle on the left"],
    1: ["a large blue square at the top"],
    2: ["a small green triangle to the left of a large white star"],
    3: ["in the center there is a large yellow diamond"],
    4: ["a large purple cross above a small orange circle"],
    5: ["the picture shows a small cyan star at the bottom"],
    6: ["a large red square is below a small blue cross"],
    7: ["a small white diamond placed on the right"],
    8: ["there is a large orange triangle to the right of a small green square"],
    9: ["a small yellow circle in the center"],
}
PERFECT = {key: texts[0] for key, texts in REFERENCES.items()}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_perfect_predictions_score_high_on_every_metric():
    scores = caption_scores(PERFECT, REFERENCES)
    assert set(scores) == {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider", "spice"}
    assert scores["bleu_4"] > 0.99 and scores["rouge_l"] > 0.99
    assert scores["spice"] is None or scores["spice"] > 0.9  # None unless Stanford CoreNLP is installed locally
    assert scores["meteor"] > 0.9
    assert scores["cider"] > 5.0  # CIDEr-D is scaled by 10


def test_wrong_predictions_score_lower():
    wrong = dict(PERFECT) | {key: "a large green star at the top" for key in range(5)}
    perfect = caption_scores(PERFECT, REFERENCES, with_meteor=False)
    scores = caption_scores(wrong, REFERENCES, with_meteor=False)
    assert scores["meteor"] is None
    for name in ("bleu_4", "rouge_l", "cider"):
        assert scores[name] < perfect[name] - 0.1, name


def test_ptb_tokenizer_lowercases_and_drops_punctuation():
    assert tokenize({"a": ["A Red circle, on the LEFT."]}) == {"a": ["a red circle on the left"]}


def test_without_java_meteor_is_none_and_a_simple_tokenizer_is_used(monkeypatch):
    monkeypatch.setattr(caption_metrics, "_java_available", lambda: False)
    with pytest.warns(UserWarning, match="java not found"):
        assert tokenize({"a": ["A Red circle, on the LEFT."]}) == {"a": ["a red circle on the left"]}
        scores = caption_scores(PERFECT, REFERENCES)
    assert scores["meteor"] is None and scores["bleu_4"] > 0.99


def test_mismatched_keys_are_refused():
    with pytest.raises(ValueError, match="differ in keys"):
        caption_scores({0: "a red circle"}, REFERENCES)
    with pytest.raises(ValueError, match="differ in keys"):
        word_error_rate({0: "x", 99: "y"}, {0: "x"})


def test_word_error_rate_is_zero_for_identical_text_ignoring_case_and_punctuation():
    assert word_error_rate(PERFECT, {key: text.upper() + "." for key, text in PERFECT.items()}) == 0.0


def test_word_error_rate_counts_edits_over_reference_words():
    # one substitution (red -> blue) and one deletion (left) over 7 + 3 reference words, one insertion (big)
    predictions = {"a": "a small blue circle on the", "b": "a big green star"}
    references = {"a": "a small red circle on the left", "b": "a green star"}
    assert word_error_rate(predictions, references) == pytest.approx(3 / 10)


def test_word_error_rate_takes_the_closest_of_several_references():
    references = {"a": ["there is a small red circle on the left", "a small red circle on the left"]}
    assert word_error_rate({"a": "a small red circle on the left"}, references) == 0.0
