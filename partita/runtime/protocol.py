"""The control protocol: one frozen dataclass per command a coordinator sends a worker, and per reply.

A command travels as a wire message (`partita.runtime.wire`): its `KIND` is the message kind, its
fields are the header, and the tensors it carries (a stage archive, profiling inputs, FL weights)
are the message's tensors. `command_from(message)` turns a decoded message into its command,
checking every field; a bad field raises `WorkerError` naming the command and the field, which the
worker answers with an `error` reply. `reply_from(message)` does the same for replies on the
coordinator's side. Nothing else reads a control header.

| command      | reply      | what it does |
|---|---|---|
| `Hello`      | `Info`     | what the worker is: device, memory, data address, speed, dilation |
| `Ping`       | `Pong`     | heartbeat (answered while long commands run) |
| `Load`       | `Ok`       | install a stage archive (sha256-checked, memory-checked), or the cached one of that sha256 |
| `Stash`      | `Ok`       | keep an archive in the cache without loading it (standby) |
| `Unload`     | `Ok`       | drop the given stages (None: all) |
| `Renumber`   | `Ok`       | serve loaded stages under new indices |
| `Allow`      | `Ok`       | the peers (z85 keys) that may send activations |
| `Route`      | `Ok`       | one epoch's data-plane wiring: where each stage's outputs go |
| `Profile`    | `Profiled` | time a chain of stage candidates |
| `Probe`      | `Probed`   | RTT, latency and bandwidth to a peer's data socket |
| `Emulate`    | `Ok`       | change the emulated speed, dilation or links |
| `Stats`      | `Figures`  | running figures per stage and link, counters |
| `Drain`      | `Ok`       | finish the requests in flight, then exit |
| `FlTrain`    | `FlUpdate` | one round of federated training (a worker job, see `partita.fl.serve`) |

Every command may carry `id` (an integer the reply echoes, see `ControlClient`); it is not a field
of the command. `Error` (`reason`, `type`) answers any command that failed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import torch

from partita.errors import EmulationError, WorkerError
from partita.runtime.emulation import check_reference_steps
from partita.runtime.wire import Message

__all__ = [
    "COMMANDS", "COMMAND_KINDS", "REPLIES", "REPLY_KINDS", "FL_TRAIN", "FL_UPDATE",
    "Command", "Reply", "command_from", "reply_from",
    "Hello", "Ping", "Load", "Stash", "Unload", "Renumber", "Allow", "Destination", "StageRoute", "Route",
    "Profile", "Probe", "LinkChange", "Emulate", "Stats", "Drain", "FlTrain", "Benchmark",
    "Info", "Pong", "Ok", "Error", "Profiled", "Probed", "Figures", "FlUpdate", "Benchmarked",
]

FL_TRAIN = "fl-train"
FL_UPDATE = "fl-update"


# -- field checks: each names the command and the field it refuses ----------------------------------
def _int(kind: str, name: str, value: object, *, low: int | None = None) -> int:
    if type(value) is not int or (low is not None and value < low):
        bound = f" >= {low}" if low is not None else ""
        raise WorkerError(f"{kind} needs integer {name!r}{bound}, got {value!r}")
    return value


def _number(kind: str, name: str, value: object, *, optional: bool = False, positive: bool = False) -> float | None:
    if value is None and optional:
        return None
    ok = isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)
    if not ok or value < 0 or (positive and value == 0):  # type: ignore[operator]
        sign = "> 0" if positive else ">= 0"
        raise WorkerError(f"{kind}'s {name!r} must be a number {sign}{' or null' if optional else ''}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def _str(kind: str, name: str, value: object, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise WorkerError(f"{kind} needs string {name!r}, got {value!r}")
    return value


def _strs(kind: str, name: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise WorkerError(f"{kind}'s {name!r} must be a list of strings, got {value!r}")
    return tuple(value)


def _map(kind: str, name: str, value: object) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise WorkerError(f"{kind}'s {name!r} must be a map, got {value!r}")
    return value


# -- the base classes -------------------------------------------------------------------------------
class Command:
    """A control command. `header()` and `tensors()` are what goes on the wire; `parse` checks a message."""

    KIND: ClassVar[str]

    def header(self) -> dict[str, Any]:
        return {}

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return ()

    @classmethod
    def parse(cls, header: Mapping[str, Any], tensors: tuple[torch.Tensor, ...]) -> Command:
        return cls()


class Reply(Command):
    """A reply to a command: the same shape (a kind, a header, tensors)."""


# -- commands ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hello(Command):
    KIND: ClassVar[str] = "hello"


@dataclass(frozen=True)
class Ping(Command):
    KIND: ClassVar[str] = "ping"


@dataclass(frozen=True)
class Stats(Command):
    KIND: ClassVar[str] = "stats"


@dataclass(frozen=True)
class Drain(Command):
    KIND: ClassVar[str] = "drain"


#: An archive (a uint8 blob) travels in frames of at most this many bytes, so that an archive larger
#: than a worker's frame limit (`Limits.max_frame_bytes`, 512 MiB by default) still loads: a stage
#: of a large model. Every frame stays within the limit; the worker checks the joined archive's
#: size against its free memory before loading it.
ARCHIVE_FRAME_BYTES = 128 * 2**20


def archive_frames(archive: torch.Tensor, frame_bytes: int = ARCHIVE_FRAME_BYTES) -> tuple[torch.Tensor, ...]:
    """A uint8 archive blob as consecutive slices of at most `frame_bytes` (one frame when it is smaller)."""
    n = archive.numel()
    if n <= frame_bytes:
        return (archive,)
    return tuple(archive[i:i + frame_bytes] for i in range(0, n, frame_bytes))


def joined_archive(kind: str, tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The archive blob sent as `archive_frames`; WorkerError when a frame is not a 1-D uint8 blob."""
    if any(t.dtype != torch.uint8 or t.dim() != 1 for t in tensors):
        raise WorkerError(f"{kind}: an archive travels as 1-D uint8 frames")
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


