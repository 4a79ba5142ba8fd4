"""AnyStoryFluxPipeline: the released AnyStory weights for FLUX.1 on diffusers' FluxPipeline.

FluxPipeline does the prompt encoding, latents, scheduler, denoising loop and decoding. This
module adds what a step needs around it: a forward pre-hook on the transformer appends the subject
tokens to the text stream and sets the step's state for the attention processors
(`processors.py`); before the loop, one transformer pass over the reference latents at timestep 0
with the reference LoRA records the reference keys and values of every block.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import InputError, ModelError
from ..library_logging import progress_bars_off
from ..loras import StyleLoraMixin, StyleLoras
from .folders import check_flux_model
from .processors import (
    REFERENCE_ADAPTER,
    ROUTER_ADAPTER,
    AnyStoryFluxAttnProcessor,
    ReferenceKV,
    StateSlot,
    StepState,
    with_lora,
)
from .weights import CHARACTER_FORMAT, load_lora_part, load_module_part, read_checkpoint, split_router

SUBJECT_GRID, ROUTER_GRID = 9, 3  # tokens per character: 81 subject, 9 router


@dataclass
class FluxCharacter:
    """A character encoded once for one model (`encode_character`); reusable across calls.

    subject_tokens (1, 81, D): added to the text stream; router_tokens (1, 9, D): the router
    stream; reference_latents (1, L, C): the masked reference's packed VAE latent;
    reference_mask (1, L, 1): 1 on the subject's latent tokens."""

    subject_tokens: torch.Tensor
    router_tokens: torch.Tensor
    reference_latents: torch.Tensor
    reference_mask: torch.Tensor
    reference_size: int
    name: str = ""
    model_id: str = ""
    figure: None = None  # the story renderer's pasted figure: none on FLUX

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("subject_tokens", "router_tokens", "reference_latents", "reference_mask")
        return {k: getattr(self, k).detach().contiguous().cpu() for k in names}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the encoding as safetensors (atomically)."""
        from safetensors.torch import save_file

        from ..atomic import atomic_path
        meta = {"format": CHARACTER_FORMAT, "reference_size": str(self.reference_size), "name": self.name,
                "model_id": self.model_id}
        with atomic_path(path) as tmp:
            save_file(self.tensors(), str(tmp), metadata=meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FluxCharacter:
        from safetensors import SafetensorError, safe_open
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: character encoding not found")
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except (SafetensorError, OSError) as exc:
            raise InputError(f"{path}: corrupt character encoding ({exc})") from None
        if meta.get("format") != CHARACTER_FORMAT:
            raise InputError(f"{path}: not an AnyStory FLUX character encoding")
        return cls.from_tensors(tensors, meta)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> FluxCharacter:
        """The inverse of `tensors`, with the file's metadata."""
        names = ("subject_tokens", "router_tokens", "reference_latents", "reference_mask")
        missing = [n for n in names if n not in tensors]
        if missing or "reference_size" not in meta:
            raise InputError(f"not a complete FLUX character encoding (missing {(missing or ['reference_size'])[0]})")
        return cls(**{n: tensors[n] for n in names}, reference_size=int(meta["reference_size"]),
                   name=meta.get("name", ""), model_id=meta.get("model_id", ""))


@dataclass
class FluxOutput:
    images: object
    # (B, N, H, W) at image resolution: per character, the share of the last routed step's blocks
    # that sent each pixel to it (no background slot). None unless asked for, or with no router.
    routing_maps: torch.Tensor | None = None


@dataclass
class _Run:
    """One call's AnyStory inputs, read by the pre-hook at every step."""

    characters: int
    subject_tokens: torch.Tensor | None  # (1, N*81, D), scaled
    router_tokens: torch.Tensor | None   # (1, N*9, D) when the router is on
    reference: ReferenceKV | None
    subject_steps: range
    reference_steps: range
    step: int = 0
    routing: list = field(default_factory=list)  # the last routed step's per-block maps


def _step_window(window: Sequence[float], steps: int, what: str) -> range:
    try:
        start, end = (float(x) for x in window)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be two fractions (start, end) of the schedule, got {window!r}") from None
    if not 0.0 <= start <= end <= 1.0:
        raise InputError(f"{what} must satisfy 0 <= start <= end <= 1, got ({start}, {end})")
    return range(int(steps * start + 0.5), int(steps * end + 0.5))


