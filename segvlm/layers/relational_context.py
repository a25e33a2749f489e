"""Relational context: where the phrase's reference object lies, seen from every position of the map.

"the hexagon right of the small hexagon" names two objects; the mask is the first, and which hexagon it is
depends on where the second one is. A decoder that reads the phrase as a whole marks both (it did: on the
demo's relation phrases three predictions in four covered most of the reference object, and the model
scored below a relation-blind one that marks every object the subject's name matches). This block gives
each position the geometry it needs, computed exactly rather than learned:

    t      = text(tokens) (+ positions for the keys)                      B×L×D
    ref, p = two learned role queries attend over t: the reference        B×D each
             object's words, and the relation's words
    r      = softmax over positions of <key(x), ref>                      B×h×w, sums to 1
    maps   = [west − east, north − south, r / max r]                      B×3×h×w
             (the share of r left of / above each position minus the share right of / below it, a
             position's own row or column counting half; and r itself)
    x     += Σ_k out(p)_k · maps_k                                        out zero-initialised

``r`` is never supervised: the training mask alone teaches it, because a relation phrase's target is
where the relation's map says so. The update is zero at init (``out`` starts at 0), like the decoder's
other additions, so a trained decoder is unchanged by switching it on until training moves ``out``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from segvlm.layers.cross_attention import sincos_1d

__all__ = ["RelationalContext", "directional_maps"]

NUM_MAPS = 3  # horizontal, vertical, the reference itself


def directional_maps(reference: Tensor) -> Tensor:
    """B×h×w reference distribution (each sums to 1) → B×2×h×w: (share of it in the columns left of each
    position − share right of it, share in the rows above − share below), own column / row counting half.

    +1 in channel 0 means the reference lies entirely to the left (the position is "right of" it); +1 in
    channel 1 means it lies entirely above (the position is "below" it).
    """
    b, h, w = reference.shape
    columns = reference.sum(dim=1)  # B×w
    rows = reference.sum(dim=2)  # B×h
    total = columns.sum(dim=-1, keepdim=True)  # B×1 (1 for a distribution)
    west = torch.cumsum(columns, dim=-1) - 0.5 * columns  # mass left of each column, own half
    north = torch.cumsum(rows, dim=-1) - 0.5 * rows
    horizontal = (2 * west - total)[:, None, :].expand(b, h, w)  # west − east
    vertical = (2 * north - total)[:, :, None].expand(b, h, w)  # north − south
    return torch.stack((horizontal, vertical), dim=1)


class RelationalContext(nn.Module):
    """Adds, at every position, where the phrase's reference object lies relative to it (see the module
    docstring).

    ``forward(x, text_tokens, text_mask)``:
        x: B×D×h×w decoder features; text_tokens: B×L×text_width text encoder states; text_mask: B×L bool,
        True = real token.
    Returns ``(x + context, reference)``: B×D×h×w, and the B×h×w reference distribution.
    """

    def __init__(self, dim: int, *, text_width: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.dim = dim
        self.text_norm = nn.LayerNorm(text_width, eps=eps)
        self.text = nn.Linear(text_width, dim)
        self.roles = nn.Parameter(torch.randn(2, dim) / math.sqrt(dim))  # reference, relation
        self.key = nn.Conv2d(dim, dim, kernel_size=1)
        self.out = nn.Linear(dim, NUM_MAPS * dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, text_tokens: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor]:
        b, d, h, w = x.shape
        values = self.text(self.text_norm(text_tokens))  # B×L×D
        keys = values + sincos_1d(values.shape[1], d, device=values.device).to(values.dtype)
        scores = torch.einsum("rd,bld->brl", self.roles, keys) / math.sqrt(d)  # B×2×L
        scores = scores.masked_fill(~text_mask[:, None, :], float("-inf"))
        reference_words, relation_words = torch.einsum("brl,bld->brd", scores.softmax(dim=-1), values).unbind(
            dim=1
        )  # B×D each
        logits = torch.einsum("bdhw,bd->bhw", self.key(x), reference_words) / math.sqrt(d)
        reference = logits.flatten(1).softmax(dim=-1).view(b, h, w)  # B×h×w, sums to 1
        peak = reference.flatten(1).amax(dim=-1).clamp_min(1e-12)[:, None, None]
        maps = torch.cat((directional_maps(reference), (reference / peak)[:, None]), dim=1)  # B×3×h×w
        weights = self.out(relation_words).view(b, NUM_MAPS, d)  # B×3×D
        return x + torch.einsum("bkd,bkhw->bdhw", weights, maps), reference
