"""Dense region embeddings for the region–phrase alignment loss (``segvlm.losses.region_phrase_loss``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class RegionPhraseHead(nn.Module):
    """Visual tokens (B×(1+h·w)×Cv, CLS first) → B×P×h×w embeddings in the phrase embedding's space, plus
    the learned logit scale and bias of a sigmoid (SigLIP-style) region–phrase loss.

    A region's embedding is the mask-weighted mean of this map (a linear map commutes with the mean, so
    pooling tokens first and projecting after gives the same vector). The loss is what CLIP's contrastive
    pre-training gives CLIPSeg for free: without it, a from-scratch vision tower trained on masks alone
    learns "where the objects are" and drops what tells them apart (colour, kind), which no decoder can
    then ground a phrase in.
    """

    def __init__(
        self,
        vision_width: int,
        *,
        embed_dim: int,
        init_temperature: float = 0.07,
        init_bias: float = -1.0,
    ) -> None:
        super().__init__()
        self.proj = nn.Linear(vision_width, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_bias)))

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """tokens: B×(1+h·w)×Cv → B×P×h×w (CLS dropped, row-major grid)."""
        return token_map(self.proj, tokens, grid)


def token_map(proj: nn.Module, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """A per-token map of the visual tokens laid out on their grid: B×(1+h·w)×Cv → B×C×h×w (CLS dropped,
    row-major tokens)."""
    h, w = grid
    return proj(tokens[:, 1:]).transpose(1, 2).unflatten(-1, (h, w))
