"""``segvlm ui``: the MLflow UI over the local tracking store, bound to 127.0.0.1.

Launch::

    segvlm ui --workdir runs/demo            # then open http://127.0.0.1:5000
    segvlm ui --workdir runs/demo --port 5001 --host 0.0.0.0   # only if you mean to expose it

It runs ``mlflow server`` in the foreground (Ctrl-C stops it) against ``sqlite:///<workdir>/mlflow.db`` with
artifacts served from ``<workdir>/mlartifacts``, the same store ``segvlm train``/``demo`` write. With
``$MLFLOW_TRACKING_URI`` set (the store the jobs then write), it serves that database instead, or, when it
already names a tracking server (``http://…``), says so and starts nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from jobs.tracking import artifact_root, resolve_tracking_uri


def server_command(
    workdir: str | Path, *, host: str = "127.0.0.1", port: int = 5000, workers: int = 1
) -> list[str]:
    uri = resolve_tracking_uri("", workdir)
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri]
    command += ["--default-artifact-root", artifact_root(uri, workdir), "--host", host, "--port", str(port)]
    command += ["--workers", str(workers)]
    return command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="segvlm ui", description="Start the MLflow UI on the local store.")
    parser.add_argument(
        "--workdir", default="runs/demo", help="the folder holding mlflow.db (default runs/demo)"
    )
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument(
        "--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)"
    )
    args = parser.parse_args(argv)
    chosen = os.environ.get("MLFLOW_TRACKING_URI", "")
    if chosen.startswith(("http://", "https://")):
        print(f"MLFLOW_TRACKING_URI names a tracking server: open {chosen} (segvlm ui serves a local store)")
        return 0
    if not chosen and not (Path(args.workdir) / "mlflow.db").exists():
        print(
            f"segvlm ui: no MLflow store at {Path(args.workdir) / 'mlflow.db'}; run `segvlm demo` or train first"
        )
        return 2
    command = server_command(args.workdir, host=args.host, port=args.port)
    print(f"MLflow UI: http://{args.host}:{args.port}  (store {command[5]}; Ctrl-C to stop)", flush=True)
    env = os.environ | {"MLFLOW_DISABLE_TELEMETRY": "true"}
    try:
        return subprocess.call(command, env=env)
    except KeyboardInterrupt:
        return 0
