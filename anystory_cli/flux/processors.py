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
  block it attends to the image keys and to itself, and a routing-map query/key pair (the
  block's `RoutingMap`, in `AnyStoryFluxAdapter`) picks, for each image token, the character
  whose router tokens match best. That choice becomes a -100 bias on the other characters'
  subject and reference tokens.

What a transformer call adds arrives as one `joint_attention_kwargs` entry, `anystory`: a
`StepState` made by the pipeline for that call and dropped after it, so nothing is kept on the
processors and two pipelines sharing a transformer never see each other's state. Without it
every processor is diffusers' `FluxAttnProcessor` (a plain FluxPipeline call with these
processors installed is exactly the plain call).

Attention goes through diffusers' `dispatch_attention_fn`, so `transformer.set_attention_backend`
applies here as to diffusers' own processors. The router stream's LoRA runs through peft's
per-sample adapter selection (`adapter_names`): only the router LoRA acts on it, whatever
adapters (style LoRAs) are active on the image and text streams.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from torch import nn

ROUTER_ADAPTER = "anystory_router"
REFERENCE_ADAPTER = "anystory_reference"
MASKED = 100.0  # the bias magnitude the released model was trained with
BASE = "__base__"  # peft's name for "no adapter" in a per-sample adapter list


def through(layer: nn.Module, x: torch.Tensor, adapter: str | None = None) -> torch.Tensor:
    """`layer(x)` with exactly the LoRA `adapter` (None: no adapter at all), whatever adapters are
    active on the layer for the other streams: peft's per-sample adapter selection."""
    if hasattr(layer, "lora_A"):
        name = adapter if adapter in layer.lora_A else BASE
        return layer(x, adapter_names=[name] * x.shape[0])
    return layer(x)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, H*D) -> (B, L, H, D): the layout of diffusers' attention dispatch."""
    return x.unflatten(-1, (heads, -1))


