"""MLflow tracking for segvlm runs: one small logger object that does nothing on ranks other than 0.

Local default store: ``sqlite:///<workdir>/mlflow.db`` with artifacts in ``<workdir>/mlartifacts`` (MLflow 3
refuses a plain ``./mlruns`` file store, and a sqlite store without an experiment ``artifact_location`` drops
artifacts into ``<cwd>/mlruns``). On a cluster, pass ``--tracking-uri http://127.0.0.1:5000`` (the head's
server, reached through port forwarding). The rank-0 worker, on a GPU node, cannot reach that loopback-only
server itself: it logs through a relay actor on the driver's node (``relay=``, ``jobs/tracking_relay.py``).
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.actor import ActorHandle

SYSTEM_METRICS_INTERVAL_S = 10

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def resolve_tracking_uri(uri: str, workdir: str | Path) -> str:
    """``uri`` when given; else ``$MLFLOW_TRACKING_URI`` when set; else the local sqlite store under
    ``workdir``."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    path = Path(workdir).resolve() / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def artifact_root(tracking_uri: str, workdir: str | Path) -> str | None:
    """Artifact location for new experiments: a local folder for a sqlite store, the server's default otherwise."""
    if tracking_uri.startswith("sqlite:"):
        return (Path(workdir).resolve() / "mlartifacts").as_uri()
    return None


