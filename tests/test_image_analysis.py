"""Rendered images of the synthetic world are read back into their facts by fixed rules."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import ImageFilter

from opt.data.world.facts import COLORS, Scene, WorldObject, sample_scene
from opt.data.world.image_analysis import analyse_image, find_objects, readable_positions, score_image
from opt.data.world.render import render


def rendered(count: int, image_size: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        scene = sample_scene(rng, image_size, novel=None, held_out=set())
        yield scene, render(scene, image_size, rng)


def scene_of(*objects: WorldObject, relation: str | None = None) -> Scene:
    return Scene(objects=objects, relation=relation, background=45)


def world_object(shape: str, color: str, bbox: tuple[int, int, int, int], position: str | None = None) -> WorldObject:
    size = "small" if bbox[2] - bbox[0] <= 14 else "large"
    return WorldObject(shape, color, size, position, bbox, COLORS[color])


RED_CIRCLE_LEFT_OF_BLUE_STAR = scene_of(world_object("circle", "red", (6, 24, 18, 36)),
                                        world_object("star", "blue", (36, 20, 58, 42)), relation="left of")


@pytest.mark.parametrize("image_size, count", [(64, 300), (128, 40)])
def test_rendered_scenes_read_back_their_facts(image_size, count):
    scenes = list(rendered(count, image_size))  # a centre on a region edge reads as either region
    assert any(len(scene.objects) == 2 for scene, _ in scenes)
    assert any(obj.size == "small" for scene, _ in scenes for obj in scene.objects)
    scores = [score_image(image, scene.facts()) for scene, image in scenes]
    for name in ("color", "size", "position_or_relation", "count", "overall"):
        assert all(s[name] == 1.0 for s in scores), name
    shape_accuracy = float(np.mean([s["shape"] for s in scores]))
    print(f"shape accuracy over {len(scores)} rendered {image_size} px scenes: {shape_accuracy:.3f}")
    assert shape_accuracy >= 0.97, shape_accuracy


def test_analyse_image_states_a_relation_for_two_objects():
    image = render(RED_CIRCLE_LEFT_OF_BLUE_STAR, 64, np.random.default_rng(0))
    facts = analyse_image(image)
    assert [(o["shape"], o["color"], o["size"], o["position"]) for o in facts["objects"]] == [
        ("star", "blue", "large", None), ("circle", "red", "small", None)]
    assert facts["relation"] == "right of"  # objects come in reading order: the star's box starts higher


def test_analyse_image_states_a_position_for_one_object():
    scene = scene_of(world_object("triangle", "yellow", (22, 38, 42, 58), position="bottom"))
    image = np.asarray(render(scene, 64, np.random.default_rng(0)))
    facts = analyse_image(image)
    assert facts["relation"] is None
    assert {k: facts["objects"][0][k] for k in ("shape", "color", "size", "position")} == {
        "shape": "triangle", "color": "yellow", "size": "large", "position": "bottom"}


def test_truth_listed_in_the_other_order_still_matches():
    image = render(RED_CIRCLE_LEFT_OF_BLUE_STAR, 64, np.random.default_rng(0))
    facts = RED_CIRCLE_LEFT_OF_BLUE_STAR.facts()
    swapped = {"objects": facts["objects"][::-1], "relation": "right of"}
    assert score_image(image, swapped)["overall"] == 1.0
    wrong = score_image(image, {"objects": facts["objects"], "relation": "right of"})
    assert wrong["position_or_relation"] == 0.0 and wrong["color"] == 1.0 and wrong["overall"] == 0.0


def test_a_changed_color_in_the_facts_scores_below_one():
    for scene, image in rendered(30, seed=1):
        facts = scene.facts()
        original = facts["objects"][0]["color"]
        facts["objects"][0]["color"] = next(name for name in COLORS if name != original)
        scores = score_image(image, facts)
        assert scores["color"] < 1.0 and scores["overall"] == 0.0


def test_an_empty_canvas_has_no_objects_and_specks_are_ignored():
    rng = np.random.default_rng(0)
    pixels = np.clip(40 + rng.normal(0, 4, size=(64, 64, 3)), 0, 255).astype(np.uint8)
    assert analyse_image(pixels) == {"objects": [], "relation": None}
    pixels[10:12, 10:12] = 250  # four bright pixels
    assert find_objects(pixels) == []
    facts = RED_CIRCLE_LEFT_OF_BLUE_STAR.facts()
    scores = score_image(pixels, facts)
    assert scores == {"color": 0.0, "size": 0.0, "shape": 0.0, "position_or_relation": 0.0, "count": 0.0,
                      "overall": 0.0}


def test_mildly_blurred_drawings_are_still_read():
    scores = [score_image(image.filter(ImageFilter.GaussianBlur(0.7)), scene.facts())
              for scene, image in rendered(60, seed=2)]
    assert np.mean([s["overall"] for s in scores]) >= 0.9
    assert np.mean([s["shape"] for s in scores]) >= 0.8


def test_rgba_images_are_converted_and_non_rgb_arrays_rejected():
    image = render(RED_CIRCLE_LEFT_OF_BLUE_STAR, 64, np.random.default_rng(0)).convert("RGBA")
    assert score_image(image, RED_CIRCLE_LEFT_OF_BLUE_STAR.facts())["overall"] == 1.0
    with pytest.raises(ValueError):
        analyse_image(np.zeros((64, 64), dtype=np.uint8))


def test_a_centre_on_the_edge_of_two_regions_reads_as_either():
    assert readable_positions((40.0, 25.0)) == {"center", "right"}  # 10.63 px from both centres
    assert readable_positions((39.0, 25.0)) == {"center"}
    assert readable_positions((32.0, 32.0)) == {"center"}
    # a val scene of the demo world: a large circle drawn at x 29-51, y 14-36, named "center"
    circle = scene_of(world_object("circle", "purple", (29, 14, 51, 36), position="center"))
    image = render(circle, 64, np.random.default_rng(0))
    assert score_image(image, circle.facts())["position_or_relation"] == 1.0
