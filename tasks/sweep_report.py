"""A sweep's results as a ranked table (CSV, Prefect table) and a plot of the metric per parameter.

The rows come from the child MLflow runs themselves (flows/sweep.py), so the table shows the
numbers the MLflow UI and `fitflow runs` show.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

STATE_ORDER = {"complete": 0, "pruned": 1, "failed": 2}


def rank_trials(rows: list[dict[str, Any]], score: str, lower_is_better: bool) -> pd.DataFrame:
    """Complete trials by score (best first), then pruned ones by score, then failed ones; rank from 1.

    Ties go to the trial whose run started first (`started`, epoch ms), as in `fitflow runs`.
    """
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame["_state"] = frame["state"].map(STATE_ORDER)
    frame = frame.sort_values(["_state", score, "started"], ascending=[True, lower_is_better, True], na_position="last")
    frame = frame.drop(columns=["_state", "started"]).reset_index(drop=True)
    frame.insert(0, "rank", range(1, len(frame) + 1))
    return frame


def table_records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """JSON-able rows (lists as JSON text, NaN as empty) for a Prefect table artifact."""
    records = []
    for row in frame.to_dict(orient="records"):
        records.append({k: _cell(v) for k, v in row.items()})
    return records


def _cell(value: Any) -> Any:
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    if isinstance(value, float):
        return None if pd.isna(value) else round(value, 6)
    return value


def plot_metric_by_param(frame: pd.DataFrame, params: dict[str, dict[str, Any]], score: str, path: str | Path) -> Path:
    """One panel per searched parameter: the score of every complete or pruned trial against its value."""
    from matplotlib.figure import Figure  # not pyplot: see tasks/plots.py

    shown = frame[frame["state"] != "failed"] if not frame.empty else frame
    fig = Figure(figsize=(4 * len(params), 3.4))
    axes = fig.subplots(1, len(params), squeeze=False)
    for ax, (name, dim) in zip(axes[0], params.items()):
        for state, marker in (("complete", "o"), ("pruned", "x")):
            part = shown[shown["state"] == state] if not shown.empty else shown
            if part.empty:
                continue
            if dim.get("choices") is not None:  # categories on evenly spaced positions, in the order given
                labels = [json.dumps(c) if isinstance(c, (list, dict)) else str(c) for c in dim["choices"]]
                values = [labels.index(json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for v in part[name]]
                ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
            else:
                values = part[name].astype(float)
            ax.scatter(values, part[score], marker=marker, label=state, alpha=0.8)
        if dim.get("log"):
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel(score)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{score} by searched parameter")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path
