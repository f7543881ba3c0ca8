"""The `images` data kind, step 1: find the images and their labels (`index_images`).

Three layouts, detected from the path:
- `folders`: one sub-folder per class (torchvision's ImageFolder layout, searched recursively);
  the class names are the sorted folder names, as `ImageFolder.find_classes` gives them;
- `splits`: `train/` plus `val/` and/or `test/`, each in that layout, used as given (a missing
  `val/` or `test/` is carved out of `train/` by `prepare_images`); the classes are train's;
- `manifest`: a CSV or Parquet file with an image-path column (relative to the manifest's
  folder) and a label column. Labels written `a|b` (any number of classes, one included) make
  it multi-label (tasks/labels.py): the classes are the sorted union of the labels, and an
  empty label is an image with none of them; `task: multilabel` reads single labels so too,
  `task: classification` reads `a|b` as one class name.

Files in a class folder whose suffix is not an image's (.png .jpg .jpeg .bmp .webp, any case),
and AppleDouble `._*` files, are skipped rather than refused: `.DS_Store`, `Thumbs.db` and
README files are routine in real folders, and refusing them would make users clean folders
that ImageFolder accepts. The count is logged and reported in `facts` as `skipped_files`.
Hidden folders and `__MACOSX/` are not classes. A manifest names each file on purpose, so its
rows are never skipped by suffix: a file there that is not an image fails when decoded.
Only the file list and sizes are read here; pixels are decoded by prepare (a sample) and the
loaders (the rest), which name any corrupt file.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from tasks.data import load_table
from tasks.errors import DataError
from tasks.labels import SEPARATOR, is_label_set_column, label_set_classes, parse_label_sets

log = logging.getLogger("fitflow")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")
PATH_COLUMNS = ("path", "image", "file", "filename")  # tried in this order when path_column is not given


def find_path_column(columns) -> str | None:
    """A manifest's image-path column: the first of PATH_COLUMNS it has (any case), or None."""
    lower = {str(c).lower(): c for c in columns}
    return next((lower[name] for name in PATH_COLUMNS if name in lower), None)
SPLIT_NAMES = ("train", "val", "test")
_EDGE = 4096  # bytes hashed from each end of a file: the digest reads <= 8 KiB per image


@dataclass
class ImageSource:
    """What `index_images` found: no pixels, only paths, labels and sizes."""

    root: str  # the resolved folder (a manifest's own folder); item paths are absolute
    layout: str  # folders | splits | manifest
    classes: list[str]
    # "all" (folders, manifest) or train/val/test: (path, class index), or (path, class indices) for multilabel
    splits: dict[str, list[tuple[str, int | tuple[int, ...]]]]
    sizes: dict[str, list[int]]  # bytes of each file, in the order of `splits`
    skipped: int = 0  # non-image files left out (and manifest rows without a label)
    target: str = "label"  # the manifest's label column; "label" for folders
    task: str = "classification"  # or multilabel (a manifest of "a|b" labels)
    _digest: str | None = field(default=None, repr=False, compare=False)

    @property
    def n_images(self) -> int:
        return sum(len(items) for items in self.splits.values())

    def as_frame(self) -> pd.DataFrame:
        """The index as a table (path relative to the root, label, split, bytes): what MLflow logs as the dataset."""
        rows = [(os.path.relpath(path, self.root), self.label_text(label), name, size)
                for name in sorted(self.splits)
                for (path, label), size in zip(self.splits[name], self.sizes[name])]
        return pd.DataFrame(rows, columns=["path", "label", "split", "bytes"])

    def label_text(self, label: int | tuple[int, ...]) -> str:
        """A class name, or a multi-label set as `a|b`."""
        return SEPARATOR.join(self.classes[i] for i in label) if isinstance(label, tuple) else self.classes[label]

    def digest(self) -> str:
        """sha256 of the root, classes, and per file: relative path, label, size and its first
        and last 4 KiB. The Prefect cache key of the prepared data: it changes when a file is
        added, removed, relabelled or rewritten (a rewrite that keeps the size and both ends
        is the one change it misses), and not on `touch` or a copy that only changes mtimes.
        The root is in it because the prepared data holds absolute paths. Cost: one open and
        <= 8 KiB read per file: 0.34 s for 20k 4 KB JPEGs in the page cache (listing them: 0.08 s)."""
        if self._digest is None:
            hasher = hashlib.sha256(repr((self.root, self.layout, self.classes)).encode())
            for name in sorted(self.splits):
                for (path, label), size in zip(self.splits[name], self.sizes[name]):
                    rel = os.path.relpath(path, self.root)
                    hasher.update(f"\0{name}\0{rel}\0{label}\0{size}\0".encode())
                    hasher.update(_edges(path, size))
            self._digest = hasher.hexdigest()
        return self._digest


