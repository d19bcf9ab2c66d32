"""The transition engine: carries a planned `Transition` out on the workers, over the control protocol.

`partita.runtime.transition` plans what each worker must do (pure: no sockets); this module does
it: ships archives (or only their digests, when a worker's archive cache holds them), renumbers,
unloads, allows senders, routes the new epoch, and records what each device now holds. It also
holds the coordinator's own first sends (`open_first_links`).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import zmq

from partita.cluster import ClusterSpec
from partita.errors import DeployError, WorkerError
from partita.runtime import protocol
from partita.runtime.deployment import STAGE_SPAN, Deployment
from partita.runtime.flow import Outlink, socket_sender
from partita.runtime.keys import apply_client, set_authorized
from partita.runtime.session import Session
from partita.runtime.transition import (
    COMMAND_TIMEOUT_S,
    SHIP_TIMEOUT_S,
    STASH_MIN_TIMEOUT_S,
    TILES_HELD,
    Action,
    Allow,
    AuthorizeSink,
    Drop,
    Holding,
    Network,
    Renumber,
    Route,
    Ship,
    Sink,
    Transition,
    link_setting,
    next_epoch,
    plan_transition,
)
from partita.runtime.wire import blob_tensor

if TYPE_CHECKING:
    from partita.plan import StagePlan


class TransitionEngine:
    """Carries transitions out on the workers of `session`, and remembers what each device holds.

    `sink_socket` is the coordinator's result socket (its authorized keys follow the last stage).
    `busy(device)` marks a long control call to the heartbeat, so a device loading a big archive
    is not taken for dead. `host_segment_s` and `host_speeds` pace emulated devices; `host_step_s`
    (kind -> ((size, host seconds per segment), ...)) paces the steps of stages whose steps differ in
    size (a decoder's prefill and decode, see `Network.reference_steps`).

    `slot` is the deployment's slot on the cluster: stage ids on the wire are offset by it. An
    `exclusive` engine (the only deployment on the cluster) unloads everything a device holds
    before loading, as stages left by an earlier coordinator would only take memory; one that
    shares the workers unloads only its own stages.
    """

    def __init__(
        self,
        session: Session,
        sink: Sink,
        *,
        planned: ClusterSpec,
        host_segment_s: Sequence[float] | None = None,
        host_step_s: Mapping[str, Sequence[tuple[float, Sequence[float]]]] | None = None,
        busy: Callable[[str], AbstractContextManager[Any]] | None = None,
        slot: int = 0,
        exclusive: bool = True,
    ) -> None:
        self.session = session
        self.slot = slot
        self.exclusive = exclusive
        self.sink = sink
        self.planned = planned
        self.held: dict[str, Holding] = {}
        # What each worker's archive cache holds, as far as this engine knows (a miss falls back to the
        # bytes). Replaced, never edited: the standby thread adds while the supervisor reads.
        self.archives: dict[str, frozenset[str]] = {}
        self._archives_lock = threading.Lock()
        self.shipped_bytes: dict[str, int] = {}  # archive bytes sent to each device by the last `apply`
        self.load_seconds: list[float] = []  # recent loads: seconds besides moving the bytes (switch costs)
        self._host_s = tuple(host_segment_s) if host_segment_s is not None else None
        self._host_steps = dict(host_step_s) if host_step_s else None
        self._busy = busy or (lambda device: nullcontext())
        self._sink_socket: zmq.Socket | None = None

    def watch_busy(self, busy: Callable[[str], AbstractContextManager[Any]]) -> None:
        """Mark long calls with `busy(device)` from now on (the supervisor's heartbeat)."""
        self._busy = busy

    def attach_sink(self, socket: zmq.Socket) -> None:
        """The result socket whose authorized keys `AuthorizeSink` sets (secure clusters only)."""
        self._sink_socket = socket

    def forget(self, device: str) -> None:
        """`device` restarted (or joined): it holds nothing."""
        self.held.pop(device, None)
        with self._archives_lock:
            self.archives = {d: held for d, held in self.archives.items() if d != device}

    def network(self) -> Network:
        session, cluster = self.session, self.session.cluster
        infos = session.hello()
        speeds = cluster.host_speeds
        host_s = self._host_s

        def reference(device: str, stage: StagePlan) -> float | None:
            if host_s is None or device not in speeds:
                return None
            return sum(host_s[stage.start:stage.end])

        def reference_steps(device: str, stage: StagePlan) -> dict[str, Any] | None:
            if self._host_steps is None or device not in speeds:
                return None
            return {kind: tuple((float(size), float(sum(per_segment[stage.start:stage.end])))
                                for size, per_segment in points)
                    for kind, points in self._host_steps.items()}

        return Network(
            source=cluster.spec.source,
            data={name: str(info["data"]) for name, info in infos.items()},
            public_keys=session.public_keys(),
            links=lambda a, b: link_setting(cluster, a, b),
            planned=self.planned,
            sink=self.sink,
            reference_host_s=reference,
            reference_steps=reference_steps,
            cached={device: frozenset(held) for device, held in self.archives.items()},
        )

    def plan(self, target: Deployment) -> Transition:
        """The transition from what the workers hold to `target` (nothing is sent)."""
        return plan_transition(self.held, target, self.network(), live=self.session.clients)

    def apply(self, transition: Transition) -> None:
        """Carry `transition` out; DeployError naming the device and the step if a worker refuses."""
        self.shipped_bytes = {}
        ships: dict[str, list[Ship]] = {}
        for action in transition.actions:
            match action:
                case Ship():
                    ships.setdefault(action.device, []).append(action)
                case _:
                    if ships:  # ship in parallel, once every drop and renumber before them is done
                        self._ship_all(ships)
                        ships = {}
                    self._run(action)
        if ships:
            self._ship_all(ships)

    def _stage_id(self, index: int) -> int:
        return self.slot * STAGE_SPAN + index

    def _unload(self, device: str) -> protocol.Unload:
        """What to unload on `device` before it changes: everything when exclusive, else only our stage."""
        holding = self.held.get(device)
        if self.exclusive:
            return protocol.Unload()
        return protocol.Unload(() if holding is None else (self._stage_id(holding.stage),))

    def _run(self, action: Action) -> None:
        match action:
            case Drop():
                self._call(action.device, self._unload(action.device), "unload its stages")
                self.held.pop(action.device, None)
            case Renumber():
                moves = ((self._stage_id(action.old), self._stage_id(action.new)),)
                self._call(action.device, protocol.Renumber(moves), f"renumber stage {action.old} to {action.new}")
                holding = self.held[action.device]
                self.held[action.device] = Holding(action.new, holding.segments, holding.sha256)
            case AuthorizeSink():
                if self._sink_socket is not None and self.session.keys is not None:
                    set_authorized(self._sink_socket, [k.encode() for k in action.keys])
            case Allow():
                self._call(action.device, protocol.Allow(action.peers, action.pipeline), "allow its senders")
            case Route():
                self._call(action.device, action.command, f"route the new epoch {action.command.epoch}")
            case Ship():
                self._ship_all({action.device: [action]})

    def _call(self, device: str, command: protocol.Command, what: str) -> None:
        try:
            self.session.clients[device].send(command, timeout_s=COMMAND_TIMEOUT_S)
        except (WorkerError, KeyError) as exc:
            raise DeployError(f"could not {what} on {device}: {exc}") from None

    def _ship_all(self, ships: Mapping[str, list[Ship]]) -> None:
        def ship(device: str) -> None:
            client = self.session.clients[device]
            unload = self._unload(device)
            self.held.pop(device, None)
            with self._busy(device):
                for n, action in enumerate(ships[device]):
                    try:
                        if n == 0:  # a device given two stages (a tile and the rest) keeps the first
                            client.send(unload, timeout_s=COMMAND_TIMEOUT_S)
                        self._load(device, action)
                    except WorkerError as exc:
                        raise DeployError(f"could not deploy stage {action.stage} to {device}: {exc}") from None
                    tiles = any(a.tile for a in ships[device])
                    self.held[device] = Holding(action.stage, action.segments,
                                                TILES_HELD if tiles else action.program.sha256)

        with ThreadPoolExecutor(max_workers=max(1, len(ships))) as pool:
            list(pool.map(ship, sorted(ships)))

    def _load(self, device: str, action: Ship) -> None:
        """Load `action`'s stage on `device`: by digest when its cache holds the archive, else with the bytes."""
        client = self.session.clients[device]
        sha = action.program.sha256
        stage_id = self._stage_id(action.stage)
        if action.cached:
            started = time.perf_counter()
            reply = client.send(protocol.Load(stage_id, sha, None, memory_bytes=action.memory_bytes,
                                              reference_host_s=action.reference_host_s,
                                              reference_steps=action.reference_steps), timeout_s=SHIP_TIMEOUT_S)
            if not (isinstance(reply, protocol.Ok) and reply.fields.get("missing")):
                self._loaded_in(time.perf_counter() - started)
                return
        data = action.program.to_bytes()
        started = time.perf_counter()
        client.send(protocol.Load(stage_id, sha, blob_tensor(data), memory_bytes=action.memory_bytes,
                                  reference_host_s=action.reference_host_s, reference_steps=action.reference_steps),
                    timeout_s=SHIP_TIMEOUT_S)
        elapsed = time.perf_counter() - started
        self.shipped_bytes[device] = self.shipped_bytes.get(device, 0) + len(data)
        self._cached(device, sha)
        self._loaded_in(elapsed - self._moving_s(device, len(data)))

    def _moving_s(self, device: str, nbytes: int) -> float:
        """Seconds `nbytes` take to reach `device` over a real link (0 where links are emulated: archives
        travel on the control socket, which the emulation does not shape)."""
        source = self.planned.source
        if device not in self.planned.names or link_setting(self.session.cluster, source, device).bandwidth_bytes_per_s:
            return 0.0
        bandwidth = self.planned.link(source, device).bandwidth_bytes_per_s
        return 0.0 if math.isinf(bandwidth) else nbytes / bandwidth

    def _loaded_in(self, seconds: float) -> None:
        self.load_seconds = [*self.load_seconds[-7:], max(0.0, seconds)]

    def stash(self, device: str, program: Any) -> int:
        """Put `program`'s archive into `device`'s cache ahead of need (standby); returns the bytes sent.

        Nothing is sent when the engine knows the cache holds it already; 0 also when the device's
        cache cannot take it (its memory is spoken for). DeployError if the worker refuses.
        """
        sha = program.sha256
        if sha in self.archives.get(device, ()):
            return 0
        data = program.to_bytes()
        # Bounded by what the link should need: a device that dies meanwhile must not hold its
        # client (and the supervisor's failure handling, which closes it) for SHIP_TIMEOUT_S.
        bandwidth = self.planned.link(self.planned.source, device).bandwidth_bytes_per_s
        timeout_s = min(SHIP_TIMEOUT_S, STASH_MIN_TIMEOUT_S + 3 * len(data) / bandwidth)
        try:
            with self._busy(device):
                reply = self.session.clients[device].send(protocol.Stash(sha, blob_tensor(data)), timeout_s=timeout_s)
        except (WorkerError, KeyError) as exc:
            raise DeployError(f"could not stash an archive on {device}: {exc}") from None
        if isinstance(reply, protocol.Ok) and reply.fields.get("cached"):
            self._cached(device, sha)
        return len(data)

    def _cached(self, device: str, sha: str) -> None:
        with self._archives_lock:
            self.archives = {**self.archives, device: self.archives.get(device, frozenset()) | {sha}}

    def release(self, *, timeout_s: float = 2.0) -> None:
        """Unload this deployment's stages and routes from every live worker (its pipeline closed).

        Only a deployment that shares the workers does this; an exclusive one leaves its stages to
        the next deployment, which unloads everything first. Best effort: a worker that does not
        answer in `timeout_s` is left as it is (it failed, or the next deployment routes it again).
        """
        if self.exclusive:
            return
        epoch = next_epoch()
        for device, client in list(self.session.clients.items()):
            holding = self.held.pop(device, None)
            try:
                if holding is not None:
                    client.send(protocol.Unload((self._stage_id(holding.stage),)), timeout_s=timeout_s)
                client.send(protocol.Route(epoch, 1, pipeline=self.slot), timeout_s=timeout_s)
            except WorkerError:
                continue  # closing must not fail on a worker that is gone; nothing of ours runs there

    # -- the coordinator's own sends ----------------------------------------------------------------
    def open_first_links(self, deployment: Deployment) -> list[tuple[zmq.Socket, Outlink]]:
        """A DEALER (behind an Outlink: credits and the emulated source link) to each first-stage replica.

        With a tiled first stage: one per tile, in tile order, then one to the device of the stage after it.
        """
        session, cluster = self.session, self.session.cluster
        source, keys = cluster.spec.source, session.keys
        public = session.public_keys()
        infos = session.hello()
        links = []
        receivers = list(deployment.stages[0].devices)
        if deployment.tiled is not None and len(deployment.stages) > 1:
            receivers += deployment.stages[1].devices  # the source sends the stitched map on itself
        for n, device in enumerate(receivers):
            sock = session.context.socket(zmq.DEALER)
            # one identity per socket: a device can run a tile and the stage after it
            suffix = "" if n < len(deployment.stages[0].devices) else "/next"
            sock.identity = f"{source}/{deployment.epoch}{suffix}".encode()
            sock.sndhwm = 0
            key = public.get(device)
            plain = keys is None or not key
            apply_client(sock, None if plain or keys is None else (keys.public, keys.secret),
                         None if plain or key is None else key.encode(), insecure=plain)
            sock.connect(str(infos[device]["data"]))
            shaper = link_setting(cluster, source, device).shaper(cluster.dilation)
            links.append((sock, Outlink(device, socket_sender(sock), deployment.window, shaper)))
        return links
