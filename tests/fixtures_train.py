"""The tiny training experiment and its data, shared by the Ray Train tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from jobs.config import ExperimentConfig
from segvlm.config import load_config

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


def make_scene_data(root: Path, outs: Callable[[str], list[str]] | None = None) -> Path:
    """60 scenes at ``IMAGE_SIZE`` under ``root/scenes``, prepared into train/val/test shard folders (default
    ``root/{split}``; ``outs(split)`` names every output, e.g. an S3 URI beside a local reference) on the
    current Ray instance; returns the tiny CLIP saved at ``root/clip``. 7 images a shard: the 48 training
    images give shards of 7 × 6 + 6, so ranks read uneven shards."""
    from pipeline.prepare import PrepareConfig, run_prepare
    from pipeline.scenes import SCENE_WORDS, write_scenes
    from segvlm.backbone import make_tiny_clip
    from segvlm.tokenizer import DEFAULT_TINY_WORDS

    write_scenes(root / "scenes", n_images=60, seed=3, size=IMAGE_SIZE)
    for split in ("train", "val", "test"):
        for out in outs(split) if outs else [str(root / split)]:
            config = PrepareConfig(
                source="scenes",
                root=str(root / "scenes"),
                split=split,
                out=out,
                shard_samples=7,
                synthetic_prompts=split == "train",
                seed=0,
                progress_every=60.0,
            )
            run_prepare(config, log=lambda _: None)
    return make_tiny_clip(root / "clip", words=sorted(set(SCENE_WORDS) | set(DEFAULT_TINY_WORDS)))
