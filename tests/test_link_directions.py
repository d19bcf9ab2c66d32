"""Links whose two directions differ (an ADSL line, a Wi-Fi client's slower uplink): declared, measured, planned.

A pair link may carry each direction's bandwidth (`LinkSpec.directions`); `ClusterSpec.link(a, b)`
is always the direction from a to b, and every planner, the simulator and the emulation read it so.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from partita.cluster import ClusterSpec, LinkSpec
from partita.errors import ClusterSpecError
from partita.plan import load_profile, plan, predict
from partita.plan.classes import group_devices
from partita.runtime.local import LocalCluster
from partita.runtime.measure import ASYMMETRY, probed_link
from partita.sim import simulate

MB = 1e6
ROOT = Path(__file__).resolve().parents[1]


def cluster(**pair_b) -> ClusterSpec:
    """Two equal devices: `fast` downloads at 100 MB/s and uploads at 1 MB/s; `even` has 10 MB/s both ways."""
    return ClusterSpec.from_dict({
        "source": "client",
        "devices": [{"name": "fast", "flops_per_s": 1e10, "memory_bytes": 1e9},
                    {"name": "even", "flops_per_s": 1e10, "memory_bytes": 1e9}],
        "links": {
            "default": {"bandwidth_bytes_per_s": 1e4, "latency_s": 0.0},  # fast <-> even: too slow to split over
            "pairs": [{"a": "client", "b": "fast", "bandwidth": 100 * MB, "bandwidth_b_to_a": 1 * MB,
                       "latency": "1ms"},
                      {"a": "even", "b": "client", "bandwidth_bytes_per_s": 10 * MB, "latency_s": 0.001, **pair_b}],
        },
    })


def profile(input_bytes: int, out_bytes: int) -> dict:
    return {"model": "one", "input_bytes": input_bytes,
            "segments": [{"name": "s", "flops": 1e8, "param_bytes": 1000, "act_bytes": 1000, "out_bytes": out_bytes}]}


def test_a_pair_may_give_its_way_back_and_each_direction_is_its_own_link():
    spec = cluster()
    assert spec.link("client", "fast") == LinkSpec(100 * MB, 0.001)
    assert spec.link("fast", "client") == LinkSpec(1 * MB, 0.001)
    assert spec.link("even", "client") == spec.link("client", "even") == LinkSpec(10 * MB, 0.001)
    pair = spec.pair_links[frozenset(("client", "fast"))]
    assert pair.bandwidth_bytes_per_s == 1 * MB and pair.directions == (100 * MB, 1 * MB)  # client < fast
    written = next(p for p in spec.to_dict()["links"]["pairs"] if "fast" in (p["a"], p["b"]))
    assert (written["a"], written["b"], written["bandwidth_bytes_per_s"], written["bandwidth_b_to_a"]) == (
        "client", "fast", 100 * MB, 1 * MB)
    assert ClusterSpec.from_dict(spec.to_dict()) == spec
    assert cluster(bandwidth_b_to_a=10 * MB) == spec  # the same both ways is an ordinary link
    assert ClusterSpec.from_dict(spec.to_dict()) != cluster(bandwidth_b_to_a=20 * MB)


def test_a_pair_written_the_other_way_round_means_the_same_link():
    spec = cluster(bandwidth_b_to_a=2 * MB)  # even -> client 10 MB/s, client -> even 2 MB/s
    assert spec.link("even", "client").bandwidth_bytes_per_s == 10 * MB
    assert spec.link("client", "even").bandwidth_bytes_per_s == 2 * MB
    assert spec.pair_links[frozenset(("client", "even"))].directions == (2 * MB, 10 * MB)  # name order


def test_directions_that_do_not_fit_are_refused_with_what_is_expected():
    with pytest.raises(ClusterSpecError, match="slower as its bandwidth_bytes_per_s"):
        LinkSpec(5 * MB, 0.0, directions=(5 * MB, 1 * MB))
    with pytest.raises(ClusterSpecError, match="two bandwidths > 0"):
        LinkSpec(1 * MB, 0.0, directions=(1 * MB, -1.0))
    with pytest.raises(ClusterSpecError, match="default link is the same both ways"):
        ClusterSpec(cluster().devices, "client", LinkSpec(1 * MB, 0.0, directions=(1 * MB, 2 * MB)))
    data = cluster().to_dict()
    data["links"]["default"] = {"bandwidth": "10Mbit/s", "latency": "1ms", "bandwidth_b_to_a": "1Mbit/s"}
    with pytest.raises(ClusterSpecError, match=r"links\.default\.bandwidth_b_to_a: unknown field"):
        ClusterSpec.from_dict(data)
    data["links"]["default"] = {"bandwidth": "10Mbit/s", "latency": "1ms"}
    data["links"]["pairs"][0]["bandwidth_b_to_a"] = "fast"
    with pytest.raises(ClusterSpecError, match=r"links\.pairs\[0\]\.bandwidth_b_to_a"):
        ClusterSpec.from_dict(data)


@pytest.mark.parametrize("objective", ["throughput", "latency"])
def test_the_planner_sends_a_large_input_down_the_fast_direction_and_a_large_output_up_one(objective):
    spec = cluster()
    # 1 MB in, 1 kB out: `fast` takes it in 10 ms; `even` in 100 ms. The slower direction alone (1 MB/s)
    # would have made `fast` take 1 s and chosen `even`.
    uploads = plan(profile(1_000_000, 1_000), spec, objective=objective)
    assert [s.devices for s in uploads.stages] == [("fast",)]
    assert uploads.period_s == pytest.approx(max(1e6 / (100 * MB), 1e-2, 1e3 / MB))
    assert uploads.latency_s == pytest.approx(0.001 + 1e6 / (100 * MB) + 1e-2 + 0.001 + 1e3 / MB)
    # 1 kB in, 1 MB out: the way back from `fast` takes 1 s; `even` sends it in 100 ms.
    downloads = plan(profile(1_000, 1_000_000), spec, objective=objective)
    assert [s.devices for s in downloads.stages] == [("even",)]
    assert predict(profile(1_000, 1_000_000), spec, [("fast", 0, 1)]).period_s == pytest.approx(1.0)
    report = simulate(uploads, spec, profile(1_000_000, 1_000), requests=200)
    assert report.throughput_rps == pytest.approx(uploads.throughput_rps, rel=0.02)


def test_devices_whose_links_differ_only_on_the_way_back_are_not_interchangeable():
    devices = [{"name": n, "flops_per_s": 1e10, "memory_bytes": 1e9} for n in ("p", "q", "r")]
    pairs = [{"a": "p", "b": "client", "bandwidth_bytes_per_s": MB, "bandwidth_b_to_a": 50 * MB, "latency_s": 0.0},
             {"a": "q", "b": "client", "bandwidth_bytes_per_s": MB, "bandwidth_b_to_a": 10 * MB, "latency_s": 0.0},
             {"a": "r", "b": "client", "bandwidth_bytes_per_s": MB, "bandwidth_b_to_a": 50 * MB, "latency_s": 0.0}]
    spec = ClusterSpec.from_dict({"source": "client", "devices": devices,
                                  "links": {"default": {"bandwidth_bytes_per_s": 1e7, "latency_s": 0.0}, "pairs": pairs}})
    assert spec.link("p", "client") == spec.link("q", "client")  # the same on the way out
    assert [c.members for c in group_devices(spec)] == [("p", "r"), ("q",)]


def test_a_probe_keeps_directions_apart_only_past_its_noise():
    figures = {"bandwidth_bytes_per_s": 1 * MB, "bandwidth_back_bytes_per_s": 4 * MB, "latency_s": 0.002}
    link = probed_link("client", "pi", figures)  # client -> pi 1 MB/s, pi -> client 4 MB/s
    assert link.directions == (1 * MB, 4 * MB) and link.bandwidth_bytes_per_s == 1 * MB
    spec = ClusterSpec.from_dict({"source": "client", "devices": [{"name": "pi", "type": "raspberry-pi-4"}],
                                  "links": {"default": "wifi5"}}).with_link("pi", "client", link)
    assert spec.link("pi", "client").bandwidth_bytes_per_s == 4 * MB
    assert spec.link("client", "pi").bandwidth_bytes_per_s == 1 * MB
    assert spec.link("pi", "client").basis == "measured"
    close = probed_link("client", "pi", {**figures, "bandwidth_back_bytes_per_s": 0.99 * ASYMMETRY * MB})
    assert close.directions is None and close.bandwidth_bytes_per_s == 1 * MB  # within noise: one link, the slower
    assert close.measured["bandwidth_a_to_b"] == 1 * MB  # both directions are still recorded
    assert ClusterSpec.from_dict(spec.to_dict()) == spec  # a measured file keeps its directions


def test_the_emulation_shapes_each_direction_with_its_own_bandwidth():
    local = LocalCluster(cluster())  # not started: which link it would emulate is a lookup
    assert local.emulated_link("client", "fast").bandwidth_bytes_per_s == 100 * MB
    assert local.emulated_link("fast", "client").bandwidth_bytes_per_s == 1 * MB


def test_on_the_lte_example_a_large_input_goes_down_one_device_and_the_result_up_the_other():
    """examples/clusters/lte-2.yaml: the Orin downloads fast and the laptop uploads fast; BERT-base's 593 kB each way."""
    spec = ClusterSpec.from_yaml(ROOT / "examples" / "clusters" / "lte-2.yaml")
    profile = load_profile(ROOT / "benchmarks" / "profiles" / "bert_base.json")
    chosen = plan(profile, spec)
    assert [s.devices for s in chosen.stages] == [("orin",), ("laptop",)]
    slower = ClusterSpec.from_dict({**spec.to_dict(), "links": {"default": "ethernet-1G", "pairs": [
        {"a": n, "b": "client", "bandwidth": "10Mbit/s", "latency": "40ms"} for n in ("orin", "laptop")]}})
    assert chosen.throughput_rps > 3.9 * plan(profile, slower).throughput_rps  # 40 against 10 Mbit/s each way
