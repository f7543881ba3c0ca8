"""DDP on this CPU machine: two gloo processes launched by torch's elastic agent, real Prefect and MLflow.

Two launches in all (each spawns two fresh interpreters): one through the train flow, checked
against a single-process run and a single-process evaluation; one with a rank that fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from conftest import write_mixed_classification_csv
from mlflow.tracking import MlflowClient

from flows.environment import fitflow_home
from tasks.compile import make_loss
from tasks.config import TrainConfig, load_config
from tasks.data import load_table, prepare
from tasks.distributed import launch, processes_per_node, train_distributed
from tasks.errors import ConfigError, TrainingError
from tasks.loaders import make_loader
from tasks.metrics_journal import Journal
from tasks.models import build_model, model_spec
from tasks.trainer import build_loaders, prep_spec, task_metrics, train_model
from tasks.training import evaluate

pytestmark = pytest.mark.slow  # starts real processes: minutes on 2 cores

# 400 rows -> 280 train / 60 val / 60 test. Global batch 40: 7 full batches, each split 20 + 20, so
# a DDP step averages the same rows as the single-process step (no uneven tail); no dropout,
# whose masks differ between one process and two. Accumulating 2 batches: 4 optimizer steps per
# epoch, the all-reduce only on each group's last batch (no_sync on the others).
SETTINGS = {"target": "label", "epochs": 4, "batch_size": 40, "lr": 0.02, "dropout": 0.0, "patience": 0, "device": "cpu",
            "hidden_sizes": [16], "accumulate_grad_batches": 2}


@pytest.fixture(scope="module")
def csv(tmp_path_factory):
    return str(write_mixed_classification_csv(tmp_path_factory.mktemp("ddp") / "table.csv"))


def test_shards_are_disjoint_cover_every_row_and_keep_the_step_count():
    x, y = torch.zeros(23, 1).numpy(), torch.arange(23).numpy()
    for world_size, batch in ((2, 8), (3, 6), (2, 22)):  # tails of 7, 5 and 1 rows (the last: fewer than ranks)
        loaders = [make_loader(x, y, batch, shuffle=True, seed=5, rank=r, world_size=world_size) for r in range(world_size)]
        for loader in loaders:
            loader.sampler.set_epoch(3)
        shards = [[yb for _, yb in loader] for loader in loaders]
        rows = torch.cat([torch.cat(shard) for shard in shards]).tolist()
        assert sorted(rows) == list(range(23))  # disjoint and complete
        assert len({len(shard) for shard in shards}) == 1  # every rank runs the same number of steps
        assert all(len(yb) > 0 for shard in shards for yb in shard)
        single = make_loader(x, y, batch, shuffle=True, seed=5)
        single.sampler.set_epoch(3)
        steps = [sorted(torch.cat(step).tolist()) for step in zip(*shards, strict=True)]
        expected = [sorted(yb.tolist()) for _, yb in single]
        if 23 % batch < world_size:  # the short tail joined the step before it
            expected[-2:] = [sorted(expected[-2] + expected[-1])]
        assert steps == expected  # each step's rows are the single-process step's
        assert sum(loader.sampler.rows_per_epoch() for loader in loaders) == 23


def test_ddp_settings_are_checked_with_one_line():
    with pytest.raises(ConfigError, match="need strategy ddp"):
        load_config(devices=2)
    with pytest.raises(ConfigError, match="several machines need rdzv_endpoint"):
        load_config(strategy="ddp", devices=2, num_nodes=2)
    with pytest.raises(ConfigError, match="must divide evenly over the 2 DDP processes"):
        launch(TrainConfig(strategy="ddp", devices=2, batch_size=33, device="cpu"), job=None)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="give a count of CPU processes"):
            processes_per_node(TrainConfig(strategy="ddp").launch)


def test_ddp_flow_matches_one_process_and_logs_one_run(csv, prefect_server, mlflow_uri):
    from flows.train import train

    ddp = TrainConfig(data=csv, strategy="ddp", devices=2, log_every_n_steps=2, **SETTINGS)
    result = train(ddp)

    # (a) the same global batch in one process reaches the same validation metrics
    single_config = TrainConfig(data=csv, **SETTINGS)
    prepared = prepare(load_table(csv), prep_spec(single_config))
    single = train_model(single_config, prepared, build_loaders(single_config, prepared), progress=False)
    for name in ("train_loss", "val_loss", "val_accuracy", "val_f1_macro", "val_auroc"):
        assert result.history[name][-1] == pytest.approx(single.history.history[name][-1], abs=1e-4), name

    # (b) the reduced validation metrics are those of the whole split: evaluate the shipped
    # (best) weights in this process and compare with the epoch they come from
    best = torch.load(fitflow_home() / "checkpoints" / result.run_id / "best.pt", weights_only=True)
    p = prepared.preprocessor
    model = build_model(model_spec("mlp", p.n_features, len(p.classes), {
        "hidden_sizes": ddp.hidden_sizes, "activation": ddp.activation, "dropout": 0.0, "batch_norm": False,
        "linear_path": ddp.linear_path}))
    model.load_state_dict(best["model"])
    here = evaluate(model, build_loaders(single_config, prepared).val, make_loss("auto", p.task), task_metrics(prepared),
                    torch.device("cpu"), "val")
    logged = {name: values[result.best_epoch - 1] for name, values in result.history.items() if name.startswith("val_")}
    assert here.keys() == logged.keys()
    for name in here:  # counts exact; the loss sum only in another order (float64 all-reduce)
        assert here[name] == pytest.approx(logged[name], rel=1e-6, abs=1e-7), name

    # (c) one MLflow run, one value per metric and epoch
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([result.experiment_id])
    assert [run.info.run_id for run in runs] == [result.run_id]
    tags = runs[0].data.tags  # launch settings are tags, apart from the hyperparameters
    assert tags["fitflow.launch.strategy"] == "ddp" and tags["fitflow.launch.devices"] == "2"
    assert "strategy" not in runs[0].data.params
    for name in ("train_loss", "val_loss", "val_auroc", "lr"):
        assert [m.step for m in client.get_metric_history(result.run_id, name)] == [1, 2, 3, 4], name
    # per-step losses from rank 0 alone, at the global optimizer step
    assert sorted(m.step for m in client.get_metric_history(result.run_id, "train_loss_step")) == list(range(2, 17, 2))


def _spawned_children() -> list[psutil.Process]:
    """This process's multiprocessing children (DDP workers), not the resource tracker."""
    children = []
    for child in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                children.append(child)
        except psutil.NoSuchProcess:
            pass
    return children


