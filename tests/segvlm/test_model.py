"""SegVLM end to end: shapes, gradient flow, decoder switches, presets, and learning on a tiny batch."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from jobs.params import resolve_model_config
from segvlm.backbone import make_tiny_clip
from segvlm.config import BackboneConfig, ConfigError, DecoderConfig, ModelConfig
from segvlm.model import SegVLM
from segvlm.registry import build_model, list_models, model_config, register_model

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SWITCHES = ("cross_attention", "projector", "deformable", "se", "residual")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0)


def clipseg_like(tiny_dir=None, **decoder) -> ModelConfig:
    """CLIPSeg's layout (frozen backbone, patch embedding, all switches off) on the tiny CLIP."""
    return ModelConfig(
        name="clipseg_tiny",
        backbone=BackboneConfig(
            arch="tiny",
            pretrained=str(tiny_dir) if tiny_dir else None,
            image_size=128,
            extract_layers=(1, 2, 3),
            freeze=True,
            max_text_length=16,
        ),
        decoder=DecoderConfig(reduce_dim=32, intermediate_size=64, **decoder),
    )


def perturb_zero_init(model: torch.nn.Module, std: float = 0.02) -> int:
    """Give every exactly-zero-initialised trainable parameter small random values.

    Zero-initialised gates and offset predictors (the identity at step 0) block the gradient of whatever
    feeds them until they move; after this every trainable parameter lies on a gradient path.
    """
    count = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.normal_(0.0, std)
                count += 1
    return count


def batch(model: SegVLM, phrases: list[str], size: int = 128) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(len(phrases), 3, size, size), **model.backbone.tokenize(phrases)}


# -------------------------------------------------------------------------------------- forward/grads
@pytest.mark.parametrize("preset", ["segvlm_tiny", "clipseg_like"])
def test_forward_shape_and_finite(preset, tiny_dir):
    torch.manual_seed(0)
    cfg = model_config("segvlm_tiny") if preset == "segvlm_tiny" else clipseg_like(tiny_dir)
    model = build_model(cfg).eval()
    with torch.no_grad():
        logits = model(**batch(model, ["the red circle", "a big blue square on the left"]))
    assert logits.shape == (2, 1, 128, 128)
    assert torch.isfinite(logits).all()
    # a non-native size still works (position embeddings interpolated)
    with torch.no_grad():
        assert model(**batch(model, ["a star"], size=96)).shape == (1, 1, 96, 96)


def test_gradients_reach_every_trainable_parameter():
    torch.manual_seed(0)
    model = build_model(model_config("segvlm_tiny")).train()
    perturb_zero_init(model)
    logits = model(**batch(model, ["the red circle", "two green stars"]))
    F.binary_cross_entropy_with_logits(logits, torch.rand_like(logits).round()).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("backbone.") for n in trainable) and any(
        n.startswith("decoder.") for n in trainable
    )
    no_grad = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"no gradient reaches {no_grad}"


def test_shared_images_match_repeated_images():
    """Phrases that share an image through ``image_index`` get the logits, decoder maps, loss terms (the word
    objective's included) and gradients of the same images repeated once per phrase (the decoder and the word
    head run their per-token image maps once per image and gather after); a mismatched index is refused."""
    from segvlm.task import LossConfig, build_task

    torch.manual_seed(0)
    model = build_model(model_config("segvlm_tiny", ["decoder.head=text_kernel"])).train()
    task = build_task(model, LossConfig(words=0.3))
    perturb_zero_init(task)
    phrases = ["the red circle", "two green stars", "the square", "the blue shapes", "a star"]
    images = torch.randn(2, 3, 128, 128)
    index = torch.tensor([1, 0, 1, 1, 0])
    tokens = model.backbone.tokenize(phrases)
    common = {
        **tokens,
        "masks": torch.rand(5, 1, 128, 128).round(),
        "target_words": ["red circle", "stars", "square", "blue", "star"],
    }
    grads, outputs = [], []
    for kwargs in ({"pixel_values": images, "image_index": index}, {"pixel_values": images[index]}):
        task.zero_grad()
        terms = task({**common, **kwargs})
        terms["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None})
        with torch.no_grad():
            dec = model.forward_features(
                kwargs["pixel_values"], **tokens, image_index=kwargs.get("image_index")
            )
        maps = {k: getattr(dec.decoder, k) for k in ("logits", "offsets", "modulation", "similarity")}
        outputs.append({**maps, **{k: v.detach() for k, v in terms.items()}})
    assert {"words_region", "words_phrase", "offsets", "similarity"} <= outputs[0].keys()
    for key in outputs[0]:
        torch.testing.assert_close(outputs[0][key], outputs[1][key], rtol=1e-4, atol=1e-5, msg=key)
    assert grads[0].keys() == grads[1].keys() and any(n.startswith("objectives.words.") for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-3, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="image_index"):
        model(images, **tokens)
    with pytest.raises(ValueError, match="image_index"):
        model(images, **tokens, image_index=torch.tensor([0, 1, 2, 0, 1]))


def test_frozen_backbone_gets_no_gradients(tiny_dir):
    torch.manual_seed(0)
    model = build_model(clipseg_like(tiny_dir, cross_attention=True)).train()
    assert not model.backbone.clip.training  # frozen CLIP stays in eval mode inside a training model
    perturb_zero_init(model)
    logits = model(**batch(model, ["the red circle", "two green stars"]))
    logits.square().mean().backward()
    assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.decoder.parameters() if p.requires_grad)
    counts = model.num_parameters()
    assert counts["modules"]["backbone"]["trainable"] == 0
    assert counts["trainable"] == counts["modules"]["decoder"]["trainable"] > 0


