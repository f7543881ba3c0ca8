"""What the Python API's `fit`, `evaluate` and `predict` take, as the engine's prepared data.

- `(x, y)` arrays or tensors (numpy, torch, anything numpy reads): trained as given, like
  Keras (tasks/arrays.py), through the table path's batch-gather loader;
- a pandas DataFrame with `target=`: the table path (tasks/data.py), the flow's preprocessing
  fitted on the training rows and logged with the model as JSON;
- a torch Dataset or DataLoader of `(x, y)` items: the `dataset` kind (tasks/user_dataset.py).

Validation data takes the same forms; without it, `validation_split` (default: the config's
`val_fraction`) of the training rows is held out, seeded (and stratified by class for arrays
and tables). Nothing is cut for a test: `evaluate` tests on the data given to it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from flows.steps import DataRecord, prepare_task, run_step
from tasks.arrays import array_targets, prepare_arrays
from tasks.config import TrainConfig
from tasks.data import Prepared, PrepSpec, Split, encode_split, raw_splits, split_rows
from tasks.user_dataset import UserDatasets, datasets_from

TABLE, ARRAYS, DATASET = "table", "arrays", "dataset"
LABELS = {TABLE: "<DataFrame>", ARRAYS: "<arrays>", DATASET: "<Dataset>"}  # the run's `data`: in memory, no path


@dataclass
class FitData:
    """The training data of one `fit`: what the engine trains on and what MLflow records of it."""

    kind: str  # table | arrays | dataset
    prepared: Prepared | UserDatasets
    record: DataRecord
    validation_given: bool
    spec: PrepSpec | None = None  # tables: how fit's DataFrame was split
    validation_frame: pd.DataFrame | None = None  # tables: validation_data


def kind_of(x: Any, y: Any, target: str | None, argument: str = "x") -> str:
    """table, arrays or dataset; TypeError/ValueError naming `argument` for anything else."""
    if isinstance(x, pd.DataFrame):
        if y is not None:
            raise ValueError(f"{argument} is a DataFrame: name its label column with target=, not y")
        if target is None:
            raise ValueError(f"{argument} is a DataFrame: name its label column with target='column'")
        if not isinstance(target, str):
            raise TypeError(f"target must be a column name; got {_what(target)}")
        if target not in x.columns:
            raise ValueError(f"target='{target}' is not a column of {argument}; its columns: "
                             f"{', '.join(map(str, x.columns[:20]))}")
        return TABLE
    if target is not None:
        raise ValueError(f"target= names a DataFrame's label column; {argument} is {_what(x)}")
    if isinstance(x, (Dataset, DataLoader)):
        if y is not None:
            raise ValueError(f"{argument} is a {type(x).__name__} of (x, y) items: drop y")
        return DATASET
    if y is None and isinstance(x, (tuple, list)) and len(x) == 2:
        return ARRAYS
    if y is not None and _array_like(x):
        return ARRAYS
    raise TypeError(f"{argument} must be (x, y) arrays or tensors, a pandas DataFrame with target=, a torch Dataset "
                    f"or a DataLoader; got {_what(x)}" + (" without y" if _array_like(x) else ""))


def fit_data(x: Any, y: Any, target: str | None, validation_data: Any, validation_split: float | None,
             config: TrainConfig) -> FitData:
    """The training data and its validation split, prepared as the flow prepares its kinds."""
    kind = kind_of(x, y, target)
    if validation_data is not None and validation_split is not None:
        raise ValueError("give validation_data or validation_split, not both")
    if validation_data is not None:
        if kind == ARRAYS and not (isinstance(validation_data, (tuple, list)) and len(validation_data) == 2):
            raise TypeError(f"validation_data must be an (x, y) pair like the training data; got {_what(validation_data)}")
        val_x, val_y = (validation_data if kind == ARRAYS else (validation_data, None))
        val_kind = kind_of(val_x, val_y, target, "validation_data")
        if val_kind != kind:
            raise TypeError(f"validation_data must be of the training data's kind ({LABELS[kind]}); got {_what(validation_data)}")
    split = config.val_fraction if validation_split is None else validation_split
    if kind == TABLE:
        spec = PrepSpec(target=target, task=config.task, val_fraction=split, test_fraction=0.0,
                        max_categories=config.max_categories, seed=config.seed)
        prepared = run_step(prepare_task, x, spec, validation_data)  # in a flow run: cached on the content
        return FitData(kind, prepared, DataRecord(TABLE, x, LABELS[TABLE], target), validation_data is not None, spec,
                       validation_data)
    if kind == ARRAYS:
        train = _arrays(*x if y is None else (x, y), "x")
        val = _arrays(*validation_data, "validation_data") if validation_data is not None else None
        task = config.task if config.task != "auto" else ("classification" if train[1].dtype.kind in "biu" else "regression")
        if val is None:
            train_rows, val_rows, _ = _split(pd.Series(train[1].reshape(len(train[1]), -1)[:, 0]), task, split, config.seed)
            train, val = (train[0][train_rows], train[1][train_rows]), (train[0][val_rows], train[1][val_rows])
        _check_labels(task, train[1], "y")
        _check_labels(task, val[1], "validation_data's y")
        return FitData(kind, prepare_arrays(train, val, task), DataRecord(ARRAYS, _digest_frame(train, val), LABELS[ARRAYS],
                                                                         None), validation_data is not None)
    if validation_data is None:
        if isinstance(x, DataLoader):
            raise ValueError("validation_split cannot split a DataLoader (its batches are made); pass validation_data")
        train_rows, val_rows, _ = _split(pd.Series(np.zeros(len(x))), "regression", split, config.seed)  # unstratified
        parts = {"train": Subset(x, train_rows.tolist()), "val": Subset(x, val_rows.tolist())}
    else:
        parts = {"train": x, "val": validation_data}
    if config.task != "auto":
        parts["task"] = config.task
    datasets = datasets_from("fit's data", LABELS[DATASET], parts)
    frame = pd.DataFrame({name: [_describe_split(parts[name])] for name in ("train", "val")})
    return FitData(kind, datasets, DataRecord(DATASET, frame, LABELS[DATASET], None), validation_data is not None)


def split_for(fitted: FitData, x: Any, y: Any, target: str | None, argument: str) -> Prepared | UserDatasets:
    """`fitted`'s prepared data with `x` (labelled, of the same kind) as its validation split, for `evaluate`."""
    if kind_of(x, y, target, argument) != fitted.kind:
        raise TypeError(f"{argument} must be of the training data's kind ({LABELS[fitted.kind]}); got {_what(x)}")
    p = fitted.prepared.preprocessor
    if fitted.kind == TABLE:
        if target != p.target:
            raise ValueError(f"target='{target}': the model was trained on '{p.target}'")
        return replace(fitted.prepared, val=encode_split(p, x, None), test=None)
    if fitted.kind == ARRAYS:
        features, labels = _arrays(*x if y is None else (x, y), argument)
        _check_labels(p.task, labels, f"{argument}'s y", len(p.classes or []))
        return replace(fitted.prepared, val=Split(features.astype(np.float32), array_targets(labels, p.task)), test=None)
    return replace(fitted.prepared, val=x, test=None)


