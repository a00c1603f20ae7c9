"""The synthetic world as the evaluator's plug-in: its splits and its attribute metrics."""

from __future__ import annotations

import numpy as np
import pytest

from opt.data.world.attributes import aggregate, score_caption
from opt.data.world.captions import caption
from opt.data.world.evaluation import WorldEvaluation
from opt.data.world.facts import sample_scene
from opt.data.world.render import render
from opt.downstream.plugins import find_splits
from opt.errors import UserError

PLUGIN = WorldEvaluation()


def scenes(count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        scene = sample_scene(rng, 64, novel=None, held_out=set())
        yield scene, caption(scene, rng), np.asarray(render(scene, 64, rng))


def test_world_splits_are_the_test_test_novel_and_test_unseen_shards_present(tmp_path):
    assert PLUGIN.splits(tmp_path) == {}
    (tmp_path / "test_novel-000000.tar").touch()
    (tmp_path / "train-000000.tar").touch()
    assert PLUGIN.splits(tmp_path) == {"test_novel": f"{tmp_path}/test_novel-*.tar"}
    (tmp_path / "test-000000.tar").touch()
    plugin, splits = find_splits(tmp_path)
    assert plugin.name == "world" and list(splits) == ["test", "test_novel"]
    (tmp_path / "test_unseen-000000.tar").touch()
    assert list(find_splits(tmp_path)[1]) == ["test", "test_novel", "test_unseen"]


def test_a_directory_no_plugin_recognises_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"no test-\*\.tar or test_novel-\*\.tar or test_unseen-\*\.tar shards in"):
        find_splits(tmp_path)


def test_caption_metrics_score_against_the_facts_of_the_samples_that_have_them():
    drawn = list(scenes(6))
    captions = [text for _, text, _ in drawn] + ["a small red circle on the left"]
    metas = [scene.facts() for scene, _, _ in drawn] + [{}]  # the last sample has no facts: left out
    metrics = PLUGIN.caption_metrics(captions, metas)
    assert list(metrics) == ["attribute_accuracy", "attribute_size", "attribute_color", "attribute_shape",
                             "attribute_position_or_relation", "attribute_count"]
    assert all(value == 1.0 for value in metrics.values())
    wrong = PLUGIN.caption_metrics(["a large green cross"] * 6, metas[:6])
    expected = aggregate(score_caption("a large green cross", meta) for meta in metas[:6])
    assert wrong["attribute_accuracy"] == expected["overall"] < 1.0
    assert PLUGIN.caption_metrics(["a caption"], [{}]) == {}


def test_image_metrics_read_the_pictures_only_when_every_sample_has_facts():
    drawn = list(scenes(4, seed=1))
    images, metas = [image for _, _, image in drawn], [scene.facts() for scene, _, _ in drawn]
    metrics = PLUGIN.image_metrics(images, metas)
    assert metrics["attribute_color"] == metrics["attribute_size"] == metrics["attribute_count"] == 1.0
    blank = [np.full_like(image, 45) for image in images]
    assert PLUGIN.image_metrics(blank, metas)["attribute_count"] == 0.0
    assert PLUGIN.image_metrics(images, metas[:3] + [{}]) == {}
