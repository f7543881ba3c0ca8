"""Retraining when data changes: the content digest, the `watch` flow and its events on a real
Prefect server, and a retrain of unchanged data and config ending at once as "Unchanged"."""

from __future__ import annotations

import os
import time

import pytest
from conftest import write_mixed_classification_csv
from mlflow.tracking import MlflowClient
from prefect import get_client
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

from flows import events
from flows.train import train
from flows.watch import watch
from tasks.config import TrainConfig
from tasks.source_digest import content_digest

pytestmark = pytest.mark.usefixtures("prefect_server")


def test_the_digest_follows_content_not_timestamps(tmp_path):
    table = write_mixed_classification_csv(tmp_path / "t.csv")
    first = content_digest(str(table))
    os.utime(table, (time.time() + 100, time.time() + 100))  # touched, same bytes
    assert content_digest(str(table)) == first
    table.write_text(table.read_text().replace("yes", "no", 1))
    assert content_digest(str(table)) != first

    folder = tmp_path / "images"
    (folder / "cat").mkdir(parents=True)
    (folder / "cat" / "a.png").write_bytes(b"\x89PNG one")
    before = content_digest(str(folder))
    (folder / "cat" / "a.png").rename(folder / "cat" / "b.png")  # same bytes, another name: another data set
    renamed = content_digest(str(folder))
    assert renamed != before
    (folder / "cat" / "c.png").write_bytes(b"")
    assert content_digest(str(folder)) not in (before, renamed)
    assert content_digest("breast_cancer").startswith("sha256:")  # a shipped dataset by name


def _changed_events(source: str) -> list:
    with get_client(sync_client=True) as client:
        return client.read_events(EventFilter(event=EventNameFilter(name=[events.DATA_CHANGED]),
                                              resource=EventResourceFilter(id=[f"fitflow.data.{source}"])), limit=50).events


def test_watch_remembers_each_source_and_announces_only_a_change(tmp_path):
    table = write_mixed_classification_csv(tmp_path / "watched.csv")
    (first,) = watch(sources=[str(table)], register_model="watched")
    assert first.previous is None and not first.changed  # seen for the first time: remembered only
    (again,) = watch(sources=[str(table)], register_model="watched")
    assert again.previous == again.digest == first.digest and not again.changed
    write_mixed_classification_csv(table, seed=1)  # a new version of the data
    (changed,) = watch(sources=[str(table)], register_model="watched")
    assert changed.changed and changed.previous == first.digest and changed.digest != first.digest

    deadline = time.monotonic() + 120  # events reach the server from a background sender; this bounds a hang
    while not _changed_events(str(table)) and time.monotonic() < deadline:
        time.sleep(0.2)
    (event,) = _changed_events(str(table))  # one change, one event: none for the first sight or the repeat
    assert event.payload == {"source": str(table), "digest": changed.digest, "previous_digest": first.digest,
                             "target": "diagnosis", "register_model": "watched"}
    assert event.resource["fitflow.data.digest"] == changed.digest


def test_a_retrain_of_the_champions_data_and_config_ends_at_once_as_unchanged(mlflow_uri, tmp_path):
    table = write_mixed_classification_csv(tmp_path / "t.csv")
    config = TrainConfig(data=str(table), target="label", epochs=2, register_model="steady", experiment="first")
    champion = train(config)
    assert champion.unchanged is None
    client = MlflowClient(mlflow_uri)
    runs_before = len(client.search_runs([champion.experiment_id]))

    # the same data and hyperparameters, logged elsewhere (as a triggered retrain is): nothing to learn
    again = train(config.model_copy(update={"experiment": "retrain"}))
    assert again.unchanged and "unchanged" in again.unchanged and "v1" in again.unchanged
    assert again.run_id == champion.run_id and again.epochs_trained == 0
    assert again.test_metrics == champion.test_metrics
    assert len(client.search_runs([champion.experiment_id])) == runs_before
    assert client.get_experiment_by_name("retrain") is None  # no run was created anywhere
    assert [str(v.version) for v in client.search_model_versions("name='steady'")] == ["1"]
    with get_client(sync_client=True) as prefect:
        (flow_run,) = prefect.read_flow_runs(limit=1, sort="START_TIME_DESC")
    assert flow_run.state.name == "Unchanged" and flow_run.state.is_completed()
    assert "unchanged" in flow_run.state.message

    # other hyperparameters, or new data: a real run
    assert train(config.model_copy(update={"epochs": 3})).unchanged is None
    write_mixed_classification_csv(table, seed=2)
    assert train(config).unchanged is None
