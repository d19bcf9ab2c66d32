"""Random planning instances shared by the planner and simulator tests (seeded, no torch)."""

from __future__ import annotations

import random
from itertools import combinations

from partita.cluster import ClusterSpec

SOURCE = "src"


def random_instance(rng: random.Random, n_devices: int, n_segments: int, *, types: int | None = None):
    """A random profile and cluster; memory limits bind and links are unequal (a pair link each)."""
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
    cluster = ClusterSpec.from_dict({
        "source": SOURCE,
        "devices": devices,
        "links": {"default": {"bandwidth_bytes_per_s": 1e7, "latency_s": 0.001}, "pairs": pairs},
    })
    return profile, cluster, kind_of
