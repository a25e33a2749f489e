"""Tracking relay: rank-0 MLflow logging that goes through a Ray actor on the driver's node.

On the cluster the MLflow server listens on the head's 127.0.0.1 only. The job driver (``segvlm train``,
started by ``segvlm submit`` as a Ray job) runs on the head and can reach it; the rank-0 Train worker runs on
a GPU node and cannot. ``run_training`` therefore starts a ``TrackingRelay`` actor pinned to the driver's node
(``start_relay``) and hands its handle to the workers; rank 0's logger is then a ``RelayedLogger``, which sends
every call to that actor, where an ordinary ``MlflowLogger`` (``jobs/tracking_mlflow.py``) runs it.

What runs where:

* worker (GPU node): the training loop; local files it logs (figures, folders) are read into bytes here;
  system metrics are *sampled* here (``SystemMetricsSampler``), so they describe the GPU node.
* relay actor (driver's node): the MLflow client calls; shipped files are written to a temporary folder there
  and logged from it under the same artifact paths.

Imports ``jobs.tracking_mlflow`` and nothing above it (``jobs.tracking`` imports this module); Ray, psutil and
MLflow only inside the functions that use them.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import posixpath
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from jobs.tracking_mlflow import SYSTEM_METRICS_INTERVAL_S, SYSTEM_PREFIX, MlflowLogger

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
# The methods ``RelayedLogger`` forwards (through ``_call``) and, for each, the positions
# and names of its artifact-path arguments, which MLflow joins to the run's artifact folder.
RELAYED_METHODS: dict[str, tuple[tuple[int, str], ...]] = {
    "log_params": (),
    "log_metrics": (),
    "set_tags": (),
    "log_image": ((1, "key"),),  # MLflow names the image files after the key
    "log_text": ((1, "artifact_file"),),
    "log_dict": ((1, "artifact_file"),),
    "log_table": ((1, "artifact_file"),),
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
    """Ray actor on the driver's node: holds one ``MlflowLogger`` and runs rank 0's calls with it.

    Calls are served one at a time (the default for a synchronous actor), so they reach MLflow in the order
    rank 0 made them, and MLflow's per-process active run is never shared between threads.
    """

    def __init__(self) -> None:
        import ray

        self.node_id = ray.get_runtime_context().get_node_id()
        self.logger: MlflowLogger | None = None

    def get_node_id(self) -> str:
        return self.node_id

    def open(self, settings: dict[str, Any]) -> str | None:
        """Start (or re-open) the run with ``MlflowLogger(**settings)``; return its id."""
        if self.logger is not None:
            # rank 0 of an earlier attempt died without ending its run (Ray Train restarted the workers)
            self.logger.end("FAILED")
        # never MLflow's own system-metrics monitor here: it would sample this node, not the worker's
        self.logger = MlflowLogger(**settings, system_metrics=False)
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
        if self.logger is None:
            raise RuntimeError(f"tracking relay: {method} before a run was opened")
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


# ---------------------------------------------------------------------------------------- the proxy
class RelayedLogger:
    """Rank 0's logger with a relay: every call runs in the ``TrackingRelay`` actor, on the driver's node.

    This process only ships arguments, reading local files (figures, folders) into bytes first. Calls block
    until the actor is done (``ray.get``), so errors surface at the call and the order is kept. With
    ``system_metrics``, a ``SystemMetricsSampler`` samples *this* node and logs through the relay.
    ``tracking_uri`` ``""`` (the local sqlite store) is resolved by the actor, on the driver's node.
    """

    enabled = True

    def __init__(
        self,
        relay: ActorHandle,
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
        self.relay = relay
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.system_metrics = system_metrics
        self._settings = {
            "tracking_uri": tracking_uri,
            "experiment": experiment,
            "workdir": str(workdir),
            "run_name": run_name,
            "tags": dict(tags or {}),
            "parent_run_id": parent_run_id,
        }
        self._active = False
        self._sampler: SystemMetricsSampler | None = None

    def _call(self, method: str, *args: Any, packed: PackedFolder | None = None, **kwargs: Any) -> Any:
        """Run ``method`` of the actor's ``MlflowLogger`` and wait for it; ``packed`` (a folder as bytes)
        becomes its first argument there."""
        import ray

        return ray.get(self.relay.call.remote(method, args, kwargs, packed))

    # ---------------------------------------------------------------------------------------- lifecycle
    def start(self) -> str | None:
        import ray

        self.run_id = ray.get(self.relay.open.remote({**self._settings, "run_id": self.run_id}))
        self._active = True
        if self.system_metrics:
            node_id = os.environ.get("MLFLOW_SYSTEM_METRICS_NODE_ID")  # MLflow's own setting, honoured alike
            prefix = SYSTEM_PREFIX + (f"{node_id}/" if node_id else "")
            # a resumed run continues its system steps
            first_step = self._call("system_metrics_step", prefix)
            self._sampler = SystemMetricsSampler(self.log_metrics, prefix=prefix, first_step=first_step)
            self._sampler.start()
        return self.run_id

    def end(self, status: str = "FINISHED") -> None:
        if not self._active:
            return
        if self._sampler is not None:
            # stopped first: a sample logged after the run ended would open a new run in the actor
            self._sampler.stop()
            self._sampler = None
        self._call("end", status)
        self._active = False

    def __enter__(self) -> RelayedLogger:
        self.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.end("FAILED" if exc_type else "FINISHED")

    # ------------------------------------------------------------------------------------------ logging
    def log_params(self, params: Mapping[str, Any]) -> None:
        self._call("log_params", params)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if metrics:
            self._call("log_metrics", metrics, step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._call("set_tags", tags)

    def log_image(self, image: Any, key: str, step: int) -> None:
        self._call("log_image", image, key, step)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        # the figure exists in this process only: ship its rendering, logged there as the same file
        folder, name = posixpath.split(artifact_file)
        self._call("log_artifacts", folder or None, packed=pack_figure(figure, name))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call("log_text", text, artifact_file)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        self._call("log_dict", data, artifact_file)

    def log_table(self, data: Mapping[str, Sequence[Any]], artifact_file: str) -> None:
        self._call("log_table", data, artifact_file)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self._call("log_artifacts", artifact_path, packed=pack_folder(local_dir))

    def log_checkpoint_model(
        self, checkpoint_dir: str | Path, registered_name: str, alias: str = "best"
    ) -> str | None:
        return self._call("log_checkpoint_model", registered_name, alias, packed=pack_folder(checkpoint_dir))


# ------------------------------------------------------------------------------------ system metrics
class SystemMetricsSampler:
    """Samples the node of this process on a thread of its own and hands each aggregate to ``log``.

    Same names, units and aggregation as MLflow's system-metrics monitor (``system/cpu_utilization_percentage``,
    ``system/system_memory_usage_megabytes``, ``system/disk_usage_percentage``,
    ``system/network_receive_megabytes``, ``system/gpu_0_utilization_percentage`` ...): the mean of
    ``samples_before_logging`` samples taken ``interval_s`` apart, rounded to 0.1; the network counters since
    the sampler started. Interval and sample count honour MLflow's own environment variables
    (``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``, ``MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING``). GPUs are
    read through NVML when ``nvidia-ml-py`` is installed, as MLflow does.

    ``log(metrics, step)`` runs on the sampler's thread; the first error it raises stops the sampler (the
    tracking server may be gone) with one warning. ``stop()`` drops a partial aggregate.
    """

    def __init__(
        self,
        log: Callable[[dict[str, float], int], None],
        *,
        prefix: str = SYSTEM_PREFIX,
        first_step: int = 0,
        interval_s: float | None = None,
        samples_before_logging: int | None = None,
    ) -> None:
        import psutil

        self.log = log
        self.prefix = prefix
        self.step = first_step
        self.interval_s = interval_s or float(
            os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL") or SYSTEM_METRICS_INTERVAL_S
        )
        self.samples_before_logging = samples_before_logging or int(
            os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING") or 1
        )
        self._psutil = psutil
        self._net_start = psutil.net_io_counters()
        psutil.cpu_percent()  # its first reading covers the time since this call
        self._nvml, self._gpus = _nvml_handles()
        self._samples: dict[str, list[float]] = {}
        self._network: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="segvlm-system-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while True:
            for _ in range(self.samples_before_logging):
                self.sample()
                if self._stop.wait(self.interval_s):
                    return
            try:
                self.log(self.aggregate(), self.step)
            except Exception as err:
                _logger.warning("system metrics: could not log them, stopping: %s", err)
                return
            self.step += 1

    def sample(self) -> None:
        """One reading of every metric, kept until ``aggregate``."""
        ps = self._psutil
        memory = ps.virtual_memory()
        disk = ps.disk_usage(os.sep)
        readings = {
            "cpu_utilization_percentage": ps.cpu_percent(),
            "system_memory_usage_megabytes": memory.used / 1e6,
            "system_memory_usage_percentage": memory.used / memory.total * 100,
            "disk_usage_percentage": disk.percent,
            "disk_usage_megabytes": disk.used / 1e6,
            "disk_available_megabytes": disk.free / 1e6,
        }
        for index, handle in enumerate(self._gpus):
            readings.update(_gpu_readings(self._nvml, index, handle))
        for key, value in readings.items():
            self._samples.setdefault(key, []).append(value)
        net = ps.net_io_counters()
        self._network = {
            "network_receive_megabytes": (net.bytes_recv - self._net_start.bytes_recv) / 1e6,
            "network_transmit_megabytes": (net.bytes_sent - self._net_start.bytes_sent) / 1e6,
        }

    def aggregate(self) -> dict[str, float]:
        """The mean of the samples since the last call (then forgotten), under ``prefix``."""
        means = {k: round(sum(v) / len(v), 1) for k, v in self._samples.items() if v}
        self._samples = {}
        return {self.prefix + k: v for k, v in {**means, **self._network}.items()}


def _nvml_handles() -> tuple[Any, list[Any]]:
    """(the NVML module, one handle per GPU), or (None, []) without ``nvidia-ml-py`` or without a GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml, [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:  # ImportError, or NVMLError on a node without a driver: no GPU metrics, as MLflow
        return None, []


def _gpu_readings(nvml: Any, index: int, handle: Any) -> dict[str, float]:
    readings: dict[str, float] = {}
    try:
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        readings[f"gpu_{index}_memory_usage_percentage"] = round(memory.used / memory.total * 100, 1)
        readings[f"gpu_{index}_memory_usage_megabytes"] = memory.used / 1e6
        readings[f"gpu_{index}_utilization_percentage"] = nvml.nvmlDeviceGetUtilizationRates(handle).gpu
        power = nvml.nvmlDeviceGetPowerUsage(handle)
        readings[f"gpu_{index}_power_usage_watts"] = power / 1000
        readings[f"gpu_{index}_power_usage_percentage"] = (
            power / nvml.nvmlDeviceGetEnforcedPowerLimit(handle) * 100
        )
    except nvml.NVMLError as err:  # a GPU without a power reading still reports the rest
        _logger.debug("system metrics: GPU %d: %s", index, err)
    return readings
