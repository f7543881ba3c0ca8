"""What DDP costs on one GPU, torch only (the GPU machine's image has no Prefect/MLflow).

    python benchmarks/ddp_gpu.py [--rows 1000000] [--rounds 5]

Times one epoch of fitflow's `fit` on one GPU twice, in interleaved rounds: the plain model, and
the model wrapped in DistributedDataParallel in a process group of one NCCL process (what
`strategy: ddp` runs per GPU; with one process the gradient all-reduce moves no data, so the
ratio is DDP's own overhead: its autograd hooks, bucketing, and the per-epoch reductions of the
validation loss). Data resident on the GPU, batches gathered there. Prints JSON: rows per second
of each, and the ratio single / DDP (above 1: DDP is slower).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.workload import BATCH, make_data, make_model
from tasks.callbacks import BestWeights, Monitor
from tasks.compile import make_optimizer
from tasks.loaders import make_loader
from tasks.training import fit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU machine", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
    data = make_data(args.rows, args.rows // 5)
    train = make_loader(data.x.numpy(), data.y.numpy(), BATCH, shuffle=True, device=device, rank=0, world_size=1)
    val = make_loader(data.x_val.numpy(), data.y_val.numpy(), 1024, device=device)

    def epoch(wrap: bool) -> float:
        model = make_model().to(device)
        trained = DistributedDataParallel(model, device_ids=[0]) if wrap else model
        optimizer = make_optimizer("adam", trained.parameters(), 1e-3)  # fitflow's: the fused kernel
        torch.cuda.synchronize()
        start = time.perf_counter()
        fit(trained, train, val, epochs=1, optimizer=optimizer, loss_fn=torch.nn.CrossEntropyLoss(), metrics=None,
            device=device, callbacks=[BestWeights(Monitor("val_loss"))])
        torch.cuda.synchronize()
        return time.perf_counter() - start

    epoch(False), epoch(True)  # warm-up: CUDA context, kernels, NCCL communicator
    single, ddp = [], []
    for _ in range(args.rounds):  # interleaved: drift of clocks or neighbours hits both alike
        single.append(epoch(False))
        ddp.append(epoch(True))
    dist.destroy_process_group()
    rows = args.rows + args.rows // 5
    result = {
        "device": torch.cuda.get_device_name(device),
        "rows_per_s_single": round(rows / statistics.median(single)),
        "rows_per_s_ddp_1_process": round(rows / statistics.median(ddp)),
        "ratio_ddp_over_single_time": round(statistics.median(ddp) / statistics.median(single), 3),
        "rounds": args.rounds,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
