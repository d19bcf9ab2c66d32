"""Transitions: how the workers get from the deployment they hold to a target deployment.

`deploy` is the transition from nothing to the first target; a re-plan (`switch`) is the
transition from the current deployment to the next. Both go through this module, in two steps:

1. `plan_transition(held, target, network, live=...)` is pure: from what each device holds now,
   the target `Deployment` and the `Network` (addresses, keys, link settings, the sink), it
   computes the plan diff (`partita.plan.diff.diff_holdings`) and the typed worker actions.
2. `TransitionEngine.apply(transition)` carries the actions out over the control protocol and
   records what each device now holds.

| diff of a device                      | actions, in this order |
|---|---|
| holds a stage the target no longer uses | `Drop` (unload everything) |
| keeps its segments under a new index    | `Renumber` (nothing shipped) |
| gets segments it does not hold          | `Ship` (unload, then load the archive: sha256- and memory-checked; only the digest when its archive cache holds it) |
| keeps its stage as it is                | nothing |
| every device of the target, then every live worker | `Allow` (who may send to it), then `Route` (the new epoch's wiring) |

The sink (the coordinator's result socket) is re-authorized for the target's last stage before
any worker is routed, and every worker is allowed its senders before any is routed, so no
handshake is refused. The engine also holds the epoch counter, the emulated link settings and the
shapers of the coordinator's own sends (`open_first_links`).
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import zmq

from partita.cluster import ClusterSpec, LinkSpec
from partita.errors import DeployError, WorkerError
from partita.plan.diff import PlanDiff, diff_holdings
from partita.runtime import protocol
from partita.runtime.deployment import STAGE_SPAN, ChainStage, Deployment, TiledStage
from partita.runtime.emulation import LinkShaper, shaper_for
from partita.runtime.flow import Outlink, socket_sender
from partita.runtime.handle import ClusterHandle
from partita.runtime.keys import apply_client, set_authorized
from partita.runtime.session import Session
from partita.runtime.wire import blob_tensor

if TYPE_CHECKING:
    from partita.plan import StagePlan

SHIP_TIMEOUT_S = 300.0
STASH_MIN_TIMEOUT_S = 10.0  # a standby copy may take 3x its bytes / the link's bandwidth on top of this
COMMAND_TIMEOUT_S = 10.0

_epochs = itertools.count(1)
_epochs_lock = threading.Lock()


def next_epoch() -> int:
    """A new epoch number, unique in this process (workers refuse activations of any other epoch)."""
    with _epochs_lock:
        return next(_epochs)


# -- links ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinkSetting:
    """The emulated link a -> b, device units; both None: not shaped (a real link, or a device to itself)."""

    bandwidth_bytes_per_s: float | None = None
    latency_s: float | None = None

    def shaper(self, dilation: float) -> LinkShaper | None:
        return shaper_for(self.bandwidth_bytes_per_s, self.latency_s, dilation)


def link_setting(cluster: ClusterHandle, a: str, b: str) -> LinkSetting:
    """How the runtime shapes the link a -> b on `cluster` (nothing when links are real)."""
    link = cluster.emulated_link(a, b) if cluster.emulated_links and a != b else None
    if link is None:
        return LinkSetting()
    bandwidth = None if math.isinf(link.bandwidth_bytes_per_s) else link.bandwidth_bytes_per_s
    return LinkSetting(bandwidth, link.latency_s or None)


def predicted_link(a: str, b: str, nbytes: int, link: LinkSpec, *, to_source: bool) -> dict[str, Any]:
    """One hop as `Pipeline.stats()["links"]` reports it: the bytes a request puts on it and the predicted times."""
    occupancy_s = 0.0 if math.isinf(link.bandwidth_bytes_per_s) else nbytes / link.bandwidth_bytes_per_s
    return {
        "from": a,
        "to": b,
        "to_source": to_source,
        "bytes": int(nbytes),
        "predicted_occupancy_s": occupancy_s,
        "predicted_transfer_s": link.latency_s + occupancy_s,
    }


# -- what the transition works from ---------------------------------------------------------------
@dataclass(frozen=True)
class Holding:
    """What one device holds: stage `stage`, segments [start, end), the program's sha256."""

    stage: int
    segments: tuple[int, int]
    sha256: str


