"""Transitions: how the workers get from the deployment they hold to a target deployment.

`deploy` is the transition from nothing to the first target; a re-plan (`switch`) is the
transition from the current deployment to the next. Both go through this module, in two steps:

1. `plan_transition(held, target, network, live=...)` is pure: from what each device holds now,
   the target `Deployment` and the `Network` (addresses, keys, link settings, the sink), it
   computes the plan diff (`partita.plan.diff.diff_holdings`) and the typed worker actions.
2. `TransitionEngine.apply(transition)` (`partita.runtime.transition_engine`) carries the actions
   out over the control protocol and records what each device now holds.

| diff of a device                      | actions, in this order |
|---|---|
| holds a stage the target no longer uses | `Drop` (unload everything) |
| keeps its segments under a new index    | `Renumber` (nothing shipped) |
| gets segments it does not hold          | `Ship` (unload, then load the archive: sha256- and memory-checked; only the digest when its archive cache holds it) |
| keeps its stage as it is                | nothing |
| every device of the target, then every live worker | `Allow` (who may send to it), then `Route` (the new epoch's wiring) |

The sink (the coordinator's result socket) is re-authorized for the target's last stage before
any worker is routed, and every worker is allowed its senders before any is routed, so no
handshake is refused. This module holds the epoch counter and no socket; the engine also opens
the coordinator's own sends (`open_first_links`), shaped by the link settings planned here.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from partita.cluster import ClusterSpec, LinkSpec
from partita.errors import DeployError
from partita.plan.diff import PlanDiff, diff_holdings
from partita.runtime import protocol
from partita.runtime.deployment import ChainStage, Deployment, TiledStage
from partita.runtime.emulation import LinkShaper, shaper_for
from partita.runtime.handle import ClusterHandle

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
