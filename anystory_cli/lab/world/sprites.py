"""Drawing one character: crisp pixels, flat colours, an exact alpha mask.

A character is drawn in "body units": 1.0 is the height from the top of the body to the soles of
the feet, `u` = 0 is its vertical axis. Accessories stick out above (v < 0). Each part is a
boolean test of pixel centres (see raster.py), painted back to front; the alpha is the union of
the parts plus a 1-pixel dark outline, so the mask is exactly the drawn footprint.

Sizes are chosen for 64x64 scenes seen through a small VAE: a typical character's body is 22-38
pixels tall, stripes, checks and dots are at least 3 pixels wide, limbs about 3-4 pixels thick.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from . import raster
from .identity import ACCESSORIES, COLOURS_RGB, EYES, PATTERNS, SILHOUETTES, Identity, identity_from_seed

POSES: tuple[str, ...] = ("standing", "jumping", "waving")

OUTLINE_RGB = (34, 30, 46)
INK_RGB = (30, 28, 40)  # pupils, mouth, hat band, antenna stalk
EYE_WHITE_RGB = (255, 255, 255)
VISOR_RGB = (46, 48, 84)
VISOR_SHINE_RGB = (150, 222, 255)

BUILD_HALF_WIDTH = (0.26, 0.33, 0.41)  # slim, regular, wide, in body units
BODY_BOTTOM = 0.90  # the body ends here; the feet fill 0.85 .. 1.0
JUMP_LIFT = 0.16  # how far a jumping character floats above its ground line, in body units

# Stripe / check width and dot radius per pattern scale, in body units; never under MIN_PATTERN_PX.
STRIPE_WIDTH = (0.14, 0.21)
DOT_RADIUS = (0.085, 0.12)
MIN_PATTERN_PX = 3


@dataclass(frozen=True)
class Sprite:
    """A drawn character, cropped to its footprint.

    `rgba` is uint8 (h, w, 4) with alpha exactly 0 or 255. The character stands on the pixel
    boundary (`foot_x`, `foot_y`): the feet touch row `foot_y - 1`, centred on the column boundary
    `foot_x`. A jumping sprite's feet are `lift` pixels above that ground point.
    """

    rgba: np.ndarray
    foot_x: int
    foot_y: int
    lift: int

    @property
    def mask(self) -> np.ndarray:
        return self.rgba[..., 3] > 0

    @property
    def height(self) -> int:
        return self.rgba.shape[0]

    @property
    def width(self) -> int:
        return self.rgba.shape[1]


@dataclass(frozen=True)
class _BodyPlan:
    """Where the parts of one silhouette go (body units)."""

    top: float  # top of the body on the axis (where hats sit)
    eye: float
    shoulder: float
    neck: float  # where a scarf goes


_PLANS = {
    "blob": _BodyPlan(top=0.06, eye=0.34, shoulder=0.55, neck=0.58),
    "pear": _BodyPlan(top=0.05, eye=0.27, shoulder=0.60, neck=0.50),
    "box": _BodyPlan(top=0.06, eye=0.30, shoulder=0.52, neck=0.55),
    "eared": _BodyPlan(top=0.16, eye=0.44, shoulder=0.62, neck=0.66),
    "cone": _BodyPlan(top=0.0, eye=0.55, shoulder=0.66, neck=0.74),
    "ghost": _BodyPlan(top=0.06, eye=0.36, shoulder=0.55, neck=0.60),
}


def _body_mask(silhouette: str, half_width: float, u, v):
    """The body (with ears), without limbs, eyes or accessories."""
    hw = half_width
    if silhouette == "blob":
        return raster.ellipse(u, v, (0.0, 0.48), (hw * 1.15, 0.42))
    if silhouette == "pear":
        head = raster.ellipse(u, v, (0.0, 0.28), (hw * 0.74, 0.23))
        belly = raster.ellipse(u, v, (0.0, 0.62), (hw * 1.12, 0.28))
        return head | belly
    if silhouette == "box":
        return raster.rounded_rect(u, v, -hw, 0.06, hw, BODY_BOTTOM, 0.07)
    if silhouette == "eared":
        head = raster.ellipse(u, v, (0.0, 0.53), (hw * 1.05, 0.37))
        return head | _ear_mask(hw, u, v, scale=1.0)
    if silhouette == "cone":
        return raster.polygon(u, v, [(0.0, 0.0), (hw * 1.3, BODY_BOTTOM), (-hw * 1.3, BODY_BOTTOM)])
    if silhouette == "ghost":
        dome = raster.circle(u, v, (0.0, 0.06 + hw), hw)
        # Three teeth along the hem: a triangle wave of the distance to the nearest tooth tip.
        tooth = 2.0 * hw / 3.0
        phase = np.abs(((u + hw) / tooth) % 1.0 - 0.5) * 2.0  # 1 at tooth edges, 0 at tips
        hem = BODY_BOTTOM - 0.08 * phase
        return dome | ((np.abs(u) <= hw) & (v >= 0.06 + hw) & (v < hem))
    raise ValueError(f"unknown silhouette {silhouette!r}")


def _ear_mask(hw: float, u, v, scale: float):
    """Two cat ears; `scale` < 1 gives the inner ears (drawn in the secondary colour)."""
    ears = np.zeros(np.shape(u), dtype=bool)
    for side in (-1.0, 1.0):
        inner, outer, apex_u = side * hw * 0.12, side * hw * 1.0, side * hw * 0.78
        points = [(inner, 0.30), (outer, 0.40), (apex_u, 0.0)]
        if scale != 1.0:
            cu = sum(p[0] for p in points) / 3
            cv = sum(p[1] for p in points) / 3
            points = [(cu + (pu - cu) * scale, cv + (pv - cv) * scale) for pu, pv in points]
        ears |= raster.polygon(u, v, points)
    return ears


@lru_cache(maxsize=256)
def _half_width_at(silhouette: str, build: int, v: float) -> float:
    """How far the body reaches sideways at height v (sampled finely, body units)."""
    us = np.linspace(0.0, 1.0, 401)
    inside = _body_mask(silhouette, BUILD_HALF_WIDTH[build], us, np.full_like(us, v))
    return float(us[inside].max()) if inside.any() else 0.0


def _crown_v(silhouette: str, build: int, top: float) -> float:
    """The highest point where the head is wide enough (0.12) to carry horns, a hat or a bow."""
    for v in np.arange(top, BODY_BOTTOM, 0.01):
        if _half_width_at(silhouette, build, round(float(v), 2)) >= 0.12:
            return float(v)
    return top


class _Painter:
    """Paints parts back to front onto an RGB canvas and keeps the union as the footprint."""

    def __init__(self, height: int, width: int) -> None:
        self.rgb = np.zeros((height, width, 3), dtype=np.uint8)
        self.footprint = np.zeros((height, width), dtype=bool)

    def paint(self, mask: np.ndarray, colour, *, extend: bool = True) -> None:
        """Paint `mask`; `extend=False` paints only where something is already drawn."""
        if not extend:
            mask = mask & self.footprint
        self.rgb[mask] = colour
        self.footprint |= mask


def draw_character(identity: Identity | int, scale: int, pose: str = "standing", flip: bool = False) -> Sprite:
    """Draw `identity` (or an identity seed) with a body `scale` pixels tall.

    `flip` mirrors the character so that it faces left (its pupils look right by default and the
    waving arm is on its right).
    """
    if isinstance(identity, (int, np.integer)):
        identity = identity_from_seed(int(identity))
    if pose not in POSES:
        raise ValueError(f"pose must be one of {POSES}, got {pose!r}")
    if scale < 8:
        raise ValueError(f"a character needs at least 8 pixels of body height, got {scale}")
    rgba, foot_x, foot_y = _draw_cached(identity, int(scale), pose)
    if flip:
        rgba = rgba[:, ::-1]
        foot_x = rgba.shape[1] - foot_x
    lift = int(round(JUMP_LIFT * scale)) if pose == "jumping" else 0
    return Sprite(rgba=np.ascontiguousarray(rgba), foot_x=foot_x, foot_y=foot_y, lift=lift)


@lru_cache(maxsize=512)  # a few MB; sprites repeat within a scene's retries and in tests
def _draw_cached(identity: Identity, scale: int, pose: str) -> tuple[np.ndarray, int, int]:
    # Room for accessories above the body (0.4) and arms reaching sideways (0.85 each side).
    width = 2 * int(np.ceil(0.85 * scale)) + 4
    origin_x = width / 2  # a pixel boundary: the drawing is exactly mirror-symmetric
    origin_y = int(np.ceil(0.4 * scale)) + 2
    height = origin_y + scale + 2
    u, v = raster.pixel_grid(height, width, origin_x, origin_y, float(scale))
    painter = _Painter(height, width)
    _paint_character(painter, identity, pose, u, v, scale)
    rgba = _outlined_rgba(painter)
    x0, y0, x1, y1 = raster.bounding_box(rgba[..., 3] > 0)
    cropped = rgba[y0:y1, x0:x1].copy()
    cropped.setflags(write=False)  # shared by the cache
    return cropped, int(origin_x) - x0, origin_y + scale - y0


def _outlined_rgba(painter: _Painter) -> np.ndarray:
    ring = raster.dilate(painter.footprint) & ~painter.footprint
    rgba = np.zeros(painter.rgb.shape[:2] + (4,), dtype=np.uint8)
    rgba[..., :3] = painter.rgb
    rgba[ring, :3] = OUTLINE_RGB
    rgba[..., 3] = np.where(painter.footprint | ring, 255, 0)
    return rgba


def _paint_character(painter: _Painter, identity: Identity, pose: str, u, v, scale: int) -> None:
    silhouette = SILHOUETTES[identity.silhouette]
    plan = _PLANS[silhouette]
    hw = BUILD_HALF_WIDTH[identity.build]
    body_rgb = COLOURS_RGB[identity.body_colour]
    limb_rgb = COLOURS_RGB[identity.secondary_colour]

    _paint_feet(painter, u, v, hw, pose, limb_rgb)
    body = _body_mask(silhouette, hw, u, v)
    painter.paint(body, body_rgb)
    patterned = body
    if silhouette == "eared":
        painter.paint(_ear_mask(hw, u, v, scale=0.5), limb_rgb)
        patterned = body & ~_ear_mask(hw, u, v, scale=1.0)  # inner ears keep their colour
    _paint_pattern(painter, identity, patterned, u, v, plan, scale)
    _paint_face(painter, identity, u, v, plan)
    _paint_arms(painter, identity, u, v, plan, pose, limb_rgb)
    _paint_accessory(painter, identity, body, u, v, plan, scale)


def _paint_feet(painter: _Painter, u, v, hw: float, pose: str, rgb) -> None:
    spread = max(0.1, min(hw * 0.6, 0.22)) + (0.05 if pose == "jumping" else 0.0)
    for side in (-1.0, 1.0):
        painter.paint(raster.ellipse(u, v, (side * spread, 0.925), (0.11, 0.075)), rgb)


def _paint_arms(painter: _Painter, identity: Identity, u, v, plan: _BodyPlan, pose: str, rgb) -> None:
    silhouette = SILHOUETTES[identity.silhouette]
    reach = _half_width_at(silhouette, identity.build, plan.shoulder) - 0.03
    for side in (-1.0, 1.0):
        raised = pose == "jumping" or (pose == "waving" and side > 0)
        if raised:
            hand = (side * (reach + 0.17), plan.shoulder - 0.26)
        else:
            hand = (side * (reach + 0.09), plan.shoulder + 0.19)
        painter.paint(raster.capsule(u, v, (side * reach, plan.shoulder), hand, 0.065), rgb)


def _paint_pattern(painter: _Painter, identity: Identity, body, u, v, plan: _BodyPlan, scale: int) -> None:
    pattern = PATTERNS[identity.pattern]
    if pattern == "none":
        return
    size = identity.pattern_scale
    colour = COLOURS_RGB[identity.pattern_colour]
    # Work in whole pixels so that every stripe has the same width.
    px_u, px_v = u * scale, (v - plan.top) * scale
    stripe = max(MIN_PATTERN_PX, int(round(STRIPE_WIDTH[size] * scale)))
    if pattern == "hstripes":
        marks = np.floor(px_v / stripe) % 2 == 1
    elif pattern == "vstripes":
        marks = np.floor(px_u / stripe + 0.5) % 2 == 0
    elif pattern == "checks":
        marks = (np.floor(px_u / stripe + 0.5) + np.floor(px_v / stripe)) % 2 == 0
    elif pattern == "dots":
        marks = _dots(px_u, px_v, max(1.5, DOT_RADIUS[size] * scale))
    elif pattern == "belly":
        silhouette = SILHOUETTES[identity.silhouette]
        centre_v = (plan.neck + BODY_BOTTOM) / 2 + 0.02
        reach = _half_width_at(silhouette, identity.build, centre_v)
        radii = (reach * 0.55, 0.15) if size == 0 else (reach * 0.8, 0.22)
        marks = raster.ellipse(u, v, (0.0, centre_v), radii)
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    painter.paint(body & marks, colour)


def _dots(px_u, px_v, radius: float):
    """Dots on a staggered grid (rows shifted by half a step), in pixel units."""
    step = 2.9 * radius
    row = np.floor(px_v / step)
    centre_v = (row + 0.5) * step
    shift = (row % 2) * step / 2
    centre_u = np.round((px_u - shift) / step) * step + shift
    return (px_u - centre_u) ** 2 + (px_v - centre_v) ** 2 <= radius**2


def _paint_face(painter: _Painter, identity: Identity, u, v, plan: _BodyPlan) -> None:
    eyes = EYES[identity.eyes]
    silhouette = SILHOUETTES[identity.silhouette]
    reach = _half_width_at(silhouette, identity.build, plan.eye)
    gap = min(0.13, reach * 0.5)
    look = 0.025  # pupils look to the character's right: flipping shows which way it faces
    if eyes == "pair":
        for side in (-1.0, 1.0):
            painter.paint(raster.circle(u, v, (side * gap, plan.eye), 0.09), EYE_WHITE_RGB)
            painter.paint(raster.circle(u, v, (side * gap + look, plan.eye), 0.05), INK_RGB)
    elif eyes == "cyclops":
        painter.paint(raster.circle(u, v, (0.0, plan.eye), 0.14), EYE_WHITE_RGB)
        painter.paint(raster.circle(u, v, (look * 1.5, plan.eye), 0.07), INK_RGB)
    elif eyes == "sleepy":
        # Half-closed: the lower half of each eye under a heavy lid.
        for side in (-1.0, 1.0):
            lower = raster.ellipse(u, v, (side * gap, plan.eye), (0.09, 0.07)) & (v >= plan.eye)
            painter.paint(lower, EYE_WHITE_RGB)
            painter.paint(raster.rect(u, v, side * gap - 0.1, plan.eye - 0.04, side * gap + 0.1, plan.eye + 0.01), INK_RGB)
    elif eyes == "visor":
        span = max(0.12, reach * 0.85)
        painter.paint(raster.rounded_rect(u, v, -span, plan.eye - 0.075, span, plan.eye + 0.075, 0.04), VISOR_RGB)
        painter.paint(raster.rect(u, v, span * 0.2, plan.eye - 0.045, span * 0.2 + 0.12, plan.eye), VISOR_SHINE_RGB)
    else:
        raise ValueError(f"unknown eye style {eyes!r}")
    mouth_v = plan.eye + 0.15
    painter.paint(raster.ellipse(u, v, (0.0, mouth_v), (0.055, 0.03)) & (v >= mouth_v), INK_RGB, extend=False)


def _paint_accessory(painter: _Painter, identity: Identity, body, u, v, plan: _BodyPlan, scale: int) -> None:
    accessory = ACCESSORIES[identity.accessory]
    if accessory == "none":
        return
    rgb = COLOURS_RGB[identity.accessory_colour]
    silhouette = SILHOUETTES[identity.silhouette]
    crown = _crown_v(silhouette, identity.build, plan.top)
    if accessory == "hat":
        painter.paint(raster.rect(u, v, -0.14, crown - 0.27, 0.14, crown - 0.03), rgb)
        painter.paint(raster.rect(u, v, -0.14, crown - 0.1, 0.14, crown - 0.03), INK_RGB)
        painter.paint(raster.rect(u, v, -0.23, crown - 0.04, 0.23, crown + 0.03), rgb)
    elif accessory == "bow":
        for side in (-1.0, 1.0):
            lobe = [(side * 0.03, crown - 0.04), (side * 0.2, crown - 0.14), (side * 0.2, crown + 0.06)]
            painter.paint(raster.polygon(u, v, lobe), rgb)
        painter.paint(raster.circle(u, v, (0.0, crown - 0.04), 0.05), _darker(rgb))
    elif accessory == "horns":
        for side in (-1.0, 1.0):
            horn = [(side * 0.05, crown + 0.05), (side * 0.19, crown + 0.05), (side * 0.2, crown - 0.22)]
            painter.paint(raster.polygon(u, v, horn), rgb)
    elif accessory == "antenna":
        stalk_width = max(0.025, 0.6 / scale)  # at least about one pixel
        painter.paint(raster.capsule(u, v, (0.0, plan.top + 0.03), (0.07, plan.top - 0.2), stalk_width), INK_RGB)
        painter.paint(raster.circle(u, v, (0.07, plan.top - 0.22), 0.08), rgb)
    elif accessory == "scarf":
        _paint_scarf(painter, body, u, v, plan, rgb)
    else:
        raise ValueError(f"unknown accessory {accessory!r}")


def _paint_scarf(painter: _Painter, body, u, v, plan: _BodyPlan, rgb) -> None:
    """A band around the body at neck height, a pixel wider than it, with a hanging end."""
    band_rows = (v >= plan.neck - 0.06) & (v < plan.neck + 0.06)
    cols = np.arange(body.shape[1])
    band = np.zeros_like(body)
    for row in np.flatnonzero(band_rows.any(axis=1)):
        inside = cols[body[row]]
        if inside.size:
            band[row, max(inside[0] - 1, 0) : inside[-1] + 2] = True
    painter.paint(band & band_rows, rgb)
    painter.paint(raster.rect(u, v, 0.05, plan.neck, 0.17, plan.neck + 0.25), rgb)


def _darker(rgb) -> tuple[int, int, int]:
    return tuple(int(c * 0.65) for c in rgb)
