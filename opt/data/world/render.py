"""Render a :class:`Scene` to an RGB image.

Background: a grey level plus Gaussian pixel noise (sigma 4). Each object is
drawn as a coverage mask at 4x resolution, box-filtered down (soft edges), and
blended over the background in its jittered colour.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from opt.data.world.facts import Scene, WorldObject

SUPERSAMPLE = 4
NOISE_SIGMA = 4.0


def _polygon(shape: str, x0: float, y0: float, side: float) -> list[tuple[float, float]] | None:
    cx, cy, r = x0 + side / 2, y0 + side / 2, side / 2
    if shape == "triangle":  # pointing up
        return [(cx, y0), (x0 + side, y0 + side), (x0, y0 + side)]
    if shape == "diamond":
        return [(cx, y0), (x0 + side, cy), (cx, y0 + side), (x0, cy)]
    if shape == "star":  # five points, first one up
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + r * 0.1 + radius * math.sin(angle)))
        return points
    if shape == "cross":  # plus sign, arms a third of the side thick
        a, b = x0 + side / 3, x0 + 2 * side / 3
        c, d = y0 + side / 3, y0 + 2 * side / 3
        e, f = x0 + side, y0 + side
        return [(a, y0), (b, y0), (b, c), (e, c), (e, d), (b, d), (b, f), (a, f), (a, d), (x0, d), (x0, c), (a, c)]
    return None


def object_mask(obj: WorldObject, image_size: int) -> np.ndarray:
    """Coverage of ``obj`` in [0, 1] as an (image_size, image_size) float array."""
    big = image_size * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    x0, y0, x1, _ = (v * SUPERSAMPLE for v in obj.bbox)
    side = x1 - x0
    if obj.shape == "circle":
        draw.ellipse([x0, y0, x0 + side - 1, y0 + side - 1], fill=255)
    elif obj.shape == "square":
        draw.rectangle([x0, y0, x0 + side - 1, y0 + side - 1], fill=255)
    else:
        draw.polygon(_polygon(obj.shape, x0, y0, side), fill=255)
    small = canvas.resize((image_size, image_size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def render(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw the scene; ``rng`` supplies the background noise."""
    noise = rng.normal(0.0, NOISE_SIGMA, size=(image_size, image_size, 1))
    pixels = np.clip(scene.background + noise, 0, 255).repeat(3, axis=2)
    for obj in scene.objects:
        alpha = object_mask(obj, image_size)[..., None]
        pixels = pixels * (1 - alpha) + np.asarray(obj.rgb, dtype=np.float64) * alpha
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
