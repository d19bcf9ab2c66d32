"""The worker process on its own: it runs a stage, refuses what it must, survives bad input, drains on SIGTERM.

Each test talks to a real `partita worker` process on a free loopback port, with CURVE keys made for
the test, through sockets the test owns (a DEALER for control, a DEALER for activations and a ROUTER
standing in for the next hop), so every byte on the wire is the test's choice.
"""

from __future__ import annotations

import functools
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import psutil
import pytest
import torch
import zmq
from torch import nn

from partita.errors import WorkerError
from partita.model import capture, split
from partita.runtime.control import ControlClient
from partita.runtime.handle import Keypair, WorkerEndpoint
from partita.runtime.keys import (
    apply_client,
    apply_server,
    ephemeral_keypair,
    load_secret,
    new_keypair,
    stop_auth,
)
from partita.runtime.wire import blob_tensor, decode, encode

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]  # workers run one thread

MAX_FRAME_BYTES = 2**20


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


class WorkerProcess:
    """A `partita worker` subprocess with fresh keys; `control` and `data` are the test's sockets to it."""

    def __init__(self, tmp: Path, *, name: str = "w", extra: tuple[str, ...] = ()) -> None:
        self.keys_dir = tmp / "keys"
        coordinator_pub, coordinator_secret = new_keypair(self.keys_dir, "coordinator")
        _, worker_secret = new_keypair(self.keys_dir, name)
        self.coordinator = Keypair(*load_secret(coordinator_secret))
        self.worker_public = load_secret(worker_secret)[0]
        ready = tmp / f"{name}.ready"
        self.log = tmp / f"{name}.log"
        args = [
            sys.executable, "-m", "partita.commands.worker", "--listen", "tcp://127.0.0.1:0", "--name", name,
            "--secret-key", str(worker_secret), "--authorized-keys", str(coordinator_pub), "--device", "cpu",
            "--threads", "1", "--ready-file", str(ready), "--max-frame-bytes", str(MAX_FRAME_BYTES), *extra,
        ]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start:\n{self.log.read_text()}")
            time.sleep(0.05)
        self.info = json.loads(ready.read_text())
        self.ctx = zmq.Context()
        self.endpoint = WorkerEndpoint(name, self.info["control"], self.worker_public)
        self.control = ControlClient(self.ctx, self.endpoint, self.coordinator, timeout_s=10)
        self.data = self.dealer(self.info["data"], identity=b"client/1")

    def dealer(self, address: str, *, identity: bytes, keys: Keypair | None = None) -> zmq.Socket:
        keys = keys or self.coordinator
        sock = self.ctx.socket(zmq.DEALER)
        sock.identity = identity
        sock.linger = 0
        apply_client(sock, (keys.public, keys.secret), self.worker_public)
        sock.connect(address)
        return sock

    def sink(self) -> tuple[zmq.Socket, str]:
        """A ROUTER playing the coordinator's result socket (accepts the worker's key)."""
        sock = self.ctx.socket(zmq.ROUTER)
        sock.linger = 0
        apply_server(sock, (self.coordinator.public, self.coordinator.secret), [self.worker_public])
        sock.bind("tcp://127.0.0.1:*")
        return sock, sock.last_endpoint.decode()

    def close(self) -> None:
        self.control.close()
        self.data.close(linger=0)
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
        stop_auth(self.ctx)
        self.ctx.term()


def recv(sock: zmq.Socket, timeout_s: float = 10.0, *, router: bool = False):
    assert sock.poll(timeout_s * 1000), "no reply within the timeout"
    frames = sock.recv_multipart(copy=False)
    return decode(frames[1:] if router else frames)


@functools.cache
def tiny_program():
    """The tiny model as one stage program (captured once: capture costs seconds)."""
    (program,) = split(capture(tiny_model(), (torch.randn(3, 16),)), [])
    return program