@dataclass(frozen=True)
class Load(Command):
    """Install `archive` (a `torch.export` stage archive as a uint8 blob) as stage `stage`.

    `archive` None: load the archive the worker's cache holds under `sha256` (`ArchiveCache`);
    when it holds none, nothing is loaded and the reply says `{"missing": true}` (send the bytes
    then). `memory_bytes` is what the plan says the stage needs (weights plus peak activations; 0:
    only its weights count). `reference_host_s` is its calibrated host time, the emulation basis of
    an emulated worker (None: the worker measures it). `reference_steps` does the same for a stage
    whose steps differ in size (a decoder stage): per kind of step ("prefill", "decode"), one or
    two (size, host seconds) points (`partita.runtime.emulation.reference_at`); it takes
    precedence over `reference_host_s` for the steps the stage names (`step_work`).
    """

    KIND: ClassVar[str] = "load"
    stage: int
    sha256: str
    archive: torch.Tensor | None
    memory_bytes: float = 0.0
    reference_host_s: float | None = None
    reference_steps: Mapping[str, tuple[tuple[float, float], ...]] | None = None

    def header(self) -> dict[str, Any]:
        steps = None if self.reference_steps is None else {
            kind: [list(point) for point in points] for kind, points in self.reference_steps.items()}
        return {"stage": self.stage, "sha256": self.sha256, "memory_bytes": self.memory_bytes,
                "reference_host_s": self.reference_host_s, "reference_steps": steps}

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return () if self.archive is None else archive_frames(self.archive, ARCHIVE_FRAME_BYTES)

    @classmethod
    def parse(cls, header: Mapping[str, Any], tensors: tuple[torch.Tensor, ...]) -> Load:
        if type(header.get("stage")) is not int or not isinstance(header.get("sha256"), str):
            raise WorkerError("load needs integer 'stage', string 'sha256' and at most one archive (in frames)")
        reference = header.get("reference_host_s")
        try:
            steps = check_reference_steps(header.get("reference_steps"))
        except EmulationError as exc:
            raise WorkerError(f"load: {exc}") from None
        return cls(header["stage"], header["sha256"], joined_archive("load", tensors) if tensors else None,
                   memory_bytes=float(_number("load", "memory_bytes", header.get("memory_bytes") or 0.0) or 0.0),
                   reference_host_s=float(reference) if isinstance(reference, int | float) else None,
                   reference_steps=steps)


