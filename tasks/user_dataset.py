"""The `dataset` data kind: the user's own torch Datasets, from a factory named by import path.

`data: "mypkg.data:make_datasets"` with `data_kwargs` calls `make_datasets(**data_kwargs)`, which
returns train, val and optionally test splits, like a LightningDataModule's loaders but without a
base class: a dict {"train", "val" (or "validation"), "test"?, "collate_fn"?, "classes"?, "task"?},
a tuple (train, val[, test]) or an object with those attributes. A split is a map-style Dataset
(anything with __len__ and __getitem__) or a DataLoader, which is then used as it is (its batch
size, sampler and workers win; it cannot be sharded for DDP). Items are (x, y): x a tensor, a
tuple/list or a dict of tensors; y a class index (classification) or a float (regression).

Without a test split, the validation split doubles as the test split, and facts say so
(`test_split: "val"`). Carving a test split out of train instead would change the training set
the user chose and could cut across groups the user kept together (a subject, a day), leaking
them into the test; a test score that is optimistic because the model was selected on the same
rows is the smaller and visible cost.

Every mistake in the user's code or data is one line, ConfigError (the name) or DataError
(what the factory does or returns), naming the factory. UserDatasets holds the user's objects:
it is not picklable in general, so Prefect must not cache it (cache the factory's name and
kwargs, not its result).
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import reduce
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, DistributedSampler, IterableDataset, Subset, default_collate

from tasks.checkout import REPO
from tasks.errors import ConfigError, DataError
from tasks.loaders import Loaders, worker_seed_generator
from tasks.tensor_inputs import TensorPreprocessor

log = logging.getLogger("fitflow")

TASKS = ("classification", "regression", "multilabel")
_KEYS = ("train", "val", "validation", "test", "collate_fn", "classes", "task")


@dataclass
class DatasetInfo:
    """What the rest of the pipeline needs to know, named as tasks/preprocessing.Preprocessor names it."""

    task: str
    classes: list[str] | None
    target_mean: float | None = None  # user targets are not scaled
    target_std: float | None = None
    n_features: int | None = None  # no feature columns: see in_shape
    in_shape: tuple[int, ...] | None = None  # one sample's x shape; None when x is a tuple or dict


@dataclass
class UserDatasets:
    factory: str
    train: Any  # a map-style Dataset or a DataLoader, as the factory returned it
    val: Any
    test: Any  # the val split itself when the factory returned no test split; None: no test split (Python API)
    collate_fn: Callable | None
    info: DatasetInfo
    facts: dict[str, int | str] = field(default_factory=dict)

    @property
    def test_is_val(self) -> bool:
        return self.test is self.val

    @property
    def preprocessor(self) -> TensorPreprocessor:
        """What the logged model needs at prediction time: arrays in, the task's columns out."""
        return TensorPreprocessor(self.info.task, self.info.classes, list(self.info.in_shape) if self.info.in_shape else None)


def load_factory(path: str, kwargs: dict[str, Any] | None = None) -> UserDatasets:
    """Import and call the factory `path` ('pkg.module:function') and check what it returns."""
    factory = _import_factory(path)
    source = f"data factory '{path}'"
    if not isinstance(kwargs or {}, Mapping) or not all(isinstance(key, str) for key in kwargs or {}):
        raise ConfigError(f"data_kwargs for '{path}' must map argument names (strings) to values")
    try:
        result = factory(**(kwargs or {}))
    except Exception as err:  # the user's code: any exception is the user's to fix
        raise _bad(source, f"raised {_describe(err)}") from None
    parts = _parts(source, result)
    if parts.get("test") is None:
        parts["test"] = parts["val"]
        log.info("%s returned no test split: the val split doubles as the test split", source)
    return datasets_from(source, path, parts)


