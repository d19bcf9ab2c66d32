"""The cluster description: devices (compute, memory), links (bandwidth, latency) and the source.

This is the ground layer: plain frozen values that every other layer reads. A cluster comes from a
YAML file (validated with pydantic, so a bad file gets one message naming the file and the field),
from a dict, from the device catalog, or from measurements (`partita.runtime.measure`, which `deploy` and `partita run` use).

The file format, in base SI units or friendly spellings (see `partita.units`)::

    source: client          # where requests enter and results return: a device or a node that only communicates
    devices:
      - {name: jetson, type: jetson-orin-nano}          # catalog values fill in what is not given
      - {name: pi-a, flops_per_s: 1.35e10, memory: 4GiB}
    links:
      default: wifi5                                    # a preset name, or {bandwidth: 100Mbit/s, latency: 2ms}
      pairs:
        - {a: jetson, b: client, bandwidth_bytes_per_s: 1.25e8, latency_s: 0.0005}
        - {a: pi-a, b: jetson, preset: ethernet-1G}

Links are symmetric. A node has unlimited bandwidth and no latency to itself. The source is a node
with its own links; when it is also a device, a stage on that device reaches it for free.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, field_validator, model_validator

from partita.catalog import DEVICE_TYPES, LINK_PRESET_VALUES, DeviceType, LinkPreset
from partita.errors import ClusterSpecError
from partita.units import parse_bandwidth, parse_compute, parse_latency, parse_memory

__all__ = [
    "CATALOG",
    "LINK_PRESETS",
    "ClusterSpec",
    "DeviceSpec",
    "DeviceType",
    "LinkPreset",
    "LinkSpec",
]


@dataclass(frozen=True)
class DeviceSpec:
    """One device that can run stages.

    `flops_per_s` is sustained fp32 FLOP/s; `memory_bytes` is what weights plus activations may use.
    `address` is "tcp://host:port" of a running worker, or None to emulate the device locally.
    `type` is the catalog key it came from, if any. `public_key` is the path of the worker's ZeroMQ
    public key file when `address` is set. `speed` is an emulation speed factor relative to this host
    (None: derive it from `flops_per_s`).
    """

    name: str
    flops_per_s: float
    memory_bytes: float
    address: str | None = None
    type: str | None = None
    public_key: str | None = None
    speed: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ClusterSpecError(f"device name must be a non-empty string, got {self.name!r}")
        for label, value in (("flops_per_s", self.flops_per_s), ("memory_bytes", self.memory_bytes)):
            if not _positive_finite(value):
                raise ClusterSpecError(f"device {self.name!r}: {label} must be a finite number > 0, got {value!r}")
        if self.speed is not None and not _positive_finite(self.speed):
            raise ClusterSpecError(f"device {self.name!r}: speed must be a finite number > 0, got {self.speed!r}")


@dataclass(frozen=True)
class LinkSpec:
    """A symmetric link: achieved bandwidth (bytes/s; math.inf within a device) and one-way latency (s)."""

    bandwidth_bytes_per_s: float
    latency_s: float

    def __post_init__(self) -> None:
        bw = self.bandwidth_bytes_per_s
        if isinstance(bw, bool) or not isinstance(bw, int | float) or math.isnan(bw) or bw <= 0:
            raise ClusterSpecError(f"link bandwidth_bytes_per_s must be > 0 (math.inf allowed), got {bw!r}")
        lat = self.latency_s
        if isinstance(lat, bool) or not isinstance(lat, int | float) or not math.isfinite(lat) or lat < 0:
            raise ClusterSpecError(f"link latency_s must be a finite number >= 0, got {lat!r}")


SELF_LINK = LinkSpec(math.inf, 0.0)

CATALOG: Mapping[str, DeviceType] = DEVICE_TYPES
LINK_PRESETS: Mapping[str, LinkSpec] = MappingProxyType(
    {name: LinkSpec(p.bandwidth_bytes_per_s, p.latency_s) for name, p in LINK_PRESET_VALUES.items()}
)


def _positive_finite(value: object) -> bool:
    return (
        not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value) and value > 0
    )


class _FrozenLinks(Mapping):
    """An immutable, hashable mapping {frozenset({a, b}): LinkSpec}."""

    __slots__ = ("_data", "_hash")

    def __init__(self, data: Mapping[frozenset[str], LinkSpec] | None = None) -> None:
        self._data = dict(data or {})
        self._hash: int | None = None

    def __getitem__(self, key: frozenset[str]) -> LinkSpec:
        return self._data[key]

    def __iter__(self) -> Iterator[frozenset[str]]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._data.items()))
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self.items()) == dict(other.items())

    def __repr__(self) -> str:
        items = ", ".join(f"{'-'.join(sorted(k))}: {v}" for k, v in self._data.items())
        return f"{{{items}}}"


@dataclass(frozen=True)
class ClusterSpec:
    """Devices, the links between nodes, and the source node where requests enter and results return.

    `pair_links` maps frozenset({a, b}) to the link between nodes a and b (symmetric); every other
    pair of distinct nodes uses `default_link`. Nodes are the devices plus the source.
    """

    devices: tuple[DeviceSpec, ...]
    source: str
    default_link: LinkSpec
    pair_links: Mapping[frozenset[str], LinkSpec] = field(default_factory=_FrozenLinks)
    _index: Mapping[str, DeviceSpec] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        devices = tuple(self.devices)
        object.__setattr__(self, "devices", devices)
        if not devices:
            raise ClusterSpecError("a cluster needs at least one device")
        index: dict[str, DeviceSpec] = {}
        for device in devices:
            if not isinstance(device, DeviceSpec):
                raise ClusterSpecError(f"devices must be DeviceSpec values, got {type(device).__name__}")
            if device.name in index:
                raise ClusterSpecError(f"device name {device.name!r} appears twice; names must be unique")
            index[device.name] = device
        object.__setattr__(self, "_index", MappingProxyType(index))
        if not isinstance(self.source, str) or not self.source:
            raise ClusterSpecError(f"source must be a non-empty node name, got {self.source!r}")
        if not isinstance(self.default_link, LinkSpec):
            raise ClusterSpecError("default_link must be a LinkSpec")
        links = _FrozenLinks(self.pair_links)
        nodes = set(index) | {self.source}
        for pair, link in links.items():
            if not isinstance(pair, frozenset) or len(pair) != 2:
                raise ClusterSpecError(f"a pair link key must be frozenset({{a, b}}) of two nodes, got {pair!r}")
            unknown = sorted(pair - nodes)
            if unknown:
                raise ClusterSpecError(
                    f"link {'-'.join(sorted(pair))} names unknown node {unknown[0]!r}; "
                    f"expected a device or the source ({', '.join(sorted(nodes))})"
                )
            if not isinstance(link, LinkSpec):
                raise ClusterSpecError(f"link {'-'.join(sorted(pair))} must be a LinkSpec")
        object.__setattr__(self, "pair_links", links)

    # --- lookups -------------------------------------------------------------------------------

    @property
    def names(self) -> tuple[str, ...]:
        """Device names in file order (the source is not included unless it is a device)."""
        return tuple(self._index)

    @property
    def nodes(self) -> tuple[str, ...]:
        """Device names, then the source if it only communicates."""
        return self.names if self.source in self._index else (*self.names, self.source)

    def device(self, name: str) -> DeviceSpec:
        """The device called `name`; ClusterSpecError if there is none."""
        try:
            return self._index[name]
        except KeyError:
            # A KeyError would not say which names exist.
            raise ClusterSpecError(
                f"no device named {name!r}; the cluster has {', '.join(self._index)}"
            ) from None

    def link(self, a: str, b: str) -> LinkSpec:
        """The link between nodes a and b (symmetric); a node to itself: infinite bandwidth, no latency."""
        if a == b:
            return SELF_LINK
        return self.pair_links.get(frozenset((a, b)), self.default_link)

    # --- derived clusters -------------------------------------------------------------------------

    def replace_device(self, name: str, /, **changes: Any) -> ClusterSpec:
        """A copy with device `name` changed (e.g. `flops_per_s=...`); renaming is not allowed."""
        device = self.device(name)
        if "name" in changes and changes["name"] != name:
            raise ClusterSpecError("replace_device cannot rename a device; links refer to it by name")
        updated = dataclasses.replace(device, **changes)
        devices = tuple(updated if d.name == name else d for d in self.devices)
        return dataclasses.replace(self, devices=devices)

    def without(self, *names: str) -> ClusterSpec:
        """A copy without the named devices (and their links, except those to the source)."""
        for name in names:
            self.device(name)
        gone = set(names)
        devices = tuple(d for d in self.devices if d.name not in gone)
        keep = (set(d.name for d in devices)) | {self.source}
        pairs = {pair: link for pair, link in self.pair_links.items() if pair <= keep}
        return dataclasses.replace(self, devices=devices, pair_links=_FrozenLinks(pairs))

    def with_link(self, a: str, b: str, link: LinkSpec) -> ClusterSpec:
        """A copy where the link between a and b (both directions) is `link`."""
        if a == b:
            raise ClusterSpecError(f"a link joins two different nodes; got {a!r} twice")
        pairs = dict(self.pair_links)
        pairs[frozenset((a, b))] = link
        return dataclasses.replace(self, pair_links=_FrozenLinks(pairs))

    # --- files ----------------------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> ClusterSpec:
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
        return cls.from_dict(data, origin=origin)

    @classmethod
    def from_dict(cls, data: dict, *, origin: str = "<dict>") -> ClusterSpec:
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

    def to_dict(self) -> dict:
        """The file format in base SI units; `from_dict(spec.to_dict()) == spec`."""
        devices = []
        for d in self.devices:
            entry: dict[str, Any] = {"name": d.name, "flops_per_s": d.flops_per_s, "memory_bytes": d.memory_bytes}
            for key in ("type", "address", "public_key", "speed"):
                if getattr(d, key) is not None:
                    entry[key] = getattr(d, key)
            devices.append(entry)
        pairs = []
        for pair, link in self.pair_links.items():
            a, b = sorted(pair)
            pairs.append({"a": a, "b": b, **_link_dict(link)})
        pairs.sort(key=lambda p: (p["a"], p["b"]))
        return {
            "source": self.source,
            "devices": devices,
            "links": {"default": _link_dict(self.default_link), "pairs": pairs},
        }

    def to_yaml(self, path: str | Path) -> None:
        """Write the cluster as a YAML file that `from_yaml` reads back equal."""
        import yaml  # only the file helpers need it

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")


def _link_dict(link: LinkSpec) -> dict[str, float]:
    return {"bandwidth_bytes_per_s": link.bandwidth_bytes_per_s, "latency_s": link.latency_s}


# --- validation models (the file format) ------------------------------------------------------------


def _number(parser):
    return Annotated[float, BeforeValidator(parser)]


_Bandwidth = _number(parse_bandwidth)
_Latency = _number(parse_latency)
_Memory = _number(parse_memory)
_Compute = _number(parse_compute)


def _pick(model: BaseModel, base: str, friendly: str) -> float | None:
    base_value, friendly_value = getattr(model, base), getattr(model, friendly)
    if base_value is not None and friendly_value is not None:
        raise ValueError(f"give either {base} or {friendly}, not both")
    return base_value if base_value is not None else friendly_value


class _LinkModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    preset: str | None = None
    bandwidth_bytes_per_s: _Bandwidth | None = None
    bandwidth: _Bandwidth | None = None
    latency_s: _Latency | None = None
    latency: _Latency | None = None

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
        preset = LINK_PRESETS[self.preset] if self.preset is not None else None
        bandwidth = _pick(self, "bandwidth_bytes_per_s", "bandwidth")
        latency = _pick(self, "latency_s", "latency")
        return LinkSpec(
            bandwidth if bandwidth is not None else preset.bandwidth_bytes_per_s,
            latency if latency is not None else preset.latency_s,
        )


def _preset_name(value: object) -> object:
    """`default: wifi5` is short for `default: {preset: wifi5}`."""
    return {"preset": value} if isinstance(value, str) else value


class _PairModel(_LinkModel):
    a: str
    b: str


class _LinksModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default: Annotated[_LinkModel, BeforeValidator(_preset_name)]
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

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str | None) -> str | None:
        if value is not None and value not in CATALOG:
            raise ValueError(f"unknown device type {value!r}; expected one of {', '.join(CATALOG)}")
        return value

    @field_validator("speed")
    @classmethod
    def _positive_speed(cls, value: float | None) -> float | None:
        if value is not None and not _positive_finite(value):
            raise ValueError(f"expected a speed factor > 0, got {value!r}")
        return value

    @model_validator(mode="after")
    def _complete(self) -> _DeviceModel:
        flops = _pick(self, "flops_per_s", "compute")
        memory = _pick(self, "memory_bytes", "memory")
        if self.type is None and (flops is None or memory is None):
            missing = "compute (flops_per_s)" if flops is None else "memory (memory_bytes)"
            raise ValueError(f"missing {missing}; give it, or a catalog type such as raspberry-pi-4")
        return self

    def spec(self) -> DeviceSpec:
        catalog = CATALOG[self.type] if self.type is not None else None
        flops = _pick(self, "flops_per_s", "compute")
        memory = _pick(self, "memory_bytes", "memory")
        return DeviceSpec(
            name=self.name,
            flops_per_s=flops if flops is not None else catalog.flops_per_s,
            memory_bytes=memory if memory is not None else catalog.memory_bytes,
            address=self.address,
            type=self.type,
            public_key=self.public_key,
            speed=self.speed,
        )


class _ClusterModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: Annotated[str, BeforeValidator(lambda v: v if not isinstance(v, int | float) else str(v))]
    devices: list[_DeviceModel]
    links: _LinksModel

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
        pairs: dict[frozenset[str], LinkSpec] = {}
        for i, pair in enumerate(self.links.pairs):
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
        return ClusterSpec(devices, self.source, self.links.default.spec(), _FrozenLinks(pairs))


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
