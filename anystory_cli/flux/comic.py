"""AnyStoryFluxPipeline behind the calls the story renderer makes of a pipeline.

The renderer encodes each character once (`encode_character(image, mask, name)`), asks for a
panel size (`image_size`) and draws panels (`__call__` with the panel's prompt, characters,
placement boxes, steps, guidance, seed) with routing maps of shape (B, N+1, H, W): one per
character, then the background. The settings of the paper's SDXL method (subject and reference
strengths, reference guidance, pasted figures, guidance intervals, negative prompts) have no
counterpart in the released FLUX model and are not used.
"""
from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..errors import InputError
from ..masks import character_mask
from .memory_apply import place_for_denoising, place_for_text, release_offloaded_text_encoders
from .reference import prepare_reference

DEFAULT_RESOLUTION = 512  # the long side of a panel: the released app draws 512 x 512
GRID = 16  # FLUX image sizes are multiples of 16 (8x VAE, 2x2 patches)


@dataclass
class ComicOutput:
    images: list
    routing_maps: torch.Tensor | None = None  # (B, N+1, H, W)


class FluxComicPipeline:
    """Draws story panels with the released AnyStory FLUX model."""

    max_characters = 4

    def __init__(self, pipe, model_id: str):
        self.pipe = pipe
        self.model_id = model_id
        pipe.model_id = model_id
        self._prompts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # prompt -> T5, CLIP pooled (CPU)

    @property
    def device(self):
        return self.pipe.device

    @property
    def dtype(self):
        return self.pipe.dtype

    @property
    def style_loras(self):
        return self.pipe.style_loras

    def encode_character(self, image: Image.Image, mask=None, name: str = ""):
        """The character cut out as the released app does (square crop, subject on white) and
        encoded; its VAE sample is drawn from a generator seeded by the cut-out's pixels."""
        try:
            keep = character_mask(image, mask)
            crop, cut = prepare_reference(image.convert("RGB"), Image.fromarray(keep.astype(np.uint8) * 255),
                                          where=f"character {name or '?'}")
        except InputError as exc:
            message = str(exc)
            raise InputError(message if message.startswith("character ") else f"character {name or '?'}: {message}") \
                from None
        digest = hashlib.sha256(np.asarray(crop).tobytes() + np.asarray(cut).tobytes()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        return self.pipe.encode_character(crop, mask=cut, generator=generator, name=name)

    @torch.no_grad()
    def identity_embeddings(self, images, masks) -> np.ndarray:
        """(K, D) float32 unit vectors: each image cut out as a reference is (square crop, subject
        on white), then Redux's SigLIP pooled output: how alike a panel's routed region and a
        reference look (`scores.py`)."""
        crops = []
        for image, mask in zip(images, masks):
            keep = character_mask(image, mask)
            crop, _ = prepare_reference(image.convert("RGB"), Image.fromarray(keep.astype(np.uint8) * 255))
            crops.append(crop)
        return self.pipe.embed_images(crops)

    @contextlib.contextmanager
    def prompts_encoded(self, prompts: Iterable[str]):
        """Every prompt's T5 and CLIP embeddings computed now, before any panel is denoised, and
        used by the panels drawn inside. With a memory plan whose text encoders leave the device
        (`Plan.text_encoders_leave`) they leave once, after the last prompt; a prompt not given
        here still draws the same, the encoders coming back for it."""
        pipe = self.pipe
        device = pipe._execution_device
        with torch.no_grad():
            for prompt in dict.fromkeys(prompts):
                if prompt not in self._prompts:
                    if pipe.text_encoders_leave:
                        place_for_text(pipe, device)
                    embeds, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device)
                    self._prompts[prompt] = (embeds.cpu(), pooled.cpu())  # small; moved per panel
        if pipe.text_encoders_leave:
            place_for_denoising(pipe, device)
        else:
            release_offloaded_text_encoders(pipe)
        try:
            yield
        finally:
            self._prompts.clear()

    def image_size(self, multipliers: tuple[float, float], resolution: int | None = None) -> tuple[int, int]:
        """(width, height): the long side `resolution` (default 512), the short side by the
        frame's aspect, both on FLUX's 16-pixel grid."""
        long_side = resolution or DEFAULT_RESOLUTION
        stretch = max(multipliers)
        sides = [long_side * m / stretch for m in multipliers]
        return tuple(max(GRID, round(s / GRID) * GRID) for s in sides)  # type: ignore[return-value]

    def __call__(self, prompt, characters=(), regions=None, return_routing: bool = False,
                 num_inference_steps: int = 25, guidance_scale: float = 3.5, generator=None,
                 height: int | None = None, width: int | None = None, callback_on_step_end=None,
                 **_paper_settings) -> ComicOutput:
        characters = list(characters)
        height = height or DEFAULT_RESOLUTION
        width = width or DEFAULT_RESOLUTION
        text = {"prompt": prompt}
        if prompt in self._prompts:
            device = self.pipe._execution_device
            embeds, pooled = self._prompts[prompt]
            text = {"prompt": None, "prompt_embeds": embeds.to(device), "pooled_prompt_embeds": pooled.to(device)}
        out = self.pipe(**text, characters=characters, generator=generator, num_inference_steps=num_inference_steps,
                        height=height, width=width, guidance_scale=guidance_scale, return_routing=return_routing,
                        callback_on_step_end=callback_on_step_end)
        maps = None
        if return_routing:
            batch = len(out.images)
            if out.routing_maps is not None:
                # The released router has no background: every pixel goes to some character.
                routed = out.routing_maps.float().cpu()
                maps = torch.cat([routed, torch.zeros(batch, 1, height, width)], dim=1)
            else:
                maps = boxes_as_maps(regions or [], len(characters), batch, height, width)
        return ComicOutput(images=out.images, routing_maps=maps)


def boxes_as_maps(regions, count: int, batch: int, height: int, width: int) -> torch.Tensor:
    """Without the router (no or one character): each character's placement box stands for its
    map, the rest is background. (B, count+1, H, W)."""
    maps = torch.zeros(batch, count + 1, height, width)
    for index, box in enumerate(list(regions)[:count]):
        if box is None:
            maps[:, index] = 1.0
            continue
        x0, y0, x1, y1 = box
        maps[:, index, round(y0 * height):round(y1 * height), round(x0 * width):round(x1 * width)] = 1.0
    maps[:, count] = (1.0 - maps[:, :count].sum(dim=1)).clamp(min=0.0)
    return maps
