"""Tiled plans: the first segments of the model split into fused tiles over several devices, then a chain.

For the latency objective the planner compares three shapes (docs/tiles.md):

1. a plain chain (`plan_optimal`);
2. tiles for a fused block [0, end) on the k fastest devices, an even R x C grid, then the rest of
   the model [end, L) on one device (any device, a tile's device included: it is idle once its tile
   is done);
3. the same on devices of unequal speed with strips (1 x k or k x 1) whose sizes are proportional
   to each device's speed, then balanced on the predicted finish times (halo and links included).

The cost model of a tiled stage (`predict_tiled`), from the profile's block geometry
(`partita.halo`): tile t on device d computes its output region from its halo'd input crop,

- compute(t)  = time of the untiled block on d x FLOPs(t) / FLOPs(untiled block)  (halos recomputed)
- memory(t)   = weights of the block + peak activations of t's regions         (must fit d)
- scatter(t)  = transfer(source -> d, crop bytes of t)
- gather(t)   = transfer(d -> source, output bytes of t)

The source scatters and gathers (DeepThings' gateway does the same): it crops the request, and it
stitches the tiles and sends the map on. The stage finishes when its last tile is back: max_t
scatter + compute + gather. Latency adds transfer(source -> tail device, the stitched map), the
rest of the model and its way back, as in `partita.plan.cost`. Links are independent per pair of nodes, as
everywhere in the cost model, so the source's crops travel to the tile devices at once. The period
is the busiest device (its tile plus, when it also runs the tail, the tail) or the busiest link.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from partita.cluster import ClusterSpec
from partita.errors import PlanError, TileError
from partita.halo import Region, tile_cost, tile_grid
from partita.plan.cost import stage_time_s
from partita.plan.profile import Profile
from partita.plan.types import Plan, StagePlan, TilePlan

__all__ = ["best_latency_plan", "predict_tiled", "tiled_plan"]

#: At most this many tile devices (a grid of 16 tiles is past where halos stop paying on 224 x 224 maps).
MAX_TILES = 16
#: Balancing passes over unequal strips: each moves sizes toward equal predicted finish times.
BALANCE_PASSES = 8


def tiled_plan(profile: Profile, cluster: ClusterSpec, *, end: int, grid: tuple[int, int],
               tiles: Sequence[tuple[str, Region]], tail: str | None,
               segment_times_s: Mapping[str, Sequence[float]] | None = None, objective: str = "latency",
               planner: str = "optimal", check_memory: bool = True) -> Plan:
    """The cost model's Plan for tiles of segments [0, end) and, when end < L, the rest on `tail`.

    tiles: (device, (rows, cols)) per tile in row-major grid order, output regions of the block.
    PlanError when the block cannot be tiled, a device is named twice among the tiles, or (unless
    check_memory=False) a tile or the tail does not fit its device.
    """
    n_segments = len(profile.segments)
    block = profile.block(0, end)
    if block is None:
        raise PlanError(f"segments [0, {end}) of {profile.model} are not a fused block of convolutions, pooling and "
                        "pointwise ops (see the profile's blocks); choose a shorter block or a chain")
    if len(tiles) != grid[0] * grid[1]:
        raise PlanError(f"a {grid[0]}x{grid[1]} grid has {grid[0] * grid[1]} tiles, got {len(tiles)}")
    names = [device for device, _ in tiles]
    if len(set(names)) != len(names):
        raise PlanError(f"a device runs one tile of a stage; got {names}")
    if (tail is None) != (end == n_segments):
        raise PlanError(f"segments [{end}, {n_segments}) need a device after the tiles" if tail is None
                        else "the tiles cover the whole model: there is no rest to run on a tail device")
    times = segment_times_s or {}
    height, width = block.out_shape[1], block.out_shape[2]
    whole = tile_cost(block, ((0, height), (0, width)))
    params = sum(s.param_bytes for s in profile.segments[:end])
    tail_memory = profile.memory_bytes(end, n_segments) if tail is not None else 0
    gather_node = cluster.source

    tile_plans: list[TilePlan] = []
    finish = 0.0
    busy: dict[str, float] = {}
    link_bytes: dict[frozenset[str], float] = {}
    for device, region in tiles:
        spec = cluster.device(device)
        try:
            cost = tile_cost(block, region)
        except TileError as exc:
            raise PlanError(f"tile rows {region[0]} cols {region[1]}: {exc}") from exc
        share = cost.flops / whole.flops if whole.flops else _area(region) / (height * width)
        compute = stage_time_s(profile, spec, 0, end, times) * share
        memory = params + cost.act_bytes
        held = memory + (tail_memory if device == tail else 0)  # the device also holds the rest of the model
        if check_memory and held > spec.memory:
            raise PlanError(f"tile rows {region[0]} cols {region[1]} of {profile.model} needs {memory / 2**20:.1f} MiB "
                            f"on {device}{' besides the rest of the model' if device == tail else ''}, which has "
                            f"{spec.memory / 2**20:.1f} MiB; use a finer grid")
        scatter = _transfer(cluster, cluster.source, device, cost.in_bytes)
        gather = _transfer(cluster, device, gather_node, cost.out_bytes)
        finish = max(finish, scatter + compute + gather)
        busy[device] = busy.get(device, 0.0) + compute
        for a, b, nbytes in ((cluster.source, device, cost.in_bytes), (device, gather_node, cost.out_bytes)):
            if a != b:
                link_bytes[frozenset((a, b))] = link_bytes.get(frozenset((a, b)), 0.0) + nbytes
        tile_plans.append(TilePlan(device, region[0], region[1], compute, float(memory), cost.in_bytes,
                                   cost.out_bytes))
    stages = [StagePlan(
        devices=tuple(names), start=0, end=end, compute_s=max(t.compute_s for t in tile_plans),
        memory_bytes=max(t.memory_bytes for t in tile_plans), in_bytes=sum(t.in_bytes for t in tile_plans),
        out_bytes=profile.cut_bytes(end), kind="tiled", grid=(int(grid[0]), int(grid[1])), tiles=tuple(tile_plans),
    )]
    latency = finish
    if tail is not None:
        spec = cluster.device(tail)
        if check_memory and tail not in names and tail_memory > spec.memory:
            raise PlanError(f"segments [{end}, {n_segments}) of {profile.model} need {tail_memory / 2**20:.1f} MiB; "
                            f"{tail} has {spec.memory / 2**20:.1f} MiB")
        compute = stage_time_s(profile, spec, end, n_segments, times)
        out_bytes = profile.cut_bytes(n_segments)
        latency += (_transfer(cluster, cluster.source, tail, profile.cut_bytes(end)) + compute
                    + _transfer(cluster, tail, cluster.source, out_bytes))
        busy[tail] = busy.get(tail, 0.0) + compute
        if tail != cluster.source:
            key = frozenset((tail, cluster.source))
            link_bytes[key] = link_bytes.get(key, 0.0) + out_bytes + profile.cut_bytes(end)
        stages.append(StagePlan((tail,), end, n_segments, compute, float(tail_memory), profile.cut_bytes(end),
                                out_bytes))
    period = float(max(busy.values()))
    for pair, carried in link_bytes.items():
        a, b = tuple(pair)
        period = max(period, carried / cluster.link(a, b).bandwidth_bytes_per_s)
    throughput = math.inf if period == 0 else 1.0 / period
    return Plan(tuple(stages), period, throughput, latency, objective, planner, None, cluster.source, profile.model,
                None)


def predict_tiled(profile: Profile, cluster: ClusterSpec, stages: Sequence[Any], *, objective: str, planner: str,
                  segment_times_s: Mapping[str, Sequence[float]] | None, check_memory: bool) -> Plan:
    """`partita.plan.cost.predict` for stages whose first is tiled: the tiles' regions and devices, then one chain stage."""
    first = stages[0]
    if getattr(first, "kind", "chain") != "tiled" or any(getattr(s, "kind", "chain") == "tiled" for s in stages[1:]):
        raise PlanError("a plan holds at most one tiled stage, and it comes first (tiles of the model's first layers)")
    if first.start != 0 or len(stages) > 2:
        raise PlanError("a tiled stage covers segments [0, end) and is followed by at most one chain stage")
    tail = None
    if len(stages) == 2:
        rest = stages[1]
        if rest.start != first.end or rest.end != len(profile.segments) or len(rest.devices) != 1:
            raise PlanError("the stage after the tiles runs the remaining segments on one device")
        tail = rest.devices[0]
    return tiled_plan(profile, cluster, end=first.end, grid=first.grid,
                      tiles=[(t.device, (t.rows, t.cols)) for t in first.tiles], tail=tail,
                      segment_times_s=segment_times_s, objective=objective, planner=planner,
                      check_memory=check_memory)


