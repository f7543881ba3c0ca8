"""Row fingerprints (tasks/seen_rows.py): which of a new version's rows a model trained on."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tasks.seen_rows import SeenRows


def test_a_row_is_seen_whatever_its_numbers_were_read_as_and_whatever_its_label_or_column_order():
    trained = pd.DataFrame({"age": [30, 41, 52], "city": ["Oslo", None, "Lima"], "label": ["a", "b", "a"]})
    seen = SeenRows.of([trained.iloc[:2], trained.iloc[2:]], ["age", "city"])
    new_version = pd.DataFrame({"label": ["z", "b", "a", "a"], "city": ["Oslo", None, "Lima", "Oslo"],
                                "age": [30.0, 41.0, 52.5, 52.0], "extra": [1, 2, 3, 4]})
    # 30 read as 30.0 and a relabelled row: seen; 52.5: another row; (52, Oslo): another row, though each value was seen
    assert seen.seen(new_version).tolist() == [True, True, False, False]


def test_seen_rows_survive_their_file_and_a_missing_input_column_is_named():
    frame = pd.DataFrame({"x": np.arange(1000, dtype=float), "flag": [True, False] * 500})
    seen = SeenRows.of([frame], ["x", "flag"])
    again = SeenRows.from_bytes(seen.to_bytes())
    assert again.columns == ["x", "flag"] and np.array_equal(again.fingerprints, seen.fingerprints)
    assert again.seen(frame).all() and len(again.fingerprints) == 1000
    with pytest.raises(KeyError, match="'flag'"):
        again.seen(frame.drop(columns=["flag"]))
    for damaged in (b"not an npz file", seen.to_bytes()[:-100]):
        with pytest.raises(ValueError, match="not a seen-rows file"):
            SeenRows.from_bytes(damaged)
