"""Drift figures against the training statistics a model carries (no servers)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tasks.data import PrepSpec, prepare
from tasks.drift import drift_table, psi
from tasks.preprocessing import Preprocessor


def _table(n: int, seed: int, shift: float = 0.0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"x": rng.normal(loc=shift, size=n), "c": rng.choice(["a", "b", "c"], size=n, p=[0.6, 0.3, 0.1]),
                         "y": rng.choice(["yes", "no"], size=n)})


def test_psi_is_zero_for_the_same_shares_and_grows_with_the_shift():
    same = np.array([0.25, 0.25, 0.5])
    assert psi(same, same) == 0
    assert 0 < psi(np.array([0.3, 0.2, 0.5]), same) < psi(np.array([0.6, 0.1, 0.3]), same)
    assert np.isfinite(psi(np.array([0.0, 0.5, 0.5]), same))  # an empty bucket is floored, not infinite


def test_a_sample_of_the_training_distribution_is_stable_and_a_shifted_one_drifts():
    prep = prepare(_table(5000, 0), PrepSpec(target="y")).preprocessor
    fresh = drift_table(prep, _table(2000, 1)).set_index("column")
    assert fresh.loc["x", "psi"] < 0.05 and fresh.loc["c", "psi"] < 0.05 and not fresh["drifted"].any()
    moved = drift_table(prep, _table(2000, 1, shift=1.0)).set_index("column")
    assert moved.loc["x", "psi"] > 0.25 and moved.loc["x", "drifted"] and not moved.loc["c", "drifted"]


def test_unseen_categories_are_their_own_bucket_and_their_share_is_reported():
    prep = prepare(_table(3000, 0), PrepSpec(target="y")).preprocessor
    rows = _table(1000, 2)
    rows.loc[:399, "c"] = "z"
    rows.loc[400:449, "c"] = None  # missing: filled with the most frequent value, as the model fills it
    drift = drift_table(prep, rows).set_index("column")
    assert drift.loc["c", "unseen_share"] == pytest.approx(0.4) and drift.loc["c", "missing_share"] == pytest.approx(0.05)
    assert drift.loc["c", "drifted"]


def test_a_model_logged_before_the_deciles_were_kept_is_compared_with_a_normal_distribution(tmp_path):
    prep = prepare(_table(5000, 0), PrepSpec(target="y")).preprocessor
    prep.save(tmp_path / "p.json")
    old = json.loads((tmp_path / "p.json").read_text())
    for column in old["numeric"]:
        del column["deciles"], column["decile_shares"]
    for column in old["categorical"]:
        del column["shares"]
    legacy = Preprocessor.from_dict(old)
    drift = drift_table(legacy, _table(2000, 1)).set_index("column")
    assert drift.loc["x", "psi"] < 0.05  # the training data was normal: the assumption holds
    assert np.isnan(drift.loc["c", "psi"]) and drift.loc["c", "unseen_share"] == 0
