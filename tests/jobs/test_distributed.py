"""The device/collective helper: a collective on a device its backend does not serve fails on any machine.

No GPU here, so the NCCL case is proven through the check itself (the backend strings an NCCL job's process
group reports) and by a scan proving every collective in ``jobs/`` goes through that check; the real gloo path
runs in a two-process group below and in the two-worker Ray tests (tests/jobs/test_train.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from jobs import distributed
from jobs.distributed import (
    GPU_BACKEND,
    CollectiveDeviceError,
    check_collective_device,
    device_backends,
    process_group_backend,
)
from tests.servers import free_port

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def test_backend_strings_map_devices_as_torch_does():
    assert device_backends("nccl") == {"cuda": "nccl"}
    assert device_backends("gloo") == {"cpu": "gloo", "cuda": "gloo"}
    assert device_backends("cpu:gloo,cuda:nccl") == {"cpu": "gloo", "cuda": "nccl"}
    assert device_backends(" CUDA:NCCL ") == {"cuda": "nccl"}  # get_backend_config's form for "nccl"
    with pytest.raises(ValueError, match="unknown process-group backend 'nicl'"):
        device_backends("nicl")
    with pytest.raises(ValueError, match="malformed"):
        device_backends("cpu:gloo,cuda")


def test_nccl_refuses_cpu_tensors_gloo_and_the_gpu_job_backend_take_them():
    cpu = torch.zeros(3)
    for backend in ("nccl", "cuda:nccl"):
        with pytest.raises(CollectiveDeviceError, match="serves cuda tensors only"):
            check_collective_device(cpu, backend)
    check_collective_device(cpu, "gloo")
    check_collective_device(cpu, "cpu:gloo,cuda:gloo")
    check_collective_device(cpu, GPU_BACKEND)
    # a device no backend of the group serves (meta stands in for any tensor left on the wrong device)
    with pytest.raises(CollectiveDeviceError, match="meta"):
        check_collective_device(torch.zeros(3, device="meta"), GPU_BACKEND)


def test_jobs_use_a_cpu_and_cuda_process_group_on_gpus():
    from ray.train.torch.config import _is_backend_nccl

    assert process_group_backend(False) == "gloo"
    assert process_group_backend(True) == "cpu:gloo,cuda:nccl"
    # Ray recognises it as NCCL (sets TORCH_NCCL_ASYNC_ERROR_HANDLING) and passes it to init_process_group
    assert _is_backend_nccl(process_group_backend(True))
    assert device_backends(process_group_backend(True))["cuda"] == "nccl"


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_autocast_is_bf16_on_gpu_and_off_on_cpu_unless_forced():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not isinstance(distributed.autocast("auto", cpu), torch.autocast)
    forced = distributed.autocast("bf16", cpu)
    assert isinstance(forced, torch.autocast) and forced.fast_dtype == torch.bfloat16
    gpu = distributed.autocast("auto", cuda)
    assert isinstance(gpu, torch.autocast) and gpu.device == "cuda" and gpu.fast_dtype == torch.bfloat16
    assert not isinstance(distributed.autocast("fp32", cuda), torch.autocast)


def test_worker_device_without_gpu_and_to_device_keeps_tensors_already_there():
    assert distributed.worker_device(False) == torch.device("cpu")
    tensor = torch.arange(4)
    assert distributed.to_device(tensor, torch.device("cpu")) is tensor
    moved = distributed.to_device(tensor, torch.device("meta"))
    assert moved.device.type == "meta" and moved.shape == (4,)


def _torch_distributed_uses(source: str) -> list[str]:
    """Every way ``source`` reaches ``torch.distributed``: imports of it and ``torch.distributed`` attributes
    (a collective called directly, or the module bound to another name). Going through ``jobs.distributed``
    is the only way that passes."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.startswith("torch.distributed")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed"):
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            found += [f"from torch import {a.name}" for a in node.names if a.name == "distributed"]
        elif (
            isinstance(node, ast.Attribute)
            and node.attr == "distributed"
            and isinstance(node.value, ast.Name)
            and node.value.id == "torch"
        ):
            found.append(f"line {node.lineno}: torch.distributed")
    return found


def test_the_scan_finds_every_way_to_torch_distributed():
    assert _torch_distributed_uses("import torch.distributed as dist\ndist.all_reduce(x)\n") == [
        "import torch.distributed"
    ]
    assert _torch_distributed_uses("import torch\n\ntorch.distributed.broadcast(x, 0)\n") == [
        "line 3: torch.distributed"
    ]
    assert _torch_distributed_uses("import torch\nd = torch.distributed\n") == ["line 2: torch.distributed"]
    assert _torch_distributed_uses("from torch import distributed\n") == ["from torch import distributed"]
    assert _torch_distributed_uses("from torch.distributed import all_reduce\n") == [
        "from torch.distributed import ..."
    ]
    assert _torch_distributed_uses("from jobs import distributed\ndistributed.all_reduce(x)\n") == []


def test_no_module_in_jobs_reaches_torch_distributed_but_the_helper():
    offenders = {
        path.name: hits
        for path in sorted(JOBS.glob("*.py"))
        if path.name != "distributed.py" and (hits := _torch_distributed_uses(path.read_text()))
    }
    assert offenders == {}
    # and the helper is where the collectives are
    assert "dist.all_reduce(" in (JOBS / "distributed.py").read_text()


def _worker(rank: int, port: int, out: dict) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cpu = torch.device("cpu")
        mean = distributed.all_reduce_mean({"loss": 1.0 + 2 * rank, "wait": 0.5}, cpu)
        smallest = distributed.all_reduce_min(10 - 3 * rank, cpu)
        try:
            distributed.all_reduce(torch.zeros(2, device="meta"))
            refused = "no error"
        except CollectiveDeviceError as err:
            refused = str(err)
        out[rank] = (mean, smallest, distributed.world_size(), refused)
    finally:
        dist.destroy_process_group()


def test_collectives_over_a_real_two_process_gloo_group():
    port = free_port()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_worker, args=(port, out), nprocs=2, start_method="spawn", join=True)
        results = dict(out)
    for rank in (0, 1):
        mean, smallest, world, refused = results[rank]
        assert mean == {"loss": 2.0, "wait": 0.5}  # (1 + 3) / 2
        assert smallest == 7
        assert world == 2
        assert "cpu:gloo,cuda:gloo" in refused and "meta" in refused
