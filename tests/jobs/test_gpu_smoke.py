"""benchmarks/gpu_smoke.py, tiny on the CPU: the GPU run's code path end to end, and its report is sane."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PHASES = {"data_wait", "forward", "backward", "optimizer"}


def test_tiny_smoke_run_reports_both_models(tmp_path):
    out = tmp_path / "smoke.json"
    command = [sys.executable, "benchmarks/gpu_smoke.py", "--tiny", "--steps", "3", "--threads", "2"]
    command += ["--device", "cpu", "--workdir", str(tmp_path / "data"), "--out", str(out)]
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(done.stdout) == report  # printed and written alike

    assert report["device"] == "cpu" and report["precision"] == "fp32"
    assert (report["steps"], report["batch"], report["image_size"]) == (3, 4, 128)
    # the data went through the prepare functions: shards with samples in both splits
    assert report["data"]["samples"]["train"] > 0 and report["data"]["samples"]["val"] > 0
    assert list((tmp_path / "data" / "shards" / "train").glob("train-*.tar"))
    assert set(report["models"]) == {"segvlm_tiny", "hf_clipseg"}
    for name, model in report["models"].items():
        assert model["samples_per_s"] > 0, name
        assert math.isclose(model["samples_per_s"], 3 * 4 / model["train_seconds"]), name
        assert set(model["step_ms"]) == PHASES and all(v >= 0 for v in model["step_ms"].values()), name
        assert model["step_ms"]["forward"] > 0 and model["step_ms"]["backward"] > 0, name
        assert math.isfinite(model["loss_first"]) and math.isfinite(model["loss_last"]), name
        assert model["peak_gpu_memory_mib"] is None  # no GPU: no figure rather than a made-up one
        assert 0 < model["params_trainable"] < model["params_total"], name  # the CLIP is frozen in both
        assert model["eval"]["tasks"] > 0 and 0.0 <= model["eval"]["mean_iou"] <= 1.0, name
    ours, base = report["models"]["segvlm_tiny"], report["models"]["hf_clipseg"]
    assert math.isclose(report["ratios"]["samples_per_s"], ours["samples_per_s"] / base["samples_per_s"])
    assert report["ratios"]["peak_gpu_memory"] is None
