"""The optimal planner is exact: it matches an independent exhaustive search on random instances.

The exhaustive search below is written from design.md's cost model alone (it shares no code with
partita.plan): it enumerates every ordered choice of devices and every way to cut the chain, and
for replication every ordered choice of disjoint groups of identical devices.
"""

from __future__ import annotations

import math
import random
from itertools import combinations

import pytest
from plan_instances import SOURCE, random_instance

from partita.plan import plan, predict
from partita.plan.classes import group_devices
from partita.plan.cost import CostTables
from partita.plan.large import lower_bound_period_s


def _link(cluster_dict_links, a, b):
    """(bandwidth, latency) from a to b."""
    if a == b:
        return math.inf, 0.0
    return cluster_dict_links.get((a, b), cluster_dict_links["default"])


def _tables(profile, cluster):
    segs = profile["segments"]
    links = {"default": (cluster.default_link.bandwidth_bytes_per_s, cluster.default_link.latency_s)}
    for pair, link in cluster.pair_links.items():
        a, b = sorted(pair)  # a link's `directions` are (a -> b, b -> a) in name order
        there, back = link.directions or (link.bandwidth_bytes_per_s, link.bandwidth_bytes_per_s)
        links[a, b], links[b, a] = (there, link.latency_s), (back, link.latency_s)
    flops = {d.name: d.flops_per_s for d in cluster.devices}
    memory = {d.name: d.memory_bytes for d in cluster.devices}

    def crossing(i):
        return profile["input_bytes"] if i == 0 else segs[i - 1]["out_bytes"]

    def stage_time(d, i, j):
        return sum(s["flops"] for s in segs[i:j]) / flops[d]

    def stage_memory(i, j):
        return sum(s["param_bytes"] for s in segs[i:j]) + max(s["act_bytes"] for s in segs[i:j])

    return links, memory, crossing, stage_time, stage_memory


def exhaustive_single(profile, cluster, max_stages=None):
    """(best period, best latency) over every device sequence and every cut, one device per stage.

    A depth-first enumeration of all of them (no pruning beyond memory), on precomputed tables.
    """
    L = len(profile["segments"])
    links, memory, crossing, stage_time, stage_memory = _tables(profile, cluster)
    names = [d.name for d in cluster.devices]
    nodes = names + [SOURCE]
    bw = {(a, b): _link(links, a, b)[0] for a in nodes for b in nodes}
    lat = {(a, b): _link(links, a, b)[1] for a in nodes for b in nodes}
    cut = [crossing(i) for i in range(L + 1)]
    fits = {d: [[j for j in range(i + 1, L + 1) if stage_memory(i, j) <= memory[d]] for i in range(L)]
            for d in names}
    time = {d: [[stage_time(d, i, j) if j > i else 0.0 for j in range(L + 1)] for i in range(L + 1)]
            for d in names}
    limit = max_stages or L
    best = [math.inf, math.inf]

    def visit(i, last, used, acc_period, acc_latency, stages):
        if i == L:
            out = cut[L] / bw[last, SOURCE]
            best[0] = min(best[0], max(acc_period, out))
            best[1] = min(best[1], acc_latency + lat[last, SOURCE] + out)
            return
        if stages == limit:
            return
        for d in names:
            if d in used:
                continue
            hop = cut[i] / bw[last, d]
            for j in fits[d][i]:
                t = time[d][i][j]
                visit(j, d, used | {d}, max(acc_period, hop, t), acc_latency + lat[last, d] + hop + t, stages + 1)

    visit(0, SOURCE, frozenset(), 0.0, 0.0, 0)
    return {"throughput": best[0], "latency": best[1]}


def exhaustive_replicated(profile, cluster, kind_of):
    """Best period over every ordered sequence of disjoint groups of same-kind devices (round-robin)."""
    L = len(profile["segments"])
    links, memory, crossing, stage_time, stage_memory = _tables(profile, cluster)
    names = [d.name for d in cluster.devices]
    best = math.inf

    def period(chain):
        # Route one full cycle of requests: request n is served by replica n mod r at each stage.
        cycle = math.lcm(*[len(group) for group, _, _ in chain])
        busy = {}
        for n in range(cycle):
            prev = SOURCE
            for group, i, j in chain:
                d = group[n % len(group)]
                key = ("link", prev, d, i)
                busy[key] = busy.get(key, 0.0) + crossing(i) / _link(links, prev, d)[0]
                busy[("dev", d)] = busy.get(("dev", d), 0.0) + stage_time(d, i, j)
                prev = d
            key = ("link", prev, SOURCE, L)
            busy[key] = busy.get(key, 0.0) + crossing(L) / _link(links, prev, SOURCE)[0]
        return max(busy.values()) / cycle

    def visit(i, used, chain):
        nonlocal best
        if i == L:
            best = min(best, period(chain))
            return
        free = [d for d in names if d not in used]
        for size in range(1, len(free) + 1):
            for group in combinations(free, size):
                if len({kind_of[d] for d in group}) != 1:
                    continue
                for j in range(i + 1, L + 1):
                    if stage_memory(i, j) > memory[group[0]]:
                        break
                    visit(j, used | set(group), chain + [(group, i, j)])

    visit(0, frozenset(), [])
    return best


