"""What the loop's hooks and per-step logging cost (issue #14): ratios of 3-epoch `train_model` runs.

- Batch hooks with nothing registered: `fit` as it is against `fit` with its per-batch hook
  statement (`for callback in per_batch: callback.on_train_batch_end(...)`) deleted from its
  source (the AST, compiled in the module's own namespace): the only difference is that line.
  Beside it the same statement alone, timed per batch, as a share of the epoch; one registered
  no-op batch callback against none; and the A/A control, the same run twice.
- Per-step logging: `log_every_n_steps` 1 (every optimizer step to MLflow, through the journal
  and its delivery thread) against 0, both tracked to a real sqlite store.
"""

from __future__ import annotations

import ast
import inspect
import statistics
import textwrap
import time
import timeit
from collections.abc import Iterator
from contextlib import contextmanager

from benchmarks.harness import Measurement, compare
from benchmarks.workload import FitflowRunner, epoch_clock, make_data


def fit_without_batch_hooks():
    """tasks.training.fit with its per-batch hook statement removed, everything else as written."""
    from tasks import training

    tree = ast.parse(textwrap.dedent(inspect.getsource(training.fit)))
    removed = 0
    for node in ast.walk(tree):
        for name in ("body", "orelse"):
            statements = getattr(node, name, None)
            if not isinstance(statements, list):
                continue
            kept = [s for s in statements if not (isinstance(s, ast.For) and ast.unparse(s.iter) == "per_batch")]
            removed += len(statements) - len(kept)
            setattr(node, name, kept)
    assert removed == 1, f"expected one per-batch hook statement in fit, found {removed}"
    namespace = dict(vars(training))
    exec(compile(tree, inspect.getsourcefile(training.fit), "exec"), namespace)  # noqa: S102 - fitflow's own source
    return namespace["fit"]


@contextmanager
def _fit_replaced(fit) -> Iterator[None]:
    """train_model calls this `fit` while inside (tasks.trainer imported fit by name)."""
    from tasks import trainer

    original = trainer.fit
    trainer.fit = fit
    try:
        yield
    finally:
        trainer.fit = original


def hook_overhead(n_train: int, n_val: int, rounds: int, epochs: int) -> list:
    from tasks.callbacks import Callback

    class NoOp(Callback):
        def on_train_batch_end(self, state, batch, loss) -> None:
            pass

    data = make_data(n_train, n_val)
    runner = FitflowRunner(data, tracking=True, epochs=epochs)
    control = FitflowRunner(data, tracking=True, epochs=epochs)
    with_noop = FitflowRunner(data, tracking=True, epochs=epochs)
    stripped = fit_without_batch_hooks()

    def without_hooks() -> None:
        with _fit_replaced(stripped):
            runner.fit()

    size = f"{n_train // 1000}k + {n_val // 1000}k, {epochs}-epoch runs"
    nothing = compare(f"batch hooks, nothing registered: fit without the hook line -> fit ({size})",
                      ("fit without the per-batch hook line", without_hooks), ("fit", runner.fit), rounds,
                      target="<= 1.01", note="the same tracked train_model; only fit's per-batch hook statement differs")
    batches = len(runner.loaders.train) * epochs
    per_batch_s = _empty_hook_statement_s()
    run_s = statistics.median(nothing.candidate_s)
    return [
        nothing,
        Measurement("batch hooks, nothing registered: the hook statement's time / run time", per_batch_s * batches / run_s,
                    "x", target="<= 0.01", note=f"{per_batch_s * 1e9:.0f} ns per batch x {batches} batches of a "
                                               f"{run_s:.2f} s run"),
        compare(f"A/A control: fit -> fit ({size})", ("fit", runner.fit), ("fit, 2nd runner", control.fit), rounds,
                target="1 (noise floor)", note="identical runs: how far a median of this many rounds strays from 1"),
        compare(f"one registered no-op batch callback ({size})", ("no batch callback", runner.fit),
                ("a no-op on_train_batch_end", lambda: with_noop.fit([NoOp()])), rounds, target="reported",
                note="what a registered batch hook costs: one Python call per batch"),
    ]


def _empty_hook_statement_s() -> float:
    """Seconds per execution of fit's hook statement over an empty list (best of 5 x 1M)."""
    setup = "import torch; per_batch = []; state = batch = None; loss = torch.zeros(())"
    statement = "for callback in per_batch:\n    callback.on_train_batch_end(state, batch, loss.detach())"
    return min(timeit.repeat(statement, setup, number=1_000_000, repeat=5)) / 1_000_000