def test_num_parameters_adds_up():
    model = build_model(model_config("segvlm_tiny"))
    counts = model.num_parameters()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    mods = counts["modules"]
    assert mods["backbone"]["total"] + mods["decoder"]["total"] == counts["total"]
    children = [v["total"] for k, v in mods.items() if k.startswith("decoder.")]
    assert children and sum(children) == mods["decoder"]["total"]


# ------------------------------------------------------------------------------------------- switches
def _decoder_names(cfg: ModelConfig) -> tuple[set[str], set[str]]:
    decoder = build_model(cfg).decoder
    return set(dict(decoder.named_parameters())), {type(m).__name__ for m in decoder.modules()}


def _with(cfg: ModelConfig, **switches: bool) -> ModelConfig:
    return dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, **switches))


# switch -> (parameter-name prefixes it owns, prefixes that appear when it is off in the full SegVLM decoder).
# With cross-attention on, the projector also projects the phrase tokens (projector.text_tokens); without the
# projector the cross-attention brings its own token projection (cross_attn_text).
OWNED = {
    "cross_attention": (("cross_attn.", "projector.text_tokens."), ()),
    "projector": (("projector.",), ("cross_attn_text.",)),
    "deformable": (("refine.conv.",), ()),
    "se": (("refine.se.",), ()),
    "residual": (("refine.layer_scale",), ()),
}


def test_each_decoder_switch_adds_exactly_its_modules():
    clipseg = clipseg_like()
    full = _with(clipseg, **dict.fromkeys(SWITCHES, True))
    base_params, _ = _decoder_names(clipseg)
    full_params, full_types = _decoder_names(full)
    for switch, (owned, replacement) in OWNED.items():
        # on top of CLIPSeg: only adds
        on_params, _ = _decoder_names(_with(clipseg, **{switch: True}))
        assert base_params < on_params, f"{switch} on CLIPSeg removed {sorted(base_params - on_params)}"
        # ablated from the full decoder: removes what it owns (each owned prefix), adds only its replacement
        params, types = _decoder_names(_with(full, **{switch: False}))
        removed, added = full_params - params, params - full_params
        assert removed and all(n.startswith(owned) for n in removed), f"{switch}: {sorted(removed)}"
        assert all(any(n.startswith(p) for n in removed) for p in owned), f"{switch}: {sorted(removed)}"
        assert all(n.startswith(replacement) for n in added), f"{switch} off added {sorted(added)}"
        assert bool(added) == bool(replacement)
        if switch == "deformable":
            assert any("Deform" in t for t in full_types) and not any("Deform" in t for t in types)
        if switch == "se":
            assert "SqueezeExcite" in full_types and "SqueezeExcite" not in types
    # all switches off is CLIPSeg again
    assert _decoder_names(_with(full, **dict.fromkeys(SWITCHES, False)))[0] == base_params


def test_clipseg_decoder_parameter_names_mirror_transformers():
    names, _ = _decoder_names(clipseg_like())
    for prefix in ("film_mul.", "film_add.", "reduces.0.", "reduces.2.", "layers.0."):
        assert any(n.startswith(prefix) for n in names), prefix


def test_stem_skip_adds_modules_and_uses_stem_features():
    cfg = model_config("segvlm_tiny")
    with_skip, _ = _decoder_names(cfg)
    without, _ = _decoder_names(model_config("segvlm_tiny", ["decoder.stem_skip=false"]))
    assert without < with_skip
    with pytest.raises(ConfigError, match="stem_skip"):
        model_config("segvlm_tiny", ["backbone.image_stem=patch"])


def test_text_kernel_replaces_the_last_convt_and_reads_the_phrase():
    base, _ = _decoder_names(clipseg_like())
    params, _ = _decoder_names(_with(clipseg_like(), head="text_kernel"))
    assert {n for n in base - params} == {"transposed_convolution.4.weight", "transposed_convolution.4.bias"}
    assert params - base == {"text_kernel.weight", "text_kernel.bias"}
    with pytest.raises(ConfigError, match="text_kernel"):
        _with(clipseg_like(), head="text_kernel", complex_transposed_convolution=False).decoder.validate()
    with pytest.raises(ConfigError, match=r"decoder\.head must be one of"):
        build_model(_with(clipseg_like(), head="mlp"))

    torch.manual_seed(0)
    model = build_model(model_config("segvlm_tiny", ["decoder.head=text_kernel"])).eval()
    image = torch.randn(1, 3, 128, 128).expand(2, -1, -1, -1)
    tokens = model.backbone.tokenize(["the red circle", "the blue squares"])
    with torch.no_grad():
        logits = model(image, **tokens)
        assert logits.shape == (2, 1, 128, 128)
        assert not torch.allclose(logits[0], logits[1])  # same pixels, different phrase
        # a kernel of zeros and a bias of 5 whatever the phrase: every pixel's logit is 5
        model.decoder.text_kernel.weight.zero_()
        model.decoder.text_kernel.bias.copy_(torch.tensor([0.0] * 32 + [5.0]))
        torch.testing.assert_close(model(image, **tokens), torch.full((2, 1, 128, 128), 5.0))


