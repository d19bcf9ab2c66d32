"""The cluster description: devices (compute, memory), links (bandwidth, latency) and the source.

This is the ground layer: plain frozen values that every other layer reads. A cluster comes from a
YAML file or a dict (`ClusterSpec.from_yaml` / `from_dict`; the file schema, validated with
pydantic so that a bad file gets one message naming the file and the field, is
`partita.cluster_file`), from the device catalog, or from measurements (`partita.runtime.measure`,
which `deploy` and `partita run` use).

A link carries the same bandwidth both ways unless it says otherwise (`LinkSpec.directions`: an
ADSL line, a Wi-Fi client's slower uplink); `ClusterSpec.link(a, b)` is always the direction from a
to b. A node has unlimited bandwidth and no latency to itself. The source is a node with its own
links; when it is also a device, a stage on that device reaches it for free.

Every figure has a basis: `declared` (written in the file), `catalog` (taken from a device type or
a link preset) or `measured` (by a probe: `partita cluster probe`, deploy). A device that has an
`address` may leave its compute, memory and links unknown (None); they are measured before
anything is planned with them, and planning a cluster with unknown figures is refused
(`ClusterSpec.check_known`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from partita.catalog import DEVICE_TYPES, LINK_PRESET_VALUES, DeviceType, LinkPreset
from partita.errors import ClusterSpecError

__all__ = [
    "BASES",
    "CATALOG",
    "LINK_PRESETS",
    "ClusterSpec",
    "DeviceSpec",
    "DeviceType",
    "LinkPreset",
    "LinkSpec",
]


BASES = ("declared", "catalog", "measured")


@dataclass(frozen=True)
class DeviceSpec:
    """One device that can run stages.

    `flops_per_s` is sustained fp32 FLOP/s; `memory_bytes` is what weights plus activations may use;
    either is None only for a device with an `address`: not known yet, measured at deploy or by
    `partita cluster probe`. `basis` says where each figure came from ({"flops_per_s": "measured",
    ...}, one of `BASES`; a figure it does not name is `declared`); `spread` gives a measured
    figure's relative spread (0.05: the repeats agreed within ±5%).
    `address` is "tcp://host:port" of a running worker, or None to emulate the device locally.
    `type` is the catalog key it came from, if any. `public_key` is the path of the worker's ZeroMQ
    public key file when `address` is set. `speed` is an emulation speed factor relative to this host
    (None: derive it from `flops_per_s`).
    """

    name: str
    flops_per_s: float | None
    memory_bytes: float | None
    address: str | None = None
    type: str | None = None
    public_key: str | None = None
    speed: float | None = None
    basis: Mapping[str, str] = field(default_factory=dict, compare=False)
    spread: Mapping[str, float] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ClusterSpecError(f"device name must be a non-empty string, got {self.name!r}")
        for label, value in (("flops_per_s", self.flops_per_s), ("memory_bytes", self.memory_bytes)):
            if value is None and self.address:
                continue  # measured before it is used
            if value is None:
                raise ClusterSpecError(
                    f"device {self.name!r}: {label} is not given and the device has no address to measure it at; "
                    "give it, a catalog type, or the address of its worker"
                )
            if not positive_finite(value):
                raise ClusterSpecError(f"device {self.name!r}: {label} must be a finite number > 0, got {value!r}")
        if self.speed is not None and not positive_finite(self.speed):
            raise ClusterSpecError(f"device {self.name!r}: speed must be a finite number > 0, got {self.speed!r}")
        object.__setattr__(self, "basis", MappingProxyType(dict(self.basis)))
        object.__setattr__(self, "spread", MappingProxyType(dict(self.spread)))
        for label, basis in self.basis.items():
            if basis not in BASES:
                raise ClusterSpecError(f"device {self.name!r}: basis of {label} must be one of {BASES}, got {basis!r}")

    @property
    def flops(self) -> float:
        """`flops_per_s`, known. Planning checks `ClusterSpec.check_known` first, so None here means a
        caller skipped that check."""
        if self.flops_per_s is None:
            raise ClusterSpecError(f"device {self.name!r}: flops_per_s is not known yet; measure it first "
                                   "(partita cluster probe, or deploy)")
        return self.flops_per_s

    @property
    def memory(self) -> float:
        """`memory_bytes`, known (see `flops`)."""
        if self.memory_bytes is None:
            raise ClusterSpecError(f"device {self.name!r}: memory_bytes is not known yet; measure it first "
                                   "(partita cluster probe, or deploy)")
        return self.memory_bytes

    def basis_of(self, figure: str) -> str:
        """Where `figure` ("flops_per_s", "memory_bytes") came from: declared, catalog or measured."""
        return self.basis.get(figure, "declared")


@dataclass(frozen=True)
class LinkSpec:
    """A link: achieved bandwidth (bytes/s; math.inf within a device) and one-way latency (s).

    The bandwidth is the same both ways unless `directions` gives each direction's, as (a -> b,
    b -> a) with a and b the link's two ends in name order; `bandwidth_bytes_per_s` is then the
    slower of the two, and `ClusterSpec.link(a, b)` returns the direction asked for (a link of its
    own, without `directions`). The latency is the same both ways.

    `basis` is declared, catalog (a preset) or measured. `measured` holds what a probe found, for a
    measured link: each direction's bandwidth (`bandwidth_a_to_b`, `bandwidth_b_to_a`, a and b in
    name order; they become `directions` when they differ by more than a probe's noise, see
    `partita.runtime.measure.probed_link`), `rtt_s`, the relative spreads of the repeats
    (`bandwidth_spread`, `latency_spread`), their count (`samples`) and whether they agreed within
    the target (`stable`).
    """

    bandwidth_bytes_per_s: float
    latency_s: float
    basis: str = field(default="declared", compare=False)
    measured: Mapping[str, Any] = field(default_factory=dict, compare=False)
    directions: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.basis not in BASES:
            raise ClusterSpecError(f"link basis must be one of {BASES}, got {self.basis!r}")
        object.__setattr__(self, "measured", MappingProxyType(dict(self.measured)))
        bw = self.bandwidth_bytes_per_s
        if isinstance(bw, bool) or not isinstance(bw, int | float) or math.isnan(bw) or bw <= 0:
            raise ClusterSpecError(f"link bandwidth_bytes_per_s must be > 0 (math.inf allowed), got {bw!r}")
        if self.directions is not None:
            self._check_directions()
        lat = self.latency_s
        if isinstance(lat, bool) or not isinstance(lat, int | float) or not math.isfinite(lat) or lat < 0:
            raise ClusterSpecError(f"link latency_s must be a finite number >= 0, got {lat!r}")

    def _check_directions(self) -> None:
        directions = tuple(self.directions or ())
        if len(directions) != 2 or not all(positive_finite(v) or v == math.inf for v in directions):
            raise ClusterSpecError(f"link directions must be two bandwidths > 0 (a -> b, b -> a), got {self.directions!r}")
        there, back = (float(v) for v in directions)
        if self.bandwidth_bytes_per_s != min(there, back):
            raise ClusterSpecError(
                f"a link with directions {there:g} and {back:g} bytes/s has the slower as its bandwidth_bytes_per_s, "
                f"got {self.bandwidth_bytes_per_s:g}"
            )
        object.__setattr__(self, "directions", None if there == back else (there, back))


SELF_LINK = LinkSpec(math.inf, 0.0)

CATALOG: Mapping[str, DeviceType] = DEVICE_TYPES
LINK_PRESETS: Mapping[str, LinkSpec] = MappingProxyType(
    {name: LinkSpec(p.bandwidth_bytes_per_s, p.latency_s, "catalog") for name, p in LINK_PRESET_VALUES.items()}
)


def positive_finite(value: object) -> bool:
    """True for a finite number > 0 (not a bool)."""
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

    `pair_links` maps frozenset({a, b}) to the link between nodes a and b (both directions; see
    `LinkSpec.directions` for one whose directions differ); every other pair of distinct nodes uses
    `default_link`, the same both ways. Nodes are the devices plus the source.
    `default_link` None: there is none; a pair not in `pair_links` is unknown until measured.
    """

    devices: tuple[DeviceSpec, ...]
    source: str
    default_link: LinkSpec | None
    pair_links: Mapping[frozenset[str], LinkSpec] = field(default_factory=_FrozenLinks)
    _index: Mapping[str, DeviceSpec] = field(init=False, repr=False, compare=False, hash=False)
    # (a, b) -> the link from a to b, for the pair links whose directions differ
    _one_way: Mapping[tuple[str, str], LinkSpec] = field(init=False, repr=False, compare=False, hash=False)

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
        if self.default_link is not None and not isinstance(self.default_link, LinkSpec):
            raise ClusterSpecError("default_link must be a LinkSpec or None")
        if self.default_link is not None and self.default_link.directions is not None:
            raise ClusterSpecError("the default link is the same both ways; give a link whose directions differ "
                                   "as a pair (links.pairs, with bandwidth_b_to_a)")
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
        one_way: dict[tuple[str, str], LinkSpec] = {}
        for pair, link in links.items():
            if link.directions is not None:
                a, b = sorted(pair)
                for ends, bandwidth in zip(((a, b), (b, a)), link.directions, strict=True):
                    one_way[ends] = LinkSpec(bandwidth, link.latency_s, link.basis, link.measured)
        object.__setattr__(self, "_one_way", MappingProxyType(one_way))

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
        """The link from node a to node b; a node to itself: infinite bandwidth, no latency.

        For a pair whose directions differ, the direction a -> b alone (its `directions` is None).
        """
        if a == b:
            return SELF_LINK
        link = self.pair_links.get(frozenset((a, b)), self.default_link)
        if link is None:
            raise ClusterSpecError(
                f"the link {a}-{b} is not known: the cluster file declares no default link and no pair {a}-{b}; "
                "measure it (`partita cluster probe`, or deploy) or declare it"
            )
        return self._one_way[(a, b)] if link.directions is not None else link

    def knows_link(self, a: str, b: str) -> bool:
        """True when the link a-b has a figure (declared, catalog or measured)."""
        return a == b or self.default_link is not None or frozenset((a, b)) in self.pair_links

    def unknown_figures(self, timed: Collection[str] = ()) -> list[str]:
        """What must still be measured before planning: "pi-a: flops_per_s", "link pi-a-client", ...

        `timed`: devices whose compute is known another way (measured segment times).
        """
        out = [f"{d.name}: {label}" for d in self.devices for label in ("flops_per_s", "memory_bytes")
               if getattr(d, label) is None and not (label == "flops_per_s" and d.name in timed)]
        nodes = self.nodes
        for i, a in enumerate(nodes):
            out.extend(f"link {a}-{b}" for b in nodes[i + 1:] if not self.knows_link(a, b))
        return out

    def check_known(self, timed: Collection[str] = ()) -> None:
        """ClusterSpecError naming what is still unknown (an address-only device not yet measured)."""
        unknown = self.unknown_figures(timed)
        if unknown:
            shown = ", ".join(unknown[:4]) + (f" and {len(unknown) - 4} more" if len(unknown) > 4 else "")
            raise ClusterSpecError(
                f"the cluster leaves {shown} to be measured; measure it first: `partita cluster probe CLUSTER "
                "--out MEASURED.yaml` (then plan with MEASURED.yaml), or `partita plan --measure`"
            )

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
        """A copy where the link between a and b (both directions; `link.directions` in name order) is `link`."""
        if a == b:
            raise ClusterSpecError(f"a link joins two different nodes; got {a!r} twice")
        pairs = dict(self.pair_links)
        pairs[frozenset((a, b))] = link
        return dataclasses.replace(self, pair_links=_FrozenLinks(pairs))

    # --- files ----------------------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> ClusterSpec:
        """Load and validate a cluster file; ClusterSpecError names the file, the field and what was expected."""
        from partita.cluster_file import read_cluster_file

        return read_cluster_file(path)

    @classmethod
    def from_dict(cls, data: dict, *, origin: str = "<dict>") -> ClusterSpec:
        """Validate a dict in the file format (see `partita.cluster_file`) and build the cluster."""
        from partita.cluster_file import cluster_from_dict

        return cluster_from_dict(data, origin=origin)

    def to_dict(self) -> dict:
        """The file format in base SI units; `from_dict(spec.to_dict()) == spec`."""
        devices = []
        for d in self.devices:
            entry: dict[str, Any] = {"name": d.name}
            for key in ("flops_per_s", "memory_bytes", "type", "address", "public_key", "speed"):
                if getattr(d, key) is not None:
                    entry[key] = getattr(d, key)
            if d.basis:
                entry["basis"] = dict(d.basis)
            if d.spread:
                entry["spread"] = dict(d.spread)
            devices.append(entry)
        pairs = []
        for pair, link in self.pair_links.items():
            a, b = sorted(pair)
            pairs.append({"a": a, "b": b, **_link_dict(link)})
        pairs.sort(key=lambda p: (p["a"], p["b"]))
        links: dict[str, Any] = {"pairs": pairs}
        if self.default_link is not None:
            links = {"default": _link_dict(self.default_link), **links}
        return {"source": self.source, "devices": devices, "links": links}

    def to_yaml(self, path: str | Path) -> None:
        """Write the cluster as a YAML file that `from_yaml` reads back equal."""
        import yaml  # only the file helpers need it

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")


def _link_dict(link: LinkSpec) -> dict[str, Any]:
    """A link in the file format; a pair's ends are in name order, so `directions` reads as a -> b, b -> a."""
    out: dict[str, Any] = {"bandwidth_bytes_per_s": link.bandwidth_bytes_per_s, "latency_s": link.latency_s}
    if link.directions is not None:
        out["bandwidth_bytes_per_s"], out["bandwidth_b_to_a"] = link.directions
    if link.basis != "declared":
        out["basis"] = link.basis
    if link.measured:
        out["measured"] = dict(link.measured)
    return out
