"""Table files as people write them: what pandas would read wrong, read right or refused.

Each case either reads correctly with a warning that says what was assumed, or raises a
DataError naming the file, column or line and the fix; none may train a silently wrong model.
- CSV dialect: the delimiter (comma, semicolon, tab or pipe) is detected from the first lines
  and named when it is not the comma; a header with an unmatched quote, or rows with more
  fields than the header (pandas would silently turn the first columns into the index and shift
  every column), are refused; a trailing delimiter on every row is ignored.
- A pandas row index written by `to_csv` (an unnamed first column of distinct integers) is left
  out: row order is not a feature.
- Numbers written with thousands separators or currency signs ("$1,234.50") are read as numbers
  (they would otherwise be one-hot categories), in CSV and Parquet alike.
- Dates and times, and nested Parquet values (lists, structs), are refused: no encoding of
  them would be right for every table, so the user derives numbers from them.
- Class labels that differ only by surrounding whitespace are the same class (stripped, with a
  warning); labels that differ only by case are refused.
- An integer target with more than 20 values is trained as regression: a warning says so and
  how to force classification.
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pandas.api import types

from tasks.errors import DataError

log = logging.getLogger("fitflow")

DELIMITERS = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}
_MAX_HEADER_BYTES = 1 << 20  # a header longer than this is not a header
_SNIFF_LINES = 50  # data lines read to decide the delimiter
_SAMPLE = 1000  # values looked at before a whole column is parsed
_NUMBER_WITH_SYMBOLS = re.compile(r"^\s*([-+]?)\s*([$€£¥]?)\s*([-+]?)(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?\s*([$€£¥]?)\s*$")
_ISO_DATE = re.compile(r"^\s*\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?)?(?:Z|[+-]\d{2}:?\d{2})?\s*$")


@dataclass(frozen=True)
class Dialect:
    delimiter: str
    header: list[str]


def csv_dialect(path: Path) -> Dialect:
    """The delimiter and the column names of a CSV file, from its first lines."""
    with path.open("rb") as handle:
        first = handle.readline(_MAX_HEADER_BYTES + 1)
        if len(first) > _MAX_HEADER_BYTES and not first.endswith(b"\n"):
            raise DataError(f"data file {path}: its first line is over {_MAX_HEADER_BYTES >> 20} MB without a line break; "
                            "the first line must be the header row")
        lines = [handle.readline(_MAX_HEADER_BYTES) for _ in range(_SNIFF_LINES)]
    try:
        header_line = first.decode("utf-8-sig").rstrip("\r\n")
        sample = [line.decode("utf-8", errors="replace").rstrip("\r\n") for line in lines if line.strip()]
    except UnicodeDecodeError:
        raise DataError(f"data file {path} is not UTF-8 text; re-save it as UTF-8") from None
    if header_line.count('"') % 2:
        raise DataError(f"data file {path}: the header (line 1) has an unmatched quote (\"); fix the column names")
    delimiter = _delimiter(header_line, sample)
    if delimiter != ",":
        log.warning("data file %s: columns are separated by %ss (%r), detected from its first lines",
                    path, DELIMITERS[delimiter], delimiter)
    return Dialect(delimiter, _fields(header_line, delimiter))


def _fields(line: str, delimiter: str) -> list[str]:
    return next(csv.reader([line], delimiter=delimiter), [])


def _delimiter(header: str, sample: list[str]) -> str:
    """The comma, unless it does not split the header but another delimiter splits the header and
    every sampled line into the same number of fields."""
    consistent = {d: len(_fields(header, d)) for d in DELIMITERS
                  if len(_fields(header, d)) > 1 and all(len(_fields(line, d)) == len(_fields(header, d)) for line in sample)}
    if "," in consistent or not consistent:
        return ","
    return max(consistent, key=consistent.get)


def fit_rows_to_header(frame: pd.DataFrame, path: Path, dialect: Dialect, read) -> pd.DataFrame:
    """`frame` as read by pandas, unless its rows have more fields than the header: pandas then
    makes the first columns the index and shifts the rest. A trailing delimiter on rows (empty
    extra fields) is ignored by reading again with `read(index_col=False)`; any other extra field
    is a DataError naming its line."""
    if isinstance(frame.index, pd.RangeIndex):
        return frame
    width = len(dialect.header)
    with path.open(newline="", encoding="utf-8-sig") as handle:
        for line, row in enumerate(csv.reader(handle, delimiter=dialect.delimiter), 1):
            if len(row) > width and any(field.strip() for field in row[width:]):
                raise DataError(f"data file {path} line {line} has {len(row)} fields but the header names {width} columns; "
                                f"quote values that contain {dialect.delimiter!r}, or name every column in the header")
    log.warning("data file %s: rows end with an extra %r and an empty field; it is ignored", path, dialect.delimiter)
    return read(index_col=False)


def without_written_index(frame: pd.DataFrame, path: Path, header: list[str]) -> pd.DataFrame:
    """Leave out a row index that pandas' `to_csv` wrote: an unnamed first column of distinct integers."""
    if not header or header[0].strip() or frame.shape[1] < 2:
        return frame
    first = frame.iloc[:, 0]
    if types.is_integer_dtype(first) and first.is_unique:
        log.warning("data file %s: the first column has no name and numbers the rows (a row index written by "
                    "pandas' to_csv); it is left out, since row order is not a feature", path)
        return frame.iloc[:, 1:]
    return frame


