"""Dense region embeddings in the text tower's token-embedding space, for the region–word loss
(``segvlm.losses.region_word_loss``)."""

from __future__ import annotations

from torch import Tensor, nn


class RegionWordHead(nn.Module):
    """Visual tokens (B×(1+h·w)×Cv, CLS first) → B×Ct×h×w embeddings comparable with the text tower's token
    embeddings (Ct wide).

    A target region's embedding (the mask-weighted mean of this map; a linear map commutes with the mean)
    is scored against every entry of the vocabulary, and the loss asks it to name the words of the target's
    name and attributes ("red", "triangle"). That is the most direct supervision a phrase gives a
    from-scratch vision tower about *what* the target is: trained on masks alone, it keeps "where the objects
    are" and loses what tells them apart (shape kind, colour), and the phrase embeddings of different kinds
    collapse together with it.
    """

    def __init__(self, vision_width: int, *, word_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(vision_width, word_dim)

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """tokens: B×(1+h·w)×Cv → B×Ct×h×w (CLS dropped, row-major grid)."""
        h, w = grid
        return self.proj(tokens[:, 1:]).transpose(1, 2).unflatten(-1, (h, w))
