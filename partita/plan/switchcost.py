"""What a switch from one plan to another is predicted to cost, and whether the gain pays for it.

A switch ships the archive of every stage a device does not hold yet, loads it, routes every
worker for the new epoch, and replays the requests in flight. Its predicted cost, in seconds:

    ship_s(d)  = Σ over the stages d loads of: link(source, d).latency_s + bytes / link(source, d).bandwidth
    load_s(d)  = Σ over the stages d loads of: load_s + bytes / load_bytes_per_s
    switch_s   = max_d (ship_s(d) + load_s(d)) + route_s + replay_s

Devices are shipped to in parallel (hence the max), one stage after another on each device. The
bytes of a stage are the weights of its segments (a stage archive is its weights plus a little
metadata); a stage whose archive the device's cache already holds (`cached`) ships 0 bytes and
only loads. `replay_s` is the new plan's latency: the requests in flight are sent again, and the
first of them comes out one pipeline latency later.

The gain over a horizon: running the new plan for `horizon_s` seconds instead of the old one saves
`horizon_s * (1 - new / old)` seconds of work (period for the throughput objective, latency for the
latency objective). A switch pays for itself when that exceeds its predicted cost.

Pure: no clock, no I/O. Everything is in seconds and bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from partita.cluster import ClusterSpec
from partita.errors import PlanError
from partita.plan.diff import PlanDiff
from partita.plan.profile import Profile
from partita.plan.types import Plan

__all__ = ["SwitchCost", "SwitchEstimate", "estimate_switch", "gain_s"]


@dataclass(frozen=True)
class SwitchCost:
    """The figures a switch's cost is predicted with (see the module docstring).

    horizon_s: a drift or join switch must pay for itself within this many seconds of running the
        new plan. load_s: seconds a worker takes to load one stage besides reading its bytes
        (deserialising, warming up); the runtime replaces the default with what it measured at
        deploy. load_bytes_per_s: how fast a worker reads archive bytes. route_s: routing every
        worker for the new epoch.
    """

    horizon_s: float = 30.0
    load_s: float = 0.2
    load_bytes_per_s: float = 500e6
    route_s: float = 0.05

    def __post_init__(self) -> None:
        for name in ("horizon_s", "load_s", "route_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise PlanError(f"switch cost {name} must be a finite number >= 0, got {value!r}")
        if not (self.load_bytes_per_s > 0):
            raise PlanError(f"switch cost load_bytes_per_s must be > 0, got {self.load_bytes_per_s!r}")


@dataclass(frozen=True)
class SwitchEstimate:
    """A switch's predicted cost: `ship_bytes` to send, and seconds per part (`total_s` is the sum the rule uses)."""

    ship_bytes: int
    ship_s: float  # the slowest device's shipping and loading
    route_s: float
    replay_s: float

    @property
    def total_s(self) -> float:
        return self.ship_s + self.route_s + self.replay_s


def estimate_switch(profile: Profile, cluster: ClusterSpec, new: Plan, diff: PlanDiff, cost: SwitchCost, *,
                    cached: Mapping[str, frozenset[tuple[int, int]]] | None = None) -> SwitchEstimate:
    """The predicted cost of switching to `new`, given what each device must load (`diff`) and holds (`cached`)."""
    cached = cached or {}
    per_device: dict[str, float] = {}
    total_bytes = 0
    for change in diff.changes:
        if change.action != "load" or change.new_segments is None:
            continue
        start, end = change.new_segments
        held = change.new_segments in cached.get(change.device, frozenset())
        nbytes = 0 if held else sum(s.param_bytes for s in profile.segments[start:end])
        seconds = cost.load_s + nbytes / cost.load_bytes_per_s
        if nbytes:
            link = cluster.link(cluster.source, change.device)
            bandwidth = link.bandwidth_bytes_per_s
            seconds += link.latency_s + (0.0 if math.isinf(bandwidth) else nbytes / bandwidth)
        per_device[change.device] = per_device.get(change.device, 0.0) + seconds
        total_bytes += nbytes
    return SwitchEstimate(total_bytes, max(per_device.values(), default=0.0), cost.route_s, new.latency_s)


def gain_s(old: Plan, new: Plan, horizon_s: float) -> float:
    """Seconds of work saved by running `new` instead of `old` for `horizon_s` (negative: a loss)."""
    key = "latency_s" if old.objective == "latency" else "period_s"
    before, after = getattr(old, key), getattr(new, key)
    if math.isinf(before):
        return math.inf
    if before <= 0:
        return 0.0
    return horizon_s * (1.0 - after / before)
