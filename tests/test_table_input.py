"""Table files as people write them (tasks/table_input.py): read right with a warning, or refused.

Readings with a warning are compared with the same table written as a plain comma CSV: the
prepared features, targets and classes must be identical, so a "correct reading" is checked,
not assumed. Refusals go through the real `fitflow train` (and `fitflow runs`) CLI: exit 2, one
line naming the file, column or line, no MLflow run left RUNNING.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from flows.cli import main
from tasks.data import PrepSpec, load_table, prepare
from tasks.errors import DataError
from tasks.preprocessing import Preprocessor
from tasks.scoring import check_rows

ROWS = 120


def _clean() -> pd.DataFrame:
    rng = np.random.default_rng(3)
    x = rng.normal(size=ROWS)
    return pd.DataFrame({"x": x, "z": rng.normal(size=ROWS).round(3), "colour": rng.choice(["red", "blue"], ROWS),
                         "label": np.where(x + rng.normal(scale=0.3, size=ROWS) > 0, "yes", "no")})


def _text(frame: pd.DataFrame, delimiter: str = ",", end: str = "") -> str:
    lines = [delimiter.join(frame.columns)] + [delimiter.join(map(str, row)) + end for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _with_price(frame: pd.DataFrame, written) -> pd.DataFrame:
    out = frame.copy()
    out["price"] = [written(v) for v in np.linspace(900.0, 25000.0, ROWS)]
    return out


READ_WITH_A_WARNING = {
    "semicolons": (lambda f: _text(f, ";"), lambda f: f, "separated by semicolons (';')"),
    "tabs": (lambda f: _text(f, "\t"), lambda f: f, "separated by tabs"),
    "pipes": (lambda f: _text(f, "|"), lambda f: f, "separated by pipes ('|')"),
    "trailing delimiter": (lambda f: _text(f, end=","), lambda f: f, "rows end with an extra ','"),
    "header over 8 KB": (lambda f: _text(f.rename(columns={"z": "z" * 9000})), lambda f: f.rename(columns={"z": "z" * 9000}), None),
    "to_csv index": (lambda f: f.to_csv(), lambda f: f, "a row index written by pandas' to_csv"),
    "thousands separators": (lambda f: _with_price(f, lambda v: f"{v:,.2f}").to_csv(index=False),
                             lambda f: _with_price(f, lambda v: round(v, 2)), "thousands separators"),
    "currency signs": (lambda f: _with_price(f, lambda v: f"${v:,.2f}").to_csv(index=False),
                       lambda f: _with_price(f, lambda v: round(v, 2)), "a currency sign (e.g. '$900.00')"),
    "labels with spaces": (lambda f: f.assign(label=[v if i % 3 else f" {v} " for i, v in enumerate(f["label"])]).to_csv(index=False),
                           lambda f: f, "labels with surrounding whitespace"),
}


@pytest.mark.parametrize("case", READ_WITH_A_WARNING, ids=list(READ_WITH_A_WARNING))
def test_tables_pandas_would_misread_are_read_right_with_a_warning(case, tmp_path, caplog):
    written, expected, warning = READ_WITH_A_WARNING[case]
    (tmp_path / "odd.csv").write_text(written(_clean()), encoding="utf-8")
    expected(_clean()).to_csv(tmp_path / "plain.csv", index=False)

    with caplog.at_level(logging.WARNING, logger="fitflow"):
        odd = prepare(load_table(str(tmp_path / "odd.csv")), PrepSpec(target="label"))
    plain = prepare(load_table(str(tmp_path / "plain.csv")), PrepSpec(target="label"))

    assert odd.preprocessor.to_dict() == plain.preprocessor.to_dict()
    for got, want in zip((odd.train, odd.val, odd.test), (plain.train, plain.val, plain.test)):
        np.testing.assert_array_equal(got.features, want.features)
        np.testing.assert_array_equal(got.targets, want.targets)
    if warning:
        assert warning in caplog.text, caplog.text


def test_integer_class_codes_over_twenty_warn_and_say_how_to_force_classification(caplog):
    frame = _clean().assign(label=np.arange(ROWS) % 30)
    with caplog.at_level(logging.WARNING, logger="fitflow"):
        assert prepare(frame, PrepSpec(target="label")).preprocessor.task == "regression"
    assert "target 'label' holds 30 distinct integers" in caplog.text and "--task classification" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fitflow"):
        forced = prepare(frame, PrepSpec(target="label", task="classification")).preprocessor
    assert forced.task == "classification" and len(forced.classes) == 30 and "distinct integers" not in caplog.text


def _write(tmp_path: Path, name: str, frame: pd.DataFrame | str) -> str:
    path = tmp_path / name
    if isinstance(frame, str):
        path.write_text(frame, encoding="utf-8")
    elif name.endswith(".parquet"):
        frame.to_parquet(path)
    else:
        frame.to_csv(path, index=False)
    return str(path)


def _stamps(tz: str | None) -> pd.Series:
    return pd.Series(pd.date_range("2024-03-01", periods=ROWS, freq="h", tz=tz))


REFUSED = {
    "more fields than the header": (lambda p: _write(p, "extra.csv", _text(_clean(), end=",7")),
                                    "extra.csv line 2 has 5 fields but the header names 4 columns"),
    "unmatched quote in the header": (lambda p: _write(p, "quote.csv", 'x,"z,colour,label\n' + "1,2,red,yes\n" * 12000),
                                      'the header (line 1) has an unmatched quote'),
    "labels differing by case": (lambda p: _write(p, "case.csv", _clean().assign(label=lambda f: [v.upper() if i % 4 == 0 else v for i, v in enumerate(f["label"])])),
                                 "target 'label' has labels that differ only by case ('YES', 'yes')"),
    "mixed currencies": (lambda p: _write(p, "money.csv", _with_price(_clean(), lambda v: f"${v:.0f}" if v < 9000 else f"€{v:.0f}")),
                         "column 'price' mixes currencies ($, €)"),
    "tz-aware datetimes in a CSV": (lambda p: _write(p, "when.csv", _clean().assign(at=_stamps("UTC"))),
                                    "column 'at' of the data holds dates or times (e.g. '2024-03-01 00:00:00+00:00')"),
    "tz-aware datetimes in Parquet": (lambda p: _write(p, "when.parquet", _clean().assign(at=_stamps("Europe/Berlin"))),
                                      "column 'at' of the data holds dates or times (e.g. '2024-03-01 00:00:00+01:00')"),
    "naive datetimes in Parquet": (lambda p: _write(p, "naive.parquet", _clean().assign(at=_stamps(None))),
                                   "column 'at' of the data holds dates or times"),
    "nested Parquet lists": (lambda p: _write(p, "lists.parquet", _clean().assign(v=[[1.0, 2.0]] * ROWS)),
                             "column 'v' of the data holds nested values (ndarrays"),
    "nested Parquet structs": (lambda p: _write(p, "structs.parquet", _clean().assign(s=[{"a": 1}] * ROWS)),
                               "column 's' of the data holds nested values (dicts"),
}


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_tables_that_would_train_a_wrong_model_exit_2_with_one_line(case, tmp_path, mlflow_uri, capsys, caplog):
    make, message = REFUSED[case]
    assert main(["train", "--data", make(tmp_path), "--target", "label", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # Prefect's console handler writes to the stderr of when it was set up, which capsys does not see:
    # a log record that still carries its exception after fitflow's filter is a traceback on the terminal
    printed = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.exc_info]
    assert not printed, printed
    last = err.strip().splitlines()[-1]
    assert last.startswith("fitflow: error:") and message in last, last
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert not [run for run in runs if run.info.status == "RUNNING"]


def _codes_model() -> Preprocessor:
    """A model whose column 'code' was text in training: codes with leading zeros, and letters."""
    frame = pd.DataFrame({"code": ["10", "20", "007", "A4"] * 10, "x": np.arange(40.0), "label": ["a", "b"] * 20})
    return Preprocessor.fit(frame, "label", "classification", 10)


def test_text_codes_that_arrive_as_numbers_match_their_training_values():
    prep = _codes_model()
    arriving = pd.DataFrame({"code": [10.0, 20.0, np.nan], "x": [1.0, 2.0, 3.0]})  # a missing value made them floats
    rows, handling = check_rows(arriving, prep)
    assert list(rows["code"][:2]) == ["10", "20"] and handling["unseen_categories"] == {}
    np.testing.assert_array_equal(prep.transform(arriving)[:2], prep.transform(pd.DataFrame({"code": ["10", "20"], "x": [1.0, 2.0]})))


def test_text_codes_that_arrive_as_numbers_matching_nothing_are_an_error():
    with pytest.raises(DataError, match=r"column 'code' was text in training .* holds numbers here that match none of it \(e.g. 7\)"):
        check_rows(pd.DataFrame({"code": [7, 7], "x": [1.0, 2.0]}), _codes_model())


def test_one_hot_columns_of_a_split_read_the_splits_own_rows():
    """Each categorical column of `transform(frame, rows)` encodes `rows`, not the first column's hits."""
    frame = pd.DataFrame({"a": list("xyxyxyxy"), "b": list("ppqqppqq"), "t": [0, 1] * 4})
    prep = Preprocessor.fit(frame, "t", "classification", 10)
    rows = np.array([1, 2, 5, 6])
    np.testing.assert_array_equal(prep.transform(frame, rows), prep.transform(frame.iloc[rows]))


RUNS_REFUSED = {
    "a backquote in --sort": (["--sort", "val`loss"], "--sort 'val`loss' is not a metric name"),
    "a quote in --sweep": (["--sweep", "abc'"], "--sweep \"abc'\" is not a run id"),
    # two metrics of one name, one lower-is-better: no single order ranks both right
    "runs that disagree on which way --sort improves": (["--sort", "test_error_rate"],
                                                        "disagree on which way val_error_rate improves"),
}


@pytest.mark.parametrize("case", RUNS_REFUSED, ids=list(RUNS_REFUSED))
def test_fitflow_runs_refuses_what_mlflow_search_cannot_parse(case, mlflow_uri, capsys):
    client = MlflowClient(mlflow_uri)
    experiment = client.create_experiment("ranked")
    for mode in ("min", "max"):  # runs that recorded opposite directions for their monitor val_error_rate
        run_id = client.create_run(experiment, tags={"fitflow.monitor_mode": mode}).info.run_id
        client.log_param(run_id, "monitor", "val_error_rate")
        client.log_metric(run_id, "test_error_rate", 0.1)
    flags, message = RUNS_REFUSED[case]
    assert main(["runs", "--experiment", "ranked", *flags]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in err.strip().splitlines()[-1], err
