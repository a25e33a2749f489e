"""``segvlm demo`` end to end at tiny scale: scenes → prepare → 2-worker training → eval → summary.json.

Slow (about a minute on 2 cores): a real local Ray instance, real Ray Train and a real sqlite MLflow store.
"""

from __future__ import annotations

import json
import math

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_demo_writes_a_strict_json_summary_with_metrics_floor_and_a_registered_model(tmp_path, capsys):
    from mlflow import MlflowClient

    from jobs.demo import main

    workdir = tmp_path / "demo"
    overrides = ["train.steps=6", "train.batch_size=8", "train.log_every=3", "train.val_max_tasks=16"]
    assert main(["--workdir", str(workdir), "--images", "30", "--train-seconds", "60", *overrides]) == 0
    captured = capsys.readouterr()
    printed = captured.out

    # the console shows our progress, workers' included, and none of Ray's internals
    console = captured.out + captured.err
    assert "[segvlm] step 6 validation" in console and "train: 6/6 steps" in console
    # the local instance's dashboard (and State API, which Train's placement-group cleaner polls) is up on
    # loopback only
    import ray
    from ray._private.worker import get_dashboard_url
    from ray.util.state import list_actors

    assert ray.is_initialized()
    assert get_dashboard_url().rsplit(":", 1)[0] == "127.0.0.1"
    assert any(actor.class_name == "TrainController" for actor in list_actors(limit=1000))
    for internal in (
        "State API",  # Train's placement-group cleaner without the dashboard
        "Requesting resources",
        "Reporting training result",
        "Checkpoint successfully created",
        "Setting up process group",
        "streaming_executor",
        "logging_progress",
        "system_metrics_monitor",
    ):
        assert internal not in console, internal

    # strict JSON: an empty subset's metric is null, never NaN
    summary = json.loads(
        (workdir / "summary.json").read_text(),
        parse_constant=lambda name: pytest.fail(f"summary.json holds {name}"),
    )
    test = summary["test"]
    assert 0.0 <= test["official/mean_iou"] <= 1.0 and math.isfinite(test["clipseg/ap"])
    assert summary["train"]["steps"] == 6
    assert set(summary["timings_s"]) == {"scenes", "prepare", "train", "eval", "total"}
    assert not (workdir / "summary.json.tmp").exists()
    # the train shards hold the synthetic prompts the demo asks for: negatives, and no templates
    kinds = json.loads((workdir / "shards" / "train" / "summary.json").read_text())["tasks_per_kind"]
    assert kinds.get("negative", 0) > 0 and "template" not in kinds, kinds

    # the floor printed next to the metrics is the scenes' own: marking every shape of the test images
    test_tasks = json.loads((workdir / "scenes" / "refer_test.json").read_text())
    assert test["official/count"] == len(test_tasks)
    floor = summary["test_every_shape_mean_iou"]
    assert 0.0 < floor < 1.0
    assert f"scores mean IoU {floor:.2f} on this test split" in printed

    # the run the summary names holds the training metrics and the registered best model
    client = MlflowClient(summary["tracking_uri"])
    run = client.get_run(summary["train"]["run_id"])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [3, 6]
    versions = client.search_model_versions("name='segvlm-demo'")
    assert [v.run_id for v in versions] == [run.info.run_id]
    assert f"MLflow run: {run.info.run_id}" in printed
