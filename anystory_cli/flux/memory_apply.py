"""Putting a memory plan (`memory.Plan`) into effect on diffusers' FluxPipeline: quantization at
load through diffusers' quantization configs, then offloading and VAE tiling.

It works on any FluxPipeline, AnyStoryFluxPipeline included (every part a registered component);
a render's model loader quantizes and places its FLUX pipeline through it (model_loading), after
render/memory_plan.py refused the plans this machine cannot follow.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ..errors import InputError, ModelError
from .memory import VAE_TILE, Plan, Quantization

EXTRA = 'pip install "anystory-cli[quant]"'
_MODULES = {"torchao": "torchao", "bitsandbytes": "bitsandbytes", "gguf": "gguf"}


def check_backend(quantization: Quantization, device: torch.device | str | None = None) -> None:
    """One clear error when the quantization's library is missing or cannot run on the device."""
    backend = quantization.backend
    if backend is None:
        return
    if importlib.util.find_spec(_MODULES[backend]) is None:
        raise InputError(f"{quantization.name} quantization needs {backend}, which is not installed ({EXTRA})")
    if backend == "bitsandbytes" and not torch.cuda.is_available():
        raise InputError(f"{quantization.name} quantization (bitsandbytes) needs a CUDA GPU; none is available here "
                         f"(on a CPU use int8, torchao)")
    if backend == "bitsandbytes" and device is not None and torch.device(device).type != "cuda":
        raise InputError(f"{quantization.name} quantization (bitsandbytes) needs a CUDA GPU; this runs on {device} "
                         f"(use int8, torchao)")


def transformer_quantization_config(quantization: Quantization):
    """diffusers' quantization config for a FLUX transformer stored as `quantization` (None: bf16).
    GGUF is not a load-time config: it comes with the file (`load_gguf_transformer`)."""
    check_backend(quantization)
    if quantization.backend is None:
        return None
    if quantization.backend == "torchao":
        from diffusers import TorchAoConfig
        from torchao.quantization import Int8WeightOnlyConfig
        return TorchAoConfig(Int8WeightOnlyConfig())
    if quantization.backend == "bitsandbytes":
        from diffusers import BitsAndBytesConfig
        if quantization.name == "nf4":
            return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.bfloat16)
        return BitsAndBytesConfig(load_in_8bit=True)
    raise InputError(f"{quantization.name}: a GGUF transformer is loaded from its .gguf file, not quantized at load")


def text_encoder_quantization_config(quantization: Quantization):
    """transformers' quantization config for T5 stored as `quantization` (None: bf16)."""
    check_backend(quantization)
    if quantization.backend is None:
        return None
    if quantization.backend == "bitsandbytes":
        from transformers import BitsAndBytesConfig
        if quantization.name == "nf4":
            return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.bfloat16)
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization.backend == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig
        return TorchAoConfig(Int8WeightOnlyConfig())
    raise InputError(f"{quantization.name}: not a quantization for T5")


def pipeline_quantization_config(plan: Plan):
    """diffusers' PipelineQuantizationConfig for the plan's transformer and T5 (None: all bf16). A
    part the model stores quantized (plan.stored) is loaded as it is, never quantized twice."""
    from diffusers import PipelineQuantizationConfig
    mapping = {}
    if plan.transformer.backend not in (None, "gguf") and "transformer" not in plan.stored:
        mapping["transformer"] = transformer_quantization_config(plan.transformer)
    if plan.text_encoder.backend is not None and "text_encoder" not in plan.stored:
        mapping["text_encoder_2"] = text_encoder_quantization_config(plan.text_encoder)
    return PipelineQuantizationConfig(quant_mapping=mapping) if mapping else None


