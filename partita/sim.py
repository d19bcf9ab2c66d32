"""A discrete-event simulation of a plan under a stream of requests, at any scale.

Every stage replica and every link a plan uses is a server with a FIFO queue: a replica computes one
request at a time; a link sends one message at a time (its occupancy, bytes / bandwidth) and the
message then takes the link's latency to arrive (latency does not hold the link). The plan's
per-hop overhead h (`Plan.hop_overhead_s`, see `partita.plan.cost`) is held as the cost model holds
it: every replica spends h per request beside its compute (taking the message in and sending it on),
and the source's own h delays the first hop, so one request alone pays h per hop. Request n is
served at stage k by replica n mod r_k, as in the cost model. Requests arrive either closed-loop
(`in_flight` at once, a new one whenever one completes) or as a Poisson stream of `arrival` req/s.

A tiled stage is a fork and a join: each tile is a branch of three servers (the link carrying its
halo'd crop from the source, its device, the link carrying its output back to the source, which
stitches), and the request moves on when its last branch has arrived.

Pure and deterministic for a given seed: no torch, no threads, no sleeping. The cost model's period
is what this simulation converges to in steady state without jitter; `jitter` (the sigma of a
mean-one lognormal factor on every service time) shows what variance costs.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from partita.cluster import ClusterSpec
from partita.errors import PlanError
from partita.plan.cost import check_segment_times, stage_time_s
from partita.plan.profile import load_profile
from partita.plan.types import Plan

__all__ = ["SimReport", "TraceEvent", "simulate", "trace"]


@dataclass(frozen=True)
class SimReport:
    """What the simulation measured.

    throughput_rps: completions per second in steady state (the first 20% of completions and, in a
    closed loop, the final drain are left out). Latencies are source to source, queueing included.
    Utilisation is busy time / simulated time, per device and per directed link "a->b".
    """

    requests: int
    completed: int
    duration_s: float
    throughput_rps: float
    latency_mean_s: float
    latency_p50_s: float
    latency_p95_s: float
    latency_p99_s: float
    device_utilisation: Mapping[str, float] = field(default_factory=dict)
    link_utilisation: Mapping[str, float] = field(default_factory=dict)
    predicted_throughput_rps: float = math.nan
    in_flight: int | None = None
    arrival: str = "closed"

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "completed": self.completed,
            "duration_s": self.duration_s,
            "throughput_rps": self.throughput_rps,
            "predicted_throughput_rps": self.predicted_throughput_rps,
            "latency_mean_s": self.latency_mean_s,
            "latency_p50_s": self.latency_p50_s,
            "latency_p95_s": self.latency_p95_s,
            "latency_p99_s": self.latency_p99_s,
            "device_utilisation": dict(self.device_utilisation),
            "link_utilisation": dict(self.link_utilisation),
            "in_flight": self.in_flight,
            "arrival": self.arrival,
        }


def simulate(plan: Plan, cluster: ClusterSpec, graph_or_profile: Any, *, requests: int = 1000,
             arrival: str | float = "closed", in_flight: int | None = None, jitter: float = 0.0,
             seed: int = 0, segment_times_s: Mapping[str, Sequence[float]] | None = None) -> SimReport:
    """Simulate `requests` requests through `plan` on `cluster`.

    arrival: "closed" (in_flight requests at once; None: enough to saturate the pipeline) or a
        rate in requests per second (Poisson arrivals).
    jitter: sigma of a mean-one lognormal factor applied to every service time (0: deterministic).
    segment_times_s: measured per-device segment times, as for `partita.plan.plan`.
    """
    if isinstance(requests, bool) or int(requests) < 1:
        raise PlanError(f"requests must be >= 1, got {requests!r}")
    if jitter < 0 or not math.isfinite(jitter):
        raise PlanError(f"jitter must be a finite number >= 0, got {jitter!r}")
    closed = arrival == "closed"
    rate: float | None = None
    if not closed:
        try:
            rate = float(arrival)
        except (TypeError, ValueError) as exc:
            raise PlanError(f"arrival must be 'closed' or a rate in req/s, got {arrival!r}") from exc
        if not (rate > 0 and math.isfinite(rate)):
            raise PlanError(f"arrival rate must be a finite number > 0 req/s, got {arrival!r}")
    profile = load_profile(graph_or_profile)
    times = check_segment_times(profile, cluster, segment_times_s)
    requests = int(requests)
    route = _Route(plan, cluster, profile, times)
    if in_flight is None:
        depth = math.ceil(plan.latency_s / plan.period_s) if plan.period_s > 0 else 1
        in_flight = 2 * depth + sum(len(s.devices) for s in plan.stages) + 2
    in_flight = max(1, min(int(in_flight), requests))

    arrived, done, busy = _run(route, requests, rate, in_flight, float(jitter), seed, None)
    return _report(plan, route, requests, arrived, done, busy, in_flight if closed else None,
                   "closed" if closed else f"poisson {rate:g} req/s")



@dataclass(frozen=True)
class TraceEvent:
    """One service: `request` on `server` ("device" or "link", named "d" or "a->b") over [start_s, finish_s)."""

    kind: str
    server: str
    request: int
    start_s: float
    finish_s: float


def trace(plan: Plan, cluster: ClusterSpec, graph_or_profile: Any, *, requests: int = 8,
          segment_times_s: Mapping[str, Sequence[float]] | None = None) -> list[TraceEvent]:
    """Every service of the first `requests` requests, all sent at time 0 (what a Gantt chart draws)."""
    profile = load_profile(graph_or_profile)
    route = _Route(plan, cluster, profile, check_segment_times(profile, cluster, segment_times_s))
    record: list = []
    _run(route, int(requests), None, int(requests), 0.0, 0, record)
    return [TraceEvent(route.names[server][0], route.names[server][1], n, start, finish)
            for server, n, start, finish in record]

def _run(route: _Route, requests: int, rate: float | None, in_flight: int, sigma: float, seed: int,
         record: list | None) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """The event loop. Each event is a request arriving at the server of one step; FIFO holds because
    events are handled in time order, so a server's next free time is all it needs to remember."""
    rng = random.Random(seed)
    closed = rate is None

    def factor() -> float:
        return math.exp(rng.gauss(0.0, sigma) - sigma * sigma / 2) if sigma > 0 else 1.0

    free_at = [0.0] * route.n_servers
    busy = [0.0] * route.n_servers
    arrived = np.zeros(requests)
    done = np.full(requests, np.nan)
    # (time, counter, request, step, branch, position): branch -1 outside a tiled stage's fork
    heap: list[tuple[float, int, int, int, int, int]] = []
    counter = 0
    last_step = route.n_steps - 1
    if rate is None:  # closed
        issued = in_flight
        for n in range(in_flight):
            heap.append((0.0, n, n, 0, -1, 0))
            counter += 1
    else:
        issued = requests
        clock = 0.0
        for n in range(requests):
            clock += rng.expovariate(rate)
            arrived[n] = clock
            heap.append((clock, n, n, 0, -1, 0))
        counter = requests
    heapq.heapify(heap)
    servers, services, delays, forks = route.servers, route.services, route.delays, route.forks
    pop, push = heapq.heappop, heapq.heappush
    joins: dict[tuple[int, int], list[float]] = {}  # (request, fork step) -> [branches left, latest arrival]

    def serve(server: int, service: float, now: float, n: int) -> float:
        if sigma > 0 and service > 0:
            service *= factor()
        start = now if now > free_at[server] else free_at[server]
        finish = start + service
        free_at[server] = finish
        busy[server] += service
        if record is not None:
            record.append((server, n, start, finish))
        return finish

    while heap:
        now, _, n, step, branch, position = pop(heap)
        if step in forks:
            branches = forks[step]
            if branch < 0:  # the request reaches the tiled stage: every tile starts
                joins[(n, step)] = [len(branches), now]
                for b in range(len(branches)):
                    push(heap, (now, counter, n, step, b, 0))
                    counter += 1
                continue
            server, service, delay = branches[branch][position]
            ready = serve(server, service, now, n) + delay
            if position + 1 < len(branches[branch]):
                push(heap, (ready, counter, n, step, branch, position + 1))
                counter += 1
                continue
            join = joins[(n, step)]
            join[0] -= 1
            join[1] = max(join[1], ready)
            if join[0] > 0:
                continue  # other tiles are still on their way
            ready = joins.pop((n, step))[1]
        else:
            options = servers[step]
            pick = n % len(options)
            ready = serve(options[pick], services[step][pick], now, n) + delays[step][pick]
        if step < last_step:
            push(heap, (ready, counter, n, step + 1, -1, 0))
            counter += 1
            continue
        done[n] = ready
        if closed and issued < requests:
            arrived[issued] = ready
            push(heap, (ready, counter, issued, 0, -1, 0))
            counter += 1
            issued += 1
    return arrived, done, busy


