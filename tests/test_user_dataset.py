"""The `dataset` data kind (tasks/user_dataset.py): factories written into tmp_path as real modules,
what they may return, what is inferred, the loaders' order and DDP shards, every mistake as one
line, and the worked example (examples/digits_gru.py) trained with the plain loop."""

from __future__ import annotations

import logging
import sys
import textwrap
import uuid

import numpy as np
import pytest
import torch

from tasks.config import TrainConfig
from tasks.errors import ConfigError, DataError, FitflowError
from tasks.trainer import build_loaders, evaluate_on_test, train_model
from tasks.user_dataset import load_factory, make_dataset_loaders

HEAD = '''
import numpy as np, torch
from types import SimpleNamespace
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset

class Items(Dataset):
    """A map-style dataset over a list of items, without a `targets` attribute."""
    def __init__(self, items): self.items = list(items)
    def __len__(self): return len(self.items)
    def __getitem__(self, i): return self.items[i]

class Labelled(Items):
    """The same with the labels as an attribute, as torchvision's datasets have."""
    def __init__(self, items): super().__init__(items); self.targets = [y for _, y in self.items]

def pairs(n, classes=3, start=0, cls=Items):
    """Item i: (tensor [i, 1.0], i % classes)."""
    return cls((torch.tensor([float(i), 1.0]), i % classes) for i in range(start, start + n))

def items(n, x=lambda i: torch.ones(2), y=lambda i: i % 2):
    """Item i: (x(i), y(i))."""
    return Items((x(i), y(i)) for i in range(n))
'''


