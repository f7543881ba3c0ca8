"""The MLflow model registry behind a promotion gate.

`register_model` adds a run's model as a new version of a registered model and decides its
alias: `champion` moves to it only when it beats the current champion on the monitored metric
measured on the same test data; otherwise the version becomes `challenger`. Better is as the
newcomer's run trained: lower or higher as its run recorded (tasks/tracking.py MONITOR_MODE_TAG; a
metric of yours may be lower-is-better whatever its name), by the metric's name for older runs. The reason, with
both scores, goes into the version's description and tags, so the registry UI says why.

"The same test data" means the same dataset (the `fitflow.dataset_digest` tag of both runs)
cut into the same test split (the split settings: target, task, seed, fractions). When the
newcomer was tested on other data (a new data version, other split settings), the champion is
re-scored on the newcomer's test split (`rescore`, tasks/rescoring.py) and the gate decides on
that; both figures are logged on the newcomer's run (its own `test_<metric>` and
`champion_test_<metric>`). Rows the champion trained or was validated on are left out of that
comparison, and the newcomer is scored again on the rows that remain (`gate_test_<metric>`; the
count is in the reason and the `fitflow.gate_rows` tag): a new data version that keeps the old
rows would otherwise test the champion partly on its training data. Each version registered here
with a `rescore` (the flows', the Python API's for a DataFrame) records its own seen rows for that
(`fitflow/seen_rows.npz` on its run; tables only). A champion
registered without them is re-scored on all the test rows, and the reason says so. A champion
that cannot be scored there (other classes, another task, a model of your own Datasets) leaves
the newcomer `challenger`, "not comparable"; move `champion` by hand if it should ship. Each
decision is a Prefect event, `fitflow.model.promoted` or `fitflow.model.rejected`. Two
registrations of the same name at the very same moment may both read the old champion; run them
one after the other.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mlflow.entities import Run as MlflowRun
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prefect import task
from prefect.cache_policies import NO_CACHE

from flows import events
from tasks.baseline import judged_metric
from tasks.errors import ConfigError, FitflowError
from tasks.rescoring import NotComparable, Rescored
from tasks.seen_rows import ARTIFACT_DIR, ARTIFACT_NAME, SeenRows
from tasks.tracking import recorded_lower_is_better

log = logging.getLogger("fitflow")

CHAMPION, CHALLENGER = "champion", "challenger"
# The params that decide which rows end up in the test split (see tasks/data.split_rows).
_SPLIT_PARAMS = ("target", "data.task", "seed", "test_fraction", "val_fraction", "validation_data")


@dataclass
class Decision:
    name: str
    version: str
    alias: str
    metric: str
    score: float
    champion_version: str | None
    champion_score: float | None
    reason: str
    rescored: bool = False  # champion_score is the champion's re-scored on this version's test split
    rows: str | None = None  # rescored: how many of those test rows both were scored on ("12 of 86")
    left_out: int = 0  # rows the champion had seen, left out: `score` is then the newcomer's on the rest

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def __str__(self) -> str:
        return f"{self.uri} is {self.alias}: {self.reason}"


def evaluation_data_key(run: MlflowRun) -> dict[str, str | None]:
    """What fixes a run's test rows: the dataset digest and the split settings."""
    params = run.data.params
    # the Python API tests on the data given to `evaluate`, not on a split: its digest is part of the key
    key = {"dataset_digest": run.data.tags.get("fitflow.dataset_digest"), "test_digest": run.data.tags.get("fitflow.test_digest")}
    key.update({name: params.get(name) for name in _SPLIT_PARAMS})
    if key["validation_data"] not in (None, "null"):
        key["val_fraction"] = None  # a separate validation file: the split ignores val_fraction
    return key


class Rescore(Protocol):
    """The registering run's test split, to score the champion on (tasks/rescoring.py Rescorer)."""

    def __call__(self, champion_uri: str, newcomer_uri: str, champion_seen: SeenRows | None) -> Rescored:
        """Both models' `test_<metric>` values on the test rows the champion did not see; NotComparable."""

    def seen_rows(self) -> SeenRows | None:
        """The rows the registering run trained and validated on (None: not recorded for its kind of data)."""


