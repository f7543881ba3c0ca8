"""The commands of `fitflow` that compare runs: sweep, runs (flows/cli.py adds them).

Like the rest of the CLI, heavy libraries load only once a command runs; user errors raise
FitflowError, which flows/cli.py turns into one line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os

from tasks.config import load_config


def add_commands(commands) -> None:
    sweep = commands.add_parser(
        "sweep",
        help="hyperparameter sweep: trials as child MLflow runs of one parent (the Prefect flow `sweep`)",
        description="Train many variants of a base config (grid, random or Optuna TPE), up to --parallelism at once, "
        "each as a child MLflow run of one parent run that gets the ranking, a plot and the best trial. "
        "The YAML file holds base:, space:, n_trials:, sampler:, parallelism:, prune: (see the README).",
    )
    sweep.add_argument("--config", metavar="FILE.yaml", help="YAML file of the sweep (base config and search space)")
    sweep.add_argument("--n-trials", type=int, metavar="N", help="budget: number of trials (overrides the file)")
    sweep.add_argument("--parallelism", type=int, metavar="N", help="trials trained at once (overrides the file)")
    sweep.add_argument("--sampler", choices=["tpe", "random", "grid"], help="search strategy (overrides the file)")
    sweep.add_argument("--task-runner", choices=["threads", "dask", "ray"],
                       help="where trials run: threads (default), Dask or Ray worker processes (overrides the file)")
    sweep.add_argument("--cluster-address", metavar="ADDRESS",
                       help="an existing Dask scheduler (tcp://host:8786) or Ray cluster (overrides the file)")
    sweep.add_argument("--experiment", metavar="NAME", help="MLflow experiment (overrides base.experiment)")
    sweep.set_defaults(handler=_sweep)

    runs = commands.add_parser(
        "runs",
        help="rank an experiment's runs by a metric (MLflow's search API)",
        description="Print the top runs of an MLflow experiment: run id, name, status, parent (sweeps), the params "
        "that differ between them and their final metrics, sorted by --sort (losses ascending, scores descending).",
    )
    runs.add_argument("--experiment", required=True, metavar="NAME", help="MLflow experiment name")
    runs.add_argument("--sort", default="val_loss", metavar="METRIC",
                      help="metric to rank by, e.g. val_accuracy, best_val_accuracy, test_r2 (default: val_loss)")
    runs.add_argument("--top", type=int, default=20, metavar="N", help="how many runs (default: 20)")
    runs.add_argument("--sweep", metavar="RUN_ID", help="only the trials of this sweep (its parent run id)")
    runs.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    runs.set_defaults(handler=_runs)


def _environment() -> None:
    from flows.environment import configure_environment
    from flows.log_filter import quiet_user_error_tracebacks

    configure_environment()  # before prefect is imported: it reads its settings at import
    quiet_user_error_tracebacks()


def _sweep(args: argparse.Namespace) -> int:
    # sweep code only for a sweep
    from flows.sweep_config import check_prefect_for_cluster, check_task_runner, load_sweep_config

    overrides = {"n_trials": args.n_trials, "parallelism": args.parallelism, "sampler": args.sampler,
                 "task_runner": args.task_runner, "cluster_address": args.cluster_address}
    config = load_sweep_config(args.config, **overrides)
    if args.experiment:
        base = load_config(None, **{**config.base.model_dump(), "experiment": args.experiment})
        config = config.model_copy(update={"base": base})
    check_task_runner(config)  # a missing extra fails here, before Prefect and the data load
    _environment()
    # workers elsewhere need a server they can reach, not the embedded one on loopback
    check_prefect_for_cluster(config, os.environ.get("PREFECT_API_URL"))
    from flows.early_work import work_before_a_run  # a trial does what a training run does
    from flows.embedded_server import prefect_server_starting

    with prefect_server_starting(meanwhile=work_before_a_run()) as on_server:
        from flows.sweep import sweep  # torch, MLflow, pandas, Optuna: imported while the server starts

        result = on_server(sweep, config)
    print(f"sweep run: {result.parent_run_id}  ({result.mlflow_url})")
    for row in result.trials:
        # lists arrive as JSON text (table rows); other values print as JSON
        params = "  ".join(f"{n}={row[n] if isinstance(row[n], str) else json.dumps(row[n])}" for n in config.space)
        score = row.get(f"best_{config.base.monitor}")
        print(f"  #{row['rank']:<3} trial {row['trial']:<3} {row['state']:<8} "
              f"{config.base.monitor}={'-' if score is None else f'{score:.4f}'}  {params}")
    print(f"best: {result.best_run_id}  model: {result.best_model_uri}")
    if result.registered:
        print(f"registered: {result.registered}")
    return 0


def _runs(args: argparse.Namespace) -> int:
    from flows.environment import tracking_uri
    from flows.runs import as_json, print_table, ranked_runs

    _environment()
    rows = ranked_runs(tracking_uri(), args.experiment, args.sort, args.top, args.sweep)
    if args.json:
        print(as_json(rows))
    else:
        print_table(rows, args.sort, args.experiment)
    return 0
