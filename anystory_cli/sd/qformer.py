"""Query transformers that turn CLIP image features into a few tokens.

The subject QFormer (m = 64 queries in the paper) gives the tokens that make a character *appear*
through cross-attention; the routing QFormer (1 query) gives the feature the router compares with
the latent pixels. Both have the Perceiver-resampler form: learned queries attend to
``[image features; queries]``, then a feed-forward, repeated ``depth`` times.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class QFormerConfig:
    image_embed_dim: int  # width of the image encoder's hidden states (ViT-H/14: 1280)
    output_dim: int  # width of the output tokens (subject: the text width d_c)
    num_queries: int = 64  # m (paper: 64 for the subject, 1 for routing)
    hidden_dim: int = 768
    depth: int = 4  # paper: 4 layers
    num_heads: int = 8
    ff_mult: int = 4

    def to_dict(self) -> dict:
        return asdict(self)


class _ResamplerLayer(nn.Module):
    """Queries attend to [features; queries], then a feed-forward; both pre-normed and residual."""

    def __init__(self, dim: int, num_heads: int, ff_mult: int):
        super().__init__()
        self.norm_features = nn.LayerNorm(dim)
        self.norm_queries = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.ff = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, dim * ff_mult, bias=False),
            nn.GELU(),
            nn.Linear(dim * ff_mult, dim, bias=False),
        )

    def forward(self, features: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        # features: (B, T, D), queries: (B, Q, D)
        q = self.norm_queries(queries)
        kv = torch.cat([self.norm_features(features), q], dim=1)  # (B, T+Q, D)
        queries = queries + self.attn(q, kv, kv, need_weights=False)[0]
        return queries + self.ff(queries)


class QFormer(nn.Module):
    """(B, T, image_embed_dim) image features -> (B, num_queries, output_dim) tokens."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.config = config
        d = config.hidden_dim
        self.queries = nn.Parameter(torch.randn(1, config.num_queries, d) / d**0.5)
        self.proj_in = nn.Linear(config.image_embed_dim, d)
        self.layers = nn.ModuleList(
            _ResamplerLayer(d, config.num_heads, config.ff_mult) for _ in range(config.depth)
        )
        self.proj_out = nn.Linear(d, config.output_dim)
        self.norm_out = nn.LayerNorm(config.output_dim)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        features = self.proj_in(image_features)  # (B, T, D)
        queries = self.queries.expand(features.shape[0], -1, -1)  # (B, Q, D)
        for layer in self.layers:
            queries = layer(features, queries)
        return self.norm_out(self.proj_out(queries))  # (B, Q, output_dim)
