"""MLflow tracking for segvlm runs: one logger protocol, three ways to satisfy it, and the factory that picks.

* ``MlflowLogger`` (``jobs/tracking_mlflow.py``): logs from this process, straight to the tracking store.
* ``RelayedLogger`` (``jobs/tracking_relay.py``): rank 0 on a node that cannot reach a loopback-only server
  (``--tracking-uri http://127.0.0.1:5000`` on the head) sends each call to a relay actor on the driver's
  node, which runs it with an ``MlflowLogger`` of its own.
* ``DisabledLogger`` (here): every other rank, or no tracking; it touches neither MLflow nor the disk.

``RunLogger(enabled=..., relay=..., ...)`` returns the right one. Imports go one way only:
``jobs.tracking`` → ``jobs.tracking_relay`` → ``jobs.tracking_mlflow``; the store helpers defined in
``jobs.tracking_mlflow`` are re-exported here for the jobs that import them from this module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from jobs.tracking_mlflow import (
    SYSTEM_METRICS_INTERVAL_S,
    MlflowLogger,
    artifact_root,
    get_or_create_experiment,
    resolve_tracking_uri,
    use_tracking_uri,
)
from jobs.tracking_relay import RelayedLogger

if TYPE_CHECKING:
    from ray.actor import ActorHandle

__all__ = [
    "SYSTEM_METRICS_INTERVAL_S",
    "DisabledLogger",
    "MlflowLogger",
    "RelayedLogger",
    "RunLogger",
    "TrackingLogger",
    "artifact_root",
    "get_or_create_experiment",
    "open_run_logger",
    "resolve_tracking_uri",
    "use_tracking_uri",
]


@runtime_checkable
class TrackingLogger(Protocol):
    """What the jobs log a run with. ``start()`` creates the run, or re-opens ``run_id`` (a resumed training
    run appends to the same MLflow run), and returns its id; as a context manager the run ends ``FAILED``
    when the block raises, else ``FINISHED``. Artifact paths (``artifact_file``, ``key``, ``artifact_path``)
    are relative POSIX paths inside the run's artifact folder."""

    enabled: bool  # False: every call is a no-op (callers skip building what they would log)
    run_id: str | None
    tracking_uri: str

    def start(self) -> str | None: ...

    def end(self, status: str = "FINISHED") -> None: ...

    def __enter__(self) -> TrackingLogger: ...

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None: ...

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Lists and dicts as JSON, values cut at MLflow's 6000 characters; params the run already has are
        skipped (a resumed run may re-log one with another value, which MLflow rejects)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """``None`` values are skipped; ``@`` in a key becomes ``_at_`` (MLflow refuses it)."""

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def log_image(self, image: Any, key: str, step: int) -> None:
        """A PIL image under ``key`` at ``step``: the MLflow UI shows a step slider for it."""

    def log_figure(self, figure: Any, artifact_file: str) -> None: ...

    def log_text(self, text: str, artifact_file: str) -> None: ...

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None: ...

    def log_table(self, data: Mapping[str, Sequence[Any]], artifact_file: str) -> None:
        """A table (``{column: values}``, equal lengths) as MLflow's table artifact (``artifact_file`` ends
        in ``.json``), which the MLflow UI can show and compare across runs."""

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None: ...

    def log_checkpoint_model(
        self, checkpoint_dir: str | Path, registered_name: str, alias: str = "best"
    ) -> str | None:
        """Log a checkpoint folder as a served MLflow model, register it, point ``alias`` at it; return the
        new version (``None`` when nothing is logged)."""


class DisabledLogger:
    """Logs nothing: no MLflow import, no store, no files. ``start()`` returns the ``run_id`` it was given."""

    enabled = False

    def __init__(self, *, run_id: str | None = None, tracking_uri: str = "") -> None:
        self.run_id = run_id
        self.tracking_uri = tracking_uri

    def start(self) -> str | None:
        return self.run_id

    def end(self, status: str = "FINISHED") -> None:
        pass

    def __enter__(self) -> DisabledLogger:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        pass

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_image(self, image: Any, key: str, step: int) -> None:
        pass

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        pass

    def log_table(self, data: Mapping[str, Sequence[Any]], artifact_file: str) -> None:
        pass

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_checkpoint_model(
        self, checkpoint_dir: str | Path, registered_name: str, alias: str = "best"
    ) -> str | None:
        return None


def open_run_logger(
    *,
    enabled: bool,
    tracking_uri: str = "",
    experiment: str = "segvlm",
    workdir: str | Path = "runs",
    run_id: str | None = None,
    run_name: str | None = None,
    system_metrics: bool = False,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
    relay: ActorHandle | None = None,
) -> TrackingLogger:
    """The logger for this process: ``DisabledLogger`` unless ``enabled`` (rank 0 with tracking); with a
    ``relay`` (a ``TrackingRelay`` actor handle, ``jobs/tracking_relay.py``) a ``RelayedLogger``; else an
    ``MlflowLogger``. ``tracking_uri`` ``""``: ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<workdir>/mlflow.db``
    (resolved by the relay actor, on the driver's node, when there is one). The run does not start until
    ``start()`` or ``with``."""
    if not enabled:
        return DisabledLogger(run_id=run_id, tracking_uri=tracking_uri)
    settings: dict[str, Any] = {
        "tracking_uri": tracking_uri,
        "experiment": experiment,
        "workdir": workdir,
        "run_id": run_id,
        "run_name": run_name,
        "system_metrics": system_metrics,
        "tags": tags,
        "parent_run_id": parent_run_id,
    }
    if relay is not None:
        return RelayedLogger(relay, **settings)
    return MlflowLogger(**settings)


# The name the jobs construct their logger by: ``with RunLogger(enabled=rank == 0, ...) as logger``.
RunLogger = open_run_logger
