"""``segvlm submit`` against a real local Ray cluster (``ray start --head``) with Ray 2.60 token authentication.

The cluster runs in its own process group and temp dir; teardown kills exactly those processes (by pid), never
``ray stop``, which would kill every Ray process on the machine, including other people's.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from jobs import submit
from tests.servers import free_port

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


# ---------------------------------------------------------------------------------------------- pure helpers
def test_split_argv_keeps_the_command_flags() -> None:
    own, cmd = submit.split_argv(["--address", "http://h:8265", "--", "prepare", "--out", "x", "--", "y"])
    assert own == ["--address", "http://h:8265"]
    assert cmd == ["prepare", "--out", "x", "--", "y"]


def test_entrypoint_is_quoted_for_the_shell() -> None:
    entry = submit.build_entrypoint(["train", "data.train_shards=s3://b/x y", "--name", "a;rm -rf ~"])
    assert entry == "python -m jobs.cli train 'data.train_shards=s3://b/x y' --name 'a;rm -rf ~'"


def test_runtime_env_defaults_and_merge() -> None:
    env = submit.build_runtime_env("/w", {"env_vars": {"HF_HUB_OFFLINE": "0", "X": 1}, "excludes": ["big/"]})
    assert env["working_dir"] == "/w"
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "0"  # the user's value wins
    assert env["env_vars"]["X"] == "1"  # env_vars must be strings
    assert env["env_vars"]["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert env["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"
    assert {"/.venv/", "/.git/", "/runs/", "big/"} <= set(env["excludes"])
    # a working_dir URI given by the user replaces the upload
    assert (
        submit.build_runtime_env("/w", {"working_dir": "s3://b/code.zip"})["working_dir"] == "s3://b/code.zip"
    )


def test_resolve_token_order(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    path_file = tmp_path / "tok"
    path_file.write_text("from-path")
    explicit = tmp_path / "explicit"
    explicit.write_text(" from-flag \n")

    env = {"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(path_file)}
    assert submit.resolve_token(str(explicit), env, home)[0] == "from-flag"
    assert submit.resolve_token(None, env, home)[0] == "from-env"
    assert submit.resolve_token(None, {"RAY_AUTH_TOKEN_PATH": str(path_file)}, home)[0] == "from-path"
    assert submit.resolve_token(None, {}, home)[0] == "from-home"
    assert submit.resolve_token(None, {"RAY_AUTH_MODE": "disabled"}, home) is None
    assert submit.resolve_token(None, {}, tmp_path / "nobody") is None
    with pytest.raises(submit.TokenError):
        submit.resolve_token(None, {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, home)
    assert submit.auth_headers("t") == {"Authorization": "Bearer t"}
    assert submit.auth_headers(None) == {}


def test_default_address_prefers_ray_env() -> None:
    assert submit.default_address({}) == "http://127.0.0.1:8265"
    assert submit.default_address({"RAY_ADDRESS": "http://h:1"}) == "http://h:1"
    assert (
        submit.default_address({"RAY_ADDRESS": "http://h:1", "RAY_API_SERVER_ADDRESS": "http://a:2"})
        == "http://a:2"
    )


def test_usage_errors() -> None:
    with pytest.raises(SystemExit):
        submit.main(["--address", "http://127.0.0.1:9"])  # no command
    with pytest.raises(SystemExit):
        submit.main(["--runtime-env-json", "{nope", "--", "params"])


def test_unreachable_dashboard_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    code = submit.main(["--address", f"http://127.0.0.1:{free_port()}", "--status", "x"])
    assert code == 2
    assert "cannot reach the Ray dashboard" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- real cluster


@dataclass
class Cluster:
    address: str
    token: str | None
    tmp: Path


def _kill_cluster(proc: subprocess.Popen, temp_dir: str) -> None:
    """SIGKILL every process of *this* cluster, found by pid: `ray start --block` and all its descendants
    (workers and job drivers start their own sessions but stay descendants), plus any process that was
    reparented but still runs in this cluster's unique temp dir."""
    import psutil

    try:
        victims = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        victims = []
    for p in psutil.process_iter(["cmdline", "cwd"]):
        try:
            if temp_dir in " ".join(p.info["cmdline"] or []) or (p.info["cwd"] or "").startswith(temp_dir):
                victims.append(p)
        except (psutil.Error, OSError):
            pass
    for p in victims:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(victims, timeout=10)
    proc.wait(timeout=10)


