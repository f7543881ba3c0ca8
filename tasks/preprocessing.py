"""The fitted preprocessing, kept as plain data (JSON, no pickle).

`Preprocessor.fit` learns it from the training split only: median imputation and
standardisation for numeric columns, most-frequent imputation and one-hot encoding (the
`max_categories` most frequent values, the rest sharing one `__other__` column) for
categorical ones, the class names for classification and multi-label (tasks/labels.py), and
the target scale for regression.
Training and the MLflow model apply exactly the same `transform`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pandas.api import types

from tasks.config import target_columns
from tasks.errors import DataError
from tasks.labels import (
    binary_columns,
    is_label_set_column,
    label_set_classes,
    label_set_predictions,
    multi_hot,
    parse_label_sets,
)

OTHER = "__other__"
_NUMERIC_SHARE = 0.9  # a text column this numeric is a numeric column with typos, not a category
MAX_AUTO_CLASSES = 20  # integer targets with at most this many values are classes
_FLOAT32_MAX = float(np.finfo(np.float32).max)  # features and targets are trained in float32
# A value further than this from the training mean (in training standard deviations) is clipped
# there: in float32 it could become inf and turn the network's output into NaN. Training rows
# never reach it (their z-scores are at most sqrt(rows)); only far-out validation or new rows do.
_MAX_Z = 1e6


@dataclass
class NumericColumn:
    name: str
    median: float
    mean: float
    std: float
    # The training distribution, for drift checks at prediction time (tasks/drift.py): the deciles
    # of the filled training values and the share of training rows between each pair of them.
    # Models logged before these existed carry neither; drift then assumes a normal distribution.
    deciles: list[float] | None = None
    decile_shares: list[float] | None = None


@dataclass
class CategoricalColumn:
    name: str
    fill: str
    categories: list[str]
    other: bool  # True when rarer values were folded into one __other__ column
    # Share of training rows per kept category, then of the rest (drift checks; older models: None).
    shares: list[float] | None = None

    @property
    def width(self) -> int:
        return len(self.categories) + int(self.other)


@dataclass
class Preprocessor:
    target: str  # one column; multilabel: several 0/1 columns "a,b,c", or one column of "a|b" label sets
    task: str  # classification | regression | multilabel
    numeric: list[NumericColumn] = field(default_factory=list)
    categorical: list[CategoricalColumn] = field(default_factory=list)
    classes: list[Any] | None = None
    target_mean: float = 0.0
    target_std: float = 1.0

    @property
    def n_features(self) -> int:
        return len(self.numeric) + sum(c.width for c in self.categorical)

    @property
    def target_columns(self) -> list[str]:
        return target_columns(self.target)

    @property
    def input_columns(self) -> list[str]:
        return [c.name for c in self.numeric] + [c.name for c in self.categorical]

    @property
    def feature_names(self) -> list[str]:
        names = [c.name for c in self.numeric]
        for col in self.categorical:
            names += [f"{col.name}={cat}" for cat in col.categories] + ([f"{col.name}={OTHER}"] if col.other else [])
        return names

    # --- fitting --------------------------------------------------------------------------

    @classmethod
    def fit(cls, frame: pd.DataFrame, target: str, task: str, max_categories: int,
            rows: np.ndarray | None = None) -> Preprocessor:
        """Learn the preprocessing from `frame` (only its `rows`: the training split)."""
        prep = cls(target=target, task=task)
        targets = target_columns(target)
        for name in (c for c in frame.columns if c not in targets):
            column = _rows(frame[name], rows)  # one column at a time: no copy of the whole split
            if _is_numeric(column):
                values = _as_float(column)
                median = float(np.nanmedian(values)) if np.isfinite(values).any() else 0.0
                filled = np.where(np.isnan(values), median, values)
                std = float(filled.std())
                deciles = np.unique(np.quantile(filled, np.linspace(0.1, 0.9, 9)))
                shares = np.bincount(np.searchsorted(deciles, filled, side="right"), minlength=len(deciles) + 1)
                prep.numeric.append(NumericColumn(str(name), median, float(filled.mean()), std if std > 0 else 1.0,
                                                  deciles.tolist(), (shares / max(len(filled), 1)).tolist()))
            else:
                counts = column.dropna().astype(str).value_counts()
                ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
                fill = ranked[0][0] if ranked else OTHER
                kept = [value for value, _ in ranked[:max_categories]]
                rows_seen = max(len(column), 1)  # missing values count as the fill value, as transform fills them
                shares = [(counts.get(value, 0) + (len(column) - counts.sum() if value == fill else 0)) / rows_seen
                          for value in kept]
                prep.categorical.append(CategoricalColumn(str(name), fill, kept, len(ranked) > max_categories,
                                                          shares + [max(0.0, 1.0 - sum(shares))]))
        if task == "multilabel":  # the classes are the 0/1 columns, or the labels of the training rows' sets
            sets = None if len(targets) > 1 else parse_label_sets(_rows(frame[target], rows))
            prep.classes = targets if sets is None else label_set_classes(sets)
            return prep
        labels = _rows(frame[target], rows)
        if task == "classification":
            # Numbers only from a numeric dtype: an object column mixing 1 and "1" sorts (and matches) as text.
            numeric = types.is_numeric_dtype(labels) and not types.is_bool_dtype(labels)
            prep.classes = sorted(_plain(v) for v in labels.unique()) if numeric else sorted(labels.astype(str).unique())
        else:
            y = _as_float(labels)
            prep.target_mean, prep.target_std = float(y.mean()), float(y.std()) or 1.0
        return prep

    # --- applying -------------------------------------------------------------------------

    def transform(self, frame: pd.DataFrame, rows: np.ndarray | None = None) -> np.ndarray:
        """Raw columns (any order, extra columns ignored) -> float32 features, for `rows` or all."""
        self.check_columns(frame)
        out = np.zeros((len(frame) if rows is None else len(rows), self.n_features), dtype=np.float32)
        for j, col in enumerate(self.numeric):
            values = _as_float(_rows(frame[col.name], rows), strict=True)
            np.copyto(values, col.median, where=np.isnan(values))
            values -= col.mean
            values /= col.std
            np.clip(values, -_MAX_Z, _MAX_Z, out=values)
            out[:, j] = values
        offset = len(self.numeric)
        for col in self.categorical:
            column = _rows(frame[col.name], rows)
            text = category_text(column).where(column.notna(), col.fill)
            codes = pd.Categorical(text, categories=col.categories).codes.astype(np.int64)
            if col.other:
                codes[codes < 0] = len(col.categories)
            known = np.flatnonzero(codes >= 0)  # an unseen value with no __other__ column stays all zero
            out[known, offset + codes[known]] = 1.0
            offset += col.width
        return out

    def check_columns(self, frame: pd.DataFrame) -> None:
        """Each column the model was trained on is there, once (twice, frame[name] is a table)."""
        missing = [name for name in self.input_columns if name not in frame.columns]
        if missing:
            raise DataError(f"input is missing column(s) {', '.join(map(repr, missing))} that the model was trained on; add them (values may be empty)")
        counts = Counter(frame.columns)
        twice = [name for name in self.input_columns if counts[name] > 1]
        if twice:
            raise DataError(f"input has column(s) {', '.join(map(repr, twice))} more than once; keep one of each")

    def encode_target(self, frame: pd.DataFrame, what: str = "the data") -> np.ndarray:
        """The target columns of `frame` -> int64 class indices, float32 multi-hot (rows, classes)
        for multilabel, or float32 scaled values for regression."""
        if self.task == "multilabel":
            targets = self.target_columns
            if len(targets) > 1:
                return binary_columns(frame, targets, what)
            return multi_hot(parse_label_sets(frame[self.target]), self.classes, f"'{self.target}' of {what}")
        labels = frame[self.target]
        if self.classes is None:
            return ((_as_float(labels) - self.target_mean) / self.target_std).astype(np.float32)
        keys = labels.map(_plain) if isinstance(self.classes[0], (int, float, bool)) else labels.astype(str)
        index = {label: i for i, label in enumerate(self.classes)}
        codes = keys.map(index)
        if codes.isna().any():
            unseen = keys[codes.isna()].iloc[0]
            raise DataError(f"label {unseen!r} of '{self.target}' does not occur in the training split; add such rows to the training data")
        return codes.to_numpy(dtype=np.int64)

    def decode(self, outputs: np.ndarray) -> pd.DataFrame:
        """Model outputs -> predictions in the original label space (+ class probabilities)."""
        if self.task == "multilabel":
            return label_set_predictions(outputs, self.classes)
        if self.classes is None:
            return pd.DataFrame({"prediction": self.unscale_targets(outputs.reshape(len(outputs), -1)[:, 0])})
        return class_predictions(outputs, self.classes)

    def unscale_targets(self, values: np.ndarray) -> np.ndarray:
        return values * self.target_std + self.target_mean

    # --- plain-data round trip ------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessor:
        data = dict(data)
        data["numeric"] = [NumericColumn(**c) for c in data.get("numeric", [])]
        data["categorical"] = [CategoricalColumn(**c) for c in data.get("categorical", [])]
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Preprocessor:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


# --- checks and inference -------------------------------------------------------------------


def class_predictions(outputs: np.ndarray, classes: list) -> pd.DataFrame:
    """Logits -> `prediction` (the class) and a `probability_<class>` column each (softmax); every
    data kind's model answers in these columns."""
    outputs = np.asarray(outputs)  # float32 logits give float32 probabilities
    logits = outputs - outputs.max(axis=1, keepdims=True)
    proba = np.exp(logits)
    proba /= proba.sum(axis=1, keepdims=True)
    frame = pd.DataFrame({"prediction": np.asarray(classes, dtype=object)[proba.argmax(axis=1)]})
    for i, label in enumerate(classes):
        frame[f"probability_{label}"] = proba[:, i]
    return frame