@dataclass(frozen=True)
class Stash(Command):
    """Keep `archive` in the worker's archive cache under `sha256`, without loading it (a standby copy).

    The reply says `{"cached": true}`, or false when the archive does not fit the cache's budget.
    """

    KIND: ClassVar[str] = "stash"
    sha256: str
    archive: torch.Tensor

    def header(self) -> dict[str, Any]:
        return {"sha256": self.sha256}

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return archive_frames(self.archive, ARCHIVE_FRAME_BYTES)

    @classmethod
    def parse(cls, header: Mapping[str, Any], tensors: tuple[torch.Tensor, ...]) -> Stash:
        if not isinstance(header.get("sha256"), str) or not tensors:
            raise WorkerError("stash needs string 'sha256' and one archive (in frames)")
        return cls(header["sha256"], joined_archive("stash", tensors))


@dataclass(frozen=True)
class Unload(Command):
    """Drop stages `stages` (None: every stage)."""

    KIND: ClassVar[str] = "unload"
    stages: tuple[int, ...] | None = None

    def header(self) -> dict[str, Any]:
        return {"stages": None if self.stages is None else list(self.stages)}

    @classmethod
    def parse(cls, header: Mapping[str, Any], tensors: tuple[torch.Tensor, ...]) -> Unload:
        stages = header.get("stages")
        if stages is not None and not (isinstance(stages, list) and all(type(s) is int for s in stages)):
            raise WorkerError("unload takes 'stages': a list of integers, or null for all")
        return cls(None if stages is None else tuple(stages))


@dataclass(frozen=True)
class Renumber(Command):
    """Serve stage `old` as stage `new` for every (old, new) pair, all at once."""

    KIND: ClassVar[str] = "renumber"
    moves: tuple[tuple[int, int], ...]

    def header(self) -> dict[str, Any]:
        return {"moves": [[old, new] for old, new in self.moves]}

    @classmethod
    def parse(cls, header: Mapping[str, Any], tensors: tuple[torch.Tensor, ...]) -> Renumber:
        moves = header.get("moves")
        if not (isinstance(moves, list) and all(
            isinstance(m, list) and len(m) == 2 and all(type(k) is int for k in m) for m in moves
        )):
            raise WorkerError("renumber takes 'moves': a list of [old, new] stage index pairs")
        return cls(tuple((old, new) for old, new in moves))


@dataclass(frozen=True)
class Allow(Command):
    """The peers (z85 public keys) that may send activations of deployment `pipeline`, besides the coordinator.

    The data socket accepts the union of every deployment's peers.
    """

    KIND: ClassVar[str] = "allow"
    peers: tuple[str, ...] = ()
    pipeline: int = 0

    def header(self) -> dict[str, Any]:
        return {"peers": list(self.peers), "pipeline": self.pipeline}

    @classmethod
    def parse(cls, header: Mapping[str, Any], tensors: tuple[torch.Tensor, ...]) -> Allow:
        peers = header.get("peers", [])
        if not isinstance(peers, list) or not all(isinstance(p, str) for p in peers):
            raise WorkerError("'peers' must be a list of z85 public keys")
        return cls(tuple(peers), _int("allow", "pipeline", header.get("pipeline", 0), low=0))


@dataclass(frozen=True)
class Destination:
    """Where a stage's outputs go: a worker's (or the coordinator's) data address, key and emulated link.

    `bandwidth_bytes_per_s` / `latency_s` shape the sends (device units); None: not shaped (a real link).
    """

    name: str
    address: str
    public_key: str | None = None
    bandwidth_bytes_per_s: float | None = None
    latency_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "address": self.address, "public_key": self.public_key,
                "bandwidth_bytes_per_s": self.bandwidth_bytes_per_s, "latency_s": self.latency_s}

    @classmethod
    def parse(cls, value: object) -> Destination:
        entry = _map("route", "next", value)
        return cls(
            _str("route", "next.name", entry.get("name")) or "",
            _str("route", "next.address", entry.get("address")) or "",
            _str("route", "next.public_key", entry.get("public_key"), optional=True),
            _number("route", "next.bandwidth_bytes_per_s", entry.get("bandwidth_bytes_per_s"), optional=True,
                    positive=True),
            _number("route", "next.latency_s", entry.get("latency_s"), optional=True),
        )


@dataclass(frozen=True)
class StageRoute:
    """Stage `stage`'s outputs go to `next` (replicas of the next stage, round-robin by request)."""

    stage: int
    next: tuple[Destination, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "next": [d.to_dict() for d in self.next]}


