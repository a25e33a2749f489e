"""SegDecoder against transformers' CLIPSegDecoder: same keys, same logits; switches start as identities."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

from segvlm.config import ConfigError, DecoderConfig
from segvlm.decoder import SegDecoder

SWITCHES = (
    "cross_attention",
    "projector",
    "deformable",
    "se",
    "residual",
    "stem_skip",
    "relational_context",
    "relative_position",
)
ALL_ON = dict.fromkeys(SWITCHES, True)
STEM_CHANNELS = 8


def tiny_clipseg(complex_head: bool = True) -> CLIPSegForImageSegmentation:
    cfg = CLIPSegConfig(
        text_config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            vocab_size=99, max_position_embeddings=16, bos_token_id=0, eos_token_id=2,
        ),
        vision_config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
            patch_size=16, image_size=64,
        ),
        projection_dim=32, reduce_dim=16, extract_layers=[1, 2, 3], decoder_num_attention_heads=2,
        decoder_intermediate_size=32, use_complex_transposed_convolution=complex_head,
    )  # fmt: skip
    torch.manual_seed(0)
    model = CLIPSegForImageSegmentation(cfg).eval()
    with torch.no_grad():  # HF inits biases to 0 and LayerNorms to 1/0: randomise so every term matters
        for p in model.decoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def decoder_cfg(**switches: bool) -> DecoderConfig:
    return DecoderConfig(reduce_dim=16, num_heads=2, intermediate_size=32, **switches)


def build(model: CLIPSegForImageSegmentation, **switches: bool) -> SegDecoder:
    c = model.config
    cfg = dataclasses.replace(
        decoder_cfg(**switches), complex_transposed_convolution=c.use_complex_transposed_convolution
    )
    return SegDecoder(
        cfg,
        vision_width=c.vision_config.hidden_size,
        text_width=c.text_config.hidden_size,
        projection_dim=c.projection_dim,
        num_layers=len(c.extract_layers),
        patch_size=c.vision_config.patch_size,
        stem_channels=STEM_CHANNELS if switches.get("stem_skip") else None,
    )


@pytest.fixture(scope="module")
def clipseg_run():
    """A tiny random CLIPSeg, its decoder inputs for a batch of 2 images × phrases, and its logits."""
    model = tiny_clipseg()
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(2, 3, 64, 64, generator=g)
    input_ids = torch.randint(0, 99, (2, 7), generator=g)
    attn = torch.ones(2, 7, dtype=torch.long)
    attn[1, 4:] = 0
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=pixels, attention_mask=attn, output_hidden_states=True)
        hidden = out.vision_model_output.hidden_states
        activations = [hidden[i + 1] for i in model.config.extract_layers]
        text_tokens = model.clip.text_model(input_ids=input_ids, attention_mask=attn).last_hidden_state
    inputs = dict(
        activations=activations,
        cond=out.conditional_embeddings,
        text_tokens=text_tokens,
        text_mask=attn.bool(),
        image_size=(64, 64),
    )
    return model, inputs, out.logits


def decoder_state(model: CLIPSegForImageSegmentation) -> dict[str, torch.Tensor]:
    return model.decoder.state_dict()


def test_all_off_loads_clipseg_strictly_and_matches(clipseg_run):
    model, inputs, ref = clipseg_run
    dec = build(model).eval()
    assert set(dec.state_dict()) == set(decoder_state(model))
    dec.load_state_dict(decoder_state(model), strict=True)
    with torch.no_grad():
        logits = dec(**inputs).logits
    assert logits.shape == (2, 1, 64, 64)
    assert ref.shape == (2, 64, 64)
    assert (logits[:, 0] - ref).abs().max().item() <= 1e-5
    assert ref.std() > 1e-3  # the comparison is not between two constants


def test_all_on_equals_clipseg_at_init(clipseg_run):
    model, inputs, ref = clipseg_run
    dec = build(model, **ALL_ON).eval()
    missing, unexpected = dec.load_state_dict(decoder_state(model), strict=False)
    assert unexpected == []
    new_prefixes = ("cross_attn.", "projector.", "refine.", "stem_proj.", "relational.", "rel_pos.")
    assert missing and all(k.startswith(new_prefixes) for k in missing)
    stem = torch.randn(2, STEM_CHANNELS, 16, 16)
    with torch.no_grad():
        out = dec(**inputs, stem_features=stem)
    assert (out.logits[:, 0] - ref).abs().max().item() <= 1e-5
    assert out.offsets.shape == (2, 18, 4, 4) and out.similarity.shape == (2, 1, 4, 4)
    assert out.modulation.shape == (2, 9, 4, 4)
    assert torch.count_nonzero(out.offsets) == 0
    assert out.reference.shape == (2, 4, 4)
    assert torch.allclose(out.reference.sum(dim=(1, 2)), torch.ones(2))


def test_all_on_gets_gradients_where_it_should(clipseg_run):
    """At init the zero gates / scales / last convs must receive gradient, or the additions never learn."""
    model, inputs, _ = clipseg_run
    dec = build(model, **ALL_ON)
    dec.load_state_dict(decoder_state(model), strict=False)
    dec(**inputs, stem_features=torch.randn(2, STEM_CHANNELS, 16, 16)).logits.square().mean().backward()
    grads = {n: p.grad for n, p in dec.named_parameters()}
    for name in (
        "cross_attn.0.gate",
        "projector.sim_proj.weight",
        "refine.layer_scale.gamma",
        "stem_proj.weight",
        "relational.out.weight",
        "rel_pos.0.mlp.2.weight",
        "film_mul.weight",
    ):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name


def test_non_complex_head_matches_clipseg():
    model = tiny_clipseg(complex_head=False)
    dec = build(model).eval()
    dec.load_state_dict(decoder_state(model), strict=True)
    g = torch.Generator().manual_seed(2)
    acts = [torch.randn(2, 17, 64, generator=g) for _ in range(3)]
    cond = torch.randn(2, 32, generator=g)
    with torch.no_grad():
        ref = model.decoder(acts, cond).logits
        ours = dec(acts, cond, torch.randn(2, 5, 64), torch.ones(2, 5, dtype=torch.bool), (64, 64)).logits
    assert (ours[:, 0] - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "switch, prefixes",
    [
        ("cross_attention", ("cross_attn.", "cross_attn_text.")),
        ("projector", ("projector.",)),
        ("deformable", ("refine.conv.", "refine.norm.")),
        ("se", ("refine.se.",)),
        ("residual", ("refine.layer_scale.", "refine.conv.", "refine.norm.")),
        ("stem_skip", ("stem_proj.",)),
        ("relational_context", ("relational.",)),
        ("relative_position", ("rel_pos.",)),
    ],
)
def test_each_switch_adds_exactly_its_modules(switch, prefixes):
    model = tiny_clipseg()
    base = set(build(model).state_dict())
    names = set(build(model, **{switch: True}).state_dict())
    added = names - base
    assert base <= names
    assert added and all(k.startswith(prefixes) for k in added), sorted(added)
    for p in prefixes:  # every expected module is really there
        assert any(k.startswith(p) for k in added), p


def test_deformable_refinement_parts():
    model = tiny_clipseg()
    deform = {k for k in build(model, deformable=True).state_dict() if k.startswith("refine.")}
    assert "refine.conv.offset_pred.weight" in deform and "refine.conv.cond_proj.weight" in deform
    plain = {k for k in build(model, residual=True).state_dict() if k.startswith("refine.conv.")}
    assert plain == {"refine.conv.weight", "refine.conv.bias"}


@pytest.mark.parametrize("head", ["convt", "text_kernel+convex"])
@pytest.mark.parametrize(
    "size, grid", [((128, 128), 8), ((352, 352), 22), ((128, 96), None), ((100, 100), 6)]
)
def test_output_shapes(size, grid, head):
    """Logits at the input size, whatever the head, also when it is not a multiple of the patch (100 px:
    6×6 tokens, the text kernel's logits 24×24, the conv stem's features 25×25)."""
    kernel = {"head": "text_kernel", "upsample": "convex"} if head != "convt" else {}
    cfg = DecoderConfig(reduce_dim=16, num_heads=2, intermediate_size=32, **ALL_ON, **kernel)
    dec = SegDecoder(
        cfg, vision_width=24, text_width=20, projection_dim=12, num_layers=2, patch_size=16, stem_channels=4
    )
    H, W = size
    h, w = H // 16, W // 16
    if grid is not None:
        assert h == w == grid
    b = 2
    acts = [torch.randn(b, 1 + h * w, 24) for _ in range(2)]
    with torch.no_grad():
        out = dec(
            acts,
            torch.randn(b, 12),
            torch.randn(b, 6, 20),
            torch.ones(b, 6, dtype=torch.bool),
            (H, W),
            torch.randn(b, 4, H // 4, W // 4),
            pixel_values=torch.randn(b, 3, H, W),
        )
    assert out.logits.shape == (b, 1, H, W)
    assert out.offsets.shape == (b, 18, h, w)
    assert torch.isfinite(out.logits).all()


def test_two_phrases_give_different_offsets():
    torch.manual_seed(0)
    dec = SegDecoder(
        DecoderConfig(reduce_dim=16, num_heads=2, intermediate_size=32, deformable=True, residual=True),
        vision_width=24,
        text_width=20,
        projection_dim=12,
        num_layers=2,
        patch_size=16,
    )
    with torch.no_grad():
        for p in dec.refine.conv.offset_pred.parameters():
            p.normal_(0, 0.1)  # as after some training
    acts = [torch.randn(1, 17, 24).expand(2, -1, -1) for _ in range(2)]  # same image twice
    with torch.no_grad():
        off = dec(
            acts, torch.randn(2, 12), torch.randn(2, 3, 20), torch.ones(2, 3, dtype=torch.bool), (64, 64)
        ).offsets
    assert (off[0] - off[1]).abs().max() > 1e-3


def test_bad_inputs_raise():
    dec = SegDecoder(
        decoder_cfg(), vision_width=24, text_width=20, projection_dim=12, num_layers=2, patch_size=16
    )
    acts = [torch.randn(1, 17, 24) for _ in range(2)]
    args = (torch.randn(1, 12), torch.randn(1, 3, 20), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="tokens"):
        dec(acts, *args, (128, 128))
    with pytest.raises(ValueError, match="activations"):
        dec(acts[:1], *args, (64, 64))


def test_convex_upsampling_starts_as_bilinear_and_learns(clipseg_run):
    """``upsample="convex"`` adds only ``upsampler.*``; at init its logits are the bilinear head's, and its
    last conv gets gradient; it needs the text kernel and the pixels."""
    model, inputs, _ = clipseg_run
    kernel = dict(ALL_ON, head="text_kernel")
    torch.manual_seed(0)
    bilinear = build(model, **kernel)
    convex = build(model, **kernel, upsample="convex")
    added = set(convex.state_dict()) - set(bilinear.state_dict())
    assert added and all(k.startswith("upsampler.") for k in added)
    with torch.no_grad():  # as after some training: the text kernel's logits vary across the map
        bilinear.stem_proj.weight.normal_(0, 0.5)
    convex.load_state_dict(bilinear.state_dict(), strict=False)
    stem = torch.randn(2, STEM_CHANNELS, 16, 16)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = bilinear(**inputs, stem_features=stem).logits
    out = convex(**inputs, stem_features=stem, pixel_values=pixels).logits
    assert out.shape == ref.shape == (2, 1, 64, 64) and ref.std() > 1e-3
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    out.square().mean().backward()
    assert convex.upsampler.net[-1].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="pixel_values"):
        convex(**inputs, stem_features=stem)
    with pytest.raises(ConfigError, match="text_kernel"):
        decoder_cfg(upsample="convex").validate()
