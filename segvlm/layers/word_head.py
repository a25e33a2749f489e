"""Region and phrase embeddings in the text tower's token-embedding space, for the word objective
(``segvlm.task.WordObjective``: ``segvlm.losses.region_word_loss`` and ``segvlm.losses.word_prediction_loss``).
A training-only head: it lives in the objective, never in the model or its inference checkpoints."""

from __future__ import annotations

from torch import Tensor, nn


class WordHead(nn.Module):
    """Two linear maps into the space of the text tower's token embeddings (Ct wide): one of the visual tokens
    (B×(1+h·w)×Cv → B×Ct×h×w), one of the pooled phrase embedding (B×P → B×Ct).

    Both are scored against every entry of the vocabulary, and the word losses ask each to name the words of
    the phrase's subject, its attributes and name ("red", "triangle"): the target region, pooled from the
    dense map, and the phrase itself. That is the most direct supervision a phrase gives from-scratch towers
    about *what* the target is. Trained on masks alone, the vision tower keeps "where the objects are" and
    loses what tells them apart (shape kind, colour); the phrase embeddings of different kinds collapse
    together with it, and in a phrase that names two objects ("the ellipse above the hexagon") nothing says
    which one is the target.
    """

    def __init__(self, vision_width: int, *, phrase_dim: int, word_dim: int) -> None:
        super().__init__()
        self.region = nn.Linear(vision_width, word_dim)
        self.phrase = nn.Linear(phrase_dim, word_dim)

    def region_map(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """tokens: B×(1+h·w)×Cv → B×Ct×h×w (CLS dropped, row-major grid); ``self.phrase`` maps B×P → B×Ct."""
        h, w = grid
        return self.region(tokens[:, 1:]).transpose(1, 2).unflatten(-1, (h, w))
