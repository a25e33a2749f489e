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
        logger.log_table({"dataset": ["a", "b"], "giou": [0.5, None]}, "eval_table.json")
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
    table = json.loads((root / "eval_table.json").read_text())
    assert table["columns"] == ["dataset", "giou"] and table["data"][0] == ["a", 0.5]


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


def _sample_for(relay: Any, settings: dict[str, Any], seconds: float) -> str:
    """A rank 0 with system metrics on, for ``seconds``."""
    import time

    from jobs.tracking import RunLogger

    with RunLogger(**settings, system_metrics=True, relay=relay) as logger:
        time.sleep(seconds)
    return logger.run_id


@pytest.mark.slow
def test_a_resumed_relayed_run_continues_its_system_metric_steps(relay, tmp_path: Path) -> None:
    import ray
    from mlflow import MlflowClient

    task = ray.remote(_sample_for).options(
        num_cpus=0, runtime_env={"env_vars": {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.3"}}
    )
    run_id = ray.get(task.remote(relay, _settings(tmp_path), 1.5), timeout=120)
    client = MlflowClient(_settings(tmp_path)["tracking_uri"])
    first = sorted(m.step for m in client.get_metric_history(run_id, "system/cpu_utilization_percentage"))
    assert len(first) >= 2 and first == list(range(len(first)))
    assert ray.get(task.remote(relay, _settings(tmp_path, run_id=run_id), 1.5), timeout=120) == run_id
    steps = sorted(m.step for m in client.get_metric_history(run_id, "system/cpu_utilization_percentage"))
    assert len(steps) > len(first) and steps == list(range(len(steps))), steps  # appended, no step twice
    history = client.get_metric_history(run_id, "system/disk_usage_percentage")
    assert sorted(m.step for m in history) == steps  # every name at every step


# ---------------------------------------------------------------------------- one protocol, three loggers
def _protocol_members() -> list[str]:
    from jobs.tracking import TrackingLogger

    return sorted(
        name
        for name, value in vars(TrackingLogger).items()
        if callable(value) and (not name.startswith("_") or name in ("__enter__", "__exit__"))
    )


def test_every_logger_has_every_protocol_method_with_the_same_signature() -> None:
    import inspect

    from jobs.tracking import DisabledLogger, MlflowLogger, RelayedLogger, TrackingLogger

    members = _protocol_members()
    assert {"start", "end", "log_metrics", "log_artifacts", "log_checkpoint_model", "__enter__"} <= set(
        members
    )
    for cls in (MlflowLogger, RelayedLogger, DisabledLogger):
        for name in members:
            expected = inspect.signature(getattr(TrackingLogger, name)).parameters
            actual = inspect.signature(getattr(cls, name)).parameters
            assert [(p.name, p.kind, p.default) for p in actual.values()] == [
                (p.name, p.kind, p.default) for p in expected.values()
            ], f"{cls.__name__}.{name}"


def test_the_factory_picks_the_logger(tmp_path: Path) -> None:
    from jobs.tracking import DisabledLogger, MlflowLogger, RelayedLogger, RunLogger, TrackingLogger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    disabled = RunLogger(enabled=False, tracking_uri=uri, run_id="abc", relay=object())
    relayed = RunLogger(enabled=True, tracking_uri=uri, run_id="abc", relay=object())
    direct = RunLogger(enabled=True, tracking_uri=uri, run_id="abc")
    assert [type(x) for x in (disabled, relayed, direct)] == [DisabledLogger, RelayedLogger, MlflowLogger]
    assert all(isinstance(x, TrackingLogger) for x in (disabled, relayed, direct))
    assert not isinstance(object(), TrackingLogger)
    assert (disabled.run_id, relayed.run_id, direct.run_id) == ("abc", "abc", "abc")
    assert (disabled.enabled, relayed.enabled, direct.enabled) == (False, True, True)
    assert not (tmp_path / "mlflow.db").exists()  # nothing is opened before start()


def test_the_disabled_logger_imports_no_mlflow_and_writes_nothing(tmp_path: Path) -> None:
    """Every protocol method of a rank != 0 logger, in a fresh interpreter: no MLflow or Ray import, no
    store, no folder, in the workdir or the current directory."""
    import subprocess
    import sys

    (tmp_path / "cwd").mkdir()
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"w")
    script = f"""
import sys
from jobs.tracking import RunLogger
with RunLogger(enabled=False, workdir={str(tmp_path / "work")!r}, run_id="r1", system_metrics=True) as logger:
    assert logger.start() == "r1"
    logger.log_params({{"lr": 1}})
    logger.log_metrics({{"train/loss": 0.5}}, step=1)
    logger.set_tags({{"a": "b"}})
    logger.log_image(None, key="k", step=1)
    logger.log_figure(None, "f.png")
    logger.log_text("t", "t.txt")
    logger.log_dict({{}}, "d.json")
    logger.log_table({{"a": [1]}}, "t.json")
    logger.log_artifacts({str(tmp_path / "ckpt")!r}, "x")
    assert logger.log_checkpoint_model({str(tmp_path / "ckpt")!r}, "name") is None
    logger.end("FAILED")
loaded = sorted(m for m in ("mlflow", "ray", "psutil", "sqlalchemy") if m in sys.modules)
assert not loaded, loaded
print("ok")
"""
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in __import__("os").environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(root)
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path / "cwd",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "cwd"]
    assert not any((tmp_path / "cwd").iterdir())


