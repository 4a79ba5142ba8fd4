"""The decoupled instance-aware router (paper §3.3).

At every cross-attention layer, N+1 routing features (N characters, then the background) are
compared with the layer's latent tokens:

1. coarse map   = projected inner product of routing features and tokens;
2. refinement   = each routing feature attends to the tokens whose coarse argmax is itself
                  (masked cross-attention), residual update of the routing features;
3. refined map  = projected inner product again; softmax over the N+1 entries.

The refined soft map ``M`` is what the routing loss supervises; the hard map ``σ(M)`` (argmax
one-hot at inference, straight-through hard Gumbel-softmax in training) is what gates injection.

The paper projects each latent token on its own. ``context_layers > 0`` (our choice, off by
default) first passes the layer's token grid through that many 3x3 convolutions, so a token's keys
see its neighbourhood: on a small base a latent pixel is a 4x4-pixel patch that says little about
whose it is, and the patches around it say more (docs/default-model.md, "Routers that read a
neighbourhood").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# A large finite negative instead of -inf: a fully masked softmax row stays finite (no NaN).
MASKED = -1e4
ROUTING_LOSS_WEIGHT = 0.1  # λ in paper Eq. 4


class LayerRouter(nn.Module):
    """Router of one cross-attention layer: (B, E, routing_dim) x (B, L, latent_dim) -> (B, E, L)."""

    def __init__(self, routing_dim: int, latent_dim: int, hidden_dim: int,
                 context_layers: int = 0, context_dim: int = 128):
        super().__init__()
        self.hidden_dim, self.routing_dim = hidden_dim, routing_dim
        self.scale = hidden_dim**-0.5
        self.context = _token_context(latent_dim, context_dim, context_layers)
        # Everything computed from the L latent tokens in one matrix product (this runs at every
        # cross-attention layer of every step): keys of the coarse map, of the refinement and of
        # the refined map, and the refinement's values.
        self.latent_proj = nn.Linear(context_dim if context_layers else latent_dim, 3 * hidden_dim + routing_dim)
        # Projections of the E routing features: cheap, E is at most a handful.
        self.coarse_query = nn.Linear(routing_dim, hidden_dim)
        self.refine_norm = nn.LayerNorm(routing_dim)
        self.refine_query = nn.Linear(routing_dim, hidden_dim)
        self.fine_query = nn.Linear(routing_dim, hidden_dim)

    def _logits(self, queries, keys, bias):
        # (B, E, D) x (B, L, D) -> (B, E, L), plus the bias in the same kernel
        scaled = queries * self.scale
        if bias is None:
            return torch.bmm(scaled, keys.transpose(1, 2))
        return torch.baddbmm(bias, scaled, keys.transpose(1, 2))

    def forward(
        self,
        routing_features: torch.Tensor,  # (B, E, routing_dim), E = N + 1, background last
        hidden_states: torch.Tensor,  # (B, L, latent_dim): the normed input of the cross-attention
        logit_bias: torch.Tensor | None = None,  # (B, E, L): 0 allowed, MASKED forbidden
        size: tuple[int, int] | None = None,  # (h, w) of the token grid; needed with context layers
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (coarse, refined) routing logits, each (B, E, L); softmax over E gives a map.
        Only the refined map gates injection. The coarse map only picks, through its argmax, what
        each routing feature may attend to; that choice carries no gradient, so the routing loss
        supervises the coarse map as well (our choice; the paper is silent on it)."""
        h = self.hidden_dim
        if self.context is not None:
            hidden_states = _on_grid(self.context, hidden_states, size)
        coarse_keys, refine_keys, fine_keys, refine_values = self.latent_proj(hidden_states).split(
            [h, h, h, self.routing_dim], dim=-1
        )
        coarse = self._logits(self.coarse_query(routing_features), coarse_keys, logit_bias)
        # Masked cross-attention: entry e attends only to the tokens whose coarse argmax is e.
        owner = entry_argmax(coarse, keepdim=True)  # (B, 1, L)
        entries = torch.arange(coarse.shape[1], device=coarse.device)[None, :, None]
        not_own = torch.where(owner == entries, 0.0, MASKED).to(coarse.dtype)  # (B, E, L)
        attention = self._logits(self.refine_query(self.refine_norm(routing_features)), refine_keys, not_own)
        refined = routing_features + attention.softmax(dim=-1) @ refine_values
        return coarse, self._logits(self.fine_query(refined), fine_keys, logit_bias)


