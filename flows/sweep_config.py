"""SweepConfig: a base TrainConfig, a search space, a budget, a sampler, the parallelism and where trials run.

The same model is the `sweep` flow's parameter (a Prefect UI form), the YAML file of
`fitflow sweep --config FILE.yaml`, and the parent MLflow run's `sweep.*` params. Like
TrainConfig's module it imports only pydantic, so the CLI stays fast. Every dimension is checked
against TrainConfig here, so a typo or an impossible value fails before any run starts.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tasks.config import Launch, TrainConfig, _read_yaml, describe_validation_error
from tasks.errors import ConfigError

# Fields a sweep cannot search: they change the data, its split (and so the test data every
# trial is compared on), the ranking metric, or where the runs go. Trials share one prepared
# dataset, so these stay those of `base`.
HYPERPARAMETERS = [name for name in TrainConfig.model_fields if name != "launch"]
FIXED_FIELDS = ("data", "data_kind", "data_kwargs", "image_size", "target", "validation_data", "task", "val_fraction", "test_fraction", "max_categories",
                "seed", "monitor", "experiment", "run_name", "register_model")


class SearchDim(BaseModel):
    """One searched field: `choices`, or a range `low`..`high` (log-uniform with `log`, on a `step` grid)."""

    model_config = ConfigDict(extra="forbid")

    choices: list[Any] | None = Field(None, description="Values to pick from (any JSON values, e.g. [[64], [64, 32]]).")
    low: float | None = Field(None, description="Lower bound of a range (inclusive).")
    high: float | None = Field(None, description="Upper bound of a range (inclusive).")
    log: bool = Field(False, description="Sample the range log-uniformly (learning rates, weight decay).")
    step: float | None = Field(None, gt=0, description="Only multiples of step above low (needed by the grid sampler for float ranges).")

    @model_validator(mode="after")
    def _one_kind(self) -> SearchDim:
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either choices or low/high, not both")
            if not self.choices:
                raise ValueError("choices must not be empty")
            if len({json.dumps(c, sort_keys=True) for c in self.choices}) != len(self.choices):
                raise ValueError("choices must be distinct")
            return self
        if self.low is None or self.high is None:
            raise ValueError("give choices: [...] or both low: and high:")
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("a log range cannot have a step")
        return self


def _default_space() -> dict[str, SearchDim]:
    return {"lr": SearchDim(low=1e-4, high=3e-2, log=True),
            "hidden_sizes": SearchDim(choices=[[32], [64, 32], [128, 64]]),
            "dropout": SearchDim(low=0.0, high=0.4)}


class SweepConfig(BaseModel):
    """A hyperparameter sweep: every trial is `base` with the searched fields replaced."""

    model_config = ConfigDict(extra="forbid")

    base: TrainConfig = Field(default_factory=TrainConfig, description="The training config every trial starts from.")
    space: dict[str, SearchDim] = Field(default_factory=_default_space,
                                        description="Searched TrainConfig fields: {field: {choices: [...]}} or {field: {low:, high:, log:}}.")
    n_trials: int = Field(12, ge=1, le=10_000, description="Budget: number of trials (a grid stops earlier when it is exhausted).")
    sampler: Literal["tpe", "random", "grid"] = Field(
        "tpe", description="tpe: Optuna's Bayesian sampler; random; grid: every combination of the choices.")
    base_trial: bool = Field(
        True, description="Trial 0 is the base config itself (its values of the searched fields, where the space "
        "holds them), so the best trial is never worse on validation than the base alone (tpe and random; a grid "
        "visits the points it names).")
    parallelism: int = Field(2, ge=1, le=64, description="Trials trained at once (GPU tag limits still apply).")
    prune: bool = Field(True, description="Stop clearly bad trials early (Optuna's median pruner on the monitored metric).")
    prune_warmup_epochs: int = Field(3, ge=0, description="Epochs every trial trains before it may be pruned.")
    name: str | None = Field(None, description="Name of the sweep's parent MLflow run (default: sweep-<sampler>).")
    task_runner: Literal["threads", "dask", "ray"] = Field(
        "threads", description="Where trials run: threads of the flow's process; Dask worker processes (a local "
        "cluster of `parallelism` workers, or cluster_address); Ray (a local instance, or cluster_address).")
    cluster_address: str | None = Field(
        None, description="An existing cluster for task_runner dask (scheduler, tcp://host:8786) or ray "
        "(ray://host:10001); its workers need fitflow and MLFLOW_TRACKING_URI (docs/scaling-sweeps.md).")

    @model_validator(mode="after")
    def _space_fits_train_config(self) -> SweepConfig:
        if self.cluster_address and self.task_runner == "threads":
            raise ValueError("cluster_address needs task_runner: dask or ray (threads run in the flow's own process)")
        if not self.space:
            raise ValueError("the search space is empty; name at least one field to search")
        base = self.base.model_dump()
        for name, dim in self.space.items():
            if name in Launch.model_fields:
                raise ValueError(f"'{name}' is a launch setting, not a hyperparameter; set it in base")
            if name not in HYPERPARAMETERS:
                close = difflib.get_close_matches(name, HYPERPARAMETERS, n=1)
                raise ValueError(f"'{name}' is not a TrainConfig field" + (f"; did you mean '{close[0]}'?" if close else ""))
            if name in FIXED_FIELDS:
                raise ValueError(f"'{name}' cannot be searched: trials share one dataset, split and ranking metric; set it in base")
            values = dim.choices if dim.choices is not None else [dim.low, dim.high]
            if dim.choices is None and not is_numeric_field(name):
                raise ValueError(f"'{name}' is not numeric; search it with choices: [...]")
            if dim.choices is None and is_integer_field(name) and not all(float(v).is_integer() for v in values):
                raise ValueError(f"'{name}' takes integers; use whole numbers for low and high")
            for value in values:
                try:
                    TrainConfig(**{**base, name: value})
                except ValidationError as err:
                    raise ValueError(f"space '{name}': {describe_validation_error(err)}") from None
        return self

    def integers(self) -> dict[str, bool]:
        return {name: is_integer_field(name) for name in self.space}

    def sweep_params(self) -> dict[str, str]:
        """The parent run's params: the fields every trial shares, and the sweep's own settings."""
        shared = {k: v for k, v in self.base.params().items() if k not in self.space}
        own = {"sweep.sampler": self.sampler, "sweep.n_trials": str(self.n_trials),
               "sweep.parallelism": str(self.parallelism), "sweep.prune": str(self.prune),
               "sweep.base_trial": str(self.base_trial),
               "sweep.task_runner": self.task_runner,
               "sweep.space": json.dumps({k: v.model_dump(exclude_defaults=True) for k, v in self.space.items()})}
        return {**shared, **own}


# The optional extra each cluster runner needs, by the module the flow imports for it.
RUNNER_PACKAGES = {"dask": ("prefect_dask", "fitflow[dask]"), "ray": ("prefect_ray", "fitflow[ray]")}


def check_task_runner(config: SweepConfig) -> None:
    """ConfigError unless this environment has the runner's package (cheap: imports nothing)."""
    if config.task_runner in RUNNER_PACKAGES:
        module, extra = RUNNER_PACKAGES[config.task_runner]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"task_runner '{config.task_runner}' needs {module.replace('_', '-')}, which is not "
                              f"installed; pip install '{extra}' (or use task_runner: threads)")


