"""The cost model (design.md, "The cost model"): what a given assignment of stages to devices predicts.

A chain of L segments; a stage holds segments [start, end) on one or more devices (replicas):

- compute(d)  = sum(flops[start:end]) / d.flops_per_s, or the sum of measured `segment_times_s[d]`
- memory      = sum(param_bytes[start:end]) + max(act_bytes[start:end])      (must fit every replica)
- a hop u -> v carrying B bytes: occupancy = B / bandwidth(u, v); transfer = latency(u, v) + occupancy
- the source is a node with its own links; a node has infinite bandwidth and no latency to itself.

Replicas take turns round-robin: request n is served at stage k by replica n mod r_k (replicas in
the order listed). So a replica sees 1/r_k of the requests, and the link between replica i of stage
a and replica j of stage b carries 1/lcm(r_a, r_b) of them when i = j (mod gcd(r_a, r_b)), none
otherwise. For a pipeline source -> s1 -> ... -> sk -> source:

- period   = max( max_k (compute_k + h) / r_k , max over hops and used pairs of B / (lcm * bandwidth) )
- latency  = sum_k compute_k + sum over hops of (h + max over used pairs (latency + B / bandwidth))

where compute_k is the stage's slowest replica and h is the per-hop overhead (`hop_overhead_s`): the
time a message spends in the runtime's own software on each hop (encoding, the socket's threads,
wake-ups, decoding, its credit), which no link figure holds. A stage's worker spends it on each
request it takes in and sends on, so it also bounds the period. The pure planning default is 0 (the
model above as the planners search it); the runtime plans with `HOP_OVERHEAD_S`, measured on this
runtime, or what a deploy is given. The planners choose stages without h; a plan's figures include it. With interchangeable replicas (the only kind the
planners build) this latency is every request's latency; with unequal replicas it is an upper bound.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from partita.cluster import ClusterSpec, DeviceSpec
from partita.errors import PlanError
from partita.plan.basis import prediction_basis
from partita.plan.profile import Profile, load_profile
from partita.plan.types import Plan, StagePlan

__all__ = ["HOP_OVERHEAD_S", "CostTables", "check_segment_times", "check_hop_overhead", "hop_terms", "link_matrices",
           "predict", "stage_time_s"]

#: The runtime's per-hop overhead in seconds (see the module docstring), as issue 10 measured it on a
#: quiet 2-core x86 host, loopback, one torch thread per worker. `benchmarks/peers.py` prints the
#: figure of the host it runs on ("per-hop overhead": single-request latency of a 3-stage MLP less
#: its compute, over its 4 hops); on that host under a load average of 6-11 it read 0.5-1.4 ms,
#: wake-ups waiting for a core. A deploy uses this default unless given another figure
#: (`deploy(..., hop_overhead_s=...)`).
HOP_OVERHEAD_S = 1.2e-4


def check_hop_overhead(hop_overhead_s: float) -> float:
    """`hop_overhead_s` as a float; PlanError unless it is a finite number of seconds >= 0."""
    if isinstance(hop_overhead_s, bool) or not isinstance(hop_overhead_s, int | float) \
            or not math.isfinite(hop_overhead_s) or hop_overhead_s < 0:
        raise PlanError(f"hop_overhead_s must be a finite number of seconds >= 0, got {hop_overhead_s!r}")
    return float(hop_overhead_s)


def check_segment_times(profile: Profile, cluster: ClusterSpec, times: Mapping[str, Sequence[float]] | None):
    """The measured segment times, checked; and the cluster checked to have every figure a plan needs.

    ClusterSpecError when a device or link of `cluster` is still unknown (an address-only device
    not yet measured); PlanError when `times` does not fit the profile.
    """
    cluster.check_known(times or ())
    if not times:
        return {}
    checked = {}
    for name, values in times.items():
        cluster.device(name)
        values = [float(v) for v in values]
        if len(values) != len(profile.segments):
            raise PlanError(
                f"segment_times_s[{name!r}] has {len(values)} times but {profile.model} has "
                f"{len(profile.segments)} segments; measure every segment"
            )
        if any(not math.isfinite(v) or v < 0 for v in values):
            raise PlanError(f"segment_times_s[{name!r}] must hold finite times >= 0 (seconds)")
        checked[name] = values
    return checked


def stage_time_s(profile: Profile, device: DeviceSpec, start: int, end: int,
                 segment_times_s: Mapping[str, Sequence[float]] | None = None) -> float:
    """Seconds `device` takes to compute segments [start, end) for one request."""
    if segment_times_s and device.name in segment_times_s:
        return float(sum(segment_times_s[device.name][start:end]))
    return sum(s.flops for s in profile.segments[start:end]) / device.flops


def hop_terms(cluster: ClusterSpec, senders: Sequence[str], receivers: Sequence[str], nbytes: float):
    """(occupancy_s, transfer_s) of one hop between replica groups under round-robin routing.

    occupancy_s: the busiest used link's busy time per request (bytes divided by lcm of the counts);
    transfer_s: the slowest used link's latency + bytes / bandwidth for one message.
    """
    ra, rb = len(senders), len(receivers)
    lcm = ra * rb // math.gcd(ra, rb)
    occupancy, transfer = 0.0, 0.0
    for n in range(lcm):
        link = cluster.link(senders[n % ra], receivers[n % rb])
        busy = nbytes / link.bandwidth_bytes_per_s  # 0.0 for a device to itself (infinite bandwidth)
        occupancy = max(occupancy, busy / lcm)
        transfer = max(transfer, link.latency_s + busy)
    return occupancy, transfer


def link_matrices(cluster: ClusterSpec, nodes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(bandwidth_bytes_per_s, latency_s) from each of `nodes` (row) to each (column), as len(nodes)^2 arrays.

    The same values as `cluster.link`, built from the default and the pair links in O(n^2 + pairs).
    """
    index: dict[str, list[int]] = {}
    for k, name in enumerate(nodes):
        index.setdefault(name, []).append(k)
    n = len(nodes)
    default = cluster.default_link  # None: every pair is in pair_links (`check_known` made sure)
    bandwidth = np.full((n, n), default.bandwidth_bytes_per_s if default else math.nan, dtype=np.float64)
    latency = np.full((n, n), default.latency_s if default else math.nan, dtype=np.float64)
    for pair, link in cluster.pair_links.items():
        a, b = sorted(pair)  # `directions` are in name order
        there, back = link.directions or (link.bandwidth_bytes_per_s, link.bandwidth_bytes_per_s)
        for i in index.get(a, ()):
            for j in index.get(b, ()):
                bandwidth[i, j], bandwidth[j, i] = there, back
                latency[i, j] = latency[j, i] = link.latency_s
    for positions in index.values():  # a node to itself (also when it is listed twice)
        for i in positions:
            for j in positions:
                bandwidth[i, j], latency[i, j] = math.inf, 0.0
    return bandwidth, latency


