"""Devices by address alone, measured figures and the basis of every prediction (no workers needed).

A device with an `address` may leave out compute, memory and links: they are unknown until
measured, planning says so by name, and a measured cluster (what `partita cluster probe` writes,
what deploy plans with) carries which figures were measured, with their spreads, through a file
round trip. Every plan names the basis of its compute, memory and link figures.
"""

from __future__ import annotations

import json

import pytest

from partita.cli import main
from partita.cluster import ClusterSpec
from partita.errors import ClusterSpecError
from partita.plan import load_profile, plan
from partita.runtime.measure import Measurements, measured_device_figures, probed_link
from partita.runtime.profile import spread

ADDRESS_ONLY = {
    "source": "client",
    "devices": [{"name": "a", "address": "tcp://10.0.0.1:5555", "public_key": "keys/a.key"},
                {"name": "b", "address": "tcp://10.0.0.2:5555", "public_key": "keys/b.key"}],
}


def profile():
    segments = [{"name": f"s{i}", "flops": 2e9, "param_bytes": 2**20, "act_bytes": 2**20, "out_bytes": 400_000}
                for i in range(4)]
    return load_profile({"model": "toy", "input_bytes": 400_000, "segments": segments})


def hello(flops: float, memory: float) -> dict:
    return {"flops_per_s": flops, "flops_spread": 0.04, "memory_bytes": memory}


def link(prober: str, probed: str, forward_bytes_per_s: float, backward_bytes_per_s: float) -> tuple:
    figures = {"bandwidth_bytes_per_s": forward_bytes_per_s, "bandwidth_back_bytes_per_s": backward_bytes_per_s,
               "latency_s": 0.001, "rtt_s": 0.002, "bandwidth_spread": 0.03, "bandwidth_back_spread": 0.05,
               "latency_spread": 0.2, "samples": 4, "stable": False}
    return (prober, probed), probed_link(prober, probed, figures)


def measured_cluster() -> ClusterSpec:
    """ADDRESS_ONLY after a probe: a is fast with fast links, b slow with a slow link to the client."""
    links = dict([link("client", "a", 12e6, 10e6), link("client", "b", 1e6, 2e6), link("a", "b", 5e6, 5e6)])
    infos = {"a": hello(40e9, 2**31), "b": hello(10e9, 2**30)}
    return Measurements({}, None, infos, links).cluster_spec(ClusterSpec.from_dict(ADDRESS_ONLY))


def test_a_device_given_by_address_alone_loads_with_its_figures_unknown():
    spec = ClusterSpec.from_dict(ADDRESS_ONLY)
    assert spec.device("a").flops_per_s is None and spec.device("a").memory_bytes is None
    assert spec.default_link is None
    assert spec.unknown_figures()[:2] == ["a: flops_per_s", "a: memory_bytes"]
    assert "link a-b" in spec.unknown_figures() and "link a-client" in spec.unknown_figures()


def test_planning_a_cluster_not_yet_measured_names_what_is_missing_and_how_to_measure_it():
    with pytest.raises(ClusterSpecError, match=r"a: flops_per_s.*partita cluster probe"):
        plan(profile(), ClusterSpec.from_dict(ADDRESS_ONLY))


def test_a_device_with_neither_figures_nor_an_address_is_refused_by_name():
    data = {"source": "client", "devices": [{"name": "pi", "memory": "1GiB"}],
            "links": {"default": "wifi5"}}
    with pytest.raises(ClusterSpecError, match=r"devices\[0\]: missing compute \(flops_per_s\).*address"):
        ClusterSpec.from_dict(data)


def test_links_may_be_left_out_only_where_a_worker_can_measure_them():
    data = {"source": "client", "devices": [*ADDRESS_ONLY["devices"], {"name": "emu", "compute": "1GFLOPS",
                                                                        "memory": "1GiB"}]}
    with pytest.raises(ClusterSpecError, match="links: missing.*emu-client.*cannot be measured"):
        ClusterSpec.from_dict(data)
    data["links"] = {"pairs": [{"a": "emu", "b": "client", "bandwidth": "10MB/s", "latency": "1ms"}]}
    assert ClusterSpec.from_dict(data).unknown_figures() == [
        "a: flops_per_s", "a: memory_bytes", "b: flops_per_s", "b: memory_bytes",
        "link a-b", "link a-emu", "link a-client", "link b-emu", "link b-client"]


def test_the_cli_refuses_an_unmeasured_cluster_in_one_line_with_exit_2(tmp_path, capsys):
    cluster = tmp_path / "real.yaml"
    cluster.write_text(json.dumps(ADDRESS_ONLY))
    segments = [{"name": "s", "flops": 1e9, "param_bytes": 1, "act_bytes": 1, "out_bytes": 1}]
    prof = tmp_path / "p.json"
    prof.write_text(json.dumps({"model": "toy", "input_bytes": 1, "segments": segments}))
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "--profile", str(prof), "--cluster", str(cluster)])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "to be measured" in err


