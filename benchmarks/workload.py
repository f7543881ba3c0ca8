"""The benchmark workload and its hand-written baselines.

A 32-feature tabular classification problem (10 classes) and the MLP 32-128-128-10 with Adam,
batch 256: a small MLP whose epoch is dominated by the framework around it, not by compute. The baselines are written the way people
write them: the tutorial loop (DataLoader(TensorDataset), loss.item() per step) and the best
hand-written loop (randperm + index_select, no host sync per step, inference_mode validation).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

FEATURES, CLASSES, HIDDEN, BATCH = 32, 10, [128, 128], 256


@dataclass
class Data:
    x: torch.Tensor
    y: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor


def make_data(n_train: int, n_val: int, seed: int = 0) -> Data:
    """Gaussian features, labels from a fixed random linear map (learnable, not trivial)."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(FEATURES, CLASSES))
    x = rng.normal(size=(n_train + n_val, FEATURES)).astype(np.float32)
    y = (x @ weights + rng.normal(scale=2.0, size=(len(x), CLASSES))).argmax(axis=1)
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)
    return Data(x_t[:n_train], y_t[:n_train], x_t[n_train:], y_t[n_train:])


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = FEATURES
    for size in HIDDEN:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    return nn.Sequential(*layers, nn.Linear(width, CLASSES))


def tutorial_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, data: Data, batch: int = BATCH) -> float:
    """The loop of most tutorials: per-row DataLoader, .item() every step."""
    model.train()
    total = 0.0
    for x, y in DataLoader(TensorDataset(data.x, data.y), batch_size=batch, shuffle=True):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        total += loss.item()
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in DataLoader(TensorDataset(data.x_val, data.y_val), batch_size=batch):
            correct += (model(x).argmax(dim=1) == y).sum().item()
    return correct / len(data.y_val)


def best_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, data: Data, generator: torch.Generator,
               batch: int = BATCH) -> float:
    """The best hand-written loop: batch gather, losses summed on device, one sync per epoch."""
    total = train_pass(model, optimizer, data, generator, batch)
    model.eval()
    correct, val_loss = torch.zeros(()), torch.zeros(())
    with torch.inference_mode():
        for start in range(0, len(data.y_val), 1024):
            x, y = data.x_val[start : start + 1024], data.y_val[start : start + 1024]
            out = model(x)
            val_loss += F.cross_entropy(out, y, reduction="sum")
            correct += (out.argmax(dim=1) == y).sum()
    float(total), float(val_loss)
    return float(correct) / len(data.y_val)


def metrics_validation(model: nn.Module, data: Data, total: torch.Tensor, batch: int = BATCH) -> dict[str, float]:
    """After a training pass (`train_pass`, whose summed batch losses are `total`), what fitflow logs,
    computed by hand once per epoch: the strictest hand loop's epoch is the two. Train and validation
    loss, then accuracy, macro-F1 and the exact AUROC over the whole validation split (torchmetrics'
    functional forms, one call each on the kept outputs)."""
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_auroc, multiclass_f1_score

    model.eval()
    outputs, val_loss = [], torch.zeros(())
    with torch.inference_mode():
        for start in range(0, len(data.y_val), 1024):
            x, y = data.x_val[start : start + 1024], data.y_val[start : start + 1024]
            out = model(x)
            val_loss += F.cross_entropy(out, y, reduction="sum")
            outputs.append(out)
        probs = torch.cat(outputs).softmax(dim=1)
        return {"train_loss": float(total) * batch / len(data.y), "val_loss": float(val_loss) / len(data.y_val),
                "accuracy": float(multiclass_accuracy(probs, data.y_val, CLASSES, average="micro")),
                "f1_macro": float(multiclass_f1_score(probs, data.y_val, CLASSES, average="macro")),
                "auroc": float(multiclass_auroc(probs, data.y_val, CLASSES))}


def train_pass(model: nn.Module, optimizer: torch.optim.Optimizer, data: Data, generator: torch.Generator,
                batch: int) -> torch.Tensor:
    model.train()
    order = torch.randperm(len(data.y), generator=generator)
    total = torch.zeros(())
    for start in range(0, len(order), batch):
        rows = order[start : start + batch]
        x, y = data.x.index_select(0, rows), data.y.index_select(0, rows)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
    return total


