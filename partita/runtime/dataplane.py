"""A worker's data plane: activations in on its data socket, stage outputs out to the next hop.

Upstream peers (and the coordinator) send `act` (a request's tensors for one stage) and `fail` (a
request that failed upstream) to the worker's data ROUTER; the data plane checks each activation
against the loaded stage (epoch, input count, dtypes, shapes, the in-flight bound), hands it to the
executor (or runs it at once when the stage is short, `StageExecutor.can_run_now`), returns a
`credit` when the executor takes it, and answers `echo` probes. A finished job
leaves through an `Outlink` per destination (credits, then the emulated link), round-robin over the
next stage's replicas by request number.

The wiring comes from the control plane: `install(route)` replaces one deployment's epoch and
destinations, `allow(pipeline, peers)` the keys that may send to it, `emulate_links` /
`set_dilation` the emulated links. All of it runs in the worker's I/O thread, which owns every
socket here.

A worker can serve several deployments at once (one cluster serving several models): each has
its own `pipeline` slot, epoch, codec, window and outlinks, and its stage ids are its own (the
coordinator offsets them by slot). An activation is checked against the epoch of the deployment
that routed its stage.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import zmq

from partita.errors import WireError
from partita.runtime.emulation import LinkShaper, shaper_for
from partita.runtime.executor import Done, Job, StageExecutor
from partita.runtime.flow import (
    LinkTimes,
    Outlink,
    PeerNames,
    credits_at_once,
    readable,
    recv_frames,
    socket_sender,
)
from partita.runtime.keys import apply_client, set_authorized
from partita.runtime.protocol import Destination, LinkChange, Route
from partita.runtime.wire import Limits, blob_tensor, decode, encode

DATA_KINDS = frozenset({"act", "fail", "echo"})
OUTLINK_KINDS = frozenset({"credit", "error", "echo"})

Reply = Callable[..., None]  # (socket, to, kind, header[, tensors])


@dataclass(frozen=True)
class DataSettings:
    """What the data plane needs to know about its worker: name, limits, keys, in-flight bound."""

    name: str
    limits: Limits
    secret: tuple[bytes, bytes] | None  # None: insecure (no CURVE)
    authorized: tuple[bytes, ...]  # coordinator keys, always allowed to send
    max_in_flight: int


def is_int(value: object) -> bool:
    return type(value) is int


class DataPlane:
    """The routes, outlinks and activation checks of one worker (see the module docstring)."""

    def __init__(self, settings: DataSettings, context: zmq.Context, data: zmq.Socket, executor: StageExecutor,
                 reply: Reply, counters: dict[str, int]) -> None:
        self.settings = settings
        self.epoch = -1  # the epoch of the last route installed (what `ping` and `stats` report)
        self.dirty = True  # the set of outlink sockets changed: the I/O loop rebuilds its poller
        self._ctx = context
        self._data = data
        self._executor = executor
        self._reply = reply
        self._counters = counters
        self._routes: dict[int, list[str]] = {}  # stage -> outlink keys of the destination replicas
        self._owner: dict[int, int] = {}  # stage -> the pipeline slot that routed it
        self._epochs: dict[int, int] = {}  # pipeline slot -> its epoch
        self._codecs: dict[int, str] = {}  # pipeline slot -> its codec
        self._peers: dict[int, tuple[str, ...]] = {}  # pipeline slot -> peers allowed to send to it
        self._outlinks: dict[str, tuple[zmq.Socket, Outlink]] = {}
        self._link_overrides: dict[str, dict[str, float]] = {}
        self._link_in = LinkTimes()  # per sender: messages and the seconds the link carried them
        self._credits_due: dict[bytes, int] = {}  # sender -> credits of jobs run inline, not yet returned
        self._windows: dict[int, int] = {}  # pipeline slot -> its credit window
        self._credits_threshold: dict[bytes, int] = {}  # sender -> credits returned in one message
        self._sender_name = PeerNames()

    # -- wiring (from control commands) -----------------------------------------------------------
    def allow(self, pipeline: int, peers: Sequence[str]) -> None:
        """Authorize the peers (z85 public keys) that may send activations of `pipeline`, besides the coordinator."""
        self._peers[pipeline] = tuple(peers)
        if self.settings.secret is not None:
            every = sorted({p for keys in self._peers.values() for p in keys})
            set_authorized(self._data, [p.encode() for p in every] + list(self.settings.authorized))

    def install(self, route: Route) -> None:
        """Install the wiring of one deployment's epoch (replaces that deployment's previous epoch)."""
        pipeline = route.pipeline
        self.allow(pipeline, route.peers)
        prefix = f"{pipeline}:"
        for key in [k for k in self._outlinks if k.startswith(prefix)]:
            sock, _ = self._outlinks.pop(key)
            sock.close(linger=0)
        for stage_id in [s for s, owner in self._owner.items() if owner == pipeline]:
            del self._owner[stage_id]
            self._routes.pop(stage_id, None)
        self.epoch = self._epochs[pipeline] = route.epoch
        self._codecs[pipeline] = route.codec
        self._windows[pipeline] = route.window
        self._link_in.reset()  # figures are per deployment
        for stage in route.stages:
            self._owner[stage.stage] = pipeline
            self._routes[stage.stage] = [self._outlink_for(pipeline, route, dest) for dest in stage.next]
        self.dirty = True

    def emulate_links(self, changes: Mapping[str, LinkChange]) -> None:
        for peer, change in changes.items():
            self._link_overrides.setdefault(peer, {}).update(change.to_dict())
            setting = self._link_overrides[peer]
            for _, outlink in self._outlinks.values():
                if outlink.name == peer:
                    outlink.shaper = shaper_for(setting.get("bandwidth"), setting.get("latency"),
                                                self._executor.dilation)

    def set_dilation(self, dilation: float) -> None:
        for _, outlink in self._outlinks.values():
            if isinstance(outlink.shaper, LinkShaper):
                outlink.shaper.dilation = dilation

    def _outlink_for(self, pipeline: int, route: Route, dest: Destination) -> str:
        key = f"{pipeline}:{dest.name}@{dest.address}"
        if key in self._outlinks:
            return key
        sock = self._ctx.socket(zmq.DEALER)
        sock.identity = f"{self.settings.name}/{route.epoch}".encode()
        sock.sndhwm = 0
        sock.rcvhwm = 0
        plain = self.settings.secret is None or not dest.public_key
        apply_client(sock, None if plain else self.settings.secret,
                     None if plain or dest.public_key is None else dest.public_key.encode(), insecure=plain)
        sock.connect(dest.address)
        override = self._link_overrides.get(dest.name, {})
        shaper = shaper_for(override.get("bandwidth", dest.bandwidth_bytes_per_s),
                            override.get("latency", dest.latency_s), self._executor.dilation)
        self._outlinks[key] = (sock, Outlink(dest.name, socket_sender(sock), route.window, shaper))
        return key

    # -- the I/O loop's calls ---------------------------------------------------------------------
    def sockets(self) -> list[zmq.Socket]:
        return [sock for sock, _ in self._outlinks.values()]

    def pump(self) -> list[float | None]:
        return [outlink.pump() for _, outlink in self._outlinks.values()]

    def idle(self) -> bool:
        return all(outlink.queued == 0 for _, outlink in self._outlinks.values())

    def close(self, linger_ms: int) -> None:
        for sock, _ in self._outlinks.values():
            sock.close(linger=linger_ms)

    def on_data(self) -> None:
        while readable(self._data):
            frames = recv_frames(self._data)
            sender = frames[0].bytes
            try:
                msg = decode(frames[1:], limits=self.settings.limits, kinds=DATA_KINDS)
            except WireError as exc:
                self._counters["malformed"] += 1
                self._reply(self._data, sender, "error", {"reason": str(exc)})
                continue
            if msg.kind == "echo":
                self._on_echo(sender, msg.header, msg.tensors)
            elif msg.kind == "act":
                self._on_act(sender, msg.header, msg.tensors)
            else:
                self._on_fail(sender, msg.header)
        self._return_credits()

    def _return_credits(self) -> None:
        """Return the credits of jobs run inline, half a window at a time (see `credits_at_once`)."""
        for sender, n in list(self._credits_due.items()):
            if n >= self._credits_threshold.get(sender, 1):
                self._reply(self._data, sender, "credit", {"n": n})
                del self._credits_due[sender]

    def on_outlinks(self, ready: Mapping[Any, int]) -> None:
        for sock, outlink in list(self._outlinks.values()):
            if sock in ready:
                self._on_outlink(sock, outlink)

    def _on_echo(self, sender: bytes, header: Mapping[str, Any], tensors: tuple) -> None:
        """Answer a link probe: `reply_bytes` (at most one frame's limit) asks for a payload back."""
        reply_bytes = header.get("reply_bytes", 0)
        if type(reply_bytes) is not int or not 0 <= reply_bytes <= self.settings.limits.max_frame_bytes:
            self._counters["malformed"] += 1
            self._reply(self._data, sender, "error",
                        {"reason": f"echo's reply_bytes must be a whole number in 0..{self.settings.limits.max_frame_bytes}"})
            return
        payload = (blob_tensor(bytes(reply_bytes)),) if reply_bytes else ()
        self._reply(self._data, sender, "echo", {"nbytes": sum(t.numel() for t in tensors)}, payload)

    def on_taken(self, job: Job) -> None:
        """The executor took `job` off its queue: its sender gets the credit back."""
        self._reply(self._data, job.sender, "credit", {"n": 1})

    def on_done(self, done: Done) -> None:
        job = done.job
        if done.error is not None:
            self._forward_fail(job.stage, job.request, job.epoch, f"{self.settings.name}: {done.error}")
            return
        destinations = self._routes.get(job.stage)
        if not destinations:
            self._counters["rejected"] += 1
            return
        key = destinations[job.request % len(destinations)]
        header = {"r": job.request, "e": job.epoch, "s": job.stage + 1}
        outputs = done.outputs if done.outputs is not None else ()
        codec = self._codecs.get(self._owner.get(job.stage, -1), "none")

        def build() -> list:
            return encode("act", {**header, "ts": time.time()}, outputs, codec=codec)

        outlink = self._outlinks[key][1]
        outlink.offer(build)  # send now if it may go: the I/O loop pumps again only after its next poll

    def figures(self) -> dict[str, Any]:
        """Per-link figures for the `stats` reply (links out by destination, links in by sender)."""
        links_out = {outlink.name: outlink.stats.to_dict() for _, outlink in self._outlinks.values()}
        links_in = self._link_in.figures()
        return {"links_out": links_out, "links_in": links_in}

    # -- activations ------------------------------------------------------------------------------
    def _on_act(self, sender: bytes, header: dict, tensors: tuple[torch.Tensor, ...]) -> None:
        problem = self._check_act(header, tensors)
        if problem is not None:
            self._counters["rejected"] += 1
            self._reply(self._data, sender, "error", {"reason": problem, "r": header.get("r")})
            self._reply(self._data, sender, "credit", {"n": 1})
            if is_int(header.get("r")) and is_int(header.get("s")) and is_int(header.get("e")):
                self._forward_fail(header["s"], header["r"], header["e"], f"{self.settings.name} refused: {problem}")
            return
        arrived_at = time.time()
        job = Job(header["s"], header["r"], header["e"], tensors, sender, time.monotonic())
        if self._executor.can_run_now(job.stage, job.tensors):  # a short stage: no hand-off to the compute thread and back
            # Its result leaves first; its credit goes back with others (`_return_credits`).
            self.on_done(self._executor.run_now(job))
            self._credits_due[sender] = self._credits_due.get(sender, 0) + 1
            window = self._windows.get(self._owner.get(job.stage, -1), 1)
            self._credits_threshold[sender] = credits_at_once(window)
        else:
            self._executor.submit(job)
        self._record_link_in(sender, header.get("ts"), arrived_at)  # after the output left: not on its way

    def _record_link_in(self, sender: bytes, sent_at: object, arrived_at: float) -> None:
        """Count one message's transfer on the link from `sender` (`sent_at`: its stamp; not a float: none)."""
        if isinstance(sent_at, float):
            self._link_in.record(self._sender_name(sender), sent_at, arrived_at)

    def _check_act(self, header: dict, tensors: tuple[torch.Tensor, ...]) -> str | None:
        """Why this activation cannot be run here, or None if it can."""
        for key in ("r", "e", "s"):
            if not is_int(header.get(key)):
                return f"header field {key!r} must be an integer"
        name = self.settings.name
        loaded = self._executor.stage(header["s"])
        if loaded is None:
            return f"stage {header['s']} is not loaded on worker {name}"
        epoch = self._epochs.get(self._owner.get(header["s"], -1), -1)
        if header["e"] != epoch:
            return f"epoch {header['e']} is not the deployed epoch {epoch}"
        if self._executor.pending >= self.settings.max_in_flight:
            return (f"worker {name} already has {self.settings.max_in_flight} requests in flight "
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
        if not all(is_int(header.get(k)) for k in ("r", "e", "s")):
            self._counters["malformed"] += 1
            return
        self._forward_fail(header["s"], header["r"], header["e"], str(header.get("error", "failed upstream")))

    def _forward_fail(self, stage: int, request: int, epoch: int, error: str) -> None:
        """Pass a failed request downstream so the coordinator answers it (stage = where it was due)."""
        destinations = self._routes.get(stage)
        if not destinations:
            return
        key = destinations[request % len(destinations)]
        header = {"r": request, "e": epoch, "s": stage + 1, "error": error}
        self._outlinks[key][1].put(lambda: encode("fail", header))

    def _on_outlink(self, sock: zmq.Socket, outlink: Outlink) -> None:
        while readable(sock):
            try:
                msg = decode(recv_frames(sock), limits=self.settings.limits, kinds=OUTLINK_KINDS)
            except WireError:
                self._counters["malformed"] += 1
                continue
            if msg.kind == "credit" and is_int(msg.header.get("n")):
                outlink.grant(msg.header["n"])
            elif msg.kind == "error":
                self._counters["downstream_errors"] += 1
