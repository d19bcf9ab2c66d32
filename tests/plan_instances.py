"""Random planning instances shared by the planner and simulator tests (seeded, no torch)."""

from __future__ import annotations

import math
import random
from itertools import combinations

from partita.cluster import ClusterSpec

SOURCE = "src"


def random_instance(rng: random.Random, n_devices: int, n_segments: int, *, types: int | None = None,
                    one_way: bool = False):
    """A random profile and cluster; memory limits bind and links are unequal (a pair link each).

    `one_way`: each pair link also has a random bandwidth from b to a (the same as a to b one time in four).
    """
    if one_way and types is not None:
        raise ValueError("one_way links are drawn per pair, which would break the interchangeable kinds of `types`")
    segments = []
    for i in range(n_segments):
        segments.append({
            "name": f"s{i}",
            "flops": rng.randint(1, 60) * 10**8,
            "param_bytes": rng.randint(1, 40) * 10**6,
            "act_bytes": rng.randint(1, 15) * 10**6,
            "out_bytes": rng.randint(1, 50) * 10**5,
        })
    profile = {"model": "rand", "input_bytes": rng.randint(1, 50) * 10**5, "segments": segments}
    total_params = sum(s["param_bytes"] for s in segments)
    kinds = types or n_devices
    specs = [(rng.choice([0.5e10, 1e10, 2e10, 4e10]), rng.uniform(0.25, 0.8) * total_params + 15e6)
             for _ in range(kinds)]
    devices, kind_of = [], {}
    for i in range(n_devices):
        kind = i % kinds
        flops, memory = specs[kind]
        devices.append({"name": f"d{i}", "flops_per_s": flops, "memory_bytes": memory})
        kind_of[f"d{i}"] = kind
    nodes = [d["name"] for d in devices] + [SOURCE]
    kind_of[SOURCE] = -1
    pair_spec = {}
    pairs = []
    for a, b in combinations(nodes, 2):
        key = tuple(sorted((kind_of[a], kind_of[b])))
        if types is None or key not in pair_spec:
            pair_spec[key] = (rng.choice([1e6, 5e6, 2e7, 1e8]), rng.choice([0.0, 0.001, 0.01]))
        bandwidth, latency = pair_spec[key]
        pairs.append({"a": a, "b": b, "bandwidth_bytes_per_s": bandwidth, "latency_s": latency})
        if one_way:
            pairs[-1]["bandwidth_b_to_a"] = rng.choice([1e6, 5e6, 2e7, 1e8])
    cluster = ClusterSpec.from_dict({
        "source": SOURCE,
        "devices": devices,
        "links": {"default": {"bandwidth_bytes_per_s": 1e7, "latency_s": 0.001}, "pairs": pairs},
    })
    return profile, cluster, kind_of


RESNET50_PROFILE = "benchmarks/profiles/resnet50.json"


def geometric_field(rng: random.Random, n_devices: int, *, memory_bytes: float = 36e6, side_m: float = 100.0,
                    flops_per_s: float = 13.5e9, mixed: bool = False) -> ClusterSpec:
    """Devices scattered over a square field; every pair's bandwidth falls with its distance.

    The source sits at the centre. Bandwidth follows a Wi-Fi-like fall-off, 30 MB/s close by and
    30 MB/s / (1 + (d / 20 m)^2.5) further out; latency is 1 ms plus 0.05 ms per metre. So every pair of
    nodes has its own link. With the default memory, ResNet-50 needs about four stages. `mixed` draws
    each device's compute from 0.5x to 2x instead of making them equal.
    """
    positions = {SOURCE: (side_m / 2, side_m / 2)}
    devices = []
    for i in range(n_devices):
        positions[f"d{i}"] = (rng.uniform(0, side_m), rng.uniform(0, side_m))
        speed = flops_per_s * (rng.choice([0.5, 1.0, 2.0]) if mixed else 1.0)
        devices.append({"name": f"d{i}", "flops_per_s": speed, "memory_bytes": memory_bytes})
    pairs = []
    for a, b in combinations(list(positions), 2):
        (xa, ya), (xb, yb) = positions[a], positions[b]
        distance = math.hypot(xa - xb, ya - yb)
        bandwidth = 30e6 / (1.0 + (distance / 20.0) ** 2.5)
        pairs.append({"a": a, "b": b, "bandwidth_bytes_per_s": bandwidth, "latency_s": 1e-3 + 5e-5 * distance})
    return ClusterSpec.from_dict({
        "source": SOURCE,
        "devices": devices,
        "links": {"default": {"bandwidth_bytes_per_s": 1e6, "latency_s": 0.01}, "pairs": pairs},
    })