def load_flux_pipeline(folder: str | Path, plan: Plan, dtype: torch.dtype = torch.bfloat16,
                       transformer=None):
    """A diffusers FluxPipeline from `folder`, quantized as the plan says, then placed by it.
    transformer: one loaded beforehand (a GGUF file through `load_gguf_transformer`)."""
    from diffusers import FluxPipeline

    if plan.transformer.backend == "gguf" and transformer is None:
        raise InputError(f"plan {plan.name}: give the GGUF transformer file (load_gguf_transformer)")
    kwargs = {} if transformer is None else {"transformer": transformer}
    quantization = pipeline_quantization_config(plan)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    try:
        pipe = FluxPipeline.from_pretrained(str(folder), dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{folder}: could not load with plan {plan.name} ({str(exc).splitlines()[0]})") from None
    return apply_plan(pipe, plan)


def load_gguf_transformer(path: str | Path, config_folder: str | Path, dtype: torch.dtype = torch.bfloat16):
    """A FLUX transformer from a GGUF single file (weights stay quantized, dequantized per layer)."""
    from .gguf_file import read_gguf_transformer

    path = Path(path)
    read_gguf_transformer(path)  # a missing, foreign or cut file: said before diffusers reads it
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

    try:
        return FluxTransformer2DModel.from_single_file(
            str(path), quantization_config=GGUFQuantizationConfig(compute_dtype=dtype), config=str(config_folder),
            subfolder="transformer", torch_dtype=dtype)
    except Exception as exc:  # noqa: BLE001 (gguf and diffusers raise many kinds for a bad file)
        said = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        said = said.split(". If you want", 1)[0].replace("Cannot load  because ", "")  # diffusers' advice is not ours
        raise InputError(f"{path}: not a FLUX transformer GGUF file for {config_folder}, or truncated "
                         f"({said})") from None


def apply_plan(pipe, plan: Plan, device: str | torch.device | None = None):
    """Place a loaded FluxPipeline as the plan says: on the device, or offloaded (model, group at
    leaf level with CUDA streams, sequential), with AnyStory's reference keys and values on the
    CPU too; VAE tiling when the plan asks for it. A plan whose text encoders leave places all
    but the transformer, and sets `pipe.text_encoders_leave`: AnyStoryFluxPipeline's call then
    swaps the text encoders and the transformer around its prompt encoding (diffusers' own
    FluxPipeline, which does not, gets everything on the device)."""
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if plan.offload != "none" and device.type != "cuda":
        raise InputError(f"plan {plan.name} offloads to the CPU from a GPU; there is no CUDA device here")
    if plan.offload == "none" and plan.text_encoders_leave and hasattr(pipe, "text_encoders_leave"):
        # The transformer waits on the CPU: it takes the text encoders' place on the device once
        # the prompts are encoded (`place_for_denoising`).
        for name, part in pipe.components.items():
            if isinstance(part, torch.nn.Module) and name != "transformer":
                part.to(device)
        pipe.text_encoders_leave = True
    elif plan.offload == "none":
        pipe.to(device)
    elif plan.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif plan.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    elif plan.offload == "group":
        from diffusers.hooks import apply_group_offloading
        kept = set(getattr(pipe, "_exclude_from_cpu_offload", ()))
        for name, part in pipe.components.items():  # every model part, the text encoders too
            if isinstance(part, torch.nn.Module):
                if name in kept:
                    part.to(device)
                else:
                    apply_group_offloading(part, onload_device=device, offload_device=torch.device("cpu"),
                                           offload_type="leaf_level", use_stream=True)
    if hasattr(pipe, "reference_kv_device"):  # AnyStory's reference keys and values follow the weights
        pipe.reference_kv_device = None if plan.offload == "none" else "cpu"
    if plan.vae_tiling:  # tiles of VAE_TILE pixels (FLUX's VAE config would tile only above 1024)
        pipe.vae.enable_tiling()
        pipe.vae.tile_sample_min_size = VAE_TILE
        pipe.vae.tile_latent_min_size = VAE_TILE // pipe.vae_scale_factor
    return pipe


# ---------------------------------------------------------------------------------------- text encoders
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def place_for_text(pipe, device: str | torch.device, away: str | torch.device = "cpu") -> None:
    """A plan whose text encoders leave (`Plan.text_encoders_leave`), while prompts are encoded:
    the transformer off `device` (to `away`) first, then the text encoders on it."""
    _move(pipe, ("transformer",), away, only_from=device)
    _move(pipe, TEXT_ENCODERS, device)


def place_for_denoising(pipe, device: str | torch.device, away: str | torch.device = "cpu") -> None:
    """The same plan before the first denoising step: the text encoders off the execution device
    `device` (to `away`) first, then the transformer on it."""
    _move(pipe, TEXT_ENCODERS, away, only_from=device)
    _move(pipe, ("transformer",), device)


def release_offloaded_text_encoders(pipe) -> None:
    """Under model offload, the text encoders back on the CPU now. accelerate's hooks move a part
    off the GPU only when the next one in `model_cpu_offload_seq` starts; after T5 comes the Redux
    encoder, which a call with encoded characters never runs, so T5 would stay beside the
    transformer through every step."""
    encoders = [part for part in (getattr(pipe, name, None) for name in TEXT_ENCODERS) if part is not None]
    for hook in getattr(pipe, "_all_hooks", ()):
        if any(hook.model is part for part in encoders):
            hook.offload()


def _move(pipe, names, to, only_from=None) -> None:
    for name in names:
        part = getattr(pipe, name, None)
        if not isinstance(part, torch.nn.Module) or _same_device(part.device, to):
            continue
        if only_from is not None and not _same_device(part.device, only_from):
            continue
        part.to(to)


def _same_device(a, b) -> bool:
    """'cuda' and 'cuda:0' are one device (a module reports the index, a device named may not)."""
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)
