"""Reference images: load, normalise the mode, segment with a mask, square-crop.

The subject encoder wants the character alone: background removed (zero), cropped to a square
around the mask. A mask comes from the caller, else from the image's alpha channel, else from
rembg when its model file is on disk. PIL + numpy only (no torch), so the CLI can check images
before loading any model.
"""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

REMBG_MODEL = "u2net"
# Larger is refused from the file's header, before decoding: a decompression bomb is a few KB
# that claim 100000x100000 pixels. 64 MP is a 9000x7000 photo, 256 MB once decoded as RGBA.
MAX_IMAGE_PIXELS = 64_000_000
# The only readers a user's file may reach. From its first bytes alone, Pillow would also
# open EPS (through Ghostscript, an external interpreter), PSD, ICO, PCX, ...: formats this
# tool never needs, whose readers a hostile file could target. (The JPEG reader also opens
# MPO, a camera JPEG that carries extra pictures such as previews; its first is the photo.)
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
IMAGE_FORMATS_HELP = "PNG, JPEG, WebP, GIF, BMP or TIFF"
CROP_MARGIN = 0.05  # fraction of the square side left around the character

# Pillow logs what it refuses in a damaged file ("More samples per pixel than can be decoded")
# at ERROR level; with logging not set up, Python prints that on stderr, a second line next to
# the one error the CLI prints. The usual library courtesy: a NullHandler, so records go only
# where an application's own logging configuration sends them.
logging.getLogger("PIL").addHandler(logging.NullHandler())


class ImageFileError(InputError):
    """An image file that cannot be used. `reason` is the message without the file name, so a
    story can put it after the field it came from."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def _readable_formats() -> tuple[str, ...]:
    """IMAGE_FORMATS that this Pillow can read (AVIF needs a recent build): `Image.open`
    fails with KeyError on a format name it has no reader for."""
    Image.init()  # registers every plugin's reader (once)
    return tuple(name for name in IMAGE_FORMATS if name in Image.OPEN)


def _open_image(path: Path) -> Image.Image:
    """`Image.open` over IMAGE_FORMATS: first over those Pillow knows without importing all its
    plugins (PNG, JPEG, GIF, BMP: tens of milliseconds a process saves), then over the rest."""
    Image.preinit()
    try:
        return Image.open(path, formats=tuple(name for name in IMAGE_FORMATS if name in Image.OPEN))
    except UnidentifiedImageError:
        return Image.open(path, formats=_readable_formats())


def load_image(
    path: str | Path, what: str = "image", *, max_pixels: int = MAX_IMAGE_PIXELS
) -> Image.Image:
    """Open and fully decode an image file into 8-bit L, LA, RGB or RGBA; ImageFileError (an
    InputError) with one clear reason if it cannot be used.

    Hostile files: a header claiming more than `max_pixels` is refused before decoding (so is
    anything over Pillow's own decompression-bomb limit); a truncated file is refused, never
    half-read; only the formats in IMAGE_FORMATS are read. Unusual files: EXIF orientation is
    applied (a phone photo comes out the way it is shown); 16-bit, float, CMYK, YCbCr and
    palette images are converted (`_normalise_mode`). An animated or multi-page image is
    refused: which frame shows the character is the user's choice, not ours.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {what} not found")
    megapixels = max_pixels // 1_000_000
    try:
        with warnings.catch_warnings():
            # Pillow warns about damaged metadata it skips ("Corrupt EXIF data", ...): the
            # pixels are what count, and a stray warning must not break the CLI's one line.
            warnings.simplefilter("ignore")
            # It also warns while opening a file over Image.MAX_IMAGE_PIXELS (and raises over
            # twice that): here both mean "too large".
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with _open_image(path) as image:
                width, height = image.size
                if width == 0 or height == 0:
                    raise ImageFileError(path, "image has zero size")
                if width * height > max_pixels:
                    raise ImageFileError(path, f"image is too large ({width}x{height}); at most "
                                               f"{megapixels} megapixels")
                if getattr(image, "is_animated", False) and image.format != "MPO":
                    raise ImageFileError(
                        path, f"animated or multi-page image ({image.n_frames} frames); save "
                              "the frame you want as a still image (PNG)")
                image = ImageOps.exif_transpose(image)  # decodes the pixels
                image.load()
            return _normalise_mode(image)
    except ImageFileError:
        raise
    except PermissionError:
        raise ImageFileError(path, "cannot read (permission denied)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageFileError(
            path, f"image is too large (over {Image.MAX_IMAGE_PIXELS // 1_000_000} megapixels, "
                  f"a possible decompression bomb); at most {megapixels} megapixels") from None
    except UnidentifiedImageError:
        raise ImageFileError(path, f"not an image ({IMAGE_FORMATS_HELP})") from None
    except MemoryError:
        raise ImageFileError(path, "image is too large to decode in memory") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for corrupt files
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageFileError(path, f"corrupt or truncated image ({detail})") from None


def _normalise_mode(image: Image.Image) -> Image.Image:
    """Any decoded mode -> 8-bit L, LA, RGB or RGBA, so later steps (and a plain `.convert`)
    see ordinary pixels: 16-bit and float greyscale are scaled, not clipped to white; CMYK,
    YCbCr, LAB and HSV become RGB; a palette or tRNS transparency becomes an alpha channel."""
    mode = image.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _to_8bit(image)
    if "transparency" in image.info and mode in ("1", "L", "P", "RGB"):
        return image.convert("RGBA")
    if mode in ("L", "LA", "RGB", "RGBA"):
        return image
    if mode == "1":
        return image.convert("L")
    if mode in ("PA", "RGBa"):
        return image.convert("RGBA")
    return image.convert("RGB")  # P, CMYK (Adobe-inverted ones included), YCbCr, LAB, HSV, RGBX


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and float greyscale -> 8-bit 'L' by scaling the value range, not clipping it."""
    values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
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


def mask_array(mask, image_size: tuple[int, int]) -> np.ndarray:
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


def character_mask(image: Image.Image, mask=None) -> np.ndarray:
    """Where the character is, (H, W) bool: `mask` (PIL image or 2-D array of the image's size),
    else the image's alpha channel, else rembg (only with its model already on disk)."""
    if mask is not None:
        return mask_array(mask, image.size)
    _, alpha = split_alpha(image)
    return alpha >= 128 if alpha is not None else rembg_mask(image)


def prepare_reference(image: Image.Image, mask=None, size: int = 512) -> Reference:
    """Segment `image` by `mask` (PIL image or 2-D array of the image's size; default: its alpha
    channel), crop a square around the character, resize to `size`."""
    rgb, _ = split_alpha(image)
    keep = character_mask(image, mask)
    if not keep.any():
        raise InputError("the reference mask is empty: nothing of the character is visible")
    square_rgb = Image.fromarray(np.where(keep[..., None], rgb, 0).astype(np.uint8)).crop(_square_box(keep))
    square_mask = Image.fromarray(keep.astype(np.uint8) * 255).crop(_square_box(keep))
    out_mask = np.asarray(_resize(square_mask, size), dtype=np.float32) / 255.0 >= 0.5
    out_rgb = np.asarray(_resize(square_rgb, size)) * out_mask[..., None]
    return Reference(rgb=out_rgb.astype(np.uint8), mask=out_mask.astype(np.float32))
