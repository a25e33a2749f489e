"""CLIPSeg → segvlm conversion: same logits as transformers' CLIPSeg, clear errors for bad sources."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import CLIPSegConfig, CLIPSegForImageSegmentation  # noqa: E402

from jobs import convert_clipseg as cli  # noqa: E402
from segvlm.checkpoint import load_checkpoint  # noqa: E402
from segvlm.convert import ConvertError, convert_clipseg, load_clipseg, model_config_from_clipseg  # noqa: E402
from segvlm.tokenizer import DEFAULT_TINY_WORDS, build_word_tokenizer  # noqa: E402

NATIVE = 64  # the tiny CLIPSeg's vision image_size
PHRASES = ["the red circle", "a photo of the small blue triangles on the left"]  # different lengths: padding


def tiny_clipseg_config(vocab: int, bos: int, eos: int, pad: int, **overrides) -> CLIPSegConfig:
    kwargs = dict(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=pad,
        ),
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=2,
            image_size=NATIVE,
            patch_size=16,
        ),
        projection_dim=32,
        reduce_dim=16,
        extract_layers=[1, 2, 3],
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
        use_complex_transposed_convolution=True,  # as in CIDAS/clipseg-rd64-refined
    )
    kwargs.update(overrides)
    return CLIPSegConfig(**kwargs)


def _save_tiny_clipseg(folder, *, complex_head: bool = True):
    """A random tiny CLIPSeg saved like a hub download (weights + config + tokenizer)."""
    tok = build_word_tokenizer(DEFAULT_TINY_WORDS)
    cfg = tiny_clipseg_config(
        len(tok),
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
        use_complex_transposed_convolution=complex_head,
    )
    torch.manual_seed(0)
    model = CLIPSegForImageSegmentation(cfg)
    head = model.decoder.transposed_convolution
    with torch.no_grad():  # random init gives logits of ~±60; scale the head so 1e-4 is a meaningful bound
        (head[-1] if complex_head else head).weight.mul_(0.05)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clipseg_dir(tmp_path_factory):
    return _save_tiny_clipseg(tmp_path_factory.mktemp("clipseg"))


@pytest.fixture(scope="module")
def reference(clipseg_dir):
    model = CLIPSegForImageSegmentation.from_pretrained(clipseg_dir).eval()
    tok = transformers.CLIPTokenizer.from_pretrained(clipseg_dir)
    return model, tok


def _compare(ours, hf_model, tokenizer, size: int) -> float:
    g = torch.Generator().manual_seed(size)
    pixels = torch.randn(len(PHRASES), 3, size, size, generator=g)
    tokens = ours.backbone.tokenize(PHRASES)
    # Our tokenizer (copied from the CLIPSeg folder) must give CLIPSeg's own tokens.
    assert (
        tokens["input_ids"].tolist() == tokenizer(PHRASES, padding="max_length", max_length=77)["input_ids"]
    )
    with torch.no_grad():
        expected = hf_model(pixel_values=pixels, **tokens).logits  # B×H×W
        got = ours(pixels, tokens["input_ids"], tokens["attention_mask"])  # B×1×H×W
    assert got.shape == (len(PHRASES), 1, size, size)
    assert expected.shape == (len(PHRASES), size, size)
    assert expected.abs().max() > 0.1  # a non-trivial output, so the bound below means something
    return (got[:, 0] - expected).abs().max().item()


@pytest.mark.parametrize("segvlm", [False, True], ids=["clipseg", "segvlm"])
def test_converted_checkpoint_reproduces_clipseg(clipseg_dir, reference, tmp_path, segvlm):
    hf_model, hf_tok = reference
    out = convert_clipseg(clipseg_dir, tmp_path / "ckpt", segvlm=segvlm, image_size=NATIVE)
    model, cfg, meta = load_checkpoint(out)

    assert cfg.backbone.extract_layers == (1, 2, 3)  # HF's 0-based indices are ours
    assert cfg.backbone.image_size == NATIVE and cfg.backbone.freeze
    assert (cfg.decoder.reduce_dim, cfg.decoder.num_heads, cfg.decoder.intermediate_size) == (16, 2, 32)
    assert cfg.decoder.cross_attention is segvlm and cfg.decoder.deformable is segvlm
    assert (model.decoder.refine is not None) is segvlm and (model.decoder.cross_attn is not None) is segvlm
    assert meta["includes_backbone"] is True  # CLIPSeg's CLIP is not a loadable CLIPModel reference
    assert (out / "backbone" / "tokenizer_config.json").is_file()

    # Every CLIP tensor came across unchanged.
    hf_clip = hf_model.clip.state_dict()
    ours_clip = model.backbone.clip.state_dict()
    assert set(hf_clip) == set(ours_clip)
    assert all(torch.equal(hf_clip[k], ours_clip[k]) for k in hf_clip)

    # Native size, and another square size (CLIPSeg interpolates its position embeddings; so do we).
    for size in (NATIVE, 96):
        diff = _compare(model, hf_model, hf_tok, size)
        assert diff <= 1e-4, f"size {size}: max |ours - CLIPSeg| = {diff:.2e}"


def test_cli_converts_and_reports_errors(clipseg_dir, tmp_path, capsys):
    assert cli.main(["--from", str(clipseg_dir), "--out", str(tmp_path / "ok"), "--image-size", "64"]) == 0
    assert (tmp_path / "ok" / "model.safetensors").is_file()

    missing = tmp_path / "nope" / "clipseg"
    assert cli.main(["--from", str(missing), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and str(missing) in err and "Traceback" not in err

    # A folder holding something else (a plain CLIP model config) is not a CLIPSeg checkpoint.
    other = tmp_path / "clip"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "clip"}))
    assert cli.main(["--from", str(other), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "not a CLIPSeg checkpoint" in err and "'clip'" in err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["--from", str(empty), "--out", str(tmp_path / "z")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def test_unreachable_hub_id_says_to_pass_a_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConvertError, match="pass --from DIR"):
        load_clipseg("segvlm-tests/no-such-clipseg")


def test_weights_without_decoder_are_rejected(clipseg_dir, tmp_path):
    """A CLIPSeg config whose weights do not fill the model must not convert with random parts."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((clipseg_dir / name).read_bytes())
    state = {
        k: v for k, v in load_file(clipseg_dir / "model.safetensors").items() if not k.startswith("decoder.")
    }
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConvertError, match="missing"):
        load_clipseg(broken)


