"""Link-aware planning over individual devices, for clusters where every pair of devices has its own link.

The class DP (`exact.py`) is exact and fast while devices fall into a few interchangeable classes. On a
Wi-Fi mesh or a field of sites every device is its own class, and the DP's state (devices used per
class) grows as 2^n. This module searches over individual devices instead, one device per stage, with
the link matrix in view, and proves how far from the optimum its answer can be.

A `Network` holds what the search needs as arrays: per device the compute time of every segment range
(inf where the range does not fit the device's memory), and per ordered pair of nodes (the devices and
the source) the bandwidth and latency of their link.

**Relaxation.** Forget that a device may run only one stage, except that a stage never follows a stage
on the same device. Then the best cost from "a stage on device e starts at cut i" is a shortest-path
(latency) or bottleneck-path (period) recursion over (device, cut), O(L (nL + n^2)) with numpy:

    H[e, i] = min over j > i of  comb(compute(e, i, j), N[e, j])
    N[d, j] = min over e != d of comb(hop(d, e, j), H[e, j])         N[d, L] = hop(d, source, L)

where comb is max (period) or + (latency). Every real plan is such a walk, so the relaxed optimum from
the source is a lower bound, and H and N are admissible estimates of what is left of a partial plan.

**Period.** The period of any plan is one of finitely many term values (a stage's compute time or a
hop's occupancy), and "is there a plan with period <= T" is monotone in T. `search_period` runs a binary
search over those values. At each threshold T a depth-first search looks for a chain of distinct devices
whose stages and hops all stay within T, pruned by the relaxation's reachability at T (which is exact
bookkeeping, not a heuristic: a branch is cut only when no walk, let alone a chain, completes it). A
search that runs to the end either finds a chain or proves that none exists at T; one that overruns its
node budget proves nothing. The certified bound is the smallest term value above the largest threshold
proved infeasible (or the relaxed optimum).

**Latency.** `search_latency` is a best-first (A*) search over partial chains (devices used, last
device, cut reached), ordered by cost so far plus N, pruned by the best complete plan known. When it
stops on its budget, the smallest estimate still open is a certified lower bound.

Both searches take an incumbent (a plan found elsewhere: a baseline, SEIFER, the class planner), so
they never return anything worse, and both are exact when they finish within budget. Replication is
not searched here; `optimal.py` adds replicas of interchangeable devices afterwards.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from partita.cluster import ClusterSpec
from partita.plan.cost import CostTables, link_matrices

__all__ = ["DeviceStage", "Network", "SearchResult", "build_network", "chain_value", "improve_period", "relaxed_to_go",
           "search_latency", "search_period"]

# Search budgets, counted in nodes (deterministic, unlike a wall-clock limit).
PERIOD_NODES_PER_THRESHOLD = 40_000  # depth-first nodes for one feasibility question at a threshold
PERIOD_NODES_TOTAL = 150_000  # over the whole binary search
LATENCY_EXPANSIONS = 6000  # best-first expansions
# The searches sum times in a different order than `cost.predict`; a certified bound is lowered by this
# relative margin so that rounding can never lift it above the true optimum.
ROUNDING_MARGIN = 1e-9


@dataclass(frozen=True)
class DeviceStage:
    """Segments [start, end) on the device with index `device` in `Network.names`."""

    device: int
    start: int
    end: int


@dataclass(frozen=True)
class SearchResult:
    """The best chain found (None: nothing better than the incumbent), its value and a certified bound.

    `value` is the objective of `chain` (or of the incumbent, when chain is None); `bound` is a value no
    plan without replication can beat; `exact` says the search finished, so `bound` equals the optimum.
    """

    chain: tuple[DeviceStage, ...] | None
    value: float
    bound: float
    exact: bool


@dataclass(frozen=True)
class Network:
    """The arrays the search reads. Node index n (= len(names)) is the source.

    comp[d, i, j]: seconds device d takes for segments [i, j), inf where j <= i or it does not fit memory.
    occ[u, v, p]: seconds the link u -> v is busy carrying the bytes of cut p (0 for a node to itself).
    lat[u, v]: the link's latency in seconds.
    """

    names: tuple[str, ...]
    comp: np.ndarray
    occ: np.ndarray
    lat: np.ndarray

    @property
    def n(self) -> int:
        return len(self.names)

    @property
    def L(self) -> int:
        return self.comp.shape[1] - 1

    def hop(self, objective: str) -> np.ndarray:
        """The hop term per (u, v, cut): occupancy (period) or latency + occupancy (latency)."""
        return self.occ if objective == "throughput" else self.lat[:, :, None] + self.occ


def build_network(tables: CostTables, cluster: ClusterSpec, names: Sequence[str],
                  segment_times_s: Mapping[str, Sequence[float]] | None) -> Network:
    """The search's arrays for the devices `names` (in that order) and the cluster's source."""
    times = segment_times_s or {}
    comp = np.stack([tables.compute_matrix(cluster.device(name), times.get(name)) for name in names])
    bandwidth, latency = link_matrices(cluster, [*names, cluster.source])
    occ = tables.cut_bytes[None, None, :] / bandwidth[:, :, None]
    return Network(tuple(names), comp, occ, latency)


def chain_value(net: Network, chain: Sequence[DeviceStage], objective: str) -> float:
    """The objective of a chain of single-device stages, from the network's arrays."""
    hop = net.hop(objective)
    comb = max if objective == "throughput" else _add
    value, prev = 0.0, net.n
    for stage in chain:
        value = comb(value, float(hop[prev, stage.device, stage.start]))
        value = comb(value, float(net.comp[stage.device, stage.start, stage.end]))
        prev = stage.device
    return comb(value, float(hop[prev, net.n, net.L]))


