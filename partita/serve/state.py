"""What the server knows about the cluster and its traffic: `GET /api/state`, the event stream, the gauges.

`ServeState` polls the pipeline (`Pipeline.stats()`, once per `poll_s`) in a thread of its own and
keeps one JSON snapshot of it (see `snapshot()` for the fields). The HTTP handlers only record
each request's outcome and latency; `snapshot()` and the SSE stream read what the poller built.
Every poll bumps `version`, so the event stream sends only when something new is there.

Devices are up until the pipeline's supervisor reports them failed (or a re-plan lost them), and
up again when they join. Times in `events` and `series` are Unix seconds.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from partita.serve.metrics import ServeMetrics

HISTORY_S = 300  # the dashboard's charts cover the last five minutes
MAX_EVENTS = 200


class ServeState:
    """The live picture of one served deployment (see the module docstring)."""

    def __init__(self, *, model: str, pipe: Any, cluster_spec: Any, metrics: ServeMetrics, max_rows: int,
                 window_s: float, poll_s: float = 1.0, on_plan_change: Callable[[str], None] | None = None) -> None:
        self.model = model
        self.metrics = metrics
        self.version = 0
        self.halted: str | None = None  # why no plan can run (requests fail), None while one can
        self._pipe = pipe
        self._spec = cluster_spec
        self._max_rows = max_rows
        self._window_s = window_s
        self._poll_s = poll_s
        self._on_plan_change = on_plan_change
        self._lock = threading.Lock()
        self._answered: deque[tuple[float, float]] = deque()  # (unix time answered, latency s) of ok requests
        self._outcomes: dict[str, int] = {}
        self._series: deque[dict[str, Any]] = deque(maxlen=int(HISTORY_S / poll_s) + 1)
        self._events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self._down: set[str] = set()
        self._seen_replans = 0
        self._seen_supervisor = 0
        self._epoch: int | None = None
        self._delivered = 0
        self._snapshot: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="partita-serve-state", daemon=True)
        for device in cluster_spec.devices:
            metrics.device_up.labels(device.name).set(1)
        self.event("deployed", f"{model} deployed: {plan_line(pipe.plan)}")

    # -- called by the HTTP side -------------------------------------------------------------------
    def start(self) -> None:
        self.poll()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10.0)

    def record(self, outcome: str, latency_s: float | None = None) -> None:
        """One infer request finished with `outcome` (a label of partita_requests_total)."""
        self.metrics.requests.labels(outcome).inc()
        with self._lock:
            self._outcomes[outcome] = self._outcomes.get(outcome, 0) + 1
            if outcome == "ok" and latency_s is not None:
                self._answered.append((time.time(), latency_s))
        if outcome == "ok" and latency_s is not None:
            self.metrics.latency.observe(latency_s)

    def event(self, kind: str, text: str, **fields: Any) -> None:
        with self._lock:
            self._events.append({"time": time.time(), "kind": kind, "text": text, **fields})

    def snapshot(self) -> dict[str, Any]:
        """`GET /api/state`: model, ready, devices, links, plan, series, events, requests (see docs/serve.md)."""
        with self._lock:
            return {**self._snapshot, "version": self.version, "events": list(self._events),
                    "requests": dict(self._outcomes), "series": list(self._series)}

    # -- the poller --------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self._poll_s):
            try:
                self.poll()
            except Exception as exc:  # noqa: BLE001 - a failed poll (a worker mid-switch) must not end the picture
                self.event("error", f"could not read the pipeline's figures: {type(exc).__name__}: {exc}")

    def poll(self) -> None:
        """Read the pipeline's figures once and rebuild the snapshot (the poller calls it every poll_s)."""
        stats = self._pipe.stats()
        self._take_supervisor_events()
        self._take_replans(stats.get("replans", []))
        plan = self._pipe.plan
        if stats["epoch"] != self._epoch:
            if self._epoch is not None:
                line = plan_line(plan)
                self.event("plan", f"new plan (epoch {stats['epoch']}): {line}")
                if self._on_plan_change is not None:
                    self._on_plan_change(line)
            self._epoch = stats["epoch"]
            self.metrics.clear_plan()
        delivered_delta = max(0, stats["delivered"] - self._delivered)
        self._delivered = stats["delivered"]
        stages = self._stages(stats, plan)
        links = self._links(stats, plan, delivered_delta)
        self.metrics.period.labels("predicted").set(plan.period_s)
        if stats["measured"]["period_s"]:
            self.metrics.period.labels("measured").set(stats["measured"]["period_s"])
        point = self._point()
        with self._lock:
            self._series.append(point)
            self._snapshot = {
                "model": self.model,
                "ready": self.halted is None,
                "halted": self.halted,
                "batching": {"max_batch": self._max_rows, "window_ms": self._window_s * 1e3},
                "source": self._spec.source,
                "devices": self._devices(stages),
                "links": links,
                "plan": {
                    "epoch": stats["epoch"],
                    "planner": plan.planner,
                    "objective": plan.objective,
                    "predicted_period_s": plan.period_s,
                    "predicted_latency_s": plan.latency_s,
                    "measured_period_s": stats["measured"]["period_s"],
                    "stages": stages,
                },
                "pipeline": {k: stats[k] for k in ("delivered", "failed", "pending", "max_in_flight")},
                "replans": stats.get("replans", []),
            }
            self.version += 1

    def _point(self) -> dict[str, Any]:
        """Throughput and latency of the ok requests answered over the last poll interval."""
        now = time.time()
        with self._lock:
            while self._answered and self._answered[0][0] < now - max(self._poll_s, 1.0) * 5:
                self._answered.popleft()
            recent = sorted(lat for t, lat in self._answered if t >= now - self._poll_s)
            total = sum(self._outcomes.values())
        return {
            "time": now,
            "throughput_rps": len(recent) / self._poll_s,
            "latency_p50_s": recent[len(recent) // 2] if recent else None,
            "latency_p99_s": recent[min(len(recent) - 1, int(0.99 * len(recent)))] if recent else None,
            "requests_total": total,
        }

    def _stages(self, stats: dict[str, Any], plan: Any) -> list[dict[str, Any]]:
        out = []
        for s, stage_plan in zip(stats["stages"], plan.stages, strict=True):
            labels = (str(s["index"]), ",".join(s["devices"]))
            replicas = max(len(s["devices"]), 1)
            self.metrics.stage_predicted.labels(*labels).set(stage_plan.compute_s)
            if s["measured_compute_s"] is not None:
                self.metrics.stage_compute.labels(*labels).set(s["measured_compute_s"])
            if s.get("measured_queue_s") is not None:
                self.metrics.stage_queue.labels(*labels).set(s["measured_queue_s"])
            measured = s["measured_compute_s"]
            out.append({
                "index": s["index"],
                "devices": s["devices"],
                "segments": s["segments"],
                "requests": s["requests"],
                "predicted_compute_s": stage_plan.compute_s,
                "measured_compute_s": measured,
                "measured_queue_s": s.get("measured_queue_s"),
                "predicted_period_s": stage_plan.compute_s / replicas,
                "measured_period_s": None if measured is None else measured / replicas,
            })
        return out

    def _links(self, stats: dict[str, Any], plan: Any, delivered_delta: int) -> list[dict[str, Any]]:
        replicas = {d: stage.replicas for stage in plan.stages for d in stage.devices}
        out = []
        for link in stats["links"]:
            src, dst = link["from"], link["to"]
            share = replicas.get(dst, replicas.get(src, 1))
            if delivered_delta:
                self.metrics.link_bytes.labels(src, dst).inc(link["bytes"] * delivered_delta / share)
            if link.get("measured_transfer_s") is not None:
                self.metrics.link_transfer.labels(src, dst).set(link["measured_transfer_s"])
            out.append({"from": src, "to": dst, "bytes": link["bytes"],
                        "predicted_transfer_s": link.get("predicted_transfer_s"),
                        "measured_transfer_s": link.get("measured_transfer_s")})
        return out

    def _devices(self, stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        holding = {d: s for s in stages for d in s["devices"]}
        out = []
        for device in self._spec.devices:
            stage = holding.get(device.name)
            out.append({
                "name": device.name,
                "status": "down" if device.name in self._down else "up",
                "flops_per_s": device.flops_per_s,
                "memory_bytes": device.memory_bytes,
                "speed": device.speed,
                "stage": None if stage is None else stage["index"],
                "measured_compute_s": None if stage is None else stage["measured_compute_s"],
            })
        return out

    def _take_supervisor_events(self) -> None:
        supervisor = getattr(self._pipe, "supervisor", None)
        events = list(getattr(supervisor, "events", []))
        for e in events[self._seen_supervisor:]:
            kind, device = e.get("event"), e.get("device")
            if kind == "failed" and device:
                self._mark(device, up=False)
                self.event("failed", f"{device} failed: {e.get('reason', 'no answer')}", device=device)
            elif kind == "joined" and device:
                self._mark(device, up=True)
                self.halted = None
                self.event("joined", f"{device} joined", device=device)
            elif kind == "halted":
                self.halted = str(e.get("error"))
                self.event("halted", f"no plan can run: {self.halted}")
            elif kind == "standby":
                note = f"; {e['error']}" if e.get("error") else ""
                self.event("standby", f"standby: {len(e.get('copies', []))} stage archive(s) pre-shipped "
                                      f"({e.get('bytes', 0):,} bytes){note}")
            elif kind in ("switch_error", "error"):
                self.event(kind, str(e.get("error")))
        self._seen_supervisor = len(events)

    def _take_replans(self, replans: list[dict[str, Any]]) -> None:
        for r in replans[self._seen_replans:]:
            for device in r.get("devices_lost", []):
                self._mark(device, up=False)
            for device in r.get("devices_added", []):
                self._mark(device, up=True)
            self.metrics.switches.labels(r.get("cause", "unknown")).inc()
            cost = ""
            if r.get("predicted_switch_s") is not None and r.get("switch_s") is not None:
                cost = f"; switch {r['switch_s']:.2f} s (predicted {r['predicted_switch_s']:.2f} s)"
            self.event("replan", f"re-plan ({r.get('cause')}): period {_ms(r.get('old_period_s'))} -> "
                                 f"{_ms(r.get('new_period_s'))}{cost}", cause=r.get("cause"))
        self._seen_replans = len(replans)

    def _mark(self, device: str, *, up: bool) -> None:
        (self._down.discard if up else self._down.add)(device)
        self.metrics.device_up.labels(device).set(1 if up else 0)


def _ms(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds * 1e3:.2f} ms"


def plan_line(plan: Any) -> str:
    stages = " | ".join(f"{'+'.join(s.devices)} [{s.start},{s.end})" for s in plan.stages)
    return f"{stages}; predicted period {_ms(plan.period_s)}, latency {_ms(plan.latency_s)}"
