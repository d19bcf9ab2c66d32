"""Device classes: groups of devices that are interchangeable for the cost model.

Two devices are interchangeable when they have the same compute (flops_per_s, or the same measured
segment times), the same memory, the same link to every other node, and (for a class of three or
more) the same link among themselves. Swapping interchangeable devices in a plan changes no
prediction, so the planners search over classes and counts instead of over individual devices:
that is what keeps them exact on large clusters with few device types.

The source, when it is a device, is always a class of its own (its link to itself is free).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from partita.cluster import ClusterSpec, DeviceSpec, LinkSpec

__all__ = ["DeviceClass", "group_devices"]


@dataclass(frozen=True)
class DeviceClass:
    """Interchangeable devices; `members` in file order; `intra_link` joins two members (None if one)."""

    members: tuple[str, ...]
    spec: DeviceSpec  # the first member
    segment_times: tuple[float, ...] | None
    intra_link: LinkSpec | None

    @property
    def size(self) -> int:
        return len(self.members)


def group_devices(cluster: ClusterSpec, segment_times_s: Mapping[str, Sequence[float]] | None = None
                  ) -> list[DeviceClass]:
    """Partition the cluster's devices into classes of interchangeable devices (file order kept)."""
    times = dict(segment_times_s or {})
    linked = {name for pair in cluster.pair_links for name in pair}  # nodes with a non-default link
    # Devices that appear in no pair link only have default links: group them by spec alone.
    plain: dict[tuple, list[str]] = {}
    special: list[str] = []
    for device in cluster.devices:
        if device.name in linked or device.name == cluster.source:
            special.append(device.name)
        else:
            plain.setdefault(_key(device, times), []).append(device.name)
    groups: list[list[str]] = list(plain.values())
    # Devices with pair links join a group only if every link matches (greedy, pairwise checked).
    special_groups: list[tuple[list[str], LinkSpec | None]] = []
    for name in special:
        if name == cluster.source:
            special_groups.append(([name], None))
            continue
        for index, (members, intra) in enumerate(special_groups):
            if _joins(cluster, times, name, members, intra, linked):
                special_groups[index] = (members + [name], intra or cluster.link(name, members[0]))
                break
        else:
            special_groups.append(([name], None))
    groups += [members for members, _ in special_groups]
    order = {name: i for i, name in enumerate(cluster.names)}
    groups.sort(key=lambda members: order[members[0]])
    classes = []
    for members in groups:
        spec = cluster.device(members[0])
        intra = cluster.link(members[0], members[1]) if len(members) > 1 else None
        seg = tuple(times[members[0]]) if members[0] in times else None
        classes.append(DeviceClass(tuple(members), spec, seg, intra))
    return classes


def _key(device: DeviceSpec, times: Mapping[str, Sequence[float]]) -> tuple:
    measured = tuple(float(t) for t in times[device.name]) if device.name in times else None
    return (device.memory_bytes, device.flops_per_s if measured is None else None, measured)


def _joins(cluster: ClusterSpec, times, name: str, members: list[str], intra: LinkSpec | None,
           linked: set[str]) -> bool:
    rep = members[0]
    if rep == cluster.source or _key(cluster.device(name), times) != _key(cluster.device(rep), times):
        return False
    inside = set(members) | {name}
    # Links to outside nodes: only linked nodes and the source can differ from the default.
    for other in linked | {cluster.source}:
        if other not in inside and (cluster.link(name, other) != cluster.link(rep, other)
                                    or cluster.link(other, name) != cluster.link(other, rep)):
            return False
    wanted = intra if intra is not None else cluster.link(name, rep)
    return all(cluster.link(name, member) == wanted == cluster.link(member, name) for member in members)