@dataclass
class ReferenceKV:
    """Per block ("double.3", "single.10"): the reference stream's keys and values, (1, N*L, H, D),
    characters in order; `mask_bias` (1, N*L), what every image/text query adds on them.

    store: where the keys and values are kept (None: where they are made, the execution device).
    With an offloading memory plan they wait on the CPU, pinned when `pin`, and each block's
    pair moves to the execution device only while that block runs."""

    kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    mask_bias: torch.Tensor | None = None
    store: torch.device | None = None
    pin: bool = False

    def record(self, name: str, key: torch.Tensor, value: torch.Tensor) -> None:
        self.kv[name] = (self._stored(key), self._stored(value))

    def _stored(self, t: torch.Tensor) -> torch.Tensor:
        if self.store is None or t.device == self.store:
            return t
        if self.pin:
            return torch.empty(t.shape, dtype=t.dtype, device=self.store, pin_memory=True).copy_(t)
        return t.to(self.store)

    def block(self, name: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block `name`'s keys and values on `like`'s device and dtype (a copy only where they
        are stored elsewhere; from pinned memory, without waiting for it)."""
        return tuple(t.to(like.device, like.dtype, non_blocking=True) for t in self.kv[name])


@dataclass
class StepState:
    """What one transformer call adds; made by the pipeline for that call only."""

    text_len: int                    # prompt + subject tokens in encoder_hidden_states
    subject_len: int                 # subject tokens at the end of the text stream (0: none)
    characters: int
    reference: ReferenceKV | None    # None: reference tokens are off this step
    routing_maps: nn.Module | None = None  # AnyStoryFluxAdapter: the per-block routing-map adapters
    begin_router: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None  # -> (router, temb)
    router: torch.Tensor | None = None  # router stream entering the next block (None: off, or not begun)
    temb: torch.Tensor | None = None    # the step's conditioning embedding (the router needs it)
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
        """The reference keys' bias (mask and shift), the same in every block of the call."""
        if self.reference is None or not bool(self.reference.mask_bias.any()):
            return None
        if self._fixed is None or self._fixed.shape[2] != queries or self._fixed.dtype != dtype:
            reference_len = self.reference.mask_bias.shape[-1]
            self._fixed = torch.zeros(1, 1, queries, queries + reference_len, dtype=dtype, device=device)
            self._fixed[..., queries:] = self.reference.mask_bias.to(dtype)
        return self._fixed


class AnyStoryFluxAttnProcessor(FluxAttnProcessor):
    """One attention layer's processor: `name` ("double.3", "single.10") finds its block's
    reference keys and routing-map adapter in the call's `StepState`; `block` is the transformer
    block whose norms and feed-forward advance the router stream. It holds no weights and no
    state of its own."""

    def __init__(self, name: str, block: nn.Module):
        super().__init__()
        self.name = name
        self.block = block

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None,
                 anystory: StepState | None = None):
        if anystory is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        state = anystory
        double = encoder_hidden_states is not None
        heads = attn.heads
        batch = hidden_states.shape[0]

        key_raw = attn.to_k(hidden_states)
        query = attn.norm_q(_heads(attn.to_q(hidden_states), heads))
        key = attn.norm_k(_heads(key_raw, heads))
        value = _heads(attn.to_v(hidden_states), heads)
        if double:
            query = torch.cat([attn.norm_added_q(_heads(attn.add_q_proj(encoder_hidden_states), heads)), query], 1)
            key = torch.cat([attn.norm_added_k(_heads(attn.add_k_proj(encoder_hidden_states), heads)), key], 1)
            value = torch.cat([_heads(attn.add_v_proj(encoder_hidden_states), heads), value], 1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        queries = query.shape[1]
        image_len = queries - state.text_len

        if state.capture is not None:  # the reference pass: no text, record this block's K/V
            state.capture.record(self.name, key, value)
            out = self._attend(query, key, value, None)
            return self._project(attn, out, encoder_hidden_states)

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
                                           key[:, -image_len:], value[:, -image_len:], double)
            state.routing.append(routing)

        if state.reference is not None:
            ref_key, ref_value = state.reference.block(self.name, key)
            key = torch.cat([key, ref_key.expand(batch, -1, -1, -1)], 1)
            value = torch.cat([value, ref_value.expand(batch, -1, -1, -1)], 1)
        bias = state.bias(batch, queries, image_len, routing, query.dtype, query.device)
        return self._project(attn, self._attend(query, key, value, bias), encoder_hidden_states)

    def _attend(self, query, key, value, bias) -> torch.Tensor:
        """(B, L, H, D) queries -> (B, L, H*D), through diffusers' attention dispatch."""
        out = dispatch_attention_fn(query, key, value, attn_mask=bias, backend=self._attention_backend,
                                    parallel_config=self._parallel_config)
        return out.flatten(2).to(query.dtype)

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
        block, router, heads = self.block, state.router, attn.heads
        maps = state.routing_maps.block(self.name)
        if double:
            norm, q_proj, k_proj, v_proj = block.norm1_context, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj
            norm_q, norm_k = attn.norm_added_q, attn.norm_added_k
            modulation = through(norm.linear, norm.silu(state.temb), ROUTER_ADAPTER)
            shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=1)
        else:
            norm, q_proj, k_proj, v_proj = block.norm, attn.to_q, attn.to_k, attn.to_v
            norm_q, norm_k = attn.norm_q, attn.norm_k
            modulation = through(norm.linear, norm.silu(state.temb), ROUTER_ADAPTER)
            shift, scale, gate = modulation.chunk(3, dim=1)
        normed = norm.norm(router) * (1 + scale[:, None]) + shift[:, None]

        # Routing map: router tokens (mean over heads and a character's tokens) against image keys
        # (mean over heads), each with its own low-rank correction; argmax over characters.
        # Router positions are all zero, so their rotary embedding is the identity.
        route_query = norm_q(_heads(through(q_proj, normed) + maps.query(normed), heads))
        route_query = route_query.unflatten(1, (state.characters, -1)).mean(dim=(2, 3))  # (B, N, D)
        route_key = norm_k(_heads(image_key_raw + maps.key(image_in), heads))
        if image_rotary is not None:
            route_key = apply_rotary_emb(route_key, image_rotary, sequence_dim=1)
        logits = route_query @ route_key.mean(dim=2).transpose(1, 2)  # (B, N, image_len)
        routing = torch.zeros_like(logits).scatter_(1, logits.argmax(dim=1, keepdim=True), 1.0)

        # The router tokens attend to the image and to themselves.
        query = norm_q(_heads(through(q_proj, normed, ROUTER_ADAPTER), heads))
        key = norm_k(_heads(through(k_proj, normed, ROUTER_ADAPTER), heads))
        value = _heads(through(v_proj, normed, ROUTER_ADAPTER), heads)
        out = self._attend(query, torch.cat([image_key, key], 1), torch.cat([image_value, value], 1), None)

        if double:
            router = router + gate[:, None] * through(attn.to_add_out, out, ROUTER_ADAPTER)
            hidden = block.norm2_context(router) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            net = block.ff_context.net
            for index, layer in enumerate(net):
                hidden = through(layer, hidden, ROUTER_ADAPTER) if index == 2 else layer(hidden)
            router = router + gate_mlp[:, None] * hidden
        else:
            mlp = block.act_mlp(through(block.proj_mlp, normed, ROUTER_ADAPTER))
            router = router + gate[:, None] * through(block.proj_out, torch.cat([out, mlp], 2), ROUTER_ADAPTER)
        state.router = router
        return routing


def install_processors(transformer) -> None:
    """AnyStory's processor on every attention layer of `transformer` (once: a transformer that has
    them already keeps them)."""
    processors = transformer.attn_processors
    if all(isinstance(p, AnyStoryFluxAttnProcessor) for p in processors.values()):
        return
    modules = dict(transformer.named_modules())
    ours = {}
    for name in processors:
        block_name = name[: -len(".attn.processor")]
        kind = "double" if block_name.startswith("transformer_blocks.") else "single"
        ours[name] = AnyStoryFluxAttnProcessor(f"{kind}.{block_name.rsplit('.', 1)[1]}", modules[block_name])
    transformer.set_attn_processor(ours)