def test_a_probe_fills_what_is_unknown_marks_it_measured_and_keeps_both_directions():
    spec = measured_cluster()
    a = spec.device("a")
    assert (a.flops_per_s, a.memory_bytes) == (40e9, 2**31)
    assert a.basis_of("flops_per_s") == "measured" and a.spread["flops_per_s"] == 0.04
    client_b = spec.link("client", "b")
    assert client_b.basis == "measured"
    # "b" < "client": a is b, b is client; the probe went client -> b (1 MB/s) and back (2 MB/s)
    assert client_b.measured["bandwidth_a_to_b"] == 2e6 and client_b.measured["bandwidth_b_to_a"] == 1e6
    # 2x apart, past a probe's noise: each direction is planned with its own figure
    assert client_b.bandwidth_bytes_per_s == 1e6 and spec.link("b", "client").bandwidth_bytes_per_s == 2e6
    client_a = spec.link("client", "a")  # 12 and 10 MB/s: within the noise, one link at the slower figure
    assert client_a.bandwidth_bytes_per_s == spec.link("a", "client").bandwidth_bytes_per_s == 10e6
    assert client_b.measured["bandwidth_spread"] == 0.05 and client_b.measured["stable"] is False
    assert spec.unknown_figures() == []


def test_declared_figures_are_honoured_and_only_the_missing_ones_are_measured():
    declared = ClusterSpec.from_dict({**ADDRESS_ONLY, "devices": [
        {"name": "a", "address": "tcp://10.0.0.1:5555", "compute": "5GFLOPS"},
        {"name": "b", "type": "raspberry-pi-4", "address": "tcp://10.0.0.2:5555"}]})
    a_changes = measured_device_figures(declared.device("a"), hello(40e9, 2**31))
    assert "flops_per_s" not in a_changes and a_changes["memory_bytes"] == 2**31
    assert a_changes["basis"] == {"memory_bytes": "measured"}
    assert measured_device_figures(declared.device("b"), hello(40e9, 2**31)) == {}
    assert declared.device("b").basis_of("flops_per_s") == "catalog"


def test_a_measured_cluster_file_round_trips_with_its_bases_and_spreads(tmp_path):
    spec = measured_cluster()
    spec.to_yaml(tmp_path / "measured.yaml")
    back = ClusterSpec.from_yaml(tmp_path / "measured.yaml")
    assert back == spec
    assert back.device("b").basis == spec.device("b").basis and back.device("b").spread == spec.device("b").spread
    assert back.link("a", "b").basis == "measured"
    assert dict(back.link("client", "b").measured) == dict(spec.link("client", "b").measured)


def test_every_plan_names_its_basis_per_kind_of_figure():
    declared = ClusterSpec.from_dict({"source": "client", "devices": [
        {"name": "pi", "type": "raspberry-pi-4"}, {"name": "laptop", "compute": "50GFLOPS", "memory": "8GiB"}],
        "links": {"default": "wifi5"}})
    on_declared = plan(profile(), declared, planner="single")
    assert on_declared.basis["links"] == "catalog"  # the wifi5 preset
    assert on_declared.basis["compute"] in ("catalog", "declared")
    on_measured = plan(profile(), measured_cluster())
    assert on_measured.basis == {"compute": "measured", "memory": "measured", "links": "measured"}
    timed = plan(profile(), declared, planner="single",
                 segment_times_s={"pi": [0.1] * 4, "laptop": [0.01] * 4})
    assert timed.basis["compute"] == "measured"
    assert json.loads(timed.to_json())["basis"] == dict(timed.basis)
    assert type(timed).from_json(timed.to_json()).basis == timed.basis


def test_plan_json_and_text_name_the_basis(tmp_path, capsys):
    prof = tmp_path / "p.json"
    prof.write_text(json.dumps({"model": "toy", "input_bytes": 400_000, "segments": [
        {"name": "s", "flops": 1e9, "param_bytes": 1, "act_bytes": 1, "out_bytes": 1}]}))
    measured = tmp_path / "measured.yaml"
    measured_cluster().to_yaml(measured)
    for args in (["--json"], []):
        with pytest.raises(SystemExit) as exit_:
            main(["plan", "--profile", str(prof), "--cluster", str(measured), *args])
        assert exit_.value.code == 0
        if args:
            assert json.loads(capsys.readouterr().out)["basis"]["links"] == "measured"
    assert "prediction basis: compute measured; memory measured; links measured" in capsys.readouterr().out


def test_spread_is_half_the_range_over_the_median_and_ignores_one_outlier_among_five():
    assert spread([9.0, 10.0, 11.0]) == pytest.approx(0.1)
    assert spread([10.0, 10.1, 9.9, 10.0, 30.0]) == pytest.approx(0.005)  # 9.9 and 30 left out


def test_workers_on_the_same_hardware_share_the_median_of_their_times():
    from partita.runtime.measure import pool_same_hardware

    same = {"host": "box", "device_name": "cpu", "threads": 1, "speed": None}
    infos = {"a": same, "b": same, "c": same, "gpu": {**same, "device_name": "cuda:0"}, "far": {**same, "host": "pi"}}
    times = {"a": (1.0, 2.0), "b": (1.4, 2.6), "c": (0.9, 2.1), "gpu": (0.1, 0.1), "far": (5.0, 5.0)}
    pooled = pool_same_hardware(times, infos)
    assert pooled["a"] == pooled["b"] == pooled["c"] == (1.0, 2.1)  # per-segment medians: noise cannot rank them
    assert pooled["gpu"] == (0.1, 0.1) and pooled["far"] == (5.0, 5.0)  # other hardware keeps its own figures
