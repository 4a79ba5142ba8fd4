"""Subject tokens from SigLIP features: the Redux projection with low-rank corrections, a gate,
and average pooling to a small grid (9x9 = 81 tokens for the text stream, 3x3 = 9 for the router)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401 (diffusers finds a saved part's loader by this name in its module)
from diffusers.pipelines import ReduxImageEncoder
from torch import nn


class SubjectEmbedder(ReduxImageEncoder):
    """FLUX.1-Redux's image embedder (`redux_up`, `redux_down`, loaded from the Redux folder) with a
    rank-`lora_rank` correction on each projection, a sigmoid gate per SigLIP patch, and pooling of
    the gated patches to `grid` x `grid` tokens.

    Pooling averages gated features; dividing by the pooled gate makes each token a gate-weighted
    mean of its patches. Tokens whose patches all lie outside the subject's mask are zero."""

    @register_to_config
    def __init__(self, redux_dim: int = 1152, txt_in_features: int = 4096, lora_rank: int = 128,
                 lora_bias: bool = True, grid: int = 9) -> None:
        super().__init__(redux_dim=redux_dim, txt_in_features=txt_in_features)
        # Attribute names are the parameter names of the released checkpoint's embedder parts.
        self.redux_up_lora_A = nn.Linear(redux_dim, lora_rank, bias=False)
        self.redux_up_lora_B = nn.Linear(lora_rank, txt_in_features * 3, bias=lora_bias)
        self.redux_down_lora_A = nn.Linear(txt_in_features * 3, lora_rank, bias=False)
        self.redux_down_lora_B = nn.Linear(lora_rank, txt_in_features, bias=lora_bias)
        self.gate_proj = nn.Linear(txt_in_features, 1)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """features (B, S*S, redux_dim) from SigLIP; mask (B, S*S, 1), 1 on the subject's patches.
        Returns (B, grid*grid, txt_in_features)."""
        hidden = self.redux_up(features) + self.redux_up_lora_B(self.redux_up_lora_A(features))
        hidden = F.silu(hidden)
        hidden = self.redux_down(hidden) + self.redux_down_lora_B(self.redux_down_lora_A(hidden))
        gate = torch.sigmoid(self.gate_proj(hidden))
        grid = self.config.grid

        def pool(tokens: torch.Tensor) -> torch.Tensor:  # (B, S*S, C) -> (B, C, grid, grid)
            side = math.isqrt(tokens.shape[1])
            return F.adaptive_avg_pool2d(tokens.transpose(1, 2).unflatten(2, (side, side)), grid)

        pooled = pool(hidden * gate) / (pool(gate) + 1e-6)
        pooled = pooled * (pool(mask) > 0).to(pooled.dtype)
        return pooled.flatten(2).transpose(1, 2)
