"""The CLI contract: flags and YAML for every field; bad input -> exit 2, one line, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.cli import main
from tasks.config import Launch, TrainConfig, load_config
from tasks.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
HEADER = "x,y,label\n"
ROWS = "".join(f"{i},{i % 7},{'ab'[i % 2]}\n" for i in range(60))


def _runs(uri: str) -> list:
    if not os.path.exists(uri.removeprefix("sqlite:///")):
        return []  # no store was even created: the input was rejected before tracking began
    client = MlflowClient(uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def _write(tmp_path: Path, name: str, content: str | bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return str(path)


BAD_INPUTS = {
    "missing file": (lambda p: ["--data", str(p / "nope.csv")], "data file not found"),
    "empty file": (lambda p: ["--data", _write(p, "empty.csv", "")], "is empty"),
    "header only": (lambda p: ["--data", _write(p, "header.csv", HEADER)], "header but no data rows"),
    "binary file": (lambda p: ["--data", _write(p, "bin.csv", bytes(range(256)) * 4)], "not a readable CSV"),
    "extension lies": (lambda p: ["--data", _write(p, "fake.parquet", HEADER + ROWS)], "is not a Parquet file"),
    "missing target": (lambda p: ["--data", _write(p, "ok.csv", HEADER + ROWS), "--target", "lable"], "did you mean 'label'"),
    "target all missing": (lambda p: ["--data", _write(p, "nolabel.csv", HEADER + "".join(f"{i},{i},\n" for i in range(60)))], "has no values"),
    "single class": (lambda p: ["--data", _write(p, "one.csv", HEADER + "".join(f"{i},{i},a\n" for i in range(60)))], "single class"),
    "too few rows": (lambda p: ["--data", _write(p, "few.csv", HEADER + "1,2,a\n2,3,b\n3,4,a\n")], "too few to split"),
    "garbage in numeric column": (
        lambda p: ["--data", _write(p, "garbage.csv", HEADER + ROWS + "oops,1,a\n")],
        "column 'x' row 61: 'oops' is not a number",
    ),
    "infinite value": (lambda p: ["--data", _write(p, "inf.csv", HEADER + ROWS + "inf,1,b\n")], "column 'x' row 61 holds an infinite value"),
    "duplicate columns": (lambda p: ["--data", _write(p, "dup.csv", "x,x,label\n" + ROWS)], "duplicate column names: 'x'"),
    "unknown monitor": (lambda p: ["--data", _write(p, "ok.csv", HEADER + ROWS), "--monitor", "val_r2"],
                        "monitor 'val_r2' is not logged for classification; use one of"),
    "unknown torchvision model": (lambda p: ["--data", _write(p, "ok.csv", HEADER + ROWS), "--model", "torchvision:resnet19"],
                                  "torchvision has no classification model 'resnet19'; did you mean 'resnet18'?"),
    "model that does not import": (lambda p: ["--data", _write(p, "ok.csv", HEADER + ROWS), "--model", "no_such_package.nets:Net"],
                                   "cannot import model 'no_such_package.nets:Net' (No module named 'no_such_package')"),
    "image model for a table": (lambda p: ["--data", _write(p, "ok.csv", HEADER + ROWS), "--model", "cnn"],
                                "model cnn needs images (the inputs here: 2 features)"),
    "missing pretrained file": (lambda p: ["--data", _write(p, "ok.csv", HEADER + ROWS), "--pretrained", str(p / "w.pt")],
                                "pretrained weights file not found: "),
    "negative epochs": (lambda p: ["--epochs", "-3"], "'epochs': Input should be greater than or equal to 1"),
    "unknown optimizer": (lambda p: ["--optimizer", "adamax"], "invalid choice: 'adamax'"),
    "unknown yaml field": (lambda p: ["--config", _write(p, "c.yaml", "epoch: 3\n")], "unknown config field 'epoch'"),
    "invalid yaml value": (lambda p: ["--config", _write(p, "c.yaml", "optimizer: adamax\n")], "invalid config value for 'optimizer'"),
}


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit:  # argparse rejects unknown choices before main's body runs
        return exit.code


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_clear_line(case, tmp_path, mlflow_uri, capsys):
    make_args, message = BAD_INPUTS[case]
    args = make_args(tmp_path)
    if "--data" in args and "--target" not in args:
        args += ["--target", "label"]
    if "--epochs" not in args:
        args += ["--epochs", "2"]
    assert _exit_code(["train", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("fitflow: error:") and message in last, last
    assert not _runs(mlflow_uri)  # refused before an MLflow run exists: none left behind, not even a FAILED one


def test_yaml_file_and_flag_overrides(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("epochs: 7\nhidden_sizes: [16, 8]\noptimizer: sgd\n")
    config = load_config(path, epochs="3")
    assert (config.epochs, config.hidden_sizes, config.optimizer) == (3, [16, 8], "sgd")
    with pytest.raises(ConfigError, match=r"config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_every_config_field_is_a_flag():
    from flows.cli import build_parser

    def flags(command: str) -> set[str]:
        parser = build_parser()._subparsers._group_actions[0].choices[command]
        options = {opt for action in parser._actions for opt in action.option_strings}
        return {opt for opt in options if not opt.startswith("--no-")} - {"-h", "--help", "--config"}

    as_flags = lambda names: {"--" + name.replace("_", "-") for name in names}  # noqa: E731
    assert flags("train") == as_flags(TrainConfig.flat_fields())
    # resume: the run's own hyperparameters; only where and how this machine runs it can change
    assert flags("resume") == as_flags(Launch.model_fields)


@pytest.mark.slow
def test_cli_end_to_end_in_a_real_process(tmp_path, prefect_server):
    """The installed `fitflow` command: a real run, then a bad file, against the test server."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    exe = Path(sys.executable).with_name("fitflow")
    ok = subprocess.run([str(exe), "train", "--epochs", "3", "--experiment", "cli"], env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "MLflow run:" in ok.stdout and "test_accuracy=" in ok.stdout
    assert "linear baseline (logistic regression): test_loss=" in ok.stdout  # beside the network's scores
    (run,) = _runs(env["MLFLOW_TRACKING_URI"])
    assert run.info.status == "FINISHED" and run.info.run_id in ok.stdout

    bad = subprocess.run([str(exe), "train", "--data", str(tmp_path / "missing.csv")], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("fitflow: error: data file not found")


# Code a plain `fitflow train` on a table has no use for: the registry (register_model), sweeps,
# DDP (strategy ddp; torch's elastic launcher), image loading and plots (torchvision's augmentations),
# torchvision (image decoding: imported with the first image), torchmetrics and the scipy.signal it
# imports (only for a metric of yours that is a torchmetrics one).
NOT_FOR_A_PLAIN_RUN = ("flows.registry", "tasks.rescoring", "flows.sweep", "flows.sweep_config", "tasks.ddp",
                       "tasks.distributed", "torch.distributed.elastic", "tasks.images_loaders", "tasks.images_augment",
                       "tasks.image_plots", "torchvision", "torchmetrics", "scipy.signal")


@pytest.mark.slow
def test_a_plain_train_run_imports_no_registry_sweep_ddp_image_code_or_torchmetrics(tmp_path, prefect_server):
    """Each import is paid by every `fitflow train` (docs/benchmarks.md itemises them): the command
    imports what its run needs, and a plain run on a table needs none of these."""
    from prefect.settings import PREFECT_API_URL

    code = ("import json, sys\nfrom flows.cli import main\n"
            "code = main(['train', '--epochs', '1', '--experiment', 'imports'])\n"
            f"print(json.dumps([code, sorted(m for m in {NOT_FOR_A_PLAIN_RUN!r} if m in sys.modules)]))")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [0, []]


def test_what_a_run_imports_while_its_server_starts_exists():
    """flows/cli.py imports these while the embedded Prefect server starts; one is a private torch
    module (torch.export's tracer): a torch upgrade that moves it fails here, not silently."""
    from flows.early_work import RUN_IMPORTS

    code = f"import importlib\nfor name in {RUN_IMPORTS!r}:\n    importlib.import_module(name)\n"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def test_help_documents_the_fields():
    out = subprocess.run([str(Path(sys.executable).with_name("fitflow")), "train", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for text in ("--batch-size", "--lr", "--experiment", "Rows per training step", "{adam,adamw,sgd}"):
        assert text in out.stdout


def test_help_imports_no_heavy_library():
    """`fitflow --help` answers at once (0.3 s, docs/benchmarks.md): torch, Prefect, MLflow and
    pandas (about 7 s together) are imported only once a command runs."""
    code = ("import sys\nfrom flows.cli import main\n"
            "for argv in (['--help'], ['train', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'prefect', 'mlflow', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_the_command_exits_with_mains_status_after_every_exit_handler_and_its_output_whole(tmp_path):
    """`fitflow` (flows/cli.py `run`) ends without the interpreter's teardown, once the exit handlers
    have run: the exit status is main's (0, 2 for a usage error or bad input, 1 with the traceback
    for an error that escapes), every line written reaches a pipe, and a library's exit handler
    (here one registered during the command, as Prefect's and MLflow's are) still runs."""
    script = ("import atexit, sys\nfrom flows import cli\nimport tasks.errors\n"
              "def command(argv):\n"
              "    atexit.register(lambda: print('exit handler ran'))\n"
              "    print('x' * 200_000)\n"
              "    if argv == ['escape']:\n"
              "        raise RuntimeError('escaped')\n"
              "    return fitflow_main(argv)\n"
              "fitflow_main, cli.main = cli.main, command\n"
              "sys.exit(cli.run(sys.argv[1:]))\n")
    outcomes = {}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # the streams buffered, as usual
    for argv in (["--help"], ["train", "--bogus"], ["train", "--data", str(tmp_path / "missing.csv")], ["escape"]):
        done = subprocess.run([sys.executable, "-c", script, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.stdout.count("x" * 200_000) == 1 and done.stdout.rstrip().endswith("exit handler ran"), argv
        outcomes[argv[-1]] = (done.returncode, done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "")
    assert outcomes["--help"] == (0, "")
    assert outcomes["--bogus"] == (2, "fitflow: error: unrecognized arguments: --bogus (see fitflow --help)")
    assert outcomes[str(tmp_path / "missing.csv")][0] == 2
    assert outcomes["escape"] == (1, "RuntimeError: escaped")
