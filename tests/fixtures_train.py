"""The tiny training experiment shared by the Ray Train tests (test_train, test_multinode)."""

from __future__ import annotations

from pathlib import Path

from segvlm.config import ExperimentConfig, load_config

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
IMAGE_SIZE = 64


def tiny_experiment(root: Path, clip: Path, workdir: Path, *overrides: str) -> ExperimentConfig:
    """The demo config on ``root``'s train/val shards and the tiny CLIP at ``clip``: 64 px, batch 8, 2 workers,
    a fixed step count (no time budget); ``overrides`` come last and win."""
    return load_config(
        ExperimentConfig,
        DEMO_CONFIG,
        [
            f"model.backbone.pretrained={clip}",
            f"model.backbone.image_size={IMAGE_SIZE}",
            f"data.train_shards={root / 'train'}",
            f"data.val_shards={root / 'val'}",
            f"workdir={workdir}",
            "train.time_budget_s=0",
            "train.batch_size=8",
            "train.num_workers=2",
            "optim.warmup_steps=2",
            "tracking.system_metrics=false",
            *overrides,
        ],
    )
