"""What the coordinator needs to know about a cluster of running workers, however they were started.

`LocalCluster` (workers it starts on this machine, emulated) and `partita.connect` (workers
already running at addresses) both produce the same thing: a `ClusterSpec` describing the
devices and links, plus, for every device, the worker's control endpoint and public key, plus
the coordinator's own keypair. `deploy` takes any object with these attributes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from partita.cluster import ClusterSpec


@dataclass(frozen=True)
class Keypair:
    """A CURVE keypair as z85 bytes (40 characters each)."""

    public: bytes
    secret: bytes


@dataclass(frozen=True)
class WorkerEndpoint:
    """One running worker: its device name, control address and CURVE public key.

    `public_key` is None when the worker runs `--insecure` (no encryption, no authentication).
    """

    name: str
    control: str
    public_key: bytes | None


class ClusterHandle(Protocol):
    """A cluster the coordinator can deploy onto.

    `emulated_links` says whether links are emulated by the runtime (token bucket and latency at
    each sender, as `spec` declares them) or real. `dilation` is how many times slower than device
    time the emulated world runs (1.0 for real clusters): measured real seconds divide by it.
    `bind_host` is the address the coordinator's data socket binds to so workers can reach it.
    """

    spec: ClusterSpec
    endpoints: Mapping[str, WorkerEndpoint]
    coordinator_keys: Keypair | None
    emulated_links: bool
    dilation: float
    bind_host: str
