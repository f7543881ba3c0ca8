"""`fitflow runs`: an experiment's runs ranked by a metric, from MLflow's search API.

The numbers are MLflow's own (a run's latest value of each metric, as the MLflow UI shows
them) and MLflow does the sorting. Per-epoch metrics (val_accuracy) hold the last epoch;
`best_<monitor>` (e.g. best_val_accuracy) holds the value of the weights that were kept, which
is what a sweep ranks by. Losses and errors sort ascending, scores descending; a metric its runs
monitored sorts the way they recorded it improves (a metric of yours says which way). Runs without
the metric come last; ties go to the run that started first, as in a sweep's own ranking. Each table run also shows its linear baseline (`baseline_test_<metric>`,
fitted on its own training split) on the metric it is judged by, the test counterpart of its monitor.
"""

from __future__ import annotations

import json
import re
from typing import Any

from mlflow.entities import Experiment
from mlflow.tracking import MlflowClient

from tasks.baseline import BASELINE_PREFIX, beats_baseline, judged_metric
from tasks.callbacks import Monitor
from tasks.errors import ConfigError
from tasks.redaction import redact_uri
from tasks.tracking import MONITOR_MODE_TAG, recorded_lower_is_better

MAX_PARAM_COLUMNS = 6
# What MLflow accepts as a metric key, and so inside the backquotes of an order_by clause
METRIC_NAME = re.compile(r"[\w\-./: ]+")
RUN_ID = re.compile(r"[0-9a-f]{32}")
SHOWN_METRICS = ("test_accuracy", "test_f1_micro", "test_f1_macro", "test_auroc", "test_rmse", "test_mae", "test_r2", "test_loss")


def ranked_runs(uri: str, experiment: str, sort: str = "val_loss", top: int = 20,
                parent_run_id: str | None = None) -> list[dict[str, Any]]:
    """The top runs of `experiment` by `sort` (losses and errors ascending), as plain rows."""
    if top < 1:
        raise ConfigError(f"--top must be at least 1 (got {top})")
    if not METRIC_NAME.fullmatch(sort):
        raise ConfigError(f"--sort {sort!r} is not a metric name (letters, digits, and _ - . / : or spaces), e.g. val_loss")
    if parent_run_id is not None and not RUN_ID.fullmatch(parent_run_id):
        raise ConfigError(f"--sweep {parent_run_id!r} is not a run id; give the sweep's parent run id "
                          "(32 hex characters, printed by fitflow sweep)")
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ConfigError(f"no MLflow experiment '{experiment}' in {redact_uri(uri)}; experiments: {', '.join(names) or 'none'}")
    filter_string = f"tags.mlflow.parentRunId = '{parent_run_id}'" if parent_run_id else ""
    direction = "ASC" if _lower_is_better(client, found, filter_string, sort) else "DESC"
    runs = client.search_runs([found.experiment_id], filter_string=filter_string,
                              order_by=[f"metrics.`{sort}` {direction}", "attributes.start_time ASC"], max_results=top)
    return [_row(run, sort) for run in runs]


def _lower_is_better(client: MlflowClient, experiment: Experiment, filter_string: str, sort: str) -> bool:
    """Which way `sort` improves: as the runs that monitored its metric recorded it (tasks/tracking.py MONITOR_MODE_TAG:
    a metric of yours may be lower-is-better whatever its name), else by its name. `best_val_x`, `test_x`,
    `baseline_test_x` and `champion_test_x` are all the metric of a run that monitored `val_x`."""
    stem = re.sub(r"^(best_|baseline_|champion_)?(train_|val_|test_)", "", sort)
    if stem == sort:
        return Monitor(sort).lower_is_better
    recorded = []
    for mode in ("min", "max"):
        clauses = [filter_string, f"params.monitor = 'val_{stem}'", f"tags.`{MONITOR_MODE_TAG}` = '{mode}'"]
        if client.search_runs([experiment.experiment_id], filter_string=" and ".join(c for c in clauses if c),
                              max_results=1):
            recorded.append(mode)
    if len(recorded) > 1:
        raise ConfigError(f"the runs of experiment '{experiment.name}' disagree on which way val_{stem} improves (some "
                          "trained with it lower-is-better, others higher-is-better: two metrics of one name); rank "
                          "them apart, by --sweep or in experiments of their own")
    return recorded[0] == "min" if recorded else Monitor(sort).lower_is_better


def _row(run, sort: str) -> dict[str, Any]:
    metrics, params = run.data.metrics, dict(run.data.params)
    monitor = params.get("monitor")  # a sweep's parent run has none: it judges no network of its own
    judged = judged_metric(monitor) if monitor else None
    tested = (*SHOWN_METRICS, *([judged] if judged else []))
    names = (sort, *tested, *(BASELINE_PREFIX + name for name in tested))
    shown = {name: metrics[name] for name in names if name in metrics}
    beats = beats_baseline(metrics, monitor, recorded_lower_is_better(monitor, run.data.tags)) if monitor else None
    return {"run_id": run.info.run_id, "name": run.info.run_name, "status": run.info.status,
            "parent": run.data.tags.get("mlflow.parentRunId"), "params": params, "metrics": shown,
            "judged_by": judged, "beats_baseline": beats}


def varying_params(rows: list[dict[str, Any]]) -> list[str]:
    """The params whose values differ between the rows: the ones worth a column."""
    names = sorted({name for row in rows for name in row["params"]
                    if name != "run_name" and not name.startswith(("data.", "sweep.", "best."))})
    varying = [n for n in names if len({row["params"].get(n) for row in rows}) > 1]
    return varying[:MAX_PARAM_COLUMNS]


def print_table(rows: list[dict[str, Any]], sort: str, experiment: str) -> None:
    from rich.console import Console
    from rich.table import Table

    params = varying_params(rows)
    metrics = [m for m in (sort, *SHOWN_METRICS) if any(m in row["metrics"] for row in rows)]
    with_baseline = any(row["beats_baseline"] is not None for row in rows)
    table = Table(title=f"{experiment}: {len(rows)} run(s) by {sort}", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("run id", no_wrap=True)
    for name in ("name", "status", "parent"):
        table.add_column(name)
    for name in params:
        table.add_column(name)
    for name in metrics:
        table.add_column(name, justify="right", style="bold" if name == sort else None)
    if with_baseline:
        table.add_column("linear baseline", justify="right")
    for rank, row in enumerate(rows, 1):
        values = [row["params"].get(p, "") for p in params]
        numbers = [f"{row['metrics'][m]:.4f}" if m in row["metrics"] else "" for m in metrics]
        baseline = [_baseline_cell(row)] if with_baseline else []
        table.add_row(str(rank), row["run_id"], row["name"] or "", row["status"], (row["parent"] or "")[:8],
                      *values, *numbers, *baseline)
    console = Console(width=max(Console().width, 200))  # wide: run ids stay whole when piped
    console.print(table)
    behind = [row for row in rows if row["beats_baseline"] is False]
    if behind:
        console.print(f"{len(behind)} of {len(rows)} run(s) do not beat the linear baseline fitted on their own "
                      f"training split, on the metric each is judged by: {', '.join(r['run_id'][:8] for r in behind)}.")


def _baseline_cell(row: dict[str, Any]) -> str:
    """The baseline's value of the run's judged metric, and whether the network beats it."""
    if row["beats_baseline"] is None:
        return ""
    name = row["judged_by"]
    return f"{name} {row['metrics'][BASELINE_PREFIX + name]:.4f}{'' if row['beats_baseline'] else ' (not beaten)'}"


def as_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=1)
