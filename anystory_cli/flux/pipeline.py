"""AnyStoryFluxPipeline: the released AnyStory weights for FLUX.1, as a diffusers FluxPipeline.

Every part is a registered component: FLUX's own (scheduler, VAE, both text encoders and
tokenizers, transformer), the Redux SigLIP encoder and its image processor, the subject and
router embedders, and `AnyStoryFluxAdapter` (the routing-map adapters). The reference and router
LoRAs are peft adapters of the transformer, switched on only for their own streams. So
diffusers' `to`, offloading, `components`, `save_pretrained`, `from_pipe` and LoRA loading work
on the whole.

`__call__` is FluxPipeline's denoising loop with three additions (numbered in the code): before
the loop, one transformer pass over the characters' reference latents at timestep 0 with the
reference LoRA records each block's keys and values; in each step inside its windows, the
subject tokens join the text stream and a `StepState` for that transformer call reaches the
attention processors through `joint_attention_kwargs["anystory"]`; after the loop, the router's
maps become `routing_maps`. The windows follow the loop's step index, so the negative pass of
true CFG sees the same step as the positive one.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.utils import BaseOutput
from PIL import Image
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
    SiglipImageProcessorPil,
    SiglipVisionModel,
    T5EncoderModel,
    T5TokenizerFast,
)

from ..errors import InputError, ModelError
from ..library_logging import library_logs_quiet, progress_bars_off
from ..loras import StyleLoraMixin, StyleLoras
from .adapter import AnyStoryFluxAdapter
from .character import FluxCharacter
from .embedders import SubjectEmbedder
from .folders import check_flux_model
from .memory_apply import place_for_denoising, place_for_text, release_offloaded_text_encoders
from .parts import (
    anystory_parts,
    check_parts,
    first_line,
    plain_state_dict,
    saved_pipeline_folder,
    saved_pipeline_on_hub,
    transformer_config,
)
from .processors import REFERENCE_ADAPTER, ROUTER_ADAPTER, ReferenceKV, StepState, install_processors, through
from .weights import load_lora_part

LORA_PARTS = {"ref": REFERENCE_ADAPTER, "router": ROUTER_ADAPTER}  # checkpoint part -> adapter name


@dataclass
class FluxOutput(BaseOutput):
    """images: PIL images, an array, a tensor, or packed latents (output_type); routing_maps
    (B, N, H, W) at image resolution: per character, the share of the last routed step's blocks
    that sent each pixel to it (no background slot). None unless asked for, or with no router."""

    images: object
    routing_maps: torch.Tensor | None = None


AnyStoryFluxPipelineOutput = FluxOutput


def _step_window(window: Sequence[float], steps: int, what: str) -> range:
    try:
        start, end = (float(x) for x in window)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be two fractions (start, end) of the schedule, got {window!r}") from None
    if not 0.0 <= start <= end <= 1.0:
        raise InputError(f"{what} must satisfy 0 <= start <= end <= 1, got ({start}, {end})")
    return range(int(steps * start + 0.5), int(steps * end + 0.5))


@dataclass
class _Characters:
    """One call's characters, as the denoising loop adds them."""

    count: int
    subject_tokens: torch.Tensor | None  # (1, N*81, D), scaled
    router_tokens: torch.Tensor | None   # (1, N*9, D) when the router is on
    reference: ReferenceKV | None
    subject_steps: range
    reference_steps: range


