"""Hostile input is refused: unauthorized keys, tampered archives, pickles, and messages past the limits.

Every test talks to real `partita worker` processes on free loopback ports, with CURVE keys made for
the test, through sockets the test owns, so every byte on the wire is the test's choice. After each
refusal the worker is checked to be alive and still serving its authorized coordinator correctly.
The coordinator's own result socket is attacked through a real `deploy` on a `LocalCluster`.
"""

from __future__ import annotations

import functools
import io
import json
import os
import pickle
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import msgpack
import pytest
import torch
import zmq
from torch import nn

from partita.errors import ModelRefError, StageFormatError, WireError, WorkerError
from partita.model import capture, load_ref, split
from partita.model.stage import StageProgram
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
from partita.runtime.worker import CONTROL_KINDS

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]  # workers run one thread

MAX_FRAME_BYTES = 2**20
MAX_TENSORS = 8
MAX_IN_FLIGHT = 3
MEMORY = "512KiB"
SILENCE_S = 1.0  # how long an unauthorized peer waits for an answer that must never come


# -- a worker process and the test's sockets to it ----------------------------------------------
def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


@functools.cache
def tiny_program() -> StageProgram:
    """The tiny model as one stage program (captured once: capture costs seconds)."""
    (program,) = split(capture(tiny_model(), (torch.randn(3, 16),)), [])
    return program


@functools.cache
def zeros_program() -> StageProgram:
    """A program of the same signature that answers zeros: what an attacker would like to load."""
    model = nn.Sequential(nn.Linear(16, 8)).eval()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
    (program,) = split(capture(model, (torch.randn(3, 16),)), [])
    return program


class WorkerProcess:
    """A `partita worker` subprocess with fresh keys; `control`/`data` are the authorized coordinator's sockets."""

    def __init__(self, tmp: Path, *, name: str = "w", extra: tuple[str, ...] = ()) -> None:
        keys_dir = tmp / "keys"
        coordinator_pub, coordinator_secret = new_keypair(keys_dir, "coordinator")
        _, worker_secret = new_keypair(keys_dir, name)
        self.coordinator = Keypair(*load_secret(coordinator_secret))
        self.worker_public = load_secret(worker_secret)[0]
        ready = tmp / f"{name}.ready"
        self.log = tmp / f"{name}.log"
        args = [
            sys.executable, "-m", "partita.commands.worker", "--listen", "tcp://127.0.0.1:0", "--name", name,
            "--secret-key", str(worker_secret), "--authorized-keys", str(coordinator_pub), "--device", "cpu",
            "--threads", "1", "--ready-file", str(ready), *extra,
        ]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"worker did not start:\n{self.log.read_text()}")
            time.sleep(0.05)
        self.info = json.loads(ready.read_text())
        self.ctx = zmq.Context()
        self.endpoint = WorkerEndpoint(name, self.info["control"], self.worker_public)
        self.control = ControlClient(self.ctx, self.endpoint, self.coordinator, timeout_s=15)
        self.data = self.dealer(self.info["data"], identity=b"client/1")
        self.sink: zmq.Socket | None = None
        self.requests = iter(range(10**6, 2 * 10**6))

    def dealer(self, address: str, *, identity: bytes, keys: Keypair | None = None, plain: bool = False) -> zmq.Socket:
        """A DEALER to one of the worker's sockets: the coordinator's key unless `keys`; no CURVE if `plain`."""
        keys = keys or self.coordinator
        sock = self.ctx.socket(zmq.DEALER)
        sock.identity = identity
        sock.linger = 0
        if plain:
            apply_client(sock, None, None, insecure=True)
        else:
            apply_client(sock, (keys.public, keys.secret), self.worker_public)
        sock.connect(address)
        return sock

    def deploy(self, program: StageProgram | None = None) -> None:
        """Load `program` (the tiny model) as stage 0 and route its outputs to a sink the test owns."""
        program = program or tiny_program()
        self.control.call("load", {"stage": 0, "sha256": program.sha256, "memory_bytes": 0.0},
                          [blob_tensor(program.to_bytes())])
        if self.sink is None:
            self.sink = self.ctx.socket(zmq.ROUTER)
            self.sink.linger = 0
            self.sink.router_handover = 1  # a re-route reconnects with the same identity, as to the coordinator
            apply_server(self.sink, (self.coordinator.public, self.coordinator.secret), [self.worker_public])
            self.sink.bind("tcp://127.0.0.1:*")
        self.route(self.sink.last_endpoint.decode(), self.coordinator.public)

    def route(self, address: str, public_key: bytes) -> None:
        self.control.call("route", {
            "epoch": 1, "window": 4, "codec": "none", "peers": [],
            "stages": [{"stage": 0, "next": [{"name": "client", "address": address, "public_key": public_key.decode()}]}],
        })

    def serves_correctly(self) -> bool:
        """The worker is alive, answers a ping, and computes a fresh request bit-identically to the model."""
        assert self.proc.poll() is None, f"the worker died:\n{self.log.read_text()}"
        assert self.control.call("ping").kind == "pong"
        model, x, request = tiny_model(), torch.randn(5, 16), next(self.requests)
        self.data.send_multipart(act(x, request), copy=False)
        result = next_result(self.sink, request=request)
        return result.kind == "act" and torch.equal(result.tensors[0], model(x))

    def counters(self) -> dict:
        return self.control.call("stats").header["counters"]

    def close(self) -> None:
        self.control.close()
        self.data.close(linger=0)
        if self.sink is not None:
            self.sink.close(linger=0)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        stop_auth(self.ctx)
        self.ctx.destroy(linger=0)


