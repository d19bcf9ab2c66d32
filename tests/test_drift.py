"""Estimators, drift with hysteresis, and the conversions to planner inputs (pure, no torch)."""

from __future__ import annotations

import dataclasses
import math
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from partita.cluster import ClusterSpec, LinkSpec
from partita.errors import PlanError
from partita.plan import load_profile, predict
from partita.plan.drift import (
    DeltaMeans,
    DriftRule,
    Estimator,
    Signal,
    base_segment_times,
    compute_factor,
    relative_change,
    scaled_segment_times,
    updated_cluster,
)

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


def two_devices() -> ClusterSpec:
    return ClusterSpec.from_dict({
        "source": "client",
        "devices": [{"name": "x", "flops_per_s": 1e10, "memory_bytes": 1e9},
                    {"name": "y", "flops_per_s": 2e10, "memory_bytes": 1e9}],
        "links": {"default": {"bandwidth_bytes_per_s": 1e8, "latency_s": 0.001}},
    })


# --- Estimator ----------------------------------------------------------------------------------------


def test_estimator_is_empty_until_the_first_observation_then_counts_samples():
    estimator = Estimator()
    assert estimator.value is None and estimator.samples == 0
    for k in range(4):
        estimator.observe(2.0, time_s=float(k))
    assert estimator.value == 2.0 and estimator.samples == 4 and estimator.last_time_s == 3.0


@settings(max_examples=60, deadline=None)
@given(level=st.floats(0.01, 100.0), outlier=st.floats(0.0, 1e4), length=st.integers(10, 60),
       gap=st.integers(3, 8), first=st.integers(0, 5))
def test_estimator_ignores_isolated_outliers(level, outlier, length, gap, first):
    # With window 5, at most 2 outliers in any 5 consecutive values never move the median.
    estimator = Estimator(alpha=0.5, window=5)
    for k in range(length):
        value = outlier if k >= first and (k - first) % gap == 0 else level
        estimator.observe(value, time_s=k * 0.1)
    assert estimator.value == pytest.approx(level, rel=1e-12)


@settings(max_examples=40, deadline=None)
@given(before=st.floats(0.1, 10.0), after=st.floats(0.1, 10.0))
def test_estimator_follows_a_sustained_step_halving_the_gap_per_observation(before, after):
    estimator = Estimator(alpha=0.5, window=5)
    for k in range(10):
        estimator.observe(before, k)
    for k in range(10, 23):  # the 3rd flips the median (first halving), then 10 more halvings
        estimator.observe(after, k)
    assert abs(estimator.value - after) <= abs(before - after) / 2**11 * (1 + 1e-9)


def test_estimator_smooths_noise_toward_the_median():
    estimator = Estimator(alpha=0.2, window=3)
    values = [1.0, 1.2, 0.8, 1.1, 0.9, 1.0, 1.2, 0.8] * 20
    for k, v in enumerate(values):
        estimator.observe(v, k)
    assert abs(estimator.value - statistics.median(values)) < 0.1


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0, "1.0", True])
def test_estimator_refuses_values_that_are_not_finite_non_negative_numbers(bad):
    with pytest.raises(PlanError, match="finite|>="):
        Estimator().observe(bad, 0.0)


@pytest.mark.parametrize("kwargs", [{"alpha": 0.0}, {"alpha": 1.5}, {"window": 0}])
def test_estimator_refuses_bad_settings(kwargs):
    with pytest.raises(PlanError):
        Estimator(**kwargs)


# --- relative change and signals ---------------------------------------------------------------


@given(a=st.floats(1e-6, 1e6), b=st.floats(1e-6, 1e6))
def test_relative_change_is_symmetric_and_zero_only_for_equal_values(a, b):
    assert relative_change(a, b) == pytest.approx(relative_change(b, a))
    assert relative_change(a * 5, a) == pytest.approx(4.0)
    assert (relative_change(a, b) == 0.0) == (a == b)


def test_relative_change_against_zero_or_infinity_is_infinite_and_a_floor_tames_it():
    assert relative_change(0.0, 1.0) == math.inf
    assert relative_change(1e8, math.inf) == math.inf
    assert relative_change(0.0002, 0.0, floor=0.001) == pytest.approx(0.2)


def _feed(signal: Signal, values, start_s=0.0, step_s=0.1):
    for k, value in enumerate(values):
        signal.observe(value, start_s + k * step_s)


def test_signal_enters_drift_above_threshold_and_is_sustained_only_after_count_and_time():
    rule = DriftRule(threshold=0.3, min_observations=3, min_duration_s=1.0, alpha=1.0, window=1)
    signal = Signal(1.0, rule)
    _feed(signal, [1.2, 1.2])
    assert not signal.drifting
    signal.observe(2.0, 1.0)
    assert signal.drifting and signal.since_s == 1.0 and signal.in_drift == 1
    signal.observe(2.0, 1.1)
    signal.observe(2.0, 1.2)
    assert signal.in_drift == 3
    assert not signal.sustained(now_s=1.5)  # three observations, but only 0.5 s
    assert signal.sustained(now_s=2.0)


