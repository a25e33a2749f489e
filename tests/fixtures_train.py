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


def kill_at_step(step: int, rank: int, marker: Path) -> Callable[[int, int], None]:
    """A ``run_training(step_hook=...)`` that kills worker ``rank`` hard (``os._exit``, as a lost node or an
    OOM would: no cleanup, no exception) when it reaches ``step``, once: ``marker`` records that it fired.
    A closure, so Ray ships it to the workers by value (the tests folder is not importable there)."""
    marker = Path(marker)

    def hook(current_step: int, current_rank: int) -> None:
        import os
        import time

        if current_step == step and current_rank == rank and not marker.exists():
            marker.write_text(f"killed rank {rank} at step {step}\n")
            # Ray Train's controller collects reports when it polls the workers (every 2 s); a checkpoint
            # reported less than one poll before a crash can be lost: wait two polls, for a deterministic test
            time.sleep(5)
            os._exit(1)

    return hook
