"""The worker process: a long-running server that runs stages for whichever coordinator deploys to it.

Sockets (all CURVE unless `--insecure`):

* **control** — a ROUTER bound at `--listen`. Only the coordinator keys the worker was given may
  connect. Request/reply: `hello` (what am I), `ping` (heartbeat), `load` (a stage archive),
  `renumber` (serve a loaded stage under another index: a re-plan that only shifted it),
  `route` (where each stage's outputs go, and which peers may send activations), `unload`,
  `profile` (time stage candidates), `probe` (RTT and bandwidth to a peer), `emulate` (change the
  emulated speed or a link), `stats`, `drain` (finish and exit).
* **data** — a ROUTER bound on the same host, any free port (reported by `hello`). Upstream peers
  named at deploy time (and the coordinator) send `act` (a request's tensors for one stage) and
  `fail` (a request that failed upstream); the worker returns a `credit` per message and answers
  `echo` probes.
* **outlinks** — a DEALER per downstream destination (next stage's replicas, or the coordinator's
  result socket), each behind an `Outlink` (credits, then the emulated link).

Threads: this I/O thread owns every socket and does all receiving and sending; the executor's
compute thread runs stages (`executor.py`). They meet in a queue plus an inproc wake-up socket.
Every frame goes through `wire.decode` with the worker's limits: a malformed message gets an
`error` reply and a counter, never a crash.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import zmq

from partita.errors import PartitaError, WireError, WorkerError
from partita.runtime.executor import Done, Job, StageExecutor, resolve_device
from partita.runtime.flow import Outlink, next_wakeup, socket_sender
from partita.runtime.handle import Keypair
from partita.runtime.keys import apply_client, apply_server, auth_stats, set_authorized, stop_auth
from partita.runtime.wire import Limits, Message, blob_bytes, decode, encode

CONTROL_KINDS = frozenset(
    {"hello", "ping", "load", "renumber", "allow", "route", "unload", "profile", "probe", "emulate", "stats", "drain"}
)
DATA_KINDS = frozenset({"act", "fail", "echo"})
OUTLINK_KINDS = frozenset({"credit", "error", "echo"})
# Commands that take seconds (loading an archive, timing segments, probing a link) run in their own
# thread, so the I/O loop keeps answering heartbeats and moving activations meanwhile.
BACKGROUND_KINDS = frozenset({"load", "profile", "probe"})
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


@dataclass
class _Route:
    """Where one stage's outputs go: outlink keys of the destination replicas (round-robin by request)."""

    destinations: list[str]


def _ephemeral(address: str) -> str:
    """ZeroMQ binds a free port for `:*`; accept `:0` as the same."""
    return address[:-2] + ":*" if address.endswith(":0") else address


def _host_of(address: str) -> str:
    return address.rsplit(":", 1)[0]


