"""Data preparation: read a table, check it, split it, fit the preprocessing on train only.

`load_table` and `prepare` are plain functions; flows/steps.py wraps them as Prefect tasks
(retries on I/O, a cache keyed on `content_key`: the table's content and the settings).
Every problem a user can fix raises DataError with one line that says what and how.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tasks import table_input
from tasks.config import target_columns
from tasks.errors import DataError
from tasks.labels import binary_columns, check_every_label_varies, is_label_set_column
from tasks.preprocessing import MAX_AUTO_CLASSES, Preprocessor, check_features, infer_task

log = logging.getLogger("fitflow")

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
_SNIFF_BYTES = 8192


def shipped_datasets() -> list[str]:
    """Names of the data sets in data/: tables (name.csv) and image folders (name/)."""
    return sorted({path.stem for path in DATA_DIR.glob("*.csv")} | {path.name for path in DATA_DIR.iterdir()
                                                                  if path.is_dir() and not path.name.startswith((".", "_"))})


def resolve_source(source: str) -> Path:
    """A path as given, or the file or folder of a data set shipped in data/ when `source` is its name."""
    path = Path(source).expanduser()
    if not path.exists() and path.suffix == "" and path.name == source:
        for shipped in (DATA_DIR / f"{source}.csv", DATA_DIR / source):
            if shipped.exists():
                return shipped
    if not path.exists():
        names = ", ".join(shipped_datasets())
        raise DataError(f"data file not found: {source}; check the path, or use a shipped dataset name ({names})")
    return path


def load_table(source: str) -> pd.DataFrame:
    """Read a CSV or Parquet file (chosen by its content, checked against its extension)."""
    path = resolve_source(source)
    if path.is_dir():
        raise DataError(f"data path {source} is a directory; a table is a CSV or Parquet file "
                        "(a folder of images is data_kind images)")
    try:
        with path.open("rb") as handle:
            head = handle.read(_SNIFF_BYTES)
    except PermissionError:
        raise DataError(f"data file {path} cannot be read (permission denied); fix its permissions") from None
    if not head:
        raise DataError(f"data file {path} is empty; export the table again with a header row and data rows")
    kind = _sniff_format(path, head)
    frame = _read_parquet(path) if kind == "parquet" else _read_csv(path)
    if frame.empty:
        raise DataError(f"data file {path} has a header but no data rows; it needs at least a few rows")
    return table_input.numbers_with_symbols(frame, f"data file {path}").reset_index(drop=True)


def _sniff_format(path: Path, head: bytes) -> str:
    suffix = path.suffix.lower()
    if head.startswith(b"PAR1"):
        if suffix in {".csv", ".tsv", ".txt"}:
            raise DataError(f"data file {path} ends in {suffix} but is a Parquet file; rename it to .parquet")
        return "parquet"
    if suffix in {".parquet", ".pq"}:
        raise DataError(f"data file {path} ends in {suffix} but is not a Parquet file; re-export it as Parquet or rename it to .csv if it is a CSV")
    if b"\x00" in head or not _is_text(head):
        raise DataError(f"data file {path} is not a readable CSV (binary content, or not UTF-8 text); pass a UTF-8 CSV or a Parquet file")
    return "csv"


def _is_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        return err.start > len(head) - 4  # a multi-byte character cut by the sniff window is fine
    return True


def _read_csv(path: Path) -> pd.DataFrame:
    dialect = table_input.csv_dialect(path)
    _reject_duplicate_columns(f"data file {path}", dialect.header)
    frame = table_input.fit_rows_to_header(_parse_csv(path, dialect.delimiter), path, dialect,
                                           lambda **options: _parse_csv(path, dialect.delimiter, **options))
    return table_input.without_written_index(frame, path, dialect.header)


def _parse_csv(path: Path, delimiter: str, **options) -> pd.DataFrame:
    try:
        return pd.read_csv(path, sep=delimiter, encoding="utf-8-sig", low_memory=False, **options)
    except pd.errors.EmptyDataError:
        raise DataError(f"data file {path} has no header row; the first line must name the columns") from None
    except pd.errors.ParserError as err:
        raise DataError(f"data file {path} is not a well-formed CSV ({str(err).strip()}); fix that line") from None
    except UnicodeDecodeError:
        raise DataError(f"data file {path} is not UTF-8 text; re-save it as UTF-8") from None


def _read_parquet(path: Path) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        _reject_duplicate_columns(f"data file {path}", pq.read_schema(path).names)
        return pq.read_table(path).to_pandas()
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"data file {path} is not a readable Parquet file ({err}); re-export it") from None


def _reject_duplicate_columns(what: str, names: list) -> None:
    duplicates = sorted((name for name, count in Counter(names).items() if count > 1), key=str)
    if duplicates:
        raise DataError(f"{what} has duplicate column names: {', '.join(map(repr, duplicates))}; rename them so each column is unique")


# --- preparation ------------------------------------------------------------------------


@dataclass(frozen=True)
class PrepSpec:
    """The settings that change the prepared data (and so its cache key)."""

    target: str
    task: str = "auto"
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    max_categories: int = 50
    seed: int = 42


@dataclass
class Split:
    features: np.ndarray  # float32, (rows, features)
    targets: np.ndarray  # int64 class indices, float32 multi-hot (rows, classes), or float32 scaled values


@dataclass
class Prepared:
    train: Split
    val: Split
    test: Split | None  # None: no test split (the Python API tests on the data given to `evaluate`)
    preprocessor: Preprocessor

    @property
    def facts(self) -> dict[str, int | str]:
        """Dataset facts worth logging next to the hyperparameters."""
        p = self.preprocessor
        facts: dict[str, int | str] = {
            "task": p.task,
            "rows_train": len(self.train.targets),
            "rows_val": len(self.val.targets),
        }
        if self.test is not None:
            facts["rows_test"] = len(self.test.targets)
        if p.n_features is not None:  # arrays of more than one dimension (tasks/arrays.py) have a shape instead
            facts["n_features"] = p.n_features
        if p.classes is not None:
            facts["n_classes"] = len(p.classes)
        return facts


def prepare(table: pd.DataFrame, spec: PrepSpec, validation: pd.DataFrame | None = None) -> Prepared:
    """Split the table (stratified for classification) and fit the preprocessing on train only.

    `spec.test_fraction` 0 cuts no test split (the Python API's fit: Keras' semantics, the test
    data is what the user gives to `evaluate`); the flow's config never allows it.
    """
    targets = target_columns(spec.target)
    _require_targets(table, targets, "data")
    if len(targets) > 1 and spec.task in ("classification", "regression"):  # TrainConfig refuses it too; PrepSpec is plain
        raise DataError(f"target '{spec.target}' names several columns, a multi-label target; task {spec.task} "
                        "predicts one column: use task auto or multilabel")
    if len(targets) == 1 and not is_label_set_column(table[spec.target]):
        table = table_input.same_labels(table, spec.target)
        validation = None if validation is None else table_input.same_labels(validation, spec.target)
    task = "multilabel" if len(targets) > 1 else infer_task(table[spec.target].dropna(), spec.task)
    if len(targets) == 1:
        table_input.warn_integer_codes(table[spec.target], spec.task, task, MAX_AUTO_CLASSES)
    label_sets = task == "multilabel" and len(targets) == 1  # one column of "a|b": an empty cell is no labels
    if len(targets) > 1:  # before rows are dropped, so that the error's row is the file's
        binary_columns(table, targets, "the data")
    table = _without_missing_targets(table, targets, label_sets)
    table_input.refuse_unencodable(table, "the data")
    check_features(table, spec.target)
    # Splits are row positions into `table`, never copies of it: fitting and encoding read one
    # column of one split at a time, so the peak stays near the table plus the float32 features.
    labels = table[targets[0]]  # stratification (classification only) needs one column
    if validation is None:
        train_rows, val_rows, test_rows = split_rows(labels, task, spec)
    else:
        _require_targets(validation, targets, "validation data")
        if len(targets) > 1:
            binary_columns(validation, targets, "the validation data")
        validation = _without_missing_targets(validation, targets, label_sets)
        table_input.refuse_unencodable(validation, "the validation data")
        check_features(validation, spec.target)
        no_val = PrepSpec(**{**asdict(spec), "val_fraction": 0.0})
        train_rows, _, test_rows = split_rows(labels, task, no_val)
    preprocessor = Preprocessor.fit(table, spec.target, task, spec.max_categories, rows=train_rows)
    train = encode_split(preprocessor, table, train_rows)
    test = encode_split(preprocessor, table, test_rows) if spec.test_fraction > 0 else None
    val = encode_split(preprocessor, table, val_rows) if validation is None else encode_split(preprocessor, validation, None)
    if task == "multilabel":
        check_every_label_varies(train.targets, preprocessor.classes, f"the training split of '{spec.target}'")
    log.info("prepared %s: %d train / %d val / %d test rows, %d features",
             task, len(train.targets), len(val.targets), len(test.targets) if test else 0, preprocessor.n_features)
    return Prepared(train=train, val=val, test=test, preprocessor=preprocessor)


def raw_test_rows(table: pd.DataFrame, spec: PrepSpec, task: str, validation_given: bool = False) -> pd.DataFrame:
    """The raw rows of the test split that `prepare` cuts from `table` (the same rows, in order):
    what another model, with its own preprocessing, is scored on to be compared on this run's test data."""
    return raw_splits(table, spec, task, validation_given)[2]


