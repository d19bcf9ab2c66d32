"""The optimal planner: exact where it can be, classes + replication + a lower bound where it cannot.

It minimises the cost model's period (objective "throughput") or latency ("latency") under every
device's memory limit, choosing which devices take part, their order, the cuts and (with
`replicate`) how many interchangeable devices share a stage. See `exact.py` for what exact covers
and `large.py` for the large-cluster path and its lower bound.

The exact DP runs first under a time budget (`large.EXACT_BUDGET_S`, estimated, so the choice is
deterministic). If it would overrun, the large-cluster path solves a capped problem for every
number of stages, gives the spare devices to the stages as replicas, and keeps the best result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from partita.cluster import ClusterSpec
from partita.errors import PlanError
from partita.plan.classes import DeviceClass, group_devices
from partita.plan.cost import CostTables, predict
from partita.plan.exact import ClassStage, OverBudget, solve
from partita.plan.large import EXACT_BUDGET_S, add_replicas, capped_problem, lower_bound_period_s
from partita.plan.profile import Profile
from partita.plan.types import Plan

__all__ = ["plan_optimal"]

# On the large path, replication is tried from these stage counts of the capped DP (and the best one).
_START_DEPTHS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def plan_optimal(profile: Profile, cluster: ClusterSpec, *, objective: str, max_stages: int | None,
                 replicate: bool, segment_times_s: Mapping[str, Sequence[float]] | None) -> Plan:
    tables = CostTables(profile)
    classes = group_devices(cluster, segment_times_s)
    _check_fits_somewhere(profile, tables, classes)
    n_devices = sum(c.size for c in classes)
    stages_limit = min(tables.L, max_stages or tables.L, n_devices)
    with_replicas = replicate and objective == "throughput"
    try:
        found = solve(tables, cluster, classes, [c.size for c in classes], objective=objective,
                      max_stages=stages_limit, replicate=with_replicas, budget_s=EXACT_BUDGET_S)
        exact = True
    except OverBudget:
        # Too large to search exactly in the budget: plan a capped problem, then replicate.
        kept, caps = capped_problem(tables, classes, stages_limit)
        found = solve(tables, cluster, kept, caps, objective=objective, max_stages=stages_limit, replicate=False)
        exact = False
    if not found:
        raise PlanError(_no_fit_message(profile, cluster, max_stages))
    if exact:
        chain = next(iter(found.values()))
        if replicate and objective == "latency":
            chain = add_replicas(chain, tables, cluster, classes, _used(chain, classes))
        plan = _named_plan(profile, cluster, chain, classes, objective, segment_times_s, None)
        return plan
    bound = lower_bound_period_s(tables, cluster, classes, replicate=replicate)
    best: Plan | None = None
    best_depth = next(iter(found))
    for depth, chain in found.items():
        if depth != best_depth and depth not in _START_DEPTHS:
            continue
        chain = _in_full_classes(chain, kept, classes)
        if replicate:
            chain = add_replicas(chain, tables, cluster, classes, _used(chain, classes))
        candidate = _named_plan(profile, cluster, chain, classes, objective, segment_times_s, bound)
        if best is None or _better(candidate, best, objective):
            best = candidate
        if objective == "latency":
            break  # the first chain is the latency-best; replication does not change latency
    if best is None:  # `found` is not empty, so a candidate was kept; this only names the impossible case
        raise PlanError(_no_fit_message(profile, cluster, max_stages))
    return best


def _better(a: Plan, b: Plan, objective: str) -> bool:
    key_a = (a.period_s, a.latency_s) if objective == "throughput" else (a.latency_s, a.period_s)
    key_b = (b.period_s, b.latency_s) if objective == "throughput" else (b.latency_s, b.period_s)
    return key_a < key_b


def _used(chain: list[ClassStage], classes: list[DeviceClass]) -> list[int]:
    used = [0] * len(classes)
    for stage in chain:
        used[stage.cls] += stage.replicas
    return used


def _in_full_classes(chain: list[ClassStage], kept: list[DeviceClass], classes: list[DeviceClass]
                     ) -> list[ClassStage]:
    """Re-index a chain planned over the kept classes into the full class list."""
    position = {id(c): k for k, c in enumerate(classes)}
    return [ClassStage(position[id(kept[s.cls])], s.replicas, s.start, s.end) for s in chain]


def _named_plan(profile, cluster, chain, classes, objective, segment_times_s, bound) -> Plan:
    taken = [0] * len(classes)
    named = []
    for stage in chain:
        members = classes[stage.cls].members
        named.append((members[taken[stage.cls]: taken[stage.cls] + stage.replicas], stage.start, stage.end))
        taken[stage.cls] += stage.replicas
    return predict(profile, cluster, named, objective=objective, planner="optimal",
                   segment_times_s=segment_times_s, lower_bound_period_s=bound)


def _check_fits_somewhere(profile: Profile, tables: CostTables, classes: list[DeviceClass]) -> None:
    largest = max(classes, key=lambda c: c.spec.memory_bytes).spec
    index = max(range(tables.L), key=lambda i: tables.memory[i, i + 1])
    need = tables.memory[index, index + 1]
    if need > largest.memory_bytes:
        raise PlanError(
            f"segment {index} ({profile.segments[index].name}) of {profile.model} needs {need / 2**20:.1f} MiB; "
            f"the largest device ({largest.name}) has {largest.memory_bytes / 2**20:.1f} MiB. "
            "Add a device with more memory."
        )


def _no_fit_message(profile: Profile, cluster: ClusterSpec, max_stages: int | None) -> str:
    need = profile.total_param_bytes
    total = sum(d.memory_bytes for d in cluster.devices)
    largest = max(cluster.devices, key=lambda d: d.memory_bytes)
    limit = f" in at most {max_stages} stages" if max_stages else ""
    return (
        f"{profile.model} needs {need / 2**20:.1f} MiB for its weights (plus activations per stage); the devices "
        f"together have {total / 2**20:.1f} MiB (largest: {largest.name}, {largest.memory_bytes / 2**20:.1f} MiB) "
        f"and no split fits{limit}. " + ("Allow more stages or add a device." if max_stages else "Add a device.")
    )
