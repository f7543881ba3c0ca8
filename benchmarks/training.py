"""Loader throughput, epoch time against hand-written loops and Lightning, tracking overhead."""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.harness import Comparison, Measurement, compare, timed
from benchmarks.workload import (
    BATCH,
    CLASSES,
    FitflowRunner,
    best_epoch,
    epoch_clock,
    make_data,
    make_model,
    metrics_validation,
    train_pass,
    tutorial_epoch,
)


def loader_throughput(n_rows: int, batch: int, rounds: int, max_batches: int) -> list:
    """fitflow's training loader vs DataLoader(TensorDataset(x, y), shuffle=True), per batch."""
    from tasks.loaders import make_loader

    data = make_data(n_rows, 1)
    fitflow = make_loader(data.x.numpy(), data.y.numpy(), batch, shuffle=True, seed=0)
    naive = DataLoader(TensorDataset(data.x, data.y), batch_size=batch, shuffle=True)
    n_batches = min(max_batches, len(fitflow))

    def first_batches(loader) -> None:
        for i, _ in enumerate(loader):
            if i + 1 == n_batches:
                break

    def fitflow_epoch() -> None:
        for _ in fitflow:
            pass

    label = f"loader N={n_rows:,} batch={batch}"
    results: list = [compare(label, ("naive DataLoader", lambda: first_batches(naive)),
                             ("fitflow loader", lambda: first_batches(fitflow)), rounds,
                             target="speed-up reported", note=f"time for the first {n_batches} batches")]
    # The floor: bytes one epoch gathers, at the copy bandwidth measured on the same tensors.
    epoch_bytes = data.x.numel() * data.x.element_size() + data.y.numel() * data.y.element_size()
    copy_s = min(timed(lambda: (data.x.clone(), data.y.clone())) for _ in range(3))
    floor_s = copy_s  # a clone reads and writes every byte once, as a gather of every row does
    epoch_s = min(timed(fitflow_epoch) for _ in range(max(1, rounds // 2)))
    results.append(Measurement(f"{label}: epoch / bandwidth floor", epoch_s / floor_s, "x",
                               note=f"epoch {epoch_s * 1e3:.1f} ms, floor {floor_s * 1e3:.2f} ms "
                                    f"({epoch_bytes / 1e6:.0f} MB at {epoch_bytes / copy_s / 1e9:.1f} GB/s)"))
    return results


def epoch_time(n_train: int, n_val: int, rounds: int, epochs: int) -> list:
    """A run of `epochs` epochs of fitflow's train_model against the tutorial and best hand loops,
    then against the strictest one (the same fused Adam, the same metrics computed by hand once
    per epoch), with where fitflow's time goes: each callback's hooks and each metric."""
    data = make_data(n_train, n_val)
    fitflow = FitflowRunner(data, tracking=True, epochs=epochs)
    generator = torch.Generator().manual_seed(0)

    def hand(loop, fused: bool = False):
        def run() -> None:
            model = make_model()
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
            for _ in range(epochs):
                loop(model, optimizer, data) if loop is tutorial_epoch else loop(model, optimizer, data, generator)
        return run

    size = f"{n_train // 1000}k train + {n_val // 1000}k val, {epochs}-epoch runs"
    results: list = [
        compare(f"epoch vs tutorial loop ({size})", ("tutorial loop", hand(tutorial_epoch)),
                ("fitflow", fitflow.fit), rounds, target="<= 0.45"),
        compare(f"epoch vs best hand loop ({size})", ("best hand loop", hand(best_epoch)),
                ("fitflow", fitflow.fit), rounds, target="<= 1.0",
                note="fitflow: default callbacks, checkpoints, MLflow logging, accuracy, macro-F1, AUROC; "
                     "the hand loop: torch's default Adam, loss and accuracy"),
        compare(f"epoch vs best hand loop with fused Adam ({size})",
                ("best hand loop, fused Adam", hand(best_epoch, True)), ("fitflow", fitflow.fit), rounds,
                target="reported", note="the hand loop takes the same optimizer kernel as fitflow, computes loss and accuracy"),
    ]
    spent: dict[str, list[float]] = {}
    with _timing_callbacks(spent):
        per_epoch, *more = _epochs_and_runs(fitflow, data, generator, epochs, rounds, size)
    results += [per_epoch, *more]
    epoch_s = statistics.median(per_epoch.candidate_s) / epochs
    calls = (rounds + 1) * epochs  # every epoch of every fitflow run in the comparison, the warm-up included
    for name, times in sorted(spent.items(), key=lambda item: -sum(item[1])):
        per_epoch_s = sum(times) / calls
        once = name.endswith(("on_fit_start", "on_fit_end"))
        results.append(Measurement(f"where the epoch goes: {name}", per_epoch_s / epoch_s, "x",
                                   note=f"{per_epoch_s * 1e3:.2f} ms per epoch of {epoch_s * 1e3:.0f} ms on the training "
                                        + (f"thread, once per run ({per_epoch_s * epochs * 1e3:.1f} ms) shared over its "
                                           f"{epochs} epochs" if once else "thread")))
    return results + metric_times(fitflow, data)


def _epochs_and_runs(fitflow: FitflowRunner, data, generator, epochs: int, rounds: int, size: str):
    """fitflow against the strictest hand loop (the same fused Adam, the same metrics by hand once
    per epoch), twice from the same interleaved runs: the time of the epochs alone (fitflow's timed
    by a last callback, from each epoch's start to the end of its callbacks; the hand loop's around
    each epoch call), and the whole runs (model and optimizer built, fit's start and end included)."""
    baseline = "hand loop, fused Adam, metrics by hand"
    runs: dict[str, list[float]] = {baseline: [], "fitflow": []}
    cpu: dict[str, list[float]] = {baseline: [], "fitflow": []}
    passes: dict[str, list[float]] = {baseline: [], "fitflow": []}

    def hand() -> float:
        start, cpu_start, epochs_s, passes_s = time.perf_counter(), time.process_time(), 0.0, 0.0
        model = make_model()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
        for _ in range(epochs):
            epoch_start = time.perf_counter()
            total = train_pass(model, optimizer, data, generator, BATCH)
            passes_s += time.perf_counter() - epoch_start
            metrics_validation(model, data, total)
            epochs_s += time.perf_counter() - epoch_start
        runs[baseline].append(time.perf_counter() - start)
        cpu[baseline].append(time.process_time() - cpu_start)
        passes[baseline].append(passes_s)
        return epochs_s

    def fit() -> float:
        start, cpu_start, clock, passes_s = time.perf_counter(), time.process_time(), epoch_clock(), []
        with _on_validation_start(lambda: passes_s.append(time.perf_counter() - clock.start)):
            fitflow.fit([clock])
        runs["fitflow"].append(time.perf_counter() - start)
        cpu["fitflow"].append(time.process_time() - cpu_start)
        passes["fitflow"].append(sum(passes_s))
        return sum(clock.epochs)

    per_epoch = compare(f"epoch vs hand loop with fused Adam and the same metrics, per epoch ({size})",
                        (baseline, hand), ("fitflow", fit), rounds, target="<= 1.03", measure=_reported,
                        note="the strictest baseline: same optimizer kernel, accuracy, macro-F1 and exact AUROC once per "
                             "epoch (torchmetrics' functions); fitflow with every default feature on; the epochs' time")
    whole = _paired(f"epoch vs hand loop with fused Adam and the same metrics, whole runs ({size})", baseline, runs,
                    note="the same runs, timed whole: fit's start and end (once per run) included")
    used = _paired(f"epoch vs hand loop with fused Adam and the same metrics, CPU time of whole runs ({size})", baseline,
                   cpu, note="the same runs' CPU seconds, every thread of the process (the writer and delivery threads "
                             "included): the work done, without the waits (fsync, the machine's other load)")
    trained = _paired(f"epoch vs hand loop with fused Adam, the training passes alone ({size})", baseline, passes,
                      note="the same runs, each epoch's training pass only (fitflow's: from the epoch's start to its "
                           "validation's): the loop's per-step cost, without validation, metrics and callbacks")
    return per_epoch, whole, used, trained


@contextmanager
def _on_validation_start(record):
    """Calls `record()` as fit's validation pass starts (fit looks `evaluate` up in tasks.training at each epoch)."""
    import tasks.training as loop

    evaluate = loop.evaluate

    def timed(*args, **kwargs):
        if (args[5] if len(args) > 5 else kwargs.get("split")) == "val":
            record()
        return evaluate(*args, **kwargs)

    loop.evaluate = timed
    try:
        yield
    finally:
        loop.evaluate = evaluate


def _paired(name: str, baseline: str, seconds: dict[str, list[float]], note: str, candidate: str = "fitflow") -> Comparison:
    """A reported comparison from seconds recorded by the rounds of another, `seconds[baseline]`
    against `seconds[candidate]` (index 0: the warm-ups)."""
    result = Comparison(name, baseline, candidate, target="reported", note=note)
    for baseline_s, candidate_s in zip(seconds[baseline][1:], seconds[candidate][1:], strict=True):
        result.baseline_s.append(baseline_s)
        result.candidate_s.append(candidate_s)
        result.ratios.append(candidate_s / baseline_s)
    return result


def _reported(run) -> float:
    """The seconds `run` reports of itself (after a garbage collection, as `timed` does)."""
    gc.collect()
    return run()


def metric_times(fitflow: FitflowRunner, data) -> list[Measurement]:
    """Each validation metric's time over the whole validation split (one update and compute, as
    fitflow does per epoch; best of 5), beside the hand loop's exact torchmetrics functions."""
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_auroc, multiclass_f1_score

    from tasks.metrics import BinnedAUROC, class_counts
    from tasks.trainer import task_metrics

    model = make_model()
    with torch.inference_mode():
        outputs = model(data.x_val)
    probs, targets = outputs.softmax(dim=1), data.y_val
    metrics = task_metrics(fitflow.prepared)
    batches = list(zip(outputs.split(1024), targets.split(1024), strict=True))

    def all_of_them() -> None:
        for out, y in batches:
            metrics.update(out, y)
        metrics.compute()

    def best(fn) -> float:
        return min(timed(fn) for _ in range(5))

    rows = f"{len(targets) // 1000}k rows"
    hand_s = {
        "accuracy": best(lambda: multiclass_accuracy(probs, targets, CLASSES, average="micro")),
        "f1_macro": best(lambda: multiclass_f1_score(probs, targets, CLASSES, average="macro")),
        "auroc": best(lambda: multiclass_auroc(probs, targets, CLASSES)),
    }
    results = [Measurement(f"metrics over the validation split ({rows}): fitflow's, all", best(all_of_them) * 1e3, "ms",
                           note=f"kept batches, softmax, one pass each; by hand: {sum(hand_s.values()) * 1e3:.1f} ms")]
    positive = torch.nn.functional.one_hot(targets, CLASSES).bool()
    auroc_kind = "exact (ranks)" if len(targets) <= BinnedAUROC.EXACT_BELOW_ROWS else "BinnedAUROC (histograms)"
    pieces = {"accuracy and f1_macro": (lambda: class_counts(probs, targets, CLASSES), "per-class counts",
                                        hand_s["accuracy"] + hand_s["f1_macro"]),
              "auroc": (lambda: metrics.auroc(probs, positive, len(targets)), auroc_kind, hand_s["auroc"])}
    for name, (run, kind, hand) in pieces.items():
        results.append(Measurement(f"metrics over the validation split ({rows}): {name}", best(run) * 1e3, "ms",
                                   note=f"{kind}; by hand (torchmetrics' functions, exact): {hand * 1e3:.2f} ms"))
    return results


@contextmanager
def _timing_callbacks(spent: dict[str, list[float]]):
    """The wall time of every hook of fitflow's default callbacks, by `Class.hook`."""
    from tasks import callbacks, checkpoints, tracking

    classes = (callbacks.Progress, callbacks.BestWeights, callbacks.EarlyStopping, checkpoints.Checkpoints,
               tracking.MlflowMetrics)
    hooks = ("on_fit_start", "on_epoch_start", "on_epoch_end", "on_fit_end")
    with ExitStack() as stack:
        for cls in classes:
            for hook in hooks:
                if hook in vars(cls):
                    stack.enter_context(_timing_methods(cls, (hook,), spent.setdefault(f"{cls.__name__}.{hook}", [])))
        yield


def tracking_overhead(n_train: int, n_val: int, rounds: int, epochs: int) -> list:
    """Runs with MLflow logging vs without, an A/A control of the same size, and MLflow's own
    time on the training thread.

    The A/A control times two identical untracked runners against each other: its median's
    distance from 1 is the noise floor of the ratio above it on this machine. The training-thread
    time adds up what the MLflow callback itself spends (journal, hand-over to the delivery
    thread, the wait for the last epoch's write at the end), per epoch, against the epoch time.
    """
    from tasks import tracking

    data = make_data(n_train, n_val)
    with_tracking = FitflowRunner(data, tracking=True, epochs=epochs)
    without = FitflowRunner(data, tracking=False, checkpoints_only=True, epochs=epochs)
    control = FitflowRunner(data, tracking=False, checkpoints_only=True, epochs=epochs)
    spent: list[float] = []
    with _timing_methods(tracking.MlflowMetrics, ("on_fit_start", "on_epoch_end", "on_fit_end"), spent):
        ratio = compare(f"epoch with MLflow logging vs without ({epochs}-epoch runs)",
                        ("no tracking", without.fit), ("MLflow logging", with_tracking.fit), rounds, target="<= 1.02",
                        note="both write the same checkpoints (epoch checkpoint, best at the end): "
                             "the ratio is MLflow's cost")
    per_epoch_s = sum(spent) / ((rounds + 1) * epochs)  # every tracked call, the warm-up included
    epoch_s = statistics.median(ratio.candidate_s) / epochs
    return [
        ratio,
        compare(f"A/A control: no tracking vs no tracking ({epochs}-epoch runs)", ("no tracking", without.fit),
                ("no tracking, 2nd runner", control.fit), rounds, target="1 (noise floor)",
                note="identical runs: how far a median of this many rounds strays from 1 here"),
        Measurement("MLflow callback time on the training thread / epoch time", per_epoch_s / epoch_s, "x",
                    target="<= 0.02", note=f"{per_epoch_s * 1e3:.1f} ms per epoch (journal write, hand-over, "
                                           f"final wait shared out) of a {epoch_s * 1e3:.0f} ms epoch"),
        model_logging_time(),
    ]



def system_metrics_overhead(n_train: int, n_val: int, rounds: int, epochs: int, stress_interval_s: float) -> list:
    """Tracked runs with the system metrics sampler running vs the same runs without it, at
    fitflow's interval and at a much shorter one, an A/A control, and the sampler's own time.

    Both sides log to MLflow (sqlite) the same way; the candidate wraps the run in
    `system_metrics.sampled`, as the flow does (start, samples, the last sample at the end, stop).
    The sampler's time adds up the CPU time of its sampling and logging calls in its own thread
    (time.thread_time: what it takes from the cores, and the most it can hold the GIL), per
    sample, against the interval between samples: the bound on its cost that machine load does
    not blur (on a loaded machine the ratios' spread is wider than 1%).
    """
    import os

    from tasks import system_metrics

    data = make_data(n_train, n_val)
    runner = FitflowRunner(data, tracking=True, epochs=epochs)
    control = FitflowRunner(data, tracking=True, epochs=epochs)

    def sampled_fit() -> None:
        with system_metrics.sampled(runner.run.client, runner.run.run_id):
            runner.fit()

    spent: list[float] = []
    with _timing_methods(system_metrics.SystemMetrics, ("_sample", "_log"), spent, clock=time.thread_time):
        at_default = compare(f"run with system metrics vs without ({epochs}-epoch runs, a sample every "
                             f"{system_metrics.SAMPLING_INTERVAL_S:g} s)", ("without", runner.fit),
                             ("system metrics", sampled_fit), rounds, target="<= 1.01",
                             note="both log epochs to MLflow (sqlite); the ratio is the sampler's cost")
        per_sample_s = sum(spent) / max(len(spent) / 2, 1)  # one _sample and one _log per sample
        os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = str(stress_interval_s)
        try:
            stressed = compare(f"run with system metrics vs without ({epochs}-epoch runs, a sample every "
                               f"{stress_interval_s:g} s)", ("without", runner.fit), ("system metrics", sampled_fit),
                               rounds, target="reported",
                               note=f"{system_metrics.SAMPLING_INTERVAL_S / stress_interval_s:.0f}x fitflow's rate")
        finally:
            del os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"]
    return [
        at_default,
        stressed,
        compare(f"A/A control: tracked run vs tracked run ({epochs}-epoch runs)", ("tracked", runner.fit),
                ("tracked, 2nd runner", control.fit), rounds, target="1 (noise floor)"),
        Measurement("system metrics sampler time per sample / sampling interval",
                    per_sample_s / system_metrics.SAMPLING_INTERVAL_S, "x", target="<= 0.01",
                    note=f"{per_sample_s * 1e3:.1f} ms CPU per sample (collect + one log_batch, in its own thread) "
                         f"every {system_metrics.SAMPLING_INTERVAL_S:g} s"),
    ]


@contextmanager
def _timing_methods(cls: type, names: tuple[str, ...], spent: list[float], clock=time.perf_counter):
    """Adds the time of every call of `cls.<name>` to `spent` (restored on exit): wall time, or
    with `clock=time.thread_time` the CPU time of the calling thread."""
    originals = {name: getattr(cls, name) for name in names}

    def timing(method):
        def timed_method(self, *args, **kwargs):
            start = clock()
            try:
                return method(self, *args, **kwargs)
            finally:
                spent.append(clock() - start)
        return timed_method

    for name, method in originals.items():
        setattr(cls, name, timing(method))
    try:
        yield
    finally:
        for name, method in originals.items():
            setattr(cls, name, method)


def model_logging_time() -> Measurement:
    """Wall time of logging the shipped MLP as the MLflow model: the pyfunc (explicit pip requirements) and
    the pytorch flavor (torch.export; its start-up makes the first of the three slower)."""
    from mlflow.tracking import MlflowClient

    from tasks.config import TrainConfig
    from tasks.data import load_table, prepare
    from tasks.tracking import experiment_id, log_pyfunc_model, prepare_store
    from tasks.trainer import build_loaders, prep_spec, train_model

    config = TrainConfig(epochs=1)
    table = load_table(config.data)
    prepared = prepare(table, prep_spec(config))
    trained = train_model(config, prepared, build_loaders(config, prepared))
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        prepare_store(uri)
        import mlflow

        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        exp = experiment_id(client, "bench", Path(tmp, "artifacts").as_uri())
        example = table.drop(columns=[config.target]).head(5)
        times = []
        for _ in range(3):
            run_id = client.create_run(exp).info.run_id
            start = time.perf_counter()
            log_pyfunc_model(client, run_id, trained.model, trained.spec, prepared.preprocessor, example)
            times.append(time.perf_counter() - start)
    return Measurement("model logging (shipped MLP, pyfunc + pytorch flavor)", float(np.median(times)), "s", target="<= 0.5",
                       note=f"median of 3: {', '.join(f'{t:.2f}' for t in times)} s")


def thread_setting(n_train: int, rounds: int, default_threads: int) -> Comparison:
    """The best hand loop with torch's default threads (one per core) vs fitflow's default of 1."""
    data = make_data(n_train, 1000)
    generator = torch.Generator().manual_seed(0)

    def loop(threads: int):
        def run() -> None:
            torch.set_num_threads(threads)
            model = make_model()
            best_epoch(model, torch.optim.Adam(model.parameters(), lr=1e-3), data, generator)
        return run

    result = compare(f"threads: 1 vs torch default ({default_threads})", (f"{default_threads} threads", loop(default_threads)),
                     ("1 thread (fitflow default)", loop(1)), rounds, target="<= 1.0")
    torch.set_num_threads(1)
    return result


def lightning_ratio(n_train: int, n_val: int, epochs: int, rounds: int) -> list:
    """Lightning's Trainer.fit on the same model and data (fast loader, no per-step self.log)."""
    try:
        import lightning as L
    except ImportError:
        return [Measurement("Lightning Trainer.fit vs fitflow", float("nan"), "x",
                            note="lightning not installed: pip install -e '.\\[bench]'")]
    import torch.nn.functional as F

    from tasks.loaders import BatchIndices, GatherDataset

    def gather_loader(x: torch.Tensor, y: torch.Tensor, batch: int, shuffle: bool = False) -> DataLoader:
        """fitflow's batch gathers (one index_select per batch) in a DataLoader, whose attributes
        Lightning inspects (fitflow's own in-process BatchLoader lacks `batch_sampler`)."""
        batches = BatchIndices(len(y), batch, shuffle, drop_last=False, seed=0)
        return DataLoader(GatherDataset(x, y), sampler=batches, batch_size=None)

    data = make_data(n_train, n_val)
    fitflow = FitflowRunner(data, tracking=True, epochs=epochs)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model()

        def training_step(self, batch, _):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def validation_step(self, batch, _):
            x, y = batch
            out = self.net(x)
            self.log_dict({"val_loss": F.cross_entropy(out, y), "val_acc": (out.argmax(1) == y).float().mean()},
                          on_epoch=True)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    cpu: dict[str, list[float]] = {"fitflow": [], "Lightning": []}

    def lightning_fit() -> None:
        cpu_start = time.process_time()
        trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
        trainer.fit(Module(), gather_loader(data.x, data.y, BATCH, shuffle=True),
                    gather_loader(data.x_val, data.y_val, 1024))
        cpu["Lightning"].append(time.process_time() - cpu_start)

    def fitflow_fit() -> None:
        cpu_start = time.process_time()
        fitflow.fit()
        cpu["fitflow"].append(time.process_time() - cpu_start)

    name = f"Lightning Trainer.fit vs fitflow ({epochs} epochs)"
    wall = compare(name, ("fitflow", fitflow_fit), ("Lightning", lightning_fit), rounds, target=">= 1.5",
                   note="Lightning with fitflow's fast loader and epoch-level logging (its best case)")
    used = _paired(f"{name}, CPU time", "fitflow", cpu, candidate="Lightning",
                   note="the same runs' CPU seconds, every thread of the process: the work done, without the waits")
    return [wall, used]


def scaling(rounds: int, sizes: tuple[int, int]) -> Comparison:
    small, large = (FitflowRunner(make_data(n, n // 5), tracking=True) for n in sizes)
    return compare(f"epoch time {sizes[1] // 1000}k vs {sizes[0] // 1000}k rows", (f"{sizes[0] // 1000}k", small.fit),
                   (f"{sizes[1] // 1000}k", large.fit), rounds, target=f"~{sizes[1] / sizes[0]:.0f} (linear)")

