"""The training loop's pieces that need no Ray: the schedule and the optimizer's parameter groups."""

from __future__ import annotations

import math

import pytest

from jobs.optim import TEXT_TOWER, OptimConfig, learning_rate, make_optimizer
from segvlm.config import ConfigError
from segvlm.registry import build_model, model_config


def test_learning_rate_warms_up_then_follows_the_cosine() -> None:
    optim = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10)
    assert learning_rate(0, optim, 110) == pytest.approx(1e-4)  # (0 + 1) / 10 of lr
    assert learning_rate(9, optim, 110) == pytest.approx(1e-3)
    assert learning_rate(10, optim, 110) == pytest.approx(1e-3)  # cosine at progress 0
    assert learning_rate(60, optim, 110) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))  # halfway
    assert learning_rate(110, optim, 110) == pytest.approx(1e-5)
    assert learning_rate(35, optim, 110) == pytest.approx(1e-5 + 0.5 * 0.99e-3 * (1 + math.cos(math.pi / 4)))


@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_optimizer_groups_split_decay_and_the_text_tower(scale: float) -> None:
    model = build_model(model_config("segvlm_tiny"))
    optimizer = make_optimizer(model, OptimConfig(weight_decay=0.05, text_lr_scale=scale))
    names = {id(p): n for n, p in model.named_parameters()}
    seen = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            seen.append(name)
            assert group["weight_decay"] == (0.05 if p.ndim > 1 else 0.0), name
            is_text = name.startswith(TEXT_TOWER)
            assert group["lr_scale"] == (scale if is_text else 1.0), name
    assert sorted(seen) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert any(n.startswith("backbone.clip.text_model.") for n in seen)
    assert len(optimizer.param_groups) == (2 if scale == 1.0 else 4)
    with pytest.raises(ConfigError, match="text_lr_scale"):
        OptimConfig(text_lr_scale=0.0).validate()


@pytest.mark.parametrize("betas", [(0.9, 1.0), (-0.1, 0.95), (0.9,)])
def test_bad_betas_are_refused(betas: tuple[float, ...]) -> None:
    with pytest.raises(ConfigError, match=r"optim\.betas"):
        OptimConfig(betas=betas).validate()


def test_betas_reach_every_group() -> None:
    optimizer = make_optimizer(build_model(model_config("segvlm_tiny")), OptimConfig(betas=(0.9, 0.95)))
    assert {group["betas"] for group in optimizer.param_groups} == {(0.9, 0.95)}


def test_optimizer_of_a_training_task_scales_the_text_tower_as_the_model_alone() -> None:
    from segvlm.task import LossConfig, build_task

    task = build_task(build_model(model_config("segvlm_tiny")), LossConfig(words=0.3))
    optimizer = make_optimizer(task, OptimConfig(text_lr_scale=0.3))
    scale = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    text = [p for n, p in task.model.named_parameters() if p.requires_grad and n.startswith(TEXT_TOWER)]
    assert text and all(scale[id(p)] == 0.3 for p in text)
    # the word head and every other parameter train at the full rate
    others = [p for n, p in task.named_parameters() if p.requires_grad and all(p is not q for q in text)]
    assert any(n.startswith("objectives.") for n, _ in task.named_parameters())
    assert all(scale[id(p)] == 1.0 for p in others)
