"""Residual refinement block on the decoder's token grid (B×D×h×w), before the upsampling head."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from segvlm.layers.deform_conv import Impl, LanguageConditionedDeformConv2d
from segvlm.layers.squeeze_excite import SqueezeExcite


class LayerScale2d(nn.Module):
    """Per-channel scale ``gamma`` of a B×C×H×W map (CaiT's LayerScale); zero init turns a branch off."""

    def __init__(self, channels: int, *, init_value: float = 0.0) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((channels,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma.view(1, -1, 1, 1)


class ResidualRefinementBlock(nn.Module):
    """``y = act(norm(conv(x, cond)))`` if conv; ``y = se(y)`` if se; ``out = x + gamma·y`` if residual
    else ``out = y``. x: B×C×h×w, cond: B×cond_dim (the phrase) → B×C×h×w.

    Which modules exist (each switch adds exactly its own):

    * ``deformable`` → ``conv`` = :class:`LanguageConditionedDeformConv2d` (with its offset / mask
      predictor), followed by ``norm`` and ``act``;
    * ``residual`` → ``layer_scale`` (zero-initialised ``gamma``), and, when not ``deformable``, a plain
      3×3 ``conv`` (+ ``norm``, ``act``) so the residual branch has something to learn;
    * ``se`` → ``se`` (:class:`SqueezeExcite`).

    With ``residual`` the block is exactly the identity at init. Without it the block replaces x by the
    branch, which is only meaningful for ablations trained from scratch.
    """

    def __init__(
        self,
        channels: int,
        *,
        cond_dim: int,
        deformable: bool = True,
        se: bool = True,
        residual: bool = True,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
        act_layer: type[nn.Module] = nn.GELU,
        se_reduction: int = 4,
        deform_impl: Impl = "auto",
    ) -> None:
        super().__init__()
        if not (deformable or se or residual):
            raise ValueError("ResidualRefinementBlock with deformable, se and residual all off does nothing")
        self.deformable = deformable
        self.conv: nn.Module | None
        if deformable:
            self.conv = LanguageConditionedDeformConv2d(
                channels, channels, cond_dim=cond_dim, impl=deform_impl
            )
        elif residual:
            self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        else:
            self.conv = None
        self.norm = norm_layer(channels) if self.conv is not None else None
        self.act = act_layer() if self.conv is not None else None
        self.se = SqueezeExcite(channels, reduction=se_reduction, act_layer=act_layer) if se else None
        self.layer_scale = LayerScale2d(channels, init_value=0.0) if residual else None

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """x: B×C×h×w, cond: B×cond_dim → (B×C×h×w, offsets B×2k²×h×w, modulation B×k²×h×w); the last two
        are the deformable conv's (None without it)."""
        y, offsets, modulation = x, None, None
        if self.conv is not None:
            if self.deformable:
                if cond is None:
                    raise ValueError("the deformable refinement block needs the phrase embedding `cond`")
                y, offsets, modulation = self.conv(y, cond)
            else:
                y = self.conv(y)
            y = self.act(self.norm(y))
        if self.se is not None:
            y = self.se(y)
        out = x + self.layer_scale(y) if self.layer_scale is not None else y
        return out, offsets, modulation