def seen_frames(fitted: FitData) -> list[pd.DataFrame]:
    """A table fit's raw training and validation rows: every row of its DataFrame (fit cuts no test
    split) less those without a target, and validation_data's."""
    train, val, _ = raw_splits(fitted.record.frame, fitted.spec, fitted.prepared.preprocessor.task, fitted.validation_given)
    return [train, val if fitted.validation_frame is None else fitted.validation_frame]


def test_record(x: Any, y: Any, target: str | None) -> DataRecord:
    """What MLflow records of `evaluate`'s data (its digest keys the registry's comparison of runs)."""
    kind = kind_of(x, y, target)
    if kind == TABLE:
        return DataRecord(kind, x, LABELS[kind], target)
    if kind == ARRAYS:
        pair = tuple(map(_numpy, x if y is None else (x, y)))
        return DataRecord(kind, _digest_frame(pair, pair), LABELS[kind], None)
    return DataRecord(kind, pd.DataFrame({"test": [_describe_split(x)]}), LABELS[kind], None)


def model_inputs(fitted: FitData, x: Any) -> Any:
    """What `predict` feeds the model: a feature tensor, or a Dataset/DataLoader of (x, y) items."""
    if fitted.kind == TABLE:
        if not isinstance(x, pd.DataFrame):
            raise TypeError(f"x must be a DataFrame of the training columns (the model was trained on one); got {_what(x)}")
        return torch.from_numpy(fitted.prepared.preprocessor.transform(x, None))
    if fitted.kind == DATASET and isinstance(x, (Dataset, DataLoader)):
        return x
    if not _array_like(x) or isinstance(x, (tuple, list)):
        raise TypeError(f"x must be an array or tensor of inputs (rows, ...); got {_what(x)}")
    return torch.from_numpy(np.asarray(_numpy(x), dtype=np.float32))


