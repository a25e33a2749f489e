"""The optimiser and its schedule: AdamW with per-group decay and text-tower learning-rate scale, linear
warm-up and cosine decay."""

from __future__ import annotations

import dataclasses
import math

import torch

from segvlm.config import ConfigError

__all__ = ["OptimConfig", "learning_rate", "make_optimizer"]


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW + linear warm-up + cosine decay (CLIPSeg: lr 1e-3 → 1e-4, batch 64, 20k iterations)."""

    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 500
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    # the text tower's lr as a share of lr: a from-scratch text tower at lr 1e-3 collapses (every phrase
    # maps to nearly the same embedding within ~100 steps), while the decoder wants the full rate
    text_lr_scale: float = 1.0

    def validate(self) -> None:
        if not 0 < self.text_lr_scale <= 1:
            raise ConfigError(f"optim.text_lr_scale must lie in (0, 1], got {self.text_lr_scale}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(
                f"optim: need 0 <= min_lr <= lr and lr > 0, got lr={self.lr} min_lr={self.min_lr}"
            )
        if len(self.betas) != 2 or not all(0 <= beta < 1 for beta in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.warmup_steps < 0 or self.grad_clip < 0:
            raise ConfigError("optim.warmup_steps and optim.grad_clip must be >= 0")


def learning_rate(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Linear warm-up to ``lr`` then cosine decay to ``min_lr`` at ``total_steps`` (step is 0-based)."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    span = max(1, total_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * progress))


TEXT_TOWER = ("backbone.clip.text_model.", "backbone.clip.text_projection.")


def make_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW with no weight decay on biases, norms, gates and embeddings (1-d parameters); the text tower's
    groups carry ``lr_scale = optim.text_lr_scale`` (the loop sets each group's lr to ``lr · lr_scale``)."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            # the training task (segvlm.task) holds the model as .model
            text = optim.text_lr_scale != 1.0 and name.removeprefix("model.").startswith(TEXT_TOWER)
            groups.setdefault((param.ndim > 1, text), []).append(param)
    return torch.optim.AdamW(
        [
            {
                "params": params,
                "weight_decay": optim.weight_decay if decay else 0.0,
                "lr_scale": optim.text_lr_scale if text else 1.0,
            }
            for (decay, text), params in sorted(groups.items(), reverse=True)
        ],
        lr=optim.lr,
        betas=optim.betas,
    )


def fit_steps_to_budget(
    *,
    budget_s: float,
    max_steps: int,
    step: int,
    elapsed_s: float,
    window_s: float,
    window_steps: int,
) -> int:
    """Total steps that fit ``budget_s`` at the pace of the last logging window (``window_steps`` steps in
    ``window_s``), so the cosine schedule ends when the budget does; never fewer than ``step`` nor more than
    ``max_steps``. Ranks must agree on the answer (the loop all-reduces the minimum): they stop at the same
    step or ``ray.train.report``, a barrier, hangs."""
    seconds_per_step = window_s / max(window_steps, 1)
    fits = step + int(max(0.0, budget_s - elapsed_s) / max(seconds_per_step, 1e-9))
    return max(step, min(max_steps, fits))
