"""Data tests: reading, checks, splits, preprocessing fitted on train only, the cache key."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from conftest import write_mixed_classification_csv, write_regression_csv

from tasks.data import PrepSpec, content_key, load_table, prepare, raw_test_rows, split_rows
from tasks.errors import DataError
from tasks.preprocessing import Preprocessor


def test_shipped_dataset_by_name():
    table = load_table("breast_cancer")
    assert table.shape == (569, 31)
    assert set(table["diagnosis"]) == {"malignant", "benign"}


def test_split_is_reproducible_stratified_and_disjoint():
    labels = load_table("breast_cancer")["diagnosis"]
    spec = PrepSpec(target="diagnosis", seed=7)
    train, val, test = split_rows(labels, "classification", spec)
    again = split_rows(labels, "classification", spec)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again))
    other_seed = split_rows(labels, "classification", PrepSpec(target="diagnosis", seed=8))
    assert not np.array_equal(test, other_seed[2])
    assert len(set(train) | set(val) | set(test)) == len(labels) == len(train) + len(val) + len(test)
    share = (labels == "malignant").mean()
    for rows in (train, val, test):
        assert abs((labels.iloc[rows] == "malignant").mean() - share) < 0.02


def test_preprocessing_is_fitted_on_train_only(tmp_path):
    table = load_table(str(write_regression_csv(tmp_path / "reg.csv")))
    spec = PrepSpec(target="price", seed=3)
    prepared = prepare(table, spec)
    train_rows, _, _ = split_rows(table["price"], "regression", spec)
    x1 = prepared.preprocessor.numeric[0]
    assert x1.name == "x1"
    assert x1.mean == pytest.approx(table["x1"].iloc[train_rows].mean())
    assert x1.mean != pytest.approx(table["x1"].mean())
    assert prepared.preprocessor.target_mean == pytest.approx(table["price"].iloc[train_rows].mean())
    assert prepared.train.features.dtype == np.float32
    assert np.allclose(prepared.train.features[:, 0].mean(), 0, atol=1e-5)


def test_categoricals_missing_values_and_string_labels(tmp_path):
    table = load_table(str(write_mixed_classification_csv(tmp_path / "mixed.csv")))
    prepared = prepare(table, PrepSpec(target="label"))
    p = prepared.preprocessor
    assert p.task == "classification"
    assert p.classes == ["no", "yes"]
    assert [c.name for c in p.categorical] == ["colour"]
    assert sorted(p.categorical[0].categories) == ["blue", "green", "red"]
    assert p.feature_names[:2] == ["x1", "x2"]
    for split in (prepared.train, prepared.val, prepared.test):
        assert np.isfinite(split.features).all()
        assert split.features.shape[1] == p.n_features == 5
        assert set(np.unique(split.targets)) <= {0, 1}
    # missing categorical values are imputed with the most frequent training value
    missing = table[table["colour"].isna()].head(1)
    encoded = p.transform(missing)[0, 2:]
    assert encoded.sum() == 1 and p.categorical[0].categories[int(encoded.argmax())] == p.categorical[0].fill


def test_preprocessor_round_trips_through_json(tmp_path):
    table = load_table(str(write_mixed_classification_csv(tmp_path / "mixed.csv")))
    p = prepare(table, PrepSpec(target="label")).preprocessor
    p.save(tmp_path / "prep.json")
    loaded = Preprocessor.load(tmp_path / "prep.json")
    assert loaded == p
    assert np.array_equal(loaded.transform(table), p.transform(table))
    assert b"\x80" not in (tmp_path / "prep.json").read_bytes()  # plain text, no pickle


def test_unseen_category_and_rare_categories(tmp_path):
    frame = pd.DataFrame({"city": ["a"] * 50 + ["b"] * 30 + ["c"] * 5 + ["d"] * 5, "y": [0, 1] * 45})
    p = Preprocessor.fit(frame, "y", "classification", max_categories=2)
    assert p.categorical[0].categories == ["a", "b"] and p.categorical[0].other
    encoded = p.transform(pd.DataFrame({"city": ["a", "c", "zzz"]}))
    assert encoded.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 1]]


def test_task_inference_and_override(tmp_path):
    table = load_table(str(write_regression_csv(tmp_path / "reg.csv")))
    assert prepare(table, PrepSpec(target="price")).preprocessor.task == "regression"
    ints = pd.DataFrame({"x": np.arange(200.0), "grade": np.arange(200) % 3})
    assert prepare(ints, PrepSpec(target="grade")).preprocessor.task == "classification"
    assert prepare(ints, PrepSpec(target="grade", task="regression")).preprocessor.task == "regression"


def test_validation_file_is_used_as_the_validation_split(tmp_path):
    table = load_table(str(write_mixed_classification_csv(tmp_path / "train.csv", rows=300, seed=1)))
    validation = load_table(str(write_mixed_classification_csv(tmp_path / "val.csv", rows=80, seed=2)))
    prepared = prepare(table, PrepSpec(target="label"), validation)
    assert len(prepared.val.targets) == 80
    assert len(prepared.train.targets) + len(prepared.test.targets) == 300



@pytest.mark.parametrize("validation", [False, True])
def test_raw_test_rows_are_the_rows_prepare_put_in_the_test_split(tmp_path, validation):
    table = load_table(str(write_mixed_classification_csv(tmp_path / "t.csv")))
    table.loc[[3, 50, 90], "label"] = np.nan  # rows dropped before the split shift every later position
    extra = load_table(str(write_mixed_classification_csv(tmp_path / "v.csv", seed=5))) if validation else None
    spec = PrepSpec(target="label", seed=3)
    prepared = prepare(table, spec, extra)
    rows = raw_test_rows(table, spec, "classification", validation_given=validation)
    assert len(rows) == len(prepared.test.targets)
    assert np.array_equal(prepared.preprocessor.transform(rows), prepared.test.features)
    assert np.array_equal(prepared.preprocessor.encode_target(rows), prepared.test.targets)

def test_cache_key_follows_content_not_path_or_mtime(tmp_path):
    first = write_regression_csv(tmp_path / "a.csv")
    copy = tmp_path / "b.csv"
    copy.write_bytes(first.read_bytes())
    os.utime(copy, (1_000_000, 1_000_000))
    spec = PrepSpec(target="price")
    key = content_key(load_table(str(first)), spec)
    assert content_key(load_table(str(copy)), spec) == key
    assert content_key(load_table(str(first)), PrepSpec(target="price", seed=1)) != key
    changed = load_table(str(first))
    changed.loc[0, "x1"] += 1
    assert content_key(changed, spec) != key


def test_parquet_is_read_by_content(tmp_path):
    table = load_table("breast_cancer")
    table.to_parquet(tmp_path / "bc.parquet")
    assert load_table(str(tmp_path / "bc.parquet")).equals(table)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"a,b,label\n", "header but no data rows"),
        (b"\x00\x01\x02\xff\xfe binary", "not a readable CSV"),
        (b"a,b,a\n1,2,3\n", "duplicate column names: 'a'"),
    ],
)
def test_unreadable_files(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_table(str(path))


def test_missing_file_names_the_shipped_datasets():
    with pytest.raises(DataError, match=r"not found: nope\.csv.*breast_cancer"):
        load_table("nope.csv")


def test_extension_that_lies(tmp_path):
    load_table("breast_cancer").to_parquet(tmp_path / "really_parquet.csv")
    with pytest.raises(DataError, match="ends in .csv but is a Parquet file"):
        load_table(str(tmp_path / "really_parquet.csv"))
    (tmp_path / "really_csv.parquet").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="ends in .parquet but is not a Parquet file"):
        load_table(str(tmp_path / "really_csv.parquet"))


def _frame(rows: int = 60, **columns) -> pd.DataFrame:
    base = {"x": np.linspace(0, 1, rows), "label": ["a", "b"] * (rows // 2)}
    base.update(columns)
    return pd.DataFrame(base)


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (_frame(), "target column 'target' is not in the data"),
        (_frame(label=[None] * 60), "has no values"),
        (_frame(label=["a"] * 60), "single class"),
        (_frame(rows=4), "too few to split"),
        (_frame(x=["1.5"] * 40 + ["abc"] + ["2"] * 19), r"column 'x' row 41: 'abc' is not a number"),
        (_frame(x=[1.0] * 10 + [np.inf] + [2.0] * 49), r"column 'x' row 11 holds an infinite value"),
    ],
)
def test_tables_that_cannot_be_trained_on(frame, message):
    target = "target" if "target column" in message else "label"
    with pytest.raises(DataError, match=message):
        prepare(frame, PrepSpec(target=target))


def test_target_typo_suggests_the_column():
    with pytest.raises(DataError, match="did you mean 'label'"):
        prepare(_frame(), PrepSpec(target="lable"))
