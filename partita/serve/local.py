"""The unsplit model in this process, behind the part of `Pipeline`'s interface the server uses.

`LocalModel` runs the whole model on one thread of this process (no workers, no wire): it is the
single-process baseline `benchmarks/serve.py` serves through the same HTTP stack, and a way to
serve a model on one machine with `Service` directly. Its plan is one stage on the device
`local`, with the compute time of the example batch measured at start (wall seconds).
"""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from partita.cluster import ClusterSpec
from partita.plan.types import Plan, StagePlan

DEVICE = "local"


class LocalModel:
    """`submit(*inputs) -> Future`, `plan`, `stats()`, `close()`, like a `Pipeline`, on this process."""

    def __init__(self, module: Any, example_inputs: tuple, *, reps: int = 3) -> None:
        self.module = module
        self.supervisor = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="partita-local-model")
        self._lock = threading.Lock()
        self._delivered: list[float] = []
        self._failed = 0
        self._submitted = 0
        times = []
        with torch.no_grad():
            for _ in range(reps):
                started = time.perf_counter()
                module(*example_inputs)
                times.append(time.perf_counter() - started)
        compute_s = statistics.median(times)
        stage = StagePlan(devices=(DEVICE,), start=0, end=1, compute_s=compute_s, memory_bytes=0.0,
                          in_bytes=0, out_bytes=0)
        self.plan = Plan(stages=(stage,), period_s=compute_s, throughput_rps=1.0 / compute_s if compute_s else 0.0,
                         latency_s=compute_s, objective="throughput", planner="single-process", source="client")
        self.cluster_spec = ClusterSpec.from_dict({
            "source": "client",
            "devices": [{"name": DEVICE, "flops_per_s": 1e9, "memory_bytes": 2**40, "speed": 1.0}],
            "links": {"default": {"bandwidth": "10GB/s", "latency": "0s"}},
        })

    def submit(self, *inputs: Any) -> Future:
        with self._lock:
            self._submitted += 1
        return self._pool.submit(self._run, inputs)

    def _run(self, inputs: tuple) -> Any:
        try:
            with torch.no_grad():
                result = self.module(*inputs)
        except BaseException:
            with self._lock:
                self._failed += 1
            raise
        with self._lock:
            self._delivered.append(time.monotonic())
        return result

    def stats(self) -> dict[str, Any]:
        with self._lock:
            times, failed, submitted = list(self._delivered), self._failed, self._submitted
        period_s = (times[-1] - times[0]) / (len(times) - 1) if len(times) >= 2 else None
        stage = self.plan.stages[0]
        return {
            "epoch": 1,
            "delivered": len(times),
            "failed": failed,
            "pending": submitted - len(times) - failed,
            "max_in_flight": None,
            "measured": {"period_s": period_s, "throughput_rps": 1.0 / period_s if period_s else None},
            "stages": [{"index": 0, "devices": [DEVICE], "segments": [0, 1], "requests": len(times),
                        "predicted_compute_s": stage.compute_s, "measured_compute_s": None, "measured_queue_s": None}],
            "links": [],
            "replans": [],
            "replans_declined": [],
        }

    def close(self) -> None:
        self._pool.shutdown(wait=True)
