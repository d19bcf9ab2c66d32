"""The SEIFER baseline, checked against brute force written from its description (seifer.py's docstring)."""

from __future__ import annotations

import math
import random
from itertools import combinations, permutations

import pytest
from plan_instances import SOURCE, random_instance

from partita.errors import PlanError
from partita.plan import plan


def _memory(profile, i, j):
    segs = profile["segments"][i:j]
    return sum(s["param_bytes"] for s in segs) + max(s["act_bytes"] for s in segs)


def _crossing(profile, i):
    return profile["input_bytes"] if i == 0 else profile["segments"][i - 1]["out_bytes"]


def _best_partition_cost(profile, memories):
    """(parts count k, smallest largest inner crossing) of the first k with a partition into <= k parts
    that each fit the k-th largest memory."""
    L = len(profile["segments"])
    ordered = sorted(memories, reverse=True)
    for k in range(1, min(L, len(ordered)) + 1):
        best = math.inf
        for parts in range(1, k + 1):
            for inner in combinations(range(1, L), parts - 1):
                bounds = [0, *inner, L]
                if all(_memory(profile, a, b) <= ordered[k - 1] for a, b in zip(bounds, bounds[1:], strict=False)):
                    best = min(best, max((_crossing(profile, i) for i in inner), default=0))
        if best < math.inf:
            return k, best
    return None, math.inf


def _widest_cycle_width(profile, cluster, ranges):
    names = list(cluster.names)
    best = 0.0
    for chosen in permutations(names, len(ranges)):
        if any(cluster.device(d).memory_bytes < _memory(profile, a, b) for d, (a, b) in zip(chosen, ranges, strict=True)):
            continue
        cycle = [SOURCE, *chosen, SOURCE]
        width = min(cluster.link(u, v).bandwidth_bytes_per_s for u, v in zip(cycle, cycle[1:], strict=False))
        best = max(best, width)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_seifer_cuts_at_the_cheapest_cuts_and_places_on_the_widest_cycle(seed):
    rng = random.Random(7000 + seed)
    profile, cluster, _ = random_instance(rng, rng.randint(2, 5), rng.randint(2, 7))
    k, cheapest = _best_partition_cost(profile, [d.memory_bytes for d in cluster.devices])
    if k is None:
        with pytest.raises(PlanError, match="seifer"):
            plan(profile, cluster, planner="seifer")
        return
    got = plan(profile, cluster, planner="seifer")
    assert len(got.stages) <= k
    assert len(set(got.devices)) == len(got.devices)
    inner = [_crossing(profile, stage.start) for stage in got.stages[1:]]
    assert max(inner, default=0) == cheapest
    ranges = [(stage.start, stage.end) for stage in got.stages]
    cycle = [SOURCE, *got.devices, SOURCE]
    width = min(cluster.link(u, v).bandwidth_bytes_per_s for u, v in zip(cycle, cycle[1:], strict=False))
    assert width == _widest_cycle_width(profile, cluster, ranges)