def use_tracking_uri(tracking_uri: str) -> None:
    """``mlflow.set_tracking_uri`` without its side effect on ``$MLFLOW_TRACKING_URI``: that variable stays
    the user's, so a later job in this process (another workdir) is not sent to this store, and Ray workers
    started later do not inherit a local path of this node."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def get_or_create_experiment(tracking_uri: str, name: str, workdir: str | Path) -> str:
    import mlflow

    use_tracking_uri(tracking_uri)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return mlflow.create_experiment(name, artifact_location=artifact_root(tracking_uri, workdir))


def _relayable(method: Any) -> Any:
    """With a relay, run ``method`` in the relay actor (same name, same arguments) instead of here."""

    @functools.wraps(method)
    def forward(self: RunLogger, *args: Any, **kwargs: Any) -> Any:
        if self.relay is not None:
            return self._relay_call(method.__name__, *args, **kwargs)
        return method(self, *args, **kwargs)

    return forward


class RunLogger:
    """Rank-0 MLflow logger. Every method is a no-op when ``enabled`` is False (other ranks, or no tracking).

    ``start()`` creates a run or re-opens ``run_id`` (a resumed training run appends to the same MLflow run).

    ``relay``: a ``TrackingRelay`` actor handle (``jobs/tracking_relay.py``). Then every call runs in that
    actor, on the driver's node, with an enabled ``RunLogger`` of its own; this process only ships arguments,
    reading local files (figures, folders) into bytes first. Calls block until the actor is done
    (``ray.get``), so errors surface at the call and the order is kept. System metrics are then sampled in
    this process (``RelayedSystemMetricsMonitor``), not by MLflow in the actor.
    """

    def __init__(
        self,
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
    ) -> None:
        self.enabled = enabled
        self.relay = relay if enabled else None
        # with a relay, "" (the local sqlite store) is resolved by the actor, on the driver's node
        local = enabled and self.relay is None
        self.tracking_uri = resolve_tracking_uri(tracking_uri, workdir) if local else tracking_uri
        self.experiment = experiment
        self.workdir = workdir
        self.run_id = run_id
        self.run_name = run_name
        self.system_metrics = system_metrics
        self.tags = dict(tags or {})
        self.parent_run_id = parent_run_id
        self._active = False
        self._monitor: Any = None  # RelayedSystemMetricsMonitor, with a relay

    # ---------------------------------------------------------------------------------------- lifecycle
    def start(self) -> str | None:
        if not self.enabled:
            return self.run_id
        if self.relay is not None:
            return self._start_relayed()
        import mlflow

        experiment_id = get_or_create_experiment(self.tracking_uri, self.experiment, self.workdir)
        if self.system_metrics:
            mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
        run = mlflow.start_run(
            run_id=self.run_id,
            experiment_id=None if self.run_id else experiment_id,
            run_name=None if self.run_id else self.run_name,
            tags=self.tags or None,
            log_system_metrics=self.system_metrics,
            parent_run_id=self.parent_run_id,
            nested=self.parent_run_id is not None,
        )
        self.run_id = run.info.run_id
        self._active = True
        return self.run_id

    def _start_relayed(self) -> str | None:
        import ray

        from jobs.tracking_relay import RelayedSystemMetricsMonitor

        settings = {
            "tracking_uri": self.tracking_uri,
            "experiment": self.experiment,
            "workdir": str(self.workdir),
            "run_id": self.run_id,
            "run_name": self.run_name,
            "tags": self.tags,
            "parent_run_id": self.parent_run_id,
        }
        self.run_id = ray.get(self.relay.open.remote(settings))
        self._active = True
        if self.system_metrics:
            self._monitor = RelayedSystemMetricsMonitor(self)
            self._monitor.start()
        return self.run_id

    def end(self, status: str = "FINISHED") -> None:
        if not (self.enabled and self._active):
            return
        if self._monitor is not None:
            # stopped first: a sample logged after the run ended would open a new run in the actor
            self._monitor.finish()
            self._monitor = None
        if self.relay is not None:
            self._relay_call("end", status)
        else:
            import mlflow

            mlflow.end_run(status=status)
        self._active = False

    def __enter__(self) -> RunLogger:
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end("FAILED" if exc_type else "FINISHED")

    def _relay_call(self, method: str, *args: Any, packed: Any = None, **kwargs: Any) -> Any:
        """Run ``method`` in the relay actor and wait for it; ``packed`` (a folder as bytes, see
        ``jobs.tracking_relay.pack_folder``) becomes its first argument there."""
        import ray

        return ray.get(self.relay.call.remote(method, args, kwargs, packed))

    # ------------------------------------------------------------------------------------------ logging
    @_relayable
    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        import mlflow

        # MLflow rejects re-logging a param with a different value, which a resumed run may do: skip those.
        existing = mlflow.get_run(self.run_id).data.params if self.run_id else {}
        fresh = {k: _param_value(v) for k, v in params.items() if k not in existing}
        if fresh:
            mlflow.log_params(fresh)

    @_relayable
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.enabled or not metrics:
            return
        import mlflow

        clean = {_metric_key(k): float(v) for k, v in metrics.items() if v is not None}
        mlflow.log_metrics(clean, step=step)

    @_relayable
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.enabled:
            import mlflow

            mlflow.set_tags({k: str(v) for k, v in tags.items()})

    @_relayable
    def log_image(self, image: Any, key: str, step: int) -> None:
        """A PIL image under ``key`` at ``step``: the MLflow UI shows a step slider for it."""
        if self.enabled:
            import mlflow

            mlflow.log_image(image, key=key, step=step)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        if self.relay is not None:
            # the figure exists in this process only: ship its rendering, logged there as the same file
            from jobs.tracking_relay import pack_figure

            folder, name = posixpath.split(artifact_file)
            self._relay_call("log_artifacts", folder or None, packed=pack_figure(figure, name))
        elif self.enabled:
            import mlflow

            mlflow.log_figure(figure, artifact_file)

    @_relayable
    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_text(text, artifact_file)

    @_relayable
    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_dict(dict(data), artifact_file)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        if self.relay is not None:
            from jobs.tracking_relay import pack_folder

            self._relay_call("log_artifacts", artifact_path, packed=pack_folder(local_dir))
        elif self.enabled:
            import mlflow

            mlflow.log_artifacts(str(local_dir), artifact_path)

    def log_checkpoint_model(
        self, checkpoint_dir: str | Path, registered_name: str, alias: str = "best"
    ) -> str | None:
        """Log a segvlm checkpoint as an MLflow model that serves, register it and point ``alias`` at it.

        The model is logged from code (``jobs/pyfunc_model.py``): the checkpoint folder as an artifact
        (safetensors weights, nothing pickled), the segvlm package as code, pinned PyPI requirements, a
        signature and an input example; ``mlflow models serve -m models:/<registered_name>@<alias>`` runs it
        (docs/serving.md). Returns the new model version (``"1"``, ``"2"``, ...).
        """
        if self.relay is not None:
            from jobs.tracking_relay import pack_folder

            return self._relay_call(
                "log_checkpoint_model", registered_name, alias, packed=pack_folder(checkpoint_dir)
            )
        if not self.enabled:
            return None
        import mlflow
        from mlflow import MlflowClient

        from jobs.pyfunc_model import log_segvlm_model

        info = log_segvlm_model(checkpoint_dir, name="model")
        version = mlflow.register_model(info.model_uri, registered_name)
        MlflowClient(self.tracking_uri).set_registered_model_alias(registered_name, alias, version.version)
        return str(version.version)  # an int from a sqlite store, a str from a server

    @_relayable
    def system_metrics_step(self) -> int:
        """One past the run's last ``system/...`` step: where a resumed run's system metrics continue."""
        if not self.enabled or not self.run_id:
            return 0
        from mlflow import MlflowClient

        # the latest value of every metric with its step, as MLflow's own monitor reads it (no full history)
        metrics = MlflowClient(self.tracking_uri).get_run(self.run_id).data._metric_objs
        steps = [m.step for m in metrics if m.key.startswith("system/")]
        return max(steps) + 1 if steps else 0


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text[:6000]  # MLflow's param value limit


def _metric_key(key: str) -> str:
    # MLflow keys allow alphanumerics, _ - . space / : ; '@' is not among them.
    return key.replace("@", "_at_")