def best_latency_plan(profile: Profile, cluster: ClusterSpec, chain: Plan | None,
                      segment_times_s: Mapping[str, Sequence[float]] | None = None,
                      refusal: PlanError | None = None) -> Plan:
    """The lowest-latency plan among `chain` and every tiled candidate (shapes 2 and 3 of the module docstring).

    chain: the best chain, or None when no chain fits (then `refusal`, the chain planner's error, is
    raised if no tiled plan fits either).
    """
    best = chain
    for candidate in _candidates(profile, cluster, segment_times_s):
        if best is None or candidate.latency_s < best.latency_s - 1e-12:
            best = candidate
    if best is None:
        raise refusal or PlanError(f"{profile.model} fits on no device, in a chain or in tiles")
    return best


def _candidates(profile: Profile, cluster: ClusterSpec, times: Mapping[str, Sequence[float]] | None):
    n_segments = len(profile.segments)
    names = [d.name for d in cluster.devices]
    for end in range(1, n_segments + 1):
        block = profile.block(0, end)
        if block is None:
            break  # a longer prefix holds this one, which cannot be tiled
        height, width = block.out_shape[1], block.out_shape[2]
        block_time = {d.name: stage_time_s(profile, d, 0, end, times or None) for d in cluster.devices}
        ranked = sorted(names, key=lambda name: block_time[name])
        tails = [None] if end == n_segments else names
        for k in range(2, min(len(names), MAX_TILES) + 1):
            chosen = ranked[:k]
            speeds = [1.0 / max(block_time[name], 1e-30) for name in chosen]
            for rows, cols in _grids(k, height, width):
                layouts = [([1.0] * rows, [1.0] * cols)]
                unequal = max(speeds) > 1.0001 * min(speeds)
                if unequal and rows == 1:
                    layouts.append(([1.0], speeds))
                elif unequal and cols == 1:
                    layouts.append((speeds, [1.0]))
                for row_w, col_w in layouts:
                    yield from _with_tails(profile, cluster, times, end, (rows, cols), chosen, row_w, col_w, tails,
                                           balance=len(layouts) > 1 and (row_w, col_w) != layouts[0])


