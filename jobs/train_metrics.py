"""The training loop's logging window: loss terms summed on the device between log steps (a ``float()`` per
step would wait for the GPU every step), the time spent waiting for data, the throughput and, with a data
mixture, the share of tasks each source supplied; and the run's parameters (config, code, data versions)."""

from __future__ import annotations

import hashlib
import json
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
        self.source_tasks: torch.Tensor | None = None  # tasks per mixture source (count_sources)
        self.start = time.perf_counter()

    def add(self, terms: dict[str, torch.Tensor], scale: float = 1.0) -> None:
        for name, value in terms.items():
            self.sums[name] += value.detach().float() * scale

    def count_sources(self, source: torch.Tensor, num_sources: int) -> None:
        """Tally a batch's tasks by mixture source (``collate_train``'s ``source``: B int64, on the CPU).
        Every rank must count the same ``num_sources``, or the all-reduce in ``summarize`` mismatches."""
        counts = torch.bincount(source, minlength=num_sources)
        self.source_tasks = counts if self.source_tasks is None else self.source_tasks + counts

    def summarize(self, device: torch.device, *, batch_size: int) -> dict[str, float]:
        """Means over the window and over ranks (one all-reduce) plus ``samples_per_s``, ``data_wait_share``
        and, after ``count_sources``, ``source_share/<d>`` (source d's share of the tasks; ranks take equal
        batches, so the mean over ranks is the global share); every rank must call it at the same step.
        Resets the window."""
        elapsed = time.perf_counter() - self.start
        local = {k: float(v) / max(self.steps, 1) for k, v in self.sums.items()}
        local["data_wait_share"] = self.data_wait_s / max(elapsed, 1e-9)
        if self.source_tasks is not None:
            total = max(int(self.source_tasks.sum()), 1)
            local |= {f"source_share/{d}": int(n) / total for d, n in enumerate(self.source_tasks)}
        means = distributed.all_reduce_mean(local, device)
        means["samples_per_s"] = self.steps * batch_size / max(elapsed, 1e-9)
        means["window_s"], means["window_steps"] = elapsed, self.steps
        self.reset()
        return means

    def log(
        self, logger: Any, progress: Any, device: torch.device, *, step: int, lr: float, batch_size: int
    ) -> dict[str, float]:
        """:meth:`summarize`, then log ``train/<term>``, ``train/lr``, ``perf/*`` and
        ``data/source_share/<d>`` at ``step``, and show all but the shares on the progress line (rank 0);
        returns the window's ``window_s`` and ``window_steps``."""
        means = self.summarize(device, batch_size=batch_size)
        perf = {k: means.pop(k) for k in ("samples_per_s", "data_wait_share", "window_s", "window_steps")}
        shares = {k: means.pop(k) for k in [k for k in means if k.startswith("source_share/")]}
        logger.log_metrics(
            {f"train/{k}": v for k, v in means.items()}
            | {"train/lr": lr}
            | {f"perf/{k}": perf[k] for k in ("samples_per_s", "data_wait_share")}
            | {f"data/{k}": v for k, v in shares.items()},
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


def describe_mixture(data: Any) -> list[dict[str, Any]]:
    """Each training source of ``data`` (a ``DataConfig``; ``train_sources``) as logged: ``path``, ``split``,
    normalised ``weight``, ``manifest_hash`` (``pipeline.manifest.manifest_hash``) and ``images`` (its
    split's images by ``sizes.json``; ``None`` when it has none). Reads each source's manifest: run it on
    the driver, once."""
    from pipeline.loader import list_shards
    from pipeline.manifest import manifest_hash

    out = []
    for source in data.train_sources():
        _, sizes = list_shards(source.path, source.split)
        out.append(
            {
                "path": source.path,
                "split": source.split,
                "weight": source.weight,
                "manifest_hash": manifest_hash(source.path),
                "images": sum(sizes.values()) if sizes else None,
            }
        )
    return out


def mixture_hash(sources: list[dict[str, Any]]) -> str:
    """The training data's identity (``data.train_manifest_hash``): a single source's manifest hash, as
    before mixtures; for a mixture the sha256 of its sources' manifest hashes, splits and weights, in
    order (not their paths: equal data at another location is the same mixture)."""
    if len(sources) == 1:
        return sources[0]["manifest_hash"]
    parts = [[s["manifest_hash"], s["split"], s["weight"]] for s in sources]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def log_run_params(
    logger: Any, cfg: Any, model: torch.nn.Module, loop_config: dict[str, Any], *, world_size: int
) -> None:
    """A new run's parameters: the flattened experiment config, the code and data versions (with each
    training source as ``data.train_sources.<d>.<path|split|weight|manifest_hash|images>``, from
    ``describe_mixture``), the world size and the parameter counts; the config itself as ``config.yaml``."""
    counts = model.num_parameters()
    sources = {
        f"data.train_sources.{d}.{k}": v
        for d, source in enumerate(loop_config.get("train_sources", []))
        for k, v in source.items()
    }
    logger.log_params(
        flatten(cfg)
        | {"git_commit": loop_config.get("git_commit", "unknown")}
        | {f"data.{k}": loop_config.get(k, "") for k in ("train_manifest_hash", "val_manifest_hash")}
        | sources
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
