"""Reference images: load, normalise the mode, segment with a mask, square-crop.

The subject encoder wants the character alone: background removed (zero), cropped to a square
around the mask. A mask comes from the caller, else from the image's alpha channel, else from
rembg when its model file is on disk. PIL + numpy only (no torch), so the CLI can check images
before loading any model.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

REMBG_MODEL = "u2net"
MAX_IMAGE_PIXELS = 64_000_000  # larger is refused before decoding (decompression bombs)
CROP_MARGIN = 0.05  # fraction of the square side left around the character


def load_image(path: str | Path, what: str = "image") -> Image.Image:
    """Open and fully decode an image file, honouring EXIF orientation; InputError if it cannot."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {what} not found")
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise InputError(f"{path}: {what} is {image.width}x{image.height}, larger than the "
                                 f"{MAX_IMAGE_PIXELS:,}-pixel limit")
            if image.width == 0 or image.height == 0:
                raise InputError(f"{path}: {what} has zero size")
            image.seek(0)  # first frame of an animation
            image = ImageOps.exif_transpose(image)
            image.load()
            return image
    except InputError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise InputError(f"{path}: not a readable {what} ({exc.__class__.__name__})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path}: corrupt or truncated {what} ({exc})") from None


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and float greyscale -> 8-bit 'L' by scaling the value range, not clipping it."""
    values = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
    if image.mode == "F":
        top = max(float(values.max()), 1.0)
    return Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")


def split_alpha(image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """Any PIL mode -> (RGB uint8 (H, W, 3), alpha uint8 (H, W) or None when fully opaque)."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = _to_8bit(image)
    if image.mode == "P" or image.mode == "PA":
        image = image.convert("RGBA")
    if image.mode in ("LA", "La", "RGBa"):
        image = image.convert("RGBA")
    alpha = None
    if image.mode == "RGBA":
        alpha = np.asarray(image.getchannel("A"))
        if alpha.min() == 255:
            alpha = None
    rgb = np.asarray(image.convert("RGB"))  # also CMYK, YCbCr, L, 1
    return rgb, alpha


@dataclass(frozen=True)
class Reference:
    """A segmented, square reference: background zeroed, mask in {0, 1}."""

    rgb: np.ndarray  # (S, S, 3) uint8
    mask: np.ndarray  # (S, S) float32


_HOW_TO_MASK = ("pass a mask image (--mask, or `mask:` in the story), use a PNG whose background is "
                "transparent, or install `anystory-cli[segment]` and put rembg's "
                f"{REMBG_MODEL}.onnx in $U2NET_HOME")


@functools.lru_cache(maxsize=1)
def _rembg_session():
    import rembg

    return rembg.new_session(REMBG_MODEL)


def rembg_mask(image: Image.Image) -> np.ndarray:
    """The main subject's mask by rembg, used only when its model file is already on disk:
    rembg downloads a missing model on first use, and this tool never downloads anything."""
    try:
        import rembg
        from rembg.sessions.u2net import U2netSession
    except ImportError:
        raise InputError(f"the reference has no transparency and no mask was given: {_HOW_TO_MASK}") from None
    if U2netSession.resolve_existing(f"{REMBG_MODEL}.onnx") is None:
        raise InputError(f"the reference has no transparency, no mask was given, and rembg has no "
                         f"{REMBG_MODEL} model on disk: {_HOW_TO_MASK}")
    mask = rembg.remove(image.convert("RGB"), session=_rembg_session(), only_mask=True)
    return np.asarray(mask.convert("L")) >= 128


def _mask_array(mask, image_size: tuple[int, int]) -> np.ndarray:
    if isinstance(mask, Image.Image):
        if mask.size != image_size:
            raise InputError(f"mask is {mask.width}x{mask.height} but the image is "
                             f"{image_size[0]}x{image_size[1]}; they must match")
        rgb, alpha = split_alpha(mask)
        return (alpha if alpha is not None else rgb.max(axis=-1)) >= 128
    array = np.asarray(mask)
    if array.ndim != 2 or array.shape[::-1] != image_size:
        raise InputError(f"mask has shape {array.shape} but the image is {image_size[0]}x{image_size[1]} "
                         f"(expected a 2-D mask of shape ({image_size[1]}, {image_size[0]}))")
    return array > 0.5 if array.dtype != bool else array


def _square_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    side = max(y1 - y0, x1 - x0)
    side = int(np.ceil(side * (1 + 2 * CROP_MARGIN)))
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    left, top = int(round(cx - side / 2)), int(round(cy - side / 2))
    return left, top, left + side, top + side


def _resize(image: Image.Image, size: int) -> Image.Image:
    # Upscaling small pixel-art references stays crisp; downscaling averages.
    method = Image.Resampling.NEAREST if image.width < size else Image.Resampling.BOX
    return image.resize((size, size), method)


def prepare_reference(image: Image.Image, mask=None, size: int = 512) -> Reference:
    """Segment `image` by `mask` (PIL image or 2-D array of the image's size; default: its alpha
    channel), crop a square around the character, resize to `size`."""
    rgb, alpha = split_alpha(image)
    if mask is not None:
        keep = _mask_array(mask, image.size)
    elif alpha is not None:
        keep = alpha >= 128
    else:
        keep = rembg_mask(image)
    if not keep.any():
        raise InputError("the reference mask is empty: nothing of the character is visible")
    square_rgb = Image.fromarray(np.where(keep[..., None], rgb, 0).astype(np.uint8)).crop(_square_box(keep))
    square_mask = Image.fromarray(keep.astype(np.uint8) * 255).crop(_square_box(keep))
    out_mask = np.asarray(_resize(square_mask, size), dtype=np.float32) / 255.0 >= 0.5
    out_rgb = np.asarray(_resize(square_rgb, size)) * out_mask[..., None]
    return Reference(rgb=out_rgb.astype(np.uint8), mask=out_mask.astype(np.float32))
