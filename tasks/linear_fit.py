"""Linear models fitted in closed form or by L-BFGS: logistic regression and ridge regression.

Both fit the training split's features exactly as the network sees them (imputed, standardised,
one-hot) with scikit-learn's default penalties (C = 1 for LogisticRegression, alpha = 1 for Ridge;
the intercept is not penalised), into an `nn.Linear`. They are the linear baseline of every table
run (tasks/baseline.py) and the start of the default table network's linear path (tasks/models.py
LinearAndMLP). No Prefect, no MLflow here.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tasks.data import Prepared

# scikit-learn's stopping rule for lbfgs (tol 1e-4 on the largest gradient entry, 100 iterations): on the
# 20,000-row table of benchmarks/quality.py, 1e-6 and 500 iterations took 7x longer for the same metrics.
_LBFGS_TOLERANCE, _LBFGS_ITERATIONS = 1e-4, 100


def fit_linear(prepared: Prepared, loss_fn: object) -> tuple[nn.Linear, str]:
    """The task's linear model on the training split, and its name; classification with the class weights of
    `loss_fn` (multi-label: each class's pos_weight), so that it fits the same weighted loss as the network."""
    train, task = prepared.train, prepared.preprocessor.task
    if task == "regression":
        return fit_ridge(train.features, train.targets), "ridge regression"
    weights = getattr(loss_fn, "weight" if task == "classification" else "pos_weight", None)
    linear = fit_logistic(train.features, train.targets, len(prepared.preprocessor.classes), weights,
                          multilabel=task == "multilabel")
    return linear, "logistic regression per class" if task == "multilabel" else "logistic regression"


def baseline_penalty(prepared: Prepared) -> float:
    """The linear baseline's L2 penalty as a coefficient on the gradient of the network's mean loss (Adam's
    coupled weight_decay): with it, the linear model that minimises the network's loss is the baseline's fit.

    Ridge (alpha = 1) minimises sum((y - Xw)^2) + ||w||^2: over n rows, MSE + ||w||^2 / n, gradient + 2w / n.
    Logistic regression (C = 1) over n rows: mean cross-entropy + ||W||^2 / (2n), gradient + W / n; with two
    classes fit_logistic doubles the penalty, + 2W / n; one per class (multi-label) over n rows, where the
    network's BCE is a mean over rows and k classes, + W / (n k). Class weights aside.
    """
    rows, task = len(prepared.train.targets), prepared.preprocessor.task
    classes = len(prepared.preprocessor.classes or [])
    if task == "regression" or (task == "classification" and classes == 2):
        return 2.0 / rows
    return 1.0 / (rows * classes) if task == "multilabel" else 1.0 / rows


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