def register_model(client: MlflowClient, name: str, run_id: str, model_uri: str, monitor: str,
                   rescore: Rescore | None = None) -> Decision:
    """Register the run's model as a new version of `name` and gate the `champion` alias; `rescore`
    scores the champion on this run's test split when that differs from the champion's own."""
    metric = judged_metric(monitor)
    run = client.get_run(run_id)
    if metric not in run.data.metrics:
        raise ConfigError(f"run {run_id} has no metric '{metric}' to compare models by; monitor a metric the test split logs")
    score = run.data.metrics[metric]
    _ensure_registered_model(client, name)
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    version = client.create_model_version(name, source=model_uri, run_id=run_id, model_id=model_id).version
    seen = rescore.seen_rows() if rescore is not None else None
    if seen is not None:  # for the gate of a later version, should this one be champion then
        _log_seen_rows(client, run_id, seen)
    champion = _current_champion(client, name)
    # which way is better: as the newcomer trained (a metric of yours may say so against its name)
    lower = recorded_lower_is_better(monitor, run.data.tags)
    decision = _decide(client, name, str(version), metric, score, lower, run, model_uri, champion, rescore)
    client.set_registered_model_alias(name, decision.alias, decision.version)
    client.update_model_version(name, decision.version, description=decision.reason)
    tags = {"fitflow.gate": decision.alias, "fitflow.gate_metric": metric, "fitflow.score": f"{score:.6g}",
            "fitflow.gate_reason": decision.reason}
    if decision.champion_version is not None:
        tags["fitflow.champion_version"] = decision.champion_version
    if decision.champion_score is not None:
        tags["fitflow.champion_score"] = f"{decision.champion_score:.6g}"
    if decision.rescored:
        tags["fitflow.champion_rescored"] = "true"
    if decision.rows is not None:
        tags["fitflow.gate_rows"] = decision.rows
    if decision.left_out:  # its own score on the rows the gate compared, not on all its test rows
        tags["fitflow.gate_score"] = f"{decision.score:.6g}"
    for key, value in tags.items():
        client.set_model_version_tag(name, decision.version, key, value)
    if decision.champion_score is not None:  # both figures side by side on the newcomer's run
        client.log_metric(run_id, f"champion_{metric}", decision.champion_score)
        if decision.left_out:  # the newcomer's, on the test rows the champion did not see
            client.log_metric(run_id, f"gate_{metric}", decision.score)
    client.set_tag(run_id, "fitflow.gate", f"{decision.alias}: {decision.reason}"[:5000])
    log.info("registered %s", decision)
    _announce(decision, run_id, model_uri)
    return decision


def _announce(decision: Decision, run_id: str, model_uri: str) -> None:
    """`fitflow.model.promoted` when the version became champion, `fitflow.model.rejected` otherwise."""
    event = events.MODEL_PROMOTED if decision.alias == CHAMPION else events.MODEL_REJECTED
    payload = {"model": decision.name, "version": decision.version, "alias": decision.alias,
               "metric": decision.metric, "score": decision.score, "champion_version": decision.champion_version,
               "champion_score": decision.champion_score, "rescored": decision.rescored, "reason": decision.reason,
               "mlflow_run_id": run_id, "model_uri": model_uri}
    events.emit(event, events.registered_model(decision.name, decision.version),
                [events.mlflow_run(run_id), events.mlflow_model(model_uri)], payload)


def _decide(client: MlflowClient, name: str, version: str, metric: str, score: float, lower: bool, run: MlflowRun,
            model_uri: str, champion, rescore: Rescore | None) -> Decision:
    if champion is None:
        return Decision(name, version, CHAMPION, metric, score, None, None,
                        f"first version of '{name}' ({metric} {score:.4f})")
    champion_run = client.get_run(champion.run_id) if champion.run_id else None
    old_key = evaluation_data_key(champion_run) if champion_run else None
    new_key = evaluation_data_key(run)
    if old_key != new_key:
        differ = ", ".join(sorted(k for k in new_key if old_key is None or old_key.get(k) != new_key[k]))
        cannot = "no re-scoring was asked for"
        if rescore is not None:
            try:
                seen = _seen_rows(client, champion.run_id) if champion.run_id else None
                rescored = rescore(f"models:/{name}/{champion.version}", model_uri, seen)
            except (NotComparable, FitflowError, MlflowException) as err:
                cannot = f"it cannot be scored on this version's test data: {err}"
            else:
                champion_score = rescored.champion.get(metric)
                newcomer_score = score if rescored.newcomer is None else rescored.newcomer.get(metric)
                if champion_score is not None and newcomer_score is not None:
                    left_out = rescored.total - rescored.kept
                    if seen is None:
                        which = (f"all {rescored.total} test rows; the champion's training rows were not recorded, "
                                 "some of them may be among these")
                    elif not left_out:
                        which = (f"all {rescored.total} test rows, none of them one the champion trained or was "
                                 "validated on")
                    else:
                        which = (f"{rescored.kept} of {rescored.total} test rows: the {left_out} the champion trained "
                                 "or was validated on left out, both models scored on the rest")
                    if rescored.kept < FEW_ROWS:
                        which += (f"; only {rescored.kept} rows: a small sample, the decision may not hold on more "
                                  "data")
                    return _compare(name, version, metric, newcomer_score, lower, champion.version, champion_score,
                                    f"re-scored on this version's test data ({which}; dataset "
                                    f"{new_key['dataset_digest']}; the champion was tested on other data: {differ} "
                                    "differ)", rescored=True, rows=f"{rescored.kept} of {rescored.total}",
                                    left_out=left_out)
                cannot = f"re-scoring gave no {metric}"
        return Decision(name, version, CHALLENGER, metric, score, champion.version, None,
                        f"not comparable with champion v{champion.version}: tested on different data "
                        f"({differ} differ) and {cannot}; {metric} {score:.4f}. Move 'champion' by hand if it should ship")
    champion_score = champion_run.data.metrics.get(metric)
    if champion_score is None:
        return Decision(name, version, CHALLENGER, metric, score, champion.version, None,
                        f"champion v{champion.version} has no {metric} to compare with; {metric} {score:.4f}")
    return _compare(name, version, metric, score, lower, champion.version, champion_score,
                    f"on the same test data (dataset {new_key['dataset_digest']})")


