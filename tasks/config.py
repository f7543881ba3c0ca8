"""TrainConfig: the single source of truth for a training run.

Two models: `TrainConfig` holds what defines the model and its training (the hyperparameters:
data, model, optimisation, callbacks, tracking); `Launch` holds where and how this machine runs
it (device, threads, loader workers, DDP topology, retries, checkpoints kept), which may differ
between machines and between a run and its resumption. A TrainConfig carries its Launch as
`config.launch`.

Every field of both is one flat name on every surface: the CLI flags (`fitflow train
--batch-size 128 --device cpu`), the YAML file (`batch_size: 128`), the Prefect UI form (the
flow's parameters, with these descriptions, bounds and choices). In MLflow the hyperparameters
are params (for display and comparison), the launch settings tags (`fitflow.launch.<name>`),
and the whole validated config is the run's `config.json` artifact, which resume reads back.
This module imports only pydantic so that `fitflow --help` stays fast.
"""

from __future__ import annotations

import difflib
import inspect
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.fields import FieldInfo

from tasks.errors import ConfigError

IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
RUN_ID_PATTERN = r"^[0-9a-f]{32}$"  # an MLflow run id, as `fitflow runs` lists them


def target_columns(target: str) -> list[str]:
    """The columns a `target` names: `toxic,obscene` two (a multi-label target), `label` one (as it
    is, spaces included: only names in a list are stripped)."""
    return [name.strip() for name in target.split(",")] if "," in target else [target]


def check_run_id(run_id: str) -> str:
    if not re.fullmatch(RUN_ID_PATTERN, run_id):
        raise ConfigError(f"not an MLflow run id: {_one_line(repr(run_id))} (32 hex digits, as `fitflow runs` lists them)")
    return run_id


