"""The training loop: the one every PyTorch user knows, plus callbacks around it.

Each epoch is one training pass (train mode: zero_grad, forward, loss, backward, step; with
gradient accumulation one step per group of batches) and one validation pass (eval mode under
inference_mode). Early stopping, best weights, checkpoints, the LR schedule, progress, MLflow
and your own callbacks hang off the hooks (tasks/callbacks.py, tasks/tracking.py).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tasks.callbacks import Callback, FitState, uses_hook
from tasks.device import autocast_dtype
from tasks.errors import TrainingError

if TYPE_CHECKING:
    from tasks.metrics import TaskMetrics


@dataclass
class History:
    """Per-epoch logs, like Keras' History: `history.history["val_loss"]` is a list."""

    epochs: list[dict[str, float]] = field(default_factory=list)

    @property
    def history(self) -> dict[str, list[float]]:
        return {key: [logs[key] for logs in self.epochs] for key in (self.epochs[0] if self.epochs else {})}

    def __len__(self) -> int:
        return len(self.epochs)


def seed_everything(seed: int) -> None:
    """Same seed, same weights, same batch order, same dropout masks (on CPU, bit for bit)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def fit(
    model: nn.Module,
    train_loader,
    val_loader,
    *,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    metrics: TaskMetrics | None,
    device: torch.device,
    callbacks: Sequence[Callback] = (),
    precision: str = "32",
    grad_clip: float | None = None,
    accumulate_grad_batches: int = 1,
) -> History:
    """Train for up to `epochs` epochs, validating after each; returns the History.

    A callback's `on_fit_start` may restore a checkpoint (tasks/checkpoints.py): the loop then
    continues after `state.epoch`, with the history of the epochs before it.
    With `accumulate_grad_batches` k, the optimizer steps once per k batches on their mean
    gradient (the last group of an epoch may be shorter): with equal batches, the step of one
    batch k times larger.
    """
    history = History()
    model.to(device)
    if metrics is not None:
        metrics.to(device)
    amp_dtype = autocast_dtype(precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    state = FitState(model=model, optimizer=optimizer, epochs=epochs, batches=len(train_loader),
                     history=history.epochs, scaler=scaler)
    k = accumulate_grad_batches
    per_batch = [c for c in callbacks if uses_hook(c, "on_train_batch_end")]  # usually none: no call per batch
    for callback in callbacks:
        callback.on_fit_start(state)
    try:
        for epoch in range(state.epoch + 1, epochs + 1):
            if state.stop:  # set by a callback: early stopping (also in a resumed run that had stopped)
                break
            _set_epoch(train_loader, epoch)  # the shuffle is a function of (seed, epoch): resumable
            state.epoch = epoch
            for callback in callbacks:
                callback.on_epoch_start(state)
            model.train()
            batch_losses = torch.zeros(state.batches, device=device)  # summed on device: no sync per step
            seen = 0
            for batch, (x, y) in enumerate(train_loader):
                x, y = to_device(x, device), y.to(device, non_blocking=True)
                first = batch - batch % k  # the first batch of this one's accumulation group
                group = min(k, state.batches - first)  # batches in the group: the last one may be shorter
                steps = batch == first + group - 1  # the group's last batch steps the optimizer
                if batch == first:
                    optimizer.zero_grad(set_to_none=True)
                with _autocast(device, amp_dtype), _gradient_sync(model, steps):
                    loss = loss_fn(call_model(model, x), y)
                scaler.scale(loss / group if group > 1 else loss).backward()  # the group's mean gradient
                if steps:
                    if grad_clip:
                        scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
                        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                    state.step += 1
                batch_losses[batch] = loss.detach() * len(y)
                seen += len(y)
                for callback in per_batch:
                    callback.on_train_batch_end(state, batch, loss.detach())
            _check_finite(batch_losses, epoch)
            state.logs = {"train_loss": float(batch_losses.sum()) / seen}
            state.logs.update(evaluate(model, val_loader, loss_fn, metrics, device, "val", amp_dtype))
            state.history.append(dict(state.logs))
            for callback in callbacks:
                callback.on_epoch_end(state)
    finally:
        for callback in callbacks:
            callback.on_fit_end(state)
    return history


def evaluate(
    model: nn.Module,
    loader,
    loss_fn: nn.Module,
    metrics: TaskMetrics | None,
    device: torch.device,
    split: str = "test",
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Loss and task metrics over every row of `loader`, as `<split>_<metric>`."""
    model.eval()
    total, seen = torch.zeros((), device=device), 0
    with torch.inference_mode():
        for x, y in loader:
            x, y = to_device(x, device), y.to(device, non_blocking=True)
            with _autocast(device, amp_dtype):
                outputs = call_model(model, x)
            total += loss_fn(outputs.float(), y) * len(y)
            seen += len(y)
            if metrics is not None:
                metrics.update(outputs, y)
    total, seen = _sum_over_ranks(total, seen)  # DDP: each rank saw its shard; the metrics sum their own
    logs = {"loss": float(total) / seen, **(metrics.compute() if metrics is not None else {})}
    return {f"{split}_{name}": value for name, value in logs.items()}


def predict_outputs(model: nn.Module, features: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Raw model outputs for a feature matrix, in eval mode, on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    with torch.inference_mode():
        return torch.cat([model(chunk.to(device)).float().cpu() for chunk in features.split(batch_size)])


def to_device(x: Any, device: torch.device) -> Any:
    """A batch's inputs on `device`: a tensor, or a tuple/list or dict of tensors."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {key: to_device(value, device) for key, value in x.items()}
    return type(x)(to_device(value, device) for value in x)


def call_model(model: nn.Module, x: Any) -> torch.Tensor:
    """model(x), model(*x) for a tuple/list of inputs, model(**x) for a dict of them."""
    if isinstance(x, dict):
        return model(**x)
    return model(*x) if isinstance(x, (tuple, list)) else model(x)


def _sum_over_ranks(total: torch.Tensor, seen: int) -> tuple[torch.Tensor, int]:
    """Under DDP, the loss sum and row count of the whole split (all ranks get the same numbers)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return total, seen
    both = torch.stack([total.double(), torch.tensor(seen, dtype=torch.float64, device=total.device)])
    torch.distributed.all_reduce(both)  # float64: the partial sums add up without losing digits
    return both[0], int(both[1])


def optimizer_steps(batches: int, accumulate_grad_batches: int) -> int:
    """Optimizer steps per epoch: one per group of `accumulate_grad_batches` batches, a shorter last group included."""
    return -(-batches // accumulate_grad_batches)


def _gradient_sync(model: nn.Module, sync: bool):
    """DDP all-reduces the gradients in every backward; within an accumulation group only the
    last one needs it. DDP decides in the forward, so the forward runs inside `no_sync`."""
    return model.no_sync() if not sync and isinstance(model, DistributedDataParallel) else nullcontext()


def _set_epoch(loader, epoch: int) -> None:
    sampler = getattr(loader, "sampler", None)  # BatchLoader and DataLoader both name it so
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def _check_finite(batch_losses: torch.Tensor, epoch: int) -> None:
    bad = torch.nonzero(~torch.isfinite(batch_losses))
    if len(bad):
        batch = int(bad[0])
        raise TrainingError(
            f"the loss became {float(batch_losses[batch])} at epoch {epoch}, batch {batch + 1}; "
            "lower the learning rate (--lr), set --grad-clip, or check the data for extreme values"
        )
