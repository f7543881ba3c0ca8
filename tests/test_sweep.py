"""The `sweep` flow end to end: real Prefect, a real MLflow store, real torch, the shipped dataset."""

from __future__ import annotations

import json

import optuna
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

from flows.cli import main
from flows.runs import ranked_runs
from flows.sweep import sweep
from flows.sweep_config import load_sweep_config
from tasks.callbacks import FitState
from tasks.config import TrainConfig
from tasks.errors import ConfigError
from tasks.search import OptunaPruning, base_point, enqueue_base, suggest

# batch_norm cannot train on a one-row batch: 397 training rows in batches of 396 leave one row
# unless drop_last, so exactly one of the six grid points is an invalid combination.
GRID = {
    "base": {"epochs": 4, "patience": 0, "batch_norm": True, "monitor": "val_accuracy", "experiment": "sweep-e2e"},
    "space": {"batch_size": {"choices": [32, 64, 396]}, "drop_last": {"choices": [True, False]}},
    "sampler": "grid", "n_trials": 10, "parallelism": 2, "prune": False, "name": "grid",
}


@pytest.fixture(scope="module")
def store(tmp_path_factory, prefect_server):
    uri = f"sqlite:///{tmp_path_factory.mktemp('sweep') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


@pytest.fixture(scope="module")
def grid_sweep(store):
    return sweep(load_sweep_config(None, **GRID))


