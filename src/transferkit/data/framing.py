"""Framing digit images to one convention so that two digit datasets differ in style, not in layout.

MNIST digits are size-normalised into a 20x20 box and centred by their centre of mass inside 28x28 (LeCun
et al. 1998); scikit-learn's UCI digits fill their 8x8 grid edge to edge. Resizing 8x8 to 28x28 alone gives
digits about 40% larger than MNIST's. :func:`frame_image` crops to the ink's bounding box, scales the longer
side to ``box`` pixels (aspect ratio kept) and pastes it centred by mass in a ``size`` x ``size`` canvas:
MNIST's own convention, so both domains end up framed alike (``--frame mnist``).

The frame is part of a model's preprocessing (``Backbone.set_frame``, saved in its backbone spec): training,
``predict``, ``evaluate``, ``serve`` and an ONNX export's Python-side preprocessing all frame each input once,
through :func:`transferkit.backbones.base.input_image`.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

#: the values of ``fit --frame`` ("none": images as given)
FRAMES = ("none", "mnist")
MNIST_SIZE, MNIST_BOX = 28, 20


def frame_array(image: np.ndarray, size: int = MNIST_SIZE, box: int = MNIST_BOX, threshold: float = 0.1) -> np.ndarray:
    """A grey ``(H, W)`` uint8 digit (ink bright on dark) re-framed MNIST-style into ``(size, size)`` uint8."""
    pixels = np.asarray(image, dtype=np.float32)
    ink = pixels > threshold * max(1.0, float(pixels.max()))
    if not ink.any():
        return np.asarray(Image.fromarray(pixels.astype(np.uint8)).resize((size, size), Image.BILINEAR))
    rows, cols = np.where(ink)
    crop = pixels[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1]
    h, w = crop.shape
    scale = box / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    resized = np.asarray(Image.fromarray(crop).resize((new_w, new_h), Image.BILINEAR), dtype=np.float32)
    canvas = np.zeros((size, size), dtype=np.float32)
    total = resized.sum()
    cy, cx = ((np.indices(resized.shape) * resized).reshape(2, -1).sum(axis=1) / total) if total > 0 else \
        ((new_h - 1) / 2, (new_w - 1) / 2)
    top = int(np.clip(round((size - 1) / 2 - cy), 0, size - new_h))
    left = int(np.clip(round((size - 1) / 2 - cx), 0, size - new_w))
    canvas[top: top + new_h, left: left + new_w] = resized
    return canvas.clip(0, 255).astype(np.uint8)


def frame_image(image: Image.Image, size: int = MNIST_SIZE, box: int = MNIST_BOX) -> Image.Image:
    """PIL version of :func:`frame_array` (the image is converted to grey)."""
    return Image.fromarray(frame_array(np.asarray(image.convert("L")), size, box))
