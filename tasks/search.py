"""Hyperparameter search with Optuna: samplers, suggestions from a search space, and pruning.

Plain functions and one callback; the sweep flow (flows/sweep.py) drives them with Optuna's
ask-and-tell interface, so trials can run in Prefect's task runner rather than Optuna's loop.
Optuna's categorical values must be scalars, so list choices (hidden_sizes: [[64], [64, 32]])
travel through Optuna as JSON text and come back as lists.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import optuna

from tasks.callbacks import Callback, FitState
from tasks.errors import ConfigError

GRID_LIMIT = 10_000  # an expanded grid larger than this is a typo, not a plan


def _scalar(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def _unscalar(value: Any, original: list[Any]) -> Any:
    return next((choice for choice in original if _scalar(choice) == value), value)


def grid_values(name: str, dim: dict[str, Any], integer: bool) -> list[Any]:
    """Every value a grid visits for one dimension: its choices, or a range cut by its step."""
    if dim.get("choices") is not None:
        return list(dim["choices"])
    low, high, step = dim["low"], dim["high"], dim.get("step")
    if step is None and not integer:
        raise ConfigError(f"sampler 'grid' needs choices or a step for '{name}'; add step: or use sampler random/tpe")
    step = step or 1
    count = math.floor((high - low) / step + 1e-9) + 1
    if count > GRID_LIMIT:
        raise ConfigError(f"'{name}' expands to {count} grid values; use a larger step or sampler random/tpe")
    values = [low + i * step for i in range(count)]
    return [int(round(v)) for v in values] if integer else [float(np.round(v, 12)) for v in values]


def grid_size(space: dict[str, dict[str, Any]], integers: dict[str, bool]) -> int:
    return math.prod(len(grid_values(name, dim, integers[name])) for name, dim in space.items())


def make_sampler(kind: str, space: dict[str, dict[str, Any]], integers: dict[str, bool], seed: int,
                 n_trials: int, parallel: bool) -> optuna.samplers.BaseSampler:
    """grid (every combination, in a seeded random order), random, or TPE."""
    if kind == "grid":
        grid = {name: [_scalar(v) for v in grid_values(name, dim, integers[name])] for name, dim in space.items()}
        return _AskTellGridSampler(grid, seed=seed)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # TPE starts from random trials; Optuna's default of 10 would leave a small budget all random.
    # constant_liar: trials still running count as bad guesses, so parallel workers spread out.
    startup = max(2, min(10, n_trials // 3))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, constant_liar=parallel)


class _AskTellGridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, minus its `study.stop()` once the grid is done: that call raises
    outside `study.optimize` (ask-and-tell); the sweep caps its trials at the grid size instead."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def make_pruner(enabled: bool, warmup_epochs: int, n_trials: int) -> optuna.pruners.BasePruner:
    """Median pruning: stop a trial that is worse than the median of the earlier trials at the
    same epoch, once a few trials have finished and after the warm-up epochs."""
    if not enabled:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=max(2, min(5, n_trials // 4)), n_warmup_steps=warmup_epochs)


def base_point(space: dict[str, dict[str, Any]], integers: dict[str, bool], base: dict[str, Any]) -> dict[str, Any]:
    """The base config's own value of each searched field that the space holds, as Optuna params.

    The sweep enqueues it as its first trial: the base config then competes with the sampled ones,
    so the best trial is never worse on validation than the base alone. A field whose base value
    lies outside its dimension (an lr above `high`, a width not among the choices) is left out, and
    that trial samples it as any other.
    """
    point: dict[str, Any] = {}
    for name, dim in space.items():
        value = base.get(name)
        if dim.get("choices") is not None:
            if any(_scalar(choice) == _scalar(value) for choice in dim["choices"]):
                point[name] = _scalar(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and dim["low"] <= value <= dim["high"]:
            step = dim.get("step") or (1 if integers[name] else None)
            if step is None or math.isclose((value - dim["low"]) / step, round((value - dim["low"]) / step), abs_tol=1e-9):
                point[name] = int(value) if integers[name] else float(value)
    return point


def enqueue_base(study: optuna.Study, space: dict[str, dict[str, Any]], integers: dict[str, bool],
                 base: dict[str, Any]) -> None:
    """Make the base config (`base_point`) the study's next trial; nothing when the space holds none of its values."""
    point = base_point(space, integers, base)
    if point:
        study.enqueue_trial(point)


def suggest(trial: optuna.Trial, space: dict[str, dict[str, Any]], integers: dict[str, bool],
            grid: bool) -> dict[str, Any]:
    """One value per dimension, as config values (lists come back as lists)."""
    values: dict[str, Any] = {}
    for name, dim in space.items():
        if grid or dim.get("choices") is not None:
            original = grid_values(name, dim, integers[name])
            values[name] = _unscalar(trial.suggest_categorical(name, [_scalar(v) for v in original]), original)
        elif integers[name]:
            values[name] = trial.suggest_int(name, int(dim["low"]), int(dim["high"]), step=int(dim.get("step") or 1),
                                             log=dim.get("log", False))
        else:
            values[name] = trial.suggest_float(name, dim["low"], dim["high"], step=dim.get("step"),
                                               log=dim.get("log", False))
    return values


class OptunaPruning(Callback):
    """Reports the monitored metric to the trial after each epoch; stops the fit when Optuna prunes it.

    A callback rather than a branch in the loop: the training loop stays the one in tasks/training.py.
    """

    def __init__(self, trial: optuna.Trial, monitor: str) -> None:
        self.trial, self.monitor = trial, monitor
        self.pruned_at: int | None = None

    def on_epoch_end(self, state: FitState) -> None:
        self.trial.report(state.logs[self.monitor], state.epoch)
        if self.trial.should_prune():
            self.pruned_at = state.epoch
            state.stop = True

