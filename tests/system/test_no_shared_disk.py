"""Two Ray nodes without a shared disk (``ray.cluster_utils.Cluster``, one 1-CPU worker per node; slow).

Each Ray Train worker runs with its temporary folder moved to a scratch folder of its own node
(``tempfile.tempdir``), records every temporary folder it creates there, and wipes the scratch folder when
its function returns, as if that node's disk vanished with the job. Shards, checkpoints and the best
checkpoint live on a real S3 server (SeaweedFS on 127.0.0.1); the MLflow store is a sqlite file on the
driver's disk. Train and eval must still finish and the driver must have the report: everything travels
through S3 or through Ray (the eval report is rank 0's return value, MLflow calls go through the relay).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_train import IMAGE_SIZE, tiny_experiment
from tests.s3_server import aws_environment
from tests.servers import two_node_cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def node_local(function_name: str, module: str, scratch_root: str, marker_dir: str):
    """A worker function that runs ``module.function_name`` with node-local temporary folders, records
    them, and removes its scratch folder when done (the driver can never have read from it)."""

    def run(config: dict[str, Any]) -> Any:
        import importlib
        import json as _json
        import os as _os
        import shutil as _shutil
        import tempfile as _tempfile
        from pathlib import Path as _Path

        import ray as _ray
        import ray.train as _train

        node = _ray.get_runtime_context().get_node_id()
        rank = _train.get_context().get_world_rank()
        scratch = _Path(scratch_root, node[:12], str(_os.getpid()))
        scratch.mkdir(parents=True)
        made: list[str] = []
        original = _tempfile.mkdtemp

        def recording_mkdtemp(*args: Any, **kwargs: Any) -> str:
            path = original(*args, **kwargs)
            made.append(path)
            return path

        _tempfile.mkdtemp, _tempfile.tempdir = recording_mkdtemp, str(scratch)
        try:
            return getattr(importlib.import_module(module), function_name)(config)
        finally:
            _tempfile.mkdtemp, _tempfile.tempdir = original, None
            record = {"rank": rank, "node": node, "scratch": str(scratch), "made": made}
            _Path(marker_dir, f"{function_name}-{rank}-{_os.getpid()}.json").write_text(_json.dumps(record))
            _shutil.rmtree(scratch)

    return run


def markers(directory: Path, function_name: str) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(directory.glob(f"{function_name}-*.json"))]


@pytest.fixture(scope="module")
def cluster(s3_server):
    # the nodes inherit the AWS settings, as cluster nodes get theirs from their instance configuration
    with aws_environment(s3_server), two_node_cluster(sys.modules[__name__]) as cluster:
        yield cluster


def test_train_and_eval_finish_with_node_local_disks_only(cluster, s3_server, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from jobs import eval as eval_job
    from jobs import train_loop
    from jobs.eval import run_eval
    from jobs.tracking_relay import RELAY_TAG
    from jobs.train import run_training
    from pipeline import storage
    from pipeline.manifest import is_complete, load_manifest
    from pipeline.prepare import PrepareConfig, run_prepare
    from pipeline.scenes import SCENE_WORDS, write_scenes
    from segvlm.backbone import make_tiny_clip
    from segvlm.checkpoint import load_checkpoint
    from segvlm.tokenizer import DEFAULT_TINY_WORDS

    s3 = s3_server
    root = tmp_path / "driver"
    write_scenes(root / "scenes", n_images=40, seed=3, size=IMAGE_SIZE)
    for split in ("train", "val", "test"):
        config = PrepareConfig(
            source="scenes",
            root=str(root / "scenes"),
            split=split,
            out=s3.uri("nodisk", split),
            shard_samples=4,
            synthetic_prompts=split == "train",
            seed=0,
            progress_every=600.0,
        )
        run_prepare(config, log=lambda _: None)
        assert is_complete(s3.uri("nodisk", split))
    clip = make_tiny_clip(root / "clip", words=sorted(set(SCENE_WORDS) | set(DEFAULT_TINY_WORDS)))

    scratch, marks = tmp_path / "node-scratch", tmp_path / "markers"
    marks.mkdir()
    monkeypatch.setattr(
        train_loop,
        "train_loop_per_worker",
        node_local("train_loop_per_worker", "jobs.train_loop", str(scratch), str(marks)),
    )
    monkeypatch.setattr(
        eval_job,
        "eval_loop_per_worker",
        node_local("eval_loop_per_worker", "jobs.eval", str(scratch), str(marks)),
    )
    best = s3.uri("nodisk", "run", "best")
    cfg = tiny_experiment(
        root,
        clip,
        root / "work",
        f"data.train_shards={s3.uri('nodisk', 'train')}",
        f"data.val_shards={s3.uri('nodisk', 'val')}",
        f"train.storage_path={s3.uri('nodisk', 'ray_results')}",
        f"train.best_path={best}",
        "train.steps=4",
        "train.ckpt_every=2",
        "train.val_every=2",
        "train.log_every=1",
        "train.cpus_per_worker=1",
        "train.torch_threads=1",
        "train.overlays=1",
        "train.run_name=nodisk",
        "tracking.experiment=nodisk",
    )
    out = run_training(cfg)
    assert out["steps"] == 4 and out["best_checkpoint"] == best

    trained = markers(marks, "train_loop_per_worker")
    assert sorted(m["rank"] for m in trained) == [0, 1]
    assert len({m["node"] for m in trained}) == 2, f"the two workers shared a node: {trained}"
    # rank 0 staged its checkpoints in its node's scratch folder (then Ray uploaded them to S3)
    rank0 = next(m for m in trained if m["rank"] == 0)
    assert any(Path(p).name.startswith("segvlm-ckpt-") for p in rank0["made"]), rank0
    for mark in trained:
        assert all(p.startswith(mark["scratch"]) for p in mark["made"]), mark
        assert not Path(mark["scratch"]).exists(), "the worker's scratch folder should be gone"
    # MLflow: a sqlite file on the driver's disk, reached by rank 0 only through the relay actor
    client = MlflowClient(out["tracking_uri"])
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED" and RELAY_TAG in run.data.tags
    assert run.data.params["world_size"] == "2"
    assert client.get_metric_history(out["run_id"], "val/official/mean_iou")

    # eval: checkpoint and shards from S3, the report to a folder of the driver, PNGs to S3
    report = run_eval(
        best,
        s3.uri("nodisk", "test"),
        out=str(root / "eval"),
        split="test",
        official_dir=s3.uri("nodisk", "pngs"),
        num_workers=2,
        batch_size=4,
    )
    assert json.loads((root / "eval" / "report.json").read_text()) == report
    evaluated = markers(marks, "eval_loop_per_worker")
    assert sorted(m["rank"] for m in evaluated) == [0, 1] and len({m["node"] for m in evaluated}) == 2
    for mark in evaluated:  # each worker downloaded the checkpoint into its own node's scratch
        assert any(Path(p).name.startswith("segvlm-eval-ckpt-") for p in mark["made"]), mark
        assert not Path(mark["scratch"]).exists()
    task_ids = load_manifest(s3.uri("nodisk", "test")).column("task_id").to_pylist()
    assert report["official/count"] + report.get("official/negative/count", 0) == len(task_ids)
    assert sorted(
        storage.name(f)[: -len(".png")] for f in storage.list_files(s3.uri("nodisk", "pngs"))
    ) == sorted(task_ids)
    with storage.local_copy(best) as folder:
        model, _, _ = load_checkpoint(folder)
    assert sum(p.numel() for p in model.parameters()) > 0