def act(x: torch.Tensor, request: int, *, epoch: int = 1) -> list:
    return encode("act", {"r": request, "e": epoch, "s": 0, "ts": time.time()}, [x])


def recv(sock: zmq.Socket, timeout_s: float = 10.0, *, router: bool = False):
    assert sock.poll(timeout_s * 1000), "no reply within the timeout"
    frames = sock.recv_multipart(copy=False)
    return decode(frames[1:] if router else frames)


def replies(sock: zmq.Socket, timeout_s: float = 0.3) -> list:
    """Every message waiting on a DEALER now (or arriving within `timeout_s` of the last one)."""
    out = []
    while sock.poll(timeout_s * 1000):
        out.append(decode(sock.recv_multipart(copy=False)))
    return out


def next_result(sink: zmq.Socket, *, request: int | None = None, timeout_s: float = 15.0):
    """The next `act` or `fail` reaching the sink (for `request`, if given); others are skipped.

    Like the coordinator, the sink returns a credit for every message it takes, so the worker may send more.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert sink.poll(max(deadline - time.monotonic(), 0.01) * 1000), "no result reached the sink"
        frames = sink.recv_multipart(copy=False)
        msg = decode(frames[1:])
        if msg.kind in ("act", "fail"):
            sink.send_multipart([frames[0].bytes, *encode("credit", {"n": 1})])
            if request is None or msg.header.get("r") == request:
                return msg
    raise AssertionError("no result reached the sink")


def send_unauthorized(sock: zmq.Socket, frames: list) -> None:
    """Send without blocking: a peer whose handshake was refused may have no connection to queue on."""
    try:
        sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
    except zmq.Again:
        pass  # nothing could be queued, which is itself the refusal


def assert_silent(sock: zmq.Socket, timeout_s: float = SILENCE_S) -> None:
    """Nothing ever comes back on `sock`: its handshake was refused, so nothing it sent arrived."""
    assert not sock.poll(timeout_s * 1000), "an unauthorized peer got an answer"


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    proc = WorkerProcess(
        tmp_path_factory.mktemp("secure-worker"),
        extra=("--memory", MEMORY, "--max-frame-bytes", str(MAX_FRAME_BYTES), "--max-tensors", str(MAX_TENSORS),
               "--max-in-flight", str(MAX_IN_FLIGHT)),
    )
    proc.deploy()
    yield proc
    proc.close()


# -- 1. CURVE on every socket: a peer without an authorized key gets nothing done -----------------
def _attackers(worker: WorkerProcess, address: str) -> dict[str, zmq.Socket]:
    """Peers that lack an authorized key: a stranger's CURVE key, and no CURVE at all."""
    return {
        "stranger key": worker.dealer(address, identity=b"mallory/1", keys=Keypair(*ephemeral_keypair())),
        "no key": worker.dealer(address, identity=b"mallory/2", plain=True),
    }