def test_simple_head_checkpoint_converts(tmp_path):
    """``CIDAS/clipseg-rd64`` style: one ConvT(D → 1, kernel = stride = patch) instead of the refined head."""
    folder = _save_tiny_clipseg(tmp_path / "rd", complex_head=False)
    hf_model = CLIPSegForImageSegmentation.from_pretrained(folder).eval()
    model, cfg, _ = load_checkpoint(convert_clipseg(folder, tmp_path / "ckpt", image_size=NATIVE))
    assert cfg.decoder.complex_transposed_convolution is False
    diff = _compare(model, hf_model, transformers.CLIPTokenizer.from_pretrained(folder), NATIVE)
    assert diff <= 1e-4, f"max |ours - CLIPSeg| = {diff:.2e}"


def test_processor_size_and_normalisation_are_kept(clipseg_dir, tmp_path):
    """CIDAS checkpoints ship a preprocessor (352 px, ImageNet mean/std); the Predictor must use both."""
    import shutil

    import numpy as np
    from PIL import Image

    from segvlm.inference import Predictor
    from segvlm.preprocess import pil_to_uint8_tensor

    folder = tmp_path / "with_processor"
    shutil.copytree(clipseg_dir, folder)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    processor = {
        "size": {"height": 96, "width": 96},
        "do_normalize": True,
        "image_mean": mean,
        "image_std": std,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    out = convert_clipseg(str(folder), tmp_path / "ckpt")
    predictor = Predictor.from_checkpoint(out)
    assert predictor.image_size == 96

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    resized = pil_to_uint8_tensor(image.resize((96, 96), Image.BILINEAR)).float() / 255
    expected = (resized - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(predictor.preprocess(image)[0], expected, atol=1e-5, rtol=0)


def test_unsupported_layer_norm_eps_is_refused():
    cfg = tiny_clipseg_config(100, 98, 99, 99)
    cfg.vision_config.layer_norm_eps = 1e-6
    with pytest.raises(ConvertError, match="eps"):
        model_config_from_clipseg(cfg)


def _save_processor_transformers5(folder, size: int, **settings) -> None:
    """The processor as transformers 5 saves it: one processor_config.json, image settings nested."""
    from transformers import CLIPImageProcessor, CLIPSegProcessor

    image_processor = CLIPImageProcessor(
        size={"height": size, "width": size}, do_center_crop=False, **settings
    )
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


def test_transformers5_processor_config_sets_the_input_size(clipseg_dir, reference, tmp_path, capsys):
    import shutil

    folder = tmp_path / "saved_by_transformers5"
    shutil.copytree(clipseg_dir, folder)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    _save_processor_transformers5(folder, 96, image_mean=mean, image_std=std)
    assert (folder / "processor_config.json").is_file() and not (folder / "preprocessor_config.json").exists()

    assert cli.main(["--from", str(folder), "--out", str(tmp_path / "ckpt")]) == 0
    out = capsys.readouterr().out
    assert "input size 96x96 (from processor_config.json)" in out
    model, cfg, meta = load_checkpoint(tmp_path / "ckpt")
    assert cfg.backbone.image_size == 96
    assert meta["extra"]["input_size"] == {"size": 96, "from": "processor_config.json"}
    assert meta["extra"]["image_mean"] == mean and meta["extra"]["image_std"] == std
    hf_model, hf_tok = reference
    diff = _compare(model, hf_model, hf_tok, 96)
    assert diff <= 1e-4, f"max |ours - CLIPSeg| at 96 px = {diff:.2e}"


def test_input_size_sources_in_order(clipseg_dir, tmp_path):
    import shutil

    from segvlm.convert import input_size

    folder = tmp_path / "both"
    shutil.copytree(clipseg_dir, folder)
    assert input_size(str(folder)) == (352, "CLIPSeg's default (no processor size saved with the weights)")
    (folder / "preprocessor_config.json").write_text(json.dumps({"size": 80}))  # CIDAS/*' form: an int
    assert input_size(str(folder)) == (80, "preprocessor_config.json")
    _save_processor_transformers5(folder, 112)
    assert input_size(str(folder)) == (112, "processor_config.json")
    assert input_size(str(folder), 64) == (64, "--image-size")
    # a processor that center-crops feeds the model its crop
    cropping = {"image_processor": {"size": {"shortest_edge": 128}, "do_center_crop": True, "crop_size": 120}}
    (folder / "processor_config.json").write_text(json.dumps(cropping))
    assert input_size(str(folder)) == (120, "processor_config.json")
