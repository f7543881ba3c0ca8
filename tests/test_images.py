"""The `images` data kind on real files (PIL-written 16x16 images in tmp_path): layouts, decoding,
channels, splits, loaders (shuffle, DDP shards, augmentation, the decoded cache), errors, digest.
Fast and without Prefect; nothing here depends on how fast the machine is."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from image_folders import encode, pixels, write_class_folders, write_image, write_manifest, write_split_folders
from mlflow.tracking import MlflowClient
from PIL import Image

from tasks import tracking
from tasks.errors import ConfigError, DataError
from tasks.images import index_images
from tasks.images_loaders import make_image_loaders, plan_caches
from tasks.images_prepare import prepare_images, stratified_split
from tasks.images_preprocessor import ImagePreprocessor
from tasks.kinds import detect_kind
from tasks.preprocessing import Preprocessor


def _prepared(root, size=16, seed=0, **index):
    return prepare_images(index_images(str(root), **index), size, 0.2, 0.2, seed)


def _epoch(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def _one_line(err: pytest.ExceptionInfo, *names) -> str:
    message = str(err.value)
    assert "\n" not in message and all(str(name) in message for name in names), message
    return message


# --- layouts -------------------------------------------------------------------------------


def test_the_data_kind_is_read_off_data_and_can_be_forced(tmp_path):
    folder = write_class_folders(tmp_path / "pets", per_class=3)
    csv_manifest, parquet_manifest = (write_manifest(tmp_path / "m", name=name) for name in ("labels.csv", "labels.parquet"))
    notes = tmp_path / "notes.csv"  # a `path` column that names no images: a table
    pd.DataFrame({"path": ["a.txt", "b.txt"], "label": [0, 1]}).to_csv(notes, index=False)
    assert [detect_kind(str(d)) for d in (folder, csv_manifest, parquet_manifest, notes)] == ["images", "images", "images", "table"]
    assert [detect_kind(name) for name in ("digits", "breast_cancer")] == ["images", "table"]  # shipped names
    assert detect_kind("examples.digits_gru:make_datasets") == "dataset"
    assert detect_kind(str(csv_manifest), "table") == "table" and detect_kind(str(notes), "images") == "images"


def test_class_folders_give_sorted_classes_labels_and_skip_non_images(tmp_path):
    root = write_class_folders(tmp_path / "pets", classes=("owl", "cat", "dog"), per_class=4)
    write_image(root / "cat" / "nested" / "deep.PNG", pixels(0, 9))  # sub-folders count, suffix in any case
    for junk in ("cat/notes.txt", "dog/.DS_Store", "dog/Thumbs.db", "owl/._000.png"):
        (root / junk).write_bytes(b"not an image")
    write_image(root / ".ipynb_checkpoints" / "x.png", pixels(0, 0))  # a hidden folder is no class
    source = index_images(str(root))
    assert (source.layout, source.classes, source.skipped) == ("folders", ["cat", "dog", "owl"], 4)
    items = source.splits["all"]
    assert len(items) == 13 and len(source.sizes["all"]) == 13
    folders = {os.path.basename(os.path.dirname(p)): label for p, label in items if "nested" not in p}
    assert folders == {"cat": 0, "dog": 1, "owl": 2}
    assert ("nested" in items[4][0], items[4][1]) == (True, 0)
    assert all(size == os.path.getsize(p) for (p, _), size in zip(items, source.sizes["all"]))
    assert _prepared(root).facts["skipped_files"] == 4


def test_split_folders_are_used_as_given(tmp_path):
    root = write_split_folders(tmp_path / "data", classes=("cat", "dog", "eel"))
    source = index_images(str(root))
    assert (source.layout, source.classes) == ("splits", ["cat", "dog", "eel"])
    assert sorted(source.splits) == ["test", "train", "val"]
    prepared = prepare_images(source, 16, 0.2, 0.2, 0)
    assert [len(getattr(prepared, s).paths) for s in ("train", "val", "test")] == [18, 9, 9]
    assert all(f"{os.sep}val{os.sep}" in p for p in prepared.val.paths)
    assert prepared.val.targets.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # val may lack a class (the classes are train's); without test/ the test split is carved out of train
    root2 = write_split_folders(tmp_path / "two", classes=("cat", "dog", "eel"), test=False)
    for file in (root2 / "val" / "eel").iterdir():
        file.unlink()
    (root2 / "val" / "eel").rmdir()
    prepared = _prepared(root2)
    assert (len(prepared.val.paths), len(prepared.train.paths) + len(prepared.test.paths)) == (6, 18)
    assert set(prepared.test.targets.tolist()) == {0, 1, 2} and prepared.preprocessor.classes == ["cat", "dog", "eel"]


@pytest.mark.parametrize("name", ["labels.csv", "labels.parquet"])
def test_manifest_with_default_and_named_columns(tmp_path, name):
    manifest = write_manifest(tmp_path, classes=("zebra", "ant"), name=name, path_column="Image")
    source = index_images(str(manifest))
    assert (source.layout, source.classes, source.root) == ("manifest", ["ant", "zebra"], str(tmp_path))
    assert all(os.path.isfile(p) and (label == 0) == ("ant_" in p) for p, label in source.splits["all"])
    other = write_manifest(tmp_path / "b", classes=(10, 2), path_column="where", label_column="digit")
    source = index_images(str(other), target="digit", path_column="where")
    assert (source.classes, source.target) == (["2", "10"], "digit")  # numeric labels sort as numbers
    assert _prepared(other, target="digit", path_column="where").preprocessor.target == "digit"


# --- decoding and channels -----------------------------------------------------------------------


def test_mixed_modes_give_one_channel_count(tmp_path):
    colour = _prepared(write_class_folders(tmp_path / "mixed", per_class=8, modes=("L", "RGB", "RGBA", "P")))
    assert colour.preprocessor.channels == 3 and len(colour.preprocessor.mean) == 3
    grey = _prepared(write_class_folders(tmp_path / "grey", per_class=8, modes=("L", "LA", "1")))
    assert grey.preprocessor.channels == 1 and len(grey.preprocessor.std) == 1
    for prepared in (colour, grey):
        x, y = next(iter(make_image_loaders(prepared, 8).train))
        assert x.shape == (8, prepared.preprocessor.channels, 16, 16) and y.dtype == torch.int64
        assert torch.isfinite(x).all()
    # training-split normalisation: the sampled training pixels have mean ~0 and std ~1 per channel
    x = colour.preprocessor.load_images(colour.train.paths)
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-2)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".jpeg", ".bmp", ".webp"])
def test_each_format_decodes_to_its_pixels(tmp_path, suffix):
    array = pixels(1, 3)
    path = write_image(tmp_path / f"x{suffix.upper()}", array)
    prep = ImagePreprocessor(["a", "b"], 16, 3, [0.0] * 3, [1.0] * 3)
    x = prep.load_images([path])
    assert x.shape == (1, 3, 16, 16)
    error = (x[0] * 255 - torch.from_numpy(array).permute(2, 0, 1).float()).abs().mean()
    assert error < (0.01 if suffix in (".png", ".bmp") else 8)  # JPEG and PIL's WebP are lossy


def test_paths_bytes_and_arrays_agree(tmp_path):
    for channels, mode in ((3, "RGB"), (3, "RGBA"), (1, "L")):
        array = np.array(Image.fromarray(pixels(2, 4, size=20)).convert(mode))  # 20 -> 16: resize included
        path = write_image(tmp_path / f"{mode}.png", array, mode)
        prep = ImagePreprocessor(["a", "b"], 16, channels, [0.5] * channels, [0.25] * channels)
        x = prep.load_images([str(path), path, path.read_bytes(), array])
        assert x.shape == (4, channels, 16, 16)
        assert all(torch.equal(x[0], x[i]) for i in (1, 2, 3)), mode
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, 10:20] = 255  # the centre third survives the centre crop; the sides are cut
    assert ImagePreprocessor(["a", "b"], 10, 3, [0.0] * 3, [1.0] * 3).load_images([wide]).min() == 1.0


def test_preprocessor_round_trips_as_json_and_decodes_like_the_table_one(tmp_path):
    prep = ImagePreprocessor(["cat", "dog"], 32, 1, [0.4], [0.2])
    prep.save(tmp_path / "p.json")
    assert ImagePreprocessor.load(tmp_path / "p.json") == prep and '"kind": "images"' in prep.to_json()
    assert (prep.target_mean, prep.target_std, prep.n_features, prep.task) == (None, None, None, "classification")
    logits = np.array([[2.0, 0.5], [-1.0, 3.0]], dtype=np.float32)
    table = Preprocessor(target="label", task="classification", classes=["cat", "dog"]).decode(logits)
    pd.testing.assert_frame_equal(prep.decode(logits), table)
    assert prep.load_images([]).shape == (0, 1, 32, 32)


# --- splits and loaders -----------------------------------------------------------------------------


def test_stratified_split_covers_every_class_and_is_seeded():
    labels = np.repeat([0, 1, 2, 3], [3, 4, 9, 40])
    train, val, test = stratified_split(labels, 0.15, 0.15, seed=5)
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(len(labels)))
    assert all(set(labels[part]) == {0, 1, 2, 3} for part in (train, val, test))
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), stratified_split(labels, 0.15, 0.15, seed=5)))
    assert not np.array_equal(test, stratified_split(labels, 0.15, 0.15, seed=6)[2])
    assert len(test) == 1 + 1 + round(9 * 0.15) + round(40 * 0.15)


def test_loaders_yield_every_training_row_once_per_epoch(tmp_path):
    prepared = _prepared(write_class_folders(tmp_path / "p", per_class=10))
    loaders = make_image_loaders(prepared, 5, seed=3, cache="off")
    n = len(prepared.train.paths)
    for epoch in (0, 1):
        batches = _epoch(loaders.train, epoch)
        order = loaders.train.sampler.order(epoch)
        assert [len(y) for _, y in batches] == [5] * (n // 5) + ([n % 5] if n % 5 else [])
        x = torch.cat([b[0] for b in batches])
        expected = prepared.preprocessor.load_images([prepared.train.paths[i] for i in order])
        assert torch.equal(x, expected) and sorted(order.tolist()) == list(range(n))
        assert torch.equal(torch.cat([b[1] for b in batches]), prepared.train.targets[order])
    assert not torch.equal(loaders.train.sampler.order(0), loaders.train.sampler.order(1))
    val = torch.cat([x for x, _ in loaders.val])
    assert torch.equal(val, prepared.preprocessor.load_images(prepared.val.paths))  # in order, unaugmented


def test_ddp_shards_are_disjoint_and_cover_the_rows(tmp_path):
    prepared = _prepared(write_class_folders(tmp_path / "p", per_class=10))
    ranks = [make_image_loaders(prepared, 6, seed=1, rank=r, world_size=2).train for r in (0, 1)]
    shards = [list(loader.sampler) for loader in ranks]
    assert len(shards[0]) == len(shards[1]) == len(ranks[0])  # every rank runs the same number of steps
    rows = [torch.cat([rows for _, rows in shard]).tolist() for shard in shards]
    assert not set(rows[0]) & set(rows[1]) and sorted(rows[0] + rows[1]) == list(range(len(prepared.train.paths)))
    assert {epoch for shard in shards for epoch, _ in shard} == {0}
    for loader, shard in zip(ranks, shards):  # what each rank's loader yields is its shard's images
        loader.sampler.set_epoch(0)
        assert torch.equal(torch.cat([y for _, y in loader]), prepared.train.targets[torch.cat([r for _, r in shard])])


def test_augmentation_is_per_sample_reproducible_new_each_epoch_and_never_on_val(tmp_path):
    prepared = _prepared(write_class_folders(tmp_path / "p", per_class=10))
    first, again = (make_image_loaders(prepared, 4, seed=7, augment="standard", cache="off") for _ in range(2))
    epoch0 = _epoch(first.train, 0)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epoch0, _epoch(again.train, 0)))  # a resumed run's epoch 0
    dataset = first.train.dataset
    rows = torch.tensor([3, 3, 3, 3])
    same_image = dataset[(0, rows)][0]
    assert not torch.equal(same_image[0], same_image[1])  # one draw per sample, not per batch
    assert torch.equal(same_image, dataset[(0, rows)][0])
    assert not torch.equal(same_image, dataset[(1, rows)][0])  # new draws each epoch
    plain = prepared.preprocessor.load_images([prepared.train.paths[3]])[0]
    assert not torch.equal(same_image[0], plain)
    for light in (make_image_loaders(prepared, 4, seed=7, augment="light").train.dataset,):
        assert light[(0, rows)][0].shape == same_image.shape
    assert torch.equal(torch.cat([x for x, _ in first.val]), prepared.preprocessor.load_images(prepared.val.paths))


def test_cache_gives_the_same_batches_and_workers_fill_it_for_later_epochs(tmp_path):
    root = write_class_folders(tmp_path / "p", per_class=10)
    prepared = _prepared(root)
    cached = make_image_loaders(prepared, 4, seed=2, augment="light", num_workers=2, cache="on")
    plain = make_image_loaders(prepared, 4, seed=2, augment="light", num_workers=2, cache="off")
    expected = {e: _epoch(plain.train, e) for e in (0, 1)}
    val = [x for x, _ in plain.val]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(_epoch(cached.train, 0), expected[0]))
    assert all(torch.equal(a, b) for a, (b, _) in zip(val, cached.val))
    for file in root.rglob("*.png"):  # epoch 1 must come from the cache the workers filled in epoch 0
        file.unlink()
    assert all(torch.equal(a[0], b[0]) for a, b in zip(_epoch(cached.train, 1), expected[1]))
    assert all(torch.equal(a, b) for a, (b, _) in zip(val, cached.val))
    with pytest.raises(DataError) as err:  # without the cache a worker meets the missing file
        _epoch(plain.train, 2)
    _one_line(err, root)


def test_loaders_with_workers_leave_torch_global_generator_alone(tmp_path):
    """As tests/test_training.py's table loader: an iterator's start draws no dropout state."""
    loaders = make_image_loaders(_prepared(write_class_folders(tmp_path / "p", per_class=6)), 4, num_workers=2)
    state = torch.get_rng_state()
    for epoch in (0, 1):
        _epoch(loaders.train, epoch), list(loaders.val)
    assert torch.equal(torch.get_rng_state(), state)


def test_cache_on_that_cannot_fit_is_refused(tmp_path, monkeypatch):
    prepared = _prepared(write_class_folders(tmp_path / "p", per_class=6))
    monkeypatch.setattr("tasks.images_loaders.available_memory", lambda: 4 * 2000)  # val needs 2304 bytes, train 9216
    with pytest.raises(ConfigError, match="image_cache on needs"):
        plan_caches(prepared, "on", shared=False)
    assert plan_caches(prepared, "auto", shared=False) == {"train": None, "val": None, "test": None}
    monkeypatch.setattr("tasks.images_loaders.available_memory", lambda: 10**9)
    caches = plan_caches(prepared, "auto", shared=False)
    assert caches["train"].pixels.shape == (len(prepared.train.paths), 3, 16, 16) and caches["test"] is None


# --- errors and the digest ----------------------------------------------------------------------


def test_folder_errors_are_one_line_naming_the_folder(tmp_path):
    with pytest.raises(DataError) as err:
        index_images(str(tmp_path / "nowhere"))
    _one_line(err, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty") as err:
        index_images(str(tmp_path / "empty"))
    _one_line(err, tmp_path / "empty")
    one = write_class_folders(tmp_path / "one", classes=("cat",))
    with pytest.raises(DataError, match="single class") as err:
        index_images(str(one))
    _one_line(err, one, "cat")
    hollow = write_class_folders(tmp_path / "hollow")
    for file in (hollow / "dog").iterdir():
        file.rename(file.with_suffix(".txt"))
    with pytest.raises(DataError, match="holds no images") as err:
        index_images(str(hollow))
    _one_line(err, hollow / "dog")
    stray = write_split_folders(tmp_path / "stray")
    write_image(stray / "val" / "yak" / "0.png", pixels(0, 0))
    with pytest.raises(DataError, match="not a class") as err:
        index_images(str(stray))
    _one_line(err, stray / "val" / "yak")


def test_manifest_errors_are_one_line_naming_the_manifest(tmp_path):
    manifest = write_manifest(tmp_path)
    (tmp_path / "images" / "cat_1.png").unlink()
    (tmp_path / "images" / "dog_4.png").unlink()
    with pytest.raises(DataError, match="names 2 file") as err:
        index_images(str(manifest))
    _one_line(err, manifest, "images/cat_1.png")
    frame = pd.read_csv(manifest)
    renames = (({"path": "picture"}, "no image-path column"), ({"label": "kind"}, "no label column 'label'"))
    for columns, expected in renames:
        frame.rename(columns=columns).to_csv(tmp_path / "bad.csv", index=False)
        with pytest.raises(DataError, match=expected) as err:
            index_images(str(tmp_path / "bad.csv"))
        _one_line(err, tmp_path / "bad.csv")
    frame.assign(label="").to_csv(tmp_path / "unlabelled.csv", index=False)
    with pytest.raises(DataError, match="no labels in 'label'") as err:
        index_images(str(tmp_path / "unlabelled.csv"), task="multilabel")
    _one_line(err, tmp_path / "unlabelled.csv")


def test_corrupt_images_are_named_at_prepare_or_at_load(tmp_path):
    root = write_class_folders(tmp_path / "p", per_class=6, suffixes=(".png", ".jpg"))
    good = (root / "cat" / "001.jpg").read_bytes()
    (root / "cat" / "001.jpg").write_bytes(good[: len(good) // 2])  # truncated: in train, so in the sample
    with pytest.raises(DataError, match="cannot be decoded") as err:
        _prepared(root)
    _one_line(err, root / "cat" / "001.jpg")
    splits = write_split_folders(tmp_path / "s")
    (splits / "val" / "dog" / "002.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # val is not sampled
    prepared = _prepared(splits)
    for workers in (0, 2):
        with pytest.raises(DataError) as err:
            _epoch(make_image_loaders(prepared, 4, num_workers=workers).val, 0)
        _one_line(err, splits / "val" / "dog" / "002.png")
    prep = prepared.preprocessor
    bad_items = ((3.5, "item 0 is a float"), (np.zeros((4, 4), np.float32), "uint8"),
                 (b"nope", r"item 0 \(bytes\) cannot be decoded \(not a known image format\)"))
    for item, expected in bad_items:
        with pytest.raises(DataError, match=expected) as err:
            prep.load_images([item])
        _one_line(err)


def test_digest_changes_with_content_not_with_mtimes(tmp_path):
    root = write_class_folders(tmp_path / "p", per_class=4)
    digest = index_images(str(root)).digest()
    assert index_images(str(root)).digest() == digest
    target = root / "dog" / "002.png"
    os.utime(target, ns=(1, 1))  # a touch or a copy changes mtimes only
    assert index_images(str(root)).digest() == digest
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte different
    target.write_bytes(bytes(data))
    changed = index_images(str(root)).digest()
    assert changed != digest
    write_image(root / "dog" / "new.png", pixels(1, 1))
    assert index_images(str(root)).digest() not in (digest, changed)
    prepared = _prepared(root)
    assert prepared.source_digest == index_images(str(root)).digest()
    assert len(pickle.dumps(prepared)) < 3000  # Prefect's cached result: paths, not pixels
    assert len(encode(pixels(0, 0))) < 8192  # these files are hashed whole; big ones by their two ends


def test_logging_an_image_index_as_the_runs_dataset_warns_nothing(tmp_path):
    """MLflow's schema inference printed a UserWarning about integer columns (the index's labels) at
    the start of every image run: advice on serving inputs with missing values, which a dataset
    record is never given."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.prepare_store(uri)
    client = MlflowClient(uri)
    run_id = client.create_run(tracking.experiment_id(client, "images")).info.run_id
    source = index_images(str(Path(__file__).parents[1] / "data" / "digits"))
    with warnings.catch_warnings(record=True) as caught:  # not "error": MLflow would drop the schema on it
        warnings.simplefilter("always")
        tracking.log_dataset(client, run_id, source.as_frame(), source.root, "label", "digits")
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []
    (logged,) = client.get_run(run_id).inputs.dataset_inputs
    assert logged.dataset.name == "digits" and '"name": "label"' in logged.dataset.schema  # the schema is still logged
