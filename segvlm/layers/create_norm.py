"""Normalisation registry for B×C×H×W feature maps: config strings (``decoder.norm``) → modules."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a B×C×H×W map (each pixel normalised on its own, as in ConvNeXt)."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)  # B×H×W×C: F.layer_norm normalises trailing dims
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def group_count(num_channels: int, *, max_groups: int = 32, min_group_size: int = 4) -> int:
    """Largest divisor of ``num_channels`` that is <= ``max_groups`` and leaves >= ``min_group_size``
    channels per group (1 when none does). 64 channels → 16 groups of 4; 256 → 32 groups of 8.

    Small decoders (D = 64) would get groups of 2 from the usual fixed 32, whose statistics are noisy.
    """
    for groups in range(min(max_groups, num_channels), 0, -1):
        if num_channels % groups == 0 and num_channels // groups >= min_group_size:
            return groups
    return 1


def _group_norm(num_channels: int) -> nn.Module:
    return nn.GroupNorm(group_count(num_channels), num_channels)


def _none(num_channels: int) -> nn.Module:
    return nn.Identity()


_NORM_LAYERS: dict[str, Callable[[int], nn.Module]] = {
    "group": _group_norm,
    "batch": nn.BatchNorm2d,
    "layer2d": LayerNorm2d,
    "none": _none,
}


def get_norm_layer(name: str) -> Callable[[int], nn.Module]:
    """A builder ``num_channels -> module`` for ``name`` (``group``, ``batch``, ``layer2d``, ``none``)."""
    try:
        return _NORM_LAYERS[name]
    except KeyError:
        raise ValueError(f"unknown norm {name!r}; choose one of {sorted(_NORM_LAYERS)}") from None


def create_norm(name: str, num_channels: int) -> nn.Module:
    """A fresh norm module over ``num_channels`` channels of a B×C×H×W map."""
    return get_norm_layer(name)(num_channels)
