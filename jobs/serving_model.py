"""The MLflow model-from-code file of a segvlm checkpoint: what ``mlflow models serve`` runs.

``jobs.pyfunc_model.log_segvlm_model`` logs this file (MLflow copies it into the model and executes it on
load; nothing is pickled), the checkpoint folder as the ``checkpoint`` artifact and the ``segvlm`` package
as code. It therefore imports only mlflow, pandas and segvlm. Request and answer format: ``segvlm.serving``
and docs/serving.md.

``model_config`` (recorded in the model's MLmodel file): ``limits`` (``segvlm.serving.RequestLimits`` fields)
and ``device`` (``"auto"``: the first GPU if there is one, else the CPU).
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel


class SegVLMModel(PythonModel):
    """A segvlm checkpoint behind the pyfunc interface: a DataFrame of requests in, one of answers out."""

    def load_context(self, context: Any) -> None:
        import torch

        from segvlm.inference import Predictor
        from segvlm.serving import RequestLimits

        config = dict(context.model_config or {})
        self.limits = RequestLimits.from_mapping(config.get("limits") or {})
        device = config.get("device", "auto")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.predictor = Predictor.from_checkpoint(context.artifacts["checkpoint"], device=device)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Rows with ``image_b64``, ``phrase`` and optionally ``threshold`` -> one answer row each.

        A refused request raises ``MlflowException`` with ``INVALID_PARAMETER_VALUE`` (HTTP 400 from the
        scoring server) and a message naming the row and the field.
        """
        from segvlm.serving import OUTPUT_COLUMNS, RequestError, serve_rows

        if isinstance(model_input, pd.DataFrame):
            rows = model_input.to_dict("records")
        elif isinstance(model_input, dict):
            rows = [model_input]
        else:
            rows = list(model_input)
        try:
            answers = serve_rows(self.predictor, rows, self.limits)
        except RequestError as err:
            raise MlflowException.invalid_parameter_value(str(err)) from None
        return pd.DataFrame(answers, columns=list(OUTPUT_COLUMNS))


mlflow.models.set_model(SegVLMModel())