def index_images(source: str, target: str | None = None, path_column: str | None = None,
                 task: str = "auto") -> ImageSource:
    """Detect the layout of `source` (see the module docstring) and list its images.

    `task` (a manifest's): auto, multilabel or classification, as the module docstring says."""
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"image data not found: {source}; pass a folder of class sub-folders or a CSV/Parquet manifest")
    path = path.resolve()
    if path.is_file():
        if path.suffix.lower() not in MANIFEST_SUFFIXES:
            raise DataError(f"{path} is a file but not a manifest; "
                            "pass a folder of class sub-folders or a .csv/.parquet manifest")
        return _index_manifest(path, target, path_column, task)
    subdirs = {entry.name for entry in _class_dirs(path)}
    if "train" in subdirs and subdirs & {"val", "test"}:
        return _index_splits(path, subdirs)
    classes, items, sizes, skipped = _index_folder(path)
    _log_skipped(path, skipped)
    return ImageSource(str(path), "folders", classes, {"all": items}, {"all": sizes}, skipped)


# --- folders -----------------------------------------------------------------------------------


def _index_splits(root: Path, subdirs: set[str]) -> ImageSource:
    ignored = sorted(subdirs - set(SPLIT_NAMES))
    if ignored:
        log.warning("image folder %s: ignoring %s beside train/val/test", root, ", ".join(ignored))
    classes, train, train_sizes, skipped = _index_folder(root / "train")
    splits, sizes = {"train": train}, {"train": train_sizes}
    for name in ("val", "test"):
        if name in subdirs:
            split_classes, items, split_sizes, more = _index_folder(root / name, known=classes)
            # _index_folder numbered the split's own classes; renumber them as train's
            remap = [classes.index(c) for c in split_classes]
            splits[name], sizes[name] = [(p, remap[label]) for p, label in items], split_sizes
            skipped += more
    _log_skipped(root, skipped)
    return ImageSource(str(root), "splits", classes, splits, sizes, skipped)


def _index_folder(folder: Path, known: list[str] | None = None,
                  ) -> tuple[list[str], list[tuple[str, int]], list[int], int]:
    """Classes, (path, label) items, sizes and the skipped count of one ImageFolder-layout folder.

    With `known` (train's classes) this is a val/test folder: its classes must be among them,
    and one class is enough.
    """
    dirs = _class_dirs(folder)
    if not dirs:
        if any(folder.iterdir()):
            raise DataError(f"image folder {folder} holds files but no class sub-folders; "
                            "move each class's images into a sub-folder named after the class")
        raise DataError(f"image folder {folder} is empty; "
                        "put one sub-folder per class in it, each holding that class's images")
    classes = [entry.name for entry in dirs]
    if known is None and len(classes) < 2:
        raise DataError(f"image folder {folder} has a single class folder ('{classes[0]}'); "
                        "classification needs at least two: add one sub-folder per class")
    if known is not None:
        unknown = [c for c in classes if c not in known]
        if unknown:
            raise DataError(f"class folder {folder / unknown[0]} is not a class of {folder.parent / 'train'}; "
                            f"add '{unknown[0]}' images to train/ or remove the folder")
    items, sizes, skipped = [], [], 0
    for label, entry in enumerate(dirs):
        found, found_sizes, more = _walk(Path(entry.path))
        if not found:
            raise DataError(f"class folder {entry.path} holds no images ({' '.join(IMAGE_SUFFIXES)}); "
                            "add images or remove the folder")
        items += [(p, label) for p in found]
        sizes += found_sizes
        skipped += more
    return classes, items, sizes, skipped


