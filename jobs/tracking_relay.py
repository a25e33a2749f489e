"""Tracking relay: rank-0 MLflow logging that goes through a Ray actor on the driver's node.

On the cluster the MLflow server listens on the head's 127.0.0.1 only. The job driver (``segvlm train``,
started by ``segvlm submit`` as a Ray job) runs on the head and can reach it; the rank-0 Train worker runs on
a GPU node and cannot. ``run_training`` therefore starts a ``TrackingRelay`` actor pinned to the driver's node
(``start_relay``) and hands its handle to the workers; rank 0's ``RunLogger(relay=...)`` sends every call to
that actor, which runs it with an ordinary enabled ``RunLogger`` (same methods, same code as without a relay).

What runs where:

* worker (GPU node): the training loop; local files it logs (figures, folders) are read into bytes here;
  system metrics are *sampled* here (``RelayedSystemMetricsMonitor``), so they describe the GPU node.
* relay actor (driver's node): the MLflow client calls; shipped files are written to a temporary folder there
  and logged from it under the same artifact paths.
"""

from __future__ import annotations

import ipaddress
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

from jobs.tracking import SYSTEM_METRICS_INTERVAL_S, RunLogger

if TYPE_CHECKING:
    from ray.actor import ActorHandle

_logger = logging.getLogger(__name__)

RELAY_TAG = "segvlm.tracking_relay"  # set on the run by the relay: the node id it logged from

# A folder sent to the relay: (its name, {relative posix path: file bytes}).
PackedFolder = tuple[str, dict[str, bytes]]