def predict(graph_or_profile: Any, cluster: ClusterSpec, stages: Sequence[Any], *,
            objective: str = "throughput", planner: str = "custom",
            segment_times_s: Mapping[str, Sequence[float]] | None = None,
            lower_bound_period_s: float | None = None, check_memory: bool = True,
            lower_bound_latency_s: float | None = None, hop_overhead_s: float = 0.0) -> Plan:
    """The cost model's Plan for a given assignment.

    `hop_overhead_s` is the per-hop overhead h of the module docstring (0: none, the planners' model).

    `stages` holds, in pipeline order, `(devices, start, end)` tuples or objects with those
    attributes (such as `StagePlan`); `devices` is a name or a tuple of replica names. The stages must
    cover [0, L) contiguously and use each device at most once. PlanError if not, or if a stage does
    not fit a replica's memory (unless `check_memory=False`). A first stage of kind "tiled" (a
    `StagePlan` with its grid and tiles) is predicted by `partita.plan.tiles.predict_tiled`.
    """
    profile = load_profile(graph_or_profile)
    times = check_segment_times(profile, cluster, segment_times_s)
    hop_s = check_hop_overhead(hop_overhead_s)
    stages = list(stages)  # a generator is read once: here and below
    if any(getattr(s, "kind", "chain") == "tiled" for s in stages):
        # tiles builds on this module: import it here, not at the top
        from partita.plan.tiles import predict_tiled

        return predict_tiled(profile, cluster, stages, objective=objective, planner=planner,
                             segment_times_s=times, check_memory=check_memory)
    parsed = [_parse_stage(s) for s in stages]
    _check_chain(profile, cluster, parsed)
    plans: list[StagePlan] = []
    for devices, start, end in parsed:
        memory = profile.memory_bytes(start, end)
        specs = [cluster.device(name) for name in devices]
        if check_memory:
            for spec in specs:
                if memory > spec.memory:
                    raise PlanError(
                        f"segments [{start}, {end}) of {profile.model} need {memory / 2**20:.1f} MiB; "
                        f"{spec.name} has {spec.memory / 2**20:.1f} MiB. Move the cut or use another device."
                    )
        compute = max(stage_time_s(profile, spec, start, end, times) for spec in specs)
        plans.append(StagePlan(devices, start, end, compute, float(memory),
                               profile.cut_bytes(start), profile.cut_bytes(end)))
    period = max((stage.compute_s + hop_s) / stage.replicas for stage in plans)
    latency = sum(stage.compute_s for stage in plans) + hop_s * (len(plans) + 1)
    groups = [(cluster.source,)] + [stage.devices for stage in plans] + [(cluster.source,)]
    for k in range(len(groups) - 1):
        nbytes = profile.cut_bytes(plans[k].start) if k < len(plans) else profile.cut_bytes(len(profile.segments))
        occupancy, transfer = hop_terms(cluster, groups[k], groups[k + 1], nbytes)
        period = max(period, occupancy)
        latency += transfer
    throughput = math.inf if period == 0 else 1.0 / period
    chosen = Plan(tuple(plans), period, throughput, latency, objective, planner, lower_bound_period_s,
                  cluster.source, profile.model, lower_bound_latency_s, hop_overhead_s=hop_s)
    return dataclasses.replace(chosen, basis=prediction_basis(chosen, cluster, times))


