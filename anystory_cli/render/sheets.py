"""Character sheets and cards: a generated sheet's character cut out (`segment_sheet`), the card
that shows a reference and its mask, and `anystory encode-character` (a character outside a story).

PIL and numpy here; the model is reached only through the pipeline object a factory returns.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..cache import EncodingCache, encoder_id, reference_key
from ..errors import AnyStoryError, InputError
from ..export import atomic_write
from ..masks import load_image, prepare_reference

CARD_TILE = 256
CARD_GAP = 8
CARD_BACKGROUND = (255, 255, 255)
CHECKER = ((204, 204, 204), (240, 240, 240))  # "transparent" behind the segmented character

# Sheet segmentation (text-only characters): see segment_sheet.
SHEET_MIN_DISTANCE = 40.0  # RGB distance from the background colour that counts as character
SHEET_FRACTION = (0.02, 0.6)  # a plausible share of the image for one standing character
SHEET_FALLBACK_BOX = (0.2, 0.1, 0.8, 0.95)  # x0, y0, x1, y1 in 0..1
SHEET_WORK_SIZE = 256  # larger sheets are segmented at this size (the search is per pixel)
SHEET_ROW_WINDOW = 5  # rows whose side colours are pooled: a side band holds a few pixels a row


def segment_sheet(image: Image.Image) -> tuple[np.ndarray, bool]:
    """(mask, fallback): the character on a generated sheet, (H, W) bool at the image's size.

    A sheet is a plain backdrop (SD 1.5, SDXL) or, on the default model, a scene of horizontal
    bands (sky, horizon, ground) with props (sun, clouds, trees). So the background of each row is
    the colour of its left and right border bands (4 % wide) and of the top band; a pixel farther
    than max(40, twice the borders' own spread) from all three is foreground. Of the foreground,
    after a 3-px opening, the largest 4-connected part is the character (props are smaller), its
    enclosed holes filled. When that is under 2 % or over 60 % of the image, the sheet has no clear
    background: the central box is used and `fallback` is True.
    """
    rgb = image.convert("RGB")
    scale = SHEET_WORK_SIZE / max(rgb.size)
    if scale < 1:
        rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.BOX)
    mask = _largest_part(_foreground(np.asarray(rgb, dtype=np.float32)))
    height, width = image.height, image.width
    if mask is not None and SHEET_FRACTION[0] <= mask.mean() <= SHEET_FRACTION[1]:
        if mask.shape != (height, width):
            mask = np.asarray(Image.fromarray(mask).resize((width, height), Image.NEAREST))
        return mask, False
    x0, y0, x1, y1 = SHEET_FALLBACK_BOX
    box = np.zeros((height, width), bool)
    box[round(y0 * height):round(y1 * height), round(x0 * width):round(x1 * width)] = True
    return box, True


def _foreground(rgb: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels far from their row's side colours and from the top band's colour."""
    height, width = rgb.shape[:2]
    band = max(1, round(min(height, width) * 0.04))
    distances, spread = [], []
    for side in (rgb[:, :band], rgb[:, -band:]):
        colour = _pooled_rows(np.median(side, axis=1))  # (H, 3)
        distances.append(np.linalg.norm(rgb - colour[:, None], axis=-1))
        spread.append(np.linalg.norm(side - colour[:, None], axis=-1).ravel())
    top = rgb[:band].reshape(-1, 3)
    top_colour = np.median(top, axis=0)
    distances.append(np.linalg.norm(rgb - top_colour, axis=-1))
    spread.append(np.linalg.norm(top - top_colour, axis=-1))
    threshold = max(SHEET_MIN_DISTANCE, 2.0 * float(np.percentile(np.concatenate(spread), 90)))
    far = np.min(distances, axis=0) > threshold
    opened = (Image.fromarray(far.astype(np.uint8) * 255)
              .filter(ImageFilter.MinFilter(3)).filter(ImageFilter.MaxFilter(3)))
    return np.asarray(opened) >= 128


def _pooled_rows(colours: np.ndarray) -> np.ndarray:
    """(H, 3) per-row colours -> the median over SHEET_ROW_WINDOW neighbouring rows (the first and
    last rows repeated past the ends)."""
    from scipy import ndimage

    return ndimage.median_filter(colours, size=(SHEET_ROW_WINDOW, 1), mode="nearest")


def _largest_part(foreground: np.ndarray) -> np.ndarray | None:
    """The largest 4-connected part of `foreground` with its enclosed holes filled; None if empty.

    Of equal parts the first in raster order wins. A hole is background that no 4-connected path
    of background joins to the border."""
    from scipy import ndimage

    labels, count = ndimage.label(foreground)  # the default structure is the 4-neighbour cross
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    return ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))


