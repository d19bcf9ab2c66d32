"""The worker process: a long-running server that runs stages for whichever coordinator deploys to it.

Sockets (all CURVE unless `--insecure`):

* **control** — a ROUTER bound at `--listen`. Only the coordinator keys the worker was given may
  connect. Request/reply: the commands of `partita.runtime.protocol` (`hello`, `ping`, `load`,
  `renumber`, `allow`, `route`, `unload`, `profile`, `probe`, `emulate`, `stats`, `drain`), plus
  the long jobs a higher layer adds (`WorkerConfig.jobs`, e.g. federated training's `fl-train`).
* **data** — a ROUTER bound on the same host, any free port (reported by `hello`): activations in,
  credits back (`partita.runtime.dataplane`).
* **outlinks** — a DEALER per downstream destination (next stage's replicas, or the coordinator's
  result socket), each behind an `Outlink` (credits, then the emulated link).

The worker is three pieces: this module owns the sockets and the I/O loop; `DataPlane` moves
activations; `ControlHandlers` answers commands through a table keyed by command type. The
executor's compute thread runs stages (`executor.py`); it meets the I/O thread in a queue plus
an inproc wake-up socket. Every frame goes through `wire.decode` with the worker's limits, and
every command through `protocol.command_from`: a malformed message gets an `error` reply and a
counter, never a crash.
"""

from __future__ import annotations

import gc
import json
import math
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import zmq

from partita.errors import PartitaError, WireError
from partita.runtime.dataplane import DataPlane, DataSettings
from partita.runtime.executor import StageExecutor, resolve_device
from partita.runtime.flow import next_wakeup, readable, send_frames
from partita.runtime.handle import Keypair
from partita.runtime.handlers import SLOW, ControlHandlers, WorkerIdentity
from partita.runtime.keys import apply_server, auth_stats, stop_auth
from partita.runtime.protocol import COMMAND_KINDS, COMMANDS, Error, Reply, command_from
from partita.runtime.wire import Limits, Message, decode, encode

# The commands every worker serves (the protocol's, less the jobs a higher layer must add).
CONTROL_KINDS = frozenset(k for k in COMMAND_KINDS if k != "fl-train")
DRAIN_TIMEOUT_S = 30.0
_WAKE = b"w"


@dataclass(frozen=True)
class WorkerConfig:
    """How a worker starts. `keys` None means insecure (no CURVE).

    `authorized` are the coordinator public keys (z85) allowed on the control socket. `speed` is the
    emulated speed relative to this host (None: run at native speed); `dilation` is how many times
    slower than device time the emulated world runs. `memory_bytes` None means the machine's
    available memory. `ready_file`: where to write the bound endpoints as JSON once listening.
    """

    name: str
    listen: str
    keys: Keypair | None
    authorized: tuple[bytes, ...] = ()
    device: str = "auto"
    speed: float | None = None
    dilation: float = 1.0
    memory_bytes: float | None = None
    limits: Limits = field(default_factory=Limits)
    ready_file: str | None = None
    threads: int | None = None
    # Activations queued or running at once; more are refused (error + fail downstream), so a peer
    # that ignores its credits cannot make the worker buffer without bound.
    max_in_flight: int = 256
    # Extra control kinds served by long jobs (kind -> handler returning the reply's kind, header, tensors),
    # run off the I/O thread so heartbeats are answered meanwhile; how higher layers (e.g. federated
    # training, `fl-train`) use a worker without the runtime importing them. See `Worker._start_job`.
    jobs: Mapping[str, Callable[[Message], tuple[str, dict, tuple]]] = field(default_factory=dict)


def _ephemeral(address: str) -> str:
    """ZeroMQ binds a free port for `:*`; accept `:0` as the same."""
    return address[:-2] + ":*" if address.endswith(":0") else address


def _host_of(address: str) -> str:
    return address.rsplit(":", 1)[0]


def _error(exc: BaseException) -> Error:
    if isinstance(exc, PartitaError):
        return Error(str(exc), type(exc).__name__)
    return Error(f"{type(exc).__name__}: {exc}", "internal")