def test_one_parent_six_children_with_distinct_params_and_one_failure(store, grid_sweep):
    client = MlflowClient(store)
    parent = client.get_run(grid_sweep.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["fitflow.flow"] == "sweep"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 6  # the grid has 6 points: n_trials=10 stops at the grid's size
    assert len({(c.data.params["batch_size"], c.data.params["drop_last"]) for c in children}) == 6
    # every trial trained on the data prepared once: the same dataset digest as the parent
    assert {c.data.tags["fitflow.dataset_digest"] for c in children} == {parent.data.tags["fitflow.dataset_digest"]}
    (failed,) = [c for c in children if c.info.status == "FAILED"]
    assert (failed.data.params["batch_size"], failed.data.params["drop_last"]) == ("396", "false")
    assert "Expected more than 1 value per channel" in failed.data.tags["fitflow.error"]
    assert all(c.info.status == "FINISHED" and "test_accuracy" in c.data.metrics for c in children if c != failed)
    # the parent: searched fields are not its params, the sweep's settings and the best trial are
    assert "batch_size" not in parent.data.params and parent.data.params["sweep.sampler"] == "grid"
    assert parent.data.tags["fitflow.best_run_id"] == grid_sweep.best_run_id
    assert parent.data.params["best.batch_size"] == json.dumps(grid_sweep.best_params["batch_size"])
    assert parent.data.metrics["trials_failed"] == 1 and parent.data.metrics["trials_complete"] == 5


def test_ranking_artifacts_and_best_trial_match_fitflow_runs(store, grid_sweep, capsys):
    client = MlflowClient(store)
    parent_id = grid_sweep.parent_run_id
    ranking = pd.read_csv(client.download_artifacts(parent_id, "trials.csv"))
    assert list(ranking["run_id"]) == [row["run_id"] for row in grid_sweep.trials]
    assert list(ranking["state"]) == ["complete"] * 5 + ["failed"]
    assert ranking["best_val_accuracy"].iloc[:5].is_monotonic_decreasing
    assert {"duration_s", "test_accuracy", "batch_size", "drop_last", "error"} <= set(ranking.columns)
    assert {a.path for a in client.list_artifacts(parent_id, "plots")} == {"plots/best_val_accuracy_by_param.png"}

    ranked = ranked_runs(store, "sweep-e2e", "best_val_accuracy", top=10, parent_run_id=parent_id)
    assert [row["run_id"] for row in ranked][:5] == list(ranking["run_id"].iloc[:5])
    assert ranked[0]["run_id"] == grid_sweep.best_run_id
    assert main(["runs", "--experiment", "sweep-e2e", "--sort", "best_val_accuracy", "--sweep", parent_id, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed[0]["run_id"] == grid_sweep.best_run_id
    assert printed[0]["metrics"]["best_val_accuracy"] == pytest.approx(grid_sweep.best_value)

    flow_run_id = client.get_run(parent_id).data.tags["prefect.flow_run_id"]
    with get_client(sync_client=True) as prefect:
        (artifact,) = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["sweep-ranking"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        trial_runs = [r for r in prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
                      if r.name.startswith("trial-")]
    table = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    assert [row["run_id"] for row in table] == list(ranking["run_id"])
    assert sorted(r.state.name for r in trial_runs) == ["Completed"] * 5 + ["Failed"]


def test_fitflow_runs_rejects_an_unknown_experiment(store, capsys):
    assert main(["runs", "--experiment", "sweep-e2ee"]) == 2
    assert "no MLflow experiment 'sweep-e2ee'" in capsys.readouterr().err


def test_tpe_sweep_from_yaml_through_the_cli(store, tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text(
        "base: {epochs: 5, patience: 0, monitor: val_loss, experiment: sweep-tpe}\n"
        "space:\n  lr: {low: 1.0e-4, high: 3.0e-2, log: true}\n  hidden_sizes: {choices: [[16], [32, 16]]}\n"
        "n_trials: 4\nsampler: tpe\nparallelism: 2\nprune: true\nprune_warmup_epochs: 1\n")
    assert main(["sweep", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    client = MlflowClient(store)
    (parent,) = client.search_runs([client.get_experiment_by_name("sweep-tpe").experiment_id],
                                   filter_string="tags.fitflow.flow = 'sweep' and tags.mlflow.runName = 'sweep-tpe'")
    assert f"sweep run: {parent.info.run_id}" in out
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    assert {c.data.tags["fitflow.trial_state"] for c in children} <= {"complete", "pruned"}
    for child in children:
        assert 1e-4 <= float(child.data.params["lr"]) <= 3e-2
        assert child.data.params["hidden_sizes"] in ("[16]", "[32, 16]")
    # trial 0 is the base config where the space holds its values: base lr 1e-3; its [64, 32] is no choice, so sampled
    (first,) = [c for c in children if c.data.tags["fitflow.trial"] == "0"]
    assert float(first.data.params["lr"]) == 1e-3 and parent.data.params["sweep.base_trial"] == "True"


def test_base_point_holds_the_base_values_the_space_holds():
    space = {name: dim.model_dump() for name, dim in load_sweep_config(None, space={
        "lr": {"low": 1e-4, "high": 3e-2, "log": True}, "hidden_sizes": {"choices": [[32], [64, 32]]},
        "dropout": {"low": 0.0, "high": 0.3, "step": 0.15}, "batch_size": {"low": 8, "high": 32},
        "weight_decay": {"low": 1e-5, "high": 1e-1, "log": True}}).space.items()}
    integers = {"lr": False, "hidden_sizes": False, "dropout": False, "batch_size": True, "weight_decay": False}
    base = TrainConfig().model_dump()  # lr 1e-3, [64, 32], dropout 0.1, batch_size 64, weight_decay auto
    # dropout 0.1 is off the 0.15 grid, batch_size 64 above high, weight_decay 'auto' no number: all three sampled
    assert base_point(space, integers, base) == {"lr": 1e-3, "hidden_sizes": "[64, 32]"}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    enqueue_base(study, space, integers, base)
    first = suggest(study.ask(), space, integers, grid=False)
    assert first["lr"] == 1e-3 and first["hidden_sizes"] == [64, 32] and first["dropout"] in (0.0, 0.15, 0.3)
    assert suggest(study.ask(), space, integers, grid=False)["lr"] != 1e-3  # only the first trial
    assert base_point(space, integers, {**base, "dropout": 0.3, "batch_size": 16}) == {
        "lr": 1e-3, "hidden_sizes": "[64, 32]", "dropout": 0.3, "batch_size": 16}


def test_pruning_callback_stops_a_trial_worse_than_the_median():
    study = optuna.create_study(direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    good = study.ask()
    for epoch in (1, 2, 3):
        good.report(0.9, epoch)
    study.tell(good, 0.9)
    for value, pruned in ((0.95, False), (0.5, True)):  # better than the median goes on; worse stops
        model = torch.nn.Linear(2, 2)
        state = FitState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), epochs=3)
        callback = OptunaPruning(study.ask(), "val_accuracy")
        state.epoch, state.logs = 2, {"val_accuracy": value}
        callback.on_epoch_end(state)
        assert state.stop is pruned and callback.pruned_at == (2 if pruned else None)


@pytest.mark.parametrize("values, message", [
    ({"space": {"lrr": {"choices": [0.1]}}}, "'lrr' is not a TrainConfig field; did you mean 'lr'?"),
    ({"space": {"seed": {"choices": [1, 2]}}}, "'seed' cannot be searched"),
    ({"space": {"optimizer": {"choices": ["adam", "adamax"]}}}, "Input should be 'adam', 'adamw' or 'sgd'"),
    ({"space": {"lr": {"low": 0, "high": 0.1, "log": True}}}, "a log range needs low > 0"),
    ({"space": {"dropout": {"low": 0.5, "high": 0.1}}}, "low (0.5) must be below high (0.1)"),
    ({"space": {"batch_size": {"low": 8.5, "high": 64}}}, "'batch_size' takes integers"),
    ({"n_trial": 3}, "unknown sweep field 'n_trial'; did you mean 'n_trials'?"),
    ({"parallelism": 0}, "parallelism: Input should be greater than or equal to 1"),
])
def test_bad_sweep_configs_fail_before_any_run(values, message):
    with pytest.raises(ConfigError) as err:
        load_sweep_config(None, **values)
    assert message in str(err.value)


def test_a_monitor_the_base_does_not_log_fails_before_the_parent_run(store):
    """Checked once on the base config, before the parent run exists: no parent, no trial runs."""
    config = load_sweep_config(None, base={"epochs": 1, "monitor": "val_r2", "experiment": "sweep-bad-monitor"},
                               space={"lr": {"choices": [1e-3, 3e-3]}}, sampler="grid", n_trials=2, prune=False)
    with pytest.raises(ConfigError, match="monitor 'val_r2' is not logged for classification"):
        sweep(config)
    assert MlflowClient(store).get_experiment_by_name("sweep-bad-monitor") is None


def test_a_lower_is_better_metric_of_yours_is_minimised(store):
    """error_rate (tests/user_code_examples.py) says higher_is_better = False; by its name alone it would go up."""
    config = load_sweep_config(
        None, base={"epochs": 3, "patience": 0, "linear_path": False, "monitor": "val_error_rate",
                    "metrics": ["user_code_examples:error_rate"], "experiment": "sweep-errors"},
        space={"lr": {"choices": [1e-6, 3e-3]}}, sampler="grid", n_trials=2, parallelism=1, prune=False, name="errors")
    result = sweep(config)
    values = [row["best_val_error_rate"] for row in result.trials]
    assert values[0] < values[1] and [row["lr"] for row in result.trials] == [3e-3, 1e-6]  # fewer errors first
    assert result.best_params == {"lr": 3e-3} and result.best_value == pytest.approx(values[0], abs=1e-6)
    parent = MlflowClient(store).get_run(result.parent_run_id)
    assert parent.data.tags["fitflow.monitor_mode"] == "min"
    assert parent.data.metrics["best_val_error_rate"] == pytest.approx(values[0], abs=1e-6)


def test_a_trial_that_fails_before_training_still_ends_its_run(store, tmp_path):
    """Everything after the child run exists is inside its guard: here the pruner cannot be built
    (a finished trial with two objective values, in a one-objective study), and the run ends FAILED."""
    from flows.steps import load_and_prepare
    from flows.sweep import PruningBasis, run_trial

    base = TrainConfig(epochs=1, experiment="sweep-guard")
    prepared, data = load_and_prepare(base)
    two_objectives = optuna.trial.create_trial(values=[0.1, 0.2], params={}, distributions={})
    basis = PruningBasis(optuna.study.StudyDirection.MINIMIZE, optuna.pruners.NopPruner(), [two_objectives])
    client = MlflowClient(store)
    # artifacts under tmp_path: MLflow's default for a sqlite store is ./mlruns of the working directory
    experiment = client.create_experiment("sweep-guard", (tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment).info.run_id

    with pytest.raises(ValueError):
        run_trial.fn(0, {}, base, prepared, data, parent, "guard-0", basis)

    (child,) = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert child.info.status == "FAILED" and "ValueError" in child.data.tags["fitflow.error"]
