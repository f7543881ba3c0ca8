"""Another model scored on this run's test split, in this run's terms: how the registry's gate
compares a challenger with a champion that was tested on other data (a new data version).

The champion's network sees the challenger's raw test inputs through its own preprocessing (its
pyfunc's `model_inputs`); its outputs are then put in the challenger's output space (classes in
the challenger's order; regression values through the champion's target scaling into the
challenger's), and the challenger's own loss and metrics score them against the challenger's
test targets. So both figures come from the same rows, the same targets and the same metric code.

Rows the champion trained or was validated on (tasks/seen_rows.py, logged when it was registered)
are left out, and the newcomer is scored again on the rows that remain: scored on rows it learned
from, a champion would look better than it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from tasks.config import TrainConfig, target_columns
from tasks.data import Prepared, load_table, raw_splits, raw_test_rows
from tasks.images_prepare import ImagesPrepared
from tasks.seen_rows import SeenRows
from tasks.trainer import loss_of, prep_spec, task_metrics
from tasks.training import evaluate, predict_outputs


class NotComparable(Exception):
    """The other model cannot be scored on this run's test split; the message says why."""


def raw_test_inputs(config: TrainConfig, prepared: Prepared | ImagesPrepared, table: pd.DataFrame | None) -> pd.DataFrame:
    """This run's test split as a model's raw inputs: table rows without the targets, or image paths."""
    if prepared.test is None:
        raise NotComparable("this run has no test split (test_fraction 0)")
    if isinstance(prepared, ImagesPrepared):
        return pd.DataFrame({"path": prepared.test.paths})
    if not isinstance(prepared, Prepared) or table is None:
        raise NotComparable("a model of your own Datasets has no raw test inputs another model could be scored on")
    rows = raw_test_rows(table, prep_spec(config), prepared.preprocessor.task, config.validation_data is not None)
    return rows.drop(columns=target_columns(config.target))


def outputs_in_this_run(other, inputs: pd.DataFrame, preprocessor) -> torch.Tensor:
    """The other model's (a FitflowModel) network outputs for `inputs`, in the output space of `preprocessor`."""
    theirs = other.preprocessor
    if theirs.task != preprocessor.task:
        raise NotComparable(f"it is a {theirs.task} model, this run trained a {preprocessor.task} model")
    x = other.model_inputs(inputs)
    if isinstance(x, dict):
        raise NotComparable("its inputs are a dict of tensors, not raw rows or images")
    outputs = predict_outputs(other.model, x).float().cpu()
    if preprocessor.task == "regression":  # its scaled values -> target units -> this run's scaling
        values = outputs * getattr(theirs, "target_std", 1.0) + getattr(theirs, "target_mean", 0.0)
        return (values - preprocessor.target_mean) / preprocessor.target_std
    mine, its = [str(c) for c in preprocessor.classes], [str(c) for c in theirs.classes]
    if set(mine) != set(its):
        only_mine, only_its = sorted(set(mine) - set(its)), sorted(set(its) - set(mine))
        raise NotComparable(f"the classes differ (only this run: {only_mine or 'none'}; only the other model: "
                            f"{only_its or 'none'})")
    return outputs[:, [its.index(name) for name in mine]]


def score_on_test(config: TrainConfig, prepared: Prepared | ImagesPrepared, outputs: torch.Tensor,
                  rows: np.ndarray | None = None, loss: Callable | None = None) -> dict[str, float]:
    """`test_<metric>` of these outputs against this run's test targets (those of `rows`, a boolean
    mask, when given), with this run's loss (`loss`, else the configured one) and metrics."""
    targets = prepared.test.targets  # images: a tensor; tables: a (possibly read-only, cached) array
    targets = targets.clone() if isinstance(targets, torch.Tensor) else torch.from_numpy(np.array(targets))
    if rows is not None:
        targets = targets[torch.from_numpy(rows)]
    identity = torch.nn.Identity()  # the outputs are given: evaluate only applies the loss and the metrics
    return evaluate(identity, [(outputs, targets)], loss if loss is not None else loss_of(config, prepared),
                    task_metrics(prepared, config.metrics), torch.device("cpu"), "test")