CASES = [(6, 12, 0), (6, 12, 1), (6, 9, 2)] + [(2 + k % 4, 3 + (k * 7) % 10, 100 + k) for k in range(16)]


@pytest.mark.parametrize(("n_devices", "n_segments", "seed"), CASES)
def test_optimal_matches_exhaustive_search_without_replication(n_devices, n_segments, seed):
    rng = random.Random(seed)
    profile, cluster, _ = random_instance(rng, n_devices, n_segments)
    optimum = exhaustive_single(profile, cluster)
    for objective in ("throughput", "latency"):
        expected = optimum[objective]
        if math.isinf(expected):
            with pytest.raises(Exception, match="MiB"):
                plan(profile, cluster, objective=objective, replicate=False)
            continue
        got = plan(profile, cluster, objective=objective, replicate=False)
        value = got.period_s if objective == "throughput" else got.latency_s
        assert value == pytest.approx(expected, rel=1e-9), (objective, str(got))


@pytest.mark.parametrize(("n_devices", "n_segments", "seed"), [(2 + k % 4, 3 + (k * 5) % 8, 700 + k) for k in range(10)])
def test_optimal_matches_exhaustive_search_on_links_slower_one_way(n_devices, n_segments, seed):
    """Each direction of a pair has its own bandwidth: requests go out on one and come back on the other."""
    profile, cluster, _ = random_instance(random.Random(seed), n_devices, n_segments, one_way=True)
    assert any(link.directions for link in cluster.pair_links.values())
    optimum = exhaustive_single(profile, cluster)
    for objective in ("throughput", "latency"):
        if math.isinf(optimum[objective]):
            continue
        got = plan(profile, cluster, objective=objective, replicate=False)
        value = got.period_s if objective == "throughput" else got.latency_s
        assert value == pytest.approx(optimum[objective], rel=1e-9), (objective, str(got))
        assert predict(profile, cluster, [(s.devices[0], s.start, s.end) for s in got.stages],
                       objective=objective).period_s == pytest.approx(got.period_s, rel=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_optimal_matches_exhaustive_search_under_a_stage_limit(seed):
    rng = random.Random(500 + seed)
    profile, cluster, _ = random_instance(rng, 4, 8)
    optimum = exhaustive_single(profile, cluster, max_stages=2)
    for objective in ("throughput", "latency"):
        expected = optimum[objective]
        if math.isinf(expected):
            continue
        got = plan(profile, cluster, objective=objective, replicate=False, max_stages=2)
        assert len(got.stages) <= 2
        value = got.period_s if objective == "throughput" else got.latency_s
        assert value == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("seed", range(10))
def test_optimal_with_replication_matches_exhaustive_search_over_identical_replicas(seed):
    rng = random.Random(900 + seed)
    profile, cluster, kind_of = random_instance(rng, 4 + seed % 2, 6, types=2)
    expected = exhaustive_replicated(profile, cluster, kind_of)
    if math.isinf(expected):
        return
    got = plan(profile, cluster, objective="throughput", replicate=True)
    assert got.lower_bound_period_s is None  # exact path
    assert got.period_s == pytest.approx(expected, rel=1e-9), str(got)


@pytest.mark.parametrize("seed", range(8))
def test_lower_bound_is_below_the_exact_optimum(seed):
    rng = random.Random(1300 + seed)
    profile, cluster, kind_of = random_instance(rng, 4, 7, types=2)
    for replicate in (False, True):
        optimum = (exhaustive_replicated(profile, cluster, kind_of) if replicate
                   else exhaustive_single(profile, cluster)["throughput"])
        if math.isinf(optimum):
            continue
        from partita.plan.profile import load_profile

        tables = CostTables(load_profile(profile))
        bound = lower_bound_period_s(tables, cluster, group_devices(cluster), replicate=replicate)
        assert 0 < bound <= optimum * (1 + 1e-12)
