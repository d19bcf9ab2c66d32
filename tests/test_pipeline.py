"""deploy + Pipeline on a LocalCluster: outputs bit-identical to the unsplit model, streamed in order.

One cluster of four emulated workers serves every test in this module (workers stay up across
deployments, which is itself part of what is tested); the model is captured and measured once.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import partita
from partita.cluster import ClusterSpec
from partita.runtime.coordinator import deploy

pytestmark = pytest.mark.slow

DEVICES = ("a", "b", "c", "d")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(6):
        layers += [nn.Linear(32, 32), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(32, 5)).eval()


def chain(n_segments: int, devices) -> list:
    """Contiguous stages over `devices`, as even as the segments allow: [(device, start, end), ...]."""
    k = len(devices)
    bounds = [round(i * n_segments / k) for i in range(k + 1)]
    return [(d, bounds[i], bounds[i + 1]) for i, d in enumerate(devices)]


def zmq_context():
    import zmq

    return zmq.Context.instance()


@pytest.fixture(scope="module")
def cluster():
    spec = ClusterSpec.from_dict({
        "source": "client",
        "devices": [{"name": n, "flops_per_s": 1e9, "memory_bytes": 2**30, "speed": 0.5} for n in DEVICES],
        "links": {"default": {"bandwidth": "1GB/s", "latency": "0.2ms"}},
    })
    with partita.LocalCluster(spec) as local:
        yield local


@pytest.fixture(scope="module")
def prepared(cluster):
    """The MLP, an example input, and a first pipeline whose capture and measurements the others reuse."""
    model, x = mlp(), torch.randn(4, 32)
    pipe = deploy(model, (x,), cluster, planner="even")
    yield model, x, pipe.graph, pipe.measurements
    pipe.close()


@pytest.mark.parametrize("n_workers", [2, 3, 4])
def test_outputs_are_bit_identical_through_several_workers(cluster, prepared, n_workers):
    model, x, graph, measured = prepared
    stages = chain(len(graph.segments), DEVICES[:n_workers])
    with deploy(model, (x,), cluster, graph=graph, measurements=measured, stages=stages) as pipe:
        assert len(pipe.plan.stages) == n_workers
        for _ in range(3):
            batch = torch.randn(4, 32)
            assert torch.equal(pipe(batch, timeout_s=30), model(batch))


def test_a_stage_of_only_the_small_last_layer_is_bit_identical(cluster, prepared):
    """The last stage is the Linear(32, 5) alone: it computes on the activation as received.

    MKL rounds such a GEMM differently on an input that is not 16-byte aligned, which a view of a
    zmq frame is; the worker must compute on memory aligned as torch allocates it (codec.ALIGNMENT).
    """
    model, x, graph, measured = prepared
    n = len(graph.segments)
    batches = [torch.randn(64, 32) for _ in range(8)]  # 8 KiB activations: libzmq allocates each apart
    with deploy(model, (x,), cluster, graph=graph, measurements=measured, stages=[("a", 0, n - 1), ("b", n - 1, n)],
                supervise=False) as pipe:
        outputs = list(pipe.map(batches))
    with torch.no_grad():
        assert all(torch.equal(y, model(b)) for y, b in zip(outputs, batches, strict=True))


def test_map_keeps_many_requests_in_flight_and_yields_them_in_order(cluster, prepared):
    model, x, graph, measured = prepared
    stages = chain(len(graph.segments), DEVICES)
    batches = [torch.randn(4, 32) for _ in range(60)]
    with deploy(model, (x,), cluster, graph=graph, measurements=measured, stages=stages, window=3, supervise=False) as pipe:
        outputs = list(pipe.map(batches))
        stats = pipe.stats()
    assert all(torch.equal(y, model(b)) for y, b in zip(outputs, batches, strict=True))
    assert stats["delivered"] == 60 and stats["pending"] == 0
    assert stats["max_in_flight"] > 4  # more requests in flight than stages: a real pipeline
    assert all(stage["requests"] >= 60 for stage in stats["stages"])


def test_a_replicated_stage_shares_requests_round_robin(cluster, prepared):
    model, x, graph, measured = prepared
    half = len(graph.segments) // 2
    stages = [(("a", "b"), 0, half), ("c", half, len(graph.segments))]
    batches = [torch.randn(4, 32) for _ in range(20)]
    with deploy(model, (x,), cluster, graph=graph, measurements=measured, stages=stages, supervise=False) as pipe:
        outputs = list(pipe.map(batches))
        workers = pipe._collect_worker_stats()
    assert all(torch.equal(y, model(b)) for y, b in zip(outputs, batches, strict=True))
    assert workers["a"]["stages"]["0"]["requests"] == 10
    assert workers["b"]["stages"]["0"]["requests"] == 10


def test_one_cluster_serves_two_models_at_once(cluster, prepared):
    """Two deployments side by side on the same workers, each with its own stages, epoch and routes."""
    from partita.model import capture
    from partita.runtime.control import ControlClient

    model_a, x, graph, measured = prepared
    torch.manual_seed(1)
    model_b = nn.Sequential(nn.Linear(32, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 3)).eval()
    stages_a = chain(len(graph.segments), ("a", "b"))
    with deploy(model_a, (x,), cluster, graph=graph, measurements=measured, stages=stages_a, supervise=False) as a:
        graph_b = capture(model_b, (x,))
        stages_b = [("b", 0, 1), ("c", 1, len(graph_b.segments))]
        with deploy(model_b, (x,), cluster, graph=graph_b, stages=stages_b, replace=False, supervise=False) as b:
            assert (a.deployment.slot, b.deployment.slot) == (0, 1)
            batches = [torch.randn(4, 32) for _ in range(12)]
            futures = [(pipe.submit(batch), model, batch) for batch in batches for pipe, model in ((a, model_a), (b, model_b))]
            assert all(torch.equal(f.result(timeout=60), model(batch)) for f, model, batch in futures)
            assert [s["requests"] for s in a.stats()["stages"]] == [12, 12]
            assert [s["requests"] for s in b.stats()["stages"]] == [12, 12]
        # b closed: its stages left the shared worker, and a still serves.
        control = ControlClient(zmq_context(), cluster.endpoints["b"], cluster.coordinator_keys)
        try:
            held = set(control.call("stats").header["stages"])
        finally:
            control.close()
        assert held == {"1"}  # a's stage 1; b's stage (slot 1) is gone
        batch = torch.randn(4, 32)
        assert torch.equal(a(batch, timeout_s=30), model_a(batch))


def test_the_planner_chooses_the_plan_when_none_is_given(cluster, prepared):
    model, x, graph, measured = prepared
    with deploy(model, (x,), cluster, graph=graph, measurements=measured, planner="optimal") as pipe:
        assert pipe.plan.planner == "optimal"
        batch = torch.randn(4, 32)
        assert torch.equal(pipe(batch, timeout_s=30), model(batch))


def test_a_model_with_two_inputs_and_a_dict_output(cluster):
    from zoo import make

    model, inputs = make("two_input_dict")
    with deploy(model, inputs, cluster, planner="even") as pipe:
        got = pipe(*inputs, timeout_s=30)
        want = model(*inputs)
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_lossy_codec_is_close_but_reported_as_lossy(cluster, prepared):
    model, x, graph, measured = prepared
    stages = chain(len(graph.segments), DEVICES[:2])
    with deploy(model, (x,), cluster, graph=graph, measurements=measured, stages=stages, codec="fp16") as pipe:
        y = pipe(x, timeout_s=30)
    exact = model(x)
    assert torch.allclose(y, exact, rtol=1e-2, atol=1e-3)
    assert pipe.deployment.codec == "fp16"


def test_connect_deploys_onto_workers_already_running_at_addresses(tmp_path):
    """Real workers (started like `partita worker ...`), a cluster file with their addresses and keys."""
    import json
    import subprocess
    import sys
    import time

    from partita.runtime.keys import new_keypair

    keys = tmp_path / "keys"
    _, coordinator_secret = new_keypair(keys, "coordinator")
    procs, lines = [], []
    try:
        for name in ("w1", "w2"):
            _, secret = new_keypair(keys, name)
            ready = tmp_path / f"{name}.ready"
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "partita.commands.worker", "--listen", "tcp://127.0.0.1:0", "--name", name,
                 "--secret-key", str(secret), "--authorized-keys", str(keys / "coordinator.key"),
                 "--device", "cpu", "--threads", "1", "--ready-file", str(ready)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))
            deadline = time.monotonic() + 60
            while not ready.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            address = json.loads(ready.read_text())["control"]
            lines.append(f"  - {{name: {name}, compute: 10GFLOPS, memory: 1GiB, address: '{address}', "
                         f"public_key: keys/{name}.key}}")
        cluster_file = tmp_path / "cluster.yaml"
        cluster_file.write_text("source: client\ndevices:\n" + "\n".join(lines)
                                + "\nlinks:\n  default: {bandwidth: 1GB/s, latency: 0.1ms}\n")
        model, x = mlp(), torch.randn(4, 32)
        with partita.connect(cluster_file, secret_key=coordinator_secret) as cluster:
            with deploy(model, (x,), cluster, planner="even") as pipe:
                assert {d for s in pipe.plan.stages for d in s.devices} == {"w1", "w2"}
                assert set(pipe.measurements.segment_times_s) == {"w1", "w2"}  # timed by the workers themselves
                threads = torch.get_num_threads()
                torch.set_num_threads(1)  # the workers' kernel configuration, for bit-identity
                try:
                    assert torch.equal(pipe(x, timeout_s=30), model(x))
                finally:
                    torch.set_num_threads(threads)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=20)


def test_partita_run_streams_checks_and_reports_json():
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "partita.cli", "run", "tests/test_pipeline.py:mlp", "--cluster",
         "examples/clusters/tiny-2.yaml", "--input-shape", "4,32", "--requests", "20", "--check", "--json",
         "--detection", "1.5", "--standby"],
        cwd=root, capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["requests"] == report["delivered"] == 20
    assert report["outputs_match"] is True and report["max_abs_error"] == 0.0
    assert report["measured"]["throughput_rps"] > 0 and report["predicted"]["throughput_rps"] > 0
    assert {"plan", "stages", "replans", "replans_declined", "measured", "predicted"} <= set(report)
    assert all({"cause", "reason", "old_period_s", "new_period_s"} <= set(r) for r in report["replans_declined"])
    assert {"ready", "copies", "bytes", "error"} <= set(report["standby"])  # --standby: the copies it pre-shipped
