"""Federated training over real worker processes on loopback (LocalCluster), and the `partita fl` command."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from partita.fl import (
    ClientProfile,
    FedAvg,
    FedNova,
    FLServer,
    InProcessClient,
    get_task,
    run_in_process,
    task_evaluator,
)
from partita.fl.remote import clients_of
from partita.fl.update import weights_of

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = """
source: client
devices:
  - {name: a, compute: 10GFLOPS, memory: 1GiB, speed: 1.0}
  - {name: b, compute: 10GFLOPS, memory: 1GiB, speed: 1.0}
  - {name: c, compute: 10GFLOPS, memory: 1GiB, speed: 1.0}
links:
  default: {bandwidth: 1Gbit/s, latency: 1ms}
"""
OPTIONS = {"num_clients": 3, "seed": 0}
PROFILES = {i: ClientProfile(local_steps=4 + 6 * i, lr=0.1) for i in range(3)}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from partita.runtime.local import LocalCluster

    path = tmp_path_factory.mktemp("fl") / "three.yaml"
    path.write_text(CLUSTER)
    with LocalCluster.from_yaml(path, host_flops=1e10) as started:
        yield started


def _remote_server(cluster, strategy, **options):
    task = get_task("quadratic", **OPTIONS)
    clients = clients_of(
        cluster, task="quadratic", task_options=OPTIONS, heartbeat_timeout_s=2.0, grace_s=5.0
    )
    server = FLServer(
        strategy, clients, profiles=PROFILES, evaluate=task_evaluator(task), parallel=3, **options
    )
    return task, clients, server


@pytest.mark.parametrize("strategy", [FedAvg, FedNova])
def test_training_over_workers_matches_in_process_training(cluster, strategy):
    task, clients, server = _remote_server(cluster, strategy())
    try:
        remote = server.run(weights_of(task.model()), 3)
    finally:
        for client in clients:
            client.close()
    local_clients = [InProcessClient(task, i) for i in range(3)]
    local = FLServer(strategy(), local_clients, profiles=PROFILES, evaluate=task_evaluator(task)).run(
        weights_of(task.model()), 3
    )

    assert [r.steps for r in remote.rounds] == [(4, 10, 16)] * 3
    assert torch.equal(remote.weights["x"], local.weights["x"])
    assert [r.loss for r in remote.rounds] == [r.loss for r in local.rounds]


def test_client_past_its_deadline_is_left_out_of_the_round(cluster):
    task, clients, server = _remote_server(cluster, FedAvg(), deadline_s=1.0)
    cluster.set_device("c", speed=1e-6)  # one step of c now takes far longer than the 1 s deadline
    try:
        weights, record = server.run_round(1, weights_of(task.model()))
    finally:
        cluster.set_device("c", speed=1.0)
        for client in clients:
            client.close()

    assert record.clients == (0, 1)
    assert record.dropped == {2: "missed deadline"}
    assert record.steps == (4, 10)
    assert not torch.equal(weights["x"], weights_of(task.model())["x"])


def test_worker_answers_heartbeats_while_a_client_trains_longer_than_the_heartbeat_timeout(cluster):
    task, clients, server = _remote_server(cluster, FedAvg())
    # Client 2's three steps take 3 emulated seconds each (x dilation in wall time): past the 2 s heartbeat
    # timeout, so only a worker that keeps answering pings while it trains keeps its client in the round.
    server.profiles = {**PROFILES, 2: ClientProfile(local_steps=3, lr=0.1, step_time_s=1.0)}
    try:
        began = time.monotonic()
        _, record = server.run_round(1, weights_of(task.model()))
        took_s = time.monotonic() - began
    finally:
        for client in clients:
            client.close()

    assert took_s > 3.0
    assert record.clients == (0, 1, 2) and record.steps == (4, 10, 3)
    assert record.dropped == {}


def test_a_failing_training_job_gets_an_error_reply_and_the_worker_serves_on(cluster):
    from partita.fl.remote import RemoteClient

    broken = RemoteClient(
        cluster.endpoints["a"], cluster.coordinator_keys, 0, task="no_such_module_xyz:Task", grace_s=5.0
    )
    task, clients, server = _remote_server(cluster, FedAvg())
    try:
        server.clients = [broken, *clients[1:]]
        _, failed = server.run_round(1, weights_of(task.model()))
        server.clients = clients
        _, recovered = server.run_round(2, weights_of(task.model()))
    finally:
        broken.close()
        for client in clients:
            client.close()

    assert failed.clients == (1, 2)
    assert "no_such_module_xyz" in failed.dropped[0] and failed.dropped[0].startswith("lost")
    assert recovered.clients == (0, 1, 2)


def _secure_server(cluster, strategy, client_class=None):
    from partita.fl.secagg.round import SecureAggregation

    task, clients, _ = _remote_server(cluster, strategy)
    for client in clients if client_class is not None else ():
        client.__class__ = client_class  # a RemoteClient subclass that fails on cue
    server = FLServer(
        strategy, clients, profiles=PROFILES, evaluate=task_evaluator(task), parallel=3, secure=SecureAggregation()
    )
    return task, clients, server


def test_secure_training_over_workers_ends_where_plain_in_process_training_does(cluster):
    task, clients, server = _secure_server(cluster, FedNova())
    try:
        secure = server.run(weights_of(task.model()), 3)
    finally:
        for client in clients:
            client.close()
    plain = FLServer(
        FedNova(), [InProcessClient(task, i) for i in range(3)], profiles=PROFILES, evaluate=task_evaluator(task)
    ).run(weights_of(task.model()), 3)

    assert [r.steps for r in secure.rounds] == [(4, 10, 16)] * 3
    # Each round's unmasked sums are within 3 * 2^-33 of the exact ones (the fixed-point ring's rounding).
    assert torch.allclose(secure.weights["x"], plain.weights["x"], rtol=0, atol=1e-6)
    assert sum(c.bytes_sent + c.bytes_received for c in clients) > 0


def test_a_worker_killed_after_masking_leaves_its_masked_update_recoverable(cluster):
    from partita.fl.remote import RemoteClient

    class DiesBeforeUnmasking(RemoteClient):
        """Client 2's worker is SIGKILLed once it has sent its masked input, before it helps unmask."""

        def secure_unmask(self, round_key, survivors, dropped):
            if self.client_id == 2:
                victim = cluster.processes["c"]
                victim.send_signal(signal.SIGKILL)
                victim.wait(timeout=5)
            return super().secure_unmask(round_key, survivors, dropped)

    task, clients, server = _secure_server(cluster, FedAvg(), DiesBeforeUnmasking)
    initial = weights_of(task.model())
    try:
        weights, record = server.run_round(1, initial)
    finally:
        for client in clients:
            client.close()
        device = next(d for d in cluster.spec.devices if d.name == "c")
        cluster.add_worker(device)  # later tests use c again

    local = [InProcessClient(task, i) for i in range(3)]
    plain = FLServer(FedAvg(), local, profiles=PROFILES).run_round(1, initial)[0]
    # c's masked input arrived, so its update is in the sum: the other two held enough shares to unmask.
    assert record.clients == (0, 1, 2) and "lost during secure unmasking" in record.dropped[2]
    assert torch.allclose(weights["x"], plain["x"], rtol=0, atol=1e-6)


