"""The image path (issue #13, item 9): fitflow's image loaders and CNN epoch against hand-written torchvision code.

    PYTHONPATH=. python -m benchmarks --only images           # full: 20k training JPEGs
    PYTHONPATH=. python -m benchmarks --smoke --only images   # tiny sizes, seconds

Data: seeded JPEGs written with PIL once and kept under the temp folder (reused while the
sizes and seed match): 10 class folders under train/, val/ and test/, RGB, each image between
32 and 48 pixels a side (so Resize + CenterCrop to 32 does work), a class colour plus smooth
and pixel noise. The train/val/test layout gives fitflow's train loader and ImageFolder(train/)
exactly the same images.

(a) Loaders only, nothing trained: per round a fresh loader of each kind runs 3 epochs.
    Baseline, with the eval transforms of the pytorch/examples imagenet script:
        ImageFolder(train/, transform=Compose([Resize(S), CenterCrop(S), ToTensor(), Normalize(mean, std)]))
        DataLoader(..., batch_size=B, shuffle=True, num_workers=W, persistent_workers=W > 0)
    with fitflow's training mean/std, and fitflow's own worker settings (persistent workers) so
    only the data path differs. Candidate: make_image_loaders(prepared, B, num_workers=W,
    cache="auto").train, augment none (the same eval preset). Epoch 1 is timed from building the
    loader to the end of the first pass (worker start included); "epoch 2+" is the mean of
    epochs 2 and 3; "index + epoch 1" adds what comes before the loader, timed in the same
    round: ImageFolder's folder scan vs fitflow's index_images + prepare_images (a flow run
    pays that once; Prefect caches it). W = 2 (one worker per core of the 2-core benchmark
    machine) and W = 0 (fitflow's default: decoding in the main process).
(b) The CNN epoch: fitflow's train_model (default callbacks, epoch checkpoints, MLflow logging
    to sqlite, torchmetrics on validation) against the pytorch/examples mnist loop, on the same
    fitflow loaders (warm decoded cache, num_workers 0), the same CNN (fitflow's `cnn`) and the
    same optimizer (Adam, lr 1e-3, fused kernel as fitflow's make_optimizer picks it). One
    training + one validation pass per call, on a seeded subset of the training images (the CNN
    trains at a few hundred images/s on one CPU thread). Torch threads: 1, as benchmarks/training.py.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from benchmarks.harness import Comparison, compare

CLASSES = 10
IMAGE_SIZE = 32
BATCH = 64  # fitflow's default batch_size, and the mnist example's
SIDES = (32, 48)  # generated images are 32-48 px wide and high
DATA_VERSION = 1  # bump when the generator changes: the cached folder is keyed by it
PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [128, 128, 128]], dtype=np.float32)


def suite(smoke: bool = False) -> list:
    """Every image benchmark, full size or smoke size."""
    if smoke:
        root = generated_images(n_train=256, n_val=64, n_test=32)
        prepared = _prepare(root)
        return [*loader_epochs(root, prepared, workers=2, rounds=1),
                *loader_epochs(root, prepared, workers=0, rounds=1),
                cnn_epoch(prepared, n_train=64, n_val=32, rounds=1)]
    root = generated_images(n_train=20_000, n_val=2_000, n_test=1_000)
    prepared = _prepare(root)
    return [*loader_epochs(root, prepared, workers=2, rounds=5),
            *loader_epochs(root, prepared, workers=0, rounds=5),
            cnn_epoch(prepared, n_train=4_000, n_val=1_000, rounds=5)]


# --- data ------------------------------------------------------------------------------------


def generated_images(n_train: int, n_val: int, n_test: int, seed: int = 0) -> Path:
    """root/{train,val,test}/c<k>/<i>.jpg, written once per (sizes, seed, DATA_VERSION) and reused."""
    name = f"v{DATA_VERSION}-{n_train}-{n_val}-{n_test}-s{seed}"
    root = Path(tempfile.gettempdir()) / "fitflow-bench-images" / name
    if (root / "done").exists():
        return root
    partial = root.with_name(f"{root.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        for k in range(CLASSES):
            (partial / split / f"c{k}").mkdir(parents=True)
        for i in range(n):
            label = i % CLASSES
            _image(rng, label).save(partial / split / f"c{label}" / f"{i:06d}.jpg", "JPEG", quality=90)
    (partial / "done").write_text(f"{n_train} {n_val} {n_test} seed {seed}\n")
    try:
        partial.rename(root)
    except OSError:  # another process finished the same folder first: keep theirs
        shutil.rmtree(partial, ignore_errors=True)
    return root


def _image(rng: np.random.Generator, label: int) -> Image.Image:
    width, height = (int(v) for v in rng.integers(SIDES[0], SIDES[1] + 1, 2))
    coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((width, height),
                                                                                   Image.BILINEAR)
    pixels = 0.6 * PALETTE[label] + 0.4 * np.asarray(coarse, dtype=np.float32) + rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def _prepare(root: Path):
    from tasks.images import index_images
    from tasks.images_prepare import prepare_images

    return prepare_images(index_images(str(root)), IMAGE_SIZE, seed=0)


# --- (a) loaders -------------------------------------------------------------------------------


def imagefolder_dataset(root: Path, mean: list[float], std: list[float]):
    """The hand-written baseline's dataset: ImageFolder with the eval preset as torchvision transforms."""
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.Resize(IMAGE_SIZE), transforms.CenterCrop(IMAGE_SIZE),
                                    transforms.ToTensor(), transforms.Normalize(mean, std)])
    return datasets.ImageFolder(str(root / "train"), transform=transform)


