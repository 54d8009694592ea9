"""The pyfunc face of a Tandem bundle, logged as MLflow "models from code" (no pickling).

``tandem.ops.registry.log_bundle`` passes this file as ``python_model``; MLflow copies it into the
model version next to the bundle folder (pyfunc artifact ``bundle``). Serving does not go through
pyfunc — it loads each part with ``tandem``'s own loaders from ``download_bundle`` — so the model
only maps part names (``tandem.models.bundle`` constants) to local file paths::

    mlflow.pyfunc.load_model("models:/tandem-recommender@champion").predict(["ranker/model.txt"])
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
from mlflow.models import set_model


class BundleModel(mlflow.pyfunc.PythonModel):
    """``predict(parts: list[str]) -> list[str]``: each part's absolute local path."""

    def load_context(self, context) -> None:
        self.root = Path(context.artifacts["bundle"])

    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        return [str(self.root / part) for part in model_input]


set_model(BundleModel())