@pytest.fixture
def factory(tmp_path, monkeypatch):
    """write(body) -> 'module:make' for a new module HEAD + body on sys.path (restored afterwards)."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(body: str, attribute: str = "make") -> str:
        name = f"userdata_{uuid.uuid4().hex[:10]}"  # a new name each time: sys.modules caches imports
        (tmp_path / f"{name}.py").write_text(HEAD + textwrap.dedent(body))
        return f"{name}:{attribute}"

    return write


def _rows_of(loader) -> list[int]:
    """The row numbers a loader yields, in order (x[:, 0] is the row number in `pairs`)."""
    return [int(v) for x, _ in loader for v in x[:, 0]]


# --- what a factory may return ---------------------------------------------------------------


@pytest.mark.parametrize("body, test_rows", [
    ("def make(): return {'train': pairs(30), 'val': pairs(9, start=30), 'test': pairs(6, start=39)}", 6),
    ("def make(): return {'train': pairs(30), 'validation': pairs(9, start=30)}", 9),
    ("def make(): return pairs(30), pairs(9, start=30)", 9),
    ("def make(): return [pairs(30), pairs(9, start=30), pairs(6, start=39)]", 6),
    ("def make(): return SimpleNamespace(train=pairs(30), val=pairs(9, start=30), test=pairs(6, start=39))", 6),
    ("def make(): return {'train': list(pairs(30)), 'val': pairs(9, start=30)}", 9),
], ids=["dict", "validation-key", "tuple-2", "list-3", "object", "list-of-pairs"])
def test_the_return_shapes_a_factory_may_use(factory, body, test_rows):
    prepared = load_factory(factory(body), {})
    assert prepared.facts == {"task": "classification", "rows_train": 30, "rows_val": 9, "rows_test": test_rows,
                              "test_split": "val" if test_rows == 9 else "given", "n_classes": 3}
    assert prepared.test_is_val == (test_rows == 9)
    loaders = make_dataset_loaders(prepared, batch_size=8)
    assert sorted(_rows_of(loaders.train)) == list(range(30))
    assert _rows_of(loaders.val) == list(range(30, 39))  # in order, every item
    assert len(_rows_of(loaders.test)) == test_rows


def test_without_a_test_split_val_doubles_as_test_and_says_so(factory, caplog):
    with caplog.at_level(logging.INFO, logger="fitflow"):
        prepared = load_factory(factory("def make(): return pairs(30), pairs(9, start=30)"), {})
    assert prepared.test is prepared.val and prepared.facts["test_split"] == "val"
    assert "the val split doubles as the test split" in caplog.text
    loaders = make_dataset_loaders(prepared, batch_size=8)
    assert loaders.test is loaders.val


def test_kwargs_reach_the_factory(factory):
    path = factory("def make(n=5, classes=2): return pairs(n, classes), pairs(4, classes, start=n)")
    prepared = load_factory(path, {"n": 12, "classes": 4})
    assert prepared.facts["rows_train"] == 12 and prepared.info.classes == ["0", "1", "2", "3"]


def test_dataloaders_are_used_as_they_are(factory):
    path = factory("""
        def make():
            return {'train': DataLoader(pairs(30), batch_size=7, shuffle=True),
                    'val': DataLoader(pairs(9, start=30), batch_size=4)}
    """)
    prepared = load_factory(path, {})
    assert prepared.info.task == "classification" and prepared.info.classes == ["0", "1", "2"]
    assert prepared.info.in_shape == (2,)  # a batch's shape less its batch dimension
    loaders = make_dataset_loaders(prepared, batch_size=64)
    assert loaders.train is prepared.train and loaders.val is prepared.val  # their batch size wins
    with pytest.raises(ConfigError, match="cannot be sharded across DDP processes"):
        make_dataset_loaders(prepared, batch_size=64, rank=0, world_size=2)


# --- what is inferred from the items ---------------------------------------------------------


def test_int_labels_are_classes_0_to_max_read_from_targets_when_there(factory, caplog):
    with caplog.at_level(logging.INFO, logger="fitflow"):
        attr = load_factory(factory("def make(): return pairs(20, 4, cls=Labelled), pairs(8, 4, cls=Labelled)"), {})
    assert attr.info.classes == ["0", "1", "2", "3"] and "to find the classes" not in caplog.text
    with caplog.at_level(logging.INFO, logger="fitflow"):
        scanned = load_factory(factory("def make(): return pairs(20, 4), pairs(8, 4, start=20)"), {})
    assert scanned.info.classes == ["0", "1", "2", "3"] and "reading all 20 items of train" in caplog.text
    # random_split's Subsets read their labels through the parent's `targets`
    split = load_factory(factory("""
        def make():
            whole = pairs(40, 5, cls=Labelled)
            return Subset(whole, range(0, 30)), Subset(whole, range(30, 40))
    """), {})
    assert split.info.classes == ["0", "1", "2", "3", "4"]


def test_given_classes_and_task_win(factory):
    path = factory("def make(): return {'train': pairs(20, 2), 'val': pairs(6), 'classes': ['a', 'b', 'c']}")
    named = load_factory(path, {})
    assert named.info.classes == ["a", "b", "c"] and named.facts["n_classes"] == 3
    counts = load_factory(factory("def make(): return {'train': pairs(20), 'val': pairs(6), 'task': 'regression'}"), {})
    assert counts.info.task == "regression" and counts.info.classes is None
    _, y = next(iter(make_dataset_loaders(counts, batch_size=4).train))
    assert y.dtype == torch.float32 and y.shape == (4, 1)  # int counts as regression targets


def test_float_labels_are_regression_and_collate_to_batch_by_1(factory):
    path = factory("""
        def make():
            x = lambda i: torch.randn(3, 5)
            return items(20, x, lambda i: i / 7), items(6, x, lambda i: torch.tensor(0.5))
    """)
    prepared = load_factory(path, {})
    assert prepared.info.task == "regression" and prepared.info.classes is None
    assert prepared.info.in_shape == (3, 5) and prepared.info.target_mean is None and prepared.info.n_features is None
    assert "n_classes" not in prepared.facts
    loaders = make_dataset_loaders(prepared, batch_size=8)
    for loader in (loaders.train, loaders.val):
        x, y = next(iter(loader))
        assert x.shape[1:] == (3, 5) and y.dtype == torch.float32 and y.shape == (len(x), 1)


def test_float_0_1_vectors_are_multilabel_and_train_with_a_sigmoid_per_class(factory, one_thread):
    path = factory("""
        def make():
            g = torch.Generator().manual_seed(0)
            x = torch.randn(360, 6, generator=g)
            y = torch.stack([x[:, 0] > 0, x[:, 1] + x[:, 2] > 0.5, x[:, 3] < -0.5], dim=1).float()
            return {"train": TensorDataset(x[:300], y[:300]), "val": TensorDataset(x[300:], y[300:]),
                    "classes": ["a", "b", "c"]}
    """)
    prepared = load_factory(path, {})
    assert prepared.info.task == "multilabel" and prepared.info.classes == ["a", "b", "c"]
    assert load_factory(factory("def make(): return items(8, y=lambda i: torch.tensor([1., 0.])), "
                                "items(4, y=lambda i: torch.tensor([0., 1.]))"), {}).info.classes == ["0", "1"]
    config = TrainConfig(data=path, epochs=15, lr=3e-3)
    loaders = build_loaders(config, prepared)
    _, y = next(iter(loaders.train))
    assert y.dtype == torch.float32 and y.shape == (64, 3)
    trained = train_model(config, prepared, loaders, progress=False)
    metrics = evaluate_on_test(config, prepared, loaders, trained)
    assert metrics["test_f1_micro"] > 0.85, metrics  # 0.946 measured; predicting every label everywhere scores 0.59
    decoded = prepared.preprocessor.decode(np.array([[3.0, -3.0, 0.5], [-3.0, -3.0, -3.0]], dtype=np.float32))
    assert list(decoded["prediction"]) == ["a|c", ""] and list(decoded.columns[1:]) == [f"probability_{c}" for c in "abc"]


def test_tuple_and_dict_inputs_pass_through_with_no_in_shape(factory):
    tuples = load_factory(factory("def make(): return items(10, lambda i: (torch.ones(4), torch.zeros(2))), pairs(4)"),
                          {})
    assert tuples.info.in_shape is None
    x, y = next(iter(make_dataset_loaders(tuples, batch_size=5).train))
    assert [part.shape for part in x] == [(5, 4), (5, 2)] and y.dtype == torch.int64
    dicts = load_factory(factory("""
        def make():
            x = lambda i: {'ids': torch.arange(6), 'mask': torch.ones(6)}
            return items(10, x, lambda i: torch.tensor(i % 2)), pairs(4, 2)
    """), {})
    assert dicts.info.in_shape is None and dicts.info.classes == ["0", "1"]
    x, _ = next(iter(make_dataset_loaders(dicts, batch_size=5).train))
    assert set(x) == {"ids", "mask"} and x["ids"].shape == (5, 6)


def test_a_collate_fn_may_take_raw_items(factory):
    path = factory("""
        def pad(items):
            longest = max(len(text) for text, _ in items)
            codes = torch.zeros(len(items), longest, dtype=torch.long)
            for row, (text, _) in enumerate(items):
                codes[row, :len(text)] = torch.tensor([ord(c) for c in text])
            return codes, torch.tensor([y for _, y in items])
        def make():
            words = Items((w, len(w) % 2) for w in ['a', 'bb', 'ccc', 'dddd', 'eeeee', 'ff'])
            return {'train': words, 'val': words, 'collate_fn': pad}
    """)
    prepared = load_factory(path, {})
    assert prepared.info.classes == ["0", "1"] and prepared.info.in_shape == (2,)  # from the collated batch
    x, y = next(iter(make_dataset_loaders(prepared, batch_size=6).val))
    assert x.shape == (6, 5) and y.tolist() == [1, 0, 1, 0, 1, 0]


# --- the loaders: order and shards -----------------------------------------------------------


def test_the_shuffle_is_a_pure_function_of_seed_and_epoch(factory):
    prepared = load_factory(factory("def make(): return pairs(50), pairs(10, start=50)"), {})
    first, second = (make_dataset_loaders(prepared, batch_size=8, seed=3).train for _ in range(2))
    orders = {}
    for epoch in (1, 2, 3):
        first.sampler.set_epoch(epoch)  # as tasks.training.fit does before each epoch
        orders[epoch] = _rows_of(first)
        assert sorted(orders[epoch]) == list(range(50))
    second.sampler.set_epoch(3)  # a resumed run jumps to epoch 3 without replaying 1 and 2
    assert _rows_of(second) == orders[3]
    assert _rows_of(second) == orders[3]  # iterating does not move the epoch on: set_epoch does
    assert len({tuple(order) for order in orders.values()}) == 3
    other_seed = make_dataset_loaders(prepared, batch_size=8, seed=4).train
    other_seed.sampler.set_epoch(1)
    assert _rows_of(other_seed) != orders[1]


@pytest.mark.parametrize("n", [40, 41])
def test_ddp_shards_are_disjoint_and_cover_every_row(factory, n):
    prepared = load_factory(factory(f"def make(): return pairs({n}), pairs({n}, start=100)"), {})
    train, val = {}, {}
    for rank in (0, 1):
        loaders = make_dataset_loaders(prepared, batch_size=8, seed=1, rank=rank, world_size=2)
        loaders.train.sampler.set_epoch(2)
        assert loaders.train.batch_size == 4  # batch_size is the global batch, as for tables
        train[rank], val[rank] = _rows_of(loaders.train), _rows_of(loaders.val)
    assert len(train[0]) == len(train[1])  # the same number of steps on each rank
    assert set(train[0]) | set(train[1]) == set(range(n))
    # an odd row count: DistributedSampler repeats one row so that both ranks get as many
    assert len(set(train[0]) & set(train[1])) == n % 2
    assert sorted(val[0] + val[1]) == list(range(100, 100 + n)) and not set(val[0]) & set(val[1])
    assert val[0] == sorted(val[0])  # in order


def test_worker_processes_yield_the_same_batches(factory):
    prepared = load_factory(factory("def make(): return pairs(40), pairs(9, start=40)"), {})
    in_process, workers = (make_dataset_loaders(prepared, batch_size=8, seed=2, num_workers=n) for n in (0, 2))
    assert workers.train.persistent_workers and not in_process.train.persistent_workers
    for loader in (in_process.train, workers.train):
        loader.sampler.set_epoch(5)
    assert _rows_of(workers.train) == _rows_of(in_process.train)
    assert _rows_of(workers.val) == list(range(40, 49))


@pytest.mark.parametrize("workers", [0, 2])
def test_loaders_leave_torch_global_generator_alone(factory, workers):
    """As tests/test_training.py's table loader: an iterator's start draws no dropout state."""
    prepared = load_factory(factory("def make(): return pairs(40), pairs(9, start=40)"), {})
    loaders = make_dataset_loaders(prepared, batch_size=8, seed=2, num_workers=workers)
    state = torch.get_rng_state()
    for _ in range(2):
        list(loaders.train), list(loaders.val)
    assert torch.equal(torch.get_rng_state(), state)


def test_drop_last_drops_the_partial_train_batch_only(factory):
    prepared = load_factory(factory("def make(): return pairs(30), pairs(9, start=30)"), {})
    loaders = make_dataset_loaders(prepared, batch_size=8, drop_last=True)
    assert [len(x) for x, _ in loaders.train] == [8, 8, 8]
    assert [len(x) for x, _ in loaders.val] == [8, 1]


# --- every mistake is one line naming the factory --------------------------------------------


BAD_FACTORIES = {  # case: (module body after HEAD, what the message must say, ...)
    "module raises": ("raise RuntimeError('no GPU here')", "importing userdata_", "RuntimeError: no GPU here"),
    "missing dependency": ("import not_a_real_package", "ModuleNotFoundError", "not_a_real_package"),
    "attribute missing": ("def make_datasets(): pass", "has no attribute 'make'", "did you mean 'make_datasets'"),
    "not callable": ("make = [1, 2]", "is a list, not a function", ""),
    "factory raises": ("def make(): raise ValueError('bad\\nsplit')", "raised ValueError: bad split", ""),
    "wrong kwargs": ("def make(n): return pairs(n), pairs(n)", "raised TypeError", "unexpected keyword argument 'm'"),
    "returns None": ("def make(): return None", "returned None", "a tuple (train, val[, test])"),
    "returns one dataset": ("def make(): return pairs(10)", "returned a single dataset", ""),
    "returns 4 splits": ("def make(): return pairs(5), pairs(5), pairs(5), pairs(5)", "a tuple of 4 items", ""),
    "no val": ("def make(): return {'train': pairs(5)}", "returned no val split", ""),
    "unknown key": ("def make(): return {'train': pairs(5), 'valid': pairs(5)}", "unknown key(s) 'valid'",
                    "the keys are train, val"),
    "val and validation": ("def make(): return {'train': pairs(5), 'val': pairs(5), 'validation': pairs(5)}",
                           "both 'val' and 'validation'", ""),
    "split not a dataset": ("def make(): return {'train': pairs(5), 'val': 42}", "the val split is an int",
                            "not a torch Dataset"),
    "split a tensor": ("def make(): return {'train': torch.zeros(5, 2), 'val': pairs(5)}",
                       "the train split is a Tensor", ""),
    "empty split": ("def make(): return pairs(5), pairs(0)", "the val split is empty", ""),
    "iterable dataset": ("class S(IterableDataset):\n  def __iter__(self): yield from pairs(5)\n"
                         "def make(): return S(), pairs(5)",
                         "the train split is an IterableDataset", "wrap it in a DataLoader"),
    "getitem raises": ("class D(Items):\n  def __getitem__(self, i): raise KeyError(i)\n"
                       "def make(): return D([1]), pairs(5)",
                       "reading train[0] raised KeyError: 0", ""),
    "item not a pair": ("def make(): return Items((torch.ones(2), 0, 'x') for _ in range(5)), pairs(5)",
                        "train[0] is a tuple of 3 items", "(x, y) pairs"),
    "item a dict": ("def make(): return Items({'x': torch.ones(2), 'y': 0} for _ in range(5)), pairs(5)",
                    "train[0] is a dict with keys 'x', 'y'", ""),
    "x numpy": ("def make(): return items(5, x=lambda i: np.ones(2)), pairs(5)",
                "x of train[0] is a numpy array of shape (2,)", "torch.from_numpy"),
    "x a string": ("def make(): return items(5, x=lambda i: 'text'), pairs(5)", "x of train[0] is a str", ""),
    "y a string": ("def make(): return items(5, y=lambda i: 'cat'), pairs(5)", "y of train[0] is a str", "class index"),
    "y multi-label, task classification": ("def make(): return {'train': items(5, y=lambda i: torch.tensor([0., 1., 1.])), "
                                           "'val': pairs(5), 'task': 'classification'}",
                                           "0/1 vector (multi-label) but the task is classification", "'multilabel'"),
    "multilabel classes of another width": ("def make(): return {'train': items(5, y=lambda i: torch.tensor([0., 1., 1.])), "
                                            "'val': pairs(5), 'classes': ['a', 'b']}",
                                            "classes must name each of the 3 values", ""),
    "multilabel y an int": ("def make(): return {'train': pairs(5), 'val': pairs(5), 'task': 'multilabel'}",
                            "the task is multilabel but y of train[0] is not a float vector", ""),
    "y a 2-d tensor": ("def make(): return items(5, y=lambda i: torch.zeros(2, 2, dtype=torch.long)), pairs(5)",
                       "torch.int64 tensor of shape (2, 2)", ""),
    "float y, classification": ("def make(): return {'train': items(4, y=lambda i: 1.5), 'val': pairs(5), "
                                "'task': 'classification'}", "the task is classification but y of train[0] is a float"),
    "bad task": ("def make(): return {'train': pairs(5), 'val': pairs(5), 'task': 'ranking'}", "task is 'ranking'",
                 "classification, regression, multilabel"),
    "one class": ("def make(): return pairs(5, 1), pairs(5, 1)", "one class only", ""),
    "label beyond classes": ("def make(): return {'train': pairs(9, cls=Labelled), 'val': pairs(5), "
                             "'classes': ['a', 'b']}", "the train split has label 2 but classes has 2 names", ""),
    "negative label": ("def make(): return items(6, y=lambda i: -1 if i == 3 else i % 2), pairs(5)",
                       "the train split has label -1", "class indices"),
    "float label in scan": ("def make(): return items(6, y=lambda i: 0.5 if i == 3 else i % 2), pairs(5)",
                            "train[3] has a float label", ""),
    "shapes differ": ("def make(): return items(4, x=lambda i: torch.ones(i + 1)), pairs(5)",
                      "collating train[0] and train[1] raised RuntimeError", "need a collate_fn that pads"),
    "collate_fn not callable": ("def make(): return {'train': pairs(5), 'val': pairs(5), 'collate_fn': 'pad'}",
                                "collate_fn is a str, not a function", ""),
}


@pytest.mark.parametrize("case", BAD_FACTORIES, ids=list(BAD_FACTORIES))
def test_every_mistake_is_one_line_naming_the_factory(factory, case):
    body, *expected = BAD_FACTORIES[case]
    path = factory(body)
    with pytest.raises((DataError, ConfigError)) as caught:
        load_factory(path, {"m": 3} if case == "wrong kwargs" else {})
    message = str(caught.value)
    assert "\n" not in message and f"'{path}'" in message
    for part in expected:
        assert part in message, message


@pytest.mark.parametrize("path, expected", [
    ("no_colon_here", "must be 'package.module:function'"),
    ("fitflow_no_such_module_xyz:make", "no module named 'fitflow_no_such_module_xyz'"),
    ("tasks.no_such_submodule:make", "no module named 'tasks.no_such_submodule'"),
])
def test_a_bad_name_is_a_config_error(path, expected, own_sys_path):
    with pytest.raises(ConfigError) as caught:
        load_factory(path, {})
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_data_kwargs_must_be_a_dict_of_names(factory):
    path = factory("def make(**kw): return pairs(5), pairs(5)")
    for bad in ([1, 2], {1: 2}):
        with pytest.raises(ConfigError, match="must map argument names"):
            load_factory(path, bad)


def test_user_errors_are_fitflow_errors():  # the CLI turns FitflowError into one line and exit 2
    assert issubclass(DataError, FitflowError) and issubclass(ConfigError, FitflowError)


def test_too_few_rows_or_a_small_batch_for_ddp_is_a_config_error(factory):
    prepared = load_factory(factory("def make(): return pairs(10), pairs(1, start=10)"), {})
    with pytest.raises(ConfigError, match="the val split has fewer rows than the 2 DDP processes"):
        make_dataset_loaders(prepared, batch_size=8, world_size=2)
    prepared = load_factory(factory("def make(): return pairs(10), pairs(4, start=10)"), {})
    with pytest.raises(ConfigError, match="batch_size 1 is smaller than the 2 DDP processes"):
        make_dataset_loaders(prepared, batch_size=1, world_size=2)


# --- the worked example -----------------------------------------------------------------------


@pytest.fixture
def own_sys_path(monkeypatch):
    """load_factory appends the working directory and the checkout to sys.path: undone after the test."""
    monkeypatch.setattr(sys, "path", [*sys.path])


def test_the_digits_example_factory_reads_the_shipped_folder(own_sys_path):
    prepared = load_factory("examples.digits_gru:make_datasets", {})
    assert prepared.facts == {"task": "classification", "rows_train": 1259, "rows_val": 269, "rows_test": 269,
                              "test_split": "given", "n_classes": 10}
    assert prepared.info.classes == [str(d) for d in range(10)] and prepared.info.in_shape == (8, 8)
    x, _ = prepared.train[0]
    assert x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1 and float(x.max()) > 0.5
    no_test = load_factory("examples.digits_gru:make_datasets", {"test_fraction": 0.0, "seed": 1})
    assert no_test.test_is_val and no_test.facts["rows_train"] == 1797 - 269


@pytest.fixture
def one_thread():
    """One intra-op thread while a tiny model trains: as fast as two on an idle machine, and on a
    busy one 20x faster (measured 0.6 s against 13-16 s: torch's threads wait for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_digits_gru_trains_with_the_plain_loop(one_thread, own_sys_path):
    """6 epochs of the GRU over the digits' rows (1259 train images): about a second on one CPU thread."""
    from tasks.metrics import TaskMetrics
    from tasks.training import evaluate, fit, seed_everything

    prepared = load_factory("examples.digits_gru:make_datasets", {})
    from examples.digits_gru import DigitsGRU  # importable now: load_factory put the checkout on sys.path
    seed_everything(0)
    loaders = make_dataset_loaders(prepared, batch_size=32, seed=0)
    model = DigitsGRU(num_outputs=len(prepared.info.classes))
    metrics, cpu, loss_fn = TaskMetrics("classification", 10), torch.device("cpu"), torch.nn.CrossEntropyLoss()
    history = fit(model, loaders.train, loaders.val, epochs=6, optimizer=torch.optim.Adam(model.parameters(), lr=0.01),
                  loss_fn=loss_fn, metrics=metrics, device=cpu)
    assert history.history["train_loss"][-1] < history.history["train_loss"][0] / 3
    assert history.history["val_accuracy"][-1] >= 0.9
    assert evaluate(model, loaders.test, loss_fn, metrics, cpu)["test_accuracy"] >= 0.9