def _parse_stage(stage: Any) -> tuple[tuple[str, ...], int, int]:
    if isinstance(stage, tuple | list):
        if len(stage) != 3:
            raise PlanError(f"a stage is (devices, start, end); got {stage!r}")
        devices, start, end = stage
    else:
        devices, start, end = stage.devices, stage.start, stage.end
    devices = (devices,) if isinstance(devices, str) else tuple(devices)
    if not devices:
        raise PlanError("a stage needs at least one device")
    return devices, int(start), int(end)


def _check_chain(profile: Profile, cluster: ClusterSpec, stages: list) -> None:
    if not stages:
        raise PlanError("a plan needs at least one stage")
    expected, seen = 0, set()
    for devices, start, end in stages:
        if start != expected or end <= start:
            raise PlanError(
                f"stages must cover the segments contiguously: expected a stage starting at {expected} "
                f"with end > start, got [{start}, {end})"
            )
        expected = end
        for name in devices:
            cluster.device(name)
            if name in seen:
                raise PlanError(f"device {name!r} appears in two stages; a device runs one stage")
            seen.add(name)
    if expected != len(profile.segments):
        raise PlanError(f"stages end at segment {expected} but {profile.model} has {len(profile.segments)} segments")


class CostTables:
    """The cost model as arrays over segment ranges, for the planners.

    Index i in 0..L is a cut position: `cut_bytes[i]` enters segment i (`cut_bytes[0]` = inputs,
    `cut_bytes[L]` = outputs). Matrices are (L+1) x (L+1) over (start, end); entries with end <= start
    are inf.
    """

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.L = len(profile.segments)
        flops = np.array([s.flops for s in profile.segments], dtype=np.float64)
        params = np.array([s.param_bytes for s in profile.segments], dtype=np.float64)
        acts = np.array([s.act_bytes for s in profile.segments], dtype=np.float64)
        self.flops = flops
        self.prefix_flops = np.concatenate([[0.0], np.cumsum(flops)])
        self.cut_bytes = np.array([profile.cut_bytes(i) for i in range(self.L + 1)], dtype=np.float64)
        prefix_params = np.concatenate([[0.0], np.cumsum(params)])
        n = self.L + 1
        act_max = np.full((n, n), np.inf)
        for i in range(self.L):
            act_max[i, i + 1:] = np.maximum.accumulate(acts[i:])
        self.memory = prefix_params[None, :] - prefix_params[:, None] + act_max  # inf where end <= start
        self.memory[np.tril_indices(n)] = np.inf
        self._upper = np.triu(np.ones((n, n), dtype=bool), k=1)

    def compute_matrix(self, device: DeviceSpec, segment_times: Sequence[float] | None = None) -> np.ndarray:
        """t(i, j) on `device` for every range, inf where the range does not fit its memory."""
        if segment_times is not None:
            prefix = np.concatenate([[0.0], np.cumsum(np.asarray(segment_times, dtype=np.float64))])
        else:
            prefix = self.prefix_flops / device.flops_per_s
        times = prefix[None, :] - prefix[:, None]
        times = np.where(self._upper & (self.memory <= device.memory_bytes), np.maximum(times, 0.0), np.inf)
        return times

    def segment_times(self, device: DeviceSpec, segment_times: Sequence[float] | None = None) -> np.ndarray:
        """Seconds per segment on `device` (length L)."""
        if segment_times is not None:
            return np.asarray(segment_times, dtype=np.float64)
        return self.flops / device.flops
