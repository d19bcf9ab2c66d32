"""Topology-aware planning: every pair of devices has its own link.

The reference is `exhaustive_single` (tests/test_plan_exact.py), written from design.md's cost model
alone: every ordered choice of distinct devices and every way to cut the chain.
"""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from plan_instances import RESNET50_PROFILE, geometric_field, random_instance
from test_plan_exact import exhaustive_replicated, exhaustive_single

from partita.errors import PlanError
from partita.plan import PLANNERS, Plan, load_profile, plan, predict
from partita.plan.bound import grouped_bound
from partita.plan.cost import CostTables
from partita.plan.topology import (
    DeviceStage,
    build_network,
    chain_value,
    improve_period,
    search_latency,
    search_period,
)

OBJECTIVES = ("throughput", "latency")
SMALL = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _value(p, objective):
    return p.period_s if objective == "throughput" else p.latency_s


def _network(profile, cluster):
    prof = load_profile(profile)
    return prof, build_network(CostTables(prof), cluster, cluster.names, None)


def _search(net, objective, **budget):
    if objective == "throughput":
        return search_period(net, max_stages=net.L, **budget)
    return search_latency(net, max_stages=net.L, **budget)


@SMALL
@given(seed=st.integers(0, 10**6), n=st.integers(2, 6), segments=st.integers(2, 8), one_way=st.booleans())
def test_topology_search_matches_exhaustive_search(seed, n, segments, one_way):
    """one_way: each direction of a pair has its own bandwidth (requests go out on one, results come back on the other)."""
    profile, cluster, _ = random_instance(random.Random(seed), n, segments, one_way=one_way)
    optimum = exhaustive_single(profile, cluster)
    _, net = _network(profile, cluster)
    for objective in OBJECTIVES:
        result = _search(net, objective)
        if math.isinf(optimum[objective]):
            assert result.chain is None
            continue
        assert result.exact
        assert chain_value(net, result.chain, objective) == pytest.approx(optimum[objective], rel=1e-9)
        assert result.bound <= optimum[objective]


@SMALL
@given(seed=st.integers(0, 10**6), n=st.integers(2, 6), segments=st.integers(2, 8))
def test_bounds_hold_when_the_search_runs_out_of_budget(seed, n, segments):
    profile, cluster, _ = random_instance(random.Random(seed), n, segments)
    optimum = exhaustive_single(profile, cluster)
    _, net = _network(profile, cluster)
    tiny = {"throughput": {"nodes_per_threshold": 2, "nodes_total": 5}, "latency": {"expansions": 2}}
    for objective in OBJECTIVES:
        if math.isinf(optimum[objective]):
            continue
        result = _search(net, objective, **tiny[objective])
        assert result.bound <= optimum[objective] * (1 + 1e-12)
        if result.chain is not None:
            assert chain_value(net, result.chain, objective) >= optimum[objective] * (1 - 1e-12)
        if result.exact:
            assert result.bound == pytest.approx(optimum[objective], rel=1e-8)


@pytest.mark.parametrize("seed", range(4))
def test_optimal_is_exact_on_eight_devices_with_distinct_links(seed):
    profile, cluster, _ = random_instance(random.Random(4200 + seed), 8, 5)
    optimum = exhaustive_single(profile, cluster)
    for objective in OBJECTIVES:
        if math.isinf(optimum[objective]):
            continue
        got = plan(profile, cluster, objective=objective)
        assert _value(got, objective) == pytest.approx(optimum[objective], rel=1e-9), str(got)
        assert got.gap is None  # exact, and says so


