"""Reading the released AnyStory checkpoint (`anystory_flux.bin`) and checking that it fits.

The file is a `torch.save` dict with three parts:
  ref:    a LoRA for the reference stream (diffusers LoRA layout, any format diffusers reads);
  redux:  the subject embedder's state dict (`SubjectEmbedder`, 9x9 pooling);
  router: a LoRA for the router stream, per-block routing-map adapters
          ("transformer.<block>.attn.processor.<param>") and the router embedder
          ("router_embedder.<param>", 3x3 pooling).
"""
from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from ..errors import ModelError

CHARACTER_FORMAT = "anystory-flux-character/1"  # a saved FluxCharacter's metadata "format"

# The layers each LoRA is switched on for, in the released method. A part's keys for any other
# layer never take effect there, so they are left out here (loading them would change nothing).
_REFERENCE_TARGETS = re.compile(
    r"x_embedder"
    r"|transformer_blocks\.\d+\.(norm1\.linear|attn\.to_[qkv]|attn\.to_out\.0|ff\.net\.2)"
    r"|single_transformer_blocks\.\d+\.(norm\.linear|proj_mlp|proj_out|attn\.to_[qkv])")
_ROUTER_TARGETS = re.compile(
    r"context_embedder"
    r"|transformer_blocks\.\d+\.(norm1_context\.linear|attn\.add_[qkv]_proj|attn\.to_add_out|ff_context\.net\.2)"
    r"|single_transformer_blocks\.\d+\.(norm\.linear|proj_mlp|proj_out|attn\.to_[qkv])")
LORA_TARGETS = {"ref": _REFERENCE_TARGETS, "router": _ROUTER_TARGETS}
_LORA_KEY = re.compile(r"transformer\.(?P<module>.+?)\.(lora_A|lora_B|alpha)(\.|$)")


def read_checkpoint(path: Path) -> dict:
    """The checkpoint's parts; ModelError for a missing, truncated or non-tensor file."""
    if not path.is_file():
        raise ModelError(f"{path}: AnyStory adapter not found (expected anystory_flux.bin from the "
                         f"hub repository Junjie96/AnyStory)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: refused, it holds more than tensors (weights_only load: {first})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: not a complete torch weights file, truncated or corrupt ({first})") from None
    missing = [part for part in ("ref", "redux", "router") if not isinstance(data, dict) or part not in data]
    if missing:
        raise ModelError(f"{path}: not an AnyStory FLUX adapter (missing part{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(repr(p) for p in missing)}; expected 'ref', 'redux' and 'router')")
    for part in ("ref", "redux", "router"):
        bad = [k for k, v in data[part].items() if not isinstance(v, torch.Tensor)] \
            if isinstance(data[part], dict) else ["(not a dict)"]
        if bad:
            raise ModelError(f"{path}: part '{part}' holds non-tensor entries ({bad[0]})")
    return data


def split_router(part: dict) -> tuple[dict, dict, dict]:
    """The router part as (LoRA, routing-map adapters by block, embedder state dict)."""
    lora, adapters, embedder = {}, {}, {}
    for key, value in part.items():
        if key.startswith("router_embedder."):
            embedder[key[len("router_embedder."):]] = value
        elif ".attn.processor." in key:
            block, param = key.split(".attn.processor.", 1)
            block = block.removeprefix("transformer.")
            adapters.setdefault(block, {})[param] = value
        else:
            lora[key] = value
    return lora, adapters, embedder


