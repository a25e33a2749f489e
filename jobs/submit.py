"""Run any ``segvlm`` subcommand as a Ray Job on a cluster, shipping this checkout as the job's working_dir.

Launch::

    segvlm submit --address http://127.0.0.1:8265 -- prepare --source scenes --root /data/scenes \\
        --split train --out s3://BUCKET/scenes/train
    segvlm submit --no-wait -- train --config configs/phrasecut_b16.yaml train.num_workers=4 train.use_gpu=true
    segvlm submit --status ID | --logs ID | --stop ID
    # options: --working-dir DIR (default .), --runtime-env-json JSON, --token-file PATH, --python EXE

The job runs ``python -m jobs.cli <subcommand> <args>`` inside the uploaded working_dir, so the cluster runs the
code of this checkout (not whatever copy is installed there); only the dependencies must be installed on the nodes.
Relative paths in the arguments are relative to that uploaded folder, so data and outputs should be absolute paths
on the nodes or URIs (s3://...).

Ray 2.60 token authentication: every request carries ``Authorization: Bearer <token>`` when a token is found, from
(first wins) ``--token-file``, ``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token`` — the same
sources, in the same order, as Ray's own token loader. ``RAY_AUTH_MODE=disabled`` on the client skips the
implicit sources. Exit status: 0 when the job SUCCEEDED, 1 when it FAILED or was STOPPED, 2 for usage,
connection and authentication errors, 130 when interrupted (the job keeps running).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shlex
import sys
import time
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from jobs.environment import job_env_vars

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Environment variables JobSubmissionClient lets override its `address` argument (ray/dashboard/utils.py,
# get_address_for_submission_client); we read them for the default and hide them so --address always wins.
ADDRESS_ENV_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
# Never upload these (Ray also honours .gitignore/.rayignore; these hold for checkouts without one). Anchored
# with a leading slash so that e.g. a package folder called `data` deeper down still ships.
DEFAULT_EXCLUDES: tuple[str, ...] = (
    "/.venv/",
    "/venv/",
    "/.git/",
    "/runs/",
    "/mlruns/",
    "/mlartifacts/",
    "/mlflow.db",
    "/data/",
    "/shards/",
    "/checkpoints/",
    "/workdir/",
    "/demo_out/",
    "/build/",
    "*.egg-info/",
    "__pycache__/",
    ".pytest_cache/",
    ".ruff_cache/",
    "*.safetensors",
    "*.tar",
)
LOG_TAIL_LINES = 40
TOKEN_HELP = (
    "The cluster uses Ray token authentication (RAY_AUTH_MODE=token). Give this client the cluster's token:\n"
    "  - copy it from the head:  ray exec cluster.yaml 'cat ~/.ray/auth_token' > ~/.ray/auth_token  (ray up\n"
    "    with our cluster.yaml ships YOUR ~/.ray/auth_token to the nodes, so it is normally already there),\n"
    "  - or pass --token-file PATH, or set RAY_AUTH_TOKEN=<token> or RAY_AUTH_TOKEN_PATH=PATH.\n"
    "On a local `ray start --head` cluster the token is the ~/.ray/auth_token (or RAY_AUTH_TOKEN) it started with."
)


class TokenError(RuntimeError):
    """A configured token source cannot be read."""


def default_address(environ: Mapping[str, str]) -> str:
    """The address Ray's own job CLI would use: RAY_API_SERVER_ADDRESS, then RAY_ADDRESS, then localhost."""
    for name in ADDRESS_ENV_VARS:
        if environ.get(name):
            return environ[name]
    return DEFAULT_ADDRESS


