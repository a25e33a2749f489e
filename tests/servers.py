"""Real servers the tests start themselves, on 127.0.0.1 and free ports: an MLflow tracking server and a
two-node Ray cluster (``ray.cluster_utils.Cluster``). The S3 server is in ``tests/s3_server.py``."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import types
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it); races are possible but rare."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def mlflow_server(
    tmp_path: Path, artifacts: str, env: Mapping[str, str] | None = None, *, timeout: float = 120
) -> Iterator[str]:
    """``mlflow server`` with a sqlite store in ``tmp_path`` and proxied artifacts at ``artifacts`` (a folder
    or a URI); yields its ``http://127.0.0.1:PORT`` once ``/health`` answers, stops it by its PID after."""
    port = free_port()
    log_path = tmp_path / "mlflow-server.log"
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", artifacts,
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=os.environ | dict(env or {}) | {"MLFLOW_DISABLE_TELEMETRY": "true"},
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail(f"mlflow server did not come up: {log_path.read_text()[-2000:]}")
                time.sleep(1)
        yield uri
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@contextlib.contextmanager
def two_node_cluster(
    module: types.ModuleType, head_node_args: Mapping[str, Any] | None = None
) -> Iterator[Any]:
    """A head and one worker node, one CPU each, token authentication off, the driver connected; the test
    ``module`` is pickled by value, since Ray workers cannot import test modules."""
    import ray
    import ray.cloudpickle
    from ray.cluster_utils import Cluster

    from jobs.common import init_ray
    from jobs.environment import quiet_environment

    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # Ray 2.60 token authentication: off for this local cluster
    quiet_environment()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, **dict(head_node_args or {})},
    )
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        init_ray(cluster.address)
        ray.cloudpickle.register_pickle_by_value(module)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved
