"""Page geometry and lettering: where each panel goes on a page, how a panel image fills its
frame, and where captions and speech balloons go. PIL and numpy only (no torch).

Geometry functions are pure and return exact integer rectangles ``(x0, y0, x1, y1)`` with the
end exclusive, as PIL's boxes are.

Lettering uses the fonts of `page.font` (default: the Luckiest Guy font from the
`fontpkg-luckiest-guy` package) followed by installed fallback fonts, each character from the
first font that has it (`fonts.FontChain`); wrapping and fitting measure with the same fonts.
Text with a character no font has raises `FontError` naming the characters: a silent box in a
balloon is worse than a clear error. `undrawable_characters()` lets a caller check a whole
story before rendering.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from anystory_cli.errors import FontError, InputError
from anystory_cli.fonts import (
    ChainFont,
    FontChain,
    base_direction,
    default_font_path,
    font_chain,
    is_cjk,
    normalise_spec,
)

Rect = tuple[int, int, int, int]
Box = tuple[float, float, float, float]
Point = tuple[float, float]

PAGE_SIZES_MM: dict[str, tuple[float, float]] = {
    "A4": (210.0, 297.0),
    "A5": (148.0, 210.0),
    "Letter": (215.9, 279.4),
    "B5": (176.0, 250.0),
    "square": (210.0, 210.0),
}

# Named page templates: panels per row, top to bottom.
LAYOUT_TEMPLATES: dict[str, tuple[int, ...]] = {
    "splash": (1,),
    "strip-2": (1, 1),
    "strip-3": (1, 1, 1),
    "grid-4": (2, 2),
    "grid-6": (2, 2, 2),
    "grid-9": (3, 3, 3),
    "top-wide": (1, 2),
    "bottom-wide": (2, 1),
    "classic": (2, 1, 2),
}

# Named character placements, as boxes in 0..1 of the panel image. Characters stand: the top
# fifth is left as sky, which is where balloons go when no routing maps are known.
CHARACTER_TOP = 0.2
PLACEMENT_BOXES: dict[str, Box] = {
    "left": (0.0, CHARACTER_TOP, 0.5, 1.0),
    "right": (0.5, CHARACTER_TOP, 1.0, 1.0),
    "center": (0.25, CHARACTER_TOP, 0.75, 1.0),
}

# A panel image at least this many times smaller than its frame is pixel art from the small
# default model: upscale it with NEAREST so it stays crisp instead of blurring.
NEAREST_UPSCALE_FACTOR = 2.0
MIN_PANEL_PX = 16
# Balloon placement costs (see place_balloon); the character mass covered counts as a
# fraction in 0..1, so e.g. covering 3 % of it weighs as much as sitting at the panel's bottom.
COVER_SPEAKER_WEIGHT = 0.3
READING_ORDER_WEIGHT = 0.1
TOP_WEIGHT = 0.03
DISTANCE_WEIGHT = 0.02
BLACK = (0, 0, 0)
WHITE = (255, 255, 255)
CAPTION_FILL = (255, 244, 189)
EMPTY_PANEL_FILL = (235, 235, 235)


def mm_to_px(mm: float, dpi: int) -> int:
    return int(round(mm / 25.4 * dpi))


# --------------------------------------------------------------------------------------------
# Page geometry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PageSpec:
    """One page: its size in px, panels per row (top to bottom), spacing in px."""

    width: int
    height: int
    rows: tuple[int, ...]
    margin: int = 0
    gutter: int = 0
    border: int = 0
    reading_order: str = "ltr"
    background: tuple[int, int, int] = WHITE
    font: tuple[str, ...] | None = None  # page.font: files and family names (None: comic font)

    @property
    def panel_count(self) -> int:
        return sum(self.rows)

    @classmethod
    def from_settings(cls, settings: Any, rows: Sequence[int]) -> PageSpec:
        """From a story's `PageSettings` (lengths in mm) and the rows of one page."""
        width, height = settings.size_px()
        dpi = settings.dpi
        border = mm_to_px(settings.border, dpi)
        if settings.border > 0:
            border = max(1, border)  # a thin border must not vanish at low dpi
        return cls(
            width=width,
            height=height,
            rows=tuple(rows),
            margin=mm_to_px(settings.margin, dpi),
            gutter=mm_to_px(settings.gutter, dpi),
            border=border,
            reading_order=settings.reading_order,
            font=normalise_spec(settings.font) or None,
        )


