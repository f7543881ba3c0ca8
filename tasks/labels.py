"""Multi-label targets: several 0/1 columns of a table, or `a|b` label sets in one column.

A multi-label row belongs to any number of classes (none, one, several). Its target is a
multi-hot float vector (one 0/1 per class), the model has one output (a logit) per class, the
loss is a sigmoid per class (BCEWithLogitsLoss), and a class is predicted when its probability
is at least THRESHOLD. Predictions come back as every other kind's: `prediction` (here the
predicted label set, written `a|b`, empty when no class reaches the threshold) and a
`probability_<class>` column per class (sigmoid, so they do not sum to 1).

An empty label set is a row with no labels: in a table with several 0/1 columns, a row of
zeros; in an `a|b` column or a manifest, an empty cell.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from pandas.api import types

from tasks.errors import DataError

SEPARATOR = "|"
THRESHOLD = 0.5  # a class is predicted at probability >= 0.5: the sigmoid's decision boundary, logit 0


def is_label_set_column(labels: pd.Series) -> bool:
    """Text labels of which at least one names several classes (`a|b`)."""
    if types.is_numeric_dtype(labels) or types.is_bool_dtype(labels):
        return False
    return bool(labels.dropna().astype(str).str.contains(SEPARATOR, regex=False).any())


def parse_label_sets(labels: pd.Series) -> list[tuple[str, ...]]:
    """`a|b` text -> ("a", "b") per row; names are stripped, an empty or missing cell is ()."""
    present = labels.notna().to_numpy()
    return [tuple(sorted({name.strip() for name in str(text).split(SEPARATOR) if name.strip()})) if known else ()
            for text, known in zip(labels, present)]


def label_set_classes(sets: Sequence[tuple[str, ...]]) -> list[str]:
    """The classes of label sets: the sorted union of their labels."""
    return sorted({name for labels in sets for name in labels})


def multi_hot(sets: Sequence[tuple[str, ...]], classes: list[str], what: str) -> np.ndarray:
    """Label sets -> float32 (rows, classes); a label that is not a class is an error naming it."""
    index = {name: i for i, name in enumerate(classes)}
    out = np.zeros((len(sets), len(classes)), dtype=np.float32)
    for row, labels in enumerate(sets):
        for name in labels:
            if name not in index:
                raise DataError(f"{what} row {row + 1}: label {name!r} does not occur in the training split; "
                                "add such rows to the training data")
            out[row, index[name]] = 1.0
    return out


def binary_columns(frame: pd.DataFrame, columns: list[str], what: str) -> np.ndarray:
    """Several 0/1 (or boolean) columns -> float32 (rows, columns); any other value is an error
    naming the column, the row (1 = the first data row) and the value."""
    out = np.zeros((len(frame), len(columns)), dtype=np.float32)
    for j, name in enumerate(columns):
        column = frame[name]
        if types.is_bool_dtype(column):
            out[:, j] = column.to_numpy(dtype=np.float32)
            continue
        values = pd.to_numeric(column, errors="coerce") if not types.is_numeric_dtype(column) else column
        bad = ~values.isin([0, 1]).to_numpy() & column.notna().to_numpy()  # a missing target drops its row (tasks/data.py)
        text = column.astype(str).str.strip().str.lower()
        words = text.isin(["true", "false"]).to_numpy()  # booleans read from a CSV as text
        bad &= ~words
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            value = column.iloc[row].item() if isinstance(column.iloc[row], np.generic) else column.iloc[row]
            raise DataError(f"target column '{name}' of {what} row {row + 1} holds {value!r}; a multi-label "
                            "target column holds only 0/1 (or true/false): fix the value, or drop the column from --target")
        out[:, j] = np.where(words, (text == "true").to_numpy(), values.to_numpy(dtype=np.float64, na_value=0.0))
    return out


def check_every_label_varies(targets: np.ndarray, classes: list[str], what: str) -> None:
    """A class that is 0 in every row (or 1 in every row) teaches nothing; name it."""
    positives = targets.sum(axis=0)
    for name, count in zip(classes, positives):
        if count == 0 or count == len(targets):
            value = "0 (absent)" if count == 0 else "1 (present)"
            raise DataError(f"label '{name}' of {what} is {value} in every row; a label needs rows with and without "
                            "it: drop it from the target, or add such rows")


def label_set_predictions(outputs: np.ndarray, classes: list) -> pd.DataFrame:
    """Logits -> `prediction` (the label set `a|b`, classes at probability >= THRESHOLD) and a
    `probability_<class>` column each (sigmoid)."""
    outputs = np.asarray(outputs, dtype=np.float32)
    proba = 1.0 / (1.0 + np.exp(-np.clip(outputs, -80, 80)))  # clipped: exp of a large logit overflows float32
    names = [str(name) for name in classes]
    chosen = proba >= THRESHOLD
    frame = pd.DataFrame({"prediction": [SEPARATOR.join(n for n, on in zip(names, row) if on) for row in chosen]})
    for i, name in enumerate(names):
        frame[f"probability_{name}"] = proba[:, i]
    return frame


def balanced_pos_weight(targets: np.ndarray | object) -> np.ndarray:
    """Per class: rows without it / rows with it, in the training split (BCEWithLogitsLoss's
    `pos_weight`): each class's positives weigh as much in the loss as its negatives. A class
    with no positive row in the training split gets weight 1."""
    targets = np.asarray(targets, dtype=np.float64)
    positives = targets.sum(axis=0)
    negatives = len(targets) - positives
    return np.where(positives > 0, negatives / np.maximum(positives, 1), 1.0).astype(np.float32)