def _start_cluster(tmp: Path, auth_mode: str) -> tuple[subprocess.Popen, str, Cluster]:
    # A short temp dir: Ray's unix sockets live under it and their paths are limited to 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rs", dir="/tmp")
    token = secrets.token_hex(16) if auth_mode == "token" else None
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("RAY_AUTH") and k not in submit.ADDRESS_ENV_VARS
    }
    env.update(
        RAY_AUTH_MODE=auth_mode,
        HOME=str(tmp / "head-home"),  # never read or write the real ~/.ray/auth_token
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # the job's `python` is this venv's
        RAY_USAGE_STATS_ENABLED="0",
    )
    if token:
        env["RAY_AUTH_TOKEN"] = token
    dash = free_port()
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1", "--port", str(free_port()),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
        "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
        "--metrics-export-port", str(free_port()), "--num-cpus", "2", "--temp-dir", temp_dir,
        "--disable-usage-stats",
    ]  # fmt: skip
    log = open(tmp / "ray-start.log", "w")  # noqa: SIM115 - lives as long as the cluster
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # 401: up, and asking for the token
            break
        except OSError:
            time.sleep(0.5)
    else:
        _kill_cluster(proc, temp_dir)
        pytest.skip(f"ray start did not come up within 60 s: {(tmp / 'ray-start.log').read_text()[-2000:]}")
    if proc.poll() is not None:
        _kill_cluster(proc, temp_dir)
        pytest.skip(f"ray start exited: {(tmp / 'ray-start.log').read_text()[-2000:]}")
    return proc, temp_dir, Cluster(address, token, tmp)


@pytest.fixture
def client_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The submitting side: no token anywhere unless a test supplies one."""
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", *submit.ADDRESS_ENV_VARS):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "client-home"))
    return tmp_path


@pytest.fixture
def token_cluster(client_env: Path) -> Iterator[Cluster]:
    proc, temp_dir, cluster = _start_cluster(client_env, "token")
    try:
        yield cluster
    finally:
        _kill_cluster(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def open_cluster(client_env: Path) -> Iterator[Cluster]:
    proc, temp_dir, cluster = _start_cluster(client_env, "disabled")
    try:
        yield cluster
    finally:
        _kill_cluster(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = submit.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow
def test_submit_with_token_auth(
    token_cluster: Cluster, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    c, tmp = token_cluster, token_cluster.tmp
    monkeypatch.chdir(REPO)
    scenes, shards = tmp / "scenes", tmp / "shards"
    synth = ["--", "synth-scenes", "--out", str(scenes), "--images", "12", "--seed", "0"]

    # no token: refused before anything runs, with the way out in the message
    code, _, err = _run(capsys, "--address", c.address, *synth)
    assert code == 2
    assert "Missing authentication token" in err and "--token-file" in err and "RAY_AUTH_TOKEN" in err
    # a wrong token is told apart from a missing one
    bad = tmp / "bad-token"
    bad.write_text("not-the-token")
    code, _, err = _run(capsys, "--address", c.address, "--token-file", str(bad), *synth)
    assert code == 2 and "Invalid authentication token" in err

    good = tmp / "token"
    good.write_text(c.token + "\n")
    code, out, err = _run(capsys, "--address", c.address, "--token-file", str(good), *synth)
    assert code == 0, out + err
    assert "wrote 12 images" in out  # the job's own output was followed
    assert (scenes / "image_data_split.json").is_file()

    # the token from the environment, as Ray's own loader reads it; address from RAY_ADDRESS
    monkeypatch.setenv("RAY_AUTH_TOKEN", c.token)
    monkeypatch.setenv("RAY_ADDRESS", c.address)
    code, out, err = _run(
        capsys,
        "--",
        "prepare",
        "--source",
        "scenes",
        "--root",
        str(scenes),
        "--split",
        "train",
        "--out",
        str(shards),
    )
    assert code == 0, out + err
    assert (shards / "manifest.parquet").is_file()
    assert list(shards.glob("*.tar"))

    # a failing job: non-zero exit, and the end of its log (the traceback) on stderr
    code, out, err = _run(
        capsys, "--", "prepare", "--source", "scenes", "--root", "/nonexistent", "--split", "train",
        "--out", str(tmp / "nope"),
    )  # fmt: skip
    assert code == 1
    assert "FAILED" in err and "last 40 log lines" in err and "/nonexistent" in err
    job_id = out.split()[1]
    assert job_id.startswith("segvlm-prepare-")

    code, out, _ = _run(capsys, "--status", job_id)
    assert code == 0 and "FAILED" in out
    code, out, _ = _run(capsys, "--logs", job_id)
    assert code == 0 and "/nonexistent" in out

    # --no-wait returns at once; --stop ends the job
    code, out, _ = _run(
        capsys, "--no-wait", "--runtime-env-json", json.dumps({"env_vars": {"SEGVLM_T": "1"}}), "--",
        "synth-scenes", "--out", str(tmp / "big"), "--images", "100000", "--seed", "1",
    )  # fmt: skip
    assert code == 0
    job_id = out.split()[1]
    code, out, _ = _run(capsys, "--stop", job_id)
    assert code == 0 and job_id in out
    client = submit.make_client(c.address, c.token)
    deadline = time.monotonic() + 30
    while not client.get_job_status(job_id).is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert str(client.get_job_status(job_id).value) == "STOPPED"


@pytest.mark.slow
def test_submit_without_auth(open_cluster: Cluster, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    out_dir = open_cluster.tmp / "scenes"
    code, out, err = _run(
        capsys,
        "--address",
        open_cluster.address,
        "--",
        "synth-scenes",
        "--out",
        str(out_dir),
        "--images",
        "4",
    )
    assert code == 0, out + err
    assert (out_dir / "image_data_split.json").is_file()
