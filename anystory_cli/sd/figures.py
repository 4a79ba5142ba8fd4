"""Figure paste: each character's reference, pasted into its place once, part-way through sampling.

The router decides which pixels a character may influence, but it cannot make the base draw a
character there: the default base leaves a quarter of lone characters out and draws the others
as one generic blob whose outline and colours the adapter only partly corrects. So, optionally,
after the first denoising step whose next timestep t has t/T <= `paste_at`, the latents inside each
character's pasted figure are replaced by the figure's own latents noised to t, as SDEdit (Meng
et al., "SDEdit", arXiv 2108.01073) starts from a noised picture, but only inside the figures and
mid-way: the steps before lay out the scene from the caption, the steps after redraw the figure
into it, with the adapter still routing each character's tokens and features to its pixels.

    figure_of(reference_rgb, reference_mask)                -> (h, w, 4) uint8 tight crop
    compose_figures(figures, boxes, height, width)          -> (rgb canvas, coverage mask)
    paste_step(base, figures, boxes, size, paste_at, ...)   -> callback_on_step_end

A figure stands in its box (0..1 image coordinates): as large as fits at its own aspect ratio,
centred, its feet on the box's bottom edge. `plan.figure_boxes` says where a story's figures
stand.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from ..errors import InputError

Box = tuple[float, float, float, float]
# A story's default (`style.paste_references_at`): after 15 of 25 steps. On the default model
# 0.4 identified more characters than 0.55 or 0.7 (docs/method.md, "Figure paste").
DEFAULT_PASTE_AT = 0.4
# A latent pixel is pasted when the figures cover at least this share of it: a figure's ragged
# rim would otherwise paste the grey canvas around it.
COVERAGE = 0.5
CANVAS_GREY = 127


def figure_of(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A segmented reference (S, S, 3) uint8 and its mask (S, S) -> (h, w, 4) uint8 cropped to
    the character, its alpha the mask."""
    keep = np.asarray(mask) >= 0.5
    if not keep.any():
        raise InputError("the reference mask is empty: nothing of the character is visible")
    rows, cols = np.flatnonzero(keep.any(axis=1)), np.flatnonzero(keep.any(axis=0))
    crop = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    alpha = (keep[crop] * 255).astype(np.uint8)
    return np.dstack([np.asarray(rgb)[crop], alpha])


def fit_in_box(figure_size: tuple[int, int], box: Box, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, h, w) in pixels of a figure (fh, fw) scaled to fit `box` at its aspect ratio,
    centred horizontally, standing on the box's bottom edge."""
    x0, y0, x1, y1 = box
    fh, fw = figure_size
    box_h, box_w = (y1 - y0) * height, (x1 - x0) * width
    scale = min(box_h / fh, box_w / fw)
    h, w = max(1, int(round(fh * scale))), max(1, int(round(fw * scale)))
    bottom = int(round(y1 * height))
    top = max(0, bottom - h)
    left = int(round((x0 + x1) / 2 * width - w / 2))
    left = min(max(left, 0), max(0, width - w))
    return top, left, min(h, height - top), min(w, width - left)


def compose_figures(figures: Sequence[np.ndarray], boxes: Sequence[Box], height: int,
                    width: int) -> tuple[np.ndarray, np.ndarray]:
    """Figures on a grey canvas: (height, width, 3) uint8 and the (height, width) float mask of
    the pixels they cover. Lower boxes are painted last (nearer the viewer)."""
    canvas = np.full((height, width, 3), CANVAS_GREY, np.uint8)
    covered = np.zeros((height, width), np.float32)
    for i in sorted(range(len(figures)), key=lambda i: boxes[i][3]):
        figure = np.asarray(figures[i])
        top, left, h, w = fit_in_box(figure.shape[:2], boxes[i], height, width)
        scaled = np.asarray(Image.fromarray(figure).resize((w, h), Image.NEAREST))
        inside = scaled[..., 3:] >= 128
        area = (slice(top, top + h), slice(left, left + w))
        canvas[area] = np.where(inside, scaled[..., :3], canvas[area])
        covered[area] = np.maximum(covered[area], inside[..., 0])
    return canvas, covered


def encode_canvas(vae, canvas: np.ndarray, device, dtype):
    """(1, C, h, w) latents of a canvas, scaled as the UNet sees them (the posterior's mean)."""
    import torch

    # SDXL's VAE overflows in fp16 and says so in its config; diffusers' pipelines then run it in
    # fp32 for the call and cast it back, as here.
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(dtype=torch.float32)
    try:
        pixels = torch.from_numpy(canvas).permute(2, 0, 1)[None].to(device=device, dtype=vae.dtype)
        latents = vae.encode(pixels / 127.5 - 1.0).latent_dist.mean
    finally:
        if upcast:
            vae.to(dtype=torch.float16)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * vae.config.scaling_factor).to(dtype)


StepCallback = Callable[[Any, int, Any, dict], dict]


def paste_step(base, figures: Sequence[np.ndarray], boxes: Sequence[Box], size: tuple[int, int],
               paste_at: float, generator=None, callback: StepCallback | None = None) -> StepCallback:
    """A diffusers `callback_on_step_end` that pastes the figures once: after the first step
    whose next timestep t has t/T <= `paste_at`, latents inside the figures become the figures'
    latents noised to t by the scheduler's own `add_noise`, with fresh noise from `generator`.
    `callback`, if any, runs first after every step."""
    import torch
    import torch.nn.functional as F
    from diffusers.utils.torch_utils import randn_tensor

    if not 0.0 < paste_at <= 1.0:
        raise InputError(f"paste_at is a noise level t/T in (0, 1], got {paste_at}")
    height, width = size
    canvas, covered = compose_figures(figures, boxes, height, width)
    unet = base.unet
    device = getattr(base, "_execution_device", unet.device)  # where the UNet runs, also with offload
    clean = encode_canvas(base.vae, canvas, device, unet.dtype)
    inside = F.interpolate(torch.from_numpy(covered)[None, None], size=clean.shape[-2:], mode="area")
    inside = (inside >= COVERAGE).to(device=device, dtype=unet.dtype)
    total = base.scheduler.config.num_train_timesteps

    def crosses_paste_level(timesteps, step: int) -> bool:
        """Whether `step` is the one after which the schedule first reaches `paste_at`."""
        if step + 1 >= len(timesteps) or float(timesteps[step + 1]) / total > paste_at:
            return False
        return step == 0 or float(timesteps[step]) / total > paste_at

    def step_end(step_pipe, step: int, timestep, tensors: dict) -> dict:
        if callback is not None:
            tensors = callback(step_pipe, step, timestep, tensors)
        timesteps = step_pipe.scheduler.timesteps
        if not crosses_paste_level(timesteps, step):
            return tensors
        latents = tensors["latents"]
        noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        at = timesteps[step + 1].reshape(1).expand(latents.shape[0])
        noised = step_pipe.scheduler.add_noise(clean.expand_as(latents), noise, at)
        tensors["latents"] = latents * (1 - inside) + noised * inside
        return tensors

    return step_end
