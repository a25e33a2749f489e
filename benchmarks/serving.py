"""What serving costs: logging the model, and a request's overhead over the model itself.

1. Logging: ``RunLogger.log_checkpoint_model`` (models-from-code, signature, input example, MLflow's load of
   the logged model to check the example, registration) against a baseline that logs the same checkpoint the
   old way (a cloudpickled ``PythonModel``, a requirements list, no example, no check) and registers it.
   Both log into one local sqlite store, interleaved round by round; medians are reported.
2. A request: ``segvlm.serving.serve_rows`` on one base64 JPEG (decode the base64, read the header, decode
   the image, segment, encode the PNG mask, base64 it) against ``segvlm.inference.segment`` on the already
   decoded image (the model's share), interleaved.

    python benchmarks/serving.py --checkpoint runs/demo/<run>/best [--rounds 5] [--image-size 640 480] [--json]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import mlflow
import numpy as np
from PIL import Image

from jobs.tracking import RunLogger
from segvlm.inference import Predictor, decode_image, segment
from segvlm.serving import RequestLimits, serve_rows


class _PickledBaseline(mlflow.pyfunc.PythonModel):
    """The old registered model: an instance cloudpickled into the model, loading the checkpoint by path."""

    def load_context(self, context):
        self.predictor = Predictor.from_checkpoint(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params=None):
        return model_input


def _log_baseline(checkpoint: Path, name: str) -> None:
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=_PickledBaseline(),
        artifacts={"checkpoint": str(checkpoint)},
        pip_requirements=["torch", "transformers"],
    )
    mlflow.register_model(info.model_uri, name)


def bench_logging(checkpoint: Path, rounds: int) -> dict:
    times: dict[str, list[float]] = {"models_from_code": [], "pickled_baseline": []}
    with (
        tempfile.TemporaryDirectory(prefix="segvlm-bench-") as workdir,
        RunLogger(enabled=True, workdir=workdir, experiment="bench") as logger,
    ):
        for _ in range(rounds):
            t0 = time.perf_counter()
            logger.log_checkpoint_model(checkpoint, "bench-new")
            times["models_from_code"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _log_baseline(checkpoint, "bench-old")
            times["pickled_baseline"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"median_s": med, "ratio_new_over_baseline": med["models_from_code"] / med["pickled_baseline"]}


def bench_request(checkpoint: Path, rounds: int, width: int, height: int) -> dict:
    predictor = Predictor.from_checkpoint(checkpoint)
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    row = {"image_b64": base64.b64encode(buffer.getvalue()).decode(), "phrase": "the red circle"}
    image = decode_image(buffer.getvalue())
    limits = RequestLimits()
    serve_rows(predictor, [row], limits), segment(predictor, image, row["phrase"])  # warm-up
    times: dict[str, list[float]] = {"serve_rows": [], "segment_only": []}
    for _ in range(rounds):
        t0 = time.perf_counter()
        serve_rows(predictor, [row], limits)
        times["serve_rows"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        segment(predictor, image, row["phrase"])
        times["segment_only"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "image": f"{width}x{height} JPEG, {len(buffer.getvalue())} bytes",
        "median_s": med,
        "ratio_request_over_segment": med["serve_rows"] / med["segment_only"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--image-size", type=int, nargs=2, default=(640, 480), metavar=("W", "H"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result = {
        "logging": bench_logging(args.checkpoint, args.rounds),
        "request": bench_request(args.checkpoint, 4 * args.rounds, *args.image_size),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        log, req = result["logging"], result["request"]
        print(
            f"logging: models-from-code {log['median_s']['models_from_code']:.2f} s, pickled baseline "
            f"{log['median_s']['pickled_baseline']:.2f} s (ratio {log['ratio_new_over_baseline']:.2f})"
        )
        print(
            f"request ({req['image']}): serve_rows {1000 * req['median_s']['serve_rows']:.1f} ms, segment "
            f"{1000 * req['median_s']['segment_only']:.1f} ms (ratio {req['ratio_request_over_segment']:.2f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