# -------------------------------------------------------------------------------------------- presets
def test_registry_and_yaml_presets_agree():
    assert {"clipseg_b16", "segvlm_b16", "segvlm_tiny"} <= set(list_models())
    for name in ("clipseg_b16", "segvlm_b16", "segvlm_tiny"):
        from_yaml = resolve_model_config(CONFIGS / f"{name}.yaml", None, [])
        assert from_yaml == model_config(name), name
    b16 = model_config("clipseg_b16")
    assert (b16.backbone.image_size, b16.backbone.extract_layers, b16.decoder.reduce_dim) == (
        352,
        (3, 7, 9),
        64,
    )
    assert b16.backbone.freeze and not any(getattr(b16.decoder, s) for s in SWITCHES)
    assert all(getattr(model_config("segvlm_b16").decoder, s) for s in SWITCHES)
    with pytest.raises(ConfigError, match="unknown model preset"):
        model_config("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_model("segvlm_tiny")(lambda: ModelConfig())


# ------------------------------------------------------------------------------------------- learning
def synthetic_batch(
    n: int = 8, size: int = 128, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """n images with a filled circle and a filled square of different colours; the phrase names one of them.

    Returns (B×3×H×W images in [-1, 1], B×1×H×W {0,1} target masks, phrases).
    """
    g = torch.Generator().manual_seed(seed)
    colours = {
        "red": (1.0, -1.0, -1.0),
        "green": (-1.0, 1.0, -1.0),
        "blue": (-1.0, -1.0, 1.0),
        "yellow": (1.0, 1.0, -1.0),
    }
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand((), generator=g).item()

    images, masks, phrases = [], [], []
    for i in range(n):
        img = torch.full((3, size, size), -0.6)
        c1, c2 = (list(colours)[j] for j in torch.randperm(len(colours), generator=g)[:2].tolist())
        left = i % 2 == 0  # the circle's half; the square takes the other
        cx, cy, r = uniform(0.2, 0.3) + (0.0 if left else 0.5), uniform(0.25, 0.75), uniform(0.1, 0.16)
        sx, sy, s = uniform(0.55, 0.65) - (0.0 if left else 0.5), uniform(0.1, 0.6), uniform(0.15, 0.25)
        circle = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        square = (yy >= sy) & (yy < sy + s) & (xx >= sx) & (xx < sx + s)
        img[:, circle] = torch.tensor(colours[c1])[:, None]
        img[:, square] = torch.tensor(colours[c2])[:, None]
        pick_circle = i % 4 < 2
        masks.append((circle if pick_circle else square)[None].float())
        phrases.append(f"the {c1} circle" if pick_circle else f"the {c2} square")
        images.append(img)
    return torch.stack(images), torch.stack(masks), phrases


def bce_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    prob = logits.sigmoid().flatten(1)
    t = target.flatten(1)
    dice = 1 - (2 * (prob * t).sum(1) + 1) / (prob.sum(1) + t.sum(1) + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + dice.mean()


def test_segvlm_tiny_overfits_one_batch():
    """segvlm_tiny from scratch memorises 8 phrase-mask pairs: loss -90% and IoU >= 0.9.

    Bounded by steps, not wall time, so a loaded machine cannot make it flaky: it converges in about 110
    steps, about 0.15 s each on two free CPU cores (~20 s).
    """
    torch.manual_seed(0)
    model = build_model(model_config("segvlm_tiny")).train()
    images, masks, phrases = synthetic_batch()
    tokens = model.backbone.tokenize(phrases)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    start, first, loss_value, iou = time.monotonic(), math.inf, math.inf, 0.0
    for step in range(250):
        logits = model(images, **tokens)
        loss = bce_dice(logits, masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = loss.item()
        first = loss_value if step == 0 else first
        if step % 10 == 9:
            pred = logits.detach() > 0
            inter = (pred & (masks > 0)).flatten(1).sum(1)
            union = (pred | (masks > 0)).flatten(1).sum(1)
            iou = (inter / union.clamp(min=1)).mean().item()
            if loss_value <= 0.1 * first and iou >= 0.9:
                break
    where = f"after {step + 1} steps, {time.monotonic() - start:.0f}s"
    assert loss_value <= 0.1 * first, f"loss {first:.3f} -> {loss_value:.3f} {where}"
    assert iou >= 0.9, f"IoU {iou:.3f} {where}"
