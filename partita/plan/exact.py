"""The exact planner: dynamic programming over (devices used per class, segments placed, last stage).

The cost model's period is a maximum of per-stage and per-hop terms and its latency a sum, and
every term depends only on a stage, or on two consecutive stages and the cut between them. So the
best pipeline for the first j segments that used count vector v (how many devices of each class)
and ended with a stage on class c with r replicas is all the future needs to know. The DP keeps,
for each state (v, c, r) and each j, the best objective value so far; extending it by a stage
(i, j'] on r' devices of class e adds that stage's compute term and the hop term of cut i.

Exactness (tested against an independent exhaustive search):
- `replicate=False`: the optimum over every choice of devices, their order, and the cuts.
- `replicate=True`: the optimum over those plans plus every plan whose replicated stages use
  interchangeable devices (one class, see `classes.py`). Replicating a stage over unequal devices
  is not considered. For the latency objective replication never helps (a request still computes
  on one replica), so the latency-optimal plan is found without it, and free devices of a stage's
  class are then added as replicas where they shorten the period without changing the latency.

Cost: about prod(count_c + 1) x classes^2 x replicas^2 x L^2 operations (vectorised with numpy).
`solve` keeps an estimate of the time it has spent and raises OverBudget past `budget_s`, so the
caller can fall back to `partita.plan.large`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from partita.cluster import ClusterSpec
from partita.plan.classes import DeviceClass
from partita.plan.cost import CostTables

__all__ = ["SECONDS_PER_ELEMENT", "SECONDS_PER_TRANSITION", "ClassStage", "OverBudget", "solve"]


@dataclass(frozen=True)
class ClassStage:
    """A stage in class terms: segments [start, end) on `replicas` devices of class index `cls`."""

    cls: int
    replicas: int
    start: int
    end: int


class OverBudget(Exception):
    """The DP would take longer than its budget; the caller falls back to the large-cluster path."""


# Estimated seconds per DP transition: numpy work per matrix element, plus fixed Python overhead.
SECONDS_PER_ELEMENT = 3.0e-9
SECONDS_PER_TRANSITION = 3.0e-5


class _Links:
    """Per-(class, class) link terms (from row to column), and the links from and to the source, as arrays."""

    def __init__(self, cluster: ClusterSpec, classes: list[DeviceClass]) -> None:
        k = len(classes)
        self.bw = np.empty((k, k))
        self.lat = np.empty((k, k))
        for a, ca in enumerate(classes):
            for b, cb in enumerate(classes):
                if a == b:
                    link = ca.intra_link or cluster.link(ca.members[0], ca.members[0])
                else:
                    link = cluster.link(ca.members[0], cb.members[0])
                self.bw[a, b], self.lat[a, b] = link.bandwidth_bytes_per_s, link.latency_s
        self.src_bw = np.array([cluster.link(cluster.source, c.members[0]).bandwidth_bytes_per_s for c in classes])
        self.src_lat = np.array([cluster.link(cluster.source, c.members[0]).latency_s for c in classes])
        self.dst_bw = np.array([cluster.link(c.members[0], cluster.source).bandwidth_bytes_per_s for c in classes])
        self.dst_lat = np.array([cluster.link(c.members[0], cluster.source).latency_s for c in classes])


def solve(tables: CostTables, cluster: ClusterSpec, classes: list[DeviceClass], caps: list[int], *,
          objective: str, max_stages: int, replicate: bool, budget_s: float | None = None
          ) -> dict[int, list[ClassStage]]:
    """The best chain of class stages for each number of stages, using at most caps[c] devices of class c.

    Returns {stages: chain}, best first (empty if nothing fits). Replicas are considered only when
    `replicate` and the objective is throughput. Raises OverBudget when the estimated time of the
    transitions done exceeds `budget_s`.
    """
    throughput = objective == "throughput"
    use_replicas = replicate and throughput
    n_cls = len(classes)
    L = tables.L
    links = _Links(cluster, classes)
    comp = [tables.compute_matrix(c.spec, c.segment_times) for c in classes]
    cut = tables.cut_bytes
    finite_rows = [np.isfinite(m).any(axis=1) for m in comp]

    def hop(prev_c: int, prev_r: int, e: int, r: int) -> np.ndarray:
        """The hop term at every cut i between (prev_c, prev_r) and (e, r); prev_c = -1: the source."""
        if prev_c < 0:
            bw, lat, lcm = links.src_bw[e], links.src_lat[e], r
        else:
            bw, lat, lcm = links.bw[prev_c, e], links.lat[prev_c, e], prev_r * r // math.gcd(prev_r, r)
        busy = cut / bw
        return busy / lcm if throughput else lat + busy

    def stage_matrix(e: int, r: int) -> np.ndarray:
        return comp[e] / r if r > 1 else comp[e]

    # Layer-by-layer over the number of stages: state key (v, c, r) -> (values over j, pred arrays).
    spent_s = 0.0
    finals: list[tuple[float, int, tuple]] = []
    all_layers: list[dict] = []
    layer: dict[tuple, tuple[np.ndarray, np.ndarray, list]] = {}
    start_value = np.full(L + 1, np.inf)
    start_value[0] = 0.0
    frontier: dict[tuple, tuple[np.ndarray, Any, Any]] = {((0,) * n_cls, -1, 1): (start_value, None, None)}
    for depth in range(max_stages):
        layer = {}
        for (v, c, rc), (value, _, _) in frontier.items():
            reach = np.nonzero(np.isfinite(value[:L]))[0]
            if reach.size == 0:
                continue
            for e in range(n_cls):
                free = caps[e] - v[e]
                if free <= 0:
                    continue
                rows = reach[finite_rows[e][reach]]
                if rows.size == 0:
                    continue
                for r in range(1, (free if use_replicas else 1) + 1):
                    spent_s += SECONDS_PER_TRANSITION + SECONDS_PER_ELEMENT * rows.size * (L + 1)
                    if budget_s is not None and spent_s > budget_s:
                        raise OverBudget
                    h = hop(c, rc, e, r)[rows]
                    base = np.maximum(value[rows], h) if throughput else value[rows] + h
                    cand = stage_matrix(e, r)[rows]
                    total = np.maximum(base[:, None], cand) if throughput else base[:, None] + cand
                    pick = total.argmin(axis=0)
                    new_value = total[pick, np.arange(L + 1)]
                    nv = list(v)
                    nv[e] += r
                    key = (tuple(nv), e, r)
                    prev_key = (v, c, rc)
                    if key not in layer:
                        layer[key] = (new_value, rows[pick], [prev_key] * (L + 1))
                        continue
                    old_value, old_pred_i, old_pred_key = layer[key]
                    better = new_value < old_value
                    if better.any():
                        old_value[better] = new_value[better]
                        old_pred_i[better] = rows[pick][better]
                        for j in np.nonzero(better)[0]:
                            old_pred_key[j] = prev_key
        if not layer:
            break
        all_layers.append(layer)
        best_here: tuple[float, tuple] | None = None
        for key, (value, _, _) in layer.items():
            if not np.isfinite(value[L]):
                continue
            _, c, rc = key
            out = cut[L] / links.dst_bw[c]
            final = max(value[L], out / rc) if throughput else value[L] + links.dst_lat[c] + out
            if best_here is None or final < best_here[0]:
                best_here = (final, key)
        if best_here is not None:
            finals.append((best_here[0], depth, best_here[1]))
        frontier = layer
    finals.sort(key=lambda item: (item[0], item[1]))
    return {depth + 1: _backtrack(all_layers, (depth, key), L) for _, depth, key in finals}


def _backtrack(all_layers: list[dict], best_state: tuple, L: int) -> list[ClassStage]:
    depth, key = best_state
    j = L
    stages: list[ClassStage] = []
    while depth >= 0:
        _, pred_i, pred_key = all_layers[depth][key]
        i = int(pred_i[j])
        _, c, r = key
        stages.append(ClassStage(c, r, i, j))
        key, j, depth = pred_key[j], i, depth - 1
    stages.reverse()
    return stages

