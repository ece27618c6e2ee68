"""Colouring masks for people: palettes, colour masks and overlays."""

from __future__ import annotations

import colorsys
from typing import Optional, Sequence

import numpy as np
from PIL import Image


def default_palette(num_classes: int) -> list[tuple[int, int, int]]:
    """Distinct colours by walking the hue circle with the golden ratio."""
    colours = []
    for i in range(num_classes):
        h = (i * 0.618033988749895) % 1.0
        s, v = (0.65, 0.95) if i % 2 == 0 else (0.9, 0.7)
        r, g, b = colorsys.hsv_to_rgb(h, s, v)
        colours.append((int(r * 255), int(g * 255), int(b * 255)))
    return colours


def colorize(mask: np.ndarray, palette: Optional[Sequence[tuple[int, int, int]]] = None,
             num_classes: Optional[int] = None, ignore_index: int = 255) -> Image.Image:
    """(H, W) class indices -> RGB image; the ignore index is black."""
    k = num_classes or int(mask[mask != ignore_index].max(initial=0)) + 1
    palette = list(palette or default_palette(k))
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(palette)] = np.asarray(palette[:256], dtype=np.uint8)
    return Image.fromarray(lut[np.asarray(mask, dtype=np.int64).clip(0, 255)])


def overlay(image: Image.Image, colour_mask: Image.Image, alpha: float = 0.5) -> Image.Image:
    image = image.convert("RGB")
    if colour_mask.size != image.size:
        colour_mask = colour_mask.resize(image.size, Image.NEAREST)
    return Image.blend(image, colour_mask.convert("RGB"), alpha)