def test_signal_hysteresis_keeps_drift_in_the_band_and_clears_below_it():
    rule = DriftRule(threshold=0.3, clear_fraction=0.5, alpha=1.0, window=1)
    signal = Signal(1.0, rule)
    signal.observe(1.4, 0.0)
    assert signal.drifting
    signal.observe(1.2, 0.1)  # 20% change: between 15% (clear) and 30% (enter)
    assert signal.drifting and signal.in_drift == 2
    signal.observe(1.1, 0.2)  # below 15%: cleared
    assert not signal.drifting and signal.in_drift == 0
    signal.observe(1.2, 0.3)  # in the band but not entered from below: still clear
    assert not signal.drifting


def test_signal_accept_makes_the_estimate_believed_and_clears_drift():
    signal = Signal(1.0, DriftRule(alpha=1.0, window=1))
    signal.observe(5.0, 0.0)
    assert signal.planning_value() == 5.0
    signal.accept()
    assert signal.believed == 5.0 and not signal.drifting and signal.change == 0.0


def test_signal_without_drift_plans_with_the_believed_figure():
    signal = Signal(1.0, DriftRule(threshold=0.3, alpha=1.0, window=1))
    signal.observe(1.1, 0.0)
    assert signal.planning_value() == 1.0
    signal.accept()
    assert signal.believed == 1.0


@pytest.mark.parametrize("kwargs", [{"threshold": 0.0}, {"clear_fraction": 1.5}, {"min_observations": 0},
                                    {"min_duration_s": -1.0}, {"alpha": 0.0}])
def test_drift_rule_refuses_bad_settings(kwargs):
    with pytest.raises(PlanError):
        DriftRule(**kwargs)


# --- conversions -----------------------------------------------------------------------------------


def test_base_segment_times_use_measurements_where_given_and_flops_elsewhere():
    profile = load_profile(PROFILE)
    base = base_segment_times(profile, two_devices(), {"y": [0.1, 0.2, 0.3, 0.4]})
    assert base["y"] == (0.1, 0.2, 0.3, 0.4)
    assert base["x"] == pytest.approx((0.4, 0.2, 0.6, 0.1))


@settings(max_examples=50, deadline=None)
@given(start=st.integers(0, 3), length=st.integers(1, 4), measured_s=st.floats(1e-4, 100.0))
def test_scaled_times_predict_exactly_the_measured_stage_time(start, length, measured_s):
    # Scaling a device's row by measured / predicted makes the cost model predict the measurement.
    end = min(4, start + length)
    profile, cluster = load_profile(PROFILE), two_devices()
    base = base_segment_times(profile, cluster)
    factor = compute_factor(measured_s, base["x"], start, end)
    times = scaled_segment_times(base, {"x": factor})
    cluster = ClusterSpec(
        (*cluster.devices, dataclasses.replace(cluster.device("y"), name="z")), cluster.source, cluster.default_link
    )
    stages = [s for s in [("y", 0, start), ("x", start, end), ("z", end, 4)] if s[1] < s[2]]
    predicted = predict(profile, cluster, stages, segment_times_s=times)
    stage = next(s for s in predicted.stages if s.devices == ("x",))
    assert stage.compute_s == pytest.approx(measured_s, rel=1e-9)
    assert times["y"] == base["y"]


def test_compute_factor_of_a_zero_time_prediction_is_none():
    assert compute_factor(1.0, [0.0, 0.0, 1.0], 0, 2) is None
    assert compute_factor(3.0, [1.0, 0.5, 1.0], 0, 2) == pytest.approx(2.0)


def test_updated_cluster_replaces_measured_links_and_skips_departed_nodes():
    cluster = two_devices()
    slow = LinkSpec(1e6, 0.01)
    updated = updated_cluster(cluster, {frozenset(("x", "y")): slow, frozenset(("x", "gone")): slow})
    assert updated.link("y", "x") == slow
    assert updated.link("x", "client") == cluster.link("x", "client")


def test_delta_means_give_the_mean_of_new_samples_only_and_survive_a_restart():
    deltas = DeltaMeans()
    assert deltas.update("pi-a", 4, 1.0) == pytest.approx(1.0)
    assert deltas.update("pi-a", 4, 1.0) is None
    assert deltas.update("pi-a", 8, 2.0) == pytest.approx(3.0)  # 4 new samples summing to 16 - 4
    assert deltas.update("pi-a", 2, 5.0) == pytest.approx(5.0)  # the count went down: a fresh worker
    assert deltas.update("pi-b", 0, 0.0) is None
