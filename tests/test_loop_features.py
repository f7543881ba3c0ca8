"""The loop's features (issue #14): hooks, gradient accumulation, per-step schedules, your loss,
metrics and callbacks by import path, per-step losses in MLflow, the progress display. Real torch;
real Prefect and MLflow where a test goes through the flow or the CLI."""

from __future__ import annotations

import copy
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_mixed_classification_csv
from mlflow.tracking import MlflowClient

from tasks.callbacks import (
    BestWeights,
    Callback,
    EarlyStopping,
    LRSchedule,
    Monitor,
    Progress,
    ProgressBar,
    StepLRSchedule,
    progress_callback,
    uses_hook,
)
from tasks.checkpoints import Checkpoints
from tasks.compile import make_loss, make_scheduler
from tasks.config import TrainConfig, load_config
from tasks.data import load_table, prepare
from tasks.errors import ConfigError
from tasks.loaders import make_loader
from tasks.metrics import TaskMetrics
from tasks.trainer import Run, build_loaders, evaluate_on_test, prep_spec, train_model
from tasks.training import evaluate, fit

CPU = torch.device("cpu")


class Recorder(Callback):
    """Every hook call with the state it saw; the learning rate each optimizer step used."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.step_lrs: list[float] = []
        self.last_step = 0

    def on_fit_start(self, state):
        self.calls.append(("fit_start", state.epoch, state.step))
        self.last_step = state.step

    def on_epoch_start(self, state):
        self.calls.append(("epoch_start", state.epoch, state.step))

    def on_train_batch_end(self, state, batch, loss):
        assert loss.shape == () and not loss.requires_grad and state.model.training and math.isfinite(float(loss))
        if state.step != self.last_step:  # this batch stepped: the lr it used (before the schedule moves it)
            self.step_lrs.append(state.optimizer.param_groups[0]["lr"])
            self.last_step = state.step
        self.calls.append(("batch_end", state.epoch, state.step, batch))

    def on_epoch_end(self, state):
        self.calls.append(("epoch_end", state.epoch, state.step, sorted(state.logs)))

    def on_fit_end(self, state):
        self.calls.append(("fit_end", state.epoch, state.step))


def _data(rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 4)).astype(np.float32)
    return x, (x[:, 0] + x[:, 1] > 0).astype(np.int64)


def _fit(model, x, y, batch_size, epochs=1, callbacks=(), lr=0.1, **kwargs):
    loader = make_loader(x, y, batch_size, shuffle=True, seed=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    return fit(model, loader, make_loader(x, y, 16), epochs=epochs, optimizer=optimizer,
               loss_fn=torch.nn.CrossEntropyLoss(), metrics=TaskMetrics("classification", 2), device=CPU,
               callbacks=callbacks, **kwargs), optimizer


def test_hooks_are_called_in_order_with_the_epoch_and_global_step():
    x, y = _data(40)  # 5 batches of 8; accumulating 2: steps after batches 2, 4 and 5 (a short last group)
    recorder = Recorder()
    _fit(torch.nn.Linear(4, 2), x, y, batch_size=8, epochs=2, callbacks=[recorder], accumulate_grad_batches=2)
    logs = ["train_loss", "val_accuracy", "val_auroc", "val_f1_macro", "val_loss"]
    expected = [("fit_start", 0, 0)]
    for epoch, first_step in ((1, 0), (2, 3)):
        expected.append(("epoch_start", epoch, first_step))
        expected += [("batch_end", epoch, first_step + done, batch) for batch, done in enumerate([0, 1, 1, 2, 3])]
        expected.append(("epoch_end", epoch, first_step + 3, logs))
    expected.append(("fit_end", 2, 6))
    assert recorder.calls == expected


def test_only_callbacks_that_override_the_batch_hook_are_called_per_batch():
    """Nothing registered per batch costs nothing: fit calls the hook only on the classes that override it.
    The callbacks of a default run override none; those that need steps do."""
    monitor = Monitor("val_loss")
    epoch_level = [Progress(), BestWeights(monitor), EarlyStopping(monitor, 3),
                   LRSchedule(None, monitor), Checkpoints(Path("unused"), {})]
    assert not any(uses_hook(callback, "on_train_batch_end") for callback in epoch_level)
    assert all(uses_hook(callback, "on_train_batch_end") for callback in (ProgressBar(), StepLRSchedule(None, monitor)))


@pytest.mark.parametrize("rows", [64, 72])  # 72: the last group holds one batch of 8 (and the large batch 8 rows)
def test_accumulating_k_batches_steps_as_one_batch_k_times_larger(rows):
    x, y = _data(rows)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))  # no dropout
    large = copy.deepcopy(model)
    accumulated, _ = _fit(model, x, y, batch_size=8, epochs=3, accumulate_grad_batches=4)
    whole, _ = _fit(large, x, y, batch_size=32, epochs=3)
    for a, b in zip(model.parameters(), large.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # train_loss is a mean over rows, whatever the batches: the same run, the same numbers
    assert accumulated.history["train_loss"] == pytest.approx(whole.history["train_loss"], abs=1e-6)
    assert accumulated.history["val_loss"] == pytest.approx(whole.history["val_loss"], abs=1e-6)


def test_warmup_cosine_sets_the_learning_rate_of_every_step():
    x, y = _data(80)  # 10 batches of 8, accumulating 2: 5 optimizer steps per epoch, 15 in 3 epochs
    model = torch.nn.Linear(4, 2)
    recorder = Recorder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = make_scheduler("warmup_cosine", optimizer, epochs=3, steps_per_epoch=5, warmup_steps=4)
    fit(model, make_loader(x, y, 8, shuffle=True), make_loader(x, y, 16), epochs=3, optimizer=optimizer,
        loss_fn=torch.nn.CrossEntropyLoss(), metrics=None, device=CPU, accumulate_grad_batches=2,
        callbacks=[recorder, StepLRSchedule(scheduler, Monitor("val_loss"))])
    warmup = [0.5 * (s + 1) / 5 for s in range(4)]  # 0.1, 0.2, 0.3, 0.4: the first step already learns
    decay = [0.5 * 0.5 * (1 + math.cos(math.pi * s / 11)) for s in range(11)]  # from 0.5, towards 0
    assert recorder.step_lrs == pytest.approx(warmup + decay, abs=1e-15)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)  # after the last step


def test_onecycle_rises_to_lr_at_warmup_steps_then_anneals():
    x, y = _data(48)  # 6 batches of 8: 6 steps per epoch, 12 in 2 epochs
    model = torch.nn.Linear(4, 2)
    recorder = Recorder()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    scheduler = make_scheduler("onecycle", optimizer, epochs=2, steps_per_epoch=6, warmup_steps=3)
    fit(model, make_loader(x, y, 8, shuffle=True), make_loader(x, y, 16), epochs=2, optimizer=optimizer,
        loss_fn=torch.nn.CrossEntropyLoss(), metrics=None, device=CPU,
        callbacks=[recorder, StepLRSchedule(scheduler, Monitor("val_loss"))])

    def cosine(start: float, end: float, fraction: float) -> float:
        return end + (start - end) / 2 * (1 + math.cos(math.pi * fraction))

    start, peak, floor = 1.0 / 25, 1.0, 1.0 / 25 / 1e4  # OneCycleLR's div_factor and final_div_factor
    rise = [cosine(start, peak, s / 2) for s in range(3)]  # steps 0-2 rise to the peak at step 2 (the third)
    fall = [cosine(peak, floor, s / 9) for s in range(1, 10)]  # steps 3-11 anneal to the floor at the last
    assert recorder.step_lrs == pytest.approx(rise + fall, rel=1e-12)


def test_per_step_scheduler_and_accumulation_resume_to_the_same_weights(tmp_path, breast_cancer):
    config, prepared = breast_cancer
    config = config.model_copy(update={"epochs": 4, "scheduler": "warmup_cosine", "warmup_steps": 5,
                                       "accumulate_grad_batches": 3, "patience": 0})
    whole = train_model(config, prepared, build_loaders(config, prepared),
                        Run(None, "0" * 32, "0", tmp_path / "whole"), progress=False)

    class CrashAtEpoch3(Callback):
        def on_epoch_start(self, state):
            if state.epoch == 3:
                raise RuntimeError("crash")

    run = Run(None, "0" * 32, "0", tmp_path / "resumed")
    with pytest.raises(RuntimeError, match="crash"):
        train_model(config, prepared, build_loaders(config, prepared), run, [CrashAtEpoch3()], progress=False)
    recorder = Recorder()
    loaders = build_loaders(config, prepared)
    resumed = train_model(config, prepared, loaders, run, [recorder], progress=False)
    assert recorder.calls[0] == ("fit_start", 2, 2 * -(-len(loaders.train) // 3))  # restored: epoch and global step
    assert resumed.history.epochs == whole.history.epochs
    for name, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


@pytest.fixture(scope="module")
def breast_cancer():
    config = TrainConfig(epochs=3, dropout=0.0)
    return config, prepare(load_table(config.data), prep_spec(config))


def test_your_loss_and_metrics_by_import_path(breast_cancer):
    config, prepared = breast_cancer
    # the MLP alone: from the linear baseline's start no epoch of three changes the error rate, and the start is kept
    config = config.model_copy(update={
        "loss": "user_code_examples:label_smoothed_cross_entropy", "monitor": "val_error_rate", "linear_path": False,
        "metrics": ["user_code_examples:error_rate", "torchmetrics.classification:MulticlassPrecision"]})
    loaders = build_loaders(config, prepared)
    trained = train_model(config, prepared, loaders, progress=False)
    history = trained.history.history
    assert set(history) >= {"val_error_rate", "val_multiclass_precision"}
    # error_rate: a function averaged over batches by rows, the complement of accuracy
    assert history["val_error_rate"] == pytest.approx([1 - a for a in history["val_accuracy"]], abs=1e-6)
    # the monitor goes down (error_rate.higher_is_better is False): the best epoch has the lowest error
    assert trained.best_epoch == int(np.argmin(history["val_error_rate"])) + 1
    # the loss the loop trained and validated with is the function named
    smoothed = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    again = evaluate(trained.model, loaders.val, smoothed, None, CPU, "val")
    assert again["val_loss"] == pytest.approx(history["val_loss"][trained.best_epoch - 1], rel=1e-6)
    test = evaluate_on_test(config, prepared, loaders, trained)
    assert {"test_error_rate", "test_multiclass_precision"} <= set(test)
    assert test["test_error_rate"] == pytest.approx(1 - test["test_accuracy"], abs=1e-6)


@pytest.mark.parametrize(("update", "message"), [
    ({"metrics": ["user_code_examples:per_class_hits"]}, "metric 'user_code_examples:per_class_hits' returned shape (2,)"),
    ({"metrics": ["torchmetrics.classification:BinaryAccuracy"]}, "metric 'torchmetrics.classification:BinaryAccuracy' failed"),
    ({"metrics": ["torchmetrics:Accuracy"]}, "would be logged as val_accuracy, which this run logs already"),
    ({"loss": "user_code_examples:NeedsArguments"}, "cannot create loss 'user_code_examples:NeedsArguments' with no arguments"),
    ({"loss": "user_code_examples:RecordCalls"}, "loss 'user_code_examples:RecordCalls' is the class RecordCalls"),
    ({"loss": "user_code_examples:label_smoothed_cross_entropy", "class_weights": "balanced"}, "weigh the classes in it"),
    ({"callbacks": ["user_code_examples:NotACallback"]}, "is the class NotACallback, not a Callback"),
    ({"callbacks": ["user_code_examples:Missing"]}, "module user_code_examples has no 'Missing'"),
    ({"metrics": ["no_such_package.metrics:f"]}, "cannot import metric 'no_such_package.metrics:f'"),
    ({"monitor": "val_error_rate"}, "monitor 'val_error_rate' is not logged for classification"),
    ({"scheduler": "onecycle", "warmup_steps": 1000}, "warmup_steps 1000 leaves no step of the onecycle schedule"),
])
def test_your_code_that_does_not_fit_is_one_clear_config_error(breast_cancer, update, message):
    config, prepared = breast_cancer
    config = config.model_copy(update={"epochs": 1, **update})
    with pytest.raises(ConfigError) as error:
        train_model(config, prepared, build_loaders(config, prepared), progress=False)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_config_refuses_values_that_cannot_work():
    for values, message in [
        ({"accumulate_grad_batches": 0}, "'accumulate_grad_batches': Input should be greater than or equal to 1"),
        ({"warmup_steps": 10}, "warmup_steps applies to scheduler warmup_cosine or onecycle, not none"),
        ({"loss": "focal"}, "'loss': use auto, cross_entropy, bce, mse, huber, l1 or an import path"),
        ({"callbacks": ["mypkg.cb"]}, "'mypkg.cb' is not an import path like 'mypackage.module:Name'"),
        ({"log_every_n_steps": -1}, "'log_every_n_steps': Input should be greater than or equal to 0"),
        ({"progress": "fancy"}, "'progress': Input should be 'auto', 'bar', 'epoch' or 'off'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(**values)


def test_list_fields_from_flags_and_yaml(tmp_path):
    from flows.cli import build_parser

    args = build_parser().parse_args(["train", "--metrics", "a.b:F,c:G", "--metrics", "d:H", "--callbacks", "e.f:Cb",
                                      "--hidden-sizes", "16,8"])
    assert (args.metrics, args.callbacks, args.hidden_sizes) == (["a.b:F", "c:G", "d:H"], ["e.f:Cb"], [16, 8])
    path = tmp_path / "config.yaml"
    path.write_text("callbacks: [mypkg.cb:Log]\nmetrics:\n  - torchmetrics:MeanSquaredError\n")
    config = load_config(path, callbacks=build_parser().parse_args(["train", "--callbacks", ""]).callbacks)
    assert (config.callbacks, config.metrics) == ([], ["torchmetrics:MeanSquaredError"])  # the flag empties the list


def test_progress_bar_moves_with_each_batch_and_leaves_a_line_per_epoch():
    from rich.console import Console

    out = io.StringIO()
    bar = ProgressBar(Console(file=out, force_terminal=True, width=120))

    completed: list[float] = []

    class Seen(Callback):
        def on_train_batch_end(self, state, batch, loss):
            completed.append(bar.bar.tasks[0].completed)

    x, y = _data(40)
    _fit(torch.nn.Linear(4, 2), x, y, batch_size=8, epochs=2, callbacks=[bar, Seen()])
    assert completed == [1, 2, 3, 4, 5] * 2  # within each epoch, batch by batch
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())  # the terminal's control codes
    assert "epoch 1/2  train_loss=" in text and "epoch 2/2  train_loss=" in text


def test_progress_off_a_terminal_is_one_line_per_epoch(caplog):
    assert isinstance(progress_callback("auto"), Progress)  # pytest's stderr is not a terminal
    assert isinstance(progress_callback("bar"), ProgressBar) and progress_callback("off") is None
    x, y = _data(40)
    with caplog.at_level("INFO", logger="fitflow"):
        _fit(torch.nn.Linear(4, 2), x, y, batch_size=8, epochs=2, callbacks=[progress_callback("epoch")])
    assert [r.getMessage().split("  ")[0] for r in caplog.records] == ["epoch 1/2", "epoch 2/2"]


def test_custom_loss_module_from_make_loss():
    loss = make_loss("user_code_examples:label_smoothed_cross_entropy", "classification")
    outputs, targets = torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    assert torch.equal(loss(outputs, targets), torch.nn.functional.cross_entropy(outputs, targets, label_smoothing=0.1))


# --- through the flow and the CLI: real Prefect, real MLflow ------------------------------------


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> str:
    return str(write_mixed_classification_csv(tmp_path_factory.mktemp("loop") / "table.csv", rows=400))


@pytest.mark.usefixtures("prefect_server")
def test_your_callback_by_import_path_through_the_cli(table, mlflow_uri, tmp_path, monkeypatch, capsys):
    from flows.cli import main

    record = tmp_path / "calls.jsonl"
    monkeypatch.setenv("RECORD_CALLS_TO", str(record))
    # 280 training rows in batches of 64: 5 batches, 3 optimizer steps per epoch (2 + 2 + 1)
    assert main(["train", "--data", table, "--target", "label", "--epochs", "2", "--batch-size", "64",
                 "--accumulate-grad-batches", "2", "--scheduler", "warmup_cosine", "--warmup-steps", "2",
                 "--callbacks", "user_code_examples:RecordCalls", "--patience", "0", "--experiment", "hooks"]) == 0
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert [(c["hook"], c["epoch"], c["step"]) for c in calls] == [
        ("on_fit_start", 0, 0),
        ("on_epoch_start", 1, 0), *[("on_train_batch_end", 1, s) for s in (0, 1, 1, 2, 3)], ("on_epoch_end", 1, 3),
        ("on_epoch_start", 2, 3), *[("on_train_batch_end", 2, s) for s in (3, 4, 4, 5, 6)], ("on_epoch_end", 2, 6),
        ("on_fit_end", 2, 6)]
    batches = [c for c in calls if c["hook"] == "on_train_batch_end"]
    assert all(c["batches"] == 5 and c["loss_shape"] == [] and not c["requires_grad"] and c["training"] for c in batches)
    # yours come after fitflow's: the schedule has stepped when yours reads the lr (warmup: 1/3, 2/3 of lr)
    assert [c["lr"] for c in batches[:3]] == pytest.approx([1e-3 / 3, 2e-3 / 3, 2e-3 / 3])
    epoch_end = [c for c in calls if c["hook"] == "on_epoch_end"]
    assert [c["history"] for c in epoch_end] == [1, 2] and "val_f1_macro" in epoch_end[0]["logs"]
    run_id = capsys.readouterr().out.split("MLflow run: ")[1].split()[0]
    params = MlflowClient(mlflow_uri).get_run(run_id).data.params
    assert params["callbacks"] == '["user_code_examples:RecordCalls"]' and params["accumulate_grad_batches"] == "2"


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize(("args", "message"), [
    (["--callbacks", "user_code_examples:NotACallback"], "callback 'user_code_examples:NotACallback' is the class"),
    (["--metrics", "user_code_examples:per_class_hits"], "returned shape (2,)"),
    (["--accumulate-grad-batches", "0"], "'accumulate_grad_batches': Input should be greater than or equal to 1"),
    (["--scheduler", "onecycle", "--warmup-steps", "100"], "warmup_steps 100 leaves no step of the onecycle schedule"),
])
def test_bad_loop_settings_exit_2_with_one_line_and_no_run_left_running(table, mlflow_uri, args, message, capsys):
    from flows.cli import main

    assert main(["train", "--data", table, "--target", "label", "--epochs", "1", "--experiment", "bad", *args]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("fitflow: error:") and message in last, last
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert not [run for run in runs if run.info.status == "RUNNING"]


def _step_losses(client: MlflowClient, run_id: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train_loss_step"))


@pytest.mark.usefixtures("prefect_server")
def test_per_step_losses_reach_mlflow_at_their_global_steps(table, mlflow_uri):
    from flows.train import train

    # 5 batches of 64, accumulating 2: 3 optimizer steps per epoch, 12 in 4 epochs; logged every 2nd
    result = train(TrainConfig(data=table, target="label", epochs=4, batch_size=64, accumulate_grad_batches=2,
                               log_every_n_steps=2, patience=0, experiment="steps"))
    client = MlflowClient(mlflow_uri)
    logged = _step_losses(client, result.run_id)
    assert [step for step, _ in logged] == [2, 4, 6, 8, 10, 12]
    assert all(math.isfinite(value) and value > 0 for _, value in logged)
    assert [m.step for m in client.get_metric_history(result.run_id, "train_loss")] == [1, 2, 3, 4]


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_a_resumed_run_logs_every_step_once_with_the_values_of_an_uninterrupted_one(table, mlflow_uri, tmp_path, capsys):
    """The crash lands in epoch 3, after steps that the journal then holds (flushed as training
    ends); `fitflow resume` continues from epoch 2's checkpoint and journals only the steps after them."""
    from flows.cli import main
    from flows.environment import fitflow_home
    from flows.train import train
    from tasks.metrics_journal import Journal

    marker = tmp_path / "crashed"
    settings = {"data": table, "target": "label", "epochs": 4, "batch_size": 32, "patience": 0, "log_every_n_steps": 1,
                "scheduler": "onecycle", "experiment": "step-resume", "model": "custom_models:CrashOnceNet", "retries": 0,
                "model_kwargs": {"crash_at": 2 * 9 + 5, "marker": str(marker)}}  # 9 steps per epoch: crash at the 23rd
    marker.touch()  # the reference run must not crash
    whole = train(TrainConfig(**settings))
    marker.unlink()
    with pytest.raises(Exception, match="simulated device failure"):
        train(TrainConfig(**settings))
    client = MlflowClient(mlflow_uri)
    (failed,) = client.search_runs([whole.experiment_id], filter_string="attributes.status = 'FAILED'")
    run_id = failed.info.run_id
    journal = Journal(fitflow_home() / "checkpoints" / run_id)
    assert [e.step for e in journal.entries() if e.per == "step"] == list(range(1, 23))  # past epoch 2's 18
    capsys.readouterr()
    assert main(["resume", run_id]) == 0
    assert [e.step for e in journal.entries() if e.per == "step"] == list(range(1, 37))  # 19-22 not again
    assert _step_losses(client, run_id) == _step_losses(client, whole.run_id)
    assert [step for step, _ in _step_losses(client, run_id)] == list(range(1, 37))