class AnyStoryFluxPipeline(StyleLoraMixin, FluxPipeline):
    """The released AnyStory model on FLUX.1-dev + FLUX.1-Redux-dev (see docs/flux.md)."""

    model_cpu_offload_seq = ("text_encoder->text_encoder_2->redux_image_encoder->subject_embedder->"
                             "router_embedder->transformer->vae")
    _optional_components = ["image_encoder", "feature_extractor"]
    # The routing-map adapters run inside the transformer's forward, called by its processors: they
    # stay on the execution device (a small part: 0.2 GiB in bf16 for FLUX.1-dev).
    _exclude_from_cpu_offload = ["anystory_adapter"]
    _callback_tensor_inputs = ["latents", "prompt_embeds"]

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        text_encoder_2: T5EncoderModel,
        tokenizer_2: T5TokenizerFast,
        transformer: FluxTransformer2DModel,
        redux_image_encoder: SiglipVisionModel,
        redux_feature_extractor: SiglipImageProcessorPil,
        subject_embedder: SubjectEmbedder,
        router_embedder: SubjectEmbedder,
        anystory_adapter: AnyStoryFluxAdapter,
        image_encoder: CLIPVisionModelWithProjection = None,
        feature_extractor: CLIPImageProcessor = None,
        reference_size: int = 512,
    ):
        super().__init__(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
                         image_encoder=image_encoder, feature_extractor=feature_extractor)
        if reference_size <= 0 or reference_size % 16:
            raise InputError(f"reference_size must be a positive multiple of 16, got {reference_size}")
        parts = {"redux_image_encoder": redux_image_encoder, "redux_feature_extractor": redux_feature_extractor,
                 "subject_embedder": subject_embedder, "router_embedder": router_embedder,
                 "anystory_adapter": anystory_adapter}
        self.register_modules(**parts)
        # diffusers reads a class in a folder named like one of its pipelines ("flux") as that
        # pipeline's: model_index.json names our own classes by their full module path.
        self.register_to_config(**{name: (type(part).__module__, type(part).__name__) for name, part in parts.items()
                                   if type(part).__module__.startswith(__name__.split(".")[0] + ".")})
        self.register_to_config(reference_size=reference_size)
        self.model_id = ""
        # Where a call keeps the reference keys and values (None: on the execution device; "cpu"
        # with offloading memory plans, `memory_apply.apply_plan`).
        self.reference_kv_device: str | torch.device | None = None
        # True with a memory plan whose text encoders leave the device after encoding the prompts:
        # they and the transformer take turns on it (`memory_apply.place_for_text/_denoising`).
        self.text_encoders_leave = False
        self._style_loras: StyleLoras | None = None
        check_parts(transformer, redux_image_encoder, subject_embedder, router_embedder, anystory_adapter)
        self.lora_layers = self._install_loras()
        install_processors(transformer)

    def _install_loras(self) -> dict[str, int]:
        """The adapter's pending LoRA files into the transformer (a loaded folder); then the layers
        each LoRA is on. ModelError when the transformer carries no AnyStory LoRAs at all."""
        transformer, adapter = self.transformer, self.anystory_adapter
        for part, name in LORA_PARTS.items():
            if name in adapter.pending_loras:
                state_dict, metadata, source = adapter.pending_loras.pop(name)
                load_lora_part(self, source, part, state_dict, name, transformer.dtype, metadata)
        missing = [name for name in LORA_PARTS.values() if name not in (getattr(transformer, "peft_config", None) or {})]
        if missing:
            raise ModelError(f"the transformer carries no {missing[0]} LoRA: build AnyStoryFluxPipeline with "
                             f"from_pretrained(base, redux=, adapter=), from_pipe(flux_pipe, redux=, adapter=) or "
                             f"from a folder that save_pretrained wrote")
        self._main_stream_adapters()
        return {part: _landed(transformer, name) for part, name in LORA_PARTS.items()}

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, base: str | os.PathLike | None = None, redux: str | os.PathLike | None = None,
                        adapter: str | os.PathLike | None = None, reference_size: int | None = None,
                        torch_dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                        **kwargs) -> AnyStoryFluxPipeline:
        """A folder that `save_pretrained` wrote (nothing else needed), or: FLUX.1 folder (or hub
        id) `base`, FLUX.1-Redux folder (or hub id) `redux`, the AnyStory checkpoint file
        `adapter`. Defaults: CUDA in bf16 when available, else CPU in fp32 (MPS: bf16). Other keyword
        arguments go to DiffusionPipeline.from_pretrained: parts to use instead of the folder's
        (`transformer=...`), `quantization_config`, `variant`, ..."""
        base = base if base is not None else kwargs.pop("pretrained_model_name_or_path", None)
        if base is None:
            raise ModelError("from_pretrained needs a FLUX.1 folder or hub id, or a saved AnyStory pipeline folder")
        torch_dtype = torch_dtype or kwargs.pop("dtype", None)
        target = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch_dtype or default_dtype(target)
        if reference_size is not None:
            kwargs["reference_size"] = reference_size
        saved = saved_pipeline_folder(base, cls.__name__)
        if saved is None and redux is None and adapter is None:
            saved = saved_pipeline_on_hub(base, cls.__name__)
        try:
            with progress_bars_off(), library_logs_quiet():
                if saved is not None:
                    if redux is not None or adapter is not None:
                        raise ModelError(f"{saved}: a saved AnyStory pipeline holds its Redux parts and adapter; "
                                         f"load it without redux= and adapter=")
                    pipe = super().from_pretrained(str(saved), dtype=dtype, **kwargs)
                    model_id = f"flux:{saved.name}"
                else:
                    if redux is None or adapter is None:
                        raise ModelError("AnyStory on FLUX needs redux= (FLUX.1-Redux-dev) and adapter= "
                                         "(anystory_flux.bin)")
                    base_dir, redux_dir, adapter_file = check_flux_model(base, redux, adapter)
                    config = kwargs["transformer"].config if "transformer" in kwargs else transformer_config(base_dir)
                    parts = anystory_parts(redux_dir, adapter_file, config, dtype)
                    pipe = super().from_pretrained(str(base_dir), dtype=dtype, **parts, **kwargs)
                    model_id = f"flux:{base_dir.name}:{adapter_file.name}"
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise ModelError(f"{base}: could not load ({first_line(exc)})") from None
        pipe.model_id = model_id
        pipe.set_progress_bar_config(disable=True)
        if "device_map" not in kwargs:
            with library_logs_quiet():  # diffusers' `to` looks up (and so imports) every part's class
                pipe.to(target)
        return pipe

    @classmethod
    def from_pipe(cls, pipeline, redux: str | os.PathLike | None = None, adapter: str | os.PathLike | None = None,
                  **kwargs) -> AnyStoryFluxPipeline:
        """A pipeline on `pipeline`'s parts, without copying them: a FluxPipeline with `redux=`
        and `adapter=` (the LoRAs are added to its transformer, inactive on its own calls), or
        another AnyStoryFluxPipeline. Other keyword arguments as DiffusionPipeline.from_pipe."""
        if kwargs.get("torch_dtype") is None:  # diffusers' from_pipe casts to fp32 otherwise
            kwargs.pop("torch_dtype", None)
            kwargs.setdefault("dtype", pipeline.transformer.dtype)
        if redux is not None or adapter is not None or not isinstance(pipeline, cls):
            if redux is None or adapter is None:
                raise ModelError(f"from_pipe of a {type(pipeline).__name__} needs redux= (FLUX.1-Redux-dev) and "
                                 f"adapter= (anystory_flux.bin)")
            _, redux_dir, adapter_file = check_flux_model(None, redux, adapter)
            with progress_bars_off(), library_logs_quiet():
                parts = anystory_parts(redux_dir, adapter_file, pipeline.transformer.config,
                                        pipeline.transformer.dtype)
            for module in parts.values():
                if isinstance(module, torch.nn.Module):
                    module.to(pipeline.device)
            kwargs = {**parts, **kwargs}
        with library_logs_quiet():
            pipe = super().from_pipe(pipeline, **kwargs)
        pipe.set_progress_bar_config(disable=True)
        pipe.model_id = getattr(pipeline, "model_id", "") or (
            f"flux:{Path(str(pipeline.config.get('_name_or_path', 'flux'))).name}:{Path(str(adapter)).name}"
            if adapter is not None else "")
        return pipe

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """One folder that `AnyStoryFluxPipeline.from_pretrained(folder)` loads alone: every
        component in its own folder (the transformer as plain FLUX weights), and the reference
        and router LoRAs as diffusers LoRA files in `anystory_adapter/`. Style LoRAs are not
        part of the model and are not saved."""
        with plain_state_dict(self.transformer):
            super().save_pretrained(save_directory, **kwargs)
        self.anystory_adapter.save_loras(Path(save_directory) / "anystory_adapter", self.transformer)

    @property
    def reference_size(self) -> int:
        return self.config.reference_size

    # ------------------------------------------------------------------ characters
    @torch.no_grad()
    def encode_character(self, image: Image.Image, mask: Image.Image | None = None,
                         generator: torch.Generator | None = None, name: str = "") -> FluxCharacter:
        """Encode one character from `image` and its `mask` (L, white on the character; None: the
        image's alpha channel, else the whole image). `generator` draws the reference latent's VAE
        sample (one draw per call: encode characters in order with one generator for
        reproducible results)."""
        if not isinstance(image, Image.Image):
            raise InputError(f"encode_character: expected a PIL image, got {type(image).__name__}")
        if mask is None:
            mask = image.getchannel("A") if "A" in image.getbands() else Image.new("L", image.size, 255)
        elif not isinstance(mask, Image.Image):
            raise InputError(f"encode_character: expected the mask as a PIL image, got {type(mask).__name__}")
        rgb, mask = image.convert("RGB"), mask.convert("L")
        device, dtype = self._execution_device, self.transformer.dtype
        encoder, processor = self.redux_image_encoder, self.redux_feature_extractor

        # Subject and router tokens: SigLIP on the masked image, pooled over the mask's patches.
        pixels = processor.preprocess(images=rgb, return_tensors="pt").pixel_values
        coverage = processor.preprocess(images=mask.convert("RGB"), resample=Image.NEAREST, do_normalize=False,
                                        return_tensors="pt").pixel_values
        features = encoder((pixels * coverage).to(device=device, dtype=encoder.dtype)).last_hidden_state
        side = encoder.config.image_size // encoder.config.patch_size
        patches = F.adaptive_avg_pool2d(coverage.mean(dim=1, keepdim=True).to(device=device, dtype=dtype), side)
        patches = (patches > 0).to(dtype).flatten(2).transpose(1, 2)
        features = features.to(dtype)
        subject_tokens = self.subject_embedder(features, patches)
        router_tokens = self.router_embedder(features, patches)

        # Reference: the masked image's VAE latent at reference_size, packed into FLUX tokens.
        size, vae = self.reference_size, self.vae
        picture = self.image_processor.preprocess(rgb, height=size, width=size)
        weight = torch.from_numpy(np.array(mask.resize((size, size), resample=Image.NEAREST))).float() / 255.0
        weight = weight[None, None]
        latent = vae.encode((picture * weight).to(device=device, dtype=vae.dtype)).latent_dist.sample(generator)
        latent = (latent - vae.config.shift_factor) * vae.config.scaling_factor
        packed = self._pack_latents(latent, *latent.shape)
        tokens = F.adaptive_avg_pool2d(weight, size // 16) > 0
        self.maybe_free_model_hooks()
        return FluxCharacter(
            subject_tokens=subject_tokens, router_tokens=router_tokens, reference_latents=packed,
            reference_mask=tokens.flatten(2).transpose(1, 2).to(device=device, dtype=dtype),
            reference_size=size, name=name, model_id=self.model_id)

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        """(K, D) float32 unit vectors: SigLIP's pooled output of each RGB image (identity scores)."""
        encoder = self.redux_image_encoder
        pixels = self.redux_feature_extractor.preprocess(images=[i.convert("RGB") for i in images],
                                                         return_tensors="pt").pixel_values
        pooled = encoder(pixels.to(device=self._execution_device, dtype=encoder.dtype)).pooler_output
        return F.normalize(pooled.float(), dim=-1).cpu().numpy()

    def _check_characters(self, characters: list) -> None:
        width = self.transformer.config.joint_attention_dim
        channels = self.transformer.config.in_channels
        tokens = (self.reference_size // 16) ** 2
        for i, character in enumerate(characters):
            where = f"characters[{i}]" + (f" ({character.name})" if getattr(character, "name", "") else "")
            if not isinstance(character, FluxCharacter):
                raise InputError(f"{where}: expected a FluxCharacter from encode_character(), "
                                 f"got {type(character).__name__}")
            if (character.subject_tokens.shape[-1] != width or character.reference_latents.shape[-1] != channels
                    or character.reference_latents.shape[1] != tokens):
                raise InputError(f"{where}: encoded for another model or reference size "
                                 f"({character.reference_size}); encode it again with this pipeline")

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        characters: Sequence[FluxCharacter] = (),
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float = 1.0,
        height: int = 512,
        width: int = 512,
        num_inference_steps: int = 25,
        sigmas: list[float] | None = None,
        guidance_scale: float = 3.5,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        max_sequence_length: int = 512,
        router: bool | None = None,
        reference_window: tuple[float, float] | None = None,
        redux_window: tuple[float, float] = (0.1, 0.3),
        redux_scale: float = 0.6,
        reference_mask: bool = True,
        reference_shift: float = 0.0,
        return_routing: bool = False,
    ) -> FluxOutput | tuple:
        """Draw `prompt` with `characters` (from `encode_character`). The FluxPipeline arguments
        mean what they mean there; the AnyStory ones:

        router: route image tokens among the characters (None: on with two or more);
        reference_window / redux_window: the fractions (start, end) of the schedule during which
        the reference and the subject tokens take part (reference None: (0, 1) with one character,
        (0.09, 1) with more); redux_scale scales the subject tokens; reference_mask keeps image and
        text tokens off the reference's background; reference_shift is a bias added on every
        reference key; return_routing: the router's maps in the output.

        With true CFG (`true_cfg_scale` > 1 and a negative prompt) the negative pass gets the
        reference keys and values and the router, in the same steps as the positive pass, and no
        subject tokens (docs/flux.md says why)."""
        characters = list(characters)
        self._check_characters(characters)
        count = len(characters)
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        # 1. Check inputs (FluxPipeline's checks, then one prompt per call with characters)
        self.check_inputs(prompt, prompt_2, height, width, negative_prompt=negative_prompt,
                          negative_prompt_2=negative_prompt_2, prompt_embeds=prompt_embeds,
                          negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                          negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          max_sequence_length=max_sequence_length)
        if count and prompt is not None and not isinstance(prompt, str) and len(set(prompt)) > 1:
            # The reference stream is conditioned on the prompt's pooled embedding: one per call.
            raise InputError("with characters, draw one prompt per call (num_images_per_prompt for more images)")
        if count and prompt is None and pooled_prompt_embeds is not None and \
                not bool((pooled_prompt_embeds == pooled_prompt_embeds[:1]).all()):
            raise InputError("with characters, draw one prompt per call (num_images_per_prompt for more images)")
        self._guidance_scale = guidance_scale
        self._joint_attention_kwargs = dict(joint_attention_kwargs or {})
        self._current_timestep = None
        self._interrupt = False
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        device = self._execution_device

        # 2. Encode the prompts (and the negative prompts for true CFG)
        lora_scale = self._joint_attention_kwargs.get("scale")
        has_negative = negative_prompt is not None or (
            negative_prompt_embeds is not None and negative_pooled_prompt_embeds is not None)
        do_true_cfg = true_cfg_scale > 1 and has_negative
        if self.text_encoders_leave and (prompt_embeds is None or (do_true_cfg and negative_prompt_embeds is None)):
            place_for_text(self, device)
        prompt_embeds, pooled_prompt_embeds, text_ids = self.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            device=device, num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length,
            lora_scale=lora_scale)
        if do_true_cfg:
            negative_prompt_embeds, negative_pooled_prompt_embeds, negative_text_ids = self.encode_prompt(
                prompt=negative_prompt, prompt_2=negative_prompt_2, prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=negative_pooled_prompt_embeds, device=device,
                num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length,
                lora_scale=lora_scale)
        if self.text_encoders_leave:  # before the first transformer call
            place_for_denoising(self, device)
        else:
            release_offloaded_text_encoders(self)

        # 3. Latents and timesteps
        latents, latent_image_ids = self.prepare_latents(
            batch_size * num_images_per_prompt, self.transformer.config.in_channels // 4, height, width,
            prompt_embeds.dtype, device, generator, latents)
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps) if sigmas is None else sigmas
        if hasattr(self.scheduler.config, "use_flow_sigmas") and self.scheduler.config.use_flow_sigmas:
            sigmas = None
        mu = calculate_shift(latents.shape[1], self.scheduler.config.get("base_image_seq_len", 256),
                             self.scheduler.config.get("max_image_seq_len", 4096),
                             self.scheduler.config.get("base_shift", 0.5), self.scheduler.config.get("max_shift", 1.15))
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device,
                                                            sigmas=sigmas, mu=mu)
        num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)
        self._num_timesteps = len(timesteps)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32).expand(latents.shape[0])

        # 4. AnyStory: the characters' tokens, and the reference pass (keys and values of every block)
        run = self._prepare_characters(characters, pooled_prompt_embeds, guidance_scale, router, reference_window,
                                       redux_window, redux_scale, reference_mask, reference_shift,
                                       num_inference_steps)
        routing: list = []

        # 5. Denoising loop
        self.scheduler.set_begin_index(0)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                timestep = t.expand(latents.shape[0]).to(latents.dtype)
                with self.transformer.cache_context("cond"):
                    text, ids, state = self._step_inputs(run, i, prompt_embeds, text_ids, subjects=True,
                                                         timestep=timestep / 1000, guidance=guidance,
                                                         pooled=pooled_prompt_embeds)
                    noise_pred = self.transformer(
                        hidden_states=latents, timestep=timestep / 1000, guidance=guidance,
                        pooled_projections=pooled_prompt_embeds, encoder_hidden_states=text, txt_ids=ids,
                        img_ids=latent_image_ids, joint_attention_kwargs=self._call_kwargs(state),
                        return_dict=False)[0]
                if state is not None and state.routing:
                    routing = state.routing
                if do_true_cfg:
                    with self.transformer.cache_context("uncond"):
                        text, ids, state = self._step_inputs(run, i, negative_prompt_embeds, negative_text_ids,
                                                             subjects=False, timestep=timestep / 1000,
                                                             guidance=guidance, pooled=negative_pooled_prompt_embeds)
                        negative_noise_pred = self.transformer(
                            hidden_states=latents, timestep=timestep / 1000, guidance=guidance,
                            pooled_projections=negative_pooled_prompt_embeds, encoder_hidden_states=text, txt_ids=ids,
                            img_ids=latent_image_ids, joint_attention_kwargs=self._call_kwargs(state),
                            return_dict=False)[0]
                    noise_pred = negative_noise_pred + true_cfg_scale * (noise_pred - negative_noise_pred)

                latents_dtype = latents.dtype
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                if latents.dtype != latents_dtype and torch.backends.mps.is_available():
                    latents = latents.to(latents_dtype)

                if callback_on_step_end is not None:
                    tensors = {"latents": latents, "prompt_embeds": prompt_embeds}
                    outputs = callback_on_step_end(self, i, t, {k: tensors[k] for k in callback_on_step_end_tensor_inputs})
                    latents = outputs.pop("latents", latents)
                    prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()
        self._current_timestep = None

        # 6. Decode
        if output_type == "latent":
            image = latents
        else:
            latents = self._unpack_latents(latents, height, width, self.vae_scale_factor)
            latents = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor
            image = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()

        # 7. Routing maps
        maps = None
        if return_routing and routing:
            rows, cols = height // (self.vae_scale_factor * 2), width // (self.vae_scale_factor * 2)
            maps = torch.stack(routing).float().mean(dim=0).unflatten(2, (rows, cols))
            maps = F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False)
        if not return_dict:
            return (image, maps)
        return FluxOutput(images=image, routing_maps=maps)

    def _call_kwargs(self, state: StepState | None) -> dict:
        """The caller's joint_attention_kwargs, with this transformer call's AnyStory state."""
        return {**self._joint_attention_kwargs, "anystory": state} if state is not None else self._joint_attention_kwargs

    def _prepare_characters(self, characters, pooled, guidance_scale, router, reference_window, redux_window,
                            redux_scale, reference_mask, reference_shift, steps) -> _Characters:
        count = len(characters)
        router = count >= 2 if router is None else bool(router)
        if reference_window is None:
            reference_window = (0.0, 1.0) if count <= 1 else (0.09, 1.0)
        subject_steps = _step_window(redux_window, steps, "redux_window")
        reference_steps = _step_window(reference_window, steps, "reference_window")
        run = _Characters(count=count, subject_tokens=None, router_tokens=None, reference=None,
                          subject_steps=subject_steps if count else range(0),
                          reference_steps=reference_steps if count else range(0))
        if count:
            device, dtype = self._execution_device, self.transformer.dtype
            run.subject_tokens = torch.cat([c.subject_tokens.to(device, dtype) for c in characters], 1) * redux_scale
            if router:
                run.router_tokens = torch.cat([c.router_tokens.to(device, dtype) for c in characters], 1)
            if len(reference_steps):
                run.reference = self._reference_pass(characters, pooled, guidance_scale, reference_mask,
                                                     reference_shift)
        return run

    def _step_inputs(self, run: _Characters, step: int, text: torch.Tensor, text_ids: torch.Tensor, subjects: bool,
                     timestep, guidance, pooled) -> tuple[torch.Tensor, torch.Tensor, StepState | None]:
        """One transformer call's text stream, its position ids and AnyStory state (None: plain).
        `subjects`: the subject tokens join the text stream in their window (not on the negative
        pass); the reference and the router follow the step's windows on both passes."""
        subjects_on = subjects and step in run.subject_steps
        reference_on = step in run.reference_steps
        if not (subjects_on or reference_on):
            return text, text_ids, None
        batch = text.shape[0]
        subject_len = 0
        if subjects_on:
            subject_len = run.subject_tokens.shape[1]
            text = torch.cat([text, run.subject_tokens.expand(batch, -1, -1).to(text.dtype)], 1)
            text_ids = torch.cat([text_ids, text_ids.new_zeros(subject_len, 3)], 0)
        begin_router = None
        if run.router_tokens is not None:
            transformer = self.transformer

            def begin_router():
                """The router stream's input and the step's embedding, as the transformer makes them."""
                dtype = transformer.dtype
                scaled = timestep.to(dtype) * 1000
                temb = (transformer.time_text_embed(scaled, pooled) if guidance is None
                        else transformer.time_text_embed(scaled, guidance.to(dtype) * 1000, pooled))
                tokens = run.router_tokens.expand(batch, -1, -1).to(temb.device)
                return through(transformer.context_embedder, tokens, ROUTER_ADAPTER), temb

        state = StepState(text_len=text.shape[1], subject_len=subject_len, characters=run.count,
                          reference=run.reference if reference_on else None, routing_maps=self.anystory_adapter,
                          begin_router=begin_router)
        return text, text_ids, state

    def _reference_pass(self, characters, pooled, guidance_scale, reference_mask, reference_shift) -> ReferenceKV:
        """Each character's reference latent through the transformer alone (no text), at
        timestep 0, with the reference LoRA; records every block's keys and values."""
        transformer, device, dtype = self.transformer, self._execution_device, self.transformer.dtype
        count = len(characters)
        latents = torch.cat([c.reference_latents.to(device, dtype) for c in characters], 0)
        side = self.reference_size // 16
        ids = self._prepare_latent_image_ids(1, side, side, device, dtype)
        ids[:, 2] -= side  # the reference sits one reference-width left of the image
        store = None if self.reference_kv_device is None else torch.device(self.reference_kv_device)
        capture = ReferenceKV(store=store, pin=store is not None and store.type == "cpu" and device.type == "cuda")
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full([count], guidance_scale, device=device, dtype=torch.float32)
        state = StepState(text_len=0, subject_len=0, characters=count, reference=None, capture=capture)
        transformer.set_adapters([REFERENCE_ADAPTER], [1.0])
        try:
            transformer(
                hidden_states=latents,
                encoder_hidden_states=latents.new_zeros(count, 0, transformer.config.joint_attention_dim),
                pooled_projections=pooled[:1].expand(count, -1), timestep=latents.new_zeros(count),
                img_ids=ids, txt_ids=ids.new_zeros(0, 3), guidance=guidance,
                joint_attention_kwargs={"anystory": state}, return_dict=False)
        finally:
            self._main_stream_adapters()
        # (N, L, H, D) per character -> (1, N*L, H, D), characters in order along the keys.
        capture.kv = {name: tuple(t.flatten(0, 1).unsqueeze(0) for t in kv) for name, kv in capture.kv.items()}
        masks = torch.cat([c.reference_mask.to(device, dtype) for c in characters], 1)[..., 0]  # (1, N*L)
        bias = torch.full_like(masks, float(reference_shift))
        if reference_mask:
            bias = bias + (masks - 1.0) * 100.0
        capture.mask_bias = bias
        return capture

    # ------------------------------------------------------------------ style LoRAs
    @property
    def style_loras(self) -> StyleLoras:
        """Style LoRAs on the transformer: on for the image and text streams, off for the
        reference pass (which draws the character as it is) and the router stream (which decides
        where each character is); the model's own reference and router LoRAs stay off outside
        their streams, as without a style."""
        if self._style_loras is None:
            self._style_loras = StyleLoras(self, own=[], on_change=self._main_stream_adapters)
        return self._style_loras

    def _main_stream_adapters(self) -> None:
        """The adapters of the image and text streams: the style LoRAs, or none."""
        styles = self._style_loras.loaded if self._style_loras is not None else {}
        with library_logs_quiet():
            self.transformer.enable_lora()
            self.transformer.set_adapters(list(styles), list(styles.values()))


def default_dtype(device: str | torch.device) -> torch.dtype:
    """FLUX's precision on a device when none is asked for: bf16 on a GPU (CUDA, Apple's MPS),
    where the model was made to run, float32 on a CPU."""
    return torch.bfloat16 if torch.device(device).type in ("cuda", "mps") else torch.float32


def _landed(transformer, adapter: str) -> int:
    return sum(1 for m in transformer.modules() if adapter in (getattr(m, "lora_A", None) or {}))
