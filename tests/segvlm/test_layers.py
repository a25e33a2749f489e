"""Layers: SE by hand, native deformable conv == torchvision (values and gradients), init identities,
registries."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import deform_conv2d as tv_deform_conv2d

from segvlm.layers import (
    FiLM,
    GatedCrossAttention,
    LanguageConditionedDeformConv2d,
    LayerNorm2d,
    ResidualRefinementBlock,
    SqueezeExcite,
    TextImageProjector,
    create_act,
    create_norm,
    deform_conv2d,
    deform_conv2d_native,
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