def page_size_px(size: str, dpi: int, landscape: bool = False) -> tuple[int, int]:
    """(width, height) in px of a named page size."""
    w_mm, h_mm = PAGE_SIZES_MM[size]
    width, height = mm_to_px(w_mm, dpi), mm_to_px(h_mm, dpi)
    return (max(width, height), min(width, height)) if landscape else (width, height)


def split_span(start: int, length: int, parts: int, gutter: int) -> list[tuple[int, int]]:
    """Cut [start, start+length) into `parts` cells separated by `gutter` px.

    Cell sizes differ by at most one pixel; the first cells take the leftover pixels, so the
    cells exactly fill the span.
    """
    if parts < 1:
        raise ValueError("parts must be >= 1")
    usable = length - gutter * (parts - 1)
    if usable < parts * MIN_PANEL_PX:
        raise InputError(
            f"no room for {parts} panels of at least {MIN_PANEL_PX} px in {length} px with "
            f"{gutter} px gutters; use a bigger page, smaller margins/gutter or fewer panels"
        )
    base, extra = divmod(usable, parts)
    cells = []
    position = start
    for index in range(parts):
        size = base + (1 if index < extra else 0)
        cells.append((position, position + size))
        position += size + gutter
    return cells


def panel_rects(spec: PageSpec) -> list[Rect]:
    """Panel frames in reading order: rows top to bottom, each row left to right (ltr) or
    right to left (rtl, mirrored exactly around the page centre)."""
    if not spec.rows:
        return []
    inner_w = spec.width - 2 * spec.margin
    inner_h = spec.height - 2 * spec.margin
    rects: list[Rect] = []
    for (y0, y1), count in zip(
        split_span(spec.margin, inner_h, len(spec.rows), spec.gutter), spec.rows
    ):
        row = [(x0, y0, x1, y1) for x0, x1 in split_span(spec.margin, inner_w, count, spec.gutter)]
        if spec.reading_order == "rtl":
            row = [(spec.width - x1, y0, spec.width - x0, y1) for x0, y0, x1, y1 in row]
        rects.extend(row)
    return rects


# --------------------------------------------------------------------------------------------
# Fitting a panel image into its frame
# --------------------------------------------------------------------------------------------


def cover_window(src_size: tuple[int, int], dst_size: tuple[int, int]) -> Box:
    """The part of the source image (in source px) that fills dst exactly, centred: the image
    is scaled to cover the frame and the overflow is cropped equally on both sides."""
    src_w, src_h = src_size
    dst_w, dst_h = dst_size
    scale = max(dst_w / src_w, dst_h / src_h)
    crop_w, crop_h = dst_w / scale, dst_h / scale
    x0, y0 = (src_w - crop_w) / 2, (src_h - crop_h) / 2
    return (x0, y0, x0 + crop_w, y0 + crop_h)


