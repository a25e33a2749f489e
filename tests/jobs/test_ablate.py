"""The ablation ladder: its rungs (pure), and two of them end to end at tiny scale on a local Ray instance.

Slow (about 1.5 minutes on 2 cores): every rung is a real Ray Train run nested under one MLflow parent run.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def test_ladder_pure_helpers():
    from jobs.ablate import ladder, markdown_table, rung_overrides, select_rungs
    from jobs.config import ExperimentConfig
    from segvlm.config import load_config

    base = load_config(ExperimentConfig, CONFIG, ["loss.focal=2.0"])
    rungs = ladder(base.loss)
    assert [r.name for r in rungs] == [
        "bce",
        "+raf",
        "+deformable",
        "+residual",
        "+se",
        "+xattn+projector",
        "+text_kernel",
        "+words",  # the demo config trains with the word losses
    ]
    assert [r.name for r in ladder(dataclasses.replace(base.loss, words=0.0))] == [r.name for r in rungs[:-1]]
    assert select_rungs(rungs, "raf,bce") == [0, 1]
    assert select_rungs(rungs, None) == list(range(8))
    with pytest.raises(SystemExit):
        select_rungs(rungs, "bce,+nope")

    def cfg(i):
        return load_config(ExperimentConfig, CONFIG, ["loss.focal=2.0", *rung_overrides(rungs, i)])

    bce, raf, full = cfg(0), cfg(1), cfg(len(rungs) - 1)
    assert (bce.loss.bce, bce.loss.focal, bce.loss.dice) == (1.0, 0.0, 0.0)
    assert not any(getattr(bce.model.decoder, s) for s in ("deformable", "residual", "se", "cross_attention"))
    assert bce.model.decoder.head == "convt" and bce.loss.words == 0.0
    assert (raf.loss.bce, raf.loss.focal, raf.loss.dice) == (1.0, 2.0, 1.0)
    assert raf.model.decoder == bce.model.decoder
    assert all(
        getattr(full.model.decoder, s)
        for s in ("deformable", "residual", "se", "cross_attention", "projector")
    )
    assert full.model.decoder.head == "text_kernel" and full.loss.words > 0
    # +words changes the loss only: the word head belongs to the training task, not the model
    assert cfg(len(rungs) - 2).model == full.model
    assert full.model.decoder == base.model.decoder and full.loss == base.loss

    table = markdown_table(
        [{"rung": "bce", "official/mean_iou": 0.5, "params_total": 10, "steps": 4, "samples_per_s": 3.0}]
    )
    assert "| `bce` | 50.00 |" in table

    # each rung adds exactly what its switch adds: the loss rung nothing, every module rung something
    from segvlm.registry import build_model
    from segvlm.task import build_task

    def trainable_count(i: int) -> int:
        task = build_task(build_model(cfg(i).model), cfg(i).loss)
        return sum(p.numel() for p in task.parameters() if p.requires_grad)

    trainable = [trainable_count(i) for i in range(len(rungs))]
    assert trainable[0] == trainable[1], "the RAF loss adds no parameters"
    for i in range(2, len(rungs)):
        assert trainable[i] > trainable[i - 1], f"{rungs[i].name} should add trainable parameters"


def test_rungs_run_under_one_parent_run(ray_local, tmp_path, capsys):
    from mlflow import MlflowClient

    from jobs.ablate import main

    rc = main(
        [
            "--config",
            str(CONFIG),
            "--demo-data",
            str(tmp_path / "data"),
            "--demo-images",
            "40",
            "--demo-image-size",
            "64",
            "--steps",
            "4",
            "--rungs",
            "bce,+deformable",
            "--workdir",
            str(tmp_path / "work"),
            "--name",
            "abl",
            "--eval-batch-size",
            "8",
            "model.backbone.image_size=64",
            "train.num_workers=1",
            "train.batch_size=8",
            "train.log_every=2",
            "train.ckpt_every=4",
            "train.val_every=4",
            "train.overlays=0",
            "optim.warmup_steps=1",
            "tracking.system_metrics=false",
            "tracking.experiment=ablation-test",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    # the demo's data, built as the demo builds it: its synthetic prompts hold negatives and no templates
    kinds = json.loads((tmp_path / "data" / "shards" / "train" / "summary.json").read_text())[
        "tasks_per_kind"
    ]
    assert kinds.get("negative", 0) > 0 and "template" not in kinds, kinds
    out_dir = tmp_path / "work" / "abl"
    summary = json.loads((out_dir / "ablation.json").read_text())
    rows = summary["rows"]
    assert [r["rung"] for r in rows] == ["bce", "+deformable"]
    table = (out_dir / "ablation.md").read_text()
    assert table in printed
    assert sum(1 for line in table.splitlines() if line.startswith("| `")) == 2
    print(table)  # shown with -s

    client = MlflowClient(summary["tracking_uri"])
    experiment = client.get_experiment_by_name("ablation-test")
    runs = client.search_runs([experiment.experiment_id])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parent) == 1 and len(children) == 2
    parent = parent[0]
    assert parent.info.run_id == summary["parent_run_id"]
    assert parent.info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert {r.info.run_id for r in children} == {r["run_id"] for r in rows}
    assert {r.data.tags["ablation.rung"] for r in children} == {r["rung"] for r in rows}
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"ablation.md", "ablation.json", "ablation.png"} <= artifacts
    assert (out_dir / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    for row in rows:
        assert row["steps"] == 4
        for key in (
            "official/mean_iou",
            "official/cum_iou",
            "official/pr@0.5",
            "official/pr@0.9",
            "boundary/f",
            "clipseg/iou_fg",
            "clipseg/ap",
            "samples_per_s",
        ):
            assert math.isfinite(row[key]), (row["rung"], key)
        assert 0.0 <= row["official/mean_iou"] <= 1.0
        assert row["params_total"] >= row["params_trainable"] > 0
        # the child run got the evaluation too
        assert client.get_run(row["run_id"]).data.metrics.get("val/official/mean_iou") is not None

    assert rows[1]["params_trainable"] > rows[0]["params_trainable"]
    by_run = {r.info.run_id: r for r in children}
    assert by_run[rows[0]["run_id"]].data.params["loss.focal"] == "0.0"
    assert by_run[rows[0]["run_id"]].data.params["model.decoder.deformable"] == "False"
    # +deformable is cumulative: it trains with the RAF loss of the rung before it
    assert by_run[rows[1]["run_id"]].data.params["model.decoder.deformable"] == "True"
    assert by_run[rows[1]["run_id"]].data.params["loss.focal"] != "0.0"
