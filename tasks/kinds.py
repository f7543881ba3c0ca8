"""Which kind of data a run reads: a table, images, or the user's own Dataset factory.

`data_kind: auto` decides from `data` alone, without reading more than a file's head: an
import path (`pkg.mod:function`) is a Dataset factory; a folder is images; a CSV or Parquet
file is a manifest of images when it has a path column (path, image, file or filename) whose
first values end in an image suffix, and a table otherwise. The choice is logged, so that a
file that could be read both ways says how it was read; `data_kind` overrides it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tasks.config import IMPORT_PATH
from tasks.data import resolve_source
from tasks.images import IMAGE_SUFFIXES, find_path_column

log = logging.getLogger("fitflow")


def detect_kind(data: str, requested: str = "auto") -> str:
    """`requested` when it is not auto; otherwise table, images or dataset, read off `data`."""
    if requested != "auto":
        return requested
    if IMPORT_PATH.match(data) and not Path(data).exists():
        return "dataset"
    path = resolve_source(data)
    if path.is_dir():
        return "images"
    column = _image_path_column(path)
    if column is not None:
        log.info("reading %s as a manifest of images (column '%s' names image files); "
                 "set data_kind: table to read it as a table", path.name, column)
        return "images"
    return "table"


def _image_path_column(path: Path) -> str | None:
    """The manifest's path column, when the file's head shows one; None for anything else."""
    import pandas as pd

    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            column = find_path_column(pq.ParquetFile(path).schema_arrow.names)
            head = pq.ParquetFile(path).read_row_group(0, columns=[column]).to_pandas().head(20) if column else None
        else:
            head = pd.read_csv(path, nrows=20)
            column = find_path_column(head.columns)
    except Exception:  # not a readable table: load_table gives the one-line reason
        return None
    if column is None:
        return None
    values = head[column].dropna().astype(str)
    return str(column) if len(values) and values.str.lower().str.endswith(IMAGE_SUFFIXES).all() else None