def epoch_clock():
    """A fitflow callback, to be the last, whose `epochs` lists each epoch's seconds: from its
    on_epoch_start to its on_epoch_end, after every other callback's (the training and validation
    passes and the epoch's callbacks; not the run's start or end)."""
    from tasks.callbacks import Callback

    class EpochClock(Callback):
        def __init__(self) -> None:
            self.epochs: list[float] = []

        def on_epoch_start(self, state) -> None:
            self.start = time.perf_counter()

        def on_epoch_end(self, state) -> None:
            self.epochs.append(time.perf_counter() - self.start)

    return EpochClock()


class FitflowRunner:
    """A run of fitflow's `train_model` for `epochs` epochs: the flow's own training step with its
    default callbacks (progress lines, best weights + checkpoint, epoch checkpoints, early
    stopping) and MLflow logging to a real sqlite store. Each call builds a fresh model and
    optimizer, as the baselines do, so each call is a run from scratch (in a fresh checkpoint
    folder: an existing epoch checkpoint would be resumed). Patience exceeds the epochs: every
    call runs all of them.

    The network is the baselines' MLP (`make_model`): `linear_path` off, since the default table
    network's linear path (one more layer, and a linear fit before the first epoch) would compare
    two models, not fitflow's loop against a hand loop. The linear baseline's own cost is measured
    by the `baseline` benchmark."""

    def __init__(self, data: Data, tracking: bool = True, batch: int = BATCH, checkpoints_only: bool = False,
                 epochs: int = 1, **settings) -> None:
        from mlflow.tracking import MlflowClient

        from tasks.config import TrainConfig
        from tasks.data import Prepared, Split
        from tasks.preprocessing import NumericColumn, Preprocessor
        from tasks.tracking import experiment_id, prepare_store
        from tasks.trainer import Run, build_loaders

        self.tmp = tempfile.TemporaryDirectory(prefix="fitflow-bench-")
        # the features are already standardised: an identity preprocessing of FEATURES columns
        numeric = [NumericColumn(f"f{i}", 0.0, 0.0, 1.0) for i in range(FEATURES)]
        preprocessor = Preprocessor(target="y", task="classification", numeric=numeric, classes=list(range(CLASSES)))
        self.prepared = Prepared(
            train=Split(data.x.numpy(), data.y.numpy()), val=Split(data.x_val.numpy(), data.y_val.numpy()),
            test=Split(data.x_val.numpy(), data.y_val.numpy()), preprocessor=preprocessor,
        )
        self.config = TrainConfig(epochs=epochs, batch_size=batch, hidden_sizes=HIDDEN, dropout=0.0,
                                  patience=epochs + 5, **{"linear_path": False, **settings})  # settings: other TrainConfig fields
        self.loaders = build_loaders(self.config, self.prepared)
        self.run = None
        self.calls = 0
        # A run without an MLflow client writes the same checkpoints and logs nothing, so a
        # comparison with it isolates MLflow's cost.
        if checkpoints_only:
            self.run = Run(None, "0" * 32, "0", Path(self.tmp.name) / "checkpoints")
        if tracking:
            uri = f"sqlite:///{Path(self.tmp.name) / 'mlflow.db'}"
            prepare_store(uri)
            client = MlflowClient(uri)
            run_id = client.create_run(experiment_id(client, "bench")).info.run_id
            self.run = Run(client, run_id, "0", Path(self.tmp.name) / "checkpoints")

    def fit(self, callbacks: list | tuple = ()) -> float:
        from dataclasses import replace

        from tasks.trainer import train_model

        self.calls += 1
        run = replace(self.run, checkpoint_dir=self.run.checkpoint_dir / str(self.calls)) if self.run else None
        trained = train_model(self.config, self.prepared, self.loaders, run, extra_callbacks=callbacks)
        assert len(trained.history) == self.config.epochs
        return trained.history.epochs[-1]["val_accuracy"]
