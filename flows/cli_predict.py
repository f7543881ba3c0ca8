"""`fitflow predict`: score a table with a model (flows/cli.py adds the command).

Like the rest of the CLI, heavy libraries load only once the command runs; user errors raise
FitflowError, which flows/cli.py turns into one line and exit code 2.
"""

from __future__ import annotations

import argparse


def add_command(commands) -> None:
    predict = commands.add_parser(
        "predict",
        help="score a table or a folder of images with a model (the Prefect flow `predict`)",
        description="Load a model by models:/<name>@<alias>, models:/<name>/<version>, models:/m-<id>, runs:/<id>/model "
        "or a run id; write its predictions (class probabilities for classifiers) and a summary; log a prediction run.",
    )
    predict.add_argument("--model", required=True, metavar="URI", help="e.g. models:/churn@champion")
    predict.add_argument("--data", required=True, metavar="PATH",
                         help="CSV or Parquet of raw rows; for an image model a folder of images or a manifest")
    predict.add_argument("--out", required=True, metavar="FILE", help="predictions file, .csv or .parquet")
    predict.add_argument("--unseen", choices=["encode", "error"], default="encode",
                         help="categories never seen in training: encode like rare values and count them (default), or fail")
    predict.add_argument("--experiment", metavar="NAME", default="fitflow-predictions", help="MLflow experiment of the prediction run")
    predict.add_argument("--drift-threshold", type=float, default=0.2, metavar="PSI",
                         help="population stability index above which a column counts as drifted from the training "
                         "data and fitflow.drift.detected is emitted (default: 0.2)")
    predict.add_argument("--trust-model-code", action="store_true",
                         help="let a model whose network is custom code (pkg.mod:Class) import and run that code here; "
                         "only for models logged by people you trust (fitflow's own networks never need it)")
    predict.set_defaults(handler=_predict)


def _predict(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from flows.environment import configure_environment
    from flows.log_filter import quiet_user_error_tracebacks
    from tasks.errors import ConfigError

    configure_environment()  # before prefect is imported: it reads its settings at import
    quiet_user_error_tracebacks()
    from flows.predict import PredictConfig, output_path, predict, resolve_model
    from tasks.data import resolve_source

    try:
        config = PredictConfig(model=args.model, data=args.data, out=args.out, unseen=args.unseen, experiment=args.experiment,
                               drift_threshold=args.drift_threshold, trust_model_code=args.trust_model_code)
    except ValidationError as err:
        first = err.errors()[0]
        raise ConfigError(f"--{first['loc'][0]}: {first['msg']}") from None
    # The same checks the flow makes first, before Prefect starts: a typo fails in a second.
    output_path(config.out, config.data)
    resolve_source(config.data)
    resolve_model(config.model)
    from flows.embedded_server import prefect_server_starting

    with prefect_server_starting() as on_server:  # its own server, started once the checks pass
        result = on_server(predict, config)
    print(f"predictions: {result.out}  summary: {result.summary_path}")
    print(f"model: {result.model_uri}  MLflow run: {result.run_id}")
    drift = result.summary.get("drift")
    if drift and drift["drifted"]:
        print(f"drift: {', '.join(drift['drifted'])} (PSI above {drift['threshold']:g}; max {drift['max_psi']:.3f})")
    return 0
