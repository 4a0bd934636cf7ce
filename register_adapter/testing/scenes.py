"""Synthetic scenes with known objects: one textured rectangle on a plain background, and its box."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ObjectImages:
    """Synthetic scenes: one textured object on a plain background.

    Attributes:
        images: (n, H, W, 3) uint8.
        boxes: (n, 4) int, the object's box ``(x0, y0, x1, y1)`` in pixels, ``x1``/``y1`` exclusive.
    """

    images: np.ndarray
    boxes: np.ndarray


def make_object_images(
    num_images: int, image_size: int, *, seed: int = 0, min_fraction: float = 0.3, max_fraction: float = 0.55
) -> ObjectImages:
    """Draw ``num_images`` scenes of one textured rectangle on a plain, randomly coloured background.

    The object's side lengths are ``min_fraction``..``max_fraction`` of the image side; its texture is per-pixel
    colour noise around a random mean colour, so every patch inside it has high local contrast while every
    background patch is perfectly uniform.

    Args:
        num_images: How many scenes.
        image_size: Side length in pixels.
        seed: Seed of the random generator; the same seed gives the same scenes.
        min_fraction: Smallest object side, as a fraction of the image side.
        max_fraction: Largest object side, as a fraction of the image side.
    """
    rng = np.random.default_rng(seed)
    images = np.empty((num_images, image_size, image_size, 3), dtype=np.uint8)
    boxes = np.empty((num_images, 4), dtype=np.int64)
    for i in range(num_images):
        background = rng.integers(0, 256, size=3)
        images[i] = background
        width, height = (rng.uniform(min_fraction, max_fraction, size=2) * image_size).round().astype(int)
        x0 = int(rng.integers(0, image_size - width + 1))
        y0 = int(rng.integers(0, image_size - height + 1))
        mean = rng.integers(64, 192, size=3)
        texture = mean + rng.normal(0.0, 60.0, size=(height, width, 3))  # (h, w, 3)
        images[i, y0 : y0 + height, x0 : x0 + width] = np.clip(texture, 0, 255).astype(np.uint8)
        boxes[i] = (x0, y0, x0 + width, y0 + height)
    return ObjectImages(images=images, boxes=boxes)
