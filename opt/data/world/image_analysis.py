"""Read the facts of a synthetic-world image with fixed rules (no learned model).

Used to score images a model draws from a caption, so it must also take
blurry, imperfect drawings. Steps, at any square canvas size (numbers are
stated at 64 px and scaled, as in WORLD.md):

- background: the per-channel median of the image (objects cover at most a
  third of it); a pixel belongs to an object when a channel differs from it
  by more than ``FOREGROUND_THRESHOLD`` (the noise sigma is 4);
- objects: 8-connected components of those pixels (numpy only: the smallest
  label is propagated until stable), specks under ``MIN_OBJECT_PIXELS``
  dropped; touching objects stay merged (world objects keep 2 px apart);
- colour: the median of the component's least blended quarter of pixels,
  read as the canonical colour whose blend line with the background passes
  nearest (a blurred, half-covered pixel keeps its colour's direction);
- coverage: each pixel's share of that colour against the background, so
  soft edges count fractionally (the component is grown by one pixel to
  take its faint rim);
- shape: the nearest silhouette (coverage in the box of the half-covered
  pixels, resampled to ``GRID`` x ``GRID``, cosine similarity) among the six
  shapes drawn by the world's own renderer at the side that best reproduces
  the observed box. Measured on rendered scenes this is exact; on blurred
  ones it degrades first (Gaussian blur radius 1: ~0.88);
- size: the fitted template's side against the midpoint of the two size
  ranges (a star's box is smaller than its side);
- centre: the coverage-weighted centroid less the template's own centroid
  offset (a triangle's mass lies low), so it estimates the centre of the
  drawn box to ~0.2 px;
- position (one object): the nearest region centre. The drawn box is on
  whole pixels, so a centre can fall exactly halfway between two regions;
  such a scene's position cannot be read from its pixels, and scoring
  accepts either region (:func:`readable_positions`);
- relation (two objects): the axis along which the centres differ most.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from itertools import permutations

import numpy as np
from PIL import Image

from opt.data.world.facts import COLORS, POSITIONS, REFERENCE_SIZE, SHAPES, SIZES, WorldObject
from opt.data.world.render import object_mask

FOREGROUND_THRESHOLD = 30  # max channel difference from the background; noise sigma is 4
MIN_OBJECT_PIXELS = 8  # at 64 px; the smallest world object (a 10 px star) covers ~33
SIZE_SPLIT = (SIZES["small"][1] + SIZES["large"][0]) / 2  # px at 64
GRID = 16  # side of the silhouette grid shapes are compared on
ATTRIBUTES = ("color", "size", "shape", "position_or_relation")


@dataclass(frozen=True)
class FoundObject:
    """One object read from an image."""

    shape: str
    color: str
    size: str
    centre: tuple[float, float]  # (x, y) in px at 64
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 of the half-covered pixels, x1/y1 exclusive


def _as_array(image: np.ndarray | Image.Image) -> np.ndarray:
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an RGB image (h, w, 3), got shape {pixels.shape}")
    return pixels.astype(np.float64)


def _neighbourhoods(array: np.ndarray, fill: int | bool) -> np.ndarray:
    """(9, h, w): the array shifted by each offset of a 3 x 3 neighbourhood, ``fill`` beyond the border."""
    height, width = array.shape
    padded = np.pad(array, 1, constant_values=fill)
    return np.stack([padded[dy:dy + height, dx:dx + width] for dy in range(3) for dx in range(3)])


def _label_components(mask: np.ndarray) -> np.ndarray:
    """8-connected component labels (0 = background) by propagating the smallest label."""
    height, width = mask.shape
    unset = height * width + 1
    labels = np.where(mask, np.arange(1, height * width + 1).reshape(height, width), unset)
    while True:
        spread = np.where(mask, _neighbourhoods(labels, unset).min(axis=0), unset)
        if np.array_equal(spread, labels):
            return np.where(mask, labels, 0)
        labels = spread


def _strongest_color(pixels: np.ndarray, component: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Median of the quarter of the component's pixels farthest from the background (the least blended)."""
    values = pixels[component]
    distance = np.linalg.norm(values - background, axis=1)
    return np.median(values[distance >= np.quantile(distance, 0.75)], axis=0)


def _grown(component: np.ndarray) -> np.ndarray:
    """The component and its 8 neighbours: the faint edge pixels below the threshold."""
    return _neighbourhoods(component, False).any(axis=0)


def _nearest_color(rgb: np.ndarray, background: np.ndarray) -> str:
    """The canonical colour whose blend line with the background passes nearest to ``rgb``.

    A pixel only partly covered (a blurry drawing) lies on the line from the
    background to its colour, so it is still read as that colour.
    """
    def distance(name: str) -> float:
        direction = np.asarray(COLORS[name], dtype=np.float64) - background
        share = np.clip((rgb - background) @ direction / max(float(direction @ direction), 1.0), 0.0, 1.0)
        return float(np.linalg.norm(rgb - background - share * direction))

    return min(COLORS, key=distance)


