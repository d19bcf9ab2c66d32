"""The commands a coordinator sends a worker, one frozen dataclass each (the table is in `partita.runtime.protocol`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from partita.errors import EmulationError, WorkerError
from partita.runtime.emulation import check_reference_steps
from partita.runtime.protocol.base import (
    FL_TRAIN,
    Command,
    check_int,
    check_map,
    check_named_arrays,
    check_number,
    check_str,
)


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
                   memory_bytes=float(check_number("load", "memory_bytes", header.get("memory_bytes") or 0.0) or 0.0),
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
        return cls(tuple(peers), check_int("allow", "pipeline", header.get("pipeline", 0), low=0))


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
        entry = check_map("route", "next", value)
        return cls(
            check_str("route", "next.name", entry.get("name")) or "",
            check_str("route", "next.address", entry.get("address")) or "",
            check_str("route", "next.public_key", entry.get("public_key"), optional=True),
            check_number("route", "next.bandwidth_bytes_per_s", entry.get("bandwidth_bytes_per_s"), optional=True,
                    positive=True),
            check_number("route", "next.latency_s", entry.get("latency_s"), optional=True),
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
            entry = check_map("route", "stages", entry)
            nexts = entry.get("next")
            if not isinstance(nexts, list):
                raise WorkerError(f"route's 'next' must be a list of destinations, got {nexts!r}")
            stages.append(StageRoute(check_int("route", "stage", entry.get("stage"), low=0),
                                     tuple(Destination.parse(d) for d in nexts)))
        pipeline = check_int("route", "pipeline", header.get("pipeline", 0), low=0)
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
        payload = check_int("probe", "payload_bytes", header.get("payload_bytes", 4 * 2**20), low=1)
        return cls(header["address"], check_str("probe", "public_key", header.get("public_key"), optional=True),
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
        for peer, change in check_map("emulate", "links", header.get("links") or {}).items():
            change = check_map("emulate", f"links.{peer}", change)
            unknown = set(change) - {"bandwidth", "latency"}
            if unknown:
                raise WorkerError(f"emulate's link change may set 'bandwidth' and 'latency', not {sorted(unknown)}")
            links[peer] = LinkChange(
                check_number("emulate", "bandwidth", change.get("bandwidth"), optional=True, positive=True),
                check_number("emulate", "latency", change.get("latency"), optional=True),
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
        arrays, config, extra = check_named_arrays(FL_TRAIN, header, tensors, "config")
        return cls(arrays, config, tensors, extra)