def check_prefect_for_cluster(config: SweepConfig, api_url: str | None) -> None:
    """ConfigError when the trials go to an existing cluster and there is no Prefect server its workers can
    reach (`api_url`: the one set for this sweep; the embedded server of a command listens on loopback only)."""
    if config.cluster_address and not api_url:
        raise ConfigError("a sweep on an existing cluster needs a Prefect server its workers can reach; "
                          "set PREFECT_API_URL (docs/scaling-sweeps.md)")


def _field_types(name: str) -> set[Any]:
    """The field's type, or the members of an Optional/Union (float | None -> {float}); constrained types as their
    type, and a Literal of names beside a number left out (weight_decay, a float or 'auto', ranges as a float)."""
    annotation = TrainConfig.model_fields[name].annotation
    members = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    found = {typing.get_args(m)[0] if typing.get_origin(m) is typing.Annotated else m for m in members} - {type(None)}
    numbers = {m for m in found if typing.get_origin(m) is not typing.Literal}
    return numbers if numbers and numbers != found else found


def is_integer_field(name: str) -> bool:
    return _field_types(name) == {int}


def is_numeric_field(name: str) -> bool:
    types = _field_types(name)
    return bool(types) and types <= {int, float}


def load_sweep_config(path: str | Path | None = None, **overrides: Any) -> SweepConfig:
    """A SweepConfig from an optional YAML file plus overrides; bad input raises ConfigError."""
    values: dict[str, Any] = _read_yaml(Path(path)) if path is not None else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return SweepConfig(**values)
    except ValidationError as err:
        raise ConfigError(_describe(err, str(path) if path else None)) from None


def _describe(err: ValidationError, source: str | None) -> str:
    first = err.errors()[0]
    where = f" in {source}" if source else ""
    field = ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden" and len(first["loc"]) == 1:
        close = difflib.get_close_matches(field, SweepConfig.model_fields, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; the keys are {', '.join(SweepConfig.model_fields)}"
        return f"unknown sweep field '{field}'{where}{hint}"
    message = first["msg"].removeprefix("Value error, ")
    return f"invalid sweep config{where}: {field + ': ' if field else ''}{message}"
