"""Re-planning decisions: drift with hysteresis and cool-down, failures, joins, plan diffs (pure, no torch)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from partita.cluster import ClusterSpec, DeviceSpec, LinkSpec
from partita.errors import ClusterSpecError, PlanError
from partita.plan import Plan, StagePlan, plan, predict
from partita.plan.diff import diff_plans
from partita.plan.drift import DriftRule
from partita.plan.replan import ReplanPolicy
from partita.plan.switchcost import SwitchCost

PROFILE = {
    "model": "toy",
    "input_bytes": 1_000_000,
    "segments": [
        {"name": "a", "flops": 4_000_000_000, "param_bytes": 10_000_000, "act_bytes": 4_000_000, "out_bytes": 2_000_000},
        {"name": "b", "flops": 2_000_000_000, "param_bytes": 30_000_000, "act_bytes": 2_000_000, "out_bytes": 500_000},
        {"name": "c", "flops": 6_000_000_000, "param_bytes": 20_000_000, "act_bytes": 6_000_000, "out_bytes": 1_500_000},
        {"name": "d", "flops": 1_000_000_000, "param_bytes": 40_000_000, "act_bytes": 1_000_000, "out_bytes": 40_000},
    ],
}
FLOPS = [s["flops"] for s in PROFILE["segments"]]
SPEEDS = {"a": 1e10, "b": 2e10, "c": 2e10, "d": 1e10}


def make_cluster(memory_bytes: float = 80e6, speeds: dict[str, float] = SPEEDS, pairs=()) -> ClusterSpec:
    return ClusterSpec.from_dict({
        "source": "client",
        "devices": [{"name": n, "flops_per_s": f, "memory_bytes": memory_bytes} for n, f in speeds.items()],
        "links": {"default": {"bandwidth_bytes_per_s": 1e8, "latency_s": 0.001}, "pairs": list(pairs)},
    })


def slowed_times(cluster: ClusterSpec, factors: dict[str, float]) -> dict[str, list[float]]:
    """Per-segment seconds of the slowed devices, straight from the profile (independent of drift.py)."""
    return {d: [f / cluster.device(d).flops_per_s * k for f in FLOPS] for d, k in factors.items()}


def run(policy: ReplanPolicy, cluster: ClusterSpec, factor, *, seconds: float, step_s: float = 0.1, start_s=0.0,
        probe_idle: bool = False):
    """Feed the stage times the devices of the running plan would show; collect every decision.

    probe_idle: also time the whole model on devices the plan leaves idle (as a runtime probe would).
    """
    decisions = []
    for k in range(round(seconds / step_s)):
        t = start_s + k * step_s
        for stage in policy.plan.stages:
            for device in stage.devices:
                base = sum(FLOPS[stage.start:stage.end]) / cluster.device(device).flops_per_s
                policy.observe_stage(device, base * factor(device, t, k), time_s=t)
        if probe_idle:
            for device in set(cluster.names) - set(policy.plan.devices):
                base = sum(FLOPS) / cluster.device(device).flops_per_s
                policy.observe_stage(device, base * factor(device, t, k), time_s=t, segments=(0, len(FLOPS)))
        decision = policy.decide(t)
        if decision is not None:
            decisions.append(decision)
    return decisions


@pytest.fixture
def cluster() -> ClusterSpec:
    return make_cluster()


@pytest.fixture
def policy(cluster) -> ReplanPolicy:
    return ReplanPolicy(PROFILE, cluster, plan(PROFILE, cluster))


def first_device(policy: ReplanPolicy) -> str:
    return policy.plan.stages[0].devices[0]


# --- drift ----------------------------------------------------------------------------------------


def test_steady_figures_never_trigger_a_replan(policy, cluster):
    assert run(policy, cluster, lambda d, t, k: 1.0, seconds=30) == []
    assert policy.history == ()


def test_a_sustained_5x_slowdown_triggers_exactly_one_switch_to_the_plan_for_the_slow_device(policy, cluster):
    slow = first_device(policy)
    old = policy.plan
    decisions = run(policy, cluster, lambda d, t, k: 5.0 if d == slow and t >= 10 else 1.0, seconds=60)
    assert len(decisions) == 1
    decision = decisions[0]
    times = slowed_times(cluster, {slow: 5.0})
    expected = plan(PROFILE, cluster, segment_times_s=times)
    old_on_new_figures = predict(PROFILE, cluster, old.stages, segment_times_s=times)
    assert decision.cause == "drift" and decision.plan.stages == expected.stages
    assert decision.replan.new_period_s == pytest.approx(expected.period_s)
    assert decision.replan.old_period_s == pytest.approx(old_on_new_figures.period_s, rel=1e-3)
    assert decision.replan.new_period_s <= 0.9 * decision.replan.old_period_s
    assert 10.0 + 1.0 <= decision.replan.time_s <= 12.0  # sustained for min_duration_s, not much later
    assert policy.plan == decision.plan


@settings(max_examples=12, deadline=None)
@given(which=st.integers(0, 3), factor=st.floats(2.0, 10.0), onset_s=st.floats(0.0, 20.0))
def test_any_sustained_slowdown_switches_at_most_once_and_only_for_the_gain(which, factor, onset_s):
    cluster = make_cluster()
    policy = ReplanPolicy(PROFILE, cluster, plan(PROFILE, cluster))
    slow = sorted(SPEEDS)[which]
    decisions = run(policy, cluster, lambda d, t, k: factor if d == slow and t >= onset_s else 1.0, seconds=45)
    assert len(decisions) <= 1
    for decision in decisions:
        assert decision.replan.new_period_s <= 0.9 * decision.replan.old_period_s


def oscillating(device: str, high: float, half_period: int):
    return lambda d, t, k: high if d == device and (k // half_period) % 2 else 1.0


def two_ways(rule: DriftRule = DriftRule(), cooldown_s: float = 0.0) -> tuple[ReplanPolicy, ClusterSpec]:
    """The whole model on fast (0.65 s) or on steady (0.87 s); fast at 1.6x (1.04 s) makes steady 17% better."""
    cluster = make_cluster(memory_bytes=1e9, speeds={"fast": 2e10, "steady": 1.5e10},
                           pairs=[{"a": "fast", "b": "steady", "bandwidth_bytes_per_s": 1e3, "latency_s": 0.1}])
    start = plan(PROFILE, cluster, replicate=False)
    assert start.devices == ("fast",)
    return ReplanPolicy(PROFILE, cluster, start, replicate=False, rule=rule, cooldown_s=cooldown_s), cluster


@settings(max_examples=15, deadline=None)
@given(high=st.floats(1.31, 1.8), half_period=st.integers(1, 4))
def test_a_fast_oscillation_around_the_threshold_does_not_flap(high, half_period):
    # Idle devices are probed too, so the device keeps being measured after a switch away from it.
    policy, cluster = two_ways()
    decisions = run(policy, cluster, oscillating("fast", high, half_period), seconds=60, probe_idle=True)
    assert len(decisions) <= 1


def test_the_same_oscillation_flaps_without_hysteresis_smoothing_or_cooldown():
    # The scenario above is a real risk: with every safeguard off, it switches back and forth.
    bare = DriftRule(clear_fraction=1.0, min_observations=1, min_duration_s=0.0, alpha=1.0, window=1)
    policy, cluster = two_ways(bare)
    decisions = run(policy, cluster, oscillating("fast", 1.6, 3), seconds=30, probe_idle=True)
    assert len(decisions) > 10


@settings(max_examples=10, deadline=None)
@given(high=st.floats(1.0, 1.25), half_period=st.integers(1, 50))
def test_an_oscillation_inside_the_threshold_never_triggers(high, half_period):
    policy, cluster = two_ways()
    decisions = run(policy, cluster, oscillating("fast", high, half_period), seconds=30, probe_idle=True)
    assert decisions == []


def test_a_slow_oscillation_switches_at_most_once_per_cooldown():
    policy, cluster = two_ways(cooldown_s=10.0)
    decisions = run(policy, cluster, oscillating("fast", 5.0, 30), seconds=60, probe_idle=True)
    assert len(decisions) >= 2  # a real change, lasting 3 s each way, is followed
    times = [d.replan.time_s for d in decisions]
    assert all(b - a >= policy.cooldown_s for a, b in zip(times, times[1:], strict=False))
    assert len(decisions) <= 60 / policy.cooldown_s + 1


def test_isolated_outliers_never_trigger_a_replan(policy, cluster):
    spikes = run(policy, cluster, lambda d, t, k: 10.0 if k % 3 == 0 else 1.0, seconds=30)
    assert spikes == []


@pytest.mark.parametrize(("min_gain", "switches"), [(0.1, 1), (0.9, 0)])
def test_a_switch_needs_the_predicted_gain(cluster, min_gain, switches):
    policy = ReplanPolicy(PROFILE, cluster, plan(PROFILE, cluster), min_gain=min_gain)
    slow = first_device(policy)
    decisions = run(policy, cluster, lambda d, t, k: 5.0 if d == slow and t >= 5 else 1.0, seconds=30)
    assert len(decisions) == switches
    declined = policy.declined()
    assert len(declined) == 1 - switches  # a drift switch not made says why
    for record in declined:
        assert record["cause"] == "drift" and slow in record["reason"] and "gain a switch needs" in record["reason"]
        assert record["new_period_s"] > (1 - min_gain) * record["old_period_s"]


def test_drift_without_a_better_plan_keeps_the_plan_with_its_prediction_updated():
    cluster = make_cluster(memory_bytes=1e9, speeds={"solo": 1e10})
    policy = ReplanPolicy(PROFILE, cluster, plan(PROFILE, cluster))
    before = policy.plan.period_s
    decisions = run(policy, cluster, lambda d, t, k: 5.0 if t >= 2 else 1.0, seconds=30)
    assert decisions == []
    assert policy.plan.period_s == pytest.approx(5 * before, rel=1e-3)
    assert policy.estimates()["compute_factor"]["solo"]["believed"] == pytest.approx(5.0, rel=1e-3)


def test_cooldown_delays_a_second_drift_switch(policy, cluster):
    first = first_device(policy)
    seen = {}

    def factor(d, t, k):
        if d == first and t >= 5:
            return 5.0
        if seen and d == seen["second"] and t >= 8:
            return 5.0
        return 1.0

    decisions = run(policy, cluster, factor, seconds=6.5)
    assert len(decisions) == 1
    seen["second"] = first_device(policy)
    decisions += run(policy, cluster, factor, seconds=40, start_s=6.5)
    assert len(decisions) == 2
    assert decisions[1].replan.time_s >= decisions[0].replan.time_s + policy.cooldown_s


def cut_link(policy: ReplanPolicy, device: str, *, seconds: float = 10.0) -> list:
    """The client-`device` link drops from 1e8 to 1e6 bytes/s at t = 2 s; every decision made."""
    decisions = []
    for k in range(round(seconds / 0.1)):
        t = k * 0.1
        policy.observe_link("client", device, bandwidth_bytes_per_s=1e8 if t < 2 else 1e6, time_s=t)
        decisions += [d for d in [policy.decide(t)] if d is not None]
    return decisions


def test_a_link_losing_bandwidth_replans_on_the_measured_link():
    cluster = make_cluster(speeds={"a": 2e10, "b": 2e10})
    pipeline = plan(PROFILE, cluster)
    # A long horizon: the 60 MB the swap ships over the slowed link (a minute) pays for itself.
    policy = ReplanPolicy(PROFILE, cluster, pipeline, switch_cost=SwitchCost(horizon_s=3600))
    first = pipeline.stages[0].devices[0]
    decisions = cut_link(policy, first)
    assert len(decisions) == 1
    slow_link = decisions[0].cluster.link(first, "client")
    # A 100x drop: after the median flips and 10 EWMA halvings, within 1e8 / 2**11 of the new level.
    assert slow_link.bandwidth_bytes_per_s == pytest.approx(1e6, abs=1e8 / 2**11)
    expected = plan(PROFILE, cluster.with_link("client", first, slow_link))
    assert decisions[0].plan == expected
    assert decisions[0].replan.blamed == (f"{first}-client bandwidth",)


def test_a_switch_is_predicted_to_cost_shipping_loading_routing_and_the_replay():
    cluster = make_cluster(speeds={"a": 2e10, "b": 2e10})
    cost = SwitchCost(horizon_s=3600, load_s=0.3, load_bytes_per_s=1e9, route_s=0.02)
    policy = ReplanPolicy(PROFILE, cluster, plan(PROFILE, cluster), switch_cost=cost)
    [decision] = cut_link(policy, "a")
    assert [(s.devices, s.start, s.end) for s in decision.plan.stages] == [(("b",), 0, 2), (("a",), 2, 4)]
    record = decision.replan
    weights = [s["param_bytes"] for s in PROFILE["segments"]]
    to_a, to_b = sum(weights[2:4]), sum(weights[0:2])  # the stages swap: both devices load
    bandwidth_a = decision.cluster.link("client", "a").bandwidth_bytes_per_s
    ship_a = 0.001 + to_a / bandwidth_a + 0.3 + to_a / 1e9
    ship_b = 0.001 + to_b / 1e8 + 0.3 + to_b / 1e9
    assert record.predicted_ship_bytes == to_a + to_b
    assert record.predicted_switch_s == pytest.approx(max(ship_a, ship_b) + 0.02 + decision.plan.latency_s)
    assert record.gain_s == pytest.approx(3600 * (1 - decision.plan.period_s / record.old_period_s))
    assert record.gain_s > record.predicted_switch_s and record.horizon_s == 3600
    as_dict = record.to_dict()
    assert as_dict["predicted_switch_s"] == record.predicted_switch_s and as_dict["switch_s"] is None
    done = policy.completed(decision, 1.5, shipped_bytes=123)
    assert done.to_dict()["switch_s"] == 1.5 and done.to_dict()["shipped_bytes"] == 123


def test_a_switch_that_costs_more_than_it_saves_over_the_horizon_is_not_made():
    """Swapping ships 60 MB over the slowed 1 MB/s link: a minute, more than 30 s of a shorter period saves."""
    cluster = make_cluster(speeds={"a": 2e10, "b": 2e10})
    policy = ReplanPolicy(PROFILE, cluster, plan(PROFILE, cluster))  # default horizon: 30 s
    before = policy.plan.stages
    assert cut_link(policy, "a") == []
    assert policy.plan.stages == before and policy.history == ()
    [declined] = policy.declined()
    assert "bandwidth" in declined["reason"] and "more than the" in declined["reason"]
    assert declined["predicted_switch_s"] > declined["gain_s"] > 0
    # The drift was looked at once and believed: the plan is re-predicted on the slow link.
    assert policy.plan.period_s > 2 * plan(PROFILE, cluster).period_s


def test_archives_the_devices_hold_ship_nothing_and_make_the_same_switch_pay():
    """With both stages' archives in the devices' caches, the swap costs loading only: it is made."""
    cluster = make_cluster(speeds={"a": 2e10, "b": 2e10})
    policy = ReplanPolicy(PROFILE, cluster, plan(PROFILE, cluster))
    policy.note_cached({"a": [(0, 2), (2, 4)], "b": [(0, 2), (2, 4)]})
    [decision] = cut_link(policy, "a")
    assert decision.replan.predicted_ship_bytes == 0
    assert decision.replan.predicted_switch_s < 1.0 < decision.replan.gain_s


def test_observe_transfer_reads_bandwidth_after_the_believed_latency(policy):
    for k in range(10):
        policy.observe_transfer("client", "a", nbytes=1e6, transfer_s=0.001 + 0.1, time_s=k * 0.1)
    estimate = policy.estimates()["bandwidth_bytes_per_s"]["a-client"]
    assert estimate["estimate"] == pytest.approx(1e7) and estimate["drifting"]


def test_decisions_are_deterministic_for_the_same_observations(cluster):
    runs = []
    for _ in range(2):
        policy = ReplanPolicy(PROFILE, cluster, plan(PROFILE, cluster))
        slow = first_device(policy)
        decisions = run(policy, cluster, lambda d, t, k, s=slow: 4.0 if d == s and t > 3 else 1.0, seconds=20)
        runs.append([d.to_dict() for d in decisions])
    assert runs[0] == runs[1] and runs[0]


def test_observations_from_unknown_or_idle_devices_are_refused(policy):
    with pytest.raises(ClusterSpecError, match="no node named 'ghost'"):
        policy.observe_stage("ghost", 0.1, time_s=0.0)
    idle = ReplanPolicy(PROFILE, make_cluster(memory_bytes=1e9, speeds={"a": 1e10, "slow": 1e6}),
                        plan(PROFILE, make_cluster(memory_bytes=1e9, speeds={"a": 1e10, "slow": 1e6})))
    with pytest.raises(PlanError, match="runs no stage"):
        idle.observe_stage("slow", 1.0, time_s=0.0)
    idle.observe_stage("slow", 1.0, time_s=0.0, segments=(0, 4))  # a probe of the idle device is fine


# --- failures -------------------------------------------------------------------------------------


def test_a_failed_device_in_the_plan_replans_on_the_devices_left(policy, cluster):
    lost = first_device(policy)
    old = policy.plan
    policy.on_failure([lost], time_s=3.0)
    decision = policy.decide(3.0)
    expected = plan(PROFILE, cluster.without(lost))
    assert decision.cause == "failure" and decision.plan.stages == expected.stages
    assert decision.replan.devices_lost == (lost,) and decision.replan.old_period_s == old.period_s
    assert lost not in {c.device for c in decision.diff.changes}
    assert policy.decide(3.1) is None
    assert lost not in policy.cluster.names


def test_a_failure_report_repeated_by_several_signals_replans_once(policy):
    lost = first_device(policy)
    policy.on_failure([lost], time_s=1.0)
    policy.on_failure([lost, lost], time_s=1.1)
    assert policy.decide(1.2) is not None
    policy.on_failure([lost], time_s=1.3)
    assert policy.decide(1.4) is None
    assert len(policy.history) == 1


def test_a_failed_spare_device_changes_nothing():
    cluster = make_cluster(memory_bytes=1e9, speeds={"a": 1e10, "spare": 1e6})
    policy = ReplanPolicy(PROFILE, cluster, plan(PROFILE, cluster))
    assert "spare" not in policy.plan.devices
    policy.on_failure(["spare"], time_s=0.0)
    assert policy.decide(0.0) is None and policy.cluster.names == ("a",)


def test_failures_ignore_the_cooldown(policy, cluster):
    slow = first_device(policy)
    run(policy, cluster, lambda d, t, k: 5.0 if d == slow and t >= 1 else 1.0, seconds=3)
    assert len(policy.history) == 1
    lost = first_device(policy)
    policy.on_failure([lost], time_s=3.0)
    assert policy.decide(3.0).cause == "failure"


def test_when_the_devices_left_cannot_hold_the_model_the_plan_error_says_so_and_a_join_recovers():
    cluster = make_cluster(memory_bytes=70e6, speeds={"a": 1e10, "b": 1e10})
    policy = ReplanPolicy(PROFILE, cluster, plan(PROFILE, cluster))
    policy.on_failure(["b"], time_s=1.0)
    with pytest.raises(PlanError, match=r"b failed and the devices left cannot run the model: .*(needs|Add a device)"):
        policy.decide(1.0)
    assert policy.plan is None and policy.decide(1.5) is None
    policy.on_join("b", time_s=2.0)
    decision = policy.decide(2.0)
    assert decision.cause == "join" and decision.replan.old_period_s is None
    assert decision.replan.devices_added == ("b",) and decision.plan.stages == plan(PROFILE, cluster).stages


def test_a_join_that_still_leaves_too_little_memory_is_a_plan_error():
    cluster = make_cluster(memory_bytes=70e6, speeds={"a": 1e10, "b": 1e10})
    policy = ReplanPolicy(PROFILE, cluster, plan(PROFILE, cluster))
    policy.on_failure(["a", "b"], time_s=1.0)
    with pytest.raises(PlanError, match="no device is left"):
        policy.decide(1.0)
    policy.on_join("a", time_s=2.0)
    with pytest.raises(PlanError, match="a joined but the devices still cannot run the model"):
        policy.decide(2.0)
    policy.on_join("b", time_s=3.0)
    assert policy.decide(3.0).cause == "join"


def test_a_policy_refuses_a_plan_on_devices_the_cluster_lacks(cluster):
    deployed = plan(PROFILE, cluster)
    with pytest.raises(PlanError, match="does not have"):
        ReplanPolicy(PROFILE, cluster.without(deployed.devices[0]), deployed)


def test_losing_every_device_is_a_plan_error():
    cluster = make_cluster(memory_bytes=1e9, speeds={"a": 1e10})
    policy = ReplanPolicy(PROFILE, cluster, plan(PROFILE, cluster))
    policy.on_failure(["a"], time_s=0.0)
    with pytest.raises(PlanError, match="no device is left"):
        policy.decide(0.0)
    assert policy.cluster is None


def test_a_failure_of_a_device_never_deployed_is_refused(policy):
    with pytest.raises(ClusterSpecError, match="ghost"):
        policy.on_failure(["ghost"], time_s=0.0)


def test_late_figures_from_a_failed_device_are_dropped(policy):
    lost = first_device(policy)
    policy.on_failure([lost], time_s=0.0)
    policy.decide(0.0)
    policy.observe_stage(lost, 99.0, time_s=0.5)
    policy.observe_link(lost, "client", bandwidth_bytes_per_s=1.0, time_s=0.5)
    assert lost not in policy.estimates()["compute_factor"]


# --- joins ----------------------------------------------------------------------------------------


def test_a_fast_new_device_joins_when_it_pays(policy, cluster):
    fast = DeviceSpec("fast", flops_per_s=1e12, memory_bytes=1e9)
    old = policy.plan
    policy.on_join(fast, time_s=5.0)
    decision = policy.decide(5.0)
    grown = ClusterSpec((*cluster.devices, fast), cluster.source, cluster.default_link)
    assert decision.cause == "join" and decision.replan.devices_added == ("fast",)
    assert decision.plan.stages == plan(PROFILE, grown).stages
    assert decision.plan.period_s <= 0.9 * old.period_s
    assert "fast" in decision.diff.load


def test_a_slow_new_device_joins_the_cluster_but_not_the_plan(policy):
    before = policy.plan
    policy.on_join(DeviceSpec("slow", flops_per_s=1e6, memory_bytes=1e9), time_s=1.0)
    assert policy.decide(1.0) is None
    assert policy.plan.stages == before.stages and "slow" in policy.cluster.names


def test_a_device_that_comes_back_gets_its_original_links(cluster):
    special = make_cluster(pairs=[{"a": "a", "b": "client", "bandwidth_bytes_per_s": 5e8, "latency_s": 0.0}])
    policy = ReplanPolicy(PROFILE, special, plan(PROFILE, special))
    policy.on_failure(["a"], time_s=0.0)
    policy.decide(0.0)
    policy.on_join("a", time_s=1.0)
    policy.decide(1.0)
    assert policy.cluster.link("a", "client") == LinkSpec(5e8, 0.0)
    assert policy.cluster.names == special.names


def test_joining_twice_or_an_unknown_name_is_refused(policy):
    with pytest.raises(ClusterSpecError, match="already part"):
        policy.on_join("a", time_s=0.0)
    with pytest.raises(ClusterSpecError, match="pass a DeviceSpec"):
        policy.on_join("ghost", time_s=0.0)


def test_a_join_with_measured_segment_times_plans_with_them(policy):
    policy.on_join(DeviceSpec("e", flops_per_s=1e6, memory_bytes=1e9), time_s=0.0,
                   segment_times_s=[1e-4, 1e-4, 1e-4, 1e-4])
    decision = policy.decide(0.0)
    assert decision is not None and "e" in decision.plan.devices
    assert decision.segment_times_s["e"] == (1e-4,) * 4


# --- records --------------------------------------------------------------------------------------


def test_completed_records_the_switch_time_and_lists_as_json(policy):
    lost = first_device(policy)
    policy.on_failure([lost], time_s=2.0)
    decision = policy.decide(2.5)
    assert policy.history[0].switch_s is None
    record = policy.completed(decision, switch_s=0.75)
    assert record.switch_s == 0.75 and policy.history == (record,)
    listed = json.loads(json.dumps(policy.replans()))
    assert listed == [{"cause": "failure", "time_s": 2.5, "old_period_s": decision.replan.old_period_s,
                       "new_period_s": decision.plan.period_s, "switch_s": 0.75, "devices_lost": [lost],
                       "devices_added": [], "reason": record.reason,
                       "predicted_switch_s": record.predicted_switch_s,
                       "predicted_ship_bytes": record.predicted_ship_bytes, "shipped_bytes": None,
                       "gain_s": None, "horizon_s": 30.0, "blamed": []}]
    assert record.predicted_switch_s > 0 and record.predicted_ship_bytes > 0  # a failure still has a cost
    json.dumps(decision.to_dict())
    with pytest.raises(PlanError, match="did not make"):
        ReplanPolicy(PROFILE, make_cluster(), plan(PROFILE, make_cluster())).completed(decision, 1.0)


# --- plan diffs -----------------------------------------------------------------------------------

DEVICES = ("a", "b", "c", "d", "e", "f")


@st.composite
def plans(draw) -> Plan:
    n_segments = 6
    cuts = sorted(draw(st.sets(st.integers(1, n_segments - 1), max_size=3)))
    bounds = [0, *cuts, n_segments]
    order = draw(st.permutations(DEVICES))
    stages, used = [], 0
    for start, end in zip(bounds, bounds[1:], strict=False):
        replicas = draw(st.integers(1, max(1, min(2, len(DEVICES) - used - (len(bounds) - 2 - len(stages))))))
        stages.append(StagePlan(tuple(order[used:used + replicas]), start, end, 1.0, 1.0, 1, 1))
        used += replicas
    return Plan(tuple(stages), 1.0, 1.0, 1.0, "throughput", "custom")


@settings(max_examples=200, deadline=None)
@given(old=plans(), new=plans(), gone=st.sets(st.sampled_from(DEVICES), max_size=2))
def test_plan_diff_keeps_exactly_the_devices_whose_range_is_unchanged(old, new, gone):
    diff = diff_plans(old, new, gone=gone)
    ranges_old = {d: (s.start, s.end) for s in old.stages for d in s.devices}
    ranges_new = {d: (s.start, s.end) for s in new.stages for d in s.devices}
    everyone = (set(ranges_old) | set(ranges_new)) - gone
    assert sorted(diff.keep + diff.load + diff.unload) == sorted(everyone)
    assert set(diff.keep) == {d for d in everyone if ranges_old.get(d) == ranges_new.get(d)}
    assert set(diff.unload) == {d for d in everyone if d not in ranges_new}
    loading = {k for k, s in enumerate(new.stages) if set(s.devices) & set(diff.load)}
    assert set(diff.shipped_stages) == loading


@settings(max_examples=50, deadline=None)
@given(same=plans())
def test_a_plan_diffed_with_itself_ships_nothing(same):
    diff = diff_plans(same, same)
    assert diff.unchanged and diff.shipped_stages == () and set(diff.keep) == set(same.devices)


def test_a_diff_from_nothing_loads_every_device():
    new = Plan((StagePlan(("a",), 0, 2, 1.0, 1.0, 1, 1), StagePlan(("b", "c"), 2, 4, 1.0, 1.0, 1, 1)),
               1.0, 1.0, 1.0, "throughput", "custom")
    diff = diff_plans(None, new)
    assert diff.load == ("a", "b", "c") and diff.shipped_stages == (0, 1)


def test_a_kept_stage_that_moves_down_the_pipeline_is_reindexed_not_shipped():
    old = Plan((StagePlan(("a",), 0, 3, 1, 1, 1, 1), StagePlan(("b",), 3, 6, 1, 1, 1, 1)), 1, 1, 1, "throughput", "x")
    new = Plan((StagePlan(("c",), 0, 1, 1, 1, 1, 1), StagePlan(("a",), 1, 3, 1, 1, 1, 1),
                StagePlan(("b",), 3, 6, 1, 1, 1, 1)), 1, 1, 1, "throughput", "x")
    diff = diff_plans(old, new)
    assert diff.keep == ("b",) and diff.reindexed == ("b",) and diff.load == ("a", "c")
    assert diff.shipped_stages == (0, 1)


def test_failure_plans_are_the_plans_a_failure_of_each_device_switches_to(cluster):
    foreseen = ReplanPolicy(PROFILE, cluster, plan(PROFILE, cluster)).failure_plans()
    assert set(foreseen) == set(plan(PROFILE, cluster).devices)
    for device, expected in foreseen.items():
        policy = ReplanPolicy(PROFILE, cluster, plan(PROFILE, cluster))
        policy.on_failure([device], time_s=1.0)
        assert policy.decide(1.0).plan == expected and device not in expected.devices


def test_a_drifting_latency_keeps_each_direction_of_a_link_slower_one_way():
    """Only the latency of a link whose directions differ drifts: the figures planned with keep both bandwidths."""
    pair = {"a": "client", "b": "a", "bandwidth_bytes_per_s": 1e8, "bandwidth_b_to_a": 1e7, "latency_s": 0.001}
    cluster = make_cluster(pairs=[pair])
    policy = ReplanPolicy(PROFILE, cluster, plan(PROFILE, cluster))
    for k in range(100):
        policy.observe_link("client", "a", latency_s=0.001 if k < 20 else 0.05, time_s=k * 0.1)
    believed = policy.failure_scenarios().cluster
    assert believed.link("client", "a").latency_s == pytest.approx(0.05, rel=0.05)  # the drift is taken
    assert believed.link("client", "a").bandwidth_bytes_per_s == 1e8
    assert believed.link("a", "client").bandwidth_bytes_per_s == 1e7


@pytest.mark.parametrize(("sender", "receiver"), [("client", "a"), ("a", "client")])
def test_a_drifting_bandwidth_replaces_the_direction_it_was_measured_on(sender, receiver):
    """client -> a is 1e8 and a -> client 1e7; the direction measured drops to 1e6, the other keeps its figure."""
    pair = {"a": "client", "b": "a", "bandwidth_bytes_per_s": 1e8, "bandwidth_b_to_a": 1e7, "latency_s": 0.001}
    cluster = make_cluster(pairs=[pair])
    policy = ReplanPolicy(PROFILE, cluster, plan(PROFILE, cluster))
    before = cluster.link(sender, receiver).bandwidth_bytes_per_s
    for k in range(100):
        policy.observe_link(sender, receiver, bandwidth_bytes_per_s=before if k < 20 else 1e6, time_s=k * 0.1)
    believed = policy.failure_scenarios().cluster
    assert believed.link(sender, receiver).bandwidth_bytes_per_s == pytest.approx(1e6, rel=0.05)
    assert believed.link(receiver, sender) == cluster.link(receiver, sender)
