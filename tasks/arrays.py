"""In-memory arrays `(x, y)`, as Keras' `fit(x, y)` takes them (the Python API, fitflow/).

They train as given, like Keras: no imputing, scaling or encoding (a DataFrame with `target`
gets the table path's preprocessing instead). The rows go through the table path's loader
(tasks/loaders.py: one `index_select` per batch, 20-70x faster than DataLoader(TensorDataset)
on in-memory rows), so an epoch on arrays costs what the flow's epoch on a table costs. The
logged model takes arrays of the same shape (tasks/tensor_inputs.py).
"""

from __future__ import annotations

import numpy as np

from tasks.data import Prepared, Split
from tasks.tensor_inputs import TensorPreprocessor


def prepare_arrays(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], task: str) -> Prepared:
    """Train and validation arrays as prepared data; no test split (the API tests on `evaluate`'s data).

    x: (rows, *one sample's shape), any real dtype (trained as float32). y: class indices
    0..n-1 (classification, any integer dtype) or values (regression), (rows,) or (rows, 1).
    """
    splits = [Split(np.asarray(x, dtype=np.float32), array_targets(y, task)) for x, y in (train, val)]
    classes = None
    if task == "classification":
        classes = [str(i) for i in range(1 + max(int(split.targets.max()) for split in splits))]
    in_shape = list(splits[0].features.shape[1:])
    preprocessor = TensorPreprocessor(task, classes, in_shape)
    if len(in_shape) == 1:  # feature vectors: the MLP and the logged params know their width
        preprocessor.n_features = in_shape[0]
    return Prepared(splits[0], splits[1], None, preprocessor)


def array_targets(y: np.ndarray, task: str) -> np.ndarray:
    """y as the loss wants it: int64 class indices (rows,), or float32 values (rows, 1) for regression."""
    y = np.asarray(y)
    return y.reshape(-1).astype(np.int64) if task == "classification" else y.reshape(-1, 1).astype(np.float32)