def _compare(name: str, version: str, metric: str, score: float, lower: bool, champion_version: str,
             champion_score: float, where: str, rescored: bool = False, rows: str | None = None,
             left_out: int = 0) -> Decision:
    better = score < champion_score if lower else score > champion_score
    relation = ("<" if lower else ">") if better else ("=" if score == champion_score else (">" if lower else "<"))
    verdict = "beats" if better else "does not beat"
    reason = f"{metric} {score:.4f} {relation} {champion_score:.4f} of champion v{champion_version}: {verdict} it {where}"
    return Decision(name, version, CHAMPION if better else CHALLENGER, metric, score, champion_version,
                    champion_score, reason, rescored, rows, left_out)


# Fewer rows compared than this and the reason says the sample is small: one row then moves
# accuracy by more than 2 points. Another split of the same table keeps few (9-12 of 86 here).
FEW_ROWS = 50

# Where a run is logged, not what it learns: a retrain logged elsewhere is still the same model.
_NOT_LEARNED = ("experiment", "run_name")


def unchanged_since_champion(client: MlflowClient, name: str, dataset_digest: str, params: dict[str, str]) -> tuple | None:
    """(champion version, its run) when the champion of `name` was trained on this very dataset with these
    very hyperparameters (its params; `data.*` facts and what `resolved.*` settings came to follow from those two):
    training again would only reproduce it."""
    champion = _current_champion(client, name)
    if champion is None or not champion.run_id:
        return None
    run = client.get_run(champion.run_id)
    if run.data.tags.get("fitflow.dataset_digest") != dataset_digest:
        return None
    theirs = {k: v for k, v in run.data.params.items() if not k.startswith(("data.", "resolved.")) and k not in _NOT_LEARNED}
    mine = {k: v for k, v in params.items() if k not in _NOT_LEARNED}
    return (champion, run) if theirs == mine else None


def _log_seen_rows(client: MlflowClient, run_id: str, seen: SeenRows) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ARTIFACT_NAME
        path.write_bytes(seen.to_bytes())
        client.log_artifact(run_id, str(path), ARTIFACT_DIR)


def _seen_rows(client: MlflowClient, run_id: str) -> SeenRows | None:
    """The rows the run trained and validated on, as recorded when it was registered; None when they were not."""
    if f"{ARTIFACT_DIR}/{ARTIFACT_NAME}" not in {item.path for item in client.list_artifacts(run_id, ARTIFACT_DIR)}:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, f"{ARTIFACT_DIR}/{ARTIFACT_NAME}", tmp)
        try:
            return SeenRows.from_bytes(Path(path).read_bytes())
        except ValueError as err:  # never a silent fallback to every row
            raise NotComparable(f"its recorded training rows ({ARTIFACT_DIR}/{ARTIFACT_NAME} of run {run_id}) "
                                f"cannot be read: {err}") from None


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(name, description="Registered by fitflow; alias 'champion' is the model that ships.")
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


def _current_champion(client: MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


register_model_task = task(register_model, name="register_model", cache_policy=NO_CACHE)
