"""Attention processors that carry AnyStory's extra token streams through a FLUX transformer.

A denoising step sees four streams:

- text: the prompt's T5 tokens, then each character's 81 subject tokens (scaled, during the
  subject window); one stream through the text-side weights, so it rides in
  `encoder_hidden_states` and diffusers' blocks need no change;
- image: the noisy latents, as in plain FLUX;
- reference: each character's masked VAE latent, run once through the transformer at timestep 0
  with the reference LoRA (`ReferenceKV`); it never sees the noisy latents, so its keys and
  values per block are computed once per call and appended to every image/text attention;
- router: 9 tokens per character through the text-side weights with the router LoRA. In every
  block it attends to the image keys and to itself, and a routing-map query/key pair picks, for
  each image token, the character whose router tokens match best. That choice becomes a -100
  bias on the other characters' subject and reference tokens.

The router stream needs its block's norms and feed-forward with a LoRA only it sees, and its
own residual; it advances inside the processor of each block, which is handed the block
(`bind`). diffusers' block forward runs unchanged for the text and image streams.

Without an active `StepState` every processor delegates to diffusers' `FluxAttnProcessor`, so a
plain FluxPipeline call with these processors installed is exactly the plain call.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from torch import nn

ROUTER_ADAPTER = "anystory_router"
REFERENCE_ADAPTER = "anystory_reference"
MASKED = 100.0  # the bias magnitude the released model was trained with


def with_lora(layer: nn.Module, adapter: str, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` plus the LoRA `adapter`'s correction, when the layer has one. The adapters stay
    disabled on the layers (the plain streams never pay for them); this adds one explicitly."""
    out = layer(x)
    lora_a = getattr(layer, "lora_A", None)
    if lora_a is not None and adapter in lora_a:
        out = out + layer.lora_B[adapter](lora_a[adapter](layer.lora_dropout[adapter](x))) * layer.scaling[adapter]
    return out


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, H*D) -> (B, H, L, D)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, D) -> (B, L, H*D)."""
    return x.transpose(1, 2).flatten(2)


@dataclass
class ReferenceKV:
    """Per block ("double.3", "single.10"): the reference stream's keys and values, (1, H, N*L, D),
    characters in order; `mask_bias` (1, N*L), what every image/text query adds on them."""

    kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    mask_bias: torch.Tensor | None = None


@dataclass
class StepState:
    """What one denoising step adds; set by the pipeline before the transformer runs."""

    text_len: int                    # prompt + subject tokens in encoder_hidden_states
    subject_len: int                 # subject tokens at the end of the text stream (0: none)
    characters: int
    reference: ReferenceKV | None    # None: reference tokens are off this step
    router: torch.Tensor | None      # router stream entering the next block (None: off, or not begun)
    temb: torch.Tensor | None        # the step's conditioning embedding (the router needs it)
    begin_router: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None  # -> (router, temb)
    routing: list = field(default_factory=list)  # per block (B, N, image tokens), one-hot
    capture: ReferenceKV | None = None  # set while the reference pass records its keys/values
    _fixed: torch.Tensor | None = field(default=None, repr=False)

    def bias(self, batch: int, queries: int, image_len: int, routing: torch.Tensor | None,
             dtype: torch.dtype, device) -> torch.Tensor | None:
        """The additive attention bias (B, 1, queries, keys) over [text, subjects, image, reference]
        keys, or None when it would be all zeros."""
        reference_len = 0 if self.reference is None else self.reference.mask_bias.shape[-1]
        fixed = self._fixed_bias(queries, dtype, device)
        if routing is None:
            return fixed
        bias = torch.zeros(batch, 1, queries, queries + reference_len, dtype=dtype, device=device)
        if fixed is not None:
            bias += fixed
        # routing (B, N, image_len): 1 where the image token belongs to that character.
        away = ((routing - 1.0) * MASKED).to(dtype).transpose(1, 2)  # (B, image_len, N)
        rows = slice(queries - image_len, queries)
        if self.subject_len:
            cols = slice(self.text_len - self.subject_len, self.text_len)
            bias[:, 0, rows, cols] += away.repeat_interleave(self.subject_len // self.characters, dim=2)
        if reference_len:
            bias[:, 0, rows, queries:] += away.repeat_interleave(reference_len // self.characters, dim=2)
        return bias


    def _fixed_bias(self, queries: int, dtype: torch.dtype, device) -> torch.Tensor | None:
        """The reference keys' bias (mask and shift), the same in every block of the step."""
        if self.reference is None or not bool(self.reference.mask_bias.any()):
            return None
        if self._fixed is None or self._fixed.shape[2] != queries or self._fixed.dtype != dtype:
            reference_len = self.reference.mask_bias.shape[-1]
            self._fixed = torch.zeros(1, 1, queries, queries + reference_len, dtype=dtype, device=device)
            self._fixed[..., queries:] = self.reference.mask_bias.to(dtype)
        return self._fixed