def _add(a: float, b: float) -> float:
    return a + b


def relaxed_to_go(net: Network, objective: str) -> tuple[np.ndarray, np.ndarray, float]:
    """(H, N, start): the relaxation's best cost to go (see the module docstring) and its optimum."""
    n, L = net.n, net.L
    comb = np.maximum if objective == "throughput" else np.add
    hop = net.hop(objective)
    H = np.full((n, L + 1), np.inf)
    N = np.full((n, L + 1), np.inf)
    N[:, L] = hop[:n, n, L]
    for p in range(L - 1, -1, -1):
        H[:, p] = comb(net.comp[:, p, p + 1:], N[:, p + 1:]).min(axis=1)
        if p > 0:
            step = comb(hop[:n, :n, p], H[None, :, p])
            np.fill_diagonal(step, np.inf)
            N[:, p] = step.min(axis=1)
    start = float(comb(hop[n, :n, 0], H[:, 0]).min()) if n else math.inf
    return H, N, start


# --- period: binary search on a threshold, with a depth-first search at each ---------------------------


class _OutOfNodes(Exception):
    """The depth-first search spent its node budget without an answer."""


def search_period(net: Network, *, max_stages: int, incumbent: float = math.inf,
                  nodes_per_threshold: int = PERIOD_NODES_PER_THRESHOLD,
                  nodes_total: int = PERIOD_NODES_TOTAL) -> SearchResult:
    """The chain with the smallest period, better than `incumbent` if there is one (module docstring)."""
    _, _, relaxed = relaxed_to_go(net, "throughput")
    best_chain: tuple[DeviceStage, ...] | None = None
    best = incumbent
    certified = relaxed
    values = _term_values(net, relaxed, best)
    lo, hi = 0, len(values)
    spent = 0
    while lo < hi and spent < nodes_total:
        mid = (lo + hi) // 2
        threshold = values[mid]
        budget = min(nodes_per_threshold, nodes_total - spent)
        finder = _ThresholdSearch(net, threshold, max_stages, budget)
        try:
            found = finder.run()
        except _OutOfNodes:
            spent += finder.visited
            lo = mid + 1  # unknown: look for plans above this threshold, but prove nothing
            continue
        spent += finder.visited
        if found is None:
            certified = max(certified, values[mid + 1] if mid + 1 < len(values) else best)
            lo = mid + 1
        else:
            best_chain = found
            best = chain_value(net, found, "throughput")
            hi = bisect.bisect_left(values, best, lo, hi)
    bound = min(certified, best)
    exact = certified >= best
    return SearchResult(best_chain, best, bound * (1 - ROUNDING_MARGIN), exact)


def _term_values(net: Network, low: float, high: float) -> list[float]:
    """Every value a plan's period can take (compute and occupancy terms) in [low, high), sorted."""
    n, L = net.n, net.L
    parts = [net.comp[np.isfinite(net.comp)],
             net.occ[n, :n, 0], net.occ[:n, n, L],
             net.occ[:n, :n, 1:L].ravel()]
    values = np.unique(np.concatenate(parts))
    values = values[(values >= low) & (values < high)]
    return values.tolist()