def datasets_from(source: str, name: str, parts: dict[str, Any]) -> UserDatasets:
    """Check the splits (dict values as `_parts` reads a factory's result) and look at their items.

    `name` is what the run calls the data (the factory's import path); `source` starts every
    error message ("data factory 'pkg.mod:make'", or the argument of the Python API). Without
    a test split (the Python API tests on what is given to `evaluate`), `test` is None.
    """
    splits = {split: _checked_split(source, split, parts.get(split)) for split in ("train", "val", "test")}
    collate_fn = parts.get("collate_fn")
    if collate_fn is not None and not callable(collate_fn):
        raise _bad(source, f"collate_fn is {_type_of(collate_fn)}, not a function")
    task, classes, in_shape = _inspect(source, splits, collate_fn, parts.get("task"), parts.get("classes"))
    info = DatasetInfo(task=task, classes=classes, in_shape=in_shape)
    facts: dict[str, int | str] = {"task": task, **{f"rows_{split}": _rows(data) for split, data in splits.items()
                                                    if data is not None}}
    if splits["test"] is not None:
        facts["test_split"] = "val" if splits["test"] is splits["val"] else "given"
    if classes is not None:
        facts["n_classes"] = len(classes)
    log.info("%s: %s, %d train / %d val%s", source, task, facts["rows_train"], facts["rows_val"],
             "" if splits["test"] is None else f" / {facts['rows_test']} test rows" + (
                 " (test = val)" if facts["test_split"] == "val" else ""))
    return UserDatasets(name, splits["train"], splits["val"], splits["test"], collate_fn, info, facts)


