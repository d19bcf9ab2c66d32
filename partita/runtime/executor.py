"""Stage execution inside a worker: what to compute, on which torch device, at what emulated speed.

The executor owns the loaded stage programs and one compute thread. The worker's I/O thread
submits `Job`s; the compute thread takes them in arrival order, tells the I/O thread it took one
(`on_taken`, which returns a credit upstream), runs the stage, waits out the emulated speed, and
hands back a `Done` (`on_done`). torch releases the GIL while it computes, so receiving and
sending go on in the I/O thread at the same time.

A short job skips the compute thread: when nothing is queued or running, the stage usually takes
under `INLINE_MAX_S` and the emulated speed would make it wait for nothing, `run_now` runs it in
the caller's (the I/O) thread. Two thread hand-offs cost more than such a stage itself (each is a
wake-up that waits for a core on a loaded host), and they are most of a small request's latency.
A long stage, an emulated wait, or a job behind others still goes through the queue, so the I/O
thread stays free to answer heartbeats and jobs keep their arrival order.

Memory is checked here, because here is where stages live: a stage needs `memory_bytes` (the
planner's weights + peak activations, at least the archive's parameter bytes) and the sum over
loaded stages must fit the worker's capacity.
"""

from __future__ import annotations

import queue
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from partita.errors import WorkerError
from partita.runtime.emulation import reference_at

