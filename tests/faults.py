"""Faults the tests inject into the jobs through their hooks (never through product configs or env vars)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def crash_shards(*indices: int) -> Callable[[Any, Any, str], None]:
    """A ``run_prepare`` shard hook: the tasks of these shard indices die after half-writing their temp file.

    A closure, so Ray pickles it by value: the tasks need not import this module.
    """
    chosen = frozenset(indices)

    def hook(plan: Any, job: Any, path: str) -> None:
        import posixpath

        from pipeline import shards

        if plan.index in chosen:
            with job.filesystem.open_output_stream(shards.temp_path(path, job.run_id)) as stream:
                stream.write(b"half a tar")
            raise RuntimeError(f"simulated crash while writing {posixpath.basename(path)}")

    return hook
