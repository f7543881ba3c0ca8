"""The MLflow pyfunc model: what a user has at prediction time in, predictions in the original
label space out.

Inputs by data kind: raw table rows (a DataFrame) for tables; a DataFrame with a `path` column
(image files) or an `image` column (encoded image bytes) for images; arrays (or a dict of
arrays) for a model trained on your own Datasets. Outputs: `prediction`, and for classes a
`probability_<class>` column each.

It carries the fitted preprocessing as JSON (its `kind` says which), the model spec as JSON and
the weights as a state dict: no pickle anywhere, so it loads with
MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false. MLflow loads it "from code" through tasks/model_code.py.
The same logged model carries the network as MLflow's `pytorch` flavor too
(tasks/pytorch_flavor.py), fed what `model_inputs` returns.
"""

from __future__ import annotations

import json
from typing import Any

import mlflow.pyfunc
import pandas as pd
import torch

from tasks.errors import DataError
from tasks.images_preprocessor import ImagePreprocessor
from tasks.models import build_model
from tasks.preprocessing import Preprocessor
from tasks.tensor_inputs import TensorPreprocessor
from tasks.training import call_model, predict_outputs

IMAGE_COLUMNS = ("path", "image")  # file paths, or the files' bytes


def load_preprocessor(path: str) -> Preprocessor | ImagePreprocessor | TensorPreprocessor:
    """The preprocessing of a logged model, by the `kind` its JSON names (tables name none)."""
    with open(path, encoding="utf-8") as handle:
        kind = json.load(handle).get("kind", "table")
    if kind == "images":
        return ImagePreprocessor.load(path)
    if kind == "tensors":
        with open(path, encoding="utf-8") as handle:
            return TensorPreprocessor.from_dict(json.load(handle))
    return Preprocessor.load(path)


class FitflowModel(mlflow.pyfunc.PythonModel):
    """predict(inputs) -> DataFrame with `prediction` (+ `probability_<class>` columns)."""

    def load_context(self, context) -> None:
        self.preprocessor = load_preprocessor(context.artifacts["preprocessor"])
        with open(context.artifacts["model_spec"], encoding="utf-8") as handle:
            spec = json.load(handle)
        self.model = build_model(spec)
        self.model.load_state_dict(torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True))
        self.model.eval()

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        inputs = self.model_inputs(model_input)
        if isinstance(inputs, dict):
            with torch.inference_mode():
                outputs = call_model(self.model, inputs).float()
        else:
            outputs = predict_outputs(self.model, inputs)
        return self.preprocessor.decode(outputs.numpy())

    def model_inputs(self, model_input) -> torch.Tensor | dict[str, torch.Tensor]:
        """What the network takes for a pyfunc input: preprocessed rows, decoded images, or the arrays
        as tensors. Public, so that the `pytorch` flavor of the same model can be fed the same way."""
        p = self.preprocessor
        if isinstance(p, ImagePreprocessor):
            return p.load_images(image_items(model_input))
        if isinstance(p, TensorPreprocessor):
            return p.model_inputs(model_input)
        return torch.from_numpy(p.transform(pd.DataFrame(model_input)))


def image_items(model_input: Any) -> list:
    """The images of a pyfunc input: its `path` or `image` column (the first that has values)."""
    frame = pd.DataFrame(model_input)
    for column in IMAGE_COLUMNS:
        if column in frame.columns and frame[column].notna().any():
            values = frame[column]
            if values.isna().any():
                raise DataError(f"row {int(values.isna().to_numpy().argmax())} has no {column}; give every row an image")
            return list(values)
    raise DataError(f"image inputs need a 'path' column (image files) or an 'image' column (the files' bytes); "
                    f"got columns {list(map(str, frame.columns))}")
