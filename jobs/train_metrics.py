"""The training loop's logging window: loss terms summed on the device between log steps (a ``float()`` per
step would wait for the GPU every step), the time spent waiting for data, and the throughput."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import torch

from jobs import distributed
from jobs.tracking import RunLogger
from segvlm.config import flatten, to_yaml


class StepWindow:
    """Accumulates the named terms of the steps since the last log step."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, Any] = defaultdict(float)
        self.steps = 0
        self.data_wait_s = 0.0
        self.start = time.perf_counter()

    def add(self, terms: dict[str, torch.Tensor], scale: float = 1.0) -> None:
        for name, value in terms.items():
            self.sums[name] += value.detach().float() * scale

    def summarize(self, device: torch.device, *, batch_size: int) -> dict[str, float]:
        """Means over the window and over ranks (one all-reduce) plus ``samples_per_s`` and ``data_wait_share``;
        every rank must call it at the same step. Resets the window."""
        elapsed = time.perf_counter() - self.start
        local = {k: float(v) / max(self.steps, 1) for k, v in self.sums.items()}
        local["data_wait_share"] = self.data_wait_s / max(elapsed, 1e-9)
        means = distributed.all_reduce_mean(local, device)
        means["samples_per_s"] = self.steps * batch_size / max(elapsed, 1e-9)
        means["window_s"], means["window_steps"] = elapsed, self.steps
        self.reset()
        return means

    def log(
        self, logger: Any, progress: Any, device: torch.device, *, step: int, lr: float, batch_size: int
    ) -> dict[str, float]:
        """:meth:`summarize`, then log ``train/<term>``, ``train/lr`` and ``perf/*`` at ``step`` and show
        them on the progress line (rank 0); returns the window's ``window_s`` and ``window_steps``."""
        means = self.summarize(device, batch_size=batch_size)
        perf = {k: means.pop(k) for k in ("samples_per_s", "data_wait_share", "window_s", "window_steps")}
        logger.log_metrics(
            {f"train/{k}": v for k, v in means.items()}
            | {"train/lr": lr}
            | {f"perf/{k}": perf[k] for k in ("samples_per_s", "data_wait_share")},
            step=step,
        )
        if progress is not None:
            progress.update(
                perf["window_steps"],
                loss=" ".join(f"{k} {v:.4f}" for k, v in means.items() if k != "grad_norm"),
                samples_per_s=f"{perf['samples_per_s']:.1f}",
                data_wait=f"{perf['data_wait_share']:.0%}",
            )
        return perf


def log_run_params(
    logger: Any, cfg: Any, model: torch.nn.Module, loop_config: dict[str, Any], *, world_size: int
) -> None:
    """A new run's parameters: the flattened experiment config, the code and data versions, the world size
    and the parameter counts; the config itself as ``config.yaml``."""
    counts = model.num_parameters()
    logger.log_params(
        flatten(cfg)
        | {"git_commit": loop_config.get("git_commit", "unknown")}
        | {f"data.{k}": loop_config.get(k, "") for k in ("train_manifest_hash", "val_manifest_hash")}
        | {"world_size": world_size, "params.total": counts["total"], "params.trainable": counts["trainable"]}
    )
    logger.log_text(to_yaml(cfg), "config.yaml")


def open_worker_logger(cfg: Any, loop_config: dict[str, Any], *, run_id: str | None, rank: int) -> Any:
    """Rank 0's run logger (direct, or through the driver's relay when ``run_training`` started one); a
    disabled logger on every other rank."""
    return RunLogger(
        enabled=rank == 0,
        tracking_uri=loop_config["tracking_uri"],
        experiment=cfg.tracking.experiment,
        workdir=cfg.workdir,
        run_id=run_id,
        run_name=cfg.train.run_name or None,
        system_metrics=cfg.tracking.system_metrics,
        parent_run_id=loop_config.get("parent_run_id"),
        relay=loop_config.get("tracking_relay"),
    )