class Worker:
    """One worker. `serve()` runs its I/O loop in the calling thread until drained or stopped."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = resolve_device(config.device)
        self.counters: dict[str, int] = {"malformed": 0, "rejected": 0, "control_errors": 0, "downstream_errors": 0}
        self._events: queue.Queue[tuple[str, Any]] = queue.Queue()
        capacity = config.memory_bytes if config.memory_bytes is not None else _available_memory(self.device)
        self.executor = StageExecutor(
            self.device,
            capacity_bytes=capacity,
            on_taken=lambda job: self._notify("taken", job),
            on_done=lambda done: self._notify("done", done),
            speed=config.speed,
            dilation=config.dilation,
        )
        self._routes: dict[int, _Route] = {}
        self._outlinks: dict[str, tuple[zmq.Socket, Outlink]] = {}
        self._link_overrides: dict[str, dict[str, float]] = {}
        self._link_in: dict[str, list[float]] = {}  # sender -> [messages, sum of transfer seconds]
        self._epoch = -1
        self._window = 4
        self._codec = "none"
        self._stop = threading.Event()
        self._draining_since: float | None = None
        self._poller_dirty = True
        self.flops_per_s = 0.0
        self._insecure = config.keys is None
        self._secret = (config.keys.public, config.keys.secret) if config.keys is not None else None

    # -- lifecycle --------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Drain the requests in flight, then return from `serve` (safe from a signal handler)."""
        self._stop.set()

    def serve(self) -> None:
        """Bind, announce readiness, and run the I/O loop until stopped and drained."""
        from partita.runtime.profile import matmul_flops_per_s

        self.flops_per_s = matmul_flops_per_s(self.device)
        ctx = zmq.Context()
        self._ctx = ctx
        try:
            self._bind(ctx)
            self._announce()
            self.executor.start()
            self._loop()
        finally:
            self.executor.stop()
            # Drained: what is left to send is credits and replies; give them a moment, not more.
            for sock, _ in self._outlinks.values():
                sock.close(linger=500)
            for sock in (self._control, self._data, self._wake_in, self._wake_out):
                sock.close(linger=200)
            stop_auth(ctx)
            ctx.term()

    def _bind(self, ctx: zmq.Context) -> None:
        secret, authorized, insecure = self._secret, self.config.authorized or None, self._insecure
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
        self._events.put((what, item))
        self._wake_out.send(_WAKE)

    # -- the I/O loop -----------------------------------------------------------------------
    def _loop(self) -> None:
        poller = zmq.Poller()
        while True:
            if self._poller_dirty:
                poller = self._make_poller()
            delays = [outlink.pump() for _, outlink in self._outlinks.values()]
            timeout_s = next_wakeup(delays, 0.1)
            ready = dict(poller.poll(max(timeout_s, 0.0) * 1000))
            if self._control in ready:
                self._on_control()
            if self._data in ready:
                self._on_data()
            if self._wake_in in ready:
                while self._wake_in.poll(0):
                    self._wake_in.recv()
            self._drain_events()
            for key, (sock, outlink) in list(self._outlinks.items()):
                if sock in ready:
                    self._on_outlink(key, sock, outlink)
            if self._stop.is_set() and self._finished_draining():
                return

    def _make_poller(self) -> zmq.Poller:
        poller = zmq.Poller()
        for sock in (self._control, self._data, self._wake_in):
            poller.register(sock, zmq.POLLIN)
        for sock, _ in self._outlinks.values():
            poller.register(sock, zmq.POLLIN)
        self._poller_dirty = False
        return poller

    def _finished_draining(self) -> bool:
        now = time.monotonic()
        if self._draining_since is None:
            self._draining_since = now
            print(f"partita worker {self.config.name}: draining requests in flight", flush=True)
        idle = self.executor.pending == 0 and self._events.empty()
        idle = idle and all(outlink.queued == 0 for _, outlink in self._outlinks.values())
        return idle or now - self._draining_since > DRAIN_TIMEOUT_S

    # -- data plane -------------------------------------------------------------------------
    def _on_data(self) -> None:
        while self._data.poll(0):
            frames = self._data.recv_multipart(copy=False)
            sender = frames[0].bytes
            try:
                msg = decode(frames[1:], limits=self.config.limits, kinds=DATA_KINDS)
            except WireError as exc:
                self.counters["malformed"] += 1
                self._reply(self._data, sender, "error", {"reason": str(exc)})
                continue
            if msg.kind == "echo":
                self._reply(self._data, sender, "echo", {"nbytes": sum(t.numel() for t in msg.tensors)})
            elif msg.kind == "act":
                self._on_act(sender, msg.header, msg.tensors)
            else:
                self._on_fail(sender, msg.header)

    def _on_act(self, sender: bytes, header: dict, tensors: tuple[torch.Tensor, ...]) -> None:
        problem = self._check_act(header, tensors)
        if problem is not None:
            self.counters["rejected"] += 1
            self._reply(self._data, sender, "error", {"reason": problem, "r": header.get("r")})
            self._reply(self._data, sender, "credit", {"n": 1})
            if _is_int(header.get("r")) and _is_int(header.get("s")) and _is_int(header.get("e")):
                self._forward_fail(header["s"], header["r"], header["e"], f"{self.config.name} refused: {problem}")
            return
        sent_at = header.get("ts")
        if isinstance(sent_at, float):
            record = self._link_in.setdefault(sender.decode(errors="replace").split("/")[0], [0, 0.0])
            record[0] += 1
            record[1] += max(0.0, time.time() - sent_at)
        job = Job(header["s"], header["r"], header["e"], tensors, sender, time.monotonic())
        self.executor.submit(job)

    def _check_act(self, header: dict, tensors: tuple[torch.Tensor, ...]) -> str | None:
        """Why this activation cannot be run here, or None if it can."""
        for key in ("r", "e", "s"):
            if not _is_int(header.get(key)):
                return f"header field {key!r} must be an integer"
        loaded = self.executor.stage(header["s"])
        if loaded is None:
            return f"stage {header['s']} is not loaded on worker {self.config.name}"
        if header["e"] != self._epoch:
            return f"epoch {header['e']} is not the deployed epoch {self._epoch}"
        if self.executor.pending >= self.config.max_in_flight:
            return (f"worker {self.config.name} already has {self.config.max_in_flight} requests in flight "
                    "(--max-in-flight); a sender must wait for its credits")
        specs = getattr(loaded.program, "inputs", None)
        if specs is None:
            return None
        if len(specs) != len(tensors):
            return f"stage {header['s']} takes {len(specs)} tensors, got {len(tensors)}"
        for i, (spec, t) in enumerate(zip(specs, tensors, strict=True)):
            if str(t.dtype).removeprefix("torch.") != spec.dtype:
                return f"stage {header['s']} input {i} must be {spec.dtype}, got {str(t.dtype).removeprefix('torch.')}"
            shape = tuple(spec.shape)
            if len(shape) != t.dim() or any(d is not None and d != n for d, n in zip(shape, t.shape, strict=True)):
                return f"stage {header['s']} input {i} must have shape {list(shape)} (None = any), got {list(t.shape)}"
        return None

    def _on_fail(self, sender: bytes, header: dict) -> None:
        self._reply(self._data, sender, "credit", {"n": 1})
        if not all(_is_int(header.get(k)) for k in ("r", "e", "s")):
            self.counters["malformed"] += 1
            return
        self._forward_fail(header["s"], header["r"], header["e"], str(header.get("error", "failed upstream")))

    def _forward_fail(self, stage: int, request: int, epoch: int, error: str) -> None:
        """Pass a failed request downstream so the coordinator answers it (stage = where it was due)."""
        route = self._routes.get(stage)
        if route is None or not route.destinations:
            return
        key = route.destinations[request % len(route.destinations)]
        header = {"r": request, "e": epoch, "s": stage + 1, "error": error}
        self._outlinks[key][1].put(lambda: encode("fail", header))

    def _drain_events(self) -> None:
        while True:
            try:
                what, item = self._events.get_nowait()
            except queue.Empty:
                return
            if what == "taken":
                self._reply(self._data, item.sender, "credit", {"n": 1})
            elif what == "job":
                sender, kind, header, tensors = item
                self.counters["control_errors"] += kind == "error"
                self._reply(self._control, sender, kind, header, tensors)
            else:
                self._on_done(item)

    def _on_done(self, done: Done) -> None:
        job = done.job
        if done.error is not None:
            self._forward_fail(job.stage + 1, job.request, job.epoch, f"{self.config.name}: {done.error}")
            return
        route = self._routes.get(job.stage)
        if route is None or not route.destinations:
            self.counters["rejected"] += 1
            return
        key = route.destinations[job.request % len(route.destinations)]
        header = {"r": job.request, "e": job.epoch, "s": job.stage + 1}
        outputs, codec = done.outputs, self._codec

        def build() -> list:
            return encode("act", {**header, "ts": time.time()}, outputs, codec=codec)

        self._outlinks[key][1].put(build)

    def _on_outlink(self, key: str, sock: zmq.Socket, outlink: Outlink) -> None:
        while sock.poll(0):
            try:
                msg = decode(sock.recv_multipart(copy=False), limits=self.config.limits, kinds=OUTLINK_KINDS)
            except WireError:
                self.counters["malformed"] += 1
                continue
            if msg.kind == "credit" and _is_int(msg.header.get("n")):
                outlink.grant(msg.header["n"])
            elif msg.kind == "error":
                self.counters["downstream_errors"] += 1

    # -- control plane ----------------------------------------------------------------------
    def _on_control(self) -> None:
        while self._control.poll(0):
            frames = self._control.recv_multipart(copy=False)
            sender = frames[0].bytes
            try:
                msg = decode(frames[1:], limits=self.config.limits, kinds=CONTROL_KINDS.union(self.config.jobs))
            except WireError as exc:
                self.counters["malformed"] += 1
                self._reply(self._control, sender, "error", {"reason": str(exc)})
                continue
            if msg.kind in self.config.jobs or msg.kind in BACKGROUND_KINDS:
                self._start_job(sender, msg)
                continue
            tag = msg.header.get("id")
            try:
                kind, header, tensors = getattr(self, f"_cmd_{msg.kind}")(msg)
            except PartitaError as exc:
                self.counters["control_errors"] += 1
                kind, header, tensors = "error", {"reason": str(exc), "type": type(exc).__name__}, ()
            except Exception as exc:  # noqa: BLE001 - a bad command must not take the worker down
                self.counters["control_errors"] += 1
                kind, header, tensors = "error", {"reason": f"{type(exc).__name__}: {exc}", "type": "internal"}, ()
            self._reply(self._control, sender, kind, {**header, "id": tag}, tensors)

    def _cmd_hello(self, msg: Any) -> tuple[str, dict, tuple]:
        device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else self.device.type
        return "info", {
            "name": self.config.name,
            "device": self.device.type,
            "device_name": device_name,
            "memory_bytes": self.executor.capacity_bytes,
            "used_bytes": self.executor.used_bytes(),
            "flops_per_s": self.flops_per_s,
            "speed": self.executor.speed,
            "dilation": self.executor.dilation,
            "data": self.data_address,
            "pid": os.getpid(),
            "torch": torch.__version__,
            "secure": self.config.keys is not None,
            "max_frame_bytes": self.config.limits.max_frame_bytes,
        }, ()

    def _cmd_ping(self, msg: Any) -> tuple[str, dict, tuple]:
        return "pong", {"t": time.time(), "pending": self.executor.pending, "epoch": self._epoch}, ()

    def _cmd_load(self, msg: Any) -> tuple[str, dict, tuple]:
        from partita.model import StageProgram

        h = msg.header
        if not _is_int(h.get("stage")) or not isinstance(h.get("sha256"), str) or len(msg.tensors) != 1:
            raise WorkerError("load needs integer 'stage', string 'sha256' and one archive tensor")
        data = blob_bytes(msg.tensors[0])
        # Refuse an archive that cannot fit before deserializing it (which would materialize its weights).
        free = self.executor.capacity_bytes - self.executor.used_bytes(excluding=h["stage"])
        if len(data) > free:
            raise WorkerError(
                f"stage {h['stage']} needs {len(data) / 2**20:.1f} MiB (its archive) but worker {self.config.name} has "
                f"{max(free, 0) / 2**20:.1f} MiB free of {self.executor.capacity_bytes / 2**20:.1f} MiB; "
                "choose a plan that fits this device's memory or give it more (--memory)"
            )
        program = StageProgram.from_bytes(data, expected_sha256=h["sha256"])
        reference = h.get("reference_host_s")
        self.executor.load(
            h["stage"],
            program,
            memory_bytes=float(h.get("memory_bytes") or 0.0),
            reference_host_s=float(reference) if isinstance(reference, int | float) else None,
            owner=self.config.name,
        )
        return "ok", {"stage": h["stage"], "param_bytes": int(getattr(program, "param_bytes", 0))}, ()

    def _cmd_unload(self, msg: Any) -> tuple[str, dict, tuple]:
        stages = msg.header.get("stages")
        if stages is not None and not (isinstance(stages, list) and all(_is_int(s) for s in stages)):
            raise WorkerError("unload takes 'stages': a list of integers, or null for all")
        self.executor.unload(stages)
        return "ok", {}, ()

    def _cmd_renumber(self, msg: Any) -> tuple[str, dict, tuple]:
        """Header `moves`: [[old, new], ...]; the stages move together (see StageExecutor.renumber)."""
        moves = msg.header.get("moves")
        if not (isinstance(moves, list) and all(
            isinstance(m, list) and len(m) == 2 and all(_is_int(k) for k in m) for m in moves
        )):
            raise WorkerError("renumber takes 'moves': a list of [old, new] stage index pairs")
        self.executor.renumber({old: new for old, new in moves})
        return "ok", {"stages": self.executor.stage_indices()}, ()

    def _cmd_allow(self, msg: Any) -> tuple[str, dict, tuple]:
        """Authorize the peers (z85 public keys) that may send activations, before anyone connects.

        The coordinator allows on every worker first and routes second: a peer that connected
        before it was allowed would fail its handshake and lose what it had queued.
        """
        self._allow_peers(msg.header.get("peers", []))
        return "ok", {}, ()

    def _allow_peers(self, peers: Any) -> None:
        if not isinstance(peers, list) or not all(isinstance(p, str) for p in peers):
            raise WorkerError("'peers' must be a list of z85 public keys")
        if not self._insecure:
            set_authorized(self._data, [p.encode() for p in peers] + list(self.config.authorized))

    def _cmd_route(self, msg: Any) -> tuple[str, dict, tuple]:
        """Install the data-plane wiring of one deployment epoch (replaces the previous one)."""
        h = msg.header
        if not _is_int(h.get("epoch")) or not _is_int(h.get("window")) or h["window"] < 1:
            raise WorkerError("route needs integer 'epoch' and 'window' >= 1")
        from partita.runtime.codec import check_codec

        codec = check_codec(h.get("codec", "none"))
        self._allow_peers(h.get("peers", []))
        for sock, _ in self._outlinks.values():
            sock.close(linger=0)
        self._outlinks, self._routes = {}, {}
        self._epoch, self._window, self._codec = h["epoch"], h["window"], codec
        self._link_in = {}  # figures are per deployment
        for entry in h.get("stages", []):
            keys = [self._outlink_for(dest) for dest in entry["next"]]
            self._routes[int(entry["stage"])] = _Route(keys)
        self._poller_dirty = True
        return "ok", {"epoch": self._epoch}, ()

    def _outlink_for(self, dest: dict) -> str:
        key = f"{dest['name']}@{dest['address']}"
        if key in self._outlinks:
            return key
        sock = self._ctx.socket(zmq.DEALER)
        sock.identity = f"{self.config.name}/{self._epoch}".encode()
        sock.sndhwm = 0
        sock.rcvhwm = 0
        public = dest.get("public_key")
        plain = self._insecure or not public
        apply_client(sock, None if plain else self._secret, None if plain else public.encode(), insecure=plain)
        sock.connect(dest["address"])
        override = self._link_overrides.get(dest["name"], {})
        bandwidth = override.get("bandwidth", dest.get("bandwidth_bytes_per_s"))
        latency = override.get("latency", dest.get("latency_s"))
        shaper = self._shaper(bandwidth, latency)
        self._outlinks[key] = (sock, Outlink(dest["name"], socket_sender(sock), self._window, shaper))
        return key

    def _shaper(self, bandwidth: float | None, latency: float | None) -> Any:
        if bandwidth is None and latency is None:
            return None
        from partita.runtime.emulation import LinkShaper

        return LinkShaper(
            bandwidth if bandwidth is not None else float("inf"), latency or 0.0, dilation=self.executor.dilation
        )

    def _cmd_emulate(self, msg: Any) -> tuple[str, dict, tuple]:
        """Change the emulated speed (`speed`, relative to this host) or links (`links`: {peer: {...}})."""
        h = msg.header
        if "dilation" in h:
            dilation = h["dilation"]
            if not (isinstance(dilation, int | float) and dilation >= 1):
                raise WorkerError(f"dilation must be a number >= 1, got {dilation!r}")
            self.executor.set_speed(self.executor.speed, float(dilation))
            for _, outlink in self._outlinks.values():
                if outlink.shaper is not None:
                    outlink.shaper.dilation = float(dilation)
        if "speed" in h:
            speed = h["speed"]
            if speed is not None and not (isinstance(speed, int | float) and speed > 0):
                raise WorkerError(f"speed must be a number > 0 or null, got {speed!r}")
            self.executor.set_speed(float(speed) if speed is not None else None)
        for peer, change in (h.get("links") or {}).items():
            self._link_overrides.setdefault(peer, {}).update(change)
            for _, outlink in self._outlinks.values():
                if outlink.name == peer:
                    setting = self._link_overrides[peer]
                    outlink.shaper = self._shaper(setting.get("bandwidth"), setting.get("latency"))
        return "ok", {}, ()

    def _cmd_profile(self, msg: Any) -> tuple[str, dict, tuple]:
        """Time a chain of stage candidates: header `programs` (their sha256s), tensors = archives then inputs."""
        from partita.model import StageProgram
        from partita.runtime.profile import time_programs

        shas = msg.header.get("programs")
        reps = msg.header.get("reps", 3)
        if not isinstance(shas, list) or len(shas) > len(msg.tensors) or not _is_int(reps) or not 1 <= reps <= 100:
            raise WorkerError("profile needs 'programs' (sha256 list), 'reps' in 1..100, archives then inputs")
        programs = [
            StageProgram.from_bytes(blob_bytes(t), expected_sha256=sha) for sha, t in zip(shas, msg.tensors, strict=False)
        ]
        if self.device.type != "cpu":  # time the segments where the stages will run
            programs = [program.to(self.device) for program in programs]
        host_s = time_programs(programs, msg.tensors[len(shas):], reps=reps, device=self.device)
        speed = self.executor.speed or 1.0
        return "profiled", {"host_s": host_s, "device_s": [t / speed for t in host_s]}, ()

    def _cmd_probe(self, msg: Any) -> tuple[str, dict, tuple]:
        """Measure RTT, latency and bandwidth to a peer's data socket (`address`, `public_key`).

        `bandwidth_bytes_per_s` / `latency_s` (optional, as in `route`): the emulated link to that
        peer; the probe is then shaped like activations on it, and the figures are device time.
        """
        from partita.runtime.profile import measure_link

        h = msg.header
        if not isinstance(h.get("address"), str):
            raise WorkerError("probe needs the peer's data 'address'")
        emulate = (h.get("bandwidth_bytes_per_s"), h.get("latency_s"))
        if not all(v is None or (isinstance(v, int | float) and v >= 0) for v in emulate) or emulate[0] == 0:
            raise WorkerError("probe's 'bandwidth_bytes_per_s' (> 0) and 'latency_s' (>= 0) must be numbers or null")
        sock = self._ctx.socket(zmq.DEALER)
        try:
            public = h.get("public_key")
            plain = self._insecure or not public
            apply_client(sock, None if plain else self._secret, None if plain else public.encode(), insecure=plain)
            sock.connect(h["address"])
            payload = int(h.get("payload_bytes", 4 * 2**20))
            result = measure_link(sock, payload_bytes=min(payload, self.config.limits.max_frame_bytes),
                                  emulate=emulate, dilation=self.executor.dilation)
        finally:
            sock.close(linger=0)
        return "probed", result, ()

    def _cmd_stats(self, msg: Any) -> tuple[str, dict, tuple]:
        links_out = {outlink.name: outlink.stats.to_dict() for _, outlink in self._outlinks.values()}
        links_in = {name: {"messages": n, "mean_transfer_s": total / max(n, 1)} for name, (n, total) in self._link_in.items()}
        return "stats", {
            "name": self.config.name,
            "epoch": self._epoch,
            "stages": {str(k): v for k, v in self.executor.stats().items()},
            "links_out": links_out,
            "links_in": links_in,
            "counters": dict(self.counters, refused_keys=self._refused_keys()),
            "dilation": self.executor.dilation,
        }, ()

    def _cmd_drain(self, msg: Any) -> tuple[str, dict, tuple]:
        self.request_stop()
        return "ok", {}, ()

    def _start_job(self, sender: bytes, msg: Message) -> None:
        """Run a `WorkerConfig.jobs` handler, or a slow command (BACKGROUND_KINDS), in its own thread.

        Its reply leaves from the I/O loop.

        The handler sees the message with header "worker" set to this worker's name and current
        emulation ({"name", "speed" (None: native), "dilation"}). A handler that raises gets an
        `error` reply, like a failed command. The reply carries the request's "id".
        """
        tag = msg.header.get("id")
        emulation = {"name": self.config.name, "speed": self.executor.speed, "dilation": self.executor.dilation}
        job = Message(msg.kind, {**msg.header, "worker": emulation}, msg.tensors)
        handler = self.config.jobs.get(msg.kind) or getattr(self, f"_cmd_{msg.kind}")

        def run() -> None:
            try:
                kind, header, tensors = handler(job)
            except PartitaError as exc:
                kind, header, tensors = "error", {"reason": str(exc), "type": type(exc).__name__}, ()
            except Exception as exc:  # noqa: BLE001 - a failing job must answer, never take the worker down
                kind, header, tensors = "error", {"reason": f"{type(exc).__name__}: {exc}", "type": "internal"}, ()
            self._events.put(("job", (sender, kind, {**header, "id": tag}, tuple(tensors))))
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
        if self._insecure:
            return 0
        return auth_stats(self._control)["refused"] + auth_stats(self._data)["refused"]

    def _reply(self, sock: zmq.Socket, to: bytes, kind: str, header: dict, tensors: tuple = ()) -> None:
        sock.send_multipart([to, *encode(kind, header, tensors)], copy=False)


def _is_int(value: object) -> bool:
    return type(value) is int


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
