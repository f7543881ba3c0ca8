"""The linear baseline: the model a user gets from scikit-learn in two lines, fitted by fitflow.

Logistic regression for classification (full-batch L-BFGS in torch; multi-label: one per class,
as scikit-learn's MultiOutputClassifier(LogisticRegression()) fits them), ridge regression for
regression (closed form), both on the training split's features exactly as the network sees
them (imputed, standardised, one-hot) and with scikit-learn's default penalties (tasks/linear_fit.py).
The fitted model is an
`nn.Linear` that the same `evaluate` scores on the same test loader as the network: the same
rows, the same loss (class weights included; yours when you give one) and the same metrics (yours
too), logged as
`baseline_test_<metric>`. Tables only: images and Datasets have no features for it.
No Prefect, no MLflow here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tasks.config import TrainConfig
from tasks.data import Prepared
from tasks.linear_fit import fit_linear
from tasks.loaders import BatchLoader
from tasks.trainer import Given, task_metrics, training_loss, your_metrics
from tasks.training import evaluate

BASELINE_PREFIX = "baseline_"  # baseline_test_accuracy beside test_accuracy


@dataclass
class Baseline:
    model: str  # "logistic regression", "logistic regression per class" or "ridge regression"
    metrics: dict[str, float]  # baseline_test_loss, baseline_test_accuracy, ...


def linear_baseline(config: TrainConfig, prepared: Prepared, test_loader: BatchLoader, device: torch.device,
                    given: Given | None = None, fitted: tuple[nn.Linear, str] | None = None) -> Baseline:
    """Fit the linear model on the training split; score it on `test_loader`, the network's test rows, with the
    network's test loss and metrics (`given`: the Python API's own loss and metric objects, as the network's).
    `fitted`: the same fit already made (the one the network started from, Trained.linear_start), scored as it is."""
    loss_fn = training_loss(config, prepared, given, device)  # the network's test loss: a function when it is yours
    linear, name = fitted if fitted is not None else fit_linear(prepared, loss_fn)
    linear.to(device)
    metrics = evaluate(linear, test_loader, loss_fn, task_metrics(prepared, your_metrics(config, given)), device, "test")
    return Baseline(name, {BASELINE_PREFIX + key: value for key, value in metrics.items()})


def judged_metric(monitor: str) -> str:
    """The test metric a run is judged by: the test counterpart of `monitor` (val_loss -> test_loss),
    as the registry's promotion gate does."""
    return "test_" + monitor.split("_", 1)[1]


def beats_baseline(metrics: dict[str, float], monitor: str, lower_is_better: bool) -> bool | None:
    """Is the network strictly better than the baseline on the judged metric? None when either is missing.
    `lower_is_better`: which way the monitor improves (tasks/trainer.py lower_is_better; a run's own record of it,
    tasks/tracking.py recorded_lower_is_better): a metric of yours may say so against its name."""
    name = judged_metric(monitor)
    if name not in metrics or BASELINE_PREFIX + name not in metrics:
        return None
    network, baseline = metrics[name], metrics[BASELINE_PREFIX + name]
    return network < baseline if lower_is_better else network > baseline


def baseline_sentence(metrics: dict[str, float], monitor: str, lower_is_better: bool,
                      model: str = "linear baseline") -> str | None:
    """One plain sentence when the network does not beat the baseline; None when it does (or no baseline)."""
    if beats_baseline(metrics, monitor, lower_is_better) is not False:
        return None
    name = judged_metric(monitor)
    return (f"The network does not beat the {model} fitted on the same training split: {name} "
            f"{metrics[name]:.4f} against {metrics[BASELINE_PREFIX + name]:.4f} on the same test rows.")
