"""Checkpoint folders (save/load round trips, atomic writes, corruption) and the `segvlm params` command."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import segvlm.checkpoint as ckpt
from jobs import params
from segvlm.backbone import make_tiny_clip
from segvlm.checkpoint import CheckpointError, load_checkpoint, load_weights, save_checkpoint
from segvlm.config import BackboneConfig, ModelConfig
from segvlm.registry import build_model, model_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PHRASES = ["the red circle", "a big blue square on the left"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0)


def trained_cfg() -> ModelConfig:
    """segvlm_tiny (trained backbone with conv stem, every decoder part) at reduced widths for speed."""
    return model_config("segvlm_tiny", ["decoder.intermediate_size=64", "decoder.deform_impl=native"])


def frozen_cfg(tiny_dir: Path) -> ModelConfig:
    """A frozen backbone with a pretrained reference; the conv stem is not in the reference, so it is saved."""
    cfg = trained_cfg()
    return dataclasses.replace(
        cfg, backbone=dataclasses.replace(cfg.backbone, pretrained=str(tiny_dir), freeze=True), name="frozen"
    )


def perturb(model: torch.nn.Module) -> None:
    """Move every parameter off its init (zero gates included) so a round trip that loses any shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)


def logits_of(model, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(2, 3, 128, 128, generator=g)
    with torch.no_grad():
        return model.eval()(pixels, **model.backbone.tokenize(PHRASES))


# ------------------------------------------------------------------------------------------ round trip
def test_round_trip_trained_backbone(tmp_path):
    torch.manual_seed(0)
    cfg = trained_cfg()
    model = build_model(cfg)
    perturb(model)
    out = save_checkpoint(model, cfg, tmp_path / "ckpt", extra={"step": 7, "run_id": "abc"})
    assert sorted(p.name for p in out.iterdir()) == [
        "backbone",
        "config.yaml",
        "meta.json",
        "model.safetensors",
    ]
    assert (out / "backbone" / "config.json").is_file() and (out / "backbone" / "tokenizer.json").is_file()

    loaded, loaded_cfg, meta = load_checkpoint(out)
    assert loaded_cfg == cfg
    assert meta["format_version"] == 1 and meta["includes_backbone"] is True and meta["backbone_ref"] is None
    assert meta["extra"] == {"step": 7, "run_id": "abc"} and meta["created"]
    assert not loaded.training
    torch.testing.assert_close(logits_of(loaded), logits_of(model), rtol=0, atol=0)
    assert (
        loaded.backbone.tokenize(PHRASES)["input_ids"].tolist()
        == model.backbone.tokenize(PHRASES)["input_ids"].tolist()
    )


def test_round_trip_frozen_backbone_keeps_only_the_reference(tmp_path, tiny_dir):
    torch.manual_seed(0)
    cfg = frozen_cfg(tiny_dir)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    out = save_checkpoint(model, cfg, tmp_path / "ckpt")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["includes_backbone"] is False and meta["backbone_ref"] == str(tiny_dir)

    stored = load_file(out / "model.safetensors")
    assert not any(k.startswith("backbone.clip.text_model.") for k in stored)
    assert not any(k.startswith("backbone.clip.vision_model.encoder.") for k in stored)
    # the conv stem is not part of the reference CLIP: it must be stored
    assert any(k.startswith("backbone.clip.vision_model.embeddings.patch_embedding.") for k in stored)
    assert set(stored) >= {f"decoder.{k}" for k in model.decoder.state_dict()}

    loaded, _, _ = load_checkpoint(out)
    torch.testing.assert_close(logits_of(loaded), logits_of(model), rtol=0, atol=0)

    # load_weights fills a freshly built model (what a resumed training run does)
    torch.manual_seed(1)
    fresh = build_model(cfg)
    assert not torch.equal(logits_of(fresh), logits_of(model))
    load_weights(fresh, out)
    torch.testing.assert_close(logits_of(fresh), logits_of(model), rtol=0, atol=0)


def test_reference_change_warns(tmp_path, tiny_dir):
    ref = make_tiny_clip(tmp_path / "ref", seed=0)
    cfg = dataclasses.replace(
        frozen_cfg(tiny_dir), backbone=dataclasses.replace(frozen_cfg(tiny_dir).backbone, pretrained=str(ref))
    )
    out = save_checkpoint(build_model(cfg), cfg, tmp_path / "ckpt")
    make_tiny_clip(ref, seed=1)  # the reference folder is overwritten with other weights
    with pytest.warns(UserWarning, match="differ"):
        load_checkpoint(out)


# ---------------------------------------------------------------------------------------------- atomic
def test_failed_save_leaves_no_checkpoint_under_the_final_name(tmp_path, monkeypatch):
    cfg = trained_cfg()
    model = build_model(cfg)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, cfg, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []  # neither the final name nor a temporary leftover

    monkeypatch.undo()
    good = save_checkpoint(model, cfg, tmp_path / "ckpt", extra={"step": 1})
    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError):
        save_checkpoint(model, cfg, tmp_path / "ckpt", extra={"step": 2})
    # the previous complete checkpoint survives a failed overwrite
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert json.loads((good / "meta.json").read_text())["extra"]["step"] == 1
    monkeypatch.undo()
    save_checkpoint(model, cfg, tmp_path / "ckpt", extra={"step": 3})
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert load_checkpoint(tmp_path / "ckpt")[2]["extra"]["step"] == 3


