"""python -m benchmarks.quality [--smoke] [--splits N] [--only TABLE ...] [--out FILE]: model quality (issue #18).

fitflow's defaults, its linear baseline and a 10-trial sweep on public tables of different sizes and
kinds, each over several splits; writes the table (mean and spread) to docs/quality.md.

- A split is fitflow's own split with seed s (15% validation, 15% test, stratified by class), so the
  network, the baseline, scikit-learn and the sweep see the same training, validation and test rows.
- defaults: `TrainConfig(seed=s)` with every other field at its default (the default rule).
- linear baseline: fitflow's own (tasks/baseline.py), as every table run logs it.
- scikit-learn: LogisticRegression() / Ridge() on the same preprocessed features, a cross-check that
  the baseline is what a user gets in two lines.
- best other family: scikit-learn's non-linear models at their defaults on the same features (an SVM
  with an RBF kernel, a random forest, gradient-boosted trees, 5 nearest neighbours); the one with the
  highest mean. Whether any common model beats a linear one on the table: if none does, the sweep's
  "above the baseline" needs a model none of them is.
- sweep: 10 trials of `fitflow sweep`'s default space (lr, hidden_sizes, dropout) with its sampler
  (TPE, seeded), median pruning and its base trial (trial 0: the defaults), ranked by best val_loss as
  the sweep ranks; its best trial's test score. Trained in this process with the same functions the flow calls, without Prefect and MLflow.
- customers: generated here with a known signal (20,000 rows, string categoricals with missing values,
  about 11% positives); "oracle" is the AUROC of the true logit on the same test rows.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import torch

from benchmarks.harness import Comparison, compare
from tasks.baseline import BASELINE_PREFIX, linear_baseline
from tasks.config import TrainConfig
from tasks.data import Prepared, load_table, prepare, split_rows
from tasks.search import OptunaPruning, enqueue_base, make_pruner, make_sampler, suggest
from tasks.trainer import Run, Trained, build_loaders, evaluate_on_test, prep_spec, task_metrics, train_model

REPO = Path(__file__).resolve().parents[1]
REPORT = REPO / "docs" / "quality.md"
NOTES_MARKER = "<!-- generated above; the notes below are kept when the report is regenerated -->"
SWEEP_TRIALS = 10


def customers(rows: int = 20_000, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """A churn-like table with a known signal, and its true logit per row.

    Linear effects of four numbers (one a log income), an interaction (score_2 * score_3), a
    curve (|score_4|), 80 cities (Zipf-distributed, more than max_categories' 50 one-hot columns)
    and two other categories; missing values in numbers and categories; two pure-noise columns.
    """
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 8))
    income = np.exp(rng.normal(10.5, 0.6, size=rows))
    cities = [f"city_{i:02d}" for i in range(80)]
    share = 1 / np.arange(1, 81) ** 1.1
    city = rng.choice(cities, size=rows, p=share / share.sum())
    city_effect = pd.Series(rng.normal(0, 0.5, size=80), index=cities)
    channel = rng.choice(["web", "store", "phone", "partner"], size=rows, p=[0.5, 0.3, 0.15, 0.05])
    plan = rng.choice(["basic", "plus", "pro"], size=rows, p=[0.6, 0.3, 0.1])
    logit = (-3.1 + 0.8 * x[:, 0] - 0.6 * x[:, 1] + 0.5 * x[:, 2] * x[:, 3] + 0.5 * np.abs(x[:, 4])
             - 0.4 * (np.log(income) - 10.5) / 0.6 + city_effect[city].to_numpy()
             + pd.Series(channel).map({"web": 0.0, "store": -0.4, "phone": 0.5, "partner": 0.8}).to_numpy()
             + pd.Series(plan).map({"basic": 0.0, "plus": -0.3, "pro": -0.8}).to_numpy())
    churned = rng.random(rows) < 1 / (1 + np.exp(-logit))
    frame = pd.DataFrame(x[:, :6], columns=[f"score_{i}" for i in range(6)])
    frame["income"] = income.round(2)
    frame["city"], frame["channel"], frame["plan"] = city, channel, plan
    frame["noise_a"], frame["noise_b"] = x[:, 6], x[:, 7]
    for column, missing in (("score_1", 0.10), ("income", 0.15), ("score_4", 0.05), ("city", 0.05), ("channel", 0.10)):
        frame[column] = frame[column].astype(object if column in ("city", "channel") else float)
        frame.loc[rng.random(rows) < missing, column] = None
    frame["churned"] = np.where(churned, "yes", "no")
    return frame, logit


@dataclass
class Table:
    name: str
    kind: str
    target: str
    metric: str  # the test metric reported (the choice per table)
    load: Callable[[bool], tuple[pd.DataFrame, np.ndarray | None]]  # smoke -> the table, its true logit if known
    splits: int


def _sklearn(name: str) -> Callable[[bool], tuple[pd.DataFrame, None]]:
    def load(smoke: bool) -> tuple[pd.DataFrame, None]:
        from sklearn import datasets  # its bundled copies of public tables: nothing is downloaded

        return getattr(datasets, f"load_{name}")(as_frame=True).frame, None

    return load


TABLES = [
    Table("wine", "178 rows, 13 numbers, 3 classes", "target", "test_accuracy", _sklearn("wine"), 10),
    Table("breast_cancer", "569 rows, 30 numbers, 2 classes (shipped in data/)", "diagnosis", "test_accuracy",
          lambda smoke: (load_table("breast_cancer"), None), 10),
    Table("diabetes", "442 rows, 10 numbers, regression", "target", "test_r2", _sklearn("diabetes"), 10),
    Table("digits", "1,797 rows, 64 numbers, 10 classes", "target", "test_accuracy", _sklearn("digits"), 5),
    Table("customers", "20,000 rows, 9 numbers + 3 string categoricals, missing values, 11% positives (generated)",
          "churned", "test_auroc", lambda smoke: customers(2_000 if smoke else 20_000), 5),
]


def fit_and_test(config: TrainConfig, prepared: Prepared, callbacks=()) -> tuple[dict[str, float], object, float]:
    """Train as a run does (checkpoints aside) and test the best weights; returns test metrics, the result, seconds."""
    loaders = build_loaders(config, prepared)
    started = time.perf_counter()
    trained = train_model(config, prepared, loaders, extra_callbacks=callbacks, progress=False)
    seconds = time.perf_counter() - started
    return evaluate_on_test(config, prepared, loaders, trained), trained, seconds


def scikit_learn_score(prepared: Prepared, metric: str) -> float:
    from sklearn.linear_model import LogisticRegression, Ridge

    train, test = prepared.train, prepared.test
    if prepared.preprocessor.task == "classification":
        model = LogisticRegression().fit(train.features, train.targets)
        outputs = np.log(np.clip(model.predict_proba(test.features), 1e-12, None))  # softmax(log p) = p
    else:
        outputs = Ridge().fit(train.features, train.targets).predict(test.features)[:, None]
    return _test_score(prepared, outputs, metric)


def _test_score(prepared: Prepared, outputs: np.ndarray, metric: str) -> float:
    """`metric` of these outputs (logits, log-probabilities or values) on the test split, by fitflow's metric code."""
    metrics = task_metrics(prepared)
    metrics.update(torch.as_tensor(outputs, dtype=torch.float32), torch.as_tensor(prepared.test.targets))
    return float(metrics.compute()[metric.removeprefix("test_")])


def other_family_scores(prepared: Prepared, metric: str) -> dict[str, float]:
    """Test scores of scikit-learn's common non-linear models at their defaults, on the baseline's features."""
    from sklearn.ensemble import (
        HistGradientBoostingClassifier,
        HistGradientBoostingRegressor,
        RandomForestClassifier,
        RandomForestRegressor,
    )
    from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
    from sklearn.svm import SVC, SVR

    train, test = prepared.train, prepared.test
    classify = prepared.preprocessor.task == "classification"
    families = ({"SVM": SVC(), "random forest": RandomForestClassifier(random_state=0),
                 "gradient boosting": HistGradientBoostingClassifier(random_state=0), "5 neighbours": KNeighborsClassifier()}
                if classify else
                {"SVM": SVR(), "random forest": RandomForestRegressor(random_state=0),
                 "gradient boosting": HistGradientBoostingRegressor(random_state=0), "5 neighbours": KNeighborsRegressor()})
    scores = {}
    for name, model in families.items():
        model.fit(train.features, train.targets if classify else train.targets.ravel())
        if not classify:
            outputs = model.predict(test.features)[:, None]
        elif isinstance(model, SVC):  # its decision function ranks as a logit does (probability=True refits 5 times)
            decision = model.decision_function(test.features)
            outputs = np.stack([np.zeros_like(decision), decision], axis=1) if decision.ndim == 1 else decision
        else:
            outputs = np.log(np.clip(model.predict_proba(test.features), 1e-12, None))
        scores[name] = _test_score(prepared, outputs, metric)
    return scores


def sweep_score(base: TrainConfig, prepared: Prepared, metric: str, trials: int) -> float:
    """`fitflow sweep`'s default space, sampler and pruner; the test score of the trial with the best val_loss."""
    from flows.sweep_config import SweepConfig

    sweep = SweepConfig(base=base, n_trials=trials)
    space = {name: dim.model_dump() for name, dim in sweep.space.items()}
    study = optuna.create_study(direction="minimize",
                                sampler=make_sampler("tpe", space, sweep.integers(), base.seed, trials, parallel=False),
                                pruner=make_pruner(True, sweep.prune_warmup_epochs, trials))
    enqueue_base(study, space, sweep.integers(), base.model_dump())  # trial 0: the defaults, as `base_trial` does
    best_value, best_score = float("inf"), float("nan")
    for _ in range(trials):
        trial = study.ask()
        config = TrainConfig(**{**base.model_dump(), **suggest(trial, space, sweep.integers(), grid=False)})
        pruning = OptunaPruning(trial, base.monitor)
        tested, trained, _ = fit_and_test(config, prepared, [pruning])
        value = trained.best_value
        if pruning.pruned_at:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        study.tell(trial, value)
        if value < best_value:
            best_value, best_score = value, tested[metric]
    return best_score


def oracle_auroc(table: pd.DataFrame, logit: np.ndarray, config: TrainConfig, prepared: Prepared) -> float:
    """The AUROC of the true logit on the test rows (the best any model can do on them)."""
    _, _, test_rows = split_rows(table[config.target], "classification", prep_spec(config))
    return _test_score(prepared, np.stack([np.zeros(len(test_rows)), logit[test_rows]], axis=1), "test_auroc")


def measure(table: Table, splits: int, trials: int, smoke: bool) -> dict[str, list[float] | str]:
    frame, logit = table.load(smoke)
    scores: dict[str, list[float]] = {k: [] for k in ("defaults", "baseline", "scikit-learn", "sweep", "oracle",
                                                      "epochs", "train_s", "baseline_s")}
    families: dict[str, list[float]] = {}
    for seed in range(splits):
        config = TrainConfig(data=table.name, target=table.target, seed=seed, **({"epochs": 3} if smoke else {}))
        prepared = prepare(frame, prep_spec(config))
        tested, trained, seconds = fit_and_test(config, prepared)
        started = time.perf_counter()
        baseline = linear_baseline(config, prepared, build_loaders(config, prepared).test, torch.device("cpu"))
        scores["baseline_s"].append(time.perf_counter() - started)
        scores["defaults"].append(tested[table.metric])
        scores["baseline"].append(baseline.metrics[BASELINE_PREFIX + table.metric])
        scores["scikit-learn"].append(scikit_learn_score(prepared, table.metric))
        scores["sweep"].append(sweep_score(config, prepared, table.metric, trials))
        for name, value in other_family_scores(prepared, table.metric).items():
            families.setdefault(name, []).append(value)
        scores["epochs"].append(len(trained.history))
        scores["train_s"].append(seconds)
        if logit is not None:
            scores["oracle"].append(oracle_auroc(frame, logit, config, prepared))
        print(f"  {table.name} split {seed}: defaults {scores['defaults'][-1]:.4f}  baseline {scores['baseline'][-1]:.4f}"
              f"  sweep {scores['sweep'][-1]:.4f}  ({len(trained.history)} epochs, {seconds:.1f} s)", flush=True)
    best = max(families, key=lambda name: statistics.mean(families[name]))
    return {**scores, "other family": families[best], "other family name": best}


def _cell(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f} ({min(values):.3f}-{max(values):.3f})"


def _paired(values: list[float], baseline: list[float]) -> str:
    """The mean per-split difference to the baseline and its standard error: whether a gap is more than split noise."""
    differences = [v - b for v, b in zip(values, baseline)]
    error = statistics.stdev(differences) / len(differences) ** 0.5 if len(differences) > 1 else 0.0
    return f"{statistics.mean(differences):+.4f} ± {error:.4f}"


def report(results: dict[str, dict[str, list[float] | str]], command: str, seconds: float, trials: int) -> str:
    rows, verdicts = [], []
    for table in (t for t in TABLES if t.name in results):
        s = results[table.name]
        base = statistics.mean(s["baseline"])
        defaults_ok = statistics.mean(s["defaults"]) >= base
        sweep_ok = statistics.mean(s["sweep"]) > base
        oracle = _cell(s["oracle"]) if s["oracle"] else ""
        rows.append(f"| {table.name} | {table.kind} | {table.metric} | {len(s['defaults'])} | {_cell(s['defaults'])} | "
                    f"{_cell(s['baseline'])} | {_cell(s['scikit-learn'])} | {s['other family name']}: {_cell(s['other family'])} | "
                    f"{_cell(s['sweep'])} | {oracle} | "
                    f"{_paired(s['defaults'], s['baseline'])} | {_paired(s['sweep'], s['baseline'])} | "
                    f"{'yes' if defaults_ok else '**no**'} | {'yes' if sweep_ok else '**no**'} |")
        verdicts.append(f"| {table.name} | {statistics.median(s['epochs']):.0f} ({min(s['epochs']):.0f}-{max(s['epochs']):.0f}) | "
                        f"{statistics.median(s['train_s']):.2f} | {statistics.median(s['baseline_s']):.3f} |")
    return "\n".join([
        "# Model quality: fitflow's defaults against a linear baseline (issue #18)",
        "",
        (f"Generated by `{command}` ({seconds / 60:.0f} min, 1 torch thread). Each cell: mean ± standard deviation "
         "over the splits (min-max). Splits are fitflow's own (seed 0, 1, ...: 15% validation, 15% test, stratified); "
         "every column of a row is scored on the same test rows. How each column is made: the docstring of "
         "`benchmarks/quality.py`. \"- baseline\": the mean over the splits of the difference on the same split, "
         "± its standard error (a gap within about two of them is split noise). Targets: the defaults at or above "
         f"the linear baseline's mean, the {trials}-trial sweep above it."),
        "",
        ("| table | kind | metric | splits | defaults | linear baseline (fitflow) | scikit-learn | "
         "best other family (scikit-learn) | "
         f"sweep ({trials} trials) | oracle | defaults - baseline | sweep - baseline | defaults >= baseline | "
         "sweep > baseline |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Cost of the default rule and of the baseline, per split (median, min-max of the epochs):",
        "",
        "| table | epochs trained (early stopping) | default training, s | linear baseline, s |",
        "|---|---|---|---|",
        *verdicts,
        "",
        NOTES_MARKER,
    ])


def baseline_cost(rounds: int, smoke: bool = False) -> list[Comparison]:
    """The linear baseline's time over a default run's (training with its epoch checkpoints, then the test pass),
    both in this process, interleaved; on the shipped table and on the 20,000-row customers. As in the flow, the
    baseline scores the fit the default network started from (the fit is inside the default run's time)."""
    rows = 2_000 if smoke else 20_000
    return [_cost("breast_cancer (shipped)", load_table("breast_cancer"), "diagnosis", rounds, smoke),
            _cost(f"customers ({rows:,} rows)", customers(rows)[0], "churned", rounds, smoke)]


def _cost(name: str, frame: pd.DataFrame, target: str, rounds: int, smoke: bool) -> Comparison:
    import tempfile

    config = TrainConfig(target=target, **({"epochs": 2} if smoke else {}))
    prepared = prepare(frame, prep_spec(config))
    loaders = build_loaders(config, prepared)
    runs: list[Trained] = []

    def default_run() -> None:
        with tempfile.TemporaryDirectory() as tmp:  # a run's epoch checkpoints; its MLflow logging is left out
            trained = train_model(config, prepared, loaders, Run(None, "0" * 32, "0", Path(tmp)), progress=False)
            evaluate_on_test(config, prepared, loaders, trained)
        runs.append(trained)

    def baseline() -> None:  # the flow's baseline step after a run (compare's warm-up runs the default run first)
        linear_baseline(config, prepared, loaders.test, torch.device("cpu"), fitted=runs[-1].linear_start)

    return compare(f"linear baseline / default run, {name}", ("default run (train + test)", default_run),
                   ("linear baseline", baseline), rounds, target="<= 0.05",
                   note="a whole run also starts Prefect and logs to MLflow: a larger denominator")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="one split, 3 epochs, 2 sweep trials, a 2,000-row customers")
    parser.add_argument("--splits", type=int, help="splits per table (default: 10 for the small tables, 5 for the others)")
    parser.add_argument("--only", nargs="+", choices=[t.name for t in TABLES], help="only these tables")
    parser.add_argument("--out", type=Path, default=REPORT, help=f"the report (default: {REPORT.relative_to(REPO)})")
    args = parser.parse_args()
    logging.getLogger("fitflow").setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # TPE's options, once per split
    torch.set_num_threads(1)  # fitflow's default
    trials = 2 if args.smoke else SWEEP_TRIALS
    started, results = time.perf_counter(), {}
    for table in TABLES:
        if args.only and table.name not in args.only:
            continue
        splits = 1 if args.smoke else (args.splits or table.splits)
        print(f"{table.name}: {splits} split(s)", flush=True)
        results[table.name] = measure(table, splits, trials, args.smoke)
    command = "python -m benchmarks.quality" + (" --smoke" if args.smoke else "")
    text = report(results, command, time.perf_counter() - started, trials)
    notes = args.out.read_text(encoding="utf-8").split(NOTES_MARKER, 1)[1] if args.out.exists() and \
        NOTES_MARKER in args.out.read_text(encoding="utf-8") else "\n"
    args.out.write_text(text + notes, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