def fit_cover(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale and centre-crop `image` to exactly `size`; NEAREST when much enlarged."""
    scale = max(size[0] / image.width, size[1] / image.height)
    crisp = scale >= NEAREST_UPSCALE_FACTOR
    resample = Image.Resampling.NEAREST if crisp else Image.Resampling.LANCZOS
    return image.convert("RGB").resize(size, resample, box=cover_window(image.size, size))


def _normalized_window(src_size: tuple[int, int] | None, dst_size: tuple[int, int]) -> Box:
    """cover_window in 0..1 of the source; the identity when the source size is unknown."""
    if src_size is None:
        return (0.0, 0.0, 1.0, 1.0)
    x0, y0, x1, y1 = cover_window(src_size, dst_size)
    return (x0 / src_size[0], y0 / src_size[1], x1 / src_size[0], y1 / src_size[1])


# --------------------------------------------------------------------------------------------
# Fonts and text
# --------------------------------------------------------------------------------------------


FontSpec = Union[str, Path, Sequence[str], FontChain, None]  # a page.font value, or a chain


def _chain(font: FontSpec) -> FontChain:
    return font if isinstance(font, FontChain) else font_chain(font)


@lru_cache(maxsize=64)
def load_font(font_path: str | None, size: int) -> ImageFont.FreeTypeFont:
    """One font file at one size (None: the packaged comic font)."""
    path = font_path or str(default_font_path())
    try:
        return ImageFont.truetype(path, size)
    except OSError as exc:
        raise FontError(f"cannot load font {path}: {exc}") from None


def undrawable_characters(text: str, font: FontSpec = None, fallbacks: bool = True) -> list[str]:
    """Characters of `text` no lettering font has a glyph for, in order, once each. `font` is a
    page.font value (None: the comic font); `fallbacks` adds the installed fallback fonts."""
    chain = font if isinstance(font, FontChain) else font_chain(font, fallbacks)
    return chain.undrawable(text)


def require_drawable(text: str, font: FontSpec = None) -> None:
    chain = _chain(font)
    missing = chain.undrawable(text)
    if missing:
        raise FontError(f"{chain.describe_missing(missing)} (in {text!r})")


def wrap_text(text: str, font: ImageFont.FreeTypeFont | ChainFont, max_width: float) -> list[str]:
    """Greedy word wrap; explicit newlines are kept; a word wider than the line is cut. Chinese
    and Japanese text may break between any two characters, except before closing punctuation
    (，。！」...) and after opening punctuation (「（“...)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            for number, part in enumerate(_break_pieces(word)):
                for cut, piece in enumerate(_cut_long_word(part, font, max_width)):
                    joiner = " " if number == 0 and cut == 0 else ""
                    candidate = f"{line}{joiner}{piece}" if line else piece
                    if line and font.getlength(candidate) > max_width:
                        lines.append(line)
                        line = piece
                    else:
                        line = candidate
        lines.append(line)
    return lines


_CJK_CLOSING = set("、。，．：；！？）」』】〕〗〙〛〉》ー…‥・〜”’％!),.:;?]}"
                   "\uff01\uff09\uff0c\uff0e\uff1a\uff1b\uff1f\uff3d\uff5d")
_CJK_OPENING = set("「『【〔〖〘〚〈《“‘（([{\uff08\uff3b\uff5b")


def _breaks_anywhere(char: str) -> bool:
    """Chinese and Japanese (Korean, written with spaces, breaks at them)."""
    return is_cjk(char) and not 0xAC00 <= ord(char) <= 0xD7AF


def _break_pieces(word: str) -> list[str]:
    """`word` cut where a line may break inside it: around Chinese and Japanese characters."""
    pieces = [word[:1]]
    for before, char in zip(word, word[1:]):
        if (_breaks_anywhere(before) or _breaks_anywhere(char)) and char not in _CJK_CLOSING \
                and before not in _CJK_OPENING:
            pieces.append(char)
        else:
            pieces[-1] += char
    return pieces


def _cut_long_word(word: str, font: ImageFont.FreeTypeFont | ChainFont,
                   max_width: float) -> list[str]:
    if font.getlength(word) <= max_width:
        return [word]
    pieces, piece = [], ""
    for char in word:
        if piece and font.getlength(piece + char) > max_width:
            pieces.append(piece)
            piece = char
        else:
            piece += char
    return pieces + [piece] if piece else pieces


@dataclass(frozen=True)
class TextBlock:
    lines: tuple[str, ...]
    font_size: int
    width: int
    height: int
    line_height: int
    ascent: int | None = None  # from the top of a line to its baseline (None: the first font's)


def fit_text(
    text: str, font: FontSpec, max_width: int, max_height: int, max_size: int,
    min_size: int = 8,
) -> TextBlock:
    """The largest font size (max_size down to min_size) at which the wrapped text fits; at the
    smallest size, lines that still do not fit are dropped and the last one ends in '...'.
    Measured with the whole font chain (fallback fonts included)."""
    chain = _chain(font)
    require_drawable(text, chain)

    def fits(size: int) -> TextBlock | None:
        block = _measure(text, chain, size, max_width)
        return block if block.width <= max_width and block.height <= max_height else None

    # Bisect for the largest size that fits (a smaller font never needs more room).
    best, low, high = None, min_size, max_size
    while low <= high:
        middle = (low + high) // 2
        block = fits(middle)
        if block is not None:
            best, low = block, middle + 1
        else:
            high = middle - 1
    if best is not None:
        return best
    smallest = _measure(text, chain, min_size, max_width)
    return _truncate(smallest, chain, max_width, max_height)


def _measure(text: str, chain: FontChain, size: int, max_width: int) -> TextBlock:
    font = chain.at(size)
    lines = wrap_text(text, font, max_width)
    ascent, descent = font.getmetrics(text)
    line_height = ascent + descent
    width = max((math.ceil(font.getlength(line)) for line in lines), default=0)
    return TextBlock(tuple(lines), size, width, line_height * len(lines), line_height, ascent)


def _truncate(
    block: TextBlock, chain: FontChain, max_width: int, max_height: int
) -> TextBlock:
    keep = max(1, max_height // block.line_height)
    if keep >= len(block.lines):
        return block
    font = chain.at(block.font_size)
    last = block.lines[keep - 1]
    while last and font.getlength(last + "...") > max_width:
        last = last[:-1]
    lines = (*block.lines[: keep - 1], last.rstrip() + "...")
    width = max(math.ceil(font.getlength(line)) for line in lines)
    return TextBlock(lines, block.font_size, width, block.line_height * keep, block.line_height,
                     block.ascent)


# --------------------------------------------------------------------------------------------
# Lettering plan: captions and balloons (pure geometry, panel coordinates)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PanelText:
    """What is lettered on a panel. `characters` is in routing-map order; `boxes` are their
    placement boxes in 0..1 of the panel image."""

    caption: str | None = None
    dialogue: tuple[tuple[str, str], ...] = ()  # (who, text)
    characters: tuple[str, ...] = ()
    boxes: tuple[Box, ...] = ()

    @classmethod
    def from_plan(cls, plan: Any) -> PanelText:
        """From a `plan.PanelPlan` (anything with caption, dialogue, characters)."""
        return cls(
            caption=plan.caption,
            dialogue=tuple((line.who, line.text) for line in plan.dialogue),
            characters=tuple(c.name for c in plan.characters),
            boxes=tuple(tuple(c.box) for c in plan.characters),
        )


@dataclass(frozen=True)
class CaptionPlan:
    rect: Rect
    text: TextBlock


@dataclass(frozen=True)
class BalloonPlan:
    rect: Rect
    text: TextBlock
    speaker: str
    target: Point | None  # the speaker's centre of mass, panel px; None: no tail
    tail: tuple[Point, Point, Point] | None  # base, tip, base


@dataclass(frozen=True)
class Lettering:
    caption: CaptionPlan | None
    balloons: tuple[BalloonPlan, ...]


class MassField:
    """Character mass over a panel frame, sampled on a grid, with an integral image so that
    the mass under any rectangle costs four lookups."""

    def __init__(self, grid: np.ndarray, panel_size: tuple[int, int]):
        self.grid = grid.astype(np.float64)
        self.panel_size = panel_size
        padded = np.zeros((grid.shape[0] + 1, grid.shape[1] + 1))
        padded[1:, 1:] = self.grid.cumsum(0).cumsum(1)
        self._integral = padded

    def mass(self, rect: Rect) -> float:
        """Mass of the grid cells whose centres lie inside `rect` (panel px)."""
        rows, cols = self.grid.shape
        width, height = self.panel_size
        c0 = max(0, math.ceil(rect[0] / width * cols - 0.5))
        c1 = min(cols, math.ceil(rect[2] / width * cols - 0.5))
        r0 = max(0, math.ceil(rect[1] / height * rows - 0.5))
        r1 = min(rows, math.ceil(rect[3] / height * rows - 0.5))
        if c1 <= c0 or r1 <= r0:
            return 0.0
        s = self._integral
        return float(s[r1, c1] - s[r0, c1] - s[r1, c0] + s[r0, c0])

    @property
    def total(self) -> float:
        return float(self._integral[-1, -1])


def _grid_points(window: Box, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Source-image coordinates (0..1) of the centres of a cells x cells grid over the frame."""
    centres = (np.arange(cells) + 0.5) / cells
    u = window[0] + centres * (window[2] - window[0])
    v = window[1] + centres * (window[3] - window[1])
    return u, v


def mass_from_maps(
    maps: np.ndarray, panel_size: tuple[int, int], window: Box, cells: int = 64
) -> MassField:
    """Character mass (all characters, background excluded) from routing maps (N+1, H, W)."""
    characters = np.asarray(maps, dtype=np.float64)[:-1].sum(axis=0)
    height, width = characters.shape
    u, v = _grid_points(window, cells)
    cols = np.clip((u * width).astype(int), 0, width - 1)
    rows = np.clip((v * height).astype(int), 0, height - 1)
    return MassField(characters[np.ix_(rows, cols)], panel_size)


def mass_from_boxes(
    boxes: Sequence[Box], panel_size: tuple[int, int], window: Box, cells: int = 64
) -> MassField:
    """Character mass approximated by the placement boxes (1 inside each box)."""
    u, v = _grid_points(window, cells)
    grid = np.zeros((cells, cells))
    for x0, y0, x1, y1 in boxes:
        grid += np.outer((v >= y0) & (v < y1), (u >= x0) & (u < x1))
    return MassField(grid, panel_size)


def _to_panel(point: Point, panel_size: tuple[int, int], window: Box) -> Point:
    """A point in 0..1 of the source image -> panel px (clamped to the frame)."""
    a = (point[0] - window[0]) / (window[2] - window[0])
    b = (point[1] - window[1]) / (window[3] - window[1])
    return (min(max(a, 0.0), 1.0) * panel_size[0], min(max(b, 0.0), 1.0) * panel_size[1])


def centre_of_mass(soft_map: np.ndarray) -> Point | None:
    """Weighted centre of a soft map (H, W) in 0..1 coordinates; None if it is empty."""
    weights = np.clip(np.asarray(soft_map, dtype=np.float64), 0.0, None)
    total = weights.sum()
    if total <= 1e-9:
        return None
    height, width = weights.shape
    x = ((np.arange(width) + 0.5) / width * weights.sum(axis=0)).sum() / total
    y = ((np.arange(height) + 0.5) / height * weights.sum(axis=1)).sum() / total
    return (float(x), float(y))


def _speaker_target(
    text: PanelText, who: str, maps: np.ndarray | None, panel_size: tuple[int, int], window: Box
) -> Point | None:
    if who not in text.characters:
        return None
    index = text.characters.index(who)
    centre = None
    if maps is not None and index < len(maps) - 1:
        centre = centre_of_mass(maps[index])
    if centre is None and index < len(text.boxes):
        x0, y0, x1, y1 = text.boxes[index]
        centre = ((x0 + x1) / 2, (y0 + y1) / 2)
    return None if centre is None else _to_panel(centre, panel_size, window)


def _overlap(a: Rect, b: Rect) -> int:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    return max(0, width) * max(0, height)


def _spread(low: int, high: int, count: int) -> list[int]:
    if high <= low:
        return [low]
    return sorted({round(low + (high - low) * i / (count - 1)) for i in range(count)})


def place_balloon(
    panel_size: tuple[int, int],
    balloon_size: tuple[int, int],
    mass: MassField,
    taken: Sequence[Rect] = (),
    inset: int = 4,
    rtl: bool = False,
    target: Point | None = None,
    previous: Rect | None = None,
) -> Rect:
    """The candidate position that covers the least character mass.

    Candidates form a 9 x 7 grid inside the frame, scored by (most important first): overlap
    with the caption or an earlier balloon; the fraction of the characters' mass covered;
    covering the speaker's own centre (`target`); starting above the `previous` balloon
    (balloons are read top to bottom); then a mild pull towards the top of the panel and
    towards the speaker, so tails stay short. Exact ties go to the reading-start side.
    """
    pw, ph = panel_size
    bw = max(1, min(balloon_size[0], pw - 2 * inset))
    bh = max(1, min(balloon_size[1], ph - 2 * inset))
    total = max(mass.total, 1e-9)
    diagonal = math.hypot(pw, ph)
    best: tuple[float, Rect] | None = None
    for y in _spread(inset, ph - bh - inset, 7):
        for x in _spread(inset, pw - bw - inset, 9):
            rect = (x, y, x + bw, y + bh)
            score = 10.0 * sum(_overlap(rect, other) for other in taken) / (bw * bh)
            score += mass.mass(rect) / total
            score += TOP_WEIGHT * y / ph
            if previous is not None and y < previous[1]:
                score += READING_ORDER_WEIGHT
            if target is not None:
                if x <= target[0] <= x + bw and y <= target[1] <= y + bh:
                    score += COVER_SPEAKER_WEIGHT
                centre = (x + bw / 2, y + bh / 2)
                score += DISTANCE_WEIGHT * math.dist(centre, target) / diagonal
            start_side = (pw - bw - x) if rtl else x
            score += 1e-4 * start_side / pw
            if best is None or score < best[0]:
                best = (score, rect)
    assert best is not None
    return best[1]


def balloon_tail(
    rect: Rect, target: Point, panel_size: tuple[int, int]
) -> tuple[Point, Point, Point]:
    """A wedge from inside the balloon towards `target`: (base, tip, base).

    The tip stops short of the target (a tail points at a speaker, it does not stab it) and
    stays inside the frame.
    """
    cx, cy = (rect[0] + rect[2]) / 2, (rect[1] + rect[3]) / 2
    rx, ry = (rect[2] - rect[0]) / 2, (rect[3] - rect[1]) / 2
    dx, dy = target[0] - cx, target[1] - cy
    distance = math.hypot(dx, dy)
    if distance < 1e-6:
        dx, dy, distance = 0.0, 1.0, 1.0  # target under the balloon centre: point down
    ux, uy = dx / distance, dy / distance
    # Where the ray leaves the ellipse inscribed in the balloon.
    edge = 1.0 / math.sqrt((ux / rx) ** 2 + (uy / ry) ** 2)
    longest = 0.5 * min(panel_size)
    length = min(max((distance - edge) * 0.6, 0.25 * min(rx, ry)), longest)
    tip = (
        min(max(cx + ux * (edge + length), 0.0), panel_size[0] - 1.0),
        min(max(cy + uy * (edge + length), 0.0), panel_size[1] - 1.0),
    )
    half = 0.3 * min(rx, ry)
    base = (cx + ux * edge * 0.5, cy + uy * edge * 0.5)
    return (
        (base[0] - uy * half, base[1] + ux * half),
        tip,
        (base[0] + uy * half, base[1] - ux * half),
    )


def plan_lettering(
    panel_size: tuple[int, int],
    text: PanelText,
    routing_maps: np.ndarray | None = None,
    image_size: tuple[int, int] | None = None,
    font: FontSpec = None,
    rtl: bool = False,
    inset: int = 4,
) -> Lettering:
    """Caption box in the reading-start corner, then one balloon per dialogue line, each where
    it covers the least character mass (routing maps if given, else the placement boxes), with
    a tail towards its speaker's centre of mass."""
    pw, ph = panel_size
    chain = _chain(font)
    window = _normalized_window(image_size, panel_size)
    max_size = max(10, min(48, round(min(pw, ph) * 0.07)))
    caption = None
    taken: list[Rect] = []
    if text.caption:
        block = fit_text(text.caption, chain, int(pw * 0.85), int(ph * 0.25), max_size)
        pad = max(3, block.font_size // 3)
        width, height = block.width + 2 * pad, block.height + 2 * pad
        x0 = pw - inset - width if rtl else inset
        caption = CaptionPlan((x0, inset, x0 + width, inset + height), block)
        taken.append(caption.rect)
    if routing_maps is not None:
        routing_maps = np.asarray(routing_maps)
        expected = len(text.characters) + 1
        if routing_maps.ndim != 3 or routing_maps.shape[0] != expected:
            raise ValueError(
                f"routing maps must be ({expected}, H, W) for {len(text.characters)} characters "
                f"plus background, got shape {routing_maps.shape}"
            )
        mass = mass_from_maps(routing_maps, panel_size, window)
    else:
        mass = mass_from_boxes(text.boxes, panel_size, window)
    balloons = []
    for who, line in text.dialogue:
        block = fit_text(line, chain, int(pw * 0.45), int(ph * 0.3), max_size)
        pad = max(4, block.font_size // 2)
        size = (block.width + 2 * pad + block.line_height, block.height + 2 * pad)
        target = _speaker_target(text, who, routing_maps, panel_size, window)
        previous = balloons[-1].rect if balloons else None
        rect = place_balloon(panel_size, size, mass, taken, inset, rtl, target, previous)
        taken.append(rect)
        tail = balloon_tail(rect, target, panel_size) if target is not None else None
        balloons.append(BalloonPlan(rect, block, who, target, tail))
    return Lettering(caption, tuple(balloons))


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------


def compose_page(
    page_spec: PageSpec,
    panel_images: Sequence[Image.Image | None],
    texts: Sequence[PanelText | None],
    routing_maps: Sequence[np.ndarray | None] | None = None,
) -> Image.Image:
    """Draw one page: panels in reading order, their captions and balloons, black borders.

    `routing_maps[i]` is panel i's (N+1, H, W) soft maps (last = background), in the order of
    `texts[i].characters`; None places balloons by the placement boxes.
    """
    rects = panel_rects(page_spec)
    if len(panel_images) != len(rects):
        raise ValueError(f"page has {len(rects)} panels, got {len(panel_images)} images")
    page = Image.new("RGB", (page_spec.width, page_spec.height), page_spec.background)
    draw = ImageDraw.Draw(page)
    chain = font_chain(page_spec.font)
    for index, (rect, image) in enumerate(zip(rects, panel_images)):
        size = (rect[2] - rect[0], rect[3] - rect[1])
        if image is None:
            draw.rectangle(_inclusive(rect), fill=EMPTY_PANEL_FILL)
        else:
            page.paste(fit_cover(image, size), rect[:2])
        text = texts[index] if index < len(texts) else None
        if text is not None and (text.caption or text.dialogue):
            maps = None
            if routing_maps is not None and index < len(routing_maps):
                maps = routing_maps[index]
            lettering = plan_lettering(
                size, text, maps, image.size if image is not None else None,
                chain, page_spec.reading_order == "rtl", inset=page_spec.border + 4,
            )
            _draw_lettering(draw, rect[:2], lettering, chain)
        if page_spec.border > 0:
            draw.rectangle(_inclusive(rect), outline=BLACK, width=page_spec.border)
    return page


def _inclusive(rect: Rect) -> tuple[int, int, int, int]:
    """PIL's draw.rectangle includes its end pixel; our rects exclude it."""
    return (rect[0], rect[1], rect[2] - 1, rect[3] - 1)


def _shift(rect: Rect, origin: tuple[int, int]) -> Rect:
    return (rect[0] + origin[0], rect[1] + origin[1], rect[2] + origin[0], rect[3] + origin[1])


def _draw_lettering(draw: ImageDraw.ImageDraw, origin: tuple[int, int], lettering: Lettering,
                    chain: FontChain) -> None:
    if lettering.caption is not None:
        rect = _inclusive(_shift(lettering.caption.rect, origin))
        block = lettering.caption.text
        draw.rectangle(rect, fill=CAPTION_FILL, outline=BLACK, width=max(1, block.font_size // 12))
        _draw_block(draw, block, rect, chain, centred=False)
    for balloon in lettering.balloons:
        _draw_balloon(draw, origin, balloon, chain)


def _draw_balloon(draw: ImageDraw.ImageDraw, origin: tuple[int, int], balloon: BalloonPlan,
                  chain: FontChain) -> None:
    rect = _inclusive(_shift(balloon.rect, origin))
    line_width = max(2, balloon.text.font_size // 10)
    radius = min(rect[2] - rect[0], rect[3] - rect[1]) // 2
    tail = None
    if balloon.tail is not None:
        tail = [(x + origin[0], y + origin[1]) for x, y in balloon.tail]
        draw.polygon(tail, fill=WHITE, outline=BLACK, width=line_width)
    draw.rounded_rectangle(rect, radius=radius, fill=WHITE, outline=BLACK, width=line_width)
    if tail is not None:
        # Paint the tail's inside again over the balloon outline, so the tail joins the balloon
        # without a line across its root.
        draw.polygon(_shrink(tail, line_width * 1.5), fill=WHITE)
    _draw_block(draw, balloon.text, rect, chain, centred=True)


def _shrink(triangle: list[Point], amount: float) -> list[Point]:
    """Move each corner towards the centroid by `amount` px."""
    cx = sum(p[0] for p in triangle) / 3
    cy = sum(p[1] for p in triangle) / 3
    out = []
    for x, y in triangle:
        distance = math.hypot(x - cx, y - cy) or 1.0
        factor = max(0.0, 1.0 - amount / distance)
        out.append((cx + (x - cx) * factor, cy + (y - cy) * factor))
    return out


def _draw_block(draw: ImageDraw.ImageDraw, block: TextBlock, rect: tuple[int, int, int, int],
                chain: FontChain, centred: bool) -> None:
    font = chain.at(block.font_size)
    ascent = block.ascent if block.ascent is not None else font.getmetrics()[0]
    top = (rect[1] + rect[3] + 1 - block.height) / 2
    for number, line in enumerate(block.lines):
        y = top + number * block.line_height
        face = font.single_face(line)
        if face is not None and font.font(face).getmetrics()[0] == ascent:
            # One font, left to right, its ascender the block's: Pillow's own anchors.
            single = font.font(face)
            if centred:
                draw.text(((rect[0] + rect[2] + 1) / 2, y), line, font=single, fill=BLACK,
                          anchor="ma")
            else:
                x = rect[0] + (rect[2] + 1 - rect[0] - block.width) / 2
                draw.text((x, y), line, font=single, fill=BLACK, anchor="la")
            continue
        # Several fonts or right-to-left runs: run by run on the block's baseline; a
        # right-to-left line of a caption is set flush right.
        if centred:
            x = (rect[0] + rect[2] + 1) / 2 - font.getlength(line) / 2
        else:
            x = rect[0] + (rect[2] + 1 - rect[0] - block.width) / 2
            if base_direction(line) == "rtl":
                x += block.width - font.getlength(line)
        font.draw(draw, x, y + ascent, line, BLACK)
