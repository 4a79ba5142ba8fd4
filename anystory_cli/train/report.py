"""What a training run shows a person: loss curves and sample generations with routing maps.

    plot_losses(log.jsonl, losses.png)
    preview_rows(recipe, count)                       -> the manifest rows the previews use
    preview_grid(pipe, image_encoder, adapter, rows, recipe, path)

The previews always use the same rows and the same seeds, so grids from successive checkpoints
can be compared side by side. Generation runs through the real `AnyStoryPipeline`, exactly as
`anystory render` would use the adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..atomic import atomic_path
from ..errors import AnyStoryError
from ..masks import load_image, prepare_reference

TILE = 128  # every tile is shown at this size (the sprite world's 64x64 images, upscaled crisp)
LABEL_HEIGHT = 14


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(log_path: Path, out_path: Path, smooth: int = 25) -> Path | None:
    """Every loss of log.jsonl against the step, raw (faint) and as a running mean. Needs
    matplotlib, which the `train` extra installs."""
    try:
        import matplotlib
    except ModuleNotFoundError as exc:
        raise AnyStoryError("the loss plot needs matplotlib, which is not installed: "
                            "pip install 'anystory-cli[train]'") from exc

    matplotlib.use("Agg")  # no display; the only backend that never needs one
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    if not records:
        return None
    # every loss any record has, in first-seen order (a resumed run may log a new one)
    keys = list(dict.fromkeys(k for r in records for k in r if k not in ("step", "samples_per_s")))
    steps = np.array([r["step"] for r in records])
    figure, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), squeeze=False, sharex=True)
    for axis, key in zip(axes[:, 0], keys):
        values = np.array([r.get(key, np.nan) for r in records], dtype=float)
        window = max(1, min(smooth, len(values) // 5 or 1))
        mean = np.convolve(values, np.ones(window) / window, mode="valid")
        axis.plot(steps, values, alpha=0.25, linewidth=0.8)
        axis.plot(steps[window - 1:], mean, linewidth=1.6)
        axis.set_ylabel(key)
        if np.all(values[np.isfinite(values)] > 0):
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("optimizer step")
    figure.tight_layout()
    with atomic_path(out_path) as tmp:
        figure.savefig(tmp, format="png", dpi=90)
    plt.close(figure)
    return out_path


def preview_rows(recipe, count: int) -> list[dict]:
    """The first `count` usable rows of the preview manifest (the training one by default)."""
    from .manifest import read_manifest, row_problems

    path = recipe.preview_data or recipe.data
    rows = []
    for _, row in read_manifest(path):
        if len(rows) == count:
            break
        if not row_problems(row, recipe.stage, path.parent):
            rows.append({**row, "_folder": str(path.parent)})
    return rows


def _tile(image: Image.Image | np.ndarray, label: str) -> Image.Image:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    canvas = Image.new("RGB", (TILE, TILE + LABEL_HEIGHT), (255, 255, 255))
    canvas.paste(image.convert("RGB").resize((TILE, TILE), Image.Resampling.NEAREST), (0, LABEL_HEIGHT))
    ImageDraw.Draw(canvas).text((3, 1), label, fill=(0, 0, 0))
    return canvas


def _mask_overlay(image: Image.Image, masks: list[np.ndarray]) -> Image.Image:
    from ..overlay import ROUTING_COLOURS

    base = np.asarray(image.convert("RGB"), np.float32)
    out = base.copy()
    for i, mask in enumerate(masks):
        colour = np.array(ROUTING_COLOURS[i % len(ROUTING_COLOURS)], np.float32)
        out[mask] = 0.45 * base[mask] + 0.55 * colour
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))


def _row_inputs(row: dict, stage: int) -> tuple[list[tuple[Image.Image, Image.Image | None]], Image.Image, list[np.ndarray]]:
    """(reference image + mask per character, the target, the target's instance masks)."""
    from ..masks import mask_array

    folder = Path(row["_folder"])
    if stage == 1:
        reference = load_image(folder / row["reference"], "reference")
        mask = None if row.get("reference_mask") is None else load_image(folder / row["reference_mask"], "mask")
        return [(reference, mask)], load_image(folder / row["target"], "target").convert("RGB"), []
    image = load_image(folder / row["image"], "image").convert("RGB")
    masks = [load_image(folder / m, "mask") for m in row["masks"]]
    arrays = [mask_array(m, image.size) for m in masks]
    return [(image, m) for m in masks], image, arrays


def finest_routing(layers: dict) -> np.ndarray:
    """(E, H, W) mean of the routing maps of the highest-resolution layers (first sample).

    Layers route somewhat different pixels, so an average over all resolutions blurs every
    character into the background; the finest layers show the silhouettes the router drew."""
    side = max(maps.shape[-1] for maps in layers.values())
    finest = [maps[0].float().cpu().numpy() for maps in layers.values() if maps.shape[-1] == side]
    return np.mean(finest, axis=0)


BACKGROUND_GREY = 40.0


def soft_routing(image: Image.Image, maps: np.ndarray) -> Image.Image:
    """The routing probabilities as colours, at the image's size: sum_e p_e * colour_e, with the
    background entry dark grey. A sure router shows pure colours; an unsure one, mixtures."""
    from ..overlay import ROUTING_COLOURS

    colours = [np.array(ROUTING_COLOURS[e % len(ROUTING_COLOURS)], np.float32) for e in range(maps.shape[0] - 1)]
    colours.append(np.full(3, BACKGROUND_GREY, np.float32))
    picture = np.einsum("ehw,ec->hwc", maps.astype(np.float32), np.stack(colours))
    small = Image.fromarray(np.clip(picture + 0.5, 0, 255).astype(np.uint8))
    return small.resize(image.size, Image.Resampling.NEAREST)


def preview_grid(pipe, image_encoder, adapter, rows: list[dict], recipe, out_path: Path) -> Path | None:
    """One line per row: references | target (with its masks) | generated | routing map (stage 2:
    the finest layers' soft maps, one colour per reference, as in the target's mask tints).

    The caller removes its training processors first; the pipeline's own are on the UNet during
    each of its calls only."""
    import torch

    from ..sd.pipeline import AnyStoryPipeline

    if not rows:
        return None
    pipeline = AnyStoryPipeline.from_pipe(pipe, image_encoder, adapter)
    lines = []
    for index, row in enumerate(rows):
        references, target, masks = _row_inputs(row, recipe.stage)
        encodings = [pipeline.encode_character(image, mask) for image, mask in references]
        output = pipeline(
            row["caption"], encodings, subject_scale=1.0, reference_scale=0.0,
            # Stage 1 trains without a router (its one character at every pixel) and leaves
            # the router untrained, so its previews draw that way too.
            return_routing=recipe.stage == 2, route=recipe.stage == 2, num_inference_steps=recipe.preview_steps,
            guidance_scale=recipe.preview_guidance, output_type="pil",
            generator=torch.Generator().manual_seed(recipe.seed + index),
        )
        generated = output.images[0]
        size = adapter.config.reference_size
        tiles = [_tile(prepare_reference(image, mask, size).rgb, f"ref {k + 1}")
                 for k, (image, mask) in enumerate(references)]
        tiles.append(_tile(_mask_overlay(target, masks) if masks else target, "target"))
        tiles.append(_tile(generated, "generated"))
        if output.routing_layers:
            tiles.append(_tile(soft_routing(generated, finest_routing(output.routing_layers)), "routing"))
        lines.append(tiles)
    columns = max(len(line) for line in lines)
    grid = Image.new("RGB", (columns * TILE, len(lines) * (TILE + LABEL_HEIGHT)), (255, 255, 255))
    for y, line in enumerate(lines):
        for x, tile in enumerate(line):
            grid.paste(tile, (x * TILE, y * (TILE + LABEL_HEIGHT)))
    with atomic_path(out_path) as tmp:
        grid.save(tmp, format="PNG")
    return out_path