def needs_relay(mode: str | bool, tracking_uri: str) -> bool:
    """Whether rank 0 should log through the relay (``TrackingConfig.relay``).

    ``"auto"``: when the tracking URI is an HTTP(S) server on a loopback address (``127.x``, ``localhost``,
    ``[::1]``), which only the driver's node can reach. ``"on"`` / ``"off"``: always / never (YAML reads an
    unquoted ``on`` / ``off`` as true / false, so both spellings are accepted).
    """
    if mode != "auto":
        return mode in ("on", True)
    parts = urlsplit(tracking_uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    if parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:  # a host name other than localhost
        return False


# ------------------------------------------------------------------------------------- files as bytes
def pack_folder(folder: str | Path) -> PackedFolder:
    """Every file under ``folder`` as bytes (runs where the files are: the worker)."""
    root = Path(folder)
    return root.name, {
        path.relative_to(root).as_posix(): path.read_bytes() for path in root.rglob("*") if path.is_file()
    }


def pack_figure(figure: Any, file_name: str) -> PackedFolder:
    """A matplotlib figure rendered as ``mlflow.log_figure`` would (format from the file's extension)."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format=Path(file_name).suffix.lstrip(".") or "png")
    return "figure", {file_name: buffer.getvalue()}


def relative_path_error(path: Any, what: str = "path") -> str | None:
    """Why ``path`` is not a relative POSIX path that stays inside the folder it is joined to."""
    if not isinstance(path, str) or not path:
        return f"{what} {path!r} is not a non-empty string"
    if path.startswith("/") or "\\" in path or "\x00" in path:
        return f"{what} {path!r} is absolute or holds a backslash or NUL"
    if any(part in ("", ".", "..") for part in path.split("/")):
        return f"{what} {path!r} has an empty, '.' or '..' component"
    return None


def unpack_folder(packed: PackedFolder, under: str | Path) -> Path:
    """Write a packed folder as ``under/<name>`` and return that path (runs in the relay actor).

    The name must be one plain component and every file a relative path without ``..``; each written path
    is checked again after resolving, so nothing lands outside ``under/<name>``.
    """
    name, files = packed
    error = relative_path_error(name, "folder name")
    if error is None and "/" in name:
        error = f"folder name {name!r} is not a single component"
    if error is None and not isinstance(files, dict):
        error = f"files is a {type(files).__name__}, not a dict"
    if error:
        raise ValueError(f"tracking relay: refused a packed folder: {error}")
    root = Path(under).resolve() / name
    for relative, data in files.items():
        error = relative_path_error(relative, "file")
        if error is None and not isinstance(data, bytes):
            error = f"file {relative!r} is a {type(data).__name__}, not bytes"
        if error is None and not (root / relative).resolve().is_relative_to(root):
            error = f"file {relative!r} resolves outside the folder"
        if error:
            raise ValueError(f"tracking relay: refused a packed folder: {error}")
    root.mkdir(parents=True, exist_ok=True)
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


# ------------------------------------------------------------------------------------ what is accepted
# RunLogger's logging methods (the ones it forwards through ``_relay_call``) and, for each, the positions
# and names of its artifact-path arguments, which MLflow joins to the run's artifact folder.
RELAYED_METHODS: dict[str, tuple[tuple[int, str], ...]] = {
    "log_params": (),
    "log_metrics": (),
    "set_tags": (),
    "log_image": ((1, "key"),),  # MLflow names the image files after the key
    "log_text": ((1, "artifact_file"),),
    "log_dict": ((1, "artifact_file"),),
    "log_artifacts": ((0, "artifact_path"),),  # args[0] after the unpacked folder
    "log_checkpoint_model": (),
    "system_metrics_step": (),
    "end": (),
}


def check_call(method: Any, args: Any, kwargs: Any, packed: Any) -> None:
    """Raise ValueError unless ``method`` is one of ``RELAYED_METHODS`` and its artifact paths are safe."""
    if not isinstance(method, str) or method not in RELAYED_METHODS:
        raise ValueError(f"tracking relay: {method!r} is not a logging method it relays")
    if not isinstance(args, tuple | list) or not isinstance(kwargs, dict):
        raise ValueError("tracking relay: args must be a tuple and kwargs a dict")
    for position, name in RELAYED_METHODS[method]:
        value = kwargs.get(name, args[position] if len(args) > position else None)
        if value is None and name == "artifact_path":
            continue  # the artifact root itself
        error = relative_path_error(value, name)
        if error:
            raise ValueError(f"tracking relay: {method}: {error}")
    if packed is not None and method not in ("log_artifacts", "log_checkpoint_model"):
        raise ValueError(f"tracking relay: {method} does not take a folder")


# ---------------------------------------------------------------------------------------- the actor
class TrackingRelay:
    """Ray actor on the driver's node: holds one enabled ``RunLogger`` and runs rank 0's calls with it.

    Calls are served one at a time (the default for a synchronous actor), so they reach MLflow in the order
    rank 0 made them, and MLflow's per-process active run is never shared between threads.
    """

    def __init__(self) -> None:
        import ray

        self.node_id = ray.get_runtime_context().get_node_id()
        self.logger: RunLogger | None = None

    def get_node_id(self) -> str:
        return self.node_id

    def open(self, settings: dict[str, Any]) -> str | None:
        """Start (or re-open) the run with ``RunLogger(enabled=True, **settings)``; return its id."""
        if self.logger is not None:
            # rank 0 of an earlier attempt died without ending its run (Ray Train restarted the workers)
            self.logger.end("FAILED")
        # never MLflow's own system-metrics monitor here: it would sample this node, not the worker's
        self.logger = RunLogger(enabled=True, **settings, system_metrics=False)
        run_id = self.logger.start()
        self.logger.set_tags({RELAY_TAG: self.node_id})
        return run_id

    def call(
        self, method: str, args: tuple, kwargs: dict[str, Any], packed: PackedFolder | None = None
    ) -> Any:
        """``logger.<method>(*args, **kwargs)``; with ``packed``, its folder (written to a temporary folder
        here) is the first argument. Only ``RELAYED_METHODS`` are run, and artifact paths must be relative
        paths inside the run's artifact folder (``check_call``): the actor acts on whatever it is sent."""
        check_call(method, args, kwargs, packed)
        if packed is None:
            return getattr(self.logger, method)(*args, **kwargs)
        with tempfile.TemporaryDirectory(prefix="segvlm-relay-") as tmp:
            return getattr(self.logger, method)(unpack_folder(packed, tmp), *args, **kwargs)

    def close(self, status: str) -> None:
        """End the run with ``status`` if rank 0 left it open (a failed fit); no-op after a clean end."""
        if self.logger is not None:
            self.logger.end(status)


def start_relay() -> ActorHandle:
    """Create a ``TrackingRelay`` on the node of the calling process (the driver) and wait until it is up.

    ``num_cpus=0``: it must not take a CPU the training workers asked for; hard node affinity
    (``soft=False``): on any other node it could not reach a loopback-only server.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node_id = ray.get_runtime_context().get_node_id()
    relay = (
        ray.remote(TrackingRelay)
        .options(
            num_cpus=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
        )
        .remote()
    )
    ray.get(relay.get_node_id.remote())  # surfaces a failure to start here, not in the middle of training
    return relay


def stop_relay(relay: ActorHandle, status: str = "FAILED") -> None:
    """End a run the workers left open (with ``status``), then kill the actor. Runs on the driver."""
    import ray

    try:
        ray.get(relay.close.remote(status), timeout=120)
    except Exception as err:  # the fit's own error, if any, matters more than this one
        _logger.warning("tracking relay: could not close the MLflow run: %s", err)
    finally:
        ray.kill(relay)


# ------------------------------------------------------------------------------------ system metrics
class RelayedSystemMetricsMonitor(SystemMetricsMonitor):
    """MLflow's system-metrics monitor, sampling the node of *this* process and publishing through the relay.

    Runs as a thread in the rank-0 worker: MLflow's CPU, memory, disk, network and GPU monitors sample the GPU
    node, and each aggregate is sent with ``logger.log_metrics`` (relay → MLflow on the driver's node) under
    MLflow's own names (``system/cpu_utilization_percentage`` ...) and steps. MLflow's own loop also asks the
    tracking server after every sample whether the run is still RUNNING, which this node may not reach:
    ``monitor`` drops that poll, and ``RunLogger.end`` stops the thread before it ends the run.
    """

    def __init__(self, logger: RunLogger, sampling_interval: float = SYSTEM_METRICS_INTERVAL_S) -> None:
        # resume_logging stays False: MLflow would read the last system step from the server itself
        super().__init__(logger.run_id, sampling_interval=sampling_interval, tracking_uri=logger.tracking_uri)
        self._run_logger = logger
        self._logging_step = logger.system_metrics_step()  # a resumed run continues its system steps

    def monitor(self) -> None:
        while not self._shutdown_event.is_set():
            for _ in range(self.samples_before_logging):
                self.collect_metrics()
                if self._shutdown_event.wait(self.sampling_interval):
                    return
            try:
                self.publish_metrics(self.aggregate_metrics())
            except Exception as err:
                _logger.warning("system metrics: could not log through the relay, stopping: %s", err)
                return

    def publish_metrics(self, metrics: dict[str, float]) -> None:
        prefix = self._metrics_prefix + (f"{self.node_id}/" if self.node_id else "")
        self._run_logger.log_metrics({prefix + k: v for k, v in metrics.items()}, step=self._logging_step)
        self._logging_step += 1
        for monitor in self.monitors:
            monitor.clear_metrics()
