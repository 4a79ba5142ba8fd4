"""The reference image the released model expects: the subject alone on white, in a square crop.

The released app thresholds the mask, crops a square 1.04 times the subject's bounding box
(centred on it) and paints everything outside the mask white before encoding; the model was
trained on references of that kind."""
from __future__ import annotations

import numpy as np
from PIL import Image

from ..errors import InputError

MARGIN = 1.04


def prepare_reference(image: Image.Image, mask: Image.Image, threshold: int = 128,
                      where: str = "reference") -> tuple[Image.Image, Image.Image]:
    """(RGB image, L mask): a square crop around the subject with the background white, and the
    thresholded mask cropped the same way (0 outside the image)."""
    rgb = np.asarray(image.convert("RGB"))
    inside = np.asarray(mask.convert("L").resize(image.size, Image.NEAREST)) >= threshold
    if not inside.any():
        raise InputError(f"{where}: the mask is empty (no pixel at or above {threshold})")
    rows, cols = np.nonzero(inside)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    side = max(1, round(max(bottom - top, right - left) * MARGIN))
    y0 = round((top + bottom - side) / 2)
    x0 = round((left + right - side) / 2)
    canvas = np.full((side, side, 3), 255, dtype=np.uint8)
    cut = np.zeros((side, side), dtype=bool)
    # The overlap of the square with the image (the square may reach past the image's edges).
    sy0, sx0 = max(y0, 0), max(x0, 0)
    sy1, sx1 = min(y0 + side, rgb.shape[0]), min(x0 + side, rgb.shape[1])
    region = inside[sy0:sy1, sx0:sx1]
    target = (slice(sy0 - y0, sy1 - y0), slice(sx0 - x0, sx1 - x0))
    canvas[target][region] = rgb[sy0:sy1, sx0:sx1][region]
    cut[target] = region
    return Image.fromarray(canvas), Image.fromarray(cut.astype(np.uint8) * 255)
