"""python -m benchmarks [--smoke] [--only NAME ...]: run, print a table, write JSON."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
TORCH_DEFAULT_THREADS = torch.get_num_threads()  # before fitflow's setting of 1 below

# (name, full-size call, smoke-size call): smoke runs every code path on tiny data for CI.
SUITE = {
    "loaders": (lambda t, p: [r for n, b in ((100_000, 256), (100_000, 4096), (1_000_000, 256), (1_000_000, 4096))
                              for r in t.loader_throughput(n, b, rounds=3, max_batches=100)],
                lambda t, p: t.loader_throughput(10_000, 256, rounds=1, max_batches=10)),
    "epoch": (lambda t, p: t.epoch_time(100_000, 20_000, rounds=5, epochs=3),
              lambda t, p: t.epoch_time(5_000, 1_000, rounds=1, epochs=2)),
    "tracking": (lambda t, p: t.tracking_overhead(100_000, 20_000, rounds=10, epochs=3),
                 lambda t, p: t.tracking_overhead(5_000, 1_000, rounds=1, epochs=2)),
    # issue #15: the system metrics sampler's cost on a tracked run (tasks/system_metrics.py)
    "system-metrics": (lambda t, p: t.system_metrics_overhead(100_000, 20_000, rounds=6, epochs=20, stress_interval_s=0.25),
                       lambda t, p: t.system_metrics_overhead(5_000, 1_000, rounds=1, epochs=2, stress_interval_s=0.05)),
    "threads": (lambda t, p: [t.thread_setting(100_000, rounds=2, default_threads=TORCH_DEFAULT_THREADS)],
                lambda t, p: [t.thread_setting(5_000, rounds=1, default_threads=TORCH_DEFAULT_THREADS)]),
    "lightning": (lambda t, p: t.lightning_ratio(100_000, 20_000, epochs=2, rounds=5),
                  lambda t, p: t.lightning_ratio(5_000, 1_000, epochs=1, rounds=1)),
    # issues #15, #17: warm `fitflow train` on the small table against a script of torch + pandas + MLflow only
    # (pipeline.BARE_SCRIPT), without `fitflow up` (and peak memory on 1M rows) and with it
    "end-to-end": (lambda t, p: p.end_to_end(rounds=3, epochs=30), None),
    # issue #17: peak RSS of `fitflow train` and of the same script on the 1M-row table of `prepare`
    "memory": (lambda t, p: p.memory_on_a_large_table(1_000_000, batch_size=1024), None),
    "imports": (lambda t, p: p.import_costs(rounds=3), lambda t, p: p.import_costs(rounds=1)),
    "stack": (lambda t, p: p.end_to_end_with_the_stack(rounds=3, epochs=30), None),
    "prepare": (lambda t, p: p.prepare_cost(1_000_000), lambda t, p: p.prepare_cost(20_000)),
    "scaling": (lambda t, p: [t.scaling(rounds=3, sizes=(100_000, 1_000_000)),
                              p.prepare_scaling(rounds=1, sizes=(100_000, 1_000_000))],
                lambda t, p: [t.scaling(rounds=1, sizes=(2_000, 4_000)), p.prepare_scaling(rounds=1, sizes=(2_000, 4_000))]),
    # issue #14: batch hooks with nothing registered, per-step logging (benchmarks/hooks.py)
    "hooks": (lambda t, p: importlib.import_module("benchmarks.hooks").hook_overhead(100_000, 20_000, rounds=10, epochs=3),
              lambda t, p: importlib.import_module("benchmarks.hooks").hook_overhead(5_000, 1_000, rounds=1, epochs=2)),
    "step-logging": (lambda t, p: importlib.import_module("benchmarks.hooks").step_logging_overhead(
                         100_000, 20_000, rounds=10, epochs=3),
                     lambda t, p: importlib.import_module("benchmarks.hooks").step_logging_overhead(
                         5_000, 1_000, rounds=1, epochs=2)),
    # issue #13: image loaders vs ImageFolder + DataLoader, the CNN epoch vs a hand loop (benchmarks/images.py)
    "images": (lambda t, p: importlib.import_module("benchmarks.images").suite(),
               lambda t, p: importlib.import_module("benchmarks.images").suite(smoke=True)),
    # issue #14: the Python API's fit epoch vs the flow engine's (benchmarks/api.py)
    "api": (lambda t, p: importlib.import_module("benchmarks.api").suite(),
            lambda t, p: importlib.import_module("benchmarks.api").suite(smoke=True)),
    # issue #18: the linear baseline's time over a default run's (benchmarks/quality.py; its report: docs/quality.md)
    "baseline": (lambda t, p: importlib.import_module("benchmarks.quality").baseline_cost(rounds=5),
                 lambda t, p: importlib.import_module("benchmarks.quality").baseline_cost(rounds=1, smoke=True)),
}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round: checks that every benchmark runs")
    parser.add_argument("--only", nargs="+", choices=list(SUITE), help="run only these")
    args = parser.parse_args()
    logging.getLogger("fitflow").setLevel(logging.WARNING)  # no per-epoch lines in the table's way
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from benchmarks import pipeline, training

    torch.set_num_threads(1)  # fitflow's default; the threads benchmark measures the alternative
    results, started = [], time.perf_counter()
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"benchmarks-{'smoke-' if args.smoke else ''}{time.strftime('%Y%m%d-%H%M%S')}.json"
    for name in args.only or SUITE:
        full, smoke = SUITE[name]
        run = smoke if args.smoke else full
        if run is None:
            print(f"skipping {name}: it has no {'smoke' if args.smoke else 'full'} mode", flush=True)
            continue
        print(f"running {name} ...", flush=True)
        results += run(training, pipeline)
        out.write_text(json.dumps(_report(args, results, started), indent=1))  # a later failure keeps these
    report = _report(args, results, started)
    out.write_text(json.dumps(report, indent=1))
    print_table(report)
    print(f"wrote {out}")
    return 0


def _report(args: argparse.Namespace, results: list, started: float) -> dict:
    return {
        "command": "python -m benchmarks" + (" --smoke" if args.smoke else ""),
        "machine": f"{platform.node()}: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
                   f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)",
        "seconds": round(time.perf_counter() - started, 1),
        "results": [r.to_dict() for r in results],
    }


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report['command']}  ({report['machine']}; {report['seconds']} s)")
    for column in ("benchmark", "baseline -> candidate", "median", "min-max", "target", "note"):
        table.add_column(column)
    for r in report["results"]:
        if "ratios" in r:
            table.add_row(r["name"], f"{r['baseline']} -> {r['candidate']}", f"{r['median']:.3f}x",
                          f"{r['min']:.3f}-{r['max']:.3f}", r["target"], r["note"])
        else:
            table.add_row(r["name"], "", f"{r['value']:.3g} {r['unit']}", "", r["target"], r["note"])
    Console(width=200).print(table)


if __name__ == "__main__":
    raise SystemExit(main())
