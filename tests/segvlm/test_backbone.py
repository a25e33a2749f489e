"""CLIP backbone and word tokenizer: loading, truncated encoder, interpolation, freezing, conv stem."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import CLIPModel, CLIPTokenizer

from segvlm.backbone import BackboneLoadError, CLIPBackbone, ConvStem, clip_config_for, make_tiny_clip
from segvlm.config import BackboneConfig
from segvlm.tokenizer import DEFAULT_TINY_WORDS, build_word_tokenizer, check_tokenizer

PHRASES = ["a photo of the largest red circle.", "two blue squares left of the star", "zebra"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(DEFAULT_TINY_WORDS, model_max_length=32)


def _cfg(tiny_dir, **kw) -> BackboneConfig:
    base = dict(arch="tiny", pretrained=str(tiny_dir), image_size=128, extract_layers=(0, 2), freeze=False)
    return BackboneConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------------ tokenizer
def test_word_tokenizer_one_token_per_word_and_fallback(tokenizer):
    for word in DEFAULT_TINY_WORDS:
        assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1, word
    ids = tokenizer("the red circle")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id and len(ids) == 5
    # unknown words fall back to byte-level pieces and still round-trip
    unknown = tokenizer("zebra qwx", add_special_tokens=False)["input_ids"]
    assert len(unknown) > 2 and tokenizer.unk_token_id not in unknown
    assert (
        tokenizer.decode(tokenizer("Zebra QWX, 42")["input_ids"], skip_special_tokens=True)
        == "zebra qwx , 4 2"
    )
    # OpenAI's layout: specials last, pad = eos
    assert tokenizer.eos_token_id == len(tokenizer) - 1 == tokenizer.pad_token_id
    assert tokenizer.bos_token_id == len(tokenizer) - 2


def test_word_tokenizer_rejects_multi_token_words():
    with pytest.raises(ValueError, match="red circle"):
        build_word_tokenizer(["red circle"])


def test_tokenizer_save_load_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == len(tokenizer) and loaded.model_max_length == 32
    kw = dict(padding="max_length", truncation=True, max_length=12)
    assert loaded(PHRASES, **kw)["input_ids"] == tokenizer(PHRASES, **kw)["input_ids"]
    check_tokenizer(loaded, str(tmp_path))


def test_check_tokenizer_rejects_empty_tokenizer():
    empty = CLIPTokenizer(vocab={"<|startoftext|>": 0, "<|endoftext|>": 1})
    with pytest.raises(ValueError, match="some/source"):
        check_tokenizer(empty, "some/source")
    with pytest.raises(ValueError, match="nothing-here"):
        check_tokenizer(None, "nothing-here")


def test_check_tokenizer_rejects_collapsed_vocabulary():
    # large enough, but every word is unknown: distinct words must get distinct ids
    vocab = {f"tok{i}": i for i in range(60)} | {"<|startoftext|>": 60, "<|endoftext|>": 61}
    with pytest.raises(ValueError, match="collapsed-src"):
        check_tokenizer(CLIPTokenizer(vocab=vocab), "collapsed-src")


# --------------------------------------------------------------------------------------------- config
def test_clip_config_for_vit_b16_matches_openai():
    c = clip_config_for("vit_b16")
    v, t = c.vision_config, c.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == (
        768,
        12,
        12,
        3072,
    )
    assert (v.patch_size, v.image_size, v.hidden_act) == (16, 224, "quick_gelu")
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size) == (
        512,
        12,
        8,
        2048,
    )
    assert (t.vocab_size, t.max_position_embeddings, t.eos_token_id, c.projection_dim) == (
        49408,
        77,
        49407,
        512,
    )
    with pytest.raises(ValueError, match="unknown CLIP arch"):
        clip_config_for("vit_h14")


# ------------------------------------------------------------------------------------------- loading
def test_make_tiny_clip_loads_through_from_pretrained(tiny_dir, tokenizer):
    bb = CLIPBackbone.from_config(_cfg(tiny_dir))
    assert isinstance(bb.clip, CLIPModel) and isinstance(bb.tokenizer, CLIPTokenizer)
    assert bb.tokenizer("a red circle")["input_ids"] == tokenizer("a red circle")["input_ids"]
    ref = CLIPModel.from_pretrained(tiny_dir)
    for name, tensor in ref.state_dict().items():
        torch.testing.assert_close(bb.clip.state_dict()[name], tensor, rtol=0, atol=0)
    # same seed, same weights; another seed, others
    again = CLIPModel.from_pretrained(make_tiny_clip(tiny_dir.parent / "again", seed=0))
    other = CLIPModel.from_pretrained(make_tiny_clip(tiny_dir.parent / "other", seed=1))
    w = "text_model.embeddings.token_embedding.weight"
    assert torch.equal(again.state_dict()[w], ref.state_dict()[w])
    assert not torch.equal(other.state_dict()[w], ref.state_dict()[w])


def test_missing_pretrained_reference_raises_clear_error(tmp_path):
    with pytest.raises(BackboneLoadError, match="HF_HUB_OFFLINE") as info:
        CLIPBackbone.from_config(BackboneConfig(pretrained="nobody/no-such-clip-model"))
    assert "local folder" in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneLoadError, match=r"config\.json"):
        CLIPBackbone.from_config(BackboneConfig(pretrained=str(tmp_path / "empty")))


def test_tokenize_pads_and_truncates_to_the_smallest_limit(tiny_dir):
    bb = CLIPBackbone.from_config(_cfg(tiny_dir, max_text_length=8))
    tok = bb.tokenize(["a red circle", "the big blue square on the left of the small green star"])
    assert tok["input_ids"].shape == tok["attention_mask"].shape == (2, 8)
    assert tok["attention_mask"][0].tolist() == [1] * 5 + [0] * 3
    assert tok["input_ids"][1, -1].item() == bb.tokenizer.eos_token_id  # truncation keeps the EOS
    assert CLIPBackbone.from_config(_cfg(tiny_dir, max_text_length=77)).max_text_length == 32


# ------------------------------------------------------------------------------------------- forward
def test_truncated_vision_encoder_equals_full_model_and_text_features(tiny_dir):
    bb = CLIPBackbone.from_config(_cfg(tiny_dir, extract_layers=(0, 2))).eval()
    tok = bb.tokenize(PHRASES)
    pixels = torch.randn(3, 3, 128, 128)
    with torch.no_grad():
        out = bb(pixels, **tok)
        full = bb.clip.vision_model(pixel_values=pixels, output_hidden_states=True)
        text = bb.clip.get_text_features(**tok)
    assert len(full.hidden_states) == 5  # embeddings + 4 blocks: the backbone ran 3 of them
    assert [a.shape for a in out.activations] == [(3, 65, 128)] * 2
    torch.testing.assert_close(out.activations[0], full.hidden_states[1])
    torch.testing.assert_close(out.activations[1], full.hidden_states[3])
    # transformers 5 returns an output object; the projected pooled EOS state is its pooler_output
    torch.testing.assert_close(out.text_embedding, text.pooler_output)
    assert out.text_embedding.shape == (3, 128) and out.text_tokens.shape == (3, 32, 128)
    assert out.text_mask.dtype == torch.bool and torch.equal(out.text_mask, tok["attention_mask"].bool())
    assert out.stem_features is None


def test_truncated_encoder_skips_later_blocks(tiny_dir):
    bb = CLIPBackbone.from_config(_cfg(tiny_dir, extract_layers=(1,)))
    calls = []
    for i, layer in enumerate(bb.clip.vision_model.encoder.layers):
        layer.register_forward_hook(lambda *_, i=i: calls.append(i))
    tok = bb.tokenize(["a red circle"])
    bb(torch.randn(1, 3, 128, 128), **tok)
    assert calls == [0, 1]
    # blocks that never run cannot learn: not trainable, so optimisers and DDP never see them
    assert not any(p.requires_grad for p in bb.clip.vision_model.encoder.layers[2:].parameters())
    assert not bb.clip.logit_scale.requires_grad and not bb.clip.visual_projection.weight.requires_grad
    assert all(p.requires_grad for p in bb.clip.text_model.parameters())


@pytest.mark.parametrize("size", [(160, 160), (192, 128)])
def test_interpolated_position_embeddings(tiny_dir, size):
    bb = CLIPBackbone.from_config(_cfg(tiny_dir)).eval()
    tok = bb.tokenize(["a red circle"])
    pixels = torch.randn(1, 3, *size)
    with torch.no_grad():
        out = bb(pixels, **tok)
        ref = bb.clip.vision_model(
            pixel_values=pixels, output_hidden_states=True, interpolate_pos_encoding=True
        )
    n = (size[0] // 16) * (size[1] // 16)
    assert out.activations[-1].shape == (1, 1 + n, 128)
    torch.testing.assert_close(out.activations[-1], ref.hidden_states[3])


def test_vit_b16_config_at_352_px():
    # CLIPSeg's setting: a 224 px checkpoint run at 352 px (22×22 tokens); frozen, random weights
    bb = CLIPBackbone.from_config(BackboneConfig(arch="vit_b16", image_size=352, extract_layers=(0, 1)))
    assert bb.tokenizer is None and bb.clip.config.vision_config.image_size == 224
    ids = torch.tensor([[49406, 320, 1929, 49407]])
    with torch.no_grad():
        out = bb(torch.randn(1, 3, 352, 352), ids, torch.ones_like(ids))
    assert out.activations[-1].shape == (1, 1 + 22 * 22, 768) and out.text_embedding.shape == (1, 512)
    assert torch.isfinite(out.activations[-1]).all()
    with pytest.raises(RuntimeError, match="no tokenizer"):
        bb.tokenize(["a cat"])


def test_frozen_backbone_has_no_grads_and_stays_in_eval(tiny_dir):
    bb = CLIPBackbone.from_config(_cfg(tiny_dir, freeze=True))
    parent = torch.nn.Sequential(bb).train()
    assert not bb.clip.training and not any(m.training for m in bb.clip.modules())
    assert not any(p.requires_grad for p in bb.parameters())
    tok = bb.tokenize(["a red circle"])
    out = bb(torch.randn(1, 3, 128, 128, requires_grad=True), **tok)
    assert not out.activations[0].requires_grad and not out.text_embedding.requires_grad
    parent.eval().train()
    assert not bb.clip.training


def test_trainable_backbone_gets_grads(tiny_dir):
    bb = CLIPBackbone.from_config(_cfg(tiny_dir, freeze=False, extract_layers=(3,))).train()
    assert bb.clip.training
    tok = bb.tokenize(["a red circle", "the blue star"])
    out = bb(torch.randn(2, 3, 128, 128), **tok)
    (out.activations[0].square().mean() + out.text_embedding.square().mean()).backward()
    missing = [n for n, p in bb.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_conv_stem_replaces_patch_embedding(tiny_dir):
    bb = CLIPBackbone.from_config(_cfg(tiny_dir, image_stem="conv"))
    stem = bb.clip.vision_model.embeddings.patch_embedding
    assert isinstance(stem, ConvStem) and bb.stem_channels == stem.stem_channels == 64
    tok = bb.tokenize(["a red circle", "the star"])
    pixels = torch.randn(2, 3, 128, 128)
    out = bb(pixels, **tok)
    assert out.activations[0].shape == (2, 65, 128)
    assert out.stem_features.shape == (2, 64, 32, 32)
    # transformers' own vision forward works with the stem in place and agrees
    ref = bb.clip.vision_model(pixel_values=pixels, output_hidden_states=True)
    torch.testing.assert_close(out.activations[1], ref.hidden_states[3])
    with pytest.raises(ValueError, match="power-of-two"):
        ConvStem(128, 14)


def test_extract_layers_out_of_range(tiny_dir):
    with pytest.raises(ValueError, match="out of range"):
        CLIPBackbone.from_config(dataclasses.replace(_cfg(tiny_dir), extract_layers=(1, 4)))
