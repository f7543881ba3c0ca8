"""Model and loop tests on real torch, no Prefect, no MLflow."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tasks.callbacks import BestWeights, Callback, EarlyStopping, Monitor
from tasks.config import TrainConfig
from tasks.data import load_table, prepare
from tasks.errors import ConfigError, TrainingError
from tasks.loaders import make_loader
from tasks.models import MLP, build_model, model_spec
from tasks.trainer import build_loaders, prep_spec, train_model


@pytest.fixture(scope="module")
def breast_cancer():
    config = TrainConfig(epochs=8)
    return config, prepare(load_table(config.data), prep_spec(config))


def test_loader_gathers_every_row_once_per_epoch_in_a_seeded_order():
    x = np.arange(10, dtype=np.float32).reshape(10, 1)
    y = np.arange(10)
    loader = make_loader(x, y, batch_size=4, shuffle=True, seed=1)
    first = torch.cat([yb for _, yb in loader])
    second = torch.cat([yb for _, yb in loader])
    assert sorted(first.tolist()) == list(range(10)) and len(loader) == 3
    assert first.tolist() != second.tolist()  # reshuffled each epoch
    again = make_loader(x, y, batch_size=4, shuffle=True, seed=1)
    assert torch.cat([yb for _, yb in again]).tolist() == first.tolist()
    for xb, yb in loader:
        assert torch.equal(xb[:, 0].long(), yb)  # features stay aligned with their targets
    assert len(make_loader(x, y, batch_size=4, shuffle=True, drop_last=True)) == 2
    assert [len(yb) for _, yb in make_loader(x, y, batch_size=4)] == [4, 4, 2]


def test_loader_with_workers_yields_the_same_batches():
    x = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    y = np.arange(50)
    main = [yb.tolist() for _, yb in make_loader(x, y, 16, shuffle=True, seed=3)]
    workers = [yb.tolist() for _, yb in make_loader(x, y, 16, shuffle=True, seed=3, num_workers=1)]
    assert main == workers


def test_a_loader_with_workers_leaves_torch_global_generator_alone():
    """Dropout draws from torch's global generator, whose state each epoch checkpoint saves. A
    DataLoader draws its workers' base seed when its iterator starts, which a persistent worker
    loader does in the first epoch only and a resumed run does again in a later one: from the
    global generator, the resumed run's dropout masks would differ from the uninterrupted run's."""
    x, y = np.zeros((50, 3), np.float32), np.arange(50)
    loader = make_loader(x, y, 16, shuffle=True, seed=3, num_workers=1)
    state = torch.get_rng_state()
    for _ in range(2):
        list(loader)
    assert torch.equal(torch.get_rng_state(), state)


def test_mlp_options():
    model = MLP(5, 3, hidden_sizes=[8, 4], activation="gelu", dropout=0.2, batch_norm=True)
    kinds = [type(layer).__name__ for layer in model]
    assert kinds == ["Linear", "BatchNorm1d", "GELU", "Dropout", "Linear", "BatchNorm1d", "GELU", "Dropout", "Linear"]
    assert model(torch.zeros(4, 5)).shape == (4, 3)


def test_custom_model_by_import_path_and_clear_errors():
    model = build_model(model_spec("custom_models:TinyNet", 4, 2, {"width": 3}))
    assert model.body[0].out_features == 3
    with pytest.raises(ConfigError, match="cannot import model"):
        build_model(model_spec("no_such_pkg.nets:Net", 4, 2, {}))
    with pytest.raises(ConfigError, match="cannot build model .custom_models:TinyNet."):
        build_model(model_spec("custom_models:TinyNet", 4, 2, {"depth": 3}))


def test_training_is_reproducible_and_learns(breast_cancer):
    _, prepared = breast_cancer
    config = TrainConfig(epochs=8, linear_path=False)  # from random weights (not from the linear baseline): it must learn
    first = train_model(config, prepared, build_loaders(config, prepared))
    second = train_model(config, prepared, build_loaders(config, prepared))
    assert first.history.epochs == second.history.epochs
    losses = first.history.history["train_loss"]
    assert losses[-1] < losses[0] * 0.5
    assert set(first.history.history) == {"train_loss", "val_loss", "val_accuracy", "val_f1_macro", "val_auroc"}


def test_non_finite_loss_names_epoch_and_batch(breast_cancer):
    _, prepared = breast_cancer
    config = TrainConfig(model="custom_models:NaNAfterFirstStep", epochs=3)
    with pytest.raises(TrainingError, match=r"loss became nan at epoch 1, batch 2"):
        train_model(config, prepared, build_loaders(config, prepared))


def test_early_stopping_stops_after_patience_and_restores_the_best_epoch(breast_cancer):
    _, prepared = breast_cancer
    config = TrainConfig(epochs=200, patience=3, lr=0.01)
    trained = train_model(config, prepared, build_loaders(config, prepared))
    val_losses = trained.history.history["val_loss"]
    assert len(val_losses) < 200
    assert trained.best_epoch == int(np.argmin(val_losses)) + 1
    assert len(val_losses) == trained.best_epoch + 3


def test_best_weights_callback_checkpoint(tmp_path):
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    from tasks.callbacks import FitState

    state = FitState(model=model, optimizer=optimizer, epochs=3)
    best = BestWeights(Monitor("val_loss"), tmp_path / "best.pt")
    for epoch, loss in enumerate([0.5, 0.3, 0.4], start=1):
        with torch.no_grad():
            model.weight.fill_(epoch)
        state.epoch, state.logs = epoch, {"val_loss": loss}
        best.on_epoch_end(state)
    best.on_fit_end(state)
    assert model.weight.flatten().tolist() == [2.0, 2.0]  # epoch 2's weights restored
    saved = torch.load(tmp_path / "best.pt", weights_only=True)
    assert saved["epoch"] == 2 and saved["score"] == 0.3 and saved["model"]["weight"].flatten().tolist() == [2.0, 2.0]


def test_early_stopping_min_delta_and_max_mode():
    monitor = Monitor("val_accuracy", min_delta=0.05)
    stopper = EarlyStopping(monitor, patience=2)
    from tasks.callbacks import FitState

    state = FitState(model=torch.nn.Linear(1, 1), optimizer=None, epochs=10)
    for epoch, acc in enumerate([0.80, 0.90, 0.93, 0.94], start=1):  # +0.03 and +0.04 are below min_delta
        state.epoch, state.logs = epoch, {"val_accuracy": acc}
        stopper.on_epoch_end(state)
    assert state.stop and monitor.best == 0.90


def test_unknown_monitor_is_a_config_error(breast_cancer):
    _, prepared = breast_cancer
    config = TrainConfig(monitor="val_rmse")
    with pytest.raises(ConfigError, match="monitor 'val_rmse' is not logged for classification"):
        train_model(config, prepared, build_loaders(config, prepared))


def test_callbacks_see_every_epoch(breast_cancer):
    config, prepared = breast_cancer

    class Count(Callback):
        epochs: list[int] = []

        def on_epoch_end(self, state):
            self.epochs.append(state.epoch)

    from tasks.compile import make_loss, make_optimizer
    from tasks.trainer import task_metrics
    from tasks.training import fit

    loaders = build_loaders(config, prepared)
    model = build_model(model_spec("mlp", prepared.preprocessor.n_features, 2, {}))
    counter = Count()
    history = fit(model, loaders.train, loaders.val, epochs=3, optimizer=make_optimizer("sgd", model.parameters(), 0.01),
                  loss_fn=make_loss("auto", "classification"), metrics=task_metrics(prepared),
                  device=torch.device("cpu"), callbacks=[counter])
    assert counter.epochs == [1, 2, 3] and len(history) == 3


def test_mixed_precision_is_ignored_on_cpu_with_a_log_line(breast_cancer, caplog):
    config, prepared = breast_cancer
    config = config.model_copy(update={"precision": "bf16", "epochs": 2})
    with caplog.at_level("INFO", logger="fitflow"):
        trained = train_model(config, prepared, build_loaders(config, prepared))
    assert len(trained.history) == 2
    assert "precision=bf16 is ignored on cpu" in caplog.text


def test_gradient_clipping_bounds_each_step():
    """SGD with lr=1: each step moves the weights by at most grad_clip (the clipped norm)."""
    from tasks.metrics import TaskMetrics
    from tasks.training import fit

    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32) * 100
    y = (x[:, 0] > 0).astype(np.int64)
    loader = make_loader(x, y, batch_size=16, shuffle=True)
    model = torch.nn.Linear(4, 2)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    fit(model, loader, loader, epochs=1, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        loss_fn=torch.nn.CrossEntropyLoss(), metrics=TaskMetrics("classification", 2), device=torch.device("cpu"),
        grad_clip=1e-3)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert 0 < float((after - before).norm()) <= 4 * 1e-3 + 1e-6  # 4 steps


def test_lr_schedules_step_per_epoch():
    from tasks.callbacks import FitState, LRSchedule
    from tasks.compile import make_scheduler

    model = torch.nn.Linear(1, 1)
    for name, values, expected in (("step", [1, 1, 1], [0.5, 0.25, 0.125]), ("plateau", [1, 1, 1, 1], [1, 1, 0.5, 0.5])):
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        schedule = LRSchedule(make_scheduler(name, optimizer, epochs=10, step_size=1 if name == "step" else 5, gamma=0.5),
                              Monitor("val_loss"))
        state = FitState(model=model, optimizer=optimizer, epochs=10)
        seen = []
        for epoch, value in enumerate(values, start=1):
            state.epoch, state.logs = epoch, {"val_loss": value}
            schedule.on_epoch_end(state)
            seen.append(optimizer.param_groups[0]["lr"])
        assert seen == expected, name


def test_named_device_must_exist():
    from tasks.device import resolve_device

    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


def test_device_resident_loader_yields_the_same_batches():
    x = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    y = np.arange(40)
    host = [yb.tolist() for _, yb in make_loader(x, y, 8, shuffle=True, seed=5)]
    resident = make_loader(x, y, 8, shuffle=True, seed=5, device=torch.device("cpu"))
    assert [yb.tolist() for _, yb in resident] == host


def test_torch_compile_keeps_the_state_dict_keys(breast_cancer):
    config, prepared = breast_cancer
    config = config.model_copy(update={"torch_compile": True, "epochs": 1})
    trained = train_model(config, prepared, build_loaders(config, prepared))
    plain = build_model(trained.spec)
    assert list(trained.model.state_dict()) == list(plain.state_dict())
    assert np.isfinite(trained.history.history["val_loss"][0])


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_the_optimizer_takes_the_fused_kernel_and_steps_as_the_default_one_does(name):
    """The fused kernel (21% faster epochs here, docs/benchmarks.md) is an implementation choice:
    the weights after 30 steps match those of torch's default kernel to float32 rounding."""
    from tasks.compile import make_optimizer

    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    fused_model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    default_model = copy.deepcopy(fused_model)
    fused = make_optimizer(name, fused_model.parameters(), 0.01, weight_decay=0.01)
    default = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[name](
        default_model.parameters(), lr=0.01, weight_decay=0.01, **({"momentum": 0.9} if name == "sgd" else {}))
    assert fused.param_groups[0]["fused"] is True and not default.param_groups[0]["fused"]
    for _ in range(30):
        for model, optimizer in ((fused_model, fused), (default_model, default)):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    for a, b in zip(fused_model.parameters(), default_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_balanced_class_weights_weigh_the_loss_by_the_training_split(breast_cancer):
    from tasks.trainer import loss_of

    config, prepared = breast_cancer
    targets = torch.as_tensor(prepared.train.targets)
    counts = torch.bincount(targets).double()
    weighed = loss_of(config.model_copy(update={"class_weights": "balanced"}), prepared)
    # n / (classes * count): the rarer class (malignant) weighs more, both weigh equally in sum
    assert torch.allclose(weighed.weight.double(), len(targets) / (2 * counts))
    assert weighed.weight[int(counts.argmin())] > 1 > weighed.weight[int(counts.argmax())]
    assert loss_of(config, prepared).weight is None
    trained = train_model(config.model_copy(update={"class_weights": "balanced", "epochs": 2}), prepared,
                          build_loaders(config, prepared), progress=False)
    assert len(trained.history) == 2
    with pytest.raises(ConfigError, match="class_weights balanced is for classification"):
        regression = TrainConfig(task="regression", target="mean_radius", class_weights="balanced")
        loss_of(regression, prepare(load_table(regression.data), prep_spec(regression)))
