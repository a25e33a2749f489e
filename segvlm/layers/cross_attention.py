"""Gated cross-attention from visual tokens to the phrase's token features, with positional encodings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sincos_1d(length: int, dim: int, *, temperature: float = 10000.0, device=None) -> Tensor:
    """Fixed 1-D sinusoidal encoding, L×dim (sin half, cos half); ``dim`` must be even."""
    if dim % 2:
        raise ValueError(f"1-D sin-cos encoding needs an even dim, got {dim}")
    pos = torch.arange(length, device=device, dtype=torch.float32)
    omega = 1.0 / temperature ** (torch.arange(dim // 2, device=device, dtype=torch.float32) / (dim // 2))
    angles = pos[:, None] * omega[None, :]  # L×dim/2
    return torch.cat((angles.sin(), angles.cos()), dim=1)


def sincos_2d(height: int, width: int, dim: int, *, temperature: float = 10000.0, device=None) -> Tensor:
    """Fixed 2-D sinusoidal encoding of an h×w grid in row-major token order, (h·w)×dim.

    The first half of the channels encodes the row, the second the column (MAE / DETR style); being
    parameter-free it serves any grid size (8×8 at 128 px, 22×22 at 352 px). ``dim`` % 4 == 0.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos encoding needs dim divisible by 4, got {dim}")
    pe_y = sincos_1d(height, dim // 2, temperature=temperature, device=device)  # h×dim/2
    pe_x = sincos_1d(width, dim // 2, temperature=temperature, device=device)  # w×dim/2
    grid = torch.cat(
        (pe_y[:, None, :].expand(height, width, -1), pe_x[None, :, :].expand(height, width, -1)), dim=-1
    )
    return grid.reshape(height * width, dim)


class GatedCrossAttention(nn.Module):
    """Pre-norm multi-head cross-attention added through a zero-initialised ``tanh`` gate (Flamingo).

    ``forward(x, text, text_mask, pos, text_pos)``:
        x: B×N×D visual tokens (queries); text: B×L×D phrase tokens (keys / values, already in D);
        text_mask: B×L bool, True = real token; pos: N×D or B×N×D, text_pos: L×D or B×L×D positional
        encodings added to queries / keys only (values stay content-only, as in DETR).
    Returns B×N×D: ``x + tanh(gate)·attn``; with ``gate = 0`` at init the block is exactly the identity,
    so a pretrained decoder is unchanged until the gate learns to open.
    """

    def __init__(self, dim: int, *, num_heads: int, eps: float = 1e-5) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm_q = nn.LayerNorm(dim, eps=eps)
        self.norm_kv = nn.LayerNorm(dim, eps=eps)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(
        self,
        x: Tensor,
        text: Tensor,
        text_mask: Tensor | None = None,
        pos: Tensor | None = None,
        text_pos: Tensor | None = None,
    ) -> Tensor:
        b, n, d = x.shape
        q_in, kv = self.norm_q(x), self.norm_kv(text)
        q = self.q_proj(q_in if pos is None else q_in + pos)
        k = self.k_proj(kv if text_pos is None else kv + text_pos)
        v = self.v_proj(kv)
        # B×L×D → B×heads×L×D/heads
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (q, k, v))
        attn_mask = None
        if text_mask is not None:
            # a phrase with no real token would softmax over nothing (NaN): let it see all positions
            keep = text_mask.bool() | ~text_mask.bool().any(dim=-1, keepdim=True)
            attn_mask = keep[:, None, None, :]  # B×1×1×L, True = attend
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        o = self.out_proj(o.transpose(1, 2).reshape(b, n, d))
        return x + torch.tanh(self.gate) * o