def test_the_direct_logger_logs_a_run_and_finds_the_system_step(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow import MlflowClient

    from jobs.tracking import MlflowLogger, RunLogger

    figure, axis = plt.subplots(figsize=(2, 2))
    axis.plot([0, 1], [1, 0])
    plt.close(figure)
    settings = _settings(tmp_path)
    with RunLogger(**settings, run_name="direct") as logger:
        assert isinstance(logger, MlflowLogger)
        logger.log_params({"lr": 0.001, "layers": [3, 7, 9]})
        logger.log_metrics({"train/loss": 0.5, "val/pr@0.5": 0.25, "skipped": None}, step=3)
        for step in (0, 1, 2):
            logger.log_metrics({"system/cpu_utilization_percentage": 10.0 * step}, step=step)
        logger.log_figure(figure, "val/pr.png")
        logger.log_dict({"iou": 0.5}, "val/report.json")
        logger.log_table({"dataset": ["a", "b"], "giou": [0.5, 0.25]}, "val/table.json")
        assert logger.system_metrics_step() == 3
        assert logger.system_metrics_step("system/node-1/") == 0
    # a resumed run: params it has are kept, new ones added
    with RunLogger(**settings, run_id=logger.run_id) as again:
        again.log_params({"lr": 0.5, "batch": 8})
    client = MlflowClient(settings["tracking_uri"])
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "direct"
    assert run.data.params == {"lr": "0.001", "layers": "[3, 7, 9]", "batch": "8"}
    assert run.data.metrics == {
        "train/loss": 0.5,
        "val/pr_at_0.5": 0.25,
        "system/cpu_utilization_percentage": 20.0,
    }
    root = Path(client.download_artifacts(run.info.run_id, "val", str(tmp_path / "download")))
    assert (root / "pr.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert json.loads((root / "report.json").read_text()) == {"iou": 0.5}
    table = json.loads((root / "table.json").read_text())
    assert table == {"columns": ["dataset", "giou"], "data": [["a", 0.5], ["b", 0.25]]}


def test_the_system_metrics_sampler_logs_mlflow_names_at_consecutive_steps() -> None:
    import time

    from jobs.tracking_relay import SystemMetricsSampler

    logged: list[tuple[dict[str, float], int]] = []
    sampler = SystemMetricsSampler(
        lambda m, s: logged.append((m, s)), prefix="system/n1/", first_step=5, interval_s=0.05,
        samples_before_logging=2,
    )  # fmt: skip
    sampler.start()
    deadline = time.monotonic() + 10
    while len(logged) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    sampler.stop()
    count = len(logged)
    time.sleep(0.3)
    assert len(logged) == count >= 3, "the sampler kept logging after stop()"
    assert [s for _, s in logged] == list(range(5, 5 + count))
    names = {
        "cpu_utilization_percentage", "system_memory_usage_megabytes", "system_memory_usage_percentage",
        "disk_usage_percentage", "disk_usage_megabytes", "disk_available_megabytes",
        "network_receive_megabytes", "network_transmit_megabytes",
    }  # fmt: skip
    for metrics, _ in logged:
        assert {k.removeprefix("system/n1/") for k in metrics if "gpu_" not in k} == names
        for key in ("cpu_utilization_percentage", "system_memory_usage_percentage", "disk_usage_percentage"):
            assert 0.0 <= metrics[f"system/n1/{key}"] <= 100.0
        assert metrics["system/n1/disk_available_megabytes"] > 0


def test_the_sampler_stops_at_the_first_error_it_cannot_log() -> None:
    import time

    from jobs.tracking_relay import SystemMetricsSampler

    calls = []

    def log(metrics: dict[str, float], step: int) -> None:
        calls.append(step)
        raise ConnectionError("tracking server gone")

    sampler = SystemMetricsSampler(log, interval_s=0.02)
    sampler.start()
    time.sleep(0.5)
    assert calls == [0] and not sampler._thread.is_alive()
    sampler.stop()


# ------------------------------------------------------------------------------------------ structure
TRACKING_MODULES = ("jobs.tracking", "jobs.tracking_mlflow", "jobs.tracking_relay")


def _jobs_imports(module: str) -> set[str]:
    """Every ``jobs.*`` module ``module`` imports, at any level (top, function, TYPE_CHECKING)."""
    import ast

    path = Path(__file__).resolve().parents[2] / (module.replace(".", "/") + ".py")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("jobs.")}
        elif isinstance(node, ast.ImportFrom) and node.module == "jobs":
            found |= {f"jobs.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jobs."):
            found.add(node.module)
    return found


def test_tracking_modules_import_one_way_without_a_cycle() -> None:
    graph = {m: _jobs_imports(m) for m in TRACKING_MODULES}
    assert graph["jobs.tracking_mlflow"] & set(TRACKING_MODULES) == set()
    assert graph["jobs.tracking_relay"] & set(TRACKING_MODULES) == {"jobs.tracking_mlflow"}
    # and nothing they reach in jobs/ leads back to a tracking module
    seen, todo = set(), [m for deps in graph.values() for m in deps]
    while todo:
        module = todo.pop()
        if (
            module in seen
            or not (Path(__file__).resolve().parents[2] / (module.replace(".", "/") + ".py")).exists()
        ):
            continue
        seen.add(module)
        deps = _jobs_imports(module)
        if module not in TRACKING_MODULES:
            assert not deps & set(TRACKING_MODULES), f"{module} imports {deps & set(TRACKING_MODULES)}"
        todo.extend(deps)


def test_tracking_modules_use_no_private_mlflow_api() -> None:
    """No ``_shutdown_event`` / ``_metric_objs``-style attribute of anything but our own objects, and no
    import of an MLflow module or name that is not public."""
    import ast

    for module in TRACKING_MODULES:
        path = Path(__file__).resolve().parents[2] / (module.replace(".", "/") + ".py")
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                assert isinstance(node.value, ast.Name) and node.value.id == "self", (module, node.attr)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mlflow"):
                assert not any(p.startswith("_") for p in node.module.split(".")), (module, node.module)
                assert not any(a.name.startswith("_") for a in node.names), (module, node.module)
                assert node.module in ("mlflow",), (module, node.module)
