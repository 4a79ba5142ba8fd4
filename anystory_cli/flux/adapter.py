"""The AnyStory parts that live beside the FLUX transformer: per-block routing-map adapters, and
the reference and router LoRAs on their way into the transformer.

`AnyStoryFluxAdapter` is a pipeline component (ModelMixin/ConfigMixin). Its own weights are the
routing-map query/key adapters of every block (`RoutingMap`, parameter names of the released
checkpoint). The two LoRAs act inside the transformer's layers, so they live there, as peft
adapters named `anystory_reference` and `anystory_router` (inactive on the image and text
streams). In a saved pipeline folder they are two diffusers LoRA files in this component's
folder (`REFERENCE_FILE`, `ROUTER_FILE`, written by `FluxPipeline.save_lora_weights` with their
LoRA configs as metadata); loading the folder reads them into `pending_loras`, which the
pipeline moves into its transformer and then drops: the weights are never held twice.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..errors import ModelError
from .processors import REFERENCE_ADAPTER, ROUTER_ADAPTER

LORA_FILES = {REFERENCE_ADAPTER: "reference_lora.safetensors", ROUTER_ADAPTER: "router_lora.safetensors"}


class RoutingMap(nn.Module):
    """One block's routing-map adapters: low-rank corrections of the router query and image key."""

    def __init__(self, hidden_size: int, rank: int, bias: bool):
        super().__init__()
        self.to_q_routing_map_lora_A = nn.Linear(hidden_size, rank, bias=False)
        self.to_q_routing_map_lora_B = nn.Linear(rank, hidden_size, bias=bias)
        self.to_k_routing_map_lora_A = nn.Linear(hidden_size, rank, bias=False)
        self.to_k_routing_map_lora_B = nn.Linear(rank, hidden_size, bias=bias)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_q_routing_map_lora_B(self.to_q_routing_map_lora_A(x))

    def key(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_k_routing_map_lora_B(self.to_k_routing_map_lora_A(x))


class AnyStoryFluxAdapter(ModelMixin, ConfigMixin):
    """The routing-map adapters of every FLUX block, double blocks first (`block("double.3")`)."""

    @register_to_config
    def __init__(self, hidden_size: int = 3072, num_layers: int = 19, num_single_layers: int = 38,
                 rank: int = 128, bias: bool = True):
        super().__init__()
        self.double_blocks = nn.ModuleList(RoutingMap(hidden_size, rank, bias) for _ in range(num_layers))
        self.single_blocks = nn.ModuleList(RoutingMap(hidden_size, rank, bias) for _ in range(num_single_layers))
        # LoRA state dicts not yet in a transformer, with their LoRA config metadata and where they
        # came from (for errors); see the module docstring.
        self.pending_loras: dict[str, tuple[dict, dict | None, object]] = {}

    def block(self, name: str) -> RoutingMap:
        kind, index = name.split(".")
        return (self.double_blocks if kind == "double" else self.single_blocks)[int(index)]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """ModelMixin.from_pretrained, and the folder's LoRA files into `pending_loras`."""
        from diffusers import FluxPipeline

        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        folder = Path(pretrained_model_name_or_path) / (kwargs.get("subfolder") or "")
        for adapter, file in LORA_FILES.items():
            if not (folder / file).is_file():
                raise ModelError(f"{folder}: missing {file} (an AnyStory adapter folder holds both LoRA files "
                                 f"that save_pretrained writes)")
            state_dict, metadata = FluxPipeline.lora_state_dict(str(folder), weight_name=file,
                                                                return_lora_metadata=True)
            model.pending_loras[adapter] = (state_dict, metadata, folder / file)
        return model

    def save_loras(self, save_directory: str | os.PathLike, transformer) -> None:
        """Write the transformer's reference and router LoRAs as diffusers LoRA files in this
        component's folder `save_directory`."""
        from diffusers import FluxPipeline
        from peft.utils import get_peft_model_state_dict

        for adapter, file in LORA_FILES.items():
            layers = get_peft_model_state_dict(transformer, adapter_name=adapter)
            config = _plain_values(transformer.peft_config[adapter].to_dict())
            FluxPipeline.save_lora_weights(save_directory, transformer_lora_layers=layers, weight_name=file,
                                           transformer_lora_adapter_metadata=config)


def _plain_values(value):
    """A LoRA config as JSON takes it (diffusers keeps alphas read from a file as tensors)."""
    if isinstance(value, dict):
        return {k: _plain_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        items = [_plain_values(v) for v in value]
        return sorted(items) if isinstance(value, set) else items
    if isinstance(value, torch.Tensor):
        return value.item()
    return value
