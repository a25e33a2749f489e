"""Continuous relative-position bias for self-attention over a token grid (Swin V2's CPB, zero-initialised).

``bias = mlp(Δy, Δx)`` per head for every pair of grid tokens (offsets normalised by the grid's side, so it
works at any resolution); a CLS token first in the sequence gets no bias. Relations ("the circle right of
the star") are about where one token lies from another, which content-only attention must infer from
position embeddings mixed into the features; the bias gives each head that geometry directly. The MLP's
last layer starts at zero, so attention is unchanged at init.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["RelativePositionBias"]


class RelativePositionBias(nn.Module):
    """``forward(h, w, cls=True)`` → 1×heads×(cls + h·w)×(cls + h·w) additive attention bias."""

    def __init__(self, num_heads: int, *, hidden_dim: int = 64) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, num_heads))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, h: int, w: int, *, cls: bool = True) -> Tensor:
        device, dtype = self.mlp[0].weight.device, self.mlp[0].weight.dtype
        ys, xs = torch.meshgrid(
            torch.arange(h, device=device, dtype=dtype),
            torch.arange(w, device=device, dtype=dtype),
            indexing="ij",
        )
        pos = torch.stack((ys.flatten() / max(h - 1, 1), xs.flatten() / max(w - 1, 1)), dim=-1)  # N×2
        offsets = pos[None, :, :] - pos[:, None, :]  # N×N×2: key − query, in [-1, 1]
        bias = self.mlp(offsets).permute(2, 0, 1)  # heads×N×N
        if cls:
            bias = nn.functional.pad(bias, (1, 0, 1, 0))
        return bias[None]
