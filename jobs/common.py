"""Small helpers shared by the entry points: Ray start-up, git commit, argument parsing of overrides."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

_QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_TRAIN_V2_ENABLED": "1",
    # Train V2 redirects print() to a logger and also tees it when MLflow wraps stdout: every line twice
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}


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
    """Environment every job sets before importing ray/mlflow (offline hub, no telemetry)."""
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to ``address`` (``auto``, ``ray://…``) or start a local instance (dashboard off, 127.0.0.1)."""
    quiet_environment()
    import ray

    if ray.is_initialized():
        return
    from pipeline.storage import forwarded_env

    # + the object-store endpoint and region (not credentials), so workers on every node reach the same S3
    env_vars = {k: os.environ[k] for k in _QUIET_ENV if k in os.environ} | forwarded_env()
    runtime_env = {"env_vars": env_vars}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            runtime_env=runtime_env,
            log_to_driver=True,
            configure_logging=True,
            logging_level="warning",
        )


def git_commit(path: str | Path = ".") -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
