"""Layers: SE by hand, native deformable conv == torchvision (values and gradients), init identities,
registries, convex upsampling (bilinear at init, its corner layout, edges it learns)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import deform_conv2d as tv_deform_conv2d

from segvlm.layers import (
    ConvexUpsample,
    FiLM,
    GatedCrossAttention,
    LanguageConditionedDeformConv2d,
    LayerNorm2d,
    RelationalContext,
    RelativePositionBias,
    ResidualRefinementBlock,
    SqueezeExcite,
    TextImageProjector,
    bilinear_corner_weights,
    create_act,
    create_norm,
    deform_conv2d,
    deform_conv2d_native,
    directional_maps,
    film,
    group_count,
    sincos_2d,
)


# ------------------------------------------------------------------------------------ squeeze-excite
def test_squeeze_excite_by_hand():
    se = SqueezeExcite(2, reduction=2)  # 2 → 1 → 2
    with torch.no_grad():
        se.fc1.weight.copy_(torch.tensor([1.0, -2.0]).view(1, 2, 1, 1))
        se.fc1.bias.fill_(0.5)
        se.fc2.weight.copy_(torch.tensor([3.0, -1.0]).view(2, 1, 1, 1))
        se.fc2.bias.copy_(torch.tensor([0.0, 1.0]))
    x = torch.tensor([[[[1.0, 3.0], [5.0, 7.0]], [[2.0, 0.0], [0.0, 2.0]]]])  # 1×2×2×2
    # means: ch0 = 4, ch1 = 1 → fc1: 4 - 2 + 0.5 = 2.5 → relu 2.5 → fc2: (7.5, -1.5) → sigmoid
    gate = torch.sigmoid(torch.tensor([7.5, -1.5]))
    expected = x * gate.view(1, 2, 1, 1)
    torch.testing.assert_close(se(x), expected)
    # negative pre-activation is cut by the ReLU: hidden 0 → gates sigmoid(bias)
    x2 = -x
    torch.testing.assert_close(se(x2), x2 * torch.sigmoid(se.fc2.bias).view(1, 2, 1, 1))


# ------------------------------------------------------------------------------- deformable conv
def _deform_inputs(dtype, *, b=2, c=5, h=7, w=6, c_out=4, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=g, dtype=dtype)
    offset = torch.randn(b, 2 * k * k, h, w, generator=g, dtype=dtype) * 3  # many taps fall outside
    # exact integer offsets (and integer ± 0.5) exercise floor at the corners and the image border
    offset[:, :6] = torch.randint(-4, 5, offset[:, :6].shape, generator=g).to(dtype)
    offset[:, 6:8] = torch.randint(-4, 5, offset[:, 6:8].shape, generator=g).to(dtype) + 0.5
    offset[0, :, 0, 0] = -1.0 - torch.arange(2 * k * k, dtype=dtype) % 2  # y/x exactly -1 or -2 px off
    mask = torch.rand(b, k * k, h, w, generator=g, dtype=dtype)
    weight = torch.randn(c_out, c, k, k, generator=g, dtype=dtype)
    bias = torch.randn(c_out, generator=g, dtype=dtype)
    grad_out = torch.randn(b, c_out, h, w, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (x, offset, mask, weight, bias)], grad_out


def _run(fn, tensors, grad_out, **kw):
    x, offset, mask, weight, bias = tensors
    out = fn(x, offset, weight, bias, padding=1, mask=mask, **kw)
    return (out, *torch.autograd.grad(out, tensors, grad_out))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_native_deform_conv_matches_torchvision(dtype, tol):
    tensors, grad_out = _deform_inputs(dtype)
    names = ("output", "input", "offset", "mask", "weight", "bias")
    ref = _run(tv_deform_conv2d, tensors, grad_out)
    ours = _run(deform_conv2d_native, tensors, grad_out)
    for name, a, b in zip(names, ref, ours):
        scale = max(1.0, a.abs().max().item())
        assert (a - b).abs().max().item() <= tol * scale, name
        assert a.abs().max() > 0, name  # every gradient is exercised


def test_native_deform_conv_stride_dilation_no_mask():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    kw = dict(stride=(2, 1), padding=(2, 1), dilation=(2, 1))
    offset = torch.randn(2, 12, 5, 6, generator=g, dtype=torch.float64).mul(2).requires_grad_()
    a = tv_deform_conv2d(x, offset, weight, None, **kw)
    b = deform_conv2d_native(x, offset, weight, None, **kw)
    torch.testing.assert_close(a, b)
    ga = torch.autograd.grad(a.square().sum(), (x, offset, weight))
    gb = torch.autograd.grad(b.square().sum(), (x, offset, weight))
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v)


def test_deform_conv_dispatch_and_low_precision():
    (x, offset, mask, weight, bias), _ = _deform_inputs(torch.float32)
    ref = deform_conv2d(x, offset, weight, bias, padding=1, mask=mask, impl="torchvision")
    torch.testing.assert_close(deform_conv2d(x, offset, weight, bias, padding=1, mask=mask), ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = deform_conv2d_native(x.bfloat16(), offset, weight, bias, padding=1, mask=mask)
    assert low.dtype == torch.bfloat16
    # coordinates stay in float32: the error is bf16 rounding of the input, not misplaced taps
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()
    with pytest.raises(ValueError, match="impl"):
        deform_conv2d(x, offset, weight, bias, padding=1, impl="cuda-magic")


def test_language_conditioned_deform_conv_at_init_is_half_a_regular_conv():
    torch.manual_seed(0)
    layer = LanguageConditionedDeformConv2d(6, 5, cond_dim=4)
    x, cond = torch.randn(3, 6, 8, 8), torch.randn(3, 4)
    out, offsets, modulation = layer(x, cond)
    assert offsets.shape == (3, 18, 8, 8) and modulation.shape == (3, 9, 8, 8)
    assert torch.count_nonzero(offsets) == 0 and torch.count_nonzero(layer.last_offset) == 0
    assert torch.all(modulation == 0.5)
    expected = 0.5 * F.conv2d(x, layer.weight, None, padding=1) + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(out, expected)


def test_language_conditioned_offsets_depend_on_the_phrase():
    torch.manual_seed(0)
    layer = LanguageConditionedDeformConv2d(6, 6, cond_dim=4)
    with torch.no_grad():
        layer.offset_pred.weight.normal_(0, 0.1)
    x = torch.randn(1, 6, 8, 8).expand(2, -1, -1, -1)  # one image, two phrases
    offset, mask = layer.predict_offsets(x, torch.randn(2, 4))
    assert offset.shape == (2, 18, 8, 8) and mask.shape == (2, 9, 8, 8)
    assert (offset[0] - offset[1]).abs().max() > 1e-3
    assert (mask[0] - mask[1]).abs().max() > 1e-4


# ---------------------------------------------------------------------------- refinement and gates
@pytest.mark.parametrize("deformable", [True, False])
@pytest.mark.parametrize("se", [True, False])
def test_residual_refinement_is_identity_at_init(deformable, se):
    torch.manual_seed(0)
    block = ResidualRefinementBlock(
        8,
        cond_dim=4,
        deformable=deformable,
        se=se,
        residual=True,
        norm_layer=lambda c: create_norm("group", c),
    )
    x = torch.randn(2, 8, 5, 5)
    out, offsets, modulation = block(x, torch.randn(2, 4))
    assert torch.equal(out, x)
    # the deformable conv's maps come back with the output, None without it
    assert (offsets is None, modulation is None) == (not deformable, not deformable)
    if deformable:
        assert offsets.shape == (2, 18, 5, 5) and torch.all(modulation == 0.5)
    out.sum().backward()
    assert block.layer_scale.gamma.grad.abs().sum() > 0  # the branch can open


def test_refinement_without_residual_is_the_branch():
    block = ResidualRefinementBlock(8, cond_dim=4, deformable=False, se=True, residual=False)
    assert block.conv is None and block.layer_scale is None
    x = torch.randn(2, 8, 3, 3)
    out, offsets, modulation = block(x)
    torch.testing.assert_close(out, block.se(x))
    assert offsets is None and modulation is None
    with pytest.raises(ValueError, match="does nothing"):
        ResidualRefinementBlock(8, cond_dim=4, deformable=False, se=False, residual=False)


def test_gated_cross_attention_identity_at_init_and_masking():
    torch.manual_seed(0)
    xa = GatedCrossAttention(16, num_heads=2)
    x, text = torch.randn(2, 5, 16), torch.randn(2, 4, 16)
    mask = torch.tensor([[True, True, False, False], [False, False, False, False]])  # row 2: no real token
    assert torch.equal(xa(x, text, mask, sincos_2d(1, 5, 16), None), x)
    with torch.no_grad():
        xa.gate.fill_(1.0)
    out = xa(x, text, mask)
    assert torch.isfinite(out).all() and not torch.equal(out, x)
    # padded tokens are ignored: changing them changes nothing for row 1
    text2 = text.clone()
    text2[0, 2:] = 100.0
    torch.testing.assert_close(xa(x, text2, mask)[0], out[0])


def test_projector_adds_nothing_at_init():
    proj = TextImageProjector(16, text_width=12, cond_dim=8, project_tokens=False)
    assert proj.text_tokens is None
    x = torch.randn(2, 16, 4, 4)
    phrase, tokens = proj.project_text(torch.randn(2, 8), torch.randn(2, 3, 12))
    assert tokens is None and phrase.shape == (2, 16)
    out, sim = proj(x, phrase)
    assert torch.equal(out, x) and sim.shape == (2, 1, 4, 4)
    assert sim.abs().max() <= proj.logit_scale.exp() + 1e-4  # cosine × temperature


def test_film_functional_and_module():
    x = torch.randn(2, 3, 4)  # B×N×C tokens
    scale, shift = torch.randn(2, 4), torch.randn(2, 4)
    torch.testing.assert_close(film(x, scale, shift), scale[:, None] * x + shift[:, None])
    xm = torch.randn(2, 4, 3, 3)  # B×C×H×W maps
    torch.testing.assert_close(
        film(xm, scale, shift, channel_dim=1), scale[:, :, None, None] * xm + shift[:, :, None, None]
    )
    mod = FiLM(5, 4)
    c = torch.randn(2, 5)
    torch.testing.assert_close(mod(x, c), film(x, mod.mul(c), mod.add(c)))


def test_sincos_2d_distinct_positions():
    pe = sincos_2d(3, 4, 16)
    assert pe.shape == (12, 16)
    assert torch.cdist(pe, pe).add(torch.eye(12)).min() > 1e-3  # every grid cell gets its own code


# ------------------------------------------------------------------------------------- registries
def test_registries():
    assert isinstance(create_act("relu"), nn.ReLU)
    assert isinstance(create_act("silu"), nn.SiLU)
    x = torch.randn(10)
    torch.testing.assert_close(create_act("quick_gelu")(x), x * torch.sigmoid(1.702 * x))
    gn = create_norm("group", 64)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 16
    assert group_count(256) == 32 and group_count(6) == 1 and group_count(3) == 1
    assert isinstance(create_norm("batch", 8), nn.BatchNorm2d)
    assert isinstance(create_norm("none", 8), nn.Identity)
    ln = create_norm("layer2d", 8)
    y = ln(torch.randn(2, 8, 3, 3) * 5 + 2)
    assert isinstance(ln, LayerNorm2d)
    torch.testing.assert_close(y.mean(1), torch.zeros(2, 3, 3), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"unknown activation 'swish'.*gelu"):
        create_act("swish")
    with pytest.raises(ValueError, match=r"unknown norm 'instance'.*group"):
        create_norm("instance", 8)


def test_directional_maps_by_hand():
    # 2×3 grid; reference mass 1 at row 0, column 1
    one = torch.zeros(1, 2, 3)
    one[0, 0, 1] = 1.0
    maps = directional_maps(one)
    # horizontal: +1 where the reference lies to the left (column 2), -1 to the right (column 0), own column 0
    assert maps[0, 0].tolist() == [[-1.0, 0.0, 1.0], [-1.0, 0.0, 1.0]]
    # vertical: the reference is in row 0: own row 0, +1 below it
    assert maps[0, 1].tolist() == [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    # split mass: 0.25 at (1, 0), 0.75 at (0, 2)
    split = torch.zeros(1, 2, 3)
    split[0, 1, 0], split[0, 0, 2] = 0.25, 0.75
    maps = directional_maps(split)
    # column 0: west = 0.125 (own half), east = 0.875 -> -0.75; column 1: 0.25 - 0.75 = -0.5;
    # column 2: west = 0.25 + 0.375 = 0.625, east = 0.375 -> 0.25
    assert torch.allclose(maps[0, 0, 0], torch.tensor([-0.75, -0.5, 0.25]))
    # row 0: north = 0.375, south = 0.625 -> -0.25; row 1: north = 0.75 + 0.125 = 0.875 -> 0.75
    assert torch.allclose(maps[0, 1, :, 0], torch.tensor([-0.25, 0.75]))


def test_relational_context_is_identity_at_init_and_reads_only_real_tokens():
    torch.manual_seed(0)
    block = RelationalContext(8, text_width=6)
    x, text = torch.randn(2, 8, 3, 4), torch.randn(2, 5, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    y, reference = block(x, text, mask)
    assert torch.equal(y, x)
    assert reference.shape == (2, 3, 4) and torch.allclose(reference.sum(dim=(1, 2)), torch.ones(2))
    with torch.no_grad():
        block.out.weight.normal_()
    y, reference = block(x, text, mask)
    assert not torch.allclose(y, x)
    padded = text.clone()
    padded[:, 3:] = 100.0  # tokens 3-4: padding of phrase 0, real words of phrase 1
    y2, reference2 = block(x, padded, mask)
    assert torch.allclose(y2[0], y[0]) and torch.allclose(reference2[0], reference[0])
    assert not torch.allclose(y2[1], y[1])  # phrase 1 reads its changed words


def test_relational_context_context_follows_the_reference():
    """With ``key`` and the roles set so that the reference is the position whose feature matches the text,
    the context written at each position is the hand-computed map of where that position lies."""
    block = RelationalContext(2, text_width=2)
    with torch.no_grad():
        for p in block.parameters():
            p.zero_()
        block.text_norm.weight.fill_(1.0)
        block.text.weight.copy_(torch.eye(2) * 50.0)  # tokens [1, -1] -> values [50, -50]
        block.key.weight.copy_(torch.eye(2)[:, :, None, None])
        block.out.bias[0] = 1.0  # map 0 (horizontal) written into channel 0 for every phrase
    x = torch.zeros(1, 2, 1, 3)
    x[0, :, 0, 2] = torch.tensor([1.0, -1.0])  # the only position that matches the phrase's words
    text = torch.tensor([[[1.0, -1.0]]])
    y, reference = block(x, text, torch.ones(1, 1, dtype=torch.bool))
    assert reference[0, 0].argmax().item() == 2 and reference[0, 0, 2] > 0.99
    # the reference is the right-most column: every position is left of it (-1), its own column 0
    assert torch.allclose(y[0, 0, 0], torch.tensor([-1.0, -1.0, 1.0 + 0.0]), atol=0.02)


def test_relative_position_bias_depends_on_the_offset_only_and_starts_at_zero():
    torch.manual_seed(0)
    bias = RelativePositionBias(3, hidden_dim=8)
    assert bias(2, 3).shape == (1, 3, 7, 7) and torch.count_nonzero(bias(2, 3)) == 0
    with torch.no_grad():
        bias.mlp[2].weight.normal_()
    b = bias(3, 4)[0]  # heads×13×13, CLS first
    assert torch.count_nonzero(b[:, 0]) == 0 and torch.count_nonzero(b[:, :, 0]) == 0  # CLS: no bias
    grid = b[:, 1:, 1:]

    def index(y, x):
        return y * 4 + x

    # same offset, same bias: (0,0)->(1,2) and (1,1)->(2,3); another offset differs
    torch.testing.assert_close(grid[:, index(0, 0), index(1, 2)], grid[:, index(1, 1), index(2, 3)])
    assert not torch.allclose(grid[:, index(0, 0), index(1, 2)], grid[:, index(1, 2), index(0, 0)])
    # the MLP sees offsets normalised by the grid's side: key − query
    expected = bias.mlp(torch.tensor([[1 / 2, 2 / 3]])).flatten()
    torch.testing.assert_close(grid[:, index(0, 0), index(1, 2)], expected)


# ------------------------------------------------------------------------------------ convex upsampling
def test_bilinear_corner_weights_by_hand():
    # ×2: the square's two output pixels per axis sit 1/4 and 3/4 of the way from its top-left centre
    w = bilinear_corner_weights(2)  # corner (tl, tr, bl, br) × sy × sx
    torch.testing.assert_close(w[:, 0, 0], torch.tensor([9, 3, 3, 1]) / 16)
    torch.testing.assert_close(w[:, 1, 0], torch.tensor([3, 1, 9, 3]) / 16)
    torch.testing.assert_close(bilinear_corner_weights(4).sum(0), torch.ones(4, 4))


@pytest.mark.parametrize("scale", [2, 4])
def test_convex_upsample_starts_as_bilinear(scale):
    torch.manual_seed(0)
    up = ConvexUpsample(scale, feature_channels=5)
    coarse = torch.randn(3, 1, 6, 5)
    weights = up.weights(torch.randn(2, 3, 6 * scale, 5 * scale), torch.randn(2, 5, 6, 5))
    assert weights.shape == (2, 4, scale, scale, 7, 6)  # one square between every two centres, and the border
    out = up(coarse, weights, torch.tensor([1, 0, 1]))
    ref = F.interpolate(coarse, scale_factor=scale, mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="even scale"):
        ConvexUpsample(3)


def test_convex_upsample_layout_and_image_rows():
    up = ConvexUpsample(2)
    coarse = torch.arange(12.0).view(1, 1, 3, 4).repeat(3, 1, 1, 1)
    one_hot = torch.zeros(2, 4, 2, 2, 4, 5)
    one_hot[0, 3] = (
        1  # image 0: every output pixel copies the cell below and right of it (bottom-right corner)
    )
    one_hot[1, 0] = 1  # image 1: the cell above and left (top-left corner)
    out = up(coarse, one_hot, torch.tensor([1, 0, 1]))
    c = coarse[0, 0]
    # output pixel (y, x) lies in square ((y + 1) // 2, (x + 1) // 2), whose top-left corner is cell
    # (y + 1) // 2 - 1 and bottom-right (y + 1) // 2, clamped to the grid (replicated border)
    ys, xs = (torch.arange(6) + 1) // 2, (torch.arange(8) + 1) // 2
    top_left = c[(ys - 1).clamp(0, 2)][:, (xs - 1).clamp(0, 3)]
    bottom_right = c[ys.clamp(max=2)][:, xs.clamp(max=3)]
    torch.testing.assert_close(out[0, 0], top_left)
    torch.testing.assert_close(out[2, 0], top_left)
    torch.testing.assert_close(out[1, 0], bottom_right)
    torch.testing.assert_close(
        up(coarse[:2], one_hot)[0, 0], bottom_right
    )  # no image_index: row b is image b
    with pytest.raises(ValueError, match="features"):
        ConvexUpsample(2, feature_channels=3).weights(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="not on the grid"):
        ConvexUpsample(2, feature_channels=3).weights(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 3, 3))


def test_convex_upsample_learns_edges_that_bilinear_blurs():
    # small discs; the coarse logits are their area-averaged masks (as a 1/4-resolution head would draw
    # them). Fitted to the fine masks, the convex weights put each edge where the pixels have it; bilinear
    # interpolation rounds the discs off and loses the thin ones
    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    discs = ((10, 11, 4.5), (20, 17, 3.5), (15, 22, 5.5), (13, 9, 2.5))
    fine = torch.stack([((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).float()[None] for cy, cx, r in discs])
    pixels = fine.repeat(1, 3, 1, 1) * 2 - 1
    coarse = torch.logit(F.avg_pool2d(fine, 4).clamp(0.02, 0.98))
    up = ConvexUpsample(4, hidden=16)
    opt = torch.optim.Adam(up.parameters(), lr=1e-2)
    for _ in range(60):
        loss = F.binary_cross_entropy_with_logits(up(coarse, up.weights(pixels)), fine)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def iou(logits: torch.Tensor) -> float:
        pred, target = logits > 0, fine > 0
        return ((pred & target).sum() / (pred | target).sum()).item()

    with torch.no_grad():
        convex = up(coarse, up.weights(pixels))
    assert iou(F.interpolate(coarse, scale_factor=4, mode="bilinear", align_corners=False)) < 0.8
    assert iou(convex) > 0.99
