"""A lower bound that counts devices: the class DP on an optimistic grouping of the devices.

The relaxation in `topology.py` forgets that a device runs one stage, so it is weak when a plan needs
most of the devices (a long model on a few of them). This bound keeps the counting and forgets the
identity instead: devices are put into a few groups, each group is treated as that many copies of
one optimistic device (the fastest time of any member on every segment, the largest memory), and the
link between two groups is the best link between any of their members (the widest bandwidth, the
smallest latency), as is the link within a group and from the source. Every plan on the real cluster
is a plan on this optimistic one with the same number of devices per group and terms no larger, so
the exact class DP's optimum there (`exact.solve`) is a lower bound on the real optimum, for the
period and for the latency, with or without replication.

Groups are formed by sorting the devices (with replication: the classes of interchangeable devices,
kept whole) by their time for the whole model and cutting that order into equal runs; the DP's budget decides how many groups it can afford (down to one group of all
devices, where the bound is "at most n distinct devices with the best of everything").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from partita.cluster import ClusterSpec, DeviceSpec, LinkSpec
from partita.plan.classes import DeviceClass, group_devices
from partita.plan.cost import CostTables, link_matrices
from partita.plan.exact import OverBudget, solve

__all__ = ["grouped_bound"]

GROUPED_BUDGET_S = 0.25  # estimated seconds for the class DP at each grouping tried


def grouped_bound(tables: CostTables, cluster: ClusterSpec, *, objective: str, replicate: bool, max_stages: int,
                  segment_times_s: Mapping[str, Sequence[float]] | None, budget_s: float = GROUPED_BUDGET_S
                  ) -> float:
    """The optimistic class DP's optimum: a value (period or latency) no plan on `cluster` can beat."""
    times = segment_times_s or {}
    names = list(cluster.names)
    per_segment = {name: tables.segment_times(cluster.device(name), times.get(name)) for name in names}
    # With replication a stage's replicas are interchangeable devices, one class: a group must hold
    # whole classes, so that every replicated stage stays inside one group.
    units = ([list(c.members) for c in group_devices(cluster, segment_times_s)] if replicate
             else [[name] for name in names])
    units.sort(key=lambda unit: min(float(per_segment[name].sum()) for name in unit))
    groups = min(len(units), 8)
    while groups >= 1:
        members = [[name for unit in part for name in unit] for part in _split(units, groups)]
        classes, spec = _optimistic_cluster(tables, cluster, members, per_segment)
        try:
            found = solve(tables, spec, classes, [c.size for c in classes], objective=objective,
                          max_stages=max_stages, replicate=replicate and objective == "throughput",
                          budget_s=budget_s)
        except OverBudget:
            groups = groups // 2 if groups > 1 else 0
            continue
        if not found:
            return math.inf
        chain = next(iter(found.values()))
        return _chain_value(tables, spec, classes, chain, objective)
    return 0.0


def _split(units: list[list[str]], parts: int) -> list[list[list[str]]]:
    """`units` in order, cut into `parts` runs of nearly equal length (none empty)."""
    size, extra = divmod(len(units), parts)
    runs, start = [], 0
    for k in range(parts):
        end = start + size + (1 if k < extra else 0)
        runs.append(units[start:end])
        start = end
    return [run for run in runs if run]


def _optimistic_cluster(tables: CostTables, cluster: ClusterSpec, groups: list[list[str]],
                        per_segment: dict[str, np.ndarray]) -> tuple[list[DeviceClass], ClusterSpec]:
    """One optimistic class per group, on a cluster of one representative per group plus the source."""
    names = [name for members in groups for name in members]
    bandwidth, latency = link_matrices(cluster, [*names, cluster.source])
    position = {name: k for k, name in enumerate(names)}
    index = [[position[name] for name in members] for members in groups]
    src = [len(names)]
    reps = [f"group{k}" for k in range(len(groups))]
    source = cluster.source if cluster.source not in reps else "source"
    devices, classes = [], []
    for k, members in enumerate(groups):
        fastest = np.min([per_segment[name] for name in members], axis=0)
        memory = max(cluster.device(name).memory for name in members)
        device = DeviceSpec(reps[k], max(cluster.device(name).flops for name in members), memory)
        devices.append(device)
        intra = _best_link(bandwidth, latency, index[k], index[k], distinct=True) if len(members) > 1 else None
        names_k = (reps[k], *(f"{reps[k]}.{i}" for i in range(1, len(members))))
        classes.append(DeviceClass(names_k, device, tuple(float(t) for t in fastest), intra))
    pairs = {}
    for a in range(len(groups)):
        pairs[frozenset((reps[a], source))] = _best_link(bandwidth, latency, index[a], src)
        for b in range(a + 1, len(groups)):
            pairs[frozenset((reps[a], reps[b]))] = _best_link(bandwidth, latency, index[a], index[b])
    spec = ClusterSpec(tuple(devices), source, cluster.default_link, pairs)
    return classes, spec


def _best_link(bandwidth: np.ndarray, latency: np.ndarray, left: list[int], right: list[int], *,
               distinct: bool = False) -> LinkSpec:
    """The widest bandwidth and the smallest latency over the links between the two index lists, either way.

    `distinct`: leave out a node's link to itself (two stages never share a device; but a stage on the
    source's own device reaches the source for free, so that counts).
    """
    width = np.maximum(bandwidth[np.ix_(left, right)], bandwidth[np.ix_(right, left)].T)
    delay = latency[np.ix_(left, right)].copy()
    if distinct:
        np.fill_diagonal(width, -np.inf)
        np.fill_diagonal(delay, np.inf)
    return LinkSpec(float(width.max()), float(delay.min()))


def _chain_value(tables: CostTables, spec: ClusterSpec, classes: list[DeviceClass], chain, objective: str) -> float:
    """The cost model's value of a class chain on the optimistic cluster (as the DP computed it)."""
    throughput = objective == "throughput"
    value, prev = 0.0, None
    for stage in chain:
        cls = classes[stage.cls]
        if prev is None:
            link = spec.link(spec.source, cls.members[0])
            lcm = stage.replicas
        else:
            pcls = classes[prev.cls]
            link = (pcls.intra_link if prev.cls == stage.cls else spec.link(pcls.members[0], cls.members[0]))
            lcm = math.lcm(prev.replicas, stage.replicas)
        busy = tables.cut_bytes[stage.start] / link.bandwidth_bytes_per_s
        compute = float(np.sum(cls.segment_times[stage.start:stage.end]))
        if throughput:
            value = max(value, busy / lcm, compute / stage.replicas)
        else:
            value += link.latency_s + busy + compute
        prev = stage
    if prev is None:
        raise ValueError("a chain has at least one stage")
    last = classes[prev.cls]
    link = spec.link(last.members[0], spec.source)
    busy = tables.cut_bytes[tables.L] / link.bandwidth_bytes_per_s
    return max(value, busy / prev.replicas) if throughput else value + link.latency_s + busy
