"""Attention processors that inject characters into a diffusers UNet (paper Eqs. 5-8).

Cross-attention (Eq. 5), at every ``attn2``:
    out = Attn(Q, K_text, V_text) + η · Σ_i σ(M_i) ⊙ Attn(Q, E_i Ŵ_k, E_i Ŵ_v)
Self-attention (Eqs. 6-8), at every ``attn1``: the keys/values are ``[own; G_1 W̃_k; …; G_N W̃_k]``
with an additive bias: 0 on own tokens; on character i's reference tokens γ where the pixel was
routed to i by the *previous* cross-attention layer, else masked. Background pixels see no
reference tokens.

Everything one UNet call injects travels in an ``AnyStoryContext`` passed as
``cross_attention_kwargs={"anystory": context}``; without it, the processors defer to the
layer's original processor, so an installed adapter changes nothing until it is used.

Two equivalent code paths: *dense* (every entry's attention at every pixel, weighted by the gates;
differentiable through σ, used in training and when gates are not one-hot) and *gathered* (each
pixel computes only the attention of the entry it is routed to; used at inference, much cheaper).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from .router import MASKED, LayerRouter, entry_argmax, hard_routes


@dataclass
class InjectionInputs:
    """What one generation injects, per batch row of the *conditional* branch (plain tensors).

    E = N + 1 entries per row: N characters (padded rows marked invalid), then the background,
    whose subject tokens are the null subject's (an all-zero reference image).
    """

    subject_tokens: torch.Tensor  # (B, E, m, d_c)
    routing_features: torch.Tensor  # (B, E, d_r)
    reference_features: dict[str, torch.Tensor]  # attn1 name -> (B, N, L_ref, C); may be empty
    entry_valid: torch.Tensor  # (B, E) bool; background always True
    latent_size: tuple[int, int]  # (h, w) of the denoised latents
    null_tokens: torch.Tensor | None = None  # (m, d_c): all entries' tokens in the unconditional branch
    region_masks: torch.Tensor | None = None  # (B, N, h, w): 1 where character i may appear
    fixed_routes: torch.Tensor | None = None  # (B, E, h, w) gates that replace the router
    subject_scale: float = 1.0  # η
    reference_scale: float | None = 0.0  # γ; None switches reference features off
    # Whether classifier-free guidance amplifies the references too: the unconditional half then
    # draws without them (its self-attention skips the reference tokens), so that
    # guidance extrapolates towards the reference as it does towards the caption. Our addition,
    # on by default in AnyStoryPipeline; off here, the paper's rule (references in both
    # halves). On the default model: 2-4 characters identified 0.28 -> 0.44 (docs/method.md).
    reference_guidance: bool = False
    training: bool = False
    record_maps: bool = False
    # The first `mirrored_rows` rows (the unconditional half of classifier-free guidance) reuse the
    # routing of the last `mirrored_rows` rows, their conditional twins: the same latents are being
    # denoised, so both branches keep the same layout and differ only in the subject tokens. Our
    # choice (the paper is silent); it also halves the router's cost.
    mirrored_rows: int = 0

    @property
    def num_entries(self) -> int:
        return self.subject_tokens.shape[1]


def _expand_rows(x: torch.Tensor | None, repeats: int) -> torch.Tensor | None:
    return None if x is None else x.repeat(repeats, *([1] * (x.dim() - 1)))


def _for_batch(inputs: InjectionInputs, batch: int) -> InjectionInputs:
    """Rows for a UNet batch. diffusers' pipelines stack classifier-free guidance as
    [unconditional; conditional]; the unconditional half gets the null subject as every entry's
    tokens, while routing and reference features stay (paper: references in both branches)."""
    rows = inputs.subject_tokens.shape[0]
    if batch == rows:
        return inputs
    if batch != 2 * rows or inputs.null_tokens is None:
        raise ValueError(f"UNet batch {batch} does not match {rows} rows of AnyStory inputs")
    uncond_tokens = inputs.null_tokens.expand_as(inputs.subject_tokens)
    return replace(
        inputs,
        subject_tokens=torch.cat([uncond_tokens, inputs.subject_tokens]),
        routing_features=_expand_rows(inputs.routing_features, 2),
        reference_features={k: _expand_rows(v, 2) for k, v in inputs.reference_features.items()},
        entry_valid=_expand_rows(inputs.entry_valid, 2),
        region_masks=_expand_rows(inputs.region_masks, 2),
        fixed_routes=_expand_rows(inputs.fixed_routes, 2),
        mirrored_rows=rows,
    )


@dataclass
class AnyStoryContext:
    """Per-generation state shared by the processors of one UNet.

    ``inputs`` never changes. Per UNet forward: ``previous_routes`` (the last cross-attention
    layer's gates, read by the next self-attention layer) and ``maps`` (each cross-attention
    layer's soft map, kept when recording or training). Projections of subject and reference
    tokens do not depend on the timestep, so they are computed once per generation.
    """

    inputs: InjectionInputs
    batch: InjectionInputs | None = None
    previous_routes: torch.Tensor | None = None  # (B, E, h, w)
    maps: list[tuple[str, torch.Tensor]] = field(default_factory=list)  # (layer, (B, E, h, w))
    coarse_maps: list[tuple[str, torch.Tensor]] = field(default_factory=list)  # recorded in training
    _memo: dict = field(default_factory=dict)
    # The pixel groups of `previous_routes` per resolution: a cross-attention layer's gathered
    # path sorts its pixels by the gates it has just computed, and the self-attention layer that
    # follows reads the same gates at the same resolution.
    _groups: dict = field(default_factory=dict)
    _groups_of: torch.Tensor | None = None  # the routes `_groups` were made from

    def begin_forward(self, batch_size: int) -> None:
        if self.batch is None or self.batch.subject_tokens.shape[0] != batch_size:
            self.batch = _for_batch(self.inputs, batch_size)
            self._memo.clear()
        self.previous_routes = None
        self.maps = []
        self.coarse_maps = []

    def memo(self, key, compute):
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def spatial_size(self, num_tokens: int) -> tuple[int, int]:
        """(h, w) of a layer with `num_tokens` latent tokens (each downsample halves, rounding up)."""
        h0, w0 = self.inputs.latent_size
        for level in range(8):
            h, w = math.ceil(h0 / 2**level), math.ceil(w0 / 2**level)
            if h * w == num_tokens:
                return h, w
        raise ValueError(f"{num_tokens} tokens do not match latents of size {h0}x{w0}")

    def logit_bias(self, size: tuple[int, int]) -> torch.Tensor:
        """(B, E, L): MASKED for padded entries and for a character outside its region."""

        def compute():
            b = self.batch
            allowed = b.entry_valid[:, :, None].expand(-1, -1, size[0] * size[1]).clone()
            if b.region_masks is not None:
                # Any overlap counts, so that a small region keeps at least one pixel at the
                # coarsest layers instead of vanishing there.
                regions = F.interpolate(b.region_masks.float(), size=size, mode="area") > 0
                allowed[:, :-1] &= regions.flatten(2)
            bias = torch.zeros(allowed.shape, dtype=b.routing_features.dtype, device=allowed.device)
            return bias.masked_fill(~allowed, MASKED)

        return self.memo(("bias", size), compute)

    def dense(self) -> bool:
        """Dense path in training (gradients through σ) and for gates that are not one-hot
        (e.g. the no-router ablation: every character everywhere); gathered otherwise."""
        fixed = self.batch.fixed_routes
        if self.batch.training:
            return True
        return fixed is not None and not self.memo(("one-hot",), lambda: _is_one_hot(fixed))

    def gates_at(self, routes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, E, h', w') gates -> (B, E, h*w), nearest-neighbour at a resolution change."""
        if routes.shape[-2:] != size:
            routes = F.interpolate(routes, size=size, mode="nearest")
        return routes.flatten(2)

    def groups_at(self, gates: torch.Tensor, size: tuple[int, int]) -> list[_PixelGroups]:
        """The pixel groups of one-hot `gates` (B, E, h*w), which are `previous_routes` read at
        `size`: computed once per routing and resolution."""
        if self._groups_of is not self.previous_routes:
            self._groups, self._groups_of = {}, self.previous_routes
        if size not in self._groups:
            self._groups[size] = _pixel_groups(gates)
        return self._groups[size]


# ---------------------------------------------------------------------------------------------
# shared pieces of both processors


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    # (..., L, heads * d) -> (..., heads, L, d)
    *lead, length, inner = x.shape
    return x.view(*lead, length, heads, inner // heads).transpose(-3, -2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    # (..., heads, L, d) -> (..., L, heads * d)
    *lead, heads, length, d = x.shape
    return x.transpose(-3, -2).reshape(*lead, length, heads * d)


def _check_supported(attn: nn.Module, layer: str) -> None:
    if attn.spatial_norm is not None or attn.group_norm is not None:
        raise ValueError(f"{layer}: AnyStory supports transformer-block attention only")


def _finish(attn, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """Output projection, dropout, residual and rescale, as diffusers' AttnProcessor2_0 does."""
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


def _mask_for_sdpa(attn, attention_mask, length, batch):
    if attention_mask is None:
        return None
    attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
    return attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])


def _qkv(attn, hidden_states, context):
    """Query, key and value heads (B, heads, L, d) of the layer's own projections."""
    query = _split_heads(attn.to_q(hidden_states), attn.heads)
    key = _split_heads(attn.to_k(context), attn.heads)
    value = _split_heads(attn.to_v(context), attn.heads)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value


def _base_attention(attn, hidden_states, context, attention_mask):
    """The layer's own attention, the same operations as AttnProcessor2_0 (so that with nothing to
    inject the result is bit-identical). Returns (query heads, merged output (B, L, inner))."""
    mask = _mask_for_sdpa(attn, attention_mask, context.shape[1], hidden_states.shape[0])
    query, key, value = _qkv(attn, hidden_states, context)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
    return query, _merge_heads(out).to(query.dtype)


def _rows_seeing_references(inputs: InjectionInputs, batch: int, device) -> torch.Tensor:
    """(B,) bool: the batch rows whose routed pixels attend to reference tokens. All of them,
    except the unconditional half of classifier-free guidance under reference guidance."""
    sees = torch.ones(batch, dtype=torch.bool, device=device)
    if inputs.reference_guidance:
        sees[:inputs.mirrored_rows] = False
    return sees


def _selected_rows(selected: torch.Tensor) -> slice | torch.Tensor | None:
    """The True rows of a (G,) bool mask as an index: None if there are none, a slice where they
    are consecutive (indexing with it gives views, not copies), else their positions."""
    rows = selected.nonzero().squeeze(1).tolist()
    if not rows:
        return None
    if rows == list(range(rows[0], rows[-1] + 1)):
        return slice(rows[0], rows[-1] + 1)
    return torch.tensor(rows, device=selected.device)


def _is_one_hot(gates: torch.Tensor) -> bool:
    return bool(((gates == 0) | (gates == 1)).all() and (gates.sum(dim=1) == 1).all())


@dataclass
class _PixelGroups:
    """The pixels of some batch rows (rows that share one owner map) sorted by the entry they are
    routed to, so that each entry's pixels form one contiguous slice. A layer's gathered path
    sorts its input once, computes everything on contiguous slices, and unsorts once: on a CPU,
    few large attention calls and few copies matter more than anything else."""

    rows: slice | torch.Tensor
    order: torch.Tensor  # (L,) sorted position -> pixel
    inverse: torch.Tensor  # (L,) pixel -> sorted position
    counts: list[int]  # pixels per entry

    def segments(self):
        """(entry, slice of sorted positions) for every entry that owns pixels."""
        start = 0
        for entry, count in enumerate(self.counts):
            if count:
                yield entry, slice(start, start + count)
            start += count


def _pixel_groups(gates: torch.Tensor) -> list[_PixelGroups]:
    """One group per distinct owner map among the rows of one-hot gates (B, E, L). The mirrored
    halves of classifier-free guidance share a map, so one image gives one group."""
    owner = entry_argmax(gates)  # (B, L)
    members: list[list[int]] = []
    for row in range(owner.shape[0]):
        match = next((m for m in members if torch.equal(owner[m[0]], owner[row])), None)
        if match is None:
            members.append([row])
        else:
            match.append(row)
    groups = []
    for rows in members:
        order = torch.argsort(owner[rows[0]], stable=True)
        index = slice(None) if len(members) == 1 else torch.tensor(rows, device=owner.device)
        counts = torch.bincount(owner[rows[0]], minlength=gates.shape[1]).tolist()
        groups.append(_PixelGroups(index, order, _inverse_permutation(order), counts))
    return groups


def _inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.shape[0], device=order.device)
    return inverse