def _arrays(x: Any, y: Any, argument: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) as numpy arrays with a row axis each, the same number of rows, numbers only."""
    x, y = _numpy(x), _numpy(y)
    for name, array in (("x", x), ("y", y)):
        if array.dtype.kind not in "biuf":
            raise TypeError(f"{argument}: {name} must hold numbers; got dtype {array.dtype}")
        if array.ndim == 0:
            raise ValueError(f"{argument}: {name} must have a row axis, got a scalar")
    if x.ndim < 2:
        raise ValueError(f"{argument}: x must be (rows, features...), got shape {x.shape}")
    if y.ndim > 2 or (y.ndim == 2 and y.shape[1] != 1):
        raise ValueError(f"{argument}: y must hold one label or value per row, (rows,) or (rows, 1); got shape {y.shape}")
    if len(x) != len(y):
        raise ValueError(f"{argument}: x has {len(x)} rows but y has {len(y)}")
    return x, y


def _check_labels(task: str, labels: np.ndarray, argument: str, n_classes: int = 0) -> None:
    if task != "classification":
        return
    if labels.dtype.kind == "f" and not np.array_equal(labels, np.round(labels)):
        raise ValueError(f"{argument} holds fractions; classification takes class indices 0..n-1 (or task='regression')")
    if len(labels) and labels.min() < 0:
        raise ValueError(f"{argument} holds {labels.min()}; classification takes class indices 0..n-1")
    if n_classes and len(labels) and labels.max() >= n_classes:
        raise ValueError(f"{argument} holds class {int(labels.max())}; the model knows classes 0..{n_classes - 1}")


def _split(labels: pd.Series, task: str, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train and validation rows as the table path splits them (seeded, stratified for classes)."""
    if not 0 < fraction < 1:
        raise ValueError(f"validation_split must be a share between 0 and 1, got {fraction}")
    return split_rows(labels, task, PrepSpec(target="y", val_fraction=fraction, test_fraction=0.0, seed=seed))


def _digest_frame(*pairs: tuple[np.ndarray, np.ndarray]) -> pd.DataFrame:
    """What MLflow records of arrays: their shapes and a hash of their bytes (resume checks it)."""
    digest = hashlib.sha256()
    for array in (a for pair in pairs for a in pair):
        digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))
    (x, y), (val_x, _) = pairs
    return pd.DataFrame({"x_shape": [str(x.shape)], "y_shape": [str(y.shape)], "val_rows": [str(len(val_x))],
                         "sha256": [digest.hexdigest()]})


def _describe_split(split: Any) -> str:
    rows = len(split.dataset) if isinstance(split, DataLoader) else len(split)
    return f"{type(split).__name__} of {rows} items"


def _numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def _array_like(value: Any) -> bool:
    return isinstance(value, (np.ndarray, torch.Tensor, tuple, list))


def _what(value: Any) -> str:
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return f"a {type(value).__name__} of shape {tuple(value.shape)}"
    name = type(value).__name__
    return "None" if value is None else f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"