def test_client_killed_mid_round_is_left_out_and_training_goes_on(cluster):
    task, clients, server = _remote_server(cluster, FedNova())
    victim = cluster.processes["c"]
    try:
        weights, first = server.run_round(1, weights_of(task.model()))
        cluster.set_device("c", speed=0.005)  # c's 16 steps now take seconds: long enough to die mid-round
        killer = threading.Timer(0.5, victim.send_signal, args=(signal.SIGKILL,))
        began = time.monotonic()
        killer.start()
        weights, second = server.run_round(2, weights)
        second_s = time.monotonic() - began
        after_second = weights
        weights, third = server.run_round(3, weights)
    finally:
        killer.cancel()
        for client in clients:
            client.close()

    assert first.clients == (0, 1, 2)
    assert victim.wait(timeout=5) == -signal.SIGKILL
    assert second_s > 0.5  # the worker died while the round was running
    assert second.clients == (0, 1) and second.dropped[2].startswith("lost")
    assert third.clients == (0, 1) and third.dropped[2].startswith("lost")
    assert not torch.equal(weights["x"], after_second["x"])  # round 3 still trained and aggregated


def _partita(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "partita.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_fl_command_prints_rounds_and_final_figures_as_json(tmp_path):
    cluster_file = ROOT / "examples" / "clusters" / "tiny-2.yaml"
    done = _partita(
        "fl",
        "--task",
        "quadratic",
        "--cluster",
        str(cluster_file),
        "--strategy",
        "all",
        "--rounds",
        "2",
        "--local-steps",
        "2-8",
        "--json",
        "--out",
        str(tmp_path / "w.safetensors"),
        cwd=tmp_path,
    )

    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["task"] == "quadratic"
    assert [(r["strategy"], r["round"]) for r in result["rounds"]] == [
        (s, n) for s in ("fedavg", "fedprox", "fednova") for n in (1, 2)
    ]
    for row in result["rounds"]:
        assert set(row) >= {"round", "strategy", "loss", "accuracy", "clients", "steps"}
        assert row["clients"] == [0, 1] and row["steps"] == [2, 8]
    assert set(result["final"]) == {"fedavg", "fedprox", "fednova"}
    for figures in result["final"].values():
        assert (
            set(figures) == {"loss", "accuracy", "distance_to_optimum"} and figures["distance_to_optimum"] > 0
        )
    for name in ("fedavg", "fedprox", "fednova"):
        assert (tmp_path / f"w-{name}.safetensors").is_file()


def test_fl_command_with_secure_aggregation_trains_and_reports_every_client(tmp_path):
    cluster_file = ROOT / "examples" / "clusters" / "tiny-2.yaml"
    args = ("--task", "quadratic", "--cluster", str(cluster_file), "--rounds", "2", "--local-steps", "2-8")
    secure = _partita("fl", *args, "--strategy", "fednova", "--secure-aggregation", "--json", cwd=tmp_path)
    task = get_task("quadratic", num_clients=2, seed=0)
    profiles = {0: ClientProfile(local_steps=2, lr=0.1), 1: ClientProfile(local_steps=8, lr=0.1)}
    plain = run_in_process(task, FedNova(), 2, profiles=profiles, seed=0)

    assert secure.returncode == 0, secure.stderr
    rows = json.loads(secure.stdout)["rounds"]
    assert [(r["clients"], r["steps"], r["dropped"]) for r in rows] == [([0, 1], [2, 8], {})] * 2
    ours = json.loads(secure.stdout)["final"]["fednova"]["distance_to_optimum"]
    assert ours == pytest.approx(plain.final.metrics["distance_to_optimum"], abs=1e-6)


def test_digits_weights_trained_by_fl_load_through_a_model_reference(tmp_path):
    from safetensors.torch import load_file

    from partita.model import load_ref

    cluster_file = ROOT / "examples" / "clusters" / "tiny-2.yaml"
    done = _partita(
        "fl",
        "--task",
        "digits",
        "--cluster",
        str(cluster_file),
        "--strategy",
        "fedavg",
        "--rounds",
        "1",
        "--local-steps",
        "3",
        "--json",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    path = tmp_path / "partita-fl-digits-fedavg.safetensors"
    trained = load_file(str(path))
    initial = get_task("digits", num_clients=2, seed=0).model().state_dict()

    model = load_ref(f"partita.fl.tasks.digits:SmallCNN?weights={path}")

    assert set(model.state_dict()) == set(trained)
    assert all(torch.equal(model.state_dict()[k], trained[k]) for k in trained)
    assert not torch.equal(trained["head.weight"], initial["head.weight"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--strategy", "fedsgd"], "Unknown strategy"),
        (["--strategy", "fedavg", "--local-steps", "8-2"], "--local-steps"),
        (["--strategy", "fedavg", "--task", "nonesuch"], "nonesuch"),
    ],
)
def test_fl_command_rejects_bad_options_with_one_line(args, message, capsys):
    from partita.cli import main

    base = {
        "--task": "quadratic",
        "--cluster": str(ROOT / "examples" / "clusters" / "tiny-2.yaml"),
        "--rounds": "1",
    }
    for key, value in zip(args[::2], args[1::2], strict=True):
        base[key] = value
    with pytest.raises(SystemExit) as exit_info:
        main(["fl", *[item for pair in base.items() for item in pair]])

    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