def _class_dirs(folder: Path) -> list[os.DirEntry]:
    with os.scandir(folder) as entries:
        dirs = [e for e in entries if e.is_dir() and not e.name.startswith(".") and e.name != "__MACOSX"]
    return sorted(dirs, key=lambda e: e.name)


def _walk(folder: Path) -> tuple[list[str], list[int], int]:
    """Image files under `folder` (recursively, sorted, symlinks followed as ImageFolder does)."""
    paths, sizes, skipped = [], [], 0
    with os.scandir(folder) as listing:
        entries = sorted(listing, key=lambda e: e.name)
    for entry in entries:
        if entry.is_dir():
            if not entry.name.startswith("."):
                more_paths, more_sizes, more = _walk(Path(entry.path))
                paths += more_paths
                sizes += more_sizes
                skipped += more
        elif entry.name.lower().endswith(IMAGE_SUFFIXES) and not entry.name.startswith("._"):
            paths.append(entry.path)
            sizes.append(entry.stat().st_size)
        else:
            skipped += 1
    return paths, sizes, skipped


def _log_skipped(root: Path, skipped: int) -> None:
    if skipped:
        log.warning("image folder %s: skipped %d file(s) that are not images (%s)",
                    root, skipped, " ".join(IMAGE_SUFFIXES))


# --- manifest ------------------------------------------------------------------------------


def _index_manifest(manifest: Path, target: str | None, path_column: str | None, task: str = "auto") -> ImageSource:
    table = load_table(str(manifest))
    columns = [str(c) for c in table.columns]
    if path_column is None:
        path_column = find_path_column(columns)
        if path_column is None:
            raise DataError(f"manifest {manifest} has no image-path column (looked for {', '.join(PATH_COLUMNS)}; "
                            f"columns are {', '.join(columns[:20])}); rename it or set path_column")
    elif path_column not in columns:
        raise DataError(f"manifest {manifest} has no column '{path_column}' (columns are {', '.join(columns[:20])}); fix path_column")
    target = target or "label"
    if target not in columns:
        raise DataError(f"manifest {manifest} has no label column '{target}' (columns are {', '.join(columns[:20])}); "
                        "name it 'label' or set --target")
    labels = table[target]
    if task == "multilabel" or (task == "auto" and is_label_set_column(labels)):
        return _index_multilabel_manifest(manifest, table, path_column, target)
    unlabelled = int(labels.isna().sum())
    if unlabelled:
        log.warning("manifest %s: dropping %d row(s) without a '%s' label", manifest, unlabelled, target)
        table, labels = table[labels.notna()], labels[labels.notna()]
    names = labels.astype(str).str.strip() if not pd.api.types.is_numeric_dtype(labels) else labels.astype(str)
    # numeric labels sort as numbers (2 before 10); text labels as text, like folder names
    unique = (labels if pd.api.types.is_numeric_dtype(labels) else names).drop_duplicates().sort_values()
    classes = list(dict.fromkeys(unique.astype(str)))
    if len(classes) < 2:
        raise DataError(f"manifest {manifest} has a single label in '{target}' ({classes[0]!r}); classification needs at least two classes")
    index = {name: i for i, name in enumerate(classes)}
    items, sizes = _manifest_files(manifest, table, path_column, [index[name] for name in names])
    return ImageSource(str(manifest.parent), "manifest", classes, {"all": items}, {"all": sizes}, unlabelled, target)


