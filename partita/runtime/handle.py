"""What the coordinator needs to know about a cluster of running workers, however they were started.

`LocalCluster` (workers it starts on this machine, emulated) and `partita.connect` (workers
already running at addresses) both produce the same thing: a `ClusterSpec` describing the
devices and links, plus, for every device, the worker's control endpoint and public key, plus
the coordinator's own keypair. `deploy` takes any object with these attributes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from partita.cluster import ClusterSpec, LinkSpec

if TYPE_CHECKING:
    from partita.plan import Plan


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
    """A cluster the coordinator can deploy onto (`LocalCluster`, `ConnectedCluster`, `MixedCluster`).

    `emulated_links` says whether links are emulated by the runtime (token bucket and latency at
    each sender) or real; `emulated_link(a, b)` is the emulated link between two nodes, None when
    it is real (a real device at either end). `dilation` is how many times slower than device
    time the emulated world runs (1.0 for real clusters): measured real seconds divide by it.
    `bind_host` is the address the coordinator's data socket binds to, `advertise_host` the one
    workers call back (None: `bind_host`). `host_speeds` maps each device emulated on this host to
    its speed relative to this host (empty for real devices); `threads_per_worker` is the torch
    threads an emulated worker uses. `fit_dilation(plan, host_segment_s)` lets an emulated cluster
    slow its world enough for a plan to run faithfully, and returns the dilation now in force.
    `pipelines` are the pipelines deployed on this cluster (closed with it).
    """

    @property
    def spec(self) -> ClusterSpec: ...
    @property
    def endpoints(self) -> Mapping[str, WorkerEndpoint]: ...
    @property
    def coordinator_keys(self) -> Keypair | None: ...
    @property
    def emulated_links(self) -> bool: ...
    @property
    def dilation(self) -> float: ...
    @property
    def bind_host(self) -> str: ...
    @property
    def advertise_host(self) -> str | None: ...
    @property
    def host_speeds(self) -> Mapping[str, float]: ...
    @property
    def threads_per_worker(self) -> int: ...
    @property
    def pipelines(self) -> Deployments: ...

    def emulated_link(self, a: str, b: str) -> LinkSpec | None: ...

    def fit_dilation(self, plan: Plan, host_segment_s: tuple[float, ...] | None) -> float: ...

    def worker_exit(self, name: str) -> int | None:
        """The exit code of device `name`'s worker process if this machine started it and it ended, else None."""
        ...


class Deployments:
    """The pipelines deployed on one cluster, so that closing the cluster closes them (and `set_link` reaches them).

    Pipelines register themselves when deployed and leave when closed. Thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pipelines: list[Any] = []

    def add(self, pipeline: Any) -> None:
        with self._lock:
            self._pipelines.append(pipeline)

    def remove(self, pipeline: Any) -> None:
        with self._lock:
            self._pipelines = [p for p in self._pipelines if p is not pipeline]

    def __iter__(self) -> Iterator[Any]:
        with self._lock:
            return iter(list(self._pipelines))

    def __len__(self) -> int:
        with self._lock:
            return len(self._pipelines)

    def free_slot(self) -> int:
        """The lowest deployment slot no running pipeline uses (0 when there is none)."""
        used = {pipeline.deployment.slot for pipeline in self}
        return next(slot for slot in range(len(used) + 1) if slot not in used)

    def close_all(self) -> None:
        """Close every pipeline (newest first)."""
        for pipeline in reversed(list(self)):
            pipeline.close()
