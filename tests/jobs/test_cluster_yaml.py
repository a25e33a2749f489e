"""cluster.yaml passes Ray's own cluster-launcher schema and keeps the promises docs/cluster.md makes.

Validation is offline: ``prepare_config`` only merges the provider's defaults.yaml, legacy fields, docker and
min/max workers; the AWS calls (IAM profile, security group, subnets, AMI lookup) happen later, in the
provider's ``bootstrap_config`` that ``ray up`` runs after it (ray/autoscaler/_private/commands.py,
``_bootstrap_config``). So nothing here needs AWS credentials or boto3.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
IMAGE = "rayproject/ray:2.60.0-py311-gpu"


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def prepared(raw: dict[str, Any]) -> dict[str, Any]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(raw)
    validate_config(config)  # raises jsonschema.ValidationError / ValueError
    return config


def _head_commands(cfg: dict[str, Any]) -> str:
    return "\n".join(cfg["head_setup_commands"] + cfg["head_start_ray_commands"])


def test_validates_against_ray_schema(prepared: dict[str, Any]) -> None:
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_raw_file_alone_is_not_enough(raw: dict[str, Any]) -> None:
    # Why the test goes through prepare_config: validate_config rejects a raw file (no cluster_synced_files).
    from ray.autoscaler._private.util import validate_config

    with pytest.raises(RuntimeError, match="cluster_synced_files"):
        validate_config(dict(raw))


def test_docker_image(prepared: dict[str, Any]) -> None:
    assert prepared["docker"]["image"] == IMAGE
    assert "ray-ml" not in (REPO / "cluster.yaml").read_text().replace("rayproject/ray-ml is no longer", "")


def test_head_runs_mlflow_with_sqlite_and_s3(prepared: dict[str, Any]) -> None:
    head = _head_commands(prepared)
    mlflow = next(c for c in prepared["head_start_ray_commands"] if "mlflow server" in c)
    assert "nohup mlflow server" in mlflow and mlflow.rstrip().endswith("&")  # in the background
    assert "--backend-store-uri sqlite:////home/ray/mlflow/mlflow.db" in mlflow
    assert re.search(r"--artifacts-destination s3://BUCKET/\S+", mlflow)
    assert "--port 5000" in mlflow
    assert "mkdir -p /home/ray/mlflow" in head
    # started before Ray, so a job submitted right after `ray up` can log
    cmds = prepared["head_start_ray_commands"]
    assert cmds.index(mlflow) < next(i for i, c in enumerate(cmds) if "ray start --head" in c)
    # no node runs MLflow but the head
    for cmd in prepared["worker_setup_commands"] + prepared["worker_start_ray_commands"]:
        assert "mlflow server" not in cmd


def test_mlflow_is_bound_to_the_heads_loopback_only(prepared: dict[str, Any]) -> None:
    # No other node reaches MLflow: the rank-0 worker on a GPU node logs through the relay actor on the head.
    mlflow = next(c for c in prepared["head_start_ray_commands"] if "mlflow server" in c)
    assert "--host 127.0.0.1" in mlflow
    assert "0.0.0.0" not in mlflow
    text = (REPO / "cluster.yaml").read_text()
    assert "socat" not in text  # no forwarders from the workers to the head's MLflow
    # no other command (a forwarder, a proxy) touches MLflow's port
    commands = [c for key, value in prepared.items() if key.endswith("_commands") for c in value]
    assert [c for c in commands if "5000" in c] == [mlflow]


def test_token_auth_on_every_node(prepared: dict[str, Any]) -> None:
    head_start = next(c for c in prepared["head_start_ray_commands"] if "ray start" in c)
    worker_start = next(c for c in prepared["worker_start_ray_commands"] if "ray start" in c)
    assert "RAY_AUTH_MODE=token" in head_start and "RAY_AUTH_MODE=token" in worker_start
    assert prepared["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    assert prepared["file_mounts"]["/home/ray/segvlm"] == "."
    assert any("pip install" in c and "/home/ray/segvlm" in c for c in prepared["setup_commands"])


def test_only_ssh_is_open_to_the_outside(prepared: dict[str, Any]) -> None:
    extra = prepared["provider"]["security_group"]["IpPermissions"]
    for rule in extra:
        assert (rule["FromPort"], rule["ToPort"]) == (22, 22), rule
    # Our own groups would replace Ray's; none may be set, so Ray's default rules below are the whole story.
    for node_type in prepared["available_node_types"].values():
        assert "SecurityGroupIds" not in node_type["node_config"]
    # Ray's AWS bootstrap adds intra-cluster + SSH rules: read them from the installed Ray (no boto3 import).
    import ray.autoscaler

    source = (Path(ray.autoscaler.__file__).parent / "_private" / "aws" / "config.py").read_text()
    tree = ast.parse(source)
    fn = next(
        n
        for n in tree.body
        if isinstance(n, ast.FunctionDef) and n.name == "_create_default_ssh_inbound_rules"
    )
    ssh_rules = ast.literal_eval(fn.body[-1].value)  # type: ignore[attr-defined]
    assert [(r["FromPort"], r["ToPort"]) for r in ssh_rules] == [(22, 22)]
    merge = next(
        n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_create_default_inbound_rules"
    )
    called = {c.func.id for c in ast.walk(merge) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
    assert {"_create_default_intracluster_inbound_rules", "_create_default_ssh_inbound_rules"} <= called


def test_gpu_worker_types(prepared: dict[str, Any]) -> None:
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["node_config"]["InstanceType"].startswith("m6i")
    gpu = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert len(gpu) >= 2
    assert {t["node_config"]["InstanceType"] for t in gpu.values()} >= {"g5.xlarge", "g5.12xlarge"}
    for t in gpu.values():
        assert t["min_workers"] == 0 and t["max_workers"] >= 1  # autoscaling from zero
        assert "IamInstanceProfile" in t["node_config"]  # S3 access for shards and checkpoints
    assert types["gpu.a10g.x4"]["resources"]["GPU"] == 4
    assert sum(t["max_workers"] for t in gpu.values()) >= prepared["max_workers"]


def test_placeholders_are_obvious() -> None:
    text = (REPO / "cluster.yaml").read_text()
    for placeholder in ("BUCKET", "ACCOUNT_ID"):
        assert placeholder in text
    code = "\n".join(line.split("#")[0] for line in text.splitlines())
    assert not re.search(r"s3://(?!BUCKET/)", code)  # every bucket reference is the placeholder
    assert re.findall(r"arn:aws:iam::(\w+):", code) == ["ACCOUNT_ID"] * 3
