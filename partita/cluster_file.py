"""The cluster file format: YAML (or a dict) validated with pydantic into a `ClusterSpec`.

The value types live in `partita.cluster`; this module is only the file schema, so a wrong file
gets one clear message naming the file, the field and what was expected. The format, in base SI
units or friendly spellings (see `partita.units`)::

    source: client          # where requests enter and results return: a device or a node that only communicates
    devices:
      - {name: jetson, type: jetson-orin-nano}          # catalog values fill in what is not given
      - {name: pi-a, flops_per_s: 1.35e10, memory: 4GiB}
    links:
      default: wifi5                                    # a preset name, or {bandwidth: 100Mbit/s, latency: 2ms}
      pairs:
        - {a: jetson, b: client, bandwidth_bytes_per_s: 1.25e8, latency_s: 0.0005}
        - {a: pi-a, b: jetson, preset: ethernet-1G}
        - {a: client, b: pi-b, bandwidth: 50Mbit/s, bandwidth_b_to_a: 10Mbit/s, latency: 5ms}  # one way slower

A link's bandwidth holds both ways, unless a pair gives `bandwidth_b_to_a`: then `bandwidth` is the
direction a -> b alone.

A device with an `address` (a running `partita worker`) may leave out its compute and memory, and
the file may leave out its links (all of `links:` when every device has an address): deploy and
`partita cluster probe` measure them. A file written by `partita cluster probe` says which figures
were measured: `basis: {flops_per_s: measured, ...}` and `spread:` on a device, `basis: measured`
and `measured: {...}` (both directions, RTT, spreads) on a link.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, field_validator, model_validator

from partita.cluster import CATALOG, LINK_PRESETS, ClusterSpec, DeviceSpec, LinkSpec, positive_finite
from partita.errors import ClusterSpecError
from partita.units import parse_bandwidth, parse_compute, parse_latency, parse_memory

__all__ = ["cluster_from_dict", "read_cluster_file"]

def read_cluster_file(path: str | os.PathLike) -> ClusterSpec:
    """Load and validate a cluster file; ClusterSpecError names the file, the field and what was expected."""
    import yaml  # only the file helpers need it

    origin = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ClusterSpecError(f"{origin}: cannot read the cluster file ({exc.strerror or exc})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ClusterSpecError(f"{origin}: not valid YAML{where}: {problem}") from exc
    return cluster_from_dict(data, origin=origin)


def cluster_from_dict(data: object, *, origin: str = "<dict>") -> ClusterSpec:
    """Validate a dict in the file format (see the module docstring) and build the cluster."""
    if not isinstance(data, dict):
        raise ClusterSpecError(
            f"{origin}: expected a mapping with source, devices and links, got {type(data).__name__}"
        )
    try:
        model = _ClusterModel.model_validate(data)
    except ValidationError as exc:
        raise ClusterSpecError(f"{origin}: {_describe(exc)}") from None
    try:
        return model.build()
    except ClusterSpecError as exc:
        raise ClusterSpecError(f"{origin}: {exc}") from None


# A number in base SI units, or a friendly spelling ("100Mbit/s", "2ms", "4GiB", "10GFLOPS").
_Bandwidth = Annotated[float, BeforeValidator(parse_bandwidth)]
_Latency = Annotated[float, BeforeValidator(parse_latency)]
_Memory = Annotated[float, BeforeValidator(parse_memory)]
_Compute = Annotated[float, BeforeValidator(parse_compute)]


def _pick(model: BaseModel, base: str, friendly: str) -> float | None:
    base_value, friendly_value = getattr(model, base), getattr(model, friendly)
    if base_value is not None and friendly_value is not None:
        raise ValueError(f"give either {base} or {friendly}, not both")
    return base_value if base_value is not None else friendly_value


_Basis = Literal["declared", "catalog", "measured"]


class _LinkModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    preset: str | None = None
    bandwidth_bytes_per_s: _Bandwidth | None = None
    bandwidth: _Bandwidth | None = None
    latency_s: _Latency | None = None
    latency: _Latency | None = None
    basis: _Basis | None = None
    measured: dict[str, float | int | bool] | None = None

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str | None) -> str | None:
        if value is not None and value not in LINK_PRESETS:
            raise ValueError(f"unknown link preset {value!r}; expected one of {', '.join(LINK_PRESETS)}")
        return value

    @model_validator(mode="after")
    def _complete(self) -> _LinkModel:
        bandwidth = _pick(self, "bandwidth_bytes_per_s", "bandwidth")
        latency = _pick(self, "latency_s", "latency")
        if self.preset is None and (bandwidth is None or latency is None):
            missing = "bandwidth" if bandwidth is None else "latency"
            raise ValueError(
                f"missing {missing}; expected a preset ({', '.join(LINK_PRESETS)}) "
                "or both bandwidth (e.g. 100Mbit/s) and latency (e.g. 2ms)"
            )
        return self

    def spec(self) -> LinkSpec:
        bandwidth = _pick(self, "bandwidth_bytes_per_s", "bandwidth")
        latency = _pick(self, "latency_s", "latency")
        basis = self.basis or "declared"
        if bandwidth is None or latency is None:  # `_complete` made sure a preset fills in what is missing
            preset = LINK_PRESETS[str(self.preset)]
            if self.basis is None and bandwidth is None and latency is None:
                basis = "catalog"
            bandwidth = preset.bandwidth_bytes_per_s if bandwidth is None else bandwidth
            latency = preset.latency_s if latency is None else latency
        return LinkSpec(bandwidth, latency, basis, self.measured or {})


def _preset_name(value: object) -> object:
    """`default: wifi5` is short for `default: {preset: wifi5}`."""
    return {"preset": value} if isinstance(value, str) else value


class _PairModel(_LinkModel):
    a: str
    b: str
    # b -> a, where it differs from a -> b (then `bandwidth` is a -> b alone): an ADSL line, a slow uplink
    bandwidth_b_to_a: _Bandwidth | None = None

    def spec(self) -> LinkSpec:
        link = super().spec()
        if self.bandwidth_b_to_a is None:
            return link
        there, back = link.bandwidth_bytes_per_s, self.bandwidth_b_to_a
        directions = (there, back) if self.a < self.b else (back, there)  # LinkSpec's are in name order
        return dataclasses.replace(link, bandwidth_bytes_per_s=min(directions), directions=directions)


class _LinksModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default: Annotated[_LinkModel | None, BeforeValidator(_preset_name)] = None
    pairs: list[_PairModel] = []


class _DeviceModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, BeforeValidator(lambda v: v if not isinstance(v, int | float) else str(v))]
    type: str | None = None
    flops_per_s: _Compute | None = None
    compute: _Compute | None = None
    memory_bytes: _Memory | None = None
    memory: _Memory | None = None
    address: str | None = None
    public_key: str | None = None
    speed: float | None = None
    basis: dict[Literal["flops_per_s", "memory_bytes"], _Basis] | None = None
    spread: dict[Literal["flops_per_s", "memory_bytes"], float] | None = None

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str | None) -> str | None:
        if value is not None and value not in CATALOG:
            raise ValueError(f"unknown device type {value!r}; expected one of {', '.join(CATALOG)}")
        return value

    @field_validator("speed")
    @classmethod
    def _positive_speed(cls, value: float | None) -> float | None:
        if value is not None and not positive_finite(value):
            raise ValueError(f"expected a speed factor > 0, got {value!r}")
        return value

    @model_validator(mode="after")
    def _complete(self) -> _DeviceModel:
        flops = _pick(self, "flops_per_s", "compute")
        memory = _pick(self, "memory_bytes", "memory")
        if self.type is None and self.address is None and (flops is None or memory is None):
            missing = "compute (flops_per_s)" if flops is None else "memory (memory_bytes)"
            raise ValueError(
                f"missing {missing}; give it, a catalog type such as raspberry-pi-4, "
                "or the address of the device's worker (then it is measured)"
            )
        return self

    def spec(self) -> DeviceSpec:
        flops = _pick(self, "flops_per_s", "compute")
        memory = _pick(self, "memory_bytes", "memory")
        basis: dict[str, str] = {str(k): str(v) for k, v in (self.basis or {}).items()}
        if self.type is not None and (flops is None or memory is None):  # the catalog fills in what is missing
            catalog = CATALOG[str(self.type)]
            for label, value in (("flops_per_s", flops), ("memory_bytes", memory)):
                if value is None:
                    basis.setdefault(label, "catalog")
            flops = catalog.flops_per_s if flops is None else flops
            memory = catalog.memory_bytes if memory is None else memory
        return DeviceSpec(
            name=self.name,
            flops_per_s=flops,
            memory_bytes=memory,
            address=self.address,
            type=self.type,
            public_key=self.public_key,
            speed=self.speed,
            basis={k: v for k, v in basis.items() if v != "declared"},
            spread={str(k): float(v) for k, v in (self.spread or {}).items()},
        )


class _ClusterModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: Annotated[str, BeforeValidator(lambda v: v if not isinstance(v, int | float) else str(v))]
    devices: list[_DeviceModel]
    links: _LinksModel | None = None

    @field_validator("devices")
    @classmethod
    def _unique(cls, devices: list[_DeviceModel]) -> list[_DeviceModel]:
        if not devices:
            raise ValueError("expected at least one device")
        seen: set[str] = set()
        for device in devices:
            if device.name in seen:
                raise ValueError(f"device name {device.name!r} appears twice; names must be unique")
            seen.add(device.name)
        return devices

    def build(self) -> ClusterSpec:
        devices = tuple(d.spec() for d in self.devices)
        nodes = {d.name for d in devices} | {self.source}
        links = self.links or _LinksModel()
        pairs: dict[frozenset[str], LinkSpec] = {}
        for i, pair in enumerate(links.pairs):
            for end in ("a", "b"):
                name = getattr(pair, end)
                if name not in nodes:
                    raise ClusterSpecError(
                        f"links.pairs[{i}].{end}: unknown node {name!r}; "
                        f"expected a device or the source ({', '.join(sorted(nodes))})"
                    )
            if pair.a == pair.b:
                raise ClusterSpecError(f"links.pairs[{i}]: a and b are both {pair.a!r}; a link joins two nodes")
            key = frozenset((pair.a, pair.b))
            if key in pairs:
                raise ClusterSpecError(f"links.pairs[{i}]: the link {pair.a}-{pair.b} is given twice")
            pairs[key] = pair.spec()
        default = links.default.spec() if links.default is not None else None
        if default is None:
            _check_measurable(devices, self.source, pairs, given=self.links is not None)
        return ClusterSpec(devices, self.source, default, pairs)


def _check_measurable(devices: tuple, source: str, pairs: dict, *, given: bool) -> None:
    """Without a default link, every link with no address at either end must be in `pairs`."""
    where = "links.default" if given else "links"
    reachable = {d.name for d in devices if d.address}
    nodes = [d.name for d in devices] + ([] if source in {d.name for d in devices} else [source])
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            if a in reachable or b in reachable or frozenset((a, b)) in pairs:
                continue
            raise ClusterSpecError(
                f"{where}: missing (required): the link {a}-{b} has no worker address at either end, so it "
                "cannot be measured; declare links.default (e.g. {bandwidth: 100Mbit/s, latency: 2ms}) or that pair"
            )


def _describe(exc: ValidationError) -> str:
    """The first validation problem as `field.path: what was expected`."""
    error = exc.errors(include_url=False)[0]
    parts = []
    for item in error["loc"]:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif not str(item).startswith("function-"):
            parts.append(f".{item}" if parts else str(item))
    location = "".join(parts) or "(top level)"
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "missing":
        message = "missing (required)"
    elif error["type"] == "extra_forbidden":
        message = "unknown field; check the spelling (see docs/planning.md)"
    return f"{location}: {message}"
