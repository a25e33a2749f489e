"""The tracking relay: rank-0 logging from a Ray worker through an actor on the driver's node.

Real Ray (a local 2-CPU instance) and a real MLflow sqlite store; the logging runs in Ray tasks, as rank 0
does in a Train worker, and the run is read back with ``MlflowClient`` on the driver.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from jobs.config import ExperimentConfig, TrackingConfig
from jobs.tracking_relay import needs_relay
from segvlm.config import ConfigError, load_config

EXPERIMENT = "relay-test"


@pytest.mark.parametrize(
    ("mode", "uri", "expected"),
    [
        ("auto", "http://127.0.0.1:5000", True),
        ("auto", "https://localhost/mlflow", True),
        ("auto", "http://[::1]:5000", True),
        ("auto", "http://127.0.1.1:5000", True),
        ("auto", "http://10.0.0.12:5000", False),
        ("auto", "http://mlflow.internal:5000", False),
        ("auto", "sqlite:////tmp/mlflow.db", False),
        ("on", "sqlite:////tmp/mlflow.db", True),
        (True, "http://10.0.0.12:5000", True),
        ("off", "http://127.0.0.1:5000", False),
        (False, "http://127.0.0.1:5000", False),
    ],
)
def test_when_the_relay_is_used(mode: str | bool, uri: str, expected: bool) -> None:
    assert needs_relay(mode, uri) is expected


def test_relay_setting_is_validated() -> None:
    # an unquoted on/off is a YAML boolean: accepted with the same meaning
    assert load_config(ExperimentConfig, None, ["tracking.relay=on"]).tracking.relay is True
    assert load_config(ExperimentConfig, None, ["tracking.relay=auto"]).tracking.relay == "auto"
    with pytest.raises(ConfigError, match=r"tracking\.relay"):
        TrackingConfig(relay="sometimes").validate()


# ------------------------------------------------------------------------------------------ with Ray
@pytest.fixture(scope="module")
def ray_local():
    import sys

    import ray
    from ray import cloudpickle

    from jobs.common import init_ray

    init_ray(None, num_cpus=2)
    # the tasks below are functions of this test module, which the workers cannot import: ship them by value
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


@pytest.fixture
def relay(ray_local):
    from jobs.tracking_relay import start_relay, stop_relay

    handle = start_relay()
    yield handle
    stop_relay(handle)


def _settings(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "enabled": True,
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "experiment": EXPERIMENT,
        "workdir": str(tmp_path),
        **extra,
    }


def _log_everything(relay: Any, settings: dict[str, Any], artifact_dir: str) -> dict[str, Any]:
    """Runs in a Ray task (a worker process, as rank 0 would): every kind of call, through the relay."""
    import os
    import time

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from jobs.tracking import RunLogger

    figure, axis = plt.subplots(figsize=(2, 2))
    axis.plot([0, 1], [1, 0])
    plt.close(figure)
    with RunLogger(**settings, run_name="relayed", system_metrics=True, relay=relay) as logger:
        logger.log_params({"lr": 0.001, "layers": [3, 7, 9]})
        logger.log_metrics({"train/loss": 0.5, "val/pr@0.5": 0.25}, step=3)
        logger.log_metrics({"train/loss": 0.25}, step=4)
        logger.log_image(Image.new("RGB", (8, 6), "red"), key="val_overlay_0", step=3)
        logger.log_figure(figure, "val/pr_curve_step0000003.png")
        logger.log_text("hello from the worker\n", "notes/hello.txt")
        logger.log_dict({"iou": 0.5}, "val/report.json")
        logger.log_artifacts(artifact_dir, "eval_test")
        logger.set_tags({"worker_pid": os.getpid()})
        time.sleep(2.5)  # a few system-metric samples (interval 1 s, from the task's environment)
    return {"run_id": logger.run_id, "pid": os.getpid()}


@pytest.mark.slow
def test_a_ray_task_logs_everything_through_the_relay(relay, tmp_path: Path) -> None:
    import os

    import ray
    from mlflow import MlflowClient

    from jobs.tracking_relay import RELAY_TAG

    artifact_dir = tmp_path / "worker-out"
    (artifact_dir / "pngs").mkdir(parents=True)
    (artifact_dir / "report.json").write_text('{"official/mean_iou": 0.5}')
    (artifact_dir / "pngs" / "task-1.png").write_bytes(b"\x89PNG fake")

    task = ray.remote(_log_everything).options(
        num_cpus=0, runtime_env={"env_vars": {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}}
    )
    out = ray.get(task.remote(relay, _settings(tmp_path), str(artifact_dir)), timeout=120)
    assert out["pid"] != os.getpid()

    driver_node = ray.get_runtime_context().get_node_id()
    assert ray.get(relay.get_node_id.remote()) == driver_node

    client = MlflowClient(_settings(tmp_path)["tracking_uri"])
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "relayed"
    assert client.get_experiment(run.info.experiment_id).name == EXPERIMENT
    assert run.data.params == {"lr": "0.001", "layers": "[3, 7, 9]"}
    assert run.data.tags[RELAY_TAG] == driver_node
    assert run.data.tags["worker_pid"] == str(out["pid"])
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(3, 0.5), (4, 0.25)]
    assert run.data.metrics["val/pr_at_0.5"] == 0.25
    # sampled in the task's process (the worker's node), logged by the relay
    assert "system/cpu_utilization_percentage" in run.data.metrics

    root = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "download")))
    assert (root / "notes" / "hello.txt").read_text() == "hello from the worker\n"
    assert json.loads((root / "val" / "report.json").read_text()) == {"iou": 0.5}
    assert (root / "val" / "pr_curve_step0000003.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert (root / "eval_test" / "report.json").read_text() == '{"official/mean_iou": 0.5}'
    assert (root / "eval_test" / "pngs" / "task-1.png").read_bytes() == b"\x89PNG fake"
    assert any(p.suffix == ".png" for p in (root / "images").iterdir()), "log_image wrote no image"


def _start_and_die(relay: Any, settings: dict[str, Any]) -> str:
    """A rank 0 that opens the run, logs, and never ends it (its process goes away)."""
    from jobs.tracking import RunLogger

    logger = RunLogger(**settings, relay=relay)
    run_id = logger.start()
    logger.log_metrics({"train/loss": 1.0}, step=1)
    return run_id


@pytest.mark.slow
def test_a_resumed_attempt_reopens_the_run_and_stop_relay_fails_an_open_run(relay, tmp_path: Path) -> None:
    import ray
    from mlflow import MlflowClient

    from jobs.tracking_relay import stop_relay

    task = ray.remote(_start_and_die).options(num_cpus=0)
    run_id = ray.get(task.remote(relay, _settings(tmp_path)), timeout=120)
    # a second attempt re-opens the same run (the run id comes from its checkpoint) and appends to it
    assert ray.get(task.remote(relay, _settings(tmp_path, run_id=run_id)), timeout=120) == run_id
    client = MlflowClient(_settings(tmp_path)["tracking_uri"])
    assert client.get_run(run_id).info.status == "RUNNING"
    assert len(client.get_metric_history(run_id, "train/loss")) == 2

    stop_relay(relay)  # what run_training does after a failed fit; the fixture's second stop is harmless
    assert client.get_run(run_id).info.status == "FAILED"