def imagefolder_loader(dataset, workers: int):
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers, persistent_workers=workers > 0)


def fitflow_loader(prepared, workers: int):
    from tasks.images_loaders import make_image_loaders

    return make_image_loaders(prepared, BATCH, num_workers=workers, cache="auto").train


def epoch_times(index: Callable[[], object], make: Callable[[object], object],
                epochs: int) -> tuple[float, list[float]]:
    """Seconds of `index()` (listing the files), then of each of `epochs` passes over `make(index())`;
    the first pass's time includes building the loader (and starting its workers)."""
    gc.collect()
    start = time.perf_counter()
    source = index()
    index_s = time.perf_counter() - start
    times, rows = [], 0
    start = time.perf_counter()
    loader = make(source)
    for epoch in range(1, epochs + 1):
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)  # as fit does: a new shuffle each epoch
        for _, y in loader:
            rows += len(y)
        times.append(time.perf_counter() - start)
        start = time.perf_counter()
    _close(loader)
    assert rows == epochs * len(loader.dataset), (rows, len(loader.dataset))
    return index_s, times


def _close(loader) -> None:
    """Stop a loader's persistent workers now, not whenever the garbage collector gets to them."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        loader._iterator = None


def loader_epochs(root: Path, prepared, workers: int, rounds: int, epochs: int = 3) -> list[Comparison]:
    """(a): ImageFolder + DataLoader vs fitflow's train loader, epoch 1 and epochs 2+, interleaved rounds.

    Each round also times what comes before the loader: ImageFolder's scan of the folder, and
    fitflow's index_images + prepare_images (listing, the digest, mean/std of a 2,000-image
    sample), which a flow run pays once and Prefect caches after; the "first run" row adds them.
    """
    from tasks.images import index_images
    from tasks.images_prepare import prepare_images

    mean, std = prepared.preprocessor.mean, prepared.preprocessor.std
    n = len(prepared.train.paths)
    baseline = ("ImageFolder + DataLoader",
                lambda: epoch_times(lambda: imagefolder_dataset(root, mean, std),
                                    lambda d: imagefolder_loader(d, workers), epochs))
    candidate = ("fitflow make_image_loaders",
                 lambda: epoch_times(lambda: prepare_images(index_images(str(root)), IMAGE_SIZE, seed=0),
                                     lambda p: fitflow_loader(p, workers), epochs))
    label = f"image loader, {n:,} JPEGs, batch {BATCH}, num_workers={workers}"
    first = Comparison(f"{label}: epoch 1", baseline[0], candidate[0], target="<= 1.0",
                       note="from building the loader to the end of the first pass (decodes every file)")
    first_run = Comparison(f"{label}: index + epoch 1", f"{baseline[0]} (ImageFolder scan)",
                           f"{candidate[0]} (index_images + prepare_images)", target="reported",
                           note="epoch 1 plus listing the files; "
                                "a flow run pays fitflow's prepare once, Prefect caches it")
    later = Comparison(f"{label}: epoch 2+", baseline[0], candidate[0], target="<= 0.333",
                       note=f"mean of epochs 2-{epochs}: fitflow gathers from its decoded uint8 cache")
    picks = ((first, lambda t: t[1][0]), (first_run, lambda t: t[0] + t[1][0]),
             (later, lambda t: statistics.fmean(t[1][1:])))
    baseline[1](), candidate[1]()  # warm-up: page cache, imports, first worker forks
    for i in range(rounds):
        order = (baseline, candidate) if i % 2 == 0 else (candidate, baseline)
        times = {name: run() for name, run in order}
        for result, pick in picks:
            base, cand = pick(times[baseline[0]]), pick(times[candidate[0]])
            result.baseline_s.append(base)
            result.candidate_s.append(cand)
            result.ratios.append(cand / base)
    for result, _ in picks:
        result.note += (f"; median s {statistics.median(result.baseline_s):.3f} -> "
                        f"{statistics.median(result.candidate_s):.3f}")
    return [first, later, first_run]


# --- (b) the CNN epoch ---------------------------------------------------------------------------


def subset(prepared, n_train: int, n_val: int, seed: int = 0):
    """The prepared images with a seeded random `n_train` of train and `n_val` of val (classes mixed)."""
    from tasks.images_prepare import ImageSplit

    rng = np.random.default_rng(seed)

    def pick(split, n: int) -> ImageSplit:
        rows = np.sort(rng.choice(len(split.paths), min(n, len(split.paths)), replace=False))
        return ImageSplit([split.paths[i] for i in rows], split.targets[torch.from_numpy(rows)])

    return dataclasses.replace(prepared, train=pick(prepared.train, n_train), val=pick(prepared.val, n_val))


def mnist_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, train, val) -> float:
    """pytorch/examples mnist's train() + test(), without the prints."""
    model.train()
    for x, y in train:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    model.eval()
    test_loss, correct = 0.0, 0
    with torch.no_grad():
        for x, y in val:
            output = model(x)
            test_loss += F.cross_entropy(output, y, reduction="sum").item()
            correct += (output.argmax(dim=1) == y).sum().item()
    return correct / len(val.dataset)


