"""Modulated deformable convolution (DCNv2) and its language-conditioned variant.

torchvision's ``deform_conv2d`` CPU kernel is about 57× slower than a plain 3×3 conv at the decoder's
shapes (64 channels, 22×22, forward + backward), enough to halve the throughput of a tiny model.
:func:`deform_conv2d_native` computes the same function from differentiable torch ops (``grid_sample``
of the k×k taps, then one GEMM with the weight), so autograd gives the same gradients.
``impl="auto"`` uses torchvision's kernel on CUDA and the native one elsewhere.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Impl = Literal["auto", "native", "torchvision"]


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _pow2_plus_one(n: int) -> int:
    return 2 ** math.ceil(math.log2(max(n - 1, 1))) + 1


def deform_conv2d_native(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    mask: Tensor | None = None,
) -> Tensor:
    """``torchvision.ops.deform_conv2d`` from plain torch ops (groups = offset groups = 1).

    Args:
        input: B×C×H×W.
        offset: B×(2·kh·kw)×oh×ow, per tap (row-major over the kernel) the pair (Δy, Δx) in pixels.
        weight: C_out×C×kh×kw.
        bias: C_out or None.
        mask: B×(kh·kw)×oh×ow modulation (DCNv2) or None.

    Returns:
        B×C_out×oh×ow, in ``input``'s dtype (computed in float32 at least).

    Boundary semantics are torchvision's: a tap at (y, x) is bilinear interpolation of the input
    zero-padded to infinity; corners outside the image contribute 0 (so a tap at y <= -1 or y >= H is 0).
    The corner is ``floor`` of the position, so at exact integers the offset gradient is the one-sided
    difference toward +1, as in torchvision's ``get_coordinate_weight``. ``grid_sample`` does the same
    (zeros padding, ``align_corners=True``) provided the pixel → [-1, 1] → pixel round trip is exact:
    the input is zero-padded on the bottom/right to 2^n + 1 pixels so the scale factor is a power of 2.
    """
    b, c, h, w = input.shape
    c_out, c_in, kh, kw = weight.shape
    if c_in != c:
        raise ValueError(f"weight expects {c_in} input channels (groups=1 only), input has {c}")
    k = kh * kw
    if offset.shape[1] != 2 * k:
        raise ValueError(f"offset needs {2 * k} channels (one offset group), got {offset.shape[1]}")
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if offset.shape[-2:] != (oh, ow):
        raise ValueError(f"offset spatial size {tuple(offset.shape[-2:])} != output size {(oh, ow)}")

    # bf16/fp16 coordinates would be off by a tenth of a pixel at 22 px: sample in float32 at least
    ct = torch.promote_types(input.dtype, torch.float32)
    hp, wp = _pow2_plus_one(h), _pow2_plus_one(w)
    padded = F.pad(input.to(ct), (0, wp - w, 0, hp - h))

    dev = input.device
    ky = torch.arange(kh, device=dev, dtype=ct) * dh
    kx = torch.arange(kw, device=dev, dtype=ct) * dw
    oy = torch.arange(oh, device=dev, dtype=ct) * sh - ph
    ox = torch.arange(ow, device=dev, dtype=ct) * sw - pw
    base_y = (ky[:, None, None, None] + oy[None, None, :, None]).expand(kh, kw, oh, ow).reshape(k, oh, ow)
    base_x = (kx[None, :, None, None] + ox[None, None, None, :]).expand(kh, kw, oh, ow).reshape(k, oh, ow)
    off = offset.to(ct).view(b, k, 2, oh, ow)
    y = base_y + off[:, :, 0]  # B×K×oh×ow, pixels
    x = base_x + off[:, :, 1]
    grid = torch.stack((x * (2 / (wp - 1)) - 1, y * (2 / (hp - 1)) - 1), dim=-1).view(b, k, oh * ow, 2)
    cols = F.grid_sample(padded, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    if mask is not None:
        cols = cols * mask.to(ct).view(b, 1, k, oh * ow)  # B×C×K×P
    # (C, K) order matches weight.reshape(C_out, C·kh·kw): the whole conv is one GEMM
    out = torch.einsum("ok,bkp->bop", weight.to(ct).reshape(c_out, c * k), cols.view(b, c * k, oh * ow))
    if bias is not None:
        out = out + bias.to(ct)[:, None]
    return out.view(b, c_out, oh, ow).to(input.dtype)


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    mask: Tensor | None = None,
    impl: Impl = "auto",
) -> Tensor:
    """Modulated deformable conv; ``impl="auto"`` picks torchvision on CUDA, the native version elsewhere."""
    if impl == "auto":
        impl = "torchvision" if input.is_cuda else "native"
    if impl == "native":
        return deform_conv2d_native(
            input, offset, weight, bias, stride=stride, padding=padding, dilation=dilation, mask=mask
        )
    if impl == "torchvision":
        from torchvision.ops import deform_conv2d as tv_deform_conv2d

        return tv_deform_conv2d(
            input, offset, weight, bias, stride=stride, padding=padding, dilation=dilation, mask=mask
        )
    raise ValueError(f"unknown deform conv impl {impl!r}; choose 'auto', 'native' or 'torchvision'")


class LanguageConditionedDeformConv2d(nn.Module):
    """DCNv2 whose offsets and modulation masks are predicted from the visual features and the phrase.

    ``forward(x, cond)``: x B×C_in×h×w, cond B×cond_dim → B×C_out×h×w (stride 1, "same" padding).

    The phrase goes through ``cond_proj`` (Linear → C_in), is broadcast over the grid and concatenated
    with x; ``offset_pred`` (conv3×3, 2·C_in → 3·k·k) gives 2·k·k offsets and k·k mask logits (sigmoid).
    ``offset_pred`` is zero-initialised: at init every offset is 0 and every mask 0.5, so the layer is
    a regular conv with the same weights on half the input. ``forward`` also returns the offsets and masks
    (with grad, for losses and plots); the latest ones are kept detached in ``last_offset`` / ``last_mask``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        cond_dim: int,
        kernel_size: int = 3,
        padding: int = 1,
        impl: Impl = "auto",
    ) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.padding = padding
        self.impl: Impl = impl
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels))
        self.cond_proj = nn.Linear(cond_dim, in_channels)
        k2 = kernel_size * kernel_size
        self.offset_pred = nn.Conv2d(2 * in_channels, 3 * k2, kernel_size=3, padding=1)
        self.last_offset: Tensor | None = None
        self.last_mask: Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv2d's default init for the main kernel; zeros for the predictor (see class docstring)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        fan_in = self.weight[0].numel()
        nn.init.uniform_(self.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        nn.init.zeros_(self.offset_pred.weight)
        nn.init.zeros_(self.offset_pred.bias)

    def predict_offsets(self, x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        """Offsets B×2k²×h×w and masks B×k²×h×w (in (0, 1)) for features x and phrase ``cond``."""
        c = self.cond_proj(cond)[:, :, None, None].expand(-1, -1, *x.shape[-2:])
        om = self.offset_pred(torch.cat((x, c.to(x.dtype)), dim=1))
        k2 = self.kernel_size * self.kernel_size
        offset, mask_logits = om.split((2 * k2, k2), dim=1)
        return offset, torch.sigmoid(mask_logits)

    def forward(self, x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: B×C_in×h×w, cond: B×cond_dim → (B×C_out×h×w output, B×2k²×h×w offsets, B×k²×h×w masks)."""
        offset, mask = self.predict_offsets(x, cond)
        self.last_offset, self.last_mask = offset.detach(), mask.detach()
        out = deform_conv2d(
            x, offset, self.weight, self.bias, padding=self.padding, mask=mask, impl=self.impl
        )
        return out, offset, mask

    def extra_repr(self) -> str:
        o, i = self.weight.shape[:2]
        return f"{i}, {o}, kernel_size={self.kernel_size}, padding={self.padding}, impl={self.impl!r}"