class AnyStoryFluxPipeline(StyleLoraMixin):
    """The released AnyStory model on FLUX.1-dev + FLUX.1-Redux-dev."""

    def __init__(self, flux, image_encoder, redux_embedder, checkpoint: dict, adapter_path: Path,
                 reference_size: int = 512, model_id: str = ""):
        from transformers import SiglipImageProcessorPil

        from .embedders import SubjectEmbedder

        if reference_size <= 0 or reference_size % 16:
            raise InputError(f"reference_size must be a positive multiple of 16, got {reference_size}")
        self.flux = flux
        self.transformer = transformer = flux.transformer
        self.image_encoder = image_encoder.eval().requires_grad_(False)
        self.reference_size = reference_size
        self.model_id = model_id
        dtype = transformer.dtype
        config = transformer.config
        width = config.joint_attention_dim
        if redux_embedder.config.txt_in_features != width:
            raise ModelError(f"the Redux embedder gives {redux_embedder.config.txt_in_features}-wide tokens, this "
                             f"FLUX text stream is {width} wide (a Redux folder for another model?)")
        if redux_embedder.config.redux_dim != image_encoder.config.hidden_size:
            raise ModelError(f"the Redux embedder takes {redux_embedder.config.redux_dim}-wide SigLIP features, "
                             f"its image encoder gives {image_encoder.config.hidden_size}")
        path = Path(adapter_path)

        # The reference and router LoRAs (disabled: only the extra streams switch them on).
        router_lora, routing_adapters, router_embedder_sd = split_router(checkpoint["router"])
        self.lora_layers = {
            "ref": load_lora_part(flux, path, "ref", checkpoint["ref"], REFERENCE_ADAPTER, dtype),
            "router": load_lora_part(flux, path, "router", router_lora, ROUTER_ADAPTER, dtype),
        }
        transformer.disable_lora()

        # The embedders: Redux's projections plus the checkpoint's corrections, gate and pooling.
        def embedder(part: str, state: dict, grid: int) -> SubjectEmbedder:
            key = "redux_up_lora_A.weight"
            if key not in state:
                raise ModelError(f"{path}: part '{part}' has no {key}")
            module = SubjectEmbedder(redux_embedder.config.redux_dim, width, lora_rank=state[key].shape[0],
                                     lora_bias="redux_up_lora_B.bias" in state, grid=grid)
            module.load_state_dict(redux_embedder.state_dict(), strict=False)
            load_module_part(module, state, path, part, optional=("redux_up.", "redux_down."))
            # nn.Module.to: ModelMixin.to warns about float32-kept modules on every dtype cast.
            return torch.nn.Module.to(module, dtype=dtype).eval().requires_grad_(False)

        self.subject_embedder = embedder("redux", checkpoint["redux"], SUBJECT_GRID)
        self.router_embedder = embedder("router", router_embedder_sd, ROUTER_GRID)

        # One processor per attention layer, holding that block's routing-map adapters.
        self.slot = StateSlot()
        hidden = config.num_attention_heads * config.attention_head_dim
        modules = dict(transformer.named_modules())
        processors = {}
        for name in transformer.attn_processors:
            block_name = name[: -len(".attn.processor")]
            state = routing_adapters.get(block_name)
            if not state or "to_q_routing_map_lora_A.weight" not in state:
                raise ModelError(f"{path}: part 'router' has no routing-map adapter for {block_name}")
            kind = "double" if block_name.startswith("transformer_blocks.") else "single"
            processor = AnyStoryFluxAttnProcessor(
                self.slot, f"{kind}.{block_name.rsplit('.', 1)[1]}", hidden,
                rank=state["to_q_routing_map_lora_A.weight"].shape[0],
                bias="to_q_routing_map_lora_B.bias" in state)
            load_module_part(processor, state, path, "router")
            processor.bind(modules[block_name])
            processors[name] = processor.to(device=transformer.device, dtype=dtype)
        extra = sorted(set(routing_adapters) - {n[: -len(".attn.processor")] for n in processors})
        if extra:
            raise ModelError(f"{path}: part 'router' has routing-map adapters for blocks this FLUX transformer "
                             f"lacks ({extra[0]}; an adapter for a deeper model?)")
        transformer.set_attn_processor(processors)
        transformer.register_forward_pre_hook(self._before_step, with_kwargs=True)
        self._run: _Run | None = None

        size = image_encoder.config.image_size
        self.siglip_processor = SiglipImageProcessorPil(size={"height": size, "width": size})

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, base: str | os.PathLike, redux: str | os.PathLike | None = None,
                        adapter: str | os.PathLike | None = None, reference_size: int = 512,
                        torch_dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                        ) -> AnyStoryFluxPipeline:
        """FLUX.1 folder (or hub id) `base`, FLUX.1-Redux folder (or hub id) `redux`, the AnyStory
        checkpoint file `adapter`. Defaults: CUDA in bf16 when available, else CPU in fp32."""
        from diffusers import FluxPipeline
        from diffusers.pipelines import ReduxImageEncoder
        from transformers import SiglipVisionModel

        if redux is None or adapter is None:
            raise ModelError("AnyStory on FLUX needs redux= (FLUX.1-Redux-dev) and adapter= (anystory_flux.bin)")
        device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        base_dir, redux_dir, adapter = check_flux_model(base, redux, adapter)
        checkpoint = read_checkpoint(adapter)
        try:
            with progress_bars_off():
                flux = FluxPipeline.from_pretrained(str(base_dir), dtype=dtype)
                encoder = SiglipVisionModel.from_pretrained(str(redux_dir / "image_encoder"), dtype=dtype)
                redux_embedder = ReduxImageEncoder.from_pretrained(str(redux_dir / "image_embedder"), dtype=dtype)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelError(f"{base_dir} / {redux_dir}: could not load ({str(exc).splitlines()[0]})") from None
        flux.set_progress_bar_config(disable=True)
        pipe = cls(flux, encoder, redux_embedder, checkpoint, adapter, reference_size,
                   model_id=f"flux:{base_dir.name}:{adapter.name}")
        return pipe.to(device)

    def to(self, device) -> AnyStoryFluxPipeline:
        self.flux.to(device)
        for module in (self.image_encoder, self.subject_embedder, self.router_embedder):
            module.to(device)
        return self

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: str = "cuda") -> None:
        """Keep FLUX's parts on the CPU and move each to the GPU while it runs (a 24 GB card)."""
        if not torch.cuda.is_available():
            raise ModelError("enable_model_cpu_offload needs a CUDA device")
        self.flux.enable_model_cpu_offload(gpu_id=gpu_id, device=device)
        for module in (self.image_encoder, self.subject_embedder, self.router_embedder):
            module.to(self.flux._execution_device)

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None, device: str = "cuda") -> None:
        """Move FLUX's weights to the GPU layer by layer as they run: fits small cards, slowly."""
        if not torch.cuda.is_available():
            raise ModelError("enable_sequential_cpu_offload needs a CUDA device")
        self.flux.enable_sequential_cpu_offload(gpu_id=gpu_id, device=device)
        for module in (self.image_encoder, self.subject_embedder, self.router_embedder):
            module.to(self.flux._execution_device)

    @property
    def device(self) -> torch.device:
        return self.flux._execution_device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

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
        device, dtype = self.device, self.dtype

        # Subject and router tokens: SigLIP on the masked image, pooled over the mask's patches.
        pixels = self.siglip_processor.preprocess(images=rgb, return_tensors="pt").pixel_values
        coverage = self.siglip_processor.preprocess(images=mask.convert("RGB"), resample=Image.NEAREST,
                                                    do_normalize=False, return_tensors="pt").pixel_values
        features = self.image_encoder((pixels * coverage).to(device=device, dtype=dtype)).last_hidden_state
        side = self.image_encoder.config.image_size // self.image_encoder.config.patch_size
        patches = F.adaptive_avg_pool2d(coverage.mean(dim=1, keepdim=True).to(device=device, dtype=dtype), side)
        patches = (patches > 0).to(dtype).flatten(2).transpose(1, 2)
        subject_tokens = self.subject_embedder(features, patches)
        router_tokens = self.router_embedder(features, patches)

        # Reference: the masked image's VAE latent at reference_size, packed into FLUX tokens.
        size, vae = self.reference_size, self.flux.vae
        picture = self.flux.image_processor.preprocess(rgb, height=size, width=size)
        weight = torch.from_numpy(np.array(mask.resize((size, size), resample=Image.NEAREST))).float() / 255.0
        weight = weight[None, None]
        latent = vae.encode((picture * weight).to(device=device, dtype=vae.dtype)).latent_dist.sample(generator)
        latent = (latent - vae.config.shift_factor) * vae.config.scaling_factor
        packed = self.flux._pack_latents(latent, *latent.shape)
        tokens = F.adaptive_avg_pool2d(weight, size // 16) > 0
        return FluxCharacter(
            subject_tokens=subject_tokens, router_tokens=router_tokens, reference_latents=packed,
            reference_mask=tokens.flatten(2).transpose(1, 2).to(device=device, dtype=dtype),
            reference_size=size, name=name, model_id=self.model_id)

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
        prompt: str | list[str],
        characters: Sequence[FluxCharacter] = (),
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 25,
        height: int = 512,
        width: int = 512,
        guidance_scale: float = 3.5,
        router: bool | None = None,
        reference_window: tuple[float, float] | None = None,
        redux_window: tuple[float, float] = (0.1, 0.3),
        redux_scale: float = 0.6,
        reference_mask: bool = True,
        reference_shift: float = 0.0,
        output_type: str = "pil",
        return_routing: bool = False,
        **flux_kwargs,
    ) -> FluxOutput:
        """Draw `prompt` with `characters` (from `encode_character`).

        router: route image tokens among the characters (None: on with two or more);
        reference_window / redux_window: the fractions (start, end) of the schedule during which
        the reference and the subject tokens take part (reference None: (0, 1) with one character,
        (0.09, 1) with more); redux_scale scales the subject tokens; reference_mask keeps image and
        text tokens off the reference's background; reference_shift is a bias added on every
        reference key. Other keyword arguments go to FluxPipeline (max_sequence_length,
        num_images_per_prompt, latents, callback_on_step_end, ...)."""
        characters = list(characters)
        self._check_characters(characters)
        count = len(characters)
        if count and not isinstance(prompt, str) and len(set(prompt)) > 1:
            # The reference stream is conditioned on the prompt's pooled embedding: one per call.
            raise InputError("with characters, draw one prompt per call (num_images_per_prompt for more images)")
        router = count >= 2 if router is None else bool(router)
        if reference_window is None:
            reference_window = (0.0, 1.0) if count <= 1 else (0.09, 1.0)
        subject_steps = _step_window(redux_window, num_inference_steps, "redux_window")
        reference_steps = _step_window(reference_window, num_inference_steps, "reference_window")
        device = self.device
        prompt_embeds, pooled, _ = self.flux.encode_prompt(
            prompt, prompt_2=None, device=device,
            max_sequence_length=flux_kwargs.pop("max_sequence_length", 512))

        run = _Run(characters=count, subject_tokens=None, router_tokens=None, reference=None,
                   subject_steps=subject_steps if count else range(0),
                   reference_steps=reference_steps if count else range(0))
        if count:
            dtype = self.dtype
            run.subject_tokens = torch.cat([c.subject_tokens.to(device, dtype) for c in characters], 1) * redux_scale
            if router:
                run.router_tokens = torch.cat([c.router_tokens.to(device, dtype) for c in characters], 1)
            if len(reference_steps):
                run.reference = self._reference_pass(characters, pooled, guidance_scale, reference_mask,
                                                     reference_shift)
        self._run = run
        try:
            result = self.flux(
                prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, generator=generator,
                num_inference_steps=num_inference_steps, height=height, width=width,
                guidance_scale=guidance_scale, output_type=output_type, **flux_kwargs)
        finally:
            self._run = None
            self.slot.step = None
        output = FluxOutput(images=result.images)
        if return_routing and run.routing:
            rows, cols = height // (self.flux.vae_scale_factor * 2), width // (self.flux.vae_scale_factor * 2)
            maps = torch.stack(run.routing).float().mean(dim=0).unflatten(2, (rows, cols))
            output.routing_maps = F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False)
        return output

    @property
    def style_loras(self) -> StyleLoras:
        """Style LoRAs on the transformer: on for the image and text streams, off for the
        reference pass (which draws the character as it is); the model's own reference and router
        LoRAs stay off outside their streams, as without a style."""
        if getattr(self, "_style_loras", None) is None:
            self._style_loras = StyleLoras(self.flux, own=[], on_change=self._main_stream_adapters)
        return self._style_loras

    def _main_stream_adapters(self) -> None:
        """The adapters of the main (image + text) pass: the style LoRAs, or none."""
        styles = self._style_loras.loaded if getattr(self, "_style_loras", None) is not None else {}
        if styles:
            self.transformer.enable_lora()
            self.transformer.set_adapters(list(styles), list(styles.values()))
        else:
            self.transformer.disable_lora()

    def _reference_pass(self, characters, pooled, guidance_scale, reference_mask, reference_shift) -> ReferenceKV:
        """Each character's reference latent through the transformer alone (no text), at
        timestep 0, with the reference LoRA; records every block's keys and values."""
        transformer, device, dtype = self.transformer, self.device, self.dtype
        count = len(characters)
        latents = torch.cat([c.reference_latents.to(device, dtype) for c in characters], 0)
        side = self.reference_size // 16
        ids = self.flux._prepare_latent_image_ids(1, side, side, device, dtype)
        ids[:, 2] -= side  # the reference sits one reference-width left of the image
        capture = ReferenceKV()
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full([count], guidance_scale, device=device, dtype=torch.float32)
        self.slot.step = StepState(text_len=0, subject_len=0, characters=count, reference=None, router=None,
                                   temb=None, capture=capture)
        transformer.enable_lora()
        transformer.set_adapters([REFERENCE_ADAPTER], [1.0])
        try:
            transformer(
                hidden_states=latents,
                encoder_hidden_states=latents.new_zeros(count, 0, transformer.config.joint_attention_dim),
                pooled_projections=pooled[:1].expand(count, -1), timestep=latents.new_zeros(count),
                img_ids=ids, txt_ids=ids.new_zeros(0, 3), guidance=guidance, return_dict=False)
        finally:
            self._main_stream_adapters()
            self.slot.step = None
        # (N, H, L, D) per character -> (1, H, N*L, D), characters in order along the keys.
        capture.kv = {name: tuple(t.transpose(0, 1).flatten(1, 2).unsqueeze(0) for t in kv)
                      for name, kv in capture.kv.items()}
        masks = torch.cat([c.reference_mask.to(device, dtype) for c in characters], 1)[..., 0]  # (1, N*L)
        bias = torch.full_like(masks, float(reference_shift))
        if reference_mask:
            bias = bias + (masks - 1.0) * 100.0
        capture.mask_bias = bias
        return capture

    def _before_step(self, transformer, args, kwargs):
        """Forward pre-hook: this step's subject tokens and processor state (nothing without a run)."""
        run = self._run
        if run is None:
            return None
        step, run.step = run.step, run.step + 1
        subjects_on = step in run.subject_steps
        reference_on = step in run.reference_steps
        if not (subjects_on or reference_on):
            self.slot.step = None
            return None
        text, text_ids = kwargs["encoder_hidden_states"], kwargs["txt_ids"]
        batch = text.shape[0]
        subject_len = 0
        if subjects_on:
            subject_len = run.subject_tokens.shape[1]
            text = torch.cat([text, run.subject_tokens.expand(batch, -1, -1).to(text.dtype)], 1)
            text_ids = torch.cat([text_ids, text_ids.new_zeros(subject_len, 3)], 0)
        begin_router = None
        if run.router_tokens is not None:
            timestep, guidance, pooled = kwargs["timestep"], kwargs.get("guidance"), kwargs["pooled_projections"]

            def begin_router():
                """The router stream's input and the step's embedding, as the transformer makes them."""
                dtype = transformer.dtype
                scaled = timestep.to(dtype) * 1000
                temb = (transformer.time_text_embed(scaled, pooled) if guidance is None
                        else transformer.time_text_embed(scaled, guidance.to(dtype) * 1000, pooled))
                tokens = run.router_tokens.expand(batch, -1, -1).to(temb.device)
                return with_lora(transformer.context_embedder, ROUTER_ADAPTER, tokens), temb

        state = StepState(text_len=text.shape[1], subject_len=subject_len, characters=run.characters,
                          reference=run.reference if reference_on else None, router=None, temb=None,
                          begin_router=begin_router)
        if begin_router is not None:
            run.routing = state.routing
        self.slot.step = state
        return args, {**kwargs, "encoder_hidden_states": text, "txt_ids": text_ids}