class StateSlot:
    """The step state every processor of one transformer reads (None: plain FLUX)."""

    def __init__(self):
        self.step: StepState | None = None


class AnyStoryFluxAttnProcessor(nn.Module):
    """One block's processor. Holds that block's routing-map query/key LoRAs (the only new
    weights inside the transformer); `bind` hands it the block whose router stream it advances."""

    def __init__(self, slot: StateSlot, name: str, hidden_size: int, rank: int = 128, bias: bool = True):
        super().__init__()
        self.slot = slot
        self.name = name  # "double.3" / "single.10"
        self.plain = FluxAttnProcessor()
        # Parameter names are those of the released checkpoint ("...attn.processor.<name>").
        self.to_q_routing_map_lora_A = nn.Linear(hidden_size, rank, bias=False)
        self.to_q_routing_map_lora_B = nn.Linear(rank, hidden_size, bias=bias)
        self.to_k_routing_map_lora_A = nn.Linear(hidden_size, rank, bias=False)
        self.to_k_routing_map_lora_B = nn.Linear(rank, hidden_size, bias=bias)
        self._block = None

    def bind(self, block: nn.Module) -> None:
        # Kept outside the module tree: the block owns this processor, not the other way round.
        object.__setattr__(self, "_block", block)

    def forward(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, image_rotary_emb=None):
        state = self.slot.step
        if state is None:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        double = encoder_hidden_states is not None
        heads = attn.heads
        batch = hidden_states.shape[0]

        key_raw = attn.to_k(hidden_states)
        query = attn.norm_q(_heads(attn.to_q(hidden_states), heads))
        key = attn.norm_k(_heads(key_raw, heads))
        value = _heads(attn.to_v(hidden_states), heads)
        if double:
            query = torch.cat([attn.norm_added_q(_heads(attn.add_q_proj(encoder_hidden_states), heads)), query], 2)
            key = torch.cat([attn.norm_added_k(_heads(attn.add_k_proj(encoder_hidden_states), heads)), key], 2)
            value = torch.cat([_heads(attn.add_v_proj(encoder_hidden_states), heads), value], 2)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb)
            key = apply_rotary_emb(key, image_rotary_emb)
        queries = query.shape[2]
        image_len = queries - state.text_len

        if state.capture is not None:  # the reference pass: no text, record this block's K/V
            state.capture.kv[self.name] = (key, value)
            out = F.scaled_dot_product_attention(query, key, value)
            return self._project(attn, _tokens(out).to(query.dtype), encoder_hidden_states)

        routing = None
        if state.begin_router is not None:
            # Begun inside the transformer's forward, where offloading has put its weights on the device.
            state.router, state.temb = state.begin_router()
            state.begin_router = None
        if state.router is not None:
            image_in = hidden_states if double else hidden_states[:, -image_len:]
            image_key_raw = key_raw if double else key_raw[:, -image_len:]
            rotary = None if image_rotary_emb is None else tuple(t[-image_len:] for t in image_rotary_emb)
            routing = self._advance_router(attn, state, image_in, image_key_raw, rotary,
                                           key[:, :, -image_len:], value[:, :, -image_len:], double)
            state.routing.append(routing)

        if state.reference is not None:
            ref_key, ref_value = state.reference.kv[self.name]
            key = torch.cat([key, ref_key.to(key.dtype).expand(batch, -1, -1, -1)], 2)
            value = torch.cat([value, ref_value.to(value.dtype).expand(batch, -1, -1, -1)], 2)
        bias = state.bias(batch, queries, image_len, routing, query.dtype, query.device)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
        return self._project(attn, _tokens(out).to(query.dtype), encoder_hidden_states)

    @staticmethod
    def _project(attn, out: torch.Tensor, encoder_hidden_states):
        if encoder_hidden_states is None:
            return out
        text_len = encoder_hidden_states.shape[1]
        image = attn.to_out[1](attn.to_out[0](out[:, text_len:].contiguous()))
        return image, attn.to_add_out(out[:, :text_len].contiguous())

    def _advance_router(self, attn, state: StepState, image_in, image_key_raw, image_rotary,
                        image_key, image_value, double: bool) -> torch.Tensor:
        """Move the router stream through this block; return the routing map (B, N, image_len)."""
        block, router, heads = self._block, state.router, attn.heads
        if double:
            norm, q_proj, k_proj, v_proj = block.norm1_context, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj
            norm_q, norm_k = attn.norm_added_q, attn.norm_added_k
            modulation = with_lora(norm.linear, ROUTER_ADAPTER, norm.silu(state.temb))
            shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=1)
        else:
            norm, q_proj, k_proj, v_proj = block.norm, attn.to_q, attn.to_k, attn.to_v
            norm_q, norm_k = attn.norm_q, attn.norm_k
            modulation = with_lora(norm.linear, ROUTER_ADAPTER, norm.silu(state.temb))
            shift, scale, gate = modulation.chunk(3, dim=1)
        normed = norm.norm(router) * (1 + scale[:, None]) + shift[:, None]

        # Routing map: router tokens (mean over heads and a character's tokens) against image keys
        # (mean over heads), each with its own low-rank correction; argmax over characters.
        # Router positions are all zero, so their rotary embedding is the identity.
        base_query = q_proj(normed)
        route_query = norm_q(_heads(base_query + self.to_q_routing_map_lora_B(self.to_q_routing_map_lora_A(normed)),
                                    heads))
        route_query = route_query.unflatten(2, (state.characters, -1)).mean(dim=(1, 3))  # (B, N, D)
        route_key = norm_k(_heads(image_key_raw + self.to_k_routing_map_lora_B(self.to_k_routing_map_lora_A(image_in)),
                                  heads))
        if image_rotary is not None:
            route_key = apply_rotary_emb(route_key, image_rotary)
        logits = route_query @ route_key.mean(dim=1).transpose(1, 2)  # (B, N, image_len)
        routing = torch.zeros_like(logits).scatter_(1, logits.argmax(dim=1, keepdim=True), 1.0)

        # The router tokens attend to the image and to themselves.
        lora_q = q_proj.lora_B[ROUTER_ADAPTER] if ROUTER_ADAPTER in getattr(q_proj, "lora_A", {}) else None
        query = base_query if lora_q is None else base_query + lora_q(
            q_proj.lora_A[ROUTER_ADAPTER](q_proj.lora_dropout[ROUTER_ADAPTER](normed))) * q_proj.scaling[ROUTER_ADAPTER]
        query = norm_q(_heads(query, heads))
        key = norm_k(_heads(with_lora(k_proj, ROUTER_ADAPTER, normed), heads))
        value = _heads(with_lora(v_proj, ROUTER_ADAPTER, normed), heads)
        out = F.scaled_dot_product_attention(query, torch.cat([image_key, key], 2), torch.cat([image_value, value], 2))
        out = _tokens(out).to(query.dtype)

        if double:
            router = router + gate[:, None] * with_lora(attn.to_add_out, ROUTER_ADAPTER, out)
            hidden = block.norm2_context(router) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            net = block.ff_context.net
            for index, layer in enumerate(net):
                hidden = with_lora(layer, ROUTER_ADAPTER, hidden) if index == 2 else layer(hidden)
            router = router + gate_mlp[:, None] * hidden
        else:
            mlp = block.act_mlp(with_lora(block.proj_mlp, ROUTER_ADAPTER, normed))
            router = router + gate[:, None] * with_lora(block.proj_out, ROUTER_ADAPTER, torch.cat([out, mlp], 2))
        state.router = router
        return routing
