"""The one place that decides where tensors live."""

from __future__ import annotations

import logging

import torch

from tasks.errors import ConfigError

log = logging.getLogger("fitflow")


def resolve_device(name: str = "auto") -> torch.device:
    """auto picks cuda, then mps, then cpu; a named device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available here; use --device auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device '{name}' does not exist ({torch.cuda.device_count()} GPU(s) visible); pick a lower index")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device '{name}' requested but MPS is not available here; use --device auto or cpu")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for mixed precision, or None for full precision."""
    if precision == "32":
        return None
    if device.type != "cuda":
        log.info("precision=%s is ignored on %s: training in float32", precision, device.type)
        return None
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError("precision bf16 is not supported by this GPU; use --precision fp16 or 32")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def set_cpu_threads(threads: int) -> None:
    """torch's intra-op threads for this process; 0 keeps torch's default (one per core).

    One thread is fitflow's default: on a small MLP a second thread gains nothing (benchmarks/),
    and when other processes share the cores, two spinning OpenMP threads make epochs 10-25x
    slower.
    """
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def resident_device(nbytes: int, device: torch.device, share: float = 0.5) -> torch.device | None:
    """`device` when it is a GPU with room for `nbytes` of data (at most `share` of its free memory)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    if nbytes > share * free:
        log.info("data (%.1f GB) stays in pinned host memory: more than %.0f%% of the GPU's free memory", nbytes / 1e9, share * 100)
        return None
    return device