def make_dataset_loaders(
    prepared: UserDatasets,
    batch_size: int,
    drop_last: bool = False,
    num_workers: int = 0,
    pin_memory: bool = False,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Loaders:
    """DataLoaders over the user's datasets; DataLoaders the factory returned are used as they are.

    Train is shuffled by torch's DistributedSampler (also for one process): the order is a pure
    function of (seed, epoch), and `fit` sets the epoch, so a resumed run sees the order the
    uninterrupted one had. Under DDP `batch_size` is the global batch (each rank takes
    batch_size // world_size), as in tasks/loaders.py; without drop_last the sampler repeats up to
    world_size - 1 rows so that every rank runs the same number of steps. Val and test are read in
    order, every item once, rank r taking items r, r + world_size, ..., in batches of the train
    batch's size (items may be large images: no bigger evaluation batch as for tables).
    """
    splits = {name: split for name, split in
              (("train", prepared.train), ("val", prepared.val), ("test", prepared.test)) if split is not None}
    if world_size > 1:
        given = [name for name, split in splits.items() if isinstance(split, DataLoader)]
        if given:
            raise ConfigError(f"data factory '{prepared.factory}' returned DataLoaders for {', '.join(given)}: "
                              "they cannot be sharded across DDP processes; return Datasets, or train on one device")
        for name, split in splits.items():
            if len(split) < world_size:
                raise ConfigError(f"the {name} split has fewer rows than the {world_size} DDP processes; "
                                  "use fewer devices")
        if batch_size < world_size:
            raise ConfigError(f"batch_size {batch_size} is smaller than the {world_size} DDP processes; raise it")
    per_rank = batch_size // world_size
    collate = _Collate(prepared.collate_fn, prepared.info.task)
    common = {"collate_fn": collate, "num_workers": num_workers, "pin_memory": pin_memory,
              "persistent_workers": num_workers > 0}

    def loader(split, train: bool):
        if isinstance(split, DataLoader):
            return split
        if train:
            sampler = DistributedSampler(split, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                         drop_last=drop_last)
        else:
            sampler = _EveryNth(len(split), rank, world_size)
        return DataLoader(split, batch_size=per_rank, sampler=sampler, drop_last=drop_last and train,
                          generator=worker_seed_generator(seed), **common)

    val = loader(prepared.val, False)
    return Loaders(train=loader(prepared.train, True), val=val,
                   test=val if prepared.test is prepared.val else None if prepared.test is None else loader(prepared.test, False))


class _EveryNth(torch.utils.data.Sampler[int]):
    """Items rank, rank + world_size, ... in order: the ranks' shards are disjoint and cover the split."""

    def __init__(self, n: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, n, world_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


class _Collate:
    """The user's collate_fn (or torch's default), then targets as the loss wants them.

    Classification: int64 class indices, (batch,). Regression: float32, (batch, 1), as the table
    path's targets are, so that MSELoss(model(x), y) never broadcasts (batch,) against (batch, 1).
    Multilabel: float32 0/1, (batch, classes).
    A class, not a closure: DataLoader workers started by spawn pickle it.
    """

    def __init__(self, collate_fn: Callable | None, task: str) -> None:
        self.collate_fn, self.task = collate_fn, task

    def __call__(self, items):
        x, y = (self.collate_fn or default_collate)(items)
        y = torch.as_tensor(y)
        return x, (y.long().reshape(-1) if self.task == "classification" else y.float().reshape(len(y), -1))


# --- importing and calling the factory ---------------------------------------------------------


def _import_factory(path: str) -> Callable:
    source = f"data factory '{path}'"
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise _bad(source, "must be 'package.module:function' (a colon before the function's name)", ConfigError)
    for folder in (os.getcwd(), str(REPO)):  # appended: an installed package of the same name still wins
        if folder not in sys.path:
            sys.path.append(folder)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise _bad(source, f"no module named '{err.name}' in the current directory "
                              f"({os.getcwd()}), the fitflow checkout or the installed packages; check the name, "
                              "or run from the folder that holds the package", ConfigError) from None
        raise _bad(source, f"importing {module_name} raised {_describe(err)}") from None
    except Exception as err:
        raise _bad(source, f"importing {module_name} raised {_describe(err)}") from None
    try:
        factory = reduce(getattr, attribute.split("."), module)
    except AttributeError:
        names = [name for name, value in vars(module).items()  # its own functions and classes, not its imports
                 if not name.startswith("_") and callable(value) and getattr(value, "__module__", None) == module_name]
        close = difflib.get_close_matches(attribute, names, n=1, cutoff=0.4)
        hint = f"did you mean '{close[0]}'?" if close else f"it defines: {', '.join(names[:15]) or 'no functions'}"
        raise _bad(source, f"module {module_name} has no attribute '{attribute}'; {hint}", ConfigError) from None
    if not callable(factory):
        raise _bad(source, f"is {_type_of(factory)}, not a function to call", ConfigError)
    return factory


def _parts(source: str, result: Any) -> dict[str, Any]:
    """What the factory returned, as a dict with the keys of _KEYS ('validation' read as 'val')."""
    if isinstance(result, Mapping):
        unknown = [key for key in result if key not in _KEYS]
        if unknown:
            raise _bad(source, f"returned a dict with unknown key(s) {', '.join(map(repr, unknown))}; "
                            f"the keys are {', '.join(_KEYS)}")
        parts = dict(result)
    elif isinstance(result, (tuple, list)) and not _is_split(result):
        if len(result) not in (2, 3):
            raise _bad(source, f"returned a {type(result).__name__} of {len(result)} items; "
                            "return (train, val) or (train, val, test)")
        parts = dict(zip(("train", "val", "test"), result))
    elif hasattr(result, "train") and not _is_split(result):  # torchvision's MNIST has a .train flag
        parts = {key: getattr(result, key) for key in _KEYS if getattr(result, key, None) is not None}
    else:
        what = "a single dataset" if _is_split(result) else _type_of(result)
        raise _bad(source, f"returned {what}; return a dict {{'train': ..., 'val': ..., 'test': ...}}, "
                        "a tuple (train, val[, test]) or an object with .train and .val")
    if "validation" in parts:
        if parts.get("val") is not None:
            raise _bad(source, "returned both 'val' and 'validation'; return one of them")
        parts["val"] = parts.pop("validation")
    for name in ("train", "val"):
        if parts.get(name) is None:
            raise _bad(source, f"returned no {name} split; it must return train and val (test is optional)")
    return parts


def _is_split(value: Any) -> bool:
    """A map-style dataset: torch's, or anything with __len__ and __getitem__ that is not plain data."""
    if isinstance(value, DataLoader):
        return True
    if isinstance(value, (str, bytes, Mapping, torch.Tensor, np.ndarray, IterableDataset)):
        return False
    if isinstance(value, (tuple, list)):  # a list of (x, y) pairs is a dataset; (train, val) is not
        return len(value) > 0 and all(isinstance(item, (tuple, list)) and len(item) == 2 and not _is_split(item[0])
                                      for item in value[:2])
    return hasattr(value, "__len__") and hasattr(value, "__getitem__")


def _checked_split(source: str, name: str, split: Any) -> Any:
    if split is None:
        return None
    if isinstance(split, IterableDataset):
        raise _bad(source, f"the {name} split is an IterableDataset; return a map-style Dataset, "
                        "or wrap it in a DataLoader (used as it is)")
    if not _is_split(split):
        raise _bad(source, f"the {name} split is {_type_of(split)}, "
                        "not a torch Dataset (with __len__ and __getitem__) or a DataLoader")
    try:
        rows = _rows(split)
        batches = len(split) if isinstance(split, DataLoader) else rows
    except TypeError:
        raise _bad(source, f"the {name} DataLoader has no length (its dataset has no __len__); "
                        "the loop needs the number of batches") from None
    if rows == 0 or batches == 0:
        raise _bad(source, f"the {name} split is empty")
    return split


def _rows(split: Any) -> int:
    return len(split.dataset) if isinstance(split, DataLoader) else len(split)


# --- looking at the items --------------------------------------------------------------------


def _inspect(source: str, splits: dict[str, Any], collate_fn: Callable | None, task: Any, classes: Any):
    """(task, classes, in_shape) from one item of train, a collated batch, and the labels."""
    if task is not None and task not in TASKS:
        raise _bad(source, f"task is {task!r}; it must be one of {', '.join(TASKS)}")
    train = splits["train"]
    if isinstance(train, DataLoader):
        where = "the first batch of the train DataLoader"
        x, y = _pair(source, where, _first_batch(source, train))
        _check_x(source, where, x)
        kind = _label_kind(source, where, y, batched=True)
        in_shape = tuple(x.shape[1:]) if isinstance(x, torch.Tensor) else None
    else:
        where = "train[0]"
        x, y = _pair(source, where, _item(source, "train", train, 0))
        if collate_fn is None:  # with a collate_fn, items may be raw (text, arrays): the batch is checked below
            _check_x(source, where, x)
        kind = _label_kind(source, where, y, batched=False)
        in_shape = tuple(x.shape) if isinstance(x, torch.Tensor) else None
        items = [_item(source, "train", train, i) for i in range(min(2, len(train)))]
        try:
            batch = (collate_fn or default_collate)(items)
        except Exception as err:
            hint = "" if collate_fn else "; items of different shapes need a collate_fn that pads or packs them"
            raise _bad(source, f"collating train[0] and train[1] raised {_describe(err)}{hint}") from None
        bx, _ = _pair(source, "a collated batch of train", batch)
        _check_x(source, "a collated batch of train", bx)
        if in_shape is None and isinstance(bx, torch.Tensor):
            in_shape = tuple(bx.shape[1:])
    if task is None:
        task = "multilabel" if kind == "multi" else "classification" if kind == "int" or classes is not None else "regression"
    if task == "multilabel":
        return task, _label_names(source, where, y, classes, batched=isinstance(train, DataLoader)), in_shape
    if kind == "multi":
        raise _bad(source, f"y of {where} is a 0/1 vector (multi-label) but the task is {task}; "
                        "return task 'multilabel' (or no task), or one label per item")
    if task == "classification" and kind != "int":
        raise _bad(source, f"the task is classification but y of {where} is a float; "
                        "return class indices 0..n-1 as int or a 0-d int64 tensor")
    if task == "regression":
        if classes is not None:
            raise _bad(source, "returned classes with task 'regression'; drop one of them")
        return task, None, in_shape
    return task, _classes(source, splits, classes), in_shape


def _item(source: str, name: str, split: Any, index: int) -> Any:
    try:
        return split[index]
    except Exception as err:
        raise _bad(source, f"reading {name}[{index}] raised {_describe(err)}") from None


def _first_batch(source: str, loader: DataLoader) -> Any:
    try:
        return next(iter(loader))
    except Exception as err:
        raise _bad(source, f"reading the first batch of the train DataLoader raised {_describe(err)}") from None


def _pair(source: str, where: str, item: Any) -> tuple[Any, Any]:
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item[0], item[1]
    if isinstance(item, (tuple, list)):
        what = f"a {type(item).__name__} of {len(item)} items"
    elif isinstance(item, Mapping):
        what = f"a dict with keys {', '.join(map(repr, list(item)[:6]))}"
    else:
        what = _type_of(item)
    raise _bad(source, f"{where} is {what}; items must be (x, y) pairs")


def _check_x(source: str, where: str, x: Any) -> None:
    if isinstance(x, torch.Tensor):
        return
    if isinstance(x, (tuple, list)) and x and all(isinstance(part, torch.Tensor) for part in x):
        return
    if isinstance(x, Mapping) and x and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in x.items()):
        return
    raise _bad(source, f"x of {where} is {_type_of(x)}; x must be a tensor, a tuple/list of tensors "
                    "or a dict of tensors (torch.from_numpy converts arrays)")


def _label_kind(source: str, where: str, y: Any, batched: bool) -> str:
    """'int' (a class index), 'float' (a regression target) or 'multi' (a float 0/1 vector, one
    value per class: multi-label); other labels are refused."""
    if isinstance(y, (bool, int, np.integer)) and not batched:
        return "int"
    if isinstance(y, (float, np.floating)) and not batched:
        return "float"
    if isinstance(y, torch.Tensor):
        shape = tuple(y.shape[1:] if batched else y.shape)
        floating = y.is_floating_point()
        if shape in ((), (1,)) and (floating or shape == ()):
            return "float" if floating else "int"
        if floating and len(shape) == 1 and bool(((y == 0) | (y == 1)).all()):
            return "multi"  # one 0/1 per class: multi-label
        raise _bad(source, f"y of {where} is a {y.dtype} tensor of shape {shape}; y must be a class "
                        "index (int or 0-d int tensor) or one float (regression)")
    raise _bad(source, f"y of {where} is {_type_of(y)}; y must be a class index (int or 0-d int "
                    "tensor) or one float (regression)")


def _label_names(source: str, where: str, y: Any, classes: Any, batched: bool) -> list[str]:
    """Multilabel: `classes` as given (one name per value of y), or '0'..'k-1'."""
    if not isinstance(y, torch.Tensor) or not y.is_floating_point() or y.dim() != 1 + batched:
        raise _bad(source, f"the task is multilabel but y of {where} is not a float vector; "
                        "return y as a float tensor of 0/1, one value per class")
    width = y.shape[-1]
    if classes is None:
        return [str(i) for i in range(width)]
    if isinstance(classes, (str, bytes)) or not hasattr(classes, "__len__") or len(classes) != width:
        raise _bad(source, f"classes must name each of the {width} values of y of {where}; got {_type_of(classes)}")
    return [str(name) for name in classes]


def _classes(source: str, splits: dict[str, Any], classes: Any) -> list[str]:
    """The class names: `classes` as given, or '0'..'max label', checked against the labels."""
    if classes is not None:
        if isinstance(classes, (str, bytes)) or not hasattr(classes, "__len__"):
            raise _bad(source, f"classes is {_type_of(classes)}; it must be a list of class names")
        classes = [str(name) for name in classes]
        if len(classes) < 2:
            raise _bad(source, f"classes has {len(classes)} name; classification needs at least 2 classes")
    labels = {}
    for name, split in splits.items():
        if split is None or (name == "test" and split is splits["val"]):
            continue
        cheap = None if isinstance(split, DataLoader) else _cheap_labels(split)
        if cheap is None and classes is not None:
            continue  # the names are given: reading every item just to check them is not worth it
        labels[name] = cheap if cheap is not None else _scan_labels(source, name, split)
    for name, values in labels.items():
        if len(values) and values.min() < 0:
            raise _bad(source, f"the {name} split has label {int(values.min())}; labels must be class indices 0..n-1")
        if classes is not None and len(values) and values.max() >= len(classes):
            raise _bad(source, f"the {name} split has label {int(values.max())} but classes has "
                            f"{len(classes)} names (labels 0..{len(classes) - 1})")
    if classes is not None:
        return classes
    n = 1 + max(int(values.max()) for values in labels.values() if len(values))
    if n < 2:
        raise _bad(source, "every label is 0 (one class only); classification needs at least 2 classes")
    return [str(i) for i in range(n)]


def _cheap_labels(split: Any) -> np.ndarray | None:
    """All labels without reading the items: a `targets`/`labels` attribute (torchvision's datasets
    have one), through Subset (random_split) and ConcatDataset; None when there is none to trust."""
    if isinstance(split, Subset):
        inner = _cheap_labels(split.dataset)
        return None if inner is None else inner[np.asarray(split.indices, dtype=np.int64)]
    if isinstance(split, ConcatDataset):
        parts = [_cheap_labels(part) for part in split.datasets]
        return None if any(part is None for part in parts) else np.concatenate(parts)
    if getattr(split, "target_transform", None) is not None:  # the attribute holds the labels before it
        return None
    for name in ("targets", "labels"):
        values = getattr(split, name, None)
        if values is None or isinstance(values, (str, bytes)):
            continue
        try:
            array = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values)
        except Exception:  # not an array of labels after all
            continue
        if array.ndim == 1 and len(array) == len(split) and array.dtype.kind in "iub":
            return array.astype(np.int64)
    return None