def check_features(table: pd.DataFrame, target: str) -> None:
    """Reject what no preprocessing can fix: no features, infinities, typos in numeric columns."""
    if len(table.columns) <= len(target_columns(target)):
        raise DataError(f"the data has no feature columns besides the target '{target}'; add input columns")
    for name in table.columns:
        column = table[name]
        if types.is_numeric_dtype(column) and not types.is_bool_dtype(column):
            _reject_out_of_range(name, column, _as_float(column))
        elif (types.is_object_dtype(column) or types.is_string_dtype(column)) and _mostly_numbers(column):
            parsed = pd.to_numeric(column, errors="coerce")
            present = column.notna() & (column.astype(str).str.strip() != "")
            bad = present & parsed.isna()
            if present.any() and 0 < bad.sum() <= (1 - _NUMERIC_SHARE) * present.sum():
                row = int(np.flatnonzero(bad.to_numpy())[0])
                raise DataError(f"column '{name}' row {row + 1}: {column.iloc[row]!r} is not a number, but the rest of the column is numeric; fix the value or leave it empty")
            _reject_out_of_range(name, column, parsed.to_numpy(dtype=np.float64, na_value=np.nan))


def _reject_out_of_range(name: Any, column: pd.Series, values: np.ndarray) -> None:
    infinite = np.isinf(values)
    if infinite.any():
        row = int(np.flatnonzero(infinite)[0])
        raise DataError(f"column '{name}' row {row + 1} holds an infinite value ({column.iloc[row]}); replace it with a finite number or leave it empty")
    # Beyond float32 a feature or target would be inf, and its mean and std overflow even in float64.
    huge = np.abs(values) > _FLOAT32_MAX
    if huge.any():
        row = int(np.flatnonzero(huge)[0])
        raise DataError(f"column '{name}' row {row + 1} holds {column.iloc[row]}, beyond the float32 range (±3.4e38) "
                        "that fitflow trains in; rescale the column or replace the value")


