"""The MLflow pyfunc flavour of a segvlm checkpoint (what the model registry serves).

Input: a DataFrame (or list of dicts) with ``image_path`` and ``phrase``; output: one dict per row with the
mask's foreground share and the mask itself as a nested list at the original image size. The threshold is the
checkpoint's (chosen on validation, 0.5 if it has none) unless ``params={"threshold": t}`` is passed.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc


class SegVLMPyFunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from segvlm.inference import Predictor

        self.predictor = Predictor.from_checkpoint(context.artifacts["checkpoint"])

    def predict(
        self, context: Any, model_input: Any, params: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        from PIL import Image

        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        threshold = float((params or {}).get("threshold", self.predictor.threshold))
        out = []
        for row in rows:
            with Image.open(row["image_path"]) as image:
                probabilities, _ = self.predictor.predict(image.convert("RGB"), row["phrase"])
            mask = probabilities > threshold
            out.append({"foreground": float(mask.mean()), "mask": mask.astype("uint8").tolist()})
        return out