def load_lora_part(pipe, path: Path | str, part: str, state_dict: dict, adapter: str, dtype,
                   metadata: dict | None = None) -> int:
    """Load one LoRA part into `pipe.transformer` as adapter `adapter` (inactive: only its stream
    switches it on); return the number of layers it landed on. ModelError when it fits no layer,
    has the wrong shapes, or is not a plain LoRA (DoRA and other variants are refused)."""
    from diffusers import FluxPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ..library_logging import library_logs_quiet

    transformer = pipe.transformer
    try:
        with library_logs_quiet():
            normalised, alphas = FluxPipeline.lora_state_dict(dict(state_dict), return_alphas=True)
    except Exception as exc:  # noqa: BLE001 (diffusers raises many types for formats it cannot read)
        raise ModelError(f"{path}: part '{part}' is not a LoRA that diffusers can read ({_first_line(exc)})") from None
    if any("lora_magnitude_vector" in key or ".dora_scale" in key for key in normalised):
        raise ModelError(f"{path}: part '{part}' is a DoRA adapter; only plain LoRA parts are supported")
    modules = dict(transformer.named_modules())
    targets = LORA_TARGETS[part]
    kept = {}
    for key, value in normalised.items():
        match = _LORA_KEY.match(key)
        if match is None or not targets.fullmatch(match["module"]) or match["module"] not in modules:
            continue
        layer = modules[match["module"]]
        _check_shape(path, part, match["module"], key, value, layer)
        kept[key] = value.to(dtype)
    if not kept:
        sample = next(iter(state_dict), "(empty)")
        raise ModelError(f"{path}: part '{part}' lands on no layer of this FLUX transformer (keys like "
                         f"'{sample}'; expected 'transformer.<layer>.lora_A.weight' for its layers)")
    kept_alphas = {}
    for key, value in (alphas or {}).items():
        match = _LORA_KEY.match(key)
        if match is not None and targets.fullmatch(match["module"]):
            kept_alphas[key] = value
    if adapter in getattr(transformer, "peft_config", {}):
        with library_logs_quiet():
            transformer.delete_adapters([adapter])
    try:
        with library_logs_quiet():
            pipe.load_lora_into_transformer(kept, network_alphas=kept_alphas or None, transformer=transformer,
                                            adapter_name=adapter, metadata=None if kept_alphas else metadata,
                                            _pipeline=pipe)
    except (ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise ModelError(f"{path}: part '{part}' could not be loaded ({_first_line(exc)})") from None
    config = transformer.peft_config[adapter]
    if getattr(config, "use_dora", False):
        with library_logs_quiet():
            transformer.delete_adapters([adapter])
        raise ModelError(f"{path}: part '{part}' is a DoRA adapter; only plain LoRA parts are supported")
    landed = sum(1 for m in transformer.modules()
                 if isinstance(m, BaseTunerLayer) and adapter in getattr(m, "lora_A", {}))
    if landed == 0:
        raise ModelError(f"{path}: part '{part}' lands on no layer of this FLUX transformer")
    return landed


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_shape(path, part, module_name, key, value, layer):
    width_in = getattr(layer, "in_features", None)
    width_out = getattr(layer, "out_features", None)
    if ".lora_A." in key and value.ndim == 2 and width_in is not None and value.shape[1] != width_in:
        raise ModelError(f"{path}: part '{part}' is for another model: {module_name} takes {width_in} "
                         f"features here, the LoRA expects {value.shape[1]}")
    if ".lora_B.weight" in key and value.ndim == 2 and width_out is not None and value.shape[0] != width_out:
        raise ModelError(f"{path}: part '{part}' is for another model: {module_name} gives {width_out} "
                         f"features here, the LoRA expects {value.shape[0]}")


def load_module_part(module: torch.nn.Module, state_dict: dict, path: Path, part: str,
                     optional: tuple[str, ...] = ()) -> None:
    """Load `state_dict` into `module`; every parameter must be given except the `optional`
    prefixes (kept from the base model); shapes must fit. ModelError otherwise."""
    own = module.state_dict()
    unexpected = sorted(set(state_dict) - set(own))
    missing = sorted(k for k in set(own) - set(state_dict) if not k.startswith(optional))
    if unexpected or missing:
        what = f"unexpected {unexpected[0]}" if unexpected else f"missing {missing[0]}"
        raise ModelError(f"{path}: part '{part}' does not match the model ({what})")
    for key, value in state_dict.items():
        if own[key].shape != value.shape:
            raise ModelError(f"{path}: part '{part}' is for another model: {key} has shape "
                             f"{tuple(value.shape)}, this model needs {tuple(own[key].shape)}")
    module.load_state_dict(state_dict, strict=False)