def cnn_epoch(prepared, n_train: int, n_val: int, rounds: int) -> Comparison:
    """(b): fitflow's train_model (1 epoch, tracked) vs the mnist loop, same loaders, CNN and Adam."""
    from mlflow.tracking import MlflowClient

    from tasks.config import TrainConfig
    from tasks.images_loaders import make_image_loaders
    from tasks.models import CNN
    from tasks.tracking import experiment_id, prepare_store
    from tasks.trainer import Run, train_model

    small = subset(prepared, n_train, n_val)
    loaders = make_image_loaders(small, BATCH, num_workers=0, cache="auto")
    config = TrainConfig(epochs=1, batch_size=BATCH, patience=5)  # model auto = cnn, Adam lr 1e-3, dropout 0.1
    tmp = tempfile.TemporaryDirectory(prefix="fitflow-bench-cnn-")
    uri = f"sqlite:///{Path(tmp.name) / 'mlflow.db'}"
    prepare_store(uri)
    client = MlflowClient(uri)
    run_id = client.create_run(experiment_id(client, "bench-images")).info.run_id
    calls = [0]

    def fitflow() -> None:
        calls[0] += 1  # a fresh checkpoint folder per call: an existing epoch checkpoint would be resumed
        run = Run(client, run_id, "0", Path(tmp.name) / "checkpoints" / str(calls[0]))
        trained = train_model(config, small, loaders, run)
        assert len(trained.history) == 1

    def hand() -> None:
        torch.manual_seed(config.seed)
        model = CNN(small.preprocessor.in_shape, CLASSES, dropout=config.dropout)
        mnist_epoch(model, torch.optim.Adam(model.parameters(), lr=config.lr, fused=True), loaders.train, loaders.val)

    size = f"{len(small.train.paths):,} train + {len(small.val.paths):,} val images, {IMAGE_SIZE}px, batch {BATCH}"
    # compare's warm-up calls decode into the cache, so every timed call reads it
    result = compare(f"CNN epoch vs mnist-style loop ({size})", ("mnist-style loop", hand),
                     ("fitflow train_model", fitflow), rounds, target="<= 1.05",
                     note="same fitflow loaders (warm cache, 0 workers), CNN and fused Adam; fitflow adds its "
                          "callbacks, epoch checkpoint, MLflow logging and accuracy/F1/AUROC")
    base_s, fitflow_s = statistics.median(result.baseline_s), statistics.median(result.candidate_s)
    result.note += (f"; median {base_s:.2f} -> {fitflow_s:.2f} s per epoch "
                    f"(~{len(small.train.paths) / fitflow_s:.0f} training images/s, validation included)")
    tmp.cleanup()
    return result
