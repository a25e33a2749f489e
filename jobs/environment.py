"""The process environment our jobs set, defined once: quiet defaults for every job, and which of the user's
variables travel to Ray workers and submitted jobs. (Only the demo takes the hub away: ``jobs.demo``.)

Every default is ``setdefault``: the user's own value wins. Call :func:`quiet_environment` before importing
ray or mlflow (they read some of these at import).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

# Defaults every job sets (the user's own value wins): no telemetry, Ray Train V2, one line per print
QUIET_ENV = {
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
# The user's choices, never set by a job: whether the hub may be reached (a cluster node downloading
# openai/clip-vit-base-patch16 needs it online, an air-gapped one needs HF_HUB_OFFLINE=1), which hub, which
# MLflow store. Passed on to Ray workers and submitted jobs only when the caller set them.
USER_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "MLFLOW_TRACKING_URI")


def quiet_environment() -> None:
    """Set the quiet defaults every job runs with (no telemetry); the hub is left to the user."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def job_env_vars(environ: Mapping[str, str]) -> dict[str, str]:
    """The ``runtime_env`` variables of a Ray job started from ``environ``: our quiet defaults (``environ``'s
    value where it has one) plus every variable of ``USER_ENV`` that ``environ`` sets, and nothing else."""
    quiet = {key: environ.get(key, value) for key, value in QUIET_ENV.items()}
    return quiet | {key: environ[key] for key in USER_ENV if key in environ}