def infer_task(labels: pd.Series, requested: str) -> str:
    """classification, regression or multilabel (`a|b` label sets), from the request or from one
    target column's labels (several target columns are multilabel: tasks/data.py)."""
    if requested == "multilabel" or (requested == "auto" and is_label_set_column(labels)):
        if types.is_numeric_dtype(labels) or types.is_bool_dtype(labels):
            raise DataError(f"target '{labels.name}' is one numeric column, not label sets; for multilabel name several "
                            "0/1 columns (--target a,b,c) or give one column of 'a|b' labels")
        return "multilabel"
    numeric = _is_numeric(labels)
    if requested == "regression" and not numeric:
        raise DataError(f"target '{labels.name}' holds text, so it cannot be a regression target; use --task classification")
    if requested == "auto":
        integral = numeric and np.all(np.mod(_as_float(labels), 1) == 0)
        few = labels.nunique() <= MAX_AUTO_CLASSES
        requested = "classification" if (not numeric or types.is_bool_dtype(labels) or (integral and few)) else "regression"
    if requested == "classification" and labels.nunique() < 2:
        raise DataError(f"target '{labels.name}' has a single class ({labels.iloc[0]!r}); classification needs at least two classes")
    return requested


def category_text(column: pd.Series) -> pd.Series:
    """A categorical column's values as the text training compared: numbers that arrive for a
    column that was text in training (a code column read as numbers, or with missing values as
    floats) are written as the text they came from, 7.0 as '7'."""
    if types.is_numeric_dtype(column) and not types.is_bool_dtype(column):
        return column.map(lambda v: str(int(v)) if np.isfinite(v) and float(v).is_integer() else str(v))
    return column.astype(str)


def _is_numeric(column: pd.Series) -> bool:
    if types.is_bool_dtype(column):
        return False
    if types.is_numeric_dtype(column):
        return True
    present = column.dropna()
    return len(present) > 0 and _mostly_numbers(present) and bool(pd.to_numeric(present, errors="coerce").notna().all())


def _mostly_numbers(column: pd.Series, sample: int = 1000) -> bool:
    """Could this text column be numeric? A sample answers before a full parse of millions of strings."""
    present = column.dropna()
    head = present.iloc[np.linspace(0, len(present) - 1, min(sample, len(present))).astype(int)] if len(present) else present
    return len(head) > 0 and pd.to_numeric(head, errors="coerce").notna().mean() >= _NUMERIC_SHARE - 0.1


def _rows(column: pd.Series, rows: np.ndarray | None) -> pd.Series:
    return column if rows is None else column.iloc[rows]


def _as_float(column: pd.Series, strict: bool = False) -> np.ndarray:
    """A new, writable float64 array of the column's values (NaN where missing)."""
    if types.is_numeric_dtype(column) and not types.is_bool_dtype(column):
        return column.to_numpy(dtype=np.float64, na_value=np.nan, copy=True)  # callers modify it in place
    parsed = pd.to_numeric(column, errors="coerce")
    if strict:
        bad = column.notna() & parsed.isna() & (column.astype(str).str.strip() != "")
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(f"column '{column.name}' row {row + 1}: {column.iloc[row]!r} is not a number; numeric columns need numbers (or empty values)")
    return parsed.to_numpy(dtype=np.float64, na_value=np.nan, copy=True)  # may be a read-only view otherwise


def _plain(value: Any) -> Any:
    """numpy scalar -> the Python value JSON can hold."""
    return value.item() if isinstance(value, np.generic) else value