@dataclass
class Rescored:
    """The champion's `test_<metric>` values on this run's test rows less those it trained or was
    validated on (`kept` of `total`), and the newcomer's on the same rows (None when none was left
    out: its own test figures stand)."""
    champion: dict[str, float]
    newcomer: dict[str, float] | None
    kept: int
    total: int


class Rescorer:
    """Scores a logged fitflow model (by URI) on this run's test split, for the registry's gate; and
    this run's own seen rows, which the gate logs with the version it registers."""

    def __init__(self, config: TrainConfig, prepared: Prepared | ImagesPrepared, table: pd.DataFrame | None) -> None:
        self.config, self.prepared, self.table = config, prepared, table
        self.loss: Callable | None = None  # None: the configured loss

    def test_inputs(self) -> pd.DataFrame:
        """This run's test rows as a model's raw inputs, in the order of `prepared.test`."""
        return raw_test_inputs(self.config, self.prepared, self.table)

    def seen_rows(self) -> SeenRows | None:
        """The rows this run trained and validated on (None for images and your Datasets: only table rows
        are recorded)."""
        if not isinstance(self.prepared, Prepared) or self.table is None:
            return None
        train, val, _ = raw_splits(self.table, prep_spec(self.config), self.prepared.preprocessor.task,
                                   self.config.validation_data is not None)
        if self.config.validation_data is not None:  # the validation file's rows were seen too
            val = load_table(self.config.validation_data)
        return SeenRows.of([train, val], self.prepared.preprocessor.input_columns)

    def __call__(self, champion_uri: str, newcomer_uri: str, champion_seen: SeenRows | None) -> Rescored:
        import mlflow

        from tasks.model_loading import load_fitflow_model

        inputs = self.test_inputs()
        unseen = None
        if champion_seen is not None:
            try:
                unseen = ~champion_seen.seen(inputs)
            except KeyError as err:
                raise NotComparable(f"{err.args[0]} the champion was trained on") from None
            if not unseen.any():
                raise NotComparable(f"the champion trained or was validated on every one of the {len(inputs)} "
                                    "test rows")
            if unseen.all():
                unseen = None

        def score(uri: str) -> dict[str, float]:
            # Read as data, never by running its code (a model from code runs model_code.py when MLflow loads it):
            # whoever can register a version would run code here. Not a fitflow model: ConfigError, not comparable.
            model = load_fitflow_model(uri, tracking_uri=mlflow.get_tracking_uri(), own_network=self.config.model)
            rows = inputs if unseen is None else inputs[unseen]
            outputs = outputs_in_this_run(model, rows, self.prepared.preprocessor)
            return score_on_test(self.config, self.prepared, outputs, unseen, self.loss)

        kept = len(inputs) if unseen is None else int(unseen.sum())
        return Rescored(score(champion_uri), None if unseen is None else score(newcomer_uri), kept, len(inputs))


class GivenRowsRescorer(Rescorer):
    """The Python API's (a table fit): its test rows are the DataFrame given to `evaluate`, the rows it
    trained and validated on those of the frames given to `fit`, which it split in memory."""

    def __init__(self, config: TrainConfig, prepared: Prepared, test_frame: pd.DataFrame, seen: list[pd.DataFrame],
                 loss: Callable | None) -> None:
        super().__init__(config, prepared, None)
        self.test_frame, self.seen, self.loss = test_frame, seen, loss

    def test_inputs(self) -> pd.DataFrame:
        return self.test_frame.drop(columns=target_columns(self.config.target))

    def seen_rows(self) -> SeenRows:
        return SeenRows.of(self.seen, self.prepared.preprocessor.input_columns)