def _with_tails(profile, cluster, times, end, grid, chosen, row_w, col_w, tails, *, balance: bool):
    block = profile.block(0, end)
    height, width = block.out_shape[1], block.out_shape[2]
    for tail in tails:
        weights = list(col_w if grid[0] == 1 else row_w)
        best = None
        for _ in range(BALANCE_PASSES if balance else 1):
            rw, cw = (row_w, weights) if grid[0] == 1 else (weights, col_w)
            try:
                regions = tile_grid(height, width, grid[0], grid[1], list(rw), list(cw))
                plan = tiled_plan(profile, cluster, end=end, grid=grid, tiles=list(zip(chosen, regions, strict=True)),
                                  tail=tail, segment_times_s=times)
            except (PlanError, TileError):
                break  # does not fit (memory) or the map is too small for this grid: not a candidate
            if best is None or plan.latency_s < best.latency_s:
                best = plan
            if not balance:
                break
            weights = _rebalanced(plan, weights)
        if best is not None:
            yield best


def _rebalanced(plan: Plan, weights: list[float]) -> list[float]:
    """Strip sizes moved toward equal finish times: a tile that finishes late loses rows (or columns)."""
    tiles = plan.stages[0].tiles
    finish = [t.compute_s for t in tiles]
    mean = sum(finish) / len(finish)
    return [w * math.sqrt(mean / f) if f > 0 else w for w, f in zip(weights, finish, strict=True)]


def _grids(k: int, height: int, width: int) -> list[tuple[int, int]]:
    return [(r, k // r) for r in range(1, k + 1) if k % r == 0 and r <= height and k // r <= width]


def _transfer(cluster: ClusterSpec, a: str, b: str, nbytes: float) -> float:
    if a == b:
        return 0.0
    link = cluster.link(a, b)
    return link.latency_s + nbytes / link.bandwidth_bytes_per_s


def _area(region: Region) -> int:
    return (region[0][1] - region[0][0]) * (region[1][1] - region[1][0])

