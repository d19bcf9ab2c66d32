"""Planning on large clusters (100 to 1000 devices): device classes, replication, and a lower bound.

When the exact DP (`exact.py`) would take too long, the optimal planner:
1. caps how many devices of each class the DP may place (and, past a point, keeps only the fastest
   classes), and solves that smaller problem exactly without replication;
2. hands every device left over to `add_replicas`, which repeatedly replicates the stage next to the
   bottleneck term while that lowers the period (or the number of terms at the period);
3. reports `lower_bound_period_s`, a bound no plan can beat, so the gap is known.

The lower bound (`lower_bound_period_s`) is the largest of:
- work: a request needs at least sum_l min_d t_d(l) device-seconds and N devices supply N per second
  (and, from FLOPs alone, total FLOPs / the summed FLOP/s of the devices);
- without replication: the slowest segment on its fastest device, since it runs whole on one device;
- the source's links: the inputs (and the outputs) cross the source's links, whose summed bandwidth
  (the fastest one, without replication) bounds how often that can happen.
Only devices that can hold at least one segment count.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from partita.cluster import ClusterSpec
from partita.plan.classes import DeviceClass
from partita.plan.cost import CostTables
from partita.plan.exact import SECONDS_PER_ELEMENT, SECONDS_PER_TRANSITION, ClassStage

__all__ = ["add_replicas", "capped_problem", "lower_bound_period_s"]

EXACT_BUDGET_S = 0.3  # estimated seconds the exact DP may spend before the large-cluster path takes over
CAPPED_BUDGET_S = 0.3  # estimated seconds for the capped DP on the large-cluster path


def lower_bound_period_s(tables: CostTables, cluster: ClusterSpec, classes: list[DeviceClass], *,
                         replicate: bool) -> float:
    """A period no plan for this model and cluster can beat (see the module docstring)."""
    L = tables.L
    seg_memory = np.array([tables.memory[k, k + 1] for k in range(L)])
    usable = [c for c in classes if c.spec.memory_bytes >= seg_memory.min()]
    if not usable:
        return math.inf
    times = np.full((len(usable), L), np.inf)
    for k, c in enumerate(usable):
        fits = seg_memory <= c.spec.memory_bytes
        times[k, fits] = tables.segment_times(c.spec, c.segment_times)[fits]
    fastest = times.min(axis=0)
    n_devices = sum(c.size for c in usable)
    bound = float(fastest.sum()) / n_devices
    if all(c.segment_times is None for c in usable):
        bound = max(bound, float(tables.flops.sum()) / sum(c.size * c.spec.flops for c in usable))
    if not replicate:
        bound = max(bound, float(fastest.max()))
    names = [name for c in usable for name in c.members]
    for nbytes, ends in ((tables.cut_bytes[0], [(cluster.source, name) for name in names]),
                         (tables.cut_bytes[L], [(name, cluster.source) for name in names])):
        bandwidths = [cluster.link(*pair).bandwidth_bytes_per_s for pair in ends]
        reach = sum(bandwidths) if replicate else max(bandwidths)
        bound = max(bound, float(nbytes) / reach)
    return bound


def capped_problem(tables: CostTables, classes: list[DeviceClass], max_stages: int
                   ) -> tuple[list[DeviceClass], list[int]]:
    """Classes and per-class caps small enough for the DP (without replication) to stay in budget."""
    kept = list(classes)
    caps = [min(c.size, max_stages) for c in kept]
    while _capped_seconds(tables, caps) > CAPPED_BUDGET_S:
        if max(caps) > 1:
            largest = caps.index(max(caps))
            caps[largest] = max(1, caps[largest] // 2)
        elif len(kept) > 1:
            # Drop the slowest class (by time for the whole model) until the DP fits the budget.
            slowest = max(range(len(kept)), key=lambda k: _model_time(tables, kept[k]))
            del kept[slowest], caps[slowest]
        else:
            break
    return kept, caps


def _capped_seconds(tables: CostTables, caps: list[int]) -> float:
    """Estimated DP time without replication: count vectors x classes^2 transitions of (L+1)^2 elements."""
    vectors = math.prod(c + 1 for c in caps)
    per_transition = SECONDS_PER_TRANSITION + SECONDS_PER_ELEMENT * (tables.L + 1) ** 2
    return vectors * len(caps) ** 2 * per_transition


def _model_time(tables: CostTables, cls: DeviceClass) -> float:
    return float(tables.segment_times(cls.spec, cls.segment_times).sum())


def add_replicas(stages: list[ClassStage], tables: CostTables, cluster: ClusterSpec,
                 classes: list[DeviceClass], used: Mapping[int, int] | Sequence[int]) -> list[ClassStage]:
    """Give free devices to stages as replicas while that lowers the period (greedy, bottleneck first).

    `used[c]` is how many devices of class c the stages already hold. A move is taken when it lowers
    the period, or keeps it and lowers how many terms sit at the period (ties between stages).
    """
    free = [c.size - used[k] for k, c in enumerate(classes)]
    if not any(f > 0 for f in free):
        return stages
    times = [float(tables.segment_times(classes[s.cls].spec, classes[s.cls].segment_times)[s.start:s.end].sum())
             for s in stages]
    reps = [s.replicas for s in stages]
    cls = [s.cls for s in stages]
    n = len(stages)

    def link_bw(h: int) -> float:
        """Bandwidth of hop h (0: source -> stage 0; n: last stage -> source)."""
        if h == 0:
            return cluster.link(cluster.source, classes[cls[0]].members[0]).bandwidth_bytes_per_s
        if h == n:
            return cluster.link(classes[cls[-1]].members[0], cluster.source).bandwidth_bytes_per_s
        a, b = classes[cls[h - 1]], classes[cls[h]]
        if a is b:
            return (a.intra_link or cluster.link(a.members[0], a.members[0])).bandwidth_bytes_per_s
        return cluster.link(a.members[0], b.members[0]).bandwidth_bytes_per_s

    bws = [link_bw(h) for h in range(n + 1)]
    cuts = [tables.cut_bytes[stages[0].start]] + [tables.cut_bytes[s.end] for s in stages]

    def terms() -> list[float]:
        values = [times[k] / reps[k] for k in range(n)]
        for h in range(n + 1):
            ra = 1 if h == 0 else reps[h - 1]
            rb = 1 if h == n else reps[h]
            values.append(cuts[h] / (bws[h] * (ra * rb // math.gcd(ra, rb))))
        return values

    def score(values: list[float]) -> tuple[float, int]:
        top = max(values)
        return top, sum(1 for v in values if v >= top * (1 - 1e-12))

    current = score(terms())
    while True:
        values = terms()
        worst = values.index(max(values))
        others = sorted(values, reverse=True)
        runner_up = next((v for v in others if v < values[worst] * (1 - 1e-12)), 0.0)
        candidates = [worst] if worst < n else [k for k in (worst - n - 1, worst - n) if 0 <= k < n]
        best_move, best_score = None, current
        for k in candidates:
            room = free[cls[k]]
            if room <= 0:
                continue
            # One more replica, or straight to the count that brings this stage under the next term.
            jump = math.ceil(times[k] / runner_up) - reps[k] if runner_up > 0 else room
            for extra in sorted({1, max(1, min(room, jump))}):
                reps[k] += extra
                trial = score(terms())
                reps[k] -= extra
                if trial < best_score:
                    best_move, best_score = (k, extra), trial
        if best_move is None:
            break
        k, extra = best_move
        reps[k] += extra
        free[cls[k]] -= extra
        current = best_score
    return [ClassStage(s.cls, reps[k], s.start, s.end) for k, s in enumerate(stages)]
