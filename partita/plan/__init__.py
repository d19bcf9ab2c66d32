"""Planning: choose stages and devices for a model on a cluster, and predict what that gives.

Pure: takes a model profile and a `ClusterSpec`, returns a frozen `Plan`; no torch, no zmq, no I/O
beyond `load_profile` reading a JSON file when given a path.

    plan(profile, cluster, objective="throughput", planner="optimal") -> Plan
    predict(profile, cluster, [(devices, start, end), ...]) -> Plan      # the cost model of any assignment
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from partita.cluster import ClusterSpec
from partita.errors import PlanError
from partita.plan.baselines import BASELINES, plan_baseline
from partita.plan.basis import describe_basis, prediction_basis
from partita.plan.cost import HOP_OVERHEAD_S, check_hop_overhead, check_segment_times, predict
from partita.plan.optimal import plan_optimal
from partita.plan.profile import Profile, SegmentCost, load_profile
from partita.plan.tiles import best_latency_plan
from partita.plan.types import Plan, StagePlan, TilePlan

__all__ = ["HOP_OVERHEAD_S", "OBJECTIVES", "PLANNERS", "Plan", "Profile", "SegmentCost", "StagePlan", "TilePlan",
           "describe_basis", "load_profile", "plan", "predict", "prediction_basis"]

OBJECTIVES = ("throughput", "latency")
PLANNERS = ("optimal", *BASELINES)


def plan(graph_or_profile: Any, cluster: ClusterSpec, *, objective: str = "throughput",
         planner: str = "optimal", max_stages: int | None = None, replicate: bool = True,
         segment_times_s: Mapping[str, Sequence[float]] | None = None, tiles: bool = True,
         hop_overhead_s: float = 0.0) -> Plan:
    """Choose stages and devices for the model on the cluster.

    objective: "throughput" minimises the period, "latency" the source-to-source latency.
    planner: "optimal" (see `partita.plan.optimal`) or a baseline: "single", "even", "memory", "flops".
    max_stages: at most this many stages (None: no limit beyond segments and devices).
    replicate: let the optimal planner run a stage on several interchangeable devices (round-robin).
    segment_times_s: measured seconds per segment, per device name, at the profile's batch size;
        overrides flops / flops_per_s for the devices it names.
    tiles: for the latency objective with the optimal planner, also consider fused tiles of the model's
        first layers over several devices when the profile carries block geometry (see
        `partita.plan.tiles`); the plan with the lower predicted latency wins.
    hop_overhead_s: the runtime's per-hop overhead (`partita.plan.cost`), included in the chosen
        plan's figures (0: none; the runtime uses `HOP_OVERHEAD_S`). The choice itself is made without it.
    Raises PlanError when the model fits nowhere (the message says what is needed and what there is).
    """
    if objective not in OBJECTIVES:
        raise PlanError(f"unknown objective {objective!r}; expected one of {', '.join(OBJECTIVES)}")
    if planner not in PLANNERS:
        raise PlanError(f"unknown planner {planner!r}; expected one of {', '.join(PLANNERS)}")
    if max_stages is not None and (isinstance(max_stages, bool) or int(max_stages) < 1):
        raise PlanError(f"max_stages must be a whole number >= 1 or None, got {max_stages!r}")
    profile = load_profile(graph_or_profile)
    times = check_segment_times(profile, cluster, segment_times_s) or None
    hop_s = check_hop_overhead(hop_overhead_s)
    if planner == "optimal":
        with_tiles = tiles and objective == "latency" and bool(profile.blocks) and (max_stages or 2) >= 2
        try:
            chosen = plan_optimal(profile, cluster, objective=objective, max_stages=max_stages, replicate=replicate,
                                  segment_times_s=times)
        except PlanError as refusal:
            if not with_tiles:
                raise
            chosen = best_latency_plan(profile, cluster, None, times, refusal)  # tiles may fit where no chain does
        else:
            if with_tiles:
                chosen = best_latency_plan(profile, cluster, chosen, times)
    else:
        chosen = plan_baseline(planner, profile, cluster, objective=objective, max_stages=max_stages,
                               segment_times_s=times)
    if hop_s != 0.0 and not any(stage.kind == "tiled" for stage in chosen.stages):
        # Every plan has at least two hops (source -> device -> source): the latency bound rises by 2h;
        # the period bound stays a bound (h only adds). (Tiled stages' cost model has no per-hop term yet.)
        latency_bound = chosen.lower_bound_latency_s
        chosen = predict(profile, cluster, chosen.stages, objective=objective, planner=chosen.planner,
                         segment_times_s=times, lower_bound_period_s=chosen.lower_bound_period_s,
                         lower_bound_latency_s=None if latency_bound is None else latency_bound + 2 * hop_s,
                         hop_overhead_s=hop_s)
    return dataclasses.replace(chosen, basis=prediction_basis(chosen, cluster, times or ()))