class Launch(BaseModel):
    """Where and how one machine runs a training run: nothing here changes what a correct run learns."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    device: str = Field("auto", description="auto (cuda, then mps, then cpu), cpu, mps, cuda or cuda:N.")
    num_threads: int = Field(
        1, ge=0, le=1024,
        description="CPU threads for torch (0: torch's default, one per core); 1 avoids oversubscribing shared cores.",
    )
    num_workers: int = Field(0, ge=0, le=64, description="Loader worker processes (0: gather in the main process, fastest for in-memory data).")
    image_cache: Literal["auto", "on", "off"] = Field(
        "auto", description="Keep decoded images in memory so that epochs after the first skip decoding "
        "(auto: when they fit in a quarter of the free memory).",
    )
    # DDP (docs/scaling.md): `batch_size` stays the global batch, split evenly over the processes.
    strategy: Literal["single", "ddp"] = Field(
        "single", description="single: one process; ddp: DistributedDataParallel, one process per device (NCCL on GPUs, gloo on CPU)."
    )
    devices: int | Literal["auto"] = Field(
        "auto", description="Processes per machine under ddp: a count, or auto = every visible GPU (on CPU give a count)."
    )
    num_nodes: int = Field(1, ge=1, le=1024, description="Machines taking part in a ddp run.")
    node_rank: int = Field(0, ge=0, description="This machine's index under ddp; machine 0 logs to MLflow and returns the model.")
    rdzv_endpoint: str | None = Field(
        None, pattern=r"^[\w.\-\[\]:]+:\d+$",
        description="host:port of machine 0, where the ddp machines meet (torchrun's --master-addr:--master-port); "
        "empty: a free local port (one machine).",
    )
    retries: int = Field(
        1, ge=0, le=10,
        description="Retries of the training step after a crash (not after bad input); each resumes from the last epoch checkpoint.",
    )
    keep_checkpoints: int = Field(
        2, ge=1, le=10_000, description="Epoch checkpoints kept per run (the newest); a killed run resumes from the newest."
    )
    checkpoint_to_mlflow: Literal["auto", "on", "off"] = Field(
        "auto", description="Also log each epoch checkpoint to the run's MLflow artifacts (the newest two, uploaded "
        "off the training thread), so that a retry on a machine without this checkpoint folder resumes from them; "
        "auto: on when tracking to a server (http/https), off for a local store on this machine.",
    )
    progress: Literal["auto", "bar", "epoch", "off"] = Field(
        "auto", description="Training progress: bar (moves with each batch; on a terminal), epoch (one log line per "
        "epoch), off; auto: bar when stderr is a terminal, else epoch.",
    )

    @field_validator("device")
    @classmethod
    def _device_name(cls, device: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device):
            raise ValueError("use auto, cpu, mps, cuda or cuda:N")
        return device

    @model_validator(mode="after")
    def _ddp_settings_fit_together(self) -> Launch:
        if self.strategy == "single" and (self.devices not in ("auto", 1) or self.num_nodes > 1):
            raise ValueError("devices > 1 and num_nodes > 1 need strategy ddp")
        if isinstance(self.devices, int) and self.devices < 1:
            raise ValueError("devices must be a count >= 1, or auto")
        if self.node_rank >= self.num_nodes:
            raise ValueError(f"node_rank must be below num_nodes ({self.num_nodes})")
        if self.num_nodes > 1 and self.rdzv_endpoint is None:
            raise ValueError("several machines need rdzv_endpoint (host:port of machine 0) to meet")
        return self


class TrainConfig(BaseModel):
    """Everything one training run needs; every field has a default but `data`/`target` pair."""

    # allow_inf_nan=False: an inf min_delta or grad_clip would pass every bound and silently do nothing.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    # --- data -------------------------------------------------------------------------
    data: str = Field(
        "breast_cancer",
        description="A CSV/Parquet table; a folder of images (one sub-folder per class, or train/ val/ [test/] "
        "in that layout) or a CSV/Parquet manifest of image paths; your Dataset factory as 'package.module:function'; "
        "or the name of a dataset shipped in data/ (breast_cancer, digits).",
        min_length=1,
    )
    data_kind: Literal["auto", "table", "images", "dataset"] = Field(
        "auto", description="auto: detected from data (a folder or a manifest of image paths is images, an import "
        "path is dataset, other files are tables); set it to read a file another way.",
    )
    data_kwargs: dict[str, Any] = Field({}, description="Keyword arguments for your Dataset factory (data_kind dataset).")
    target: str = Field("diagnosis", description="Column to predict (tables), or several 0/1 columns comma-separated "
                        "for multi-label ('toxic,obscene,insult'; a YAML list works too); the label column of an image "
                        "manifest (when the manifest has no such column, 'label').", min_length=1)
    validation_data: str | None = Field(
        None,
        description="Optional CSV/Parquet used as the validation split (like Keras' validation_data); "
        "then only the test split is cut from `data`.",
    )
    task: Literal["auto", "classification", "regression", "multilabel"] = Field(
        "auto", description="auto: several target columns, or text labels holding 'a|b' label sets, are multilabel; "
        "strings, booleans and integers with few values are classification; other numbers regression.",
    )
    val_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of rows held out for validation.")
    test_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of rows held out for the final test.")
    max_categories: int = Field(
        50, ge=1, le=10_000, description="One-hot columns per categorical feature; rarer values share one."
    )
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seeds the split, the weights and the batch order (same seed, same run).")
    image_size: int = Field(32, ge=8, le=1024, description="Images are resized to image_size x image_size pixels.")
    augment: Literal["none", "light", "standard"] = Field(
        "none", description="Training-image augmentation: light (flips, mild crops), standard (crops, flips, colour "
        "jitter); never on validation or test.",
    )

    # --- optimisation (Keras' compile) ----------------------------------------------------
    # The default rule (README "Defaults that converge"): train until `monitor` has not improved for
    # `patience` epochs; tables with an L2 penalty, from a network that starts as the linear baseline
    # (linear_path). A fixed 30 epochs gave a 178-row table 60 optimizer steps, far from converged;
    # 1,000 epochs is only the cap, early stopping ends a run long before (docs/quality.md).
    epochs: int = Field(1000, ge=1, le=100_000, description="At most this many passes over the training split; "
                        "by default early stopping ends the run first, once validation has not improved for "
                        "`patience` epochs, so small and large tables alike train to convergence.")
    batch_size: int = Field(64, ge=1, le=1_048_576, description="Rows per training step.")
    lr: float = Field(1e-3, gt=0, le=10, description="Learning rate.")
    optimizer: Literal["adam", "adamw", "sgd"] = Field("adam", description="Optimizer.")
    momentum: float = Field(0.9, ge=0, lt=1, description="Momentum (sgd only).")
    weight_decay: Annotated[float, Field(ge=0, le=1)] | Literal["auto"] = Field(
        "auto", description="L2 penalty on the weights (decoupled for adamw). auto: for tables the linear baseline's "
        "own penalty (scikit-learn's C = 1, ridge's alpha = 1: 1 or 2 / training rows), so that the network's linear "
        "path keeps the baseline's solution unless the data say otherwise; for images and Datasets 0 (as Adam's L2 "
        "even 0.01 slowed the CNN down).",
    )
    scheduler: Literal["none", "cosine", "step", "plateau", "warmup_cosine", "onecycle"] = Field(
        "none", description="Learning-rate schedule. Per epoch: cosine over all epochs, step decay, reduce on plateau. "
        "Per optimizer step: warmup_cosine (linear warmup over warmup_steps, then cosine to 0), onecycle (OneCycleLR "
        "peaking at lr). cosine, warmup_cosine and onecycle span all `epochs`: with the default cap of 1,000, "
        "set epochs to the length you want.",
    )
    scheduler_step_size: int = Field(10, ge=1, description="Epochs between decays (step).")
    scheduler_gamma: float = Field(0.1, gt=0, le=1, description="Decay factor (step, plateau).")
    warmup_steps: int = Field(
        0, ge=0, le=100_000_000, description="Optimizer steps of linear warmup (warmup_cosine), or before the peak "
        "(onecycle; 0: 30% of the run's steps).",
    )
    accumulate_grad_batches: int = Field(
        1, ge=1, le=65_536, description="Batches whose gradients are averaged into one optimizer step (gradient "
        "accumulation: the step of a batch this many times larger).",
    )
    loss: str = Field(
        "auto", description="auto (cross_entropy for classification, bce (a sigmoid per class) for multilabel, mse "
        "for regression), cross_entropy, bce, mse, huber, l1, or yours as 'package.module:name' (an nn.Module class, "
        "created with no arguments, or a function loss(outputs, targets)).",
    )
    class_weights: Literal["none", "balanced"] = Field(
        "none", description="balanced: weigh each class in the loss by how rare it is in the training split "
        "(imbalanced classes; multilabel: each label's positives by its negatives/positives ratio); the validation "
        "and test losses are weighed the same way.",
    )
    grad_clip: float | None = Field(None, gt=0, description="Clip the gradient norm to this value (off when empty).")

    # --- model ----------------------------------------------------------------------------
    model: str = Field(
        "auto",
        description="auto (mlp for tables, cnn for images), mlp, cnn (a small residual conv net), a torchvision "
        "architecture as 'torchvision:resnet18', or your nn.Module as 'package.module:Class' (called with those of "
        "in_features, out_features, in_shape, num_outputs its constructor names, and model_kwargs).",
    )
    pretrained: str | None = Field(
        None, description="A local file of weights (a state dict, as torch.save writes it) to start from; the "
        "classifier head is left out when its size differs. Nothing is downloaded.",
    )
    hidden_sizes: list[int] = Field([64, 32], description="Widths of the MLP's hidden layers.")
    linear_path: bool = Field(
        True, description="Tables (mlp): a linear path from the inputs to the outputs beside the MLP, started at the "
        "linear baseline's fit (logistic or ridge regression on the training split) with the MLP's output at zero: "
        "training starts from the linear model, and the MLP learns what it misses. The start counts as epoch 0: "
        "when no epoch does better on validation, the run keeps the baseline's weights.",
    )
    activation: Literal["relu", "gelu", "silu", "tanh", "leaky_relu"] = Field("relu", description="MLP activation.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout after each hidden layer (mlp), before the head (cnn).")
    batch_norm: bool = Field(False, description="BatchNorm after each hidden linear layer.")
    model_kwargs: dict[str, Any] = Field({}, description="Extra keyword arguments for the model class (cnn: width; "
                                         "torchvision and your own models: their constructor's).")

    # --- numerics -----------------------------------------------------------------------
    precision: Literal["32", "bf16", "fp16"] = Field(
        "32", description="Mixed precision on CUDA; ignored (with a log line) elsewhere."
    )
    torch_compile: bool = Field(
        False, description="Compile the model with torch.compile: a compile cost up front, faster steps for larger models on GPUs."
    )
    drop_last: bool = Field(False, description="Drop the last incomplete training batch.")

    # --- callbacks ------------------------------------------------------------------------
    monitor: str = Field("val_loss", description="Metric for early stopping and the best checkpoint, e.g. val_accuracy.")
    patience: int = Field(20, ge=0, description="Epochs without improvement of `monitor` before stopping (0: never "
                          "stop early); this, not `epochs`, is what ends a default run, when validation stops improving.")
    min_delta: float = Field(0.0, ge=0, description="Smallest change of the monitored metric that counts as improvement.")
    callbacks: list[str] = Field(
        [], description="Your callbacks as 'package.module:Class' (tasks.callbacks.Callback subclasses, created with no "
        "arguments), called after fitflow's own, in this order.",
    )
    metrics: list[str] = Field(
        [], description="Extra validation and test metrics as 'package.module:name': a torchmetrics Metric class or a "
        "function metric(preds, targets) -> number; logged as val_<name> in snake_case, and usable as monitor.",
    )

    # --- evaluation -----------------------------------------------------------------------
    baseline: bool = Field(
        True, description="Tables: also fit a linear model (logistic regression, or ridge for regression) on the "
        "same training split and preprocessing, score it on the same test rows and log it as baseline_test_<metric> "
        "beside the network's scores (a small share of a run's time).",
    )

    # --- tracking -------------------------------------------------------------------------
    experiment: str = Field("fitflow", min_length=1, description="MLflow experiment name.")
    run_name: str | None = Field(None, description="MLflow run name (default: MLflow's generated name).")
    log_every_n_steps: int = Field(
        0, ge=0, le=1_000_000, description="Log the training loss to MLflow as train_loss_step every this many optimizer "
        "steps, step = the global step (0: off; the epoch metrics are always logged).",
    )
    register_model: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.-]+$",  # the name goes into models:/<name>@<alias> URIs
        description="Register the model under this name in the MLflow registry; alias 'champion' moves to it "
        "only when it beats the current champion on the same test data, else it becomes 'challenger'.",
    )

    launch: Launch = Field(default_factory=Launch, description="Where and how this machine runs the training.")

    @model_validator(mode="before")
    @classmethod
    def _launch_from_flat_names(cls, values: Any) -> Any:
        """The surfaces name every field flat (`device: cpu`); gather the launch settings into `launch`."""
        if not isinstance(values, dict) or not values.keys() & Launch.model_fields.keys():
            return values
        values = dict(values)
        nested = values.get("launch")
        launch = dict(nested) if isinstance(nested, dict) else (nested.model_dump() if isinstance(nested, Launch) else {})
        for name in Launch.model_fields.keys() & values.keys():
            if name in launch:
                raise ValueError(f"'{name}' is given twice, flat and under launch; give it once")
            launch[name] = values.pop(name)
        values["launch"] = launch
        return values

    @field_validator("target", mode="before")
    @classmethod
    def _target_columns(cls, target: Any) -> Any:
        """Several target columns as one string, `a,b,c` (a YAML list is joined): one value on every surface."""
        if isinstance(target, (list, tuple)):
            if not all(isinstance(name, str) for name in target):
                raise ValueError("list the target columns by name")
            target = ",".join(target)
        if isinstance(target, str) and "," in target:
            names = [name.strip() for name in target.split(",")]
            if not all(names):
                raise ValueError("name each target column once, separated by commas, like 'toxic,obscene'")
            if len(set(names)) < len(names):
                raise ValueError("a target column is named twice; name each once")
            target = ",".join(names)
        return target

    @field_validator("weight_decay", mode="before")
    @classmethod
    def _weight_decay_auto_or_number(cls, weight_decay: Any) -> Any:
        """One readable line for a bad value, not one per member of the union."""
        if weight_decay == "auto":
            return weight_decay
        try:
            number = float(weight_decay)
        except (TypeError, ValueError):
            number = None
        if isinstance(weight_decay, bool) or number is None or not 0 <= number <= 1:
            raise ValueError("use auto or a number from 0 to 1")
        return number

    @field_validator("hidden_sizes")
    @classmethod
    def _positive_widths(cls, sizes: list[int]) -> list[int]:
        if any(size < 1 for size in sizes):
            raise ValueError("every hidden size must be >= 1")
        return sizes

    @field_validator("model")
    @classmethod
    def _model_name(cls, model: str) -> str:
        if model not in ("auto", "mlp", "cnn") and not IMPORT_PATH.match(model):
            raise ValueError("use auto, mlp, cnn, 'torchvision:<architecture>' or an import path like 'mypackage.nets:Net'")
        return model

    @field_validator("loss")
    @classmethod
    def _loss_name(cls, loss: str) -> str:
        if loss not in ("auto", "cross_entropy", "bce", "mse", "huber", "l1") and not IMPORT_PATH.match(loss):
            raise ValueError("use auto, cross_entropy, bce, mse, huber, l1 or an import path like 'mypackage.losses:Focal'")
        return loss

    @field_validator("callbacks", "metrics")
    @classmethod
    def _import_paths(cls, paths: list[str]) -> list[str]:
        for path in paths:
            if not IMPORT_PATH.match(path):
                raise ValueError(f"'{_one_line(path)}' is not an import path like 'mypackage.module:Name'")
        return paths

    @field_validator("monitor")
    @classmethod
    def _monitor_name(cls, monitor: str) -> str:
        if not re.fullmatch(r"(train|val)_[a-z0-9_]+", monitor):
            raise ValueError("name a train_ or val_ metric, e.g. val_loss or val_accuracy")
        return monitor

    @model_validator(mode="after")
    def _splits_leave_training_rows(self) -> TrainConfig:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must leave at least 10% of rows for training")
        return self

    @field_validator("task")
    @classmethod
    def _several_targets_are_multilabel(cls, task: str, info: ValidationInfo) -> str:
        # a field validator (target is validated before task), so that the error names the field to change
        if "," in info.data.get("target", "") and task in ("classification", "regression"):
            raise ValueError(f"several target columns are one multi-label target; task {task} predicts one "
                             "column: use task auto or multilabel, or name one target column")
        return task

    @model_validator(mode="after")
    def _warmup_has_a_schedule(self) -> TrainConfig:
        if self.warmup_steps and self.scheduler not in ("warmup_cosine", "onecycle"):
            raise ValueError(f"warmup_steps applies to scheduler warmup_cosine or onecycle, not {self.scheduler}; "
                             "set one of them, or drop warmup_steps")
        return self

    def params(self) -> dict[str, str]:
        """The hyperparameters as MLflow params (strings; lists and dicts as JSON), for display and comparison."""
        return {name: _param_text(value) for name, value in self.model_dump(mode="json", exclude={"launch"}).items()}

    def launch_tags(self) -> dict[str, str]:
        """The launch settings as MLflow tags: how this run ran, apart from what it learned."""
        return {f"fitflow.launch.{name}": _param_text(value) for name, value in self.launch.model_dump(mode="json").items()}

    def flat(self) -> dict[str, Any]:
        """Every field under its flat name (the flow's parameters): hyperparameters, then launch settings."""
        return {**self.model_dump(exclude={"launch"}), **self.launch.model_dump()}

    @classmethod
    def flat_fields(cls) -> dict[str, FieldInfo]:
        """The flat names of every surface (CLI flags, YAML keys, flow parameters) and their fields."""
        own = {name: field for name, field in cls.model_fields.items() if name != "launch"}
        return {**own, **Launch.model_fields}


def _param_text(value: Any) -> str:
    import json

    return value if isinstance(value, str) else json.dumps(value)


def load_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Build a config from an optional YAML file plus overrides; bad input raises ConfigError."""
    values: dict[str, Any] = {}
    if path is not None:
        values.update(_read_yaml(Path(path)))
    values.update(overrides)
    try:
        return TrainConfig.model_validate(values)  # not TrainConfig(**values): YAML keys may be numbers
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, source=str(path) if path else None)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise ConfigError(f"config file not found: {path}; pass an existing YAML file to --config")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} is not valid YAML ({_one_line(str(err).splitlines()[0])}); fix its syntax") from None
    except ValueError as err:  # a scalar YAML cannot convert: a 5000-digit int, a date like 2024-13-01
        raise ConfigError(f"config file {path} holds a value that cannot be read ({_one_line(str(err).split(';')[0], 120)}); fix it") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must be a mapping of field: value, got {type(values).__name__}")
    return values


def describe_validation_error(err: ValidationError, source: str | None = None) -> str:
    """One line for the first problem: which field, what is wrong, what is allowed."""
    first = err.errors()[0]
    loc = first["loc"][1:] if first["loc"][:1] == ("launch",) and len(first["loc"]) > 1 else first["loc"]
    field = _one_line(".".join(str(part) for part in loc) or "config")  # the flat name the user wrote
    where = f" in {_one_line(source, 200)}" if source else ""
    if first["type"] == "extra_forbidden":
        close = difflib.get_close_matches(field, TrainConfig.flat_fields(), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else "; see `fitflow train --help` for the fields"
        return f"unknown config field '{field}'{where}{hint}"
    message = first["msg"].removeprefix("Value error, ")
    got = first.get("input")
    got_text = "" if isinstance(got, dict) else f" (got {_one_line(_repr(got))})"
    more = f" (and {len(err.errors()) - 1} more problem(s))" if len(err.errors()) > 1 else ""
    return f"invalid config value for '{field}'{where}: {message}{got_text}{more}"


def _repr(value: Any) -> str:
    try:
        return repr(value)
    except ValueError:  # an int of more than 4300 digits has no repr (Python's int_max_str_digits)
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"


def _one_line(text: str, limit: int = 80) -> str:
    """Unprintable characters escaped and long text cut, so that an error stays one readable line."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def as_flow_signature(return_annotation: Any = Any, extra: tuple[inspect.Parameter, ...] = ()) -> inspect.Signature:
    """TrainConfig's flat fields (then `extra`) as keyword-only parameters, for a flow that takes them flat.

    Prefect builds a deployment's parameter schema (the UI form, and what `prefect deployment
    run --param epochs=3` validates) from the flow function's signature. Constraints travel
    in the annotation (Annotated[int, Ge(1)]), descriptions in the default's FieldInfo.
    """
    parameters = []
    for name, field in TrainConfig.flat_fields().items():
        annotation = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
        parameters.append(inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
            default=Field(field.default, description=field.description),
        ))
    return inspect.Signature([*parameters, *extra], return_annotation=return_annotation)
