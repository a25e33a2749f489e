"""Activation registry: config strings (``decoder.act``) → activation module types."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class QuickGELU(nn.Module):
    """OpenAI CLIP's GELU approximation ``x·σ(1.702x)`` (the ``quick_gelu`` of CLIP checkpoints)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


_ACT_LAYERS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "quick_gelu": QuickGELU,
}


def get_act_layer(name: str) -> type[nn.Module]:
    """The activation class registered as ``name`` (``relu``, ``gelu``, ``silu``, ``quick_gelu``)."""
    try:
        return _ACT_LAYERS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(_ACT_LAYERS)}") from None


def create_act(name: str) -> nn.Module:
    """A fresh activation module for ``name``; see :func:`get_act_layer`."""
    return get_act_layer(name)()