# ------------------------------------------------------------------------------------------ corruption
@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    cfg = trained_cfg()
    return save_checkpoint(build_model(cfg), cfg, tmp_path_factory.mktemp("saved") / "ckpt")


def _copy(saved: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(saved, tmp_path / "copy"))


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")


def test_truncated_safetensors(saved, tmp_path):
    path = _copy(saved, tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(corrupt|truncated)"):
        load_checkpoint(path)
    (path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_weights(build_model(trained_cfg()), path)


def test_wrong_format_version(saved, tmp_path):
    path = _copy(saved, tmp_path)
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "format_version": 2}))
    with pytest.raises(CheckpointError, match=r"meta\.json.*format_version 2"):
        load_checkpoint(path)
    (path / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"meta\.json"):
        load_checkpoint(path)


@pytest.mark.parametrize("name", ["config.yaml", "meta.json", "model.safetensors"])
def test_missing_file(saved, tmp_path, name):
    path = _copy(saved, tmp_path)
    (path / name).unlink()
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_checkpoint(path)


def test_invalid_config(saved, tmp_path):
    path = _copy(saved, tmp_path)
    (path / "config.yaml").write_text((path / "config.yaml").read_text() + "surprise: 1\n")
    with pytest.raises(CheckpointError, match=r"config\.yaml.*surprise"):
        load_checkpoint(path)


def test_missing_unexpected_and_mismatched_keys(saved, tmp_path):
    path = _copy(saved, tmp_path)
    state = load_file(path / "model.safetensors")
    key = "decoder.film_mul.weight"

    def check(mutated: dict, pattern: str) -> None:
        save_file(mutated, str(path / "model.safetensors"))
        with pytest.raises(CheckpointError, match=pattern):
            load_checkpoint(path)

    check({k: v for k, v in state.items() if k != key}, rf"model\.safetensors.*missing keys: {key}")
    check({**state, "decoder.extra.weight": torch.zeros(3)}, r"unexpected keys: decoder\.extra\.weight")
    check({**state, key: state[key][:, :-1].contiguous()}, rf"shape mismatch: {key}")


# -------------------------------------------------------------------------------------------- params
def _params(capsys, argv: list[str]) -> dict:
    assert params.main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_params_matches_a_direct_count(capsys):
    report = _params(capsys, ["--model", "segvlm_tiny"])
    direct = build_model(model_config("segvlm_tiny")).num_parameters()
    assert report["model"] == "segvlm_tiny"
    assert report["total"] == direct["total"] and report["trainable"] == direct["trainable"]
    assert report["modules"] == direct["modules"]
    assert report["modules"]["backbone"]["trainable"] > 0  # trained from scratch

    from_yaml = _params(capsys, ["--config", str(CONFIGS / "segvlm_tiny.yaml")])
    assert from_yaml == report
    wider = _params(capsys, ["--model", "segvlm_tiny", "decoder.reduce_dim=128"])
    assert wider["modules"]["decoder"]["total"] > report["modules"]["decoder"]["total"]
    assert wider["modules"]["backbone"] == report["modules"]["backbone"]


