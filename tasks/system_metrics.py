"""What the machine did during a run: CPU, memory, disk, network and GPU as MLflow system metrics.

The figures are MLflow's own (its system metrics collectors, the metric names the MLflow UI
charts in a run's "System metrics" tab): `system/cpu_utilization_percentage`,
`system/system_memory_usage_megabytes`, `system/disk_usage_megabytes`, ..., and, with
`nvidia-ml-py` installed and an NVIDIA GPU present, `system/gpu_<i>_utilization_percentage` and
`system/gpu_<i>_memory_usage_megabytes`. A daemon thread samples them every SAMPLING_INTERVAL_S
(MLflow's MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it), never the training thread, and
takes one more sample when the run ends, so a run shorter than an interval still has one.

fitflow drives MLflow's collectors from its own thread rather than MLflow's: MLflow's thread
asks the server for the run at every sample and its `finish` waits for that thread without a
limit, so with the tracking server unreachable a run would hang in MLflow's retries for minutes
at its end. Here each sample is one request without retries (the metrics delivery's sender); a
sample the server does not take is dropped (no training waits for system metrics), and stopping
waits at most one request's timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from tasks import metrics_journal
from tasks.mlflow_private import system_metrics_collectors

log = logging.getLogger("fitflow")

# One sample costs the sampling thread a few milliseconds (psutil, one log_batch; benchmarks/
# training.py system_metrics_overhead measures it): every 5 s is far below 1% of a run.
SAMPLING_INTERVAL_S = 5.0
PREFIX = "system/"
_PROBE = "system/cpu_utilization_percentage"  # always collected: where a resumed run's samples end


class SystemMetrics:
    """Samples the machine in a daemon thread and logs each sample to the run as one batch (step = sample)."""

    def __init__(self, client: MlflowClient, run_id: str, first_step: int = 0) -> None:
        # MLflow's monitor object, for its collectors only (CPU, disk, network, GPU when NVML answers);
        # its own thread is never started. It reads MLflow's interval and node id variables.
        self.collectors = system_metrics_collectors(run_id, SAMPLING_INTERVAL_S, client.tracking_uri)
        self.interval_s = float(self.collectors.sampling_interval)
        self.prefix = PREFIX + (f"{self.collectors.node_id}/" if self.collectors.node_id else "")
        self.send = metrics_journal.sender(client, run_id)
        self.step = first_step
        self.dropped = 0
        self._sample()  # primes psutil's CPU counter: the first real sample covers its interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="fitflow-system-metrics", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            ending = self.stop.wait(self.interval_s)
            self._log(self._sample())
            if ending:
                return

    def _sample(self) -> dict[str, float]:
        self.collectors.collect_metrics()
        sample = self.collectors.aggregate_metrics()
        for collector in self.collectors.monitors:
            collector.clear_metrics()
        return sample

    def _log(self, sample: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        try:
            self.send([Metric(self.prefix + name, float(value), now, self.step) for name, value in sample.items()])
        except Exception as err:  # noqa: BLE001 (an unreachable server, a refused request: the sample is dropped)
            self.dropped += 1
            log.debug("system metrics sample %d dropped: %s", self.step, err)
        self.step += 1

    def close(self) -> None:
        """Take the last sample and stop; waits at most one request's timeout."""
        self.stop.set()
        self.thread.join(metrics_journal.REQUEST_TIMEOUT_S + self.interval_s)
        if self.dropped:
            log.warning("%d system metrics sample(s) of the run could not be logged (tracking server unreachable)",
                        self.dropped)


def next_step(client: MlflowClient, run_id: str) -> int:
    """The step after a run's last system metrics sample (a resumed run continues its series)."""
    history = client.get_metric_history(run_id, _PROBE)
    return max((metric.step for metric in history), default=-1) + 1


@contextmanager
def sampled(client: MlflowClient, run_id: str) -> Iterator[SystemMetrics]:
    """System metrics of the run while the block runs (a resumed run's series goes on)."""
    sampler = SystemMetrics(client, run_id, next_step(client, run_id))
    try:
        yield sampler
    finally:
        sampler.close()
