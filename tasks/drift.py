"""Drift: do the rows a model scores still look like the rows it was trained on?

Per input column, against the training statistics the model carries (tasks/preprocessing.py):
- numeric: the population stability index (PSI) of the column over the training deciles (the
  share of rows between each pair of deciles, now and in training; values filled as the model
  fills them). A model logged before the deciles were kept is compared with a normal
  distribution of its training mean and standard deviation.
- categorical: the PSI over the categories the model knows by name plus one bucket for the rest,
  and the share of rows whose value is not among those categories (`unseen_share`: never seen in
  training, or too rare there to get its own column).
PSI = sum over buckets of (now - then) * ln(now / then), shares floored at 1e-4. The usual
reading: below 0.1 stable, 0.1-0.25 a moderate shift, above 0.25 a major one. A column drifts
when its PSI exceeds the threshold (`drift_threshold`, default 0.2).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from tasks.preprocessing import Preprocessor

DEFAULT_THRESHOLD = 0.2
_FLOOR = 1e-4  # a bucket empty on one side would make the index infinite
_NORMAL_DECILES = [-1.2816, -0.8416, -0.5244, -0.2533, 0.0, 0.2533, 0.5244, 0.8416, 1.2816]  # z of 10%..90%


def psi(now: np.ndarray, then: np.ndarray) -> float:
    """Population stability index of two share vectors over the same buckets."""
    now, then = np.maximum(now, _FLOOR), np.maximum(then, _FLOOR)
    return float(np.sum((now - then) * np.log(now / then)))


def drift_table(prep: Preprocessor, frame: pd.DataFrame, threshold: float = DEFAULT_THRESHOLD) -> pd.DataFrame:
    """One row per input column: kind, psi, unseen_share (categorical), missing_share, drifted."""
    rows = []
    for col in prep.numeric:
        values = pd.to_numeric(frame[col.name], errors="coerce").to_numpy(dtype=np.float64)
        missing = np.isnan(values)
        values = np.where(missing, col.median, values)
        if col.deciles is not None:
            edges, then = np.asarray(col.deciles), np.asarray(col.decile_shares)
        else:
            edges, then = col.mean + col.std * np.asarray(_NORMAL_DECILES), np.full(10, 0.1)
        now = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1) / max(len(values), 1)
        rows.append({"column": col.name, "kind": "numeric", "psi": psi(now, then), "unseen_share": math.nan,
                     "missing_share": float(missing.mean()) if len(values) else 0.0})
    for col in prep.categorical:
        column = frame[col.name]
        text = column.astype(str).where(column.notna(), col.fill)
        known = pd.Categorical(text, categories=col.categories).codes
        counts = np.bincount(np.where(known < 0, len(col.categories), known), minlength=len(col.categories) + 1)
        now = counts / max(len(text), 1)
        then = np.asarray(col.shares) if col.shares is not None else None
        rows.append({"column": col.name, "kind": "categorical", "psi": psi(now, then) if then is not None else math.nan,
                     "unseen_share": float(now[-1]), "missing_share": float(column.isna().mean()) if len(column) else 0.0})
    table = pd.DataFrame(rows, columns=["column", "kind", "psi", "unseen_share", "missing_share"])
    table["drifted"] = table["psi"] > threshold
    return table.sort_values("psi", ascending=False, na_position="last").reset_index(drop=True)