_STOP = object()
#: A job runs in the I/O thread (no hand-off) when its stage's recent host time is at most this (seconds).
INLINE_MAX_S = 0.002
#: How many recent host times a stage's estimate is the median of (a median ignores a run the OS preempted).
_RECENT_RUNS = 9


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def resolve_device(choice: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit choice must be available.

    A stage is moved there on load (`StageProgram.to`); requests arrive and leave as CPU tensors.
    """
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise WorkerError("--device cuda was asked for but torch sees no CUDA device; use --device auto or cpu")
    if choice == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise WorkerError("--device mps was asked for but torch sees no MPS device; use --device auto or cpu")
    if choice not in ("cpu", "cuda", "mps"):
        raise WorkerError(f"unknown --device {choice!r}; choose auto, cpu, cuda or mps")
    return torch.device(choice)


@dataclass
class Job:
    """One request's input to one stage. `sender` is the ROUTER identity to return a credit to."""

    stage: int
    request: int
    epoch: int
    tensors: tuple[torch.Tensor, ...]
    sender: bytes
    received_at: float


@dataclass
class Done:
    """The outcome of a Job: outputs, or an error message (the request fails, the worker stays up).

    `host_s` is the real time the stage ran; `device_s` the emulated device time (real elapsed time
    including the speed wait, divided by the dilation).
    """

    job: Job
    outputs: tuple[torch.Tensor, ...] | None
    error: str | None
    host_s: float
    device_s: float


@dataclass
class StageStats:
    """Per-stage figures since load (device seconds unless named host)."""

    requests: int = 0
    errors: int = 0
    host_s: float = 0.0
    device_s: float = 0.0
    overruns: int = 0  # requests whose real compute took longer than the emulated target
    queue_s: float = 0.0  # device seconds requests waited on this worker before their compute began

    def to_dict(self) -> dict[str, Any]:
        n = max(self.requests, 1)
        return {
            "requests": self.requests,
            "errors": self.errors,
            "mean_host_s": self.host_s / n,
            "mean_device_s": self.device_s / n,
            "overruns": self.overruns,
            "mean_queue_s": self.queue_s / n,
        }


@dataclass
class LoadedStage:
    """A stage program on this worker. `reference_host_s`: its calibrated host time (emulation basis).

    `reference_steps`: per kind of step, the points its reference host time is taken from (a
    decoder stage, whose prefill and decode steps differ in size; see `StageExecutor`).
    """

    program: Any
    memory_bytes: float
    reference_host_s: float | None
    reference_steps: Mapping[str, Any] | None = None
    stats: StageStats = field(default_factory=StageStats)
    warmed: bool = False
    recent_runs: deque[float] = field(default_factory=lambda: deque(maxlen=_RECENT_RUNS))  # host seconds
    _recent_median_s: float | None = None

    @property
    def recent_host_s(self) -> float | None:
        """The median host seconds of the last runs (warm-up included); None: never run."""
        return self._recent_median_s

    def record_run(self, host_s: float) -> None:
        """Add one run's host seconds to `recent_runs` (the median is kept: every request asks for it)."""
        self.recent_runs.append(host_s)
        self._recent_median_s = statistics.median(self.recent_runs)


class StageExecutor:
    """Runs jobs one at a time on `device`, emulating `speed` (relative to this host) under `dilation`.

    `speed` None means no emulation: device time is real time. With emulation, a stage that takes
    `h` host seconds (its `reference_host_s` if given, else the measured time) is made to take
    `h / speed * dilation` real seconds, by sleeping the difference. A stage whose steps differ in
    size says what a job is (`program.step_work(tensors)` -> (kind, size), e.g. ("decode", position))
    and, with `reference_steps` of that kind, `h` is the reference at that size (`reference_at`):
    so the emulated time follows the calibrated reference, not the momentary load of this host.
    """

    def __init__(
        self,
        device: torch.device,
        *,
        capacity_bytes: float,
        on_taken: Callable[[Job], None],
        on_done: Callable[[Done], None],
        speed: float | None = None,
        dilation: float = 1.0,
    ) -> None:
        self.device = device
        self.capacity_bytes = capacity_bytes
        self.speed = speed
        self.dilation = dilation
        self._on_taken = on_taken
        self._on_done = on_done
        self._stages: dict[int, LoadedStage] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[Any] = queue.Queue()
        self._outstanding = 0  # jobs submitted to the compute thread and not yet done
        # When the emulated device finishes its latest job on its own schedule (perf_counter
        # seconds): the device is a FIFO server, so the next job cannot finish before this + its time.
        self._free_at = 0.0
        # torch's intra-op thread count is per OS thread (OpenMP): a new thread starts at the
        # default, whatever the worker set. The compute thread takes its creator's count.
        self.threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self._loop, name="partita-compute", daemon=True)

    # -- stages -----------------------------------------------------------------------------
    def used_bytes(self, *, excluding: int | None = None) -> float:
        with self._lock:
            return sum(s.memory_bytes for k, s in self._stages.items() if k != excluding)

    def load(self, index: int, program: Any, *, memory_bytes: float, reference_host_s: float | None, owner: str,
             reference_steps: Mapping[str, Any] | None = None) -> None:
        """Install stage `index` (replacing one with the same index), or refuse if it does not fit."""
        need = max(float(memory_bytes), float(getattr(program, "param_bytes", 0)))
        used = self.used_bytes(excluding=index)
        if used + need > self.capacity_bytes:
            raise WorkerError(
                f"stage {index} needs {_mib(need)} (weights + activations) but worker {owner} has "
                f"{_mib(self.capacity_bytes - used)} free of {_mib(self.capacity_bytes)}; "
                "choose a plan that fits this device's memory or give it more (--memory)"
            )
        if self.device.type != "cpu":
            if not hasattr(program, "to"):
                raise WorkerError(
                    f"worker {owner} runs on {self.device.type} but this stage program cannot be moved off the CPU "
                    "(StageProgram has no .to(device)); start the worker with --device cpu"
                )
            program = program.to(self.device)
        warmed_s = self._warm_up(program)
        with self._lock:
            self._stages[index] = loaded = LoadedStage(program, need, reference_host_s, reference_steps,
                                                       warmed=warmed_s is not None)
            if warmed_s is not None:
                loaded.record_run(warmed_s)

    def _warm_up(self, program: Any) -> float | None:
        """Run the stage on zeros of its input shapes (batch 1), so lazy set-up is not billed to a request.

        Returns the host seconds of the run after the set-up (a first estimate of the stage's time;
        a long first run is not repeated), or None when the stage cannot run on zeros; that is not
        an error (real inputs may be fine), the first request then pays the set-up.
        """
        specs = getattr(program, "inputs", None)
        if specs is None:
            return None
        try:
            zeros = tuple(
                torch.zeros([1 if d is None else d for d in spec.shape], dtype=getattr(torch, spec.dtype), device=self.device)
                for spec in specs
            )
            with torch.no_grad():
                started = time.perf_counter()
                program.run(*zeros)
                elapsed_s = time.perf_counter() - started
                if elapsed_s <= 100 * INLINE_MAX_S:  # cheap enough to time again without the set-up
                    started = time.perf_counter()
                    program.run(*zeros)
                    elapsed_s = time.perf_counter() - started
        except Exception:  # noqa: BLE001 - warm-up is an optimisation; a failure here only costs the first request
            return None
        return elapsed_s

    def unload(self, indices: list[int] | None = None) -> None:
        """Drop the given stages (None: all)."""
        with self._lock:
            for k in list(self._stages) if indices is None else indices:
                self._stages.pop(k, None)

    def renumber(self, moves: Mapping[int, int]) -> None:
        """Serve stage `old` as stage `new` for every (old, new) in `moves`, all at once.

        WorkerError (and no change) if an `old` is not loaded or a `new` collides with a stage that stays.
        """
        with self._lock:
            missing = sorted(k for k in moves if k not in self._stages)
            if missing:
                raise WorkerError(f"cannot renumber stages {missing}: not loaded here")
            staying = set(self._stages) - set(moves)
            clash = sorted(set(moves.values()) & staying)
            if clash or len(set(moves.values())) != len(moves):
                raise WorkerError(f"renumbering {dict(moves)} would put two stages at one index")
            taken = {old: self._stages.pop(old) for old in moves}
            for old, new in moves.items():
                self._stages[new] = taken[old]

    def stage(self, index: int) -> LoadedStage | None:
        with self._lock:
            return self._stages.get(index)

    def stage_indices(self) -> list[int]:
        with self._lock:
            return sorted(self._stages)

    def stats(self) -> dict[int, dict[str, Any]]:
        with self._lock:
            return {k: s.stats.to_dict() for k, s in self._stages.items()}

    def set_speed(self, speed: float | None, dilation: float | None = None) -> None:
        self.speed = speed
        if dilation is not None:
            self.dilation = dilation

    # -- running ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue `job` for the compute thread (`on_taken`, then `on_done`, are called from there)."""
        with self._lock:
            self._outstanding += 1
        self._queue.put((time.perf_counter(), job))

    def can_run_now(self, stage: int, tensors: tuple[torch.Tensor, ...] = ()) -> bool:
        """Whether a job of `stage` should run in the calling thread (`run_now`) rather than be queued.

        Yes when the compute thread has nothing queued or running (so arrival order holds), the
        stage is loaded and known to take at most `INLINE_MAX_S`, and the emulated speed would add
        no wait beyond its real time (a wait belongs in the compute thread, not the I/O loop).
        """
        with self._lock:
            if self._outstanding:
                return False
            loaded = self._stages.get(stage)
        if loaded is None:
            return False
        recent_s = loaded.recent_host_s
        if recent_s is None or recent_s > INLINE_MAX_S:
            return False
        if self.speed is None:
            return True
        basis_s = self._basis_s(loaded, tensors, recent_s)
        return basis_s / self.speed * self.dilation <= max(recent_s, INLINE_MAX_S / 10)

    @staticmethod
    def _basis_s(loaded: LoadedStage, tensors: tuple[torch.Tensor, ...], measured_s: float) -> float:
        """The host seconds a job's emulated time is paced by (see the class docstring)."""
        if loaded.reference_steps:
            work = getattr(loaded.program, "step_work", None)
            step = work(tensors) if work is not None else None
            if step is not None and (points := loaded.reference_steps.get(step[0])):
                return reference_at(points, step[1])
        return loaded.reference_host_s if loaded.reference_host_s is not None else measured_s

    def run_now(self, job: Job) -> Done:
        """Run `job` in the calling thread and return its outcome (callbacks are not called; see `can_run_now`)."""
        return self._run(job, time.perf_counter())

    @property
    def pending(self) -> int:
        """Jobs queued or running in the compute thread."""
        return self._outstanding

    def stop(self, timeout_s: float = 10.0) -> None:
        """Finish the queued jobs, then stop the thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout_s)

    def _loop(self) -> None:
        torch.set_num_threads(self.threads)
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            queued_at, job = item
            try:
                self._on_taken(job)
                self._on_done(self._run(job, queued_at))
            finally:
                with self._lock:
                    self._outstanding -= 1

    def _run(self, job: Job, queued_at: float) -> Done:
        loaded = self.stage(job.stage)
        if loaded is None:
            return Done(job, None, f"stage {job.stage} is not loaded on this worker", 0.0, 0.0)
        queue_s = (time.monotonic() - job.received_at) / self.dilation
        started = time.perf_counter()
        try:
            with torch.no_grad():
                if self.device.type == "cpu":  # `.to` would return the same tensors: skip its calls
                    outputs = tuple(loaded.program.run(*job.tensors))
                else:
                    tensors = tuple(t.to(self.device) for t in job.tensors)
                    outputs = tuple(o.to("cpu") for o in loaded.program.run(*tensors))
        except Exception as exc:  # noqa: BLE001 - any failure of user compute fails this request only
            loaded.stats.errors += 1
            return Done(job, None, f"stage {job.stage} failed: {type(exc).__name__}: {exc}", 0.0, 0.0)
        host_s = time.perf_counter() - started
        loaded.record_run(host_s)
        if self.speed is not None:
            basis_s = self._basis_s(loaded, job.tensors, host_s)
            target_s = basis_s / self.speed * self.dilation
            if host_s > target_s:
                loaded.stats.overruns += 1
            # The emulated device runs its jobs back to back on its own schedule: a job begins when
            # it was queued or when the device's previous job ends on that schedule, whichever is
            # later, and ends `target_s` after. A wake-up that overshot delays the real finish of
            # one job but not the schedule, so queued jobs catch up and device time is right on
            # average; a job that arrives at an idle device gets no credit, so the device is never
            # faster than it could physically be (replicas measure at most r x one device).
            scheduled_end = max(queued_at, self._free_at) + target_s
            self._free_at = scheduled_end
            remaining_s = scheduled_end - time.perf_counter()
            if remaining_s > 0:
                time.sleep(remaining_s)
        device_s = (time.perf_counter() - started) / self.dilation
        loaded.stats.requests += 1
        loaded.stats.queue_s += queue_s
        loaded.stats.host_s += host_s
        loaded.stats.device_s += device_s
        return Done(job, outputs, None, host_s, device_s)