class _Route:
    """The servers a request visits: step 2h is hop h (a link), step 2k+1 is stage k (a device).

    For each step, the options are indexed by replica choice (n mod count); for a hop between
    replica groups the count is lcm(r_a, r_b), matching round-robin routing on both sides. A tiled
    stage (first in its plan) is one step, a fork: `forks[step]` lists per tile its three
    (server, service, delay) triples, and the hops around it are inside its branches.
    """

    def __init__(self, plan: Plan, cluster: ClusterSpec, profile, times) -> None:
        # a tiled stage's tiles come back to the source, which stitches them and sends the map on
        groups = ([(cluster.source,)] + [(cluster.source,) if stage.kind == "tiled" else stage.devices
                                         for stage in plan.stages] + [(cluster.source,)])
        cuts = [profile.cut_bytes(stage.start) for stage in plan.stages] + [profile.cut_bytes(len(profile.segments))]
        self.names: list[tuple[str, str]] = []  # (kind, label) per server
        index: dict[tuple, int] = {}
        self.servers: list[list[int]] = []
        self.services: list[list[float]] = []
        self.delays: list[list[float]] = []
        self.forks: dict[int, list[list[tuple[int, float, float]]]] = {}

        def server(key: tuple, kind: str, label: str) -> int:
            if key not in index:
                index[key] = len(self.names)
                self.names.append((kind, label))
            return index[key]

        first_hop = 0
        if plan.stages and plan.stages[0].kind == "tiled":
            self.forks[0] = self._tiles(plan.stages[0], cluster, server)
            for step in (self.servers, self.services, self.delays):
                step.append([])
            first_hop = 1  # the stitched map leaves the source for the next stage as on any hop
        elif any(stage.kind == "tiled" for stage in plan.stages):
            raise PlanError("a tiled stage comes first in its plan (tiles of the model's first layers)")
        for h in range(first_hop, len(plan.stages) + 1):
            senders, receivers = groups[h], groups[h + 1]
            count = math.lcm(len(senders), len(receivers))
            ids, service, delay = [], [], []
            for n in range(count):
                u, v = senders[n % len(senders)], receivers[n % len(receivers)]
                link = cluster.link(u, v)
                ids.append(server(("hop", h, u, v), "link", f"{u}->{v}"))
                service.append(cuts[h] / link.bandwidth_bytes_per_s)
                delay.append(link.latency_s + (plan.hop_overhead_s if h == 0 else 0.0))
            self.servers.append(ids)
            self.services.append(service)
            self.delays.append(delay)
            if h < len(plan.stages):
                self._add_stage(plan.stages[h], cluster, profile, times, server, plan.hop_overhead_s)
        self.n_servers = len(self.names)
        self.n_steps = len(self.servers)

    def _add_stage(self, stage, cluster: ClusterSpec, profile, times, server, hop_s: float = 0.0) -> None:
        self.servers.append([server(("dev", d), "device", d) for d in stage.devices])
        self.services.append([
            stage_time_s(profile, cluster.device(d), stage.start, stage.end, times) + hop_s for d in stage.devices
        ])
        self.delays.append([0.0] * len(stage.devices))

    @staticmethod
    def _tiles(stage, cluster: ClusterSpec, server) -> list[list[tuple[int, float, float]]]:
        """Per tile: (link source -> device, its crop), (device, its compute), (link device -> source, its output)."""
        branches = []
        source = target = cluster.source
        for tile in stage.tiles:
            path = []
            for h, (u, v, nbytes) in enumerate(((source, tile.device, tile.in_bytes),
                                                (tile.device, target, tile.out_bytes))):
                link = cluster.link(u, v)
                path.append((server(("hop", h, u, v), "link", f"{u}->{v}"), nbytes / link.bandwidth_bytes_per_s,
                             link.latency_s))
            path.insert(1, (server(("dev", tile.device), "device", tile.device), tile.compute_s, 0.0))
            branches.append(path)
        return branches