def test_params_clipseg_b16(capsys):
    report = _params(capsys, ["--config", str(CONFIGS / "clipseg_b16.yaml")])
    # CLIPSeg's D=64 decoder: ~1.1M trainable parameters on a frozen 149.6M CLIP ViT-B/16
    assert 1_000_000 <= report["trainable"] <= 1_300_000
    assert report["trainable"] == report["modules"]["decoder"]["trainable"]
    assert report["total"] - report["trainable"] == report["modules"]["backbone"]["total"] == 149_620_737
    assert report["total"] == report["modules"]["backbone"]["total"] + report["modules"]["decoder"]["total"]


def test_params_rejects_bad_input(capsys, tmp_path):
    assert params.main(["--model", "nope"]) == 2
    assert "unknown model preset" in capsys.readouterr().err
    assert params.main(["--model", "segvlm_tiny", "decoder.bogus=1"]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: 1}\n")
    assert params.main(["--config", str(bad)]) == 2
    assert "model:" in capsys.readouterr().err


def test_params_does_not_download_hub_references(capsys, tmp_path):
    cfg_file = tmp_path / "hub.yaml"
    cfg_file.write_text("model:\n  name: x\n  backbone: {arch: tiny, pretrained: openai/clip-vit-base-patch16, "
                        "image_size: 128, extract_layers: [1, 2, 3], freeze: false}\n")  # fmt: skip
    report = _params(capsys, ["--config", str(cfg_file)])
    assert (
        report["modules"]["backbone"]
        == build_model(
            ModelConfig(
                backbone=BackboneConfig(arch="tiny", image_size=128, extract_layers=(1, 2, 3), freeze=False)
            )
        ).num_parameters()["modules"]["backbone"]
    )


# ------------------------------------------------------------------------------------------- migration
def test_older_checkpoint_with_training_heads_loads_migrated(tmp_path, caplog):
    """A checkpoint written before the word head moved into the training task: its config has the decoder
    switches text_kernel / word_head / region_head, its weights the heads' tensors. It loads for inference,
    the text kernel kept as ``head: text_kernel``, the heads' tensors dropped with one log line."""
    torch.manual_seed(0)
    cfg = model_config("segvlm_tiny", ["decoder.intermediate_size=64", "decoder.head=text_kernel"])
    model = build_model(cfg)
    perturb(model)
    path = save_checkpoint(model, cfg, tmp_path / "old")
    config_text = (path / "config.yaml").read_text()
    assert "  head: text_kernel\n" in config_text
    (path / "config.yaml").write_text(
        config_text.replace(
            "  head: text_kernel\n", "  text_kernel: true\n  region_head: false\n  word_head: true\n"
        )
    )
    state = load_file(str(path / "model.safetensors"))
    heads = {
        "decoder.word_head.region.weight": torch.randn(128, 128),
        "decoder.word_head.region.bias": torch.randn(128),
        "decoder.word_head.phrase.weight": torch.randn(128, 128),
        "decoder.word_head.phrase.bias": torch.randn(128),
    }
    save_file({**state, **heads}, str(path / "model.safetensors"), metadata={"format": "pt"})

    with caplog.at_level("INFO", logger="segvlm.checkpoint"):
        loaded, loaded_cfg, _ = load_checkpoint(path)
    assert loaded_cfg == cfg and loaded_cfg.decoder.head == "text_kernel"
    torch.testing.assert_close(logits_of(loaded), logits_of(model))
    lines = [r.getMessage() for r in caplog.records if r.name == "segvlm.checkpoint"]
    assert len(lines) == 1, lines
    assert "text_kernel=true → decoder.head=text_kernel" in lines[0]
    assert "dropped 4 tensors of training-only heads word_head" in lines[0]

    # resuming from such a folder (load_weights) drops the same tensors
    fresh = build_model(cfg)
    load_weights(fresh, path)
    torch.testing.assert_close(logits_of(fresh), logits_of(model))

    # text_kernel: false is CLIPSeg's head
    (path / "config.yaml").write_text(config_text.replace("  head: text_kernel\n", "  text_kernel: false\n"))
    with pytest.raises(CheckpointError, match=r"unexpected keys: decoder\.text_kernel"):
        load_checkpoint(path)  # the weights are the text kernel's: they do not fit CLIPSeg's head