def _scan_labels(source: str, name: str, split: Any) -> np.ndarray:
    """Every label of a split, read item by item (or batch by batch): slow for big decoded datasets."""
    if isinstance(split, DataLoader):
        log.info("%s: reading the whole %s DataLoader once to find the classes "
                 "(return `classes` to skip this)", source, name)
        values = []
        for batch in split:
            _, y = _pair(source, f"a batch of the {name} DataLoader", batch)
            values.append(np.asarray(torch.as_tensor(y)).reshape(-1))
        return _int_labels(source, f"the {name} DataLoader", np.concatenate(values))
    log.info("%s: reading all %d items of %s to find the classes (return `classes`, "
             "or give the dataset a `targets` attribute, to skip this)", source, len(split), name)
    values = np.empty(len(split), dtype=np.float64)
    for index in range(len(split)):
        _, y = _pair(source, f"{name}[{index}]", _item(source, name, split, index))
        if _label_kind(source, f"{name}[{index}]", y, batched=False) != "int":
            raise _bad(source, f"{name}[{index}] has a float label but train[0] an int one; "
                            "every label must be a class index")
        values[index] = int(y)
    return values.astype(np.int64)


def _int_labels(source: str, where: str, values: np.ndarray) -> np.ndarray:
    if values.dtype.kind not in "iub":
        raise _bad(source, f"{where} has float labels; every label must be a class index")
    return values.astype(np.int64)


def _bad(source: str, what: str, kind: type[Exception] = DataError) -> Exception:
    """The one-line error for a mistake in the user's factory or data; `source` says where they came from."""
    return kind(f"{source}: {what}")


def _type_of(value: Any) -> str:
    """'a numpy array of shape (2,)', 'an int', 'None': what a value is, for a message."""
    if value is None:
        return "None"
    if isinstance(value, np.ndarray):
        return f"a numpy array of shape {value.shape}"
    name = type(value).__name__
    return f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"


def _describe(err: BaseException) -> str:
    """'Type: message' on one line, cut to a readable length."""
    text = " ".join(str(err).split())
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