def _report(plan: Plan, route: _Route, requests: int, arrived: np.ndarray, done: np.ndarray,
            busy: list[float], in_flight: int | None, arrival: str) -> SimReport:
    finished = np.sort(done[~np.isnan(done)])
    duration = float(finished[-1]) if finished.size else 0.0
    first = int(0.2 * finished.size)
    last = finished.size - 1 - (min(in_flight, finished.size // 5) if in_flight else 0)
    if last > first and finished[last] > finished[first]:
        throughput = (last - first) / float(finished[last] - finished[first])
    else:
        throughput = finished.size / duration if duration > 0 else math.inf
    latencies = done - arrived
    latencies = latencies[~np.isnan(latencies)]
    p50, p95, p99 = (float(np.percentile(latencies, q)) for q in (50, 95, 99))
    device_util: dict[str, float] = {}
    link_util: dict[str, float] = {}
    for (kind, label), value in zip(route.names, busy, strict=True):
        target = device_util if kind == "device" else link_util
        target[label] = target.get(label, 0.0) + (value / duration if duration > 0 else 0.0)
    return SimReport(
        requests=requests,
        completed=int(finished.size),
        duration_s=duration,
        throughput_rps=throughput,
        latency_mean_s=float(latencies.mean()),
        latency_p50_s=p50,
        latency_p95_s=p95,
        latency_p99_s=p99,
        device_utilisation=device_util,
        link_utilisation=link_util,
        predicted_throughput_rps=plan.throughput_rps,
        in_flight=in_flight,
        arrival=arrival,
    )
