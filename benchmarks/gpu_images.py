"""GPU check of the image path (issue #13): images/s of fitflow's `fit`, fp32 vs bf16 autocast.

    python benchmarks/gpu_images.py [--images 20000] [--batch 256] [--rounds 5] [--workers 8]

Data: the seeded JPEGs of benchmarks/images.py, decoded once by fitflow's image loader into its
uint8 cache (N x 3 x S x S); random pixels instead when PIL, torchvision or pandas are missing
(said in the output). "on device": the cache moved to the GPU once; each batch is a gather there
and normalised there ((x / 255 - mean) / std). "host loader": fitflow's own make_image_loaders
(cache in host memory, pinned batches copied per step, `--workers` workers). Each timed call is
one fresh model and fused Adam and one `fit` epoch: the training pass plus validation over a
tenth as many images. Rows: fitflow's CNN at 32 px, torchvision:resnet18 at 64 px (needs
torchvision). Pairs run interleaved; prints a table and the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.compile import make_optimizer  # noqa: E402
from tasks.training import fit  # noqa: E402


class DeviceBatches:
    """(x, y) batches gathered from uint8 pixels resident on the GPU, normalised there."""

    def __init__(self, pixels: torch.Tensor, targets: torch.Tensor, mean, std, batch: int, shuffle: bool) -> None:
        self.pixels, self.targets, self.batch, self.shuffle = pixels, targets, batch, shuffle
        shape = (1, -1, 1, 1)
        self.scale = torch.tensor([1 / (255 * s) for s in std], device=pixels.device).view(shape)
        self.shift = torch.tensor([m / s for m, s in zip(mean, std)], device=pixels.device).view(shape)

    def __len__(self) -> int:
        return -(-len(self.targets) // self.batch)

    def __iter__(self):
        n = len(self.targets)
        device = self.pixels.device
        order = torch.randperm(n, device=device) if self.shuffle else torch.arange(n, device=device)
        for rows in order.split(self.batch):
            x = self.pixels.index_select(0, rows).float().mul_(self.scale).sub_(self.shift)
            yield x, self.targets.index_select(0, rows)


def decoded(n: int, size: int):
    """(prepared or None, train uint8 pixels, train targets, val pixels, val targets, mean, std, source)."""
    try:
        from benchmarks.images import generated_images
        from tasks.images import index_images
        from tasks.images_loaders import make_image_loaders
        from tasks.images_prepare import prepare_images
    except ImportError as err:
        print(f"note: {err}; random pixels instead of decoded JPEGs", file=sys.stderr)
        gen = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (n + n // 10, 3, size, size), dtype=torch.uint8, generator=gen)
        y = torch.arange(n + n // 10) % 10
        return None, x[:n], y[:n], x[n:], y[n:], [0.5] * 3, [0.25] * 3, "random uint8"
    prepared = prepare_images(index_images(str(generated_images(n, n // 10, n // 20))), size, seed=0)
    loaders = make_image_loaders(prepared, 1024, cache="on")  # in this process: /dev/shm may be small
    for loader in (loaders.train, loaders.val):
        for _ in loader:  # one pass decodes every image into the cache
            pass
    p = prepared.preprocessor
    return (prepared, loaders.train.dataset.cache.pixels, prepared.train.targets, loaders.val.dataset.cache.pixels,
            prepared.val.targets, p.mean, p.std, "generated JPEGs")


def make_model(name: str, size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "cnn":
        from tasks.models import CNN

        return CNN((3, size, size), 10)
    import torchvision

    return torchvision.models.get_model(name, weights=None, num_classes=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=8, help="the host loader's workers")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: benchmarks/gpu_images.py measures the image path on a GPU; run it on a GPU machine",
              file=sys.stderr)
        return 2
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "images": args.images,
              "batch": args.batch, "rows": []}

    def epoch(model_name: str, size: int, train, val, precision: str):
        def run() -> float:
            model = make_model(model_name, size).to(device)
            optimizer = make_optimizer("adam", model.parameters(), 1e-3)
            start = time.perf_counter()
            fit(model, train, val, epochs=1, optimizer=optimizer, loss_fn=torch.nn.CrossEntropyLoss(), metrics=None,
                device=device, precision=precision)  # fit syncs at the epoch's end (the losses' float)
            return time.perf_counter() - start
        return run

    for model_name, size in (("cnn", 32), ("resnet18", 64)):
        try:
            prepared, x, y, xv, yv, mean, std, source = decoded(args.images, size)
            if model_name != "cnn":
                make_model(model_name, size)  # torchvision present?
        except ImportError as err:
            print(f"skipping {model_name}: {err}", file=sys.stderr)
            continue
        on_device = [t.to(device) for t in (x, y, xv, yv)]
        train = DeviceBatches(on_device[0], on_device[1], mean, std, args.batch, shuffle=True)
        val = DeviceBatches(on_device[2], on_device[3], mean, std, 2 * args.batch, shuffle=False)
        runs = {"fp32, on device": epoch(model_name, size, train, val, "32"),
                "bf16, on device": epoch(model_name, size, train, val, "bf16")}
        if prepared is not None and model_name == "cnn":
            from tasks.images_loaders import make_image_loaders

            host = make_image_loaders(prepared, args.batch, num_workers=args.workers, pin_memory=True, cache="auto")
            cached = "cached" if host.train.dataset.cache is not None else "no cache: /dev/shm too small"
            runs[f"bf16, host loader ({args.workers} workers, {cached})"] = epoch(model_name, size, host.train,
                                                                               host.val, "bf16")
        times = {name: [] for name in runs}
        for run in runs.values():
            run()  # warm-up: cuDNN autotuning, the host loader's first (decoding) epoch
        for i in range(args.rounds):
            for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
                times[name].append(runs[name]())
        fp32 = times["fp32, on device"]
        for name, seconds in times.items():
            ratios = [s / f for s, f in zip(seconds, fp32)]
            report["rows"].append({"model": f"{model_name} {size}px", "run": name, "data": source,
                                   "images_per_s": len(y) / statistics.median(seconds),
                                   "time_vs_fp32_on_device": statistics.median(ratios),
                                   "ratio_min": min(ratios), "ratio_max": max(ratios)})
    print(f"{report['device']}, torch {report['torch']}, {args.images:,} training images, batch {args.batch}, "
          f"{args.rounds} rounds (medians; time ratio min-max)")
    print(f"{'model':<14} {'run':<52} {'images/s':>10} {'time / fp32 on device':>24}")
    for row in report["rows"]:
        print(f"{row['model']:<14} {row['run']:<52} {row['images_per_s']:>10,.0f} "
              f"{row['time_vs_fp32_on_device']:>10.3f} ({row['ratio_min']:.3f}-{row['ratio_max']:.3f})")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