@dataclass(frozen=True)
class Sink:
    """The coordinator's result socket: where the last stage sends (the source node's name, address, key)."""

    name: str
    address: str
    public_key: str | None


@dataclass(frozen=True)
class Network:
    """What routes are made of: the running workers' data addresses and keys, the links, the sink.

    `links(a, b)` is the emulated setting of link a -> b; `planned` is the cluster the plan assumed
    (for predicted link times); `reference_host_s(device, stage)` is the calibrated host time an
    emulated device's stage is paced by (None: a real device); `reference_steps(device, stage)` the
    same per kind of step, for a stage whose steps differ in size (a decoder's prefill and decode).
    """

    source: str
    data: Mapping[str, str]
    public_keys: Mapping[str, str | None]
    links: Callable[[str, str], LinkSetting]
    planned: ClusterSpec
    sink: Sink
    reference_host_s: Callable[[str, StagePlan], float | None] = lambda device, stage: None
    reference_steps: Callable[[str, StagePlan], Mapping[str, Any] | None] = lambda device, stage: None
    cached: Mapping[str, frozenset[str]] = field(default_factory=dict)  # device -> sha256 its archive cache holds


# -- the actions ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Drop:
    """Unload every stage of `device` (the target does not use it)."""

    device: str


@dataclass(frozen=True)
class Renumber:
    """`device` keeps its program, served from now on as stage `new` instead of `old`."""

    device: str
    old: int
    new: int


@dataclass(frozen=True)
class Ship:
    """Send stage `stage`'s archive to `device` and load it there (after unloading what it held).

    `cached`: the device's archive cache holds the archive, so only its sha256 is sent (the bytes
    follow only if the cache dropped it meanwhile).
    """

    device: str
    stage: int
    program: Any
    memory_bytes: float
    reference_host_s: float | None
    segments: tuple[int, int]
    cached: bool = False
    tile: bool = False  # a tile of a tiled stage (paced by its own measured time when emulated)
    reference_steps: Mapping[str, Any] | None = None  # per kind of step (a decoder stage), see Network


@dataclass(frozen=True)
class AuthorizeSink:
    """Only these workers (z85 keys) may connect to the coordinator's result socket from now on."""

    keys: tuple[str, ...]


@dataclass(frozen=True)
class Allow:
    """The peers (z85 keys) that may send this deployment's activations to `device`."""

    device: str
    peers: tuple[str, ...]
    pipeline: int = 0


@dataclass(frozen=True)
class Route:
    """`device`'s data-plane wiring for the target's epoch."""

    device: str
    command: protocol.Route


Action = Drop | Renumber | Ship | AuthorizeSink | Allow | Route


@dataclass(frozen=True)
class Transition:
    """The actions that take the workers to `target`, the diff they come from, the predicted hops."""

    target: Deployment
    diff: PlanDiff
    actions: tuple[Action, ...]
    predicted_links: tuple[dict[str, Any], ...] = field(default=())

    @property
    def shipped(self) -> tuple[tuple[str, int], ...]:
        """(device, stage) of every archive shipped."""
        return tuple(sorted((a.device, a.stage) for a in self.actions if isinstance(a, Ship)))

    @property
    def renumbered(self) -> tuple[tuple[str, int], ...]:
        """(device, new stage) of every stage only renumbered."""
        return tuple(sorted((a.device, a.new) for a in self.actions if isinstance(a, Renumber)))

    def describe(self) -> list[str]:
        """One line per action, in order (what docs/runtime.md shows)."""
        out = []
        for action in self.actions:
            match action:
                case Drop():
                    out.append(f"drop      {action.device}")
                case Renumber():
                    out.append(f"renumber  {action.device}: stage {action.old} -> {action.new}")
                case Ship():
                    how = " (cached: digest only)" if action.cached else ""
                    out.append(f"ship      stage {action.stage} {list(action.segments)} -> {action.device}{how}")
                case AuthorizeSink():
                    out.append(f"sink      accepts {len(action.keys)} key(s)")
                case Allow():
                    out.append(f"allow     {action.device}: {len(action.peers)} peer(s)")
                case Route():
                    stages = [s.stage for s in action.command.stages]
                    out.append(f"route     {action.device}: epoch {action.command.epoch}, stages {stages}")
        return out


