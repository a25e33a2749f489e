"""Distributed training and evaluation on a real local Ray instance with 2 CPU workers (slow: ~2–3 min).

One module-scoped Ray instance and one tiny data set (synthetic scenes → ``prepare`` with uneven shards).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures_train import IMAGE_SIZE, kill_at_step, make_scene_data, tiny_experiment
from tests.servers import mlflow_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def data(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    return root, make_scene_data(root)


def experiment(root: Path, clip: Path, workdir: Path, *overrides: str):
    return tiny_experiment(root, clip, workdir, "train.log_every=2", "train.overlays=2", *overrides)


def mlflow_client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def test_two_workers_train_with_a_worker_killed_and_resume_in_the_same_mlflow_run(data, tmp_path):
    from jobs.train import run_training
    from pipeline.manifest import load_sizes

    root, clip = data
    sizes = sorted(load_sizes(root / "train").values())
    assert sizes[0] != sizes[-1], "the training shards should be uneven for this test"
    marker = tmp_path / "killed"
    # rank 1 dies hard (os._exit) at step 7, after the checkpoint of step 5
    cfg = experiment(
        root,
        clip,
        tmp_path / "work",
        "train.steps=14",
        "train.ckpt_every=5",
        "train.val_every=10",
        "train.max_failures=1",
        "train.run_name=fault",
        "tracking.experiment=fault-test",
    )
    started = time.perf_counter()
    out = run_training(cfg, step_hook=kill_at_step(7, 1, marker))
    assert time.perf_counter() - started < 600
    assert marker.exists(), "the fault was not injected"
    assert out["steps"] == 14

    client = mlflow_client(out["tracking_uri"])
    experiment_id = client.get_experiment_by_name("fault-test").experiment_id
    runs = client.search_runs([experiment_id])
    assert len(runs) == 1, "the resumed attempt must append to the same MLflow run"
    run = runs[0]
    assert run.info.run_id == out["run_id"]
    history = client.get_metric_history(run.info.run_id, "train/loss")
    steps = sorted(m.step for m in history)
    # steps 6 (first attempt) and 6 again (second attempt, resumed from the step-5 checkpoint), up to 14
    assert steps[0] == 2 and steps[-1] == 14
    assert steps.count(6) == 2, f"expected step 6 logged by both attempts, got {steps}"
    first, last = [m.value for m in sorted(history, key=lambda m: m.timestamp)][:: len(history) - 1]
    assert last < first, f"training loss did not fall: {first} -> {last}"
    for name in (
        "train/bce",
        "train/focal",
        "train/dice",
        "train/words_region",  # the demo config's word terms, each logged on its own
        "train/words_phrase",
        "train/lr",
        "perf/samples_per_s",
        "perf/data_wait_share",
    ):
        assert client.get_metric_history(run.info.run_id, name), name
    for name in (
        "val/official/mean_iou",
        "val/official/cum_iou",
        "val/official/pr_at_0.5",
        "val/clipseg/ap",
        "val/boundary/f",
        "val/official/name/mean_iou",
    ):
        assert client.get_metric_history(run.info.run_id, name), name
    params = run.data.params
    assert params["world_size"] == "2"
    assert params["model.decoder.deformable"] == "True"
    assert len(params["data.train_manifest_hash"]) == 64
    assert params["git_commit"]

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts
    val_files = {a.path for a in client.list_artifacts(run.info.run_id, "val")}
    assert any(p.endswith(".png") and "pr_curve" in p for p in val_files)
    images = {a.path for a in client.list_artifacts(run.info.run_id, "images")}
    assert images, "prediction overlays were not logged with log_image"
    version = client.get_model_version_by_alias(cfg.tracking.registered_model, "best")
    assert version.run_id == run.info.run_id

    # the best checkpoint loads and predicts
    from PIL import Image

    from segvlm.checkpoint import read_meta
    from segvlm.inference import Predictor
    from segvlm.metrics import SWEEP_THRESHOLDS

    predictor = Predictor.from_checkpoint(out["best_checkpoint"])
    # it predicts with the threshold its validation chose (logged as val/calibration/threshold at its step)
    best_step = read_meta(out["best_checkpoint"])["extra"]["step"]
    chosen = {
        m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/calibration/threshold")
    }
    assert predictor.threshold == chosen[best_step] and predictor.threshold in SWEEP_THRESHOLDS
    image = Image.new("RGB", (90, 70), "gray")
    probabilities, _ = predictor.predict(image, "the red circle")
    assert probabilities.shape == (70, 90)
    assert np.isfinite(np.asarray(probabilities)).all()


def test_distributed_eval_equals_single_process_and_the_official_pngs(data, tmp_path):
    import torch

    from jobs.eval import run_eval
    from jobs.evaluation import evaluate, score_official_pngs
    from pipeline.loader import make_eval_loader
    from segvlm.checkpoint import load_checkpoint, save_checkpoint
    from segvlm.registry import build_model

    root, clip = data
    cfg = experiment(root, clip, tmp_path).model
    torch.manual_seed(0)
    model = build_model(cfg)
    # a threshold chosen on validation, stored in the checkpoint, is what eval predicts with
    save_checkpoint(model, cfg, tmp_path / "ckpt", extra={"threshold": 0.35})

    report = run_eval(
        str(tmp_path / "ckpt"),
        str(root / "test"),
        out=str(tmp_path / "eval"),
        split="test",
        official_dir=str(tmp_path / "pngs"),
        num_workers=2,
        batch_size=5,
    )
    assert json.loads((tmp_path / "eval" / "report.json").read_text()) == report
    assert report["threshold"] == 0.35
    # the sweep scores the same probabilities: at the threshold used it is the official mean IoU
    assert report["calibration/mean_iou@0.35"] == pytest.approx(report["official/mean_iou"], rel=1e-12)

    model, _, _ = load_checkpoint(tmp_path / "ckpt")
    loader = make_eval_loader(
        root / "test", split="test", batch_size=3, image_size=IMAGE_SIZE, tokenizer=model.backbone.tokenize
    )
    single = evaluate(model, loader, threshold=0.35).metrics.compute()
    for key, value in single.items():
        if isinstance(value, float) and np.isnan(value):
            assert report[key] is None, key  # undefined (an empty subset): null in strict JSON
        else:  # rel 1e-4: batched otherwise, the logits differ in their last bits (see test_s3.py)
            assert report[key] == pytest.approx(value, rel=1e-4, abs=1e-9), key

    from pipeline.manifest import load_manifest

    task_ids = set(load_manifest(root / "test").column("task_id").to_pylist())
    assert {p.stem for p in (tmp_path / "pngs").glob("*.png")} == task_ids
    official = score_official_pngs(tmp_path / "pngs", root / "test", split="test")
    for key in (
        "official/mean_iou",
        "official/cum_iou",
        "official/pr@0.5",
        "official/pr@0.9",
        "official/count",
        "official/name/mean_iou",
        "official/small/count",
    ):
        if report[key] is None:
            assert np.isnan(official[key]), key
        else:
            assert official[key] == pytest.approx(report[key], rel=1e-12), key


def test_a_real_mlflow_server_receives_the_run(data, tmp_path):
    from jobs.train import run_training
    from jobs.train_metrics import mixture_hash
    from pipeline.manifest import load_sizes, manifest_hash

    root, clip = data
    with mlflow_server(tmp_path, str(tmp_path / "server-artifacts")) as uri:
        # a two-source mixture given on the command line: the training split at 3, the test split at 1
        mixture = (
            f"[{{path: {root / 'train'}, weight: 3}}, {{path: {root / 'test'}, weight: 1, split: test}}]"
        )
        cfg = experiment(
            root,
            clip,
            tmp_path / "work",
            f"data.train_shards={mixture}",
            "train.steps=2",
            "train.num_workers=1",
            "train.ckpt_every=2",
            "train.val_every=2",
            "train.run_name=server",
            "tracking.experiment=server-test",
        )
        out = run_training(cfg, tracking_uri=uri)
        client = mlflow_client(uri)
        run = client.get_run(out["run_id"])
        assert run.info.status == "FINISHED"
        assert "train/loss" in run.data.metrics and "val/official/mean_iou" in run.data.metrics
        assert (tmp_path / "work" / "mlflow.db").exists() is False, "the local store must not be used"
        # a loopback server (tracking.relay=auto): rank 0 logged through the relay actor on the driver's node,
        # local files included (the PR figure, the overlays)
        import ray

        from jobs.tracking_relay import RELAY_TAG

        assert run.data.tags[RELAY_TAG] == ray.get_runtime_context().get_node_id()
        assert any("pr_curve" in a.path for a in client.list_artifacts(out["run_id"], "val"))
        assert client.list_artifacts(out["run_id"], "images"), "prediction overlays were not logged"
        # the mixture: each source's path, split, weight, manifest hash and image count, and its identity
        params, logged = run.data.params, []
        for d, (folder, split, weight) in enumerate([("train", "train", 0.75), ("test", "test", 0.25)]):
            source = {
                "path": str(root / folder),
                "split": split,
                "weight": weight,
                "manifest_hash": manifest_hash(root / folder),
                "images": sum(load_sizes(root / folder).values()),
            }
            assert {k: params[f"data.train_sources.{d}.{k}"] for k in source} == {
                k: str(v) for k, v in source.items()
            }
            logged.append(source)
        assert params["data.train_manifest_hash"] == mixture_hash(logged)
        shares = [run.data.metrics[f"data/source_share/{d}"] for d in (0, 1)]
        assert sum(shares) == pytest.approx(1.0) and min(shares) >= 0
