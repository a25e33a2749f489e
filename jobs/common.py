"""Small helpers shared by the entry points: Ray start-up, git commit, argument parsing of overrides."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

from jobs.environment import job_env_vars, quiet_environment

# Ray Train's own INFO lines (resources requested, worker group started, every report and checkpoint) go to
# its log files only; warnings and errors still reach the console (RunConfig(logging_config=...)).
TRAIN_LOG_LEVEL = "WARNING"


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