def _token_context(latent_dim: int, width: int, layers: int) -> nn.Sequential | None:
    """`layers` 3x3 convolutions (each followed by GELU) over the token grid, or None."""
    if layers == 0:
        return None
    convs = []
    for i in range(layers):
        convs += [nn.Conv2d(latent_dim if i == 0 else width, width, 3, padding=1), nn.GELU()]
    return nn.Sequential(*convs)


def _on_grid(module: nn.Module, tokens: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """Apply a convolutional `module` to (B, L, C) tokens laid out row-major on an (h, w) grid."""
    if size is None or size[0] * size[1] != tokens.shape[1]:
        raise ValueError(f"a router with context layers needs the grid size of its {tokens.shape[1]} tokens, got {size}")
    batch, _, channels = tokens.shape
    grid = tokens.transpose(1, 2).reshape(batch, channels, *size)
    return module(grid).flatten(2).transpose(1, 2)


def hard_routes(logits: torch.Tensor, training: bool, tau: float = 1.0) -> torch.Tensor:
    """σ(M): one-hot over the entry axis (dim 1). Training uses straight-through hard Gumbel-softmax
    so the diffusion loss reaches the router through the gates."""
    if training:
        return F.gumbel_softmax(logits, tau=tau, hard=True, dim=1)
    index = entry_argmax(logits, keepdim=True)
    return torch.zeros_like(logits).scatter_(1, index, 1.0)


def entry_argmax(x: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """The argmax over the entry axis (dim 1) of (B, E, L) maps: the first maximum, as argmax
    gives it. `max`'s indices are that same index, and on a CPU about 20x faster than `argmax`
    along a short axis that is not the last (0.01 ms against 0.2 ms for 3 x 1024), which counts at
    two or three argmaxes per cross-attention layer and step."""
    return x.max(dim=1, keepdim=keepdim).indices


def downsample_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, N, H, W) instance masks in [0, 1] -> (B, N, h, w) coverage fractions (area average)."""
    return F.interpolate(masks.float(), size=size, mode="area")


def routing_loss(
    soft_maps: list[torch.Tensor],  # per layer: (B, E, h, w) softmax maps, background last
    instance_masks: torch.Tensor,  # (B, N, H, W) ground truth, N = E - 1 (padding: all zero)
    character_valid: torch.Tensor | None = None,  # (B, N) bool, False for padded entries
    weight: float = ROUTING_LOSS_WEIGHT,  # λ
) -> torch.Tensor:
    """Paper Eq. 4: λ · mean over layers and characters of ‖M_i^l − M_i^gt‖² (mean over pixels).
    The background entry is supervised only through the softmax."""
    if not soft_maps:
        raise ValueError("routing_loss needs at least one layer's maps")
    n = instance_masks.shape[1]
    if character_valid is None:
        character_valid = torch.ones(instance_masks.shape[:2], dtype=torch.bool, device=instance_masks.device)
    valid = character_valid.float()  # (B, N)
    per_layer = []
    for maps in soft_maps:
        target = downsample_masks(instance_masks, maps.shape[-2:])
        err = (maps[:, :n] - target).pow(2).mean(dim=(-2, -1))  # (B, N)
        per_layer.append((err * valid).sum() / valid.sum().clamp(min=1.0))
    return weight * torch.stack(per_layer).mean()
