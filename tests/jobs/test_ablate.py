"""The ablation ladder: its rungs (pure), and the seeded Ray Tune sweep end to end at tiny scale on a local
Ray instance: 2 rungs × 2 seeds, each trial a real Ray Train run nested under one MLflow parent run, one trial
killed mid-run and retried by Tune (slow: about 3 minutes on 2 cores). The statistics themselves are checked
against hand-computed values in ``test_ablation_report.py``.
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
    from jobs.ablate import ladder, rung_overrides, select_rungs
    from jobs.config import ExperimentConfig
    from segvlm.config import load_config

    relations = ["model.decoder.relational_context=true", "model.decoder.relative_position=true"]
    base = load_config(ExperimentConfig, CONFIG, ["loss.focal=2.0", *relations])
    rungs = ladder(base.loss, base.model.decoder)
    assert [r.name for r in rungs] == [
        "bce",
        "+raf",
        "+deformable",
        "+residual",
        "+se",
        "+xattn+projector",
        "+text_kernel",
        "+words",  # the demo config trains with the word losses
        "+relations",  # ... and here turns the decoder's relation parts on
        "+convex",  # ... and upsamples by convex weights
    ]
    no_words = ladder(dataclasses.replace(base.loss, words=0.0), base.model.decoder)
    assert [r.name for r in no_words] == [r.name for r in rungs if r.name != "+words"]
    assert [r.name for r in ladder(base.loss)] == [r.name for r in rungs[:-2]]
    bilinear = dataclasses.replace(base.model.decoder, upsample="bilinear")
    assert [r.name for r in ladder(base.loss, bilinear)] == [r.name for r in rungs[:-1]]
    assert select_rungs(rungs, "raf,bce") == [0, 1]
    assert select_rungs(rungs, None) == list(range(10))
    with pytest.raises(SystemExit):
        select_rungs(rungs, "bce,+nope")

    def cfg(i):
        return load_config(
            ExperimentConfig, CONFIG, ["loss.focal=2.0", *relations, *rung_overrides(rungs, i)]
        )

    bce, raf, full = cfg(0), cfg(1), cfg(len(rungs) - 1)
    assert (bce.loss.bce, bce.loss.focal, bce.loss.dice) == (1.0, 0.0, 0.0)
    assert not any(
        getattr(bce.model.decoder, s)
        for s in (
            "deformable",
            "residual",
            "se",
            "cross_attention",
            "relational_context",
            "relative_position",
        )
    )
    # the first rungs validate: the convex upsampling needs the text kernel, which they lack
    assert bce.model.decoder.head == "convt" and bce.model.decoder.upsample == "bilinear"
    assert bce.loss.words == 0.0
    assert (raf.loss.bce, raf.loss.focal, raf.loss.dice) == (1.0, 2.0, 1.0)
    assert raf.model.decoder == bce.model.decoder
    assert all(
        getattr(full.model.decoder, s)
        for s in ("deformable", "residual", "se", "cross_attention", "projector")
    )
    assert full.model.decoder.head == "text_kernel" and full.loss.words > 0
    index = {r.name: i for i, r in enumerate(rungs)}
    # +words changes the loss only: the word head belongs to the training task, not the model
    assert cfg(index["+words"] - 1).model == cfg(index["+words"]).model
    assert cfg(index["+relations"]).model.decoder.upsample == "bilinear"
    assert full.model.decoder.relational_context and full.model.decoder.relative_position
    assert full.model.decoder.upsample == "convex"
    assert full.model.decoder == base.model.decoder and full.loss == base.loss

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


@pytest.fixture(scope="module")
def data(ray_local, tmp_path_factory):
    from tests.fixtures_train import make_scene_data

    root = tmp_path_factory.mktemp("ablate-data")
    return root, make_scene_data(root)


def tiny_overrides(root: Path, clip: Path, workdir: Path, *extra: str) -> list[str]:
    """tests/fixtures_train.tiny_experiment's settings as overrides, with one Train worker per trial."""
    return [
        f"model.backbone.pretrained={clip}",
        "model.backbone.image_size=64",
        f"data.train_shards={root / 'train'}",
        f"data.val_shards={root / 'val'}",
        f"workdir={workdir}",
        "train.batch_size=8",
        "train.num_workers=1",
        "train.log_every=2",
        "train.overlays=0",
        "optim.warmup_steps=1",
        "tracking.system_metrics=false",
        *extra,
    ]


