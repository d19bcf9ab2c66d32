"""Large clusters: device classes, replication, and a lower bound that holds."""

from __future__ import annotations

import random

import pytest

from partita.cluster import ClusterSpec
from partita.plan import plan, predict
from partita.plan.classes import group_devices

TYPES = ["raspberry-pi-4", "raspberry-pi-5", "jetson-orin-nano", "intel-nuc-11-i5"]


def chain_profile(n_segments: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    return {"model": f"chain{n_segments}", "input_bytes": 600_000, "segments": [
        {"name": f"s{i}", "flops": rng.randint(1, 50) * 10**8, "param_bytes": rng.randint(1, 40) * 10**6,
         "act_bytes": rng.randint(1, 10) * 10**6, "out_bytes": rng.randint(1, 20) * 10**5}
        for i in range(n_segments)]}


def big_cluster(n: int, types=TYPES, default="ethernet-1G") -> ClusterSpec:
    return ClusterSpec.from_dict({
        "source": "client",
        "devices": [{"name": f"d{i}", "type": types[i % len(types)]} for i in range(n)],
        "links": {"default": default},
    })


def test_large_mixed_cluster_reports_a_bound_below_its_period():
    profile, spec = chain_profile(80), big_cluster(120)
    chosen = plan(profile, spec)
    assert chosen.lower_bound_period_s is not None
    assert 0 < chosen.lower_bound_period_s <= chosen.period_s
    assert chosen.gap is not None and chosen.gap >= 0
    again = predict(profile, spec, chosen.stages)
    assert (again.period_s, again.latency_s) == (chosen.period_s, chosen.latency_s)


def test_replicas_are_always_interchangeable_devices():
    profile, spec = chain_profile(40, seed=1), big_cluster(200)
    chosen = plan(profile, spec)
    assert any(stage.replicas > 1 for stage in chosen.stages)
    for stage in chosen.stages:
        assert len({spec.device(name).type for name in stage.devices}) == 1


def test_homogeneous_cluster_gets_within_a_few_percent_of_the_bound():
    profile, spec = chain_profile(30, seed=2), big_cluster(300, types=["raspberry-pi-4"])
    chosen = plan(profile, spec)
    assert chosen.gap is not None and chosen.gap < 0.05


def test_large_clusters_without_replication_use_one_device_per_stage():
    profile, spec = chain_profile(60, seed=3), big_cluster(150)
    chosen = plan(profile, spec, replicate=False)
    assert all(stage.replicas == 1 for stage in chosen.stages)
    assert chosen.lower_bound_period_s is None or chosen.lower_bound_period_s <= chosen.period_s


def test_large_clusters_plan_for_latency_too():
    profile, spec = chain_profile(60, seed=4), big_cluster(150)
    fast = plan(profile, spec, objective="latency")
    slow = plan(profile, spec, planner="even", objective="latency")
    assert fast.latency_s < slow.latency_s


def test_more_devices_never_hurt_on_the_large_path():
    profile = chain_profile(50, seed=5)
    small = plan(profile, big_cluster(100))
    large = plan(profile, big_cluster(400))
    assert large.period_s <= small.period_s * 1.0001


def test_devices_group_into_classes_by_spec_and_links():
    spec = ClusterSpec.from_dict({
        "source": "p0",
        "devices": [{"name": f"p{i}", "type": "raspberry-pi-4"} for i in range(5)]
        + [{"name": "j", "type": "jetson-orin-nano"}],
        "links": {"default": "wifi5", "pairs": [
            {"a": "p3", "b": "j", "preset": "ethernet-1G"},
            {"a": "p4", "b": "j", "preset": "ethernet-1G"},
        ]},
    })
    classes = {c.members for c in group_devices(spec)}
    # p0 is the source (its own class); p1, p2 only have default links; p3, p4 share a fast link to j.
    assert classes == {("p0",), ("p1", "p2"), ("p3", "p4"), ("j",)}


def test_measured_segment_times_steer_the_large_planner():
    profile, spec = chain_profile(20, seed=6), big_cluster(100)
    # Claim d0 is absurdly fast: it should take the whole model, replicated or not.
    times = {"d0": [1e-6] * 20}
    chosen = plan(profile, spec, segment_times_s=times, replicate=False)
    assert chosen.period_s == pytest.approx(predict(profile, spec, chosen.stages, segment_times_s=times).period_s)
    assert "d0" in chosen.devices