def numbers_with_symbols(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    """Text columns of numbers written with thousands separators or a currency sign, as numbers."""
    given = frame
    for position, name in enumerate(frame.columns):
        column = frame.iloc[:, position]
        if not (types.is_object_dtype(column) or types.is_string_dtype(column)):
            continue
        present = column.dropna().astype(str)
        present = present[present.str.strip() != ""]
        if present.empty or not present.head(_SAMPLE).str.fullmatch(_NUMBER_WITH_SYMBOLS).all():
            continue
        parts = present.str.extract(_NUMBER_WITH_SYMBOLS)
        if parts.isna()[3].any():  # the sample matched, a later value does not: text after all
            continue
        symbols = set(parts[1]) | set(parts[5])
        symbols.discard("")
        if not symbols and not parts[3].str.contains(",").any():
            continue  # plain numbers: pandas' own reading stands
        if len(symbols) > 1:
            raise DataError(f"{source} column '{name}' mixes currencies ({', '.join(sorted(symbols))}); "
                            "convert it to one currency")
        sign = np.where((parts[0] == "-") ^ (parts[2] == "-"), -1.0, 1.0)
        values = pd.Series(np.nan, index=column.index)
        values[present.index] = sign * (parts[3].str.replace(",", "") + parts[4].fillna("")).astype(float).to_numpy()
        log.warning("%s column '%s': numbers written with %s (e.g. %r) are read as numbers", source, name,
                    "a currency sign" if symbols else "thousands separators", present.iloc[0])
        if frame is given:  # the caller's frame stays as it was
            frame = frame.copy()
        frame.isetitem(position, values)
    return frame


def refuse_unencodable(table: pd.DataFrame, what: str) -> None:
    """Dates and times (a datetime column, or ISO-formatted text) and nested values (lists,
    structs, maps) are refused, read from CSV and Parquet alike."""
    for name in table.columns:
        column = table[name]
        present = column.dropna()
        example = present.iloc[0] if len(present) else None
        dates = types.is_datetime64_any_dtype(column) or (
            (types.is_object_dtype(column) or types.is_string_dtype(column)) and len(present) > 0
            and present.head(_SAMPLE).astype(str).str.fullmatch(_ISO_DATE).all())
        if dates:
            raise DataError(f"column '{name}' of {what} holds dates or times (e.g. {str(example)!r}), which fitflow does not "
                            "encode; drop it, or replace it with numbers (day of week, hour, days since a date)")
        if isinstance(example, (list, tuple, dict, np.ndarray)):
            raise DataError(f"column '{name}' of {what} holds nested values ({type(example).__name__}s, e.g. "
                            f"{str(example)[:40]}); flatten it into one column per value")


def same_labels(table: pd.DataFrame, target: str) -> pd.DataFrame:
    """Text labels stripped of surrounding whitespace (with a warning); labels that differ only
    by case are a DataError."""
    labels = table[target]
    if not (types.is_object_dtype(labels) or types.is_string_dtype(labels)):
        return table
    text = labels.dropna().astype(str)
    stripped = text.str.strip()
    if (stripped != text).any():
        example = text[stripped != text].iloc[0]
        log.warning("target '%s': labels with surrounding whitespace (e.g. %r) are the same class as without it", target, example)
        table = table.copy()
        table.loc[text.index, target] = stripped
    variants = pd.Series(stripped.unique())
    folded = variants.str.casefold()
    clash = folded[folded.duplicated(keep=False)]
    if len(clash):
        names = sorted(variants[folded == clash.iloc[0]])
        raise DataError(f"target '{target}' has labels that differ only by case ({', '.join(map(repr, names))}); "
                        "write each class one way")
    return table


def warn_integer_codes(labels: pd.Series, requested: str, task: str, max_classes: int) -> None:
    """Say so when an integer target became a regression only because it has many values."""
    if requested != "auto" or task != "regression" or types.is_bool_dtype(labels):
        return
    values = pd.to_numeric(labels.dropna(), errors="coerce")
    if len(values) and values.notna().all() and bool(np.all(np.mod(values, 1) == 0)):
        log.warning("target '%s' holds %d distinct integers, more than %d: it is trained as a regression; if they are "
                    "class codes, set task: classification (--task classification)", labels.name, values.nunique(), max_classes)
