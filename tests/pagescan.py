"""Reading lettering back from a composed page: balloons (white, outlined in black, holding
their text's ink as holes), their tails, and caption boxes. numpy and scipy.ndimage, for tests."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

WHITE = (255, 255, 255)
CAPTION_FILL = (255, 244, 189)


def components(mask: np.ndarray, min_area: int = 1) -> list[np.ndarray]:
    """4-connected components of a boolean mask, largest first (ties in raster order), as boolean masks."""
    labels, count = ndimage.label(mask)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    found = [labels == label for label in range(1, count + 1) if sizes[label] >= min_area]
    return sorted(found, key=lambda m: -int(m.sum()))


def holes(part: np.ndarray) -> np.ndarray:
    """Pixels enclosed by `part`: background that no 4-connected path joins to the outside."""
    return ndimage.binary_fill_holes(np.pad(part, 1))[1:-1, 1:-1] & ~part


def _square(radius: int) -> np.ndarray:
    return np.ones((2 * radius + 1, 2 * radius + 1), bool)


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    return ndimage.binary_erosion(mask, _square(radius))  # outside the image counts as background


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    return ndimage.binary_dilation(mask, _square(radius))


def colour_mask(pixels: np.ndarray, colour) -> np.ndarray:
    return (pixels[..., :3] == np.array(colour)).all(axis=-1)


@dataclass
class Balloon:
    shape: np.ndarray  # the white fill with its ink holes filled: balloon and tail, (H, W) bool
    body: np.ndarray  # the shape without its tail
    ink: int  # dark pixels enclosed by the fill (the text)
    outline_dark: float  # share of the ring just outside the shape that is dark
    centre: tuple[float, float]  # (x, y) of the body
    bbox: tuple[int, int, int, int]  # of the body, (x0, y0, x1, y1), end exclusive
    tip: tuple[float, float] | None  # the tail pixel farthest from the body, (x, y)


def find_balloons(pixels: np.ndarray, min_area: int = 150) -> list[Balloon]:
    """Balloons in a frame's pixels (H, W, 3): white regions that are not touching the frame's
    edge (the gutter and margin are white too: crop to the frame's inside first)."""
    white = colour_mask(pixels, WHITE)
    dark = pixels[..., :3].max(axis=-1) < 100
    found = []
    for part in components(white, min_area):
        enclosed = holes(part)
        shape = part | enclosed
        ink = int((enclosed & dark).sum())
        ring = _dilate(shape, 2) & ~shape
        outline_dark = float(dark[ring].mean()) if ring.any() else 0.0
        # The body: what survives an opening by half the largest inscribed square's radius
        # (the rounded box does; the tail, a narrow wedge, does not).
        inscribed, eroded = 0, shape
        while eroded.any():
            inscribed += 1
            eroded = _erode(eroded, 1)
        radius = max(1, inscribed // 2)
        body = _dilate(_erode(shape, radius), radius) & shape
        by, bx = np.nonzero(body)
        centre = (float(bx.mean()), float(by.mean()))
        tail = shape & ~_dilate(body, 2)
        tip = None
        if tail.sum() >= 10:
            ty, tx = np.nonzero(tail)
            far = np.argmax((tx - centre[0]) ** 2 + (ty - centre[1]) ** 2)
            tip = (float(tx[far]), float(ty[far]))
        found.append(Balloon(shape, body, ink, outline_dark, centre,
                             (int(bx.min()), int(by.min()), int(bx.max()) + 1, int(by.max()) + 1), tip))
    return found


def find_captions(pixels: np.ndarray, min_area: int = 50) -> list[tuple[np.ndarray, tuple[int, int, int, int], int]]:
    """Caption boxes: (shape, bbox (x0, y0, x1, y1), ink pixels inside) per caption-coloured region."""
    fill = colour_mask(pixels, CAPTION_FILL)
    dark = pixels[..., :3].max(axis=-1) < 100
    found = []
    for part in components(fill, min_area):
        shape = part | holes(part)
        ys, xs = np.nonzero(shape)
        found.append((shape, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
                      int((holes(part) & dark).sum())))
    return found
