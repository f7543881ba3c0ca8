"""The linear baseline: the model a user gets from scikit-learn in two lines, fitted by fitflow.

Logistic regression for classification (full-batch L-BFGS in torch; multi-label: one per class,
as scikit-learn's MultiOutputClassifier(LogisticRegression()) fits them), ridge regression for
regression (closed form), both on the training split's features exactly as the network sees
them (imputed, standardised, one-hot) and with scikit-learn's default penalties (C = 1 for
LogisticRegression, alpha = 1 for Ridge; the intercept is not penalised). The fitted model is an
`nn.Linear` that the same `evaluate` scores on the same test loader as the network: the same
rows, the same loss (class weights included; yours when you give one) and the same metrics (yours
too), logged as
`baseline_test_<metric>`. Tables only: images and Datasets have no features for it.
No Prefect, no MLflow here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tasks.callbacks import Monitor
from tasks.config import TrainConfig
from tasks.data import Prepared
from tasks.loaders import Loaders
from tasks.trainer import task_metrics, training_loss
from tasks.training import evaluate

BASELINE_PREFIX = "baseline_"  # baseline_test_accuracy beside test_accuracy
# scikit-learn's stopping rule for lbfgs (tol 1e-4 on the largest gradient entry, 100 iterations): on the
# 20,000-row table of benchmarks/quality.py, 1e-6 and 500 iterations took 7x longer for the same metrics.
_LBFGS_TOLERANCE, _LBFGS_ITERATIONS = 1e-4, 100


@dataclass
class Baseline:
    model: str  # "logistic regression", "logistic regression per class" or "ridge regression"
    metrics: dict[str, float]  # baseline_test_loss, baseline_test_accuracy, ...


def linear_baseline(config: TrainConfig, prepared: Prepared, loaders: Loaders, device: torch.device) -> Baseline:
    """Fit the linear model on the training split; score it on `loaders.test`, the network's test rows."""
    loss_fn = training_loss(config, prepared, None, device)  # the network's test loss: a function when it is yours
    train, task = prepared.train, prepared.preprocessor.task
    if task == "regression":
        linear, name = fit_ridge(train.features, train.targets), "ridge regression"
    else:  # the run's class weights (multi-label: each class's pos_weight), so both fit the same weighted loss
        weights = getattr(loss_fn, "weight" if task == "classification" else "pos_weight", None)
        linear = fit_logistic(train.features, train.targets, len(prepared.preprocessor.classes), weights,
                              multilabel=task == "multilabel")
        name = "logistic regression per class" if task == "multilabel" else "logistic regression"
    linear.to(device)
    metrics = evaluate(linear, loaders.test, loss_fn, task_metrics(prepared, config.metrics), device, "test")
    return Baseline(name, {BASELINE_PREFIX + key: value for key, value in metrics.items()})


def fit_ridge(features: np.ndarray, targets: np.ndarray, alpha: float = 1.0) -> nn.Linear:
    """Ridge regression in closed form (float64): (Xc'Xc + alpha I) w = Xc'yc on centred data."""
    x = torch.as_tensor(features, dtype=torch.float64)
    y = torch.tensor(targets, dtype=torch.float64).reshape(-1)
    x_mean, y_mean = x.mean(dim=0), y.mean()
    centred = x - x_mean
    gram = centred.T @ centred + alpha * torch.eye(x.shape[1], dtype=torch.float64)
    weight = torch.linalg.solve(gram, centred.T @ (y - y_mean))
    linear = nn.Linear(x.shape[1], 1)
    with torch.no_grad():
        linear.weight.copy_(weight.unsqueeze(0))
        linear.bias.fill_(float(y_mean - x_mean @ weight))
    return linear


def fit_logistic(features: np.ndarray, targets: np.ndarray, n_classes: int, class_weights: torch.Tensor | None = None,
                 c: float = 1.0, multilabel: bool = False) -> nn.Linear:
    """Multinomial logistic regression: summed (weighted) cross-entropy / n + ||W||^2 / (2 C n), by L-BFGS;
    for two classes the same fit as scikit-learn's binary LogisticRegression(C=c). `multilabel`: one
    binary logistic regression per class (0/1 targets, class_weights as each class's pos_weight)."""
    x = torch.as_tensor(features, dtype=torch.float32)
    y = torch.tensor(targets, dtype=torch.float32 if multilabel else torch.int64)  # a copy: prepared arrays may be read-only
    linear = nn.Linear(x.shape[1], n_classes)
    nn.init.zeros_(linear.weight)  # the convex problem needs no random start: same fit on every run
    nn.init.zeros_(linear.bias)
    weights = class_weights.float().cpu() if class_weights is not None else None
    if multilabel:
        data_loss = nn.BCEWithLogitsLoss(pos_weight=weights, reduction="sum")
        penalty = 1.0 / (2.0 * c * len(y))  # each class's own logit and penalty, as n_classes separate fits
    else:
        data_loss = nn.CrossEntropyLoss(weight=weights, reduction="sum")
        # Two classes: scikit-learn fits one logit, beta = w1 - w0; at the symmetric optimum (w0 = -w1) its
        # penalty ||beta||^2 / 2 is twice the multinomial one, so double it to fit the same model.
        penalty = (2.0 if n_classes == 2 else 1.0) / (2.0 * c * len(y))
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=_LBFGS_ITERATIONS, history_size=20,
                                  tolerance_grad=_LBFGS_TOLERANCE, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = data_loss(linear(x), y) / len(y) + penalty * linear.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    return linear


def judged_metric(monitor: str) -> str:
    """The test metric a run is judged by: the test counterpart of `monitor` (val_loss -> test_loss),
    as the registry's promotion gate does."""
    return "test_" + monitor.split("_", 1)[1]


def beats_baseline(metrics: dict[str, float], monitor: str) -> bool | None:
    """Is the network strictly better than the baseline on the judged metric? None when either is missing."""
    name = judged_metric(monitor)
    if name not in metrics or BASELINE_PREFIX + name not in metrics:
        return None
    network, baseline = metrics[name], metrics[BASELINE_PREFIX + name]
    return network < baseline if Monitor(monitor).lower_is_better else network > baseline


def baseline_sentence(metrics: dict[str, float], monitor: str, model: str = "linear baseline") -> str | None:
    """One plain sentence when the network does not beat the baseline; None when it does (or no baseline)."""
    if beats_baseline(metrics, monitor) is not False:
        return None
    name = judged_metric(monitor)
    return (f"The network does not beat the {model} fitted on the same training split: {name} "
            f"{metrics[name]:.4f} against {metrics[BASELINE_PREFIX + name]:.4f} on the same test rows.")
