"""The discrete-event simulator agrees with the cost model in steady state and measures what it says."""

from __future__ import annotations

import random

import pytest
from plan_instances import random_instance

from partita.cluster import ClusterSpec
from partita.errors import PlanError
from partita.plan import plan, predict
from partita.sim import simulate, trace


def instances():
    for seed in range(6):
        rng = random.Random(2000 + seed)
        # two of the six: links slower one way (each hop of the simulation is one direction)
        profile, cluster, _ = random_instance(rng, 5, 9, types=2 if seed % 2 else None, one_way=seed % 4 == 0)
        yield seed, profile, cluster


@pytest.mark.parametrize("planner", ["optimal", "even", "flops"])
def test_steady_state_throughput_matches_the_plan_within_two_percent(planner):
    checked = 0
    for _, profile, cluster in instances():
        try:
            chosen = plan(profile, cluster, planner=planner)
        except PlanError:
            continue  # a baseline that does not fit this instance
        report = simulate(chosen, cluster, profile, requests=1500)
        assert report.throughput_rps == pytest.approx(chosen.throughput_rps, rel=0.02), str(chosen)
        assert report.completed == 1500
        checked += 1
    assert checked >= 3


def test_replicated_plans_reach_their_predicted_throughput():
    spec = ClusterSpec.from_dict({
        "source": "c",
        "devices": [{"name": f"pi{i}", "type": "raspberry-pi-4"} for i in range(5)],
        "links": {"default": "ethernet-1G"},
    })
    profile = {"model": "m", "input_bytes": 600_000, "segments": [
        {"name": f"s{i}", "flops": 10**9, "param_bytes": 10**6, "act_bytes": 10**6, "out_bytes": 400_000}
        for i in range(4)]}
    chosen = predict(profile, spec, [(("pi0", "pi1", "pi2"), 0, 3), (("pi3", "pi4"), 3, 4)])
    report = simulate(chosen, spec, profile, requests=3000)
    assert report.throughput_rps == pytest.approx(chosen.throughput_rps, rel=0.02)
    assert max(report.device_utilisation.values()) == pytest.approx(1.0, abs=0.05)


def test_one_request_alone_takes_the_predicted_latency():
    for _, profile, cluster in instances():
        chosen = plan(profile, cluster, objective="latency")
        report = simulate(chosen, cluster, profile, requests=1, in_flight=1)
        assert report.latency_p50_s == pytest.approx(chosen.latency_s, rel=1e-9)


def test_light_poisson_load_sees_about_the_unloaded_latency():
    _, profile, cluster = next(instances())
    chosen = plan(profile, cluster)
    report = simulate(chosen, cluster, profile, requests=2000, arrival=0.05 * chosen.throughput_rps, seed=3)
    assert report.latency_p50_s == pytest.approx(chosen.latency_s, rel=0.05)
    assert report.latency_p99_s >= report.latency_p95_s >= report.latency_p50_s
    assert report.throughput_rps == pytest.approx(0.05 * chosen.throughput_rps, rel=0.15)


def test_jitter_costs_throughput_and_the_seed_makes_it_repeatable():
    _, profile, cluster = next(instances())
    chosen = plan(profile, cluster)
    noisy = simulate(chosen, cluster, profile, requests=1500, jitter=0.5, seed=7, in_flight=4)
    again = simulate(chosen, cluster, profile, requests=1500, jitter=0.5, seed=7, in_flight=4)
    assert noisy == again
    assert noisy.throughput_rps < chosen.throughput_rps


def test_trace_covers_every_server_of_every_request():
    _, profile, cluster = next(instances())
    chosen = plan(profile, cluster)
    events = trace(chosen, cluster, profile, requests=3)
    assert len(events) == 3 * (2 * len(chosen.stages) + 1)
    assert all(e.finish_s >= e.start_s >= 0 for e in events)
    assert {e.server for e in events if e.kind == "device"} <= set(chosen.devices)


def test_bad_arguments_raise_plan_error():
    _, profile, cluster = next(instances())
    chosen = plan(profile, cluster)
    with pytest.raises(PlanError, match="requests"):
        simulate(chosen, cluster, profile, requests=0)
    with pytest.raises(PlanError, match="arrival"):
        simulate(chosen, cluster, profile, arrival="bursty")
    with pytest.raises(PlanError, match="arrival rate"):
        simulate(chosen, cluster, profile, arrival=-1.0)


def test_the_simulation_pays_the_plans_per_hop_overhead_as_the_cost_model_does():
    for _, profile, cluster in list(instances())[:3]:
        chosen = plan(profile, cluster, hop_overhead_s=1e-3)
        alone = simulate(chosen, cluster, profile, requests=1, in_flight=1)
        assert alone.latency_p50_s == pytest.approx(chosen.latency_s, rel=1e-9)
        streamed = simulate(chosen, cluster, profile, requests=1500)
        assert streamed.throughput_rps == pytest.approx(chosen.throughput_rps, rel=0.02)
