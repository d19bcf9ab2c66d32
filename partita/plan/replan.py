"""When to re-plan a running pipeline, and onto what: after a failure, a join, or drift.

The coordinator feeds a `ReplanPolicy` with what it sees and asks it, now and then, what to do:

```python
policy = ReplanPolicy(graph, cluster.spec, pipe.plan, segment_times_s=measured)
policy.observe_stage("pi-b", compute_s=0.41, time_s=t)            # a device's measured stage time
policy.observe_link("pi-a", "pi-b", bandwidth_bytes_per_s=2e6, time_s=t)
policy.on_failure(["pi-c"], time_s=t)                             # missed heartbeats / broken send
policy.on_join(DeviceSpec(...), time_s=t)                         # Pipeline.add_device / reappeared
decision = policy.decide(now_s=t)                                 # None, or a Decision to carry out
...redeploy decision.plan (decision.diff says what to ship), then:
record = policy.completed(decision, switch_s=1.3)                 # -> Pipeline.stats()["replans"]
```

`decide` is a chain of small decisions, the first that returns something wins:

1. failure: a device the plan uses has failed -> re-plan on the devices left (always; no gain or
   cool-down rule). If they cannot hold the model, the planner's `PlanError` propagates (its
   message says what is needed) and `policy.plan` becomes None until a join makes a plan fit.
2. join: devices joined -> re-plan if the candidate beats the current plan by `min_gain` (always
   when no plan is running; if the devices still cannot hold the model, `PlanError` again).
3. drift: some measured figure has *sustained* drift (see `partita.plan.drift`) and the last switch
   is at least `cooldown_s` old -> plan on the updated figures, and switch only if the candidate's
   predicted period beats the current plan's period *re-predicted on the same updated figures* by
   at least `min_gain` (0.1: 10% shorter) *and* the switch pays for itself: the work it saves over
   `switch_cost.horizon_s` exceeds its predicted cost (shipping the archives the devices do not
   hold, loading, routing, replaying; `partita.plan.switchcost`). Either way the drifted figures
   become the believed ones, so the same drift is not acted on twice: a sustained change leads to
   one check, and an oscillation inside the hysteresis band leads to none.

Every switch's record carries its predicted cost (`predicted_switch_s`, `predicted_ship_bytes`),
the predicted gain over the horizon and, for drift, the figures blamed. The runtime tells the
policy which segment ranges each device's archive cache holds (`note_cached`), so a stage moving
back to a device that held it is predicted to ship nothing.

Everything is pure and deterministic: time comes in as arguments (any monotonic clock, seconds),
no I/O, no threads. `decide` assumes the runtime carries out what it returns; if it cannot
(a device died during the switch), report that with `on_failure` and call `decide` again.

For the "latency" objective the gain rule compares predicted latency instead of period.
Observations about devices that have failed are ignored (late stats from a dead worker). A device
the plan leaves idle is not measured by running requests; to let it count as recovered, report a
probe with `observe_stage(name, seconds, time_s=t, segments=(0, L))`. `decide` is cheap unless a
rule fires (then it calls the planner once); the policy is not thread-safe: call it from one thread.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from partita.cluster import ClusterSpec, DeviceSpec, LinkSpec
from partita.errors import ClusterSpecError, PlanError
from partita.plan import plan as make_plan
from partita.plan import predict
from partita.plan.cost import check_segment_times
from partita.plan.diff import diff_plans
from partita.plan.drift import (
    DriftRule,
    Signal,
    base_segment_times,
    compute_factor,
    scaled_segment_times,
    updated_cluster,
)
from partita.plan.profile import load_profile
from partita.plan.records import CAUSES, Decision, Replan
from partita.plan.switchcost import SwitchCost, SwitchEstimate, estimate_switch, gain_s
from partita.plan.types import Plan

__all__ = ["CAUSES", "Decision", "FailureScenarios", "Replan", "ReplanPolicy"]

MAX_DECLINED = 20  # re-plans considered and not made, kept for `ReplanPolicy.declined()`


@dataclass(frozen=True)
class FailureScenarios:
    """The running plan and the figures believed when it was taken: enough to plan every single failure.

    Immutable, so `plans()` (which calls the planner once per device and may take a while) can run
    in another thread than the policy's.
    """

    profile: Any
    current: Plan
    cluster: ClusterSpec
    segment_times_s: Mapping[str, tuple[float, ...]]
    options: Mapping[str, Any]

    def plans(self) -> dict[str, Plan]:
        """Per device of `current`: the plan on the devices left (left out when none fits)."""
        out = {}
        for device in self.current.devices:
            if len(self.cluster.devices) < 2:
                continue
            times = {k: v for k, v in self.segment_times_s.items() if k != device}
            try:
                out[device] = make_plan(self.profile, self.cluster.without(device), segment_times_s=times or None,
                                        **self.options)
            except PlanError:
                continue  # nothing to stand by for: that failure halts until a device joins
        return out


class ReplanPolicy:
    """The coordinator's re-planning logic (see the module docstring for the rules).

    profile: the model (a profile dict, a path, or a graph); cluster: the deployed cluster; current:
    the deployed plan. segment_times_s: the measured per-device segment times the plan was made with
    (None: flops / flops_per_s). objective / planner / max_stages / replicate: what re-plans use
    (objective None: the current plan's). rule: when a figure has drifted. min_gain: the smallest
    relative improvement worth a switch (0.1 = the new period is at most 90% of the old).
    cooldown_s: no drift switch sooner than this after any switch. switch_cost: how a switch's cost
    is predicted and over which horizon its gain must pay for it (`partita.plan.switchcost`).
    """

    def __init__(self, profile: Any, cluster: ClusterSpec, current: Plan, *,
                 segment_times_s: Mapping[str, Sequence[float]] | None = None,
                 objective: str | None = None, planner: str = "optimal", max_stages: int | None = None,
                 replicate: bool = True, rule: DriftRule = DriftRule(), min_gain: float = 0.1,
                 cooldown_s: float = 10.0, switch_cost: SwitchCost = SwitchCost()) -> None:
        if not (0.0 <= min_gain < 1.0):
            raise PlanError(f"min_gain must be in [0, 1), got {min_gain!r}")
        if not (math.isfinite(cooldown_s) and cooldown_s >= 0):
            raise PlanError(f"cooldown_s must be a finite number >= 0, got {cooldown_s!r}")
        self._profile = load_profile(profile)
        segment_times_s = check_segment_times(self._profile, cluster, segment_times_s)
        missing = sorted(set(current.devices) - set(cluster.names))
        if missing:
            raise PlanError(f"the current plan uses {', '.join(missing)}, which the cluster does not have")
        # tiles=False: the runtime deploys chain stages only (tiled stages are planned and simulated; docs/tiles.md)
        self._options: dict[str, Any] = {"objective": objective or current.objective, "planner": planner,
                         "max_stages": max_stages, "replicate": replicate, "tiles": False,
                         "hop_overhead_s": current.hop_overhead_s}
        self.rule = rule
        self.min_gain = float(min_gain)
        self.cooldown_s = float(cooldown_s)
        self.switch_cost = switch_cost
        self._cached: dict[str, frozenset[tuple[int, int]]] = {}
        self._source, self._default_link = cluster.source, cluster.default_link
        self._known = {d.name: d for d in cluster.devices}  # every device ever seen, in first-seen order
        self._links = dict(cluster.pair_links)  # as given (and for joined devices), never measured values
        self._present = set(self._known)
        self._cluster: ClusterSpec | None = cluster
        self._base = base_segment_times(self._profile, cluster, segment_times_s)
        self._measured = set(segment_times_s or ())  # devices planned with measured times
        self._plan: Plan | None = current
        self._signals: dict[tuple[str, Any], Signal] = {}
        self._measured_way: dict[frozenset[str], tuple[str, str]] = {}  # pair -> the direction its bandwidth was measured
        self._lost_pending: list[str] = []
        self._joined_pending: list[str] = []
        self._last_switch_s: float | None = None
        self._history: list[Replan] = []
        self._declined: deque[dict[str, Any]] = deque(maxlen=MAX_DECLINED)

    # -- what the policy holds -------------------------------------------------------------------
    @property
    def plan(self) -> Plan | None:
        """The deployed plan, re-predicted on the believed figures; None when none fits the devices left."""
        return self._plan

    @property
    def cluster(self) -> ClusterSpec | None:
        """The devices present (failed ones removed, joined ones added), links as given; None if none is left."""
        return self._cluster

    @property
    def history(self) -> tuple[Replan, ...]:
        """Every re-plan decided so far, oldest first (switch_s filled in once completed)."""
        return tuple(self._history)

    def replans(self) -> list[dict[str, Any]]:
        """`history` as dicts, for Pipeline.stats()["replans"] and `partita run --json`."""
        return [r.to_dict() for r in self._history]

    def declined(self) -> list[dict[str, Any]]:
        """The latest re-plans considered and not made (at most MAX_DECLINED), oldest first, and why.

        Each: cause ("drift" or "join"), time_s, reason (what drifted or joined, and the arithmetic
        that said no), old_period_s / new_period_s (the running plan re-predicted, the best
        candidate), predicted_switch_s and gain_s. A drift that finds no switch worth making is
        silent otherwise: the plan stays, re-predicted on the new figures.
        """
        return list(self._declined)

    def estimates(self) -> dict[str, Any]:
        """The current estimates, believed figures and drift state of every tracked figure."""
        out: dict[str, Any] = {"compute_factor": {}, "bandwidth_bytes_per_s": {}, "latency_s": {}}
        for (kind, key), signal in sorted(self._signals.items(), key=lambda item: (item[0][0], _label(item[0][1]))):
            out[kind][_label(key)] = {"estimate": signal.estimate, "believed": signal.believed,
                                      "samples": signal.estimator.samples, "change": signal.change,
                                      "drifting": signal.drifting}
        return out

    # -- what the runtime reports ----------------------------------------------------------------
    def observe_stage(self, device: str, compute_s: float, *, time_s: float,
                      segments: tuple[int, int] | None = None) -> None:
        """`device` took `compute_s` seconds (device time, one request) for its stage, measured at `time_s`.

        segments: the [start, end) range it computed; None means its range in the current plan.
        A stage the base figures predict as 0 s gives no factor and is not counted.
        """
        if self._skip(device):
            return
        if segments is None:
            segments = self._segments_of(device)
        start, end = int(segments[0]), int(segments[1])
        if not (0 <= start < end <= len(self._profile.segments)):
            raise PlanError(f"segments [{start}, {end}) are not a range of the model's {len(self._profile.segments)}")
        factor = compute_factor(compute_s, self._base[device], start, end)
        if factor is not None:
            self._signal(("compute_factor", device), 1.0, 0.0).observe(factor, time_s)

    def observe_link(self, a: str, b: str, *, time_s: float, bandwidth_bytes_per_s: float | None = None,
                     latency_s: float | None = None) -> None:
        """The link from a to b was measured at `time_s`: its bandwidth and/or its one-way latency.

        A bandwidth is the direction a -> b's (its baseline is the believed a -> b figure; a chain's
        traffic crosses a pair one way). When it drifts, it replaces that direction of a link slower
        one way, and both directions of a link that is the same both ways.
        """
        if self._skip(a) or self._skip(b):
            return
        if a == b:
            raise ClusterSpecError(f"a link joins two different nodes; got {a!r} twice")
        pair = frozenset((a, b))
        link = self._believed().link(a, b)
        if bandwidth_bytes_per_s is not None:
            if not (bandwidth_bytes_per_s > 0):
                raise PlanError(f"measured bandwidth of {a}-{b} must be > 0 bytes/s, got {bandwidth_bytes_per_s!r}")
            signal = self._signal(("bandwidth_bytes_per_s", pair), link.bandwidth_bytes_per_s, 0.0)
            signal.observe(bandwidth_bytes_per_s, time_s)
            self._measured_way[pair] = (a, b)
        if latency_s is not None:
            signal = self._signal(("latency_s", pair), link.latency_s, self.rule.latency_floor_s)
            signal.observe(latency_s, time_s)

    def observe_transfer(self, a: str, b: str, *, nbytes: float, transfer_s: float, time_s: float) -> None:
        """A message of `nbytes` took `transfer_s` from a to b (latency + bytes / bandwidth).

        Read as bandwidth, with the latency the policy believes: nbytes / (transfer_s - latency).
        Pass only the time the link carried the message (not waits for credits or a busy receiver).
        """
        if self._skip(a) or self._skip(b) or nbytes <= 0:
            return
        latency = self._latency_believed(a, b)
        bandwidth = nbytes / max(float(transfer_s) - latency, 1e-9)
        self.observe_link(a, b, time_s=time_s, bandwidth_bytes_per_s=bandwidth)

    def on_failure(self, devices: Iterable[str], *, time_s: float) -> None:
        """These devices stopped answering; `decide` re-plans without them. Repeats are ignored.

        ClusterSpecError for a name the policy has never known.
        """
        del time_s  # the decision is timed by decide(now_s); kept for a uniform event signature
        for name in devices:
            if name not in self._known:
                raise ClusterSpecError(f"no device named {name!r} was ever part of this deployment")
            if name not in self._present:
                continue
            self._present.discard(name)
            self._forget(name)
            self._lost_pending.append(name)
            if name in self._joined_pending:
                self._joined_pending.remove(name)
        self._cluster = self._build_cluster()

    def on_join(self, device: str | DeviceSpec, *, time_s: float, links: Mapping[str, LinkSpec] | None = None,
                segment_times_s: Sequence[float] | None = None) -> None:
        """A device joined: a DeviceSpec (new, or a known one with new figures) or the name of one that failed.

        links: its links to other nodes (peer name -> LinkSpec); for a known device, its original
        links are restored first. segment_times_s: its measured seconds per segment (None: its
        earlier base times if known, else flops / flops_per_s).
        """
        del time_s  # see on_failure
        spec = self._known.get(device) if isinstance(device, str) else device
        if not isinstance(spec, DeviceSpec):
            raise ClusterSpecError(f"no device named {device!r} is known; pass a DeviceSpec for a new device")
        if spec.name in self._present:
            raise ClusterSpecError(f"device {spec.name!r} is already part of the deployment")
        if spec.name == self._source:
            raise ClusterSpecError(f"{spec.name!r} is the source node; a joining device needs another name")
        times = None
        if segment_times_s is not None:
            times = tuple(float(t) for t in segment_times_s)
            if len(times) != len(self._profile.segments) or not all(math.isfinite(t) and t >= 0 for t in times):
                raise PlanError(f"segment_times_s for {spec.name} must hold {len(self._profile.segments)} finite "
                                f"times >= 0 (one per segment), got {len(times)}")
        nodes = set(self._known) | {self._source, spec.name}
        for peer in links or {}:
            if peer not in nodes or peer == spec.name:
                raise ClusterSpecError(f"link {spec.name}-{peer}: {peer!r} is not another node of the deployment")
        if times is not None:
            self._base[spec.name] = times
            self._measured.add(spec.name)
        elif spec.name not in self._base or self._known.get(spec.name) != spec:
            self._base[spec.name] = tuple(s.flops / spec.flops for s in self._profile.segments)
            self._measured.discard(spec.name)
        self._known[spec.name] = spec
        self._links.update({frozenset((spec.name, peer)): link for peer, link in (links or {}).items()})
        self._present.add(spec.name)
        if spec.name in self._lost_pending:
            self._lost_pending.remove(spec.name)
        self._joined_pending.append(spec.name)
        self._cluster = self._build_cluster()

    def failure_plans(self) -> dict[str, Plan]:
        """Per device of the running plan: the plan a failure of that device alone would switch to, on today's figures.

        What `decide` returns after `on_failure([device])` if nothing else changes first, so a
        runtime can ship those plans' stages ahead (standby). Devices whose loss leaves no plan
        that fits are left out; {} while no plan runs. `failure_scenarios()` is the same, planned later.
        """
        scenarios = self.failure_scenarios()
        return {} if scenarios is None else scenarios.plans()

    def failure_scenarios(self) -> FailureScenarios | None:
        """A snapshot to compute `failure_plans()` from later, in any thread (None while no plan runs)."""
        if self._plan is None:
            return None
        cluster, times = self._figures()
        return FailureScenarios(self._profile, self._plan, cluster, MappingProxyType(dict(times)),
                                MappingProxyType(dict(self._options)))

    def note_cached(self, cached: Mapping[str, Iterable[tuple[int, int]]]) -> None:
        """The segment ranges [start, end) whose archives each device's cache holds (replaces what was noted)."""
        self._cached = {device: frozenset((int(a), int(b)) for a, b in ranges) for device, ranges in cached.items()}

    # -- decisions -------------------------------------------------------------------------------
    def decide(self, now_s: float) -> Decision | None:
        """The next re-plan to carry out, or None (see the module docstring for the chain)."""
        return self._after_failure(now_s) or self._after_join(now_s) or self._after_drift(now_s)

    def completed(self, decision: Decision, switch_s: float, shipped_bytes: int | None = None) -> Replan:
        """The runtime carried out `decision` in `switch_s` seconds, sending `shipped_bytes`; the completed record."""
        for index, record in enumerate(self._history):
            if record is decision.replan:
                self._history[index] = record.completed(switch_s, shipped_bytes)
                return self._history[index]
        raise PlanError("completed() got a decision this policy did not make")

    def _after_failure(self, now_s: float) -> Decision | None:
        if not self._lost_pending:
            return None
        lost, self._lost_pending = tuple(self._lost_pending), []
        if self._plan is not None and not set(lost) & set(self._plan.devices):
            return None  # a spare device failed: the running plan is untouched
        old_period = self._plan.period_s if self._plan is not None else None
        if self._cluster is None:
            self._plan = None
            raise PlanError(f"{', '.join(lost)} failed and no device is left to run {self._profile.model}. "
                            "Add a device (Pipeline.add_device) or restart a worker.")
        cluster, times = self._figures()
        try:
            candidate = self._plan_on(cluster, times)
        except PlanError as exc:
            self._plan = None
            raise PlanError(f"{', '.join(lost)} failed and the devices left cannot run the model: {exc}") from exc
        estimate = self._estimate(candidate, cluster, gone=lost)
        return self._switch("failure", now_s, candidate, None, cluster, times, estimate, lost=lost,
                            reason=f"lost {', '.join(lost)}", old_period_s=old_period)

    def _after_join(self, now_s: float) -> Decision | None:
        if not self._joined_pending:
            return None
        added, self._joined_pending = tuple(self._joined_pending), []
        cluster, times = self._figures()
        current = self._repredicted(cluster, times)
        try:
            candidate = self._plan_on(cluster, times)
        except PlanError as exc:
            # Only possible while no plan runs (a running plan is itself a fit); say what is still missing.
            raise PlanError(f"{', '.join(added)} joined but the devices still cannot run the model: {exc}") from exc
        estimate = self._estimate(candidate, cluster)
        if current is not None and (why := self._why_not(candidate, current, estimate)) is not None:
            self._decline("join", now_s, f"{', '.join(added)} joined; kept the plan: {why}", candidate, current,
                          estimate)
            return None
        return self._switch("join", now_s, candidate, current, cluster, times, estimate,
                            added=added, reason=f"{', '.join(added)} joined")

    def _after_drift(self, now_s: float) -> Decision | None:
        if self._plan is None:
            return None
        if self._last_switch_s is not None and now_s - self._last_switch_s < self.cooldown_s:
            return None
        sustained = [key for key, signal in self._signals.items() if signal.sustained(now_s)]
        if not sustained:
            return None
        ordered = sorted(sustained, key=_sort_key)
        reason = "; ".join(_describe(key, self._signals[key]) for key in ordered)
        blamed = tuple(_blamed(key) for key in ordered)
        cluster, times = self._figures()
        current = self._repredicted(cluster, times)
        candidate = self._plan_on(cluster, times)
        estimate = self._estimate(candidate, cluster)
        if current is not None and (why := self._why_not(candidate, current, estimate)) is not None:
            self._decline("drift", now_s, f"{reason}; kept the plan: {why}", candidate, current, estimate)
            return None
        return self._switch("drift", now_s, candidate, current, cluster, times, estimate, reason=reason,
                            blamed=blamed)

    # -- helpers -------------------------------------------------------------------------------
    def _switch(self, cause: str, now_s: float, candidate: Plan, current: Plan | None, cluster: ClusterSpec,
                times: dict[str, tuple[float, ...]], estimate: SwitchEstimate, *, lost: tuple[str, ...] = (),
                added: tuple[str, ...] = (), reason: str, blamed: tuple[str, ...] = (),
                old_period_s: float | None = None) -> Decision:
        diff = diff_plans(self._plan, candidate, gone=lost)
        if current is not None:
            old_period_s = current.period_s
        gain = None if current is None or cause == "failure" else gain_s(current, candidate, self.switch_cost.horizon_s)
        cost = f"switch {estimate.total_s:.2f} s predicted ({estimate.ship_bytes / 1e6:.1f} MB to ship)"
        if gain is not None:
            cost += f", {gain:.2f} s gained over {self.switch_cost.horizon_s:g} s"
        record = Replan(cause, float(now_s), old_period_s, candidate.period_s, None, lost, added,
                        f"{reason}; period {_ms(old_period_s)} -> {_ms(candidate.period_s)}; {cost}",
                        predicted_switch_s=estimate.total_s, predicted_ship_bytes=estimate.ship_bytes, gain_s=gain,
                        horizon_s=self.switch_cost.horizon_s, blamed=blamed)
        self._adopt(candidate)
        self._joined_pending.clear()  # every present device was considered by this plan
        self._last_switch_s = float(now_s)
        self._history.append(record)
        return Decision(cause, candidate, diff, record, cluster, MappingProxyType(dict(times)))

    def _estimate(self, candidate: Plan, cluster: ClusterSpec, *, gone: tuple[str, ...] = ()) -> SwitchEstimate:
        diff = diff_plans(self._plan, candidate, gone=gone)
        return estimate_switch(self._profile, cluster, candidate, diff, self.switch_cost, cached=self._cached)

    def _adopt(self, plan: Plan) -> None:
        """The policy now believes what `plan` was predicted with: drifted figures become believed ones."""
        self._plan = plan
        for signal in self._signals.values():
            signal.accept()

    def _decline(self, cause: str, now_s: float, reason: str, candidate: Plan, current: Plan,
                 estimate: SwitchEstimate) -> None:
        """Keep `current` (re-predicted on the new figures), and note why the candidate was not taken."""
        self._declined.append({"cause": cause, "time_s": float(now_s), "reason": reason,
                               "old_period_s": current.period_s, "new_period_s": candidate.period_s,
                               "predicted_switch_s": estimate.total_s,
                               "gain_s": gain_s(current, candidate, self.switch_cost.horizon_s)})
        self._adopt(current)

    def _why_not(self, candidate: Plan, current: Plan, estimate: SwitchEstimate) -> str | None:
        """Why the switch is not worth making, or None if it is.

        A switch is worth making when the candidate is at least `min_gain` better, and the work it
        saves over the horizon pays for the switch.
        """
        key = "latency_s" if self._options["objective"] == "latency" else "period_s"
        before, after = getattr(current, key), getattr(candidate, key)
        if after > (1.0 - self.min_gain) * before:
            return f"{key} {_ms(before)} -> {_ms(after)}, less than the {self.min_gain:.0%} gain a switch needs"
        gain = gain_s(current, candidate, self.switch_cost.horizon_s)
        if gain <= estimate.total_s:
            return (f"switch {estimate.total_s:.2f} s predicted, more than the {gain:.2f} s it gains over "
                    f"{self.switch_cost.horizon_s:g} s")
        return None

    def _figures(self) -> tuple[ClusterSpec, dict[str, tuple[float, ...]]]:
        """The cluster and segment times to plan with: believed figures, drifting ones replaced by estimates."""
        factors: dict[Any, float] = {}
        bandwidths: dict[Any, float] = {}
        latencies: dict[Any, float] = {}
        for (kind, key), signal in self._signals.items():
            {"compute_factor": factors, "bandwidth_bytes_per_s": bandwidths, "latency_s": latencies}[kind][key] = (
                signal.planning_value())
        links = {}
        believed = self._believed()
        for pair in set(bandwidths) | set(latencies):
            a, b = sorted(pair)
            link = believed.pair_links.get(pair) or believed.link(a, b)
            latency = latencies.get(pair, link.latency_s)
            if pair not in bandwidths:  # only the latency drifted: each direction keeps its bandwidth
                links[pair] = dataclasses.replace(link, latency_s=latency)
            elif link.directions is None:  # the same both ways: the drifted figure holds both ways
                links[pair] = LinkSpec(bandwidths[pair], latency)
            else:  # slower one way: the direction it was measured on drifted, the other keeps its figure
                measured = self._measured_way.get(pair, (a, b)) == (a, b)
                directions = (bandwidths[pair], link.directions[1]) if measured else (link.directions[0], bandwidths[pair])
                links[pair] = LinkSpec(min(directions), latency, directions=directions)
        present = self._believed().names
        named = [d for d in present if d in self._measured or factors.get(d, 1.0) != 1.0]
        times = scaled_segment_times({d: self._base[d] for d in named}, factors)
        return updated_cluster(self._believed(), links), times

    def _plan_on(self, cluster: ClusterSpec, times: Mapping[str, Sequence[float]]) -> Plan:
        return make_plan(self._profile, cluster, segment_times_s=times or None, **self._options)

    def _repredicted(self, cluster: ClusterSpec, times: Mapping[str, Sequence[float]]) -> Plan | None:
        """The current plan predicted on these figures; None when there is no plan or it uses a missing device."""
        if self._plan is None or not set(self._plan.devices) <= set(cluster.names):
            return None
        return predict(self._profile, cluster, self._plan.stages, objective=self._plan.objective,
                       planner=self._plan.planner, segment_times_s=times or None,
                       hop_overhead_s=self._plan.hop_overhead_s)

    def _believed(self) -> ClusterSpec:
        """The cluster as now believed; PlanError when no device is left to plan on."""
        if self._cluster is None:
            raise PlanError("no device is left to plan on; add a device (Pipeline.add_device)")
        return self._cluster

    def _build_cluster(self) -> ClusterSpec | None:
        devices = tuple(spec for name, spec in self._known.items() if name in self._present)
        if not devices:
            return None
        nodes = set(self._present) | {self._source}
        links = {pair: link for pair, link in self._links.items() if pair <= nodes}
        return ClusterSpec(devices, self._source, self._default_link, links)

    def _signal(self, key: tuple[str, Any], believed: float, floor: float) -> Signal:
        if key not in self._signals:
            self._signals[key] = Signal(believed, self.rule, floor=floor)
        return self._signals[key]

    def _latency_believed(self, a: str, b: str) -> float:
        signal = self._signals.get(("latency_s", frozenset((a, b))))
        return signal.planning_value() if signal is not None else self._believed().link(a, b).latency_s

    def _skip(self, node: str) -> bool:
        """True for a device that failed (late figures are dropped); ClusterSpecError for an unknown node."""
        if node in self._present or node == self._source:
            return False
        if node in self._known:
            return True
        raise ClusterSpecError(f"no node named {node!r}; the deployment has {', '.join([*self._known, self._source])}")

    def _segments_of(self, device: str) -> tuple[int, int]:
        if self._plan is not None:
            for stage in self._plan.stages:
                if device in stage.devices:
                    return stage.start, stage.end
        raise PlanError(f"{device} runs no stage of the current plan; pass segments=(start, end) with its figure")

    def _forget(self, name: str) -> None:
        """Drop a departed device's figures: when it returns, it starts as profiled."""
        for key in [k for k in self._signals if k[1] == name or (isinstance(k[1], frozenset) and name in k[1])]:
            del self._signals[key]
        for pair in [p for p in self._measured_way if name in p]:
            del self._measured_way[pair]


def _label(key: Any) -> str:
    return "-".join(sorted(key)) if isinstance(key, frozenset) else str(key)


def _sort_key(key: tuple[str, Any]) -> tuple[str, str]:
    return key[0], _label(key[1])


def _blamed(key: tuple[str, Any]) -> str:
    """A drifted figure as the record names it: "pi-b compute", "a-client bandwidth", "a-b latency"."""
    kind, what = key
    return f"{_label(what)} {_FIGURE_NAMES[kind].split()[0]}"


_FIGURE_NAMES = {"compute_factor": "compute time", "bandwidth_bytes_per_s": "bandwidth", "latency_s": "latency"}


def _describe(key: tuple[str, Any], signal: Signal) -> str:
    kind, what = key
    names = _FIGURE_NAMES
    ratio = signal.planning_value() / signal.believed if signal.believed not in (0.0, math.inf) else math.inf
    return f"{_label(what)} {names[kind]} {ratio:.2f}x the plan's"


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "none"
    return "inf" if math.isinf(seconds) else f"{seconds * 1e3:.3f} ms"