def step_logging_overhead(n_train: int, n_val: int, rounds: int, epochs: int) -> list:
    """Per epoch, then where the cost lies on the training thread: MlflowStepLoss's own hooks (the
    per-batch call, the syncs and journal writes of its flushes), and, once per run, the end-of-run
    wait for delivery (MlflowMetrics.on_fit_end), with and without the per-step values in it; and
    beside it the metrics delivery thread's CPU (its sends), which holds the GIL for its Python.

    The per-epoch ratio times each epoch from its start to the end of its last callback (the
    epoch-end flush and journal write included), leaving out what a run does once: its start and
    the end-of-run wait, reported beside it. The whole-run ratio is there too."""
    from benchmarks.training import _reported, _timing_methods
    from tasks import metrics_journal, tracking
    data = make_data(n_train, n_val)
    off = FitflowRunner(data, tracking=True, epochs=epochs)
    every_step = FitflowRunner(data, tracking=True, epochs=epochs, log_every_n_steps=1)
    steps = len(off.loaders.train) * epochs
    hooks = ("on_fit_start", "on_epoch_start", "on_train_batch_end", "on_epoch_end", "on_fit_end")
    own: list[float] = []
    waits: dict[str, list[float]] = {"off": [], "on": []}
    delivery_cpu: dict[str, list[float]] = {"off": [], "on": []}

    def timed_run(runner, key):
        def run() -> float:
            spent: list[float] = []
            sends: list[float] = []
            clock = epoch_clock()
            with (_timing_methods(tracking.MlflowMetrics, ("on_fit_end",), spent),
                  _timing_methods(metrics_journal.Delivery, ("_send_batch",), sends, clock=time.thread_time)):
                runner.fit([clock])
            waits[key].append(spent[0])
            delivery_cpu[key].append(sum(sends))
            return sum(clock.epochs)
        return run

    size = f"{n_train // 1000}k + {n_val // 1000}k, {epochs}-epoch runs"
    note = f"{steps} train_loss_step values per run to a sqlite MLflow store, off the training thread"
    with _timing_methods(tracking.MlflowStepLoss, hooks, own):
        per_epoch = compare(f"per-step logging, per epoch: log_every_n_steps 0 -> 1 ({size})",
                            ("log_every_n_steps 0", timed_run(off, "off")), ("log_every_n_steps 1", timed_run(every_step, "on")),
                            rounds, target="<= 1.03", measure=_reported,
                            note=f"the epochs' time (start to the end of their callbacks), not the run's start and "
                                 f"end-of-run wait; {note}")
        whole = compare(f"per-step logging, whole runs: log_every_n_steps 0 -> 1 ({size})",
                        ("log_every_n_steps 0", timed_run(off, "off")), ("log_every_n_steps 1", timed_run(every_step, "on")),
                        rounds, target="reported", note=f"the end-of-run wait and the run's start included; {note}")
    run_s = statistics.median(whole.candidate_s)
    epochs_s = statistics.median(per_epoch.candidate_s)
    own_s = sum(own) / (2 * (rounds + 1))  # every logged run of both comparisons, the warm-ups included
    wait_s = statistics.median(waits["on"]) - statistics.median(waits["off"])
    return [
        per_epoch,
        whole,
        Measurement("per-step logging: MlflowStepLoss's time on the training thread / the epochs' time", own_s / epochs_s,
                    "x", target="<= 0.03", note=f"{own_s * 1e3:.1f} ms per run of {epochs} epochs taking {epochs_s:.2f} s "
                                                f"({own_s / steps * 1e6:.1f} us per step: the call, the flushes' sync and "
                                                "journal writes)"),
        Measurement("per-step logging: the metrics delivery thread's CPU per run / the epochs' time",
                    statistics.median(delivery_cpu["on"]) / epochs_s, "x", target="reported",
                    note=f"median {statistics.median(delivery_cpu['on']) * 1e3:.1f} ms of CPU per run with the per-step "
                         f"values, {statistics.median(delivery_cpu['off']) * 1e3:.1f} ms without them (its sends: "
                         "journal read, fsync, insert, cursor; beside training, holding the GIL for its Python; the "
                         "last send is in the end-of-run wait)"),
        Measurement("per-step logging: end-of-run wait for delivery, once per run / run time",
                    statistics.median(waits["on"]) / run_s, "x", target="reported",
                    note=f"median wait {statistics.median(waits['on']) * 1e3:.0f} ms with the last epoch's values, "
                         f"{statistics.median(waits['off']) * 1e3:.0f} ms without them ({wait_s * 1e3:+.0f} ms)"),
    ]