def raw_splits(table: pd.DataFrame, spec: PrepSpec, task: str,
               validation_given: bool = False) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The raw rows of the train, validation and test splits that `prepare` cuts from `table`, in order
    (with a validation file, the validation split cut from `table` is empty)."""
    targets = target_columns(spec.target)
    table = _without_missing_targets(table, targets, task == "multilabel" and len(targets) == 1)
    split = PrepSpec(**{**asdict(spec), "val_fraction": 0.0}) if validation_given else spec
    rows = split_rows(table[targets[0]], task, split)
    return tuple(table.iloc[part].reset_index(drop=True) for part in rows)


def encode_split(preprocessor: Preprocessor, frame: pd.DataFrame, rows: np.ndarray | None) -> Split:
    """Features and targets of `frame` (its `rows`, or all) with a fitted preprocessing; the Python API
    encodes evaluate's DataFrame with it too."""
    labels = frame[preprocessor.target_columns]
    return Split(preprocessor.transform(frame, rows), preprocessor.encode_target(labels if rows is None else labels.iloc[rows]))


def _require_targets(table: pd.DataFrame, targets: list[str], what: str) -> None:
    """Each target column is in the table, and has values."""
    _reject_duplicate_columns(f"the {what}", list(table.columns))  # a frame built in memory, not read by load_table
    for name in targets:
        if name not in table.columns:
            close = difflib.get_close_matches(name, [str(c) for c in table.columns], n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"columns are: {', '.join(map(str, table.columns[:20]))}"
            raise DataError(f"target column '{name}' is not in the {what}; {hint} (set --target)")
        if table[name].isna().all():
            raise DataError(f"target column '{name}' has no values (all missing); pick a column with labels")


def _without_missing_targets(table: pd.DataFrame, targets: list[str], label_sets: bool) -> pd.DataFrame:
    """The rows with a value in every target column (a row of label sets may be empty: no labels)."""
    missing = table[targets].isna().any(axis=1)
    if missing.any() and not label_sets:
        log.warning("dropping %d rows whose target '%s' is missing", int(missing.sum()), ",".join(targets))
        table = table[~missing.to_numpy()].reset_index(drop=True)
    return table


def split_rows(labels: pd.Series, task: str, spec: PrepSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row positions of train/val/test, reproducible from the seed, stratified by class."""
    rng = np.random.default_rng(spec.seed)
    groups = [np.arange(len(labels))]
    if task == "classification":
        codes = pd.factorize(labels, sort=True)[0]
        groups = [np.flatnonzero(codes == code) for code in range(codes.max() + 1)]
    parts: list[list[np.ndarray]] = [[], [], []]
    for rows in groups:
        rows = rng.permutation(rows)
        n_test = round(len(rows) * spec.test_fraction)
        n_val = round(len(rows) * spec.val_fraction)
        parts[2].append(rows[:n_test])
        parts[1].append(rows[n_test : n_test + n_val])
        parts[0].append(rows[n_test + n_val :])
    train, val, test = (np.sort(np.concatenate(p)) for p in parts)
    needs_val = spec.val_fraction > 0
    needs_test = spec.test_fraction > 0
    if len(train) < 2 or (needs_test and len(test) < 1) or (needs_val and len(val) < 1):
        need = int(np.ceil(2 / max(1e-9, 1 - spec.val_fraction - spec.test_fraction)))
        need = max(need, int(np.ceil(1 / spec.test_fraction)) if needs_test else 0,
                   int(np.ceil(1 / spec.val_fraction)) if needs_val else 0)
        raise DataError(
            f"{len(labels)} rows are too few to split into train/validation/test "
            f"(val_fraction={spec.val_fraction}, test_fraction={spec.test_fraction}); "
            f"provide at least {need} rows{' per class' if task == 'classification' else ''}"
        )
    if task == "classification" and labels.iloc[train].nunique() < 2:
        raise DataError("the training split holds a single class; provide more rows of each class")
    return train, val, test


def content_key(table: pd.DataFrame, spec: PrepSpec, validation: pd.DataFrame | None = None) -> str:
    """Cache key from the table's content (not its path or mtime), the settings and the prep code."""
    digest = hashlib.sha256()
    for frame in (table, validation):
        if frame is not None:
            digest.update(repr(list(map(str, frame.columns))).encode())
            digest.update(_rows_digest(frame))
    digest.update(repr(sorted(asdict(spec).items())).encode())
    for module in ("data.py", "preprocessing.py", "labels.py", "config.py"):
        digest.update((Path(__file__).parent / module).read_bytes())
    return f"prepare-{digest.hexdigest()}"


def _rows_digest(frame: pd.DataFrame) -> bytes:
    try:
        return pd.util.hash_pandas_object(frame, index=False).values.tobytes()
    except TypeError:  # nested values (Parquet lists, structs) cannot be hashed; prepare refuses them with one line
        return pd.util.hash_pandas_object(frame.map(repr), index=False).values.tobytes()
