"""The lightweight ReferenceNet (paper §3.2).

A copy of the denoising UNet with every cross-attention (``attn2``) removed: the parameters are
deleted, not skipped (SDXL: 2.57 B -> 2.02 B parameters). Its input is the VAE latent of the
segmented reference concatenated with the downsampled mask; ``conv_in`` is widened by that one
channel with zero-initialised weights, so a fresh ReferenceNet computes exactly what the UNet
computes on the latent alone. It runs once per character at t = 0 and returns the normed inputs
of its self-attention layers, keyed by the denoiser's layer names.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelError


_BLOCK_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def forward_order(layer_names: list[str]) -> list[str]:
    """UNet2DConditionModel registers mid_block after up_blocks; sort names into the order the
    forward pass visits them (stable within a block group)."""
    return sorted(layer_names, key=lambda name: _BLOCK_ORDER.get(name.split(".")[0], len(_BLOCK_ORDER)))


def reference_layer_names(unet: nn.Module) -> list[str]:
    """The self-attention layers that receive reference features, in forward order. The first is
    left out: no earlier cross-attention routing map exists to gate it (paper: unused)."""
    return forward_order([name for name, _ in unet.named_modules() if name.endswith(".attn1")])[1:]


def _transformer_blocks(unet: nn.Module):
    return [m for m in unet.modules() if hasattr(m, "attn1") and hasattr(m, "attn2")]


def _strip_cross_attention(unet: nn.Module) -> None:
    for block in _transformer_blocks(unet):
        if block.attn2 is None:
            continue
        if getattr(block, "norm_type", "layer_norm") not in ("layer_norm", "layer_norm_i2vgen"):
            raise ModelError(f"ReferenceNet supports layer-norm transformer blocks, not {block.norm_type!r}")
        block.attn2 = None
        block.norm2 = None  # only feeds attn2 in layer-norm blocks


def _widen_conv_in(unet: nn.Module, extra_channels: int) -> None:
    old = unet.conv_in
    new = nn.Conv2d(
        old.in_channels + extra_channels,
        old.out_channels,
        kernel_size=old.kernel_size,
        stride=old.stride,
        padding=old.padding,
    )
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels].copy_(old.weight)
        new.bias.copy_(old.bias)
    unet.conv_in = new


class ReferenceNet(nn.Module):
    """(B, C+1, h, w) reference latent + mask -> {denoiser attn1 name: (B, h_l * w_l, C_l)}."""

    def __init__(self, unet_config: dict):
        super().__init__()
        from diffusers import UNet2DConditionModel

        self.unet_config = dict(unet_config)
        unet = UNet2DConditionModel.from_config(self.unet_config)
        _strip_cross_attention(unet)
        _widen_conv_in(unet, extra_channels=1)
        self.unet = unet
        self._captured: dict[str, torch.Tensor] = {}
        modules = dict(unet.named_modules())
        for name in reference_layer_names(unet):
            modules[name].register_forward_pre_hook(self._capture_hook(name), with_kwargs=True)

    @classmethod
    def from_unet(cls, unet: nn.Module) -> "ReferenceNet":
        """Same architecture and initial weights as `unet`, minus attn2, plus a mask channel."""
        net = cls(unet.config)
        # A UNet carrying LoRA layers (a style LoRA, peft): its base weights, as the adapter is
        # trained on the base model.
        source = {k.replace(".base_layer.", "."): v for k, v in unet.state_dict().items()
                  if ".lora_" not in k}
        wanted = net.unet.state_dict().keys()
        missing = [k for k in wanted if k not in source]
        if missing:
            raise ModelError(f"UNet does not fit its ReferenceNet copy: missing {missing[:5]}")
        net.unet.load_state_dict({k: source[k] for k in wanted if k != "conv_in.weight"}, strict=False)
        with torch.no_grad():
            old = source["conv_in.weight"]
            net.unet.conv_in.weight[:, : old.shape[1]].copy_(old)
        return net.to(dtype=unet.dtype)

    def _capture_hook(self, name: str):
        def hook(module, args, kwargs):
            self._captured[name] = args[0] if args else kwargs["hidden_states"]

        return hook

    def _added_cond_kwargs(self, batch: int, height: int, width: int, like: torch.Tensor) -> dict | None:
        cfg = self.unet_config
        kind = cfg.get("addition_embed_type")
        if kind is None:
            return None
        if kind != "text_time":
            raise ModelError(f"ReferenceNet: unsupported UNet addition_embed_type {kind!r}")
        # SDXL: no text reaches the ReferenceNet (zero pooled embedding); the size conditioning
        # says "an uncropped image of the reference's size".
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        time_ids = torch.tensor([height, width, 0, 0, height, width], dtype=like.dtype, device=like.device)
        return {
            "text_embeds": like.new_zeros(batch, pooled),
            "time_ids": time_ids.expand(batch, 6),
        }

    def forward(self, latents: torch.Tensor, mask: torch.Tensor, image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """latents: (B, C, h, w) scaled VAE latents; mask: (B, 1, h, w) in [0, 1];
        image_size: the reference's pixel size (SDXL size conditioning)."""
        batch = latents.shape[0]
        sample = torch.cat([latents, mask.to(latents.dtype)], dim=1)
        cross_dim = self.unet_config["cross_attention_dim"]
        cross_dim = cross_dim[0] if isinstance(cross_dim, (list, tuple)) else cross_dim
        self._captured = {}
        self.unet(
            sample,
            torch.zeros(batch, dtype=torch.long, device=latents.device),  # t = 0
            encoder_hidden_states=latents.new_zeros(batch, 1, cross_dim),  # unused: no attn2
            added_cond_kwargs=self._added_cond_kwargs(batch, *image_size, like=latents),
        )
        features, self._captured = self._captured, {}
        return features