def plan_transition(
    held: Mapping[str, Holding], target: Deployment, network: Network, *, live: Iterable[str]
) -> Transition:
    """The actions from `held` (what each live device holds) to `target`; pure (see the module docstring).

    `live` are the workers that answer: only they are dropped or routed. A device of the target
    that is not live is an error (DeployError): there is no worker to ship to.
    """
    live = set(live)
    missing = sorted(d for d in target.devices if d not in live)
    if missing:
        raise DeployError(f"the new plan uses {missing}, which have no live worker")
    if target.tiled is not None:
        return _tiled_transition(held, target, network, live)
    chain = [stage for stage in target.stages if isinstance(stage, ChainStage)]  # every stage, here
    programs = {stage.index: stage.program for stage in chain}
    # A device whose program differs from the target's (another model's, a stale split) is reloaded.
    current = {
        device: (h.stage, h.segments) for device, h in held.items()
        if device in live and _same_program(h, device, target, programs)
    }
    stale = {device for device in held if device in live and device not in current}
    diff = diff_holdings(current, target.plan)
    actions: list[Action] = []
    for change in diff.changes:
        if change.action == "unload" and change.device in held:
            actions.append(Drop(change.device))
    actions += [Drop(d) for d in sorted(stale) if d not in target.devices]
    for change in diff.changes:
        old, new = change.old_stage, change.new_stage
        if change.action == "keep" and old is not None and new is not None and old != new:
            actions.append(Renumber(change.device, old, new))
    for stage in chain:
        for device in stage.devices:
            change = next(c for c in diff.changes if c.device == device)
            if change.action == "load":
                actions.append(Ship(device, stage.index, stage.program, float(stage.plan.memory_bytes),
                                    network.reference_host_s(device, stage.plan), (stage.plan.start, stage.plan.end),
                                    cached=stage.program.sha256 in network.cached.get(device, ()),
                                    reference_steps=network.reference_steps(device, stage.plan)))
    routes, predicted = _routes(target, network)
    last = target.stages[-1]
    actions.append(AuthorizeSink(tuple(k for d in last.devices if (k := network.public_keys.get(d)))))
    idle = protocol.Route(target.epoch, target.window, target.codec, pipeline=target.slot)
    for device in sorted(live):
        actions.append(Allow(device, routes.get(device, idle).peers, target.slot))
    for device in sorted(live):
        actions.append(Route(device, routes.get(device, idle)))
    return Transition(target, diff, tuple(actions), tuple(predicted))


#: What a device that holds a tile (and maybe the stage after it) is recorded as holding: no chain
#: program matches it, so the next transition reloads or drops it.
TILES_HELD = "tiles"


def _tiled_transition(held: Mapping[str, Holding], target: Deployment, network: Network, live: set[str]) -> Transition:
    """A target whose first stage is tiled: every device is reloaded (tile programs are not reused across plans).

    Tile i's program goes to its device as stage 0 and answers the sink (the source stitches); the
    stage after the tiles, if any, goes to its device as stage 1 and answers the sink too, so a device
    can hold a tile and the rest of the model. Only the coordinator sends to these stages.
    """
    tiled = target.tiled
    if tiled is None:
        raise DeployError("internal: a tiled transition for a deployment without a tiled stage")
    diff = diff_holdings({}, target.plan)  # every device loads
    actions: list[Action] = [Drop(d) for d in sorted(held) if d in live]
    for device, tile, tile_plan in zip(tiled.devices, tiled.tiles, tiled.plan.tiles, strict=True):
        actions.append(Ship(device, 0, tile.program, float(tile_plan.memory_bytes), None,
                            (tiled.plan.start, tiled.plan.end), tile=True))
    for stage in target.stages[1:]:
        if not isinstance(stage, ChainStage):
            raise DeployError("a plan holds one tiled stage, the first")
        for device in stage.devices:
            actions.append(Ship(device, stage.index, stage.program, float(stage.plan.memory_bytes),
                                network.reference_host_s(device, stage.plan), (stage.plan.start, stage.plan.end)))
    source, sink = network.source, network.sink
    entries: dict[str, list[protocol.StageRoute]] = {}
    predicted: list[dict[str, Any]] = []
    for stage in target.stages:
        for device, nbytes_in, nbytes_out in _stage_bytes(stage):
            dest = _destination(sink.name, sink.address, sink.public_key, network.links(device, source))
            entries.setdefault(device, []).append(protocol.StageRoute(target.stage_id(stage.index), (dest,)))
            predicted.append(predicted_link(source, device, nbytes_in, network.planned.link(source, device),
                                            to_source=False))
            predicted.append(predicted_link(device, source, nbytes_out, network.planned.link(device, source),
                                            to_source=True))
    actions.append(AuthorizeSink(tuple(k for d in sorted(entries) if (k := network.public_keys.get(d)))))
    idle = protocol.Route(target.epoch, target.window, target.codec, pipeline=target.slot)
    routes = {device: protocol.Route(target.epoch, target.window, target.codec, (), tuple(stage_routes),
                                     pipeline=target.slot)
              for device, stage_routes in entries.items()}
    for device in sorted(live):
        actions.append(Allow(device, (), target.slot))
    for device in sorted(live):
        actions.append(Route(device, routes.get(device, idle)))
    return Transition(target, diff, tuple(actions), tuple(predicted))