def test_a_peer_without_an_authorized_key_cannot_send_any_control_command(worker):
    evil = zeros_program()
    refused_before = worker.counters()["refused_keys"]
    attackers = _attackers(worker, worker.info["control"])
    for sock in attackers.values():
        for kind in sorted(CONTROL_KINDS):
            header = {"id": 1, "stage": 0, "sha256": evil.sha256, "epoch": 99, "window": 1, "peers": [],
                      "stages": [], "speed": 1e-6, "programs": [], "address": "tcp://127.0.0.1:1"}
            tensors = [blob_tensor(evil.to_bytes())] if kind == "load" else []
            send_unauthorized(sock, encode(kind, header, tensors))
    for sock in attackers.values():
        assert_silent(sock)
        sock.close(linger=0)
    stats = worker.control.call("stats").header
    assert stats["epoch"] == 1, "an unauthorized route changed the deployment"
    assert stats["counters"]["refused_keys"] > refused_before
    assert worker.serves_correctly(), "an unauthorized load/emulate/drain took effect"


def test_a_peer_without_an_authorized_key_cannot_send_activations(worker):
    before = worker.control.call("stats").header["stages"]["0"]["requests"]
    for sock in _attackers(worker, worker.info["data"]).values():
        send_unauthorized(sock, act(torch.randn(2, 16), 424242))
        send_unauthorized(sock, encode("echo", {}, [torch.zeros(4)]))
        assert_silent(sock)
        sock.close(linger=0)
    assert not worker.sink.poll(200), "an unauthorized activation produced a result"
    assert worker.control.call("stats").header["stages"]["0"]["requests"] == before
    assert worker.serves_correctly()


def test_results_reach_only_the_holder_of_the_coordinators_secret_key(worker):
    """An impostor at the result address (its own key, or no CURVE) never receives a result."""
    impostors = []
    for label in ("stranger key", "no key"):
        sock = worker.ctx.socket(zmq.ROUTER)
        sock.linger = 0
        if label == "no key":
            apply_server(sock, None, None, insecure=True)
        else:
            apply_server(sock, ephemeral_keypair(), [worker.worker_public])
        sock.bind("tcp://127.0.0.1:*")
        impostors.append(sock)
        # The worker is told (say by a spoofed address) to send to the impostor, expecting the coordinator's key.
        worker.route(sock.last_endpoint.decode(), worker.coordinator.public)
        worker.data.send_multipart(act(torch.randn(2, 16), next(worker.requests)), copy=False)
        # A result computed after the handshake was refused meets a DEALER with no pipe left: the
        # worker must keep it queued rather than block its event loop on the send.
        time.sleep(0.5)
        worker.data.send_multipart(act(torch.randn(2, 16), next(worker.requests)), copy=False)
        assert_silent(sock)
        assert worker.control.call("ping").kind == "pong", "a refused next hop stalled the worker"
    for sock in impostors:
        sock.close(linger=0)
    worker.deploy()
    assert worker.serves_correctly()


