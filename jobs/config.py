"""The training driver's config: one experiment = model, loss, data, optimiser, training run and tracking.

Each section lives with the code that reads it (``ModelConfig`` in the model library, ``LossConfig`` with the
training task, ``DataConfig`` with the loaders, ``OptimConfig`` with the optimiser); this module holds the
sections only the driver reads (the Ray Train run, MLflow tracking) and the ``ExperimentConfig`` that gathers them.
The YAML presets in ``configs/`` are files of this shape.
"""

from __future__ import annotations

import dataclasses

from jobs.optim import OptimConfig
from pipeline.loader import DataConfig
from segvlm.config import ConfigError, ModelConfig
from segvlm.task import LossConfig

__all__ = ["ExperimentConfig", "TrackingConfig", "TrainConfig"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training run: steps, batch, distribution, validation and checkpoint cadence."""

    steps: int = 20000
    batch_size: int = 64  # global batch per optimizer step, split over workers and accumulation
    grad_accum: int = 1
    precision: str = "auto"  # "auto": bf16 autocast on GPU, float32 on CPU | "bf16" | "fp32"
    seed: int = 0
    num_workers: int = 1  # Ray Train workers
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    torch_threads: int = 0  # per worker; 0 = cpus_per_worker
    val_every: int = 1000
    val_max_tasks: int = 0  # 0 = the whole validation split
    # store the decision threshold with the best validation mean IoU (ThresholdSweep) in each checkpoint, for
    # eval / predict / the logged model to predict with; false: 0.5
    calibrate_threshold: bool = True
    ckpt_every: int = 1000
    keep_checkpoints: int = 2  # best k by validation mean IoU
    max_failures: int = 2
    log_every: int = 20
    overlays: int = 8  # prediction overlays logged per validation
    time_budget_s: float = 0.0  # > 0: stop (and run the final validation) after this many seconds
    run_name: str = ""  # Ray Train run name; rerunning with the same name resumes
    # locations: a folder or a URI (s3://...)
    storage_path: str = ""  # Ray Train storage (checkpoints); "" = <workdir>/ray_results
    best_path: str = ""  # where the best checkpoint is copied; "" = <workdir>/<run_name>/best

    def validate(self) -> None:
        if self.steps <= 0 or self.batch_size <= 0 or self.grad_accum <= 0 or self.num_workers <= 0:
            raise ConfigError("train.steps, batch_size, grad_accum and num_workers must be positive")
        if self.batch_size % (self.num_workers * self.grad_accum):
            raise ConfigError(
                f"train.batch_size {self.batch_size} must be divisible by num_workers × grad_accum "
                f"= {self.num_workers * self.grad_accum}"
            )
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"train.precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.val_every <= 0 or self.ckpt_every <= 0 or self.log_every <= 0:
            raise ConfigError("train.val_every, ckpt_every and log_every must be positive")

    @property
    def micro_batch(self) -> int:
        """Samples per worker per forward pass."""
        return self.batch_size // (self.num_workers * self.grad_accum)


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
    """MLflow: rank 0 logs, other ranks do nothing."""

    uri: str = ""  # "" = sqlite:///<workdir>/mlflow.db with artifacts in <workdir>/mlartifacts
    experiment: str = "segvlm"
    registered_model: str = "segvlm"  # the best checkpoint is registered under this name with alias "best"
    system_metrics: bool = True
    # rank 0 logs through a Ray actor on the driver's node (jobs/tracking_relay.py): "auto" = when `uri` is an
    # http(s) server on a loopback address, which a worker on another node cannot reach | "on" | "off".
    # An unquoted YAML on/off reads as true/false: accepted as the same.
    relay: str | bool = "auto"

    def validate(self) -> None:
        if self.relay not in ("auto", "on", "off", True, False):
            raise ConfigError(f"tracking.relay must be auto, on or off, got {self.relay!r}")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything one training run needs; the YAML presets in configs/ are files of this shape."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    workdir: str = "runs"  # local folder for the MLflow store, Ray results and reports
