"""The optimal planner: exact where it can be; the best of several candidates and a certified bound where not.

It minimises the cost model's period (objective "throughput") or latency ("latency") under every
device's memory limit, choosing which devices take part, their order, the cuts and (with
`replicate`) how many interchangeable devices share a stage. See `exact.py` for what exact covers.

The exact DP runs first under a time budget (`large.EXACT_BUDGET_S`, estimated, so the choice is
deterministic). If it would overrun, `_plan_large` keeps the best of: the class path (`large.py`: a
capped problem for every number of stages, spare devices as replicas), every baseline, and, when
devices have their own links, the per-device topology search (`topology.py`) seeded with the best
of those. It reports the largest lower bound that holds (`_certified_bound`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from partita.cluster import ClusterSpec
from partita.errors import PlanError
from partita.plan.baselines import BASELINES, plan_baseline
from partita.plan.bound import grouped_bound
from partita.plan.classes import DeviceClass, group_devices
from partita.plan.cost import CostTables, predict
from partita.plan.exact import ClassStage, OverBudget, solve
from partita.plan.large import EXACT_BUDGET_S, add_replicas, capped_problem, lower_bound_period_s
from partita.plan.profile import Profile
from partita.plan.topology import (
    ROUNDING_MARGIN,
    DeviceStage,
    SearchResult,
    build_network,
    improve_period,
    search_latency,
    search_period,
)
from partita.plan.types import Plan

__all__ = ["plan_optimal"]

# The per-device topology search runs for clusters with more classes than this (with fewer, the class
# path is exact or close), up to this size (its arrays are n x (L+1)^2).
TOPOLOGY_MIN_CLASSES = 4
TOPOLOGY_MAX_DEVICES = 200
TOPOLOGY_MAX_ELEMENTS = 10_000_000
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
    except OverBudget:
        return _plan_large(profile, tables, cluster, classes, objective=objective, max_stages=max_stages,
                           stages_limit=stages_limit, replicate=replicate, segment_times_s=segment_times_s)
    if not found:
        raise PlanError(_no_fit_message(profile, cluster, max_stages))
    chain = next(iter(found.values()))
    if replicate and objective == "latency":
        chain = add_replicas(chain, tables, cluster, classes, _used(chain, classes))
    return _named_plan(profile, cluster, chain, classes, objective, segment_times_s, None)


def _plan_large(profile: Profile, tables: CostTables, cluster: ClusterSpec, classes: list[DeviceClass], *,
                objective: str, max_stages: int | None, stages_limit: int, replicate: bool,
                segment_times_s: Mapping[str, Sequence[float]] | None) -> Plan:
    """Past the exact DP's budget: the best of the class path, the baselines and the topology search.

    The class path (a capped class DP plus replicas) suits many devices of few kinds; the topology
    search (`topology.py`) suits devices that each have their own links. The baselines seed the search
    with an incumbent, so the result is never worse than any of them. The bound reported (period for
    throughput, latency for latency) is the largest certified one (`_certified_bound`); None when
    nothing above zero is known.
    """
    candidates = [_class_path_plan(profile, tables, cluster, classes, objective, stages_limit, replicate,
                                   segment_times_s)]
    for name in BASELINES:
        try:
            candidates.append(plan_baseline(name, profile, cluster, objective=objective, max_stages=max_stages,
                                            segment_times_s=segment_times_s))
        except PlanError:
            continue  # a baseline that does not fit is simply not a candidate
    candidates = [c for c in candidates if c is not None]
    search = None
    if _topology_fits(tables, cluster, classes):
        search, chain = _topology_plan(profile, tables, cluster, classes, candidates, objective=objective,
                                       stages_limit=stages_limit, replicate=replicate,
                                       segment_times_s=segment_times_s)
        if chain is not None:
            candidates.append(chain)
    if not candidates:
        raise PlanError(_no_fit_message(profile, cluster, max_stages))
    best = min(candidates, key=lambda p: _key(p, objective))
    value = best.period_s if objective == "throughput" else best.latency_s
    bound = _certified_bound(tables, cluster, classes, search, objective=objective, replicate=replicate,
                             stages_limit=stages_limit, segment_times_s=segment_times_s, value=value)
    known = bound if bound > 0 else None  # nothing better than zero is known
    if objective == "latency":
        return _relabel(best, profile, cluster, segment_times_s, None, known)
    return _relabel(best, profile, cluster, segment_times_s, known, None)


def _certified_bound(tables, cluster, classes, search, *, objective, replicate, stages_limit, segment_times_s,
                     value) -> float:
    """The largest of the lower bounds that hold for every plan the planner considers.

    - the class bound (`large.lower_bound_period_s`, period only);
    - the topology search's (it covers plans without replication; replicas never shorten a request's
      path, so for latency it covers every plan, and for the period when no stage can be replicated);
    - the grouped class DP (`bound.grouped_bound`), computed only on clusters the topology search ran
      on and only when the others leave a gap.
    """
    throughput = objective == "throughput"
    bound = lower_bound_period_s(tables, cluster, classes, replicate=replicate) if throughput else 0.0
    if search is not None and (not throughput or _topology_bound_holds(classes, replicate)):
        if search.exact:
            return value * (1 - ROUNDING_MARGIN)
        bound = max(bound, search.bound)
    if search is not None and bound < value * (1 - ROUNDING_MARGIN):
        replicas = throughput and replicate and any(c.size > 1 for c in classes)
        grouped = grouped_bound(tables, cluster, objective=objective, replicate=replicas, max_stages=stages_limit,
                                segment_times_s=segment_times_s)
        bound = max(bound, grouped * (1 - ROUNDING_MARGIN))
    return min(bound, value * (1 - ROUNDING_MARGIN))


def _class_path_plan(profile, tables, cluster, classes, objective, stages_limit, replicate, segment_times_s):
    """The capped class DP, with the spare devices handed out as replicas (None if nothing fits)."""
    kept, caps = capped_problem(tables, classes, stages_limit)
    found = solve(tables, cluster, kept, caps, objective=objective, max_stages=stages_limit, replicate=False)
    best: Plan | None = None
    best_depth = next(iter(found), None)
    for depth, chain in found.items():
        if depth != best_depth and depth not in _START_DEPTHS:
            continue
        chain = _in_full_classes(chain, kept, classes)
        if replicate:
            chain = add_replicas(chain, tables, cluster, classes, _used(chain, classes))
        candidate = _named_plan(profile, cluster, chain, classes, objective, segment_times_s, None)
        if best is None or _better(candidate, best, objective):
            best = candidate
        if objective == "latency":
            break  # the first chain is the latency-best; replication does not change latency
    return best


def _topology_fits(tables: CostTables, cluster: ClusterSpec, classes: list[DeviceClass]) -> bool:
    """Whether the per-device search is worth running: more classes than the class path handles well,
    and arrays that stay small (it is for up to a few hundred devices)."""
    n = len(cluster.devices)
    return (len(classes) > TOPOLOGY_MIN_CLASSES and n <= TOPOLOGY_MAX_DEVICES
            and n * (tables.L + 1) ** 2 <= TOPOLOGY_MAX_ELEMENTS)


def _topology_bound_holds(classes: list[DeviceClass], replicate: bool) -> bool:
    """The per-device search covers plans without replication, so its period bound holds for every plan
    the planner considers when replication is off or no two devices are interchangeable."""
    return not replicate or all(c.size == 1 for c in classes)


def _topology_plan(profile, tables, cluster, classes, candidates, *, objective, stages_limit, replicate,
                   segment_times_s) -> tuple[SearchResult, Plan | None]:
    """The per-device search, seeded with the best single-replica candidate; its plan (None: no better)."""
    usable = [d.name for d in cluster.devices if d.memory_bytes >= min(tables.memory[k, k + 1]
                                                                       for k in range(tables.L))]
    net = build_network(tables, cluster, usable, segment_times_s)
    plain = [c for c in candidates if all(stage.replicas == 1 for stage in c.stages)]
    incumbent = min((c.period_s if objective == "throughput" else c.latency_s for c in plain), default=math.inf)
    if objective == "throughput":
        result = search_period(net, max_stages=stages_limit, incumbent=incumbent)
    else:
        result = search_latency(net, max_stages=stages_limit, incumbent=incumbent)
    chain = result.chain
    if objective == "throughput" and not result.exact:
        # The search stopped on its budget: improve the best chain known by local moves.
        start = chain
        if start is None and plain:
            start = tuple(_device_chain(net, min(plain, key=lambda c: c.period_s)))
        if start:
            improved, value = improve_period(net, start, max_stages=stages_limit)
            if value < result.value:
                chain = tuple(improved)
    if chain is None:
        return result, None
    class_of = {name: k for k, c in enumerate(classes) for name in c.members}
    named: list = [(net.names[s.device], s.start, s.end) for s in chain]
    if replicate:
        by_class = [ClassStage(class_of[name], 1, start, end) for name, start, end in named]
        by_class = add_replicas(by_class, tables, cluster, classes, _used(by_class, classes))
        # Replicas come from the rest of each class; the searched device keeps its stage.
        named = _with_replicas(named, by_class, classes)
    plan = predict(profile, cluster, named, objective=objective, planner="optimal", segment_times_s=segment_times_s)
    return result, plan


def _device_chain(net, plan: Plan) -> list[DeviceStage]:
    index = {name: k for k, name in enumerate(net.names)}
    return [DeviceStage(index[stage.devices[0]], stage.start, stage.end) for stage in plan.stages]


def _with_replicas(named: list[tuple[str, int, int]], chain: list[ClassStage], classes: list[DeviceClass]
                   ) -> list[tuple[tuple[str, ...], int, int]]:
    taken = {name for name, _, _ in named}
    spare = {k: [m for m in c.members if m not in taken] for k, c in enumerate(classes)}
    out = []
    for (name, start, end), stage in zip(named, chain, strict=True):
        extra = [spare[stage.cls].pop(0) for _ in range(stage.replicas - 1)]
        out.append(((name, *extra), start, end))
    return out


def _key(plan: Plan, objective: str) -> tuple[float, float]:
    return (plan.period_s, plan.latency_s) if objective == "throughput" else (plan.latency_s, plan.period_s)


def _relabel(plan: Plan, profile, cluster, segment_times_s, period_bound, latency_bound) -> Plan:
    """The chosen plan as the optimal planner's, with its bounds (whichever candidate produced it)."""
    return predict(profile, cluster, plan.stages, objective=plan.objective, planner="optimal",
                   segment_times_s=segment_times_s, lower_bound_period_s=period_bound,
                   lower_bound_latency_s=latency_bound)


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
    largest = max(classes, key=lambda c: c.spec.memory).spec
    index = max(range(tables.L), key=lambda i: tables.memory[i, i + 1])
    need = tables.memory[index, index + 1]
    if need > largest.memory_bytes:
        raise PlanError(
            f"segment {index} ({profile.segments[index].name}) of {profile.model} needs {need / 2**20:.1f} MiB; "
            f"the largest device ({largest.name}) has {largest.memory / 2**20:.1f} MiB. "
            "Add a device with more memory."
        )


def _no_fit_message(profile: Profile, cluster: ClusterSpec, max_stages: int | None) -> str:
    need = profile.total_param_bytes
    total = sum(d.memory for d in cluster.devices)
    largest = max(cluster.devices, key=lambda d: d.memory)
    limit = f" in at most {max_stages} stages" if max_stages else ""
    return (
        f"{profile.model} needs {need / 2**20:.1f} MiB for its weights (plus activations per stage); the devices "
        f"together have {total / 2**20:.1f} MiB (largest: {largest.name}, {largest.memory / 2**20:.1f} MiB) "
        f"and no split fits{limit}. " + ("Allow more stages or add a device." if max_stages else "Add a device.")
    )
