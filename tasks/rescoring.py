"""Another model scored on this run's test split, in this run's terms: how the registry's gate
compares a challenger with a champion that was tested on other data (a new data version).

The champion's network sees the challenger's raw test inputs through its own preprocessing (its
pyfunc's `model_inputs`); its outputs are then put in the challenger's output space (classes in
the challenger's order; regression values through the champion's target scaling into the
challenger's), and the challenger's own loss and metrics score them against the challenger's
test targets. So both figures come from the same rows, the same targets and the same metric code.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from tasks.config import TrainConfig, target_columns
from tasks.data import Prepared, raw_test_rows
from tasks.images_prepare import ImagesPrepared
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


def score_on_test(config: TrainConfig, prepared: Prepared | ImagesPrepared, outputs: torch.Tensor) -> dict[str, float]:
    """`test_<metric>` of these outputs against this run's test targets, with this run's loss and metrics."""
    targets = prepared.test.targets  # images: a tensor; tables: a (possibly read-only, cached) array
    targets = targets.clone() if isinstance(targets, torch.Tensor) else torch.from_numpy(np.array(targets))
    identity = torch.nn.Identity()  # the outputs are given: evaluate only applies the loss and the metrics
    return evaluate(identity, [(outputs, targets)], loss_of(config, prepared), task_metrics(prepared, config.metrics),
                    torch.device("cpu"), "test")


def rescorer(config: TrainConfig, prepared: Prepared | ImagesPrepared, table: pd.DataFrame | None):
    """A function that scores a logged fitflow model (by URI) on this run's test split: the registry's `rescore`."""
    import mlflow

    from tasks.model_loading import load_fitflow_model

    def rescore(model_uri: str) -> dict[str, float]:
        inputs = raw_test_inputs(config, prepared, table)
        # Read as data, never by running its code (a model from code runs model_code.py when MLflow loads it):
        # whoever can register a version would run code here. Not a fitflow model: ConfigError, not comparable.
        other = load_fitflow_model(model_uri, tracking_uri=mlflow.get_tracking_uri(), own_network=config.model)
        return score_on_test(config, prepared, outputs_in_this_run(other, inputs, prepared.preprocessor))

    return rescore
