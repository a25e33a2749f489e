"""The user's environment decides the hub and the MLflow store; our jobs only add quiet defaults.

``HF_HUB_OFFLINE`` (set by tests/conftest.py for the test session) is the user's: jobs never set it, Ray
workers and submitted jobs get it only when the caller has it. ``MLFLOW_TRACKING_URI`` is the store of every
entry point that is given no ``--tracking-uri`` (and no ``tracking.uri``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from jobs import submit
from jobs.environment import USER_ENV, job_env_vars
from jobs.tracking import resolve_tracking_uri

REPO = Path(__file__).resolve().parents[2]


def test_a_job_started_without_hub_settings_does_not_go_offline():
    # a fresh interpreter with neither HF_HUB_OFFLINE nor MLFLOW_TRACKING_URI: after the jobs' environment
    # set-up, both are still unset (huggingface_hub then may download, as the user's machine allows)
    env = {k: v for k, v in os.environ.items() if k not in USER_ENV}
    code = (
        "import os\nfrom jobs.environment import quiet_environment, job_env_vars\nquiet_environment()\n"
        "print(os.environ.get('HF_HUB_OFFLINE'), os.environ.get('MLFLOW_DISABLE_TELEMETRY'),"
        " sorted(job_env_vars(os.environ)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
    ).stdout.split(maxsplit=2)
    assert out[0] == "None"
    assert out[1] == "true"
    assert "HF_HUB_OFFLINE" not in out[2] and "MLFLOW_TRACKING_URI" not in out[2]


def test_worker_env_carries_the_users_choices_and_nothing_else():
    assert job_env_vars({}) == {
        "RAY_USAGE_STATS_ENABLED": "0",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_TRAIN_V2_ENABLED": "1",
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        "RAY_DATA_LOG_LEVEL": "WARNING",
        "MLFLOW_LOGGING_LEVEL": "WARNING",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    caller = {
        "HF_HUB_OFFLINE": "0",
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
        "MLFLOW_DISABLE_TELEMETRY": "false",
        "HOME": "/home/someone",
        "AWS_SECRET_ACCESS_KEY": "never-shipped",
    }
    env = job_env_vars(caller)
    assert env["HF_HUB_OFFLINE"] == "0"
    assert env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "false"  # the caller's value over our default
    assert "HOME" not in env and "AWS_SECRET_ACCESS_KEY" not in env


def test_a_submitted_job_inherits_the_callers_hub_choice_only_when_set():
    unset = submit.build_runtime_env("/w", None, environ={})["env_vars"]
    assert "HF_HUB_OFFLINE" not in unset and "MLFLOW_TRACKING_URI" not in unset
    offline = submit.build_runtime_env("/w", None, environ={"HF_HUB_OFFLINE": "1"})["env_vars"]
    assert offline["HF_HUB_OFFLINE"] == "1"
    online = submit.build_runtime_env(
        "/w", None, environ={"HF_HUB_OFFLINE": "0", "MLFLOW_TRACKING_URI": "http://head:5000"}
    )["env_vars"]
    assert online["HF_HUB_OFFLINE"] == "0" and online["MLFLOW_TRACKING_URI"] == "http://head:5000"
    # --runtime-env-json still has the last word
    forced = submit.build_runtime_env(
        "/w", {"env_vars": {"HF_HUB_OFFLINE": "1"}}, environ={"HF_HUB_OFFLINE": "0"}
    )["env_vars"]
    assert forced["HF_HUB_OFFLINE"] == "1"


def test_tracking_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri("", tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri("", tmp_path) == "http://127.0.0.1:5999"  # train, ablate, demo
    assert (
        resolve_tracking_uri("sqlite:///x.db", tmp_path) == "sqlite:///x.db"
    )  # --tracking-uri / tracking.uri


def test_two_jobs_in_one_process_each_log_to_their_own_workdir(monkeypatch, tmp_path):
    # mlflow.set_tracking_uri exports $MLFLOW_TRACKING_URI; the first job's store must not become the
    # second job's default (nor reach Ray workers as if the user had chosen it)
    from mlflow import MlflowClient

    from jobs.tracking import RunLogger

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_ids = []
    for name in ("first", "second"):
        with RunLogger(enabled=True, workdir=tmp_path / name, experiment="two-jobs") as logger:
            logger.log_metrics({"job_index": len(run_ids)}, step=0)
        assert "MLFLOW_TRACKING_URI" not in os.environ
        run_ids.append(logger.run_id)
    for index, name in enumerate(("first", "second")):
        client = MlflowClient(f"sqlite:///{tmp_path.resolve() / name / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name("two-jobs").experiment_id])
        assert [(r.info.run_id, r.data.metrics["job_index"]) for r in runs] == [(run_ids[index], index)]

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path.resolve() / 'users.db'}")
    with RunLogger(enabled=True, workdir=tmp_path / "third", experiment="two-jobs"):
        pass
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path.resolve() / 'users.db'}"
    assert (tmp_path / "users.db").exists() and not (tmp_path / "third" / "mlflow.db").exists()


def test_eval_logs_to_mlflow_tracking_uri_when_no_flag(monkeypatch, tmp_path):
    from jobs import eval as eval_job

    calls = []
    monkeypatch.setattr(eval_job, "run_eval", lambda *a, **kw: calls.append(kw) or {})
    monkeypatch.setattr("segvlm.metrics.format_markdown_table", lambda report: "")
    (tmp_path / "ckpt").mkdir()  # --out beside the checkpoint: eval refuses an output inside it
    argv = ["--checkpoint", str(tmp_path / "ckpt"), "--data", str(tmp_path), "--split", "test"]
    argv += ["--out", str(tmp_path / "o")]
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert eval_job.main(argv) == 0
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5998")
    assert eval_job.main(argv) == 0
    assert eval_job.main([*argv, "--tracking-uri", "sqlite:///flag.db"]) == 0
    assert [c["tracking_uri"] for c in calls] == [None, "http://127.0.0.1:5998", "sqlite:///flag.db"]


def test_ui_serves_the_store_mlflow_tracking_uri_names(monkeypatch, tmp_path, capsys):
    from jobs import ui

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    command = ui.server_command(tmp_path / "workdir")
    assert command[command.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5997")
    assert ui.main(["--workdir", str(tmp_path / "nothing-here")]) == 0  # starts nothing
    assert "open http://127.0.0.1:5997" in capsys.readouterr().out
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert ui.main(["--workdir", str(tmp_path / "nothing-here")]) == 2  # no local store to serve


def test_the_demos_local_only_environment_goes_offline_unless_the_user_chose(monkeypatch):
    from jobs.demo import local_only_environment
    from jobs.environment import QUIET_ENV

    for key in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS", *QUIET_ENV):
        monkeypatch.delenv(key, raising=False)
    local_only_environment()
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"  # the quiet defaults come with it
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "1")
    local_only_environment()
    assert os.environ["HF_HUB_OFFLINE"] == "0" and os.environ["RAY_USAGE_STATS_ENABLED"] == "1"
