"""Interleaved rounds: baseline, candidate, baseline, candidate... and paired ratios.

The machines are shared and noisy, so nothing is compared across processes or runs: each
round times the baseline and the candidate back to back, and the ratio of the pair is the
sample. The median over rounds is the figure; min-max shows the spread.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field


@dataclass
class Comparison:
    name: str
    baseline: str
    candidate: str
    ratios: list[float] = field(default_factory=list)  # candidate time / baseline time, per round
    baseline_s: list[float] = field(default_factory=list)
    candidate_s: list[float] = field(default_factory=list)
    target: str = ""
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(median=self.median, min=min(self.ratios), max=max(self.ratios))
        return data


def timed(fn: Callable[[], object]) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(name: str, baseline: tuple[str, Callable[[], object]], candidate: tuple[str, Callable[[], object]],
            rounds: int, warmup: bool = True, target: str = "", note: str = "",
            measure: Callable[[Callable[[], object]], float] = timed) -> Comparison:
    """Time candidate/baseline in `rounds` interleaved pairs (after one untimed warm-up of each).

    `measure(fn)`: the seconds of one call; by default its wall time, or e.g. the time of the part
    of it that the figure is about, as `fn` reports it.
    """
    result = Comparison(name, baseline[0], candidate[0], target=target, note=note)
    if warmup:
        baseline[1]()
        candidate[1]()
    for i in range(rounds):
        # alternate which goes first, so a drift within the round favours neither side
        first, second = (baseline, candidate) if i % 2 == 0 else (candidate, baseline)
        times = {first[0]: measure(first[1]), second[0]: measure(second[1])}
        result.baseline_s.append(times[baseline[0]])
        result.candidate_s.append(times[candidate[0]])
        result.ratios.append(times[candidate[0]] / times[baseline[0]])
    return result


@dataclass
class Measurement:
    """An absolute figure (a wall time, a memory peak) for things with no in-process baseline."""

    name: str
    value: float
    unit: str
    target: str = ""
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)