@dataclass(frozen=True)
class Route(Command):
    """The data-plane wiring of one deployment's epoch on one worker (replaces that deployment's previous one).

    `pipeline` is the deployment's slot on the cluster (0 for the first): a worker serving several
    deployments keeps each one's epoch, codec, window, outlinks and peers apart.
    """

    KIND: ClassVar[str] = "route"
    epoch: int
    window: int
    codec: str = "none"
    peers: tuple[str, ...] = ()
    stages: tuple[StageRoute, ...] = ()
    pipeline: int = 0

    def header(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "window": self.window, "codec": self.codec, "peers": list(self.peers),
                "stages": [s.to_dict() for s in self.stages], "pipeline": self.pipeline}

    @classmethod
    def parse(cls, header: Mapping[str, Any], tensors: tuple[torch.Tensor, ...]) -> Route:
        if type(header.get("epoch")) is not int or type(header.get("window")) is not int or header["window"] < 1:
            raise WorkerError("route needs integer 'epoch' and 'window' >= 1")
        from partita.runtime.codec import check_codec

        codec = check_codec(header.get("codec", "none"))
        peers = Allow.parse(header, ()).peers
        entries = header.get("stages", [])
        if not isinstance(entries, list):
            raise WorkerError(f"route's 'stages' must be a list, got {entries!r}")
        stages = []
        for entry in entries:
            entry = _map("route", "stages", entry)
            nexts = entry.get("next")
            if not isinstance(nexts, list):
                raise WorkerError(f"route's 'next' must be a list of destinations, got {nexts!r}")
            stages.append(StageRoute(_int("route", "stage", entry.get("stage"), low=0),
                                     tuple(Destination.parse(d) for d in nexts)))
        pipeline = _int("route", "pipeline", header.get("pipeline", 0), low=0)
        return cls(header["epoch"], header["window"], codec, peers, tuple(stages), pipeline)


@dataclass(frozen=True)
class Profile(Command):
    """Time a chain of stage candidates: `programs` are their sha256s, `archives` their bytes, then `inputs`."""

    KIND: ClassVar[str] = "profile"
    programs: tuple[str, ...]
    archives: tuple[torch.Tensor, ...]
    inputs: tuple[torch.Tensor, ...]
    reps: int = 3

    def header(self) -> dict[str, Any]:
        return {"programs": list(self.programs), "reps": self.reps}

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (*self.archives, *self.inputs)

    @classmethod
    def parse(cls, header: Mapping[str, Any], tensors: tuple[torch.Tensor, ...]) -> Profile:
        shas, reps = header.get("programs"), header.get("reps", 3)
        if (not isinstance(shas, list) or not all(isinstance(s, str) for s in shas) or len(shas) > len(tensors)
                or type(reps) is not int or not 1 <= reps <= 100):
            raise WorkerError("profile needs 'programs' (sha256 list), 'reps' in 1..100, archives then inputs")
        return cls(tuple(shas), tensors[:len(shas)], tensors[len(shas):], reps)


@dataclass(frozen=True)
class Probe(Command):
    """Measure the link to a peer's data socket. The emulated link fields shape the probe like activations."""

    KIND: ClassVar[str] = "probe"
    address: str
    public_key: str | None = None
    bandwidth_bytes_per_s: float | None = None
    latency_s: float | None = None
    payload_bytes: int = 4 * 2**20

    def header(self) -> dict[str, Any]:
        return {"address": self.address, "public_key": self.public_key, "payload_bytes": self.payload_bytes,
                "bandwidth_bytes_per_s": self.bandwidth_bytes_per_s, "latency_s": self.latency_s}

    @classmethod
    def parse(cls, header: Mapping[str, Any], tensors: tuple[torch.Tensor, ...]) -> Probe:
        if not isinstance(header.get("address"), str):
            raise WorkerError("probe needs the peer's data 'address'")
        emulate = (header.get("bandwidth_bytes_per_s"), header.get("latency_s"))
        if not all(v is None or (isinstance(v, int | float) and v >= 0) for v in emulate) or emulate[0] == 0:
            raise WorkerError("probe's 'bandwidth_bytes_per_s' (> 0) and 'latency_s' (>= 0) must be numbers or null")
        payload = _int("probe", "payload_bytes", header.get("payload_bytes", 4 * 2**20), low=1)
        return cls(header["address"], _str("probe", "public_key", header.get("public_key"), optional=True),
                   None if emulate[0] is None else float(emulate[0]), None if emulate[1] is None else float(emulate[1]),
                   payload)