@pytest.mark.parametrize("n", [8, 20, 50])
def test_more_devices_never_give_a_worse_plan(n):
    profile = load_profile(RESNET50_PROFILE)
    rng = random.Random(n)
    full = geometric_field(rng, n, flops_per_s=1e11, mixed=True)
    dropped = rng.sample(list(full.names), n // 4)
    subset = full.without(*dropped)
    for objective in OBJECTIVES:
        more = plan(profile, full, objective=objective)
        fewer = plan(profile, subset, objective=objective)
        assert _value(more, objective) <= _value(fewer, objective) * (1 + 1e-9)


@SMALL
@given(seed=st.integers(0, 10**6), n=st.integers(3, 6))
def test_removing_a_device_never_helps_on_random_topologies(seed, n):
    rng = random.Random(seed)
    profile, cluster, _ = random_instance(rng, n, 6)
    smaller = cluster.without(rng.choice(list(cluster.names)))
    for objective in OBJECTIVES:
        try:
            fewer = plan(profile, smaller, objective=objective)
        except PlanError:
            continue
        more = plan(profile, cluster, objective=objective)
        assert _value(more, objective) <= _value(fewer, objective) * (1 + 1e-9)


@pytest.mark.parametrize(("n", "seed"), [(5, 0), (20, 1), (50, 2), (100, 3)])
def test_optimal_is_never_worse_than_any_baseline_on_fields(n, seed):
    profile = load_profile(RESNET50_PROFILE)
    cluster = geometric_field(random.Random(seed), n, flops_per_s=1e11, mixed=True)
    for objective in OBJECTIVES:
        best = plan(profile, cluster, objective=objective)
        assert best.planner == "optimal"
        for name in PLANNERS[1:]:
            try:
                other = plan(profile, cluster, objective=objective, planner=name)
            except PlanError:
                continue
            assert _value(best, objective) <= _value(other, objective) * (1 + 1e-9), name


@pytest.mark.parametrize("n", [20, 50, 100])
def test_large_fields_report_a_bound_below_the_plan(n):
    profile = load_profile(RESNET50_PROFILE)
    cluster = geometric_field(random.Random(10 + n), n, flops_per_s=1e11)
    for objective in OBJECTIVES:
        got = plan(profile, cluster, objective=objective)
        again = predict(profile, cluster, got.stages)
        assert (again.period_s, again.latency_s) == (got.period_s, got.latency_s)
        bound = got.lower_bound_period_s if objective == "throughput" else got.lower_bound_latency_s
        assert bound is None or 0 < bound <= _value(got, objective)
        assert Plan.from_json(got.to_json()) == got  # the latency bound round-trips too


@SMALL
@given(seed=st.integers(0, 10**6), n=st.integers(2, 6), segments=st.integers(2, 7))
def test_the_large_path_is_exact_on_small_topologies(seed, n, segments):
    profile, cluster, _ = random_instance(random.Random(seed), n, segments)
    optimum = exhaustive_single(profile, cluster)
    with pytest.MonkeyPatch.context() as patch:
        # No budget for the class DP: every plan comes from the large path (class path, baselines, search).
        patch.setattr("partita.plan.optimal.EXACT_BUDGET_S", 0.0)
        for objective in OBJECTIVES:
            if math.isinf(optimum[objective]):
                with pytest.raises(PlanError):
                    plan(profile, cluster, objective=objective)
                continue
            got = plan(profile, cluster, objective=objective)
            assert _value(got, objective) == pytest.approx(optimum[objective], rel=1e-9), str(got)
            bound = got.lower_bound_period_s if objective == "throughput" else got.lower_bound_latency_s
            assert bound is None or bound <= optimum[objective]


@SMALL
@given(seed=st.integers(0, 10**6), n=st.integers(2, 6), segments=st.integers(2, 8), types=st.sampled_from([None, 2]))
def test_the_grouped_bound_is_never_above_the_exhaustive_optimum(seed, n, segments, types):
    profile, cluster, _ = random_instance(random.Random(seed), n, segments, types=types)
    optimum = exhaustive_single(profile, cluster)
    tables = CostTables(load_profile(profile))
    for objective in OBJECTIVES:
        if math.isinf(optimum[objective]):
            continue
        bound = grouped_bound(tables, cluster, objective=objective, replicate=False, max_stages=segments,
                              segment_times_s=None)
        assert 0 < bound <= optimum[objective] * (1 + 1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_the_grouped_bound_with_replicas_is_never_above_the_replicated_optimum(seed):
    profile, cluster, kind_of = random_instance(random.Random(3100 + seed), 4, 6, types=2)
    optimum = exhaustive_replicated(profile, cluster, kind_of)
    if math.isinf(optimum):
        return
    bound = grouped_bound(CostTables(load_profile(profile)), cluster, objective="throughput", replicate=True,
                          max_stages=6, segment_times_s=None)
    assert 0 < bound <= optimum * (1 + 1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_local_search_never_worsens_a_chain_and_its_cuts_are_optimal_for_its_order(seed):
    profile, cluster, _ = random_instance(random.Random(5100 + seed), 5, 7)
    optimum = exhaustive_single(profile, cluster)["throughput"]
    if math.isinf(optimum):
        return
    _, net = _network(profile, cluster)
    start = _search(net, "throughput").chain
    improved, value = improve_period(net, start, max_stages=net.L)
    assert value == pytest.approx(chain_value(net, improved, "throughput"), rel=1e-12)
    assert value == pytest.approx(optimum, rel=1e-9)  # it starts at the optimum: cannot move off it
    # From a poor chain (every device in file order, best cuts) it only ever improves.
    poor = tuple(DeviceStage(d, d * net.L // net.n, (d + 1) * net.L // net.n) for d in range(min(net.n, net.L)))
    if any(stage.start == stage.end for stage in poor):
        return
    better, value = improve_period(net, poor, max_stages=net.L)
    assert optimum * (1 - 1e-9) <= value <= chain_value(net, poor, "throughput")


def test_link_matrices_agree_with_cluster_links_when_the_source_is_a_device():
    from partita.cluster import ClusterSpec
    from partita.plan.cost import link_matrices

    cluster = ClusterSpec.from_dict({
        "source": "a",
        "devices": [{"name": name, "flops_per_s": 1e10, "memory_bytes": 1e9} for name in ("a", "b", "c")],
        "links": {"default": {"bandwidth_bytes_per_s": 1e7, "latency_s": 0.002},
                  "pairs": [{"a": "a", "b": "c", "bandwidth_bytes_per_s": 5e6, "latency_s": 0.01}]},
    })
    nodes = [*cluster.names, cluster.source]
    bandwidth, latency = link_matrices(cluster, nodes)
    for i, u in enumerate(nodes):
        for j, v in enumerate(nodes):
            link = cluster.link(u, v)
            assert (bandwidth[i, j], latency[i, j]) == (link.bandwidth_bytes_per_s, link.latency_s)


def test_a_field_whose_source_is_a_device_plans_and_reports_a_true_bound():
    profile = load_profile(RESNET50_PROFILE)
    field = geometric_field(random.Random(5), 20, flops_per_s=1e11)
    pairs = {pair: link for pair, link in field.pair_links.items() if "src" not in pair}
    cluster = dataclasses.replace(field, source="d0", pair_links=pairs)
    for objective in OBJECTIVES:
        got = plan(profile, cluster, objective=objective, max_stages=5)
        assert len(got.stages) <= 5
        again = predict(profile, cluster, got.stages)
        assert (again.period_s, again.latency_s) == (got.period_s, got.latency_s)
        bound = got.lower_bound_period_s if objective == "throughput" else got.lower_bound_latency_s
        assert bound is None or 0 < bound <= _value(got, objective)
        for name in PLANNERS[1:]:
            try:
                other = plan(profile, cluster, objective=objective, planner=name, max_stages=5)
            except PlanError:
                continue
            assert _value(got, objective) <= _value(other, objective) * (1 + 1e-9), name