class Worker:
    """One worker. `serve()` runs its I/O loop in the calling thread until drained or stopped."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = resolve_device(config.device)
        self.counters: dict[str, int] = {"malformed": 0, "rejected": 0, "control_errors": 0, "downstream_errors": 0}
        # Filled by the compute and job threads, emptied by the I/O thread (deque's append and popleft are atomic).
        self._events: deque[tuple[str, Any]] = deque()
        capacity = config.memory_bytes if config.memory_bytes is not None else _available_memory(self.device)
        self.executor = StageExecutor(
            self.device,
            capacity_bytes=capacity,
            on_taken=lambda job: self._notify("taken", job),
            on_done=lambda done: self._notify("done", done),
            speed=config.speed,
            dilation=config.dilation,
        )
        self._stop = threading.Event()
        self._draining_since: float | None = None
        self.flops_per_s = 0.0
        self.flops_spread = 0.0
        self._secret = (config.keys.public, config.keys.secret) if config.keys is not None else None

    # -- lifecycle --------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Drain the requests in flight, then return from `serve` (safe from a signal handler)."""
        self._stop.set()

    def serve(self) -> None:
        """Bind, announce readiness, and run the I/O loop until stopped and drained."""
        from partita.runtime.profile import matmul_flops

        self.flops_per_s, self.flops_spread = matmul_flops(self.device)
        ctx = zmq.Context()
        self._ctx = ctx
        try:
            self._bind(ctx)
            self.data_plane = DataPlane(
                DataSettings(self.config.name, self.config.limits, self._secret, tuple(self.config.authorized),
                             self.config.max_in_flight),
                ctx, self._data, self.executor, self._reply, self.counters,
            )
            identity = WorkerIdentity(self.config.name, self.data_address, self._secret, self.config.limits,
                                      self.flops_per_s, self.flops_spread)
            self.handlers = ControlHandlers(identity, self.executor, self.data_plane, ctx,
                                            counters=self._figures_counters, stop=self.request_stop)
            self._announce()
            self.executor.start()
            # What exists now (torch and its imports: millions of objects) lives as long as the
            # process: out of the collector's sight, no collection pauses a request to walk it, and
            # the exit does not spend seconds collecting it once more on a loaded host.
            gc.freeze()
            self._loop()
        finally:
            self.executor.stop()
            # Drained: what is left to send is credits and replies; give them a moment, not more.
            if hasattr(self, "data_plane"):
                self.data_plane.close(linger_ms=500)
            for sock in (self._control, self._data, self._wake_in, self._wake_out):
                sock.close(linger=200)
            stop_auth(ctx)
            ctx.term()

    def _bind(self, ctx: zmq.Context) -> None:
        secret, authorized = self._secret, self.config.authorized or None
        insecure = secret is None
        self._control = ctx.socket(zmq.ROUTER)
        self._control.router_handover = 1
        apply_server(self._control, secret, authorized, insecure=insecure)
        self._control.bind(_ephemeral(self.config.listen))
        self.control_address = self._control.last_endpoint.decode()
        self._data = ctx.socket(zmq.ROUTER)
        self._data.router_handover = 1
        apply_server(self._data, secret, authorized, insecure=insecure)
        self._data.bind(_host_of(self.control_address) + ":*")
        self.data_address = self._data.last_endpoint.decode()
        self._wake_in = ctx.socket(zmq.PULL)
        self._wake_in.bind(f"inproc://wake-{id(self)}")
        self._wake_out = ctx.socket(zmq.PUSH)
        self._wake_out.connect(f"inproc://wake-{id(self)}")

    def _announce(self) -> None:
        info = {
            "name": self.config.name,
            "control": self.control_address,
            "data": self.data_address,
            "pid": os.getpid(),
            "public_key": self.config.keys.public.decode() if self.config.keys else None,
        }
        if self.config.ready_file:
            tmp = Path(self.config.ready_file + ".tmp")
            tmp.write_text(json.dumps(info))
            tmp.replace(self.config.ready_file)
        print(f"partita worker {self.config.name} listening on {self.control_address} (data {self.data_address})", flush=True)

    def _notify(self, what: str, item: Any) -> None:
        """Called from the compute thread: queue an event and wake the I/O loop."""
        self._events.append((what, item))
        self._wake_out.send(_WAKE)

    # -- the I/O loop -----------------------------------------------------------------------
    def _loop(self) -> None:
        poller = zmq.Poller()
        data_plane = self.data_plane
        while True:
            if data_plane.dirty:
                poller = self._make_poller()
            timeout_s = next_wakeup(data_plane.pump(), 0.1)
            ready = dict(poller.poll(math.ceil(max(timeout_s, 0.0) * 1000)))
            if self._control in ready:
                self._on_control()
            if self._data in ready:
                data_plane.on_data()
            if self._wake_in in ready:
                while readable(self._wake_in):
                    self._wake_in.recv()
            if self._events:
                self._drain_events()
            data_plane.on_outlinks(ready)
            if self._stop.is_set() and self._finished_draining():
                return

    def _make_poller(self) -> zmq.Poller:
        poller = zmq.Poller()
        for sock in (self._control, self._data, self._wake_in, *self.data_plane.sockets()):
            poller.register(sock, zmq.POLLIN)
        self.data_plane.dirty = False
        return poller

    def _finished_draining(self) -> bool:
        now = time.monotonic()
        if self._draining_since is None:
            self._draining_since = now
            print(f"partita worker {self.config.name}: draining requests in flight", flush=True)
        idle = self.executor.pending == 0 and not self._events and self.data_plane.idle()
        return idle or now - self._draining_since > DRAIN_TIMEOUT_S

    def _drain_events(self) -> None:
        events = self._events
        while events:
            what, item = events.popleft()
            if what == "taken":
                self.data_plane.on_taken(item)
            elif what == "job":
                sender, kind, header, tensors = item
                self.counters["control_errors"] += kind == "error"
                self._reply(self._control, sender, kind, header, tensors)
            else:
                self.data_plane.on_done(item)

    # -- control plane ----------------------------------------------------------------------
    def _on_control(self) -> None:
        while readable(self._control):
            frames = self._control.recv_multipart(copy=False)
            sender = frames[0].bytes
            try:
                msg = decode(frames[1:], limits=self.config.limits, kinds=CONTROL_KINDS.union(self.config.jobs))
            except WireError as exc:
                self.counters["malformed"] += 1
                self._reply(self._control, sender, "error", {"reason": str(exc)})
                continue
            tag = msg.header.get("id")
            try:
                command = command_from(msg) if msg.kind in COMMANDS else None
            except PartitaError as exc:
                self.counters["control_errors"] += 1
                self._send_reply(sender, _error(exc), tag)
                continue
            if msg.kind in self.config.jobs or type(command) in SLOW:
                self._start_job(sender, msg)
                continue
            try:
                reply = self.handlers.handle(command) if command is not None else Error(f"unknown command {msg.kind!r}")
            except Exception as exc:  # noqa: BLE001 - a bad command must not take the worker down
                self.counters["control_errors"] += 1
                reply = _error(exc)
            self._send_reply(sender, reply, tag)

    def _send_reply(self, sender: bytes, reply: Reply, tag: object) -> None:
        self._reply(self._control, sender, reply.KIND, {**reply.header(), "id": tag}, reply.tensors())

    def _figures_counters(self) -> dict[str, int]:
        return dict(self.counters, refused_keys=self._refused_keys())

    def _start_job(self, sender: bytes, msg: Message) -> None:
        """Run a `WorkerConfig.jobs` handler, or a slow command (`handlers.SLOW`), in its own thread.

        Its reply leaves from the I/O loop.

        A job handler sees the message with header "worker" set to this worker's name and current
        emulation ({"name", "speed" (None: native), "dilation"}). A handler that raises gets an
        `error` reply, like a failed command. The reply carries the request's "id".
        """
        tag = msg.header.get("id")
        emulation = {"name": self.config.name, "speed": self.executor.speed, "dilation": self.executor.dilation}
        job = Message(msg.kind, {**msg.header, "worker": emulation}, msg.tensors)
        extension = self.config.jobs.get(msg.kind)

        def handler() -> tuple[str, dict, tuple]:
            if extension is not None:
                return extension(job)
            reply = self.handlers.handle(command_from(msg))
            return reply.KIND, reply.header(), reply.tensors()

        def run() -> None:
            if self.config.threads:  # per OS thread: a job (profiling, training) runs as stages do
                torch.set_num_threads(self.config.threads)
            try:
                kind, header, tensors = handler()
            except Exception as exc:  # noqa: BLE001 - a failing job must answer, never take the worker down
                error = _error(exc)
                kind, header, tensors = error.KIND, error.header(), ()
            self._events.append(("job", (sender, kind, {**header, "id": tag}, tuple(tensors))))
            # ZeroMQ sockets are not thread-safe: this thread wakes the I/O loop through its own socket.
            try:
                wake = self._ctx.socket(zmq.PUSH)
            except zmq.ZMQError:  # the worker has shut down meanwhile: no one is left to send the reply
                return
            try:
                wake.connect(f"inproc://wake-{id(self)}")
                wake.send(_WAKE)
            finally:
                wake.close(linger=1000)

        threading.Thread(target=run, name=f"job-{msg.kind}", daemon=True).start()

    def _refused_keys(self) -> int:
        if self._secret is None:
            return 0
        return auth_stats(self._control)["refused"] + auth_stats(self._data)["refused"]

    def _reply(self, sock: zmq.Socket, to: bytes, kind: str, header: dict, tensors: tuple = ()) -> None:
        send_frames(sock, [to, *encode(kind, header, tensors)])


def _available_memory(device: torch.device) -> float:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return float(free)
    import psutil

    return float(psutil.virtual_memory().available)


def run_worker(config: WorkerConfig) -> None:
    """Run a worker in this process until SIGTERM/Ctrl-C (which drain first) or a `drain` command."""
    worker = Worker(config)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: worker.request_stop())
    worker.serve()
