"""The SEIFER baseline: partition at the cheapest cuts under memory, then place along a widest path.

After Parthasarathy and Krishnamachari, "SEIFER: Scalable Edge Inference for Deep Neural Networks"
(NeurIPS DMML 2022) and "Partitioning and Placement of Deep Neural Networks on Distributed Edge Devices
to Maximize Inference Throughput" (ITNAC 2022), and their code (github.com/ANRGUSC/SEIFER,
`partitioner.py`). SEIFER does three things:

1. **Candidate cuts at the DAG's singletons**: the layers every input-to-output path goes through. A
   partita profile is already the chain of those cut points (capture keeps only cuts that every tensor
   crosses), so every cut of the profile is a candidate.
2. **Min-cost partitioning under memory**: choose cuts so that every partition fits a device and the
   largest tensor crossing a cut (the transfer that loads the slowest link) is as small as it can be.
   SEIFER assumes equal capacities; here, for k = 1, 2, ... devices, the capacity is the k-th largest
   device memory and the partition uses at most k parts. The first k that fits wins; ties prefer fewer
   parts, then the smaller total of crossing bytes.
3. **Placement along a widest path through distinct devices**: SEIFER solves a bottleneck travelling
   salesman tour (with Concorde) and slides the partitions along it. Here the tour is the cycle that
   starts and ends at the source through one distinct device per partition (each able to hold its
   partition) whose narrowest link is as wide as possible: a binary search on the bandwidth, with a
   depth-first search for such a cycle at each threshold.

Like SEIFER it ignores compute speed (it was built for equal devices) and never replicates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from partita.cluster import ClusterSpec
from partita.errors import PlanError
from partita.plan.cost import CostTables, link_matrices
from partita.plan.profile import Profile

__all__ = ["seifer_stages"]

_PATH_NODES = 20000  # depth-first nodes per bandwidth threshold (a cycle not found in budget counts as none)


def seifer_stages(profile: Profile, cluster: ClusterSpec, *, max_stages: int | None,
                  segment_times_s: Mapping[str, Sequence[float]] | None = None) -> list[tuple[str, int, int]]:
    """The (device, start, end) stages SEIFER picks; PlanError if no partition fits the devices."""
    tables = CostTables(profile)
    devices = sorted(cluster.devices, key=lambda d: -d.memory)  # stable: file order among equals
    limit = min(len(devices), tables.L, max_stages or tables.L)
    for k in range(1, limit + 1):
        parts = _cheapest_partition(tables, devices[k - 1].memory, k)
        if parts is None:
            continue
        path = _widest_cycle(tables, cluster, parts)
        if path is not None:
            return [(name, start, end) for name, (start, end) in zip(path, parts, strict=True)]
    largest = devices[0]
    raise PlanError(
        f"seifer finds no partition of {profile.model} that fits {limit} of the devices "
        f"(largest: {largest.name}, {largest.memory / 2**20:.1f} MiB). Add a device with more memory."
    )


def _cheapest_partition(tables: CostTables, capacity: float, max_parts: int) -> list[tuple[int, int]] | None:
    """At most `max_parts` ranges fitting `capacity`, minimising (largest crossing bytes, parts, total bytes)."""
    L = tables.L
    cut = tables.cut_bytes
    # best[k][j]: the best key for the first j segments in k parts; inner cuts only (inputs/outputs are fixed).
    inf_key = (np.inf, np.inf, np.inf)
    best = [[inf_key] * (L + 1) for _ in range(max_parts + 1)]
    back: list[list[int]] = [[-1] * (L + 1) for _ in range(max_parts + 1)]
    best[0][0] = (0.0, 0, 0.0)
    for k in range(1, max_parts + 1):
        for j in range(1, L + 1):
            for i in range(j - 1, -1, -1):
                if tables.memory[i, j] > capacity:
                    break  # memory only grows as the range extends to the left
                prev = best[k - 1][i]
                if prev[0] == np.inf:
                    continue
                inner = cut[i] if i > 0 else 0.0
                key = (max(prev[0], inner), k, prev[2] + inner)
                if key < best[k][j]:
                    best[k][j], back[k][j] = key, i
    parts_key = min(range(1, max_parts + 1), key=lambda k: best[k][L])
    if best[parts_key][L][0] == np.inf:
        return None
    parts, j = [], L
    for k in range(parts_key, 0, -1):
        i = back[k][j]
        parts.append((i, j))
        j = i
    return list(reversed(parts))


def _widest_cycle(tables: CostTables, cluster: ClusterSpec, parts: list[tuple[int, int]]) -> list[str] | None:
    """Distinct devices, one per part (each holding its part), maximising the narrowest link of the cycle."""
    names = list(cluster.names)
    source = cluster.source
    needs = [tables.memory[i, j] for i, j in parts]
    holds = [[cluster.device(name).memory_bytes >= need for name in names] for need in needs]
    if any(not any(row) for row in holds):
        return None
    width, _ = link_matrices(cluster, [*names, source])
    widths = np.unique(width[np.isfinite(width)])[::-1].tolist()  # widest first
    src = len(names)
    found = None
    lo, hi = 0, len(widths)  # find the widest threshold (smallest index) at which a cycle exists
    while lo < hi:
        mid = (lo + hi) // 2
        path = _cycle_at(width >= widths[mid], src, holds)
        if path is None:
            lo = mid + 1
        else:
            found, hi = path, mid
    if found is None:
        found = _cycle_at(np.ones_like(width, dtype=bool), src, holds)
    return None if found is None else [names[d] for d in found]


def _cycle_at(allowed: np.ndarray, src: int, holds: list[list[bool]]) -> list[int] | None:
    """A depth-first search for source -> d1 -> ... -> dk -> source over allowed links (None if none in budget)."""
    k = len(holds)
    visited = 0

    def visit(last: int, position: int, used: set[int]) -> list[int] | None:
        nonlocal visited
        visited += 1
        if visited > _PATH_NODES:
            return None
        if position == k:
            return [] if allowed[last, src] else None
        for d in np.nonzero(allowed[last, :src])[0].tolist():
            if d in used or not holds[position][d]:
                continue
            rest = visit(d, position + 1, used | {d})
            if rest is not None:
                return [d, *rest]
        return None

    return visit(src, 0, set())
