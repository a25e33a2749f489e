"""The training task: named terms and their weighted total, the word objective's head (exists iff its weight
is positive, trained, never in the model), learning on a tiny batch, and the auxiliary state round trip."""

from __future__ import annotations

import pytest
import torch

from segvlm.config import ConfigError
from segvlm.losses import RAFLoss
from segvlm.registry import build_model, model_config
from segvlm.task import LOSS_PRESETS, LossConfig, SegmentationTask, WordObjective, build_task

PHRASES = ["the red circle", "two green stars", "the square"]
WORDS = ["red circle", "green star", "square"]


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(model_config("segvlm_tiny", ["decoder.head=text_kernel"]))


def make_batch(model, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(3, 1, 128, 128)
    masks[0, :, 16:64, 16:64] = 1
    masks[1, :, 64:112, 32:96] = 1  # the third task is a negative (empty mask)
    return {
        "pixel_values": torch.randn(2, 3, 128, 128, generator=g),
        **model.backbone.tokenize(PHRASES),
        "image_index": torch.tensor([0, 1, 1]),
        "masks": masks,
        "target_words": WORDS,
    }


def test_total_is_the_weighted_sum_of_the_named_terms():
    model = tiny_model()
    cfg = LossConfig(bce=0.5, focal=2.0, dice=1.5, words=0.3)
    task = build_task(model, cfg)
    batch = make_batch(model)
    terms = task(batch)
    assert list(terms) == ["loss", "bce", "focal", "dice", "words_region", "words_phrase"]
    expected = (
        0.5 * terms["bce"]
        + 2.0 * terms["focal"]
        + 1.5 * terms["dice"]
        + 0.3 * (terms["words_region"] + terms["words_phrase"])
    )
    torch.testing.assert_close(terms["loss"], expected)
    assert all(v.ndim == 0 and v.dtype == torch.float32 for v in terms.values())

    # the RAF terms are the criterion's on the model's logits; the word terms depend on target_words
    logits = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["image_index"])
    raf = RAFLoss(bce=0.5, focal=2.0, dice=1.5)(logits, batch["masks"])
    for name in ("bce", "focal", "dice"):
        torch.testing.assert_close(terms[name], raf[name])
    other = task({**batch, "target_words": ["square", "square", "star"]})
    assert not torch.isclose(other["words_phrase"], terms["words_phrase"])

    # a words-only weight change moves the total by exactly the change times the word terms
    plain = build_task(model, LossConfig(bce=0.5, focal=2.0, dice=1.5))(batch)
    assert set(plain) == {"loss", "bce", "focal", "dice"}
    torch.testing.assert_close(
        terms["loss"] - plain["loss"], 0.3 * (terms["words_region"] + terms["words_phrase"])
    )


@pytest.mark.parametrize("words", [0.0, 0.3])
def test_word_head_exists_iff_its_weight_and_is_trained_outside_the_model(words):
    model = tiny_model()
    task = build_task(model, LossConfig(words=words))
    head = [n for n, _ in task.named_parameters() if n.startswith("objectives.")]
    assert bool(head) == (words > 0)
    assert not any("word" in k for k in task.model.state_dict())  # what inference checkpoints store
    assert set(task.model.state_dict()) == set(model.state_dict())
    assert task.aux_state_dict().keys() == {n.removeprefix("objectives.") for n in head}
    if words > 0:
        assert isinstance(task.objectives["words"], WordObjective)
        task(make_batch(model))["loss"].backward()
        no_grad = [
            n for n, p in task.named_parameters() if n in head and (p.grad is None or not p.grad.any())
        ]
        assert not no_grad, f"no gradient reaches {no_grad}"


def test_a_few_steps_reduce_the_loss():
    model = tiny_model()
    task = build_task(model, LossConfig(words=0.3)).train()
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-3)
    batch = make_batch(model)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        terms = task(batch)
        terms["loss"].backward()
        optimizer.step()
        losses.append(float(terms["loss"].detach()))
    assert losses[-1] < 0.8 * losses[0], losses


def test_aux_state_round_trip(tmp_path):
    model = tiny_model()
    task = build_task(model, LossConfig(words=0.3))
    with torch.no_grad():
        for p in task.objectives.parameters():
            p.normal_()
    torch.save(task.aux_state_dict(), tmp_path / "aux.pt")
    fresh = build_task(model, LossConfig(words=0.3))
    assert not torch.equal(
        fresh.objectives["words"].head.region.weight, task.objectives["words"].head.region.weight
    )
    fresh.load_aux_state_dict(torch.load(tmp_path / "aux.pt", weights_only=True))
    batch = make_batch(model)
    with torch.no_grad():
        torch.testing.assert_close(fresh(batch)["loss"], task(batch)["loss"])
    with pytest.raises(RuntimeError, match="region"):
        fresh.load_aux_state_dict({"words.head.phrase.weight": torch.zeros(1)})


def test_config_presets_and_bad_wiring():
    model = tiny_model()
    assert build_task(model, "bce").criterion.weights == {"bce": 1.0, "focal": 0.0, "dice": 0.0}
    assert set(LOSS_PRESETS) == {"raf", "bce", "bce_dice"}
    with pytest.raises(KeyError, match="nope"):
        build_task(model, "nope")
    with pytest.raises(ConfigError, match=r"loss\.words"):
        build_task(model, LossConfig(words=-1.0))
    with pytest.raises(ConfigError, match="not all zero"):
        build_task(model, LossConfig(bce=0.0, focal=0.0, dice=0.0))
    with pytest.raises(ValueError, match="differ"):
        SegmentationTask(model, RAFLoss(), {"words": WordObjective.for_model(model)}, {})