def test_seeded_sweep_under_one_parent_run_with_a_killed_trial_retried(data, tmp_path):
    import statistics

    from mlflow import MlflowClient

    from jobs.ablate import run_ablation
    from tests.fixtures_train import kill_at_step

    root, clip = data
    marker = tmp_path / "killed"
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        print(line)

    out = run_ablation(
        CONFIG,
        tiny_overrides(
            root,
            clip,
            tmp_path / "work",
            "train.ckpt_every=2",
            "train.val_every=2",
            # the Train run gives up at once: Tune's retry of the whole trial is what must recover it
            "train.max_failures=0",
            "tracking.experiment=ablation-test",
        ),
        rungs="bce,+deformable",
        seeds=[0, 1],
        steps=4,
        max_concurrent=2,
        max_failures=1,
        name="abl",
        eval_batch_size=8,
        # killed hard at step 3, after the step-2 checkpoint: the retry resumes from it
        step_hooks={"+deformable/seed1": kill_at_step(3, 0, marker)},
        log=log,
    )
    assert marker.exists(), "the fault was not injected"
    trials = out["trials"]
    assert [(t["rung"], t["seed"], t["status"]) for t in trials] == [
        ("bce", 0, "ok"),
        ("bce", 1, "ok"),
        ("+deformable", 0, "ok"),
        ("+deformable", 1, "ok"),
    ]
    assert [t["failures"] for t in trials] == [0, 0, 0, 1]
    (retry_line,) = [line for line in lines if "+deformable/seed1 failed" in line]
    assert "retrying (1/1)" in retry_line and "unknown error" not in retry_line, retry_line
    assert all(t["steps"] == 4 for t in trials)

    client = MlflowClient(out["tracking_uri"])
    experiment = client.get_experiment_by_name("ablation-test")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.run_id == out["parent_run_id"]
    assert parents[0].info.status == "FINISHED"
    # one child run per trial: the retried trial resumed its own MLflow run rather than opening a second
    assert len(children) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {out["parent_run_id"]}
    assert {r.info.run_id for r in children} == {t["run_id"] for t in trials}
    assert all(r.info.status == "FINISHED" for r in children)
    by_run = {r.info.run_id: r for r in children}
    for t in trials:
        tags, params = by_run[t["run_id"]].data.tags, by_run[t["run_id"]].data.params
        assert (tags["ablation.rung"], tags["ablation.seed"]) == (t["rung"], str(t["seed"]))
        assert params["train.seed"] == str(t["seed"])
        assert params["model.decoder.deformable"] == str(t["rung"] == "+deformable")
    killed = next(t for t in trials if t["failures"])
    steps = sorted(m.step for m in client.get_metric_history(killed["run_id"], "train/loss"))
    assert steps == [2, 4], f"both attempts log into the same run, once each step: {steps}"

    # the table's statistics are those of the child runs' evaluation metrics (logged at step 0)
    def evaluated(run_id: str) -> float:
        (value,) = [
            m.value for m in client.get_metric_history(run_id, "val/official/mean_iou") if m.step == 0
        ]
        return value

    rows = out["rows"]
    assert [r["rung"] for r in rows] == ["bce", "+deformable"]
    stats = []
    for row in rows:
        values = [evaluated(t["run_id"]) for t in trials if t["rung"] == row["rung"]]
        stat = row["metrics"]["official/mean_iou"]
        assert stat["n"] == 2 and row["seeds"] == [0, 1] and row["failed"] == []
        assert stat["mean"] == pytest.approx(statistics.mean(values), abs=1e-12)
        assert stat["sd"] == pytest.approx(statistics.stdev(values), abs=1e-12)
        stats.append((statistics.mean(values), statistics.stdev(values)))
        assert (
            f"| `{row['rung']}` | 2/2 | {100 * stat['mean']:.2f} ± {100 * stat['sd']:.2f} |" in out["table"]
        )
        # the best validation scores differ from trial to trial even where a tiny model's evaluations agree
        best_val = [
            max(m.value for m in client.get_metric_history(t["run_id"], "val/official/mean_iou") if m.step)
            for t in trials
            if t["rung"] == row["rung"]
        ]
        assert row["metrics"]["best_val_mean_iou"]["mean"] == pytest.approx(statistics.mean(best_val))
        assert row["metrics"]["best_val_mean_iou"]["sd"] == pytest.approx(statistics.stdev(best_val))
    (m1, s1), (m2, s2) = stats
    assert rows[1]["delta"]["diff"] == pytest.approx(m2 - m1, abs=1e-12)
    assert rows[1]["delta"]["se"] == pytest.approx(math.sqrt(s1**2 / 2 + s2**2 / 2), abs=1e-12)

    # the alias `best` ends on the trial with the best validation score, whichever registered last
    registered = "segvlm-demo-ablation"
    version = client.get_model_version_by_alias(registered, "best")
    assert len(client.search_model_versions(f"name='{registered}'")) == 4
    assert version.run_id == out["best"]["run_id"]
    best = next(t for t in trials if t["run_id"] == version.run_id)
    assert best["best_val_mean_iou"] == max(t["best_val_mean_iou"] for t in trials)
    validated = [
        m.value for m in client.get_metric_history(best["run_id"], "val/official/mean_iou") if m.step
    ]
    assert best["best_val_mean_iou"] == pytest.approx(max(validated))

    out_dir = tmp_path / "work" / "abl"
    summary = json.loads((out_dir / "ablation.json").read_text())
    assert [t["run_id"] for t in summary["trials"]] == [t["run_id"] for t in trials]
    assert (out_dir / "ablation.md").read_text() == out["table"]
    assert (out_dir / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    artifacts = {a.path for a in client.list_artifacts(out["parent_run_id"])}
    assert {"ablation.md", "ablation.json", "ablation.png"} <= artifacts
    parent_means = client.get_metric_history(out["parent_run_id"], "ablation/official_mean_iou")
    assert [m.step for m in sorted(parent_means, key=lambda m: m.step)] == [0, 2]  # the rungs' ladder index
    assert [m.value for m in sorted(parent_means, key=lambda m: m.step)] == pytest.approx([m1, m2])
    print(out["table"])  # shown with -s


def test_a_trial_that_keeps_failing_is_reported_not_dropped(data, tmp_path):
    from mlflow import MlflowClient

    from jobs.ablate import run_ablation

    root, clip = data
    missing = tmp_path / "no-such-shards"
    out = run_ablation(
        CONFIG,
        tiny_overrides(root, clip, tmp_path / "work", f"data.train_shards={missing}"),
        rungs="bce",
        seeds=[5],
        steps=2,
        max_failures=1,
        name="broken",
        log=lambda line: None,
    )
    (failed,) = out["trials"]
    assert failed["status"] == "failed" and failed["seed"] == 5
    assert failed["failures"] == 2, "tried once and retried once"
    assert "no-such-shards" in failed["error"], failed["error"]
    (row,) = out["rows"]
    assert row["seeds"] == [] and row["failed"] == [{"seed": 5, "error": failed["error"]}]
    assert out["best"] is None
    assert "| `bce/seed5` | failed |" in out["table"]
    summary = json.loads((tmp_path / "work" / "broken" / "ablation.json").read_text())
    assert summary["trials"][0]["error"] == failed["error"]
    parent = MlflowClient(out["tracking_uri"]).get_run(out["parent_run_id"])
    assert parent.data.tags["ablation.failed_trials"] == "1"
