"""Reading lettering back from a composed page: balloons (white, outlined in black, holding
their text's ink as holes), their tails, and caption boxes. numpy only, for tests."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

WHITE = (255, 255, 255)
CAPTION_FILL = (255, 244, 189)


def components(mask: np.ndarray, min_area: int = 1) -> list[np.ndarray]:
    """4-connected components of a boolean mask, largest first, as boolean masks."""
    seen = np.zeros_like(mask, dtype=bool)
    height, width = mask.shape
    found = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        part = np.zeros_like(mask, dtype=bool)
        queue = deque([(y, x)])
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            part[cy, cx] = True
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if part.sum() >= min_area:
            found.append(part)
    return sorted(found, key=lambda m: -int(m.sum()))


def holes(part: np.ndarray) -> np.ndarray:
    """Pixels enclosed by `part` (not reachable from outside its bounding box without crossing it)."""
    ys, xs = np.nonzero(part)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    padded = np.pad(~part[y0:y1, x0:x1], 1, constant_values=True)
    enclosed = np.zeros_like(part)
    enclosed[y0:y1, x0:x1] = ~_flood(padded, (0, 0))[1:-1, 1:-1] & ~part[y0:y1, x0:x1]
    return enclosed


def _flood(mask: np.ndarray, start: tuple[int, int]) -> np.ndarray:
    reach = np.zeros_like(mask, dtype=bool)
    height, width = mask.shape
    queue = deque([start])
    reach[start] = True
    while queue:
        cy, cx = queue.popleft()
        for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
            if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not reach[ny, nx]:
                reach[ny, nx] = True
                queue.append((ny, nx))
    return reach


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    padded = np.pad(mask, radius, constant_values=False)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (2 * radius + 1, 2 * radius + 1))
    return windows.all(axis=(-1, -2))


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    padded = np.pad(mask, radius, constant_values=False)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (2 * radius + 1, 2 * radius + 1))
    return windows.any(axis=(-1, -2))


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
