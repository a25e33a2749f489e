"""``segvlm demo`` end to end at tiny scale: scenes → prepare → 2-worker training → eval → summary.json.

The end-to-end test is slow (about a minute on 2 cores): a real local Ray instance, real Ray Train and a real
sqlite MLflow store. The summary's per-type and negative blocks are also checked on hand-made reports.
"""

from __future__ import annotations

import json
import math

import pytest


def _report(**metrics: float) -> dict:
    """A report as ``run_eval`` returns it: read back from strict JSON (an undefined metric is null)."""
    from jobs.common import to_json
    from segvlm.metrics import PhraseCutMetrics

    m = PhraseCutMetrics()
    m.update_iu(1, 2, phrase_type="name", num_instances=1, area_fraction=0.1)  # IoU 0.5
    m.update_iu(3, 4, phrase_type="relation", num_instances=1, area_fraction=0.1)  # IoU 0.75
    for predicted_area in metrics.get("negative_predictions", ()):
        m.update_iu(0, predicted_area, phrase_type=None, num_instances=0, area_fraction=0.0, negative=True)
    return json.loads(to_json({"protocol": "phrasecut", **m.compute(), "threshold": 0.3}))


def test_summary_blocks_hold_mean_iou_by_type_and_the_negatives_no_target_accuracy():
    from jobs.demo import format_type_and_negative_lines, type_and_negative_metrics

    # 4 negatives, 3 of them predicted empty
    report = _report(negative_predictions=(0, 0, 5, 0))
    blocks = type_and_negative_metrics(report)
    assert blocks == {
        "by_type": {"name": 0.5, "attribute": None, "relation": 0.75, "verbose": None},
        "negatives": {"count": 4, "no_target_accuracy": 0.75},
    }
    assert blocks["negatives"]["no_target_accuracy"] == report["official/negative/empty_rate"]
    json.dumps(blocks, allow_nan=False)  # strict JSON
    assert format_type_and_negative_lines(blocks) == [
        "mean IoU by phrase type: name 0.50  attribute –  relation 0.75  verbose –",
        "no-target accuracy (negatives predicted empty): 3 of 4 (75%)",
    ]


def test_summary_blocks_without_negatives_are_null_not_nan():
    from jobs.demo import format_type_and_negative_lines, type_and_negative_metrics

    blocks = type_and_negative_metrics(_report())
    assert blocks["negatives"] == {"count": 0, "no_target_accuracy": None}
    assert format_type_and_negative_lines(blocks)[1] == (
        "no-target accuracy (negatives predicted empty): – (no negative prompts in this test split)"
    )
    # a NaN (a report not read back from JSON) is null too
    assert type_and_negative_metrics({"official/negative/empty_rate": math.nan})["negatives"] == {
        "count": 0,
        "no_target_accuracy": None,
    }


@pytest.mark.slow
@pytest.mark.timeout(600)
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
    # the test shards hold the scenes' phrases and negative prompts, the val shards the phrases alone
    kinds = json.loads((workdir / "shards" / "test" / "summary.json").read_text())["tasks_per_kind"]
    assert set(kinds) == {"original", "negative"} and kinds["negative"] > 0, kinds
    val_kinds = json.loads((workdir / "shards" / "val" / "summary.json").read_text())["tasks_per_kind"]
    assert set(val_kinds) == {"original"}, val_kinds

    # the floor printed next to the metrics is the scenes' own: marking every shape of the test images
    test_tasks = json.loads((workdir / "scenes" / "refer_test.json").read_text())
    assert test["official/count"] == len(test_tasks) == kinds["original"]
    floor = summary["test_every_shape_mean_iou"]
    assert 0.0 < floor < 1.0
    assert f"scores mean IoU {floor:.2f} on this test split" in printed

    # the negatives are scored apart: how many were predicted empty (no target), in the summary and printed
    assert test["official/negative/count"] == kinds["negative"]
    negatives = summary["negatives"]
    assert negatives["count"] == kinds["negative"]
    accuracy = negatives["no_target_accuracy"]
    assert 0.0 <= accuracy <= 1.0 and accuracy == test["official/negative/empty_rate"]
    empty = round(accuracy * negatives["count"])
    assert f"no-target accuracy (negatives predicted empty): {empty} of {negatives['count']} (" in printed
    # mean IoU by phrase type: each type's official mean IoU (null for a type these 3 test images lack)
    types = ("name", "attribute", "relation", "verbose")  # printed in this order (summary.json sorts keys)
    assert set(summary["by_type"]) == set(types)
    for phrase_type, value in summary["by_type"].items():
        assert value == test[f"official/{phrase_type}/mean_iou"]
        assert value is None or 0.0 <= value <= 1.0
    values = [summary["by_type"][t] for t in types]
    by_type = "  ".join(f"{t} {'–' if v is None else f'{v:.2f}'}" for t, v in zip(types, values, strict=True))
    assert f"mean IoU by phrase type: {by_type}\n" in printed

    # the run the summary names holds the training metrics and the registered best model
    client = MlflowClient(summary["tracking_uri"])
    run = client.get_run(summary["train"]["run_id"])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [3, 6]
    versions = client.search_model_versions("name='segvlm-demo'")
    assert [v.run_id for v in versions] == [run.info.run_id]
    assert f"MLflow run: {run.info.run_id}" in printed