def _index_multilabel_manifest(manifest: Path, table: pd.DataFrame, path_column: str, target: str) -> ImageSource:
    """`a|b` labels: every row is kept, an empty label is an image with none of the classes."""
    sets = parse_label_sets(table[target])
    classes = label_set_classes(sets)
    if not classes:
        raise DataError(f"manifest {manifest} has no labels in '{target}' (every row is empty); label the images")
    index = {name: i for i, name in enumerate(classes)}
    items, sizes = _manifest_files(manifest, table, path_column, [tuple(index[n] for n in labels) for labels in sets])
    return ImageSource(str(manifest.parent), "manifest", classes, {"all": items}, {"all": sizes}, 0, target, "multilabel")


def _manifest_files(manifest: Path, table: pd.DataFrame, path_column: str, labels: list) -> tuple[list, list[int]]:
    """(absolute path, label) items and file sizes of the manifest's rows; a file that does not exist is an error."""
    items, sizes, missing = [], [], []
    for row, (raw, label) in enumerate(zip(table[path_column], labels)):
        file = manifest.parent / str(raw) if isinstance(raw, str) and raw.strip() else None
        size = _size(file) if file is not None else None
        if size is None:
            missing.append((int(table.index[row]) + 1, raw))
            continue
        items.append((str(file), label))
        sizes.append(size)
    if missing:
        row, raw = missing[0]
        raise DataError(f"manifest {manifest} names {len(missing)} file(s) that do not exist, the first: {raw!r} (row {row}); "
                        f"paths are relative to {manifest.parent}: fix them or remove those rows")
    return items, sizes


def _size(file: Path) -> int | None:
    try:
        stat = file.stat()
    except OSError:  # missing, or a broken link
        return None
    return stat.st_size if file.is_file() else None


def _edges(path: str, size: int) -> bytes:
    """The first and last 4 KiB of a file (the whole file when it is <= 8 KiB)."""
    try:
        with open(path, "rb") as handle:
            if size <= 2 * _EDGE:
                return handle.read()
            head = handle.read(_EDGE)
            handle.seek(-_EDGE, os.SEEK_END)
            return head + handle.read(_EDGE)
    except OSError as err:
        raise DataError(f"image {path} cannot be read ({err.strerror}); check that it exists and is readable") from None


def images_to_score(source: str, path_column: str | None = None) -> pd.DataFrame:
    """The images `fitflow predict` scores: `path` (absolute) and `label` where one is known.

    A folder: every image under it, recursively; an image inside a sub-folder gets that
    folder's name as its label (class folders score with accuracy), one at the top level none.
    A manifest: its path column (relative to the manifest) and its `label` column if it has one.
    """
    root = Path(source).expanduser().resolve()
    if root.is_dir():
        paths, _, skipped = _walk(root)
        _log_skipped(root, skipped)
        if not paths:
            raise DataError(f"image folder {root} holds no images ({' '.join(IMAGE_SUFFIXES)}); point --data at your images")
        labels = [Path(p).parent.name if Path(p).parent != root else None for p in paths]
        return pd.DataFrame({"path": paths, "label": labels})
    table = load_table(str(root))
    column = path_column or find_path_column(table.columns)
    if column is None or column not in table.columns:
        raise DataError(f"manifest {root} has no image-path column (looked for {', '.join(PATH_COLUMNS)}); rename it")
    files = [root.parent / str(raw) for raw in table[column]]
    missing = [str(raw) for raw, file in zip(table[column], files) if not file.is_file()]
    if missing:
        raise DataError(f"manifest {root} names {len(missing)} file(s) that do not exist, the first: {missing[0]!r}; "
                        f"paths are relative to {root.parent}")
    frame = pd.DataFrame({"path": [str(f) for f in files]})
    if "label" in table.columns:
        frame["label"] = table["label"].astype(str).where(table["label"].notna(), None).to_numpy()
    return frame
