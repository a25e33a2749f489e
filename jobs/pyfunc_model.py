"""Log a segvlm checkpoint as an MLflow model that ``mlflow models serve`` can run (models-from-code).

What the logged model holds (nothing pickled):

* ``code/segvlm/``: the ``segvlm`` package, put first on ``sys.path`` when the model loads (``code_paths``);
  segvlm is not on PyPI, so it travels with the model instead of as a requirement;
* ``serving_model.py``: the model code (``jobs/serving_model.py``), executed on load;
* ``artifacts/checkpoint/``: the checkpoint folder (safetensors weights, config, tokenizer);
* ``requirements.txt``: mlflow and the PyPI packages segvlm imports, pinned to the versions installed here
  (local version labels such as ``+cpu`` dropped), so ``pip install -r`` rebuilds the environment;
* the signature (``image_b64``, ``phrase``, optional ``threshold`` in; mask and scores out) and an input
  example (a small synthetic image).

Logging installs nothing and infers nothing: the requirements are listed, not discovered. MLflow does load
the logged model once to check that its input example is served (a tiny image, about a second).
"""

from __future__ import annotations

import base64
import dataclasses
import importlib.metadata
import io
import logging
import os
import sys
from pathlib import Path
from typing import Any

import segvlm
from segvlm.serving import IMAGE_COLUMN, OUTPUT_COLUMNS, PHRASE_COLUMN, THRESHOLD_COLUMN, RequestLimits

_logger = logging.getLogger(__name__)

MODEL_CODE = Path(__file__).with_name("serving_model.py")
CHECKPOINT_ARTIFACT = "checkpoint"
_PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
# The PyPI distributions segvlm (and the model code) import, beyond mlflow itself, which MLflow adds.
REQUIREMENTS = ("torch", "torchvision", "transformers", "safetensors", "numpy", "pillow", "pyyaml")


def pip_requirements() -> list[str]:
    """``name==version`` for each of :data:`REQUIREMENTS`, as installed here (without a local label)."""
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in REQUIREMENTS]


def signature() -> Any:
    """The model's ``ModelSignature``: request columns in, answer columns out (``segvlm.serving``)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema

    types = {str: DataType.string, int: DataType.long, float: DataType.double}
    inputs = Schema(
        [
            ColSpec(DataType.string, IMAGE_COLUMN),
            ColSpec(DataType.string, PHRASE_COLUMN),
            ColSpec(DataType.double, THRESHOLD_COLUMN, required=False),
        ]
    )
    outputs = Schema([ColSpec(types[kind], name) for name, kind in OUTPUT_COLUMNS.items()])
    return ModelSignature(inputs=inputs, outputs=outputs)


def example_image_b64(width: int = 48, height: int = 32) -> str:
    """A small PNG (a red disc on grey), base64-encoded: the input example."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (128, 128, 128))
    ImageDraw.Draw(image).ellipse((width // 4, height // 4, width // 2, height * 3 // 4), fill=(220, 30, 30))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def input_example() -> Any:
    import pandas as pd

    return pd.DataFrame({IMAGE_COLUMN: [example_image_b64()], PHRASE_COLUMN: ["the red circle"]})


def log_segvlm_model(
    checkpoint_dir: str | Path,
    *,
    name: str = "model",
    limits: RequestLimits | None = None,
    device: str = "auto",
) -> Any:
    """Log ``checkpoint_dir`` as a model of the active MLflow run; returns MLflow's ``ModelInfo``.

    ``limits``: what one request may hold (default ``RequestLimits()``); ``device``: where the served model
    runs (``"auto"``: a GPU if the serving machine has one). Both are recorded in the model's MLmodel file.
    """
    from segvlm.checkpoint import read_meta

    checkpoint_dir = Path(checkpoint_dir)
    meta = read_meta(checkpoint_dir)  # CheckpointError for a folder that is not a checkpoint
    if not meta.get("includes_backbone", True):
        # a frozen pretrained backbone is stored as a reference only: the serving machine must reach it
        _logger.warning(
            "%s keeps its frozen backbone as a reference (%s), not as weights: the served model loads it "
            "from there",
            checkpoint_dir,
            meta.get("backbone_ref"),
        )
    model_config = {"limits": dataclasses.asdict(limits or RequestLimits()), "device": device}
    # MLflow loads the logged model once to check its input example: that puts the model's temporary code
    # folder first on sys.path for good (this process keeps importing from its own) and draws a progress
    # bar for copying its files.
    saved_path, saved_bar = list(sys.path), os.environ.get(_PROGRESS_BAR)
    os.environ[_PROGRESS_BAR] = "false"
    try:
        return _log_model(checkpoint_dir, name, model_config, meta)
    finally:
        sys.path[:] = saved_path
        if saved_bar is None:
            os.environ.pop(_PROGRESS_BAR, None)
        else:
            os.environ[_PROGRESS_BAR] = saved_bar


def _log_model(checkpoint_dir: Path, name: str, model_config: dict[str, Any], meta: dict[str, Any]) -> Any:
    import mlflow

    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(MODEL_CODE),
        artifacts={CHECKPOINT_ARTIFACT: str(checkpoint_dir)},
        code_paths=[str(Path(segvlm.__file__).parent)],
        pip_requirements=pip_requirements(),
        signature=signature(),
        input_example=input_example(),
        model_config=model_config,
        metadata={
            "segvlm_model_name": meta.get("model_name"),
            "segvlm_includes_backbone": bool(meta.get("includes_backbone", True)),
            "segvlm_backbone_ref": meta.get("backbone_ref"),
        },
    )
