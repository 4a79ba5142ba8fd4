"""AnyStoryPipeline: a diffusers text-to-image pipeline plus characters that stay themselves.

It wraps an existing ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` (the base),
installs the AnyStory attention processors on its UNet, and passes per-generation character data
to them through ``cross_attention_kwargs``; prompt encoding, guidance, scheduler and decoding are
the base pipeline's own. Without characters and with subject strength 0 it draws exactly what the
base pipeline draws.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import InputError, ModelError
from .figures import figure_of, paste_step
from .guidance import guided_call_kwargs
from ..loras import StyleLoraMixin, StyleLoras
from ..masks import prepare_reference
from .adapter import AnyStoryAdapter, install
from .attention import AnyStoryContext, InjectionInputs
from .weights import CharacterEncoding, load_adapter

# A region is a box (x0, y0, x1, y1) in 0..1 image coordinates, or a mask (H, W) of any size.
Region = tuple[float, float, float, float] | np.ndarray | Image.Image | torch.Tensor | None


@dataclass
class AnyStoryOutput:
    images: list  # PIL images (or whatever `output_type` asked the base pipeline for)
    # Per image (E, H, W): soft routing maps at image resolution, averaged over the cross-attention
    # layers of the last denoising step; entries are the characters in order, then the background.
    routing_maps: torch.Tensor | None = None  # (B, E, H, W)
    routing_layers: dict[str, torch.Tensor] | None = None  # layer -> (B, E, h, w), last step


class AnyStoryPipeline(StyleLoraMixin):
    def __init__(self, base, image_encoder, adapter: AnyStoryAdapter, model_id: str | None = None):
        from transformers import CLIPImageProcessorPil

        self.base = base
        self.image_encoder = image_encoder.eval().requires_grad_(False)
        self.adapter = adapter.eval().requires_grad_(False)
        config = adapter.spec
        encoder_width = image_encoder.config.hidden_size
        if encoder_width != config.image_embed_dim:
            raise ModelError(f"adapter expects image features of width {config.image_embed_dim}, "
                             f"the image encoder gives {encoder_width}")
        self.adapter.to(device=base.unet.device, dtype=base.unet.dtype)
        self.image_encoder.to(device=base.unet.device)
        self._installed = install(self.adapter, base.unet)
        self.model_id = model_id or adapter.fingerprint()
        self.clip_processor = CLIPImageProcessorPil(
            size={"shortest_edge": config.image_size},
            crop_size={"height": config.image_size, "width": config.image_size},
            image_mean=list(config.image_mean),
            image_std=list(config.image_std),
        )
        self._null_subject = None
        self._style_loras: StyleLoras | None = None
        self._offloaded = False

    @classmethod
    def from_pipe(cls, pipe, image_encoder, adapter: AnyStoryAdapter | str | Path, model_id: str | None = None):
        """Wrap a diffusers pipeline; `adapter` is a module or a file written by `save_adapter`."""
        if not isinstance(adapter, AnyStoryAdapter):
            adapter = load_adapter(adapter)
        return cls(pipe, image_encoder, adapter, model_id=model_id)

    def unload(self) -> None:
        """Restore the base pipeline's original attention processors."""
        self._installed.remove()

    # -----------------------------------------------------------------------------------------
    # style LoRAs (diffusers' adapter API on the base pipeline, beside the model's own adapters)

    @property
    def style_loras(self) -> StyleLoras:
        if self._style_loras is None:
            self._style_loras = StyleLoras(self.base)
        return self._style_loras

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: str | torch.device = "cuda") -> None:
        """Each of the base's models in CPU memory, on the GPU only while it runs (diffusers'
        `enable_model_cpu_offload`, which raises without CUDA). The adapter's injection layers stay
        on the GPU (the UNet calls them); its ReferenceNet and the image encoder go there only to
        encode a character."""
        self.base.enable_model_cpu_offload(gpu_id=gpu_id, device=device)
        target = self.device
        for name, child in self.adapter.named_children():
            child.to("cpu" if name == "reference_net" else target)
        self.image_encoder.to("cpu")
        self._offloaded = True

    @contextlib.contextmanager
    def _encoders_on_device(self):
        """With offload: the image encoder, ReferenceNet and VAE on the GPU for an encoding, back after."""
        if not self._offloaded:
            yield
            return
        modules = (self.image_encoder, self.adapter.reference_net, self.base.vae)
        for module in modules:
            module.to(self.device)
        try:
            yield
        finally:
            for module in modules:
                module.to("cpu")

    @property
    def device(self) -> torch.device:
        # With model offload, where the models run (they sit on the CPU between calls).
        return self.base._execution_device if self._offloaded else self.base.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base.unet.dtype

    @property
    def max_characters(self) -> int:
        return self.adapter.config.max_characters

    # -----------------------------------------------------------------------------------------
    # characters

    def _image_features(self, rgb: np.ndarray) -> torch.Tensor:
        """(S, S, 3) uint8 -> (1, T, image_embed_dim): the image encoder's penultimate hidden states."""
        pixels = self.clip_processor(images=[Image.fromarray(rgb)], return_tensors="pt").pixel_values
        pixels = pixels.to(device=self.device, dtype=self.image_encoder.dtype)
        hidden = self.image_encoder(pixel_values=pixels, output_hidden_states=True).hidden_states
        return hidden[-2].to(self.dtype)

    def _reference_latents(self, rgb: np.ndarray) -> torch.Tensor:
        vae = self.base.vae
        x = torch.from_numpy(rgb).permute(2, 0, 1)[None].to(device=self.device, dtype=vae.dtype)
        latents = vae.encode(x / 127.5 - 1.0).latent_dist.mean  # the mean: deterministic
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).to(self.dtype)

    @torch.no_grad()
    def null_subject(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Subject tokens (m, d_c) and routing feature (d_r,) of an all-zero image: the background
        entry, and every entry's tokens in the unconditional branch."""
        if self._null_subject is None:
            size = self.adapter.config.reference_size
            with self._encoders_on_device():
                tokens, routing = self.adapter.encode_features(
                    self._image_features(np.zeros((size, size, 3), np.uint8)))
            self._null_subject = (tokens[0], routing[0])
        return self._null_subject

    @torch.no_grad()
    def encode_character(self, image: Image.Image, mask=None, name: str = "") -> CharacterEncoding:
        """Encode a reference once: subject tokens, routing feature, ReferenceNet features.

        `mask` (PIL image or 2-D array, the image's size) marks the character; without it the
        image's alpha channel does. The ReferenceNet runs here, once, at t = 0 — never per step.
        """
        if not isinstance(image, Image.Image):
            raise InputError(f"character {name or '?'}: expected a PIL image, got {type(image).__name__}")
        size = self.adapter.config.reference_size
        try:
            reference = prepare_reference(image, mask, size)
        except InputError as exc:
            raise InputError(f"character {name or '?'}: {exc}") from None
        with self._encoders_on_device():
            tokens, routing = self.adapter.encode_features(self._image_features(reference.rgb))
            latents = self._reference_latents(reference.rgb)
            mask_latent = F.interpolate(
                torch.from_numpy(reference.mask)[None, None].to(self.device, self.dtype),
                size=latents.shape[-2:], mode="area",
            )
            features = self.adapter.reference_net(latents, mask_latent, (size, size))
        return CharacterEncoding(
            subject_tokens=tokens[0],
            routing_feature=routing[0],
            reference_features={k: v[0] for k, v in features.items()},
            model_id=self.model_id,
            name=name,
            figure=torch.from_numpy(figure_of(reference.rgb, reference.mask)),
        )

    @torch.no_grad()
    def identity_embeddings(self, images: Sequence[Image.Image], masks: Sequence) -> np.ndarray:
        """(K, D) float32 unit vectors: each image segmented by its mask (None: its alpha channel)
        and square-cropped as a reference is, then the image encoder's pooled output. The same for
        a reference and for a character's routed region of a panel, so that their cosine says
        how alike the two look (`scores.py`)."""
        size = self.adapter.config.reference_size
        crops = [Image.fromarray(prepare_reference(image, mask, size).rgb) for image, mask in zip(images, masks)]
        pixels = self.clip_processor(images=crops, return_tensors="pt").pixel_values
        with self._encoders_on_device():
            pooled = self.image_encoder(pixel_values=pixels.to(self.device, self.image_encoder.dtype)).pooler_output
        return F.normalize(pooled.float(), dim=-1).cpu().numpy()

    # -----------------------------------------------------------------------------------------
    # generation

    def _check_inputs(self, characters, regions, subject_scale, reference_scale):
        if len(characters) > self.max_characters:
            raise InputError(f"{len(characters)} characters in one image, but this model supports at "
                             f"most {self.max_characters}")
        for i, character in enumerate(characters):
            if not isinstance(character, CharacterEncoding):
                raise InputError(f"characters[{i}]: expected a CharacterEncoding from encode_character(), "
                                 f"got {type(character).__name__}")
            if character.model_id != self.model_id:
                raise InputError(f"{character.name or f'characters[{i}]'}: encoded by model "
                                 f"{character.model_id!r}, not by this one ({self.model_id!r}); "
                                 f"encode the character again")
        if regions is not None and len(regions) != len(characters):
            raise InputError(f"{len(regions)} regions for {len(characters)} characters; give one per "
                             f"character (None where the router decides alone)")
        if not math.isfinite(subject_scale):
            raise InputError(f"subject_scale must be a finite number, got {subject_scale}")
        if reference_scale is not None and not math.isfinite(reference_scale):
            raise InputError(f"reference_scale must be a finite number or None, got {reference_scale}")

    def _check_prompt_inputs(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                             pooled_prompt_embeds, negative_pooled_prompt_embeds) -> dict:
        """The text inputs checked as diffusers' `check_inputs` does, but as one typed error;
        returns the embedding arguments to pass on to the base pipeline (those given)."""
        if (prompt is None) == (prompt_embeds is None):
            raise InputError("give either prompt or prompt_embeds, not "
                             + ("both" if prompt is not None else "neither"))
        if prompt is not None:
            if not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                                and all(isinstance(p, str) for p in prompt))):
                raise InputError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise InputError("give either negative_prompt or negative_prompt_embeds, not both")
        # An SDXL UNet takes the pooled text embedding among its added conditions.
        xl = self.base.unet.config.addition_embed_type == "text_time"
        width = self.base.unet.config.cross_attention_dim
        given = {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds,
                 "pooled_prompt_embeds": pooled_prompt_embeds,
                 "negative_pooled_prompt_embeds": negative_pooled_prompt_embeds}
        for name, value in given.items():
            if value is not None and not isinstance(value, torch.Tensor):
                raise InputError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        for name in ("prompt_embeds", "negative_prompt_embeds"):
            value = given[name]
            if value is not None and (value.dim() != 3 or value.shape[-1] != width):
                raise InputError(f"{name} must have shape (batch, tokens, {width}) for this model, "
                                 f"got {tuple(value.shape)}")
        if prompt_embeds is None and negative_prompt_embeds is not None:
            raise InputError("negative_prompt_embeds needs prompt_embeds (give the prompt encoded too)")
        if negative_prompt_embeds is not None and negative_prompt_embeds.shape != prompt_embeds.shape:
            raise InputError(f"prompt_embeds and negative_prompt_embeds must have the same shape, got "
                             f"{tuple(prompt_embeds.shape)} and {tuple(negative_prompt_embeds.shape)}")
        if not xl:
            for name in ("pooled_prompt_embeds", "negative_pooled_prompt_embeds"):
                if given[name] is not None:
                    raise InputError(f"{name} is for SDXL bases; this base ({type(self.base).__name__}) "
                                     f"has one text encoder and takes prompt_embeds alone")
        else:
            for embeds, pooled in (("prompt_embeds", "pooled_prompt_embeds"),
                                   ("negative_prompt_embeds", "negative_pooled_prompt_embeds")):
                if given[embeds] is not None and given[pooled] is None:
                    raise InputError(f"an SDXL base needs {pooled} with {embeds} (both come from "
                                     f"encode_prompt)")
                if given[pooled] is not None and given[embeds] is None:
                    raise InputError(f"{pooled} was given without {embeds}")
                if given[pooled] is not None and (given[pooled].dim() != 2
                                                  or given[pooled].shape[0] != given[embeds].shape[0]):
                    raise InputError(f"{pooled} must have shape ({given[embeds].shape[0]}, width), "
                                     f"got {tuple(given[pooled].shape)}")
        return {name: value for name, value in given.items() if value is not None}

    def _region_masks(self, regions, latent_size) -> torch.Tensor | None:
        if regions is None or all(r is None for r in regions):
            return None
        return torch.stack([region_to_mask(r, latent_size, i) for i, r in enumerate(regions)]).to(self.device)

    def _injection_inputs(self, characters, regions, rows, latent_size, subject_scale, reference_scale, record,
                          route=True, reference_guidance=True):
        null_tokens, null_routing = self.null_subject()
        tokens = torch.stack([c.subject_tokens.to(self.device, self.dtype) for c in characters] + [null_tokens])
        routing = torch.stack([c.routing_feature.to(self.device, self.dtype) for c in characters] + [null_routing])
        references = {}
        if characters:
            for layer in characters[0].reference_features:
                stacked = torch.stack([c.reference_features[layer] for c in characters])
                references[layer] = stacked.to(self.device, self.dtype).expand(rows, -1, -1, -1)
        regions = self._region_masks(regions, latent_size)
        return InjectionInputs(
            subject_tokens=tokens.expand(rows, -1, -1, -1),
            routing_features=routing.expand(rows, -1, -1),
            reference_features=references,
            entry_valid=torch.ones(rows, len(characters) + 1, dtype=torch.bool, device=self.device),
            latent_size=latent_size,
            null_tokens=null_tokens,
            region_masks=None if regions is None else regions.expand(rows, -1, -1, -1),
            fixed_routes=None if route or not characters else _everywhere(rows, len(characters), latent_size, self.device),
            subject_scale=float(subject_scale),
            reference_scale=None if reference_scale is None else float(reference_scale),
            reference_guidance=bool(reference_guidance),
            record_maps=record,
        )

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        characters: Sequence[CharacterEncoding] = (),
        regions: Sequence[Region] | None = None,
        subject_scale: float = 1.0,
        reference_scale: float | None = 0.0,
        reference_guidance: bool = True,
        return_routing: bool = False,
        route: bool = True,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        guidance_interval: tuple[float, float] | None = None,
        figure_boxes: Sequence[tuple[float, float, float, float] | None] | None = None,
        paste_at: float | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        **base_kwargs,
    ) -> AnyStoryOutput:
        """Generate images with `characters` (from `encode_character`).

        subject_scale (η) weights the routed subject tokens; reference_scale (γ) is the bias on
        routed reference features (None switches them off). With `reference_guidance`, the
        unconditional half of classifier-free guidance draws without the references, so that
        guidance amplifies them as it does the caption and the subject tokens. `regions`, one per
        character, confine each character's routing to a box or mask. route=False replaces the
        router by every character at every pixel (the no-router ablation; how stage 1 trains a
        lone character).
        `guidance_interval` (low, high) applies classifier-free guidance only at timesteps
        t / T in that interval (`guidance.py`; None: at every step). With `paste_at` (a noise
        level t/T), each character with a box in `figure_boxes` has its reference figure pasted
        there, noised, at the first step at or below that level (`figures.py`; None: never).
        Instead of `prompt`, the text may come encoded, as diffusers pipelines take it:
        `prompt_embeds` (B, T, D) and optionally `negative_prompt_embeds` of the same shape; an
        SDXL base also needs the pooled ones, (B, D') each.
        Other keyword arguments (num_inference_steps, guidance_scale, generator, negative_prompt,
        output_type, callback_on_step_end, ...) go to the base pipeline unchanged.
        """
        characters = list(characters)
        self._check_inputs(characters, regions, subject_scale, reference_scale)
        embeds = self._check_prompt_inputs(
            prompt, base_kwargs.get("negative_prompt"), prompt_embeds, negative_prompt_embeds,
            pooled_prompt_embeds, negative_pooled_prompt_embeds)
        base_kwargs.update(embeds)
        scale = self.base.vae_scale_factor
        height = height or self.base.unet.config.sample_size * scale
        width = width or self.base.unet.config.sample_size * scale
        multiple = math.lcm(8, scale)  # the latent grid, and the base pipeline's own check (8)
        if height % multiple or width % multiple:
            raise InputError(f"height and width must be multiples of {multiple}, got {height}x{width}")
        if prompt_embeds is not None:
            rows = prompt_embeds.shape[0] * num_images_per_prompt
        else:
            rows = (1 if isinstance(prompt, str) else len(prompt)) * num_images_per_prompt
        inputs = self._injection_inputs(characters, regions, rows, (height // scale, width // scale),
                                        subject_scale, reference_scale, return_routing, route, reference_guidance)
        context = AnyStoryContext(inputs)
        if paste_at is not None:
            base_kwargs["callback_on_step_end"] = self._paste_callback(
                characters, figure_boxes, paste_at, (height, width), base_kwargs)
        if guidance_interval is not None:
            # The base pipeline's own defaults for the two arguments the interval needs (SD 1.5
            # guides at 7.5 and SDXL at 5.0 when the caller names no scale).
            defaults = inspect.signature(self.base.__call__).parameters
            for name in ("num_inference_steps", "guidance_scale"):
                base_kwargs.setdefault(name, defaults[name].default)
            base_kwargs.update(guided_call_kwargs(
                self.base, base_kwargs["guidance_scale"], guidance_interval, base_kwargs["num_inference_steps"],
                base_kwargs.get("callback_on_step_end")))
        result = self.base(
            prompt=prompt, height=height, width=width, num_images_per_prompt=num_images_per_prompt,
            cross_attention_kwargs={"anystory": context}, **base_kwargs,
        )
        output = AnyStoryOutput(images=result.images)
        if return_routing:
            # The last forward's conditional rows (classifier-free guidance stacks them last).
            layers = {name: maps[-rows:].float() for name, maps in context.maps}
            output.routing_layers = layers
            output.routing_maps = torch.stack([
                F.interpolate(m, size=(height, width), mode="bilinear", align_corners=False)
                for m in layers.values()
            ]).mean(dim=0)
        return output

    def _paste_callback(self, characters, figure_boxes, paste_at, size, base_kwargs):
        """The step callback that pastes the figures (chained before the caller's own)."""
        callback = base_kwargs.get("callback_on_step_end")
        if not characters:
            return callback
        if figure_boxes is None or len(figure_boxes) != len(characters):
            raise InputError(f"paste_at needs one figure box per character (None where none is pasted), "
                             f"got {'none' if figure_boxes is None else len(figure_boxes)} for {len(characters)}")
        pasted = [(c, box) for c, box in zip(characters, figure_boxes) if box is not None]
        for character, _ in pasted:
            if character.figure is None:
                raise InputError(f"{character.name or 'a character'}: its encoding has no figure to paste; "
                                 f"encode it again with encode_character()")
        if not pasted:
            return callback
        figures = [c.figure.cpu().numpy() for c, _ in pasted]
        return paste_step(self.base, figures, [box for _, box in pasted], size, float(paste_at),
                          base_kwargs.get("generator"), callback)

    @torch.no_grad()
    def route_latents(self, latents: torch.Tensor, timestep: int, prompt: str | None,
                      characters: Sequence[CharacterEncoding], *,
                      prompt_embeds: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The router as a segmenter: one conditional UNet forward on given noisy `latents`
        (1, C, h, w) at `timestep`, with `prompt` or its `prompt_embeds` (1, T, D); returns each
        cross-attention layer's soft routing map (1, E, h', w'), characters in order, then the
        background. SD-style bases only (an SDXL UNet needs its added conditions, which this does
        not build)."""
        if getattr(self.base, "text_encoder_2", None) is not None:
            raise ModelError("route_latents supports SD-style bases (one text encoder) only")
        characters = list(characters)
        self._check_inputs(characters, None, 1.0, 0.0)
        self._check_prompt_inputs(prompt, None, prompt_embeds, None, None, None)
        if prompt_embeds is not None:
            text = prompt_embeds.to(self.device, self.dtype)
        else:
            text, _ = self.base.encode_prompt(prompt, self.device, 1, False)
        inputs = self._injection_inputs(characters, None, 1, tuple(latents.shape[-2:]), 1.0, 0.0, True)
        context = AnyStoryContext(inputs)
        self.base.unet(latents.to(self.device, self.dtype), timestep, encoder_hidden_states=text,
                       cross_attention_kwargs={"anystory": context})
        return {name: maps.float() for name, maps in context.maps}


def _everywhere(rows: int, characters: int, size: tuple[int, int], device) -> torch.Tensor:
    """Gates without a router: every character at every pixel, the background entry nowhere —
    the sum of each character's attention, as in stage-1 training (sigma = 1 for its one subject)
    and in adapters without routing (the paper's motivation for the router)."""
    gates = torch.ones(rows, characters + 1, *size, device=device)
    gates[:, -1] = 0.0
    return gates


def region_to_mask(region: Region, size: tuple[int, int], index: int) -> torch.Tensor:
    """A box in 0..1 or a mask of any size -> (h, w) float mask at latent resolution."""
    h, w = size
    if region is None:
        return torch.ones(h, w)
    if isinstance(region, (tuple, list)):
        if len(region) != 4 or not all(isinstance(v, (int, float)) for v in region):
            raise InputError(f"regions[{index}]: a box is (x0, y0, x1, y1) in 0..1, got {region!r}")
        x0, y0, x1, y1 = region
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise InputError(f"regions[{index}]: box {tuple(region)} must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
        mask = torch.zeros(h, w)
        # At least one latent pixel, even for a thin box.
        r0, r1 = int(y0 * h), max(int(y0 * h) + 1, math.ceil(y1 * h))
        c0, c1 = int(x0 * w), max(int(x0 * w) + 1, math.ceil(x1 * w))
        mask[r0:r1, c0:c1] = 1.0
        return mask
    if isinstance(region, Image.Image):
        region = np.asarray(region.convert("L"), dtype=np.float32) / 255.0
    mask = torch.as_tensor(np.asarray(region, dtype=np.float32) if not isinstance(region, torch.Tensor) else region).float()
    if mask.dim() != 2 or mask.numel() == 0:
        raise InputError(f"regions[{index}]: a mask must be 2-D (H, W), got shape {tuple(mask.shape)}")
    if not (mask > 0.5).any():
        raise InputError(f"regions[{index}]: the mask is empty")
    return (F.interpolate(mask[None, None], size=size, mode="area")[0, 0] > 0.25).float()