@dataclass(frozen=True)
class Benchmark(Command):
    """Measure this worker's compute again: fp32 matmul windows of `window_s`, repeated until they agree."""

    KIND: ClassVar[str] = "benchmark"
    window_s: float = 0.1

    def header(self) -> dict[str, Any]:
        return {"window_s": self.window_s}

    @classmethod
    def parse(cls, header: Mapping[str, Any], tensors: tuple[torch.Tensor, ...]) -> Benchmark:
        window = header.get("window_s", 0.1)
        if isinstance(window, bool) or not isinstance(window, int | float) or not 0.001 <= window <= 5.0:
            raise WorkerError("benchmark's 'window_s' must be a number of seconds in 0.001..5")
        return cls(float(window))


@dataclass(frozen=True)
class LinkChange:
    """A change to one emulated outgoing link: None keeps that part as it is."""

    bandwidth: float | None = None
    latency: float | None = None

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in (("bandwidth", self.bandwidth), ("latency", self.latency)) if v is not None}


@dataclass(frozen=True)
class Emulate(Command):
    """Change the emulation: `speed` (relative to the host; None: native) if `set_speed`, `dilation` if given, links.

    `links` maps a peer's name to the change of the emulated link to it.
    """

    KIND: ClassVar[str] = "emulate"
    speed: float | None = None
    set_speed: bool = False
    dilation: float | None = None
    links: Mapping[str, LinkChange] = field(default_factory=dict)

    def header(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.set_speed:
            out["speed"] = self.speed
        if self.dilation is not None:
            out["dilation"] = self.dilation
        if self.links:
            out["links"] = {peer: change.to_dict() for peer, change in self.links.items()}
        return out

    @classmethod
    def parse(cls, header: Mapping[str, Any], tensors: tuple[torch.Tensor, ...]) -> Emulate:
        dilation = None
        if "dilation" in header:
            dilation = header["dilation"]
            if not (isinstance(dilation, int | float) and not isinstance(dilation, bool) and dilation >= 1):
                raise WorkerError(f"dilation must be a number >= 1, got {dilation!r}")
            dilation = float(dilation)
        speed = header.get("speed")
        if speed is not None and not (isinstance(speed, int | float) and not isinstance(speed, bool) and speed > 0):
            raise WorkerError(f"speed must be a number > 0 or null, got {speed!r}")
        links = {}
        for peer, change in _map("emulate", "links", header.get("links") or {}).items():
            change = _map("emulate", f"links.{peer}", change)
            unknown = set(change) - {"bandwidth", "latency"}
            if unknown:
                raise WorkerError(f"emulate's link change may set 'bandwidth' and 'latency', not {sorted(unknown)}")
            links[peer] = LinkChange(
                _number("emulate", "bandwidth", change.get("bandwidth"), optional=True, positive=True),
                _number("emulate", "latency", change.get("latency"), optional=True),
            )
        return cls(None if speed is None else float(speed), "speed" in header, dilation, links)


@dataclass(frozen=True)
class FlTrain(Command):
    """One round of federated training on a worker (served by the worker's `fl-train` job).

    `arrays` names the global weights (one tensor each, in order); `config` is the training
    configuration the FL layer defines (`partita.fl.update`: task, task options, client id, ...).
    """

    KIND: ClassVar[str] = FL_TRAIN
    arrays: tuple[str, ...]
    config: Mapping[str, Any]
    weights: tuple[torch.Tensor, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    def header(self) -> dict[str, Any]:
        return {**self.extra, "arrays": list(self.arrays), "config": dict(self.config)}

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.weights

    @classmethod
    def parse(cls, header: Mapping[str, Any], tensors: tuple[torch.Tensor, ...]) -> FlTrain:
        arrays = _strs(FL_TRAIN, "arrays", header.get("arrays", []))
        if len(arrays) != len(tensors):
            raise WorkerError(f"{FL_TRAIN} names {len(arrays)} arrays but carries {len(tensors)} tensors")
        config = _map(FL_TRAIN, "config", header.get("config", {}))
        extra = {k: v for k, v in header.items() if k not in ("arrays", "config", "id")}
        return cls(arrays, config, tensors, extra)


# -- replies ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Info(Reply):
    """A worker's hello: `data` is its data socket's address; `memory_bytes` its capacity."""

    KIND: ClassVar[str] = "info"
    name: str
    data: str
    fields: Mapping[str, Any] = field(default_factory=dict)  # device, memory, speed, dilation, pid, ...

    def header(self) -> dict[str, Any]:
        return {**self.fields, "name": self.name, "data": self.data}

    @classmethod
    def parse(cls, header: Mapping[str, Any], tensors: tuple[torch.Tensor, ...]) -> Info:
        return cls(_str("info", "name", header.get("name")) or "", _str("info", "data", header.get("data")) or "",
                   {k: v for k, v in header.items() if k not in ("name", "data", "id")})


@dataclass(frozen=True)
class Pong(Reply):
    KIND: ClassVar[str] = "pong"
    t: float
    pending: int
    epoch: int

    def header(self) -> dict[str, Any]:
        return {"t": self.t, "pending": self.pending, "epoch": self.epoch}

    @classmethod
    def parse(cls, header: Mapping[str, Any], tensors: tuple[torch.Tensor, ...]) -> Pong:
        return cls(float(_number("pong", "t", header.get("t")) or 0.0), _int("pong", "pending", header.get("pending")),
                   _int("pong", "epoch", header.get("epoch")))


@dataclass(frozen=True)
class Ok(Reply):
    """A command succeeded; `fields` say what it left (e.g. `stages` after a renumber)."""

    KIND: ClassVar[str] = "ok"
    fields: Mapping[str, Any] = field(default_factory=dict)

    def header(self) -> dict[str, Any]:
        return dict(self.fields)

    @classmethod
    def parse(cls, header: Mapping[str, Any], tensors: tuple[torch.Tensor, ...]) -> Ok:
        return cls({k: v for k, v in header.items() if k != "id"})


@dataclass(frozen=True)
class Error(Reply):
    """A command failed or was refused: `reason` says why; `type` is the error class (or "internal")."""

    KIND: ClassVar[str] = "error"
    reason: str
    type: str | None = None

    def header(self) -> dict[str, Any]:
        return {"reason": self.reason, **({"type": self.type} if self.type else {})}

    @classmethod
    def parse(cls, header: Mapping[str, Any], tensors: tuple[torch.Tensor, ...]) -> Error:
        return cls(str(header.get("reason", "")), _str("error", "type", header.get("type"), optional=True))


@dataclass(frozen=True)
class Profiled(Reply):
    """Seconds per candidate: on this host, and in device time (host seconds / emulated speed)."""

    KIND: ClassVar[str] = "profiled"
    host_s: tuple[float, ...]
    device_s: tuple[float, ...]

    def header(self) -> dict[str, Any]:
        return {"host_s": list(self.host_s), "device_s": list(self.device_s)}

    @classmethod
    def parse(cls, header: Mapping[str, Any], tensors: tuple[torch.Tensor, ...]) -> Profiled:
        def seconds(name: str) -> tuple[float, ...]:
            values = header.get(name)
            if not isinstance(values, list):
                raise WorkerError(f"profiled needs a list {name!r}, got {values!r}")
            return tuple(float(_number("profiled", name, v) or 0.0) for v in values)

        return cls(seconds("host_s"), seconds("device_s"))


@dataclass(frozen=True)
class Probed(Reply):
    """A measured link (device time): bandwidth, one-way latency, and the raw figures the probe took."""

    KIND: ClassVar[str] = "probed"
    bandwidth_bytes_per_s: float
    latency_s: float
    fields: Mapping[str, Any] = field(default_factory=dict)

    def header(self) -> dict[str, Any]:
        return {**self.fields, "bandwidth_bytes_per_s": self.bandwidth_bytes_per_s, "latency_s": self.latency_s}

    @classmethod
    def parse(cls, header: Mapping[str, Any], tensors: tuple[torch.Tensor, ...]) -> Probed:
        return cls(float(_number("probed", "bandwidth_bytes_per_s", header.get("bandwidth_bytes_per_s")) or 0.0),
                   float(_number("probed", "latency_s", header.get("latency_s")) or 0.0),
                   {k: v for k, v in header.items() if k not in ("bandwidth_bytes_per_s", "latency_s", "id")})


@dataclass(frozen=True)
class Benchmarked(Reply):
    """A worker's compute in device time: median FLOP/s of the windows, their relative spread and count."""

    KIND: ClassVar[str] = "benchmarked"
    flops_per_s: float
    spread: float
    samples: int

    def header(self) -> dict[str, Any]:
        return {"flops_per_s": self.flops_per_s, "spread": self.spread, "samples": self.samples}

    @classmethod
    def parse(cls, header: Mapping[str, Any], tensors: tuple[torch.Tensor, ...]) -> Benchmarked:
        return cls(float(_number("benchmarked", "flops_per_s", header.get("flops_per_s")) or 0.0),
                   float(_number("benchmarked", "spread", header.get("spread")) or 0.0),
                   _int("benchmarked", "samples", header.get("samples", 1), low=1))


@dataclass(frozen=True)
class Figures(Reply):
    """A worker's running figures (the `stats` reply); stage keys are stage indices as strings."""

    KIND: ClassVar[str] = "stats"
    name: str
    epoch: int
    stages: Mapping[str, Mapping[str, Any]]
    links_out: Mapping[str, Mapping[str, Any]]
    links_in: Mapping[str, Mapping[str, Any]]
    counters: Mapping[str, int]
    dilation: float

    def header(self) -> dict[str, Any]:
        return {"name": self.name, "epoch": self.epoch, "stages": dict(self.stages), "links_out": dict(self.links_out),
                "links_in": dict(self.links_in), "counters": dict(self.counters), "dilation": self.dilation}

    @classmethod
    def parse(cls, header: Mapping[str, Any], tensors: tuple[torch.Tensor, ...]) -> Figures:
        return cls(_str("stats", "name", header.get("name")) or "", _int("stats", "epoch", header.get("epoch")),
                   _map("stats", "stages", header.get("stages")), _map("stats", "links_out", header.get("links_out")),
                   _map("stats", "links_in", header.get("links_in")), _map("stats", "counters", header.get("counters")),
                   float(_number("stats", "dilation", header.get("dilation")) or 1.0))


@dataclass(frozen=True)
class FlUpdate(Reply):
    """A client's update: `arrays` names its weights (one tensor each); `metrics` as `partita.fl.update` defines."""

    KIND: ClassVar[str] = FL_UPDATE
    arrays: tuple[str, ...]
    metrics: Mapping[str, Any]
    weights: tuple[torch.Tensor, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    def header(self) -> dict[str, Any]:
        return {**self.extra, "arrays": list(self.arrays), "metrics": dict(self.metrics)}

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.weights

    @classmethod
    def parse(cls, header: Mapping[str, Any], tensors: tuple[torch.Tensor, ...]) -> FlUpdate:
        arrays = _strs(FL_UPDATE, "arrays", header.get("arrays", []))
        if len(arrays) != len(tensors):
            raise WorkerError(f"{FL_UPDATE} names {len(arrays)} arrays but carries {len(tensors)} tensors")
        extra = {k: v for k, v in header.items() if k not in ("arrays", "metrics", "id")}
        return cls(arrays, _map(FL_UPDATE, "metrics", header.get("metrics", {})), tensors, extra)


COMMANDS: dict[str, type[Command]] = {
    c.KIND: c for c in (Hello, Ping, Load, Stash, Unload, Renumber, Allow, Route, Profile, Probe, Emulate, Stats, Drain,
                        FlTrain, Benchmark)
}
REPLIES: dict[str, type[Reply]] = {
    r.KIND: r for r in (Info, Pong, Ok, Error, Profiled, Probed, Figures, FlUpdate, Benchmarked)
}
COMMAND_KINDS = frozenset(COMMANDS)
REPLY_KINDS = frozenset(REPLIES)


def command_from(message: Message) -> Command:
    """The command `message` carries, every field checked; WorkerError if it is not a well-formed command."""
    kind = COMMANDS.get(message.kind)
    if kind is None:
        raise WorkerError(f"unknown command {message.kind!r}; commands: {', '.join(sorted(COMMANDS))}")
    return kind.parse(message.header, message.tensors)


def reply_from(message: Message) -> Reply:
    """The reply `message` carries, its fields checked; WorkerError if it is not a well-formed reply."""
    kind = REPLIES.get(message.kind)
    if kind is None:
        raise WorkerError(f"unknown reply {message.kind!r}; replies: {', '.join(sorted(REPLIES))}")
    return cast(Reply, kind.parse(message.header, message.tensors))