def test_a_worker_without_keys_refuses_to_start_unless_explicitly_insecure(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "partita.commands.worker", "--listen", "tcp://127.0.0.1:0", "--name", "w"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert "--secret-key" in done.stderr and "--insecure" in done.stderr


# -- 2. stage archives are checked by sha256, through the worker's load command -------------------
def test_a_stage_archive_whose_sha256_does_not_match_is_refused_by_the_worker(worker):
    program = zeros_program()
    data = bytearray(program.to_bytes())
    data[len(data) // 2] ^= 0xFF
    for sha, archive in [("0" * 64, program.to_bytes()), (program.sha256, bytes(data))]:
        with pytest.raises(WorkerError, match="sha256"):
            worker.control.call("load", {"stage": 0, "sha256": sha, "memory_bytes": 0.0}, [blob_tensor(archive)])
    assert worker.serves_correctly(), "a refused archive replaced the loaded stage"


# -- 3. no pickle anywhere ---------------------------------------------------------------------
class _System:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Open:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _pickles(marker: Path) -> dict[str, bytes]:
    """Payloads that create `marker` when unpickled, in the forms a loader might meet them."""
    buffer = io.BytesIO()
    torch.save({"x": _System(marker)}, buffer)  # a torch.save zip whose data.pkl is the exploit
    return {
        "os.system": pickle.dumps(_System(marker), protocol=2),
        "open": pickle.dumps(_Open(marker), protocol=4),
        "torch.save": buffer.getvalue(),
        "pt2 sample inputs": _archive_with(tiny_program().to_bytes(), _pickled_sample_inputs(marker)),
        "pt2 weights": _archive_with(tiny_program().to_bytes(), _pickled_weights(marker)),
    }


def _pickled_sample_inputs(marker: Path):
    def change(name: str, data: bytes) -> bytes:
        return pickle.dumps(_System(marker)) if "sample_inputs/" in name else data
    return change


def _pickled_weights(marker: Path):
    """Weights declared `use_pickle` (torch.export.load would torch.load them with weights_only=False)."""
    def change(name: str, data: bytes) -> bytes:
        if name.endswith("weights_config.json"):
            return data.replace(b'"use_pickle": false', b'"use_pickle": true')
        return pickle.dumps(_Open(marker)) if "/weights/weight_" in name else data
    return change


def _archive_with(archive: bytes, change) -> bytes:
    """`archive` with each entry's bytes passed through `change(name, data)`."""
    source, out = zipfile.ZipFile(io.BytesIO(archive)), io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            target.writestr(info, change(info.filename, source.read(info.filename)))
    return out.getvalue()


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "a pickle was executed"


def test_pickled_headers_and_tensors_are_refused_on_the_workers_control_and_data_sockets(worker, marker):
    import hashlib

    payloads = _pickles(marker)
    before = worker.counters()
    for sock in (worker.control._socket, worker.data):
        replies(sock, 0.05)  # credits left over from earlier requests
        for label, payload in payloads.items():
            # As the header frame; as a tensor frame under a header that claims a pickled dtype.
            for frames in ([payload], [payload, payload],
                           [msgpack.packb({"v": 1, "kind": "act", "h": {"r": 1, "e": 1, "s": 0},
                                           "t": [{"dtype": "object", "shape": [len(payload)], "codec": "none",
                                                  "nbytes": len(payload)}]}), payload]):
                sock.send_multipart(frames)
                assert recv(sock).kind == "error", label
    # As a stage archive, with its true sha256 so that only the archive check stands in the way.
    for payload in payloads.values():
        sha = hashlib.sha256(payload).hexdigest()
        with pytest.raises(WorkerError, match="archive"):
            worker.control.call("load", {"stage": 0, "sha256": sha, "memory_bytes": 0.0}, [blob_tensor(payload)])
        with pytest.raises(WorkerError, match="archive"):
            worker.control.call("profile", {"programs": [sha], "reps": 1}, [blob_tensor(payload), torch.randn(1, 16)])
    after = worker.counters()
    assert after["malformed"] - before["malformed"] == 2 * 3 * len(payloads)
    assert after["control_errors"] - before["control_errors"] == 2 * len(payloads)
    assert worker.serves_correctly()


def test_pickles_are_refused_by_decode_and_stage_loading(marker):
    for payload in _pickles(marker).values():
        with pytest.raises(WireError):
            decode([payload])
        with pytest.raises(StageFormatError):
            StageProgram.from_bytes(payload)


def test_load_ref_of_a_crafted_pt2_is_refused_without_running_its_pickle(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt2"
    path.write_bytes(_pickles(marker)["pt2 sample inputs"])
    with pytest.raises(ModelRefError):
        load_ref(str(path))
    assert not marker.exists(), "load_ref executed a pickle from a .pt2 file"


# -- 4. limits, each configurable on `partita worker` ------------------------------------------
def test_a_frame_over_max_frame_bytes_is_refused(worker):
    big = torch.zeros(MAX_FRAME_BYTES // 4 + 1)
    for sock in (worker.control._socket, worker.data):
        replies(sock, 0.05)
        sock.send_multipart(encode("echo" if sock is worker.data else "ping", {}, [big]), copy=False)
        reply = recv(sock)
        assert reply.kind == "error" and f"the limit is {MAX_FRAME_BYTES}" in reply.header["reason"]
    assert worker.serves_correctly()


def test_a_message_over_max_tensors_is_refused(worker):
    replies(worker.data, 0.05)
    worker.data.send_multipart(encode("echo", {}, [torch.zeros(1)] * (MAX_TENSORS + 1)), copy=False)
    reply = recv(worker.data)
    assert reply.kind == "error" and f"the limit is {MAX_TENSORS}" in reply.header["reason"]
    worker.data.send_multipart(encode("echo", {}, [torch.zeros(1)] * MAX_TENSORS), copy=False)
    assert recv(worker.data).kind == "echo"


def test_requests_past_max_in_flight_are_refused_and_failed_downstream(worker):
    worker.control.call("emulate", {"speed": 0.002})  # ~20 ms+ per request: a flood piles up
    try:
        replies(worker.data, 0.05)
        x, flood = torch.randn(2, 16), [5 * 10**6 + i for i in range(MAX_IN_FLIGHT + 5)]
        for request in flood:  # ignoring credits, as a hostile sender would
            worker.data.send_multipart(act(x, request), copy=False)
        outcomes = {}
        while len(outcomes) < len(flood):
            msg = next_result(worker.sink)
            outcomes[msg.header["r"]] = msg.kind
        errors = [m for m in replies(worker.data, 0.5) if m.kind == "error"]
    finally:
        worker.control.call("emulate", {"speed": None})
    refused = [r for r, kind in outcomes.items() if kind == "fail"]
    assert refused, "no request was refused past --max-in-flight"
    assert len(outcomes) - len(refused) >= MAX_IN_FLIGHT
    assert any("in flight" in e.header["reason"] for e in errors)
    assert worker.serves_correctly()


def test_a_stage_larger_than_the_workers_memory_is_refused(worker):
    big = nn.Sequential(nn.Linear(256, 768)).eval()  # 0.75 MiB of weights on a 0.5 MiB worker
    (program,) = split(capture(big, (torch.randn(1, 256),)), [])
    with pytest.raises(WorkerError, match=r"stage 1 needs 0\.8 MiB \(its archive\) but worker w has"):
        worker.control.call("load", {"stage": 1, "sha256": program.sha256, "memory_bytes": 0.0},
                            [blob_tensor(program.to_bytes())])
    small = tiny_program()
    with pytest.raises(WorkerError, match=r"stage 1 needs 4\.0 MiB \(weights \+ activations\) but worker w has"):
        worker.control.call("load", {"stage": 1, "sha256": small.sha256, "memory_bytes": 4.0 * 2**20},
                            [blob_tensor(small.to_bytes())])
    assert worker.control.call("stats").header["stages"].keys() == {"0"}
    assert worker.serves_correctly()


# -- the coordinator's result socket, on a real deployment -------------------------------------
@pytest.fixture(scope="module")
def pipeline():
    import partita
    from partita.cluster import ClusterSpec
    from partita.runtime.coordinator import deploy

    spec = ClusterSpec.from_dict({
        "source": "client",
        "devices": [{"name": "a", "flops_per_s": 1e9, "memory_bytes": 2**30, "speed": 1.0}],
        "links": {"default": {"bandwidth": "1GB/s", "latency": "0.1ms"}},
    })
    model, x = tiny_model(), torch.randn(3, 16)
    with partita.LocalCluster(spec, host_flops=1e9) as cluster:
        with deploy(model, (x,), cluster, planner="single", reps=1) as pipe:
            yield cluster, pipe, model


def test_curve_is_on_every_socket_of_a_default_deployment(pipeline):
    cluster, pipe, _ = pipeline
    assert cluster.coordinator_keys is not None and cluster.endpoints["a"].public_key is not None
    ctx = zmq.Context()
    client = ControlClient(ctx, cluster.endpoints["a"], cluster.coordinator_keys, timeout_s=15)
    try:
        info = client.call("hello").header
    finally:
        client.close()
        stop_auth(ctx)
        ctx.term()
    assert info["secure"] is True
    assert pipe._results.curve_server == 1
    assert all(sock.getsockopt(zmq.MECHANISM) == zmq.CURVE for sock, _ in pipe._first_links)


def test_the_coordinators_result_socket_refuses_strangers_and_pickles(pipeline, marker):
    cluster, pipe, model = pipeline
    address = pipe._results.last_endpoint.decode()
    server_key = cluster.coordinator_keys.public
    ctx = zmq.Context()
    try:
        socks = []
        for keys in (ephemeral_keypair(), None):  # a stranger's key; no CURVE at all
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            apply_client(sock, keys, server_key if keys else None, insecure=keys is None)
            sock.connect(address)
            fake = encode("act", {"r": 0, "e": pipe.deployment.epoch, "s": 1}, [torch.zeros(3, 8)])
            send_unauthorized(sock, fake)
            socks.append(sock)
        for sock in socks:
            assert_silent(sock)
        # The authorized last-stage worker's key gets through the handshake, and its pickles are refused.
        worker_secret = cluster._dir / "keys" / "worker-a.key_secret"
        insider = ctx.socket(zmq.DEALER)
        insider.linger = 0
        apply_client(insider, worker_secret, server_key)
        insider.connect(address)
        socks.append(insider)
        for payload in _pickles(marker).values():
            insider.send_multipart([payload])
            assert recv(insider).kind == "error"
        for sock in socks:
            sock.close(linger=0)
    finally:
        stop_auth(ctx)
        ctx.destroy(linger=0)
    x = torch.randn(3, 16)
    assert torch.equal(pipe(x, timeout_s=30), model(x))
