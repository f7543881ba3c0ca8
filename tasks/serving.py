"""The MLflow pyfunc model: raw rows in, predictions in the original label space out.

It carries the fitted preprocessing as JSON, the model spec as JSON and the weights as a
state dict: no pickle anywhere, so it loads with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false.
MLflow loads it "from code" through tasks/model_code.py.
"""

from __future__ import annotations

import json

import mlflow.pyfunc
import pandas as pd
import torch

from tasks.models import build_model
from tasks.preprocessing import Preprocessor
from tasks.training import predict_outputs


class FitflowModel(mlflow.pyfunc.PythonModel):
    """predict(raw DataFrame) -> DataFrame with `prediction` (+ `probability_<class>` columns)."""

    def load_context(self, context) -> None:
        self.preprocessor = Preprocessor.load(context.artifacts["preprocessor"])
        with open(context.artifacts["model_spec"], encoding="utf-8") as handle:
            spec = json.load(handle)
        self.model = build_model(spec)
        self.model.load_state_dict(torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True))
        self.model.eval()

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        features = torch.from_numpy(self.preprocessor.transform(pd.DataFrame(model_input)))
        return self.preprocessor.decode(predict_outputs(self.model, features).numpy())