def _attend_by_group(hidden_states: torch.Tensor, groups: list[_PixelGroups], attend) -> torch.Tensor:
    """The gathered path's skeleton: per group of rows, sort the pixels by owner, let
    `attend(group, sorted_states)` return attention heads (G, heads, L, d) in sorted order, then
    merge heads and put the pixels back in place. Returns (B, L, inner)."""
    out = None
    for group in groups:
        sorted_states = hidden_states[group.rows].index_select(1, group.order)
        merged = _unsort_heads(attend(group, sorted_states), group.inverse).to(hidden_states.dtype)
        if len(groups) == 1:
            return merged
        if out is None:
            out = merged.new_empty(hidden_states.shape[0], *merged.shape[1:])
        out[group.rows] = merged
    return out


def _unsort_heads(x: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """(G, heads, L, d) in sorted pixel order -> (G, L, heads * d) in place order: merging the
    heads and unsorting the pixels in one copy."""
    g, heads, length, d = x.shape
    return x.transpose(1, 2).index_select(1, inverse).view(g, length, heads * d)


def attention_with_lse(query, key, value) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output (B, heads, L, d) and the log-sum-exp of each query's scores (B, heads, L).

    With both, two attentions over disjoint key sets merge exactly into the attention over their
    union, which lets a pixel's attention over [own tokens; reference tokens] reuse the plain
    self-attention computed for every pixel. The fused kernels return the log-sum-exp for free."""
    if query.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value)
        return out, lse
    return _attention_with_lse_reference(query, key, value)


def _attention_with_lse_reference(query, key, value) -> tuple[torch.Tensor, torch.Tensor]:
    """The same in plain operations (any device; memory grows with queries x keys)."""
    scores = query @ key.transpose(-1, -2) * query.shape[-1] ** -0.5
    lse = scores.float().logsumexp(dim=-1)
    return (scores - lse[..., None].to(scores.dtype)).softmax(dim=-1) @ value, lse


# ---------------------------------------------------------------------------------------------
# cross-attention: routed subject tokens


class _Processor:
    """What both processors share: without an AnyStory context, the layer's original processor
    runs unchanged. diffusers passes a processor only the `cross_attention_kwargs` that its
    __call__ names, hence the explicit `anystory` parameter."""

    layer: str
    original: object

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        anystory: AnyStoryContext | None = None,
    ) -> torch.Tensor:
        if anystory is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        _check_supported(attn, self.layer)
        return self.inject(anystory, attn, hidden_states, encoder_hidden_states, attention_mask)


class CrossAttentionProcessor(_Processor):
    """Eq. 5 at one ``attn2``. Owns no weights: it points at its layer's router and Ŵ_k, Ŵ_v,
    which live in the adapter (so installing never changes the UNet's state dict)."""

    def __init__(self, layer: str, router: LayerRouter, to_k: nn.Linear, to_v: nn.Linear, original):
        self.layer, self.router, self.to_k, self.to_v, self.original = layer, router, to_k, to_v, original

    def inject(self, anystory: AnyStoryContext, attn, hidden_states, encoder_hidden_states, attention_mask):
        residual = hidden_states
        context = encoder_hidden_states
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        inputs = anystory.batch
        size = anystory.spatial_size(hidden_states.shape[1])
        coarse, soft, gates = self._route(anystory, hidden_states, size)
        if inputs.record_maps or inputs.training:
            anystory.maps.append((self.layer, soft.view(*soft.shape[:2], *size)))
        if inputs.training and coarse is not None:
            anystory.coarse_maps.append((self.layer, coarse.view(*coarse.shape[:2], *size)))
        anystory.previous_routes = gates.view(*gates.shape[:2], *size)
        if inputs.subject_scale == 0:
            _, out = _base_attention(attn, hidden_states, context, attention_mask)
        elif anystory.dense() or attention_mask is not None:
            query, out = _base_attention(attn, hidden_states, context, attention_mask)
            out = out + inputs.subject_scale * self._dense_subject_attention(anystory, query, gates)
        else:
            out = self._gathered(anystory, attn, hidden_states, context, anystory.groups_at(gates, size))
        return _finish(attn, out, residual)

    def _route(self, ctx: AnyStoryContext, hidden_states, size):
        """Coarse soft map, refined soft map M and gates σ(M), each (B, E, L); the soft maps are
        None unless recorded (router maps) or trained on."""
        inputs = ctx.batch
        if inputs.fixed_routes is not None:
            gates = ctx.gates_at(inputs.fixed_routes.to(hidden_states.dtype), size)
            return None, gates, gates
        if inputs.num_entries == 1:  # background only: nothing to decide
            ones = hidden_states.new_ones(hidden_states.shape[0], 1, hidden_states.shape[1])
            return None, ones, ones
        skip = inputs.mirrored_rows
        routing = inputs.routing_features[skip:].to(hidden_states.dtype)
        coarse, fine = self.router(routing, hidden_states[skip:], ctx.logit_bias(size)[skip:], size)
        gates = hard_routes(fine, training=inputs.training)
        if not (inputs.record_maps or inputs.training):  # the soft maps are only recorded
            return None, None, torch.cat([gates, gates]) if skip else gates
        coarse, soft = coarse.softmax(dim=1), fine.softmax(dim=1)
        if skip:
            coarse, soft, gates = (torch.cat([x, x]) for x in (coarse, soft, gates))
        return coarse, soft, gates

    def _subject_kv(self, ctx: AnyStoryContext, heads: int):
        def compute():
            tokens = ctx.batch.subject_tokens  # (B, E, m, d_c)
            tokens = tokens.to(self.to_k.weight.dtype)
            return _split_heads(self.to_k(tokens), heads), _split_heads(self.to_v(tokens), heads)

        return ctx.memo(("subject", self.layer), compute)  # (B, E, heads, m, d) each

    def _dense_subject_attention(self, ctx: AnyStoryContext, query, gates) -> torch.Tensor:
        """Σ_i σ(M_i) ⊙ Attn(Q, E_i Ŵ_k, E_i Ŵ_v) at every pixel, merged heads: (B, L, inner)."""
        key, value = self._subject_kv(ctx, query.shape[1])
        out = 0
        for entry in range(gates.shape[1]):
            attended = F.scaled_dot_product_attention(query, key[:, entry], value[:, entry])
            out = out + gates[:, entry, :, None] * _merge_heads(attended)
        return out

    def _gathered(self, ctx: AnyStoryContext, attn, hidden_states, context, groups) -> torch.Tensor:
        """Text attention plus, for each pixel, only its own entry's subject attention."""
        key, value = self._subject_kv(ctx, attn.heads)
        scale = ctx.batch.subject_scale

        def attend(group, sorted_states):
            rows = group.rows
            query, text_key, text_value = _qkv(attn, sorted_states, context[rows])
            attended = F.scaled_dot_product_attention(query, text_key, text_value)
            for entry, part in group.segments():
                subject = F.scaled_dot_product_attention(query[:, :, part], key[rows, entry], value[rows, entry])
                attended[:, :, part] += subject if scale == 1 else scale * subject  # 1 · x is x
            return attended

        return _attend_by_group(hidden_states, groups, attend)


# ---------------------------------------------------------------------------------------------
# self-attention: routed reference features


class SelfAttentionProcessor(_Processor):
    """Eqs. 6-8 at one ``attn1``; points at its layer's W̃_k, W̃_v in the adapter."""

    def __init__(self, layer: str, to_k: nn.Linear | None, to_v: nn.Linear | None, original):
        self.layer, self.to_k, self.to_v, self.original = layer, to_k, to_v, original

    def inject(self, anystory: AnyStoryContext, attn, hidden_states, encoder_hidden_states, attention_mask):
        residual = hidden_states
        inputs = anystory.batch
        features = inputs.reference_features.get(self.layer)
        if (
            features is None
            or self.to_k is None
            or inputs.reference_scale is None
            or anystory.previous_routes is None  # first self-attention layer of the UNet
            or attention_mask is not None
        ):
            _, out = _base_attention(attn, hidden_states, hidden_states, attention_mask)
            return _finish(attn, out, residual)

        ref_key, ref_value = self._reference_kv(anystory, attn.heads)  # (B, N, heads, Lr, d)
        size = anystory.spatial_size(hidden_states.shape[1])
        gates = anystory.gates_at(anystory.previous_routes, size)  # (B, E, L)
        batch = hidden_states.shape[0]
        sees = anystory.memo(("sees", batch), lambda: _rows_seeing_references(inputs, batch, hidden_states.device))
        if anystory.dense():
            query, key, value = _qkv(attn, hidden_states, hidden_states)
            out = _merge_heads(self._dense(query, key, value, ref_key, ref_value, gates, sees, inputs.reference_scale))
        else:
            groups = anystory.groups_at(gates, size)
            out = self._gathered(attn, hidden_states, ref_key, ref_value, groups, sees, inputs.reference_scale)
        return _finish(attn, out.to(hidden_states.dtype), residual)

    def _reference_kv(self, ctx: AnyStoryContext, heads: int):
        def compute():
            features = ctx.batch.reference_features[self.layer].to(self.to_k.weight.dtype)
            return _split_heads(self.to_k(features), heads), _split_heads(self.to_v(features), heads)

        return ctx.memo(("reference", self.layer), compute)  # (B, N, heads, Lr, d) each

    @staticmethod
    def _dense(query, key, value, ref_key, ref_value, gates, sees, gamma):
        """All reference tokens as extra keys, masked per pixel by the gates (B, E, L) and per
        row by `sees` (B,)."""
        b, n, heads, lr, d = ref_key.shape
        keys = torch.cat([key, ref_key.permute(0, 2, 1, 3, 4).reshape(b, heads, n * lr, d)], dim=2)
        values = torch.cat([value, ref_value.permute(0, 2, 1, 3, 4).reshape(b, heads, n * lr, d)], dim=2)
        routed = (gates[:, :n] > 0) & sees[:, None, None]  # (B, N, L); the background sees no references
        ref_bias = torch.where(routed, float(gamma), MASKED).to(query.dtype)  # (B, N, L)
        ref_bias = ref_bias.permute(0, 2, 1)[..., None].expand(b, -1, n, lr).reshape(b, -1, n * lr)
        own_bias = query.new_zeros(b, key.shape[2], key.shape[2])
        bias = torch.cat([own_bias, ref_bias], dim=-1)[:, None]  # (B, 1, L, L + N*Lr)
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=bias)

    @staticmethod
    def _gathered(attn, hidden_states, ref_key, ref_value, groups, sees, gamma):
        """Every pixel's plain self-attention, then, for the pixels routed to a character in the
        rows that `sees` (B,) references, the attention over its reference tokens merged in as if
        both had shared one softmax: out = (1 - w) · own + w · ref with w = σ(lse_ref + γ - lse_own).
        Merged heads (B, L, inner)."""

        def attend(group, sorted_states):
            query, key, value = _qkv(attn, sorted_states, sorted_states)
            attended, lse = attention_with_lse(query, key, value)
            # Rows of the group that see references: all of them but reference guidance's
            # unconditional half, which keeps its place in the group so that the plain
            # self-attention above stays one batched call.
            local = _selected_rows(sees[group.rows])
            if local is None:
                return attended
            keys, values = ref_key[group.rows][local], ref_value[group.rows][local]
            queries, own_lse = query[local], lse[local]
            for entry, part in group.segments():
                if entry >= keys.shape[1]:  # background pixels see no references
                    continue
                ref_out, ref_lse = attention_with_lse(queries[:, :, part], keys[:, entry], values[:, entry])
                weight = torch.sigmoid(ref_lse + gamma - own_lse[:, :, part])[..., None].to(ref_out.dtype)
                if isinstance(local, slice):  # a view: blend in place
                    attended[local, :, part].lerp_(ref_out, weight)
                else:
                    attended[local, :, part] = torch.lerp(attended[local, :, part], ref_out, weight)
            return attended

        return _attend_by_group(hidden_states, groups, attend)
