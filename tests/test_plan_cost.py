"""The cost model, Plan values, baselines and profile loading (all without torch)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass

import pytest

from partita.cluster import ClusterSpec
from partita.errors import PlanError, ProfileError
from partita.plan import Plan, load_profile, plan, predict

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


def cluster(memory=200e6) -> ClusterSpec:
    return ClusterSpec.from_dict({
        "source": "client",
        "devices": [
            {"name": "x", "flops_per_s": 1e10, "memory_bytes": memory},
            {"name": "y", "flops_per_s": 2e10, "memory_bytes": memory},
            {"name": "z", "flops_per_s": 2e10, "memory_bytes": memory},
        ],
        "links": {
            "default": {"bandwidth_bytes_per_s": 1e7, "latency_s": 0.001},
            "pairs": [
                {"a": "client", "b": "x", "bandwidth_bytes_per_s": 1e8, "latency_s": 0.0},
                {"a": "y", "b": "z", "bandwidth_bytes_per_s": 5e6, "latency_s": 0.004},
            ],
        },
    })


def test_prediction_is_the_design_cost_model_by_hand():
    # x: [0, 2) 6e9 / 1e10 = 0.6 s; y: [2, 4) 7e9 / 2e10 = 0.35 s.
    # hops: client->x 1e6 / 1e8 = 0.01 s (+0); x->y 5e5 / 1e7 = 0.05 s (+1 ms); y->client 4e4 / 1e7 = 0.004 (+1 ms)
    got = predict(PROFILE, cluster(), [("x", 0, 2), ("y", 2, 4)])
    assert got.period_s == pytest.approx(0.6)
    assert got.throughput_rps == pytest.approx(1 / 0.6)
    assert got.latency_s == pytest.approx(0.6 + 0.35 + 0.01 + 0.051 + 0.005)
    first, second = got.stages
    assert first.memory_bytes == 10e6 + 30e6 + 4e6
    assert second.memory_bytes == 20e6 + 40e6 + 6e6
    assert (first.in_bytes, first.out_bytes, second.in_bytes, second.out_bytes) == (1_000_000, 500_000, 500_000, 40_000)
    assert got.cuts() == [1]


def test_replication_divides_compute_and_link_bytes_by_the_replica_count():
    # y and z both run everything: compute 13e9 / 2e10 = 0.65 s each, period term 0.325 s.
    # client->y and client->z: 1e6 / 1e7 = 0.1 s per message, each carries half: 0.05 s.
    got = predict(PROFILE, cluster(memory=1e9), [(("y", "z"), 0, 4)])
    assert got.period_s == pytest.approx(0.325)
    assert got.latency_s == pytest.approx(0.65 + 0.101 + 0.001 + 0.004)
    assert got.stages[0].compute_s == pytest.approx(0.65)


def test_replicas_meeting_unequal_counts_use_round_robin_pairs():
    # Stage 1 on x alone, stage 2 on y and z: x->y and x->z each carry half of the 5e5-byte messages.
    got = predict(PROFILE, cluster(memory=1e9), [("x", 0, 2), (("y", "z"), 2, 4)])
    assert got.period_s == pytest.approx(max(0.6, 0.35 / 2, 5e5 / 1e7 / 2, 1e6 / 1e8, 4e4 / 1e7 / 2))


def test_measured_segment_times_override_flops():
    times = {"x": [0.1, 0.1, 0.1, 0.1]}
    got = predict(PROFILE, cluster(memory=1e9), [("x", 0, 4)], segment_times_s=times)
    assert got.stages[0].compute_s == pytest.approx(0.4)
    with pytest.raises(PlanError, match="has 2 times but toy has 4 segments"):
        plan(PROFILE, cluster(memory=1e9), segment_times_s={"x": [0.1, 0.2]})


def test_predict_rejects_assignments_the_model_cannot_run():
    with pytest.raises(PlanError, match="contiguously"):
        predict(PROFILE, cluster(), [("x", 0, 2), ("y", 3, 4)])
    with pytest.raises(PlanError, match="appears in two stages"):
        predict(PROFILE, cluster(), [("x", 0, 2), ("x", 2, 4)])
    with pytest.raises(PlanError, match="need .* MiB; x has"):
        predict(PROFILE, cluster(memory=50e6), [("x", 0, 3), ("y", 3, 4)])


def test_a_model_that_fits_nowhere_says_what_is_needed_and_what_there_is():
    small = cluster(memory=45e6)  # every segment fits alone, the whole model does not fit in all memory
    with pytest.raises(PlanError, match=r"needs 95\.4 MiB .* together have 85\.8 MiB"):
        plan(PROFILE, small.without("z"))
    with pytest.raises(PlanError, match=r"needs .* MiB for its weights and activations; the largest device"):
        plan(PROFILE, small, planner="single")
    with pytest.raises(PlanError, match=r"segment 3 \(d\) of toy needs 39\.1 MiB"):
        plan(PROFILE, cluster(memory=30e6))


def test_plan_json_round_trips_with_the_issue_keys():
    original = plan(PROFILE, cluster(), objective="latency")
    data = json.loads(original.to_json())
    for key in ("objective", "planner", "period_s", "throughput_rps", "latency_s", "lower_bound_period_s", "stages"):
        assert key in data
    for key in ("devices", "start", "end", "compute_s", "memory_bytes", "in_bytes", "out_bytes"):
        assert key in data["stages"][0]
    assert Plan.from_json(original.to_json()) == original
    with pytest.raises(PlanError, match="not a plan"):
        Plan.from_json('{"stages": []}')


def test_plan_prints_one_line_per_stage():
    chosen = plan(PROFILE, cluster())
    lines = str(chosen).splitlines()
    assert len(lines) == 1 + len(chosen.stages)
    assert "stage 0" in lines[1]


def test_every_planner_returns_exactly_the_cost_model_of_its_assignment():
    spec = cluster(memory=1e9)
    for name in ("optimal", "single", "even", "memory", "flops"):
        for objective in ("throughput", "latency"):
            chosen = plan(PROFILE, spec, planner=name, objective=objective)
            again = predict(PROFILE, spec, chosen.stages, objective=objective, planner=name)
            assert (again.period_s, again.latency_s) == (chosen.period_s, chosen.latency_s)
            assert chosen.planner == name


def test_baselines_split_as_their_rules_say():
    spec = cluster(memory=1e9)
    assert [(s.devices, s.start, s.end) for s in plan(PROFILE, spec, planner="even").stages] == [
        (("x",), 0, 1), (("y",), 1, 3), (("z",), 3, 4)]  # round(1/3 * 4) = 1, round(2/3 * 4) = 3
    assert [s.devices for s in plan(PROFILE, spec, planner="single").stages] == [("y",)]  # fastest that fits
    flops = plan(PROFILE, spec, planner="flops")
    assert [(s.start, s.end) for s in flops.stages] == [(0, 1), (1, 2), (2, 4)]  # shares 1:2:2 of 4 segments
    assert plan(PROFILE, spec, planner="even", max_stages=2).devices == ("x", "y")


def test_optimal_is_never_worse_than_a_baseline():
    spec = cluster(memory=1e9)
    best = plan(PROFILE, spec)
    for name in ("single", "even", "memory", "flops"):
        assert best.period_s <= plan(PROFILE, spec, planner=name).period_s * (1 + 1e-12)


def test_profiles_load_from_dict_file_and_graph_like_objects(tmp_path):
    path = tmp_path / "toy.json"
    path.write_text(json.dumps(PROFILE))

    @dataclass
    class Seg:
        name: str
        flops: int
        param_bytes: int
        act_bytes: int
        out_bytes: int

    @dataclass
    class Graph:
        name: str
        segments: list
        input_bytes: int

    graph = Graph("toy", [Seg(**s) for s in PROFILE["segments"]], PROFILE["input_bytes"])
    assert load_profile(path) == load_profile(PROFILE) == load_profile(graph)
    assert load_profile(PROFILE).to_dict() == PROFILE


@pytest.mark.parametrize(("bad", "match"), [
    ({"model": "m", "segments": []}, "non-empty list"),
    ({"model": "m", "segments": [{"name": "a"}], "input_bytes": 1}, r"segments\[0\]\.flops is missing"),
    ({"model": "m", "segments": [dict(PROFILE["segments"][0], flops=-1)], "input_bytes": 1}, "whole number >= 0"),
    ({"model": "m", "segments": PROFILE["segments"]}, "input_bytes"),
    (42, "cannot read a model profile"),
])
def test_malformed_profiles_raise_profile_error(bad, match):
    with pytest.raises(ProfileError, match=match):
        load_profile(bad)


def test_invalid_arguments_raise_plan_error():
    with pytest.raises(PlanError, match="unknown objective"):
        plan(PROFILE, cluster(), objective="speed")
    with pytest.raises(PlanError, match="unknown planner"):
        plan(PROFILE, cluster(), planner="magic")
    with pytest.raises(PlanError, match="max_stages"):
        plan(PROFILE, cluster(), max_stages=0)


def test_planning_and_simulation_do_not_import_torch_or_zmq():
    code = ("import sys, partita.plan, partita.sim, partita.cluster; "
            "print(sorted(m for m in ('torch', 'zmq', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_an_infinite_period_is_impossible_for_a_real_plan():
    chosen = plan(PROFILE, cluster())
    assert math.isfinite(chosen.period_s) and chosen.period_s > 0


def test_the_per_hop_overhead_adds_to_every_hop_and_to_every_stage_by_hand():
    # The hand example above with h = 0.1 s: 3 hops add 0.3 s of latency; stage x's 0.6 s becomes
    # 0.7 s a request, the period.
    h = 0.1
    got = predict(PROFILE, cluster(), [("x", 0, 2), ("y", 2, 4)], hop_overhead_s=h)
    assert got.period_s == pytest.approx(0.7)
    assert got.latency_s == pytest.approx(0.6 + 0.35 + 0.01 + 0.051 + 0.005 + 3 * h)
    assert got.hop_overhead_s == h
    # Replicas share it like their compute: (0.35 + 0.1) / 2 for y and z together.
    replicated = predict(PROFILE, cluster(), [("x", 0, 2), (("y", "z"), 2, 4)], hop_overhead_s=h)
    assert replicated.period_s == pytest.approx(max(0.7, 0.45 / 2))


def test_planning_with_a_hop_overhead_chooses_as_without_and_reports_it():
    without = plan(PROFILE, cluster(), objective="latency")
    with_h = plan(PROFILE, cluster(), objective="latency", hop_overhead_s=2e-3)
    assert with_h.stages == without.stages
    assert with_h == predict(PROFILE, cluster(), with_h.stages, objective="latency", planner=with_h.planner,
                             lower_bound_latency_s=with_h.lower_bound_latency_s, hop_overhead_s=2e-3)
    assert Plan.from_json(with_h.to_json()) == with_h
    assert Plan.from_json(without.to_json()).hop_overhead_s == 0.0


@pytest.mark.parametrize("bad", [-1e-4, math.inf, math.nan, True, "1ms"])
def test_a_hop_overhead_that_is_not_seconds_is_refused(bad):
    with pytest.raises(PlanError, match="hop_overhead_s"):
        predict(PROFILE, cluster(), [("x", 0, 4)], hop_overhead_s=bad)