def test_a_failing_rank_fails_the_task_with_its_error_and_leaves_no_process(csv):
    config = TrainConfig(data=csv, strategy="ddp", devices=2, model="ddp_models:FailsOnRank",
                         model_kwargs={"rank": 1, "step": 2}, **{k: v for k, v in SETTINGS.items() if k != "hidden_sizes"})
    prepared = prepare(load_table(csv), prep_spec(config))
    with pytest.raises(TrainingError, match=r"^DDP rank 1 failed: ValueError: rank 1 cannot go on$"):
        train_distributed(config, prepared, progress=False)
    assert _spawned_children() == []


_MACHINES: list[subprocess.Popen] = []


def _machine(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """One 'machine' of a two-machine run on this host: its own process group (its agent and ranks)."""
    with open(log, "ab") as out:
        process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    _MACHINES.append(process)
    return process


@pytest.fixture
def machines_stopped():
    """Whatever happens in the test, no 'machine' is left running."""
    yield
    for process in _MACHINES:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    _MACHINES.clear()


@pytest.mark.usefixtures("machines_stopped")
def test_every_machine_of_a_two_machine_run_resumes_from_the_same_epoch(csv, prefect_server, mlflow_uri, tmp_path):
    """Two 'machines' on this host (static rendezvous on loopback, one gloo process each): the run is
    killed on both in epoch 3, then resumed on both. Machine 1 has no run and no checkpoint folder:
    rank 0 sends it the checkpoint, so both continue at epoch 3 and the run ends with each epoch once."""
    from prefect.settings import PREFECT_API_URL
    from stack import free_port

    hold = tmp_path / "hold"
    settings = {**{k: v for k, v in SETTINGS.items() if k not in ("hidden_sizes", "device")}, "data": csv,
                "experiment": "ddp-two-machines", "model": "custom_models:HoldAtEpochs",
                "model_kwargs": {"folder": str(hold), "epochs": [3]}}

    def machines(port: int) -> dict[str, str]:
        topology = {"strategy": "ddp", "devices": 1, "num_nodes": 2, "device": "cpu", "rdzv_endpoint": f"127.0.0.1:{port}"}
        (tmp_path / "run.yaml").write_text(yaml.safe_dump({**settings, **topology}))
        return topology

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(Path(__file__).parent)}
    fitflow = str(Path(sys.executable).with_name("fitflow"))
    join = [sys.executable, "-m", "tasks.distributed", "--config", str(tmp_path / "run.yaml"), "--node-rank", "1"]
    machines(free_port())
    first = [_machine([fitflow, "train", "--config", str(tmp_path / "run.yaml"), "--node-rank", "0"], env, tmp_path / "m0.log"),
             _machine(join, env, tmp_path / "m1.log")]
    deadline = time.monotonic() + 300  # only a guard against a hang
    while not (hold / "reached-3").exists():
        assert all(p.poll() is None for p in first) and time.monotonic() < deadline, (tmp_path / "m0.log").read_text()[-3000:]
        time.sleep(0.05)
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ddp-two-machines").experiment_id])
    run_id = run.info.run_id
    # held in epoch 3; epoch 2's checkpoint may still be in rank 0's writer thread (tasks/checkpoints.py): the
    # kill comes once it is written, so that the resume below starts at epoch 3 on both machines
    while not (fitflow_home() / "checkpoints" / run_id / "epoch-00002.pt").exists():
        assert all(p.poll() is None for p in first) and time.monotonic() < deadline, (tmp_path / "m0.log").read_text()[-3000:]
        time.sleep(0.05)
    for process in first:  # the whole job goes down (a node lost, the job killed): every process of both machines
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert max(p.name for p in (fitflow_home() / "checkpoints" / run_id).glob("epoch-*.pt")) == "epoch-00002.pt"

    launch = machines(free_port())  # the restarted job meets on a new port
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in launch.items()]
    again = [_machine([fitflow, "resume", run_id, *flags, "--node-rank", "0"], env, tmp_path / "m0-resume.log"),
             _machine(join, env, tmp_path / "m1-resume.log")]
    codes = [process.wait(timeout=300) for process in again]  # a machine at another epoch waits for its peer for ever
    assert codes == [0, 0], (tmp_path / "m0-resume.log").read_text()[-3000:] + (tmp_path / "m1-resume.log").read_text()[-3000:]
    journal = Journal(fitflow_home() / "checkpoints" / run_id)
    assert [entry.step for entry in journal.entries()] == [1, 2, 3, 4]
    for name in ("train_loss", "val_loss", "lr"):
        assert [m.step for m in client.get_metric_history(run_id, name)] == [1, 2, 3, 4], name
    assert client.get_run(run_id).info.status == "FINISHED"
