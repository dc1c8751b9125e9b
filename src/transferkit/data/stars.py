"""``stars``: generated grey images of stars, labelled with the number of points *and* the size.

The classic multi-task exercise (count a star's points and estimate its size at once). Each image is a
filled star polygon with ``count`` points (3..8: the label, classes "3".."8"), outer radius ``size`` in pixels
(the regression target), inner radius ``ratio * size``, a random rotation and position, anti-aliased by
drawing at 4x and downsampling, plus Gaussian pixel noise. Columns: ``count`` (int), ``size`` (float, px),
``rotation`` (degrees). Fully determined by the seed, so every process and run sees the same images.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageDraw

from transferkit.data.base import LabeledData
from transferkit.data.images import images_from_array

MIN_POINTS, MAX_POINTS = 3, 8
DEFAULT_COUNT = 3000
DEFAULT_IMAGE_SIZE = 48
_SUPERSAMPLE = 4


def star_polygon(points: int, center: tuple[float, float], outer: float, inner: float,
                 rotation: float) -> list[tuple[float, float]]:
    """The ``2 * points`` vertices of a star, alternating outer and inner radius."""
    vertices = []
    for k in range(2 * points):
        radius = outer if k % 2 == 0 else inner
        angle = rotation + math.pi * k / points
        vertices.append((center[0] + radius * math.sin(angle), center[1] - radius * math.cos(angle)))
    return vertices


def draw_star(points: int, size: float, image_size: int, rng: np.random.Generator,
              noise: float = 12.0) -> tuple[np.ndarray, float]:
    """One ``(image_size, image_size)`` uint8 image and its rotation in degrees."""
    big = image_size * _SUPERSAMPLE
    margin = size + 1.0
    cx, cy = rng.uniform(margin, image_size - margin, size=2)
    rotation = float(rng.uniform(0, 2 * math.pi / points))
    ratio = float(rng.uniform(0.35, 0.5))
    canvas = Image.new("L", (big, big), 0)
    polygon = star_polygon(points, (cx * _SUPERSAMPLE, cy * _SUPERSAMPLE), size * _SUPERSAMPLE,
                           ratio * size * _SUPERSAMPLE, rotation)
    ImageDraw.Draw(canvas).polygon(polygon, fill=int(rng.uniform(170, 255)))
    small = np.asarray(canvas.resize((image_size, image_size), Image.Resampling.BOX), dtype=np.float32)
    small = small + rng.normal(0.0, noise, size=small.shape)
    return np.clip(np.round(small), 0, 255).astype(np.uint8), math.degrees(rotation)


@functools.cache
def make_stars(count: int = DEFAULT_COUNT, image_size: int = DEFAULT_IMAGE_SIZE, seed: int = 0,
               min_size: float = 6.0, max_size: float | None = None) -> LabeledData:
    """``count`` star images (classes "3".."8" points) with columns ``count``, ``size`` and ``rotation``."""
    rng = np.random.default_rng(seed)
    max_size = max_size if max_size is not None else image_size / 2 - 3
    images = np.zeros((count, image_size, image_size), dtype=np.uint8)
    points = rng.integers(MIN_POINTS, MAX_POINTS + 1, size=count)
    sizes = rng.uniform(min_size, max_size, size=count)
    rotations = np.zeros(count)
    for i in range(count):
        images[i], rotations[i] = draw_star(int(points[i]), float(sizes[i]), image_size, rng)
    class_names = [str(p) for p in range(MIN_POINTS, MAX_POINTS + 1)]
    data = images_from_array(images, points - MIN_POINTS, class_names, name="stars",
                             ids=[f"stars/{i}" for i in range(count)])
    data.columns = {"count": points.astype(np.int64), "size": sizes.astype(np.float32),
                    "rotation": rotations.astype(np.float32)}
    return data
