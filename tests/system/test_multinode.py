"""Multi-node behaviour on one machine: a ``ray.cluster_utils.Cluster`` of 1-CPU Ray nodes (slow: ~4 min).

* ``prepare`` spreads its shard tasks over the nodes;
* training with one worker per node completes;
* removing the node of a training worker mid-run: the run resumes from its last checkpoint on a replacement
  node and finishes in the same MLflow run;
* a ``prepare`` job whose node dies is rerun to a complete, duplicate-free manifest equal to a clean run's.

Where each task or worker ran is recorded by thin wrappers around ``pipeline.prepare._ray_process`` and
``jobs.train_loop.train_loop_per_worker`` (patched on the driver, shipped to the workers by value), which write
``ray.get_runtime_context().get_node_id()`` to a marker folder, so no project code needs a hook.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.faults import crash_shards
from tests.fixtures_train import IMAGE_SIZE, tiny_experiment
from tests.servers import two_node_cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


# ------------------------------------------------------------------------- recorders (run on the workers)
def recording_process(marker_dir: str, delay: float = 0.0):
    """A ``_ray_process`` that records its node id (and can take ``delay`` seconds before the real work)."""

    def process(row: dict[str, Any], job: Any) -> dict[str, Any]:
        import json as _json
        import os as _os
        import time as _time
        from pathlib import Path as _Path

        import ray as _ray

        from pipeline import prepare as _prepare

        node = _ray.get_runtime_context().get_node_id()
        name = f"shard-{row['index']}-{_os.getpid()}-{_time.time_ns()}.json"
        _Path(marker_dir, name).write_text(_json.dumps({"index": row["index"], "node": node}))
        _time.sleep(delay)
        return _prepare._ray_process(row, job)  # the worker's module holds the original

    return process


def recording_loop(marker_dir: str):
    """A ``train_loop_per_worker`` that records (rank, node, pid) of every attempt, then trains."""

    def loop(config: dict[str, Any]) -> None:
        import json as _json
        import os as _os
        import time as _time
        from pathlib import Path as _Path

        import ray as _ray
        import ray.train as _train

        from jobs import train_loop as _train_loop

        rank = _train.get_context().get_world_rank()
        node = _ray.get_runtime_context().get_node_id()
        name = f"rank{rank}-{_os.getpid()}-{_time.time_ns()}.json"
        _Path(marker_dir, name).write_text(
            _json.dumps({"rank": rank, "node": node, "pid": _os.getpid(), "time": _time.time()})
        )
        return _train_loop.train_loop_per_worker(config)

    return loop


def markers(directory: Path) -> list[dict[str, Any]]:
    found = []
    for path in directory.glob("*.json"):
        try:
            found.append(json.loads(path.read_text()))
        except ValueError:  # being written
            continue
    return found


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cluster():
    # notice a killed node in seconds rather than the default ~30 s
    health = {
        "health_check_initial_delay_ms": 0,
        "health_check_period_ms": 1000,
        "health_check_failure_threshold": 5,
    }
    # the recorders above live in this test module, which Ray workers cannot import: it travels by value
    with two_node_cluster(sys.modules[__name__], {"_system_config": health}) as cluster:
        yield cluster


def head_node_id(cluster) -> str:
    return cluster.head_node.node_id


def prepare_config(root: Path, split: str, out: Path, **changes: Any):
    from pipeline.prepare import PrepareConfig

    return PrepareConfig(
        source="scenes",
        root=str(root / "scenes"),
        split=split,
        out=str(out),
        shard_samples=4,
        synthetic_prompts=split == "train",
        seed=0,
        progress_every=60.0,
        **changes,
    )


@pytest.fixture(scope="module")
def data(cluster, tmp_path_factory):
    """Scenes → prepare train/val on the cluster (node of every shard task recorded) → tiny CLIP."""
    from pipeline import prepare
    from pipeline.prepare import run_prepare
    from pipeline.scenes import SCENE_WORDS, write_scenes
    from segvlm.backbone import make_tiny_clip
    from segvlm.tokenizer import DEFAULT_TINY_WORDS

    root = tmp_path_factory.mktemp("multinode-data")
    write_scenes(root / "scenes", n_images=60, seed=3, size=IMAGE_SIZE)
    spread = root / "prepare-markers"
    spread.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(prepare, "_ray_process", recording_process(str(spread), delay=0.3))
        for split in ("train", "val"):
            run_prepare(prepare_config(root, split, root / split), log=lambda _: None)
    clip = make_tiny_clip(root / "clip", words=sorted(set(SCENE_WORDS) | set(DEFAULT_TINY_WORDS)))
    return root, clip, spread


def experiment(root: Path, clip: Path, workdir: Path, *overrides: str):
    return tiny_experiment(
        root,
        clip,
        workdir,
        "train.cpus_per_worker=1",
        "train.torch_threads=1",
        "train.overlays=0",
        *overrides,
    )


# ---------------------------------------------------------------------------------------------- tests
def test_prepare_spreads_shard_tasks_over_the_nodes(cluster, data):
    import ray

    from pipeline.manifest import is_complete, load_sizes

    root, _, spread = data
    records = markers(spread)
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    nodes = {r["node"] for r in records}
    assert len(nodes) >= 2, f"every shard task ran on one node: {records}"
    assert nodes <= alive
    assert is_complete(root / "train") and is_complete(root / "val")
    # every shard of both splits was written by exactly one task (no retries in a healthy cluster)
    assert len(records) == len(load_sizes(root / "train")) + len(load_sizes(root / "val"))


def test_training_with_one_worker_per_node(cluster, data, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from jobs import train_loop
    from jobs.train import run_training

    root, clip, _ = data
    placed = tmp_path / "placed"
    placed.mkdir()
    monkeypatch.setattr(train_loop, "train_loop_per_worker", recording_loop(str(placed)))
    cfg = experiment(
        root,
        clip,
        tmp_path / "work",
        "train.steps=6",
        "train.ckpt_every=3",
        "train.val_every=6",
        "train.log_every=1",
        "train.run_name=spread",
        "tracking.experiment=multinode-spread",
    )
    started = time.perf_counter()
    out = run_training(cfg)
    print(f"2 workers on 2 nodes: {out['steps']} steps in {time.perf_counter() - started:.1f} s")
    assert out["steps"] == 6
    records = markers(placed)
    assert sorted(r["rank"] for r in records) == [0, 1]
    assert len({r["node"] for r in records}) == 2, f"the two workers shared a node: {records}"
    run = MlflowClient(out["tracking_uri"]).get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["world_size"] == "2"


def _wait_for_resumable_point(ckpt_root: Path, client, experiment: str, every: int, thread, errors) -> int:
    """Wait until a checkpoint is safely registered (> 5 s old: the controller polls every 2 s) and rank 0 has
    logged a step after the newest checkpoint but at least 2 steps before the next one. Returns that step."""
    deadline = time.time() + 300
    while time.time() < deadline:
        if not thread.is_alive():
            pytest.fail(f"training ended before a node could be removed: {errors}")
        ckpts = sorted(ckpt_root.glob("step-*"))
        if ckpts and time.time() - ckpts[0].stat().st_mtime > 5:
            exp = client.get_experiment_by_name(experiment)
            runs = client.search_runs([exp.experiment_id]) if exp else []
            if runs:
                history = client.get_metric_history(runs[0].info.run_id, "train/loss")
                logged = max((m.step for m in history), default=0)
                newest = max(int(p.name.split("-")[1]) for p in ckpts)
                if logged > newest and logged % every in (1, 2):
                    return logged
        time.sleep(0.05)
    pytest.fail("no checkpoint appeared in time")


def test_removing_a_node_resumes_training_from_the_last_checkpoint_in_the_same_mlflow_run(
    cluster, data, tmp_path, monkeypatch
):
    import ray
    from mlflow import MlflowClient

    from jobs import train_loop
    from jobs.train import run_training
    from segvlm.checkpoint import load_checkpoint

    root, clip, _ = data
    placed = tmp_path / "placed"
    placed.mkdir()
    monkeypatch.setattr(train_loop, "train_loop_per_worker", recording_loop(str(placed)))
    steps, every = 60, 4
    cfg = experiment(
        root,
        clip,
        tmp_path / "work",
        f"train.steps={steps}",
        f"train.ckpt_every={every}",
        "train.val_every=1000",
        "train.log_every=1",
        "train.max_failures=2",
        "train.keep_checkpoints=3",
        "train.run_name=node-loss",
        "tracking.experiment=multinode-node-loss",
    )
    tracking = f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}"
    (tmp_path / "work").mkdir()
    result: dict[str, Any] = {}
    errors: list[BaseException] = []

    def train() -> None:
        try:
            result.update(run_training(cfg, tracking_uri=tracking))
        except BaseException as err:
            errors.append(err)

    thread = threading.Thread(target=train, daemon=True)
    started = time.perf_counter()
    thread.start()
    client = MlflowClient(tracking)
    ckpt_root = tmp_path / "work" / "ray_results" / "node-loss"
    killed_after = _wait_for_resumable_point(ckpt_root, client, "multinode-node-loss", every, thread, errors)

    head = head_node_id(cluster)
    first = markers(placed)
    victims = {r["node"] for r in first} - {head}
    assert len(victims) == 1, f"expected one worker off the head node: {first}"
    (victim,) = victims
    node = next(n for n in cluster.worker_nodes if n.node_id == victim)
    cluster.remove_node(node, allow_graceful=False)  # the node crashes: raylet and its workers killed
    replacement = cluster.add_node(num_cpus=1)  # ScalingConfig is fixed: 2 workers need a second CPU again
    print(f"removed node {victim[:8]} after step {killed_after}; added {replacement.node_id[:8]}")

    thread.join(timeout=480)
    assert not thread.is_alive(), "training did not finish after the node was replaced"
    assert not errors, errors
    print(f"node loss + resume: {steps} steps in {time.perf_counter() - started:.1f} s")
    assert result["steps"] == steps

    exp = client.get_experiment_by_name("multinode-node-loss")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, "the resumed attempt must append to the same MLflow run"
    assert runs[0].info.run_id == result["run_id"]
    logged = sorted(m.step for m in client.get_metric_history(result["run_id"], "train/loss"))
    assert logged[-1] == steps
    repeated = sorted({s for s in logged if logged.count(s) > 1})
    assert repeated, f"no step was logged twice: the run did not resume from a checkpoint ({logged})"
    assert killed_after in repeated

    second = [r for r in markers(placed) if r not in first]
    assert sorted(r["rank"] for r in second) == [0, 1], f"the worker group was not re-formed: {second}"
    second_nodes = {r["node"] for r in second}
    assert victim not in second_nodes and replacement.node_id in second_nodes
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert victim not in alive and len(alive) == 2

    model, model_cfg, _ = load_checkpoint(result["best_checkpoint"])
    assert model_cfg.backbone.image_size == IMAGE_SIZE
    assert sum(p.numel() for p in model.parameters()) > 0


def test_prepare_whose_node_dies_is_rerun_to_the_clean_manifest(cluster, data, tmp_path, monkeypatch):
    from pipeline import manifest as mf
    from pipeline import prepare
    from pipeline.prepare import run_prepare

    root, _, _ = data
    clean = prepare_config(root, "train", tmp_path / "clean")
    run_prepare(clean, log=lambda _: None)

    seen = tmp_path / "seen"
    seen.mkdir()
    monkeypatch.setattr(prepare, "_ray_process", recording_process(str(seen), delay=1.0))
    # the last shard's task also fails (a crash hook): the first run fails whether or not Ray retries the
    # tasks of the dead node elsewhere
    config = dataclasses.replace(clean, out=str(tmp_path / "crashed"))
    assert len(mf.load_sizes(tmp_path / "clean")) == 12
    errors: list[BaseException] = []

    def first_run() -> None:
        try:
            run_prepare(config, log=lambda _: None, shard_hook=crash_shards(11))
        except BaseException as err:
            errors.append(err)

    thread = threading.Thread(target=first_run, daemon=True)
    thread.start()
    head = head_node_id(cluster)
    deadline = time.time() + 120
    while not any(r["node"] != head for r in markers(seen)):
        assert time.time() < deadline and thread.is_alive(), "no shard task started off the head node"
        time.sleep(0.05)
    victim = next(r["node"] for r in markers(seen) if r["node"] != head)
    cluster.remove_node(next(n for n in cluster.worker_nodes if n.node_id == victim), allow_graceful=False)
    cluster.add_node(num_cpus=1)
    thread.join(timeout=300)
    assert not thread.is_alive(), "the interrupted prepare job hung"
    assert errors, "the first run should have failed"
    assert not mf.is_complete(tmp_path / "crashed")

    logs: list[str] = []
    monkeypatch.setattr(prepare, "_ray_process", recording_process(str(seen), delay=0.0))
    summary = run_prepare(config, log=logs.append)
    print(f"rerun: {summary['shards_resumed']} of 12 shards reused from the interrupted run")
    assert 0 < summary["shards_resumed"] < 12
    assert mf.is_complete(tmp_path / "crashed")
    crashed_table = mf.load_manifest(tmp_path / "crashed")
    task_ids = crashed_table.column("task_id").to_pylist()
    assert len(task_ids) == len(set(task_ids)), "duplicate task ids in the manifest"
    assert crashed_table.equals(mf.load_manifest(tmp_path / "clean"))
    assert mf.manifest_hash(tmp_path / "crashed") == mf.manifest_hash(tmp_path / "clean")
    assert mf.load_sizes(tmp_path / "crashed") == mf.load_sizes(tmp_path / "clean")
    leftovers = [p.name for p in (tmp_path / "crashed").iterdir() if ".tmp" in p.name or "crashed" in p.name]
    assert not leftovers, leftovers
