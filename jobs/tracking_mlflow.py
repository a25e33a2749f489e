"""Direct MLflow logging: the tracking store, and the logger that talks to it from this process.

Local default store: ``sqlite:///<workdir>/mlflow.db`` with artifacts in ``<workdir>/mlartifacts`` (MLflow 3
refuses a plain ``./mlruns`` file store, and a sqlite store without an experiment ``artifact_location`` drops
artifacts into ``<cwd>/mlruns``). On a cluster, pass ``--tracking-uri http://127.0.0.1:5000`` (the head's
server, reached through port forwarding).

The bottom of the tracking modules: it imports neither ``jobs.tracking`` nor ``jobs.tracking_relay``, and
MLflow only inside the functions that use it (ranks that log nothing never import it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jobs.environment import QUIET_ENV

# before any mlflow import (it reads the variable then), in processes that start no job (Ray workers)
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", QUIET_ENV["MLFLOW_DISABLE_TELEMETRY"])

SYSTEM_METRICS_INTERVAL_S = 10
SYSTEM_PREFIX = "system/"  # MLflow's own prefix for system metrics


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


class MlflowLogger:
    """Logs one MLflow run from this process, through MLflow's fluent API (its active run).

    ``start()`` creates a run or re-opens ``run_id`` (a resumed training run appends to the same MLflow run).
    With ``system_metrics``, MLflow's own monitor samples this process's node every
    ``SYSTEM_METRICS_INTERVAL_S`` seconds (``$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` overrides it).
    """

    enabled = True

    def __init__(
        self,
        *,
        tracking_uri: str = "",
        experiment: str = "segvlm",
        workdir: str | Path = "runs",
        run_id: str | None = None,
        run_name: str | None = None,
        system_metrics: bool = False,
        tags: Mapping[str, str] | None = None,
        parent_run_id: str | None = None,
    ) -> None:
        self.tracking_uri = resolve_tracking_uri(tracking_uri, workdir)
        self.experiment = experiment
        self.workdir = workdir
        self.run_id = run_id
        self.run_name = run_name
        self.system_metrics = system_metrics
        self.tags = dict(tags or {})
        self.parent_run_id = parent_run_id
        self._active = False

    # ---------------------------------------------------------------------------------------- lifecycle
    def start(self) -> str | None:
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

    def end(self, status: str = "FINISHED") -> None:
        if not self._active:
            return
        import mlflow

        mlflow.end_run(status=status)
        self._active = False

    def __enter__(self) -> MlflowLogger:
        self.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.end("FAILED" if exc_type else "FINISHED")

    # ------------------------------------------------------------------------------------------ logging
    def log_params(self, params: Mapping[str, Any]) -> None:
        import mlflow

        # MLflow rejects re-logging a param with a different value, which a resumed run may do: skip those.
        existing = mlflow.get_run(self.run_id).data.params if self.run_id else {}
        fresh = {k: _param_value(v) for k, v in params.items() if k not in existing}
        if fresh:
            mlflow.log_params(fresh)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        clean = {_metric_key(k): float(v) for k, v in metrics.items() if v is not None}
        if clean:
            import mlflow

            mlflow.log_metrics(clean, step=step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        import mlflow

        mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_image(self, image: Any, key: str, step: int) -> None:
        """A PIL image under ``key`` at ``step``: the MLflow UI shows a step slider for it."""
        import mlflow

        mlflow.log_image(image, key=key, step=step)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        import mlflow

        mlflow.log_figure(figure, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        import mlflow

        mlflow.log_text(text, artifact_file)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        import mlflow

        mlflow.log_dict(dict(data), artifact_file)

    def log_table(self, data: Mapping[str, Sequence[Any]], artifact_file: str) -> None:
        import mlflow

        mlflow.log_table({k: list(v) for k, v in data.items()}, artifact_file)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
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
        import mlflow
        from mlflow import MlflowClient

        from jobs.pyfunc_model import log_segvlm_model

        info = log_segvlm_model(checkpoint_dir, name="model")
        version = mlflow.register_model(info.model_uri, registered_name)
        MlflowClient(self.tracking_uri).set_registered_model_alias(registered_name, alias, version.version)
        return str(version.version)  # an int from a sqlite store, a str from a server

    def system_metrics_step(self, prefix: str = SYSTEM_PREFIX) -> int:
        """One past the run's last step of the metrics under ``prefix``: where a resumed run's system
        metrics continue (they are sampled elsewhere and logged through ``log_metrics``)."""
        if not self.run_id:
            return 0
        from mlflow import MlflowClient

        client = MlflowClient(self.tracking_uri)
        keys = sorted(k for k in client.get_run(self.run_id).data.metrics if k.startswith(prefix))
        if not keys:
            return 0
        # every sample logs all of its keys at one step, so one key's history holds the last step
        return max(m.step for m in client.get_metric_history(self.run_id, keys[0])) + 1


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text[:6000]  # MLflow's param value limit


def _metric_key(key: str) -> str:
    # MLflow keys allow alphanumerics, _ - . space / : ; '@' is not among them.
    return key.replace("@", "_at_")