class _ThresholdSearch:
    """Is there a chain of distinct devices whose every term is <= threshold? Depth-first, pruned."""

    def __init__(self, net: Network, threshold: float, max_stages: int, budget: int) -> None:
        n, L = net.n, net.L
        self.net, self.max_stages, self.budget, self.visited = net, max_stages, budget, 0
        fits = net.comp <= threshold
        starts = np.arange(L + 1)[None, :]
        self.far = starts + fits.sum(axis=2)  # the last end j with [i, j) within the threshold (i: none)
        ok = net.occ <= threshold
        idx = np.arange(n)
        ok[idx, idx, :] = False  # a device never feeds itself: that would be one stage
        self.ok = ok
        # stages_to_end[e, i]: the fewest stages a relaxed walk needs from "a stage on e starts at i"
        # (n + 1: none completes); after_end[d, j]: the same after d has finished at cut j.
        none = n + 1
        after_end = np.full((n, L + 1), none, dtype=np.int64)
        stages_to_end = np.full((n, L + 1), none, dtype=np.int64)
        after_end[ok[:n, n, L], L] = 0
        ends = np.arange(L + 1)[None, :]
        for p in range(L - 1, -1, -1):
            window = (ends > p) & (ends <= self.far[:, p:p + 1])
            stages_to_end[:, p] = np.minimum(np.where(window, after_end, none).min(axis=1) + 1, none)
            if p > 0:
                step = np.where(ok[:n, :n, p], stages_to_end[None, :, p], none)
                after_end[:, p] = step.min(axis=1)
        self.after_end, self.stages_to_end = after_end, stages_to_end
        self.n_devices = n
        self.failed: set[tuple[int, int, int]] = set()

    def run(self) -> tuple[DeviceStage, ...] | None:
        return self._visit(self.net.n, 0, 0, 0)

    def _visit(self, last: int, j: int, used: int, depth: int) -> tuple[DeviceStage, ...] | None:
        net = self.net
        if j == net.L:
            return ()
        if depth == self.max_stages:
            return None
        key = (used, last, j)
        if key in self.failed:
            return None
        self.visited += 1
        if self.visited > self.budget:
            raise _OutOfNodes
        # A chain needs at least as many distinct devices as the relaxed walk needs stages.
        room = min(self.n_devices - used.bit_count(), self.max_stages - depth)
        candidates = np.nonzero(self.ok[last, :net.n, j] & (self.stages_to_end[:, j] <= room))[0]
        # Devices that reach furthest first: fewer stages left to place.
        for e in sorted(candidates.tolist(), key=lambda e: -self.far[e, j]):
            if used >> e & 1:
                continue
            for end in range(int(self.far[e, j]), j, -1):
                if self.after_end[e, end] > room - 1:
                    continue
                rest = self._visit(e, end, used | 1 << e, depth + 1)
                if rest is not None:
                    return (DeviceStage(e, j, end), *rest)
        self.failed.add(key)
        return None


# --- latency: best-first search ---------------------------------------------------------------------------


def search_latency(net: Network, *, max_stages: int, incumbent: float = math.inf,
                   expansions: int = LATENCY_EXPANSIONS) -> SearchResult:
    """The chain with the smallest latency, better than `incumbent` if there is one (module docstring)."""
    n, L = net.n, net.L
    _, N, relaxed = relaxed_to_go(net, "latency")
    hop = net.hop("latency")
    best, best_chain = incumbent, None
    # A node: (estimate, -cut, order, cost so far, last device, cut, used mask, depth, node id).
    parents: list[tuple[int, int, int, int]] = []  # node id -> (device, start, end, parent id)
    heap: list[tuple] = [(relaxed, 0, 0, 0.0, n, 0, 0, 0, -1)]
    seen: dict[tuple[int, int, int], float] = {}
    order, expanded = 1, 0
    exact = True
    while heap:
        estimate, _, _, cost, last, j, used, depth, node = heapq.heappop(heap)
        if estimate >= best:
            heap.clear()
            break
        if expanded >= expansions:
            heapq.heappush(heap, (estimate, -j, 0, cost, last, j, used, depth, node))
            exact = False
            break
        expanded += 1
        if depth == max_stages:
            continue
        into = cost + hop[last, :n, j]  # (n,) cost after the hop into each device
        free = np.array([not (used >> e & 1) for e in range(n)]) & (np.arange(n) != last)
        totals = into[:, None] + net.comp[:, j, j + 1:]  # (n, L - j): cost after the stage [j, end)
        estimates = totals + N[:, j + 1:]
        estimates[~free] = np.inf
        devices, offsets = np.nonzero(estimates < best)
        for e, offset in zip(devices.tolist(), offsets.tolist(), strict=True):
            end = j + 1 + offset
            value = float(estimates[e, offset])
            if value >= best:
                continue  # best improved inside this loop
            if end == L:
                parents.append((e, j, end, node))
                best, best_chain = value, _unwind(parents, len(parents) - 1)
                continue
            key = (used | 1 << e, e, end)
            total = float(totals[e, offset])
            if seen.get(key, math.inf) <= total:
                continue
            seen[key] = total
            parents.append((e, j, end, node))
            heapq.heappush(heap, (value, -end, order, total, e, end, used | 1 << e, depth + 1, len(parents) - 1))
            order += 1
    open_bound = min((entry[0] for entry in heap), default=math.inf)
    bound = min(best, open_bound if not exact else best)
    return SearchResult(best_chain, best, bound * (1 - ROUNDING_MARGIN), exact)


