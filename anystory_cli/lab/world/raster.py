"""Crisp shape masks on pixel grids.

Every shape is a boolean test of each pixel centre, so nothing is anti-aliased: a pixel is fully
inside or fully outside, and masks derived from the drawing are exact. Coordinates are floats in
whatever unit the caller chose (the sprites use "character heights"); `u` grows to the right and
`v` grows downwards, like image rows.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

Point = tuple[float, float]


def pixel_grid(height: int, width: int, origin_x: float, origin_y: float, unit: float):
    """(u, v) of every pixel centre, with (origin_x, origin_y) in pixels mapped to (0, 0)."""
    xs = (np.arange(width, dtype=np.float64) + 0.5 - origin_x) / unit
    ys = (np.arange(height, dtype=np.float64) + 0.5 - origin_y) / unit
    return np.meshgrid(xs, ys)


def ellipse(u, v, center: Point, radii: tuple[float, float]):
    cu, cv = center
    ru, rv = radii
    return ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 <= 1.0


def circle(u, v, center: Point, radius: float):
    return ellipse(u, v, center, (radius, radius))


def rect(u, v, u0: float, v0: float, u1: float, v1: float):
    return (u >= u0) & (u < u1) & (v >= v0) & (v < v1)


def rounded_rect(u, v, u0: float, v0: float, u1: float, v1: float, radius: float):
    """A rectangle whose corners are quarter circles of `radius`."""
    inner_u = np.clip(u, u0 + radius, u1 - radius)
    inner_v = np.clip(v, v0 + radius, v1 - radius)
    return rect(u, v, u0, v0, u1, v1) & ((u - inner_u) ** 2 + (v - inner_v) ** 2 <= radius**2)


def capsule(u, v, start: Point, end: Point, radius: float):
    """All points within `radius` of the segment start-end: a limb with round ends."""
    su, sv = start
    du, dv = end[0] - su, end[1] - sv
    length2 = du * du + dv * dv
    t = np.clip(((u - su) * du + (v - sv) * dv) / max(length2, 1e-12), 0.0, 1.0)
    return (u - (su + t * du)) ** 2 + (v - (sv + t * dv)) ** 2 <= radius**2


def polygon(u, v, points: Sequence[Point]):
    """Even-odd point-in-polygon test, vectorised over the pixels."""
    inside = np.zeros(np.shape(u), dtype=bool)
    count = len(points)
    for i in range(count):
        (u0, v0), (u1, v1) = points[i], points[(i + 1) % count]
        if v0 == v1:
            continue
        crosses = (v0 > v) != (v1 > v)
        u_at = u0 + (v - v0) * (u1 - u0) / (v1 - v0)
        inside ^= crosses & (u < u_at)
    return inside


def dilate(mask: np.ndarray) -> np.ndarray:
    """Grow a mask by one pixel in the 4 directions (used for the 1-pixel outline)."""
    from scipy import ndimage

    return ndimage.binary_dilation(mask)  # the default structure is the 4-neighbour cross


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) with exclusive x1, y1; (0, 0, 0, 0) for an empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return (0, 0, 0, 0)
    return (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