def _checker(size: int, cell: int = 16) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    light = ((yy // cell + xx // cell) % 2).astype(bool)
    return np.where(light[..., None], np.array(CHECKER[1], np.uint8), np.array(CHECKER[0], np.uint8))


def character_card(image: Image.Image, mask: Any = None) -> Image.Image:
    """Reference and mask side by side: the segmented character on a checkerboard, then its
    mask in white on black. Shows at a glance what the encoder sees."""
    reference = prepare_reference(image, mask, CARD_TILE)
    keep = reference.mask[..., None] > 0.5
    character = np.where(keep, reference.rgb, _checker(CARD_TILE)).astype(np.uint8)
    mask_tile = np.repeat((reference.mask * 255).astype(np.uint8)[..., None], 3, axis=-1)
    card = Image.new("RGB", (2 * CARD_TILE + 3 * CARD_GAP, CARD_TILE + 2 * CARD_GAP), CARD_BACKGROUND)
    card.paste(Image.fromarray(character), (CARD_GAP, CARD_GAP))
    card.paste(Image.fromarray(mask_tile), (2 * CARD_GAP + CARD_TILE, CARD_GAP))
    draw = ImageDraw.Draw(card)
    for x in (CARD_GAP, 2 * CARD_GAP + CARD_TILE):
        draw.rectangle((x - 1, CARD_GAP - 1, x + CARD_TILE, CARD_GAP + CARD_TILE), outline=(0, 0, 0))
    return card


@dataclass
class EncodedCharacter:
    name: str
    cache_path: Path
    card_path: Path | None
    hit: bool
    rebuilt: bool
    model_id: str
    warnings: list[str]


def encode_character_file(
    image_path: str | os.PathLike[str],
    name: str,
    *,
    mask_path: str | os.PathLike[str] | None = None,
    model: Any = "default",
    cache_dir: str | os.PathLike[str] | None = None,
    card_path: str | os.PathLike[str] | None = None,
    pipeline_factory: Callable[[str, Path], Any] | None = None,
) -> EncodedCharacter:
    """Encode one reference image into the cache (a cache hit reuses it); write its card.

    The image and mask are checked, and the card drawn, before the model loads: a bad
    reference fails in milliseconds.
    """
    image = load_image(image_path, "reference image")
    mask = load_image(mask_path, "mask") if mask_path is not None else None
    try:
        card = character_card(image, mask)
    except InputError as exc:
        raise InputError(f"{image_path}: {exc}") from None
    if pipeline_factory is None:
        from ..model_loading import load_pipeline as pipeline_factory  # noqa: N813 - a factory
    try:
        pipeline = pipeline_factory(model, Path.cwd())
    except AnyStoryError as exc:
        said = str(exc)  # a model file's problem already names the file
        raise type(exc)(said if str(model) in said else f"--model {model}: {said}") from None
    warnings: list[str] = []
    cache = EncodingCache(cache_dir, on_warning=warnings.append)
    key = reference_key(Path(image_path).read_bytes(),
                        Path(mask_path).read_bytes() if mask_path is not None else None,
                        encoder_id(pipeline))
    result = cache.get_or_encode(
        key, pipeline.model_id, lambda: pipeline.encode_character(image, mask=mask, name=name))
    written = None
    if card_path is not None:
        written = Path(card_path)
        atomic_write(written, lambda handle: card.save(handle, format="PNG"))
    return EncodedCharacter(name, result.path, written, result.hit, result.rebuilt,
                            pipeline.model_id, warnings)
