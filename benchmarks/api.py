"""The Python API's epoch against the flow engine's (issue #14, item 5): same data, model, process.

    python -m benchmarks --only api           # 100k train + 20k val rows, 3-epoch runs, 5 rounds
    python -m benchmarks --smoke --only api   # tiny sizes, seconds

Baseline: the flow's training step, `train_model` (benchmarks/workload.py FitflowRunner: default
callbacks, epoch checkpoints, MLflow logging to sqlite) on the benchmark table (32 features, 10
classes, MLP 32-128-128-10, Adam, batch 256). Candidate: `fitflow.compile(model).fit((x, y),
validation_data=(x_val, y_val))` on the same tensors with the same MLP as an nn.Sequential
object: the API maps the arrays to the engine's data (tasks/arrays.py), starts its own MLflow
run and calls the same training step. Both get a fresh model per call.

The figure is the epoch: a clock callback, last in both callback lists, takes the time from
its `on_fit_start` (the loop starts) to the last `on_epoch_end`, over the epochs. What the API
does once per fit outside the epochs (checking and hashing the arrays, starting the MLflow
run with its params, config.json and dataset, ending it) is reported apart, in seconds.
"""

from __future__ import annotations

import gc
import os
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from benchmarks.harness import Comparison, Measurement
from benchmarks.workload import BATCH, FitflowRunner, make_data, make_model


def suite(smoke: bool = False) -> list:
    if smoke:
        return api_epoch(5_000, 1_000, rounds=1, epochs=2)
    return api_epoch(100_000, 20_000, rounds=5, epochs=3)


def api_epoch(n_train: int, n_val: int, rounds: int, epochs: int) -> list:
    import fitflow
    from tasks.callbacks import Callback

    class EpochClock(Callback):
        def on_fit_start(self, state) -> None:
            self.start = time.perf_counter()

        def on_epoch_end(self, state) -> None:
            self.end = time.perf_counter()

        def per_epoch(self, epochs: int) -> float:
            return (self.end - self.start) / epochs

    data = make_data(n_train, n_val)
    engine = FitflowRunner(data, tracking=True, epochs=epochs)
    api_setup: list[float] = []

    def engine_epoch() -> float:
        clock = EpochClock()
        engine.fit(callbacks=[clock])
        return clock.per_epoch(epochs)

    def api_fit_epoch() -> float:
        clock = EpochClock()
        trainer = fitflow.compile(make_model(), optimizer="adam", lr=1e-3, patience=epochs + 5, experiment="bench-api")
        start = time.perf_counter()
        history = trainer.fit((data.x, data.y), validation_data=(data.x_val, data.y_val), epochs=epochs,
                              batch_size=BATCH, callbacks=[clock])
        assert len(history) == epochs
        api_setup.append(time.perf_counter() - start - (clock.end - clock.start))
        return clock.per_epoch(epochs)

    size = f"{n_train // 1000}k train + {n_val // 1000}k val, {epochs}-epoch runs"
    result = Comparison(f"API fit epoch vs flow engine epoch ({size})", "train_model (the flow's step)",
                        "fitflow.compile(model).fit((x, y))", target="<= 1.02",
                        note="per-epoch time inside each run (clock callback last in both); same MLP, data, "
                             "optimizer, callbacks and MLflow logging to sqlite")
    with _own_state():
        engine_epoch(), api_fit_epoch()  # warm-up: imports, first sqlite store, allocator
        for i in range(rounds):  # interleaved, alternating which goes first (benchmarks/harness.py)
            first, second = (engine_epoch, api_fit_epoch) if i % 2 == 0 else (api_fit_epoch, engine_epoch)
            times = {}
            for call in (first, second):
                gc.collect()  # as harness.timed: no collection of the other's garbage inside a timed epoch
                times[call] = call()
            result.baseline_s.append(times[engine_epoch])
            result.candidate_s.append(times[api_fit_epoch])
            result.ratios.append(times[api_fit_epoch] / times[engine_epoch])
    return [result, Measurement("API fit: once per fit, outside the epochs", statistics.median(api_setup[1:] or api_setup),
                                "s", note="arrays checked and hashed, MLflow run started (params, config.json, "
                                          "dataset) and ended; median of the timed rounds")]


@contextmanager
def _own_state():
    """The API's MLflow store and checkpoints in a temporary folder, as the engine runner's are."""
    saved = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "FITFLOW_HOME")}
    with tempfile.TemporaryDirectory(prefix="fitflow-bench-api-") as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        os.environ["FITFLOW_HOME"] = tmp
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
