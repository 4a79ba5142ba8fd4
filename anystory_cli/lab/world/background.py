"""Scene backgrounds: sky by time of day, ground by place, a few flat props.

Everything is drawn in "scene heights" (v = 0 at the top row, 1 at the bottom; u = 0 at the left
edge, W/H at the right edge), so a layout rendered at 64 and at 128 pixels is the same picture.
The land (ground and props) is drawn in daylight colours and then shaded for sunset or night, so
that the time of day reads from the whole picture, not only from the sky; characters are never
shaded (their colours are their identity).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import raster
from .rng import WorldRng

PLACES: tuple[str, ...] = ("grass", "hill", "forest", "beach", "snow")
TIMES: tuple[str, ...] = ("day", "sunset", "night")
PROPS: tuple[str, ...] = ("none", "house", "tree", "rock")

SKY_BANDS = {
    "day": ((118, 178, 240), (152, 200, 246)),
    "sunset": ((104, 76, 150), (214, 110, 128), (247, 168, 96)),
    "night": ((14, 18, 50), (30, 36, 84)),
}
GROUND_RGB = {
    "grass": (122, 168, 82),
    "hill": (122, 168, 82),
    "forest": (98, 142, 70),
    "beach": (236, 212, 150),
    "snow": (232, 238, 246),
}
HILL_RGB = (150, 198, 100)
SEA_RGB = (60, 140, 210)
SNOW_HILL_RGB = (214, 224, 240)
TREE_CROWN_RGB = (46, 122, 66)
TREE_TRUNK_RGB = (112, 72, 44)
HOUSE_WALL_RGB = (226, 200, 156)
HOUSE_ROOF_RGB = (170, 62, 52)
HOUSE_DOOR_RGB = (104, 66, 42)
WINDOW_DAY_RGB = (172, 212, 240)
WINDOW_NIGHT_RGB = (252, 222, 118)
ROCK_RGB = (172, 170, 184)
SUN_RGB = (255, 228, 92)
SUNSET_SUN_RGB = (250, 114, 60)
MOON_RGB = (236, 236, 204)
STAR_RGB = (230, 230, 250)
CLOUD_RGB = {"day": (248, 248, 252), "sunset": (250, 204, 196)}


@dataclass(frozen=True)
class Setting:
    """What a background shows, in scene-height units; drawn by `draw_background`."""

    place: str
    time: str
    prop: str
    horizon: float  # v of the horizon
    sky_object_u: float  # where the sun or moon is
    clouds: tuple[tuple[float, float, float], ...]  # (u, v, size)
    trees: tuple[tuple[float, float, float], ...]  # (u, base v, height) of forest trees, back to front
    hill: tuple[float, float, float]  # (centre u, half width, height) of the hill (hill place only)
    prop_u: float
    prop_size: float
    stars: tuple[tuple[float, float], ...]


def sample_setting(rng: WorldRng, aspect: float) -> Setting:
    """Draw a setting; `aspect` = width / height of the scene."""
    place = rng.choice(PLACES)
    time = rng.choice(TIMES)
    prop = rng.choice([p for p in PROPS if not (place == "forest" and p == "tree")])
    horizon = rng.uniform(0.42, 0.5)
    clouds = tuple(
        (rng.uniform(0.05, 0.95) * aspect, rng.uniform(0.08, 0.22), rng.uniform(0.05, 0.08))
        for _ in range(rng.integer(3))
    )
    trees = tuple(
        (rng.uniform(0.0, 1.0) * aspect, horizon + rng.uniform(0.0, 0.05), rng.uniform(0.22, 0.32))
        for _ in range(4 + rng.integer(3))
    )
    trees = tuple(sorted(trees, key=lambda t: t[1]))
    hill = (rng.uniform(0.2, 0.8) * aspect, rng.uniform(0.4, 0.6) * aspect, rng.uniform(0.17, 0.24))
    stars = tuple((rng.uniform(0.02, 0.98) * aspect, rng.uniform(0.02, horizon - 0.08)) for _ in range(6))
    return Setting(
        place=place,
        time=time,
        prop=prop,
        horizon=horizon,
        sky_object_u=rng.uniform(0.12, 0.88) * aspect,
        clouds=clouds,
        trees=trees,
        hill=hill,
        prop_u=rng.uniform(0.1, 0.9) * aspect,
        prop_size=rng.uniform(0.9, 1.15),
        stars=stars,
    )


def draw_background(setting: Setting, height: int, width: int) -> np.ndarray:
    """The background as uint8 (height, width, 3)."""
    u, v = raster.pixel_grid(height, width, 0.0, 0.0, float(height))
    sky = _draw_sky(setting, u, v, height)
    land_rgb, land = _draw_land(setting, u, v)
    land_rgb = _shade_for_time(land_rgb, setting.time)
    if setting.time == "night" and setting.prop == "house":
        # Lit windows stay bright at night: drawn after the shading.
        land_rgb[_house_window(setting, u, v)] = WINDOW_NIGHT_RGB
    return np.where(land[..., None], land_rgb, sky).astype(np.uint8)


def _draw_sky(setting: Setting, u, v, height: int) -> np.ndarray:
    bands = SKY_BANDS[setting.time]
    band_index = np.minimum((v / setting.horizon * len(bands)).astype(int), len(bands) - 1)
    sky = np.asarray(bands, dtype=np.uint8)[band_index]
    su = setting.sky_object_u
    if setting.time == "day":
        sky[raster.circle(u, v, (su, 0.13), 0.07)] = SUN_RGB
    elif setting.time == "sunset":
        sky[raster.circle(u, v, (su, setting.horizon), 0.12)] = SUNSET_SUN_RGB
    else:
        for su_star, sv_star in setting.stars:
            row, col = int(sv_star * height), int(su_star * height)
            if 0 <= row < sky.shape[0] and 0 <= col < sky.shape[1]:
                sky[row, col] = STAR_RGB
        moon = raster.circle(u, v, (su, 0.13), 0.07)
        bite = raster.circle(u, v, (su + 0.04, 0.11), 0.06)  # a crescent
        sky[moon & ~bite] = MOON_RGB
    if setting.time != "night":
        for cu, cv, size in setting.clouds:
            cloud = (
                raster.ellipse(u, v, (cu, cv), (size * 1.6, size * 0.7))
                | raster.circle(u, v, (cu - size * 0.5, cv - size * 0.3), size * 0.6)
                | raster.circle(u, v, (cu + size * 0.4, cv - size * 0.4), size * 0.75)
            )
            sky[cloud] = CLOUD_RGB[setting.time]
    return sky


def _draw_land(setting: Setting, u, v) -> tuple[np.ndarray, np.ndarray]:
    """Ground and props in daylight colours, and the mask of where land covers the sky."""
    rgb = np.zeros(u.shape + (3,), dtype=np.uint8)
    land = np.zeros(u.shape, dtype=bool)

    def paint(mask, colour):
        rgb[mask] = colour
        land[mask] = True

    horizon = setting.horizon
    if setting.place in ("hill", "snow"):
        cu, half_width, rise = setting.hill
        colour = HILL_RGB if setting.place == "hill" else SNOW_HILL_RGB
        if setting.place == "snow":
            rise *= 0.6  # a low snow drift, so "hill" stays its own place
        paint(raster.ellipse(u, v, (cu, horizon + 0.02), (half_width, rise + 0.02)), colour)
    paint(v >= horizon, GROUND_RGB[setting.place])
    if setting.place == "beach":
        paint((v >= horizon) & (v < horizon + 0.07), SEA_RGB)
    if setting.place == "forest":
        for tu, tv, tall in setting.trees:
            _paint_tree(paint, u, v, tu, tv, tall)
    _paint_prop(setting, paint, u, v)
    return rgb, land


def _paint_tree(paint, u, v, base_u: float, base_v: float, tall: float) -> None:
    trunk_half = max(tall * 0.09, 0.025)
    paint(raster.rect(u, v, base_u - trunk_half, base_v - tall * 0.45, base_u + trunk_half, base_v), TREE_TRUNK_RGB)
    paint(raster.circle(u, v, (base_u, base_v - tall * 0.68), tall * 0.32), TREE_CROWN_RGB)


def _house_box(setting: Setting) -> tuple[float, float, float, float]:
    size = 0.22 * setting.prop_size
    base_v = setting.horizon + 0.03
    return setting.prop_u - size / 2, base_v - size * 0.75, setting.prop_u + size / 2, base_v


def _house_window(setting: Setting, u, v):
    u0, v0, u1, v1 = _house_box(setting)
    w = u1 - u0
    return raster.rect(u, v, u0 + w * 0.56, v0 + w * 0.16, u0 + w * 0.84, v0 + w * 0.38)


def prop_mask(setting: Setting, height: int, width: int) -> np.ndarray:
    """Where the setting's prop is drawn (all False without a prop)."""
    u, v = raster.pixel_grid(height, width, 0.0, 0.0, float(height))
    mask = np.zeros(u.shape, dtype=bool)

    def paint(part, colour):
        mask[part] = True

    _paint_prop(setting, paint, u, v)
    return mask


