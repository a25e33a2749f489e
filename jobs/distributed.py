"""Device and collective communication for the Ray Train workers, in one place.

Every collective in ``jobs/`` goes through this module (a test scans the package for direct
``torch.distributed`` collectives), and every one checks that its tensor lives on a device the process
group's backend serves: NCCL serves CUDA tensors only, so a CPU tensor handed to an NCCL group would raise
inside NCCL at the first log step of a multi-GPU run; here it raises a clear error on any machine, which is
what lets the CPU-only tests prove the GPU path.

A GPU job's process group is ``cpu:gloo,cuda:nccl`` (Ray's ``TorchConfig(backend=...)`` passes it to
``torch.distributed.init_process_group``): gradients and the worker's own collectives go through NCCL on the
worker's GPU, and a CPU tensor would still have a backend (gloo) rather than a crash.
"""

from __future__ import annotations

import random
import warnings
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
import torch.distributed as dist

GPU_BACKEND = "cpu:gloo,cuda:nccl"
CPU_BACKEND = "gloo"

_REDUCE_OPS = {"sum": "SUM", "min": "MIN", "max": "MAX"}


class CollectiveDeviceError(RuntimeError):
    """A collective was given a tensor on a device the process group's backend does not serve."""


def process_group_backend(use_gpu: bool) -> str:
    """The ``TorchConfig(backend=...)`` of a job: ``cpu:gloo,cuda:nccl`` on GPUs, ``gloo`` on CPUs."""
    return GPU_BACKEND if use_gpu else CPU_BACKEND


def device_backends(backend: str) -> dict[str, str]:
    """Device type → backend name of a process-group backend string.

    ``"nccl"`` → ``{"cuda": "nccl"}``; ``"gloo"`` → ``{"cpu": "gloo", "cuda": "gloo"}`` (torch's
    ``Backend.backend_capability``); ``"cpu:gloo,cuda:nccl"`` → ``{"cpu": "gloo", "cuda": "nccl"}`` (the
    form ``torch.distributed.get_backend_config`` returns).
    """
    backend = backend.strip().lower()
    if ":" not in backend:
        devices = dist.Backend.backend_capability.get(backend)
        if devices is None:
            raise ValueError(f"unknown process-group backend {backend!r}")
        return {device: backend for device in devices}
    mapping: dict[str, str] = {}
    for item in backend.split(","):
        device, sep, name = item.strip().partition(":")
        if not sep or not device or not name:
            raise ValueError(f"malformed process-group backend {backend!r} (expected 'cpu:gloo,cuda:nccl')")
        mapping[device] = name
    return mapping


def check_collective_device(tensor: torch.Tensor, backend: str) -> None:
    """Raise ``CollectiveDeviceError`` unless ``backend`` serves ``tensor.device``."""
    served = device_backends(backend)
    if tensor.device.type not in served:
        raise CollectiveDeviceError(
            f"collective on a {tensor.device} tensor, but the process group's backend {backend!r} serves "
            f"{', '.join(sorted(served))} tensors only; move the tensor to the worker's device first"
        )


def world_size() -> int:
    """Ranks in the default process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _current_backend() -> str:
    return dist.get_backend_config()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce of ``tensor`` over the default group (a no-op with one rank); returns it."""
    if world_size() == 1:
        return tensor
    check_collective_device(tensor, _current_backend())
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, _REDUCE_OPS[op]))
    return tensor


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Mean over ranks of each named scalar, in one all-reduce of a float64 vector on ``device``."""
    world = world_size()
    if world == 1:
        return dict(values)
    keys = sorted(values)
    vector = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    all_reduce(vector)
    return {k: float(v) / world for k, v in zip(keys, vector.tolist(), strict=True)}


def all_reduce_min(value: int, device: torch.device) -> int:
    """The smallest ``value`` over ranks (an agreement every rank reaches identically)."""
    if world_size() == 1:
        return value
    return int(all_reduce(torch.tensor([value], dtype=torch.int64, device=device), op="min").item())


def init_worker(*, use_gpu: bool, threads: int, seed: int) -> torch.device:
    """A training worker's process: ``threads`` torch threads, every RNG seeded with ``seed``; returns its
    device (:func:`worker_device`)."""
    torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    # DDP's bucket views cannot match the strides torch picks for a ConvTranspose weight with one input
    # channel; harmless (one extra copy) but printed by every worker
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return worker_device(use_gpu)


def worker_device(use_gpu: bool) -> torch.device:
    """This worker's device: Ray's GPU assignment (``ray.train.torch.get_device``, which reads the worker's
    ``CUDA_VISIBLE_DEVICES`` and Ray's GPU ids) made current, so NCCL and un-indexed ``cuda`` tensors use it;
    CPU otherwise."""
    if not use_gpu:
        return torch.device("cpu")
    import ray.train.torch

    device = ray.train.torch.get_device()
    if device.type != "cuda":
        raise RuntimeError(
            f"use_gpu is set but Ray gave this worker {device}; is CUDA visible to the worker?"
        )
    torch.cuda.set_device(device)
    return device


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host-to-device copy that overlaps compute when it can: non-blocking from pinned memory (the loaders pin
    their batches when the device is CUDA: ``pin_memory=``); a plain copy otherwise (non-blocking from pageable memory is a
    synchronous copy anyway)."""
    if tensor.device == device:
        return tensor
    return tensor.to(device, non_blocking=device.type == "cuda" and tensor.is_pinned())


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """bf16 autocast on GPU (``auto`` or ``bf16``), float32 on CPU unless ``bf16`` is forced."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