def resolve_token(
    token_file: str | None, environ: Mapping[str, str], home: Path | None = None
) -> tuple[str, str] | None:
    """``(token, source)`` from the first configured source, or None. Mirrors Ray's AuthenticationTokenLoader order."""
    if token_file:
        return _read_token(Path(token_file).expanduser(), "--token-file"), f"--token-file {token_file}"
    if environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return environ["RAY_AUTH_TOKEN"].strip(), "$RAY_AUTH_TOKEN"
    if environ.get("RAY_AUTH_TOKEN_PATH"):
        # Ray aborts on an unreadable RAY_AUTH_TOKEN_PATH instead of falling back; so do we.
        path = Path(environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        return _read_token(path, "RAY_AUTH_TOKEN_PATH"), f"$RAY_AUTH_TOKEN_PATH ({path})"
    default = (home if home is not None else Path.home()) / ".ray" / "auth_token"
    if default.is_file():
        token = default.read_text().strip()
        if token:
            return token, str(default)
    return None


def _read_token(path: Path, what: str) -> str:
    try:
        token = path.read_text().strip()
    except OSError as err:
        raise TokenError(f"cannot read the token file given by {what}: {err}") from None
    if not token:
        raise TokenError(f"the token file given by {what} ({path}) is empty")
    return token


def auth_headers(token: str | None) -> dict[str, str]:
    """The header Ray's dashboard middleware checks first (http_token_authentication.py)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def build_entrypoint(command: list[str], python: str = "python") -> str:
    """Shell command the job supervisor runs (with shell=True): quoted, so arguments reach argparse unchanged."""
    return shlex.join([python, "-m", "jobs.cli", *command])


def build_runtime_env(
    working_dir: str | None,
    extra: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Our defaults merged with ``--runtime-env-json``: its env_vars override ours, its excludes add to ours.

    The job's environment: no telemetry, plus the caller's own ``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``,
    ``HF_ENDPOINT`` and ``MLFLOW_TRACKING_URI`` when ``environ`` (default ``os.environ``) sets them; unset,
    the nodes' own settings apply."""
    extra = dict(extra or {})
    env_vars = {
        **job_env_vars(os.environ if environ is None else environ),
        **{k: str(v) for k, v in (extra.pop("env_vars", None) or {}).items()},
    }
    excludes = [
        *DEFAULT_EXCLUDES,
        *[e for e in extra.pop("excludes", None) or [] if e not in DEFAULT_EXCLUDES],
    ]
    runtime_env: dict[str, Any] = {"env_vars": env_vars}
    if working_dir is not None:
        runtime_env["working_dir"] = working_dir
        runtime_env["excludes"] = excludes
    runtime_env.update(extra)  # e.g. pip, or a working_dir URI (s3://.../code.zip) replacing the upload
    return runtime_env


def make_submission_id(command: list[str], now: datetime | None = None) -> str:
    """Readable and unique: ``segvlm-prepare-20250101-120000-1a2b``."""
    name = command[0] if command else "job"
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    return f"segvlm-{name}-{stamp}-{secrets.token_hex(2)}"


def exit_code_for(status: str) -> int:
    return 0 if status == "SUCCEEDED" else 1


def log_tail(logs: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(logs.rstrip("\n").splitlines()[-lines:])


@contextlib.contextmanager
def _hidden_env(names: tuple[str, ...]) -> Iterator[None]:
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def make_client(address: str, token: str | None) -> Any:
    from ray.job_submission import JobSubmissionClient

    with _hidden_env(ADDRESS_ENV_VARS):
        return JobSubmissionClient(address, headers=auth_headers(token))


def follow(client: Any, job_id: str, poll_s: float = 1.0) -> str:
    """Stream the job's logs to stdout until it ends; return its final status."""

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    try:
        asyncio.run(_tail())
    except RuntimeError as err:  # the websocket dropped (head restart, proxy): the status tells how it ended
        print(f"\nsubmit: log stream interrupted ({err}); polling the job status", file=sys.stderr)
    while not (status := client.get_job_status(job_id)).is_terminal():
        time.sleep(poll_s)
    return str(status.value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segvlm submit",
        description=__doc__.splitlines()[0],
        usage="segvlm submit [options] -- <segvlm subcommand> [args...]\n"
        "       segvlm submit [--address URL] (--status ID | --logs ID | --stop ID)",
    )
    parser.add_argument(
        "--address",
        default=default_address(os.environ),
        help=f"Ray dashboard URL (default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS or {DEFAULT_ADDRESS})",
    )
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    parser.add_argument(
        "--working-dir", default=".", help="folder shipped to the cluster as the job's code (.)"
    )
    parser.add_argument(
        "--runtime-env-json", default=None, help="extra runtime_env, merged with the defaults"
    )
    parser.add_argument("--python", default="python", help="interpreter on the cluster (python)")
    parser.add_argument("--submission-id", default=None, help="job id (default: segvlm-<cmd>-<time>-<hex>)")
    parser.add_argument("--token-file", default=None, help="file with the cluster's Ray auth token")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--status", metavar="ID", help="print a job's status")
    action.add_argument("--logs", metavar="ID", help="print a job's logs")
    action.add_argument("--stop", metavar="ID", help="stop a job")
    return parser


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Options before ``--``, the segvlm command after it (so its own ``--flags`` are not ours)."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def main(argv: list[str] | None = None) -> int:
    """Submit a segvlm subcommand as a Ray Job, follow it, exit with its status."""
    own, command = split_argv(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(own)
    query = args.status or args.logs or args.stop
    if not query and not command:
        parser.error(
            "give the segvlm command after `--`, e.g. `segvlm submit -- prepare --source scenes ...`"
        )
    if query and command:
        parser.error("--status/--logs/--stop take no command")
    try:
        extra_env = json.loads(args.runtime_env_json) if args.runtime_env_json else None
    except json.JSONDecodeError as err:
        parser.error(f"--runtime-env-json is not JSON: {err}")
    if extra_env is not None and not isinstance(extra_env, dict):
        parser.error("--runtime-env-json must be a JSON object")
    if not query and not Path(args.working_dir).is_dir():
        parser.error(f"--working-dir {args.working_dir} is not a folder")

    from ray.exceptions import AuthenticationError

    try:
        found = resolve_token(args.token_file, os.environ)
        client = make_client(args.address, found[0] if found else None)
        if args.status:
            info = client.get_job_info(args.status)
            print(f"{args.status}: {info.status.value}" + (f" ({info.message})" if info.message else ""))
            return 0
        if args.logs:
            print(client.get_job_logs(args.logs), end="")
            return 0
        if args.stop:
            stopped = client.stop_job(args.stop)
            print(f"{args.stop}: {'stop requested' if stopped else 'already finished'}")
            return 0
        return _submit(client, args, command, extra_env)
    except AuthenticationError as err:
        source = f" (token sent from {found[1]})" if found else " (no token found, none sent)"
        print(
            f"submit: {args.address} refused the request{source}:\n{err.message}\n\n{TOKEN_HELP}",
            file=sys.stderr,
        )
        return 2
    except TokenError as err:
        print(f"submit: {err}", file=sys.stderr)
        return 2
    except (ConnectionError, _requests_connection_error()) as err:
        print(
            f"submit: cannot reach the Ray dashboard at {args.address}: {err}\n"
            "Is the cluster up and the port forwarded (`ray dashboard cluster.yaml`)?",
            file=sys.stderr,
        )
        return 2
    except RuntimeError as err:  # the job server's answer to a bad request, e.g. an unknown job id
        print(f"submit: {err}", file=sys.stderr)
        return 2


def _requests_connection_error() -> type[Exception]:
    # Ray turns the first failed request into the builtin ConnectionError; later ones surface as requests'.
    import requests

    return requests.exceptions.ConnectionError


def _submit(client: Any, args: argparse.Namespace, command: list[str], extra_env: dict | None) -> int:
    working_dir = str(Path(args.working_dir).resolve())
    runtime_env = build_runtime_env(working_dir, extra_env)
    job_id = client.submit_job(
        entrypoint=build_entrypoint(command, args.python),
        runtime_env=runtime_env,
        submission_id=args.submission_id or make_submission_id(command),
    )
    print(f"submitted {job_id} to {args.address}", flush=True)
    if args.no_wait:
        print(
            f"follow it with: segvlm submit --address {args.address} --logs {job_id} (or --status / --stop)"
        )
        return 0
    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        print(
            f"\nsubmit: stopped following; {job_id} keeps running (--stop {job_id} ends it)", file=sys.stderr
        )
        return 130
    if status != "SUCCEEDED":
        info = client.get_job_info(job_id)
        tail = log_tail(client.get_job_logs(job_id))
        print(
            f"\njob {job_id} {status}" + (f": {info.message}" if info.message else "") + "\n"
            f"---- last {LOG_TAIL_LINES} log lines ----\n{tail}\n---- end of log ----",
            file=sys.stderr,
        )
    else:
        print(f"job {job_id} SUCCEEDED")
    return exit_code_for(status)


if __name__ == "__main__":
    sys.exit(main())
