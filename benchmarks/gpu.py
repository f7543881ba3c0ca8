"""GPU check of the training engine, torch only (the GPU machine's image has no Prefect/MLflow).

    python benchmarks/gpu.py [--rows 1000000] [--rounds 5]

Compares one epoch of fitflow's `fit` (data resident on the GPU, batches gathered there, no
host sync per step, fitflow's fused Adam, the BestWeights callback) against the best
hand-written GPU loop, in interleaved rounds; then fitflow with bf16 autocast and with
torch.compile against plain fitflow. Prints the ratios as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.workload import BATCH, make_data, make_model  # noqa: E402
from tasks.callbacks import BestWeights, Monitor  # noqa: E402
from tasks.compile import make_optimizer  # noqa: E402
from tasks.loaders import make_loader  # noqa: E402
from tasks.training import fit  # noqa: E402


def hand_epoch(model, optimizer, x, y, x_val, y_val, generator) -> None:
    model.train()
    order = torch.randperm(len(y), generator=generator).to(x.device)
    for start in range(0, len(order), BATCH):
        rows = order[start : start + BATCH]
        loss = F.cross_entropy(model(x.index_select(0, rows)), y.index_select(0, rows))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.inference_mode():
        total = sum(F.cross_entropy(model(x_val[i : i + 1024]), y_val[i : i + 1024], reduction="sum")
                    for i in range(0, len(y_val), 1024))
    float(total)
    torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU machine", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    data = make_data(args.rows, args.rows // 5)
    x, y, x_val, y_val = (t.to(device) for t in (data.x, data.y, data.x_val, data.y_val))
    train = make_loader(data.x.numpy(), data.y.numpy(), BATCH, shuffle=True, device=device)
    val = make_loader(data.x_val.numpy(), data.y_val.numpy(), 1024, device=device)
    generator = torch.Generator().manual_seed(0)

    def fitflow_epoch(precision: str = "32", compiled: bool = False):
        def run() -> None:
            model = make_model().to(device)
            if compiled:
                model.compile()
            optimizer = make_optimizer("adam", model.parameters(), 1e-3)  # fitflow's: the fused kernel
            fit(model, train, val, epochs=1, optimizer=optimizer, loss_fn=torch.nn.CrossEntropyLoss(), metrics=None,
                device=device, callbacks=[BestWeights(Monitor("val_loss"))], precision=precision)
            torch.cuda.synchronize()
        return run

    def hand() -> None:
        model = make_model().to(device)
        hand_epoch(model, torch.optim.Adam(model.parameters(), lr=1e-3), x, y, x_val, y_val, generator)

    pairs = {
        "fitflow fit / best hand loop": (hand, fitflow_epoch()),
        "fitflow bf16 / fitflow fp32": (fitflow_epoch(), fitflow_epoch("bf16")),
        "fitflow torch.compile / fitflow": (fitflow_epoch(), fitflow_epoch(compiled=True)),
    }
    report = {"device": torch.cuda.get_device_name(), "rows": args.rows, "torch": torch.__version__, "ratios": {}}
    for name, (baseline, candidate) in pairs.items():
        baseline(), candidate()  # warm-up (and compilation)
        ratios = []
        for _ in range(args.rounds):
            start = time.perf_counter(); baseline(); base_s = time.perf_counter() - start  # noqa: E702
            start = time.perf_counter(); candidate(); cand_s = time.perf_counter() - start  # noqa: E702
            ratios.append(cand_s / base_s)
        report["ratios"][name] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
