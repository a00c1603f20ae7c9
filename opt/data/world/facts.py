"""The facts of a scene and how they are drawn at random.

Every number is stated at a 64 px canvas and scaled with the image size.
Positions are centres (x, y) with y pointing down. A scene holds one or two
objects; with two, ``relation`` says where ``objects[0]`` is relative to
``objects[1]`` ("a red circle to the left of a blue star").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 30),
    "cyan": (40, 210, 220),
    "white": (245, 245, 245),
}
SIZES: dict[str, tuple[int, int]] = {"small": (10, 14), "large": (20, 26)}  # bounding-box side, px at 64
POSITIONS: dict[str, tuple[int, int]] = {  # region centres, px at 64
    "left": (16, 32),
    "right": (48, 32),
    "top": (32, 16),
    "bottom": (32, 48),
    "center": (32, 32),
}
RELATIONS = ("left of", "right of", "above", "below")

REFERENCE_SIZE = 64
REGION_SIDE = 16  # side of the box around a region centre that holds the object's centre
COLOR_JITTER = 15  # per-channel uniform integer jitter
MIN_RELATION_GAP = 20  # centres differ by at least this along the relation's axis
OBJECT_MARGIN = 2  # px kept free between two objects' boxes


@dataclass(frozen=True)
class WorldObject:
    shape: str
    color: str
    size: str
    position: str | None  # named region for one-object scenes, None when a relation is used
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive
    rgb: tuple[int, int, int]  # jittered colour actually drawn


@dataclass(frozen=True)
class Scene:
    objects: tuple[WorldObject, ...]
    relation: str | None
    background: int  # grey level of the background

    def facts(self) -> dict:
        """The metadata stored in ``KEY.json`` (without split, seed and voice)."""
        return {
            "objects": [
                {k: v for k, v in asdict(obj).items() if k != "rgb"} | {"bbox": list(obj.bbox)}
                for obj in self.objects
            ],
            "relation": self.relation,
        }


def held_out_pairs(seed: int, count: int = 6) -> list[tuple[str, str]]:
    """The (colour, shape) pairs kept out of train and val, fixed by the seed.

    Chosen so that no colour and no shape is held out twice while possible, so
    every colour and every shape still occurs in training.
    """
    rng = np.random.default_rng([seed, 7_919])
    colors = list(rng.permutation(list(COLORS)))
    shapes = list(rng.permutation(list(SHAPES)))
    return sorted((colors[i % len(colors)], shapes[i % len(shapes)]) for i in range(count))


def _scaled(value: float, image_size: int) -> float:
    return value * image_size / REFERENCE_SIZE


def _draw_object_attributes(rng: np.random.Generator, image_size: int) -> tuple[str, str, str, int, tuple]:
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = list(COLORS)[rng.integers(len(COLORS))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    low, high = SIZES[size]
    side = int(round(_scaled(rng.integers(low, high + 1), image_size)))
    rgb = tuple(int(np.clip(c + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1), 0, 255)) for c in COLORS[color])
    return shape, color, size, side, rgb


def _box(cx: float, cy: float, side: int) -> tuple[int, int, int, int]:
    x0 = int(round(cx - side / 2))
    y0 = int(round(cy - side / 2))
    return (x0, y0, x0 + side, y0 + side)


def _one_object(rng: np.random.Generator, image_size: int) -> tuple[WorldObject, ...]:
    shape, color, size, side, rgb = _draw_object_attributes(rng, image_size)
    position = list(POSITIONS)[rng.integers(len(POSITIONS))]
    centre = [_scaled(c, image_size) for c in POSITIONS[position]]
    half_region = _scaled(REGION_SIDE, image_size) / 2
    coords = []
    for c in centre:  # the centre lies in the region box and the object stays on the canvas
        low = max(c - half_region, side / 2)
        high = min(c + half_region, image_size - side / 2)
        coords.append(rng.uniform(low, high))
    return (WorldObject(shape, color, size, position, _box(*coords, side), rgb),)


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int], margin: int) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def _relation(first: tuple[float, float], second: tuple[float, float], gap: float) -> str | None:
    """The relation of ``first`` to ``second`` when it is clear along exactly one axis."""
    dx, dy = first[0] - second[0], first[1] - second[1]
    if abs(dx) >= gap and abs(dy) <= abs(dx) / 2:
        return "left of" if dx < 0 else "right of"
    if abs(dy) >= gap and abs(dx) <= abs(dy) / 2:
        return "above" if dy < 0 else "below"
    return None


def _two_objects(rng: np.random.Generator, image_size: int) -> tuple[tuple[WorldObject, ...], str]:
    attributes = [_draw_object_attributes(rng, image_size) for _ in range(2)]
    gap = _scaled(MIN_RELATION_GAP, image_size)
    margin = int(round(_scaled(OBJECT_MARGIN, image_size)))
    while True:
        centres = [tuple(rng.uniform(side / 2, image_size - side / 2, size=2)) for *_, side, _ in attributes]
        boxes = [_box(*c, a[3]) for c, a in zip(centres, attributes)]
        relation = _relation(centres[0], centres[1], gap)
        if relation is not None and not _overlap(boxes[0], boxes[1], margin):
            break
    objects = tuple(
        WorldObject(shape, color, size, None, box, rgb)
        for (shape, color, size, _, rgb), box in zip(attributes, boxes)
    )
    return objects, relation


def sample_scene(rng: np.random.Generator, image_size: int, *, novel: bool | None,
                 held_out: set[tuple[str, str]]) -> Scene:
    """Draw a scene.

    ``novel=False`` rejects scenes containing a held-out (colour, shape) pair
    (train, val, test); ``novel=True`` keeps only scenes containing one
    (test_novel); ``None`` accepts all.
    """
    while True:
        background = int(rng.integers(20, 71))
        if rng.random() < 0.5:
            objects, relation = _one_object(rng, image_size), None
        else:
            objects, relation = _two_objects(rng, image_size)
        has_novel = any((o.color, o.shape) in held_out for o in objects)
        if novel is None or has_novel == novel:
            return Scene(objects, relation, background)
