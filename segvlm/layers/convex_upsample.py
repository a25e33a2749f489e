"""Image-guided convex upsampling of coarse logit maps (after RAFT's upsampler, Teed & Deng 2020).

Bilinear interpolation gives each output pixel a fixed mix of the four coarse cells whose centres surround
it. Here the mix is learned per pixel from the image alone (its full-resolution pixels and optional coarse
features), so a pixel on an object's edge can take its value from the cells on its own side of the edge.
The weights depend on the image, not the phrase: they are computed once per image, and each phrase about
it costs one four-term weighted sum per pixel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ConvexUpsample", "bilinear_corner_weights"]


def bilinear_corner_weights(scale: int) -> Tensor:
    """4×scale×scale weights of the corners (top-left, top-right, bottom-left, bottom-right) of the square
    between four coarse cell centres, for its scale×scale output pixels, that reproduce
    ``F.interpolate(..., scale_factor=scale, mode="bilinear", align_corners=False)``: output pixel (sy, sx)
    lies ``(s + 0.5) / scale`` of the way from the top-left centre."""
    t = (torch.arange(scale, dtype=torch.float64) + 0.5) / scale  # scale
    near, far = 1 - t, t
    rows = torch.stack((near, near, far, far))  # corner × sy
    cols = torch.stack((near, far, near, far))  # corner × sx
    return (rows[:, :, None] * cols[:, None, :]).float()


class ConvexUpsample(nn.Module):
    """×``scale`` upsampling of B×1×h×w logits, each output pixel a learned convex combination of the four
    coarse cells around it, the weights from each image's pixels (and features).

    Args:
        scale: the upsampling factor, even.
        feature_channels: channels of the optional coarse features (N×C×h×w) that join the pixels; 0 for
            pixels alone.
        hidden: width of the small per-square MLP that predicts the weights.

    The weights start as bilinear interpolation's (their softmax logits are the log bilinear weights plus
    the net's output, whose last conv starts at zero), so the layer starts as ``F.interpolate`` bilinear.
    """

    def __init__(self, scale: int, *, feature_channels: int = 0, hidden: int = 32) -> None:
        super().__init__()
        if scale < 2 or scale % 2:
            # an even scale puts the cell centres between output pixels, as the squares' layout assumes
            raise ValueError(f"convex upsampling needs an even scale >= 2, got {scale}")
        self.scale = scale
        self.feature_channels = feature_channels
        # a per-square MLP (1×1 convs): a square's own pixels hold a quarter of each of its four cells, which
        # is what an output pixel is compared with
        self.net = nn.Sequential(
            nn.Conv2d(3 * scale * scale + feature_channels, hidden, kernel_size=1),
            nn.GELU(),
            nn.Conv2d(hidden, hidden, kernel_size=1),
            nn.GELU(),
            nn.Conv2d(hidden, 4 * scale * scale, kernel_size=1),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        prior = bilinear_corner_weights(scale).log()  # 4×s×s, all weights > 0
        self.register_buffer("prior", prior[:, :, :, None, None], persistent=False)

    def weights(self, pixels: Tensor, features: Tensor | None = None) -> Tensor:
        """N×4×s×s×(h+1)×(w+1) corner weights (softmax over the 4 corners) of the squares between the coarse
        cell centres (the border ones half outside), from N×3×(h·s)×(w·s) pixels and N×C×h×w features."""
        s = self.scale
        # the squares are offset by half a cell from the cells: pad half a cell of pixels on every side, so
        # folding s×s blocks gives each square its own output pixels as channels
        half = s // 2
        guide = F.pixel_unshuffle(F.pad(pixels, (half, s - half, half, s - half), mode="replicate"), s)
        if self.feature_channels:
            if features is None or features.shape[1] != self.feature_channels:
                raise ValueError(f"convex upsampling expects N×{self.feature_channels}×h×w features")
            if features.shape[-2:] != (guide.shape[-2] - 1, guide.shape[-1] - 1):
                raise ValueError(
                    f"convex upsampling: features {tuple(features.shape[-2:])} are not on the grid of pixels "
                    f"{tuple(pixels.shape[-2:])} / {s}"
                )
            # a square's features: the mean of its four cells' (replicated at the border)
            f = F.pad(features, (1, 1, 1, 1), mode="replicate")
            features = (f[..., :-1, :-1] + f[..., :-1, 1:] + f[..., 1:, :-1] + f[..., 1:, 1:]) / 4
            guide = torch.cat((guide, features.to(guide.dtype)), dim=1)
        n, _, h1, w1 = guide.shape
        logits = self.net(guide).view(n, 4, s, s, h1, w1) + self.prior.to(guide.dtype)
        return logits.softmax(dim=1)

    def forward(self, coarse: Tensor, weights: Tensor, image_index: Tensor | None = None) -> Tensor:
        """B×1×h×w coarse logits → B×1×(h·s)×(w·s); ``weights`` from :meth:`weights` (one row per image),
        ``image_index`` (B) the image row of each phrase, None when B = N."""
        b, c, h, w = coarse.shape
        if c != 1:
            raise ValueError(f"convex upsampling takes one map per row, got {c} channels")
        s = self.scale
        padded = F.pad(coarse, (1, 1, 1, 1), mode="replicate")[:, 0]  # B×(h+2)×(w+2)
        # the four corners of every square: B×4×1×1×(h+1)×(w+1)
        corners = torch.stack(
            (padded[:, :-1, :-1], padded[:, :-1, 1:], padded[:, 1:, :-1], padded[:, 1:, 1:]), dim=1
        )[:, :, None, None].to(weights.dtype)
        if image_index is None:
            fine = (weights * corners).sum(dim=1)
        else:
            # phrases grouped by image, so each image's weights broadcast over its phrases: gathering the
            # weights per phrase would cost a scatter of their gradient as large as the output, 4 times over
            order = torch.argsort(image_index, stable=True)
            counts = torch.bincount(image_index, minlength=weights.shape[0]).tolist()
            groups = corners.index_select(0, order).split(counts)
            fine = torch.cat([(wn * cn).sum(dim=1) for wn, cn in zip(weights, groups) if len(cn)])
            fine = fine.index_select(0, torch.argsort(order))  # B×s×s×(h+1)×(w+1)
        # (sy, sx, y, x) → (y, sy, x, sx); the outer half square on each side lies outside the image
        full = fine.permute(0, 3, 1, 4, 2).reshape(b, 1, (h + 1) * s, (w + 1) * s)
        half = s // 2
        return full[:, :, half : half + h * s, half : half + w * s]
