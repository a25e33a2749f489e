"""Feature-wise linear modulation (FiLM, Perez et al. 2018): ``y = γ(c)·x + β(c)``."""

from __future__ import annotations

from torch import Tensor, nn


def film(x: Tensor, scale: Tensor, shift: Tensor, *, channel_dim: int = -1) -> Tensor:
    """Modulate ``x`` by per-sample, per-channel ``scale`` and ``shift`` (both B×C).

    ``channel_dim`` says where C sits in ``x``: -1 for tokens (B×N×C), 1 for maps (B×C×H×W). The
    multiply-then-add order is CLIPSeg's, so results are bit-identical to its decoder.
    """
    # B×C → broadcastable against x: put C at channel_dim and singleton dims elsewhere
    shape = [1] * x.ndim
    shape[0] = x.shape[0]
    shape[channel_dim] = x.shape[channel_dim]
    return scale.reshape(shape) * x + shift.reshape(shape)


class FiLM(nn.Module):
    """FiLM from a conditioning vector: ``forward(x, cond)`` with ``cond`` B×cond_dim.

    The CLIPSeg-compatible decoder keeps its own ``film_mul`` / ``film_add`` linears (checkpoint names)
    and calls :func:`film`; new code uses this module.
    """

    def __init__(self, cond_dim: int, channels: int, *, channel_dim: int = -1) -> None:
        super().__init__()
        self.mul = nn.Linear(cond_dim, channels)
        self.add = nn.Linear(cond_dim, channels)
        self.channel_dim = channel_dim

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        return film(x, self.mul(cond), self.add(cond), channel_dim=self.channel_dim)
