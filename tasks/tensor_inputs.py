"""The `dataset` kind's model inputs at prediction time: arrays in, the same columns out.

A model trained on the user's own Datasets has no preprocessing fitflow knows: the pyfunc
takes what the Dataset's items held, as arrays (one array for a tensor `x`, a dict of arrays
for a dict `x`), and decodes outputs like the other kinds (`prediction`, `probability_<class>`).
Kept as plain data (JSON, no pickle) and stored with the model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from tasks.errors import DataError
from tasks.labels import label_set_predictions
from tasks.preprocessing import class_predictions


@dataclass
class TensorPreprocessor:
    task: str  # classification | regression | multilabel
    classes: list[str] | None
    in_shape: list[int] | None  # one sample's x; None when x is a tuple or dict
    target_mean: None = None
    target_std: None = None
    n_features: int | None = None  # flat in_shape of arrays (tasks/arrays.py): their width
    kind: str = "tensors"

    def model_inputs(self, model_input: Any) -> torch.Tensor | dict[str, torch.Tensor]:
        """An array (N, *in_shape), or a dict of arrays for a model called as model(**x)."""
        if isinstance(model_input, dict):
            return {name: torch.as_tensor(np.asarray(value)) for name, value in model_input.items()}
        if isinstance(model_input, pd.DataFrame):
            model_input = model_input.to_numpy()
        array = np.asarray(model_input)
        if self.in_shape and tuple(array.shape[1:]) != tuple(self.in_shape):
            raise DataError(f"inputs of shape {array.shape} do not fit the model: it takes (rows, {', '.join(map(str, self.in_shape))})")
        return torch.as_tensor(array, dtype=torch.float32 if array.dtype.kind == "f" else None)

    def decode(self, outputs: np.ndarray) -> pd.DataFrame:
        """Logits -> `prediction` and `probability_<class>` (softmax; multilabel: the label set `a|b`
        and sigmoids); regression -> `prediction`."""
        if self.task == "multilabel":
            return label_set_predictions(outputs, self.classes)
        if self.task != "classification":
            return pd.DataFrame({"prediction": outputs[:, 0]})
        return class_predictions(outputs, self.classes or [str(i) for i in range(outputs.shape[1])])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1), encoding="utf-8")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorPreprocessor:
        return cls(**data)
