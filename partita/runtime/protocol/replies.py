"""The replies a worker sends back, one frozen dataclass each (the table is in `partita.runtime.protocol`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from partita.errors import WorkerError
from partita.runtime.protocol.base import (
    FL_UPDATE,
    Reply,
    check_int,
    check_map,
    check_named_arrays,
    check_number,
    check_str,
)


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
        return cls(check_str("info", "name", header.get("name")) or "", check_str("info", "data", header.get("data")) or "",
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
        return cls(float(check_number("pong", "t", header.get("t")) or 0.0), check_int("pong", "pending", header.get("pending")),
                   check_int("pong", "epoch", header.get("epoch")))


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
        return cls(str(header.get("reason", "")), check_str("error", "type", header.get("type"), optional=True))


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
            return tuple(float(check_number("profiled", name, v) or 0.0) for v in values)

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
        return cls(float(check_number("probed", "bandwidth_bytes_per_s", header.get("bandwidth_bytes_per_s")) or 0.0),
                   float(check_number("probed", "latency_s", header.get("latency_s")) or 0.0),
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
        return cls(float(check_number("benchmarked", "flops_per_s", header.get("flops_per_s")) or 0.0),
                   float(check_number("benchmarked", "spread", header.get("spread")) or 0.0),
                   check_int("benchmarked", "samples", header.get("samples", 1), low=1))


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
        return cls(check_str("stats", "name", header.get("name")) or "", check_int("stats", "epoch", header.get("epoch")),
                   check_map("stats", "stages", header.get("stages")), check_map("stats", "links_out", header.get("links_out")),
                   check_map("stats", "links_in", header.get("links_in")), check_map("stats", "counters", header.get("counters")),
                   float(check_number("stats", "dilation", header.get("dilation")) or 1.0))


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
        arrays, metrics, extra = check_named_arrays(FL_UPDATE, header, tensors, "metrics")
        return cls(arrays, metrics, tensors, extra)
