"""The rows a model trained or was validated on, as fingerprints, so that the registry's gate can
leave them out when it scores that model on another run's test split: a new data version that
keeps the old rows, or a split with another seed, puts rows the champion learned from into the
newcomer's test split, where the champion would look better than it is.

A row's fingerprint is a 64-bit hash (pandas' `hash_pandas_object`) of its values in the model's
input columns: numbers as float64 (3 read as an integer and 3.0 are one value), anything else as
text, missing as missing. The targets are left out: a row whose label was corrected is still a row
the model saw. A number read as text in one version (a column with a stray word) hashes apart from
the same number read as a number: such rows count as unseen. Two different rows share a
fingerprint with a probability of about n^2 / 2^65 (3e-8 for a million rows).
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass

import numpy as np
import pandas as pd

ARTIFACT_DIR, ARTIFACT_NAME = "fitflow", "seen_rows.npz"  # on the registered run: fitflow/seen_rows.npz


@dataclass(frozen=True)
class SeenRows:
    columns: list[str]  # the model's input columns, in its order
    fingerprints: np.ndarray  # sorted, unique uint64

    @classmethod
    def of(cls, frames: list[pd.DataFrame], columns: list[str]) -> SeenRows:
        prints = [row_fingerprints(frame, columns) for frame in frames if len(frame)]
        return cls(list(columns), np.unique(np.concatenate(prints)) if prints else np.empty(0, np.uint64))

    def seen(self, frame: pd.DataFrame) -> np.ndarray:
        """For each row of `frame`, whether it is one of these rows. KeyError: `frame` lacks an input column."""
        missing = [name for name in self.columns if name not in frame.columns]
        if missing:
            raise KeyError(f"the rows lack the input column(s) {', '.join(map(repr, missing))}")
        return np.isin(row_fingerprints(frame, self.columns), self.fingerprints)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, columns=np.array(self.columns, dtype=str), fingerprints=self.fingerprints)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> SeenRows:
        """ValueError: `data` is not what to_bytes wrote (truncated, another file)."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as saved:  # plain arrays only: nothing is unpickled
                return cls([str(name) for name in saved["columns"]], saved["fingerprints"].astype(np.uint64))
        except (zipfile.BadZipFile, KeyError, OSError, EOFError, ValueError, TypeError) as err:
            raise ValueError(f"not a seen-rows file ({type(err).__name__}: {err})") from None


def row_fingerprints(frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
    canonical = pd.DataFrame({str(i): _canonical(frame[name]) for i, name in enumerate(columns)}, index=frame.index)
    return pd.util.hash_pandas_object(canonical, index=False).to_numpy(np.uint64)


def _canonical(column: pd.Series) -> pd.Series:
    if pd.api.types.is_bool_dtype(column) or pd.api.types.is_numeric_dtype(column):
        return column.astype("float64")
    return column.astype("string")
