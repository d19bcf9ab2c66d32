"""The partitioners people use today, for comparison with the optimal planner.

- `single`: the whole model on the fastest device that holds it.
- `even`: equal segment counts over the devices in file order (DEFER).
- `memory`: segment counts proportional to each device's memory (exo, llama.cpp RPC).
- `flops`: segment counts proportional to each device's compute.
- `seifer`: SEIFER's cheapest cuts under memory, placed along a widest path (see `seifer.py`).

The proportional baselines place boundaries at round(cumulative share x L), as exo does, and drop a
device whose share rounds to no segment. None of them replicates; only `seifer` reorders devices; `max_stages`
keeps the first devices in file order. A baseline whose stages do not fit memory raises PlanError
(that is how it fails in practice: out of memory).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from partita.cluster import ClusterSpec
from partita.errors import PlanError
from partita.plan.cost import predict, stage_time_s
from partita.plan.profile import Profile
from partita.plan.seifer import seifer_stages

__all__ = ["BASELINES", "baseline_stages"]

BASELINES = ("single", "even", "memory", "flops", "seifer")


def baseline_stages(name: str, profile: Profile, cluster: ClusterSpec, *, max_stages: int | None,
                    segment_times_s: Mapping[str, Sequence[float]] | None) -> list[tuple[str, int, int]]:
    """The (device, start, end) stages the baseline `name` picks."""
    L = len(profile.segments)
    if name == "single":
        need = profile.memory_bytes(0, L)
        fitting = [d for d in cluster.devices if d.memory >= need]
        if not fitting:
            largest = max(cluster.devices, key=lambda d: d.memory)
            raise PlanError(
                f"{profile.model} needs {need / 2**20:.1f} MiB for its weights and activations; the largest "
                f"device ({largest.name}) has {largest.memory / 2**20:.1f} MiB. Add a device or use a "
                "planner that splits the model (optimal)."
            )
        best = min(fitting, key=lambda d: stage_time_s(profile, d, 0, L, segment_times_s))
        return [(best.name, 0, L)]
    if name == "seifer":
        return seifer_stages(profile, cluster, max_stages=max_stages, segment_times_s=segment_times_s)
    devices = list(cluster.devices)[: min(len(cluster.devices), max_stages or L, L)]
    if name == "even":
        weights = [1.0] * len(devices)
    elif name == "memory":
        weights = [d.memory for d in devices]
    elif name == "flops":
        weights = [1.0 / stage_time_s(profile, d, 0, L, segment_times_s) for d in devices]
    else:
        raise PlanError(f"unknown planner {name!r}; expected optimal, {', '.join(BASELINES)}")
    total = sum(weights)
    stages, cumulative, start = [], 0.0, 0
    for device, weight in zip(devices, weights, strict=True):
        cumulative += weight
        end = round(cumulative / total * L) if device is not devices[-1] else L
        if end > start:
            stages.append((device.name, start, end))
            start = end
    return stages


def plan_baseline(name: str, profile: Profile, cluster: ClusterSpec, *, objective: str,
                  max_stages: int | None, segment_times_s: Mapping[str, Sequence[float]] | None):
    stages = baseline_stages(name, profile, cluster, max_stages=max_stages, segment_times_s=segment_times_s)
    return predict(profile, cluster, stages, objective=objective, planner=name, segment_times_s=segment_times_s)
