"""Beyond PhraseCut, end to end on a local Ray instance and a real MLflow store: RefCOCO and gRefCOCO folders
in the refer toolkit's layout are sharded, a tiny SegVLM trains on a weighted mixture of both (targets as
COCO RLEs, a no-target expression among them), and one command scores the checkpoint on RefCOCO's val and
gRefCOCO's testA, each by its own protocol, into one table and one MLflow run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.fixtures_refer import make_refer_fixture

pytestmark = pytest.mark.slow

PREPARED = [("refcoco", "train"), ("refcoco", "val"), ("grefcoco", "train"), ("grefcoco", "testA")]


def test_a_refcoco_grefcoco_mixture_trains_and_is_scored_by_each_protocol(ray_local, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from jobs.eval import run_cross_eval
    from jobs.train import run_training
    from pipeline.prepare import PrepareConfig, run_prepare
    from segvlm.backbone import make_tiny_clip
    from segvlm.tokenizer import DEFAULT_TINY_WORDS
    from tests.fixtures_train import tiny_experiment

    fx = make_refer_fixture(tmp_path / "data")
    shards = tmp_path / "shards"
    for dataset, split in PREPARED:
        config = PrepareConfig(
            dataset, fx["roots"][dataset], split, str(shards / dataset / split), progress_every=60.0
        )
        run_prepare(config, log=lambda _: None)
    good = {(dataset, split): fx["expect"][(dataset, "unc")]["good"][split] for dataset, split in PREPARED}
    words = {
        w
        for tasks in good.values()
        for (_, _, phrase) in tasks.values()
        for w in re.findall(r"[a-z]+", phrase.lower())
    }
    clip = make_tiny_clip(tmp_path / "clip", words=sorted(words | set(DEFAULT_TINY_WORDS)))

    mixture = (
        f"[{{path: {shards / 'refcoco' / 'train'}, weight: 0.75}}, "
        f"{{path: {shards / 'grefcoco' / 'train'}, weight: 0.25}}]"
    )
    cfg = tiny_experiment(
        shards,
        clip,
        tmp_path / "work",
        f"data.train_shards={mixture}",
        f"data.val_shards={shards / 'refcoco' / 'val'}",
        "train.steps=4",
        "train.log_every=1",
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = run_training(cfg, tracking_uri=uri)
    assert out["steps"] == 4
    client = MlflowClient(uri)
    params = client.get_run(out["run_id"]).data.params
    assert [params[f"data.train_sources.{d}.path"] for d in (0, 1)] == [
        str(shards / "refcoco" / "train"),
        str(shards / "grefcoco" / "train"),
    ]
    assert [float(params[f"data.train_sources.{d}.weight"]) for d in (0, 1)] == [0.75, 0.25]
    # validation on RefCOCO ran with RLE targets: its tasks were scored
    assert client.get_metric_history(out["run_id"], "val/refcoco/count")[-1].value == len(
        good[("refcoco", "val")]
    )

    table = run_cross_eval(
        out["best_checkpoint"],
        {
            "refcoco-val": str(shards / "refcoco" / "val"),
            "grefcoco-testA": str(shards / "grefcoco" / "testA"),
        },
        out=str(tmp_path / "cross"),
        num_workers=2,
        batch_size=4,
        tracking_uri=uri,
        experiment="cross",
    )
    rows = {row["dataset"]: row for row in table["rows"]}
    assert rows["refcoco-val"]["protocol"] == "refcoco"
    assert rows["refcoco-val"]["refcoco/count"] == len(good[("refcoco", "val")])
    assert rows["grefcoco-testA"]["protocol"] == "grefcoco"
    testa = json.loads((tmp_path / "cross" / "grefcoco-testA" / "report.json").read_text())
    assert (
        testa["grefcoco/count"] == testa["grefcoco/no_target_count"] == len(good[("grefcoco", "testA")]) == 1
    )
    # one no-target expression: gIoU is 1 exactly when the mask is empty, which is also N-acc
    assert testa["grefcoco/giou"] == testa["grefcoco/n_acc"] in (0.0, 1.0)
    assert testa["refcoco/count"] == 0 and testa["refcoco/no_target_count"] == 1
    (cross_run,) = client.search_runs([client.get_experiment_by_name("cross").experiment_id])
    metrics = cross_run.data.metrics
    assert metrics["refcoco-val/refcoco/count"] == len(good[("refcoco", "val")])
    assert metrics["grefcoco-testA/grefcoco/no_target_count"] == 1
    assert cross_run.data.params["eval/grefcoco-testA/split"] == "testA"
