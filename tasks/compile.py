"""Keras-style `compile`: optimizer, learning-rate schedule and loss chosen by name (or your loss by import path)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from tasks.errors import ConfigError
from tasks.user_code import loss_module

_FUSED_DEVICES = ("cpu", "cuda", "mps", "xpu")  # where torch ships fused Adam/AdamW/SGD kernels
LOSSES = {"cross_entropy": nn.CrossEntropyLoss, "bce": nn.BCEWithLogitsLoss, "mse": nn.MSELoss, "huber": nn.HuberLoss,
          "l1": nn.L1Loss}
AUTO_LOSS = {"classification": "cross_entropy", "multilabel": "bce", "regression": "mse"}
_LOSS_TASK = {"cross_entropy": "classification", "bce": "multilabel"}  # the others are regression losses
PER_STEP_SCHEDULERS = ("warmup_cosine", "onecycle")  # stepped after every optimizer step; the others once per epoch


def make_optimizer(name: str, params: Iterable[nn.Parameter], lr: float, weight_decay: float = 0.0,
                   momentum: float = 0.9) -> torch.optim.Optimizer:
    """The optimizer, with torch's fused kernel where the parameters allow it.

    The fused kernel updates every parameter in one call instead of a chain of foreach ops: the
    benchmark MLP's whole epoch is 21% faster with it on CPU (benchmarks/, 10 rounds). It
    computes the same update; the results differ from the default kernel in the last bits only.
    """
    params = list(params)
    fused = bool(params) and all(p.is_floating_point() and p.device.type in _FUSED_DEVICES for p in params)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fused)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused)
    raise ConfigError(f"unknown optimizer '{name}'; use adam, adamw or sgd")


def make_scheduler(name: str, optimizer: torch.optim.Optimizer, epochs: int, step_size: int = 10, gamma: float = 0.1,
                   steps_per_epoch: int = 1, warmup_steps: int = 0,
                   ) -> torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau | None:
    """The schedule by name. Per epoch: cosine (over all epochs), step, plateau. Per optimizer step
    (PER_STEP_SCHEDULERS, over epochs * steps_per_epoch steps): warmup_cosine, a linear warmup of
    `warmup_steps` then a cosine decay to 0; onecycle, torch's OneCycleLR peaking at the optimizer's
    lr after `warmup_steps` (0: after 30% of the steps, torch's default)."""
    if name == "none":
        return None
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)
    if name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=gamma, patience=max(1, step_size // 5))
    if name not in PER_STEP_SCHEDULERS:
        raise ConfigError(f"unknown scheduler '{name}'; use none, cosine, step, plateau, warmup_cosine or onecycle")
    total = epochs * steps_per_epoch
    if warmup_steps >= total:
        raise ConfigError(f"warmup_steps {warmup_steps} leaves no step of the {name} schedule: the run has {total} "
                          f"optimizer steps ({epochs} epochs x {steps_per_epoch}); lower warmup_steps")
    if name == "warmup_cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup_steps, total))
    momentum = any(group.get("momentum") or "betas" in group for group in optimizer.param_groups)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[group["lr"] for group in optimizer.param_groups], total_steps=total,
        pct_start=warmup_steps / total if warmup_steps else 0.3, cycle_momentum=momentum,  # sgd without momentum
    )


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """The lr factor for optimizer step `step` (0-based): (step + 1) / (warmup + 1) while warming
    up (the first step already learns, at lr / (warmup + 1)), then half a cosine from 1 to 0."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / (total_steps - warmup_steps)))


def make_loss(name: str, task: str, class_weights: torch.Tensor | None = None) -> nn.Module:
    """The loss by name, or yours by import path (tasks/user_code.py); `class_weights` (one per
    class) weigh cross-entropy for imbalanced classes, or each class's positives in binary
    cross-entropy (its `pos_weight`) for multilabel."""
    if ":" in name:
        if class_weights is not None:
            raise ConfigError(f"class_weights balanced weighs fitflow's own losses; with your loss '{name}', "
                              "weigh the classes in it, or drop class_weights")
        return loss_module(name)
    if name == "auto":
        name = AUTO_LOSS[task]
    if name not in LOSSES:
        raise ConfigError(f"unknown loss '{name}'; use one of {', '.join(LOSSES)}, or yours as 'package.module:name'")
    if _LOSS_TASK.get(name, "regression") != task:
        raise ConfigError(f"loss '{name}' does not fit a {task} task; use --loss auto")
    if class_weights is None:
        return LOSSES[name]()
    return nn.CrossEntropyLoss(weight=class_weights) if name == "cross_entropy" else nn.BCEWithLogitsLoss(pos_weight=class_weights)


def balanced_class_weights(targets: torch.Tensor, n_classes: int) -> torch.Tensor:
    """n / (classes * count of the class), scikit-learn's "balanced": each class weighs as much in
    the loss as if the classes were equally frequent. A class absent from the training split
    weighs as one row would."""
    counts = torch.bincount(torch.as_tensor(targets).long().flatten(), minlength=n_classes).clamp(min=1)
    return (len(targets) / (n_classes * counts)).float()
