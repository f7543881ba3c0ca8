"""Batch scoring checks: raw rows against what a model was trained on, and the scoring summary.

Plain functions (flows/predict.py runs them as tasks). The rules, so nothing is silently wrong:
- a column the model was trained on is missing: error naming the columns;
- a numeric column holds text: error naming the column, row and value;
- a categorical value never seen in training: encoded the way training encoded rare values (its
  feature's `__other__` column when it has one, otherwise all zeros), and counted per column
  in the summary; with `unseen="error"` it is an error naming the column and value instead;
- missing values: filled like training (median / most frequent) and counted in the summary;
- extra columns are ignored; the target column, when present, adds metrics to the summary
  (multilabel: every target column, or the `a|b` label column).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from tasks.errors import DataError
from tasks.labels import THRESHOLD, binary_columns, parse_label_sets
from tasks.preprocessing import Preprocessor, _as_float, category_text


def check_rows(frame: pd.DataFrame, prep: Preprocessor, unseen: str = "encode") -> tuple[pd.DataFrame, dict[str, Any]]:
    """The model's input columns, typed as its signature expects, and what was filled or unseen."""
    missing = [name for name in prep.input_columns if name not in frame.columns]
    if missing:
        raise DataError(f"input is missing column(s) {', '.join(map(repr, missing))} that the model was trained on; "
                        "add them (values may be empty)")
    rows = pd.DataFrame(index=frame.index)
    filled: dict[str, int] = {}
    unseen_counts: dict[str, int] = {}
    for col in prep.numeric:
        rows[col.name] = _as_float(frame[col.name], strict=True)  # text in a numeric column raises with its row
        filled[col.name] = int(rows[col.name].isna().sum())
    for col in prep.categorical:
        values = frame[col.name]
        present = values.notna()
        text = category_text(values).where(present, None)
        new = present & ~text.isin(col.categories)
        arrived_as_numbers = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
        if arrived_as_numbers and new.any() and new.sum() == present.sum():
            raise DataError(f"column '{col.name}' was text in training (e.g. {', '.join(map(repr, col.categories[:3]))}) but "
                            f"holds numbers here that match none of it (e.g. {values[present].iloc[0]}); "
                            "read the column as text, as in training (leading zeros kept)")
        if new.any() and unseen == "error":
            row = int(np.flatnonzero(new.to_numpy())[0])
            raise DataError(f"column '{col.name}' row {row + 1}: {values.iloc[row]!r} never occurred in training "
                            f"(known: {', '.join(col.categories[:10])}); fix the value or pass --unseen encode")
        unseen_counts[col.name] = int(new.sum())
        filled[col.name] = int((~present).sum())
        rows[col.name] = text.astype(object)
    return rows, {"filled_missing": _nonzero(filled), "unseen_categories": _nonzero(unseen_counts)}


def summarise(predictions: pd.DataFrame, prep: Preprocessor, frame: pd.DataFrame) -> dict[str, Any]:
    """Counts and averages of the predictions; metrics when the input carries the target column."""
    summary: dict[str, Any] = {"rows": len(predictions), "task": prep.task}
    if prep.task == "multilabel":  # a row may have several classes: rows per class, and rows with none
        chosen = _predicted_sets(predictions, prep.classes)
        summary["predicted_classes"] = {str(c): int(n) for c, n in zip(prep.classes, chosen.sum(axis=0))}
        summary["rows_without_labels"] = int((chosen.sum(axis=1) == 0).sum())
    elif prep.task == "classification":
        counts = predictions["prediction"].astype(str).value_counts()
        summary["predicted_classes"] = {str(k): int(v) for k, v in counts.items()}
    else:
        summary["prediction_mean"] = float(predictions["prediction"].mean())
        summary["prediction_std"] = float(predictions["prediction"].std())
    if prep.task != "regression":
        summary["mean_probability"] = {c.removeprefix("probability_"): float(predictions[c].mean())
                                       for c in predictions.columns if c.startswith("probability_")}
    truth_columns = prep.target_columns
    if all(name in frame.columns for name in truth_columns) and frame[truth_columns].notna().any().all():
        if prep.task == "multilabel":
            summary["metrics"] = _multilabel_metrics(predictions, frame, prep)
        else:
            summary["metrics"] = _metrics(predictions["prediction"], frame[prep.target], prep)
    return summary


def _predicted_sets(predictions: pd.DataFrame, classes: list) -> np.ndarray:
    """(rows, classes) booleans: the classes each row's prediction holds."""
    return predictions[[f"probability_{c}" for c in classes]].to_numpy() >= THRESHOLD


def _multilabel_metrics(predictions: pd.DataFrame, frame: pd.DataFrame, prep) -> dict[str, float]:
    """Against the input's labels (rows with every target known): the share of right (row, class)
    decisions, of rows whose whole set is right, and micro F1. A label that is not one of the
    model's classes counts as a class it missed."""
    targets = prep.target_columns
    known = frame[targets].notna().all(axis=1).to_numpy() if len(targets) > 1 else np.ones(len(frame), dtype=bool)
    predicted = _predicted_sets(predictions, prep.classes)[known]
    if len(targets) > 1:
        truth = binary_columns(frame[known], targets, "the input").astype(bool)
        unknown = np.zeros(len(truth), dtype=int)
    else:
        sets = parse_label_sets(frame[prep.target][known])
        truth = np.array([[c in labels for c in map(str, prep.classes)] for labels in sets], dtype=bool).reshape(-1, len(prep.classes))
        unknown = np.array([len(set(labels) - set(map(str, prep.classes))) for labels in sets], dtype=int)
    hits = (predicted & truth).sum()
    f1 = 2 * hits / max(predicted.sum() + truth.sum() + unknown.sum(), 1)
    return {"accuracy": float((predicted == truth).mean()),
            "subset_accuracy": float(((predicted == truth).all(axis=1) & (unknown == 0)).mean()),
            "f1_micro": float(f1), "rows_with_labels": int(known.sum())}


def _metrics(predicted: pd.Series, truth: pd.Series, prep: Preprocessor) -> dict[str, float]:
    known = truth.notna().to_numpy()
    if prep.task == "classification":
        numeric = isinstance(prep.classes[0], (int, float)) and not isinstance(prep.classes[0], bool)
        key = (lambda s: pd.to_numeric(s, errors="coerce")) if numeric else (lambda s: s.astype(str))  # noqa: E731
        hits = key(predicted[known]).to_numpy() == key(truth[known]).to_numpy()
        return {"accuracy": float(hits.mean()), "rows_with_labels": int(known.sum())}
    error = predicted.to_numpy()[known] - _as_float(truth)[known]
    return {"rmse": float(np.sqrt(np.mean(error**2))), "mae": float(np.mean(np.abs(error))),
            "rows_with_labels": int(known.sum())}


def _nonzero(counts: dict[str, int]) -> dict[str, int]:
    return {name: count for name, count in counts.items() if count}
