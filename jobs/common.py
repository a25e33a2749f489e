"""Small helpers shared by the entry points: Ray start-up, git commit, argument parsing of overrides."""

from __future__ import annotations

import json
import math
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Defaults every job sets (the user's own value wins): no telemetry, Ray Train V2, one line per print
_QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_TRAIN_V2_ENABLED": "1",
    # Train V2 redirects print() to a logger and also tees it when MLflow wraps stdout: every line twice
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # our own progress lines report prepare/train/eval; Ray Data's INFO lines (execution plans, progress
    # logs when stdout is no terminal) and MLflow's (system-metrics monitor start/stop) would bury them
    "RAY_DATA_LOG_LEVEL": "WARNING",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}
# Ray Train's own INFO lines (resources requested, worker group started, every report and checkpoint) go to
# its log files only; warnings and errors still reach the console (RunConfig(logging_config=...)).
TRAIN_LOG_LEVEL = "WARNING"
# The user's choices, never set by a job: whether the hub may be reached (a cluster node downloading
# openai/clip-vit-base-patch16 needs it online, an air-gapped one needs HF_HUB_OFFLINE=1), which hub, which
# MLflow store. Passed on to Ray workers and submitted jobs only when the caller set them.
USER_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "MLFLOW_TRACKING_URI")


def to_json(data: Any, **kwargs: Any) -> str:
    """``json.dumps`` that writes NaN / ±inf (a metric of an empty subset) as ``null``: strict JSON, which
    ``json.dumps`` alone does not produce, so every JSON reader can load our reports."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(data), allow_nan=False, **kwargs)


def quiet_environment() -> None:
    """Environment every job sets before importing ray/mlflow (no telemetry); the hub is left to the user."""
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)


def job_env_vars(environ: Mapping[str, str]) -> dict[str, str]:
    """The ``runtime_env`` variables of a Ray job started from ``environ``: our quiet defaults (``environ``'s
    value where it has one) plus every variable of ``USER_ENV`` that ``environ`` sets, and nothing else."""
    quiet = {key: environ.get(key, value) for key, value in _QUIET_ENV.items()}
    return quiet | {key: environ[key] for key in USER_ENV if key in environ}


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to ``address`` (``auto``, ``ray://…``) or start a local instance.

    A local instance runs its dashboard bound to 127.0.0.1 (a free port from 8265 up): Ray Train's
    placement-group cleaner polls the State API, which the dashboard serves; without it every training run
    prints a stream of ``PlacementGroupCleaner`` errors.
    """
    quiet_environment()
    import ray

    if ray.is_initialized():
        return
    from pipeline.storage import forwarded_env

    # + the object-store endpoint and region (not credentials), so workers on every node reach the same S3
    runtime_env = {"env_vars": job_env_vars(os.environ) | forwarded_env()}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            runtime_env=runtime_env,
            log_to_driver=True,
            configure_logging=True,
            logging_level="warning",
        )


def quiet_train_worker() -> None:
    """Run at the top of a Ray Train worker loop: Ray 2.60's per-report INFO line ("Reporting training result
    …", twice per checkpoint) comes from a logger named after its file, which ``LoggingConfig`` (it filters
    ``ray.train.*``) does not reach."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def git_commit(path: str | Path = ".") -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