def _coverage(pixels: np.ndarray, component: np.ndarray, background: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """(h, w) share of the object colour in each pixel of the component, in [0, 1]."""
    direction = rgb - background
    share = (pixels - background) @ direction / max(float(direction @ direction), 1.0)
    return np.where(component, np.clip(share, 0.0, 1.0), 0.0)


def _box(coverage: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(coverage >= 0.5)
    if len(xs) == 0:
        ys, xs = np.nonzero(coverage)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _silhouette(coverage: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """(GRID, GRID) coverage inside the box, resampled; unit norm."""
    x0, y0, x1, y1 = box
    crop = Image.fromarray(coverage[y0:y1, x0:x1].astype(np.float32), "F")
    grid = np.asarray(crop.resize((GRID, GRID), Image.Resampling.BILINEAR), dtype=np.float64)
    return grid / max(float(np.linalg.norm(grid)), 1e-9)


@dataclass(frozen=True)
class _Template:
    side: int  # side of the drawn object's box, px (a star's half-covered box is smaller)
    silhouette: np.ndarray  # (GRID, GRID)
    box_size: tuple[int, int]  # width, height of the half-covered pixels
    offset: tuple[float, float]  # centroid minus the centre of the drawn object's box, px


@cache
def _template(shape: str, side: int) -> _Template:
    """A shape as the world renderer draws it with box side ``side`` px."""
    obj = WorldObject(shape, "white", "large", None, (side, side, 2 * side, 2 * side), COLORS["white"])
    coverage = object_mask(obj, 3 * side).astype(np.float64)
    box = _box(coverage)
    centroid = _centroid(coverage)
    return _Template(side, _silhouette(coverage, box), (box[2] - box[0], box[3] - box[1]),
                     (centroid[0] - 1.5 * side, centroid[1] - 1.5 * side))


def _fitted_template(shape: str, box_size: tuple[int, int]) -> _Template:
    """The template of ``shape`` whose box size is closest to ``box_size`` (a star's box is smaller than its side)."""
    longest = max(box_size)
    sides = range(max(longest - 1, 2), longest + longest // 8 + 3)

    def mismatch(side: int) -> tuple[int, int]:
        width, height = _template(shape, side).box_size
        return abs(width - box_size[0]) + abs(height - box_size[1]), abs(side - longest)

    return _template(shape, min(sides, key=mismatch))


def _centroid(coverage: np.ndarray) -> tuple[float, float]:
    """Coverage-weighted (x, y) centre in px, pixel i spanning [i, i + 1)."""
    ys, xs = np.indices(coverage.shape)
    total = coverage.sum()
    return float((coverage * xs).sum() / total) + 0.5, float((coverage * ys).sum() / total) + 0.5


def _describe(pixels: np.ndarray, component: np.ndarray, background: np.ndarray, scale: float) -> FoundObject:
    rgb = _strongest_color(pixels, component, background)
    coverage = _coverage(pixels, _grown(component), background, rgb)
    box = _box(coverage)
    box_size = (box[2] - box[0], box[3] - box[1])
    silhouette = _silhouette(coverage, box)
    templates = {shape: _fitted_template(shape, box_size) for shape in SHAPES}
    shape = max(SHAPES, key=lambda name: float((templates[name].silhouette * silhouette).sum()))
    centroid = _centroid(coverage)
    offset = templates[shape].offset
    return FoundObject(shape=shape, color=_nearest_color(rgb, background),
                       size="small" if templates[shape].side / scale < SIZE_SPLIT else "large",
                       centre=((centroid[0] - offset[0]) / scale, (centroid[1] - offset[1]) / scale), bbox=box)


def find_objects(image: np.ndarray | Image.Image) -> list[FoundObject]:
    """The objects in an image, in reading order of their boxes (top to bottom, then left to right)."""
    pixels = _as_array(image)
    scale = pixels.shape[1] / REFERENCE_SIZE
    background = np.median(pixels.reshape(-1, 3), axis=0)
    foreground = np.abs(pixels - background).max(axis=2) > FOREGROUND_THRESHOLD
    labels = _label_components(foreground)
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    found = [_describe(pixels, labels == i, background, scale)
             for i, count in zip(ids, counts) if count >= MIN_OBJECT_PIXELS * scale ** 2]
    return sorted(found, key=lambda obj: (obj.bbox[1], obj.bbox[0]))


def _region_distances(centre: tuple[float, float]) -> dict[str, float]:
    """Distance from ``centre`` ((x, y) px at 64) to each region's centre."""
    return {name: ((x - centre[0]) ** 2 + (y - centre[1]) ** 2) ** 0.5 for name, (x, y) in POSITIONS.items()}


def nearest_position(centre: tuple[float, float]) -> str:
    """The region whose centre is nearest to ``centre`` ((x, y) px at 64)."""
    distance = _region_distances(centre)
    return min(distance, key=distance.get)


BOUNDARY_TOLERANCE = 0.5  # px at 64: over twice the centre estimate's error


def readable_positions(centre: tuple[float, float]) -> set[str]:
    """The regions an object centred at ``centre`` may be said to lie in: the nearest, and any other
    within :data:`BOUNDARY_TOLERANCE` of it. Adjacent regions share an edge (a box of side 16 around
    each centre) and the drawn box lies on whole pixels, so a centre can fall on that edge (about 1
    in 200 one-object scenes), where the pixels show either region."""
    distance = _region_distances(centre)
    nearest = min(distance.values())
    return {name for name, value in distance.items() if value <= nearest + BOUNDARY_TOLERANCE}


def relation(first: FoundObject, second: FoundObject) -> str:
    """Where ``first`` lies relative to ``second``, along the axis their centres differ most."""
    dx, dy = first.centre[0] - second.centre[0], first.centre[1] - second.centre[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def analyse_image(image: np.ndarray | Image.Image) -> dict:
    """The facts an image shows, in ``KEY.json``'s schema (position with one object, relation with two)."""
    found = find_objects(image)
    objects = [{"shape": obj.shape, "color": obj.color, "size": obj.size,
                "position": nearest_position(obj.centre) if len(found) == 1 else None, "bbox": list(obj.bbox)}
               for obj in found]
    return {"objects": objects, "relation": relation(*found) if len(found) == 2 else None}


def _correctness(matched: list[FoundObject | None], facts: dict) -> list[dict[str, bool]]:
    """Per truth object, which attributes the matched found object gets right."""
    truth = facts["objects"]
    if len(truth) == 1:
        located = [matched[0] is not None and truth[0]["position"] in readable_positions(matched[0].centre)]
    else:
        both = all(obj is not None for obj in matched)
        located = [both and relation(*matched) == facts["relation"]] * 2
    return [
        {"color": obj is not None and obj.color == want["color"],
         "size": obj is not None and obj.size == want["size"],
         "shape": obj is not None and obj.shape == want["shape"],
         "position_or_relation": ok}
        for obj, want, ok in zip(matched, truth, located)
    ]


def _best_match(found: list[FoundObject], facts: dict) -> list[dict[str, bool]]:
    """Assign found objects to truth objects, trying every assignment (scenes hold at most two).

    Ranked by correct colours first, then by all correct attributes; missing
    objects stay unmatched (None).
    """
    wanted = len(facts["objects"])
    padded = found + [None] * max(0, wanted - len(found))
    candidates = [_correctness(list(chosen), facts) for chosen in permutations(padded, wanted)]
    return max(candidates, key=lambda objs: (sum(o["color"] for o in objs), sum(sum(o.values()) for o in objs)))


def score_image(image: np.ndarray | Image.Image, facts: dict) -> dict[str, float]:
    """Score an image against the facts it should show (a ``KEY.json`` dict).

    Per attribute, the fraction of truth objects the image gets right
    (``color``, ``size``, ``shape``, ``position_or_relation``); ``count``: 1.0
    when it shows as many objects as the facts; ``overall``: 1.0 when colour,
    size and position / relation are right for every object (shape is left
    out: it is the hardest to draw and to read, and is reported on its own).
    """
    found = find_objects(image)
    per_object = _best_match(found, facts)
    scores = {name: sum(obj[name] for obj in per_object) / len(per_object) for name in ATTRIBUTES}
    scores["count"] = float(len(found) == len(facts["objects"]))
    scores["overall"] = float(all(o["color"] and o["size"] and o["position_or_relation"] for o in per_object))
    return scores


def object_attribute_accuracy(images: Iterable[np.ndarray | Image.Image], facts: Iterable[dict]) -> dict[str, float]:
    """Per attribute (:data:`ATTRIBUTES`), the fraction of all the facts' objects that their
    images show right, pooled over objects (an image of three objects weighs three), plus
    ``objects``, how many were scored. Facts without objects (another corpus's metadata) are
    passed over; none at all gives an empty dict."""
    totals, objects = dict.fromkeys(ATTRIBUTES, 0.0), 0
    for image, fact in zip(images, facts):
        if not isinstance(fact, dict) or not fact.get("objects"):
            continue
        count = len(fact["objects"])
        scores = score_image(image, fact)
        for name in ATTRIBUTES:
            totals[name] += scores[name] * count
        objects += count
    return {name: total / objects for name, total in totals.items()} | {"objects": objects} if objects else {}