def _stage_bytes(stage: Any) -> list[tuple[str, int, int]]:
    """(device, bytes in, bytes out) per device of a stage that the source feeds and that answers the source."""
    match stage:
        case TiledStage():
            return [(t.device, t.in_bytes, t.out_bytes) for t in stage.plan.tiles]
        case ChainStage():
            if len(stage.devices) != 1:
                raise DeployError("after a tiled stage the rest of the model runs on one device, not replicas")
            return [(stage.devices[0], stage.plan.in_bytes, stage.plan.out_bytes)]
    raise DeployError(f"unknown stage kind {stage!r}")


def _same_program(held: Holding, device: str, target: Deployment, programs: Mapping[int, Any]) -> bool:
    """True unless the device's held program is known to differ from the target's for its segments."""
    for stage in target.stages:
        if device in stage.devices and (stage.plan.start, stage.plan.end) == held.segments:
            return bool(programs[stage.index].sha256 == held.sha256)
    return True  # the target gives it other segments (or none): the diff decides


def _routes(target: Deployment, network: Network) -> tuple[dict[str, protocol.Route], list[dict[str, Any]]]:
    """Each target device's route, and the hops the plan predicts (as `Pipeline.stats()` reports them)."""
    stages = target.stages
    keys, source, sink = network.public_keys, network.source, network.sink
    peers: dict[str, list[str]] = {}
    entries: dict[str, list[protocol.StageRoute]] = {}
    predicted: list[dict[str, Any]] = []
    for stage in stages:
        match stage:
            case ChainStage():
                senders = stages[stage.index - 1].devices if stage.index > 0 else (source,)
                nexts = stages[stage.index + 1].devices if stage.index + 1 < len(stages) else None
                for device in stage.devices:
                    peers.setdefault(device, []).extend(k for u in senders if (k := keys.get(u)))
                    if nexts is not None:
                        dests = tuple(_destination(d, network.data[d], keys.get(d), network.links(device, d))
                                      for d in nexts)
                    else:
                        dests = (_destination(sink.name, sink.address, sink.public_key, network.links(device, source)),)
                    entries.setdefault(device, []).append(protocol.StageRoute(target.stage_id(stage.index), dests))
                    for sender in senders:
                        link = network.planned.link(sender, device)
                        predicted.append(predicted_link(sender, device, stage.plan.in_bytes, link, to_source=False))
                if nexts is None:
                    for device in stage.devices:
                        link = network.planned.link(device, source)
                        predicted.append(predicted_link(device, source, stage.plan.out_bytes, link, to_source=True))
    routes = {
        device: protocol.Route(target.epoch, target.window, target.codec, tuple(peers[device]), tuple(entries[device]),
                               pipeline=target.slot)
        for device in entries
    }
    return routes, predicted


def _destination(name: str, address: str, key: str | None, setting: LinkSetting) -> protocol.Destination:
    return protocol.Destination(name, address, key, setting.bandwidth_bytes_per_s, setting.latency_s)


# -- carrying a transition out --------------------------------------------------------------------
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
