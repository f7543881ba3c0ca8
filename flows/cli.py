"""`fitflow` on the command line. Flags are generated from TrainConfig, so every field is one.

Heavy libraries (torch, prefect, mlflow) are imported only once a command runs, so that
`fitflow --help` answers at once. User errors print one line and exit 2; no traceback.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
import typing
from typing import Any, NoReturn

from pydantic.fields import FieldInfo

from flows.cli_compare import add_commands as add_compare_commands
from flows.cli_predict import add_command as add_predict_command
from tasks.config import Launch, TrainConfig, check_run_id, load_config
from tasks.errors import ConfigError, FitflowError, TrackingError

EXIT_USAGE = 2
PRELOADED_COMMANDS = ("train", "resume", "sweep", "predict")  # with `fitflow up`, they start in its preloaded process


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of argparse's usage dump
        message = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)  # arguments may hold \r, \n
        self.exit(EXIT_USAGE, f"fitflow: error: {message} (see {self.prog} --help)\n")


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"width\": 64}}', got {text!r}")
    return value


def _list_items(item_type: type) -> type[argparse.Action]:
    """A list field's flag: items separated by spaces or commas, and the flag may be repeated
    (`--metrics a:F,b:G --metrics c:H`); `--callbacks ''` gives an empty list (over a YAML file's)."""

    class ListItems(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None) -> None:
            items = [item.strip() for value in values for item in value.split(",") if item.strip()]
            try:
                converted = [item_type(item) for item in items]
            except ValueError:
                parser.error(f"argument {option_string}: expected {item_type.__name__} values, got {' '.join(values)!r}")
            setattr(namespace, self.dest, getattr(namespace, self.dest, []) + converted)  # repeated: added up

    return ListItems


def _add_config_flags(parser: argparse.ArgumentParser, fields: dict[str, FieldInfo]) -> None:
    for name, field in fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description} (default: {json.dumps(field.default)})".replace("%", "%%")  # argparse formats help with %
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        annotation = field.annotation
        origin = typing.get_origin(annotation)
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is typing.Literal:
            kwargs["choices"] = typing.get_args(annotation)
        elif origin is list:
            item_type = typing.get_args(annotation)[0]
            kwargs.update(nargs="+", action=_list_items(item_type), metavar="N" if item_type is int else "ITEM")
        elif origin is dict:
            kwargs.update(type=_json_object, metavar="JSON")
        else:
            kwargs["metavar"] = name.upper() if name not in ("data", "validation_data") else "PATH"
        parser.add_argument(flag, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fitflow", description="Train PyTorch models as Prefect flows, tracked in MLflow.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = commands.add_parser(
        "train",
        help="train a model on a table, an image folder or your Datasets (the Prefect flow `train`)",
        description="Train on a table, images or your Datasets and log params, per-epoch metrics, the dataset and the model to MLflow. "
        "Every config field is a flag; --config FILE.yaml sets fields by name and flags override it.",
    )
    train.add_argument("--config", metavar="FILE.yaml", help="YAML file of config fields (flags override it)")
    _add_config_flags(train, TrainConfig.flat_fields())
    train.set_defaults(handler=_train)

    resume = commands.add_parser(
        "resume",
        help="continue a training run that crashed or was killed, from its last epoch checkpoint",
        description="Continue the MLflow run RUN_ID (same run, same hyperparameters: its config.json) from its "
        "newest epoch checkpoint. Only launch settings may be given: the run may continue on another machine.",
    )
    resume.add_argument("run_id", metavar="RUN_ID", help="the MLflow run id (`fitflow runs` lists them)")
    _add_config_flags(resume, Launch.model_fields)
    resume.set_defaults(handler=_resume)
    add_compare_commands(commands)  # sweep, runs
    add_predict_command(commands)

    serve = commands.add_parser(
        "serve",
        help="serve the deployments of prefect.yaml, schedules included, from this process",
        description="Serve every deployment of prefect.yaml with its schedules (Prefect's serve): the quick path "
        "for one machine without a work pool. Needs a Prefect server (PREFECT_API_URL).",
    )
    serve.add_argument("--limit", type=int, default=1, metavar="N", help="flow runs at once (default: 1, one per GPU)")
    serve.set_defaults(handler=_serve)

    setup = commands.add_parser(
        "setup",
        help="create the gpu-pool work pool, the GPU concurrency limits and (with a target) the alerts",
        description="Create or update the work pool 'gpu-pool' (process type) and the 'gpu' tag concurrency "
        "limit of the training task, both to N concurrent training runs; with --notify-url or --notify-block, "
        "the alert automations (a failed train/sweep/predict run, a new champion, drift). Needs PREFECT_API_URL "
        "(or `fitflow up`). Safe to run again.",
    )
    setup.add_argument("--gpus", type=int, default=1, metavar="N", help="concurrent training runs (default: 1)")
    target = setup.add_mutually_exclusive_group()
    target.add_argument("--notify-url", metavar="URL", default=os.environ.get("FITFLOW_NOTIFY_URL") or None,
                        help="alerts (failed runs, a new champion, drift) as JSON POSTs to this webhook (a notification "
                        "block 'fitflow-alerts' is saved; default: FITFLOW_NOTIFY_URL); runs again update them")
    target.add_argument("--notify-block", metavar="TYPE/NAME", help="alerts through a notification block you created "
                        "(e.g. slack-webhook/team-alerts, email-server-credentials/ops)")
    setup.set_defaults(handler=_setup)

    up = commands.add_parser(
        "up",
        help="start the local stack: Prefect server + UI, MLflow server + UI, and the deployments served",
        description="Start a Prefect server with its UI, an MLflow server with its UI (store and artifacts under "
        "FITFLOW_HOME) and `fitflow serve` (prefect.yaml's deployments, schedules and triggers), all on 127.0.0.1; "
        "print both URLs and wait. fitflow commands of the same FITFLOW_HOME use these servers while it runs. "
        "Ctrl-C or `fitflow down` stops everything it started.",
    )
    up.add_argument("--prefect-port", type=int, default=4200, metavar="PORT", help="Prefect server and UI (default: 4200)")
    up.add_argument("--mlflow-port", type=int, default=5000, metavar="PORT", help="MLflow server and UI (default: 5000)")
    up.add_argument("--limit", type=int, default=1, metavar="N", help="flow runs served at once (default: 1, one per GPU)")
    up.set_defaults(handler=_up)
    down = commands.add_parser("down", help="stop the local stack that `fitflow up` started",
                               description="Stop the Prefect server, the MLflow server and serve that `fitflow up` "
                               "started for this FITFLOW_HOME, and every process they started.")
    down.set_defaults(handler=_down)

    doctor = commands.add_parser(
        "doctor",
        help="close MLflow runs left RUNNING by a Prefect flow run that is over (a killed process)",
        description="Find MLflow runs still RUNNING whose Prefect flow run (tag prefect.flow_run_id) has ended, "
        "and end them FAILED (crashed, failed) or KILLED (cancelled), the reason in the tag fitflow.closed_by.",
    )
    doctor.add_argument("--dry-run", action="store_true", help="report what would be closed, change nothing")
    doctor.set_defaults(handler=_doctor)

    upload = commands.add_parser(
        "upload-metrics",
        help="send a run's per-epoch metrics kept locally while the tracking server was unreachable",
        description="Deliver the epochs of the run's metrics journal "
        "(<FITFLOW_HOME>/checkpoints/<run id>/metrics.jsonl) that never reached MLflow, skipping values "
        "the server already has, and end the run with the status kept locally when it ended during the outage. "
        "Goes to MLFLOW_TRACKING_URI if set, else to the run's own server.",
    )
    upload.add_argument("run_id", metavar="RUN_ID", help="the MLflow run id (printed in the warning)")
    upload.set_defaults(handler=_upload_metrics)
    return parser


def _train(args: argparse.Namespace) -> int:
    overrides = {name: getattr(args, name) for name in TrainConfig.flat_fields() if hasattr(args, name)}
    config = load_config(args.config, **overrides)
    from tasks.kinds import detect_kind

    detect_kind(config.data, config.data_kind)  # missing data fails in a second, before Prefect starts
    return _run_train_flow(config)


def _resume(args: argparse.Namespace) -> int:
    check_run_id(args.run_id)
    launch = {name: getattr(args, name) for name in Launch.model_fields if hasattr(args, name)}
    return _run_train_flow(load_config(None, **launch), resume=args.run_id)


def _run_train_flow(config: TrainConfig, resume: str | None = None) -> int:
    from flows.environment import configure_environment
    from flows.log_filter import quiet_user_error_tracebacks

    configure_environment()  # before prefect is imported: it reads its settings at import
    from flows.early_work import work_before_a_run
    from flows.embedded_server import prefect_server_starting

    with prefect_server_starting(meanwhile=work_before_a_run()) as on_server:
        from flows.train import train  # torch, MLflow, pandas: imported while the server starts
        from tasks.baseline import BASELINE_PREFIX

        quiet_user_error_tracebacks()
        result = on_server(train, config, resume)
    if result.unchanged:
        print(result.unchanged)
        print(f"champion: {result.model_uri}  (MLflow run {result.run_id}, {result.mlflow_url})")
        return 0
    print(f"MLflow run: {result.run_id}  ({result.mlflow_url})")
    print(f"model: {result.model_uri}")
    print("  ".join(f"{name}={value:.4f}" for name, value in result.test_metrics.items()))
    if result.baseline_model:  # the same names, so each figure reads beside the network's above it
        print(f"linear baseline ({result.baseline_model}): "
              + "  ".join(f"{name}={result.baseline_metrics[BASELINE_PREFIX + name]:.4f}" for name in result.test_metrics))
    if result.baseline_warning:
        print(result.baseline_warning)
    if result.registered:
        print(f"registered: {result.registered}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from flows.environment import configure_environment

    configure_environment()
    from flows.deployments import serve

    serve(limit=_positive(args.limit, "--limit"))
    return 0


def _setup(args: argparse.Namespace) -> int:
    from flows.environment import configure_environment

    configure_environment()
    from flows.deployments import setup

    setup(gpus=_positive(args.gpus, "--gpus"), notify_url=args.notify_url, notify_block=args.notify_block)
    return 0


def _up(args: argparse.Namespace) -> int:
    from flows.environment import fitflow_home
    from flows.local_stack import up

    for port, flag in ((args.prefect_port, "--prefect-port"), (args.mlflow_port, "--mlflow-port")):
        if not 1 <= port <= 65535:
            raise ConfigError(f"{flag} must be a port number, 1-65535 (got {port})")
    if args.prefect_port == args.mlflow_port:
        raise ConfigError(f"--prefect-port and --mlflow-port are both {args.prefect_port}; give them different ports")
    home = fitflow_home()
    home.mkdir(parents=True, exist_ok=True)
    up(home, args.prefect_port, args.mlflow_port, _positive(args.limit, "--limit"))
    return 0


def _down(args: argparse.Namespace) -> int:
    from flows.environment import fitflow_home
    from flows.local_stack import down

    print(down(fitflow_home()))
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from flows.environment import configure_environment, tracking_uri
    from tasks.redaction import redact_uri

    configure_environment()
    from flows.doctor import check_runs

    findings = check_runs(tracking_uri(), fix=not args.dry_run)
    for f in findings:
        print(f"{f.run_id}  flow run {f.flow_run_id or '-'} ({f.flow_run_state or '-'}): {f.action}")
    print(f"{len(findings)} RUNNING run(s) checked in {redact_uri(tracking_uri())}")
    return 0


def _upload_metrics(args: argparse.Namespace) -> int:
    chosen_uri = os.environ.get("MLFLOW_TRACKING_URI")  # read before configure_environment sets the local default
    from flows.environment import configure_environment, fitflow_home
    from tasks.redaction import redact_uri

    configure_environment()
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from tasks.metrics_journal import Journal, entries_text, upload
    from tasks.tracking import check_server

    if not args.run_id.isalnum():
        raise ConfigError(f"not an MLflow run id: {args.run_id!r} (32 letters and digits, as the warning printed it)")
    journal = Journal(fitflow_home() / "checkpoints" / args.run_id)
    if not journal.path.exists():
        raise ConfigError(f"run {args.run_id} has no metrics journal at {journal.path}; "
                          "check the run id and FITFLOW_HOME")
    uri = chosen_uri or journal.origin()["tracking_uri"]
    if uri.startswith(("http://", "https://")):
        check_server(uri)  # still down: one line now, not minutes of MLflow's retries
    client = MlflowClient(uri)
    try:
        client.get_run(args.run_id)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise TrackingError(f"run {args.run_id} is not on {redact_uri(uri)}; set MLFLOW_TRACKING_URI to the server "
                            "it was tracked on") from None
    done = upload(journal, client, args.run_id)
    sent = f"sent {entries_text(done.sent)} of run" if done.sent else "nothing left to send of run"
    print(f"{sent} {args.run_id} to {redact_uri(uri)}"
          + (f" (already there: {entries_text(done.present)})" if done.present else ""))
    if done.ended:
        print(f"run {args.run_id} ended {done.ended} (its end was kept locally while the server was unreachable)")
    return 0


def _positive(value: int, flag: str) -> int:
    if value < 1:
        raise ConfigError(f"{flag} must be at least 1 (got {value})")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        hint = ""
        if args.command == "resume":
            hint = "; resume continues a run with the hyperparameters it was started with, only launch settings may be given"
        elif "--resume" in unknown:
            hint = "; continue a run with `fitflow resume RUN_ID`"
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    if args.command in PRELOADED_COMMANDS:
        from flows.preloaded_client import run_preloaded

        exit_code = run_preloaded(sys.argv[1:] if argv is None else argv)
        if exit_code is not None:  # it ran in a fork of `fitflow up`'s preloaded process
            return exit_code
    try:
        return args.handler(args)
    except FitflowError as err:
        print(f"fitflow: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fitflow: interrupted", file=sys.stderr)
        return 130


def run(argv: list[str] | None = None) -> int:
    """The `fitflow` command: `main` on sys.argv, and once every exit handler has run (Prefect's
    and MLflow's included), the process ends without the interpreter's teardown. Tearing down the
    modules and objects of torch, MLflow and Prefect took 1.5-2 s of a 8-10 s `fitflow train` here
    (docs/benchmarks.md) and does nothing the exit does not: non-daemon threads are joined before
    the exit handlers, which flush and close what fitflow and its libraries keep open; this one,
    registered first so that it runs last, flushes logging and the standard streams."""
    exit_code = [1]  # an exception escaping main: the interpreter prints it, the exit status is 1
    atexit.register(exit_without_teardown, exit_code)
    try:
        exit_code[0] = main(argv)
    except SystemExit as done:  # argparse's usage errors, --help
        exit_code[0] = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        raise
    return exit_code[0]


def exit_without_teardown(exit_code: list[int]) -> None:
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`fitflow runs | head`): nothing more to write there
            pass
    os._exit(exit_code[0])


if __name__ == "__main__":
    sys.exit(run())

