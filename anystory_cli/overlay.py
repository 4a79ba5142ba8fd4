"""A panel with each pixel tinted by the character the router sends it to (background untinted):
the `--save-routing` overlay, and the colours training previews and evaluation reports use."""

from __future__ import annotations

import numpy as np
from PIL import Image


ROUTING_COLOURS = [(230, 60, 60), (60, 110, 230), (60, 190, 80), (240, 200, 40), (190, 80, 220),
                   (40, 200, 210)]


def routing_overlay(image: Image.Image, maps: np.ndarray) -> Image.Image:
    """The panel with each pixel tinted by the character it is routed to (background untinted)."""
    size = (maps.shape[2], maps.shape[1])
    base = np.asarray(image.convert("RGB").resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
    winner = maps.argmax(axis=0)
    tint = base.copy()
    for entry in range(maps.shape[0] - 1):
        colour = np.array(ROUTING_COLOURS[entry % len(ROUTING_COLOURS)], np.float32)
        tint[winner == entry] = 0.45 * base[winner == entry] + 0.55 * colour
    return Image.fromarray(np.clip(tint + 0.5, 0, 255).astype(np.uint8), "RGB")