def _paint_prop(setting: Setting, paint, u, v) -> None:
    if setting.prop == "house":
        u0, v0, u1, v1 = _house_box(setting)
        w = u1 - u0
        paint(raster.rect(u, v, u0, v0, u1, v1), HOUSE_WALL_RGB)
        roof = [(u0 - w * 0.12, v0), (u1 + w * 0.12, v0), ((u0 + u1) / 2, v0 - w * 0.5)]
        paint(raster.polygon(u, v, roof), HOUSE_ROOF_RGB)
        paint(raster.rect(u, v, u0 + w * 0.16, v1 - w * 0.42, u0 + w * 0.4, v1), HOUSE_DOOR_RGB)
        paint(_house_window(setting, u, v), WINDOW_DAY_RGB)
    elif setting.prop == "tree":
        _paint_tree(paint, u, v, setting.prop_u, setting.horizon + 0.03, 0.36 * setting.prop_size)
    elif setting.prop == "rock":
        size = 0.09 * setting.prop_size
        centre = (setting.prop_u, setting.horizon + 0.06)
        paint(raster.ellipse(u, v, centre, (size * 1.4, size)) & (v < centre[1] + size * 0.3), ROCK_RGB)


def _shade_for_time(rgb: np.ndarray, time: str) -> np.ndarray:
    if time == "day":
        return rgb
    values = rgb.astype(np.float32)
    if time == "sunset":
        values = values * np.array([0.95, 0.78, 0.7], dtype=np.float32) + np.array([12, 0, 0], dtype=np.float32)
    else:
        values = values * np.array([0.48, 0.52, 0.62], dtype=np.float32) + np.array([6, 8, 24], dtype=np.float32)
    return np.clip(np.round(values), 0, 255).astype(np.uint8)


def shadow_mask(u, v, centre_u: float, ground_v: float, half_width: float):
    """The flat shadow under a character's feet (scene-height units)."""
    return raster.ellipse(u, v, (centre_u, ground_v), (half_width, max(half_width * 0.22, 0.012)))