def _unwind(parents: list[tuple[int, int, int, int]], node: int) -> tuple[DeviceStage, ...]:
    stages = []
    while node >= 0:
        device, start, end, node = parents[node]
        stages.append(DeviceStage(device, start, end))
    return tuple(reversed(stages))


# --- period: local search from the best chain, when the search stopped on its budget ----------------------

LOCAL_ELEMENTS = 60_000_000  # array elements the local search may spend (a sequence costs stages x (L+1)^2)


def improve_period(net: Network, chain: Sequence[DeviceStage], *, max_stages: int,
                   elements: int = LOCAL_ELEMENTS) -> tuple[tuple[DeviceStage, ...], float]:
    """Local search over device sequences, each with its best cuts: replace, swap, insert or drop a device.

    Takes the first move that lowers the period, until none does or the budget of `elements` is
    spent. Returns the best chain and its period (at worst the chain it was given).
    """
    order = [stage.device for stage in chain]
    best_value, best_cuts = _best_cuts(net, order)
    per_stage = (net.L + 1) ** 2
    spent = len(order) * per_stage
    improved = True
    while improved and spent < elements:
        improved = False
        for candidate in _moves(order, net.n, max_stages):
            if spent >= elements:
                break
            spent += len(candidate) * per_stage
            value, cuts = _best_cuts(net, candidate)
            if value < best_value * (1 - 1e-12):
                order, best_value, best_cuts, improved = candidate, value, cuts, True
                break
    if not best_cuts:
        return tuple(chain), math.inf  # no sequence tried fits at all
    stages = tuple(DeviceStage(d, best_cuts[k], best_cuts[k + 1]) for k, d in enumerate(order))
    return stages, best_value


def _moves(order: list[int], n: int, max_stages: int):
    """Neighbouring device sequences: replace one device by an unused one, swap two, drop one, insert one."""
    unused = [d for d in range(n) if d not in order]
    for k in range(len(order)):
        for d in unused:
            yield order[:k] + [d] + order[k + 1:]
    for a in range(len(order)):
        for b in range(a + 1, len(order)):
            swapped = list(order)
            swapped[a], swapped[b] = swapped[b], swapped[a]
            yield swapped
    if len(order) > 1:
        for k in range(len(order)):
            yield order[:k] + order[k + 1:]
    if len(order) < max_stages:
        for k in range(len(order) + 1):
            for d in unused:
                yield order[:k] + [d] + order[k:]


def _best_cuts(net: Network, order: Sequence[int]) -> tuple[float, list[int]]:
    """The smallest period of the device sequence `order` over every choice of cuts, and those cuts."""
    L, n = net.L, net.n
    value = np.full(L + 1, np.inf)
    value[0] = 0.0
    prev = n
    picks = []
    for device in order:
        into = np.maximum(value, net.occ[prev, device, :])  # (L+1,) over the start cut
        total = np.maximum(into[:, None], net.comp[device])  # (start, end)
        pick = total.argmin(axis=0)
        value = total[pick, np.arange(L + 1)]
        picks.append(pick)
        prev = device
    final = max(float(value[L]), float(net.occ[prev, n, L]))
    if not math.isfinite(final):
        return math.inf, []
    cuts = [L]
    for pick in reversed(picks):
        cuts.append(int(pick[cuts[-1]]))
    return final, list(reversed(cuts))
