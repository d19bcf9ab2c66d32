"""The real-network tier: `partita worker`s in network namespaces whose links the kernel shapes.

Three hosts, each behind its own access link shaped with `tc ... tbf` (200, 20 and 50 Mbit/s
each way), run real workers; the coordinator runs in this machine's namespace and reaches them
over a bridge (`partita.testbed`). What the emulated tests cannot check, these do: that probes
measure what the kernel enforces, that a plan made from probes is the same run to run, and that
streams over real queues lose nothing when a link is cut or a worker is killed. The devices are
given by address alone: deploy and `partita cluster probe` measure their compute, memory and links.

Skipped with the reason where network namespaces cannot be made (not root, no iproute2). Every
namespace and process is removed at the end, also when a test fails.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from partita.cluster import ClusterSpec
from partita.plan import plan
from partita.runtime.coordinator import deploy
from partita.runtime.supervisor import Supervision
from partita.testbed import Host, WorkerTestbed, unavailable_reason

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(unavailable_reason() is not None, reason=f"real-network tier: {unavailable_reason()}"),
]

MBIT = {"a": 200, "b": 20, "c": 50}


def model() -> nn.Module:
    """Wide enough that each hop carries ~128 KiB per request: the links, not the CPU, set the plan."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 10)).eval()


def example() -> torch.Tensor:
    return torch.randn(64, 512)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """Devices by address alone (name, address, public_key): compute, memory and links are all measured."""
    hosts = [Host(name, mbit) for name, mbit in MBIT.items()]
    with WorkerTestbed(hosts, tmp_path_factory.mktemp("realnet")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def graph():
    from partita.model import capture

    return capture(model(), (example(),))


@pytest.fixture(autouse=True)
def one_thread():
    """The workers run one torch thread; so does the reference, so outputs are bit-identical."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shaped_mbit(sender: str, receiver: str) -> float:
    """What the kernel lets through from sender to receiver: the slower of the two access links."""
    return min(MBIT.get(sender, float("inf")), MBIT.get(receiver, float("inf")))


@pytest.fixture(scope="module")
def three_deploys(real, graph):
    """Deploy three times in a row, probing every link each time: [(links, placement)] per deploy."""
    runs = []
    with real.connect() as cluster:
        for _ in range(3):
            with deploy(model(), (example(),), cluster, graph=graph, probe_links=True, supervise=False) as pipe:
                runs.append((dict(pipe.measurements.links), [(s.devices, s.start, s.end) for s in pipe.plan.stages]))
    return runs


ALL_LINKS = {frozenset(p) for p in [("client", "a"), ("client", "b"), ("client", "c"), ("a", "b"), ("a", "c"),
                                    ("b", "c")]}


def test_the_cluster_file_gives_devices_by_address_alone(real):
    for device in yaml.safe_load(real.file.read_text())["devices"]:
        assert set(device) == {"name", "address", "public_key"}


def test_probes_measure_every_shaped_link_both_ways_within_20_percent(three_deploys):
    for links, _ in three_deploys:
        assert {frozenset(pair) for pair in links} == ALL_LINKS
        for (sender, receiver), link in links.items():
            a, b = sorted((sender, receiver))
            for direction in ("bandwidth_a_to_b", "bandwidth_b_to_a"):
                mbit = link.measured[direction] * 8 / 1e6
                assert 0.8 <= mbit / shaped_mbit(a, b) <= 1.2, (a, b, direction, mbit)
            assert link.basis == "measured"
            assert link.latency_s < 0.01  # no delay is added: the veth's own, well under a millisecond


def test_three_deploys_in_a_row_make_the_same_plan(three_deploys):
    placements = [placement for _, placement in three_deploys]
    assert placements[0] == placements[1] == placements[2]
    assert all("b" not in devices for devices, _, _ in placements[0])  # the 20 Mbit/s host is avoided


def probe_cli(real, out: Path) -> dict:
    done = subprocess.run([sys.executable, "-m", "partita.cli", "cluster", "probe", str(real.file), "--out", str(out),
                           "--secret-key", str(real.coordinator_secret), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, 1), done.stderr  # 1: written, but a figure was not stable within ±10%
    return json.loads(done.stdout)


def probe_here(real, out: Path) -> dict:
    """What `probe_cli` does, in this process (no interpreter and torch to start): the JSON it prints."""
    from partita.commands.cluster import probe_json
    from partita.runtime.probe import probe_cluster

    result = probe_cluster(real.file, secret_key=real.coordinator_secret)
    result.cluster.to_yaml(out)
    return probe_json(result, result.cluster, out, result.unstable)


def test_cluster_probe_writes_a_measured_cluster_that_plans_the_same_three_times(real, graph, tmp_path):
    """Three probes in a row: every link within 20% of its shaping both ways, and the same offline plan each time.

    The first is the command (`partita cluster probe --json`), the other two its function.
    """
    placements = []
    for run in range(3):
        result = (probe_cli if run == 0 else probe_here)(real, tmp_path / f"measured-{run}.yaml")
        assert {frozenset((r["from"], r["to"])) for r in result["links"]} == ALL_LINKS
        for r in result["links"]:
            for figure in ("bandwidth_bytes_per_s", "bandwidth_back_bytes_per_s"):
                mbit = r[figure] * 8 / 1e6
                assert 0.8 <= mbit / shaped_mbit(r["from"], r["to"]) <= 1.2, (r, figure)
            assert not r["planned_each_way"], r  # shaped the same both ways: one link, at the slower figure
        print("probe", run, [(r["from"], r["to"], round(r["bandwidth_bytes_per_s"] * 8e-6, 1),
                              round(r["bandwidth_back_bytes_per_s"] * 8e-6, 1), r["samples"]) for r in result["links"]],
              "unstable:", result["unstable"])
        measured = ClusterSpec.from_yaml(tmp_path / f"measured-{run}.yaml")  # a normal cluster file
        assert all(d.basis_of("flops_per_s") == d.basis_of("memory_bytes") == "measured" for d in measured.devices)
        chosen = plan(graph, measured)
        assert chosen.basis == {"compute": "measured", "memory": "measured", "links": "measured"}
        placements.append([(s.devices, s.start, s.end) for s in chosen.stages])
    assert placements[0] == placements[1] == placements[2]
    assert all("b" not in devices for devices, _, _ in placements[0])  # the 20 Mbit/s host is avoided


def test_run_check_on_address_only_devices_is_close_and_exits_0(real, tmp_path):
    source = tmp_path / "wide.py"
    source.write_text(inspect.getsource(model).replace("def model()", "import torch\nfrom torch import nn\n\n\n"
                                                       "def model()", 1))
    done = subprocess.run([sys.executable, "-m", "partita.cli", "run", f"{source}:model", "--input-shape", "64,512",
                           "--cluster", str(real.file), "--secret-key", str(real.coordinator_secret),
                           "--requests", "10", "--check", "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["delivered"] == 10 and result["outputs_close"] is True
    assert result["plan"]["basis"] == {"compute": "measured", "memory": "measured", "links": "measured"}


def stream(pipe, m: nn.Module, requests: int, *, at: int | None = None, change=None):
    """Stream `requests` inputs; apply `change()` after `at` results; return (outputs exact, count)."""
    inputs = [torch.randn(64, 512) for _ in range(requests)]
    outputs = []
    for i, y in enumerate(pipe.map(iter(inputs))):
        outputs.append(y)
        if change is not None and i == at:
            change()
    with torch.no_grad():
        exact = all(torch.equal(y, m(x)) for y, x in zip(outputs, inputs, strict=True))
    return exact, len(outputs)


def test_a_stream_with_nothing_changed_makes_no_switch_even_while_standby_copies_travel(real, graph):
    """The standby copies cross the links while the stream starts: their traffic is not taken for drift."""
    m = model()
    with real.connect() as cluster:
        with deploy(m, (example(),), cluster, graph=graph, probe_links=True,
                    supervise=Supervision(detection_s=2.0, standby=True)) as pipe:
            exact, delivered = stream(pipe, m, 600)
            standby = pipe.supervisor.standby
            assert standby.wait(60.0) and standby.state()["bytes"] > 0  # copies travelled, from the deploy on
            replans = pipe.stats()["replans"]
    assert delivered == 600 and exact
    assert [r for r in replans if r["switch_s"] is not None] == [], replans


def blamed_links(replan: dict) -> list[set[str]]:
    """The links a drift record blames, as sets of their two ends ("a-client bandwidth" -> {"a", "client"})."""
    return [set(what.split()[0].split("-")) for what in replan["blamed"] if what.split()[1] in ("bandwidth", "latency")]


def test_a_link_cut_mid_stream_loses_nothing_and_only_the_cut_link_is_blamed(real, graph):
    m = model()
    with real.connect() as cluster:
        with deploy(m, (example(),), cluster, graph=graph, probe_links=True,
                    supervise=Supervision(detection_s=2.0)) as pipe:
            used = {d for s in pipe.plan.stages for d in s.devices}
            victim = next(name for name in ("a", "c", "b") if name in used)
            try:
                exact, delivered = stream(pipe, m, 600, at=100,
                                          change=lambda: real.testbed.shape(victim, uplink_mbit=MBIT[victim] / 10))
            finally:
                real.testbed.shape(victim, uplink_mbit=MBIT[victim])
            replans = pipe.stats()["replans"]
    print("link cut:", victim, [(r["cause"], r["switch_s"], r["predicted_switch_s"], r["blamed"]) for r in replans])
    assert delivered == 600 and exact
    made = [r for r in replans if r["switch_s"] is not None]
    assert len(made) <= 2, replans
    for replan in made:
        assert replan["cause"] == "drift" and replan["blamed"], replan
        assert all(victim in ends for ends in blamed_links(replan)), replan  # no unchanged link is blamed
        assert 0 < replan["predicted_switch_s"] < replan["gain_s"], replan  # it paid for itself, as predicted
        # What it shipped is what it predicted: the weights, plus each archive's few KiB of graph.
        predicted = replan["predicted_ship_bytes"]
        assert predicted <= replan["shipped_bytes"] <= 1.1 * predicted + 2**16, replan


def test_a_killed_worker_mid_stream_loses_nothing_and_with_standby_ships_nothing(real, graph):
    m = model()
    try:
        with real.connect() as cluster:
            with deploy(m, (example(),), cluster, graph=graph, probe_links=True,
                        supervise=Supervision(detection_s=1.0, standby=True)) as pipe:
                assert pipe.supervisor.standby.wait(60.0), "the standby copies never arrived"
                victim = pipe.plan.stages[0].devices[0]
                exact, delivered = stream(pipe, m, 300, at=50, change=lambda: real.kill(victim))
                replans = pipe.stats()["replans"]
                assert all(victim not in s.devices for s in pipe.plan.stages)
    finally:
        real.start(victim)  # later tests find the cluster whole again
        real.wait_ready(victim)
    assert delivered == 300 and exact
    failures = [r for r in replans if r["cause"] == "failure"]
    assert failures, replans
    assert failures[0]["shipped_bytes"] == 0 and failures[0]["predicted_ship_bytes"] == 0, failures


def test_a_link_slower_one_way_is_probed_and_planned_in_each_direction(tmp_path):
    """A host whose uplink (10 Mbit/s) is a quarter of its downlink (40), as on an ADSL line.

    The probe keeps the two directions apart (they differ by more than its noise), the measured
    cluster file says so, and the link the planner reads each way is that direction's.
    """
    from partita.commands.cluster import probe_json
    from partita.runtime.probe import probe_cluster

    with WorkerTestbed([Host("adsl", uplink_mbit=10, downlink_mbit=40)], tmp_path) as bed:
        result = probe_cluster(bed.file, secret_key=bed.coordinator_secret)
    spec = result.cluster
    [row] = probe_json(result, spec, tmp_path / "measured.yaml", result.unstable)["links"]
    assert row["planned_each_way"], row
    down, up = spec.link("client", "adsl"), spec.link("adsl", "client")
    assert 0.8 <= down.bandwidth_bytes_per_s * 8 / 1e6 / 40 <= 1.2, down
    assert 0.8 <= up.bandwidth_bytes_per_s * 8 / 1e6 / 10 <= 1.2, up
    assert spec.pair_links[frozenset(("client", "adsl"))].directions is not None
    spec.to_yaml(tmp_path / "measured.yaml")
    assert ClusterSpec.from_yaml(tmp_path / "measured.yaml") == spec
