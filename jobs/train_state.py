"""What a training checkpoint holds and how a worker saves and restores it.

A Ray Train checkpoint of segvlm is a folder with our model checkpoint (``model/``, what eval, predict and
the registry read) and ``train_state.pt``: the optimiser, the training-only heads of the task, the step, the
MLflow run id and the time spent, so a run resumed by ``FailureConfig`` or by rerunning the driver continues
the same step count, schedule and MLflow run.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from segvlm.checkpoint import load_weights, save_checkpoint
from segvlm.config import ModelConfig
from segvlm.inference import DEFAULT_THRESHOLD
from segvlm.task import SegmentationTask

TRAIN_STATE = "train_state.pt"
MODEL_DIR = "model"
SCORE_KEY = "val_mean_iou"  # CheckpointConfig.checkpoint_score_attribute


def initial_state(total_steps: int, run_id: str | None) -> dict[str, Any]:
    return {
        "step": 0,
        "samples": 0,
        "total_steps": total_steps,  # cut to what fits train.time_budget_s as the pace is measured
        "seconds": 0.0,  # training time of earlier attempts, so a resumed run keeps its time budget
        "run_id": run_id,
        "best": -1.0,
        "threshold": DEFAULT_THRESHOLD,  # the decision threshold checkpoints predict with (last validation's)
    }


@contextmanager
def checkpoint_directory(checkpoint: Any) -> Iterator[Path]:
    """A Ray Train checkpoint as a local folder of this process: a download into a private temporary
    folder when it lives in remote storage (S3), the folder itself when it is local.

    Not ``Checkpoint.as_directory``: for a remote checkpoint it shares one download folder between the
    processes of a node, and a worker that arrives after the first download finished downloads again into
    it while the first reads (measured: ``PytorchStreamReader failed reading file`` on resume from S3).
    """
    import pyarrow.fs as pafs

    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        yield Path(checkpoint.path)
        return
    with tempfile.TemporaryDirectory(prefix="segvlm-resume-") as tmp:
        yield Path(checkpoint.to_directory(tmp))


def save_train_checkpoint(
    directory: Path,
    task: SegmentationTask,
    model_cfg: ModelConfig,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
) -> None:
    save_checkpoint(
        task.model,
        model_cfg,
        directory / MODEL_DIR,
        extra={"step": state["step"], "run_id": state["run_id"], "threshold": state["threshold"]},
    )
    torch.save(
        {"optimizer": optimizer.state_dict(), "objectives": task.aux_state_dict(), **state},
        directory / TRAIN_STATE,
    )


def restore_train_checkpoint(
    checkpoint: Any, task: SegmentationTask, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load a Ray Train checkpoint into ``task``, ``optimizer`` and ``state`` (in place)."""
    with checkpoint_directory(checkpoint) as ckpt_dir:
        load_weights(task.model, ckpt_dir / MODEL_DIR)
        saved = torch.load(ckpt_dir / TRAIN_STATE, map_location="cpu", weights_only=True)
    if "objectives" in saved:  # the training-only heads (train states of older runs have none)
        task.load_aux_state_dict(saved.pop("objectives"))
    optimizer.load_state_dict(saved.pop("optimizer"))
    state.update({k: saved[k] for k in state if k in saved})


def read_train_state(checkpoint_dir: Path) -> dict[str, Any]:
    """The ``train_state.pt`` of a checkpoint folder (the driver reads the run id and step from it)."""
    return torch.load(checkpoint_dir / TRAIN_STATE, map_location="cpu", weights_only=True)


def report_checkpoint(
    task: SegmentationTask,
    model_cfg: ModelConfig,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    *,
    score: float,
    rank: int,
) -> None:
    """Every rank calls it at the same step (``ray.train.report`` is a barrier); rank 0 saves the checkpoint,
    which Ray Train copies to the run's storage and ranks by ``score``."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="segvlm-ckpt-") as tmp:
        checkpoint = None
        if rank == 0:
            save_train_checkpoint(Path(tmp), task, model_cfg, optimizer, state)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        metrics = {"step": state["step"], SCORE_KEY: score}
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"step-{state['step']:07d}")