def deploy_one_stage(worker: WorkerProcess, model: nn.Module, x: torch.Tensor, *, load: bool = True) -> zmq.Socket:
    """Load the whole (tiny) model as stage 0 (unless `load` is False) and route its output to a sink the test owns."""
    program = tiny_program()
    if load:
        worker.control.call("load", {"stage": 0, "sha256": program.sha256, "memory_bytes": 0.0},
                            [blob_tensor(program.to_bytes())])
    sink, address = worker.sink()
    worker.control.call("route", {
        "epoch": 1, "window": 4, "codec": "none", "peers": [],
        "stages": [{"stage": 0, "next": [{"name": "client", "address": address,
                                          "public_key": worker.coordinator.public.decode()}]}],
    })
    return sink


def act(x: torch.Tensor, request: int) -> list:
    return encode("act", {"r": request, "e": 1, "s": 0, "ts": time.time()}, [x])


def next_result(sink: zmq.Socket, timeout_s: float = 10.0):
    """The next `act` or `fail` reaching the sink (credits and other replies are skipped)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        msg = recv(sink, deadline - time.monotonic(), router=True)
        if msg.kind in ("act", "fail"):
            return msg
    raise AssertionError("no result reached the sink")


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    proc = WorkerProcess(tmp_path_factory.mktemp("worker"), extra=("--memory", "256KiB"))
    yield proc
    proc.close()


def test_worker_reports_what_it_is(worker):
    info = worker.control.call("hello").header
    assert info["name"] == "w"
    assert info["device"] == "cpu"
    assert info["memory_bytes"] == 256 * 2**10
    assert info["flops_per_s"] > 0
    assert info["secure"] is True


def test_worker_runs_a_stage_bit_identically(worker):
    model, x = tiny_model(), torch.randn(3, 16)
    sink = deploy_one_stage(worker, model, x)
    worker.data.send_multipart(act(x, 7), copy=False)
    result = next_result(sink)
    assert result.kind == "act" and result.header["r"] == 7 and result.header["s"] == 1
    assert torch.equal(result.tensors[0], model(x))
    sink.close(linger=0)


def test_renumber_moves_a_loaded_stage_and_refuses_what_it_cannot_move(worker):
    program = tiny_program()
    worker.control.call("unload", {"stages": None})
    worker.control.call("load", {"stage": 2, "sha256": program.sha256, "memory_bytes": 0.0},
                        [blob_tensor(program.to_bytes())])
    for moves, reason in (
        ([[5, 1]], r"cannot renumber stages \[5\]: not loaded here"),
        ([[2, 1, 0]], "a list of \\[old, new\\] stage index pairs"),
        ("2->1", "a list of \\[old, new\\] stage index pairs"),
    ):
        with pytest.raises(WorkerError, match=reason):
            worker.control.call("renumber", {"moves": moves})
    assert worker.control.call("renumber", {"moves": [[2, 0]]}).header["stages"] == [0]
    model, x = tiny_model(), torch.randn(3, 16)
    sink = deploy_one_stage(worker, model, x, load=False)  # stage 0 is the renumbered stage 2
    worker.data.send_multipart(act(x, 8), copy=False)
    assert torch.equal(next_result(sink).tensors[0], model(x))
    sink.close(linger=0)


def _mutated(frames: list, change) -> list:
    head = msgpack.unpackb(frames[0], raw=False)
    change(head)
    return [msgpack.packb(head, use_bin_type=True), *frames[1:]]


def test_malformed_frames_get_error_replies_and_the_worker_survives(worker):
    x = torch.randn(10, 16)
    good = act(x, 1)
    cases = {
        "wrong size": [good[0], bytes(memoryview(good[1]))[:-4]],
        "unknown dtype": _mutated(good, lambda h: h["t"][0].update(dtype="complex999")),
        "truncated": _mutated(good, lambda h: h["t"].append(dict(h["t"][0])))[:2],
        "oversized": encode("act", {"r": 2, "e": 1, "s": 0}, [torch.zeros(MAX_FRAME_BYTES // 4 + 16)]),
        "not msgpack": [b"\xc1\xc1garbage"],
        "wrong shape": encode("act", {"r": 3, "e": 1, "s": 0}, [torch.randn(2, 5)]),
    }
    while worker.data.poll(200):  # credits left over from earlier requests
        worker.data.recv_multipart()
    before = worker.control.call("stats").header["counters"]
    for label, frames in cases.items():
        worker.data.send_multipart(frames, copy=False)
        reply = recv(worker.data)
        assert reply.kind == "error", label
        assert reply.header["reason"], label
        while worker.data.poll(200):  # a refused act also returns its credit
            worker.data.recv_multipart()
    worker.control._socket.send_multipart([b"not a message at all"])
    assert decode(worker.control._socket.recv_multipart()).kind == "error"
    after = worker.control.call("stats").header["counters"]
    assert after["malformed"] - before["malformed"] == 6
    assert after["rejected"] - before["rejected"] == 1
    assert worker.proc.poll() is None
    # ... and it still serves a correct request.
    model = tiny_model()
    sink = deploy_one_stage(worker, model, x)
    worker.data.send_multipart(act(x, 9), copy=False)
    assert torch.equal(next_result(sink).tensors[0], model(x))
    sink.close(linger=0)


def test_a_stage_larger_than_the_device_memory_is_refused(worker):
    big = nn.Sequential(nn.Linear(256, 512)).eval()  # 0.5 MiB of weights on a 256 KiB worker
    (program,) = split(capture(big, (torch.randn(1, 256),)), [])
    with pytest.raises(WorkerError, match=r"stage 0 needs 0\.5 MiB .* but worker w has"):
        worker.control.call("load", {"stage": 0, "sha256": program.sha256, "memory_bytes": 0.0},
                            [blob_tensor(program.to_bytes())])


def test_a_tampered_stage_archive_is_refused(worker):
    program = tiny_program()
    with pytest.raises(WorkerError, match="sha256"):
        worker.control.call("load", {"stage": 0, "sha256": "0" * 64, "memory_bytes": 0.0},
                            [blob_tensor(program.to_bytes())])


def test_a_wrong_coordinator_key_is_refused(worker):
    stranger = Keypair(*ephemeral_keypair())
    client = ControlClient(worker.ctx, worker.endpoint, stranger, timeout_s=1.5)
    try:
        with pytest.raises(WorkerError, match="did not answer"):
            client.call("hello")
    finally:
        client.close()
    assert worker.control.call("stats").header["counters"]["refused_keys"] >= 1


def test_activations_from_an_unnamed_peer_are_refused(worker):
    stranger = Keypair(*ephemeral_keypair())
    sock = worker.dealer(worker.info["data"], identity=b"stranger/1", keys=stranger)
    sock.send_multipart(act(torch.randn(1, 16), 1), copy=False)
    assert not sock.poll(1000)
    sock.close(linger=0)


def test_sigterm_drains_requests_in_flight_then_exits_cleanly(worker):
    """Last in this module: it stops the module's worker."""
    model, x = tiny_model(), torch.randn(3, 16)
    sink = deploy_one_stage(worker, model, x)
    worker.control.call("emulate", {"speed": 0.002})  # tens of ms per request: still in flight at SIGTERM
    for request in range(3):
        worker.data.send_multipart(act(x, request), copy=False)
    time.sleep(0.02)
    worker.proc.send_signal(signal.SIGTERM)
    answered = {next_result(sink, 20).header["r"] for _ in range(3)}
    assert answered == {0, 1, 2}
    assert worker.proc.wait(timeout=20) == 0
    assert not psutil.pid_exists(worker.proc.pid) or psutil.Process(worker.proc.pid).status() == psutil.STATUS_ZOMBIE
    sink.close(linger=0)
