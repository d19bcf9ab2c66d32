"""The running coordinator's reliability loop: failures, drift and joins become re-plans, without losing requests.

`deploy(..., supervise=True)` (the default) attaches a `Supervisor` to the `Pipeline`. Its thread
is the only caller of the pipeline's `ReplanPolicy` (`partita.plan.replan`), which decides; this
module measures and carries out:

* **failures** — a `Heartbeat` reports workers that missed heartbeats for `detection_s` or whose
  connection broke (`partita.runtime.heartbeat`); they go to `policy.on_failure`.
* **drift** — every `stats_interval_s` it reads each worker's running figures (stage time per
  request, link transfer time per message), turns them into per-interval means (`DeltaMeans`)
  and feeds `observe_stage` / `observe_transfer` (see `_observe`).
* **joins** — `Pipeline.add_device(...)`, or a failed worker answering again at its address.
* **standby** (`Supervision(standby=True)`) — after the deploy and after every switch, the failure
  plans' stages are shipped ahead into the workers' archive caches (`partita.runtime.standby`);
  figures read over an interval in which that happened only move the baselines on, so the
  copies' own traffic is never taken for drift.

A `Decision` is carried out by `partita.runtime.switch.Switcher.switch` (the transition from the
running deployment to the new plan): the new stages are shipped only to devices whose stage
changed, every worker is routed for the new epoch, and every request still pending is replayed in
it (answers from older epochs are dropped by the ledger). If the devices left cannot hold the model, every pending request, and
every request sent until a device joins, fails with the planner's `PlanError`.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from partita.cluster import DeviceSpec
from partita.errors import DeployError, PartitaError, PlanError, WorkerError
from partita.plan.drift import DeltaMeans, DriftRule
from partita.plan.replan import ReplanPolicy
from partita.plan.switchcost import SwitchCost
from partita.runtime.heartbeat import Heartbeat
from partita.runtime.pipeline import Pipeline
from partita.runtime.session import Session
from partita.runtime.standby import Standby
from partita.runtime.switch import Switcher
from partita.runtime.transition_engine import TransitionEngine

TICK_S = 0.05


@dataclass(frozen=True)
class Supervision:
    """How a pipeline is supervised.

    detection_s: a worker silent this long (seconds) is failed (a broken connection: half of it).
    stats_interval_s: how often workers' figures are read for drift (seconds). drift / joins: whether
    drift, and devices joining, may trigger re-plans (failures always do). min_gain, cooldown_s,
    rule: the policy's hysteresis (`ReplanPolicy`). link_floor_s: real seconds below which a link's
    measured transfer time is noise (loopback scheduling), read as "as planned". switch_cost: how a
    switch's cost is predicted and the horizon its gain must pay for it within (its `load_s` is
    replaced by what loads measured, from the first deploy on). standby: pre-ship the archives the
    failure plans would need onto the devices that would take them over
    (`partita.runtime.standby`), so that a failover ships nothing.
    """

    detection_s: float = 2.0
    stats_interval_s: float = 0.5
    drift: bool = True
    joins: bool = True
    min_gain: float = 0.1
    cooldown_s: float = 10.0
    rule: DriftRule = field(default_factory=DriftRule)
    link_floor_s: float = 0.003
    switch_cost: SwitchCost = field(default_factory=SwitchCost)
    standby: bool = False


class Supervisor:
    """Watches one pipeline (see the module docstring). Created by `deploy`; stopped by `Pipeline.close`."""

    def __init__(self, pipe: Pipeline, session: Session, engine: TransitionEngine, config: Supervision, *,
                 objective: str, planner: str, max_stages: int | None, replicate: bool) -> None:
        self.config = config
        self.session = session
        self._pipe = pipe
        self._cluster = session.cluster
        # Plan with what deploy planned with: the declared cluster, its probed links in place.
        self.policy = ReplanPolicy(pipe.graph, pipe.measurements.cluster_spec(session.cluster.spec), pipe.plan,
                                   segment_times_s=pipe.measurements.segment_times_s, objective=objective,
                                   planner=planner, max_stages=max_stages, replicate=replicate, rule=config.rule,
                                   min_gain=config.min_gain, cooldown_s=config.cooldown_s,
                                   switch_cost=config.switch_cost)
        self._engine = engine
        self.events: list[dict[str, Any]] = []  # failures, joins, switches, halts (time.monotonic seconds)
        self._events_lock = threading.Lock()
        self._requests: queue.Queue[tuple[Any, Future]] = queue.Queue()
        self._means = DeltaMeans()
        self._seen: set[Any] = set()
        self._failed: set[str] = set()
        self._next_stats = time.monotonic() + config.stats_interval_s
        self._stop = threading.Event()
        self._collector = ThreadPoolExecutor(max_workers=1, thread_name_prefix="partita-figures")
        self._collecting: Future | None = None
        self._interval_start = time.monotonic()  # when the figures read next began to accumulate
        self.heartbeat = Heartbeat(session.cluster.endpoints, session.keys, detection_s=config.detection_s).start()
        engine.watch_busy(self.heartbeat.busy)
        self.switcher = Switcher(pipe, engine)
        self.standby: Standby | None = Standby(self.switcher, engine) if config.standby else None
        self._standby_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="partita-standby")
        self._standby_round = 0
        self._refresh_standby()
        self._thread = threading.Thread(target=self._run, name="partita-supervisor", daemon=True)
        self._thread.start()

    # -- any thread -----------------------------------------------------------------------------
    def replans(self) -> list[dict[str, Any]]:
        """Every re-plan so far (`Replan.to_dict()`), oldest first."""
        return self.policy.replans()

    def declined(self) -> list[dict[str, Any]]:
        """The latest re-plans considered and not made, and why (`ReplanPolicy.declined`)."""
        return self.policy.declined()

    def add_device(self, device: DeviceSpec | str, *, timeout_s: float = 120.0) -> dict[str, Any] | None:
        """See `Pipeline.add_device`. Blocks until the join is handled; re-raises what it raised."""
        if not self.config.joins:
            raise DeployError("this pipeline was deployed with joins off (Supervision(joins=False))")
        future: Future = Future()
        self._requests.put((device, future))
        return future.result(timeout=timeout_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(30.0)
        self.heartbeat.stop()
        self._collector.shutdown(wait=True)
        self._standby_round += 1  # a copy still travelling stops after it (Standby.ship checks)
        self._standby_pool.shutdown(wait=True, cancel_futures=True)

    def _log(self, event: str, **fields: Any) -> None:
        with self._events_lock:
            self.events.append({"event": event, "at": time.monotonic(), **fields})

    # -- the supervisor thread --------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                self._step()
            except Exception as exc:  # noqa: BLE001 - the loop must survive one bad step; say what it was
                self._log("error", error=f"{type(exc).__name__}: {exc}")

    def _step(self) -> None:
        now = time.monotonic()
        lost = self._take_failures()
        for name in self.heartbeat.take_recovered():
            if self.config.joins and name in self._failed:
                self._join(name)
        while True:
            try:
                device, future = self._requests.get_nowait()
            except queue.Empty:
                break
            try:
                future.set_result(self._join(device))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller waiting on the future
                future.set_exception(exc)
        if self.config.drift:
            self._poll_figures(now, lost)
        self._decide(time.monotonic())

    def _poll_figures(self, now: float, lost: list[str]) -> None:
        """Read workers' figures in a helper thread (a dead worker's call must not delay failure handling)."""
        if self._collecting is not None and self._collecting.done():
            deployment, figures, read_at = self._collecting.result()
            self._collecting = None
            if not lost and deployment is self._pipe.deployment:  # figures of a replaced epoch are dropped
                # Standby copies crossing the links (and their splitting using the CPU) would read as
                # drift: the figures of an interval that overlapped them only update the baselines.
                quiet = self.standby is None or not self.standby.shipped_during(self._interval_start, read_at)
                self._observe(deployment, figures, time.monotonic(), feed=quiet)
            self._interval_start = read_at
        if self._collecting is None and now >= self._next_stats:
            self._next_stats = now + self.config.stats_interval_s
            deployment = self._pipe.deployment
            self._collecting = self._collector.submit(self._collect, deployment)

    def _collect(self, deployment: Any) -> tuple[Any, dict[str, dict[str, Any]], float]:
        """The workers' figures, and when reading them began (time.monotonic seconds)."""
        read_at = time.monotonic()
        names = {d for devices in deployment.placement for d in devices}
        figures = {}
        for name in sorted(names):
            found = self._worker_stats(name)
            if found is not None:
                figures[name] = found
        return deployment, figures, read_at

    def _take_failures(self) -> list[str]:
        failures = self.heartbeat.take_failed()
        names = []
        for failure in failures:
            if failure.device in self._failed:
                continue
            self._failed.add(failure.device)
            names.append(failure.device)
            self._log("failed", device=failure.device, detected_at=failure.at, reason=failure.reason)
            self.session.drop(failure.device)  # its calls would only time out; stats() leaves it out
        if names:
            self.policy.on_failure(names, time_s=time.monotonic())
        return names

    def _decide(self, now: float) -> dict[str, Any] | None:
        """Ask the policy; carry out what it decides. Returns the completed re-plan record, if any."""
        while True:
            self._tell_costs()
            try:
                decision = self.policy.decide(now)
            except PlanError as exc:
                self._halt(exc)
                return None
            if decision is None:
                return None
            started = time.perf_counter()
            try:
                self.switcher.switch(decision)
            except (WorkerError, DeployError) as exc:
                if self._wait_for_failure(exc):
                    self.policy.completed(decision, time.perf_counter() - started,
                                          sum(self._engine.shipped_bytes.values()))
                    now = time.monotonic()
                    continue  # a device died during the switch: on_failure was called, decide again
                self._halt(DeployError(f"the {decision.cause} re-plan could not be carried out: {exc}"))
                return None
            record = self.policy.completed(decision, time.perf_counter() - started, self.switcher.last_shipped_bytes)
            self._log("switched", cause=decision.cause, epoch=self._pipe.deployment.epoch,
                      switch_s=record.switch_s, predicted_switch_s=record.predicted_switch_s,
                      shipped=list(self.switcher.last_shipped), shipped_bytes=record.shipped_bytes,
                      renumbered=list(self.switcher.last_renumbered))
            self._refresh_standby()
            return record.to_dict()

    def _refresh_standby(self) -> None:
        """Ship the standby copies of the running plan's failure plans, in the standby thread (if standby is on)."""
        if self.standby is None:
            return
        self._standby_round += 1
        current = self._standby_round
        standby = self.standby
        standby.reset()
        scenarios = self.policy.failure_scenarios()  # a snapshot: the planning runs in the standby thread

        def is_current() -> bool:
            return current == self._standby_round and not self._stop.is_set()

        def ship() -> None:
            standby.ship(scenarios, is_current)
            if is_current():
                self._log("standby", **standby.state())

        self._standby_pool.submit(ship)

    def _tell_costs(self) -> None:
        """Give the policy what switch costs depend on: measured load times, and what each device's cache holds."""
        loads = self._engine.load_seconds
        if loads:
            load_s = sorted(loads)[len(loads) // 2]
            if load_s != self.policy.switch_cost.load_s:
                self.policy.switch_cost = dataclasses.replace(self.policy.switch_cost, load_s=load_s)
        library = self.switcher.library
        self.policy.note_cached({
            device: [segments for segments, program in library.items() if program.sha256 in held]
            for device, held in self._engine.archives.items()
        })

    def _wait_for_failure(self, error: Exception) -> bool:
        """After a switch went wrong: True once the heartbeat names a failed device (at most ~1.5 detection times)."""
        deadline = time.monotonic() + 1.5 * self.config.detection_s
        while time.monotonic() < deadline and not self._stop.is_set():
            if self._take_failures():
                return True
            time.sleep(TICK_S)
        self._log("switch_error", error=str(error))
        return False

    def _halt(self, error: PartitaError) -> None:
        self._log("halted", error=str(error))
        self.switcher.halt(error)

    # -- joins ----------------------------------------------------------------------------------
    def _join(self, device: DeviceSpec | str) -> dict[str, Any] | None:
        name = device.name if isinstance(device, DeviceSpec) else str(device)
        present = self.policy.cluster.names if self.policy.cluster is not None else ()
        if name in present and name not in self._failed:
            raise DeployError(f"device {name!r} is already part of the deployment")
        endpoint = self._cluster.endpoints.get(name)
        if endpoint is None:
            raise DeployError(f"no running worker for device {name!r}; start it (LocalCluster.add_worker, or "
                              "`partita worker`) and add it to the cluster handle first")
        self.session.connect(name, endpoint)
        self.heartbeat.watch(name, endpoint)
        with self.heartbeat.busy(name):
            self.session.greet(name)
        self.switcher.forget(name)
        self._failed.discard(name)
        self.policy.on_join(device, time_s=time.monotonic(), segment_times_s=self._segment_times(name))
        self._log("joined", device=name)
        return self._decide(time.monotonic())

    def _segment_times(self, name: str) -> tuple[float, ...] | None:
        """Seconds per segment on `name`: scaled from the host profile when emulated here, else None (flops)."""
        host_s = self._pipe.measurements.host_segment_s
        speed = self._cluster.host_speeds.get(name)
        if host_s is None or speed is None:
            return None
        return tuple(t / speed for t in host_s)

    # -- drift ----------------------------------------------------------------------------------
    def _observe(self, deployment: Any, workers: Mapping[str, Any], now: float, *, feed: bool = True) -> None:
        """Feed the policy one interval's mean stage time per device and transfer time per link.

        feed False: only move the per-interval baselines on (the interval's figures are not to be trusted).
        """
        dilation = self._pipe.dilation
        source = self._cluster.spec.source
        in_bytes = {}
        for index, devices in enumerate(deployment.placement):
            stage = deployment.plan.stages[index]
            senders = deployment.placement[index - 1] if index > 0 else (source,)
            for device in devices:
                for sender in senders:
                    in_bytes[(sender, device)] = stage.in_bytes
        for index, devices in enumerate(deployment.placement):
            for device in devices:
                figures = workers.get(device)
                if figures is None or device in self._failed:
                    continue
                stage = figures.get("stages", {}).get(str(deployment.stage_id(index)))
                if stage:
                    mean = self._interval_mean(("stage", device, deployment.epoch, index), stage)
                    if mean is not None and mean > 0 and feed:
                        self.policy.observe_stage(device, mean, time_s=now)
                for sender, link in (figures.get("links_in") or {}).items():
                    nbytes = in_bytes.get((sender, device))
                    if nbytes:
                        self._observe_link(sender, device, deployment.epoch, link, nbytes, dilation, now, feed=feed)

    def _observe_link(self, a: str, b: str, epoch: int, link: Mapping[str, Any], nbytes: int, dilation: float,
                      now: float, *, feed: bool = True) -> None:
        real_s = self._interval_mean(("link", a, b, epoch), {"requests": link.get("messages", 0),
                                                              "mean_device_s": link.get("mean_transfer_s", 0.0)})
        if real_s is None or not feed:
            return
        planned = self.policy.cluster.link(a, b) if self.policy.cluster else None
        if planned is None:
            return
        planned_s = planned.latency_s + (0.0 if math.isinf(planned.bandwidth_bytes_per_s)
                                         else nbytes / planned.bandwidth_bytes_per_s)
        # Below the noise floor a measured time says nothing either way: read it as the plan's.
        transfer_s = real_s / dilation if real_s >= self.config.link_floor_s else max(real_s / dilation, planned_s)
        if math.isinf(planned.bandwidth_bytes_per_s) and real_s < self.config.link_floor_s:
            return
        self.policy.observe_transfer(a, b, nbytes=float(nbytes), transfer_s=transfer_s, time_s=now)

    def _interval_mean(self, key: Any, figures: Mapping[str, Any]) -> float | None:
        """The mean over the samples since the last read of `key`; None on its first read (a baseline)."""
        count, mean = int(figures.get("requests", 0)), float(figures.get("mean_device_s", 0.0))
        delta = self._means.update(key, count, mean)
        if key not in self._seen:
            self._seen.add(key)
            return None
        return delta

    def _worker_stats(self, name: str) -> dict[str, Any] | None:
        client = self.session.clients.get(name)
        if client is None or name in self._failed:
            return None
        try:
            return client.call("stats", timeout_s=1.0).header
        except WorkerError:
            return None  # a worker that cannot answer is the heartbeat's business, not drift's


def attach(pipe: Pipeline, session: Session, engine: TransitionEngine, supervise: Supervision | bool, *,
           objective: str, planner: str, max_stages: int | None, replicate: bool, pinned: bool) -> Supervisor:
    """Start supervising a freshly deployed `pipe` (deploy calls this). `pinned`: the user gave the stages."""
    if isinstance(supervise, Supervision):
        config = supervise
    else:
        config = Supervision(drift=not pinned, joins=not pinned)
    if not isinstance(supervise, Supervision | bool):
        raise DeployError(f"supervise must be True, False or a Supervision, got {supervise!r}")
    pipe.supervisor = Supervisor(pipe, session, engine, config, objective=objective, planner=planner,
                                 max_stages=max_stages, replicate=replicate)
    return pipe.supervisor
