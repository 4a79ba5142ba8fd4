"""Pictures of the world for people to look at (backs `anystory world sample --out DIR`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from .identity import identity_from_seed, train_identity_seeds, heldout_identity_seeds
from .rng import WorldRng
from .scenes import Scene, reference_image, sample_scene

# Distinct overlay colours for instance masks (left to right).
MASK_COLOURS = ((255, 40, 40), (40, 220, 60), (40, 90, 255), (255, 220, 0))
SHEET_BACKDROP_RGB = (150, 150, 158)


def upscale(image: np.ndarray, factor: int) -> Image.Image:
    """Nearest-neighbour enlargement: pixel art stays crisp."""
    picture = Image.fromarray(image)
    return picture.resize((picture.width * factor, picture.height * factor), Image.NEAREST)


def mask_overlay(scene: Scene) -> np.ndarray:
    """The scene with each character's visible mask tinted in its own colour."""
    image = scene.image.astype(np.float32)
    for index, mask in enumerate(scene.masks):
        colour = np.asarray(MASK_COLOURS[index % len(MASK_COLOURS)], dtype=np.float32)
        image[mask] = image[mask] * 0.35 + colour * 0.65
    return np.round(image).astype(np.uint8)


def contact_sheet(identity_seeds: list[int], size: int = 64, upscale_factor: int = 4, columns: int = 8) -> Image.Image:
    """Reference images of the given identities on a grey backdrop, in a grid."""
    rows = (len(identity_seeds) + columns - 1) // columns
    sheet = np.zeros((rows * size, columns * size, 3), dtype=np.uint8)
    sheet[...] = SHEET_BACKDROP_RGB
    for index, seed in enumerate(identity_seeds):
        row, col = divmod(index, columns)
        rgba = reference_image(seed, size)
        tile = sheet[row * size : (row + 1) * size, col * size : (col + 1) * size]
        drawn = rgba[..., 3] > 0
        tile[drawn] = rgba[..., :3][drawn]
    return upscale(sheet, upscale_factor)


def write_samples(out_dir: str | Path, n: int = 16, seed: int = 0, size: int = 64, upscale_factor: int = 4) -> list[Path]:
    """Write `n` example scenes, their mask overlays, captions.jsonl and identity contact sheets.

    Scenes use training identities and 1 to 4 characters. Images are enlarged `upscale_factor`
    times (nearest neighbour) so that a person can see the pixels. Returns the files written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = WorldRng("write_samples", int(seed))
    written: list[Path] = []
    records = []
    for index in range(n):
        scene = sample_scene(rng.integer(1 << 31), 1 + index % 4, "train", size)
        stem = f"scene_{index:03d}"
        for suffix, picture in (("", scene.image), ("_masks", mask_overlay(scene))):
            path = out / f"{stem}{suffix}.png"
            upscale(picture, upscale_factor).save(path)
            written.append(path)
        records.append(_scene_record(stem, scene))
    captions = out / "captions.jsonl"
    captions.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    written.append(captions)
    for split, seeds in (("train", train_identity_seeds(48)), ("heldout", heldout_identity_seeds(48))):
        path = out / f"identities_{split}.png"
        contact_sheet(seeds, size, upscale_factor).save(path)
        written.append(path)
    return written


def _scene_record(stem: str, scene: Scene) -> dict:
    return {
        "image": f"{stem}.png",
        "masks": f"{stem}_masks.png",
        "caption": scene.caption,
        "split": scene.split,
        "characters": [
            {
                "identity_seed": inst.identity_seed,
                "attributes": identity_from_seed(inst.identity_seed).describe(),
                "pose": inst.pose,
                "flip": inst.flip,
                "box": list(inst.box),
            }
            for inst in scene.instances
        ],
    }
