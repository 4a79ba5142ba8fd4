"""AnyStoryPipeline: a diffusers text-to-image pipeline plus characters that stay themselves.

`AnyStoryPipeline` is a `DiffusionPipeline` in two shapes that share one implementation:
`AnyStorySDPipeline` is a `StableDiffusionPipeline` and `AnyStoryXLPipeline` a
`StableDiffusionXLPipeline`, each with two more registered components: the CLIP image encoder (in
the base's own `image_encoder` slot, with its image processor as `feature_extractor`) and the
AnyStory adapter. Prompt encoding, guidance, scheduler, loop and decoding are the base class's
own `__call__`; characters reach the attention processors through `cross_attention_kwargs`.

The processors are put on the UNet by each call and taken off when it ends: between calls the
UNet is the base's, so two pipelines sharing it through `from_pipe` never see each other's state,
and `StableDiffusionPipeline.from_pipe(anystory_pipe)` draws plain SD. Without characters and with
subject strength 0 a call draws exactly what the base pipeline draws.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from PIL import Image
from transformers import (
    CLIPImageProcessorPil,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModel,
)

from ..errors import InputError, ModelError
from ..library_logging import library_logs_quiet
from ..loras import StyleLoraMixin, StyleLoras
from ..masks import prepare_reference
from .adapter import AnyStoryAdapter, check_fits, install
from .attention import AnyStoryContext, InjectionInputs
from .figures import figure_of, paste_step
from .guidance import guided_call_kwargs
from .weights import CharacterEncoding, load_adapter

# A region is a box (x0, y0, x1, y1) in 0..1 image coordinates, or a mask (H, W) of any size.
Region = tuple[float, float, float, float] | np.ndarray | Image.Image | torch.Tensor | None


@dataclass
class AnyStoryOutput(BaseOutput):
    images: list | np.ndarray | torch.Tensor  # as `output_type` asked (latents for "latent")
    # Per image (E, H, W): soft routing maps at image resolution, averaged over the cross-attention
    # layers of the last denoising step; entries are the characters in order, then the background.
    routing_maps: torch.Tensor | None = None  # (B, E, H, W)
    routing_layers: dict[str, torch.Tensor] | None = None  # layer -> (B, E, h, w), last step


def image_processor_for(adapter: AnyStoryAdapter) -> CLIPImageProcessorPil:
    """The CLIP preprocessing the adapter was trained with (its config's size, mean and std)."""
    config = adapter.spec
    return CLIPImageProcessorPil(
        size={"shortest_edge": config.image_size},
        crop_size={"height": config.image_size, "width": config.image_size},
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
    )


def _device_found_once(method):
    """diffusers finds a pipeline's execution device by walking every module of every component,
    milliseconds each time; it cannot change within one call, so each call finds it once
    (`_execution_device` returns it until the call returns)."""

    @functools.wraps(method)
    def found_once(self, *args, **kwargs):
        if self._call_device is not None:  # a call inside a call
            return method(self, *args, **kwargs)
        self._call_device = DiffusionPipeline._execution_device.fget(self)
        try:
            return method(self, *args, **kwargs)
        finally:
            self._call_device = None

    return found_once


class AnyStoryPipeline(StyleLoraMixin, DiffusionPipeline):
    """What both shapes share. Not built directly: `from_pipe` and `from_pretrained` called on
    this class pick the shape from the base pipeline or from the folder's model_index.json."""

    _base_class: type[DiffusionPipeline]  # the diffusers pipeline this shape extends
    _call_device: torch.device | None = None  # during a call: its execution device (`_device_found_once`)

    def _init_anystory(self, adapter: AnyStoryAdapter, model_id: str | None) -> None:
        if not isinstance(adapter, AnyStoryAdapter):
            raise ModelError(f"adapter must be an AnyStoryAdapter, got {type(adapter).__name__}")
        if self.image_encoder is None:
            raise ModelError("AnyStory needs a CLIP image encoder (image_encoder=CLIPVisionModel)")
        encoder_width = self.image_encoder.config.hidden_size
        if encoder_width != adapter.spec.image_embed_dim:
            raise ModelError(f"adapter expects image features of width {adapter.spec.image_embed_dim}, "
                             f"the image encoder gives {encoder_width}")
        check_fits(adapter.spec, self.unet)
        self.image_encoder.eval().requires_grad_(False)
        adapter.eval().requires_grad_(False)
        self.register_modules(adapter=adapter)
        if self.feature_extractor is None:
            self.register_modules(feature_extractor=image_processor_for(adapter))
        self.model_id = model_id or adapter.fingerprint()
        self._null_subject = None
        self._style_loras: StyleLoras | None = None

    # -----------------------------------------------------------------------------------------
    # building: the shape follows the base

    @classmethod
    def _shape_for(cls, pipeline) -> type[AnyStoryPipeline]:
        if cls is not AnyStoryPipeline:
            return cls
        if isinstance(pipeline, AnyStoryPipeline):
            return type(pipeline)
        for shape in (AnyStoryXLPipeline, AnyStorySDPipeline):
            if isinstance(pipeline, shape._base_class):
                return shape
        raise ModelError(f"AnyStory runs on a StableDiffusionPipeline or a StableDiffusionXLPipeline, "
                         f"got {type(pipeline).__name__}")

    @classmethod
    def from_pipe(cls, pipeline, image_encoder=None, adapter: AnyStoryAdapter | str | Path | None = None,
                  model_id: str | None = None, **kwargs):
        """A pipeline over `pipeline`'s components (no weights copied) plus the image encoder and
        the adapter (a module, or a file or folder written by `save_adapter`), as diffusers'
        `from_pipe`. Called on `AnyStoryPipeline`, the shape follows the base pipeline."""
        shape = cls._shape_for(pipeline)
        if adapter is not None and not isinstance(adapter, AnyStoryAdapter):
            adapter = load_adapter(adapter)
        unet = pipeline.unet
        if adapter is not None:
            adapter.to(device=unet.device, dtype=unet.dtype)
            kwargs.setdefault("feature_extractor", image_processor_for(adapter))
            kwargs["adapter"] = adapter
        if image_encoder is not None:
            kwargs["image_encoder"] = image_encoder.to(device=unet.device)
        elif not isinstance(pipeline, AnyStoryPipeline):
            kwargs.setdefault("image_encoder", None)  # refused by the constructor, in one line
        if model_id is not None:
            kwargs["model_id"] = model_id
        # diffusers' from_pipe casts every part to float32 unless told otherwise.
        if "torch_dtype" not in kwargs and "dtype" not in kwargs:
            kwargs["dtype"] = unet.dtype
        kwargs.update(shape._carried_options(pipeline, kwargs))
        with library_logs_quiet():  # its cast to that dtype warns once per part
            new = DiffusionPipeline.from_pipe.__func__(shape, pipeline, **kwargs)
        if hasattr(pipeline, "_progress_bar_config"):
            new.set_progress_bar_config(**pipeline._progress_bar_config)
        return new

    @classmethod
    def _carried_options(cls, pipeline, kwargs) -> dict:
        """Constructor options the base pipeline holds outside its config (none by default)."""
        return {}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' `from_pretrained`; called on `AnyStoryPipeline`, the shape is the one the
        folder's model_index.json names (ours, or the SD / SDXL base it extends: then pass
        `image_encoder=` and `adapter=`)."""
        if cls is AnyStoryPipeline:
            config = DiffusionPipeline.load_config(
                pretrained_model_name_or_path, local_files_only=kwargs.get("local_files_only", False),
                cache_dir=kwargs.get("cache_dir"), revision=kwargs.get("revision"))
            name = config.get("_class_name")
            shapes = {shape.__name__: shape for shape in (AnyStorySDPipeline, AnyStoryXLPipeline)}
            shapes.update({shape._base_class.__name__: shape for shape in shapes.values()})
            if name not in shapes:
                raise ModelError(f"{pretrained_model_name_or_path}: a {name} folder; AnyStory loads "
                                 f"{', '.join(sorted(shapes))} folders")
            cls = shapes[name]
        return super(AnyStoryPipeline, cls).from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def base(self) -> DiffusionPipeline:
        """The plain diffusers pipeline over the same components (it draws without characters);
        built on each access, it shares every module and copies nothing."""
        base_class = self._base_class
        modules, options = base_class._get_signature_keys(base_class)
        values = {name: getattr(self, name, None) for name in modules}
        values.update({name: self.config[name] for name in options if name in self.config})
        values.update(self._carried_options(self, values))
        plain = base_class(**values)
        plain.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        return plain

    # -----------------------------------------------------------------------------------------
    # style LoRAs (diffusers' adapter API, beside the model's own adapters)

    @property
    def style_loras(self) -> StyleLoras:
        if self._style_loras is None:
            self._style_loras = StyleLoras(self)
        return self._style_loras

    @property
    def max_characters(self) -> int:
        return self.adapter.config.max_characters

    @property
    def _execution_device(self) -> torch.device:
        if self._call_device is not None:
            return self._call_device
        return DiffusionPipeline._execution_device.fget(self)

    @property
    def _compute_dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def _is_xl(self) -> bool:
        return isinstance(self, StableDiffusionXLPipeline)

    # -----------------------------------------------------------------------------------------
    # characters

    def _image_features(self, rgb: np.ndarray) -> torch.Tensor:
        """(S, S, 3) uint8 -> (1, T, image_embed_dim): the image encoder's penultimate hidden states."""
        pixels = self.feature_extractor(images=[Image.fromarray(rgb)], return_tensors="pt").pixel_values
        pixels = pixels.to(device=self._execution_device, dtype=self.image_encoder.dtype)
        hidden = self.image_encoder(pixel_values=pixels, output_hidden_states=True).hidden_states
        return hidden[-2].to(self._compute_dtype)

    def _reference_latents(self, rgb: np.ndarray) -> torch.Tensor:
        vae = self.vae
        x = torch.from_numpy(rgb).permute(2, 0, 1)[None].to(device=self._execution_device, dtype=vae.dtype)
        latents = vae.encode(x / 127.5 - 1.0).latent_dist.mean  # the mean: deterministic
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).to(self._compute_dtype)

    @torch.no_grad()
    @_device_found_once
    def null_subject(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Subject tokens (m, d_c) and routing feature (d_r,) of an all-zero image: the background
        entry, and every entry's tokens in the unconditional branch."""
        if self._null_subject is None:
            size = self.adapter.config.reference_size
            tokens, routing = self.adapter.encode_features(
                self._image_features(np.zeros((size, size, 3), np.uint8)))
            self.maybe_free_model_hooks()
            self._null_subject = (tokens[0], routing[0])
        return self._null_subject

    @torch.no_grad()
    @_device_found_once
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
        tokens, routing = self.adapter.encode_features(self._image_features(reference.rgb))
        latents = self._reference_latents(reference.rgb)
        mask_latent = F.interpolate(
            torch.from_numpy(reference.mask)[None, None].to(self._execution_device, self._compute_dtype),
            size=latents.shape[-2:], mode="area",
        )
        features = self.adapter.reference_features(latents, mask_latent, (size, size))
        self.maybe_free_model_hooks()  # with CPU offload: every part back on the CPU
        return CharacterEncoding(
            subject_tokens=tokens[0],
            routing_feature=routing[0],
            reference_features={k: v[0] for k, v in features.items()},
            model_id=self.model_id,
            name=name,
            figure=torch.from_numpy(figure_of(reference.rgb, reference.mask)),
        )

    @torch.no_grad()
    @_device_found_once
    def identity_embeddings(self, images: Sequence[Image.Image], masks: Sequence) -> np.ndarray:
        """(K, D) float32 unit vectors: each image segmented by its mask (None: its alpha channel)
        and square-cropped as a reference is, then the image encoder's pooled output. The same for
        a reference and for a character's routed region of a panel, so that their cosine says
        how alike the two look (`scores.py`)."""
        size = self.adapter.config.reference_size
        crops = [Image.fromarray(prepare_reference(image, mask, size).rgb) for image, mask in zip(images, masks)]
        pixels = self.feature_extractor(images=crops, return_tensors="pt").pixel_values
        pixels = pixels.to(self._execution_device, self.image_encoder.dtype)
        pooled = self.image_encoder(pixel_values=pixels).pooler_output
        self.maybe_free_model_hooks()
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
        xl = self.unet.config.addition_embed_type == "text_time"
        width = self.unet.config.cross_attention_dim
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
                    raise InputError(f"{name} is for SDXL bases; this base ({self._base_class.__name__}) "
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
        return torch.stack([region_to_mask(r, latent_size, i) for i, r in enumerate(regions)]).to(self._execution_device)

    def _injection_inputs(self, characters, regions, rows, latent_size, subject_scale, reference_scale, record,
                          route=True, reference_guidance=True):
        null_tokens, null_routing = self.null_subject()
        device, dtype = self._execution_device, self._compute_dtype
        tokens = torch.stack([c.subject_tokens.to(device, dtype) for c in characters] + [null_tokens])
        routing = torch.stack([c.routing_feature.to(device, dtype) for c in characters] + [null_routing])
        references = {}
        if characters:
            for layer in characters[0].reference_features:
                stacked = torch.stack([c.reference_features[layer] for c in characters])
                references[layer] = stacked.to(device, dtype).expand(rows, -1, -1, -1)
        regions = self._region_masks(regions, latent_size)
        return InjectionInputs(
            subject_tokens=tokens.expand(rows, -1, -1, -1),
            routing_features=routing.expand(rows, -1, -1),
            reference_features=references,
            entry_valid=torch.ones(rows, len(characters) + 1, dtype=torch.bool, device=device),
            latent_size=latent_size,
            null_tokens=null_tokens,
            region_masks=None if regions is None else regions.expand(rows, -1, -1, -1),
            fixed_routes=None if route or not characters else _everywhere(rows, len(characters), latent_size, device),
            subject_scale=float(subject_scale),
            reference_scale=None if reference_scale is None else float(reference_scale),
            reference_guidance=bool(reference_guidance),
            record_maps=record,
        )

    @torch.no_grad()
    @_device_found_once
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
        latents, output_type, callback_on_step_end and its tensor inputs, cross_attention_kwargs,
        ...) go to the base pipeline's `__call__` unchanged; `return_dict=False` gives
        `AnyStoryOutput.to_tuple()`: (images,) and the routing maps when asked for.
        """
        characters = list(characters)
        self._check_inputs(characters, regions, subject_scale, reference_scale)
        embeds = self._check_prompt_inputs(
            prompt, base_kwargs.get("negative_prompt"), prompt_embeds, negative_prompt_embeds,
            pooled_prompt_embeds, negative_pooled_prompt_embeds)
        base_kwargs.update(embeds)
        return_dict = base_kwargs.pop("return_dict", True)
        scale = self.vae_scale_factor
        height = height or self.unet.config.sample_size * scale
        width = width or self.unet.config.sample_size * scale
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
            defaults = inspect.signature(self._base_class.__call__).parameters
            for name in ("num_inference_steps", "guidance_scale"):
                base_kwargs.setdefault(name, defaults[name].default)
            base_kwargs.update(guided_call_kwargs(
                self, base_kwargs["guidance_scale"], guidance_interval, base_kwargs["num_inference_steps"],
                base_kwargs.get("callback_on_step_end")))
        # The caller's cross_attention_kwargs (e.g. a LoRA "scale") travel beside ours.
        cross_attention_kwargs = {**(base_kwargs.pop("cross_attention_kwargs", None) or {}), "anystory": context}
        with self._processors_installed():
            result = super().__call__(
                prompt=prompt, height=height, width=width, num_images_per_prompt=num_images_per_prompt,
                cross_attention_kwargs=cross_attention_kwargs, return_dict=True, **base_kwargs,
            )
        maps = layers = None
        if return_routing:
            # The last forward's conditional rows (classifier-free guidance stacks them last).
            layers = {name: soft[-rows:].float() for name, soft in context.maps}
            maps = torch.stack([
                F.interpolate(m, size=(height, width), mode="bilinear", align_corners=False)
                for m in layers.values()
            ]).mean(dim=0)
        # (a BaseOutput keeps as entries only the fields given when it is made)
        output = AnyStoryOutput(images=result.images, routing_maps=maps, routing_layers=layers)
        return output if return_dict else output.to_tuple()

    @contextlib.contextmanager
    def _processors_installed(self):
        """The AnyStory processors on the UNet for one call, its own processors back after (also
        on an error): nothing of a call outlives it, and a UNet shared with other pipelines is
        theirs again between calls."""
        installed = install(self.adapter, self.unet)
        try:
            yield
        finally:
            installed.remove()

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
        inputs = base_kwargs.setdefault("callback_on_step_end_tensor_inputs", ["latents"])
        if "latents" not in inputs:  # the paste works on the latents, whatever the caller asked for
            base_kwargs["callback_on_step_end_tensor_inputs"] = [*inputs, "latents"]
        figures = [c.figure.cpu().numpy() for c, _ in pasted]
        return paste_step(self, figures, [box for _, box in pasted], size, float(paste_at),
                          base_kwargs.get("generator"), callback)

    @torch.no_grad()
    @_device_found_once
    def route_latents(self, latents: torch.Tensor, timestep: int, prompt: str | None,
                      characters: Sequence[CharacterEncoding], *,
                      prompt_embeds: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The router as a segmenter: one conditional UNet forward on given noisy `latents`
        (1, C, h, w) at `timestep`, with `prompt` or its `prompt_embeds` (1, T, D); returns each
        cross-attention layer's soft routing map (1, E, h', w'), characters in order, then the
        background. SD-style bases only (an SDXL UNet needs its added conditions, which this does
        not build)."""
        if self._is_xl:
            raise ModelError("route_latents supports SD-style bases (one text encoder) only")
        characters = list(characters)
        self._check_inputs(characters, None, 1.0, 0.0)
        self._check_prompt_inputs(prompt, None, prompt_embeds, None, None, None)
        device, dtype = self._execution_device, self._compute_dtype
        if prompt_embeds is not None:
            text = prompt_embeds.to(device, dtype)
        else:
            text, _ = self.encode_prompt(prompt, device, 1, False)
        inputs = self._injection_inputs(characters, None, 1, tuple(latents.shape[-2:]), 1.0, 0.0, True)
        context = AnyStoryContext(inputs)
        with self._processors_installed():
            self.unet(latents.to(device, dtype), timestep, encoder_hidden_states=text,
                      cross_attention_kwargs={"anystory": context})
        self.maybe_free_model_hooks()
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


# ---------------------------------------------------------------------------------------------
# the two shapes: a base pipeline's components, the image encoder and the adapter


class AnyStorySDPipeline(AnyStoryPipeline, StableDiffusionPipeline):
    """AnyStory on a `StableDiffusionPipeline` (SD 1.5 and the embedded default model)."""

    _base_class = StableDiffusionPipeline
    _optional_components = ["safety_checker", "feature_extractor"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder: CLIPVisionModel,
        adapter: AnyStoryAdapter,
        feature_extractor: CLIPImageProcessorPil | None = None,
        safety_checker=None,
        requires_safety_checker: bool = False,
        model_id: str | None = None,
    ):
        StableDiffusionPipeline.__init__(
            self, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=safety_checker, feature_extractor=feature_extractor, image_encoder=image_encoder,
            requires_safety_checker=requires_safety_checker)
        self._init_anystory(adapter, model_id)


class AnyStoryXLPipeline(AnyStoryPipeline, StableDiffusionXLPipeline):
    """AnyStory on a `StableDiffusionXLPipeline`."""

    _base_class = StableDiffusionXLPipeline
    _optional_components = ["tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "feature_extractor"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder: CLIPVisionModel,
        adapter: AnyStoryAdapter,
        feature_extractor: CLIPImageProcessorPil | None = None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
        model_id: str | None = None,
    ):
        StableDiffusionXLPipeline.__init__(
            self, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, image_encoder=image_encoder,
            feature_extractor=feature_extractor, force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=add_watermarker)
        self._init_anystory(adapter, model_id)

    @classmethod
    def _carried_options(cls, pipeline, kwargs) -> dict:
        # The watermark is the one option SDXL keeps outside its config: keep the base's choice.
        if "add_watermarker" in kwargs or not hasattr(pipeline, "watermark"):
            return {}
        return {"add_watermarker": getattr(pipeline, "watermark", None) is not None}
